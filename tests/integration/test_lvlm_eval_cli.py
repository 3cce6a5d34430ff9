"""``vlad eval --lvlm SPEC --lvlm-mode blind|grounded|both`` on a small synthetic dataset: exact counts against a
scripted OpenAI-compatible server, and the tables with the tiny random Qwen2-VL in process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.tiny_vlm import tiny_vlm_dir
from vlad.cli import main
from vlad.explain.lvlm_eval import BLIND_QUESTION

NORMAL_REPORT = {
    "verdict": "normal",
    "defect_type": "none",
    "location": "none",
    "severity": "none",
    "rationale": "Looks uniform.",
    "model_says_anomalous": False,
    "confidence": 0.7,
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    from vlad.data.synthetic import make_synthetic_dataset

    root = tmp_path_factory.mktemp("ds")
    make_synthetic_dataset(root, "tex", n_train=2, n_good=2, n_bad=3, size=64, seed=4)
    return root


def _eval(dataset: Path, out: Path, *extra: str) -> list[str]:
    base = ["eval", "--root", str(dataset), "--layout", "mvtec", "--backbone", "random:tiny", "--out", str(out)]
    return [*base, *extra]


def _script(body: dict) -> str:
    """Blind question -> always yes; the evidence report -> always a normal verdict."""
    texts = [p.get("text", "") for m in body["messages"] if isinstance(m["content"], list) for p in m["content"]]
    return "Yes, there is an anomaly." if BLIND_QUESTION in texts else json.dumps(NORMAL_REPORT)


def test_blind_and_grounded_counts_against_a_scripted_server(dataset, tmp_path, fake, capsys):
    fake.replies = [_script]
    out = tmp_path / "m.json"
    assert main(_eval(dataset, out, "--lvlm", f"openai:{fake.url}#fake-vlm", "--lvlm-mode", "both")) == 0
    printed = capsys.readouterr().out
    assert "LVLM blind" in printed
    assert "LVLM grounded" in printed
    payload = json.loads(out.read_text())
    rows = payload["images"]
    assert len(rows) == 5
    labels = [r["label"] for r in rows]
    detector = [r["lvlm_grounded"]["detector"] for r in rows]
    assert all(r["lvlm_blind"]["says"] is True for r in rows)
    assert all(r["lvlm_grounded"]["says"] is False for r in rows)
    blind = payload["lvlm_eval"]["blind"]["per_class"]["tex"]
    assert blind["yes_rate"] == 1.0
    assert blind["accuracy"] == pytest.approx(3 / 5)
    assert blind["balanced_accuracy"] == pytest.approx(0.5)
    assert blind["unparseable_rate"] == 0.0
    grounded = payload["lvlm_eval"]["grounded"]["per_class"]["tex"]
    assert grounded["accuracy"] == pytest.approx(2 / 5)
    assert grounded["disagreements"] == sum(detector)
    assert grounded["model_right"] == sum(d and not y for d, y in zip(detector, labels, strict=True))
    assert grounded["detector_right"] == sum(d and y for d, y in zip(detector, labels, strict=True))
    assert payload["lvlm_eval"]["mode"] == "both"
    # the blind requests carried the photo and the question only
    blind_requests = [b for b in fake.chat_requests() if BLIND_QUESTION in json.dumps(b["messages"])]
    assert len(blind_requests) == 5
    assert all(len(b["messages"]) == 1 and len(b["messages"][0]["content"]) == 2 for b in blind_requests)


def test_both_modes_with_the_tiny_model_in_process(dataset, tmp_path, capsys):
    out = tmp_path / "m.json"
    spec = f"transformers:{tiny_vlm_dir()}"
    argv = _eval(dataset, out, "--lvlm", spec, "--lvlm-mode", "both", "--lvlm-max-tokens", "4", "--limit", "2")
    assert main([*argv, "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    table = printed[printed.index("LVLM blind") :].splitlines()
    assert [line.split()[0] for line in table[1:3]] == ["tex", "pooled"]
    assert "LVLM grounded" in printed
    summary = json.loads(out.read_text())["lvlm_eval"]
    assert summary["lvlm"] == spec
    assert summary["blind"]["overall"]["n"] == 2
    assert summary["grounded"]["overall"]["n"] == 2


def test_lvlm_mode_usage_errors_come_before_any_model(dataset, tmp_path, capsys):
    cases = [
        (["--lvlm-mode", "blind"], "--lvlm-mode blind needs --lvlm SPEC"),
        (["--lvlm", "template", "--lvlm-mode", "both"], "--lvlm-mode both needs a language model"),
    ]
    for extra, message in cases:
        assert main(_eval(dataset, tmp_path / "m.json", *extra)) == 2
        err = capsys.readouterr().err
        assert message in err
        assert len(err.strip().splitlines()) == 1


def test_blind_only_skips_the_evidence_path(dataset, tmp_path, fake, capsys):
    fake.replies = ["No, there are no anomalies in the image."]
    out = tmp_path / "m.json"
    assert main(_eval(dataset, out, "--lvlm", f"openai:{fake.url}#fake-vlm", "--lvlm-mode", "blind")) == 0
    assert "LVLM grounded" not in capsys.readouterr().out
    payload = json.loads(out.read_text())
    assert payload["lvlm_eval"]["grounded"] is None
    assert payload["lvlm_verdicts"] is None
    blind = payload["lvlm_eval"]["blind"]["overall"]
    assert blind["yes_rate"] == 0.0
    assert blind["accuracy"] == pytest.approx(2 / 5)
    assert len(fake.chat_requests()) == 5  # one blind question per image, no report requests
