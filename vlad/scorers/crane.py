"""Crane / Crane+ (Salehi et al., arXiv 2504.11055; reference code AlirezaSalehy/Crane).

Two profiles (docs/methods.md has the step-by-step table with reference file:line):

``paper`` (default) reproduces the official inference (``test.py``, ``models/Crane.py``) on the same weights:

- dense features from the dual-path engine (:mod:`vlad.backbones.dense`) with E-Attn ``qq+kk+vv`` in the last 19
  blocks; only layer 24 is read: the reference's ``--features_list 6 12 18 24`` stores views of one tensor that is
  updated in place, so all four are the last layer (its released prompts were trained on that);
- positional embedding re-gridded bilinearly (``VisionTransformer._check_interpolate_token_emebeddings``); fp32;
- map: ``softmax(cos(f, t) / 0.07)`` against [normal, anomalous] text features, bilinear to S; Crane averages the
  softmax maps (``--soft_mean True``), Crane+ takes the softmax of the upsampled mean logits; Gaussian sigma 4 px;
- image score, "local-to-global": ``w_p = softmax(mean logits_p)[a]``, ``c = normalize(sum_p w_p mean_l f_lp)``,
  ``g' = normalize(0.5 c + 0.5 g)``, ``score = softmax(cos(g', t) / 0.07)[a]``;
- Crane+ (``dattn=...``): D-Attn from DINOv2 patch similarity ``S = z z^T``, ``S' = 3 (S - 1.2 mean(S))`` with the
  mean over the whole batch tensor (as the reference computes it), negatives masked, row softmax, applied to the
  last block's values computed from the original stream *after* that block's attention residual (the reference's
  in-place ``x_ori += ...``), output projection; E-Attn and D-Attn token sets at layer 24;
- text: learned prompts from an imported official checkpoint (``vlad import-checkpoint --format crane``); without
  one, the training-free prompt ensemble, with a warning that the published numbers need the released prompts.

``vlad`` keeps vlad's measured choices: really distinct copies of layers 6/12/18/24, bicubic positional re-grid,
sigma scaled with the input size, the D-Attn threshold from each row's own mean (independent of the batch), values
from the block input.

Few-shot (both profiles, a vlad extension): a patch memory of the refined tokens at every tapped layer;
``(1 - max cos) / 2`` averaged over layers, fused 50/50 with the zero-shot map; image score
``(score + max few-shot map) / 2``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from vlad.backbones import DEFAULT_BACKBONE
from vlad.backbones.clip import ClipBackbone
from vlad.backbones.dense import DenseOutput, check_attention, default_first_refined, default_layers, dense_forward
from vlad.errors import ConfigError
from vlad.scorers._ops import gaussian_blur, min_cosine_distance, upsample
from vlad.scorers._text import PromptEnsemble
from vlad.scorers.base import Features, Scorer

logger = logging.getLogger(__name__)

TEMPERATURE = 0.07
REFERENCE_SIZE = 518  # the size at which the published sigma (4 px) applies


def dense_image_size(backbone: ClipBackbone) -> int:
    """The research protocol's size: the training grid scaled by 37/24 (ViT-L/14@336 -> 518)."""
    grid = backbone.native_size // backbone.patch_size
    return backbone.patch_size * max(1, round(grid * 37 / 24))


