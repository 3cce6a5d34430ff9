"""Unit tests for vlad.viz: jet colour map, overlays, contours, map normalisation, legend strips, and the overlay and
legend of a result (size, bounded size, numbered regions, colour bar, caption, memory)."""

from __future__ import annotations

import colorsys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlad import viz
from vlad.regions import find_regions, peak_region
from vlad.result import AnomalyResult, RuleHit
from vlad.viz import jet_colormap, legend_strip, normalize_map, overlay, overlay_with_legend, save_overlay

RED = (255, 0, 0)

# ---------------------------------------------------------------------------------------------------------------------
# jet_colormap


def test_jet_endpoints_and_middle() -> None:
    colours = jet_colormap(np.array([0.0, 0.5, 1.0]))
    assert colours.dtype == np.uint8
    assert colours.shape == (3, 3)
    assert tuple(colours[0]) == (0, 0, 128)  # dark blue
    assert tuple(colours[1]) == (123, 255, 123)  # green-ish
    assert tuple(colours[2]) == (128, 0, 0)  # dark red


@pytest.mark.parametrize(
    ("value", "channel", "expected"),
    [
        (0.11, 2, 255),
        (0.34, 2, 255),
        (0.65, 2, 0),
        (0.125, 1, 0),
        (0.375, 1, 255),
        (0.64, 1, 255),
        (0.91, 1, 0),
        (0.35, 0, 0),
        (0.66, 0, 255),
        (0.89, 0, 255),
    ],
)
def test_jet_exact_at_segment_knots(value: float, channel: int, expected: int) -> None:
    assert jet_colormap(np.array(value))[channel] == expected


def test_jet_named_colours() -> None:
    blue, cyan, yellow = (tuple(int(c) for c in jet_colormap(np.array(v))) for v in (0.2, 0.36, 0.65))
    assert blue[2] == 255
    assert blue[0] == 0
    assert cyan[1] > 220
    assert cyan[2] > 220
    assert cyan[0] < 10
    assert yellow[0] > 220
    assert yellow[1] > 220
    assert yellow[2] < 10


def test_jet_hue_decreases_from_blue_to_red() -> None:
    values = np.linspace(0.0, 1.0, 201)
    rgb = jet_colormap(values).astype(float) / 255.0
    hues = np.array([colorsys.rgb_to_hsv(*c)[0] * 360.0 for c in rgb])
    assert hues[0] == pytest.approx(240.0)
    assert hues[-1] == pytest.approx(0.0)
    assert np.all(np.diff(hues) <= 1.0)  # monotone (up to uint8 rounding)
    assert 90.0 <= hues[100] <= 150.0  # 0.5 is green-ish


def test_jet_clips_and_maps_nan_to_zero() -> None:
    colours = jet_colormap(np.array([-3.0, np.nan, 7.0, np.inf]))
    np.testing.assert_array_equal(colours[0], jet_colormap(np.array(0.0)))
    np.testing.assert_array_equal(colours[1], jet_colormap(np.array(0.0)))
    np.testing.assert_array_equal(colours[2], jet_colormap(np.array(1.0)))
    np.testing.assert_array_equal(colours[3], jet_colormap(np.array(1.0)))


def test_jet_any_shape() -> None:
    assert jet_colormap(np.zeros((2, 3, 4))).shape == (2, 3, 4, 3)
    assert jet_colormap(np.array(0.3)).shape == (3,)


def test_jet_linear_between_knots() -> None:
    # green at 0.25 is halfway between its knots (0.125, 0) and (0.375, 1): 127.5 rounds half up to 128;
    # green at 0.75 is (0.91 - 0.75) / (0.91 - 0.64) = 0.5926 -> 151.
    assert tuple(int(c) for c in jet_colormap(np.array(0.25))) == (0, 128, 255)
    assert tuple(int(c) for c in jet_colormap(np.array(0.75))) == (255, 151, 0)


# ---------------------------------------------------------------------------------------------------------------------
# overlay


def _grey(h: int, w: int, level: int = 128) -> np.ndarray:
    return np.full((h, w, 3), level, dtype=np.uint8)


@pytest.mark.parametrize("size", [(37, 53), (53, 37), (1, 1), (64, 64)])
def test_overlay_size_matches_input(size: tuple[int, int]) -> None:
    h, w = size
    out = overlay(_grey(h, w), np.zeros((h, w)))
    assert isinstance(out, Image.Image)
    assert out.mode == "RGB"
    assert out.size == (w, h)


