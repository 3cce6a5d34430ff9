"""A multi-turn conversation about one image (and optionally a normal reference), kept as OpenAI chat messages.

The pictures travel once, in the first user turn; later user turns are text. The API is stateless, so every request
carries the history -- trimmed to the context budget: the system message and the first exchange (pictures, facts and
the first answer) always stay, the oldest later exchanges go first, and the answer stream says when that happened.
The context is the server's (vLLM lists ``max_model_len`` in ``GET /v1/models``) unless a smaller one is given. Token
counts are estimates (see :func:`estimate_tokens`), not the server's tokenizer; a server that counts more than the
estimate answers with the room it has left, and the backend asks for that many tokens instead.

An answer cut at the token limit is kept, and ``last_note`` (and ``notices``) says so. A server that takes fewer
pictures per request than the first turn has gets the pictures that matter most
(:func:`~vlad.explain.explainer.fewer_pictures`), asked once more, with a note.
"""

from __future__ import annotations

import base64
import logging
import math
from collections.abc import Iterator
from typing import Any

from vlad.errors import ConfigError
from vlad.explain.errors import LVLMError, LVLMTruncated, TooManyImages
from vlad.explain.evidence import Evidence
from vlad.explain.explainer import (
    DEFAULT_MAX_TOKENS,
    ExplainOutcome,
    evidence_parts,
    explain,
    facts_text,
    fewer_pictures,
    pictures_note,
    report_messages,
    system_message,
)
from vlad.explain.template import answer as template_answer
from vlad.explain.template import prompts

logger = logging.getLogger(__name__)

Message = dict[str, Any]
DEFAULT_CONTEXT_TOKENS = 8192
DEFAULT_MAX_USER_CHARS = 4000
CHARS_PER_TOKEN = 3.5
PIXELS_PER_IMAGE_TOKEN = 28  # Qwen2-VL / Qwen2.5-VL: one token per 28 x 28 pixels after the 2 x 2 merge
UNKNOWN_IMAGE_TOKENS = 1024


def estimate_tokens(messages: list[Message]) -> int:
    """A rough token count of chat messages: text at 3.5 characters per token, 4 tokens of framing per message, and
    each PNG data-URL picture at one token per 28 x 28 pixels (Qwen2-VL's rate) plus 2; pictures of unknown size
    count 1024. Other models tokenise differently; leave headroom in the budget."""
    total = 0
    for message in messages:
        total += 4
        content = message.get("content") or ""
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        for part in parts:
            if part.get("type") == "image_url":
                url = part["image_url"]["url"] if isinstance(part["image_url"], dict) else part["image_url"]
                total += _image_tokens(url)
            else:
                total += math.ceil(len(part.get("text", "")) / CHARS_PER_TOKEN)
    return total


def _image_tokens(url: str) -> int:
    size = _png_size(url)
    if size is None:
        return UNKNOWN_IMAGE_TOKENS
    w, h = size
    return math.ceil(w / PIXELS_PER_IMAGE_TOKEN) * math.ceil(h / PIXELS_PER_IMAGE_TOKEN) + 2


def _count_pictures(messages: list[Message]) -> int:
    return sum(
        1 for m in messages if isinstance(m.get("content"), list) for p in m["content"] if p.get("type") == "image_url"
    )


def _png_size(url: str) -> tuple[int, int] | None:
    """(width, height) from a PNG data URL's IHDR chunk, without decoding the picture."""
    prefix = "data:image/png;base64,"
    if not url.startswith(prefix):
        return None
    try:
        head = base64.b64decode(url[len(prefix) : len(prefix) + 32])
    except ValueError:
        return None
    if len(head) < 24 or head[:8] != b"\x89PNG\r\n\x1a\n":
        return None
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


