"""Tests for vlad.metrics: scikit-learn parity, exact AUPRO against a brute-force reference, legacy AUPRO against a
literal re-implementation of the cflow-ad loop, degenerate inputs, and the dictionary helpers."""

from __future__ import annotations

import ast
import math
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_auc_score

import vlad.metrics
from vlad.metrics import (
    aupro,
    aupro_legacy,
    auroc,
    average_precision,
    binarize_mask,
    compute_image_metrics,
    compute_metrics,
    compute_pixel_metrics,
    f1_max,
    macro_mean,
)

EIGHT_CONNECTED = np.ones((3, 3), dtype=int)


# ---------------------------------------------------------------------------------------------------------------------
# Reference implementations (slow and obvious on purpose)
# ---------------------------------------------------------------------------------------------------------------------


def _regions(masks: np.ndarray) -> list[np.ndarray]:
    """One full-size boolean mask per 8-connected region of every image, shape ``(N, H, W)`` each."""
    regions = []
    for index, mask in enumerate(masks):
        labelled, count = ndimage.label(mask, structure=EIGHT_CONNECTED)
        for region_id in range(1, count + 1):
            region = np.zeros(masks.shape, dtype=bool)
            region[index] = labelled == region_id
            regions.append(region)
    return regions


def brute_force_aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Bergmann AUPRO by looping over every distinct threshold."""
    regions = _regions(masks)
    negatives = ~masks
    xs, ys = [0.0], [0.0]
    for threshold in sorted(set(maps.ravel().tolist()), reverse=True):
        predicted = maps >= threshold
        xs.append((predicted & negatives).sum() / negatives.sum())
        ys.append(float(np.mean([(predicted & region).sum() / region.sum() for region in regions])))
    area = 0.0
    for x0, y0, x1, y1 in zip(xs[:-1], ys[:-1], xs[1:], ys[1:], strict=True):
        if x1 <= fpr_limit:
            area += (x1 - x0) * (y0 + y1) / 2
        elif x0 < fpr_limit:
            y_cut = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            area += (fpr_limit - x0) * (y0 + y_cut) / 2
            break
        else:
            break
    return area / fpr_limit


def cflow_pro_score(masks: np.ndarray, amaps: np.ndarray, max_step: int = 200, expect_fpr: float = 0.3) -> float:
    """The cflow-ad ``cal_pro_score`` loop, with scipy's 8-connected labelling in place of skimage's."""
    binary_amaps = np.zeros_like(amaps, dtype=bool)
    min_th, max_th = amaps.min(), amaps.max()
    delta = (max_th - min_th) / max_step
    pros, fprs = [], []
    for th in np.arange(min_th, max_th, delta):
        binary_amaps[amaps <= th], binary_amaps[amaps > th] = 0, 1
        pro = []
        for binary_amap, mask in zip(binary_amaps, masks, strict=True):
            labelled, count = ndimage.label(mask, structure=EIGHT_CONNECTED)
            for region_id in range(1, count + 1):
                coords = np.argwhere(labelled == region_id)
                tp_pixels = binary_amap[coords[:, 0], coords[:, 1]].sum()
                pro.append(tp_pixels / len(coords))
        inverse_masks = 1 - masks
        fp_pixels = np.logical_and(inverse_masks, binary_amaps).sum()
        fprs.append(fp_pixels / inverse_masks.sum())
        pros.append(np.array(pro).mean())
    pros_array, fprs_array = np.array(pros), np.array(fprs)
    keep = fprs_array < expect_fpr
    kept = fprs_array[keep]
    kept = (kept - kept.min()) / (kept.max() - kept.min())
    return float(auc(kept, pros_array[keep]))


def random_case(
    seed: int, shape: tuple[int, int, int] = (4, 12, 12), decimals: int | None = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Maps with ties (rounded), several blob regions per image and at least one defect-free image."""
    rng = np.random.default_rng(seed)
    n, h, w = shape
    masks = np.zeros(shape, dtype=bool)
    for index in range(1, n):  # image 0 stays defect-free
        for _ in range(rng.integers(1, 4)):
            y, x = rng.integers(0, h - 2), rng.integers(0, w - 2)
            masks[index, y : y + rng.integers(1, 4), x : x + rng.integers(1, 4)] = True
    maps = rng.random(shape) + 0.6 * masks
    if decimals is not None:
        maps = np.round(maps, decimals)
    return maps, masks


# ---------------------------------------------------------------------------------------------------------------------
# Image-level metrics against scikit-learn
# ---------------------------------------------------------------------------------------------------------------------