def test_overlay_accepts_pil_and_grey_arrays() -> None:
    pil = Image.new("L", (53, 37), 90)
    out_pil = overlay(pil, np.zeros((37, 53)), alpha=0.0)
    out_arr = overlay(np.full((37, 53), 90, dtype=np.uint8), np.zeros((37, 53)), alpha=0.0)
    np.testing.assert_array_equal(np.asarray(out_pil), np.asarray(out_arr))
    assert np.asarray(out_pil)[0, 0].tolist() == [90, 90, 90]


def test_overlay_alpha_zero_returns_image() -> None:
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, size=(37, 53, 3), dtype=np.uint8)
    heat = rng.random((37, 53))
    np.testing.assert_array_equal(np.asarray(overlay(image, heat, alpha=0.0)), image)


def test_overlay_alpha_one_returns_jet() -> None:
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, size=(37, 53, 3), dtype=np.uint8)
    heat = rng.random((37, 53))
    np.testing.assert_array_equal(np.asarray(overlay(image, heat, alpha=1.0)), jet_colormap(heat))


def test_overlay_half_blend() -> None:
    out = np.asarray(overlay(_grey(4, 4, 100), np.full((4, 4), 0.5), alpha=0.5))
    # (100 + (123, 255, 123)) / 2 = (111.5, 177.5, 111.5), rounded half up
    assert out[0, 0].tolist() == [112, 178, 112]


def _square_case() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mask = np.zeros((40, 40), dtype=bool)
    mask[10:30, 10:30] = True
    ring = mask.copy()
    ring[11:29, 11:29] = False
    return _grey(40, 40), mask, ring


def test_overlay_contour_width_one_is_exact_boundary() -> None:
    image, mask, ring = _square_case()
    out = np.asarray(overlay(image, np.full((40, 40), 0.5), mask, contour_width=1))
    red = np.all(out == RED, axis=-1)
    np.testing.assert_array_equal(red, ring)
    assert not np.all(out[20, 20] == RED)  # interior keeps the blended colour


def test_overlay_contour_width_two_thickens_around_boundary() -> None:
    image, mask, ring = _square_case()
    out = np.asarray(overlay(image, np.full((40, 40), 0.5), mask, contour_width=2))
    red = np.all(out == RED, axis=-1)
    assert red[ring].all()  # every boundary pixel is exactly red
    near = np.zeros_like(ring)
    near[9:31, 9:31] = True
    near[12:28, 12:28] = False
    assert not red[~near].any()  # nothing red further than one pixel from the boundary
    assert not red[12:28, 12:28].any()
    assert red[9, 20]
    assert red[11, 20]


def test_overlay_contour_on_image_edge_and_custom_colour() -> None:
    mask = np.zeros((10, 10), dtype=bool)
    mask[:4, :4] = True
    out = np.asarray(overlay(_grey(10, 10), np.zeros((10, 10)), mask, contour_color=(0, 255, 0), contour_width=1))
    green = np.all(out == (0, 255, 0), axis=-1)
    assert green[0, 0]
    assert green[0, 2]
    assert green[3, 3]
    assert not green[1, 1]


@pytest.mark.parametrize("mask", [None, np.zeros((12, 15), dtype=bool)])
def test_overlay_no_contour_for_empty_mask(mask: np.ndarray | None) -> None:
    heat = np.linspace(0, 1, 12 * 15).reshape(12, 15)
    out = np.asarray(overlay(_grey(12, 15), heat, mask))
    expected = np.asarray(overlay(_grey(12, 15), heat))
    np.testing.assert_array_equal(out, expected)
    assert not np.all(out == RED, axis=-1).any()


