"""A small OpenAI-compatible server in a thread (``http.server``), for what a real server cannot be made to do on
demand: fail with HTTP 500, send garbage, stall past a timeout, refuse ``response_format`` or images -- and for
recording the exact requests a client sends (image parts, the schema, the history layout).

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions`` (JSON or SSE streaming, ``data: [DONE]`` at the end).
"""

from __future__ import annotations

import json
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
            response_format when it is sent, as older ``transformers serve`` and some proxies do) or ``no_images``
            (HTTP 400 for image parts).
        requests: recorded ``(path, body)`` of every request.
        headers: the HTTP headers of every request, in the same order.
    """

    def __init__(self) -> None:
        self.models = ["fake-vlm"]
        self.replies: list[Reply] = ["hello"]
        self.mode = "ok"
        self.delay = 2.0
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.headers: list[dict[str, str]] = []
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
                self._json(200, {"object": "list", "data": [{"id": m, "object": "model"} for m in fake.models]})
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
            if fake.mode == "slow":
                time.sleep(fake.delay)
            text = fake.next_reply(body)
            usage = {"prompt_tokens": 10 + 7 * _count_images(body), "completion_tokens": 3, "total_tokens": 13}
            if body.get("stream"):
                return self._stream(text, body)
            self._json(
                200,
                {
                    "id": "c1",
                    "object": "chat.completion",
                    "created": 0,
                    "model": body["model"],
                    "usage": usage,
                    "choices": [
                        {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}
                    ],
                },
            )

        def _stream(self, text: str, body: dict[str, Any]) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            step = max(1, len(text) // 3)
            pieces = [text[i : i + step] for i in range(0, len(text), step)] or [""]
            for piece in pieces:
                chunk = {
                    "id": "c1",
                    "object": "chat.completion.chunk",
                    "created": 0,
                    "model": body["model"],
                    "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}],
                }
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
            self.close_connection = True

    return Handler
