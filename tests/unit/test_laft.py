"""LAFT: covariance basis vs pairwise-difference PCA, k selection, guide/ignore algebra, the concept parser, the
transform built from a tiny random text tower, and the few-shot kNN scorer on a synthetic texture."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from vlad.errors import ConfigError
from vlad.laft import (
    Basis,
    ConceptTransform,
    build_transform,
    concept_basis,
    coordinates,
    guide,
    ignore,
    load_vocabulary,
    merge_bases,
    parse_concepts,
)
from vlad.scorers.laft import LaftScorer, knn_distance


def _embeddings(n: int, d: int, seed: int) -> torch.Tensor:
    """(n, d) float64 with a spread-out spectrum (well separated principal directions)."""
    g = torch.Generator().manual_seed(seed)
    rotation, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    scales = torch.linspace(3.0, 0.3, d, dtype=torch.float64)
    return (torch.randn(n, d, generator=g, dtype=torch.float64) * scales) @ rotation + 0.5


def _pairwise_pca(t: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """LAFT's recipe, literally: all pairwise differences, sign-aligned to the first, uncentred SVD."""
    i, j = torch.triu_indices(t.shape[0], t.shape[0], offset=1)
    diffs = t[i] - t[j]
    diffs = torch.where((diffs @ diffs[0] < 0)[:, None], -diffs, diffs)
    _, s, vh = torch.linalg.svd(diffs, full_matrices=False)
    return vh[:k], (s**2 / (s**2).sum())[:k]


def _principal_cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(a.double() @ b.double().T)


# ------------------------------------------------------------------------------------------------ basis
def test_covariance_basis_spans_the_pairwise_difference_pca_subspace():
    t = _embeddings(12, 32, seed=0)
    basis = concept_basis(t, k=4)
    reference, ratios = _pairwise_pca(t, 4)
    assert basis.vectors.shape == (4, 32)
    assert basis.vectors.dtype == torch.float32
    torch.testing.assert_close(
        _principal_cosines(basis.vectors, reference), torch.ones(4, dtype=torch.float64), atol=1e-4, rtol=0
    )
    torch.testing.assert_close(basis.explained.double(), ratios, atol=1e-5, rtol=0)
    torch.testing.assert_close(basis.vectors @ basis.vectors.T, torch.eye(4), atol=1e-5, rtol=0)
    i, j = torch.triu_indices(12, 12, offset=1)
    torch.manual_seed(0)
    _, _, v = torch.pca_lowrank((t[i] - t[j]).float(), q=32, center=False, niter=5)
    assert _principal_cosines(basis.vectors, v[:, :4].T).min() > 0.99


