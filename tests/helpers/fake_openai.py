"""A small OpenAI-compatible server in a thread (``http.server``), for what a real server cannot be made to do on
demand: fail with HTTP 500, send garbage, stall past a timeout, refuse ``response_format`` or images -- and for
recording the exact requests a client sends (image parts, the schema, the history layout).

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions`` (JSON or SSE streaming, ``data: [DONE]`` at the end).

:meth:`FakeOpenAI.like_vllm` makes it answer as vLLM does (read from vLLM's source, ``entrypoints/openai``): model
cards with ``max_model_len``, errors as ``ErrorResponse`` ``{"error": {"message", "type", "param", "code"}}``, the
per-prompt picture limit ("At most N image(s) may be provided in one prompt."), the context-length checks, replies cut
at ``max_tokens`` with ``finish_reason: "length"``, and xgrammar's refusal of a schema. Tokens are counted as
``chars_per_token`` characters of text (JSON of the messages' text) plus ``image_tokens`` per picture.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Reply = str | Callable[[dict[str, Any]], str]


class FakeOpenAI:
    """The server's behaviour, changed by tests between requests.

    Attributes:
        models: ids ``/v1/models`` lists.
        replies: texts (or functions of the request body) returned in order; the last one repeats.
        mode: ``ok``, ``500``, ``garbage`` (200 with a non-JSON body), ``empty`` (200 with ``{}``), ``slow``
            (sleep ``delay`` s, then answer), ``down`` (drop every connection without an answer, as a crashed
            server does; :meth:`kill` also stops listening), ``reject_response_format`` (HTTP 400 naming
            response_format when it is sent, as older ``transformers serve`` and some proxies do), ``no_images``
            (HTTP 400 for image parts), ``reject_schema`` (HTTP 400 with xgrammar's message when a JSON schema is
            sent) and ``strict_fields`` (HTTP 422 "Unexpected fields in the request" for fields outside the OpenAI
            schema, as ``transformers serve`` answers ``top_k``).
        requests: recorded ``(path, body)`` of every request.
        headers: the HTTP headers of every request, in the same order.
        max_model_len: listed in each model card (vLLM) and enforced when ``chars_per_token`` is set.
        image_limit: vLLM's ``--limit-mm-per-prompt`` image count (None: no limit).
        chars_per_token: when set, prompts and replies are counted in tokens: replies longer than ``max_tokens`` are
            cut with ``finish_reason: "length"`` and prompts longer than ``max_model_len`` are refused.
    """

    def __init__(self) -> None:
        self.models = ["fake-vlm"]
        self.replies: list[Reply] = ["hello"]
        self.mode = "ok"
        self.delay = 2.0
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.headers: list[dict[str, str]] = []
        self.max_model_len: int | None = None
        self.image_limit: int | None = None
        self.chars_per_token: int | None = None
        self.image_tokens = 100
        self.owned_by = "fake"
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> FakeOpenAI:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def like_vllm(self, *, max_model_len: int = 4096, image_limit: int | None = 7) -> FakeOpenAI:
        """Answer as vLLM does (see the module docstring); returns self."""
        self.max_model_len, self.image_limit, self.chars_per_token, self.owned_by = (
            max_model_len,
            image_limit,
            4,
            "vllm",
        )
        return self

    def kill(self) -> None:
        """Go down the way a crashed server does: open connections are dropped, new ones refused."""
        self.mode = "down"
        self.stop()

    def chat_requests(self) -> list[dict[str, Any]]:
        return [body for path, body in self.requests if path == "/v1/chat/completions"]

    def next_reply(self, body: dict[str, Any]) -> str:
        with self._lock:
            reply = self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]
        return reply(body) if callable(reply) else reply


def _count_images(body: dict[str, Any]) -> int:
    return sum(
        1
        for m in body.get("messages", [])
        if isinstance(m.get("content"), list)
        for p in m["content"]
        if p.get("type") == "image_url"
    )


def _prompt_tokens(fake: FakeOpenAI, body: dict[str, Any]) -> int:
    texts = [
        m["content"] if isinstance(m.get("content"), str) else [p.get("text", "") for p in m.get("content") or []]
        for m in body.get("messages", [])
    ]
    return math.ceil(len(json.dumps(texts)) / (fake.chars_per_token or 4)) + fake.image_tokens * _count_images(body)


def vllm_error(message: str, *, param: str | None = None, code: int = 400, kind: str = "BadRequestError") -> dict:
    """vLLM's ``ErrorResponse`` body (``entrypoints/openai/engine/protocol.py``: ``ErrorInfo``)."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


OPENAI_CHAT_FIELDS = {
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "stream",
    "stream_options",
    "response_format",
    "n",
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "logprobs",
    "top_logprobs",
    "user",
}