def _scores_labels(seed: int, n: int = 200, decimals: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < rng.uniform(0.1, 0.9)
    labels[:2] = [True, False]
    scores = np.round(rng.normal(size=n) + labels * rng.uniform(0, 2), decimals)
    return scores, labels


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("decimals", [0, 1, 3])
def test_auroc_and_ap_match_sklearn(seed: int, decimals: int) -> None:
    scores, labels = _scores_labels(seed, decimals=decimals)
    assert auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert average_precision(scores, labels) == pytest.approx(average_precision_score(labels, scores), abs=1e-12)


@pytest.mark.parametrize("seed", range(12))
def test_f1_max_matches_precision_recall_curve(seed: int) -> None:
    scores, labels = _scores_labels(seed, decimals=1)
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    precision, recall = precision[:-1], recall[:-1]
    valid = precision + recall > 0
    f1 = np.zeros_like(precision)
    f1[valid] = 2 * precision[valid] * recall[valid] / (precision[valid] + recall[valid])
    best, threshold = f1_max(scores, labels)
    assert best == pytest.approx(f1.max(), abs=1e-12)
    assert threshold in thresholds[np.isclose(f1, f1.max(), rtol=0, atol=1e-12)]
    predicted = scores >= threshold
    tp = np.sum(predicted & labels)
    assert 2 * tp / (predicted.sum() + labels.sum()) == pytest.approx(best, abs=1e-12)


def test_image_metrics_accept_lists_and_int_labels() -> None:
    scores, labels = [0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]
    assert auroc(scores, labels) == pytest.approx(0.75)
    assert average_precision(scores, labels) == pytest.approx(average_precision_score(labels, scores))
    assert f1_max(scores, labels) == (pytest.approx(0.8), pytest.approx(0.35))


def test_all_tied_scores_give_half() -> None:
    assert auroc(np.zeros(10), np.arange(10) % 2) == pytest.approx(0.5)


def test_all_anomalous_ap_is_one_like_sklearn() -> None:
    scores, labels = np.array([0.2, 0.5, 0.9]), np.ones(3, dtype=bool)
    assert average_precision(scores, labels) == pytest.approx(average_precision_score(labels, scores)) == 1.0


@pytest.mark.parametrize("labels", [np.zeros(5, dtype=int), np.ones(5, dtype=int)])
def test_auroc_single_class_raises(labels: np.ndarray) -> None:
    with pytest.raises(ValueError, match="only one class"):
        auroc(np.arange(5.0), labels)


@pytest.mark.parametrize("function", [average_precision, f1_max])
def test_ap_and_f1_without_anomalies_raise(function: Callable[..., object]) -> None:
    with pytest.raises(ValueError, match="no anomalous"):
        function(np.arange(5.0), np.zeros(5))


@pytest.mark.parametrize("function", [auroc, average_precision, f1_max])
def test_image_metrics_reject_malformed_input(function: Callable[..., object]) -> None:
    with pytest.raises(ValueError, match="same length, got 3 and 4"):
        function(np.arange(3.0), np.array([0, 1, 0, 1]))
    with pytest.raises(ValueError, match="scores must be finite, got 1 NaN"):
        function(np.array([0.1, np.nan, 0.3]), np.array([0, 1, 1]))
    with pytest.raises(ValueError, match="finite"):
        function(np.array([0.1, np.inf, 0.3]), np.array([0, 1, 1]))
    with pytest.raises(ValueError, match=r"labels must contain only 0 and 1.*\[2\]"):
        function(np.arange(3.0), np.array([0, 1, 2]))
    with pytest.raises(ValueError, match=r"scores must have shape \(N,\)"):
        function(np.zeros((2, 2)), np.array([0, 1, 0, 1]))
    with pytest.raises(ValueError, match="must not be empty"):
        function(np.array([]), np.array([]))


# ---------------------------------------------------------------------------------------------------------------------
# Exact AUPRO
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("decimals", [1, 2, None])
def test_aupro_matches_brute_force(seed: int, decimals: int | None) -> None:
    maps, masks = random_case(seed, decimals=decimals)
    assert aupro(maps, masks) == pytest.approx(brute_force_aupro(maps, masks), abs=1e-9)


@pytest.mark.parametrize("fpr_limit", [0.01, 0.05, 0.3, 0.5, 1.0])
def test_aupro_matches_brute_force_for_other_limits(fpr_limit: float) -> None:
    maps, masks = random_case(42, shape=(3, 10, 10), decimals=2)
    expected = brute_force_aupro(maps, masks, fpr_limit)
    assert aupro(maps, masks, fpr_limit=fpr_limit) == pytest.approx(expected, abs=1e-9)


def test_aupro_float32_maps_match_brute_force() -> None:
    maps, masks = random_case(7, decimals=None)
    maps32 = maps.astype(np.float32)
    assert aupro(maps32, masks) == pytest.approx(brute_force_aupro(maps32, masks), abs=1e-9)


def test_aupro_limit_exactly_on_a_curve_point() -> None:
    # 10 normal pixels: FPR takes the value 3 / 10 == 0.3 exactly, so no interpolation is needed there.
    maps = np.array([[[0.9, 0.8, 0.7, 0.6, 0.5, 0.45, 0.4, 0.3, 0.2, 0.1, 0.05, 0.65]]])
    masks = np.zeros_like(maps, dtype=bool)
    masks[0, 0, [1, 11]] = True  # two pixels far apart in the row: two regions
    assert aupro(maps, masks) == pytest.approx(brute_force_aupro(maps, masks), abs=1e-12)


def test_aupro_uses_8_connectivity() -> None:
    # Pixels (0,0), (1,1), (1,2): one region with 8-connectivity, two with 4-connectivity.
    masks = np.zeros((1, 4, 4), dtype=bool)
    masks[0, 0, 0] = masks[0, 1, 1] = masks[0, 1, 2] = True
    maps = np.ones((1, 4, 4))
    maps[0, 0, 0] = 2.0
    # Curve (0, 0) -> (0, 1/3) -> (1, 1); PRO at FPR 0.3 is 1/3 + 0.3 * 2/3 = 8/15.
    assert aupro(maps, masks) == pytest.approx((1 / 3 + 8 / 15) / 2, abs=1e-12)


def test_perfect_map_gives_one_and_inverted_map_gives_zero() -> None:
    _, masks = random_case(3)
    assert aupro(masks.astype(float), masks) == pytest.approx(1.0, abs=1e-12)
    assert aupro((~masks).astype(float), masks) == pytest.approx(0.0, abs=1e-12)
    rng = np.random.default_rng(0)
    ranked = masks + 0.5 * rng.random(masks.shape)  # every defect pixel above every normal one
    assert aupro(ranked, masks) == pytest.approx(1.0, abs=1e-12)
    assert aupro(-ranked, masks) < 0.01


def test_aupro_is_in_unit_interval() -> None:
    for seed in range(5):
        maps, masks = random_case(seed + 100)
        assert 0.0 <= aupro(maps, masks) <= 1.0


def test_aupro_degenerate_masks_raise() -> None:
    maps = np.random.default_rng(0).random((2, 5, 5))
    with pytest.raises(ValueError, match="no anomalous region"):
        aupro(maps, np.zeros((2, 5, 5), dtype=bool))
    with pytest.raises(ValueError, match="no normal pixel"):
        aupro(maps, np.ones((2, 5, 5), dtype=bool))


def test_aupro_rejects_malformed_input() -> None:
    maps, masks = random_case(0)
    with pytest.raises(ValueError, match=r"same shape, got \(4, 12, 12\) and \(4, 12, 11\)"):
        aupro(maps, masks[..., :11])
    with pytest.raises(ValueError, match=r"anomaly_maps must have shape \(N, H, W\), got shape \(12, 12\)"):
        aupro(maps[0], masks[0])
    with pytest.raises(ValueError, match="binarize_mask"):
        aupro(maps, masks.astype(np.uint8) * 255)
    with pytest.raises(ValueError, match="anomaly_maps must be finite"):
        aupro(np.where(masks, np.nan, maps), masks)
    for bad_limit in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"fpr_limit must be in \(0, 1\]"):
            aupro(maps, masks, fpr_limit=bad_limit)


