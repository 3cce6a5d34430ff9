"""The explicit metric functions. They raise ``ValueError`` on malformed or degenerate input."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from vlad.metrics._checks import as_binary, as_scores, check_fpr_limit, check_same_shape
from vlad.metrics._curves import ap_score, best_f1, rank, roc_area
from vlad.metrics._pro import exact_aupro, legacy_area, legacy_curve, region_weights, require_regions


def image_inputs(scores: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Validates one score and one 0/1 label per sample; returns ``(scores, labels)``, both shape ``(N,)``."""
    checked_scores = as_scores(scores, "scores", ndim=1)
    checked_labels = as_binary(labels, "labels", ndim=1)
    if checked_scores.shape != checked_labels.shape:
        raise ValueError(
            f"scores and labels must have the same length, got {checked_scores.shape[0]} and {checked_labels.shape[0]}"
        )
    return checked_scores, checked_labels


def pixel_inputs(anomaly_maps: ArrayLike, masks: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Validates anomaly maps and binary masks; returns ``(maps, masks)``, both shape ``(N, H, W)``."""
    maps = as_scores(anomaly_maps, "anomaly_maps", ndim=3)
    gt = as_binary(masks, "masks", ndim=3)
    check_same_shape(maps, gt, ("anomaly_maps", "masks"))
    return maps, gt


def auroc(scores: ArrayLike, labels: ArrayLike) -> float:
    """Area under the ROC curve, equal to ``sklearn.metrics.roc_auc_score``.

    Tied scores form one threshold; the curve starts at (0, 0) and its area is the trapezoid over distinct
    thresholds, so ties count one half.

    Args:
        scores: anomaly scores, higher means more anomalous, shape ``(N,)``.
        labels: ground truth, 1 (or True) for anomalous, shape ``(N,)``.

    Returns:
        The AUROC in ``[0, 1]``.

    Raises:
        ValueError: lengths differ, a score is NaN or infinite, labels are not 0/1, or only one class is present.
    """
    return roc_area(rank(*image_inputs(scores, labels)))


def average_precision(scores: ArrayLike, labels: ArrayLike) -> float:
    """Average precision ``sum_n (R_n - R_{n-1}) P_n`` over distinct thresholds, equal to scikit-learn's.

    Args:
        scores: anomaly scores, higher means more anomalous, shape ``(N,)``.
        labels: ground truth, 1 (or True) for anomalous, shape ``(N,)``.

    Returns:
        The AP in ``[0, 1]``. With only anomalous samples it is 1.0, as in scikit-learn.

    Raises:
        ValueError: malformed input (see :func:`auroc`) or no anomalous sample.
    """
    return ap_score(rank(*image_inputs(scores, labels)))


def f1_max(scores: ArrayLike, labels: ArrayLike) -> tuple[float, float]:
    """Best F1 = 2PR / (P + R) over the precision-recall curve's distinct thresholds.

    Points with ``P + R == 0`` are ignored. A sample is predicted anomalous when ``score >= threshold``. When several
    thresholds reach the same F1 the highest one is returned.

    Args:
        scores: anomaly scores, higher means more anomalous, shape ``(N,)``.
        labels: ground truth, 1 (or True) for anomalous, shape ``(N,)``.

    Returns:
        ``(f1, threshold)``.

    Raises:
        ValueError: malformed input (see :func:`auroc`) or no anomalous sample.
    """
    return best_f1(rank(*image_inputs(scores, labels)))


def aupro(anomaly_maps: ArrayLike, masks: ArrayLike, fpr_limit: float = 0.3) -> float:
    """Exact area under the per-region-overlap curve up to ``fpr_limit`` (Bergmann et al., MVTec AD evaluation).

    Regions are the 8-connected components (3x3 structure of ones) of each image's mask. Every distinct score is a
    threshold (``score >= threshold`` is anomalous): FPR = normal pixels above it / all normal pixels, and PRO = the
    mean over all regions of all images of (region pixels above it / region size). The curve starts at (0, 0), PRO is
    interpolated linearly at exactly ``FPR = fpr_limit``, the area is a trapezoid and is divided by ``fpr_limit``.
    Cost: one sort of the pixels, O(P log P); no loop over thresholds.

    Args:
        anomaly_maps: pixel scores, shape ``(N, H, W)``.
        masks: ground truth, True (or 1) for anomalous pixels, shape ``(N, H, W)``.
        fpr_limit: upper FPR integration limit in ``(0, 1]``.

    Returns:
        The normalised AUPRO in ``[0, 1]``.

    Raises:
        ValueError: malformed input, masks without an anomalous region, or masks without a normal pixel.
    """
    maps, gt = pixel_inputs(anomaly_maps, masks)
    limit = check_fpr_limit(fpr_limit)
    weights, n_regions = region_weights(gt)
    require_regions(n_regions, gt.size - weights.size)
    return exact_aupro(rank(maps.ravel(), gt.ravel(), weights), n_regions, limit)


def aupro_legacy(anomaly_maps: ArrayLike, masks: ArrayLike, num_thresholds: int = 200, fpr_limit: float = 0.3) -> float:
    """The "paper-compatible" AUPRO of cflow-ad, copied by AnomalyCLIP, the VAND challenge code, Crane and others.

    This is NOT Bergmann's exact AUPRO (:func:`aupro`). It exists only so numbers can be compared with published
    tables that used this code. It differs in three ways: thresholds are ``np.arange(min, max, (max - min) /
    num_thresholds)`` over all maps (about ``num_thresholds`` values from ``min`` up to, excluding, ``max``, with a
    pixel anomalous when ``score > th``); only points with ``FPR < fpr_limit`` are kept, without interpolation at the
    limit; and the kept FPRs are min-max rescaled to ``[0, 1]`` before the trapezoid, so the curve is stretched and
    the result is not divided by ``fpr_limit``. PRO is the mean over all 8-connected ground-truth regions (skimage
    ``measure.label`` default) of (region pixels above the threshold / region area). The counts come from one sort of
    the pixels and one vectorised ``searchsorted`` over all thresholds, not from a loop over thresholds.

    Args:
        anomaly_maps: pixel scores, shape ``(N, H, W)``.
        masks: ground truth, True (or 1) for anomalous pixels, shape ``(N, H, W)``.
        num_thresholds: the research code's ``max_step``; at least 2.
        fpr_limit: the research code's ``expect_fpr``, in ``(0, 1]``.

    Returns:
        The legacy AUPRO in ``[0, 1]``.

    Raises:
        ValueError: malformed input, no anomalous region, no normal pixel, constant maps, or fewer than two distinct
            FPR values below ``fpr_limit`` (the research code would return NaN there).
    """
    maps, gt = pixel_inputs(anomaly_maps, masks)
    limit = check_fpr_limit(fpr_limit)
    if isinstance(num_thresholds, bool) or not isinstance(num_thresholds, (int, np.integer)) or num_thresholds < 2:
        raise ValueError(f"num_thresholds must be an integer >= 2, got {num_thresholds!r}")
    weights, n_regions = region_weights(gt)
    require_regions(n_regions, gt.size - weights.size)
    fpr, pro = legacy_curve(rank(maps.ravel(), gt.ravel(), weights), n_regions, int(num_thresholds))
    return legacy_area(fpr, pro, limit)
