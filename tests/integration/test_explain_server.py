"""The explainer against a real OpenAI-compatible server: ``transformers serve`` serving a tiny random Qwen2-VL
(built in the test, never downloaded) on 127.0.0.1, plus the same model in process (``transformers:`` backend).

The model's weights are random, so its replies are noise: these tests prove the plumbing (images in the chat
template, streaming, multi-turn, readiness, error paths) and that noise is counted as unparseable, not accuracy.
``transformers serve`` 5.x accepts ``response_format`` but ignores it (it logs "Ignoring unsupported fields"), so on
this server the report is never enforced and the repair path runs; the refusal path (HTTP 400/422) is tested against
the fake server in ``tests/unit/test_explain_backends.py``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.helpers.explain_data import make_image, make_result
from tests.helpers.tiny_vlm import MODEL_ID, tiny_vlm_dir, tiny_vlm_hf_home
from vlad.cli.chat import register
from vlad.explain.backends import load_backend
from vlad.explain.conversation import Conversation
from vlad.explain.evidence import build_evidence
from vlad.explain.explainer import explain
from vlad.explain.rows import ExplainOptions, RowExplainer
from vlad.resources import samples_dir

pytestmark = pytest.mark.slow
READY_TIMEOUT_S = 150


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listed(url: str) -> list[str]:
    with urllib.request.urlopen(f"{url}/models", timeout=2) as response:
        return [m["id"] for m in json.load(response)["data"]]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """``transformers serve vlad-test/tiny-qwen2-vl`` on a free 127.0.0.1 port, ready (listed under /v1/models)."""
    exe = Path(sys.executable).with_name("transformers")
    # The serving extra is installed by `make test`; a missing server is a broken install, not a reason to skip.
    import fastapi  # noqa: F401

    assert exe.exists(), f"no transformers CLI next to {sys.executable}: pip install 'transformers[serving]'"
    home = tiny_vlm_hf_home()
    port = _free_port()
    url = f"http://127.0.0.1:{port}/v1"
    env = {
        k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE")
    }
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with log.open("w") as fh:
        proc = subprocess.Popen(
            [
                str(exe),
                "serve",
                MODEL_ID,
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--device",
                "cpu",
                "--log-level",
                "warning",
            ],
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"transformers serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if MODEL_ID in _listed(url):
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"transformers serve not ready after {READY_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@pytest.fixture
def evidence():
    return build_evidence(make_image((600, 400)), make_result((600, 400)), "bottle", tile=128, max_side=56)


def _recording(backend):
    """Wraps the backend's ``chat.completions.create`` so the test sees every request sent to the real server."""
    sent: list[dict] = []
    original = backend.client.chat.completions.create

    def create(**kwargs):
        sent.append(kwargs)
        return original(**kwargs)

    backend.client.chat.completions.create = create
    return sent


def _parser():
    parser = argparse.ArgumentParser(prog="vlad")
    handlers = register(parser.add_subparsers(dest="command", required=True))
    return parser, handlers


# ---------------------------------------------------------------------- transformers serve
def test_lvlm_check_against_transformers_serve(served, capsys):
    parser, handlers = _parser()
    code = handlers["lvlm-check"](parser.parse_args(["lvlm-check", "--lvlm", f"openai:{served}"]))
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"models listed: ['{MODEL_ID}']" in out
    assert f"{MODEL_ID} (listed); a text request succeeded" in out
    assert "images           yes  a 32x32 image added" in out
    assert "response_format  ?    accepted but not enforced" in out  # transformers serve ignores it


def test_report_from_transformers_serve_is_validated_and_counted_unparseable(served, evidence):
    backend = load_backend(f"openai:{served}", timeout=60, max_retries=0)
    sent = _recording(backend)
    outcome = explain(evidence, backend, max_tokens=24)
    assert backend.model == MODEL_ID  # taken from /v1/models
    assert len(sent) == 2  # the report request and one repair turn
    images = [p for p in sent[0]["messages"][1]["content"] if p["type"] == "image_url"]
    assert len(images) == len(evidence.images) == 3
    assert sent[1]["messages"][2]["role"] == "assistant"
    assert sent[1]["messages"][3]["content"].startswith("Your reply")
    assert backend.response_format_supported in (None, False)  # ignored (5.x) or refused: never enforced here
    assert outcome.unparseable
    assert outcome.report is None
    assert "unparseable after one repair turn" in outcome.error
    assert "judges this bottle anomalous" in outcome.explanation.text


def test_streaming_multi_turn_with_transformers_serve(served, evidence):
    backend = load_backend(f"openai:{served}#{MODEL_ID}", timeout=60, max_retries=0)
    pieces = list(backend.stream([{"role": "user", "content": "Say hello."}], max_tokens=12))
    assert len(pieces) > 1
    assert all(isinstance(p, str) for p in pieces)
    sent = _recording(backend)
    conv = Conversation(evidence, backend, context_tokens=4096, max_tokens=12)
    answers = ["".join(conv.ask(q)) for q in ("Where is the defect?", "How big is it?", "Why?")]
    assert not any(a.startswith("[note:") for a in answers), answers
    assert [m["content"] for m in conv.messages if m["role"] == "assistant"] == answers
    layout = [
        [isinstance(m["content"], list) and sum(p["type"] == "image_url" for p in m["content"]) for m in s["messages"]]
        for s in sent
    ]
    assert layout == [[0, 3], [0, 3, 0, 0], [0, 3, 0, 0, 0, 0]]  # pictures only in the first user turn
    assert all(s["stream"] for s in sent)


