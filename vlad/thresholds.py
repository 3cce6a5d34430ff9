"""Thresholds, normalised scores and the sensitivity knob (numpy only).

Conventions (anomalib's): the normalised score is ``clip((x - t) / scale + 0.5, 0, 1)``, so the threshold maps to
0.5. ``scale`` is the span of raw scores that maps to one unit of normalised score.

- Zero-shot: each scorer documents a default threshold and scale (probability-like scores: 0.5 and 1.0).
- With normal references: thresholds are calibrated on the references alone, leave-one-out: each reference is scored
  against a memory built from the others. The image threshold is the highest of those normal scores plus a margin of
  10 % of their spread (at least 1e-3 of the scale); the pixel threshold is computed the same way from the normal
  maps' maxima. ``scale`` is four times the distance from the median normal score to the threshold, so a typical
  normal part lands at a normalised 0.25. At least two references are needed.
- ``sensitivity`` in [0, 1] (default 0.5) moves the threshold by ``(0.5 - sensitivity) * scale``: 1.0 flags more,
  0.0 flags less. It re-thresholds without re-scoring.
- A user threshold replaces the image and pixel thresholds (raw units) and keeps the default scale.
- Calibrated scales are floored at 10 % of the scorer's default scale (tight references would make the normalised
  score jump from 0 to 1 within a hair of the threshold), and fewer than 10 references draw a warning.
- A transductive scorer (MuSc) without references takes batch-relative thresholds (:func:`batch_relative`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from vlad.errors import ConfigError
from vlad.regions import find_regions, peak_region

if TYPE_CHECKING:
    from vlad.result import AnomalyResult

MIN_REFERENCES_FOR_CALIBRATION = 2
RECOMMENDED_REFERENCES = 10
"""Below this many references a calibrated threshold carries a warning."""


@dataclass(frozen=True)
class Thresholds:
    """Image and pixel thresholds in raw units, their scales, where they came from and the sensitivity applied.

    The one value a result's verdict, mask, regions and normalised score derive from (:meth:`fields_for` at scoring
    time, :meth:`apply` when re-thresholding); :meth:`of` reads it back from a result.
    """

    image: float
    pixel: float
    image_scale: float = 1.0
    pixel_scale: float = 1.0
    source: str = "default"
    sensitivity: float = 0.5

    @classmethod
    def of(cls, result: AnomalyResult) -> Thresholds:
        """The thresholds a result was decided with (its flat fields and ``meta`` hold the same values)."""
        return cls(
            image=result.threshold,
            pixel=result.pixel_threshold,
            image_scale=result.score_scale,
            pixel_scale=float(result.meta.get("pixel_scale", result.score_scale)),
            source=result.threshold_source,
            sensitivity=float(result.meta.get("sensitivity", 0.5)),
        )

    def with_sensitivity(self, sensitivity: float) -> Thresholds:
        """Move both thresholds from the current sensitivity to ``sensitivity``: by ``(old - new) * scale``."""
        check_sensitivity(sensitivity)
        shift = self.sensitivity - sensitivity
        return replace(
            self,
            image=self.image + shift * self.image_scale,
            pixel=self.pixel + shift * self.pixel_scale,
            sensitivity=sensitivity,
        )

    def fields_for(self, score: float, anomaly_map: np.ndarray) -> dict[str, Any]:
        """The :class:`~vlad.result.AnomalyResult` fields these thresholds decide for a raw score and its map."""
        mask = anomaly_map >= self.pixel
        regions = find_regions(anomaly_map, mask)
        if score >= self.image and not regions:  # an anomalous verdict always points at something
            regions = (peak_region(anomaly_map),)
        return {
            "pred_label": score >= self.image,
            "normalized_score": normalize(score, self.image, self.image_scale),
            "pred_mask": mask,
            "regions": regions,
            "threshold": self.image,
            "pixel_threshold": self.pixel,
            "score_scale": self.image_scale,
            "threshold_source": self.source,
        }

    def apply(self, result: AnomalyResult) -> AnomalyResult:
        """``result`` re-thresholded with these thresholds (no re-scoring); rule effects are dropped."""
        meta = {**result.meta, "pixel_scale": self.pixel_scale, "sensitivity": self.sensitivity}
        fields = self.fields_for(result.pred_score, result.anomaly_map)
        return result.replace(**fields, rule_hits=(), meta=meta)

    def with_user_threshold(self, threshold: float) -> Thresholds:
        if not np.isfinite(threshold):
            raise ConfigError(f"--threshold must be a finite number, got {threshold}")
        return replace(self, image=float(threshold), pixel=float(threshold), source="user")


def check_sensitivity(sensitivity: float) -> None:
    if not 0.0 <= sensitivity <= 1.0:
        raise ConfigError(f"sensitivity must be in [0, 1], got {sensitivity}")


def normalize(value: float | np.ndarray, threshold: float, scale: float) -> float | np.ndarray:
    """Map raw scores so ``threshold`` becomes 0.5, clipped to [0, 1]."""
    out = np.clip((np.asarray(value, dtype=np.float64) - threshold) / scale + 0.5, 0.0, 1.0)
    return float(out) if np.ndim(out) == 0 else out.astype(np.float32)


def _threshold_from_normals(values: Sequence[float]) -> tuple[float, float]:
    v = np.asarray(values, dtype=np.float64)
    spread = float(v.max() - v.min())
    t = float(v.max()) + max(0.1 * spread, 1e-3 * max(abs(float(v.max())), 1e-3))
    scale = max(4.0 * (t - float(np.median(v))), 1e-6)
    return t, scale


def calibrate(
    normal_scores: Sequence[float], normal_map_maxima: Sequence[float], *, min_scale: float = 1e-6
) -> Thresholds:
    """Thresholds from leave-one-out scores of normal references (see the module docstring). ``min_scale`` floors
    the scales: references that agree closely would otherwise give a scale so small that the normalised score
    saturates at 0 or 1 a hair away from the threshold."""
    if len(normal_scores) < MIN_REFERENCES_FOR_CALIBRATION:
        raise ConfigError(
            f"calibration needs at least {MIN_REFERENCES_FOR_CALIBRATION} normal references, got {len(normal_scores)}"
        )
    image, image_scale = _threshold_from_normals(normal_scores)
    pixel, pixel_scale = _threshold_from_normals(normal_map_maxima)
    return Thresholds(image, pixel, max(image_scale, min_scale), max(pixel_scale, min_scale), source="calibrated")


BATCH_MAD_FACTOR = 3.0
"""A batch-relative threshold sits this many robust standard deviations (1.4826 MAD) above the batch median."""


def batch_relative(scores: Sequence[float], map_maxima: Sequence[float], *, min_spread: float) -> Thresholds:
    """Thresholds for a transductive scorer without references, from the batch itself: ``median + 3 * 1.4826 * MAD``
    of the image scores (and of the maps' maxima for the pixel threshold), the spread floored at ``min_spread``.
    Anomalies are assumed to be a minority of the batch (the premise of mutual scoring), so they stand out above it;
    a batch of only defective parts breaks that premise."""

    def rule(values: Sequence[float]) -> tuple[float, float]:
        v = np.asarray(values, dtype=np.float64)
        median = float(np.median(v))
        spread = max(1.4826 * float(np.median(np.abs(v - median))), min_spread)
        return median + BATCH_MAD_FACTOR * spread, 4.0 * BATCH_MAD_FACTOR * spread

    image, image_scale = rule(scores)
    pixel, pixel_scale = rule(map_maxima)
    return Thresholds(image, pixel, image_scale, pixel_scale, source="batch")
