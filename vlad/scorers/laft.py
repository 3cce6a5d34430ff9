"""LAFT-AD: few-shot kNN anomaly detection on concept-transformed CLIP features (Yun et al., "Language-Assisted
Feature Transformation for Anomaly Detection", ICLR 2025, arXiv 2503.01184; ``yuneg11/LAFT`` ``knn``).

Features: the global image embedding and the last layer's projected patch tokens (``ln_post`` then ``proj``, so they
live in the joint image-text space the concept subspaces come from), each L2-normalised, passed through the concept
transform of :mod:`vlad.laft` (e.g. ``concepts="ignore colour"``) and renormalised. With no ``concepts`` the
transform is the identity and this is plain kNN on CLIP features.

Scores, with cosine distance ``1 - cos`` in [0, 2]:

- map: per patch, the mean of the ``patch_knn`` smallest distances to all patches of the references (default 1: the
  nearest patch, as in PatchCore / WinCLIP+), on the (gh, gw) patch grid;
- image score: ``image_score="global"`` (LAFT-AD's): the mean of the ``min(image_knn, references)`` smallest
  distances of the global embedding to the references' global embeddings (LAFT uses k = 30 over a training set; with
  a few references this is the mean distance to all of them). ``"patches"`` uses the map's maximum instead and
  ``"mean"`` the average of the two (the ``vlad`` profile's default; ``paper`` uses ``global``): a deviation, because
  a small defect barely moves the global embedding, while the map's peak sees it (not yet measured on real data).

Normal references are required (``fit()``, ``--refs``). Thresholds: with at least 2 references they are calibrated
leave-one-out (each reference scored against the others, see :mod:`vlad.thresholds`); with a single reference the
fallback is 0.25 on cosine distance with scale 0.5, a guess, not a measured value: give two or more references.

Deviations, on purpose: LAFT-AD scores whole images only; the patch map is vlad's addition (the paper concedes
"limited localization improvements" from LAFT). The transform is built for the generic object word "object" (the
references' memory is built before the product is named).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from vlad.backbones import WINCLIP_BACKBONE
from vlad.backbones.clip import ClipBackbone
from vlad.errors import ConfigError
from vlad.laft import DEFAULT_EXPLAINED_VARIANCE, build_transform
from vlad.result import AnomalyResult
from vlad.scorers.base import Features, ImageLike, Scorer

IMAGE_SCORES = ("global", "patches", "mean")
_NO_REFERENCES = (
    "laft needs normal reference images (it is a few-shot kNN scorer): pass --refs DIR on the command line "
    "or call fit([...normal images...]) first"
)


def knn_distance(feats: torch.Tensor, memory: torch.Tensor, k: int) -> torch.Tensor:
    """Mean of the k smallest cosine distances to a memory.

    Args:
        feats: (B, N, D) L2-normalised features.
        memory: (M, D) L2-normalised features.
        k: neighbours; capped at M.

    Returns:
        (B, N) mean of ``1 - cos`` over the k nearest memory rows (computed one image at a time).
    """
    k = min(k, memory.shape[0])
    if torch.compiler.is_exporting():  # a symbolic batch (vlad.export): no loop over its size
        return 1.0 - (feats @ memory.T).topk(k, dim=-1).values.mean(dim=-1)
    out = [1.0 - (f @ memory.T).topk(k, dim=-1).values.mean(dim=-1) for f in feats]
    return torch.stack(out)


class LaftScorer(Scorer):
    """LAFT-AD: kNN on CLIP features after a language-defined feature transform ("ignore colour", "focus on cracks").

    Args:
        backbone: default ``openclip:ViT-B-16-plus-240@laion400m_e31`` (LAFT's industrial experiments), 240 px.
        concepts: the user's words, e.g. ``"ignore colour and lighting"``; None: no transform (plain kNN).
        patch_knn: neighbours per patch for the map (default 1).
        image_knn: neighbours for the global image score (default 30, LAFT-AD's; capped at the references).
        image_score: ``global``, ``patches`` or ``mean`` (see the module docstring); default ``global`` (LAFT-AD's) in
            the ``paper`` profile and ``mean`` in the ``vlad`` profile.
        components: directions per concept; None: chosen by ``explained_variance``.
        explained_variance: per-concept variance share the subspace keeps when ``components`` is None.
        **kwargs: see :class:`~vlad.scorers.base.Scorer`.

    Attributes:
        transform: the :class:`~vlad.laft.ConceptTransform` (None without concepts); other scorers may apply it to
            their own features.
    """

    name = "laft"
    default_backbone = WINCLIP_BACKBONE
    default_threshold = 0.25
    default_scale = 0.5

    def __init__(
        self,
        backbone: str | ClipBackbone | None = None,
        *,
        concepts: str | None = None,
        patch_knn: int = 1,
        image_knn: int = 30,
        image_score: str | None = None,
        components: int | None = None,
        explained_variance: float = DEFAULT_EXPLAINED_VARIANCE,
        **kwargs: object,
    ) -> None:
        super().__init__(backbone, **kwargs)  # type: ignore[arg-type]
        if concepts is not None and not isinstance(concepts, str):
            raise ConfigError(f"concepts must be a string such as 'ignore colour', got {concepts!r}")
        self.transform = build_transform(self.backbone, concepts, k=components, explained_variance=explained_variance)
        for option, value in (("patch_knn", patch_knn), ("image_knn", image_knn)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{option} must be an integer >= 1, got {value!r}")
        image_score = image_score or ("global" if self.profile == "paper" else "mean")
        if image_score not in IMAGE_SCORES:
            raise ConfigError(f"image_score must be one of {', '.join(IMAGE_SCORES)}, got {image_score!r}")
        self.patch_knn = patch_knn
        self.image_knn = image_knn
        self.image_score = image_score
        self.concepts = concepts

    def score_many(self, images: Sequence[ImageLike], object_name: str = "object") -> list[AnomalyResult]:
        """Score images against the references; raises :class:`~vlad.errors.ConfigError` without references."""
        if not self.few_shot:
            raise ConfigError(_NO_REFERENCES)
        return super().score_many(images, object_name)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., D): L2-normalise, apply the concept transform, renormalise."""
        return self.steer(F.normalize(x.float(), dim=-1))

    def _extract(self, x: torch.Tensor) -> Features:
        out = self.backbone.forward_visual(x, layers=[-1])
        return {
            "global": self.features(out.global_embedding),
            "patches": self.features(out.patch_tokens[self.backbone.num_layers]),
        }

    def _score(self, feats: Features, object_name: str, memory: Features | None) -> tuple[torch.Tensor, torch.Tensor]:
        if memory is None:
            raise ConfigError(_NO_REFERENCES)
        patch = knn_distance(feats["patches"], memory["patches"], self.patch_knn)
        image = knn_distance(feats["global"][:, None], memory["global"], self.image_knn)[:, 0]
        if self.image_score == "patches":
            image = patch.amax(dim=-1)
        elif self.image_score == "mean":
            image = (image + patch.amax(dim=-1)) / 2
        return image, patch.reshape(-1, *self.grid)

    def _memory(self, refs: Features, keep: torch.Tensor) -> Features:
        keep = keep.to(refs["patches"].device)
        return {"global": refs["global"][keep], "patches": refs["patches"][keep].reshape(-1, refs["patches"].shape[-1])}

    def describe(self) -> dict[str, object]:
        return {
            **super().describe(),
            "concepts": self.concepts,
            "transform": self.transform.describe() if self.transform else "none (plain kNN)",
            "patch_knn": self.patch_knn,
            "image_knn": self.image_knn,
            "image_score": self.image_score,
        }
