"""AnomalyCLIP (Zhou et al., "AnomalyCLIP: Object-agnostic Prompt Learning for Zero-shot Anomaly Detection", ICLR 2024;
reference code zqhang/AnomalyCLIP) on vlad's dense engine.

``paper`` profile (default), as the reference's ``test.py`` / ``test.sh`` run it (docs/methods.md has the table):

- DPAM: V-V self-attention on a second path in the last 19 blocks (layers 6..24 of ViT-L/14), computed from ``ln_1``
  of the original stream, no FFN on that path (``AnomalyCLIP_lib/AnomalyCLIP.py``: ``Attention``,
  ``ResidualAttentionBlock.forward``, ``DAPM_replace(DPAM_layer=20)``);
- dense tokens: the refined stream at layer 24 only (``test.sh --features_list 24``), ``ln_post`` then ``proj``;
- global embedding: the original stream's class token ``@ proj`` *without* ``ln_post`` (``VisionTransformer.forward``);
- positional embedding re-gridded bilinearly; fp32;
- map: per layer ``softmax(cos(f, t) / 0.07)`` at the patch grid, bilinear to S, ``(p_a + 1 - p_n) / 2`` (= ``p_a``),
  SUMMED over layers, Gaussian sigma 4 (scipy ``gaussian_filter``);
- image score: ``softmax(cos(g, t) / 0.07)[a]`` of the global embedding alone (the map is not fused in);
- text: the object-agnostic learned prompts ``"X x12 object."`` / ``"X x12 damaged object."`` with deep prompts in
  text blocks 1..8, from an imported checkpoint (``vlad import-checkpoint --format anomalyclip``). Without one the
  training-free prompt ensemble is used, with a warning that the published numbers need the released prompts.

``vlad`` profile: layers 6/12/18/24 (really distinct copies) averaged instead of summed, bicubic positional re-grid.
Few-shot references work as in Crane (a vlad extension).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vlad.backbones.clip import ClipBackbone
from vlad.backbones.dense import DenseOutput, dense_forward
from vlad.errors import ConfigError
from vlad.scorers.base import Features
from vlad.scorers.crane import TEMPERATURE, CraneScorer


class AnomalyClipScorer(CraneScorer):
    """AnomalyCLIP: V-V dual-path dense CLIP maps and object-agnostic (learned) prompts (ICLR 2024).

    Args:
        backbone: default ``openclip:ViT-L-14-336-quickgelu@openai`` at 518 px.
        attention: refined attention, ``vv`` (DPAM).
        **kwargs: see :class:`~vlad.scorers.crane.CraneScorer` (``dattn`` is not part of AnomalyCLIP).
    """

    name = "anomalyclip"
    checkpoint_format = "anomalyclip"

    def __init__(self, backbone: str | ClipBackbone | None = None, *, attention: str = "vv", **kwargs: object) -> None:
        if kwargs.get("dattn"):
            raise ConfigError("anomalyclip has no D-Attn; --dattn applies to crane")
        kwargs.setdefault("soft_mean", True)
        super().__init__(backbone, attention=attention, **kwargs)  # type: ignore[arg-type]

    def _dense(self, x: torch.Tensor) -> DenseOutput:
        return dense_forward(
            self.backbone,
            x,
            self.layers,
            attention=self.attention,
            first_refined=self.first_refined,
            pos_interpolation=self.pos_interpolation,
        )

    def _extract(self, x: torch.Tensor) -> Features:
        out = self._dense(x)
        feats = {f"layer{layer}": tok for layer, tok in out.refined.items()}
        assert out.global_tokens is not None
        # the reference projects the original stream's class token without ln_post
        feats["global"] = out.global_tokens @ self.backbone.model.visual.proj
        return {k: self.steer(F.normalize(v.float(), dim=-1)) for k, v in feats.items()}

    def _patch_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """(L, B, N, 2) -> (B, N): per-layer anomaly probabilities, summed (``paper``) or averaged (``vlad``)."""
        probs = torch.softmax(logits, dim=-1)[..., 1]
        return probs.sum(0) if self.paper else probs.mean(0)

    def _image_score(
        self, feats: Features, text: torch.Tensor, logits: torch.Tensor, maps: torch.Tensor
    ) -> torch.Tensor:
        """(B,) ``softmax(cos(g, t) / 0.07)[a]`` of the global embedding."""
        return torch.softmax(torch.einsum("bd,bkd->bk", feats["global"], text) / TEMPERATURE, dim=-1)[:, 1]