def test_wrong_model_name_on_transformers_serve(served, evidence):
    backend = load_backend(f"openai:{served}#no/such-model", timeout=30, max_retries=0)
    outcome = explain(evidence, backend, max_tokens=8)
    assert "does not serve model 'no/such-model' (HTTP 400" in outcome.error
    assert outcome.report is None


def test_detect_row_and_chat_against_transformers_serve(served, monkeypatch, capsys):
    explainer = RowExplainer(ExplainOptions(lvlm=f"openai:{served}", max_tokens=16))
    row = explainer.explain(make_image(), make_result(), "bottle")
    assert row["lvlm"] == f"openai:{served}"
    assert row["report"] is None
    assert "unparseable" in row["explain_error"]
    assert "judges this bottle anomalous" in row["explanation"]
    parser, handlers = _parser()
    args = parser.parse_args(
        [
            "chat",
            str(samples_dir() / "defect_colour.png"),
            "--object",
            "part",
            "--backbone",
            "random:tiny",
            "--device",
            "cpu",
            "--lvlm",
            f"openai:{served}",
            "--lvlm-max-tokens",
            "12",
            "--max-image-side",
            "56",
            "--context-tokens",
            "4096",
        ]
    )
    monkeypatch.setattr(sys, "stdin", io.StringIO("where is it?\nhow big is it?\nhow sure are you?\n"))
    assert handlers["chat"](args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"language model: openai:{served}" in lines[0]
    assert sum(line.startswith("vlad> ") for line in lines) == 4  # the explanation and three answers


def test_vlad_detect_explain_cli(served, sample_images, tmp_path, capsys):
    """``vlad detect --explain``, template and openai backends."""
    from vlad.cli import main

    for lvlm in ("template", f"openai:{served}"):
        out = tmp_path / lvlm.split(":")[0]
        code = main(
            [
                "detect",
                str(sample_images),
                "--object",
                "bottle",
                "--backbone",
                "random:tiny",
                "--device",
                "cpu",
                "--out",
                str(out),
                "--explain",
                "--lvlm",
                lvlm,
                "--no-overlay",
                "--lvlm-max-tokens",
                "16",
            ]
        )
        assert code == 0, capsys.readouterr().err
        rows = [json.loads(line) for line in (out / "report.jsonl").read_text().splitlines()]
        assert len(rows) == 3
        assert all(r["explanation"] and r["lvlm"] == lvlm for r in rows)
        if lvlm == "template":
            assert all(r["report"] is not None and r["explain_error"] is None for r in rows)
        else:
            assert all(r["report"] is None and "unparseable" in r["explain_error"] for r in rows)


# ---------------------------------------------------------------------- transformers: in process
def test_tiny_vlm_token_ids_and_image_expansion_agree():
    from transformers import AutoConfig, AutoProcessor

    folder = tiny_vlm_dir()
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    tok = processor.tokenizer
    assert config.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert config.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert tok.eos_token == "<|im_end|>"
    message = [
        {"role": "user", "content": [{"type": "image", "image": make_image((120, 90))}, {"type": "text", "text": "hi"}]}
    ]
    inputs = processor.apply_chat_template(message, add_generation_prompt=True, tokenize=True, return_dict=True)
    (grid,) = inputs["image_grid_thw"]
    n_image_tokens = sum(int(i == config.image_token_id) for i in inputs["input_ids"][0])
    assert n_image_tokens == int(grid[0] * grid[1] * grid[2]) // 4 >= 1  # 2 x 2 merge
    text = processor.apply_chat_template(message, add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>\n<|im_start|>assistant\n")


def test_transformers_backend_in_process(evidence):
    backend = load_backend(f"transformers:{tiny_vlm_dir()}", device="cpu", timeout=60)
    rows = {item: ok for item, ok, _ in backend.check()}
    assert rows == {"model": True, "images": True, "response_format": False}
    outcome = explain(evidence, backend, max_tokens=16)
    assert outcome.unparseable
    assert outcome.report is None
    assert outcome.repaired
    conv = Conversation(evidence, backend, context_tokens=4096, max_tokens=12)
    answers = ["".join(conv.ask(q)) for q in ("Where is the defect?", "How big is it?")]
    assert not any(a.startswith("[note:") for a in answers)
    assert len(conv.messages) == 5
    assert conv.messages[1]["content"][1]["type"] == "image_url"
    missing = load_backend("transformers:/nonexistent/model-dir", device="cpu")
    text = explain(evidence, missing, max_tokens=8)
    assert text.backend_down
    assert "cannot load transformers model '/nonexistent/model-dir'" in text.error
