"""Connected regions of a predicted mask, described in pixels and in words.

Coordinates follow the image convention: ``x`` is the column, ``y`` the row, the origin is the top-left corner and a
pixel ``(x, y)`` covers ``[x, x + 1) x [y, y + 1)``, so its centre is ``(x + 0.5, y + 0.5)``. Bounding boxes are
``(x0, y0, x1, y1)`` with exclusive ends. Only numpy and scipy are needed here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import replace

import numpy as np
from scipy import ndimage

from vlad.result import POSITION_WORDS, Region

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def position_word(x: float, y: float, width: int, height: int) -> str:
    """Names the cell of a 3x3 grid that holds a point.

    Columns are split at ``width / 3`` and ``2 * width / 3``, rows at ``height / 3`` and ``2 * height / 3``. A point
    exactly on a split goes to the later cell (right / lower); a point on the far edge (``x == width`` or
    ``y == height``) goes to the last cell.

    Args:
        x: column coordinate in pixels, in ``[0, width]``.
        y: row coordinate in pixels, in ``[0, height]``.
        width: image width in pixels (positive).
        height: image height in pixels (positive).

    Returns:
        One of :data:`vlad.result.POSITION_WORDS`, e.g. ``"top left"`` or ``"center"``.

    Raises:
        ValueError: if the size is not positive or the point is not finite or lies outside the image.
    """
    _check_positive_int("width", width)
    _check_positive_int("height", height)
    for name, value, limit in (("x", x, width), ("y", y, height)):
        if not math.isfinite(float(value)) or not 0 <= value <= limit:
            raise ValueError(f"{name} must be a finite number in [0, {limit}], got {value!r}")
    col = min(int(3 * x / width), 2)
    row = min(int(3 * y / height), 2)
    return POSITION_WORDS[3 * row + col]


def find_regions(
    anomaly_map: np.ndarray,
    mask: np.ndarray,
    *,
    min_area: int = 1,
    max_regions: int = 32,
) -> tuple[Region, ...]:
    """Finds the 8-connected components of a mask and describes each one.

    Args:
        anomaly_map: (H, W) float anomaly map; higher is more anomalous. Must be finite.
        mask: (H, W) mask of anomalous pixels (bool, or anything castable to bool).
        min_area: components with fewer pixels than this are dropped (>= 1).
        max_regions: at most this many regions are returned (>= 1).

    Returns:
        Regions sorted by ``peak_score`` descending, then ``area`` descending, then raster order of their first
        pixel; empty when the mask has no pixel set. ``centroid`` is the mean of the pixel centres
        (index + 0.5), and ``position`` is :func:`position_word` of the centroid.

    Raises:
        ValueError: if the shapes differ or are not 2-D and non-empty, the map is not finite, or an option is invalid.
    """
    amap, bmask = _check_map_and_mask(anomaly_map, mask)
    _check_positive_int("min_area", min_area)
    _check_positive_int("max_regions", max_regions)
    labels, count = ndimage.label(bmask, structure=_EIGHT_CONNECTED)
    if count == 0:
        return ()
    slices = ndimage.find_objects(labels)
    area, peak = _area_and_peak(amap, labels, slices)
    keep = np.flatnonzero(area >= min_area)
    order = keep[np.lexsort((-area[keep], -peak[keep]))][:max_regions]
    return tuple(_make_region(amap, labels, int(i), slices[i], float(peak[i])) for i in order)


PEAK_BAND = 0.1
"""A peak region holds the pixels within this share of the map's range below its maximum (and connected to it)."""


def peak_region(anomaly_map: np.ndarray) -> Region:
    """The area around the map's maximum, for an anomalous verdict with no pixel over the pixel threshold: the
    8-connected pixels within :data:`PEAK_BAND` of the map's range below the peak, around the peak."""
    amap = np.asarray(anomaly_map, dtype=np.float64)
    peak, low = float(amap.max()), float(amap.min())
    near = amap >= peak - PEAK_BAND * (peak - low)
    best = max(find_regions(amap, near, max_regions=10**6), key=lambda r: (r.peak_score, r.area))
    return replace(best, source="peak")


def boxes_to_mask(
    boxes: Iterable[Sequence[int] | Region],
    shape: tuple[int, int],
) -> np.ndarray:
    """Fills bounding boxes into a boolean mask.

    Args:
        boxes: ``(x0, y0, x1, y1)`` boxes with exclusive ends (or :class:`Region` objects, whose ``bbox`` is used).
            Parts outside the image are clipped away; a box entirely outside fills nothing.
        shape: ``(H, W)`` of the mask.

    Returns:
        (H, W) bool array, True inside any box.

    Raises:
        ValueError: if ``shape`` is not two positive ints or a box is not four ints with ``x0 <= x1`` and ``y0 <= y1``.
    """
    if len(shape) != 2:
        raise ValueError(f"shape must be (H, W), got {shape!r}")
    height, width = shape
    _check_positive_int("shape[0] (H)", height)
    _check_positive_int("shape[1] (W)", width)
    out = np.zeros((height, width), dtype=bool)
    for box in boxes:
        x0, y0, x1, y1 = _check_box(box)
        out[max(y0, 0) : max(min(y1, height), 0), max(x0, 0) : max(min(x1, width), 0)] = True
    return out