def test_aupro_runs_on_a_realistic_size() -> None:
    rng = np.random.default_rng(0)
    masks = np.zeros((20, 256, 256), dtype=bool)
    masks[1::2, 100:140, 60:120] = True
    masks[2::4, 10:15, 200:230] = True
    maps = ndimage.gaussian_filter(masks.astype(np.float32), sigma=(0, 4, 4)) + 0.3 * rng.random(masks.shape)
    value = aupro(maps.astype(np.float32), masks)
    assert 0.5 < value <= 1.0


# ---------------------------------------------------------------------------------------------------------------------
# Legacy (cflow-ad) AUPRO
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_aupro_legacy_matches_cflow_loop(seed: int, dtype: type) -> None:
    maps, masks = random_case(seed, shape=(3, 10, 10), decimals=None)
    maps = maps.astype(dtype)
    value = aupro_legacy(maps, masks)
    assert value == pytest.approx(cflow_pro_score(masks, maps), abs=1e-12)
    assert 0.0 <= value <= 1.0


def test_aupro_legacy_with_ties_and_few_steps_matches_cflow_loop() -> None:
    maps, masks = random_case(11, shape=(3, 10, 10), decimals=1)
    assert aupro_legacy(maps, masks, num_thresholds=17) == pytest.approx(
        cflow_pro_score(masks, maps, max_step=17), abs=1e-12
    )
    assert aupro_legacy(maps, masks, fpr_limit=0.5) == pytest.approx(
        cflow_pro_score(masks, maps, expect_fpr=0.5), abs=1e-12
    )


