"""`vlad train-adapter` end to end on `random:tiny` and a synthetic MVTec-layout dataset, then `--adapter`."""

from __future__ import annotations

import argparse
import json
import shutil

import numpy as np
import pytest
import torch

from vlad.adapters import METADATA_FILE, apply_adapter, load_adapter
from vlad.cli.adapters import add_adapter_option, apply_adapter_option, register
from vlad.errors import ConfigError
from vlad.scorers.crane import CraneScorer
from vlad.scorers.filo import FiloScorer
from vlad.training import PromptLearner, TrainConfig, train_adapter

SIZE = 32
METADATA_FIELDS = {"method", "backbone", "layers", "prompts", "training_data", "epochs", "date", "loss_history"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from vlad.data.synthetic import make_synthetic_dataset

    root = tmp_path_factory.mktemp("data")
    make_synthetic_dataset(root, "tex", n_train=4, n_good=2, n_bad=2, size=64, seed=3)
    return root


@pytest.fixture(scope="module")
def cli():
    parser = argparse.ArgumentParser(prog="vlad")
    sub = parser.add_subparsers(dest="command", required=True)
    handlers = register(sub)
    assert set(handlers) == {"train-adapter", "import-checkpoint"}

    def run(*argv: str) -> int:
        args = parser.parse_args(list(argv))
        return handlers[args.command](args)

    return run


def _argv(method: str, root, out, *extra: str) -> list[str]:
    return [
        "train-adapter",
        "--method",
        method,
        "--root",
        str(root),
        "--layout",
        "mvtec",
        "--synthetic",
        "--epochs",
        "3",
        "--lr",
        "0.01",
        "--batch-size",
        "4",
        "--backbone",
        "random:tiny",
        "--device",
        "cpu",
        "--image-size",
        str(SIZE),
        "--seed",
        "5",
        "--out",
        str(out),
        *extra,
    ]


def _config(method: str, root) -> TrainConfig:
    return TrainConfig(
        method=method,
        root=root,
        layout="mvtec",
        synthetic=True,
        epochs=3,
        lr=0.01,
        batch_size=4,
        image_size=SIZE,
        seed=5,
    )


@pytest.fixture(scope="module")
def backbone():
    from vlad.backbones import load_backbone

    return load_backbone("random:tiny", device="cpu")  # the instance the command trains on (cached per process)


@pytest.fixture(scope="module")
def runs(cli, dataset, tmp_path_factory, backbone):
    """method -> (saved folder from the command, the same training run in memory); each trained once, on demand."""
    done: dict[str, tuple] = {}

    def get(method: str) -> tuple:
        if method not in done:
            out = tmp_path_factory.mktemp(method) / "adapter"
            assert cli(*_argv(method, dataset, out)) == 0
            done[method] = (out, train_adapter(_config(method, dataset), backbone))
        return done[method]

    return get


@pytest.fixture(params=["crane-prompts", "lora"])
def trained(request, runs):
    """(method, saved folder, in-memory adapter) for each method."""
    return (request.param, *runs(request.param))


def _score(scorer, images):
    results = scorer.score_many(images, "tex")
    return np.array([r.pred_score for r in results]), np.stack([r.anomaly_map for r in results])


@pytest.fixture(scope="module")
def test_images(dataset):
    from vlad.data import load_dataset, load_image

    return [load_image(s.path) for s in load_dataset(dataset, "mvtec", split="test")]


def test_files_metadata_and_falling_loss(trained, capsys):
    method, out, _ = trained
    files = sorted(p.name for p in out.iterdir())
    assert files == [METADATA_FILE, "prompts.safetensors" if method == "crane-prompts" else "lora.safetensors"]
    meta = json.loads((out / METADATA_FILE).read_text())
    assert METADATA_FIELDS <= set(meta)
    assert meta["method"] == method
    assert meta["backbone"] == "random:tiny"
    assert meta["epochs"] == 3
    assert meta["layers"] == [4]  # the paper profile reads the last layer, as the released prompts were trained
    assert meta["image_size"] == SIZE
    assert meta["training_data"]["synthetic"] is True
    assert meta["training_data"]["images"] == 8
    assert meta["training_data"]["anomalous"] == 4
    assert meta["training_data"]["categories"] == ["tex"]
    history = meta["loss_history"]
    assert len(history) == 3
    assert history[-1] < history[0]
    if method == "crane-prompts":
        assert meta["prompts"]["anomalous"] == "X " * 12 + "damaged object."
        assert meta["n_ctx"] == 12
    else:
        assert meta["lora"]["target_modules"].endswith(r"mlp\.(c_fc|c_proj)")
        assert meta["lora"]["r"] == 8


def test_training_is_deterministic_and_round_trips(trained):
    _, out, in_memory = trained
    loaded = load_adapter(out)
    assert set(loaded.tensors) == set(in_memory.tensors)
    for key, tensor in in_memory.tensors.items():
        assert torch.equal(loaded.tensors[key], tensor), key
    assert loaded.metadata.loss_history == in_memory.metadata.loss_history


def test_adapter_changes_scores_and_reloads_identically(trained, backbone, test_images):
    method, out, in_memory = trained
    plain = _score(CraneScorer(backbone, image_size=SIZE), test_images)
    from_memory = _score(apply_adapter(CraneScorer(backbone, image_size=SIZE), in_memory), test_images)
    from_disk = _score(apply_adapter(CraneScorer(backbone, image_size=SIZE), str(out)), test_images)
    np.testing.assert_array_equal(from_disk[0], from_memory[0])
    np.testing.assert_array_equal(from_disk[1], from_memory[1])
    assert np.abs(from_disk[0] - plain[0]).max() > 1e-4
    assert np.abs(from_disk[1] - plain[1]).max() > 1e-4
    np.testing.assert_array_equal(_score(CraneScorer(backbone, image_size=SIZE), test_images)[0], plain[0])  # shared
    if method == "crane-prompts":
        text = PromptLearner.from_adapter(backbone, load_adapter(out))()
        assert torch.equal(text, PromptLearner.from_adapter(backbone, in_memory)())


def test_mismatched_backbone_is_a_clear_error(trained, backbone, tmp_path):
    _, out, _ = trained
    copy = shutil.copytree(out, tmp_path / "other")
    meta = json.loads((copy / METADATA_FILE).read_text())
    meta["backbone"] = "openclip:ViT-B-16-plus-240@laion400m_e31"
    (copy / METADATA_FILE).write_text(json.dumps(meta))
    with pytest.raises(ConfigError) as info:
        apply_adapter(CraneScorer(backbone, image_size=SIZE), copy)
    message = str(info.value)
    assert "'openclip:ViT-B-16-plus-240@laion400m_e31'" in message
    assert "'random:tiny'" in message
    assert "\n" not in message


def test_prompts_apply_to_filo(backbone, runs, test_images):
    out, _ = runs("crane-prompts")
    scorer = apply_adapter(FiloScorer(backbone, image_size=SIZE, detector="none"), out)
    torch.testing.assert_close(scorer.text_prototypes("tex"), PromptLearner.from_adapter(backbone, load_adapter(out))())
    assert np.isfinite(_score(scorer, test_images[:1])[0]).all()


def test_adapter_option_on_detect_style_parsers(trained, backbone):
    _, out, _ = trained
    parser = argparse.ArgumentParser()
    add_adapter_option(parser)
    assert parser.parse_args([]).adapter is None
    args = parser.parse_args(["--adapter", str(out)])
    scorer = CraneScorer(backbone, image_size=SIZE)
    assert apply_adapter_option(scorer, parser.parse_args([])) is scorer
    assert not scorer.uses_learned_text
    apply_adapter_option(scorer, args)
    if trained[0] == "crane-prompts":
        assert scorer.uses_learned_text
        assert scorer.backbone is backbone
    else:  # lora: a LoRA'd copy of the vision tower, the prompts untouched
        assert not scorer.uses_learned_text
        assert scorer.backbone is not backbone


def test_existing_output_needs_overwrite(cli, dataset, runs, tmp_path):
    out = shutil.copytree(runs("crane-prompts")[0], tmp_path / "adapter")
    with pytest.raises(ConfigError, match="already holds an adapter"):
        cli(*_argv("crane-prompts", dataset, out))
    assert cli(*_argv("crane-prompts", dataset, out, "--epochs", "1", "--overwrite")) == 0
    assert json.loads((out / METADATA_FILE).read_text())["epochs"] == 1