class Conversation:
    """A conversation about one image.

    Args:
        evidence: from :func:`vlad.explain.evidence.build_evidence`.
        backend: a backend object or spec string (default ``template``, no model).
        context_tokens: the model's context length; requests are trimmed to ``context_tokens - max_tokens``. None
            (the default): the length the server reports (``context_length()`` of the backend, vLLM's
            ``max_model_len``), else 8192; a given length larger than the server's is capped by it.
        max_tokens: most tokens per answer.
        max_user_chars: longer user messages are refused with a message (nothing is sent).

    Attributes:
        messages: the full history (OpenAI chat messages; the first user turn holds the pictures).
        notices: every note the conversation gave (trimming, fallbacks, cut answers), in order.
        last_note: a note about the last answer that is not part of its streamed text (it was cut at the token
            limit), or None; for the caller to show after the answer.
    """

    def __init__(
        self,
        evidence: Evidence,
        backend: Any = "template",
        *,
        context_tokens: int | None = None,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        max_user_chars: int = DEFAULT_MAX_USER_CHARS,
    ) -> None:
        if isinstance(backend, str):
            from vlad.explain.backends import load_backend

            backend = load_backend(backend)
        for name, value in (
            ("context_tokens", DEFAULT_CONTEXT_TOKENS if context_tokens is None else context_tokens),
            ("max_tokens", max_tokens),
            ("max_user_chars", max_user_chars),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if context_tokens is not None and max_tokens >= context_tokens:
            raise ConfigError(f"max_tokens ({max_tokens}) must be smaller than context_tokens ({context_tokens})")
        self.evidence = evidence
        self.backend = backend
        self._context_setting = context_tokens
        self._context: int | None = None
        self._first_question: str | None = None
        self.last_note: str | None = None
        self.max_tokens = max_tokens
        self.max_user_chars = max_user_chars
        self.messages: list[Message] = [system_message()]
        self.notices: list[str] = []
        self.outcome: ExplainOutcome | None = None
        self._last_failure: str | None = None
        self._update: str | None = None

    @property
    def context_tokens(self) -> int:
        """The context length used for trimming (see the class's ``context_tokens``); the server is asked once."""
        if self._context is None:
            ask = getattr(self.backend, "context_length", None)
            server = ask() if getattr(self.backend, "is_model", False) and callable(ask) else None
            given = self._context_setting
            self._context = min(given, server) if given and server else given or server or DEFAULT_CONTEXT_TOKENS
            if server is not None:
                logger.info("LVLM %s: context %d tokens (server: %d)", self.backend.spec, self._context, server)
        return self._context

    @property
    def budget(self) -> int:
        """Tokens available for the request (the context minus the answer's reserve)."""
        return self.context_tokens - self.max_tokens

    @property
    def turns(self) -> int:
        """User turns so far."""
        return sum(1 for m in self.messages if m["role"] == "user")

    # ------------------------------------------------------------------ first turn: the explanation
    def explain(self) -> ExplainOutcome:
        """Explains the image (see :func:`vlad.explain.explainer.explain`). As the first exchange it is recorded:
        the pictures and the report request as the user turn, the explanation text as the answer (the rendered
        text, not the raw JSON, so that later answers stay prose)."""
        outcome = explain(self.evidence, self.backend, max_tokens=self.max_tokens)
        if self.turns == 0:
            self.messages.append(report_messages(self._shown())[1])
            self.messages.append({"role": "assistant", "content": outcome.assistant_text})
        if outcome.warning:
            self.notices.append(outcome.warning)
        if outcome.error:
            self.notices.append(outcome.error)
            self._last_failure = outcome.failure
        self.outcome = outcome
        return outcome

    def update(self, evidence: Evidence, reason: str) -> None:
        """New facts about the same image (another threshold, product or rules; ``reason`` says which): later answers
        use them and the history is kept. A model is told in the next user turn what changed and the new facts (the
        pictures already sent stay; the heat map may differ from the one it saw)."""
        self.evidence = evidence
        if self.turns:
            self._update = prompts()["facts_update"].format(reason=reason, facts=facts_text(evidence.facts)).strip()

    # ------------------------------------------------------------------ questions
    def ask(self, text: str) -> Iterator[str]:
        """Answers a question, streaming the answer's pieces.

        Empty or over-long messages get a clear message and nothing is sent. A trimmed history or a model failure
        is announced in a ``[note: ...]`` line in the stream (not recorded as part of the answer); after a failure the
        answer comes from the template's facts.
        """
        t = prompts()["template"]
        question = (text or "").strip()
        if not question:
            yield t["empty_question"].strip()
            return
        if len(question) > self.max_user_chars:
            yield t["long_question"].format(chars=len(question), limit=self.max_user_chars).strip()
            return
        self.last_note = None
        user = self._user_message(question)
        self._update = None  # told once, in this turn
        if not getattr(self.backend, "is_model", False):
            reply = template_answer(question, self.evidence.facts)
            self._record(user, reply)
            yield reply
            return
        if self.turns == 0:
            self._first_question = question
        user, reply = yield from self._answer(user, question)
        self._record(user, reply)

    def _answer(self, user: Message, question: str, retry: bool = True) -> Iterator[str]:
        """Streams the answer to ``user`` (trimmed history, notes first); returns (the user turn as sent, the
        answer). A refusal for too many pictures rebuilds the first turn with fewer and asks once more."""
        request, notice = self._fit(user)
        if notice:
            self.notices.append(notice)
            yield notice + "\n"
        if request is None:
            return user, (yield from self._fallback_answer(question))
        try:
            return user, (yield from self._stream(request, question, refusable=retry))
        except TooManyImages:
            first = self._first_turn()
            if self.turns == 0:
                user = first
            else:
                self.messages[1] = first
            note = pictures_note(self.evidence, self._shown())
            if note:
                self.notices.append(note)
                yield note + "\n"
            return (yield from self._answer(user, question, retry=False))

    def _shown(self) -> Evidence:
        """The evidence with at most the pictures the server takes per request (once it has said)."""
        return fewer_pictures(self.evidence, getattr(self.backend, "image_limit", None))

    def _first_turn(self) -> Message:
        """The first user turn, rebuilt: the report request, or the first chat question, with :meth:`_shown`."""
        if self._first_question is None:
            return report_messages(self._shown())[1]
        return self._user_message(self._first_question, first=True)

    def _user_message(self, question: str, *, first: bool = False) -> Message:
        if self.turns and not first:
            return {"role": "user", "content": f"{self._update}\n\n{question}" if self._update else question}
        text = prompts()["chat_first_turn"].format(object=self.evidence.object_name, question=question)
        return {"role": "user", "content": [*evidence_parts(self._shown()), {"type": "text", "text": text}]}

    def _stream(self, request: list[Message], question: str, *, refusable: bool = False) -> Iterator[str]:
        """Streams the model's answer; on failure, a note and the template's answer. ``refusable``: a refusal for
        too many pictures before any piece is raised (:class:`TooManyImages`) so the caller can ask again."""
        pieces: list[str] = []
        try:
            for piece in self.backend.stream(request, max_tokens=self.max_tokens):
                pieces.append(piece)
                yield piece
            if getattr(self.backend, "last_finish_reason", None) == "length":
                raise LVLMTruncated(
                    f"truncated: the answer hit the {self.max_tokens}-token limit; raise --lvlm-max-tokens",
                    max_tokens=self.max_tokens,
                    partial="".join(pieces),
                )
        except LVLMTruncated as exc:
            logger.info("LVLM %s: %s", self.backend.spec, exc)
            self.last_note = prompts()["template"]["truncated"].format(spec=self.backend.spec, error=exc).strip()
            self.notices.append(self.last_note)
            return "".join(pieces)
        except TooManyImages as exc:
            if refusable and not pieces and 0 < exc.limit < _count_pictures(request):
                raise
            return (yield from self._failed(exc, bool(pieces), question))
        except LVLMError as exc:
            return (yield from self._failed(exc, bool(pieces), question))
        return "".join(pieces)

    def _failed(self, exc: LVLMError, midway: bool, question: str) -> Iterator[str]:
        """A note about the failure and the template's answer (returned as the recorded answer)."""
        logger.info("LVLM %s failed mid-conversation: %s", self.backend.spec, exc)
        key = "fallback_again" if str(exc) == self._last_failure else "fallback"
        note = prompts()["template"][key].format(spec=self.backend.spec, error=exc).strip()
        self._last_failure = str(exc)
        self.notices.append(note)
        fallback = template_answer(question, self.evidence.facts)
        yield ("\n" if midway else "") + note + "\n" + fallback
        return fallback

    def _fallback_answer(self, question: str) -> Iterator[str]:
        reply = template_answer(question, self.evidence.facts)
        yield reply
        return reply

    def _fit(self, user: Message) -> tuple[list[Message] | None, str | None]:
        """The request for a new user turn within the budget, and a notice when history was dropped or the
        anchor (system + first exchange + this turn) alone does not fit (then the request is None)."""
        t = prompts()["template"]
        if self.budget <= 0:
            return None, t["no_room"].format(context=self.context_tokens, answer=self.max_tokens).strip()
        anchor, rest = self.messages[:3], self.messages[3:]
        need = estimate_tokens([*anchor, user])
        if need > self.budget:
            return None, t["too_long"].format(tokens=need, budget=self.budget).strip()
        dropped = 0
        while rest and estimate_tokens([*anchor, *rest, user]) > self.budget:
            rest = rest[2:]  # one (user, assistant) exchange
            dropped += 1
        notice = t["trimmed"].format(dropped=dropped, budget=self.context_tokens).strip() if dropped else None
        return [*anchor, *rest, user], notice

    def _record(self, user: Message, reply: str) -> None:
        self.messages.append(user)
        self.messages.append({"role": "assistant", "content": reply})

    def request_messages(self, question: str) -> list[Message]:
        """The messages that would be sent for ``question`` now (trimmed), for inspection and tests."""
        request, _ = self._fit(self._user_message(question))
        return request or []