def test_overlay_shape_mismatch_errors() -> None:
    with pytest.raises(ValueError, match=r"heat shape \(37, 52\).*\(37, 53\)"):
        overlay(_grey(37, 53), np.zeros((37, 52)))
    with pytest.raises(ValueError, match=r"mask shape \(53, 37\).*\(37, 53\)"):
        overlay(_grey(37, 53), np.zeros((37, 53)), np.zeros((53, 37), dtype=bool))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"alpha": 1.5}, "alpha"),
        ({"alpha": float("nan")}, "alpha"),
        ({"contour_width": 0}, "contour_width"),
        ({"contour_color": (255, 0)}, "contour_color"),
        ({"contour_color": (256, 0, 0)}, "contour_color"),
    ],
)
def test_overlay_rejects_bad_options(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        overlay(_grey(4, 4), np.zeros((4, 4)), **kwargs)


@pytest.mark.parametrize(
    "image",
    [np.zeros((4, 4, 3), dtype=np.float32), np.zeros((4, 4, 2), dtype=np.uint8), np.zeros((0, 4, 3), dtype=np.uint8)],
)
def test_overlay_rejects_bad_images(image: np.ndarray) -> None:
    with pytest.raises(ValueError, match="image"):
        overlay(image, np.zeros(image.shape[:2]))


def test_save_overlay_writes_png(tmp_path: Path) -> None:
    target = tmp_path / "nested" / "dir" / "out.png"
    mask = np.zeros((37, 53), dtype=bool)
    mask[5:10, 5:10] = True
    written = save_overlay(str(target), _grey(37, 53), np.zeros((37, 53)), mask, alpha=0.3)
    assert written == target
    with Image.open(target) as img:
        assert img.format == "PNG"
        assert img.size == (53, 37)
        np.testing.assert_array_equal(np.asarray(img.convert("RGB"))[5, 5], RED)


# ---------------------------------------------------------------------------------------------------------------------
# normalize_map


def test_normalize_map_threshold_maps_to_half() -> None:
    m = np.array([[2.0, 3.0], [1.0, 100.0]])
    out = normalize_map(m, threshold=2.0, scale=2.0)
    assert out.dtype == np.float32
    assert out.shape == (2, 2)
    assert out[0, 0] == pytest.approx(0.5)
    assert out[0, 1] == pytest.approx(1.0)
    assert out[1, 0] == pytest.approx(0.0)
    assert out[1, 1] == 1.0  # clipped
    assert normalize_map(np.array([-50.0]), 2.0, 2.0)[0] == 0.0


@pytest.mark.parametrize(
    ("threshold", "scale", "match"),
    [(0.0, 0.0, "scale"), (0.0, -1.0, "scale"), (float("nan"), 1.0, "threshold"), (0.0, float("inf"), "scale")],
)
def test_normalize_map_rejects_bad_parameters(threshold: float, scale: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        normalize_map(np.zeros((2, 2)), threshold, scale)


# ---------------------------------------------------------------------------------------------------------------------
# legend


def test_legend_strip_draws_black_text_on_white() -> None:
    strip = legend_strip(["rule: ignore scratches", "score 0.73"], 200)
    assert strip.mode == "RGB"
    assert strip.width == 200
    arr = np.asarray(strip)
    assert tuple(arr[0, 0]) == (255, 255, 255)
    assert (arr.sum(axis=-1) < 200).any()  # some dark text pixels


def test_legend_strip_grows_with_lines_and_wraps() -> None:
    one = legend_strip(["a"], 200)
    two = legend_strip(["a", "b"], 200)
    assert two.height > one.height
    wrapped = legend_strip(["word " * 30], 80)
    assert wrapped.height > one.height


def test_legend_strip_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="lines"):
        legend_strip("not a list", 100)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="width"):
        legend_strip(["x"], 0)


def test_overlay_with_legend_stacks_below() -> None:
    base = overlay(_grey(37, 53), np.zeros((37, 53)))
    stacked = overlay_with_legend(base, ["hit: small defect ignored"])
    assert stacked.width == 53
    assert stacked.height > 37
    np.testing.assert_array_equal(np.asarray(stacked)[:37], np.asarray(base))
    assert tuple(np.asarray(stacked)[37, 0]) == (255, 255, 255)


def test_overlay_with_legend_empty_lines_returns_overlay() -> None:
    base = overlay(_grey(10, 10), np.zeros((10, 10)))
    assert overlay_with_legend(base, []) is base


# ---------------------------------------------------------------------------------------------------------------------
# render_result and render_legend: what an operator reads


