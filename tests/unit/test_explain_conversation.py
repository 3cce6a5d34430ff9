"""Conversation: pictures sent once, streaming, history trimmed to the context, bad user messages, model failures."""

from __future__ import annotations

import pytest

from tests.helpers.explain_data import good_reply, make_image, make_result
from tests.helpers.fake_openai import FakeOpenAI
from vlad.errors import ConfigError
from vlad.explain.backends import load_backend
from vlad.explain.conversation import Conversation, estimate_tokens
from vlad.explain.evidence import build_evidence, png_data_url


@pytest.fixture
def evidence():
    return build_evidence(make_image((600, 400)), make_result((600, 400)), "bottle", tile=128, max_side=112)


def _conv(fake: FakeOpenAI, evidence, **kw) -> Conversation:
    backend = load_backend(f"openai:{fake.url}#fake-vlm", max_retries=0, timeout=5)
    return Conversation(evidence, backend, **kw)


def _images_per_message(body: dict) -> list[int]:
    return [
        sum(p.get("type") == "image_url" for p in m["content"]) if isinstance(m["content"], list) else 0
        for m in body["messages"]
    ]


def test_three_turns_send_the_pictures_once_and_stream(fake, evidence):
    fake.replies = ["It is at the top left of the rim.", "About two percent of the image.", "Fairly sure."]
    conv = _conv(fake, evidence)
    answers = []
    for question in ("Where is the defect?", "How big is it?", "How sure are you?"):
        pieces = list(conv.ask(question))
        assert len(pieces) > 1  # streamed in pieces
        answers.append("".join(pieces))
    assert answers == ["It is at the top left of the rim.", "About two percent of the image.", "Fairly sure."]
    bodies = fake.chat_requests()
    assert [b["stream"] for b in bodies] == [True, True, True]
    assert _images_per_message(bodies[0]) == [0, 3]
    assert _images_per_message(bodies[2]) == [0, 3, 0, 0, 0, 0]  # system, U1 (pictures), A1, U2, A2, U3
    assert bodies[2]["messages"][1] == bodies[0]["messages"][1]
    assert bodies[2]["messages"][-1] == {"role": "user", "content": "How sure are you?"}
    assert bodies[2]["messages"][2] == {"role": "assistant", "content": answers[0]}
    assert conv.turns == 3
    assert len(conv.messages) == 7


def test_explanation_first_then_questions(fake, evidence):
    fake.replies = [good_reply(), "At the top left."]
    conv = _conv(fake, evidence)
    outcome = conv.explain()
    assert outcome.report is not None
    assert "".join(conv.ask("where?")) == "At the top left."
    body = fake.chat_requests()[-1]
    assert [m["role"] for m in body["messages"]] == ["system", "user", "assistant", "user"]
    assert body["messages"][2]["content"] == outcome.explanation.text  # the rendered text, not the raw JSON
    assert _images_per_message(body) == [0, 3, 0, 0]