def test_explained_variance_picks_the_dominant_subspace():
    g = torch.Generator().manual_seed(1)
    uv, _ = torch.linalg.qr(torch.randn(32, 2, generator=g, dtype=torch.float64))
    coeffs = torch.randn(20, 2, generator=g, dtype=torch.float64) * torch.tensor([3.0, 2.0], dtype=torch.float64)
    t = coeffs @ uv.T + 0.01 * torch.randn(20, 32, generator=g, dtype=torch.float64)
    basis = concept_basis(t, explained_variance=0.9, concepts=["demo"])
    assert basis.k == 2
    assert basis.concepts == ("demo",)
    assert basis.prompts == 20
    assert basis.total_explained > 0.99
    assert _principal_cosines(basis.vectors, uv.T).min() > 0.999
    assert concept_basis(t, explained_variance=0.5).k == 1
    assert concept_basis(t, explained_variance=1.0).k == 19  # everything: the rank of 20 centred prototypes


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k": 0}, "k must be between 1 and 5"),
        ({"k": 6}, "k must be between 1 and 5"),
        ({"explained_variance": 0.0}, r"explained_variance must be in \(0, 1\]"),
        ({"explained_variance": 1.5}, r"explained_variance must be in \(0, 1\]"),
    ],
)
def test_k_bounds(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        concept_basis(_embeddings(6, 16, seed=2), **kwargs)


def test_degenerate_prompt_sets_are_rejected():
    with pytest.raises(ConfigError, match="at least 2 prototypes"):
        concept_basis(torch.ones(1, 8))
    with pytest.raises(ConfigError, match="identical: no variance"):
        concept_basis(torch.ones(5, 8))
    with pytest.raises(ConfigError, match="more directions than carry variance"):
        concept_basis(torch.cat([torch.zeros(3, 8), torch.ones(3, 8)]), k=2)  # two distinct prototypes only


def test_prompt_groups_are_averaged_into_prototypes():
    groups = _embeddings(15, 16, seed=3).reshape(5, 3, 16)
    means = groups.mean(1)
    a = concept_basis(groups, k=3)
    b = concept_basis(list(groups), k=3)
    c = concept_basis(means, k=3)
    assert a.prompts == b.prompts == 15
    assert c.prompts == 5
    torch.testing.assert_close(a.vectors, c.vectors)
    torch.testing.assert_close(b.vectors, c.vectors)


# ------------------------------------------------------------------------------------------------ transforms
@pytest.fixture(scope="module")
def basis() -> Basis:
    return concept_basis(_embeddings(10, 32, seed=4), k=3, concepts=["colour"])


def test_guide_and_ignore_algebra(basis):
    x = torch.randn(2, 7, 32)
    g, i = guide(x, basis), ignore(x, basis)
    assert g.shape == i.shape == (2, 7, 32)
    torch.testing.assert_close(g + i, x)
    torch.testing.assert_close(coordinates(i, basis), torch.zeros(2, 7, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(guide(g, basis), g, atol=1e-5, rtol=0)
    torch.testing.assert_close(ignore(i, basis), i, atol=1e-5, rtol=0)
    assert coordinates(x, basis).shape == (2, 7, 3)
    torch.testing.assert_close(coordinates(x, basis).norm(dim=-1), g.norm(dim=-1))
    torch.testing.assert_close(ignore(x, basis, normalize=True).norm(dim=-1), torch.ones(2, 7))
    assert not torch.allclose(i, x)


def test_concept_transform_modes_and_description(basis):
    x = torch.randn(4, 32)
    torch.testing.assert_close(ConceptTransform("ignore", basis)(x), ignore(x, basis))
    torch.testing.assert_close(ConceptTransform("guide", basis, normalize=True)(x), guide(x, basis, normalize=True))
    pct = round(100 * basis.total_explained)
    assert ConceptTransform("ignore", basis).describe() == f"ignore colour (k=3, {pct}% of variance)"
    with pytest.raises(ConfigError, match="mode must be one of guide, ignore, got 'keep'"):
        ConceptTransform("keep", basis)


def test_merge_is_the_union_of_subspaces_and_exclude_removes_one():
    a = concept_basis(_embeddings(6, 32, seed=5), k=3, concepts=["colour"])
    b = concept_basis(_embeddings(6, 32, seed=6), k=2, concepts=["lighting"])
    union = merge_bases([a, b])
    assert union.k == 5
    assert union.concepts == ("colour", "lighting")
    for part in (a, b):  # each part lies inside the union
        torch.testing.assert_close(guide(part.vectors, union), part.vectors, atol=1e-5, rtol=0)
    assert union.total_explained == pytest.approx((a.total_explained + b.total_explained) / 2, abs=1e-5)
    rest = merge_bases([b], exclude=a)
    assert rest.k == 2
    torch.testing.assert_close(coordinates(rest.vectors, a), torch.zeros(2, 3), atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="nothing of \\['colour'\\] is left"):
        merge_bases([a], exclude=union)


# ------------------------------------------------------------------------------------------------ parsing
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("ignore colour", [("ignore", "colour")]),
        ("ignore color and lighting", [("ignore", "colour"), ("ignore", "lighting")]),
        ("focus on cracks", [("guide", "cracks")]),
        ("guide: texture", [("guide", "texture")]),
        (
            "Ignore colour variations, but focus on scratches and dents.",
            [("ignore", "colour"), ("guide", "scratches"), ("guide", "dents")],
        ),
        ("ignore gray levels", [("ignore", "lighting")]),
        ("ignore grey levels", [("ignore", "lighting")]),
        ("don't care about the background; only care about rust", [("ignore", "background"), ("guide", "corrosion")]),
        (
            "disregard glare, rotation and position",
            [("ignore", "reflections"), ("ignore", "orientation"), ("ignore", "position")],
        ),
        ("look for missing parts", [("guide", "missing_parts")]),
        ("ignore colour, ignore colours", [("ignore", "colour")]),
        ("", []),
        (None, []),
    ],
)
def test_parse_concepts(text, expected):
    assert parse_concepts(text) == expected


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (
            "ignore colur",
            r"unknown concept 'colur' in 'ignore colur'; did you mean 'colour'\? known concepts: background",
        ),
        ("focus on craks", r"did you mean 'cracks'\?"),
        ("ignore zebra", r"^unknown concept 'zebra' in 'ignore zebra'; known concepts: .*texture$"),
        ("colour", r"does not say what to do with 'colour': write 'ignore colour' or 'focus on colour'"),
        ("ignore cracks, focus on cracks", "both ignores and focuses on 'cracks'"),
        ("ignore the", "names no concept"),
    ],
)
def test_parse_concepts_errors(text, match):
    with pytest.raises(ConfigError, match=match) as info:
        parse_concepts(text)
    assert "\n" not in str(info.value)


