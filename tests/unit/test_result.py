"""AnomalyResult and Region validation, serialisation; thresholds; the Detector API."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vlad.errors import ConfigError
from vlad.result import AnomalyResult, Explanation, Region, RuleHit
from vlad.thresholds import Thresholds, calibrate, normalize


def _result(**overrides):
    amap = np.zeros((4, 6), np.float32)
    amap[1, 2] = 0.9
    fields = dict(
        pred_score=0.7,
        normalized_score=0.7,
        anomaly_map=amap,
        pred_mask=amap > 0.5,
        pred_label=True,
        threshold=0.5,
        pixel_threshold=0.5,
    )
    fields.update(overrides)
    return AnomalyResult(**fields)


def test_result_normalises_types_and_serialises():
    r = _result(anomaly_map=np.ones((4, 6), np.float64), pred_mask=np.ones((4, 6), np.uint8), pred_label=np.bool_(1))
    assert r.anomaly_map.dtype == np.float32
    assert r.pred_mask.dtype == np.bool_
    assert r.pred_label is True
    assert r.image_size == (6, 4)
    assert r.verdict == "anomalous"
    r = r.replace(
        rule_hits=[RuleHit("scratches are fine", "region suppressed")], explanation=Explanation("a crack", "template")
    )
    d = json.loads(json.dumps(r.to_dict()))
    assert d["rule_hits"] == [{"rule": "scratches are fine", "effect": "region suppressed", "detail": {}}]
    assert d["explanation"]["text"] == "a crack"
    assert "anomaly_map" not in d
    assert len(r.to_dict(include_arrays=True)["anomaly_map"]) == 4


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"anomaly_map": np.zeros(5)}, "must be a non-empty 2-D"),
        ({"anomaly_map": np.full((4, 6), np.nan)}, "NaN or infinite"),
        ({"pred_mask": np.zeros((3, 3), bool)}, r"pred_mask shape \(3, 3\) differs"),
        ({"normalized_score": 1.5}, r"normalized_score must be in \[0, 1\]"),
        ({"pred_score": float("inf")}, "pred_score must be a finite number"),
        ({"threshold_source": "magic"}, "threshold_source must be"),
        ({"score_scale": 0.0}, "score_scale must be positive"),
    ],
)
def test_result_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        _result(**overrides)


def test_region_validation():
    ok = Region((0, 0, 2, 2), 4, 0.1, 0.9, 0.8, (1.0, 1.0), "top left")
    assert ok.to_dict()["bbox"] == [0, 0, 2, 2]
    with pytest.raises(ValueError, match="bbox must satisfy"):
        Region((2, 0, 2, 2), 4, 0.1, 0.9, 0.8, (1.0, 1.0), "top left")
    with pytest.raises(ValueError, match="position must be one of"):
        Region((0, 0, 2, 2), 4, 0.1, 0.9, 0.8, (1.0, 1.0), "upper")


def test_thresholds_normalise_and_shift():
    assert normalize(0.5, 0.5, 1.0) == 0.5
    assert normalize(0.75, 0.5, 1.0) == 0.75
    assert normalize(3.0, 0.5, 1.0) == 1.0
    t = Thresholds(0.5, 0.4, 1.0, 0.2)
    assert t.with_sensitivity(1.0).image == pytest.approx(0.0)
    assert t.with_sensitivity(1.0).pixel == pytest.approx(0.3)
    assert t.with_sensitivity(0.0).image == pytest.approx(1.0)
    user = t.with_user_threshold(0.33)
    assert (user.image, user.pixel, user.source) == (0.33, 0.33, "user")
    with pytest.raises(ConfigError, match=r"sensitivity must be in \[0, 1\]"):
        t.with_sensitivity(1.5)


def test_calibration_from_leave_one_out_scores():
    cal = calibrate([0.1, 0.2, 0.3], [0.5, 0.6, 0.7])
    assert cal.source == "calibrated"
    assert cal.image == pytest.approx(0.3 + 0.1 * 0.2)
    assert cal.image_scale == pytest.approx(4 * (cal.image - 0.2))
    assert normalize(0.2, cal.image, cal.image_scale) == pytest.approx(0.25)
    assert cal.pixel == pytest.approx(0.7 + 0.1 * 0.2)
    with pytest.raises(ConfigError, match="at least 2 normal references"):
        calibrate([0.1], [0.2])


def test_detector_api_end_to_end(texture_set, tmp_path):
    import vlad

    det = vlad.Detector("winclip", backbone="random:tiny", device="cpu", object_name="texture")
    r = det.detect(texture_set["bad"])
    assert r.anomaly_map.shape == (128, 128)
    assert r.threshold_source == "default"
    det.fit(texture_set["refs"][:3])
    r2 = det.detect_many([texture_set["bad"], texture_set["good"]])
    assert [x.threshold_source for x in r2] == ["calibrated", "calibrated"]
    img = det.overlay(r2[0], texture_set["bad"])
    assert img.size == (128, 128)


def test_rethreshold_matches_rescoring(tiny_backbone, texture_set):
    from vlad.api import rethreshold
    from vlad.scorers.winclip import WinClipScorer

    base = WinClipScorer(tiny_backbone).fit(texture_set["refs"]).score(texture_set["bad"], "texture")
    eager = WinClipScorer(tiny_backbone, sensitivity=0.9).fit(texture_set["refs"]).score(texture_set["bad"], "texture")
    moved = rethreshold(base, 0.9)
    assert moved.threshold == pytest.approx(eager.threshold)
    assert moved.pixel_threshold == pytest.approx(eager.pixel_threshold)
    np.testing.assert_array_equal(moved.pred_mask, eager.pred_mask)
    assert moved.normalized_score == pytest.approx(eager.normalized_score)
    assert len(moved.regions) == len(eager.regions)
    back = rethreshold(moved, 0.5)
    assert back.threshold == pytest.approx(base.threshold)


def test_detector_api_with_rules(texture_set):
    import vlad

    det = vlad.Detector(
        "winclip", backbone="random:tiny", device="cpu", object_name="texture", references=texture_set["refs"][:3]
    )
    plain = det.detect(texture_set["bad"])
    ruled = det.detect(texture_set["bad"], rules="ignore colour; defects smaller than 50 % of the image are fine")
    assert plain.rule_hits == ()
    assert {h.rule for h in ruled.rule_hits} >= {"ignore colour"}
    assert ruled.pred_score != plain.pred_score  # LAFT changed the features
    assert all(r.area_fraction >= 0.5 for r in ruled.regions)


def test_thresholds_are_one_value_used_at_scoring_and_re_thresholding(tiny_backbone, texture_set):
    from vlad.api import rethreshold
    from vlad.scorers import get_scorer

    scorer = get_scorer("winclip", backbone=tiny_backbone, sensitivity=0.5)
    base = scorer.score(texture_set["bad"], "texture")
    assert Thresholds.of(base) == scorer.thresholds("texture")
    scorer.sensitivity = 0.9
    fresh = scorer.score(texture_set["bad"], "texture")
    moved = rethreshold(base, 0.9)
    assert Thresholds.of(moved) == Thresholds.of(fresh)
    assert (moved.pred_label, moved.normalized_score, moved.regions) == (
        fresh.pred_label,
        fresh.normalized_score,
        fresh.regions,
    )
    np.testing.assert_array_equal(moved.pred_mask, fresh.pred_mask)
    assert Thresholds.of(rethreshold(moved, 0.5)) == Thresholds.of(base)


def test_calibrated_scale_has_a_floor_so_scores_do_not_saturate():
    tight = calibrate([0.500, 0.5005, 0.501], [0.6, 0.6005, 0.601], min_scale=0.1)
    assert tight.image_scale == pytest.approx(0.1)
    assert tight.pixel_scale == pytest.approx(0.1)
    assert normalize(tight.image + 0.015, tight.image, tight.image_scale) == pytest.approx(0.65)
    unfloored = calibrate([0.500, 0.5005, 0.501], [0.6, 0.6005, 0.601])
    assert normalize(unfloored.image + 0.015, unfloored.image, unfloored.image_scale) == 1.0


def test_few_references_calibrate_with_a_warning(tiny_backbone, texture_set):
    from vlad.scorers import get_scorer

    scorer = get_scorer("winclip", backbone=tiny_backbone).fit(texture_set["refs"][:3])
    r = scorer.score(texture_set["good"], "texture")
    assert r.threshold_source == "calibrated"
    assert r.score_scale >= 0.1 * scorer.default_scale
    assert any("calibrated on only 3 reference images are rough; give 10 or more" in w for w in r.warnings)
