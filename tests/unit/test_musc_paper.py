"""MuSc's paper profile against an independent, loop-based re-implementation of the reference computation
(xrli-U/MuSc: models/musc.py, models/modules/_LNAMD.py, _MSM.py, _RsCIN.py, its bundled open_clip), on tiny random
ViTs. The reference here uses none of vlad's helpers: tokens come from open_clip's own forward pass (forward hooks on
its blocks), the preprocessing is torchvision's, LNAMD / MSM / RsCIN are plain loops in float64 and the upsampling is
written out by hand.

The official code itself needs 12 or more blocks (it reads the attention of block 12), so it cannot run on these
4-block towers; docs/methods.md reports its parity run on a 12-block one."""

from __future__ import annotations

import copy

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T

from vlad.backbones.clip import ClipBackbone
from vlad.errors import ConfigError
from vlad.scorers.musc import PAPER_BATCH_SIZE, MuscScorer

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
TOL = 1e-5


# ---------------------------------------------------------------------- the independent reference
def _reference_model(backbone: ClipBackbone, size: int, exact_gelu: bool) -> torch.nn.Module:
    """A copy of the backbone's open_clip model as the reference builds it for ``size``: positional embedding
    re-gridded by plain bicubic interpolation (its resize_pos_embed has no antialias), MLPs with nn.GELU when the
    reference rebuilds the tower from the JSON config."""
    model = copy.deepcopy(backbone.model).eval()
    visual = model.visual
    patch = visual.conv1.kernel_size[0]
    pos = visual.positional_embedding.data
    old, new = int(round((pos.shape[0] - 1) ** 0.5)), size // patch
    if new != old:
        grid = pos[1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
        visual.positional_embedding = torch.nn.Parameter(torch.cat([pos[:1], grid.permute(0, 2, 3, 1).flatten(0, 2)]))
    if exact_gelu:
        for block in visual.transformer.resblocks:
            block.mlp.gelu = torch.nn.GELU()
    return model


def _reference_features(model, images, size, layers):
    """Normalised global embeddings and raw block outputs (class token dropped), via forward hooks."""
    tf = T.Compose(
        [
            T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC),
            T.ToTensor(),
            T.Normalize(OPENAI_MEAN, OPENAI_STD),
        ]
    )
    x = torch.stack([tf(Image.fromarray(im).convert("RGB")) for im in images])
    blocks = model.visual.transformer.resblocks
    batch_first = getattr(model.visual.transformer, "batch_first", True)
    taps = {}
    hooks = [
        blocks[layer - 1].register_forward_hook(lambda _m, _i, out, layer=layer: taps.__setitem__(layer, out))
        for layer in layers
    ]
    try:
        with torch.no_grad():
            g = model.encode_image(x)
    finally:
        for h in hooks:
            h.remove()
    g = (g / g.norm(dim=-1, keepdim=True)).double().numpy()
    tokens = {k: (v if batch_first else v.transpose(0, 1))[:, 1:].double().numpy() for k, v in taps.items()}
    return g, tokens


def _lnamd(tokens: np.ndarray, g: int, r: int) -> np.ndarray:
    """LayerNorm over every value of an image's token grid, r x r zero-padded window means (padding counted)."""
    b, _, c = tokens.shape
    x = tokens.reshape(b, g, g, c)
    mu = x.mean(axis=(1, 2, 3), keepdims=True)
    var = x.var(axis=(1, 2, 3), keepdims=True)
    x = (x - mu) / np.sqrt(var + 1e-5)
    pad = r // 2
    xp = np.zeros((b, g + 2 * pad, g + 2 * pad, c))
    xp[:, pad : pad + g, pad : pad + g] = x
    out = np.zeros_like(x)
    for i in range(g):
        for j in range(g):
            out[:, i, j] = xp[:, i : i + r, j : j + r].sum(axis=(1, 2)) / (r * r)
    out = out.reshape(b, g * g, c)
    return out / np.linalg.norm(out, axis=-1, keepdims=True)


