"""Adapters and their training pieces on the tiny random ViT: prompt encoding, losses, metadata, files, applying."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vlad.adapters import (
    METADATA_FILE,
    Adapter,
    AdapterMetadata,
    apply_adapter,
    load_adapter,
    lora_backbone,
    resolve_adapter,
    save_adapter,
)
from vlad.errors import ConfigError, DatasetError
from vlad.scorers.crane import CraneScorer
from vlad.scorers.winclip import WinClipScorer
from vlad.training import (
    PromptLearner,
    TrainConfig,
    build_items,
    crane_loss,
    dice_loss,
    encode_with_context,
    extract_with_grad,
    focal_loss,
    load_item,
)

TINY_LORA = {
    "r": 2,
    "alpha": 4,
    "dropout": 0.0,
    "target_modules": r"visual\.transformer\.resblocks\.\d+\.mlp\.(c_fc|c_proj)",
}


def _metadata(**changes: object) -> AdapterMetadata:
    base = dict(
        method="crane-prompts",
        backbone="random:tiny",
        layers=(1, 2, 3, 4),
        attention="qq+kk+vv",
        first_refined=1,
        image_size=64,
        prompts={"normal": "X X X object.", "anomalous": "X X X damaged object."},
        training_data={"root": "/data", "layout": "mvtec"},
        epochs=1,
        date="2026-01-01T00:00:00+00:00",
        n_ctx=3,
    )
    return AdapterMetadata(**{**base, **changes})  # type: ignore[arg-type]


def _prompt_adapter(backbone, seed: int = 3) -> Adapter:
    learner = PromptLearner(backbone, 3, seed=seed)
    meta = _metadata(prompts={"normal": learner.templates[0], "anomalous": learner.templates[1]})
    return Adapter(meta, learner.state_tensors())


def _lora_adapter(backbone, scale: float = 0.5) -> Adapter:
    torch.manual_seed(0)
    lora = lora_backbone(backbone, TINY_LORA)
    from peft import get_peft_model_state_dict

    tensors = {k: torch.randn_like(v) * scale for k, v in get_peft_model_state_dict(lora.model).items()}
    return Adapter(_metadata(method="lora", n_ctx=None, lora=TINY_LORA, prompts={"ensemble": "winclip"}), tensors)


@pytest.fixture(scope="module")
def crane(tiny_backbone):
    return CraneScorer(tiny_backbone, image_size=64)


# ---------------------------------------------------------------------- prompts
def test_context_encoding_matches_open_clip_encode_text(tiny_backbone):
    model = tiny_backbone.model
    tokens = tiny_backbone.tokenizer(["X X X object.", "X X X damaged object."])
    ctx = model.token_embedding(tokens[:, 1:4])  # the embeddings of the X tokens themselves
    with torch.no_grad():
        got = encode_with_context(model, tokens, ctx)
        expected = model.encode_text(tokens)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_prompt_learner_trains_only_the_context(tiny_backbone):
    learner = PromptLearner(tiny_backbone, 4, seed=0)
    assert learner.templates == ("X X X X object.", "X X X X damaged object.")
    text = learner()
    assert text.shape == (2, tiny_backbone.embed_dim)
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(2))
    text[1].sum().backward()
    assert learner.ctx_pos.grad is not None
    assert learner.ctx_neg.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in tiny_backbone.model.parameters())
    assert [n for n, _ in learner.named_parameters()] == ["ctx_pos", "ctx_neg"]
    torch.testing.assert_close(PromptLearner(tiny_backbone, 4, seed=0)(), text.detach())  # seeded init


def test_prompt_learner_rejects_overlong_context(tiny_backbone):
    with pytest.raises(ConfigError, match="n_ctx 80 is too long"):
        PromptLearner(tiny_backbone, 80)


# ---------------------------------------------------------------------- losses
def test_focal_loss_matches_formula():
    probs = torch.stack([torch.tensor([[0.9, 0.3]]), torch.tensor([[0.1, 0.7]])])[None]  # (1, 2, 1, 2): 2 pixels
    target = torch.tensor([[[0, 0]]])
    expected = (-(0.1**2) * np.log(0.9) - (0.7**2) * np.log(0.3)) / 2
    assert focal_loss(probs, target).item() == pytest.approx(expected, rel=1e-5)


def test_dice_loss_values():
    mask = torch.zeros(1, 4, 4)
    mask[0, :2] = 1
    assert dice_loss(mask.clone(), mask).item() == pytest.approx(0.0, abs=1e-6)
    assert dice_loss(1 - mask, mask).item() == pytest.approx(1 - 1 / 17, abs=1e-6)  # no overlap: (0+1)/(8+8+1)


def test_crane_loss_prefers_the_right_text():
    torch.manual_seed(0)
    d, grid = 8, (2, 2)
    normal, anomalous = F.normalize(torch.randn(2, d), dim=-1)
    mask = torch.zeros(1, 4, 4)
    mask[0, :2, :2] = 1  # patch 0 is anomalous
    tokens = torch.stack([anomalous, normal, normal, normal])[None, None]  # (L=1, B=1, N=4, D)
    glob = anomalous[None]
    losses = []
    for text in (torch.stack([normal, anomalous]), torch.stack([anomalous, normal])):
        text = text[None]
        logits = torch.einsum("lbnd,bkd->lbnk", tokens, text) / 0.07
        losses.append(crane_loss(logits, tokens, glob, text, mask, torch.tensor([1]), grid).item())
    assert losses[0] < losses[1]


# ---------------------------------------------------------------------- metadata and files
def test_metadata_round_trip_and_strictness():
    meta = _metadata(loss_history=(2.0, 1.0))
    data = json.loads(json.dumps(meta.to_dict()))
    assert AdapterMetadata.from_dict(data) == meta
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['colour'\]"):
        AdapterMetadata.from_dict({**data, "colour": "red"}, "x.json")
    with pytest.raises(ConfigError, match=r"missing key\(s\) \['backbone'\]"):
        AdapterMetadata.from_dict({k: v for k, v in data.items() if k != "backbone"})
    with pytest.raises(ConfigError, match="'epochs' must be int"):
        AdapterMetadata.from_dict({**data, "epochs": "5"})
    with pytest.raises(ConfigError, match="unknown method 'dora'"):
        AdapterMetadata.from_dict({**data, "method": "dora"})
    with pytest.raises(ConfigError, match="'layers' must be list"):
        AdapterMetadata.from_dict({**data, "layers": [1, True]})


def test_save_load_round_trip(tmp_path, tiny_backbone):
    adapter = _prompt_adapter(tiny_backbone)
    folder = save_adapter(adapter, tmp_path / "a")
    assert sorted(p.name for p in folder.iterdir()) == ["adapter.json", "prompts.safetensors"]
    for ref in (folder, folder / METADATA_FILE, str(folder)):
        loaded = load_adapter(ref)
        assert loaded.metadata == adapter.metadata
        assert all(torch.equal(loaded.tensors[k], adapter.tensors[k]) for k in adapter.tensors)
    with pytest.raises(ConfigError, match="already holds an adapter"):
        save_adapter(adapter, folder)
    save_adapter(adapter, folder, overwrite=True)


def test_missing_adapter_and_broken_files(tmp_path, tiny_backbone):
    with pytest.raises(ConfigError, match="adapter 'no-such' not found"):
        resolve_adapter("no-such")
    folder = save_adapter(_prompt_adapter(tiny_backbone), tmp_path / "a")
    (folder / "prompts.safetensors").write_bytes(b"junk")
    with pytest.raises(ConfigError, match="cannot read prompts.safetensors"):
        load_adapter(folder)
    (folder / METADATA_FILE).write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read adapter metadata"):
        load_adapter(folder)


def test_prompt_tensor_shapes_are_checked(tmp_path, tiny_backbone):
    adapter = _prompt_adapter(tiny_backbone)
    adapter.tensors["ctx_neg"] = adapter.tensors["ctx_neg"][:2]
    with pytest.raises(ConfigError, match="must both be"):
        save_adapter(adapter, tmp_path / "bad")


# ---------------------------------------------------------------------- applying
def test_prompt_adapter_replaces_crane_text(tiny_backbone, texture_set):
    adapter = _prompt_adapter(tiny_backbone)
    scorer = CraneScorer(tiny_backbone, image_size=64)
    before = scorer.score(texture_set["bad"], "texture")
    apply_adapter(scorer, adapter)
    expected = PromptLearner.from_adapter(tiny_backbone, adapter)().detach()
    torch.testing.assert_close(scorer.text_prototypes("anything"), expected)
    after = scorer.score(texture_set["bad"], "texture")
    assert after.pred_score != pytest.approx(before.pred_score, abs=1e-6)


def test_prompt_adapter_needs_a_crane_scorer(tiny_backbone):
    with pytest.raises(ConfigError, match="needs a Crane-family scorer.*'winclip'"):
        apply_adapter(WinClipScorer(tiny_backbone), _prompt_adapter(tiny_backbone))


def test_mismatched_backbone_names_both_specs(tiny_backbone):
    adapter = _prompt_adapter(tiny_backbone)
    other = adapter.metadata.model_copy(update={"backbone": "openclip:ViT-L-14-336-quickgelu@openai"})
    expected = r"trained for backbone 'openclip:ViT-L-14-336-quickgelu@openai' but the scorer uses 'random:tiny'"
    with pytest.raises(ConfigError, match=expected):
        apply_adapter(CraneScorer(tiny_backbone, image_size=64), Adapter(other, adapter.tensors))


def test_zero_lora_is_the_identity_and_leaves_the_base_alone(tiny_backbone, crane):
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    base_out = crane._extract(x)
    lora = lora_backbone(tiny_backbone, TINY_LORA)  # peft's init: B = 0
    assert lora.model is not tiny_backbone.model
    assert lora.model.transformer is tiny_backbone.model.transformer  # the text tower is shared, not copied
    assert not any("lora_" in n for n, _ in tiny_backbone.model.named_parameters())
    out = CraneScorer(lora, image_size=64)._extract(x)
    for k in base_out:
        torch.testing.assert_close(out[k], base_out[k], rtol=1e-5, atol=1e-6)


def test_lora_adapter_changes_any_scorer_and_checks_keys(tiny_backbone, texture_set):
    adapter = _lora_adapter(tiny_backbone)
    scorer = WinClipScorer(tiny_backbone, image_size=32)
    before = scorer.score(texture_set["bad"], "texture").pred_score
    apply_adapter(scorer, adapter)
    assert scorer.backbone is not tiny_backbone
    assert scorer.backbone.spec == tiny_backbone.spec
    assert scorer.score(texture_set["bad"], "texture").pred_score != pytest.approx(before, abs=1e-6)
    assert WinClipScorer(tiny_backbone, image_size=32).score(texture_set["bad"], "texture").pred_score == before
    broken = Adapter(adapter.metadata, {k + "x": v for k, v in adapter.tensors.items()})
    with pytest.raises(ConfigError, match="does not fit random:tiny"):
        apply_adapter(CraneScorer(tiny_backbone, image_size=64), broken)


def test_lora_after_fit_or_twice_is_refused(tiny_backbone, texture_set):
    scorer = CraneScorer(tiny_backbone, image_size=64).fit(texture_set["refs"][:2])
    with pytest.raises(ConfigError, match="before fit"):
        apply_adapter(scorer, _lora_adapter(tiny_backbone))
    scorer = apply_adapter(CraneScorer(tiny_backbone, image_size=64), _lora_adapter(tiny_backbone))
    with pytest.raises(ConfigError, match="already has one"):
        apply_adapter(scorer, _lora_adapter(tiny_backbone))


def test_cli_module_and_metadata_need_no_torch(tmp_path):
    code = (
        "import argparse, sys\n"
        "from vlad.cli.adapters import register, add_adapter_option\n"
        "from vlad.adapters import read_metadata\n"
        "sub = argparse.ArgumentParser().add_subparsers()\n"
        "register(sub)\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_extract_with_grad_matches_the_scorer(tiny_backbone, crane):
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    lora = lora_backbone(tiny_backbone, TINY_LORA)
    params = [p for n, p in lora.model.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    scorer = CraneScorer(lora, image_size=64)
    got = extract_with_grad(scorer, x)
    assert got["layer4"].requires_grad
    expected = scorer._extract(x)
    for k in expected:
        torch.testing.assert_close(got[k].detach(), expected[k])


# ---------------------------------------------------------------------- data and options
@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from vlad.data.synthetic import make_synthetic_dataset

    root = tmp_path_factory.mktemp("ds")
    make_synthetic_dataset(root, "tex", n_train=3, n_good=2, n_bad=2, size=32)
    return root


def test_synthetic_items_pair_every_normal_image(dataset):
    items = build_items(dataset, "mvtec", synthetic=True)
    assert [it.label for it in items] == [0, 1] * 3
    assert [it.synthetic for it in items] == [None, 0, None, 1, None, 2]
    image, mask = load_item(items[1], 48, seed=5)
    image2, mask2 = load_item(items[1], 48, seed=5)
    assert image.size == (48, 48)
    assert mask.shape == (48, 48)
    assert mask.any()
    np.testing.assert_array_equal(np.asarray(image), np.asarray(image2))
    np.testing.assert_array_equal(mask, mask2)
    assert not np.array_equal(np.asarray(load_item(items[1], 48, seed=6)[0]), np.asarray(image))
    assert not load_item(items[0], 48, seed=5)[1].any()
    assert len(build_items(dataset, "mvtec", synthetic=True, limit=2)) == 4


def test_masked_items_come_from_the_test_split(dataset, tmp_path):
    items = build_items(dataset, "mvtec")
    assert sorted(it.label for it in items) == [0, 0, 1, 1]
    assert all((it.mask_path is not None) == (it.label == 1) for it in items)
    _, mask = load_item(next(it for it in items if it.label == 1), 32, seed=0)
    assert mask.any()
    assert not mask.all()
    with pytest.raises(DatasetError, match="no anomalous images with masks"):
        build_items(_good_only(tmp_path), "folder")


def _good_only(tmp_path):
    from PIL import Image

    (tmp_path / "good").mkdir()
    Image.new("RGB", (16, 16)).save(tmp_path / "good" / "a.png")
    return tmp_path


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"method": "dora"}, "unknown adapter method"),
        ({"epochs": 0}, "epochs must be"),
        ({"lr": float("nan")}, "lr must be"),
        ({"limit": 0}, "limit must be"),
    ],
)
def test_train_config_checks(change, message):
    config = TrainConfig(method="crane-prompts", root=".", layout="mvtec")
    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(config, **change).check()


def test_metadata_is_a_strict_pydantic_model():
    meta = _metadata()
    with pytest.raises(ConfigError, match="'n_ctx' must be int"):
        AdapterMetadata.from_dict({**meta.to_dict(), "n_ctx": 1.5})
    with pytest.raises(ConfigError, match="'loss_history' must be list of numbers"):
        AdapterMetadata.from_dict({**meta.to_dict(), "loss_history": [1.0, float("nan")]})
    with pytest.raises(ConfigError, match="'profile' must be"):
        AdapterMetadata.from_dict({**meta.to_dict(), "profile": "exact"})
    with pytest.raises(ValueError, match="frozen"):
        meta.method = "lora"  # type: ignore[misc]
