"""The dense CLIP engine: training-free dual-path refined attention (AnomalyCLIP's DPAM, FiLo's V-V, Crane's E-Attn).

In the last blocks of the ViT two streams run side by side (METHODS.md §1):

- the original stream is unchanged: ``x_o <- x_o + Attn_qk(LN1 x_o)``, then ``x_o <- x_o + FFN(LN2 x_o)``;
- the refined stream starts as the input of the first refined block and accumulates ``x_r <- x_r + Proj(A V)``
  with no FFN, where Q, K, V come from ``LN1(x_o)`` of the *original* stream and ``A`` is a sum of self-correlation
  attentions: ``vv`` (AnomalyCLIP, FiLo) or ``qq+kk+vv`` (Crane's E-Attn, the default), each
  ``softmax(M M^T / sqrt(d_h))``. The sum is not renormalised (as in Crane).

Dense tokens come from the refined stream at the tapped layers, copied per layer, then ``ln_post`` and ``proj``;
the global embedding comes from the original stream and equals open_clip's ``encode_image`` (tested).

Each block is re-implemented around one shared Q/K/V projection, so the refined path costs only its extra N x N
attentions and one ``A V`` product (about +28 % of a ViT-L/14 forward at 518 px for ``qq+kk+vv``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vlad.backbones.clip import ClipBackbone
from vlad.errors import BackboneError, ConfigError

ATTENTION_TYPES = ("vv", "kk", "qq", "qq+kk", "qq+vv", "kk+vv", "qq+kk+vv")


@dataclass
class DenseOutput:
    """A dual-path forward.

    Attributes:
        global_embedding: (B, D) from the original stream (== ``encode_image``), unnormalised.
        refined: layer (1-based) -> (B, N, D) projected refined patch tokens, unnormalised, copies.
        grid: (gh, gw).
        values: (B, N, width) the last block's value vectors per patch (heads concatenated), for D-Attn.
        global_tokens: (B, width) the original stream's final class token (before ``ln_post``).
    """

    global_embedding: torch.Tensor
    refined: dict[int, torch.Tensor]
    grid: tuple[int, int]
    values: torch.Tensor | None = None
    global_tokens: torch.Tensor | None = None


def check_attention(attention: str) -> tuple[str, ...]:
    """Split ``"qq+kk+vv"`` into its parts, rejecting unknown ones."""
    if attention not in ATTENTION_TYPES:
        raise ConfigError(f"unknown refined attention {attention!r}; allowed: {', '.join(ATTENTION_TYPES)}")
    return tuple(part[0] for part in attention.split("+"))


def default_layers(num_layers: int) -> tuple[int, ...]:
    """Quarter points of the depth: (6, 12, 18, 24) for a 24-layer ViT."""
    return tuple(sorted({max(1, round(num_layers * q / 4)) for q in (1, 2, 3, 4)}))


def default_first_refined(num_layers: int, refined_blocks: int = 19) -> int:
    """First refined block (1-based): the last 19 blocks, i.e. layers 6..24 of ViT-L/14 (Crane, AnomalyCLIP)."""
    return max(1, num_layers - refined_blocks + 1)


def _split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, w = t.shape
    return t.view(b, n, heads, w // heads).transpose(1, 2)


def _merge_heads(t: torch.Tensor) -> torch.Tensor:
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


def _block_qkv(block: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    attn = block.attn
    if not isinstance(attn, torch.nn.MultiheadAttention) or not attn._qkv_same_embed_dim:
        raise BackboneError("dual-path attention needs open_clip blocks with nn.MultiheadAttention (packed q/k/v)")
    qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
    return tuple(_split_heads(t, attn.num_heads) for t in qkv.chunk(3, dim=-1))  # type: ignore[return-value]


def _out_proj(block: torch.nn.Module, heads_out: torch.Tensor) -> torch.Tensor:
    attn = block.attn
    return block.ls_1(F.linear(_merge_heads(heads_out), attn.out_proj.weight, attn.out_proj.bias))


def dual_path_block(
    block: torch.nn.Module, x_o: torch.Tensor, x_r: torch.Tensor, parts: Sequence[str], *, mid_values: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One block of both streams on (B, L, width) batch-first tokens; returns (x_o, x_r, v).

    ``v`` holds the block's value vectors (B, heads, L, d_h); with ``mid_values`` they are recomputed from the original
    stream after the attention residual and before the MLP (what Crane's D-Attn reads, its in-place update)."""
    q, k, v = _block_qkv(block, x_o)
    x_o = x_o + _out_proj(block, F.scaled_dot_product_attention(q, k, v))
    v_out = _block_qkv(block, x_o)[2] if mid_values else v
    x_o = x_o + block.ls_2(block.mlp(block.ln_2(x_o)))
    named = {"q": q, "k": k, "v": v}
    refined = sum(F.scaled_dot_product_attention(named[p], named[p], v) for p in parts)
    x_r = x_r + _out_proj(block, refined)
    return x_o, x_r, v_out


@torch.no_grad()
def dense_forward(
    backbone: ClipBackbone,
    x: torch.Tensor,
    layers: Sequence[int],
    *,
    attention: str = "qq+kk+vv",
    first_refined: int | None = None,
    keep_values: bool | str = False,
    pos_interpolation: str = "bicubic",
) -> DenseOutput:
    """Run the image tower with a refined stream from block ``first_refined`` on.

    Args:
        backbone: an open_clip ViT backbone.
        x: (B, 3, S, S) preprocessed images.
        layers: 1-based layers whose refined tokens to return (each >= ``first_refined``).
        attention: one of :data:`ATTENTION_TYPES`.
        first_refined: first block with the refined stream; default: the last 19 blocks.
        keep_values: also return the last block's value vectors (for D-Attn): ``True`` / ``"input"`` from the block's
            input, ``"mid"`` from the original stream after its attention residual (Crane's reference).
        pos_interpolation: how the positional embedding is re-gridded
            (see :data:`vlad.backbones.clip.POS_INTERPOLATIONS`).
    """
    parts = check_attention(attention)
    n = backbone.num_layers
    first = default_first_refined(n) if first_refined is None else first_refined
    taps = sorted({n + 1 + layer if layer < 0 else layer for layer in layers})
    if not 1 <= first <= n:
        raise ConfigError(f"first refined block {first} out of range 1..{n}")
    bad = [layer for layer in taps if not first <= layer <= n]
    if bad:
        raise ConfigError(f"refined layers {bad} out of range: the refined stream covers layers {first}..{n}")
    transformer = backbone.model.visual.transformer
    if not getattr(transformer, "batch_first", True):
        raise BackboneError("dual-path attention needs a batch-first open_clip transformer")
    grid = (x.shape[-2] // backbone.patch_size, x.shape[-1] // backbone.patch_size)
    x_o = backbone.embed(x, pos_interpolation=pos_interpolation)
    x_r, v = x_o, None
    refined: dict[int, torch.Tensor] = {}
    for i, block in enumerate(transformer.resblocks, start=1):
        if i < first:
            x_o = block(x_o, attn_mask=None)
            x_r = x_o
            continue
        x_o, x_r, v = dual_path_block(block, x_o, x_r, parts, mid_values=keep_values == "mid" and i == n)
        if i in taps:
            refined[i] = backbone.project_tokens(x_r[:, 1:].clone())
    values = _merge_heads(v)[:, 1:].clone() if keep_values and v is not None else None
    return DenseOutput(backbone.project_global(x_o), refined, grid, values, global_tokens=x_o[:, 0].clone())