def _result(
    width: int,
    height: int,
    blobs: list[tuple[tuple[int, int, int, int], float]],
    *,
    rule_hits: tuple[RuleHit, ...] = (),
    label: bool = True,
) -> AnomalyResult:
    """A result whose map is 0 with rectangles of the given values; regions from the mask, strongest first."""
    amap = np.zeros((height, width), dtype=np.float32)
    for (x0, y0, x1, y1), value in blobs:
        amap[y0:y1, x0:x1] = value
    mask = amap >= 0.5
    return AnomalyResult(
        pred_score=0.8123,
        normalized_score=0.71,
        anomaly_map=amap,
        pred_mask=mask,
        pred_label=label,
        threshold=0.6,
        pixel_threshold=0.5,
        threshold_source="calibrated",
        regions=find_regions(amap, mask),
        rule_hits=rule_hits,
        meta={"pixel_scale": 1.0},
    )


def test_render_result_keeps_the_input_size_with_rule_hits() -> None:
    result = _result(200, 120, [((10, 10, 40, 30), 0.9)], rule_hits=(RuleHit("ignore specks", "suppressed 1"),))
    out = viz.render_result(_grey(120, 200), result)
    assert out.mode == "RGB"
    assert out.size == (200, 120)  # the legend is a separate strip, never stacked onto the overlay


def test_render_result_bounds_large_inputs_keeping_the_aspect_ratio() -> None:
    assert viz.OVERLAY_MAX_SIDE == 2048
    result = _result(2100, 700, [((100, 100, 300, 200), 0.9)])
    image = Image.fromarray(_grey(700, 2100))
    assert viz.render_result(image, result).size == (2048, 683)  # 700 * 2048 / 2100 = 682.7
    assert viz.render_result(image, result, full_res=True).size == (2100, 700)
    tall = _result(300, 2500, [((10, 10, 40, 30), 0.9)])
    assert viz.render_result(_grey(2500, 300), tall).size == (246, 2048)


def test_render_result_draws_the_map_and_outline_at_the_bounded_size() -> None:
    result = _result(4096, 1024, [((2048, 512, 2448, 712), 0.9)])  # halves exactly: the blob at (1024, 256)
    out = np.asarray(viz.render_result(_grey(1024, 4096), result))
    assert out.shape == (512, 2048, 3)
    inside = out[300, 1100]
    np.testing.assert_array_equal(inside, np.floor(0.5 * 128 + 0.5 * jet_colormap(np.array(0.9)) + 0.5))
    np.testing.assert_array_equal(out[300, 1024], RED)  # the outline, on the region's left edge
    np.testing.assert_array_equal(out[100, 100], np.floor(0.5 * 128 + 0.5 * jet_colormap(np.array(0.0)) + 0.5))


def test_render_result_refuses_an_image_of_another_size() -> None:
    with pytest.raises(ValueError, match="differs"):
        viz.render_result(_grey(50, 60), _result(60, 40, []))


def test_region_numbers_follow_the_report_order() -> None:
    # the stronger region (report's regions[0]) is at the bottom right, the weaker one at the top left
    result = _result(300, 200, [((220, 150, 280, 190), 0.9), ((20, 30, 70, 60), 0.7)])
    assert [r.position for r in result.regions] == ["bottom right", "top left"]
    labels = viz.region_labels(result, (300, 200))
    assert [label.number for label in labels] == [1, 2]
    assert [label.region_box for label in labels] == [(220, 150, 280, 190), (20, 30, 70, 60)]
    for label in labels:  # just above the region's top-left corner
        assert label.box[0] == label.region_box[0]
        assert label.box[3] == label.region_box[1]
    out = viz.render_result(_grey(200, 300), result)
    tiles = [np.asarray(viz.label_tile(n, labels[0].font_size)) for n in (1, 2)]
    assert not np.array_equal(tiles[0], tiles[1])
    for label, tile in zip(labels, tiles, strict=True):
        np.testing.assert_array_equal(np.asarray(out.crop(label.box)), tile)  # "1" at region 1, "2" at region 2


def test_region_labels_scale_to_the_overlay_and_stay_inside() -> None:
    result = _result(400, 200, [((0, 0, 30, 20), 0.9), ((380, 190, 400, 200), 0.8)])
    labels = viz.region_labels(result, (200, 100))
    assert labels[0].region_box == (0, 0, 15, 10)
    assert labels[1].region_box == (190, 95, 200, 100)
    for label in labels:
        x0, y0, x1, y1 = label.box
        assert 0 <= x0 < x1 <= 200
        assert 0 <= y0 < y1 <= 100
    assert labels[0].box[1] == 10  # no room above: under the box


