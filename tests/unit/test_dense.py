"""The dual-path dense engine on a tiny random ViT: identity of the original path, per-layer copies, closed form."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from vlad.backbones.dense import default_first_refined, default_layers, dense_forward
from vlad.errors import ConfigError
from vlad.scorers._ops import gaussian_blur, min_cosine_distance


@pytest.fixture(scope="module")
def batch():
    torch.manual_seed(1)
    return torch.randn(2, 3, 64, 64)


def test_defaults_follow_the_papers():
    assert default_layers(24) == (6, 12, 18, 24)
    assert default_first_refined(24) == 6  # the last 19 blocks
    assert default_first_refined(24, 18) == 7
    assert default_layers(4) == (1, 2, 3, 4)


@pytest.mark.parametrize("attention", ["qq+kk+vv", "vv"])
def test_original_path_still_equals_encode_image(tiny_backbone, batch, attention):
    out = dense_forward(tiny_backbone, batch, [1, 2, 3, 4], attention=attention, first_refined=1)
    with torch.no_grad():
        expected = tiny_backbone.model.encode_image(batch)
    torch.testing.assert_close(out.global_embedding, expected, rtol=1e-5, atol=1e-5)


def test_refined_tokens_differ_per_layer_and_are_copies(tiny_backbone, batch):
    out = dense_forward(tiny_backbone, batch, [1, 2, 3, 4], first_refined=1)
    tokens = [out.refined[layer] for layer in (1, 2, 3, 4)]
    assert len({t.data_ptr() for t in tokens}) == 4
    for a in range(4):
        for b in range(a + 1, 4):
            assert not torch.allclose(tokens[a], tokens[b], atol=1e-3), (a, b)
    before = tokens[3].clone()
    tokens[0].mul_(0)
    torch.testing.assert_close(tokens[3], before)
    assert out.grid == (8, 8)
    assert tokens[0].shape == (2, 64, tiny_backbone.embed_dim)


def test_vv_single_layer_closed_form(tiny_backbone, batch):
    """With only the last block refined: x_r = x_in + Proj(softmax(V V^T / sqrt(d)) V), V from LN1(x_in)."""
    backbone = tiny_backbone
    n = backbone.num_layers
    out = dense_forward(backbone, batch, [n], attention="vv", first_refined=n)
    with torch.no_grad():
        x = backbone.embed(batch)
        blocks = backbone.model.visual.transformer.resblocks
        for block in blocks[:-1]:
            x = block(x)
        last = blocks[-1]
        attn = last.attn
        heads, width = attn.num_heads, x.shape[-1]
        d = width // heads
        v = F.linear(last.ln_1(x), attn.in_proj_weight[2 * width :], attn.in_proj_bias[2 * width :])
        v = v.view(x.shape[0], x.shape[1], heads, d).transpose(1, 2)  # (B, h, L, d)
        a = torch.softmax(v @ v.transpose(-1, -2) / d**0.5, dim=-1)
        mixed = (a @ v).transpose(1, 2).reshape(x.shape[0], x.shape[1], width)
        x_r = x + F.linear(mixed, attn.out_proj.weight, attn.out_proj.bias)
        expected = backbone.model.visual.ln_post(x_r[:, 1:]) @ backbone.model.visual.proj
    torch.testing.assert_close(out.refined[n], expected, rtol=1e-5, atol=1e-5)


def test_bad_attention_and_layers(tiny_backbone, batch):
    with pytest.raises(ConfigError, match="unknown refined attention 'xx'; allowed: vv"):
        dense_forward(tiny_backbone, batch, [4], attention="xx")
    with pytest.raises(ConfigError, match=r"refined layers \[1\] out of range: .* layers 3\.\.4"):
        dense_forward(tiny_backbone, batch, [1], first_refined=3)
    with pytest.raises(ConfigError, match="first refined block 9 out of range 1..4"):
        dense_forward(tiny_backbone, batch, [4], first_refined=9)


@pytest.mark.parametrize("sigma", [1.0, 4.0])
def test_gaussian_blur_matches_scipy(sigma):
    rng = np.random.default_rng(0)
    maps = rng.random((2, 40, 37)).astype(np.float32)
    got = gaussian_blur(torch.from_numpy(maps), sigma).numpy()
    expected = np.stack([gaussian_filter(m, sigma=sigma) for m in maps])
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_min_cosine_distance_brute_force():
    rng = np.random.default_rng(0)
    feats = F.normalize(torch.tensor(rng.normal(size=(2, 5, 8)), dtype=torch.float32), dim=-1)
    memory = F.normalize(torch.tensor(rng.normal(size=(7, 8)), dtype=torch.float32), dim=-1)
    got = min_cosine_distance(feats, memory, chunk=3)
    for b in range(2):
        for p in range(5):
            expected = min(1 - float(feats[b, p] @ memory[m]) for m in range(7))
            assert got[b, p].item() == pytest.approx(expected, abs=1e-6)
