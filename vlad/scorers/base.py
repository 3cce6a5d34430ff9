"""The scorer contract and the machinery every scorer shares.

A scorer turns images of a named product into :class:`~vlad.result.AnomalyResult` objects. Subclasses implement two
torch functions:

- ``_extract(x)``: features of a preprocessed batch, as a dict of tensors whose first dimension is the batch;
- ``_score(features, object_name, memory)``: raw image scores (B,) and maps (B, h, w) on any grid.

and, for few-shot, ``_memory(reference_features, keep)`` which builds the patch memory from the kept references
(a boolean mask over them, which is how leave-one-out calibration excludes one reference at a time). Everything
else -- loading, batching, upsampling to the input resolution, thresholds, regions, warnings, timings -- lives here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vlad.backbones import load_backbone
from vlad.backbones.clip import ClipBackbone
from vlad.data.images import ImageLike, as_pil  # re-exported: scorers and the pipeline import them from here
from vlad.errors import ConfigError
from vlad.result import AnomalyResult
from vlad.scorers.tiling import DEFAULT_OVERLAP, Tiling, stitch
from vlad.thresholds import (
    MIN_REFERENCES_FOR_CALIBRATION,
    RECOMMENDED_REFERENCES,
    Thresholds,
    calibrate,
    check_sensitivity,
)

MIN_SCALE_FRACTION = 0.1
"""Calibrated scales are at least this share of the scorer's default scale."""

logger = logging.getLogger(__name__)

Features = dict[str, torch.Tensor]

PROFILES = ("paper", "vlad")
"""``paper``: the official inference computation, quirks included, on the same weights (docs/methods.md lists every
step with its reference file and line). ``vlad``: vlad's documented deviations (each backed by a measurement there)."""
DEFAULT_PROFILE = "paper"


def check_profile(profile: str | None) -> str:
    """The profile name, validated; None means the default (:data:`DEFAULT_PROFILE`)."""
    if profile is None:
        return DEFAULT_PROFILE
    if profile not in PROFILES:
        raise ConfigError(f"unknown profile {profile!r}; allowed: {', '.join(PROFILES)}")
    return profile


