"""Language-model backends behind one interface, chosen by a spec string.

- ``template`` -- no model (:class:`vlad.explain.template.TemplateBackend`), the default.
- ``openai:<base_url>[#model]`` -- any OpenAI-compatible server: vLLM (the production target), Ollama,
  ``transformers serve`` or OpenAI itself. The API key comes from ``VLAD_LVLM_API_KEY``, else ``OPENAI_API_KEY``,
  else ``EMPTY`` (local servers ignore it). Without ``#model`` the first model ``/v1/models`` lists is used.
  Several comma-separated URLs are replicas of one model, used as one backend with failover
  (:class:`vlad.explain.pool.BackendPool`).
- ``transformers:<model id or local folder>`` -- in process, any image-text-to-text model transformers loads with
  ``AutoModelForImageTextToText`` (Qwen2-VL, LLaVA, ...), on CPU or GPU.
- ``transformers:<base>+lora:<adapter folder>`` -- the same with a peft LoRA adapter on top (e.g. one trained by
  ``vlad train-lvlm``).

A model backend (``is_model`` True) offers ``stream(messages, max_tokens=..., json_schema=...)`` yielding text
chunks, ``complete(...)`` returning the whole reply, and ``check()`` (a list of ``(item, ok, detail)`` rows for
``vlad lvlm-check``). Messages are OpenAI chat messages. Decoding is greedy (temperature 0). Failures raise
:class:`~vlad.explain.errors.LVLMError` subclasses with one-line messages; openai / transformers / torch are imported
only when such a backend is built.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from vlad._optional import require
from vlad.errors import ConfigError
from vlad.explain.errors import (
    ContextTooLong,
    LVLMBadReply,
    LVLMError,
    LVLMTruncated,
    LVLMUnavailable,
    ResponseFormatRejected,
    SamplingRejected,
    SchemaRejected,
    TooManyImages,
)
from vlad.explain.template import TemplateBackend

logger = logging.getLogger(__name__)

SPEC_FORMS = (
    "template, openai:<base_url>[,<base_url>...][#model] (e.g. openai:http://127.0.0.1:8000/v1), "
    "transformers:<model or dir>, transformers:<model or dir>+lora:<adapter dir>"
)
LORA_SEPARATOR = "+lora:"
DEFAULT_TIMEOUT = 60.0
DEFAULT_RETRIES = 2
Message = dict[str, Any]
CheckRow = tuple[str, bool | None, str]


@runtime_checkable
class LVLMBackend(Protocol):
    """The seam every explainer backend implements (:class:`TemplateBackend`, :class:`OpenAIBackend`,
    :class:`TransformersBackend`, and test fakes). Model backends (``is_model`` True) also offer ``stream`` and
    ``complete``; the template answers from facts instead."""

    is_model: bool

    @property
    def spec(self) -> str: ...

    def check(self) -> list[CheckRow]: ...


@runtime_checkable
class ModelBackend(LVLMBackend, Protocol):
    """A backend with a model behind it: the explainer and the rules parser call these two."""

    def stream(
        self, messages: list[Message], *, max_tokens: int = 512, json_schema: dict | None = None
    ) -> Iterator[str]: ...

    def complete(self, messages: list[Message], *, max_tokens: int = 512, json_schema: dict | None = None) -> str: ...


@dataclass(frozen=True)
class BackendSpec:
    """A parsed backend spec: ``kind`` is ``template``, ``openai`` or ``transformers``; ``target`` the URL or model;
    ``model`` the model named after ``#`` (openai only); ``adapter`` the LoRA folder after ``+lora:`` (transformers
    only)."""

    kind: str
    target: str = ""
    model: str | None = None
    adapter: str | None = None

    def __str__(self) -> str:
        if self.kind == "template":
            return "template"
        lora = f"{LORA_SEPARATOR}{self.adapter}" if self.adapter else ""
        return f"{self.kind}:{self.target}" + (f"#{self.model}" if self.model else "") + lora


def parse_backend_spec(spec: str) -> BackendSpec:
    """Parses ``template``, ``openai:URL[#model]``, ``transformers:MODEL`` or ``transformers:MODEL+lora:ADAPTER``.

    Raises:
        ConfigError: for any other form, naming the accepted ones.
    """
    text = (spec or "").strip()
    if text == "template":
        return BackendSpec("template")
    kind, sep, rest = text.partition(":")
    if sep and kind == "openai":
        url, _, model = rest.partition("#")
        urls = [u.strip().rstrip("/") for u in url.split(",")]  # several: replicas (vlad.explain.pool)
        if not all(u.startswith(("http://", "https://")) for u in urls):
            raise ConfigError(
                f"--lvlm {spec!r}: the base URL must start with http:// or https://; accepted: {SPEC_FORMS}"
            )
        return BackendSpec("openai", ",".join(urls), model.strip() or None)
    if sep and kind == "transformers" and rest.strip():
        model, lora, adapter = rest.partition(LORA_SEPARATOR)
        if lora and not (model.strip() and adapter.strip()):
            raise ConfigError(f"--lvlm {spec!r}: write transformers:<model or dir>+lora:<adapter dir>")
        return BackendSpec("transformers", model.strip(), adapter=adapter.strip() or None)
    hint = " (did you mean openai:" + text + "?)" if text.startswith(("http://", "https://")) else ""
    raise ConfigError(f"--lvlm {spec!r} is not a backend spec{hint}; accepted: {SPEC_FORMS}")


def load_backend(
    spec: str, *, timeout: float = DEFAULT_TIMEOUT, max_retries: int = DEFAULT_RETRIES, device: str = "auto"
) -> Any:
    """Builds the backend a spec names (:class:`TemplateBackend`, :class:`OpenAIBackend` or
    :class:`TransformersBackend`). Nothing is contacted or loaded yet.

    Args:
        spec: see :func:`parse_backend_spec`.
        timeout: seconds to wait for a server's answer (openai) or between generated pieces (transformers).
        max_retries: retries of failed connections and HTTP 408/409/429/5xx answers (openai SDK backoff).
        device: ``auto``, ``cpu``, ``cuda[:N]`` or ``mps`` (transformers only).
    """
    parsed = parse_backend_spec(spec)
    if not timeout > 0:
        raise ConfigError(f"LVLM timeout must be a positive number of seconds, got {timeout!r}")
    if parsed.kind == "template":
        return TemplateBackend()
    if parsed.kind == "openai" and "," in parsed.target:
        from vlad.explain.pool import BackendPool

        replicas = [OpenAIBackend(u, parsed.model, timeout=timeout, max_retries=0) for u in parsed.target.split(",")]
        return BackendPool(replicas, spec=str(parsed))
    if parsed.kind == "openai":
        return OpenAIBackend(parsed.target, parsed.model, timeout=timeout, max_retries=max_retries)
    if parsed.adapter is not None:
        from vlad.training_lvlm import read_adapter_config

        read_adapter_config(parsed.adapter)  # a bad folder is a one-line error now, before any model loads
    return TransformersBackend(parsed.target, device=device, timeout=timeout, adapter=parsed.adapter)


def api_key() -> str:
    """``VLAD_LVLM_API_KEY``, else ``OPENAI_API_KEY``, else ``EMPTY``."""
    return os.environ.get("VLAD_LVLM_API_KEY") or os.environ.get("OPENAI_API_KEY") or "EMPTY"


def _one_line(text: object, limit: int = 240) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _error_text(body: object) -> str:
    """The human part of an error body: ``message`` or ``detail`` of a dict (nested ``error`` too), else the text."""
    if isinstance(body, dict):
        inner = body.get("error") if isinstance(body.get("error"), dict) else body
        for key in ("message", "detail"):
            if inner.get(key):
                return str(inner[key])
        return json.dumps(body)
    return "" if body is None else str(body)


def _has_images(messages: list[Message]) -> bool:
    return any(
        isinstance(m.get("content"), list) and any(p.get("type") == "image_url" for p in m["content"]) for m in messages
    )


def _probe_image_url() -> str:
    """A 32 x 32 grey PNG data URL for capability checks."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (128, 128, 128)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


_PROBE_SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}},
    "required": ["ok"],
    "additionalProperties": False,
}


