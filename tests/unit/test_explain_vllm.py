"""The openai: backend against a fake server that answers as vLLM does (``FakeOpenAI.like_vllm``): pinned sampling,
replies cut at ``max_tokens``, the per-prompt picture limit, schemas xgrammar refuses, the context length from
``/v1/models`` and vLLM's context-length errors."""

from __future__ import annotations

import argparse

import pytest

from tests.helpers.explain_data import GOOD_REPORT, good_reply, make_image, make_result
from tests.helpers.fake_openai import FakeOpenAI, _prompt_tokens
from vlad.explain.backends import load_backend
from vlad.explain.conversation import Conversation
from vlad.explain.errors import LVLMError, LVLMTruncated, TooManyImages
from vlad.explain.evidence import build_evidence
from vlad.explain.explainer import explain, fewer_pictures, report_messages
from vlad.explain.rows import ExplainOptions, RowExplainer

NEUTRAL = {"temperature": 0.0, "top_p": 1.0, "top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0}


@pytest.fixture
def evidence():
    return build_evidence(make_image((600, 400)), make_result((600, 400)), "bottle", tile=128, max_side=112)


def _backend(fake: FakeOpenAI, model: str | None = "fake-vlm"):
    return load_backend(f"openai:{fake.url}" + (f"#{model}" if model else ""), timeout=5, max_retries=0)


def _images(body: dict) -> int:
    return sum(
        p.get("type") == "image_url" for m in body["messages"] if isinstance(m["content"], list) for p in m["content"]
    )


# ---------------------------------------------------------------------- a. sampling
@pytest.mark.parametrize("model", ["fake-vlm", None])
def test_every_request_pins_the_sampling(fake, evidence, model):
    fake.like_vllm()
    fake.replies = [good_reply(), "At the top left."]
    backend = _backend(fake, model)
    assert explain(evidence, backend).error is None
    conv = Conversation(evidence, backend)
    assert "".join(conv.ask("where?")) == "At the top left."
    bodies = fake.chat_requests()
    assert len(bodies) == 2
    for body in bodies:
        assert {k: body[k] for k in NEUTRAL} == NEUTRAL


def test_the_extra_fields_go_only_to_vllm(fake, evidence):
    fake.replies = [good_reply()]
    explain(evidence, _backend(fake, model=None))  # listed first: owned_by "fake", not vLLM
    (body,) = fake.chat_requests()
    assert (body["temperature"], body["top_p"]) == (0.0, 1.0)
    assert not {"top_k", "min_p", "repetition_penalty"} & set(body)


def test_refused_extra_fields_are_dropped_and_remembered(fake, evidence):
    fake.mode = "strict_fields"  # as transformers serve: HTTP 422 "Unexpected fields in the request"
    fake.replies = [good_reply()]
    backend = _backend(fake)
    assert explain(evidence, backend).error is None
    assert explain(evidence, backend).error is None
    assert ["top_k" in b for b in fake.chat_requests()] == [True, False, False]
    assert backend.sampling_extras_supported is False
    assert all(b["temperature"] == 0.0 and b["top_p"] == 1.0 for b in fake.chat_requests())


# ---------------------------------------------------------------------- b. finish_reason "length"
def test_a_cut_reply_is_asked_again_with_twice_the_tokens(fake, evidence):
    fake.like_vllm(max_model_len=100_000)
    fake.replies = [good_reply()]  # about 58 tokens at 4 characters a token
    backend = _backend(fake)
    outcome = explain(evidence, backend, max_tokens=40)
    assert outcome.error is None
    assert outcome.report == GOOD_REPORT
    assert [b["max_tokens"] for b in fake.chat_requests()] == [40, 80]
    assert backend.last_finish_reason == "stop"


def test_the_second_try_is_capped_by_the_context(fake, evidence):
    fake.like_vllm()
    fake.replies = [good_reply()]
    prompt = _prompt_tokens(fake, {"messages": report_messages(evidence)})
    fake.max_model_len = prompt + 60
    outcome = explain(evidence, _backend(fake), max_tokens=40)
    assert outcome.error is None
    assert [b["max_tokens"] for b in fake.chat_requests()] == [40, 60]


def test_a_reply_cut_twice_is_reported_as_truncated_not_as_invalid_json(fake, evidence):
    fake.like_vllm(max_model_len=100_000)
    fake.replies = ['{"verdict": "anomalous", "rationale": "' + "very long " * 100]
    outcome = explain(evidence, _backend(fake), max_tokens=20)
    assert [b["max_tokens"] for b in fake.chat_requests()] == [20, 40, 20, 40]  # report, retry, repair, retry
    repair = fake.chat_requests()[2]["messages"][-1]["content"]
    assert repair.startswith("Your reply could not be used: truncated: the answer hit the 40-token limit")
    assert outcome.unparseable
    assert outcome.truncated
    assert outcome.failure == (
        "truncated: the answer hit the 40-token limit, also when asked again with more tokens; raise --lvlm-max-tokens"
    )
    assert "no JSON object" not in outcome.error
    assert outcome.report is None


def test_without_a_reported_context_a_cut_reply_is_not_asked_again(fake, evidence):
    fake.chars_per_token = 4  # counts tokens, but lists no max_model_len (as transformers serve)
    fake.replies = ["x" * 400]
    backend = _backend(fake)
    with pytest.raises(LVLMTruncated, match=r"^truncated: the answer hit the 20-token limit \(raise") as info:
        backend.complete([{"role": "user", "content": "hi"}], max_tokens=20)
    assert [b["max_tokens"] for b in fake.chat_requests()] == [20]
    assert info.value.partial == "x" * 80


def test_a_cut_streamed_answer_is_kept_with_a_note(fake, evidence):
    fake.like_vllm()
    fake.replies = ["The scratch runs along the rim " * 10]
    conv = Conversation(evidence, _backend(fake), max_tokens=10)
    answer = "".join(conv.ask("where?"))
    assert answer == ("The scratch runs along the rim " * 10)[:40]
    assert conv.messages[-1] == {"role": "assistant", "content": answer}
    assert conv.last_note == (
        f"[note: the language model openai:{fake.url}#fake-vlm stopped early (truncated: the answer hit the 10-token "
        "limit; raise --lvlm-max-tokens)]"
    )
    assert conv.notices == [conv.last_note]
    assert len(fake.chat_requests()) == 1
    fake.replies = ["Short."]
    assert "".join(conv.ask("sure?")) == "Short."
    assert conv.last_note is None


# ---------------------------------------------------------------------- c. --limit-mm-per-prompt
def test_too_many_images_is_said_as_such_with_the_fix(fake, evidence):
    fake.like_vllm(image_limit=1)
    backend = _backend(fake)
    messages = report_messages(evidence)
    with pytest.raises(TooManyImages) as info:
        backend.complete(messages)
    assert str(info.value) == (
        f"too many images for this server (--limit-mm-per-prompt): {fake.url} takes at most 1 per prompt and this "
        "request had 3; start vLLM with --limit-mm-per-prompt '{\"image\": 7}' or send fewer pictures"
    )
    assert info.value.limit == backend.image_limit == 1


@pytest.mark.parametrize(("limit", "kinds"), [(1, ["overlay"]), (2, ["image", "overlay"])])
def test_the_explainer_asks_again_with_the_pictures_that_matter_most(fake, evidence, limit, kinds):
    fake.like_vllm(image_limit=limit)
    fake.replies = [good_reply()]
    backend = _backend(fake)
    outcome = explain(evidence, backend)
    assert outcome.error is None
    assert outcome.report == GOOD_REPORT
    assert [_images(b) for b in fake.chat_requests()] == [3, limit]
    assert [p.kind for p in fewer_pictures(evidence, limit).images] == kinds
    assert outcome.warning.startswith(f"[note: the language model server takes at most {limit} picture(s) per request")
    explain(evidence, backend)  # remembered: no refusal this time
    assert [_images(b) for b in fake.chat_requests()] == [3, limit, limit]


def test_a_row_carries_the_fewer_pictures_note(fake, evidence):
    fake.like_vllm(image_limit=1)
    fake.replies = [good_reply()]
    row = RowExplainer(ExplainOptions(lvlm=f"openai:{fake.url}#fake-vlm")).explain(
        make_image((600, 400)), make_result((600, 400)), "bottle"
    )
    assert row["report"] == GOOD_REPORT
    assert "only 1 (overlay) of the" in row["explain_error"]


def test_a_limit_of_zero_means_no_images(fake, evidence):
    fake.like_vllm(image_limit=0)
    outcome = explain(evidence, _backend(fake))
    assert "does not accept images (HTTP 400: At most 0 image(s) may be provided in one prompt.)" in outcome.error
    assert "--limit-mm-per-prompt '{\"image\": 7}'" in outcome.error
    assert len(fake.chat_requests()) == 1


def test_the_conversation_sends_fewer_pictures_after_a_refusal(fake, evidence):
    fake.like_vllm(image_limit=1)
    fake.replies = ["At the top left.", "Two percent."]
    conv = Conversation(evidence, _backend(fake))
    first = list(conv.ask("where?"))
    assert first[0].startswith("[note: the language model server takes at most 1 picture(s) per request")
    assert "".join(first[1:]) == "At the top left."
    assert "".join(conv.ask("how big?")) == "Two percent."
    assert [_images(b) for b in fake.chat_requests()] == [3, 1, 1]
    assert _images({"messages": conv.messages}) == 1


# ---------------------------------------------------------------------- d. schemas the server cannot compile
def test_a_schema_vllm_cannot_compile_is_left_out(fake, evidence):
    fake.like_vllm()
    fake.mode = "reject_schema"
    fake.replies = [good_reply()]
    backend = _backend(fake)
    assert explain(evidence, backend).report == GOOD_REPORT
    assert explain(evidence, backend).report == GOOD_REPORT
    assert ["response_format" in b for b in fake.chat_requests()] == [True, False, False]
    assert backend.response_format_supported is None  # the field itself is fine; this schema is not


def test_error_bodies_are_read_in_vllm_format(fake, evidence):
    fake.like_vllm()
    outcome = explain(evidence, _backend(fake, model="other"))
    assert "does not serve model 'other' (HTTP 404: The model `other` does not exist.)" in outcome.error


# ---------------------------------------------------------------------- e. the context from /v1/models
def test_the_context_comes_from_the_models_list(fake, evidence):
    fake.like_vllm(max_model_len=3000)
    backend = _backend(fake)
    assert backend.context_length() == 3000
    assert Conversation(evidence, backend).context_tokens == 3000
    assert Conversation(evidence, backend, context_tokens=8192).context_tokens == 3000  # capped by the server
    assert Conversation(evidence, backend, context_tokens=2000).context_tokens == 2000
    fake.max_model_len = None
    assert _backend(fake).context_length() is None
    assert Conversation(evidence, _backend(fake)).context_tokens == 8192


def test_lvlm_check_names_the_context(fake):
    from vlad.cli.chat import run_lvlm_check

    fake.like_vllm(max_model_len=3000)
    fake.replies = ['{"ok": true}']
    rows = {item: (ok, detail) for item, ok, detail in _backend(fake).check()}
    assert rows["reachable"][1].endswith("models listed: ['fake-vlm']; context 3000 tokens (max_model_len)")
    args = argparse.Namespace(lvlm=f"openai:{fake.url}", lvlm_timeout=5.0, wait=None)
    assert run_lvlm_check(args) == 0


def test_too_large_max_tokens_is_lowered_to_the_room_vllm_reports(fake, evidence):
    fake.like_vllm()
    fake.replies = [good_reply()]
    prompt = _prompt_tokens(fake, {"messages": report_messages(evidence)})
    fake.max_model_len = prompt + 100
    outcome = explain(evidence, _backend(fake), max_tokens=512)
    assert outcome.error is None
    assert [b["max_tokens"] for b in fake.chat_requests()] == [512, 100]


def test_a_prompt_longer_than_the_context_is_one_line(fake, evidence):
    fake.like_vllm(max_model_len=50)
    outcome = explain(evidence, _backend(fake), max_tokens=16)
    prompt = _prompt_tokens(fake, fake.chat_requests()[0])
    assert outcome.error.startswith(
        f"the prompt needs {prompt} of the model's 50-token context, too little room for an answer (vLLM "
        "--max-model-len); use smaller pictures (--max-image-side), fewer turns or a longer context"
    )
    assert "\n" not in outcome.error
    assert len(fake.chat_requests()) == 1


def test_the_conversation_trims_to_the_servers_context(fake, evidence):
    fake.like_vllm()
    fake.image_tokens = 14  # Qwen2-VL's count for these 112 x 75 pictures, as the estimate has it
    fake.replies = ["y" * 350]  # 88 tokens
    conv = Conversation(evidence, _backend(fake), max_tokens=100)
    anchor = _prompt_tokens(fake, {"messages": [*conv.messages, conv._user_message("question 0")]})
    fake.max_model_len = anchor + 400
    notes = []
    for i in range(5):
        pieces = list(conv.ask(f"question {i}"))
        notes += [p for p in pieces if p.startswith("[note:")]
    assert conv.context_tokens == fake.max_model_len
    assert notes
    assert all(n.startswith("[note: dropped") for n in notes)
    assert all(m["content"] == "y" * 350 for m in conv.messages if m["role"] == "assistant")
    last = fake.chat_requests()[-1]["messages"]
    assert last[:2] == conv.messages[:2]  # the system prompt and the pictures stay
    assert last[-1]["content"] == "question 4"


def test_no_room_for_the_answer_is_one_line(fake, evidence):
    fake.like_vllm(max_model_len=300)
    conv = Conversation(evidence, _backend(fake), max_tokens=512)
    text = "".join(conv.ask("where is it?"))
    assert text.startswith(
        "[note: the model's 300-token context is not larger than the 512 tokens reserved for the answer; lower "
        "--lvlm-max-tokens or serve the model with a longer context (vLLM --max-model-len)]\n"
    )
    assert fake.chat_requests() == []


def test_errors_stay_lvlm_errors(fake):
    fake.like_vllm(max_model_len=10)
    with pytest.raises(LVLMError):
        _backend(fake).complete([{"role": "user", "content": "hello " * 40}], max_tokens=4)
