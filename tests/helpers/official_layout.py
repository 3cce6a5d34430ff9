"""Test oracles for the paper profile: checkpoints in the official Crane / AnomalyCLIP layout, and an independent,
deliberately literal re-implementation of the two references' inference (sequence-first tokens, explicit attention
matrices, the in-place refined stream whose stored taps alias, scipy's Gaussian), written from the published algorithm
for comparison with vlad's engine on the same random weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

DEEP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 4},
}
DEEP_MODEL = "vlad-test-deep"


def register_deep_model(folder: Path) -> str:
    """A tiny CLIP whose text tower has 4 blocks (room for 3 deep prompts); returns the ``random:`` spec."""
    import open_clip

    if DEEP_MODEL not in open_clip.list_models():
        path = folder / f"{DEEP_MODEL}.json"
        path.write_text(json.dumps(DEEP_CONFIG), encoding="utf-8")
        open_clip.add_model_config(path)
    return f"random:{DEEP_MODEL}"


def official_state(
    backbone,
    *,
    n_ctx: int = 12,
    t_n_ctx: int = 4,
    depth: int = 4,
    seed: int = 0,
    projections: bool = False,
    std: float = 0.3,
) -> dict[str, torch.Tensor]:
    """A prompt-learner state dict with the official key names, shapes and dtypes, random learned values."""
    g = torch.Generator().manual_seed(seed)
    width = backbone.model.token_embedding.weight.shape[1]
    state: dict[str, torch.Tensor] = {}
    for kind, suffix in (("pos", "object."), ("neg", "damaged object.")):
        tokens = backbone.tokenizer([" ".join(["X"] * n_ctx + [suffix])])
        with torch.no_grad():
            emb = backbone.model.token_embedding(tokens).float()
        state[f"ctx_{kind}"] = torch.randn(1, 1, n_ctx, width, generator=g) * std
        state[f"token_prefix_{kind}"] = emb[:, None, :1].clone()
        state[f"token_suffix_{kind}"] = emb[:, None, 1 + n_ctx :].clone()
        state[f"tokenized_prompts_{kind}"] = tokens[:, None].to(torch.int32)
    for i in range(depth - 1):
        state[f"compound_prompts_text.{i}"] = torch.randn(t_n_ctx, width, generator=g) * std
        if projections:
            state[f"compound_prompt_projections.{i}.weight"] = torch.randn(896, width, generator=g)
            state[f"compound_prompt_projections.{i}.bias"] = torch.zeros(896)
    return state


def save_official(state: dict[str, torch.Tensor], path: Path) -> Path:
    torch.save({"prompt_learner": state}, path)
    return path


# ---------------------------------------------------------------------- text oracle
@torch.no_grad()
def reference_text_features(model, state: dict[str, torch.Tensor]) -> torch.Tensor:
    """(2, D) normalised [normal, anomalous] features: stored prefix/suffix around the context, deep prompts cast to
    fp16 and spliced at positions 1..t before text blocks 1.., then ln_final, the EOT token, the projection."""
    deep = [
        state[f"compound_prompts_text.{i}"] for i in range(sum(k.startswith("compound_prompts_text.") for k in state))
    ]
    feats = []
    for kind in ("pos", "neg"):
        x = torch.cat(
            [state[f"token_prefix_{kind}"][0, 0], state[f"ctx_{kind}"][0, 0], state[f"token_suffix_{kind}"][0, 0]]
        )
        x = (x + model.positional_embedding)[:, None]  # (L, 1, width), sequence first
        for i, block in enumerate(model.transformer.resblocks):
            if 1 <= i <= len(deep):
                x = torch.cat([x[:1], deep[i - 1].half()[:, None].float(), x[1 + deep[i - 1].shape[0] :]])
            x = block(x.transpose(0, 1), attn_mask=model.attn_mask).transpose(0, 1)
        x = model.ln_final(x[:, 0])
        eot = int(state[f"tokenized_prompts_{kind}"].reshape(-1).argmax())
        feats.append(x[eot] @ model.text_projection)
    return F.normalize(torch.stack(feats), dim=-1)


# ---------------------------------------------------------------------- vision oracle
def _attention(a: torch.Tensor, b: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.softmax((a @ b.transpose(-2, -1)) * scale, dim=-1) @ v


@torch.no_grad()
def reference_visual(model, x: torch.Tensor, parts: str, taps: list[int], *, clone_taps: bool, ln_global: bool):
    """(global (B, D), [patch tokens (B, N, D) per tap]) with the dual path in the last 19 blocks."""
    vis = model.visual
    b = x.shape[0]
    t = vis.conv1(x).reshape(b, vis.conv1.out_channels, -1).permute(0, 2, 1)
    t = torch.cat([vis.class_embedding + torch.zeros(b, 1, t.shape[-1]), t], dim=1)
    side, new = int((vis.positional_embedding.shape[0] - 1) ** 0.5), int((t.shape[1] - 1) ** 0.5)
    patch_pos = vis.positional_embedding[1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(patch_pos, (new, new), mode="bilinear").reshape(1, -1, new * new).transpose(1, 2)[0]
    t = vis.ln_pre(t + torch.cat([vis.positional_embedding[:1], patch_pos]))
    t = t.permute(1, 0, 2)  # sequence first, as the references
    blocks = vis.transformer.resblocks
    first = max(0, len(blocks) - 19)
    refined, stored = None, []
    for i, block in enumerate(blocks):
        if i < first:
            t = block(t.transpose(0, 1), attn_mask=None).transpose(0, 1)
            continue
        h = block.ln_1(t)
        heads = block.attn.num_heads
        qkv = F.linear(h.transpose(0, 1), block.attn.in_proj_weight, block.attn.in_proj_bias)
        q, k, v = (z.reshape(b, -1, heads, z.shape[-1] // heads).transpose(1, 2) for z in qkv.chunk(3, dim=-1))
        scale = q.shape[-1] ** -0.5
        named = {"q": q, "k": k, "v": v}
        ori = _attention(q, k, v, scale)
        sc = sum(_attention(named[p[0]], named[p[0]], v, scale) for p in parts.split("+"))
        proj = block.attn.out_proj
        ori = proj(ori.transpose(1, 2).reshape(b, -1, q.shape[1] * q.shape[-1])).transpose(0, 1)
        sc = proj(sc.transpose(1, 2).reshape(b, -1, q.shape[1] * q.shape[-1])).transpose(0, 1)
        if refined is None:
            refined = t.clone()
        t = t + ori
        t = t + block.mlp(block.ln_2(t))
        refined += sc  # in place: stored views see every later update unless cloned
        if i + 1 in taps:
            stored.append(refined[1:].clone() if clone_taps else refined[1:])
    tokens = [vis.ln_post(s.permute(1, 0, 2)) @ vis.proj for s in stored]
    glob = (vis.ln_post(t[0]) if ln_global else t[0]) @ vis.proj
    return glob, tokens


def _blur(maps: torch.Tensor) -> np.ndarray:
    return np.stack([gaussian_filter(m, sigma=4) for m in maps.numpy()])


@torch.no_grad()
def reference_crane(model, x: torch.Tensor, text: torch.Tensor, taps: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Crane (soft mean, local-to-global score) as its test.py computes it; text (2, D) normalised."""
    glob, tokens = reference_visual(model, x, "qq+kk+vv", taps, clone_taps=False, ln_global=True)
    g = F.normalize(glob, dim=-1)
    patches = torch.stack([F.normalize(p, dim=-1) for p in tokens])  # (L, B, N, D)
    logits = [p @ text.T / 0.07 for p in patches]
    size, grid = x.shape[-1], int(patches.shape[2] ** 0.5)
    up = [
        F.interpolate(lg.softmax(-1).reshape(-1, grid, grid, 2).permute(0, 3, 1, 2), (size, size), mode="bilinear")
        for lg in logits
    ]
    amap = torch.stack(up).mean(0)[:, 1]
    w = torch.stack(logits).mean(0).softmax(-1)[..., 1:]
    pooled = F.normalize((patches.mean(0) * w).sum(1), dim=1)
    fused = F.normalize(0.5 * pooled + 0.5 * g, dim=1)
    score = (fused @ text.T / 0.07).softmax(-1)[:, 1]
    return score.numpy(), _blur(amap)


@torch.no_grad()
def reference_anomalyclip(model, x: torch.Tensor, text: torch.Tensor, taps: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """AnomalyCLIP as its test.py computes it: V-V taps (cloned), maps summed, global class token without ln_post."""
    glob, tokens = reference_visual(model, x, "vv", taps, clone_taps=True, ln_global=False)
    g = F.normalize(glob, dim=-1)
    size = x.shape[-1]
    maps = []
    for p in tokens:
        sim = (F.normalize(p, dim=-1) @ text.T / 0.07).softmax(-1)
        grid = int(sim.shape[1] ** 0.5)
        sm = F.interpolate(sim.reshape(-1, grid, grid, 2).permute(0, 3, 1, 2), (size, size), mode="bilinear")
        maps.append((sm[:, 1] + 1 - sm[:, 0]) / 2)
    score = (g @ text.T / 0.07).softmax(-1)[:, 1]
    return score.numpy(), _blur(torch.stack(maps).sum(0))
