"""Tiling for high-resolution images: score overlapping tiles at the model's input size and stitch their maps.

A line camera's 5000 px image resized to a 240-518 px model input shrinks a 0.5 mm defect to one pixel or less, and
no zero-shot map sees that. With tiling, the image is cut into square tiles of ``tile`` pixels (neighbours overlap by
``overlap`` of a tile, the starts spread evenly so every overlap is the same), every tile is scored as an image of its
own (batched through the scorer, few-shot against a memory built from the references' tiles, cut the same way), and
the tile maps are stitched back at the input's resolution:

- each tile map is upsampled bilinearly to its tile's pixel size;
- overlaps are blended with weights that ramp linearly from the tile's edge over the overlap width (1 inside), so
  no seam shows: the stitched value is the weighted mean of the tiles covering a pixel (exactly the tile's value where
  one tile covers it);
- the image score is the larger of the whole image's score (the global view, as the scorer defines it) and the
  highest tile score (each tile's score as the scorer defines it for an image): a small defect raises its tile's
  score, a large or logical one the global view's.

Regions come from the stitched map, so they are in original-image pixels. The cost is ``tiles + 1`` forwards per
image (:func:`tile_boxes` says how many); ``auto`` tiles an image only when its longer side exceeds
:data:`AUTO_FACTOR` times the model input, with tiles of that many model inputs (each tile is shrunk at most
:data:`AUTO_FACTOR` times), made larger where needed to keep at most :data:`AUTO_MAX_TILES` tiles.

Only numpy here; :func:`stitch` takes torch tensors and imports torch lazily.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from vlad.errors import ConfigError

if TYPE_CHECKING:
    import torch

Box = tuple[int, int, int, int]
"""``(x0, y0, x1, y1)`` in input pixels, ends exclusive."""

AUTO = "auto"
AUTO_FACTOR = 2
"""``auto`` tiles images longer than this many model inputs, with tiles of this many model inputs."""
AUTO_MAX_TILES = 64
"""``auto`` grows its tiles until an image needs at most this many."""
MIN_TILE = 32
"""The smallest tile side accepted, in pixels."""
MAX_OVERLAP = 0.75
DEFAULT_OVERLAP = 0.25


@dataclass(frozen=True)
class Tiling:
    """How to tile: a fixed tile side in pixels, or ``auto`` (``tile=None``), and the overlap between neighbours.

    Attributes:
        tile: tile side in input pixels, or None for ``auto``.
        overlap: share of a tile that overlaps its neighbour, in ``[0, MAX_OVERLAP]``.
    """

    tile: int | None
    overlap: float = DEFAULT_OVERLAP

    @classmethod
    def parse(cls, tile: int | str | None, overlap: float = DEFAULT_OVERLAP) -> Tiling | None:
        """The tiling a ``tile`` option asks for (None: no tiling).

        Raises:
            ConfigError: ``tile`` is not ``auto`` or an integer >= :data:`MIN_TILE`, or ``overlap`` is out of range.
        """
        if tile is None or (isinstance(tile, str) and tile.strip().lower() in ("", "none", "off")):
            return None
        if not isinstance(overlap, (int, float)) or not 0.0 <= float(overlap) <= MAX_OVERLAP:
            raise ConfigError(f"tile overlap must be a number in [0, {MAX_OVERLAP}], got {overlap!r}")
        if isinstance(tile, str) and tile.strip().lower() == AUTO:
            return cls(None, float(overlap))
        try:
            side = int(tile)
        except (TypeError, ValueError):
            side = 0
        if isinstance(tile, bool) or side < MIN_TILE or (isinstance(tile, float) and tile != side):
            raise ConfigError(f"tile must be 'auto' or a whole number of pixels >= {MIN_TILE}, got {tile!r}")
        return cls(side, float(overlap))

    def describe(self) -> str:
        return f"{AUTO if self.tile is None else self.tile}, overlap {self.overlap:g}"

    def side_for(self, size: tuple[int, int], model_size: int) -> int | None:
        """The tile side for an image of ``size`` (width, height), or None when it is scored whole (it fits in one
        tile, or, for ``auto``, it is at most :data:`AUTO_FACTOR` model inputs long)."""
        longer = max(size)
        if self.tile is not None:
            return self.tile if longer > self.tile else None
        side = AUTO_FACTOR * model_size
        if longer <= side:
            return None
        while len(self.boxes(size, side)) > AUTO_MAX_TILES:
            side = int(math.ceil(side * 1.25))
        return side

    def boxes(self, size: tuple[int, int], side: int) -> list[Box]:
        """The tiles of an image of ``size`` (width, height), row by row. A side shorter than the tile is covered by
        one tile of that length."""
        width, height = size
        xs, ys = _starts(width, side, self.overlap), _starts(height, side, self.overlap)
        return [(x, y, min(x + side, width), min(y + side, height)) for y in ys for x in xs]

    def ramp(self, side: int) -> int:
        """Width in pixels over which a tile's blending weight ramps up from its edge."""
        return max(int(round(side * self.overlap)), 0)


def _starts(length: int, side: int, overlap: float) -> list[int]:
    """Evenly spread tile starts along one axis so that tiles of ``side`` cover ``[0, length)`` with at least
    ``overlap`` of a tile shared by neighbours."""
    if length <= side:
        return [0]
    stride = max(side * (1.0 - overlap), 1.0)
    n = int(math.ceil((length - side) / stride - 1e-9)) + 1
    return [int(round(v)) for v in np.linspace(0, length - side, n)]


def blend_weights(length: int, ramp: int) -> np.ndarray:
    """(length,) float32 weights: ``(d + 1) / (ramp + 1)`` at ``d`` pixels from the nearer end, 1 from ``ramp`` on."""
    d = np.minimum(np.arange(length), np.arange(length)[::-1])
    return np.minimum((d + 1.0) / (ramp + 1.0), 1.0).astype(np.float32)


def stitch(maps: list[torch.Tensor], boxes: list[Box], size: tuple[int, int], ramp: int, smooth: Any = None) -> Any:
    """Tile maps (each (h, w) on any grid) -> the (H, W) float32 map of the whole image, overlaps blended.

    Args:
        maps: one map per box, any resolution; upsampled bilinearly to the box's size.
        boxes: the tiles' boxes in the image, as :meth:`Tiling.boxes` gives them.
        size: (width, height) of the image.
        ramp: blending ramp width in pixels (:meth:`Tiling.ramp`).
        smooth: optional (1, H, W) -> (1, H, W) tensor function applied to each upsampled tile map.
    """
    import torch.nn.functional as F

    width, height = size
    num = np.zeros((height, width), dtype=np.float32)
    den = np.zeros((height, width), dtype=np.float32)
    for m, (x0, y0, x1, y1) in zip(maps, boxes, strict=True):
        up = F.interpolate(m[None, None].float(), size=(y1 - y0, x1 - x0), mode="bilinear", align_corners=False)[0]
        if smooth is not None:
            up = smooth(up)
        weight = blend_weights(y1 - y0, ramp)[:, None] * blend_weights(x1 - x0, ramp)[None, :]
        num[y0:y1, x0:x1] += up[0].cpu().numpy() * weight
        den[y0:y1, x0:x1] += weight
    return num / den
