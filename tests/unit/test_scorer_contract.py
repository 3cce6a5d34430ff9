"""One contract for every registered scorer, on the tiny random backbone (plumbing, not accuracy)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from vlad.scorers import list_scorers, scorer_class

NEEDS_REFERENCES = {"laft"}
EXTRA = {"filo": {"detector": "none"}}


def _build(name, tiny_backbone, texture_set):
    scorer = scorer_class(name)(tiny_backbone, **EXTRA.get(name, {}))
    if name in NEEDS_REFERENCES or scorer.transductive:
        scorer.fit(texture_set["refs"][:3])
    return scorer


def test_registry_lists_the_six_scorers():
    assert list_scorers() == ["anomalyclip", "crane", "filo", "laft", "musc", "winclip"]


@pytest.mark.parametrize("name", list_scorers())
def test_result_contract(name, tiny_backbone, texture_set):
    scorer = _build(name, tiny_backbone, texture_set)
    images = [texture_set["bad"][:100, :77], texture_set["good"][:64, :90]]
    first = scorer.score_many(images, "texture")
    again = scorer.score_many(images, "texture")
    for image, r, r2 in zip(images, first, again, strict=True):
        assert r.scorer == name
        assert r.anomaly_map.shape == image.shape[:2]
        assert r.anomaly_map.dtype == np.float32
        assert np.isfinite(r.anomaly_map).all()
        np.testing.assert_array_equal(r.anomaly_map, r2.anomaly_map)  # deterministic
        assert r.pred_score == r2.pred_score
        assert 0.0 <= r.normalized_score <= 1.0
        np.testing.assert_array_equal(r.pred_mask, r.anomaly_map >= r.pixel_threshold)
        assert sum(reg.area for reg in r.regions if reg.source == "threshold") == int(r.pred_mask.sum())
        labels, n = ndimage.label(r.pred_mask, structure=np.ones((3, 3)))
        components = {
            (int((labels == i).sum()), round(float(r.anomaly_map[labels == i].max()), 6)) for i in range(1, n + 1)
        }
        for reg in r.regions:  # each region is one 8-connected component: its area and its own peak
            x0, y0, x1, y1 = reg.bbox
            assert r.pred_mask[y0:y1, x0:x1].sum() >= reg.area
            assert (reg.area, round(reg.peak_score, 6)) in components
        assert any("random weights" in w for w in r.warnings)


@pytest.mark.parametrize("name", list_scorers())
def test_concepts_steer_every_scorer(name, tiny_backbone, texture_set):
    """An ignore-concept transform (LAFT) reaches every scorer and changes its scores."""
    plain = _build(name, tiny_backbone, texture_set)
    steered = scorer_class(name)(tiny_backbone, concepts="ignore colour", **EXTRA.get(name, {}))
    if plain.few_shot:
        steered.fit(texture_set["refs"][:3])
    images = [texture_set["bad"], texture_set["good"]]
    a = plain.score_many(images, "texture")
    b = steered.score_many(images, "texture")
    assert not np.allclose(a[0].anomaly_map, b[0].anomaly_map)
    assert steered.describe()["concepts"].startswith("ignore colour")