def test_vocabulary_is_generic_and_well_formed():
    vocab = load_vocabulary()
    nuisances = {"colour", "lighting", "texture", "orientation", "size", "position", "background", "reflections"}
    defects = {"cracks", "scratches", "dents", "holes", "contamination", "missing_parts", "bends", "corrosion"}
    assert {n for n, c in vocab.items() if c.kind == "nuisance"} == nuisances
    assert {n for n, c in vocab.items() if c.kind == "defect"} == defects
    prompts = vocab["colour"].prompts("bottle")
    assert len(prompts) == len(vocab["colour"].values)
    assert "a photo of a red bottle." in prompts[0]
    text = " ".join(p for c in vocab.values() for group in c.prompts() for p in group)
    for leaked in ("large breakage", "flipped orientation", "faulty imprint", "broken_large"):  # LAFT industrial3
        assert leaked not in text


def test_parsing_does_not_import_torch():
    code = (
        "import sys, json, vlad.laft; vlad.laft.parse_concepts('ignore colour'); "
        "print(json.dumps('torch' in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) is False


# ------------------------------------------------------------------------------------------------ transforms from text
def test_build_transform_from_words(tiny_backbone):
    assert build_transform(tiny_backbone, None) is None
    assert build_transform(tiny_backbone, "  ") is None
    colour = build_transform(tiny_backbone, "ignore colour")
    assert colour.mode == "ignore"
    assert colour.basis.concepts == ("colour",)
    assert colour.basis.dim == 32
    assert colour.basis.total_explained >= 0.9
    assert colour.describe().startswith("ignore colour (k=")
    both = build_transform(tiny_backbone, "ignore color and lighting")
    assert both.basis.concepts == ("colour", "lighting")
    assert both.basis.k > colour.basis.k
    mixed = build_transform(tiny_backbone, "ignore colour; focus on cracks")
    assert mixed.mode == "guide"
    assert mixed.ignored == ("colour",)
    torch.testing.assert_close(
        coordinates(mixed.basis.vectors, colour.basis), torch.zeros(mixed.basis.k, colour.basis.k), atol=1e-5, rtol=0
    )
    assert mixed.describe().startswith("focus on cracks, with colour projected out (k=")
    assert build_transform(tiny_backbone, "ignore colour", k=2).basis.k == 2
    assert build_transform(tiny_backbone, "ignore colour", k=99).basis.k == len(load_vocabulary()["colour"].values) - 1


# ------------------------------------------------------------------------------------------------ scorer
@pytest.fixture(scope="module")
def fitted(tiny_backbone, texture_set):
    return LaftScorer(tiny_backbone).fit(texture_set["refs"])


def test_knn_distance_matches_brute_force():
    g = torch.Generator().manual_seed(8)
    feats = torch.nn.functional.normalize(torch.randn(2, 5, 8, generator=g), dim=-1)
    memory = torch.nn.functional.normalize(torch.randn(7, 8, generator=g), dim=-1)
    got = knn_distance(feats, memory, 3)
    for b in range(2):
        for n in range(5):
            dists = sorted(1 - float(feats[b, n] @ m) for m in memory)
            assert got[b, n].item() == pytest.approx(np.mean(dists[:3]), abs=1e-6)
    torch.testing.assert_close(knn_distance(feats, memory, 100), knn_distance(feats, memory, 7))


def test_needs_references(tiny_backbone, texture_set):
    scorer = LaftScorer(tiny_backbone, concepts="ignore colour")
    with pytest.raises(ConfigError, match=r"laft needs normal reference images .*--refs"):
        scorer.score(texture_set["good"], "texture")


def test_result_contract(fitted, texture_set):
    image = texture_set["bad"][:100, :77]
    r1, r2 = fitted.score(image, "texture"), fitted.score(image, "texture")
    assert r1.anomaly_map.shape == (100, 77)
    assert r1.anomaly_map.dtype == np.float32
    assert np.isfinite(r1.anomaly_map).all()
    assert r1.anomaly_map.min() >= 0.0
    np.testing.assert_array_equal(r1.anomaly_map, r2.anomaly_map)
    assert r1.pred_score == r2.pred_score
    assert 0.0 <= r1.pred_score <= 2.0
    assert r1.threshold_source == "calibrated"
    assert r1.scorer == "laft"
    assert any("random weights" in w for w in r1.warnings)
    assert fitted.transform is None
    assert fitted.describe()["transform"] == "none (plain kNN)"


def test_few_shot_localises_a_planted_defect(fitted, texture_set):
    result = fitted.score(texture_set["bad"], "texture")
    mask = texture_set["mask"]
    assert roc_auc_score(mask.ravel(), result.anomaly_map.ravel()) > 0.85
    assert mask[np.unravel_index(result.anomaly_map.argmax(), mask.shape)]
    good = fitted.score(texture_set["good"], "texture")
    assert result.anomaly_map.max() > good.anomaly_map.max()


def test_ignoring_a_concept_changes_features_and_scores(tiny_backbone, fitted, texture_set):
    scorer = LaftScorer(tiny_backbone, concepts="ignore colour").fit(texture_set["refs"])
    assert isinstance(scorer.transform, ConceptTransform)
    assert scorer.describe()["transform"].startswith("ignore colour (k=")
    memory = scorer._memory(scorer._references, torch.ones(6, dtype=torch.bool))
    torch.testing.assert_close(memory["patches"].norm(dim=-1), torch.ones(memory["patches"].shape[0]))
    residual = coordinates(memory["patches"], scorer.transform.basis).abs().max()
    assert residual < 1e-5  # the memory holds transformed features
    plain, steered = fitted.score(texture_set["bad"], "texture"), scorer.score(texture_set["bad"], "texture")
    assert not np.allclose(plain.anomaly_map, steered.anomaly_map, atol=1e-4)
    assert abs(plain.pred_score - steered.pred_score) > 1e-6


def test_single_reference_falls_back_to_the_documented_default(tiny_backbone, texture_set):
    r = LaftScorer(tiny_backbone).fit(texture_set["refs"][:1]).score(texture_set["good"], "texture")
    assert (r.threshold, r.threshold_source, r.score_scale) == (0.25, "default", 0.5)
    assert any("cannot be calibrated" in w for w in r.warnings)


def test_image_score_options(tiny_backbone, fitted, texture_set):
    patches = LaftScorer(tiny_backbone, image_score="patches").fit(texture_set["refs"])
    r = patches.score(texture_set["bad"], "texture")
    feats = patches._extract_many([Image.fromarray(texture_set["bad"])])
    _, grid = patches._score(feats, "texture", patches._memory(patches._references, torch.ones(6, dtype=torch.bool)))
    assert r.pred_score == pytest.approx(float(grid.max()), abs=1e-6)
    mean = LaftScorer(tiny_backbone, image_score="mean").fit(texture_set["refs"]).score(texture_set["bad"], "texture")
    plain = LaftScorer(tiny_backbone, image_score="global").fit(texture_set["refs"])
    plain = plain.score(texture_set["bad"], "texture")
    assert mean.pred_score == pytest.approx((plain.pred_score + r.pred_score) / 2, abs=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"image_score": "max"}, "image_score must be one of global, patches, mean, got 'max'"),
        ({"patch_knn": 0}, "patch_knn must be an integer >= 1, got 0"),
        ({"image_knn": 2.5}, "image_knn must be an integer >= 1, got 2.5"),
        ({"concepts": ["ignore colour"]}, "concepts must be a string"),
        ({"concepts": "ignore colur"}, "did you mean 'colour'"),
    ],
)
def test_bad_config(tiny_backbone, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        LaftScorer(tiny_backbone, **kwargs)


def test_profile_picks_the_image_score(tiny_backbone):
    assert LaftScorer(tiny_backbone).image_score == "global"  # paper: LAFT-AD's global kNN
    assert LaftScorer(tiny_backbone, profile="vlad").image_score == "mean"
    assert LaftScorer(tiny_backbone, profile="vlad", image_score="patches").image_score == "patches"
