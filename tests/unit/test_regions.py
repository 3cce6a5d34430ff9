"""Unit tests for vlad.regions: grid position words, connected regions and box masks."""

from __future__ import annotations

import time

import numpy as np
import pytest

from vlad.regions import boxes_to_mask, find_regions, position_word
from vlad.result import POSITION_WORDS, Region

# ---------------------------------------------------------------------------------------------------------------------
# position_word


@pytest.mark.parametrize(
    ("x", "y", "word"),
    [
        (10.0, 10.0, "top left"),
        (45.0, 10.0, "top"),
        (80.0, 10.0, "top right"),
        (10.0, 45.0, "left"),
        (45.0, 45.0, "center"),
        (80.0, 45.0, "right"),
        (10.0, 80.0, "bottom left"),
        (45.0, 80.0, "bottom"),
        (80.0, 80.0, "bottom right"),
    ],
)
def test_position_word_all_nine_cells(x: float, y: float, word: str) -> None:
    assert position_word(x, y, 90, 90) == word


def test_position_word_covers_all_words_in_order() -> None:
    words = [position_word(15.0 + 30.0 * c, 15.0 + 30.0 * r, 90, 90) for r in range(3) for c in range(3)]
    assert tuple(words) == POSITION_WORDS


@pytest.mark.parametrize(
    ("x", "y", "word"),
    [
        (0.0, 0.0, "top left"),
        (30.0, 0.0, "top"),  # exactly on the first column split -> later cell
        (60.0, 60.0, "bottom right"),  # exactly on the second splits -> later cells
        (29.999, 59.999, "left"),
        (90.0, 90.0, "bottom right"),  # far edge stays in the last cell
    ],
)
def test_position_word_boundaries(x: float, y: float, word: str) -> None:
    assert position_word(x, y, 90, 90) == word


