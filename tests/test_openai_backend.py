"""OpenAIBackend against small HTTP servers on loopback: wire format, streaming, retries, errors."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from assistant.config import GenerationOptions
from assistant.dialogue import DialogueManager
from assistant.errors import BackendError, BadAdapter
from assistant.messages import Message, Role
from assistant.openai_backend import OpenAIBackend
from assistant.store import Store
from assistant.vision import load_image_path


class ScriptedServer:
    """An OpenAI-shaped server whose behaviour per request comes from a queue of scripts."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.scripts: list[str] = []
        self.models = [{"id": "base", "object": "model", "max_model_len": 2048},
                       {"id": "pirate", "object": "model"}]
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                return None

            def do_GET(self) -> None:
                self._json(200, {"object": "list", "data": server.models})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"body": body, "auth": self.headers.get("Authorization")})
                script = server.scripts.pop(0) if server.scripts else "ok"
                if script.startswith("http"):
                    self._json(int(script[4:]), {"error": {"message": f"scripted {script[4:]}"}})
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                if script == "slow":
                    time.sleep(1.5)
                if script == "garbage":
                    self.wfile.write(b"data: {not json\n\n")
                    return
                for word in ["Hello", " from", " the", " server"]:
                    chunk = {"choices": [{"delta": {"content": word}, "index": 0}]}
                    self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                    self.wfile.flush()
                self.wfile.write(b"data: [DONE]\n\n")

            def _json(self, code: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def server() -> Iterator[ScriptedServer]:
    scripted = ScriptedServer()
    yield scripted
    scripted.httpd.shutdown()
    scripted.httpd.server_close()


GREEDY = GenerationOptions(temperature=0, max_new_tokens=16, seed=3)


def test_streams_text_and_sends_images_as_data_urls(server: ScriptedServer, sample_png: Path) -> None:
    backend = OpenAIBackend(server.url, "base", api_key="sekret")
    image = load_image_path(sample_png)
    chunks = list(backend.stream([Message(Role.SYSTEM, "sys"), Message(Role.USER, "look", (image,))], GREEDY))
    assert chunks == ["Hello", " from", " the", " server"]
    request = server.requests[0]
    assert request["auth"] == "Bearer sekret"
    body = request["body"]
    assert body["model"] == "base" and body["stream"] is True and body["max_tokens"] == 16 and body["seed"] == 3
    parts = body["messages"][1]["content"]
    assert parts[0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert parts[1] == {"type": "text", "text": "look"}
    assert body["messages"][0] == {"role": "system", "content": "sys"}


def test_models_list_gives_context_and_adapters(server: ScriptedServer) -> None:
    backend = OpenAIBackend(server.url, "base")
    assert backend.context_length == 2048
    assert backend.adapter_names() == ["pirate"]
    assert backend.describe()["served_models"] == ["base", "pirate"]
    list(backend.stream([Message(Role.USER, "hi")], GREEDY, adapter="pirate"))
    assert server.requests[-1]["body"]["model"] == "pirate"  # vLLM serves LoRA adapters as model names
    with pytest.raises(BadAdapter, match="does not serve an adapter named 'ghost'"):
        list(backend.stream([Message(Role.USER, "hi")], GREEDY, adapter="ghost"))


def test_transient_errors_are_retried(server: ScriptedServer) -> None:
    server.scripts = ["http503", "http429", "ok"]
    backend = OpenAIBackend(server.url, "base", retries=2)
    assert "".join(backend.stream([Message(Role.USER, "hi")], GREEDY)) == "Hello from the server"
    assert len(server.requests) == 3


@pytest.mark.parametrize("scripts, expected", [
    (["http401"], "HTTP 401 — check the API key (scripted 401)"),
    (["http400"], "HTTP 400 (scripted 400)"),
    (["http500", "http500", "http500"], "HTTP 500 (scripted 500) after 3 attempts"),
    (["garbage"], "malformed stream data"),
    (["slow"], "no data for 1 s while streaming"),
])
def test_failures_are_one_line_backend_errors(server: ScriptedServer, scripts: list[str], expected: str) -> None:
    server.scripts = scripts
    backend = OpenAIBackend(server.url, "base", retries=2, timeout=1.0)
    with pytest.raises(BackendError) as error:
        list(backend.stream([Message(Role.USER, "hi")], GREEDY))
    assert expected in str(error.value) and "\n" not in str(error.value)


def test_unreachable_server_is_a_clear_error() -> None:
    with pytest.raises(BackendError, match="cannot connect") as error:
        OpenAIBackend("http://127.0.0.1:9/v1", "base", retries=1, timeout=2.0)
    assert "after 2 attempts" in str(error.value)


def test_dialogue_manager_drives_the_server_and_stores_the_turn(server: ScriptedServer, tmp_path: Path) -> None:
    store = Store(tmp_path / "iris.db")
    manager = DialogueManager(OpenAIBackend(server.url, "base"), store)
    conversation = manager.new_conversation()
    assert manager.send(conversation, "hi").run() == "Hello from the server"
    assert [m.text for m in manager.history(conversation)] == ["hi", "Hello from the server"]