class Scorer:
    """Base class of all scorers.

    Args:
        backbone: a spec string (see :mod:`vlad.backbones`) or a loaded :class:`ClipBackbone`.
        device: ``auto``, ``cpu``, ``cuda[:N]`` or ``mps``.
        precision: ``auto``, ``fp32``, ``fp16`` or ``bf16``.
        image_size: side of the square input in pixels (a multiple of the patch size); the scorer's default if None.
        threshold: a user threshold in raw score units, replacing default and calibrated ones.
        sensitivity: in [0, 1]; higher flags more (see :mod:`vlad.thresholds`).
        batch_size: images per forward pass.
        concepts: LAFT steering in words ("ignore colour", "focus on cracks") or a ready
            :class:`~vlad.laft.ConceptTransform`: image features (and text prototypes) are projected onto / off the
            concept subspace before scoring.
        profile: ``paper`` (the official code's computation, the default) or ``vlad`` (see :data:`PROFILES`);
            None means the default, and an imported official checkpoint may then select ``paper`` itself.
        tile: score high-resolution images as overlapping tiles of this many pixels, or ``auto`` (see
            :mod:`vlad.scorers.tiling`); None scores every image whole.
        tile_overlap: share of a tile that overlaps its neighbour.
    """

    name: ClassVar[str] = ""
    transductive: ClassVar[bool] = False  # True: scores depend on the whole batch (score all images together)
    default_backbone: ClassVar[str] = ""
    default_threshold: ClassVar[float] = 0.5
    default_scale: ClassVar[float] = 1.0

    def __init__(
        self,
        backbone: str | ClipBackbone | None = None,
        *,
        device: str = "auto",
        precision: str = "auto",
        image_size: int | None = None,
        threshold: float | None = None,
        sensitivity: float = 0.5,
        batch_size: int = 8,
        concepts: str | Any | None = None,
        profile: str | None = None,
        tile: int | str | None = None,
        tile_overlap: float = DEFAULT_OVERLAP,
    ) -> None:
        check_sensitivity(sensitivity)
        self.tiling = Tiling.parse(tile, tile_overlap)
        if self.tiling is not None and self.transductive:
            raise ConfigError(
                f"scorer {self.name} scores each image against the others in its batch, so it cannot tile; "
                "score it without --tile"
            )
        self.profile = check_profile(profile)
        self.profile_explicit = profile is not None
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if isinstance(backbone, ClipBackbone):
            self.backbone = backbone
        else:
            if precision == "auto" and self.profile == "paper":
                precision = "fp32"  # the reference implementations run fp32
            self.backbone = load_backbone(backbone or self.default_backbone, device=device, precision=precision)
        self.image_size = image_size or self.default_image_size()
        self.grid = self.backbone.grid_for(self.image_size)
        self.user_threshold = threshold
        self.sensitivity = sensitivity
        self.batch_size = batch_size
        self._references: Features | None = None
        self._n_references = 0
        self._tile_refs: Features | None = None  # few-shot features of the references' tiles (with tiling)
        self._tile_owner: torch.Tensor | None = None  # (rows,) the reference each tile row comes from
        self._calibrated: dict[str, Thresholds] = {}
        self._calibrated_tiled: dict[str, Thresholds] = {}
        self._calibration_warning: str | None = None
        self.transform = self._concept_transform(concepts)
        self.adapter: str | None = None  # set by vlad.adapters.apply_adapter
        self.rules_state: dict[str, Any] = {}  # what vlad.rules.configure_scorer changed, so it can undo it

    def _concept_transform(self, concepts: str | Any | None) -> Any:
        if concepts is None or (isinstance(concepts, str) and not concepts.strip()):
            return None
        if isinstance(concepts, str):
            from vlad.laft import build_transform

            return build_transform(self.backbone, concepts)
        return concepts

    def set_transform(self, transform: Any, *, references: Sequence[ImageLike] | None = None) -> None:
        """Use this feature transform (a :class:`~vlad.laft.FeatureTransform`, or None) from now on. Few-shot
        references are fitted again, since their features depend on it.

        Raises:
            ConfigError: the scorer holds references and ``references`` is None.
        """
        if self.few_shot and references is None:
            raise ConfigError(
                f"scorer {self.name} already holds references whose features were computed with another feature "
                "transform; pass the references again (or set the transform before fit())"
            )
        self.transform = transform
        if self.few_shot:
            self.fit(references)  # type: ignore[arg-type]

    def invalidate_calibration(self) -> None:
        """Forget calibrated thresholds (they depend on the text prototypes and the transform)."""
        self._calibrated.clear()
        self._calibrated_tiled.clear()

    def steer(self, x: torch.Tensor) -> torch.Tensor:
        """(..., D) normalised features -> the LAFT-transformed, renormalised features (identity without concepts)."""
        if self.transform is None:
            return x
        return F.normalize(self.transform(x.float()), dim=-1)

    # ------------------------------------------------------------------ subclass API
    def default_image_size(self) -> int:
        return self.backbone.native_size

    def features(self, x: torch.Tensor) -> Features:
        """The scorer's features of a preprocessed (B, 3, S, S) batch (see :meth:`_extract`)."""
        return self._extract(x)

    def _extract(self, x: torch.Tensor) -> Features:
        raise NotImplementedError

    def _score(self, feats: Features, object_name: str, memory: Features | None) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _memory(self, refs: Features, keep: torch.Tensor) -> Features:
        raise NotImplementedError(f"scorer {self.name!r} has no few-shot mode")

    def _smooth(self, maps: torch.Tensor) -> torch.Tensor:
        """(B, H, W) -> (B, H, W) post-processing at input resolution (none by default)."""
        return maps

    @classmethod
    def export_refusal(cls, options: dict[str, Any]) -> str | None:
        """Why this scorer, built with ``options`` (constructor keywords), cannot become a fixed exported graph
        (:mod:`vlad.export`), or None when it can. Checked before any model loads."""
        if cls.transductive:
            return (
                f"{cls.name} is transductive: an image's score depends on the other images scored with it, so there "
                "is no fixed per-image graph to export"
            )
        return None

    # ------------------------------------------------------------------ few-shot
    @property
    def few_shot(self) -> bool:
        return self._references is not None

    @property
    def n_references(self) -> int:
        return self._n_references

    def fit(self, references: Sequence[ImageLike]) -> Scorer:
        """Remember normal reference images (few-shot). Replaces earlier references; clears calibration."""
        images = [as_pil(r) for r in references]
        if not images:
            raise ConfigError("fit() needs at least one normal reference image")
        self._references = self._extract_many(images)
        self._n_references = len(images)
        if self.tiling is not None:
            self._fit_tiles(images)
        self.invalidate_calibration()
        return self

    def _fit_tiles(self, images: Sequence[Image.Image]) -> None:
        """The references cut into tiles the way an input of their size is (a reference that fits in one tile is one
        tile), their features pooled into the tile memory with the reference each row comes from."""
        crops, owners = [], []
        for i, im in enumerate(images):
            side = self.tiling.side_for(im.size, self.image_size) if self.tiling else None
            boxes = self.tiling.boxes(im.size, side) if self.tiling and side else [(0, 0, *im.size)]
            crops += [im.crop(b) for b in boxes]
            owners += [i] * len(boxes)
        self._tile_refs = self._extract_many(crops)
        self._tile_owner = torch.tensor(owners)

    def clear_references(self) -> Scorer:
        """Back to zero-shot."""
        self._references = None
        self._n_references = 0
        self._tile_refs = self._tile_owner = None
        self.invalidate_calibration()
        return self

    def thresholds(self, object_name: str, *, tiled: bool = False) -> Thresholds:
        """The thresholds in force for ``object_name``, sensitivity applied (``tiled``: for tiled inputs, calibrated
        on the references scored as tiled inputs)."""
        base = Thresholds(self.default_threshold, self.default_threshold, self.default_scale, self.default_scale)
        self._calibration_warning = None
        if self.few_shot:
            if self._n_references >= MIN_REFERENCES_FOR_CALIBRATION:
                base = self._calibrate_tiled(object_name) if tiled else self._calibrate(object_name)
                if self._n_references < RECOMMENDED_REFERENCES:
                    self._calibration_warning = (
                        f"thresholds calibrated on only {self._n_references} reference images are rough; give "
                        f"{RECOMMENDED_REFERENCES} or more normal images"
                    )
            else:
                self._calibration_warning = (
                    f"{self._n_references} reference image: the threshold cannot be calibrated (leave-one-out needs "
                    f"at least {MIN_REFERENCES_FOR_CALIBRATION}); using the zero-shot default {self.default_threshold}"
                )
        if self.user_threshold is not None:
            base = base.with_user_threshold(self.user_threshold)
        return base.with_sensitivity(self.sensitivity)

    def _calibrate(self, object_name: str) -> Thresholds:
        if object_name not in self._calibrated:
            refs = self._references
            assert refs is not None  # guarded by few_shot
            scores, maxima = [], []
            for i in range(self._n_references):
                keep = torch.ones(self._n_references, dtype=torch.bool)
                keep[i] = False
                one = {k: v[i : i + 1] for k, v in refs.items()}
                s, m = self._score(one, object_name, self._memory(refs, keep))
                scores.append(float(s[0]))
                maxima.append(float(m[0].max()))
            self._calibrated[object_name] = calibrate(scores, maxima, min_scale=MIN_SCALE_FRACTION * self.default_scale)
        return self._calibrated[object_name]

    def _calibrate_tiled(self, object_name: str) -> Thresholds:
        """Leave-one-out on the references scored the way a tiled input is: each reference's whole view against the
        others' whole views and its tiles against the others' tiles; its score is the larger of the two, its map
        maximum the highest tile map value."""
        if object_name not in self._calibrated_tiled:
            refs, tiles, owner = self._references, self._tile_refs, self._tile_owner
            if refs is None or tiles is None or owner is None:  # guarded by few_shot and fit
                raise ConfigError(f"scorer {self.name} has no tiled references to calibrate on")
            scores, maxima = [], []
            for i in range(self._n_references):
                keep = torch.ones(self._n_references, dtype=torch.bool)
                keep[i] = False
                one = {k: v[i : i + 1] for k, v in refs.items()}
                whole, _ = self._score(one, object_name, self._memory(refs, keep))
                mine = owner == i
                s, m = self._score({k: v[mine] for k, v in tiles.items()}, object_name, self._memory(tiles, ~mine))
                scores.append(max(float(whole[0]), float(s.max())))
                maxima.append(float(m.max()))
            self._calibrated_tiled[object_name] = calibrate(
                scores, maxima, min_scale=MIN_SCALE_FRACTION * self.default_scale
            )
        return self._calibrated_tiled[object_name]

    # ------------------------------------------------------------------ scoring
    def _extract_many(self, images: Sequence[Image.Image]) -> Features:
        parts: list[Features] = []
        for start in range(0, len(images), self.batch_size):
            x = self.backbone.preprocess(images[start : start + self.batch_size], self.image_size)
            parts.append({k: v.float() for k, v in self._extract(x).items()})
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def score(self, image: ImageLike, object_name: str = "object") -> AnomalyResult:
        """Score one image of ``object_name``."""
        return self.score_many([image], object_name)[0]

    def score_many(self, images: Sequence[ImageLike], object_name: str = "object") -> list[AnomalyResult]:
        """Score images of one product in batches (large ones as tiles when tiling is on). Bad paths raise
        :class:`~vlad.errors.ImageLoadError`."""
        object_name = object_name.strip() or "object"
        pil = [as_pil(im) for im in images]
        sides = [self.tiling.side_for(im.size, self.image_size) if self.tiling else None for im in pil]
        whole = [i for i, side in enumerate(sides) if side is None]
        results: dict[int, AnomalyResult] = {}
        if whole:
            th = self.thresholds(object_name)
            memory = self._full_memory()
            for start in range(0, len(whole), self.batch_size):
                idx = whole[start : start + self.batch_size]
                batch = [pil[i] for i in idx]
                scores, maps, timings = self._forward(batch, object_name, memory)
                results.update(zip(idx, self._results(batch, scores, maps, th, timings), strict=True))
        for i, side in enumerate(sides):
            if side is not None:
                results[i] = self._score_tiled(pil[i], side, object_name)
        return [results[i] for i in range(len(pil))]

    def _forward(
        self, batch: Sequence[Image.Image], object_name: str, memory: Features | None
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """Raw scores (B,) and maps (B, h, w) of one batch, with per-image preprocess and model seconds."""
        t0 = time.perf_counter()
        x = self.backbone.preprocess(batch, self.image_size)
        t1 = time.perf_counter()
        with torch.no_grad():
            feats = {k: v.float() for k, v in self._extract(x).items()}
            scores, maps = self._score(feats, object_name, memory)
        sync_device(self.backbone.device)
        t2 = time.perf_counter()
        return scores, maps, {"preprocess": (t1 - t0) / len(batch), "model": (t2 - t1) / len(batch)}

    def _score_tiled(self, image: Image.Image, side: int, object_name: str) -> AnomalyResult:
        """One image as its whole view plus overlapping tiles of ``side`` pixels (see :mod:`vlad.scorers.tiling`)."""
        assert self.tiling is not None
        th = self.thresholds(object_name, tiled=True)
        whole_score, _, timings = self._forward([image], object_name, self._full_memory())
        boxes = self.tiling.boxes(image.size, side)
        memory = self._tile_memory()
        tile_scores, tile_maps = [], []
        for start in range(0, len(boxes), self.batch_size):
            crops = [image.crop(b) for b in boxes[start : start + self.batch_size]]
            s, m, t = self._forward(crops, object_name, memory)
            tile_scores.append(s.float().cpu())
            tile_maps += list(m)
            for key in timings:
                timings[key] += t[key] * len(crops)
        t_start = time.perf_counter()
        amap = stitch(tile_maps, boxes, image.size, self.tiling.ramp(side), smooth=self._smooth)
        score = max(float(whole_score[0]), float(torch.cat(tile_scores).max()))
        result = self._result(score, amap, th, timings, t_start)
        return result.replace(meta={**result.meta, "tile": side, "tiles": len(boxes)})

    def _tile_memory(self) -> Features | None:
        """The patch memory of all reference tiles, or None in zero-shot mode."""
        if self._tile_refs is None or self._tile_owner is None:
            return None
        return self._memory(self._tile_refs, torch.ones(len(self._tile_owner), dtype=torch.bool))

    def _full_memory(self) -> Features | None:
        """The patch memory of all references, or None in zero-shot mode."""
        if self._references is None:
            return None
        return self._memory(self._references, torch.ones(self._n_references, dtype=torch.bool))

    def _results(
        self, images: Sequence[Image.Image], scores: torch.Tensor, maps: torch.Tensor, th: Thresholds, timings: dict
    ) -> list[AnomalyResult]:
        """One result per image: maps (B, h, w) upsampled to each image's size, thresholds, regions."""
        out = []
        for im, s, m in zip(images, scores, maps, strict=True):
            t_start = time.perf_counter()
            out.append(self._result(float(s), self._to_input_resolution(m, im.size), th, timings, t_start))
        return out

    def _to_input_resolution(self, m: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
        w, h = size
        up = F.interpolate(m[None, None].float(), size=(h, w), mode="bilinear", align_corners=False)[0]
        return self._smooth(up)[0].cpu().numpy().astype(np.float32)

    def _result(self, score: float, amap: np.ndarray, th: Thresholds, timings: dict, t_start: float) -> AnomalyResult:
        decided = th.fields_for(score, amap)
        timings = {**timings, "postprocess": time.perf_counter() - t_start}
        return AnomalyResult(
            pred_score=score,
            anomaly_map=amap,
            **decided,
            scorer=self.name,
            backbone=self.backbone.spec,
            timings=timings,
            warnings=self.warnings(),
            meta={
                "pixel_scale": th.pixel_scale,
                "image_size": self.image_size,
                "references": self._n_references,
                "sensitivity": th.sensitivity,
                "adapter": self.adapter,
                "profile": self.profile,
            },
        )

    def warnings(self) -> tuple[str, ...]:
        """What every result of this scorer must carry (random weights, uncalibrated threshold)."""
        out = []
        if self.backbone.is_random:
            out.append(f"backbone {self.backbone.spec} has random weights: scores and maps are meaningless")
        if self._calibration_warning:
            out.append(self._calibration_warning)
        return tuple(out)

    def prompt_phrases(self, object_name: str) -> list[str]:
        """The phrases this scorer writes into its text prompts for ``object_name`` (states and defect descriptions,
        without photo templates); empty for scorers without text prompts. ``vlad eval`` compares them with the
        dataset's defect names (:func:`vlad.data.defects.prompt_overlap_warnings`)."""
        ensemble = getattr(self, "ensemble", None)
        if ensemble is None or not hasattr(ensemble, "states"):
            return []
        normal, anomalous = ensemble.states(object_name)
        return [*normal, *anomalous]

    def describe(self) -> dict[str, Any]:
        """Settings that determine results (for reports)."""
        return {
            "scorer": self.name,
            "backbone": self.backbone.spec,
            "image_size": self.image_size,
            "references": self._n_references,
            "sensitivity": self.sensitivity,
            "threshold": self.user_threshold,
            "concepts": None if self.transform is None else self.transform.describe(),
            "adapter": self.adapter,
            "profile": self.profile,
            "tile": None if self.tiling is None else self.tiling.describe(),
        }


def sync_device(device: str) -> None:
    """Wait for queued GPU work, so timings are honest."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
