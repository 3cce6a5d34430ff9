"""WinCLIP / WinCLIP+ on a tiny random ViT: prompt ensemble, window geometry, aggregation, few-shot localisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from vlad.errors import ConfigError
from vlad.scorers import get_scorer
from vlad.scorers.winclip import WinClipScorer, harmonic_aggregation, window_indices


@pytest.fixture(scope="module")
def scorer(tiny_backbone):
    return WinClipScorer(tiny_backbone)


def test_prompt_ensemble_sizes_and_content(scorer):
    normal, anomalous = scorer.prompts("bottle")
    assert (len(normal), len(anomalous)) == (154, 88)
    assert "a cropped photo of the flawless bottle." in normal
    assert "a photo of a bottle with defect for anomaly detection." in anomalous
    assert all("bottle" in p for p in normal + anomalous)
    proto = scorer.text_prototypes("bottle")
    assert proto.shape == (2, scorer.backbone.embed_dim)
    torch.testing.assert_close(proto.norm(dim=-1), torch.ones(2))


def test_window_indices_on_a_4x4_grid():
    w = window_indices((4, 4), 2)
    assert w.shape == (9, 4)
    assert w[0].tolist() == [0, 1, 4, 5]
    assert w[-1].tolist() == [10, 11, 14, 15]
    assert window_indices((4, 4), 3).shape == (4, 9)
    with pytest.raises(ConfigError, match="does not fit the 4x4"):
        window_indices((4, 4), 5)


def test_harmonic_aggregation_matches_brute_force():
    grid, size = (5, 4), 2
    windows = window_indices(grid, size)
    rng = np.random.default_rng(0)
    scores = torch.tensor(rng.uniform(0.05, 1.0, (2, windows.shape[0])), dtype=torch.float32)
    got = harmonic_aggregation(scores, windows, 20)
    for b in range(2):
        for p in range(20):
            covering = [scores[b, i].item() for i in range(windows.shape[0]) if p in windows[i].tolist()]
            expected = len(covering) / sum(1 / s for s in covering)
            assert got[b, p].item() == pytest.approx(expected, rel=1e-5)


def test_zero_shot_result_contract(scorer, texture_set):
    image = texture_set["bad"][:100, :77]  # non-square, odd size
    r1 = scorer.score(image, "texture")
    r2 = scorer.score(image, "texture")
    assert r1.anomaly_map.shape == (100, 77)
    assert r1.anomaly_map.dtype == np.float32
    assert np.isfinite(r1.anomaly_map).all()
    assert 0.0 < r1.pred_score < 1.0
    np.testing.assert_array_equal(r1.anomaly_map, r2.anomaly_map)  # deterministic
    assert r1.threshold == pytest.approx(0.5)
    assert r1.threshold_source == "default"
    assert r1.normalized_score == pytest.approx(r1.pred_score)  # default: t=0.5, scale=1
    np.testing.assert_array_equal(r1.pred_mask, r1.anomaly_map >= r1.pixel_threshold)
    assert sum(reg.area for reg in r1.regions if reg.source == "threshold") == int(r1.pred_mask.sum())
    assert any("random weights" in w for w in r1.warnings)
    assert r1.scorer == "winclip"
    assert r1.backbone == "random:tiny"


def test_zero_shot_map_is_harmonic_mean_with_image_score(scorer, texture_set):
    """Where every window scores like the image, the map equals the image score; in general it lies between the
    smallest and largest of the three scale maps."""
    r = scorer.score(texture_set["good"], "texture")
    assert r.anomaly_map.min() > 0
    assert r.anomaly_map.max() < 1


def test_few_shot_localises_a_planted_defect(tiny_backbone, texture_set):
    """Geometry check: patch grid -> pixels. With random weights only appearance differences can be found, and a
    planted texture patch is one."""
    scorer = WinClipScorer(tiny_backbone).fit(texture_set["refs"])
    result = scorer.score(texture_set["bad"], "texture")
    mask = texture_set["mask"]
    assert roc_auc_score(mask.ravel(), result.anomaly_map.ravel()) > 0.85
    peak = np.unravel_index(result.anomaly_map.argmax(), mask.shape)
    assert mask[peak]
    good = scorer.score(texture_set["good"], "texture")
    assert result.pred_score > good.pred_score
    assert result.threshold_source == "calibrated"
    assert result.pred_label
    assert not good.pred_label


def test_calibration_thresholds_and_sensitivity(tiny_backbone, texture_set):
    refs = texture_set["refs"]
    one = WinClipScorer(tiny_backbone).fit(refs[:1]).score(texture_set["good"], "texture")
    assert one.threshold_source == "default"
    assert any("cannot be calibrated" in w for w in one.warnings)

    base = WinClipScorer(tiny_backbone).fit(refs)
    strict = WinClipScorer(tiny_backbone, sensitivity=0.0).fit(refs)
    eager = WinClipScorer(tiny_backbone, sensitivity=1.0).fit(refs)
    t = [s.thresholds("texture").image for s in (strict, base, eager)]
    assert t[0] > t[1] > t[2]
    r = base.score(texture_set["good"], "texture")
    assert r.normalized_score == pytest.approx(
        float(np.clip((r.pred_score - r.threshold) / r.score_scale + 0.5, 0, 1)), abs=1e-6
    )
    user = WinClipScorer(tiny_backbone, threshold=0.123).fit(refs).score(texture_set["good"], "texture")
    assert (user.threshold, user.pixel_threshold, user.threshold_source) == (0.123, 0.123, "user")


def test_clear_references_returns_to_zero_shot(tiny_backbone, texture_set):
    s = WinClipScorer(tiny_backbone).fit(texture_set["refs"])
    assert s.few_shot
    assert s.n_references == 6
    s.clear_references()
    assert not s.few_shot
    assert s.score(texture_set["good"], "texture").threshold_source == "default"


def test_registry_and_bad_config(tiny_backbone):
    from vlad.errors import UnknownScorerError
    from vlad.scorers import list_scorers

    with pytest.raises(UnknownScorerError, match=f"unknown scorer 'nope'; available: {', '.join(list_scorers())}"):
        get_scorer("nope")
    with pytest.raises(ConfigError, match="sensitivity must be in"):
        WinClipScorer(tiny_backbone, sensitivity=2.0)
    with pytest.raises(ConfigError, match="at least one window size"):
        WinClipScorer(tiny_backbone, scales=())
    with pytest.raises(ConfigError, match="at least one normal reference"):
        WinClipScorer(tiny_backbone).fit([])
