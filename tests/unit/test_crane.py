"""Crane / Crane+ on a tiny random ViT: defaults, local-to-global score, few-shot localisation, D-Attn, prompts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from vlad.errors import ConfigError
from vlad.scorers.crane import CraneScorer, dense_image_size


@pytest.fixture(scope="module")
def crane(tiny_backbone):
    return CraneScorer(tiny_backbone, profile="vlad")


def test_defaults(crane, tiny_backbone):
    assert crane.image_size == 96 == dense_image_size(tiny_backbone)  # 8x8 grid scaled by 37/24 -> 12x12
    assert crane.layers == (1, 2, 3, 4)
    assert crane.first_refined == 1
    assert crane.sigma == pytest.approx(4 * 96 / 518)
    assert crane.pos_interpolation == "bicubic"
    assert crane.soft_mean


def test_paper_profile_defaults(tiny_backbone):
    paper = CraneScorer(tiny_backbone)
    assert paper.profile == "paper"
    assert not paper.profile_explicit
    assert paper.layers == (4,)
    assert paper.first_refined == 1
    assert paper.sigma == 4.0
    assert paper.pos_interpolation == "bilinear"
    assert paper.soft_mean
    assert not CraneScorer(tiny_backbone, dattn="random:dinov2-tiny").soft_mean  # Crane+: softmax of mean logits
    assert any("import-checkpoint --format crane" in w for w in paper.warnings())
    with pytest.raises(ConfigError, match="unknown profile 'papers'; allowed: paper, vlad"):
        CraneScorer(tiny_backbone, profile="papers")


def test_vit_l_geometry_is_518():
    class Fake:
        native_size, patch_size = 336, 14

    assert dense_image_size(Fake()) == 518


def test_local_to_global_image_score_formula(crane):
    torch.manual_seed(0)
    d = crane.backbone.embed_dim
    sets = [F.normalize(torch.randn(1, 6, d), dim=-1) for _ in crane.layers]
    feats = {f"layer{layer}": s for layer, s in zip(crane.layers, sets, strict=True)}
    feats["global"] = F.normalize(torch.randn(1, d), dim=-1)
    text = F.normalize(torch.randn(1, 2, d), dim=-1)
    logits = crane.patch_logits(feats, text)
    got = crane._image_score(feats, text, logits, torch.zeros(1, 4, 4))
    w = torch.softmax(torch.stack([s[0] @ text[0].T / 0.07 for s in sets]).mean(0), dim=-1)[:, 1]
    c = F.normalize((w[:, None] * torch.stack(sets)[:, 0].mean(0)).sum(0), dim=-1)
    g = F.normalize(0.5 * c + 0.5 * feats["global"][0], dim=-1)
    expected = torch.softmax(g @ text[0].T / 0.07, dim=-1)[1]
    assert got.item() == pytest.approx(expected.item(), abs=1e-6)


def test_zero_shot_contract(crane, texture_set):
    image = texture_set["bad"][:90, :117]
    r = crane.score(image, "texture")
    assert r.anomaly_map.shape == (90, 117)
    assert np.isfinite(r.anomaly_map).all()
    assert 0 < r.pred_score < 1
    assert r.scorer == "crane"
    np.testing.assert_array_equal(r.anomaly_map, crane.score(image, "texture").anomaly_map)
    assert sum(reg.area for reg in r.regions if reg.source == "threshold") == int(r.pred_mask.sum())


def test_few_shot_localises_a_planted_defect(tiny_backbone, texture_set):
    scorer = CraneScorer(tiny_backbone, profile="vlad").fit(texture_set["refs"])
    result = scorer.score(texture_set["bad"], "texture")
    mask = texture_set["mask"]
    assert roc_auc_score(mask.ravel(), result.anomaly_map.ravel()) > 0.85
    assert mask[np.unravel_index(result.anomaly_map.argmax(), mask.shape)]
    good = scorer.score(texture_set["good"], "texture")
    assert result.pred_score > good.pred_score
    assert result.threshold_source == "calibrated"


def test_crane_plus_dattn_adds_a_token_set(tiny_backbone, texture_set):
    plus = CraneScorer(tiny_backbone, dattn="random:dinov2-tiny", layers=(4,), soft_mean=False)
    x = tiny_backbone.preprocess(
        [__import__("PIL.Image", fromlist=["Image"]).fromarray(texture_set["bad"])], plus.image_size
    )
    feats = plus._extract(x)
    assert feats["dattn"].shape == feats["layer4"].shape
    assert not torch.allclose(feats["dattn"], feats["layer4"], atol=1e-3)
    r = plus.score(texture_set["bad"], "texture")
    assert r.anomaly_map.shape == (128, 128)
    assert np.isfinite(r.anomaly_map).all()


def test_learned_text_features_replace_prompts(tiny_backbone, texture_set):
    scorer = CraneScorer(tiny_backbone)
    before = scorer.score(texture_set["bad"], "texture").pred_score
    torch.manual_seed(3)
    scorer.set_text_features(torch.randn(2, tiny_backbone.embed_dim))
    after = scorer.score(texture_set["bad"], "texture").pred_score
    assert after != pytest.approx(before)
    with pytest.raises(ConfigError, match=r"text features must be \(2, 32\)"):
        scorer.set_text_features(torch.randn(3, 32))
    scorer.set_text_features(None)
    assert scorer.score(texture_set["bad"], "texture").pred_score == pytest.approx(before)


def test_object_agnostic_prompts_ignore_the_name(tiny_backbone, texture_set):
    scorer = CraneScorer(tiny_backbone, object_agnostic=True)
    a = scorer.score(texture_set["good"], "bottle").pred_score
    b = scorer.score(texture_set["good"], "screw").pred_score
    assert a == pytest.approx(b)


def test_bad_options(tiny_backbone):
    with pytest.raises(ConfigError, match="unknown refined attention"):
        CraneScorer(tiny_backbone, attention="zz")
