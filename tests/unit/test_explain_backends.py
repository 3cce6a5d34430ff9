"""The openai: backend against an in-process fake OpenAI server: request layout, the response_format schema and its
rejection, validation and the repair turn, and every failure a server can produce (each with a clear message and
the template fallback)."""

from __future__ import annotations

import base64
import io
import json
import time

import pytest
from PIL import Image

from tests.helpers.explain_data import GOOD_REPORT, good_reply, make_image, make_result
from tests.helpers.fake_openai import FakeOpenAI
from vlad.errors import ConfigError
from vlad.explain.backends import BackendSpec, OpenAIBackend, load_backend, parse_backend_spec
from vlad.explain.errors import LVLMError, LVLMUnavailable
from vlad.explain.evidence import build_evidence
from vlad.explain.explainer import explain
from vlad.explain.schema import report_json_schema
from vlad.explain.template import TemplateBackend


@pytest.fixture
def evidence():
    return build_evidence(make_image((600, 400)), make_result((600, 400)), "bottle", tile=128, max_side=200)


def _backend(fake: FakeOpenAI, model: str | None = "fake-vlm", **kw) -> OpenAIBackend:
    kw = {"timeout": 5.0, "max_retries": 0, **kw}
    return load_backend(f"openai:{fake.url}" + (f"#{model}" if model else ""), **kw)


# ---------------------------------------------------------------------- specs
@pytest.mark.parametrize(
    ("spec", "parsed"),
    [
        ("template", BackendSpec("template")),
        ("openai:http://127.0.0.1:8000/v1", BackendSpec("openai", "http://127.0.0.1:8000/v1")),
        (
            "openai:http://h:8000/v1/#Qwen/Qwen2.5-VL-3B-Instruct",
            BackendSpec("openai", "http://h:8000/v1", "Qwen/Qwen2.5-VL-3B-Instruct"),
        ),
        ("transformers:/models/qwen", BackendSpec("transformers", "/models/qwen")),
    ],
)
def test_backend_specs_parse(spec, parsed):
    assert parse_backend_spec(spec) == parsed
    assert str(parsed) == spec.replace("/v1/#", "/v1#")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("vllm", "is not a backend spec"),
        ("openai:127.0.0.1:8000", "must start with http:// or https://"),
        ("http://127.0.0.1:8000/v1", "did you mean openai:http://127.0.0.1:8000/v1?"),
        ("transformers:", "is not a backend spec"),
    ],
)
def test_bad_specs_name_the_accepted_forms(spec, message):
    with pytest.raises(ConfigError, match="accepted: template, openai:") as info:
        parse_backend_spec(spec)
    assert message in str(info.value)


def test_template_spec_needs_nothing():
    assert isinstance(load_backend("template"), TemplateBackend)
    with pytest.raises(ConfigError, match="timeout"):
        load_backend("template", timeout=0)


# ---------------------------------------------------------------------- a good server
def test_report_request_layout_and_schema(fake, evidence):
    fake.replies = [good_reply()]
    outcome = explain(evidence, _backend(fake))
    assert outcome.error is None
    assert not outcome.repaired
    assert outcome.report == GOOD_REPORT
    assert outcome.explanation.backend == f"openai:{fake.url}#fake-vlm"
    assert outcome.explanation.text.startswith("The bottle is anomalous (detector score 0.8000")
    (body,) = fake.chat_requests()
    assert body["model"] == "fake-vlm"
    assert body["temperature"] == 0
    assert body["stream"] is False
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "anomaly_report", "schema": report_json_schema()},
    }
    system, user = body["messages"]
    assert system["role"] == "system"
    assert "visual-inspection assistant" in system["content"]
    parts = user["content"]
    images = [p for p in parts if p["type"] == "image_url"]
    assert len(images) == len(evidence.images) == 3  # photo, overlay, one crop
    captions = [parts[i - 1]["text"] for i, p in enumerate(parts) if p["type"] == "image_url"]
    assert captions[0] == "Picture 1: the photo of the bottle."
    assert captions[2].startswith("Picture 3: close-up of the top left")
    for part in images:
        url = part["image_url"]["url"]
        img = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
        assert url.startswith("data:image/png;base64,")
        assert img.format == "PNG"
        assert max(img.size) <= 200
    assert "- region 1: top left" in parts[-2]["text"]
    assert '"model_says_anomalous"' in parts[-1]["text"]


