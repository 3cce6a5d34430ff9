"""Language-model backends behind one interface, chosen by a spec string.

- ``template`` -- no model (:class:`vlad.explain.template.TemplateBackend`), the default.
- ``openai:<base_url>[#model]`` -- any OpenAI-compatible server: vLLM (the production target), Ollama,
  ``transformers serve`` or OpenAI itself. The API key comes from ``VLAD_LVLM_API_KEY``, else ``OPENAI_API_KEY``,
  else ``EMPTY`` (local servers ignore it). Without ``#model`` the first model ``/v1/models`` lists is used.
  Several comma-separated URLs are replicas of one model, used as one backend with failover
  (:class:`vlad.explain.pool.BackendPool`).
- ``transformers:<model id or local folder>`` -- in process, any image-text-to-text model transformers loads with
  ``AutoModelForImageTextToText`` (Qwen2-VL, LLaVA, ...), on CPU or GPU.

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
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from vlad._optional import require
from vlad.errors import ConfigError
from vlad.explain.errors import LVLMBadReply, LVLMError, LVLMUnavailable, ResponseFormatRejected
from vlad.explain.template import TemplateBackend

logger = logging.getLogger(__name__)

SPEC_FORMS = (
    "template, openai:<base_url>[,<base_url>...][#model] (e.g. openai:http://127.0.0.1:8000/v1), "
    "transformers:<model or dir>"
)
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
    ``model`` the model named after ``#`` (openai only)."""

    kind: str
    target: str = ""
    model: str | None = None

    def __str__(self) -> str:
        if self.kind == "template":
            return "template"
        return f"{self.kind}:{self.target}" + (f"#{self.model}" if self.model else "")


def parse_backend_spec(spec: str) -> BackendSpec:
    """Parses ``template``, ``openai:URL[#model]`` or ``transformers:MODEL``.

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
        return BackendSpec("transformers", rest.strip())
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
    return TransformersBackend(parsed.target, device=device, timeout=timeout)


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
class OpenAIBackend:
    """A model behind an OpenAI-compatible ``/v1`` API (vLLM, Ollama, ``transformers serve``, OpenAI).

    ``response_format`` (a JSON schema) is sent when a caller passes ``json_schema``; when the server refuses it
    (HTTP 400/422 naming ``response_format``) the backend remembers that, and callers fall back to the schema described
    in the prompt plus validation and one repair turn. Servers that accept the field but ignore it (``transformers
    serve`` 5.x logs "Ignoring unsupported fields") are caught by the same validation.
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
            return [m.id for m in self.client.models.list().data]
        except Exception as exc:  # noqa: BLE001 -- every SDK failure becomes one clear line
            raise self._describe(exc) from exc

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
        kwargs: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "stream": stream,
        }
        if json_schema is not None and self.response_format_supported is not False:
            kwargs["response_format"] = {"type": "json_schema", "json_schema": json_schema}
        try:
            return self.client.chat.completions.create(**kwargs)
        except Exception as exc:  # noqa: BLE001
            error = self._describe(exc)
            if isinstance(error, ResponseFormatRejected) and "response_format" in kwargs:
                self.response_format_supported = False
                logger.info("%s refuses response_format; describing the schema in the prompt instead", self.base_url)
                kwargs.pop("response_format")
                return self._request(messages, max_tokens, None, stream)
            raise error from exc

    def stream(
        self, messages: list[Message], *, max_tokens: int = 512, json_schema: dict | None = None
    ) -> Iterator[str]:
        """Yields the reply's text pieces as the server streams them.

        Args:
            messages: OpenAI chat messages.
            max_tokens: most tokens to generate.
            json_schema: ``{"name": ..., "schema": ...}`` for ``response_format`` (dropped if the server refuses it).
        """
        chunks = self._request(messages, max_tokens, json_schema, stream=True)
        try:
            for chunk in chunks:
                if not getattr(chunk, "choices", None):
                    continue
                piece = chunk.choices[0].delta.content
                if piece:
                    yield piece
        except LVLMError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise self._describe(exc) from exc

    def complete(self, messages: list[Message], *, max_tokens: int = 512, json_schema: dict | None = None) -> str:
        """The whole reply text (non-streaming request)."""
        response = self._request(messages, max_tokens, json_schema, stream=False)
        try:
            content = response.choices[0].message.content
        except (AttributeError, IndexError, TypeError) as exc:
            raise LVLMBadReply(f"the LVLM server {self.base_url} sent a chat completion without choices") from exc
        return content or ""

    # ------------------------------------------------------------------ errors
    def _describe(self, exc: BaseException) -> LVLMError:
        """One clear line for an openai SDK exception."""
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
            return self._describe_status(exc)
        if isinstance(exc, (o.APIResponseValidationError, json.JSONDecodeError, ValueError, KeyError, TypeError)):
            return LVLMBadReply(
                f"the LVLM server {url} sent a reply that is not an OpenAI chat completion: {_one_line(exc, 160)}"
            )
        return LVLMError(f"the LVLM server {url} failed: {type(exc).__name__}: {_one_line(exc, 160)}")

    def _describe_status(self, exc: Any) -> LVLMError:
        code, url = exc.status_code, self.base_url
        body = _one_line(_error_text(getattr(exc, "body", None)) or exc.message, 200)
        low = body.lower()
        if code in (400, 422) and "response_format" in low:
            return ResponseFormatRejected(f"the LVLM server {url} refuses response_format (HTTP {code}): {body}")
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

    # ------------------------------------------------------------------ capability check
    def check(self) -> list[CheckRow]:
        """Rows ``(item, ok, detail)``: reachable, model, images, response_format. ``ok`` None means unknown."""
        rows: list[CheckRow] = []
        try:
            listed = self.list_models()
        except LVLMError as exc:
            return [("reachable", False, str(exc))]
        rows.append(("reachable", True, f"{self.base_url}/models answered; models listed: {listed or 'none'}"))
        if self._model is None and not listed:
            return [*rows, ("model", False, f"no model listed; name one: --lvlm {self.spec}#MODEL")]
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

    def __init__(self, model_id: str, *, device: str = "auto", timeout: float = DEFAULT_TIMEOUT) -> None:
        self.model_id = model_id
        self.device_name = device
        self.timeout = float(timeout)
        self._model: Any = None
        self._processor: Any = None
        self._lock = threading.Lock()

    @property
    def spec(self) -> str:
        return f"transformers:{self.model_id}"

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
        return model.to(device).eval(), processor

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
