"""``vlad make-dialogues`` and ``vlad train-lvlm`` end to end on the tiny random Qwen2-VL, the vLLM adapter check and
the ``transformers:BASE+lora:ADAPTER`` backend."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers.tiny_vlm import tiny_vlm_dir
from vlad.cli import main
from vlad.errors import ConfigError
from vlad.explain.schema import parse_report
from vlad.regions import position_word


@pytest.fixture
def normal_dir(tmp_path: Path) -> Path:
    from vlad.data.synthetic import make_texture

    rng = np.random.default_rng(3)
    folder = tmp_path / "good"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(make_texture(48, rng, kind="stripes")).save(folder / f"g{i}.png")
    return folder


def _records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "dialogues.jsonl").read_text().splitlines()]


def _text(message: dict) -> str:
    return "".join(p["text"] for p in message["content"] if p["type"] == "text")


def test_make_dialogues_answers_match_the_masks(normal_dir, tmp_path, capsys):
    out = tmp_path / "set"
    args = ["make-dialogues", "--refs", str(normal_dir), "--object", "tile", "--out", str(out), "--n", "8"]
    assert main([*args, "--seed", "5"]) == 0
    assert "yes-rate: 50.0%" in capsys.readouterr().out
    records = _records(out)
    assert len(records) == 24
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_anomalous"] == 4
    assert summary["yes_rate"] == 0.5
    assert summary["records_per_kind"] == {"anomalygpt": 8, "evidence": 8, "region": 8}
    for record in records:
        meta, messages = record["meta"], record["messages"]
        for part in (p for m in messages for p in m["content"] if p["type"] == "image"):
            assert (out / part["image"]).is_file()
            assert not Path(part["image"]).is_absolute()
        mask = np.asarray(Image.open(out / meta["mask"])) > 0
        answer = _text(messages[-1])
        assert messages[-1]["role"] == "assistant"
        if not mask.any():
            expected_position = None
        else:
            ys, xs = np.nonzero(mask)
            expected_position = position_word(xs.mean() + 0.5, ys.mean() + 0.5, mask.shape[1], mask.shape[0])
        assert meta["label"] == int(mask.any())
        if meta["kind"] == "anomalygpt":
            assert _text(messages[0]).startswith("Is there any anomaly in the image?")
            expected = (
                f"Yes, there is an anomaly at the {expected_position} of the image."
                if mask.any()
                else "No, there are no anomalies in the image."
            )
            assert answer == expected
        elif meta["kind"] == "region":
            x0, y0, x1, y1 = meta["box"]
            inside = mask[y0:y1, x0:x1].sum()
            assert inside == mask.sum()  # the crop holds the whole defect (none for a normal image)
            assert ("no defect" in answer) == (not mask.any())
        else:
            report = parse_report(answer).report
            assert report is not None
            assert report.model_says_anomalous == mask.any()
            assert report.verdict == ("anomalous" if mask.any() else "normal")
            assert report.location == (expected_position or "none")
            assert messages[0]["role"] == "system"
            assert "Facts from the anomaly detector" in _text(messages[1])
    again = tmp_path / "again"
    assert main([*args[:5], "--out", str(again), "--n", "8", "--seed", "5"]) == 0
    assert (again / "dialogues.jsonl").read_bytes() == (out / "dialogues.jsonl").read_bytes()
    assert (again / "images" / "00001.png").read_bytes() == (out / "images" / "00001.png").read_bytes()


def test_make_dialogues_bad_input_is_one_line(normal_dir, tmp_path, capsys):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    empty = tmp_path / "empty"
    empty.mkdir()
    base = ["make-dialogues", "--object", "tile"]
    cases = [
        ([*base, "--refs", str(tmp_path / "nope"), "--out", str(tmp_path / "o")], "--refs: no images to read"),
        ([*base, "--refs", str(empty), "--out", str(tmp_path / "o")], "--refs: no images to read"),
        ([*base, "--refs", str(normal_dir), "--out", str(tmp_path / "o"), "--n", "0"], "--n must be at least 1"),
        ([*base, "--refs", str(normal_dir), "--out", str(a_file)], "is a file"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err, err
        assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> Path:
    """The tiny random Qwen2-VL with its output layer scaled up 25 times. As built, its logits are nearly flat (the
    loss sits at log(vocab size) ~ 5.95) and a frozen lm_head that small caps how far LoRA can move them; scaled, 20
    LoRA steps can fit one dialogue."""
    import torch
    from transformers import AutoModelForImageTextToText

    out = tmp_path_factory.mktemp("base") / "tiny-qwen2-vl"
    shutil.copytree(tiny_vlm_dir(), out)
    model = AutoModelForImageTextToText.from_pretrained(out)
    with torch.no_grad():
        model.lm_head.weight.mul_(25.0)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def one_dialogue(tmp_path_factory) -> Path:
    """A set of one AnomalyGPT dialogue (an anomalous image), so every step sees the same batch."""
    from vlad.data.synthetic import make_texture
    from vlad.explain.dialogues import write_dialogues

    root = tmp_path_factory.mktemp("lvlm")
    good = root / "good"
    good.mkdir()
    Image.fromarray(make_texture(48, np.random.default_rng(0), kind="grid")).save(good / "g.png")
    full = root / "full"
    write_dialogues([good / "g.png"], "tile", full, n=2, seed=0)
    record = next(r for r in _records(full) if r["meta"]["kind"] == "anomalygpt" and r["meta"]["label"] == 1)
    one = root / "one"
    shutil.copytree(full / "images", one / "images")
    (one / "dialogues.jsonl").write_text(json.dumps(record) + "\n")
    return one


def _train(base: Path, data: Path, out: Path, *extra: str) -> int:
    argv = ["train-lvlm", "--data", str(data), "--model", str(base), "--out", str(out), "--device", "cpu"]
    return main([*argv, "--batch-size", "1", "--lr", "0.01", "--rank", "8", *extra])


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(base_model, one_dialogue, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("adapter") / "a"
    assert _train(base_model, one_dialogue, out, "--steps", "20", "--save-every", "10") == 0
    return out


def test_train_lvlm_loss_goes_down_and_writes_a_peft_adapter(trained):
    log = _log(trained)
    assert [e["step"] for e in log] == list(range(1, 21))
    assert log[-1]["loss"] < 0.5 * log[0]["loss"]
    assert {"adapter_config.json", "adapter_model.safetensors", "training.json"} <= {p.name for p in trained.iterdir()}
    config = json.loads((trained / "adapter_config.json").read_text())
    assert config["r"] == 8
    assert config["peft_type"] == "LORA"
    assert not config.get("modules_to_save")
    from vlad.training_lvlm import read_safetensors_header

    names = list(read_safetensors_header(trained / "adapter_model.safetensors"))
    assert names
    assert all(".language_model." in n and "visual" not in n for n in names)
    assert json.loads((trained / "checkpoint" / "trainer_state.json").read_text())["step"] == 20


def test_check_vllm_lora_accepts_ours_and_names_what_vllm_refuses(trained, tmp_path):
    from safetensors.numpy import save_file

    from vlad.training_lvlm import check_vllm_lora, read_safetensors_header

    ok = check_vllm_lora(trained, 8)
    assert ok["rank"] == 8
    assert ok["modules"] == 14
    assert ok["tensors"] == 28
    with pytest.raises(ConfigError, match=r"LoRA rank 8 is greater than --max-lora-rank 1"):
        check_vllm_lora(trained, 1)
    with pytest.raises(ConfigError, match=r"--max-lora-rank 12 is not a value vLLM accepts"):
        check_vllm_lora(trained, 12)
    bad = tmp_path / "vision"
    shutil.copytree(trained, bad, ignore=shutil.ignore_patterns("checkpoint"))
    tensors = {
        n: np.zeros(info["shape"], np.float32)
        for n, info in read_safetensors_header(bad / "adapter_model.safetensors").items()
    }
    tensors["base_model.model.model.visual.blocks.0.attn.qkv.lora_A.weight"] = np.zeros((8, 32), np.float32)
    tensors["base_model.model.model.visual.blocks.0.attn.qkv.lora_B.weight"] = np.zeros((96, 8), np.float32)
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    config = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**config, "modules_to_save": ["lm_head"]}))
    with pytest.raises(ConfigError) as info:
        check_vllm_lora(bad, 16)
    message = str(info.value)
    assert "\n" not in message
    assert "model.visual.blocks.0.attn.qkv: a vision-tower module" in message
    assert "modules_to_save is ['lm_head']; vLLM needs it empty" in message
    with pytest.raises(ConfigError, match="no adapter_config.json"):
        check_vllm_lora(tmp_path, 16)


def test_resume_continues_from_the_checkpoint_step(base_model, one_dialogue, tmp_path, capsys):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert _train(base_model, one_dialogue, straight, "--steps", "4") == 0
    assert _train(base_model, one_dialogue, split, "--steps", "2") == 0
    capsys.readouterr()
    assert _train(base_model, one_dialogue, split, "--steps", "4", "--resume") == 0
    assert "resumed from step 2" in capsys.readouterr().out
    a, b = _log(straight), _log(split)
    assert [e["step"] for e in b] == [1, 2, 3, 4]
    assert np.allclose([e["loss"] for e in a], [e["loss"] for e in b], rtol=1e-5)
    assert json.loads((split / "training.json").read_text())["resumed_from"] == 2


def test_train_lvlm_bad_input_is_one_line_before_loading(base_model, one_dialogue, tmp_path, capsys):
    cases = [
        (["--steps", "1", "--rank", "32", "--max-lora-rank", "16"], tmp_path / "a", "greater than --max-lora-rank"),
        (["--steps", "1", "--resume"], tmp_path / "b", "holds no checkpoint"),
    ]
    for extra, out, message in cases:
        assert _train(base_model, one_dialogue, out, *extra) == 2
        err = capsys.readouterr().err
        assert message in err, err
        assert len(err.strip().splitlines()) == 1, err
    assert main(["train-lvlm", "--data", str(tmp_path / "none"), "--model", str(base_model), "--out", "x"]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert main(["train-lvlm", "--data", str(one_dialogue), "--model", str(tmp_path), "--out", "x"]) == 2
    assert "not a model folder (no config.json)" in capsys.readouterr().err
    assert not Path("x").exists()


def test_transformers_backend_loads_the_adapter_and_it_changes_the_output(base_model, trained, one_dialogue):
    from vlad.explain.backends import load_backend, parse_backend_spec

    spec = f"transformers:{base_model}+lora:{trained}"
    assert parse_backend_spec(spec).adapter == str(trained)
    assert str(parse_backend_spec(spec)) == spec
    image = Image.open(next((one_dialogue / "images").glob("*.png")))
    from vlad.explain.lvlm_eval import blind_messages

    base = load_backend(f"transformers:{base_model}", device="cpu")
    tuned = load_backend(spec, device="cpu")
    assert tuned.spec == spec
    messages = blind_messages(image)
    base_reply = base.complete(messages, max_tokens=12)
    tuned_reply = tuned.complete(messages, max_tokens=12)
    assert tuned_reply != base_reply
    assert tuned_reply.startswith("Yes")  # the one dialogue it was fitted to answers yes
    assert tuned.check()[1] == ("adapter", True, f"LoRA adapter {trained} loaded on top")


def test_a_bad_adapter_folder_is_one_line(tmp_path):
    from vlad.explain.backends import load_backend

    with pytest.raises(ConfigError, match=r"^LoRA adapter .*nope: no such folder$"):
        load_backend(f"transformers:{tmp_path}+lora:{tmp_path / 'nope'}")
    with pytest.raises(ConfigError, match=r"no adapter_config.json \(not a peft adapter folder\)"):
        load_backend(f"transformers:{tmp_path}+lora:{tmp_path}")
    with pytest.raises(ConfigError, match=r"write transformers:<model or dir>\+lora:<adapter dir>"):
        load_backend("transformers:+lora:x")
