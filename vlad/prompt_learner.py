"""Crane / AnomalyCLIP learnable text prompts: the ``"X ... X object."`` templates and :class:`PromptLearner`.

Shared by :mod:`vlad.training` (which learns the context vectors), :mod:`vlad.adapters` (which applies a saved
``crane-prompts`` adapter) and :mod:`vlad.checkpoints` (which imports official releases). It imports torch; it must
not import those modules (they import it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from vlad.backbones.clip import ClipBackbone
from vlad.backbones.prompts import encode_with_context
from vlad.errors import BackboneError, ConfigError

if TYPE_CHECKING:
    from vlad.adapters import Adapter

NORMAL_SUFFIX = "object."
ANOMALOUS_SUFFIX = "damaged object."
CONTEXT_TOKEN = "X"
CTX_INIT_STD = 0.02


def prompt_template(n_ctx: int, suffix: str) -> str:
    """``"X X ... X <suffix>"`` with ``n_ctx`` context placeholders."""
    return " ".join([CONTEXT_TOKEN] * n_ctx + [suffix])


def check_text_tower(model: nn.Module, spec: str) -> int:
    """The text width of an open_clip CLIP text tower (raises BackboneError for other towers)."""
    needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection", "attn_mask")
    missing = [name for name in needed if not hasattr(model, name)]
    if missing:
        raise BackboneError(f"{spec}: learned prompts need an open_clip CLIP text tower; it lacks {missing}")
    return int(model.token_embedding.weight.shape[1])


def _context_tokens(backbone: ClipBackbone, templates: Sequence[str], n_ctx: int) -> torch.Tensor:
    """(2, L) token ids of the templates, checked: ``n_ctx`` placeholder tokens after SOT, nothing truncated."""
    prefix = " ".join([CONTEXT_TOKEN] * n_ctx) + " "
    if len(templates) != 2 or not all(t.startswith(prefix) and len(t) > len(prefix) for t in templates):
        raise ConfigError(
            f"prompt templates must be two strings of {n_ctx} {CONTEXT_TOKEN!r} tokens and a suffix, "
            f"got {list(templates)}"
        )
    tokens = backbone.tokenizer(list(templates)).to(backbone.device)
    ctx_ids = tokens[:, 1 : 1 + n_ctx]
    if (tokens != 0).sum(-1).max() >= tokens.shape[1]:
        raise ConfigError(f"n_ctx {n_ctx} is too long: the prompts exceed the context length {tokens.shape[1]}")
    if not bool((ctx_ids == ctx_ids[0, 0]).all()) or bool((tokens[:, 1 + n_ctx] == ctx_ids[0, 0]).any()):
        raise BackboneError(f"{backbone.spec}: the tokenizer does not map {CONTEXT_TOKEN!r} to one token per word")
    return tokens


class PromptLearner(nn.Module):
    """Crane / AnomalyCLIP object-agnostic learnable prompts: ``ctx_pos`` and ``ctx_neg``, each (n_ctx, width), and
    optionally frozen deep text prompts (imported from an official checkpoint; vlad's trainer does not learn them).

    Args:
        backbone: the (frozen) CLIP backbone whose text tower encodes the prompts.
        n_ctx: learned context tokens per prompt.
        templates: the [normal, anomalous] prompts with ``X`` placeholders; default ``"X ... X object."`` and
            ``"X ... X damaged object."``.
        seed: seed of the N(0, 0.02) initialisation.
        deep: deep prompts, each (t_n_ctx, width), spliced before text blocks 1, 2, ... (0-based).
    """

    def __init__(
        self,
        backbone: ClipBackbone,
        n_ctx: int = 12,
        templates: Sequence[str] | None = None,
        *,
        seed: int = 0,
        deep: Sequence[torch.Tensor] = (),
        round_fp16: bool = True,
    ) -> None:
        super().__init__()
        width = check_text_tower(backbone.model, backbone.spec)
        self.backbone = backbone
        self.n_ctx = n_ctx
        default = (prompt_template(n_ctx, NORMAL_SUFFIX), prompt_template(n_ctx, ANOMALOUS_SUFFIX))
        self.templates = tuple(templates or default)
        self.register_buffer("tokens", _context_tokens(backbone, self.templates, n_ctx), persistent=False)
        init = torch.randn(2, n_ctx, width, generator=torch.Generator().manual_seed(seed)) * CTX_INIT_STD
        self.ctx_pos = nn.Parameter(init[0].clone().to(backbone.device))
        self.ctx_neg = nn.Parameter(init[1].clone().to(backbone.device))
        self.deep = [d.detach().to(backbone.device) for d in deep]
        self.round_fp16 = round_fp16

    def forward(self) -> torch.Tensor:
        """(2, D) L2-normalised [normal, anomalous] text features (fp32)."""
        ctx = torch.stack([self.ctx_pos, self.ctx_neg])
        text = encode_with_context(self.backbone.model, self.tokens, ctx, self.deep, round_fp16=self.round_fp16)
        return F.normalize(text.float(), dim=-1)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """``{"ctx_pos", "ctx_neg"}``: detached CPU copies, (n_ctx, width) each."""
        return {"ctx_pos": self.ctx_pos.detach().cpu().clone(), "ctx_neg": self.ctx_neg.detach().cpu().clone()}

    @classmethod
    def from_adapter(cls, backbone: ClipBackbone, adapter: Adapter) -> PromptLearner:
        """Rebuild the learner of a ``crane-prompts`` adapter on ``backbone`` (its width must match)."""
        meta, tensors = adapter.metadata, adapter.tensors
        width = check_text_tower(backbone.model, backbone.spec)
        if tensors["ctx_pos"].shape[-1] != width:
            raise ConfigError(
                f"adapter {adapter.name} has context width {tensors['ctx_pos'].shape[-1]}, but the text "
                f"tower of {backbone.spec} has width {width}"
            )
        if not {"normal", "anomalous"} <= set(meta.prompts):
            raise ConfigError(f"adapter {adapter.name}: prompts must hold 'normal' and 'anomalous' templates")
        deep = adapter.deep_prompts()
        blocks = len(backbone.model.transformer.resblocks)
        if len(deep) > blocks - 1:
            raise ConfigError(
                f"adapter {adapter.name} has {len(deep)} deep text prompts (text blocks "
                f"2..{len(deep) + 1}) but the text tower of {backbone.spec} has "
                f"{blocks} blocks"
            )
        round_fp16 = bool((meta.deep_prompts or {}).get("round_fp16", True))
        templates = (meta.prompts["normal"], meta.prompts["anomalous"])
        learner = cls(backbone, int(meta.n_ctx or 0), templates, deep=deep, round_fp16=round_fp16)
        with torch.no_grad():
            learner.ctx_pos.copy_(tensors["ctx_pos"])
            learner.ctx_neg.copy_(tensors["ctx_neg"])
        return learner
