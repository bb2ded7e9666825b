"""A fake OpenAI-compatible server for tests: stdlib ``http.server`` in a thread, replies chosen per test.

Each route (``/v1/models``, ``/v1/chat/completions``) answers with a ``Reply``: raw bytes written as they are
(so a test can send lists, numbers, broken JSON, HTML, non-UTF-8, huge lines, no HTTP at all, or a redirect),
or the stock well-formed answer. Every request is recorded with its headers, so tests can check where the API
key went. It holds no tests.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MODELS = {"object": "list", "data": [{"id": "base", "object": "model", "max_model_len": 2048}]}


@dataclass(frozen=True)
class Reply:
    """What the server sends: a status line and headers (unless ``raw``), then ``body`` parts with ``pause``
    seconds between them. ``raw`` sends the body alone, not even a status line."""

    body: Sequence[bytes] = ()
    status: int = 200
    headers: tuple[tuple[str, str], ...] = (("Content-Type", "text/event-stream"),)
    pause: float = 0.0
    raw: bool = False


def sse(*chunks: Any, done: bool = True) -> Reply:
    """An event stream of ``chunks`` (objects are JSON-encoded, bytes and strings are sent as the data field)."""
    parts = []
    for chunk in chunks:
        data = chunk if isinstance(chunk, bytes) else (chunk if isinstance(chunk, str) else json.dumps(chunk)).encode()
        parts.append(b"data: " + data + b"\n\n")
    if done:
        parts.append(b"data: [DONE]\n\n")
    return Reply(parts)


def delta(text: str, finish: str | None = None) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}]}


def answer(*words: str) -> Reply:
    return sse(*(delta(word) for word in words), delta("", "stop"))


def json_reply(payload: Any, status: int = 200) -> Reply:
    return Reply([json.dumps(payload).encode()], status, (("Content-Type", "application/json"),))


def body_reply(body: bytes, status: int = 200, content_type: str = "text/html") -> Reply:
    return Reply([body], status, (("Content-Type", content_type),))


def redirect(location: str, status: int = 302) -> Reply:
    return Reply([], status, (("Location", location), ("Content-Length", "0")))


@dataclass
class Recorded:
    method: str
    path: str
    authorization: str | None
    body: Any


@dataclass
class FakeOpenAIServer:
    """Serves ``models`` on GET and pops ``chat`` replies on POST (the stock answer once they run out); a path in
    ``paths`` gets its own reply instead."""

    models: Reply = field(default_factory=lambda: json_reply(MODELS))
    chat: list[Reply] = field(default_factory=list)
    paths: dict[str, Reply] = field(default_factory=dict)
    requests: list[Recorded] = field(default_factory=list)

    def __post_init__(self) -> None:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                return None

            def do_GET(self) -> None:
                server.requests.append(Recorded("GET", self.path, self.headers.get("Authorization"), None))
                default = server.models if self.path.endswith("/models") else body_reply(b"not here", 404)
                self._send(server.paths.get(self.path, default))

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                server.requests.append(Recorded("POST", self.path, self.headers.get("Authorization"), body))
                if self.path in server.paths:
                    self._send(server.paths[self.path])
                else:
                    self._send(server.chat.pop(0) if server.chat else answer("Hello", " there"))

            def _send(self, reply: Reply) -> None:
                if not reply.raw:
                    self.send_response(reply.status)
                    for name, value in reply.headers:
                        self.send_header(name, value)
                    self.send_header("Connection", "close")
                    self.end_headers()
                for index, part in enumerate(reply.body):
                    if index and reply.pause:
                        time.sleep(reply.pause)
                    self.wfile.write(part)
                    self.wfile.flush()
                self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.origin = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.url = f"{self.origin}/v1"
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def running(**kwargs: Any) -> Iterator[FakeOpenAIServer]:
    """A pytest fixture body: one server for the test, shut down after it."""
    server = FakeOpenAIServer(**kwargs)
    try:
        yield server
    finally:
        server.close()
