"""MuSc on a tiny random ViT: the vlad profile's LNAMD, MSM and RsCIN against brute-force versions, the batch
contract and order invariance (both profiles), the vlad profile's references as unscored batch members, and
localisation of a planted defect by mutual scoring. The paper profile's parity with the reference computation is in
test_musc_paper.py."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from vlad.errors import ConfigError
from vlad.scorers.musc import (
    MuscScorer,
    default_layers,
    lnamd,
    mutual_scores,
    nearest_patch_distances,
    rscin,
)


@pytest.fixture(scope="module", params=["paper", "vlad"])
def scorer(tiny_backbone, request):
    return MuscScorer(tiny_backbone, profile=request.param)


# ---------------------------------------------------------------------- building blocks vs brute force
def _naive_msm(z: np.ndarray, n_scored: int, k: int) -> np.ndarray:
    out = np.zeros((n_scored, z.shape[1]))
    for i in range(n_scored):
        for p in range(z.shape[1]):
            others = [j for j in range(len(z)) if j != i]
            per_image = [min(np.linalg.norm(z[i, p] - z[j, q]) for q in range(z.shape[1])) for j in others]
            out[i, p] = np.mean(sorted(per_image)[:k])
    return out


@pytest.mark.parametrize(("n_images", "n_scored", "fraction", "k"), [(3, 3, 0.3, 1), (6, 4, 0.5, 2), (5, 5, 1.0, 4)])
def test_mutual_scores_match_a_python_loop(n_images, n_scored, fraction, k):
    z = torch.randn(n_images, 4, 2, generator=torch.Generator().manual_seed(n_images))
    got = mutual_scores(z, n_scored, fraction=fraction)
    np.testing.assert_allclose(got.numpy(), _naive_msm(z.double().numpy(), n_scored, k), rtol=1e-5, atol=1e-6)


def test_nearest_patch_distances_are_chunk_independent():
    g = torch.Generator().manual_seed(1)
    query, bank = torch.randn(3, 5, 4, generator=g), torch.randn(4, 6, 4, generator=g)
    whole = nearest_patch_distances(query, bank)
    tiny = nearest_patch_distances(query, bank, chunk_elements=1)  # one image pair per cdist call
    assert whole.shape == (3, 4, 5)
    torch.testing.assert_close(tiny, whole)
    assert whole[1, 2, 3].item() == pytest.approx((query[1, 3] - bank[2]).norm(dim=-1).min().item(), rel=1e-5)


def _patchcore_lnamd(tokens: torch.Tensor, grid: tuple[int, int], r: int) -> torch.Tensor:
    """The reference's route: LayerNorm over (C, H, W), unfold r x r blocks, adaptive_avg_pool1d back to C."""
    b, n, c = tokens.shape
    x = F.layer_norm(tokens.transpose(1, 2).reshape(b, c, *grid), (c, *grid))
    blocks = F.unfold(x, kernel_size=r, padding=(r - 1) // 2).reshape(b, c, r, r, n).permute(0, 4, 1, 2, 3)
    pooled = F.adaptive_avg_pool1d(blocks.reshape(b * n, 1, -1), c).reshape(b, n, c)
    return F.normalize(pooled, dim=-1)


@pytest.mark.parametrize("r", [1, 3, 5])
def test_lnamd_equals_unfold_and_adaptive_pooling(r):
    tokens = torch.randn(2, 5 * 4, 6, generator=torch.Generator().manual_seed(r))
    got = lnamd(tokens, (5, 4), r)
    torch.testing.assert_close(got, _patchcore_lnamd(tokens, (5, 4), r), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(2, 20))


def _naive_rscin(scores: list[float], emb: np.ndarray, k_list: tuple[int, ...]) -> np.ndarray:
    w = emb @ emb.T
    out = []
    for k in k_list:
        s_k = []
        for row in w:
            top = np.argsort(-row)[:k]
            s_k.append(sum(row[j] * scores[j] for j in top) / sum(row[j] for j in top))
        out.append(s_k)
    return np.mean(out, axis=0)


def test_rscin_matches_brute_force_and_the_min_max_form():
    rng = np.random.default_rng(0)
    emb = rng.uniform(0.1, 1.0, (5, 3))  # positive: all similarities > 0, no clamping involved
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    raw = rng.uniform(0.2, 0.9, 5)
    got = rscin(torch.tensor(raw), torch.tensor(emb), (1, 2, 3)).numpy()
    np.testing.assert_allclose(got, _naive_rscin(list(raw), emb, (1, 2, 3)), rtol=1e-10)
    normalised = (raw - raw.min()) / (raw.max() - raw.min())  # the reference smooths min-max normalised scores
    np.testing.assert_allclose(
        _naive_rscin(list(normalised), emb, (1, 2, 3)), (got - raw.min()) / (raw.max() - raw.min()), rtol=1e-10
    )
    np.testing.assert_allclose(rscin(torch.tensor(raw), torch.tensor(emb), (1,)).numpy(), raw)  # k=1: itself
    assert rscin(torch.tensor(raw), torch.tensor(emb), (99,)).numpy() == pytest.approx(
        _naive_rscin(list(raw), emb, (5,))
    )  # k clipped to n


def test_rscin_ties_do_not_depend_on_order():
    emb = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.6, 0.8], [1.0, 0.0]], dtype=torch.float64), dim=-1)
    scores = torch.tensor([0.1, 0.2, 0.9, 0.4], dtype=torch.float64)
    base = rscin(scores, emb, (1, 2))
    for perm in itertools.permutations(range(4)):
        idx = torch.tensor(perm)
        torch.testing.assert_close(rscin(scores[idx], emb[idx], (1, 2)), base[idx])


