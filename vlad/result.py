"""The one result type that flows through vlad: scorers produce it, rules, explainers, the CLI and the UI read it.

Field names follow anomalib's vocabulary (``pred_score``, ``anomaly_map``, ``pred_mask``, ``pred_label``,
``explanation``). Only numpy is needed here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np

POSITION_WORDS: tuple[str, ...] = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)


@dataclass(frozen=True)
class Region:
    """One connected component of the predicted mask.

    Attributes:
        bbox: ``(x0, y0, x1, y1)`` in input pixels, ``x1``/``y1`` exclusive.
        area: number of pixels in the component.
        area_fraction: ``area`` divided by the image's pixel count.
        peak_score: the highest anomaly-map value inside the component.
        mean_score: the mean anomaly-map value inside the component.
        centroid: ``(x, y)`` centre of mass in pixels.
        position: one of :data:`POSITION_WORDS`, from the centroid on a 3x3 grid.
        source: ``threshold`` (a component of the predicted mask) or ``peak`` (no pixel passed the pixel threshold
            although the image score did: the area around the map's peak, so an anomalous verdict points somewhere).
        defect_type: what kind of defect the region is, decided once by the rules' concept matching
            (:func:`vlad.rules.apply_rules`): a rule's concept, or :data:`UNCLASSIFIED` when no concept wins clearly;
            None when no rule asked. Rule hits, the report and the explanation all read it from here.
    """

    bbox: tuple[int, int, int, int]
    area: int
    area_fraction: float
    peak_score: float
    mean_score: float
    centroid: tuple[float, float]
    position: str
    source: str = "threshold"
    defect_type: str | None = None

    def __post_init__(self) -> None:
        if self.source not in REGION_SOURCES:
            raise ValueError(f"Region.source must be one of {REGION_SOURCES}, got {self.source!r}")
        if self.defect_type is not None and (not isinstance(self.defect_type, str) or not self.defect_type.strip()):
            raise ValueError(f"Region.defect_type must be None or a non-empty string, got {self.defect_type!r}")
        x0, y0, x1, y1 = self.bbox
        if not (0 <= x0 < x1 and 0 <= y0 < y1):
            raise ValueError(f"Region.bbox must satisfy 0 <= x0 < x1 and 0 <= y0 < y1, got {self.bbox}")
        if self.area <= 0:
            raise ValueError(f"Region.area must be positive, got {self.area}")
        if not 0.0 < self.area_fraction <= 1.0:
            raise ValueError(f"Region.area_fraction must be in (0, 1], got {self.area_fraction}")
        if self.position not in POSITION_WORDS:
            raise ValueError(f"Region.position must be one of {POSITION_WORDS}, got {self.position!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "bbox": list(self.bbox),
            "area": self.area,
            "area_fraction": round(self.area_fraction, 6),
            "peak_score": round(self.peak_score, 6),
            "mean_score": round(self.mean_score, 6),
            "centroid": [round(c, 2) for c in self.centroid],
            "position": self.position,
            "source": self.source,
            "defect_type": self.defect_type,
        }


REGION_SOURCES = ("threshold", "peak")
UNCLASSIFIED = "unclassified"
"""The defect type of a region no concept names clearly (see :data:`vlad.rules.apply.CONCEPT_MARGIN`)."""


@dataclass(frozen=True)
class RuleHit:
    """A natural-language rule that changed a result (what it changed, in words)."""

    rule: str
    effect: str
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Explanation:
    """Words about a result, from a language model or the template explainer."""

    text: str
    backend: str
    report: dict[str, Any] | None = None


@dataclass(frozen=True)
class AnomalyResult:
    """What vlad says about one image.

    Attributes:
        pred_score: raw image score from the scorer (its own scale; higher is more anomalous).
        normalized_score: ``pred_score`` mapped so the threshold lands on 0.5, clipped to [0, 1].
        anomaly_map: (H, W) float32 at the input image's resolution; higher is more anomalous.
        pred_mask: (H, W) bool, ``anomaly_map >= pixel_threshold``.
        pred_label: True when the image is judged anomalous (``pred_score >= threshold``).
        threshold: image-score threshold in raw score units.
        pixel_threshold: anomaly-map threshold in raw map units.
        score_scale: the raw-score span that maps to 1.0 of normalised score (see :mod:`vlad.thresholds`).
        threshold_source: how the threshold was chosen: ``"default"``, ``"calibrated"`` or ``"user"``.
        regions: connected components of ``pred_mask``, strongest first.
        scorer: registry name of the scorer.
        backbone: backbone spec string.
        timings: seconds per stage.
        warnings: things the user must know (e.g. random weights make scores meaningless).
        rule_hits: rules that changed this result.
        explanation: words about the result, when asked for.
        meta: scorer-specific extras (JSON-serialisable).
    """

    pred_score: float
    normalized_score: float
    anomaly_map: np.ndarray
    pred_mask: np.ndarray
    pred_label: bool
    threshold: float
    pixel_threshold: float
    score_scale: float = 1.0
    threshold_source: str = "default"
    regions: tuple[Region, ...] = ()
    scorer: str = ""
    backbone: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    rule_hits: tuple[RuleHit, ...] = ()
    explanation: Explanation | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        amap = np.asarray(self.anomaly_map)
        if amap.ndim != 2 or min(amap.shape) == 0:
            raise ValueError(f"anomaly_map must be a non-empty 2-D (H, W) array, got shape {amap.shape}")
        if amap.dtype != np.float32:
            amap = amap.astype(np.float32)
        if not np.isfinite(amap).all():
            raise ValueError("anomaly_map contains NaN or infinite values")
        mask = np.asarray(self.pred_mask)
        if mask.shape != amap.shape:
            raise ValueError(f"pred_mask shape {mask.shape} differs from anomaly_map shape {amap.shape}")
        if mask.dtype != np.bool_:
            mask = mask.astype(bool)
        for name in ("pred_score", "normalized_score", "threshold", "pixel_threshold", "score_scale"):
            value = getattr(self, name)
            if not isinstance(value, (int, float, np.floating, np.integer)) or not math.isfinite(float(value)):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
            object.__setattr__(self, name, float(value))
        if not 0.0 <= self.normalized_score <= 1.0:
            raise ValueError(f"normalized_score must be in [0, 1], got {self.normalized_score}")
        if self.score_scale <= 0:
            raise ValueError(f"score_scale must be positive, got {self.score_scale}")
        if self.threshold_source not in ("default", "calibrated", "user", "batch"):
            raise ValueError(
                f"threshold_source must be 'default', 'calibrated', 'user' or 'batch', got {self.threshold_source!r}"
            )
        object.__setattr__(self, "anomaly_map", amap)
        object.__setattr__(self, "pred_mask", mask)
        object.__setattr__(self, "pred_label", bool(self.pred_label))
        object.__setattr__(self, "regions", tuple(self.regions))
        object.__setattr__(self, "warnings", tuple(self.warnings))
        object.__setattr__(self, "rule_hits", tuple(self.rule_hits))

    @property
    def image_size(self) -> tuple[int, int]:
        """(width, height) of the input image."""
        h, w = self.anomaly_map.shape
        return w, h

    @property
    def verdict(self) -> str:
        return "anomalous" if self.pred_label else "normal"

    def replace(self, **changes: Any) -> AnomalyResult:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    def to_dict(self, *, include_arrays: bool = False) -> dict[str, Any]:
        """A JSON-serialisable summary; arrays only when asked (they are large)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("anomaly_map", "pred_mask"):
                if include_arrays:
                    out[f.name] = value.tolist()
                continue
            if f.name == "regions":
                value = [r.to_dict() for r in value]
            elif f.name == "rule_hits":
                value = [{"rule": h.rule, "effect": h.effect, "detail": h.detail} for h in value]
            elif f.name == "explanation":
                if value is not None:
                    value = {"text": value.text, "backend": value.backend, "report": value.report}
            elif f.name == "timings":
                value = {k: round(v, 4) for k, v in value.items()}
            elif f.name == "warnings":
                value = list(value)
            elif isinstance(value, float):
                value = round(value, 6)
            out[f.name] = value
        out["verdict"] = self.verdict
        out["image_size"] = list(self.image_size)
        return out
