"""Learned text prompts on an open_clip text tower: context vectors at the input and deep (compound) prompts inside.

The layout is Crane's and AnomalyCLIP's (``models/Crane.py`` ``ResidualAttentionBlock_learnable_token.forward``,
``AnomalyCLIP_lib/AnomalyCLIP.py`` l. 225-245; ``encode_text_learn``):

- the input token embeddings of ``"X ... X object."`` have positions ``1 .. n_ctx`` (after SOT) replaced by the learned
  context vectors;
- before text block ``i`` (0-based) for ``i = 1 .. depth - 1``, token positions ``1 .. t_n_ctx`` of the running
  sequence are replaced by deep prompt ``i - 1``. The reference casts each deep prompt to fp16 (``.half()``) before
  splicing it into the (fp32) sequence, so its values are rounded through fp16; that rounding is kept here;
- then ``ln_final``, the EOT token (argmax of the token ids) and ``text_projection``, as open_clip's ``encode_text``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def splice_deep_prompt(x: torch.Tensor, prompt: torch.Tensor, *, round_fp16: bool = True) -> torch.Tensor:
    """(K, L, width) batch-first tokens with positions ``1 .. t`` replaced by ``prompt`` (t, width) for every row."""
    p = prompt.half() if round_fp16 else prompt
    p = p.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
    return torch.cat([x[:, :1], p, x[:, 1 + prompt.shape[0] :]], dim=1)


def run_text_blocks(
    transformer: nn.Module,
    x: torch.Tensor,
    attn_mask: torch.Tensor | None,
    deep: Sequence[torch.Tensor] = (),
    *,
    round_fp16: bool = True,
) -> torch.Tensor:
    """open_clip's text ``Transformer.forward`` on (K, L, width) batch-first tokens, with ``deep[i - 1]`` spliced in
    before block ``i`` (0-based, ``i >= 1``)."""
    blocks = transformer.resblocks
    if len(deep) > len(blocks) - 1:
        raise ValueError(f"{len(deep)} deep prompts need {len(deep) + 1} text blocks, the tower has {len(blocks)}")
    batch_first = getattr(transformer, "batch_first", True)
    for i, block in enumerate(blocks):
        if 1 <= i <= len(deep):
            x = splice_deep_prompt(x, deep[i - 1], round_fp16=round_fp16)
        if batch_first:
            x = block(x, attn_mask=attn_mask)
        else:
            x = block(x.transpose(0, 1), attn_mask=attn_mask).transpose(0, 1)
    return x


def encode_with_context(
    model: nn.Module,
    tokens: torch.Tensor,
    ctx: torch.Tensor,
    deep: Sequence[torch.Tensor] = (),
    *,
    round_fp16: bool = True,
) -> torch.Tensor:
    """Text embeddings with token positions ``1 .. n_ctx`` replaced by learned vectors (open_clip ``encode_text``),
    plus optional deep prompts.

    Args:
        model: an open_clip ``CLIP`` model.
        tokens: (K, L) token ids of K prompts (``L`` = the context length, 77).
        ctx: (K, n_ctx, width) context vectors.
        deep: deep prompts, each (t_n_ctx, width), spliced before text blocks 1, 2, ... (0-based).
        round_fp16: round the deep prompts through fp16 as the reference code does.

    Returns:
        (K, D) unnormalised embeddings.
    """
    from open_clip.transformer import text_global_pool

    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast)
    x = torch.cat([x[:, :1], ctx.to(cast), x[:, 1 + ctx.shape[1] :]], dim=1)
    x = x + model.positional_embedding.to(cast)
    if deep:
        x = run_text_blocks(model.transformer, x, model.attn_mask, deep, round_fp16=round_fp16)
    else:
        x = model.transformer(x, attn_mask=model.attn_mask)
    x = model.ln_final(x)
    x = text_global_pool(x, tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    proj = model.text_projection
    if proj is None:
        return x
    return proj(x) if isinstance(proj, nn.Linear) else x @ proj