def test_default_layers_are_the_quarter_points():
    assert default_layers(24) == (6, 12, 18, 24)  # the reference's ViT-L/14 layers
    assert default_layers(12) == (3, 6, 9, 12)
    assert default_layers(4) == (1, 2, 3, 4)
    assert default_layers(2) == (1, 2)


# ---------------------------------------------------------------------- the scorer
def test_result_contract_and_determinism(scorer, texture_set):
    images = [texture_set["refs"][0][:100, :77], texture_set["refs"][1], texture_set["good"][:90], texture_set["bad"]]
    first = scorer.score_many(images, "texture")
    again = scorer.score_many(images, "texture")
    for im, r, r2 in zip(images, first, again, strict=True):
        assert r.anomaly_map.shape == im.shape[:2]
        assert r.anomaly_map.dtype == np.float32
        assert np.isfinite(r.anomaly_map).all()
        assert 0.0 <= r.anomaly_map.min()
        assert r.anomaly_map.max() <= 2.0
        np.testing.assert_array_equal(r.anomaly_map, r2.anomaly_map)
        assert r.pred_score == r2.pred_score
        np.testing.assert_array_equal(r.pred_mask, r.anomaly_map >= r.pixel_threshold)
        assert sum(reg.area for reg in r.regions if reg.source == "threshold") == int(r.pred_mask.sum())
        assert (r.threshold, r.threshold_source, r.scorer) == (first[0].threshold, "batch", "musc")
        assert r.pred_label == (r.pred_score >= r.threshold)
        assert r.meta["batch_size"] == 4
        assert 0.0 <= r.meta["batch_score"] <= 1.0
        assert any("random weights" in w for w in r.warnings)
        assert any("only 3 other images" in w for w in r.warnings)
        assert set(r.timings) >= {"model", "mutual_scoring", "postprocess"}
    assert max(r.meta["batch_score"] for r in first) > 0.0


def test_permuting_the_batch_permutes_the_results(scorer, texture_set):
    images = [*texture_set["refs"][:3], texture_set["good"], texture_set["bad"]]
    base = scorer.score_many(images, "texture")
    perm = [4, 2, 0, 3, 1]
    shuffled = scorer.score_many([images[i] for i in perm], "texture")
    for j, i in enumerate(perm):
        assert shuffled[j].pred_score == pytest.approx(base[i].pred_score, rel=1e-5, abs=1e-6)
        assert shuffled[j].meta["batch_score"] == pytest.approx(base[i].meta["batch_score"], abs=1e-5)
        np.testing.assert_allclose(shuffled[j].anomaly_map, base[i].anomaly_map, rtol=1e-5, atol=1e-6)


def test_batches_too_small_are_refused(scorer, texture_set):
    with pytest.raises(ConfigError, match="at least 2 images of the same product, or fit"):
        scorer.score(texture_set["good"], "texture")
    with pytest.raises(ConfigError, match="at least 2 images"):
        scorer.score_many([texture_set["good"]], "texture")
    with pytest.raises(ConfigError, match="empty batch"):
        scorer.score_many([], "texture")


def test_references_make_a_single_image_scorable(tiny_backbone, texture_set):
    """vlad profile: references are compared-only and scores stay on the map scale, so one calibration serves
    batches of any composition (the paper profile's batch-relative scores: tests/unit/test_musc_paper.py)."""
    one_ref = MuscScorer(tiny_backbone, profile="vlad").fit(texture_set["refs"][:1])
    r = one_ref.score(texture_set["good"], "texture")
    assert r.anomaly_map.shape == (128, 128)
    assert r.meta["batch_size"] == 2
    assert r.threshold_source == "default"
    assert any("cannot be calibrated" in w for w in r.warnings)

    fitted = MuscScorer(tiny_backbone, profile="vlad").fit(texture_set["refs"])
    good, bad = fitted.score(texture_set["good"], "texture"), fitted.score(texture_set["bad"], "texture")
    assert good.threshold_source == bad.threshold_source == "calibrated"
    assert bad.pred_score > good.pred_score
    assert bad.pred_label
    assert not good.pred_label
    assert fitted.thresholds("anything") == fitted.thresholds("texture")  # no text: one calibration for all
    with pytest.raises(ConfigError, match="empty batch"):
        fitted.score_many([], "texture")
    fitted.clear_references()
    with pytest.raises(ConfigError, match="at least 2 images"):
        fitted.score(texture_set["good"], "texture")


