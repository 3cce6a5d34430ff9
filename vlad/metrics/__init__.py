"""Evaluation metrics for anomaly detection: image/pixel AUROC, AP, F1-max, and exact and legacy AUPRO.

Only numpy and scipy are needed. Scores are "higher is more anomalous"; labels and masks are booleans (or 0/1).
The explicit functions (:func:`auroc`, :func:`aupro`, ...) raise ``ValueError`` when a metric is undefined (e.g. one
class only); the ``compute_*`` helpers return ``nan`` for those instead, so a benchmark loop never stops on them.

Example:
    >>> import numpy as np
    >>> from vlad.metrics import auroc
    >>> auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1]))
    0.75
"""

from __future__ import annotations

from vlad.metrics._scores import aupro, aupro_legacy, auroc, average_precision, f1_max
from vlad.metrics._summary import (
    binarize_mask,
    compute_image_metrics,
    compute_metrics,
    compute_pixel_metrics,
    macro_mean,
)

__all__ = [
    "aupro",
    "aupro_legacy",
    "auroc",
    "average_precision",
    "binarize_mask",
    "compute_image_metrics",
    "compute_metrics",
    "compute_pixel_metrics",
    "f1_max",
    "macro_mean",
]