def test_aupro_legacy_is_close_to_exact_on_a_smooth_case_but_not_identical() -> None:
    rng = np.random.default_rng(5)
    masks = np.zeros((4, 48, 48), dtype=bool)
    masks[1, 10:25, 12:30] = True
    masks[2, 30:40, 5:20] = True
    masks[3, 5:12, 30:44] = True
    maps = ndimage.gaussian_filter(masks.astype(float), sigma=(0, 3, 3)) + 0.4 * rng.random(masks.shape)
    exact, legacy = aupro(maps, masks), aupro_legacy(maps, masks)
    assert 0.0 <= legacy <= 1.0
    assert 0.0 <= exact <= 1.0
    assert legacy == pytest.approx(exact, abs=0.05)
    assert legacy != exact
    assert legacy == pytest.approx(cflow_pro_score(masks, maps), abs=1e-12)


def test_aupro_legacy_degenerate_inputs_raise() -> None:
    maps, masks = random_case(0)
    with pytest.raises(ValueError, match="constant anomaly_maps"):
        aupro_legacy(np.ones_like(maps), masks)
    with pytest.raises(ValueError, match="no anomalous region"):
        aupro_legacy(maps, np.zeros_like(masks))
    with pytest.raises(ValueError, match="fewer than two distinct FPR"):
        aupro_legacy(masks.astype(float), masks)  # binary map: FPR is 0 at every threshold
    for bad in (1, 0, 2.5, True):
        with pytest.raises(ValueError, match="num_thresholds must be an integer >= 2"):
            aupro_legacy(maps, masks, num_thresholds=bad)


# ---------------------------------------------------------------------------------------------------------------------
# Dictionary helpers
# ---------------------------------------------------------------------------------------------------------------------