class CraneScorer(Scorer):
    """Crane / Crane+: E-Attn dual-path dense CLIP maps with local-to-global image scores (arXiv 2504.11055).

    Args:
        backbone: default ``openclip:ViT-L-14-336-quickgelu@openai`` at 518 px.
        layers: refined layers to read (1-based); default the last layer (``paper``) or the depth's quarter points.
        attention: refined attention, ``qq+kk+vv`` (E-Attn) or ``vv`` (DPAM) and others.
        first_refined: first refined block; default the last 19 blocks.
        soft_mean: average the per-layer softmax maps (Crane) instead of softmaxing mean logits (Crane+); default
            True, and False with ``dattn`` in the ``paper`` profile (the reference's Crane+ runs).
        sigma: Gaussian sigma in pixels at 518 px (``vlad`` scales it with the input size); 0 disables.
        dattn: a DINO spec for Crane+ (see :mod:`vlad.backbones.dino`), or None.
        object_agnostic: prompt with "object" instead of the product name.
        prompts: prompt bank name in ``prompts/``.
    """

    name = "crane"
    default_backbone = DEFAULT_BACKBONE
    refined_blocks = 19  # E-Attn in the last 19 blocks (layers 6..24 of ViT-L/14)

    def __init__(
        self,
        backbone: str | ClipBackbone | None = None,
        *,
        layers: Sequence[int] | None = None,
        attention: str = "qq+kk+vv",
        first_refined: int | None = None,
        soft_mean: bool | None = None,
        sigma: float = 4.0,
        dattn: str | None = None,
        dattn_beta: float = 1.2,
        dattn_gamma: float = 3.0,
        object_agnostic: bool = False,
        prompts: str = "winclip",
        **kwargs: object,
    ) -> None:
        super().__init__(backbone, **kwargs)  # type: ignore[arg-type]
        check_attention(attention)
        n = self.backbone.num_layers
        self.first_refined = default_first_refined(n, self.refined_blocks) if first_refined is None else first_refined
        self.paper = self.profile == "paper"
        self.layers = tuple(layers) if layers else self.default_layers()
        if not self.layers:
            raise ConfigError("layers must name at least one refined layer")
        self.attention = attention
        self.soft_mean = soft_mean if soft_mean is not None else not (self.paper and dattn)
        self.sigma = sigma if self.paper else sigma * self.image_size / REFERENCE_SIZE
        self.pos_interpolation = "bilinear" if self.paper else "bicubic"
        self.object_agnostic = object_agnostic
        self.ensemble = PromptEnsemble(prompts)
        self._text_override: torch.Tensor | None = None
        self.dattn = None
        if dattn:
            from vlad.backbones.dino import DinoPatches

            self.dattn = DinoPatches.from_spec(dattn, device=self.backbone.device)
            self.dattn_beta, self.dattn_gamma = dattn_beta, dattn_gamma

    def default_image_size(self) -> int:
        return dense_image_size(self.backbone)

    def default_layers(self) -> tuple[int, ...]:
        """``paper``: the last layer (what the reference's aliased 6/12/18/24 taps hold); ``vlad``: quarter points."""
        n = self.backbone.num_layers
        if self.paper:
            return (n,)
        return tuple(x for x in default_layers(n) if x >= self.first_refined)

    def warnings(self) -> tuple[str, ...]:
        out = super().warnings()
        if self.paper and self._text_override is None and self.checkpoint_format:
            hint = f"vlad import-checkpoint --format {self.checkpoint_format}"
            out += (
                f"{self.name} runs the paper profile with training-free prompts: the published numbers need the "
                f"released learned prompts ({hint})",
            )
        return out

    checkpoint_format: str | None = "crane"  # which official release carries this scorer's learned prompts

    @classmethod
    def export_refusal(cls, options: dict) -> str | None:
        if not options.get("dattn"):
            return super().export_refusal(options)
        if options.get("profile") in (None, "paper"):
            return (
                f"{cls.name}'s paper-profile D-Attn takes one mean over the whole batch (the reference's computation), "
                "so an image's map depends on its batch; export without --dattn"
            )
        return (
            "Crane+ D-Attn keeps only the DINO similarities above a hard threshold, so the exported DINO tower's "
            "rounding differences flip entries (maps differed from torch by up to 3e-3 on the test model); export "
            "without --dattn"
        )

    # ------------------------------------------------------------------ text
    def set_text_features(self, text: torch.Tensor | None) -> None:
        """Use these (2, D) [normal, anomalous] features instead of the prompt ensemble (learned prompts)."""
        if text is not None and (text.ndim != 2 or text.shape != (2, self.backbone.embed_dim)):
            raise ConfigError(f"text features must be (2, {self.backbone.embed_dim}), got {tuple(text.shape)}")
        self._text_override = None if text is None else F.normalize(text.float(), dim=-1)

    @property
    def uses_learned_text(self) -> bool:
        """True when learned text features (an adapter) replace the prompt ensemble."""
        return self._text_override is not None

    def text_prototypes(self, object_name: str) -> torch.Tensor:
        if self._text_override is not None:
            return self.steer(self._text_override)
        return self.steer(self.ensemble.prototypes(self.backbone, "object" if self.object_agnostic else object_name))

    # ------------------------------------------------------------------ features
    def _extract(self, x: torch.Tensor) -> Features:
        out = self._dense(x)
        feats = {f"layer{layer}": tok for layer, tok in out.refined.items()}
        feats["global"] = out.global_embedding
        if self.dattn is not None and out.values is not None:
            feats["dattn"] = self._dattn_tokens(x, out.values)
        return {k: self.steer(F.normalize(v.float(), dim=-1)) for k, v in feats.items()}

    def _dense(self, x: torch.Tensor) -> DenseOutput:
        values = None if self.dattn is None else ("mid" if self.paper else "input")
        return dense_forward(
            self.backbone,
            x,
            self.layers,
            attention=self.attention,
            first_refined=self.first_refined,
            keep_values=values,
            pos_interpolation=self.pos_interpolation,
        )

    def _dattn_tokens(self, x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """(B, N, D) D-Attn tokens: DINO patch similarity applied to the last block's CLIP values."""
        assert self.dattn is not None
        z = F.normalize(self.dattn.patches(x, self.grid).float(), dim=-1)  # (B, N, C)
        s = z @ z.transpose(1, 2)
        mean = s.mean() if self.paper else s.mean(dim=-1, keepdim=True)  # paper: one mean over the batch tensor
        s = self.dattn_gamma * (s - self.dattn_beta * mean)
        attn = torch.softmax(s.masked_fill(s < 0, float("-inf")), dim=-1).nan_to_num(0.0)
        block = self.backbone.model.visual.transformer.resblocks[-1]
        mixed = F.linear(attn.to(values.dtype) @ values, block.attn.out_proj.weight, block.attn.out_proj.bias)
        return self.backbone.project_tokens(mixed)

    def token_sets(self, feats: Features) -> list[torch.Tensor]:
        sets = [feats[f"layer{layer}"] for layer in self.layers]
        if "dattn" in feats:
            sets.append(feats["dattn"])
        return sets

    # ------------------------------------------------------------------ scores
    temperature: float = TEMPERATURE

    def _text_batch(self, feats: Features, object_name: str) -> torch.Tensor:
        """(B, 2, D) [normal, anomalous] text features per image (the same for every image here)."""
        text = self.text_prototypes(object_name).to(feats["global"].device)
        return text.expand(feats["global"].shape[0], -1, -1)

    def patch_logits(self, feats: Features, text: torch.Tensor) -> torch.Tensor:
        """(L, B, N, 2) per token set, ``cos / temperature``."""
        return torch.stack([torch.einsum("bnd,bkd->bnk", f, text) / self.temperature for f in self.token_sets(feats)])

    def _patch_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """(L, B, N, 2) -> (B, N) anomaly probability (soft mean over sets, or softmax of mean logits)."""
        if self.soft_mean:
            return torch.softmax(logits, dim=-1)[..., 1].mean(0)
        return torch.softmax(logits.mean(0), dim=-1)[..., 1]

    def _image_score(
        self, feats: Features, text: torch.Tensor, logits: torch.Tensor, maps: torch.Tensor
    ) -> torch.Tensor:
        """(B,) Crane's local-to-global score: anomaly-weighted patch features fused 50/50 with the global one."""
        weights = torch.softmax(logits.mean(0), dim=-1)[..., 1]  # (B, N)
        local = F.normalize((weights[..., None] * torch.stack(self.token_sets(feats)).mean(0)).sum(1), dim=-1)
        fused = F.normalize(0.5 * local + 0.5 * feats["global"], dim=-1)
        return torch.softmax(torch.einsum("bd,bkd->bk", fused, text) / TEMPERATURE, dim=-1)[:, 1]

    def _finish_maps(self, maps: torch.Tensor, feats: Features) -> torch.Tensor:
        """(B, S, S) post-processing at model resolution: the Gaussian blur."""
        return gaussian_blur(maps, self.sigma)

    def _probability_maps(self, logits: torch.Tensor) -> torch.Tensor:
        """(L, B, N, 2) logits -> (B, S, S) anomaly probability at model resolution. Bilinear upsampling commutes
        with the per-layer average of probabilities; the softmax of mean logits is taken after upsampling the logits
        in the ``paper`` profile (the reference's order) and before it in ``vlad``."""
        if self.paper and not self.soft_mean:
            mean = logits.mean(0).permute(0, 2, 1).reshape(logits.shape[1], 2, *self.grid)
            up = F.interpolate(mean.float(), size=(self.image_size, self.image_size), mode="bilinear")
            return torch.softmax(up, dim=1)[:, 1]
        return upsample(self._patch_probs(logits).reshape(-1, *self.grid), self.image_size)

    def _score(self, feats: Features, object_name: str, memory: Features | None) -> tuple[torch.Tensor, torch.Tensor]:
        text = self._text_batch(feats, object_name)
        logits = self.patch_logits(feats, text)
        maps = self._probability_maps(logits)
        few = None
        if memory is not None:
            few = torch.stack([min_cosine_distance(f, memory[k]) / 2 for k, f in self._memory_pairs(feats)]).mean(0)
            maps = (maps + upsample(few.reshape(-1, *self.grid), self.image_size)) / 2
        maps = self._finish_maps(maps, feats)
        score = self._image_score(feats, text, logits, maps)
        if few is not None:
            score = (score + few.amax(dim=-1)) / 2
        return score, maps

    def _memory_pairs(self, feats: Features) -> list[tuple[str, torch.Tensor]]:
        """(key, (B, N, D) tokens) for every token set that has a patch memory."""
        keys = [f"layer{layer}" for layer in self.layers] + (["dattn"] if "dattn" in feats else [])
        return [(k, feats[k]) for k in keys]

    def _memory(self, refs: Features, keep: torch.Tensor) -> Features:
        keep = keep.to(refs["global"].device)
        return {k: v[keep].reshape(-1, v.shape[-1]) for k, v in self._memory_pairs(refs)}