# ---------------------------------------------------------------------- OpenAI-compatible servers
NEUTRAL_SAMPLING: dict[str, float] = {"temperature": 0.0, "top_p": 1.0}
"""Sent with every request: greedy decoding and no nucleus cut, whatever the server's defaults are."""
VLLM_NEUTRAL_EXTRAS: dict[str, float | int] = {"top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0}
"""vLLM's neutral values for the sampling fields it otherwise takes from the model's ``generation_config.json``
(``top_k`` -1 disables top-k in every vLLM release). Sent as extra body fields; dropped for the rest of the run when a
server refuses them (``transformers serve`` answers HTTP 422, OpenAI HTTP 400)."""
MIN_ANSWER_TOKENS = 16
"""Fewer tokens than this left for the answer in the model's context is reported instead of being tried."""
MAX_PICTURES = 7
"""The most pictures vlad sends in one request: photo, overlay, 4 crops and one normal reference."""
_MM_LIMIT = re.compile(r"at most (\d+) image\(s\) may be provided in one (?:prompt|request)", re.IGNORECASE)
_CONTEXT = re.compile(r"maximum context length is (\d+) tokens", re.IGNORECASE)
_INPUT_TOKENS = re.compile(r"request has (\d+) input tokens|\((\d+) in the messages", re.IGNORECASE)
_SCHEMA_ERRORS = (
    "not supported by xgrammar",
    "failed to transform json schema",
    "grammar error",
    "invalid grammar specification",
    "invalid json grammar",
)


def _count_images(messages: list[Message]) -> int:
    return sum(
        1
        for m in messages
        if isinstance(m.get("content"), list)
        for p in m["content"]
        if isinstance(p, dict) and p.get("type") == "image_url"
    )


class OpenAIBackend:
    """A model behind an OpenAI-compatible ``/v1`` API (vLLM, Ollama, ``transformers serve``, OpenAI).

    Every request pins the sampling (:data:`NEUTRAL_SAMPLING`, plus :data:`VLLM_NEUTRAL_EXTRAS` for vLLM), so a
    model's ``generation_config.json`` defaults never apply. ``response_format`` (a JSON schema) is sent
    when a caller passes ``json_schema``; when the server refuses the field (HTTP 400/422 naming ``response_format``)
    the backend remembers that, and when it cannot compile one schema (vLLM's xgrammar / guidance errors) that schema
    is left out from then on. Callers describe the schema in the prompt anyway and validate the reply. A reply cut by
    ``max_tokens`` is asked again once with twice the tokens when the server reports its context (vLLM), within it;
    a reply still cut raises :class:`~vlad.explain.errors.LVLMTruncated`. Too many pictures for the server's
    per-prompt limit raise :class:`~vlad.explain.errors.TooManyImages`, and the limit is kept in ``image_limit``.

    Attributes:
        sampling: the sampling fields sent with every request.
        sampling_extras: the extra (non-OpenAI) sampling fields, sent to vLLM (see :meth:`_send_extras`).
        image_limit: the server's pictures-per-prompt limit once an answer told it, else None.
        last_finish_reason: the ``finish_reason`` of the last reply (``"stop"``, ``"length"``, ...; None if unknown).
    """

    is_model = True

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_RETRIES,
    ) -> None:
        openai = require("openai", "explain", what="--lvlm openai:...")
        self.base_url = base_url.rstrip("/")
        self._model = model
        self.timeout = float(timeout)
        self.response_format_supported: bool | None = None
        self.sampling_extras_supported: bool | None = None
        self.sampling: dict[str, Any] = dict(NEUTRAL_SAMPLING)
        self.sampling_extras: dict[str, Any] = dict(VLLM_NEUTRAL_EXTRAS)
        self.image_limit: int | None = None
        self.last_finish_reason: str | None = None
        self._rejected_schemas: set[str] = set()
        self._cards: dict[str, dict[str, Any]] | None = None
        self._openai = openai
        self.client = openai.OpenAI(
            base_url=self.base_url,
            api_key=api_key(),
            # the SDK's own Timeout type: its HTTP client changes between releases (httpx, httpx2)
            timeout=openai.Timeout(self.timeout, connect=min(10.0, self.timeout)),
            max_retries=max_retries,
        )

    @property
    def spec(self) -> str:
        return f"openai:{self.base_url}" + (f"#{self._model}" if self._model else "")

    # ------------------------------------------------------------------ models
    def list_models(self) -> list[str]:
        """Model ids ``GET /v1/models`` lists (raises :class:`LVLMError` subclasses when the server fails)."""
        try:
            data = self.client.models.list().data
        except Exception as exc:  # noqa: BLE001 -- every SDK failure becomes one clear line
            raise self._describe(exc) from exc
        self._cards = {
            m.id: {"max_model_len": getattr(m, "max_model_len", None), "owned_by": getattr(m, "owned_by", None)}
            for m in data
        }
        return list(self._cards)

    @property
    def model(self) -> str:
        """The model named in the spec, else the first one the server lists."""
        if self._model is None:
            models = self.list_models()
            if not models:
                raise LVLMError(f"the LVLM server {self.base_url} lists no models; name one: --lvlm {self.spec}#MODEL")
            self._model = models[0]
            logger.info("LVLM server %s: using model %s", self.base_url, self._model)
        return self._model

    def context_length(self) -> int | None:
        """The model's context length in tokens as ``GET /v1/models`` reports it (vLLM's ``max_model_len``), or None
        when the server does not say (``transformers serve``, Ollama, OpenAI) or cannot be reached. Asked once."""
        try:
            if self._cards is None:
                self.list_models()
            value = (self._cards or {}).get(self.model, {}).get("max_model_len")
        except LVLMError:
            return None
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None

    def wait_ready(self, timeout: float) -> list[str]:
        """Polls ``/v1/models`` until it answers (vLLM lists the model only once it is loaded) or ``timeout`` s pass.

        Returns:
            The listed model ids.

        Raises:
            LVLMUnavailable: the server did not answer in time.
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                models = self.list_models()
                if models or time.monotonic() >= deadline:
                    return models
            except LVLMUnavailable:
                if time.monotonic() >= deadline:
                    raise
            time.sleep(1.0)

    # ------------------------------------------------------------------ generation
    def _request(self, messages: list[Message], max_tokens: int, json_schema: dict | None, stream: bool) -> Any:
        return self._create(messages, max_tokens, json_schema, stream)[0]

    def _create(
        self, messages: list[Message], max_tokens: int, json_schema: dict | None, stream: bool
    ) -> tuple[Any, int]:
        """Sends a chat completion request, dropping what the server refuses (the extra sampling fields, the schema,
        ``response_format`` altogether) and lowering ``max_tokens`` to the room the server says is left.

        Returns:
            (the SDK response or stream, the ``max_tokens`` finally sent).
        """
        schema = self._usable_schema(json_schema)
        for _ in range(5):  # each retry drops one refused thing, so a few suffice
            kwargs = self._kwargs(messages, max_tokens, schema, stream)
            try:
                return self.client.chat.completions.create(**kwargs), max_tokens
            except Exception as exc:  # noqa: BLE001
                error = self._describe(exc, images=_count_images(messages))
                adapted = self._adapt(error, "extra_body" in kwargs, schema, max_tokens)
                if adapted is None:
                    raise error from exc
                schema, max_tokens = adapted
        raise LVLMError(f"the LVLM server {self.base_url} kept refusing the request")

    def _adapt(
        self, error: LVLMError, sent_extras: bool, schema: dict | None, max_tokens: int
    ) -> tuple[dict | None, int] | None:
        """What to send next after ``error``: (schema, max_tokens), remembering what the server refuses; None when
        the error is final."""
        url = self.base_url
        if isinstance(error, SamplingRejected) and sent_extras:
            self.sampling_extras_supported = False
            logger.info("%s refuses %s; sending only %s", url, sorted(self.sampling_extras), sorted(self.sampling))
            return schema, max_tokens
        if isinstance(error, SchemaRejected) and schema is not None:
            self._rejected_schemas.add(str(schema.get("name")))
            logger.info("%s cannot compile schema %r; asking without it (%s)", url, schema.get("name"), error)
            return None, max_tokens
        if isinstance(error, ResponseFormatRejected) and schema is not None:
            self.response_format_supported = False
            logger.info("%s refuses response_format; describing the schema in the prompt instead", url)
            return None, max_tokens
        room = error.room if isinstance(error, ContextTooLong) else None
        if room is not None and MIN_ANSWER_TOKENS <= room < max_tokens:
            logger.info("%s has room for %d answer tokens, not %d; asking for %d", url, room, max_tokens, room)
            return schema, room
        return None

    def _usable_schema(self, json_schema: dict | None) -> dict | None:
        if json_schema is None or self.response_format_supported is False:
            return None
        return None if str(json_schema.get("name")) in self._rejected_schemas else json_schema

    def _kwargs(self, messages: list[Message], max_tokens: int, schema: dict | None, stream: bool) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "max_tokens": max_tokens,
            **self.sampling,
            "stream": stream,
        }
        if self._send_extras():
            kwargs["extra_body"] = dict(self.sampling_extras)
        if schema is not None:
            kwargs["response_format"] = {"type": "json_schema", "json_schema": schema}
        return kwargs

    def _send_extras(self) -> bool:
        """Whether to send :attr:`sampling_extras`: to vLLM (its model cards say ``owned_by: "vllm"``), and to a
        server not asked about its models yet until it refuses them; not to a server whose cards say otherwise."""
        if not self.sampling_extras or self.sampling_extras_supported is False:
            return False
        return self._cards is None or any(card.get("owned_by") == "vllm" for card in self._cards.values())

    def stream(
        self, messages: list[Message], *, max_tokens: int = 512, json_schema: dict | None = None
    ) -> Iterator[str]:
        """Yields the reply's text pieces as the server streams them.

        Args:
            messages: OpenAI chat messages.
            max_tokens: most tokens to generate.
            json_schema: ``{"name": ..., "schema": ...}`` for ``response_format`` (dropped if the server refuses it).

        A reply cut at ``max_tokens`` is not asked again (its pieces are already out); :attr:`last_finish_reason`
        says ``"length"`` then, for the caller to tell the reader.
        """
        self.last_finish_reason = None
        chunks, used = self._create(messages, max_tokens, json_schema, stream=True)
        finish = None
        try:
            for chunk in chunks:
                if not getattr(chunk, "choices", None):
                    continue
                choice = chunk.choices[0]
                piece = choice.delta.content if choice.delta is not None else None
                if piece:
                    yield piece
                finish = choice.finish_reason or finish
        except LVLMError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise self._describe(exc) from exc
        self.last_finish_reason = finish
        if finish == "length":
            logger.info("%s: the streamed answer hit the %d-token limit", self.base_url, used)

    def complete(self, messages: list[Message], *, max_tokens: int = 512, json_schema: dict | None = None) -> str:
        """The whole reply text (non-streaming request). A reply cut at ``max_tokens`` is asked again once with twice
        the tokens when the server reports its context length (vLLM), capped by the room the context leaves.

        Raises:
            LVLMTruncated: the reply was cut (again); ``partial`` holds its text.
        """
        self.last_finish_reason = None
        response, used = self._create(messages, max_tokens, json_schema, stream=False)
        content, finish = self._reply(response)
        self.last_finish_reason = finish
        if finish != "length":
            return content
        more = self._more_tokens(used, getattr(getattr(response, "usage", None), "prompt_tokens", None))
        if more is None:
            context = self.context_length()
            why = (
                f"and the model's {context}-token context has no room for more (vLLM --max-model-len)"
                if context
                else "(raise --lvlm-max-tokens)"
            )
            raise LVLMTruncated(
                f"truncated: the answer hit the {used}-token limit {why}", max_tokens=used, partial=content
            )
        logger.info("%s: the reply hit the %d-token limit; asking once more with %d", self.base_url, used, more)
        response, used = self._create(messages, more, json_schema, stream=False)
        content, finish = self._reply(response)
        self.last_finish_reason = finish
        if finish == "length":
            raise LVLMTruncated(
                f"truncated: the answer hit the {used}-token limit, also when asked again with more tokens; "
                f"raise --lvlm-max-tokens",
                max_tokens=used,
                partial=content,
            )
        return content

    def _reply(self, response: Any) -> tuple[str, str | None]:
        """(text, finish_reason) of a non-streaming chat completion."""
        try:
            choice = response.choices[0]
            return choice.message.content or "", getattr(choice, "finish_reason", None)
        except (AttributeError, IndexError, TypeError) as exc:
            raise LVLMBadReply(f"the LVLM server {self.base_url} sent a chat completion without choices") from exc

    def _more_tokens(self, max_tokens: int, prompt_tokens: int | None) -> int | None:
        """Twice ``max_tokens``, capped by the room left in the context; None when the server does not report both
        its context length and the prompt's tokens, or when no more than ``max_tokens`` fit."""
        context = self.context_length() if isinstance(prompt_tokens, int) else None
        if context is None or prompt_tokens is None:
            return None
        want = min(2 * max_tokens, context - prompt_tokens)
        return want if want > max_tokens else None

    # ------------------------------------------------------------------ errors
    def _describe(self, exc: BaseException, *, images: int | None = None) -> LVLMError:
        """One clear line for an openai SDK exception (``images``: how many pictures the request carried)."""
        o, url = self._openai, self.base_url
        if isinstance(exc, LVLMError):
            return exc
        if isinstance(exc, o.APITimeoutError):
            return LVLMUnavailable(
                f"the LVLM server {url} did not answer within {self.timeout:g} s (raise --lvlm-timeout)"
            )
        if isinstance(exc, o.APIConnectionError):
            cause = _one_line(exc.__cause__ or exc, 120)
            return LVLMUnavailable(
                f"cannot reach the LVLM server at {url} ({cause}); start it (see docs/explainer.md) "
                f"or use --lvlm template"
            )
        if isinstance(exc, o.APIStatusError):
            return self._describe_status(exc, images)
        if isinstance(exc, (o.APIResponseValidationError, json.JSONDecodeError, ValueError, KeyError, TypeError)):
            return LVLMBadReply(
                f"the LVLM server {url} sent a reply that is not an OpenAI chat completion: {_one_line(exc, 160)}"
            )
        return LVLMError(f"the LVLM server {url} failed: {type(exc).__name__}: {_one_line(exc, 160)}")

    def _describe_status(self, exc: Any, images: int | None = None) -> LVLMError:
        code, url = exc.status_code, self.base_url
        body = _one_line(_error_text(getattr(exc, "body", None)) or exc.message, 200)
        low = body.lower()
        if code in (400, 422) and "response_format" in low:
            return ResponseFormatRejected(f"the LVLM server {url} refuses response_format (HTTP {code}): {body}")
        if code in (400, 422) and any(s in low for s in _SCHEMA_ERRORS):
            return SchemaRejected(f"the LVLM server {url} cannot use the JSON schema (HTTP {code}): {body}")
        if code in (400, 422) and any(name in low for name in self.sampling_extras):
            return SamplingRejected(f"the LVLM server {url} refuses the extra sampling fields (HTTP {code}): {body}")
        limited = self._describe_limits(code, body, images)
        if limited is not None:
            return limited
        if code == 401 or code == 403:
            return LVLMError(f"the LVLM server {url} refused the API key (HTTP {code}); set VLAD_LVLM_API_KEY")
        if code in (400, 404) and "model" in low and ("exist" in low or "pinned" in low or "not found" in low):
            return LVLMError(
                f"the LVLM server {url} does not serve model {self._model!r} (HTTP {code}: {body}); "
                f"see `vlad lvlm-check --lvlm openai:{url}` for the models it lists"
            )
        if code in (400, 422) and "image" in low:
            return LVLMError(
                f"the LVLM server {url} does not accept images (HTTP {code}: {body}); serve a "
                f"vision-language model, e.g. Qwen/Qwen2.5-VL-3B-Instruct"
            )
        if code == 404:
            return LVLMError(f"the LVLM server {url} answered HTTP 404 ({body}); check that the URL ends in /v1")
        if code >= 500:
            return LVLMUnavailable(f"the LVLM server {url} failed with HTTP {code}: {body}")
        return LVLMError(f"the LVLM server {url} answered HTTP {code}: {body}")

    def _describe_limits(self, code: int, body: str, images: int | None) -> LVLMError | None:
        """vLLM's per-prompt picture limit and context-length errors (HTTP 400), or None for any other answer."""
        url = self.base_url
        found = _MM_LIMIT.search(body) if code == 400 else None
        if found and int(found.group(1)) == 0:
            return LVLMError(
                f"the LVLM server {url} does not accept images (HTTP {code}: {body}); serve a vision-language model, "
                f"e.g. Qwen/Qwen2.5-VL-3B-Instruct, with --limit-mm-per-prompt '{{\"image\": {MAX_PICTURES}}}'"
            )
        if found:
            limit = int(found.group(1))
            self.image_limit = limit
            sent = f" and this request had {images}" if images else ""
            fix = f"--limit-mm-per-prompt '{{\"image\": {max(images or 0, MAX_PICTURES)}}}'"
            return TooManyImages(
                f"too many images for this server (--limit-mm-per-prompt): {url} takes at most {limit} per "
                f"prompt{sent}; start vLLM with {fix} or send fewer pictures",
                limit=limit,
            )
        context = _CONTEXT.search(body) if code == 400 else None
        if context is None:
            return None
        tokens = _INPUT_TOKENS.search(body)
        prompt = int(next(g for g in tokens.groups() if g)) if tokens else None
        total = int(context.group(1))
        need = f"the prompt needs {prompt} of" if prompt is not None else "the request does not fit"
        return ContextTooLong(
            f"{need} the model's {total}-token context, too little room for an answer (vLLM --max-model-len); use "
            f"smaller pictures (--max-image-side), fewer turns or a longer context",
            context=total,
            prompt_tokens=prompt,
        )

    # ------------------------------------------------------------------ capability check
    def check(self) -> list[CheckRow]:
        """Rows ``(item, ok, detail)``: reachable, model, images, response_format. ``ok`` None means unknown."""
        rows: list[CheckRow] = []
        try:
            listed = self.list_models()
        except LVLMError as exc:
            return [("reachable", False, str(exc))]
        if self._model is None and not listed:
            rows.append(("reachable", True, f"{self.base_url}/models answered; models listed: none"))
            return [*rows, ("model", False, f"no model listed; name one: --lvlm {self.spec}#MODEL")]
        context = self.context_length()
        told = f"; context {context} tokens (max_model_len)" if context else ""
        rows.append(("reachable", True, f"{self.base_url}/models answered; models listed: {listed or 'none'}{told}"))
        model = self.model
        note = "listed" if model in listed else "not listed (transformers serve lists only its cache)"
        try:
            self._request([{"role": "user", "content": "Reply with one word."}], 1, None, stream=False)
        except LVLMError as exc:
            return [*rows, ("model", False, f"{model} ({note}): {exc}")]
        rows.append(("model", True, f"{model} ({note}); a text request succeeded"))
        rows.append(self._check_images())
        rows.append(self._check_response_format())
        return rows

    def _check_images(self) -> CheckRow:
        text = [{"role": "user", "content": [{"type": "text", "text": "Reply with one word."}]}]
        with_image = [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Reply with one word."},
                    {"type": "image_url", "image_url": {"url": _probe_image_url()}},
                ],
            }
        ]
        try:
            plain = self._request(text, 1, None, stream=False)
            seen = self._request(with_image, 1, None, stream=False)
        except LVLMError as exc:
            return ("images", False, str(exc))
        p0 = getattr(getattr(plain, "usage", None), "prompt_tokens", None)
        p1 = getattr(getattr(seen, "usage", None), "prompt_tokens", None)
        if p0 is None or p1 is None:
            return ("images", None, "an image request was accepted; the server reports no token usage to confirm it")
        if p1 <= p0:
            return (
                "images",
                False,
                f"accepted but ignored (prompt tokens {p0} without and {p1} with an image): "
                f"the model is probably text-only",
            )
        return ("images", True, f"a 32x32 image added {p1 - p0} prompt tokens")

    def _check_response_format(self) -> CheckRow:
        messages = [{"role": "user", "content": 'Reply with the JSON object {"ok": true} and nothing else.'}]
        previous = self.response_format_supported
        self.response_format_supported = None
        try:
            reply = self._request(messages, 16, {"name": "probe", "schema": _PROBE_SCHEMA}, stream=False)
        except LVLMError as exc:
            self.response_format_supported = previous
            return ("response_format", False, str(exc))
        if self.response_format_supported is False:
            return ("response_format", False, "refused; the schema is described in the prompt instead (still usable)")
        if "probe" in self._rejected_schemas:
            self._rejected_schemas.discard("probe")
            return ("response_format", False, "accepted, but a simple schema could not be compiled; validated instead")
        self.response_format_supported = previous
        content = (reply.choices[0].message.content or "") if getattr(reply, "choices", None) else ""
        try:
            enforced = set(json.loads(content)) == {"ok"}
        except (json.JSONDecodeError, TypeError):
            enforced = False
        if enforced:
            return ("response_format", True, "accepted; the reply followed the JSON schema")
        return (
            "response_format",
            None,
            f"accepted but not enforced (reply {_one_line(content, 60)!r}); replies are validated and repaired once",
        )


