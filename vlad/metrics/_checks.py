"""Input validation for the metric functions. Every error names the argument, what was found and what is allowed."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike


class UndefinedMetricError(ValueError):
    """The inputs are well formed but the metric is undefined for them (e.g. only one class is present).

    ``compute_*`` helpers turn this error into ``nan``; malformed inputs raise a plain ``ValueError`` everywhere.
    """


def as_scores(values: ArrayLike, name: str, ndim: int) -> np.ndarray:
    """Returns ``values`` as a finite real array of the given rank.

    Floating arrays keep their dtype (so no precision is invented and large maps stay small); other real arrays
    become float64.

    Args:
        values: array-like of scores, shape ``(N,)`` when ``ndim`` is 1 or ``(N, H, W)`` when it is 3.
        name: argument name used in error messages.
        ndim: the required number of dimensions.

    Returns:
        The scores, same shape as ``values``.

    Raises:
        ValueError: wrong rank, empty, non-real dtype or a non-finite value.
    """
    array = np.asarray(values)
    _check_rank(array, name, ndim)
    if array.dtype == np.bool_ or np.issubdtype(array.dtype, np.integer):
        array = array.astype(np.float64)
    elif not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{name} must hold real numbers, got dtype {array.dtype}")
    if not np.isfinite(array).all():
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise ValueError(f"{name} must be finite, got {bad} NaN or infinite value(s)")
    return array


def as_binary(values: ArrayLike, name: str, ndim: int) -> np.ndarray:
    """Returns ``values`` as a boolean array; accepted inputs are booleans or numbers that are all 0 or 1.

    Args:
        values: array-like of labels, shape ``(N,)`` when ``ndim`` is 1 or ``(N, H, W)`` when it is 3.
        name: argument name used in error messages.
        ndim: the required number of dimensions.

    Returns:
        Boolean array, same shape as ``values``, True for anomalous.

    Raises:
        ValueError: wrong rank, empty, or values other than 0 and 1.
    """
    array = np.asarray(values)
    _check_rank(array, name, ndim)
    if array.dtype == np.bool_:
        return array
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise ValueError(f"{name} must be boolean or 0/1 numbers, got dtype {array.dtype}")
    positive = array == 1
    if not np.logical_or(positive, array == 0).all():
        found = np.unique(array[~np.logical_or(positive, array == 0)])[:5].tolist()
        hint = " (use vlad.metrics.binarize_mask for 0..255 or soft masks)" if ndim == 3 else ""
        raise ValueError(f"{name} must contain only 0 and 1 (or booleans), got values such as {found}{hint}")
    return positive


def check_same_shape(first: np.ndarray, second: np.ndarray, names: tuple[str, str]) -> None:
    """Raises ``ValueError`` unless both arrays have the same shape.

    Args:
        first: any array.
        second: any array.
        names: the two argument names, in order, for the error message.
    """
    if first.shape != second.shape:
        raise ValueError(f"{names[0]} and {names[1]} must have the same shape, got {first.shape} and {second.shape}")


def check_fpr_limit(fpr_limit: float) -> float:
    """Returns ``fpr_limit`` as a float after checking it lies in ``(0, 1]``."""
    if isinstance(fpr_limit, bool) or not isinstance(fpr_limit, (int, float, np.floating, np.integer)):
        raise ValueError(f"fpr_limit must be a number in (0, 1], got {fpr_limit!r}")
    if not 0.0 < float(fpr_limit) <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    return float(fpr_limit)


def _check_rank(array: np.ndarray, name: str, ndim: int) -> None:
    expected = "(N,)" if ndim == 1 else "(N, H, W)"
    if array.ndim != ndim:
        raise ValueError(f"{name} must have shape {expected}, got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} must not be empty, got shape {array.shape}")
