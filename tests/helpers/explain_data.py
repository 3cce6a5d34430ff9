"""Hand-made results for the explainer tests (no scorer, no torch): a map with planted blobs and its regions."""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
from PIL import Image

from vlad.regions import find_regions
from vlad.result import AnomalyResult, RuleHit

GOOD_REPORT = {
    "verdict": "anomalous",
    "defect_type": "scratch",
    "location": "top left",
    "severity": "minor",
    "rationale": "A thin bright line crosses the glass near the rim.",
    "model_says_anomalous": True,
    "confidence": 0.8,
}


def good_reply(**changes: object) -> str:
    return json.dumps({**GOOD_REPORT, **changes})


def make_result(
    size: tuple[int, int] = (300, 200),
    blobs: Sequence[tuple[int, int, int, int, float]] = ((30, 20, 70, 50, 0.9), (250, 150, 280, 170, 0.7)),
    *,
    score: float = 0.8,
    label: bool = True,
    rule_hits: Sequence[RuleHit] = (),
    warnings: Sequence[str] = (),
    threshold_source: str = "default",
) -> AnomalyResult:
    """A result whose map is 0.1 everywhere and ``value`` inside each blob ``(x0, y0, x1, y1, value)``.

    Args:
        size: (width, height) of the image.
        blobs: planted boxes (ends exclusive) and their map values; those above 0.5 become regions.
    """
    w, h = size
    amap = np.full((h, w), 0.1, np.float32)
    for x0, y0, x1, y1, value in blobs:
        amap[y0:y1, x0:x1] = value
    mask = amap >= 0.5
    return AnomalyResult(
        pred_score=score,
        normalized_score=min(max(score, 0.0), 1.0),
        anomaly_map=amap,
        pred_mask=mask,
        pred_label=label,
        threshold=0.5,
        pixel_threshold=0.5,
        threshold_source=threshold_source,
        regions=find_regions(amap, mask),
        scorer="winclip",
        backbone="random:tiny",
        rule_hits=tuple(rule_hits),
        warnings=tuple(warnings),
    )


def make_image(size: tuple[int, int] = (300, 200), seed: int = 0) -> Image.Image:
    w, h = size
    return Image.fromarray((np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8))