# ---------------------------------------------------------------------- in-process transformers
class TransformersBackend:
    """An image-text-to-text model run in this process with transformers (``AutoModelForImageTextToText`` and
    ``AutoProcessor``). Loaded on first use; ``local_files_only`` when ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``
    is set. Greedy decoding. ``response_format`` is not available: the schema is described in the prompt."""

    is_model = True
    response_format_supported = False

    def __init__(
        self, model_id: str, *, device: str = "auto", timeout: float = DEFAULT_TIMEOUT, adapter: str | None = None
    ) -> None:
        self.model_id = model_id
        self.adapter = adapter
        self.device_name = device
        self.timeout = float(timeout)
        self._model: Any = None
        self._processor: Any = None
        self._lock = threading.Lock()

    @property
    def spec(self) -> str:
        return f"transformers:{self.model_id}" + (f"{LORA_SEPARATOR}{self.adapter}" if self.adapter else "")

    def _load(self) -> tuple[Any, Any]:
        with self._lock:
            if self._model is None:
                self._model, self._processor = self._load_model()
        return self._model, self._processor

    def _load_model(self) -> tuple[Any, Any]:
        torch = require("torch", "explain", what="--lvlm transformers:...")
        require("transformers", "explain", what="--lvlm transformers:...")
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from vlad.backbones import resolve_device

        offline = any(
            os.environ.get(k, "").lower() in ("1", "true", "yes") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
        )
        device = resolve_device(self.device_name)
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        try:
            processor = AutoProcessor.from_pretrained(self.model_id, local_files_only=offline)
            model = AutoModelForImageTextToText.from_pretrained(self.model_id, local_files_only=offline, dtype=dtype)
        except (OSError, ValueError, KeyError) as exc:
            where = "in the Hugging Face cache or a local folder (offline mode)" if offline else "on the Hub or on disk"
            raise LVLMUnavailable(
                f"cannot load transformers model {self.model_id!r} {where}: {_one_line(exc, 160)}"
            ) from exc
        if self.adapter is not None:
            model = self._with_adapter(model)
        return model.to(device).eval(), processor

    def _with_adapter(self, model: Any) -> Any:
        """The model with the peft LoRA adapter of ``+lora:`` loaded on top (not merged)."""
        peft = require("peft", "train", what="--lvlm transformers:...+lora:...")
        try:
            return peft.PeftModel.from_pretrained(model, self.adapter, is_trainable=False)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise LVLMUnavailable(
                f"cannot load LoRA adapter {self.adapter!r} on {self.model_id!r}: {_one_line(exc, 160)}"
            ) from exc

    def _inputs(self, messages: list[Message]) -> Any:
        model, processor = self._load()
        if _has_images(messages) and getattr(processor, "image_processor", None) is None:
            raise LVLMError(f"transformers model {self.model_id!r} has no image processor: it does not accept images")
        hf = [_to_hf_message(m) for m in messages]
        try:
            inputs = processor.apply_chat_template(
                hf, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
            )
        except Exception as exc:  # noqa: BLE001 -- template / processor failures of arbitrary models
            raise LVLMError(
                f"transformers model {self.model_id!r} could not encode the chat: {_one_line(exc, 160)}"
            ) from exc
        return inputs.to(model.device)

    def stream(
        self, messages: list[Message], *, max_tokens: int = 512, json_schema: dict | None = None
    ) -> Iterator[str]:
        """Yields generated text pieces (``json_schema`` is ignored: described in the prompt instead)."""
        from transformers import TextIteratorStreamer

        inputs = self._inputs(messages)
        model, processor = self._load()
        tokenizer = getattr(processor, "tokenizer", processor)
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=self.timeout)
        failure: list[BaseException] = []

        def run() -> None:
            try:
                model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False, streamer=streamer)
            except Exception as exc:  # noqa: BLE001 -- reported to the caller below
                failure.append(exc)
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        try:
            yield from (piece for piece in streamer if piece)
        except Exception as exc:  # noqa: BLE001 -- queue.Empty after the timeout
            raise LVLMUnavailable(
                f"transformers model {self.model_id!r} produced nothing for {self.timeout:g} s"
            ) from exc
        thread.join()
        if failure:
            raise LVLMError(f"transformers model {self.model_id!r} failed to generate: {_one_line(failure[0], 160)}")

    def complete(self, messages: list[Message], *, max_tokens: int = 512, json_schema: dict | None = None) -> str:
        return "".join(self.stream(messages, max_tokens=max_tokens, json_schema=json_schema))

    def check(self) -> list[CheckRow]:
        try:
            model, processor = self._load()
        except LVLMError as exc:
            return [("model", False, str(exc))]
        rows: list[CheckRow] = [("model", True, f"{self.model_id} loaded ({type(model).__name__} on {model.device})")]
        if self.adapter is not None:
            rows.append(("adapter", True, f"LoRA adapter {self.adapter} loaded on top"))
        has_images = getattr(processor, "image_processor", None) is not None
        rows.append(("images", has_images, "image processor present" if has_images else "no image processor"))
        rows.append(("response_format", False, "not available in process; the schema is described in the prompt"))
        return rows


def _to_hf_message(message: Message) -> Message:
    """An OpenAI chat message in the form transformers processors' chat templates read (content parts as a list;
    ``image_url`` parts become ``{"type": "image", "url": ...}``)."""
    content = message.get("content")
    if isinstance(content, str) or content is None:
        return {"role": message["role"], "content": [{"type": "text", "text": content or ""}]}
    parts = []
    for part in content:
        if part.get("type") == "image_url":
            url = part["image_url"]["url"] if isinstance(part["image_url"], dict) else part["image_url"]
            parts.append({"type": "image", "url": url})
        else:
            parts.append({"type": "text", "text": part.get("text", "")})
    return {"role": message["role"], "content": parts}
