"""Metric dictionaries for a benchmark run, macro averaging over categories, and mask binarisation."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np
from numpy.typing import ArrayLike

from vlad.metrics._checks import UndefinedMetricError
from vlad.metrics._curves import Ranking, ap_score, best_f1, rank, roc_area
from vlad.metrics._pro import exact_aupro, legacy_area, legacy_curve, region_weights, require_regions
from vlad.metrics._scores import image_inputs, pixel_inputs

_FPR_LIMIT = 0.3
_LEGACY_STEPS = 200
PIXEL_METRICS = ("pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro", "pixel_aupro_legacy")
"""The keys of :func:`compute_pixel_metrics`, in order."""


def _or_nan(metric: Callable[[], float]) -> float:
    try:
        return float(metric())
    except UndefinedMetricError:
        return float("nan")


def _curve_metrics(ranking: Ranking, prefix: str) -> dict[str, float]:
    return {
        f"{prefix}_auroc": _or_nan(lambda: roc_area(ranking)),
        f"{prefix}_ap": _or_nan(lambda: ap_score(ranking)),
        f"{prefix}_f1max": _or_nan(lambda: best_f1(ranking)[0]),
    }


def compute_image_metrics(scores: ArrayLike, labels: ArrayLike) -> dict[str, float]:
    """Image-level AUROC, AP and F1-max.

    Args:
        scores: one anomaly score per image, shape ``(N,)``.
        labels: 1 (or True) for anomalous images, shape ``(N,)``.

    Returns:
        ``{"image_auroc", "image_ap", "image_f1max"}``. A metric undefined for these labels is ``nan`` instead of an
        error: AUROC needs both classes, AP and F1-max need an anomalous image.

    Raises:
        ValueError: malformed input (lengths differ, non-finite scores, labels not 0/1).
    """
    return _curve_metrics(rank(*image_inputs(scores, labels)), "image")


def compute_pixel_metrics(anomaly_maps: ArrayLike, masks: ArrayLike, *, legacy_aupro: bool = True) -> dict[str, float]:
    """Pixel-level AUROC, AP, F1-max, exact AUPRO and legacy AUPRO (FPR limit 0.3), sharing one sort of the pixels.

    Args:
        anomaly_maps: pixel scores, shape ``(N, H, W)``.
        masks: ground truth, True (or 1) for anomalous pixels, shape ``(N, H, W)``.
        legacy_aupro: also return ``pixel_aupro_legacy`` (see :func:`vlad.metrics.aupro_legacy`, 200 thresholds, the
            number the papers print); on by default.

    Returns:
        ``{"pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro", "pixel_aupro_legacy"}`` (the last one unless
        ``legacy_aupro=False``). Metrics undefined for these masks are ``nan`` instead of an error: with no anomalous
        pixel all of them; with no normal pixel AUROC and both AUPROs; legacy AUPRO also for constant maps or too few
        FPR values below the limit.

    Raises:
        ValueError: malformed input (shapes differ, non-finite maps, masks not 0/1).
    """
    maps, gt = pixel_inputs(anomaly_maps, masks)
    weights, n_regions = region_weights(gt)
    ranking = rank(maps.ravel(), gt.ravel(), weights)
    metrics = _curve_metrics(ranking, "pixel")
    metrics["pixel_aupro"] = _or_nan(lambda: exact_aupro(ranking, n_regions, _FPR_LIMIT))
    if legacy_aupro:
        metrics["pixel_aupro_legacy"] = _or_nan(lambda: _legacy(ranking, n_regions))
    return metrics


def _legacy(ranking: Ranking, n_regions: int) -> float:
    require_regions(n_regions, ranking.n_neg)
    return legacy_area(*legacy_curve(ranking, n_regions, _LEGACY_STEPS), _FPR_LIMIT)


def compute_metrics(
    scores: ArrayLike,
    labels: ArrayLike,
    anomaly_maps: ArrayLike | None = None,
    masks: ArrayLike | None = None,
    *,
    legacy_aupro: bool = True,
) -> dict[str, float]:
    """Image metrics and, when maps and masks are given, pixel metrics, in one dictionary.

    Args:
        scores: one anomaly score per image, shape ``(N,)``.
        labels: 1 (or True) for anomalous images, shape ``(N,)``.
        anomaly_maps: pixel scores, shape ``(N, H, W)``; give together with ``masks`` or not at all.
        masks: ground truth, True (or 1) for anomalous pixels, shape ``(N, H, W)``.
        legacy_aupro: also return ``pixel_aupro_legacy`` (on by default).

    Returns:
        The keys of :func:`compute_image_metrics` followed by those of :func:`compute_pixel_metrics`; undefined
        metrics are ``nan``.

    Raises:
        ValueError: malformed input, only one of ``anomaly_maps`` / ``masks`` given, or a different number of images
            in ``anomaly_maps`` than in ``scores``.
    """
    metrics = compute_image_metrics(scores, labels)
    if anomaly_maps is None and masks is None:
        return metrics
    if anomaly_maps is None or masks is None:
        missing = "anomaly_maps" if anomaly_maps is None else "masks"
        raise ValueError(f"anomaly_maps and masks must be given together, got {missing}=None")
    n_images = np.shape(anomaly_maps)[0] if np.ndim(anomaly_maps) else None
    if n_images != np.shape(scores)[0]:
        raise ValueError(
            f"anomaly_maps must hold one map per score, got {n_images} map(s) for {np.shape(scores)[0]} score(s)"
        )
    metrics.update(compute_pixel_metrics(anomaly_maps, masks, legacy_aupro=legacy_aupro))
    return metrics


def macro_mean(per_category: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Mean of every metric over categories, ignoring NaN (a missing metric counts as NaN).

    Args:
        per_category: ``{category: {metric: value}}``.

    Returns:
        ``{metric: mean}`` in order of first appearance; ``nan`` where every category is NaN or lacks the metric.
    """
    names: dict[str, None] = {}
    for category, metrics in per_category.items():
        if not isinstance(metrics, Mapping):
            raise ValueError(f"per_category[{category!r}] must be a mapping of metric -> value, got {metrics!r}")
        names.update(dict.fromkeys(metrics))
    means: dict[str, float] = {}
    for name in names:
        values = np.array([float(m.get(name, math.nan)) for m in per_category.values()], dtype=np.float64)
        defined = values[~np.isnan(values)]
        means[name] = float(defined.mean()) if defined.size else math.nan
    return means


