"""Detected boxes and what vlad does with them: FiLo's area filter, overlap suppression, and "which object holds
the anomaly". Only numpy is needed here.

Coordinates follow :mod:`vlad.regions`: ``x`` is the column, ``y`` the row, the origin is the top-left corner of the
image and pixel ``(x, y)`` covers ``[x, x + 1) x [y, y + 1)``. A box ``(x0, y0, x1, y1)`` holds floats in input-image
pixels and covers ``[x0, x1) x [y0, y1)``; an image size is ``(width, height)`` as in ``PIL.Image.size``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from vlad.errors import ConfigError
from vlad.regions import position_word


@dataclass(frozen=True)
class Box:
    """One detected object.

    Attributes:
        xyxy: ``(x0, y0, x1, y1)`` in pixels of the input image, ``x0 <= x1`` and ``y0 <= y1``.
        score: the detector's confidence in [0, 1].
        phrase: the input phrase the box was matched to (as the caller wrote it, stripped).
        image_size: ``(width, height)`` of the image the box lies in, or None when unknown. Detectors always set it;
            :attr:`position` needs it.
    """

    xyxy: tuple[float, float, float, float]
    score: float
    phrase: str
    image_size: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        coords = tuple(self.xyxy)
        if len(coords) != 4 or not all(_is_finite_number(c) for c in coords):
            raise ConfigError(f"Box.xyxy must be four finite numbers (x0, y0, x1, y1), got {self.xyxy!r}")
        x0, y0, x1, y1 = (float(c) for c in coords)
        if x1 < x0 or y1 < y0:
            raise ConfigError(f"Box.xyxy must have x0 <= x1 and y0 <= y1, got {self.xyxy!r}")
        if not _is_finite_number(self.score) or not 0.0 <= float(self.score) <= 1.0:
            raise ConfigError(f"Box.score must be a number in [0, 1], got {self.score!r}")
        if not isinstance(self.phrase, str):
            raise ConfigError(f"Box.phrase must be a str, got {type(self.phrase).__name__}")
        object.__setattr__(self, "xyxy", (x0, y0, x1, y1))
        object.__setattr__(self, "score", float(self.score))
        if self.image_size is not None:
            object.__setattr__(self, "image_size", check_image_size(self.image_size))

    @property
    def area(self) -> float:
        """Area in square pixels."""
        x0, y0, x1, y1 = self.xyxy
        return (x1 - x0) * (y1 - y0)

    @property
    def center(self) -> tuple[float, float]:
        """``(x, y)`` centre in pixels."""
        x0, y0, x1, y1 = self.xyxy
        return (x0 + x1) / 2, (y0 + y1) / 2

    @property
    def position(self) -> str:
        """Where the centre lies on a 3x3 grid of the image (see :func:`vlad.regions.position_word`).

        Raises:
            ConfigError: if the box does not know its image size (use :meth:`position_in`).
        """
        if self.image_size is None:
            raise ConfigError("Box.position needs the image size; this box has image_size=None, use position_in()")
        return self.position_in(self.image_size)

    def position_in(self, image_size: tuple[int, int]) -> str:
        """Position word of the centre in an image of ``(width, height)``; a centre outside is clamped to the edge."""
        width, height = check_image_size(image_size)
        cx, cy = self.center
        return position_word(min(max(cx, 0.0), width), min(max(cy, 0.0), height), width, height)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable summary; ``position`` is included when the image size is known."""
        out: dict[str, Any] = {
            "bbox": [round(c, 2) for c in self.xyxy],
            "score": round(self.score, 6),
            "phrase": self.phrase,
            "area": round(self.area, 2),
            "center": [round(c, 2) for c in self.center],
        }
        if self.image_size is not None:
            out["position"] = self.position
        return out


def filter_boxes(
    boxes: Sequence[Box],
    *,
    max_area_fraction: float = 0.7,
    image_size: tuple[int, int],
    keep_best_if_empty: bool = True,
) -> list[Box]:
    """FiLo's box filter: drop boxes that cover most of the image, which usually frame the whole product.

    Args:
        boxes: detected boxes, in any order.
        max_area_fraction: boxes whose area is at least this fraction of the image are dropped; in (0, 1].
        image_size: ``(width, height)`` of the image the boxes lie in.
        keep_best_if_empty: when every box is dropped, keep the highest-scoring one (FiLo does).

    Returns:
        The kept boxes sorted by score descending (stable for ties); empty only when ``boxes`` is empty or
        ``keep_best_if_empty`` is False.

    Raises:
        ConfigError: if ``max_area_fraction`` is outside (0, 1] or ``image_size`` is not two positive ints.
    """
    if not _is_finite_number(max_area_fraction) or not 0.0 < max_area_fraction <= 1.0:
        raise ConfigError(f"max_area_fraction must be in (0, 1], got {max_area_fraction!r}")
    width, height = check_image_size(image_size)
    ranked = sort_boxes(boxes)
    kept = [b for b in ranked if b.area / (width * height) < max_area_fraction]
    if not kept and ranked and keep_best_if_empty:
        kept = ranked[:1]
    return kept