def test_references_are_compared_but_not_scored(tiny_backbone, texture_set):
    """vlad profile: a batch scored with references equals the same images scored in a batch that includes the
    references, except for RsCIN, which only smooths over scored images (k_list=(1,) turns it off)."""
    refs, images = texture_set["refs"][:3], [texture_set["good"], texture_set["bad"]]
    with_refs = MuscScorer(tiny_backbone, k_list=(1,), profile="vlad").fit(refs).score_many(images, "texture")
    together = MuscScorer(tiny_backbone, k_list=(1,), profile="vlad").score_many(images + refs, "texture")
    assert len(with_refs) == 2
    assert with_refs[0].meta["batch_size"] == 5
    for a, b in zip(with_refs, together[:2], strict=True):
        np.testing.assert_allclose(a.anomaly_map, b.anomaly_map, rtol=1e-5, atol=1e-6)
        assert a.pred_score == pytest.approx(b.pred_score, rel=1e-5)


@pytest.mark.parametrize("profile", ["paper", "vlad"])
def test_mutual_scoring_localises_a_planted_defect(tiny_backbone, texture_set, profile):
    """Geometry check (patch grid -> pixels) and the MuSc premise: the one odd image in a batch of normal ones stands
    out. With random weights only appearance differences can be found, and a planted texture patch is one."""
    results = MuscScorer(tiny_backbone, profile=profile).score_many([*texture_set["refs"][:5], texture_set["bad"]], "t")
    scores = [r.pred_score for r in results]
    assert int(np.argmax(scores)) == 5
    assert results[5].meta["batch_score"] == max(r.meta["batch_score"] for r in results)
    amap, mask = results[5].anomaly_map, texture_set["mask"]
    assert roc_auc_score(mask.ravel(), amap.ravel()) > 0.85
    if profile == "vlad":  # align_corners=True (paper) stretches the patch-centre lattice over the whole image:
        assert mask[np.unravel_index(amap.argmax(), mask.shape)]  # up to half a patch off near the borders


def test_configuration_is_checked_and_described(tiny_backbone):
    assert MuscScorer(tiny_backbone, layers=[-1, 2]).layers == (2, 4)
    with pytest.raises(ConfigError, match=r"layers \(5,\) invalid: random:tiny has layers 1..4"):
        MuscScorer(tiny_backbone, layers=[5])
    with pytest.raises(ConfigError, match=r"r_list must hold odd positive .* got \(1, 2\)"):
        MuscScorer(tiny_backbone, r_list=(1, 2))
    with pytest.raises(ConfigError, match=r"k_list must hold positive .* got \(0,\)"):
        MuscScorer(tiny_backbone, k_list=(0,))
    with pytest.raises(ConfigError, match=r"fraction must be in \(0, 1\], got 0"):
        MuscScorer(tiny_backbone, fraction=0)
    with pytest.raises(ConfigError, match=r"chunk_elements must be >= 1, got 0"):
        MuscScorer(tiny_backbone, chunk_elements=0)
    d = MuscScorer(tiny_backbone, r_list=(3,)).describe()
    assert (d["scorer"], d["layers"], d["r_list"], d["k_list"]) == ("musc", [1, 2, 3, 4], [3], [1, 2, 3])
    assert (d["profile"], d["dataset"], d["activation"]) == ("paper", "mvtec", "gelu")
    assert math.isclose(d["fraction"], 0.3)
    assert "activation" not in MuscScorer(tiny_backbone, profile="vlad").describe()


@pytest.mark.parametrize("profile", ["paper", "vlad"])
def test_zero_shot_threshold_is_relative_to_the_batch(tiny_backbone, texture_set, profile):
    """A mixed batch (mostly normal, one planted defect): the batch-relative threshold flags a minority, the defect
    among them. A fixed threshold means nothing on batch-relative scores: here 0.5 misses the defect in the vlad
    profile (its raw distances sit below 0.5 on this tiny model)."""
    from vlad.thresholds import batch_relative

    scorer = MuscScorer(tiny_backbone, profile=profile)
    images = [*texture_set["refs"], texture_set["good"], texture_set["bad"]]
    results = scorer.score_many(images, "texture")
    flagged = [r.pred_label for r in results]
    assert flagged[-1]  # the planted defect
    assert sum(flagged) <= len(images) // 2
    scores = [r.pred_score for r in results]
    expected = batch_relative(scores, [0.0] * len(scores), min_spread=0.01 * scorer.default_scale)
    assert results[0].threshold == pytest.approx(expected.image)
    assert {r.threshold_source for r in results} == {"batch"}
    fixed = MuscScorer(tiny_backbone, profile=profile, threshold=0.5).score_many(images, "texture")
    assert {r.threshold_source for r in fixed} == {"user"}
    if profile == "vlad":
        assert not fixed[-1].pred_label