def test_compute_image_metrics() -> None:
    scores, labels = _scores_labels(1)
    metrics = compute_image_metrics(scores, labels)
    assert list(metrics) == ["image_auroc", "image_ap", "image_f1max"]
    assert metrics["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert metrics["image_ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    assert metrics["image_f1max"] == pytest.approx(f1_max(scores, labels)[0], abs=1e-12)


def test_compute_image_metrics_single_class_gives_nan() -> None:
    normal_only = compute_image_metrics([0.1, 0.2, 0.3], [0, 0, 0])
    assert all(math.isnan(value) for value in normal_only.values())
    anomalous_only = compute_image_metrics([0.1, 0.2, 0.3], [1, 1, 1])
    assert math.isnan(anomalous_only["image_auroc"])
    assert anomalous_only["image_ap"] == 1.0
    assert anomalous_only["image_f1max"] == 1.0
    with pytest.raises(ValueError, match="same length"):
        compute_image_metrics([0.1, 0.2], [0, 0, 1])  # malformed input still raises


def test_compute_pixel_metrics_on_nhw_inputs() -> None:
    maps, masks = random_case(2, shape=(5, 16, 16), decimals=2)
    metrics = compute_pixel_metrics(maps, masks)
    assert list(metrics) == ["pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro", "pixel_aupro_legacy"]
    flat_maps, flat_masks = maps.ravel(), masks.ravel()
    assert metrics["pixel_auroc"] == pytest.approx(roc_auc_score(flat_masks, flat_maps), abs=1e-12)
    assert metrics["pixel_ap"] == pytest.approx(average_precision_score(flat_masks, flat_maps), abs=1e-12)
    assert metrics["pixel_f1max"] == pytest.approx(f1_max(flat_maps, flat_masks)[0], abs=1e-12)
    assert metrics["pixel_aupro"] == pytest.approx(brute_force_aupro(maps, masks), abs=1e-9)
    assert metrics["pixel_aupro_legacy"] == pytest.approx(aupro_legacy(maps, masks), abs=1e-12)
    without_legacy = compute_pixel_metrics(maps, masks.astype(np.uint8), legacy_aupro=False)
    assert without_legacy == {key: metrics[key] for key in without_legacy}
    assert "pixel_aupro_legacy" not in without_legacy


def test_compute_pixel_metrics_without_defects_gives_nan() -> None:
    maps = np.random.default_rng(0).random((2, 8, 8))
    metrics = compute_pixel_metrics(maps, np.zeros((2, 8, 8), dtype=bool))
    assert set(metrics) == {"pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro", "pixel_aupro_legacy"}
    assert all(math.isnan(value) for value in metrics.values())
    all_defect = compute_pixel_metrics(maps, np.ones((2, 8, 8), dtype=bool))
    assert math.isnan(all_defect["pixel_auroc"])
    assert math.isnan(all_defect["pixel_aupro"])
    assert math.isnan(all_defect["pixel_aupro_legacy"])
    assert all_defect["pixel_ap"] == 1.0


def test_compute_metrics_combines_both_levels() -> None:
    maps, masks = random_case(4, decimals=2)
    scores = maps.reshape(len(maps), -1).max(axis=1)
    labels = masks.any(axis=(1, 2))
    metrics = compute_metrics(scores, labels, maps, masks)
    expected = {**compute_image_metrics(scores, labels), **compute_pixel_metrics(maps, masks)}
    assert "pixel_aupro_legacy" in metrics
    assert metrics == expected
    assert compute_metrics(scores, labels) == compute_image_metrics(scores, labels)
    with pytest.raises(ValueError, match="must be given together, got masks=None"):
        compute_metrics(scores, labels, anomaly_maps=maps)
    with pytest.raises(ValueError, match="one map per score, got 3 map"):
        compute_metrics(scores, labels, maps[:3], masks[:3])


def test_compute_metrics_single_class_images_give_nan_not_error() -> None:
    maps, masks = random_case(4, decimals=2)
    metrics = compute_metrics(np.arange(4.0), np.zeros(4), maps, masks)
    assert math.isnan(metrics["image_auroc"])
    assert math.isnan(metrics["image_ap"])
    assert not math.isnan(metrics["pixel_aupro"])


def test_macro_mean_ignores_nan() -> None:
    per_category = {
        "bottle": {"image_auroc": 0.9, "aupro": float("nan"), "pixel_ap": float("nan")},
        "cable": {"image_auroc": 0.7, "aupro": 0.8, "pixel_ap": float("nan")},
        "screw": {"image_auroc": float("nan"), "aupro": 0.6},
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        means = macro_mean(per_category)
    assert list(means) == ["image_auroc", "aupro", "pixel_ap"]
    assert means["image_auroc"] == pytest.approx(0.8)
    assert means["aupro"] == pytest.approx(0.7)
    assert math.isnan(means["pixel_ap"])
    assert macro_mean({}) == {}


def test_binarize_mask() -> None:
    uint8 = np.array([[0, 127, 128, 255]], dtype=np.uint8)
    np.testing.assert_array_equal(binarize_mask(uint8), [[False, False, True, True]])
    np.testing.assert_array_equal(binarize_mask(np.array([0.0, 0.5, 0.51, 1.0])), [False, False, True, True])
    np.testing.assert_array_equal(binarize_mask(np.array([0, 1, 1], dtype=np.uint8)), [False, True, True])
    np.testing.assert_array_equal(binarize_mask(np.array([0, 40000], dtype=np.uint16)), [False, True])
    np.testing.assert_array_equal(binarize_mask(uint8, threshold=0.01), [[False, True, True, True]])
    bool_mask = np.array([True, False])
    result = binarize_mask(bool_mask)
    assert result.dtype == np.bool_
    assert result is not bool_mask
    for bad in (0, 1, 1.5, -0.2):
        with pytest.raises(ValueError, match=r"threshold must be a number in \(0, 1\)"):
            binarize_mask(uint8, threshold=bad)
    with pytest.raises(ValueError, match="finite"):
        binarize_mask(np.array([0.0, np.nan]))


def test_metrics_package_imports_only_numpy_and_scipy() -> None:
    allowed = {"__future__", "collections", "dataclasses", "math", "numpy", "scipy", "typing", "vlad"}
    package_dir = Path(vlad.metrics.__file__).parent
    for source in package_dir.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            for name in names:
                assert name.split(".")[0] in allowed, f"{source.name} imports {name}"
                assert not name.startswith("vlad.") or name.startswith("vlad.metrics"), f"{source.name} imports {name}"
    assert set(vlad.metrics.__all__) == {
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
    }