def _vllm_refusal(fake: FakeOpenAI, body: dict[str, Any]) -> tuple[int, dict] | None:
    """The HTTP error vLLM (or a strict server) would answer with, or None."""
    if fake.mode == "strict_fields" and set(body) - OPENAI_CHAT_FIELDS:
        return 422, {"detail": f"Unexpected fields in the request: {set(body) - OPENAI_CHAT_FIELDS}"}
    if fake.mode == "reject_schema" and (body.get("response_format") or {}).get("type") == "json_schema":
        return 400, vllm_error("The provided JSON schema contains features not supported by xgrammar.")
    images = _count_images(body)
    if fake.image_limit is not None and images > fake.image_limit:
        msg = f"At most {fake.image_limit} image(s) may be provided in one prompt."
        msg += " Set `--limit-mm-per-prompt` to increase this limit." if fake.image_limit else ""
        return 400, vllm_error(msg, param="image")
    if fake.chars_per_token is None or fake.max_model_len is None:
        return None
    n, limit, asked = _prompt_tokens(fake, body), fake.max_model_len, body.get("max_tokens")
    if n >= limit:
        return 400, vllm_error(
            f"This model's maximum context length is {limit} tokens. However, your request has {n} input tokens. "
            "Please reduce the length of the input messages.",
            param="input_tokens",
        )
    if asked is not None and n + asked > limit:
        return 400, vllm_error(
            f"'max_tokens' or 'max_completion_tokens' is too large: {asked}. This model's maximum context length is "
            f"{limit} tokens and your request has {n} input tokens ({asked} > {limit} - {n}).",
            param="max_tokens",
        )
    return None


def _handler(fake: FakeOpenAI) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # keep test output clean
            pass

        def _send(self, code: int, payload: bytes, content_type: str = "application/json") -> None:
            try:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout tests)
                self.close_connection = True

        def _json(self, code: int, obj: Any) -> None:
            self._send(code, json.dumps(obj).encode())

        def do_GET(self) -> None:  # noqa: N802
            if fake.mode == "down":
                self.close_connection = True
                return
            fake.requests.append((self.path, {}))
            fake.headers.append({k.lower(): v for k, v in self.headers.items()})
            if self.path.rstrip("/") == "/v1/models":
                cards = [
                    {"id": m, "object": "model", "created": 0, "owned_by": fake.owned_by, "root": m, "parent": None}
                    | ({"max_model_len": fake.max_model_len} if fake.max_model_len else {})
                    for m in fake.models
                ]
                self._json(200, {"object": "list", "data": cards})
            else:
                self._json(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self) -> None:  # noqa: N802
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}")
            if fake.mode == "down":
                self.close_connection = True
                return
            fake.requests.append((self.path, body))
            fake.headers.append({k.lower(): v for k, v in self.headers.items()})
            if self.path.rstrip("/") != "/v1/chat/completions":
                return self._json(404, {"error": {"message": f"no route {self.path}"}})
            if body.get("model") not in fake.models:
                return self._json(404, {"error": {"message": f"The model `{body.get('model')}` does not exist."}})
            if fake.mode == "500":
                return self._json(500, {"error": {"message": "internal engine failure"}})
            if fake.mode == "garbage":
                return self._send(200, b"<html>this is not json</html>")
            if fake.mode == "empty":
                return self._json(200, {})
            if fake.mode == "reject_response_format" and "response_format" in body:
                msg = "Unexpected fields in the request: {'response_format'}"
                return self._json(422, {"detail": msg, "error": {"message": msg}})
            if fake.mode == "no_images" and _count_images(body):
                return self._json(400, {"error": {"message": "this model does not support image input"}})
            refusal = _vllm_refusal(fake, body)
            if refusal is not None:
                return self._json(*refusal)
            if fake.mode == "slow":
                time.sleep(fake.delay)
            text, finish = fake.next_reply(body), "stop"
            usage = {"prompt_tokens": 10 + 7 * _count_images(body), "completion_tokens": 3, "total_tokens": 13}
            if fake.chars_per_token is not None:
                prompt, most = _prompt_tokens(fake, body), body.get("max_tokens") or 10**9
                if math.ceil(len(text) / fake.chars_per_token) > most:
                    text, finish = text[: most * fake.chars_per_token], "length"
                done = math.ceil(len(text) / fake.chars_per_token)
                usage = {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}
            if body.get("stream"):
                return self._stream(text, body, finish)
            self._json(
                200,
                {
                    "id": "c1",
                    "object": "chat.completion",
                    "created": 0,
                    "model": body["model"],
                    "usage": usage,
                    "choices": [
                        {"index": 0, "finish_reason": finish, "message": {"role": "assistant", "content": text}}
                    ],
                },
            )

        def _stream(self, text: str, body: dict[str, Any], finish: str) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            step = max(1, len(text) // 3)
            pieces = [text[i : i + step] for i in range(0, len(text), step)] or [""]
            for i, piece in enumerate(pieces):
                last = finish if i == len(pieces) - 1 else None  # vLLM sets it on the chunk with the last piece
                chunk = {
                    "id": "c1",
                    "object": "chat.completion.chunk",
                    "created": 0,
                    "model": body["model"],
                    "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": last}],
                }
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
            self.close_connection = True

    return Handler