def _msm(z: np.ndarray) -> np.ndarray:
    """Each patch: nearest-patch distance to every other image, mean of the int(0.3 (N - 1)) smallest (>= 1)."""
    n, p, _ = z.shape
    k = max(1, int((n - 1) * 0.3))
    out = np.zeros((n, p))
    for i in range(n):
        per_image = []
        for j in range(n):
            if j != i:
                d = np.sqrt(((z[i][:, None, :] - z[j][None, :, :]) ** 2).sum(-1))
                per_image.append(d.min(axis=1))
        out[i] = np.sort(np.stack(per_image, axis=1), axis=1)[:, :k].mean(axis=1)
    return out


def _upsample_align_corners(grid: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bilinear, corner pixels on the corner patch centres (align_corners=True), written out."""

    def axis(g, n):
        src = np.arange(n) * (g - 1) / (n - 1)
        i0 = np.minimum(np.floor(src).astype(int), g - 2)
        return i0, src - i0

    (r0, tr), (c0, tc) = axis(grid.shape[0], h), axis(grid.shape[1], w)
    rows = grid[r0] * (1 - tr)[:, None] + grid[r0 + 1] * tr[:, None]
    return rows[:, c0] * (1 - tc)[None, :] + rows[:, c0 + 1] * tc[None, :]


def _rscin(maxima: np.ndarray, g: np.ndarray, k_list) -> np.ndarray:
    s = (maxima - maxima.min()) / (maxima.max() - maxima.min())
    w = g @ g.T
    out = []
    for k in k_list:
        s_k = []
        for row in w:
            top = np.argsort(-row)[:k]
            s_k.append((row[top] * s[top]).sum() / row[top].sum())
        out.append(s_k)
    return np.mean(out, axis=0)


def reference_musc(backbone, images, size, layers, exact_gelu, r_list=(1, 3, 5), k_list=(1, 2, 3), out=None):
    """(maps (N, size, size), image scores (N,)) as the reference computes them; with ``out`` = (h, w) the maps are
    the same patch grids upsampled to h x w instead (the score still comes from the size x size map)."""
    model = _reference_model(backbone, size, exact_gelu)
    g_emb, tokens = _reference_features(model, images, size, layers)
    grid = size // backbone.patch_size
    per_r = [np.mean([_msm(_lnamd(tokens[layer], grid, r)) for layer in layers], axis=0) for r in r_list]
    patch_maps = np.mean(per_r, axis=0)
    maps = np.stack([_upsample_align_corners(m.reshape(grid, grid), size, size) for m in patch_maps])
    scores = _rscin(maps.reshape(len(maps), -1).max(axis=1), g_emb, k_list)
    if out is not None:
        maps = np.stack([_upsample_align_corners(m.reshape(grid, grid), *out) for m in patch_maps])
    return maps, scores


def _square(images, size):
    return [np.asarray(Image.fromarray(im).resize((size, size), Image.Resampling.BICUBIC)) for im in images]


@pytest.fixture(scope="module")
def six(texture_set):
    return [*texture_set["refs"][:4], texture_set["good"], texture_set["bad"]]


# ---------------------------------------------------------------------- parity
@pytest.mark.parametrize("size", [64, 72])  # native (no re-grid) and re-gridded positions
def test_paper_profile_equals_the_reference_computation(tiny_backbone, six, size):
    images = _square(six, size)
    scorer = MuscScorer(tiny_backbone, profile="paper", image_size=size)
    assert scorer.layers == (1, 2, 3, 4)
    assert scorer.describe()["activation"] == "gelu"
    results = scorer.score_many(images, "texture")
    maps, scores = reference_musc(tiny_backbone, images, size, scorer.layers, exact_gelu=True)
    got_maps = np.stack([r.anomaly_map for r in results])
    assert got_maps.shape == (6, size, size)
    np.testing.assert_allclose(got_maps, maps, rtol=0, atol=TOL)
    np.testing.assert_allclose([r.pred_score for r in results], scores, rtol=0, atol=TOL)
    assert [r.meta["batch_score"] for r in results] == pytest.approx(scores, abs=TOL)
    assert max(r.pred_score for r in results) <= 1.0 + TOL  # min-max normalised, then smoothed
    # the image score is the maximum of the input-size map before RsCIN: with k=1 it is the min-max of the maxima
    k1 = MuscScorer(tiny_backbone, profile="paper", image_size=size, k_list=(1,)).score_many(images, "texture")
    peaks = got_maps.reshape(6, -1).max(axis=1)
    np.testing.assert_allclose([r.pred_score for r in k1], (peaks - peaks.min()) / np.ptp(peaks), atol=TOL)


@pytest.fixture(scope="module")
def quickgelu_openai():
    """A tiny tower with QuickGELU MLPs whose spec names OpenAI weights, as ViT-L-14-336-quickgelu@openai does."""
    from vlad.backbones import register_tiny_config

    register_tiny_config()
    torch.manual_seed(1)
    model = open_clip.create_model("vlad-tiny", force_quick_gelu=True, device="cpu").eval()
    return ClipBackbone(model=model, tokenizer=None, spec="openclip:vlad-tiny@openai")


def test_openai_weights_away_from_native_size_run_exact_gelu_without_touching_the_backbone(quickgelu_openai, six):
    bb = quickgelu_openai
    assert type(bb.model.visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    x = bb.preprocess([Image.fromarray(six[0])], 72)
    before = bb.forward_visual(x, layers=(2,)).patch_tokens[2]

    images = _square(six, 72)
    scorer = MuscScorer(bb, profile="paper", image_size=72)
    assert scorer.describe()["activation"] == "gelu"
    results = scorer.score_many(images, "texture")
    maps, scores = reference_musc(bb, images, 72, scorer.layers, exact_gelu=True)
    np.testing.assert_allclose(np.stack([r.anomaly_map for r in results]), maps, rtol=0, atol=TOL)
    np.testing.assert_allclose([r.pred_score for r in results], scores, rtol=0, atol=TOL)
    quick, _ = reference_musc(bb, images, 72, scorer.layers, exact_gelu=False)
    assert np.abs(quick - maps).max() > 10 * TOL  # the activation matters: the check above tells them apart

    # the shared backbone is untouched: same modules, same tokens
    assert type(bb.model.visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    torch.testing.assert_close(bb.forward_visual(x, layers=(2,)).patch_tokens[2], before, rtol=0, atol=0)

    native = MuscScorer(bb, profile="paper", image_size=64)
    assert native.describe()["activation"] == "quickgelu"  # the reference's load_openai_model at 64 px
    images = _square(six, 64)
    maps, scores = reference_musc(bb, images, 64, native.layers, exact_gelu=False)
    results = native.score_many(images, "texture")
    np.testing.assert_allclose(np.stack([r.anomaly_map for r in results]), maps, rtol=0, atol=TOL)
    np.testing.assert_allclose([r.pred_score for r in results], scores, rtol=0, atol=TOL)


def test_maps_at_other_input_sizes_sample_the_same_surface(tiny_backbone, six):
    """The image score comes from the image_size map; the result map is the same bilinear surface at the input's
    pixels, here a 64 x 64 input whose map is upsampled from the patch grid to 100 x 80 directly."""
    scorer = MuscScorer(tiny_backbone, profile="paper")
    square = _square(six, 64)
    tall = [np.asarray(Image.fromarray(im).resize((80, 100), Image.Resampling.BICUBIC)) for im in square]
    a, b = scorer.score_many(square, "t"), scorer.score_many(tall, "t")
    assert b[0].anomaly_map.shape == (100, 80)
    for res, imgs, out in ((a, square, (64, 64)), (b, tall, (100, 80))):
        maps, scores = reference_musc(tiny_backbone, imgs, 64, scorer.layers, exact_gelu=True, out=out)
        np.testing.assert_allclose([r.pred_score for r in res], scores, rtol=0, atol=TOL)
        np.testing.assert_allclose(np.stack([r.anomaly_map for r in res]), maps, rtol=0, atol=TOL)


# ---------------------------------------------------------------------- profiles, guards, options
def test_paper_and_vlad_profiles_differ(tiny_backbone, six):
    paper = MuscScorer(tiny_backbone, profile="paper").score_many(six, "t")
    vlad = MuscScorer(tiny_backbone, profile="vlad").score_many(six, "t")
    assert paper[0].meta["profile"] == "paper"
    assert vlad[0].meta["profile"] == "vlad"
    assert np.abs(paper[5].anomaly_map - vlad[5].anomaly_map).max() > 1e-3
    assert np.abs(np.array([r.pred_score for r in paper]) - [r.pred_score for r in vlad]).max() > 1e-3


@pytest.mark.parametrize("n", [2, 3, 4])
def test_small_batches_average_the_nearest_image_instead_of_nan(tiny_backbone, six, n):
    """int(0.3 * (n - 1)) is 0 for n <= 4: the reference averages nothing (NaN); vlad averages one image."""
    images = _square(six[-n:], 64)
    results = MuscScorer(tiny_backbone, profile="paper").score_many(images, "t")
    assert all(np.isfinite(r.pred_score) and np.isfinite(r.anomaly_map).all() for r in results)
    maps, scores = reference_musc(tiny_backbone, images, 64, (1, 2, 3, 4), exact_gelu=True)
    np.testing.assert_allclose(np.stack([r.anomaly_map for r in results]), maps, atol=TOL)
    np.testing.assert_allclose([r.pred_score for r in results], scores, atol=TOL)


def test_forward_batches_are_the_references_whatever_batch_size_says(tiny_backbone, six):
    one = MuscScorer(tiny_backbone, profile="paper", batch_size=1).score_many(six, "t")
    many = MuscScorer(tiny_backbone, profile="paper", batch_size=16).score_many(six, "t")
    assert PAPER_BATCH_SIZE == 4
    for a, b in zip(one, many, strict=True):
        np.testing.assert_array_equal(a.anomaly_map, b.anomaly_map)
        assert a.pred_score == b.pred_score


def test_references_are_ordinary_batch_members_in_the_paper_profile(tiny_backbone, six):
    """fit(references) then score_many(images) is the reference run on images + references, images' results only."""
    images, refs = six[4:], six[:4]
    fitted = MuscScorer(tiny_backbone, profile="paper").fit(refs).score_many(images, "t")
    together = MuscScorer(tiny_backbone, profile="paper").score_many(images + refs, "t")
    assert len(fitted) == 2
    assert fitted[0].meta["batch_size"] == 6
    for a, b in zip(fitted, together[:2], strict=True):
        np.testing.assert_allclose(a.anomaly_map, b.anomaly_map, rtol=0, atol=1e-6)
        assert a.pred_score == pytest.approx(b.pred_score, abs=1e-6)
    single = MuscScorer(tiny_backbone, profile="paper").fit(refs[:1]).score(six[5], "t")
    assert np.isfinite(single.pred_score)
    assert single.meta["batch_size"] == 2


def test_dataset_selects_the_published_rscin_neighbourhoods(tiny_backbone):
    assert MuscScorer(tiny_backbone).k_list == (1, 2, 3)
    assert MuscScorer(tiny_backbone, dataset="visa").k_list == (1, 8, 9)
    assert MuscScorer(tiny_backbone, dataset="mvtec_ad").dataset == "mvtec"
    assert MuscScorer(tiny_backbone, dataset="btad").describe()["k_list"] == [1, 2, 3]
    with pytest.raises(ConfigError, match="unknown dataset 'mpdd'"):
        MuscScorer(tiny_backbone, dataset="mpdd")
    with pytest.raises(ConfigError, match="either k_list or dataset"):
        MuscScorer(tiny_backbone, dataset="visa", k_list=(1, 2))


def test_visa_neighbourhoods_larger_than_the_batch_keep_whole_rows(tiny_backbone, six):
    """k = 8, 9 on 6 images: the reference's topk would raise; every row is kept, i.e. k clipped to the batch."""
    images = _square(six, 64)
    results = MuscScorer(tiny_backbone, profile="paper", dataset="visa").score_many(images, "t")
    maps, scores = reference_musc(tiny_backbone, images, 64, (1, 2, 3, 4), exact_gelu=True, k_list=(1, 6, 6))
    np.testing.assert_allclose([r.pred_score for r in results], scores, atol=TOL)


def test_concepts_fall_back_to_the_vlad_profile_and_say_so(tiny_backbone, six):
    steered = MuscScorer(tiny_backbone, profile="paper", concepts="ignore colour")
    assert not steered.paper
    plain_vlad = MuscScorer(tiny_backbone, profile="vlad", concepts="ignore colour").score_many(six, "t")
    results = steered.score_many(six, "t")
    assert any("concept steering" in w and "vlad profile" in w for w in results[0].warnings)
    np.testing.assert_array_equal(results[5].anomaly_map, plain_vlad[5].anomaly_map)