def test_peak_regions_are_boxed_and_numbered() -> None:
    amap = np.zeros((100, 160), dtype=np.float32)
    amap[40:60, 100:130] = 0.3  # under the pixel threshold: no mask, a peak region
    region = peak_region(amap)
    result = AnomalyResult(
        0.9, 0.8, amap, np.zeros_like(amap, dtype=bool), True, 0.6, 0.5, regions=(region,), meta={"pixel_scale": 1.0}
    )
    out = np.asarray(viz.render_result(_grey(100, 160), result))
    np.testing.assert_array_equal(out[59, 129], RED)  # bottom-right corner of the box
    np.testing.assert_array_equal(out[50, 115], np.floor(0.5 * 128 + 0.5 * jet_colormap(np.array(0.3)) + 0.5))
    assert "around the map's peak" in viz.legend_lines(result)[1]


def test_render_result_4200_input_in_bounded_memory() -> None:
    side = 4200
    result = _result(side, side, [((3000, 200, 3400, 500), 0.9), ((100, 3900, 160, 3960), 0.7)])
    image = Image.fromarray(_grey(side, side))
    tracemalloc.start()
    try:
        out = viz.render_result(image, result)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 400 * 2**20, f"peak {peak / 2**20:.0f} MB"  # 1.9 GB before the map was resized first
    assert out.size == (2048, 2048)


def test_legend_caption_regions_and_rules_in_report_order() -> None:
    hits = (RuleHit("ignore the label", "suppressed 1 region"),)
    result = _result(300, 200, [((220, 150, 280, 190), 0.9), ((20, 30, 70, 60), 0.7)], rule_hits=hits)
    lines = viz.legend_lines(result)
    assert lines[0].startswith("ANOMALOUS")
    assert "score 0.8123" in lines[0]
    assert "threshold 0.6000 (calibrated)" in lines[0]
    assert lines[1].startswith("1. bottom right: 4.00 % of the image, peak 0.9")
    assert lines[2].startswith("2. top left")
    assert lines[3] == "rule: ignore the label -> suppressed 1 region"
    assert viz.legend_lines(_result(300, 200, [], label=False))[0].startswith("NORMAL")
    assert viz.legend_lines(_result(300, 200, []))[1] == "no regions"
    note = viz.legend_lines(result, overlay_size=(150, 100))[-1]
    assert "150 x 100" in note
    assert "--full-res-overlay" in note
    assert viz.colour_bar_labels(result) == ("<= 0", "pixel threshold 0.5", ">= 1")


def test_legend_draws_the_colour_bar_with_the_threshold_marked() -> None:
    result = _result(300, 200, [((220, 150, 280, 190), 0.9)])
    legend = viz.render_legend(result)
    assert legend.mode == "RGB"
    assert legend.width == viz.LEGEND_WIDTH
    arr = np.asarray(legend).astype(int)
    dark_blue = np.all(arr == (0, 0, 128), axis=-1)
    dark_red = np.all(arr == (128, 0, 0), axis=-1)
    rows = np.flatnonzero(dark_blue.any(axis=1) & dark_red.any(axis=1))
    assert rows.size >= 10  # a bar, not a speck
    y = rows[rows.size // 2]
    left, right = np.flatnonzero(dark_blue[y])[0], np.flatnonzero(dark_red[y])[-1]
    assert right - left > viz.LEGEND_WIDTH // 2
    mid = (left + right) // 2
    assert (arr[y, mid - 2 : mid + 3].sum(axis=-1) == 0).any()  # the black threshold mark at mid-scale
    assert tuple(arr[y, left + (right - left) // 4]) != (0, 0, 0)
    red_text = np.all(arr == (198, 40, 40), axis=-1)
    assert red_text[: rows[0]].any()  # the caption, above the bar, in the anomalous colour
    assert (arr[rows[-1] + 1 :].sum(axis=-1) < 100).any()  # dark text under the bar


def test_overlay_blends_in_blocks_like_one_pass() -> None:
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (700, 600, 3), dtype=np.uint8)  # 420,000 pixels: more than one block of rows
    heat = rng.random((700, 600))
    out = np.asarray(overlay(image, heat, alpha=0.3))
    expected = np.floor(0.7 * image.astype(np.float64) + 0.3 * jet_colormap(heat).astype(np.float64) + 0.5)
    np.testing.assert_array_equal(out, expected.clip(0, 255).astype(np.uint8))
