"""Tiling for high-resolution images: geometry, blending, and a small defect found only with tiles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlad.errors import ConfigError
from vlad.scorers.tiling import AUTO_MAX_TILES, Tiling, blend_weights, stitch


@pytest.mark.parametrize(
    ("tile", "expected"),
    [("auto", Tiling(None)), ("256", Tiling(256)), (256, Tiling(256)), (None, None), ("off", None)],
)
def test_parse_accepts_auto_sizes_and_off(tile: object, expected: Tiling | None) -> None:
    assert Tiling.parse(tile) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("tile", ["16", "big", 12.5, True, -4])
def test_parse_rejects_bad_sizes_in_one_line(tile: object) -> None:
    with pytest.raises(ConfigError, match=r"^tile must be 'auto' or a whole number of pixels >= 32, got "):
        Tiling.parse(tile)  # type: ignore[arg-type]


def test_parse_rejects_bad_overlap() -> None:
    with pytest.raises(ConfigError, match=r"tile overlap must be a number in \[0, 0.75\], got 0.9"):
        Tiling.parse(256, 0.9)


def test_boxes_cover_the_image_with_equal_overlaps() -> None:
    tiling = Tiling(256, 0.25)
    boxes = tiling.boxes((2000, 1500), 256)
    xs = sorted({b[0] for b in boxes})
    ys = sorted({b[1] for b in boxes})
    assert len(boxes) == len(xs) * len(ys) == 11 * 8
    assert xs[0] == ys[0] == 0
    assert (xs[-1] + 256, ys[-1] + 256) == (2000, 1500)
    assert all(b[2] - b[0] == 256 and b[3] - b[1] == 256 for b in boxes)
    steps = np.diff(xs)
    assert steps.max() - steps.min() <= 1
    assert steps.max() <= 192  # at least a quarter of a tile shared
    covered = np.zeros((1500, 2000), dtype=int)
    for x0, y0, x1, y1 in boxes:
        covered[y0:y1, x0:x1] += 1
    assert covered.min() >= 1


def test_a_side_shorter_than_the_tile_is_one_tile() -> None:
    boxes = Tiling(256).boxes((1000, 200), 256)
    assert {(b[1], b[3]) for b in boxes} == {(0, 200)}
    assert Tiling(256).side_for((250, 256), 240) is None  # fits in one tile: scored whole
    assert Tiling(256).side_for((257, 100), 240) == 256


def test_auto_tiles_only_large_images_and_caps_the_count() -> None:
    auto = Tiling(None)
    assert auto.side_for((480, 400), 240) is None  # at most two model inputs long
    assert auto.side_for((481, 400), 240) == 480
    side = auto.side_for((20000, 20000), 240)
    assert side is not None
    assert side > 480
    assert len(auto.boxes((20000, 20000), side)) <= AUTO_MAX_TILES


def test_blend_weights_ramp_over_the_overlap() -> None:
    w = blend_weights(10, 3)
    assert w.tolist() == pytest.approx([0.25, 0.5, 0.75, 1, 1, 1, 1, 0.75, 0.5, 0.25])


def test_stitch_is_exact_where_one_tile_covers_and_blends_overlaps_without_seams() -> None:
    tiling = Tiling(64, 0.25)
    boxes = tiling.boxes((160, 64), 64)
    assert [b[0] for b in boxes] == [0, 48, 96]
    maps = [torch.full((8, 8), float(v)) for v in (1.0, 2.0, 3.0)]
    out = stitch(maps, boxes, (160, 64), tiling.ramp(64))
    assert out.shape == (64, 160)
    assert out.dtype == np.float32
    assert np.allclose(out[:, :48], 1.0)
    assert np.allclose(out[:, 64:96], 2.0)
    assert np.allclose(out[:, 112:], 3.0)
    row = out[0]
    assert np.all(np.diff(row) >= -1e-6)  # monotone from 1 to 3: overlaps blend, no jump back at a tile edge
    assert np.abs(np.diff(row)).max() < 0.2  # the largest step is a fraction of the 1.0 difference between tiles


def _texture(height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = 128 + 40 * np.sin(xx / 6.0) + 40 * np.sin(yy / 9.0)
    return np.clip(base[..., None] + rng.normal(0, 6, (height, width, 3)), 0, 255).astype(np.uint8)


DEFECT = (slice(900, 940), slice(1200, 1240))  # 40 x 40 pixels in a 2000 x 1500 image


@pytest.fixture(scope="module")
def planted() -> tuple[list[Image.Image], Image.Image]:
    refs = [Image.fromarray(_texture(1500, 2000, seed)) for seed in range(3)]
    test = _texture(1500, 2000, 10)
    test[DEFECT] = (250, 20, 20)
    return refs, Image.fromarray(test)


def _covers_defect(region: object) -> bool:
    x0, y0, x1, y1 = region.bbox  # type: ignore[attr-defined]
    return x0 <= 1220 < x1 and y0 <= 920 < y1


@pytest.mark.parametrize("scorer", ["winclip", "crane"])
def test_a_small_defect_on_a_large_image_is_found_with_tiles(scorer: str, planted: tuple) -> None:
    """2000 x 1500, a 40-pixel defect, random tiny backbone (64 px input), three normal references of the same size.
    Whole, the image shrinks 31x and the defect to about one input pixel: the top region misses it. With 256 px tiles
    (88 tiles, references tiled the same way) the top region covers it, in original-image pixels."""
    from vlad import Detector

    refs, test = planted
    whole = Detector(scorer, backbone="random:tiny", references=refs).detect(test, "part")
    assert not _covers_defect(whole.regions[0])
    det = Detector(scorer, backbone="random:tiny", references=refs, tile=256)
    result = det.detect(test, "part")
    assert result.image_size == (2000, 1500)
    assert (result.meta["tiles"], result.meta["tile"]) == (88, 256)
    assert _covers_defect(result.regions[0])
    peak = np.unravel_index(result.anomaly_map.argmax(), result.anomaly_map.shape)
    assert 880 <= peak[0] < 960
    assert 1180 <= peak[1] < 1260
    assert result.threshold_source == "calibrated"
    assert det.settings()["tile"] == "256, overlap 0.25"
    assert {"preprocess", "model", "postprocess"} <= set(result.timings)


def test_images_that_fit_in_a_tile_are_scored_exactly_as_without_tiling(sample_images: Path) -> None:
    from vlad.scorers import get_scorer

    images = sorted(sample_images.glob("*.png"))
    plain = get_scorer("winclip", backbone="random:tiny").score_many(images, "part")
    tiled = get_scorer("winclip", backbone="random:tiny", tile=4096).score_many(images, "part")
    for a, b in zip(plain, tiled, strict=True):
        assert a.pred_score == b.pred_score
        assert np.array_equal(a.anomaly_map, b.anomaly_map)
        assert "tiles" not in b.meta


def test_transductive_scorers_refuse_tiles() -> None:
    from vlad.scorers import get_scorer

    with pytest.raises(ConfigError, match="scorer musc scores each image against the others in its batch"):
        get_scorer("musc", backbone="random:tiny", tile="auto")