def binarize_mask(mask_array: ArrayLike, threshold: float = 0.5) -> np.ndarray:
    """Turns a loaded ground-truth mask into booleans: ``value > threshold * scale``.

    The scale is inferred: boolean masks are returned as they are; masks whose maximum is at most 1 (floats in
    ``[0, 1]`` or integer 0/1 masks, as in some VisA exports) use scale 1; otherwise scale 255 (8-bit images, so
    uint8 uses ``> 127``) or 65535 when the maximum exceeds 255 (16-bit images).

    Args:
        mask_array: mask values, any shape, e.g. ``(H, W)`` or ``(N, H, W)``.
        threshold: fraction of the scale, in ``(0, 1)``.

    Returns:
        Boolean mask, same shape as ``mask_array``.

    Raises:
        ValueError: threshold out of range, non-real, negative, non-finite or above-16-bit mask values.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.floating)) or not 0 < threshold < 1:
        raise ValueError(f"threshold must be a number in (0, 1), got {threshold!r}")
    array = np.asarray(mask_array)
    if array.dtype == np.bool_:
        return array.copy()
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise ValueError(f"mask_array must hold real numbers or booleans, got dtype {array.dtype}")
    if array.size == 0:
        return np.zeros(array.shape, dtype=bool)
    low, high = array.min(), array.max()
    if not (np.isfinite(low) and np.isfinite(high)) or low < 0 or high > 65535:
        raise ValueError(f"mask_array values must be finite and in [0, 65535], got range [{low}, {high}]")
    scale = 1.0 if high <= 1 else 255.0 if high <= 255 else 65535.0
    return array > threshold * scale