def test_position_word_non_square() -> None:
    assert position_word(150.0, 15.0, 300, 30) == "center"
    assert position_word(150.0, 5.0, 300, 30) == "top"
    assert position_word(299.0, 29.0, 300, 30) == "bottom right"


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((1.0, 1.0, 0, 10), "width"),
        ((1.0, 1.0, 10, -1), "height"),
        ((-0.1, 1.0, 10, 10), "x"),
        ((1.0, 10.5, 10, 10), "y"),
        ((float("nan"), 1.0, 10, 10), "x"),
    ],
)
def test_position_word_rejects_bad_input(args: tuple[float, float, int, int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        position_word(*args)


# ---------------------------------------------------------------------------------------------------------------------
# find_regions


def _two_blob_case() -> tuple[np.ndarray, np.ndarray]:
    """A 30x30 map with a 2x3 blob in the top-left (peak 0.9) and a 4x4 blob in the centre (peak 0.6)."""
    amap = np.zeros((30, 30), dtype=np.float32)
    mask = np.zeros((30, 30), dtype=bool)
    mask[1:3, 2:5] = True  # rows 1-2, cols 2-4: area 6
    amap[1:3, 2:5] = 0.5
    amap[1, 3] = 0.9
    mask[13:17, 13:17] = True  # rows/cols 13-16: area 16
    amap[13:17, 13:17] = 0.6
    return amap, mask


def test_find_regions_two_blobs_exact() -> None:
    amap, mask = _two_blob_case()
    regions = find_regions(amap, mask)
    assert len(regions) == 2
    first, second = regions
    assert all(isinstance(r, Region) for r in regions)

    assert first.bbox == (2, 1, 5, 3)
    assert first.area == 6
    assert first.area_fraction == pytest.approx(6 / 900)
    assert first.peak_score == pytest.approx(0.9)
    assert first.mean_score == pytest.approx((5 * 0.5 + 0.9) / 6)
    assert first.centroid == pytest.approx((3.5, 2.0))  # cols 2..4 -> mean 3 + 0.5; rows 1..2 -> 1.5 + 0.5
    assert first.position == "top left"

    assert second.bbox == (13, 13, 17, 17)
    assert second.area == 16
    assert second.peak_score == pytest.approx(0.6)
    assert second.mean_score == pytest.approx(0.6)
    assert second.centroid == pytest.approx((15.0, 15.0))
    assert second.position == "center"


def test_find_regions_single_pixel_centroid() -> None:
    mask = np.zeros((9, 9), dtype=bool)
    mask[0, 0] = True
    (region,) = find_regions(np.ones((9, 9)), mask)
    assert region.bbox == (0, 0, 1, 1)
    assert region.centroid == (0.5, 0.5)
    assert region.position == "top left"


def test_find_regions_uses_eight_connectivity() -> None:
    mask = np.zeros((6, 6), dtype=bool)
    mask[0, 0] = mask[1, 1] = mask[2, 2] = True  # diagonal chain: one component
    mask[5, 5] = True
    regions = find_regions(np.zeros((6, 6)), mask)
    assert sorted(r.area for r in regions) == [1, 3]
    big = max(regions, key=lambda r: r.area)
    assert big.bbox == (0, 0, 3, 3)


def test_find_regions_sorted_by_peak_then_area() -> None:
    amap = np.zeros((20, 40))
    mask = np.zeros((20, 40), dtype=bool)
    mask[0:2, 0:2] = True  # area 4, peak 0.3
    amap[0:2, 0:2] = 0.3
    mask[10:13, 0:3] = True  # area 9, peak 0.3 (tie on peak, larger area)
    amap[10:13, 0:3] = 0.3
    mask[0:1, 30:31] = True  # area 1, peak 0.8
    amap[0, 30] = 0.8
    regions = find_regions(amap, mask)
    assert [(r.peak_score, r.area) for r in regions] == [(0.8, 1), (0.3, 9), (0.3, 4)]
    assert regions[0].position == "top right"


def test_find_regions_min_area_filter() -> None:
    amap, mask = _two_blob_case()
    regions = find_regions(amap, mask, min_area=7)
    assert [r.area for r in regions] == [16]
    assert find_regions(amap, mask, min_area=17) == ()


def test_find_regions_max_regions_cap() -> None:
    mask = np.zeros((10, 40), dtype=bool)
    amap = np.zeros((10, 40))
    for i in range(10):
        mask[5, 4 * i] = True
        amap[5, 4 * i] = i / 10
    regions = find_regions(amap, mask, max_regions=3)
    assert len(regions) == 3
    assert [r.peak_score for r in regions] == pytest.approx([0.9, 0.8, 0.7])
    assert len(find_regions(amap, mask)) == 10


def test_find_regions_empty_mask() -> None:
    assert find_regions(np.zeros((5, 7)), np.zeros((5, 7), dtype=bool)) == ()


def test_find_regions_full_mask() -> None:
    (region,) = find_regions(np.full((4, 6), 2.0), np.ones((4, 6), dtype=bool))
    assert region.bbox == (0, 0, 6, 4)
    assert region.area_fraction == 1.0
    assert region.centroid == pytest.approx((3.0, 2.0))
    assert region.position == "center"


def test_find_regions_accepts_int_mask() -> None:
    mask = np.zeros((5, 5), dtype=np.uint8)
    mask[2, 2] = 1
    (region,) = find_regions(np.zeros((5, 5)), mask)
    assert region.area == 1


@pytest.mark.parametrize(
    ("amap", "mask", "kwargs", "match"),
    [
        (np.zeros((4, 4)), np.zeros((4, 5), dtype=bool), {}, r"mask shape \(4, 5\).*\(4, 4\)"),
        (np.zeros((4, 4, 1)), np.zeros((4, 4, 1), dtype=bool), {}, "2-D"),
        (np.zeros((0, 4)), np.zeros((0, 4), dtype=bool), {}, "non-empty"),
        (np.full((2, 2), np.nan), np.zeros((2, 2), dtype=bool), {}, "NaN"),
        (np.zeros((2, 2)), np.zeros((2, 2), dtype=bool), {"min_area": 0}, "min_area"),
        (np.zeros((2, 2)), np.zeros((2, 2), dtype=bool), {"max_regions": 0}, "max_regions"),
    ],
)
def test_find_regions_rejects_bad_input(amap: np.ndarray, mask: np.ndarray, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        find_regions(amap, mask, **kwargs)


def test_find_regions_fast_on_megapixel() -> None:
    rng = np.random.default_rng(0)
    amap = rng.random((1000, 1000)).astype(np.float32)
    start = time.perf_counter()
    regions = find_regions(amap, amap > 0.6)
    elapsed = time.perf_counter() - start
    assert len(regions) == 32
    peaks = [r.peak_score for r in regions]
    assert peaks == sorted(peaks, reverse=True)
    assert elapsed < 3.0


# ---------------------------------------------------------------------------------------------------------------------
# boxes_to_mask


def test_boxes_to_mask_fills_boxes() -> None:
    mask = boxes_to_mask([(1, 2, 4, 3), (0, 0, 1, 1)], (5, 6))
    expected = np.zeros((5, 6), dtype=bool)
    expected[2:3, 1:4] = True
    expected[0, 0] = True
    assert mask.dtype == np.bool_
    np.testing.assert_array_equal(mask, expected)


def test_boxes_to_mask_accepts_regions_and_round_trips() -> None:
    amap, mask = _two_blob_case()
    regions = find_regions(amap, mask)
    filled = boxes_to_mask(regions, mask.shape)
    np.testing.assert_array_equal(filled, mask)  # both blobs are solid rectangles


def test_boxes_to_mask_clips_and_handles_empty() -> None:
    mask = boxes_to_mask([(-3, -3, 2, 2), (8, 8, 20, 20), (50, 50, 60, 60), (1, 1, 1, 4)], (10, 10))
    assert mask[:2, :2].all()
    assert mask[8:, 8:].all()
    assert mask.sum() == 4 + 4
    assert not boxes_to_mask([], (3, 3)).any()


@pytest.mark.parametrize(
    ("boxes", "shape", "match"),
    [
        ([(0, 0, 1)], (3, 3), "four ints"),
        ([(0.5, 0, 1, 1)], (3, 3), "four ints"),
        ([(2, 0, 1, 1)], (3, 3), "x0 <= x1"),
        ([], (0, 3), "shape"),
        ([], (3,), "shape"),
    ],
)
def test_boxes_to_mask_rejects_bad_input(boxes: list, shape: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        boxes_to_mask(boxes, shape)


def test_an_anomalous_verdict_without_pixels_over_the_threshold_points_at_the_peak():
    from vlad.thresholds import Thresholds

    amap = np.zeros((40, 40), np.float32)
    amap[30:33, 5:8] = 0.43  # the strongest response (within 10 % of the range of its peak), below the threshold
    amap[31, 6] = 0.45
    fields = Thresholds(image=0.5, pixel=0.9).fields_for(0.7, amap)
    assert fields["pred_label"]
    assert not fields["pred_mask"].any()
    (region,) = fields["regions"]
    assert region.source == "peak"
    assert region.bbox == (5, 30, 8, 33)
    assert region.position == "bottom left"
    assert region.peak_score == pytest.approx(0.45)
    assert region.to_dict()["source"] == "peak"
    normal = Thresholds(image=0.8, pixel=0.9).fields_for(0.7, amap)
    assert normal["regions"] == ()  # a normal verdict needs no pointer
    with pytest.raises(ValueError, match="Region.source must be one of"):
        region.__class__(**{**region.__dict__, "source": "guess"})


def test_the_template_explains_peak_regions_and_normal_verdicts_with_regions():
    from vlad.explain.template import explain_text

    facts = {
        "object": "cap",
        "scorer": "winclip",
        "verdict": "anomalous",
        "pred_score": 0.7,
        "normalized_score": 0.7,
        "threshold": 0.5,
        "threshold_source": "default",
        "peak": {"value": 0.45, "position": "bottom left"},
        "regions": [
            {
                "index": 1,
                "position": "bottom left",
                "bbox": [5, 30, 8, 33],
                "area": 9,
                "area_fraction": 0.005625,
                "peak_score": 0.45,
                "mean_score": 0.4,
                "source": "peak",
            }
        ],
        "total_area_fraction": 0.005625,
        "rule_hits": [],
        "process_note": None,
        "warnings": [],
    }
    text = explain_text(facts)
    assert "No area is above the pixel threshold, but the image score is" in text
    assert "the bottom left (0.6 % of the image)" in text
    normal = {
        **facts,
        "verdict": "normal",
        "normalized_score": 0.3,
        "pred_score": 0.3,
        "regions": [{**facts["regions"][0], "source": "threshold"}],
    }
    assert "so the part passes although one area is above the pixel threshold" in explain_text(normal)


@pytest.mark.parametrize(
    ("shape", "density", "components"), [((16, 20), 0.3, (2, 64)), ((60, 80), 0.3, (65, 500)), ((60, 80), 0.6, (1, 3))]
)
def test_find_regions_matches_a_per_component_computation(
    shape: tuple[int, int], density: float, components: tuple[int, int]
) -> None:
    """Interlocking, nested and touching components (a random mask), few (measured box by box) and many (one pass):
    every statistic equals a direct per-label computation with scipy."""
    from scipy import ndimage

    rng = np.random.default_rng(3)
    amap = rng.random(shape).astype(np.float32)
    mask = rng.random(shape) < density
    regions = find_regions(amap, mask, max_regions=10**6)
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    assert len(regions) == count
    assert components[0] <= count <= components[1]
    expected = []
    for label in range(1, count + 1):
        ys, xs = np.nonzero(labels == label)
        values = amap[ys, xs].astype(np.float64)
        expected.append(
            (
                (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1),
                ys.size,
                float(values.max()),
                float(values.mean()),
                (float(xs.mean()) + 0.5, float(ys.mean()) + 0.5),
            )
        )
    expected.sort(key=lambda e: (-e[2], -e[1]))
    for region, (bbox, area, peak, mean, centroid) in zip(regions, expected, strict=True):
        assert (region.bbox, region.area) == (bbox, area)
        assert region.peak_score == pytest.approx(peak)
        assert region.mean_score == pytest.approx(mean)
        assert region.centroid == pytest.approx(centroid)


def test_find_regions_more_components_than_sixteen_bits() -> None:
    """70 000 isolated pixels: the peak of every one is its own value, order by peak then raster order."""
    amap = np.zeros((530, 530), dtype=np.float32)
    mask = np.zeros((530, 530), dtype=bool)
    mask[::2, ::2] = True
    amap[::2, ::2] = np.arange(265 * 265, dtype=np.float32).reshape(265, 265) % 1000
    regions = find_regions(amap, mask, max_regions=3)
    assert [r.peak_score for r in regions] == [999.0, 999.0, 999.0]
    assert [r.bbox for r in regions] == [(408, 6, 409, 7), (288, 14, 289, 15), (168, 22, 169, 23)]