def test_history_is_trimmed_to_the_context_and_says_so(fake, evidence):
    fake.replies = ["x" * 350]  # ~100 tokens per answer
    conv = _conv(fake, evidence, context_tokens=900, max_tokens=100)
    anchor = estimate_tokens(conv.messages + [conv._user_message("q")])
    assert anchor < conv.budget  # the pictures and facts fit
    notes = []
    for i in range(6):
        pieces = list(conv.ask(f"question {i}"))
        notes += [p for p in pieces if p.startswith("[note: dropped")]
    assert notes
    assert "to fit the 900-token context" in notes[0]
    last = fake.chat_requests()[-1]["messages"]
    assert estimate_tokens(last) <= conv.budget
    assert last[:3] == conv.messages[:3]  # system, first user turn with the pictures, first answer kept
    assert last[-1] == {"role": "user", "content": "question 5"}
    assert len(last) < len(conv.messages) + 1
    assert [m["role"] for m in last] == [
        "system",
        "user",
        "assistant",
        *["user", "assistant"] * ((len(last) - 4) // 2),
        "user",
    ]
    assert conv.notices == [n.strip() for n in notes]


def test_evidence_larger_than_the_context_is_refused_with_a_template_answer(fake, evidence):
    conv = _conv(fake, evidence, context_tokens=200, max_tokens=50)
    text = "".join(conv.ask("where is it?"))
    assert text.startswith("[note: the pictures, facts and first exchange alone need about")
    assert "--context-tokens" in text
    assert "The anomalous areas are at the top left" in text
    assert fake.chat_requests() == []


def test_empty_and_huge_messages_are_not_sent(fake, evidence):
    conv = _conv(fake, evidence, max_user_chars=100)
    assert "".join(conv.ask("   ")) == "Please type a question about the image (for example: where is the defect?)."
    assert "".join(conv.ask("y" * 101)) == (
        "Your message has 101 characters; the limit is 100. Please shorten it (a question, not a document)."
    )
    assert fake.chat_requests() == []
    assert conv.turns == 0


def test_model_failure_mid_conversation_answers_from_the_facts(fake, evidence):
    fake.replies = ["At the top left."]
    conv = _conv(fake, evidence)
    assert "".join(conv.ask("where?")) == "At the top left."
    fake.mode = "500"
    text = "".join(conv.ask("how big is it?"))
    assert text.startswith("[note: the language model openai:")
    assert "failed with HTTP 500" in text
    assert "covering 0.75 % of the image" in text
    assert conv.messages[-1]["content"].startswith("2 areas are above the pixel threshold")  # the note is not history


def test_template_conversation_keeps_history_without_a_model(evidence):
    conv = Conversation(evidence)
    assert conv.explain().explanation.backend == "template"
    assert "".join(conv.ask("what rule fired?")) == "No rule fired: no rules changed this result."
    assert [m["role"] for m in conv.messages] == ["system", "user", "assistant", "user", "assistant"]


def test_new_facts_reach_later_answers_and_the_model_once(fake, evidence):
    from vlad.thresholds import Thresholds

    result = evidence.result
    moved = Thresholds.of(result).with_sensitivity(0.9).apply(result)
    assert moved.threshold != result.threshold
    new = build_evidence(make_image((600, 400)), moved, "bottle", tile=128, max_side=112)
    template = Conversation(evidence)
    template.explain()
    template.update(new, "the sensitivity was set to 0.90")
    assert f"against a threshold of {moved.threshold:.4f}" in "".join(template.ask("how sure?"))
    fake.replies = ["At the top left.", "Sure.", "Still sure."]
    conv = _conv(fake, evidence)
    for question in ("where?", "how sure?", "really?"):
        if question == "how sure?":
            conv.update(new, "the sensitivity was set to 0.90")
        "".join(conv.ask(question))
    bodies = fake.chat_requests()
    told, later = (b["messages"][-1]["content"] for b in bodies[1:])
    assert told.startswith("[The detector's result changed (the sensitivity was set to 0.90); these facts replace")
    assert f"against the threshold {moved.threshold:.4f}" in told
    assert told.endswith("\n\nhow sure?")
    assert later == "really?"  # told once
    assert _images_per_message(bodies[2]) == [0, 3, 0, 0, 0, 0]  # the pictures are not sent again


def test_options_are_checked(evidence):
    with pytest.raises(ConfigError, match="max_tokens \\(512\\) must be smaller than context_tokens \\(256\\)"):
        Conversation(evidence, context_tokens=256)
    with pytest.raises(ConfigError, match="context_tokens must be a positive integer"):
        Conversation(evidence, context_tokens=0)


def test_token_estimate_reads_the_picture_size():
    url = png_data_url(make_image((280, 140)), 512)
    message = {
        "role": "user",
        "content": [{"type": "text", "text": "x" * 35}, {"type": "image_url", "image_url": {"url": url}}],
    }
    assert estimate_tokens([message]) == 4 + 10 + (10 * 5 + 2)
    unknown = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.jpg"}}]}
    assert estimate_tokens([unknown]) == 4 + 1024
    assert estimate_tokens([{"role": "assistant", "content": "abcdefg"}]) == 4 + 2