def test_model_is_taken_from_the_server_list(fake, evidence):
    fake.models = ["first-vlm", "second"]
    fake.replies = [good_reply()]
    backend = _backend(fake, model=None)
    assert explain(evidence, backend).error is None
    assert backend.model == "first-vlm"
    assert fake.chat_requests()[0]["model"] == "first-vlm"
    fake.models = []
    with pytest.raises(LVLMError, match="lists no models; name one: --lvlm openai:"):
        _ = _backend(fake, model=None).model


def test_api_key_comes_from_the_environment(fake, evidence, monkeypatch):
    fake.replies = [good_reply()]
    monkeypatch.setenv("OPENAI_API_KEY", "from-openai")
    monkeypatch.setenv("VLAD_LVLM_API_KEY", "from-vlad")
    explain(evidence, _backend(fake))
    monkeypatch.delenv("VLAD_LVLM_API_KEY")
    explain(evidence, _backend(fake))
    monkeypatch.delenv("OPENAI_API_KEY")
    explain(evidence, _backend(fake))
    keys = [h.get("authorization") for h in fake.headers]
    assert keys == ["Bearer from-vlad", "Bearer from-openai", "Bearer EMPTY"]


# ---------------------------------------------------------------------- response_format rejection, repair, unparseable
def test_rejected_response_format_falls_back_to_the_prompt_and_is_remembered(fake, evidence):
    fake.mode = "reject_response_format"
    fake.replies = [good_reply()]
    backend = _backend(fake)
    outcome = explain(evidence, backend)
    assert outcome.error is None
    assert outcome.report == GOOD_REPORT
    assert ["response_format" in b for b in fake.chat_requests()] == [True, False]
    assert backend.response_format_supported is False
    explain(evidence, backend)
    assert ["response_format" in b for b in fake.chat_requests()] == [True, False, False]
    schema_hint = fake.chat_requests()[1]["messages"][1]["content"][-1]["text"]
    assert '"severity": "none", "minor", "major" or "critical"' in schema_hint


def test_invalid_reply_gets_one_repair_turn(fake, evidence):
    fake.replies = ["Sure! The bottle has a scratch.", good_reply(severity="major")]
    outcome = explain(evidence, _backend(fake))
    assert outcome.repaired
    assert outcome.error is None
    assert outcome.report["severity"] == "major"
    first, second = fake.chat_requests()
    assert second["messages"][:2] == first["messages"]
    assert second["messages"][2] == {"role": "assistant", "content": "Sure! The bottle has a scratch."}
    repair = second["messages"][3]["content"]
    assert repair.startswith("Your reply could not be used: the reply holds no JSON object")


def test_unparseable_after_repair_is_reported_not_hidden(fake, evidence):
    fake.replies = ['{"verdict": "broken"}', "still no json"]
    outcome = explain(evidence, _backend(fake))
    assert outcome.unparseable
    assert outcome.report is None
    assert len(fake.chat_requests()) == 2
    assert "unparseable after one repair turn (the reply holds no JSON object: 'still no json')" in outcome.error
    assert outcome.explanation.backend == "template"
    assert outcome.explanation.text.startswith("[note: the language model openai:")
    assert "vlad's winclip scorer judges this bottle anomalous" in outcome.explanation.text


# ---------------------------------------------------------------------- failures
@pytest.mark.parametrize(
    ("mode", "message", "down"),
    [
        ("500", "failed with HTTP 500: internal engine failure", True),
        ("garbage", "sent a reply that is not an OpenAI chat completion", False),
        ("empty", "sent a chat completion without choices", False),
        ("no_images", "does not accept images (HTTP 400: this model does not support image input)", False),
    ],
)
def test_server_failures_fall_back_to_the_template(fake, evidence, mode, message, down):
    fake.mode = mode
    outcome = explain(evidence, _backend(fake))
    assert message in outcome.error
    assert outcome.error.endswith("the template explanation was used instead")
    assert outcome.report is None
    assert outcome.backend_down is down
    assert "\n" not in outcome.error
    assert outcome.explanation.text.startswith("[note: the language model")
    assert "judges this bottle" in outcome.explanation.text