FEW_COMPONENTS = 64
"""Up to this many components, statistics are computed inside each one's bounding box (cost: the boxes' area);
beyond it, in one pass over the labelled pixels."""


def _area_and_peak(amap: np.ndarray, labels: np.ndarray, slices: list) -> tuple[np.ndarray, np.ndarray]:
    """Pixel count and peak map value of every component, each of shape (count,) indexed by ``label - 1``.

    ``labels`` is the (H, W) int output of :func:`scipy.ndimage.label` (every label in ``1..count`` has a pixel),
    ``slices`` its :func:`scipy.ndimage.find_objects`. These are the only statistics needed for every component (mean
    and centroid are computed for the kept regions only), so a 4200 x 4200 map takes a fraction of a second: few
    components are measured inside their bounding boxes; many (a noisy mask) in one pass, grouped by a linear-time
    sort of the labels where they fit 16 bits.
    """
    count = len(slices)
    if count <= FEW_COMPONENTS:
        area, peak = np.empty(count, dtype=np.int64), np.empty(count)
        for i, slc in enumerate(slices):
            inside = labels[slc] == i + 1
            area[i] = np.count_nonzero(inside)
            peak[i] = amap[slc][inside].max()
        return area, peak
    flat_idx = np.flatnonzero(labels)
    lab = labels.ravel()[flat_idx]
    values = amap.ravel()[flat_idx]
    area = np.bincount(lab, minlength=count + 1)[1:]
    if count < 1 << 16:  # numpy's stable sort of 16-bit integers is a radix sort
        order = np.argsort(lab.astype(np.uint16), kind="stable")
        return area, np.maximum.reduceat(values[order], np.concatenate(([0], np.cumsum(area)[:-1]))).astype(float)
    peak = np.full(count + 1, -np.inf)
    np.maximum.at(peak, lab, values)
    return area, peak[1:]


def _make_region(amap: np.ndarray, labels: np.ndarray, i: int, slc: tuple[slice, slice], peak: float) -> Region:
    """The :class:`Region` of component index ``i`` (label ``i + 1``), whose bounding slices are ``slc``: mean and
    centroid computed inside the bounding box only."""
    height, width = amap.shape
    rows, cols = slc
    inside = labels[slc] == i + 1
    per_col, per_row = inside.sum(axis=0), inside.sum(axis=1)
    area = int(per_col.sum())
    values = amap[slc][inside].astype(np.float64)
    cx = float(per_col @ np.arange(per_col.size)) / area + cols.start + 0.5
    cy = float(per_row @ np.arange(per_row.size)) / area + rows.start + 0.5
    return Region(
        bbox=(int(cols.start), int(rows.start), int(cols.stop), int(rows.stop)),
        area=area,
        area_fraction=area / (height * width),
        peak_score=peak,
        mean_score=float(values.sum() / area),
        centroid=(cx, cy),
        position=position_word(cx, cy, width, height),
    )


def _check_map_and_mask(anomaly_map: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validates a (H, W) map and a (H, W) mask; returns them as a float array and a bool array."""
    amap = np.asarray(anomaly_map)
    if amap.ndim != 2 or amap.size == 0:
        raise ValueError(f"anomaly_map must be a non-empty 2-D (H, W) array, got shape {amap.shape}")
    if not np.issubdtype(amap.dtype, np.number) or np.issubdtype(amap.dtype, np.complexfloating):
        raise ValueError(f"anomaly_map must be a real numeric array, got dtype {amap.dtype}")
    bmask = np.asarray(mask)
    if bmask.shape != amap.shape:
        raise ValueError(f"mask shape {bmask.shape} differs from anomaly_map shape {amap.shape}")
    if not np.isfinite(amap).all():
        raise ValueError("anomaly_map contains NaN or infinite values")
    return amap, bmask.astype(bool, copy=False)


def _check_box(box: Sequence[int] | Region) -> tuple[int, int, int, int]:
    """Validates one box and returns it as four ints ``(x0, y0, x1, y1)``."""
    coords = box.bbox if isinstance(box, Region) else tuple(box)
    if len(coords) != 4 or not all(isinstance(c, (int, np.integer)) for c in coords):
        raise ValueError(f"each box must be four ints (x0, y0, x1, y1), got {box!r}")
    x0, y0, x1, y1 = (int(c) for c in coords)
    if x1 < x0 or y1 < y0:
        raise ValueError(f"each box must have x0 <= x1 and y0 <= y1, got {box!r}")
    return x0, y0, x1, y1


def _check_positive_int(name: str, value: int) -> None:
    """Raises ValueError unless ``value`` is an int (not bool) >= 1."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
