"""Per-region overlap (PRO): ground-truth regions and the exact and legacy AUPRO curves."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from vlad.metrics._checks import UndefinedMetricError
from vlad.metrics._curves import Ranking, curve_counts, partial_area, trapezoid

# 8-connectivity inside each image and no connection between images of the (N, H, W) stack.
REGION_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
REGION_STRUCTURE[1] = True


def region_weights(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Labels the ground-truth regions and weights every anomalous pixel by one over its region's size.

    Regions are the 8-connected components of each image's mask (``scipy.ndimage.label`` with a 3x3 structure of
    ones, as in the MVTec AD evaluation code and skimage's default ``measure.label``); they never span two images.

    Args:
        masks: ground truth, True for anomalous pixels, shape ``(N, H, W)``.

    Returns:
        ``(weights, n_regions)``: weights in the order of ``masks[masks]`` (C order), shape ``(P_pos,)``, and the
        total number of regions over all images.
    """
    regions, n_regions = ndimage.label(masks, structure=REGION_STRUCTURE)
    ids = regions[masks]
    sizes = np.bincount(ids, minlength=n_regions + 1)
    return 1.0 / sizes[ids], int(n_regions)


def require_regions(n_regions: int, n_negative: int) -> None:
    """Raises ``UndefinedMetricError`` when AUPRO is undefined: no anomalous region or no normal pixel."""
    if n_regions == 0:
        raise UndefinedMetricError("AUPRO is undefined: masks contain no anomalous region (no True pixel)")
    if n_negative == 0:
        raise UndefinedMetricError("AUPRO is undefined: masks contain no normal pixel, so the FPR cannot be computed")


def exact_aupro(ranking: Ranking, n_regions: int, fpr_limit: float) -> float:
    """Normalised area under the exact PRO curve up to ``fpr_limit``.

    Args:
        ranking: pixel ranking whose positive weights are ``1 / region size``.
        n_regions: number of ground-truth regions over all images.
        fpr_limit: integration limit in ``(0, 1]``.

    Returns:
        The area divided by ``fpr_limit``, in ``[0, 1]``.
    """
    require_regions(n_regions, ranking.n_neg)
    _, fps, weights = curve_counts(ranking)
    fpr = fps / ranking.n_neg
    pro = np.minimum(weights / n_regions, 1.0)
    return min(1.0, max(0.0, partial_area(fpr, pro, fpr_limit) / fpr_limit))


def legacy_curve(ranking: Ranking, n_regions: int, num_thresholds: int) -> tuple[np.ndarray, np.ndarray]:
    """FPR and PRO at the cflow-ad thresholds ``np.arange(min, max, (max - min) / num_thresholds)``.

    A pixel is predicted anomalous at threshold ``th`` when ``score > th`` (strictly), as in the research code. The
    thresholds are computed from the maps' own dtype exactly as there, and the counts come from ``searchsorted`` on
    the sorted pixels, so there is no loop over thresholds.

    Args:
        ranking: pixel ranking whose positive weights are ``1 / region size``.
        n_regions: number of ground-truth regions.
        num_thresholds: the research code's ``max_step``.

    Returns:
        ``(fpr, pro)``, both shape ``(K,)`` with ``K`` thresholds in ascending order (``K == num_thresholds`` up to
        the floating-point rounding of ``np.arange``).
    """
    low, high = ranking.ordered[0], ranking.ordered[-1]
    if not high > low:
        raise UndefinedMetricError(f"legacy AUPRO is undefined for constant anomaly_maps (all values are {low})")
    thresholds = np.arange(low, high, (high - low) / num_thresholds)
    _, fps, weights = ranking.counts(thresholds, strict=True)
    return fps / ranking.n_neg, weights / n_regions


def legacy_area(fpr: np.ndarray, pro: np.ndarray, fpr_limit: float) -> float:
    """cflow-ad area: keep ``fpr < fpr_limit``, min-max rescale those FPRs to ``[0, 1]``, trapezoid.

    Args:
        fpr: false-positive rates for ascending thresholds (so non-increasing), shape ``(K,)``.
        pro: per-region overlaps at the same thresholds, shape ``(K,)``.
        fpr_limit: the research code's ``expect_fpr``.

    Returns:
        The area, in ``[0, 1]``.
    """
    keep = fpr < fpr_limit
    kept_fpr, kept_pro = fpr[keep][::-1], pro[keep][::-1]  # ascending FPR
    if kept_fpr.size < 2 or kept_fpr[-1] == kept_fpr[0]:
        raise UndefinedMetricError(
            f"legacy AUPRO is undefined: fewer than two distinct FPR values below fpr_limit={fpr_limit} "
            f"(got {np.unique(kept_fpr).size}), so the min-max rescaling divides by zero"
        )
    scaled = (kept_fpr - kept_fpr.min()) / (kept_fpr.max() - kept_fpr.min())
    return min(1.0, max(0.0, trapezoid(kept_pro, scaled)))