def test_http_500_is_retried_a_bounded_number_of_times(fake, evidence):
    fake.mode = "500"
    explain(evidence, _backend(fake, max_retries=2))
    assert len(fake.chat_requests()) == 3


def test_timeout(fake, evidence):
    fake.mode, fake.delay = "slow", 2.0
    outcome = explain(evidence, _backend(fake, timeout=0.5))
    assert "did not answer within 0.5 s (raise --lvlm-timeout)" in outcome.error
    assert outcome.backend_down


def test_server_down(evidence):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = load_backend(f"openai:http://127.0.0.1:{port}/v1#m", max_retries=0, timeout=2)
    outcome = explain(evidence, backend)
    assert f"cannot reach the LVLM server at http://127.0.0.1:{port}/v1" in outcome.error
    assert "Connection refused" in outcome.error
    assert outcome.backend_down


def test_wrong_model_name(fake, evidence):
    outcome = explain(evidence, _backend(fake, model="no-such-model"))
    assert "does not serve model 'no-such-model' (HTTP 404: The model `no-such-model` does not exist.)" in outcome.error


def test_url_without_v1(fake, evidence):
    backend = load_backend(f"openai:{fake.url.removesuffix('/v1')}#fake-vlm", max_retries=0, timeout=5)
    outcome = explain(evidence, backend)
    assert "answered HTTP 404 (no route /chat/completions); check that the URL ends in /v1" in outcome.error


def test_wait_ready(fake):
    assert _backend(fake).wait_ready(5) == ["fake-vlm"]
    fake.stop()
    start = time.monotonic()
    with pytest.raises(LVLMUnavailable, match="cannot reach the LVLM server"):
        _backend(fake).wait_ready(1.0)
    assert 0.9 < time.monotonic() - start < 5


# ---------------------------------------------------------------------- capability check
def test_check_reports_each_capability(fake):
    fake.replies = ['{"ok": true}']
    rows = {item: (ok, detail) for item, ok, detail in _backend(fake, model=None).check()}
    assert rows["reachable"][0] is True
    assert "fake-vlm" in rows["reachable"][1]
    assert rows["model"] == (True, "fake-vlm (listed); a text request succeeded")
    assert rows["images"] == (True, "a 32x32 image added 7 prompt tokens")
    assert rows["response_format"] == (True, "accepted; the reply followed the JSON schema")


def test_check_finds_refusals(fake):
    fake.mode = "reject_response_format"
    rows = {item: ok for item, ok, _ in _backend(fake).check()}
    assert rows == {"reachable": True, "model": True, "images": True, "response_format": False}
    fake.mode = "no_images"
    rows = {item: (ok, detail) for item, ok, detail in _backend(fake).check()}
    assert rows["images"][0] is False
    assert "does not accept images" in rows["images"][1]
    assert rows["response_format"][0] is None  # accepted, but the reply ("hello") did not follow it


def test_check_of_a_wrong_model_and_a_dead_server(fake):
    rows = _backend(fake, model="nope").check()
    assert rows[-1][0] == "model"
    assert rows[-1][1] is False
    assert "does not serve model 'nope'" in rows[-1][2]
    fake.stop()
    rows = _backend(fake).check()
    assert rows == [("reachable", False, rows[0][2])]
    assert "cannot reach the LVLM server" in rows[0][2]


def test_request_messages_are_plain_json(fake, evidence):
    """What is sent survives a JSON round trip (no PIL objects or numpy scalars in the payload)."""
    fake.replies = [good_reply()]
    explain(evidence, _backend(fake))
    body = fake.chat_requests()[0]
    assert json.loads(json.dumps(body)) == body
