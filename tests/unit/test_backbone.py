"""The backbone contract on a tiny random open_clip ViT (geometry and plumbing, not accuracy)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from PIL import Image

from vlad.backbones import BackboneSpec, load_backbone, parse_spec
from vlad.errors import BackboneError, WeightsNotFoundError


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (
            "openclip:ViT-L-14-336-quickgelu@openai",
            BackboneSpec("openclip:ViT-L-14-336-quickgelu@openai", "ViT-L-14-336-quickgelu", "openai", False),
        ),
        (
            "openclip:ViT-B-16-plus-240@laion400m_e31",
            BackboneSpec("openclip:ViT-B-16-plus-240@laion400m_e31", "ViT-B-16-plus-240", "laion400m_e31", False),
        ),
        ("openclip:local-dir:/x/y", BackboneSpec("openclip:local-dir:/x/y", "local-dir:/x/y", None, False)),
        ("openclip:hf-hub:org/repo", BackboneSpec("openclip:hf-hub:org/repo", "hf-hub:org/repo", None, False)),
        ("random:tiny", BackboneSpec("random:tiny", "vlad-tiny", None, True)),
        ("random:ViT-B-16", BackboneSpec("random:ViT-B-16", "ViT-B-16", None, True)),
    ],
)
def test_parse_spec(spec, expected):
    assert parse_spec(spec) == expected


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("", "empty"),
        ("random:", "needs a model name"),
        ("openclip:ViT-B-16@", "openclip:NAME@TAG"),
        ("nonsense-spec", "accepted: openclip:NAME@TAG"),
    ],
)
def test_parse_spec_errors(spec, match):
    with pytest.raises(BackboneError, match=match):
        parse_spec(spec)


def test_parse_spec_directory_and_bare_file(tmp_path):
    assert parse_spec(str(tmp_path)).model == f"local-dir:{tmp_path}"
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(BackboneError, match="name its architecture"):
        parse_spec(str(f))


def test_unknown_random_model():
    with pytest.raises(BackboneError, match="unknown open_clip model 'NoSuchNet'"):
        load_backbone("random:NoSuchNet", device="cpu")


def test_unknown_tag_lists_available():
    with pytest.raises(BackboneError, match="laion400m_e31"):
        load_backbone("openclip:ViT-B-16-plus-240@nope", device="cpu")


def test_missing_weights_fail_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(WeightsNotFoundError, match=r"ViT-B-16-plus-240@laion400m_e31.*local-dir"):
        load_backbone("openclip:ViT-B-16-plus-240@laion400m_e31", device="cpu")
    assert time.perf_counter() - start < 10


def test_missing_weights_fail_fast_without_network(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: connection refused at once
    start = time.perf_counter()
    with pytest.raises(WeightsNotFoundError, match="network is not reachable"):
        load_backbone("openclip:ViT-B-16-plus-240@laion400m_e31", device="cpu")
    assert time.perf_counter() - start < 10


def _image(seed=0, size=(70, 50)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def test_global_embedding_equals_open_clip_encode_image(tiny_backbone):
    x = tiny_backbone.preprocess([_image(0), _image(1)])
    out = tiny_backbone.forward_visual(x, layers=[2, 4])
    with torch.no_grad():
        ref = tiny_backbone.model.encode_image(x)
    torch.testing.assert_close(out.global_embedding, ref, rtol=0, atol=1e-6)


def test_patch_tokens_match_open_clip_intermediates_projected(tiny_backbone):
    x = tiny_backbone.preprocess([_image(2)])
    out = tiny_backbone.forward_visual(x, layers=[1, 3, -1])
    visual = tiny_backbone.model.visual
    with torch.no_grad():
        inter = visual.forward_intermediates(x, indices=[0, 2, 3], output_fmt="NLC", intermediates_only=True)
        expected = [visual.ln_post(t) @ visual.proj for t in inter["image_intermediates"]]
    assert sorted(out.patch_tokens) == [1, 3, 4]
    for layer, exp in zip([1, 3, 4], expected, strict=True):
        torch.testing.assert_close(out.patch_tokens[layer], exp, rtol=1e-5, atol=1e-5)
    assert out.grid == (8, 8)
    assert out.patch_tokens[1].shape == (1, 64, tiny_backbone.embed_dim)


def test_tapped_tokens_are_copies(tiny_backbone):
    x = tiny_backbone.preprocess([_image(3)])
    emb = tiny_backbone.embed(x)
    _, taps = tiny_backbone.run_blocks(emb, taps=[1, 2])
    assert taps[1].data_ptr() != taps[2].data_ptr()
    assert not torch.equal(taps[1], taps[2])
    before = taps[2].clone()
    taps[1].add_(1.0)
    torch.testing.assert_close(taps[2], before)


def test_positional_embedding_regrid(tiny_backbone):
    x = tiny_backbone.preprocess([_image(4)], image_size=96)
    out = tiny_backbone.forward_visual(x, layers=[-1])
    assert out.grid == (12, 12)
    assert out.patch_tokens[4].shape[1] == 144
    assert torch.isfinite(out.global_embedding).all()
    native = tiny_backbone._positional_embedding((8, 8))
    assert native is tiny_backbone.model.visual.positional_embedding
    with pytest.raises(BackboneError, match="not a multiple of the patch size 8"):
        tiny_backbone.grid_for(100)


def test_layers_out_of_range(tiny_backbone):
    x = tiny_backbone.preprocess([_image(5)])
    with pytest.raises(BackboneError, match=r"out of range.*1\.\.4"):
        tiny_backbone.forward_visual(x, layers=[5])


def test_encode_text_normalised_and_cached(tiny_backbone):
    prompts = ["a photo of a bottle.", "a photo of a damaged bottle."]
    emb = tiny_backbone.encode_text(prompts)
    assert emb.shape == (2, tiny_backbone.embed_dim)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))
    assert tiny_backbone.encode_text(prompts) is emb
    proto = tiny_backbone.text_prototype(prompts)
    torch.testing.assert_close(proto.norm(), torch.tensor(1.0))
    with pytest.raises(ValueError, match="at least one prompt"):
        tiny_backbone.encode_text([])


def test_local_checkpoint_file_and_local_dir_round_trip(tiny_backbone, tmp_path):
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in tiny_backbone.model.state_dict().items()}
    file = tmp_path / "open_clip_model.safetensors"
    save_file(state, str(file))
    x = tiny_backbone.preprocess([_image(6)])
    expected = tiny_backbone.forward_visual(x).global_embedding

    from_file = load_backbone(f"openclip:vlad-tiny@{file}", device="cpu")
    torch.testing.assert_close(from_file.forward_visual(x).global_embedding, expected)
    assert not from_file.is_random

    cfg = json.loads((__import__("vlad.backbones", fromlist=["x"])._CONFIG_DIR / "vlad-tiny.json").read_text())
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    from_dir = load_backbone(str(tmp_path), device="cpu")
    torch.testing.assert_close(from_dir.forward_visual(x).global_embedding, expected)


def test_backbones_are_loaded_once(tiny_backbone):
    assert load_backbone("random:tiny", device="cpu") is tiny_backbone


def test_bad_device_and_precision():
    with pytest.raises(BackboneError, match="unknown device 'tpu'"):
        load_backbone("random:tiny", device="tpu")
    with pytest.raises(BackboneError, match="unknown precision 'int4'"):
        load_backbone("random:tiny", device="cpu", precision="int4")