def which_object(
    boxes: Sequence[Box],
    anomaly_map: np.ndarray,
    pred_mask: np.ndarray | None = None,
) -> list[tuple[Box, float]]:
    """Which detected object holds the anomaly: the share of the anomaly that falls inside each box.

    Without ``pred_mask`` the share is of the anomaly *mass*: the sum of the map's positive part inside the box over
    its sum over the image. With ``pred_mask`` it is the share of predicted-anomalous pixels; a mask with no pixel set
    falls back to the map's mass. Boxes cover pixels fractionally (a box edge at x = 10.5 covers half of column 10),
    so results do not jump when a box moves by a fraction of a pixel. Overlapping boxes each count the shared part,
    so the shares may sum to more than 1. A map with no positive mass gives 0 for every box.

    Args:
        boxes: boxes in the pixel grid of ``anomaly_map``.
        anomaly_map: (H, W) finite anomaly map at the input resolution; higher is more anomalous.
        pred_mask: optional (H, W) mask of predicted anomalous pixels.

    Returns:
        ``(box, share)`` pairs, share in [0, 1], sorted by share descending (ties keep score order).

    Raises:
        ConfigError: if the map is not a finite non-empty 2-D array or the mask's shape differs.
    """
    amap = np.asarray(anomaly_map)
    if amap.ndim != 2 or amap.size == 0 or not np.issubdtype(amap.dtype, np.number):
        raise ConfigError(f"anomaly_map must be a non-empty numeric (H, W) array, got shape {amap.shape}")
    weights = np.clip(amap.astype(np.float64), 0.0, None)
    if not np.isfinite(weights).all():
        raise ConfigError("anomaly_map contains NaN or infinite values")
    if pred_mask is not None:
        mask = np.asarray(pred_mask)
        if mask.shape != amap.shape:
            raise ConfigError(f"pred_mask shape {mask.shape} differs from anomaly_map shape {amap.shape}")
        if mask.any():
            weights = mask.astype(np.float64)
    total = float(weights.sum())
    pairs = []
    for box in sort_boxes(boxes):
        inside = float(_row_cover(box, amap.shape[0]) @ weights @ _col_cover(box, amap.shape[1]))
        pairs.append((box, min(inside / total, 1.0) if total > 0 else 0.0))
    return sorted(pairs, key=lambda pair: -pair[1])


def nms(boxes: Sequence[Box], iou_threshold: float, *, per_phrase: bool = True) -> list[Box]:
    """Greedy non-maximum suppression: drop a box that overlaps a better one by more than ``iou_threshold``.

    Args:
        boxes: boxes in any order.
        iou_threshold: IoU above which the lower-scoring box is dropped; in [0, 1].
        per_phrase: only boxes with the same phrase suppress each other.

    Returns:
        The kept boxes sorted by score descending.

    Raises:
        ConfigError: if ``iou_threshold`` is outside [0, 1].
    """
    if not _is_finite_number(iou_threshold) or not 0.0 <= iou_threshold <= 1.0:
        raise ConfigError(f"iou_threshold must be in [0, 1], got {iou_threshold!r}")
    kept: list[Box] = []
    for box in sort_boxes(boxes):
        rivals = (k for k in kept if not per_phrase or k.phrase == box.phrase)
        if all(iou(box, k) <= iou_threshold for k in rivals):
            kept.append(box)
    return kept


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two boxes; 0 when both are empty."""
    ax0, ay0, ax1, ay1 = a.xyxy
    bx0, by0, bx1, by1 = b.xyxy
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = a.area + b.area - inter
    return inter / union if union > 0 else 0.0


def sort_boxes(boxes: Sequence[Box]) -> list[Box]:
    """Boxes sorted by score descending; ties keep their input order."""
    for box in boxes:
        if not isinstance(box, Box):
            raise ConfigError(f"expected vlad.grounding.Box objects, got {type(box).__name__}")
    return sorted(boxes, key=lambda b: -b.score)


def clip_box(xyxy: Sequence[float], image_size: tuple[int, int]) -> tuple[float, float, float, float]:
    """Clip ``(x0, y0, x1, y1)`` to ``[0, width] x [0, height]`` (a box wholly outside collapses to an edge)."""
    width, height = image_size
    x0, y0, x1, y1 = (float(c) for c in xyxy)
    x0, x1 = min(max(x0, 0.0), width), min(max(x1, 0.0), width)
    y0, y1 = min(max(y0, 0.0), height), min(max(y1, 0.0), height)
    return x0, y0, max(x0, x1), max(y0, y1)


def check_image_size(image_size: Sequence[int]) -> tuple[int, int]:
    """Validates ``(width, height)`` and returns it as two ints."""
    size = tuple(image_size)
    if len(size) != 2 or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in size):
        raise ConfigError(f"image_size must be (width, height) as two ints, got {image_size!r}")
    if min(size) < 1:
        raise ConfigError(f"image_size must be positive, got {image_size!r}")
    return int(size[0]), int(size[1])


def _row_cover(box: Box, height: int) -> np.ndarray:
    """(H,) fraction of each pixel row inside the box's vertical extent."""
    rows = np.arange(height, dtype=np.float64)
    return np.clip(np.minimum(rows + 1, box.xyxy[3]) - np.maximum(rows, box.xyxy[1]), 0.0, 1.0)


def _col_cover(box: Box, width: int) -> np.ndarray:
    """(W,) fraction of each pixel column inside the box's horizontal extent."""
    cols = np.arange(width, dtype=np.float64)
    return np.clip(np.minimum(cols + 1, box.xyxy[2]) - np.maximum(cols, box.xyxy[0]), 0.0, 1.0)


def _is_finite_number(value: object) -> bool:
    return (
        isinstance(value, (int, float, np.integer, np.floating))
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )
