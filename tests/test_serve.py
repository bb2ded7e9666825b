"""``iris serve`` on tiny real models (Llama, LLaVA, Qwen2-VL), over real HTTP (uvicorn on a free loopback port),
with the official ``openai`` client, Iris's own OpenAI backend and raw HTTP: answers equal the in-process ones,
streamed or not, with images and adapters; errors are one-line OpenAI error objects; the device line is fair and
bounded; a client that leaves frees the device."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import openai
import pytest
from discord_harness import Harness
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput
from tiny_families import save_tiny_qwen2_vl
from tiny_models import save_strong_lora, save_tiny_llama, save_tiny_llava
from typer.testing import CliRunner

import cli.prompt_input
from assistant.config import GenerationOptions, ModelOptions, Paths
from assistant.dialogue import DialogueManager
from assistant.engine import LocalBackend, device_lock
from assistant.messages import Message, Role
from assistant.model import load
from assistant.openai_backend import OpenAIBackend
from assistant.store import Store
from assistant.vision import load_image_path
from cli.app import app
from integrations.openai_server.app import ServeOptions, create_app
from integrations.openai_server.device_queue import DeviceQueue, QueueFull
from integrations.openai_server.server import base_url, bind, uvicorn_server
from integrations.openai_server.wire import Limits

GREEDY = GenerationOptions(temperature=0, max_new_tokens=8)
HELLO = [{"role": "system", "content": "sys"}, {"role": "user", "content": "hello there"}]
HELLO_MESSAGES = [Message(Role.SYSTEM, "sys"), Message(Role.USER, "hello there")]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve")
    llama = save_tiny_llama(root / "llama")
    return {"llama": llama, "llava": save_tiny_llava(root / "llava"), "qwen2_vl": save_tiny_qwen2_vl(root / "qwen"),
            "pirate": save_strong_lora(llama, root / "pirate", seed=3),
            "poet": save_strong_lora(llama, root / "poet", seed=4)}


def _backend(model_dir: Path, *adapters: Path) -> LocalBackend:
    options = ModelOptions(model=str(model_dir), quant="none", adapters=tuple(map(str, adapters)))
    return LocalBackend(load(options, Paths.default()))


@contextlib.contextmanager
def serving(backend: Any, **options: Any) -> Iterator[str]:
    """The real server on a free loopback port, in a thread; yields its ``/v1`` URL."""
    options.setdefault("base_name", "tiny")
    sock = bind("127.0.0.1", 0)
    server = uvicorn_server(create_app(backend, ServeOptions(**options)))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    try:
        yield base_url(sock)
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@pytest.fixture(scope="module")
def llama(dirs: dict[str, Path]) -> Iterator[tuple[LocalBackend, str]]:
    backend = _backend(dirs["llama"], dirs["pirate"])
    with serving(backend) as url:
        yield backend, url


@pytest.fixture(scope="module")
def llava(dirs: dict[str, Path]) -> Iterator[tuple[LocalBackend, str]]:
    backend = _backend(dirs["llava"])
    with serving(backend) as url:
        yield backend, url


def client(url: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=60)


def local(backend: LocalBackend, messages: list[Message], options: GenerationOptions = GREEDY,
          adapter: str | None = "none") -> str:
    return "".join(backend.stream(messages, options, adapter))


def data_url(path: Path) -> str:
    return f"data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}"


def raw(url: str, method: str, path: str, body: Any = None, timeout: float = 30) -> tuple[int, Any]:
    """One request over plain HTTP (``path`` from the server's root); the status and the decoded JSON body."""
    connection = _connection(url, timeout)
    try:
        data = body if isinstance(body, bytes) else None if body is None else json.dumps(body).encode()
        connection.request(method, path, body=data, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        connection.close()


def _connection(url: str, timeout: float) -> http.client.HTTPConnection:
    parts = urlsplit(url)
    return http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=timeout)


def _health(url: str) -> dict[str, Any]:
    return raw(url, "GET", "/health")[1]


def _wait_for(url: str, **expected: int) -> None:
    deadline = time.monotonic() + 30
    while any(_health(url)[key] != value for key, value in expected.items()):
        assert time.monotonic() < deadline, f"the server never reached {expected}: {_health(url)}"
        time.sleep(0.02)


# answers ---------------------------------------------------------------------------------------------------------


def test_models_lists_the_base_model_then_each_adapter(llama: tuple[LocalBackend, str]) -> None:
    backend, url = llama
    models = client(url).models.list().data
    assert [model.id for model in models] == ["tiny", "pirate"]
    assert all(model.owned_by == "iris" and model.model_extra["context_length"] == 512 for model in models)
    assert client(url).models.retrieve("pirate").model_extra["parent"] == "tiny"
    with pytest.raises(openai.NotFoundError, match="the model 'ghost' does not exist; this server serves: tiny, "):
        client(url).models.retrieve("ghost")


def test_a_non_streamed_answer_is_the_in_process_answer(llama: tuple[LocalBackend, str]) -> None:
    backend, url = llama
    reply = client(url).chat.completions.create(model="tiny", messages=HELLO, temperature=0, max_tokens=8)
    assert reply.choices[0].message.content == local(backend, HELLO_MESSAGES)
    assert reply.choices[0].finish_reason == "length" and reply.object == "chat.completion"
    assert reply.usage.prompt_tokens == backend.count_tokens(HELLO_MESSAGES) and reply.usage.completion_tokens == 8


def test_a_streamed_answer_comes_in_chunks_that_join_to_the_in_process_answer(
        llama: tuple[LocalBackend, str]) -> None:
    backend, url = llama
    options = GenerationOptions(temperature=0, max_new_tokens=40)
    chunks = list(client(url).chat.completions.create(model="tiny", messages=HELLO, temperature=0, max_tokens=40,
                                                      stream=True, stream_options={"include_usage": True}))
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(texts) == local(backend, HELLO_MESSAGES, options)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("length", "stop")
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == backend.count_tokens(HELLO_MESSAGES)


def test_sampling_options_are_honoured(llama: tuple[LocalBackend, str]) -> None:
    backend, url = llama
    sampled = GenerationOptions(temperature=1.5, top_p=0.8, top_k=20, seed=7, max_new_tokens=30)
    reply = client(url).chat.completions.create(model="tiny", messages=HELLO, temperature=1.5, top_p=0.8, seed=7,
                                                max_tokens=30, extra_body={"top_k": 20})
    assert reply.choices[0].message.content == local(backend, HELLO_MESSAGES, sampled)


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_a_stop_sequence_ends_the_answer_before_it(llama: tuple[LocalBackend, str], stream: bool) -> None:
    backend, url = llama
    story = [{"role": "user", "content": "Tell me a story"}]
    full = local(backend, [Message(Role.USER, "Tell me a story")], GenerationOptions(temperature=0, max_new_tokens=40))
    assert len(full) > 12
    stop = full[10:12]
    answer = client(url).chat.completions.create(model="tiny", messages=story, temperature=0, max_tokens=40,
                                                 stop=["never there", stop], stream=stream)
    if stream:
        chunks = [c.choices[0] for c in answer]
        text, finish = "".join(c.delta.content or "" for c in chunks), chunks[-1].finish_reason
    else:
        text, finish = answer.choices[0].message.content, answer.choices[0].finish_reason
    assert text == full[:full.find(stop)] and finish == "stop"


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_images_travel_as_data_urls(dirs: dict[str, Path], sample_png: Path, family: str) -> None:
    backend = _backend(dirs[family])
    image = load_image_path(sample_png)
    messages = [{"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                             {"type": "image_url", "image_url": {"url": data_url(sample_png)}}]}]
    expected = local(backend, [Message(Role.USER, "what is this?", (image,))])
    with serving(backend) as url:
        for stream in (False, True):
            reply = client(url).chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=8,
                                                        stream=stream)
            text = "".join(c.choices[0].delta.content or "" for c in reply) if stream else \
                reply.choices[0].message.content
            assert text == expected


def test_an_adapter_is_chosen_by_its_model_name(llama: tuple[LocalBackend, str]) -> None:
    backend, url = llama
    answers = {name: client(url).chat.completions.create(model=name, messages=HELLO, temperature=0,
                                                         max_tokens=8).choices[0].message.content
               for name in ("tiny", "pirate")}
    assert answers == {"tiny": local(backend, HELLO_MESSAGES, adapter="none"),
                       "pirate": local(backend, HELLO_MESSAGES, adapter="pirate")}
    assert answers["tiny"] != answers["pirate"]  # the base name runs the base model, adapters off


def test_a_hot_loaded_adapter_is_listed_and_served_at_once(dirs: dict[str, Path]) -> None:
    backend = _backend(dirs["llama"])
    with serving(backend) as url:
        openai_client = client(url)
        assert [m.id for m in openai_client.models.list()] == ["tiny"]
        assert backend.load_adapter(str(dirs["poet"]), "verse") == "verse"
        assert [m.id for m in openai_client.models.list()] == ["tiny", "verse"]
        reply = openai_client.chat.completions.create(model="verse", messages=HELLO, temperature=0, max_tokens=8)
        assert reply.choices[0].message.content == local(backend, HELLO_MESSAGES, adapter="verse")
        backend.unload_adapter("verse")
        assert [m.id for m in openai_client.models.list()] == ["tiny"]
        with pytest.raises(openai.NotFoundError, match="the model 'verse' does not exist"):
            openai_client.chat.completions.create(model="verse", messages=HELLO, max_tokens=8)


# errors ----------------------------------------------------------------------------------------------------------

NOT_AN_IMAGE = f"data:image/png;base64,{base64.b64encode(b'hello, I am text').decode()}"
ERRORS: list[tuple[str, dict[str, Any], type[openai.APIStatusError], str]] = [
    ("not an image", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": NOT_AN_IMAGE}}]}]}, openai.BadRequestError,
     "messages[0].content[0]: not an image"),
    ("a web URL", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]}, openai.BadRequestError,
     "images must be base64 data: URLs"),
    ("broken base64", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}]}, openai.BadRequestError,
     "the data: URL is not valid base64"),
    ("an unknown model", {"model": "gpt-9"}, openai.NotFoundError,
     "the model 'gpt-9' does not exist; this server serves: tiny"),
    ("a negative temperature", {"temperature": -1}, openai.BadRequestError, "temperature must be >= 0, got -1"),
    ("two answers", {"n": 2}, openai.BadRequestError, "n must be 1"),
    ("an unknown role", {"messages": [{"role": "wizard", "content": "hi"}]}, openai.BadRequestError,
     "messages[0].role must be one of system, developer, user, assistant, got 'wizard'"),
    ("no messages", {"messages": []}, openai.BadRequestError, "messages must be a non-empty list"),
    ("tools", {"tools": [{"type": "function", "function": {"name": "f"}}]}, openai.BadRequestError,
     "tools is not supported"),
    ("an answer longer than the context", {"max_tokens": 600}, openai.BadRequestError,
     "but the model's context is 512 tokens"),
    ("a prompt longer than the context", {"messages": [{"role": "user", "content": "x" * 600}]},
     openai.BadRequestError, "but the model's context is 512 tokens"),
]


@pytest.mark.parametrize("change, error_type, expected", [case[1:] for case in ERRORS], ids=[c[0] for c in ERRORS])
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_bad_requests_are_one_line_openai_errors(llama: tuple[LocalBackend, str], change: dict[str, Any],
                                                 error_type: type[openai.APIStatusError], expected: str,
                                                 stream: bool) -> None:
    backend, url = llama
    request = {"model": "tiny", "messages": HELLO, "max_tokens": 8, "stream": stream, **change}
    with pytest.raises(error_type) as error:
        client(url).chat.completions.create(**request)
    message = error.value.body["message"]
    assert expected in message and "\n" not in message and error.value.body["type"] == "invalid_request_error"


def test_images_to_a_text_model_are_refused(llama: tuple[LocalBackend, str], sample_png: Path) -> None:
    backend, url = llama
    content = [{"type": "image_url", "image_url": {"url": data_url(sample_png)}}]
    with pytest.raises(openai.BadRequestError, match="this model reads text only"):
        client(url).chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}])


def test_oversized_requests_and_images_are_refused(dirs: dict[str, Path], sample_png: Path) -> None:
    limits = Limits(max_request_bytes=64_000, max_images=1, max_image_bytes=4_000)
    with serving(_backend(dirs["llava"]), limits=limits) as url:
        with pytest.raises(openai.APIStatusError) as error:
            client(url).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x" * 100_000}])
        assert error.value.status_code == 413
        assert error.value.body["message"] == "the request is 100 kB, over this server's 64 kB limit"
        image = {"type": "image_url", "image_url": {"url": data_url(sample_png)}}
        with pytest.raises(openai.BadRequestError, match=r"content\[0\]: about .* is over the 4 kB image limit"):
            client(url).chat.completions.create(model="tiny", messages=[{"role": "user", "content": [image]}])
        small = {"type": "image_url", "image_url": {"url": _tiny_png_url()}}
        with pytest.raises(openai.BadRequestError, match="a request may carry at most 1 images"):
            client(url).chat.completions.create(model="tiny", messages=[{"role": "user", "content": [small, small]}])


def _tiny_png_url() -> str:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), "teal").save(buffer, "PNG")
    return f"data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}"


@pytest.mark.parametrize("method, path, body, status, expected", [
    ("POST", "/v1/chat/completions", b"{not json", 400, "the body is not valid JSON"),
    ("POST", "/v1/chat/completions", b"[1, 2]", 400, "the body must be a JSON object"),
    ("POST", "/v1/chat/completions", b'{"messages": []}', 400, "model is required"),
    ("GET", "/v1/chat/completions", b"", 405, "GET is not allowed on /v1/chat/completions"),
    ("POST", "/v1/embeddings", b"{}", 404, "no route POST /v1/embeddings"),
])
def test_raw_http_errors_are_openai_error_objects(llama: tuple[LocalBackend, str], method: str, path: str,
                                                  body: bytes, status: int, expected: str) -> None:
    backend, url = llama
    code, reply = raw(url, method, path, body)
    assert code == status
    error = reply["error"]
    assert expected in error["message"] and "\n" not in error["message"] and set(error) >= {"type", "code"}


def test_a_token_is_required_when_set(dirs: dict[str, Path]) -> None:
    with serving(_backend(dirs["llama"]), token="s3cret-token") as url:
        for key in ("wrong", "s3cret-token-but-longer", "s3cret-toke"):
            with pytest.raises(openai.AuthenticationError) as error:
                client(url, key).models.list()
            assert error.value.body["message"] == "a valid API key is required (Authorization: Bearer " \
                                                  "$IRIS_SERVE_TOKEN)"
        assert raw(url, "POST", "/v1/chat/completions", {"model": "tiny", "messages": HELLO})[0] == 401
        assert [m.id for m in client(url, "s3cret-token").models.list()] == ["tiny"]
        reply = client(url, "s3cret-token").chat.completions.create(model="tiny", messages=HELLO, max_tokens=4)
        assert reply.choices[0].message.content is not None
        assert _health(url)["status"] == "ok"  # no token needed to see that it is up


# the device line -------------------------------------------------------------------------------------------------


def test_two_clients_at_once_each_get_their_own_answer(llama: tuple[LocalBackend, str]) -> None:
    backend, url = llama
    questions = {"a": "tell me about cats", "b": "and about dogs?"}
    options = GenerationOptions(temperature=0, max_new_tokens=40)
    expected = {key: local(backend, [Message(Role.USER, text)], options) for key, text in questions.items()}
    answers: dict[str, str] = {}

    def ask(key: str) -> None:
        reply = client(url).chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": questions[key]}], temperature=0, max_tokens=40,
            stream=key == "a")
        answers[key] = "".join(c.choices[0].delta.content or "" for c in reply) if key == "a" else \
            reply.choices[0].message.content

    with device_lock(backend.loaded.device):  # both wait: one for the device, one in line
        threads = [threading.Thread(target=ask, args=(key,)) for key in questions]
        for thread in threads:
            thread.start()
        _wait_for(url, running=1, waiting=1)
    for thread in threads:
        thread.join(60)
    assert answers == expected and _health(url) == {"status": "ok", "running": 0, "waiting": 0}


def test_requests_are_answered_in_arrival_order(llama: tuple[LocalBackend, str]) -> None:
    backend, url = llama
    finished: list[str] = []

    def ask(name: str) -> None:
        client(url).chat.completions.create(model="tiny", messages=[{"role": "user", "content": name}], max_tokens=4)
        finished.append(name)

    threads = {name: threading.Thread(target=ask, args=(name,)) for name in ("first", "second", "third")}
    with device_lock(backend.loaded.device):
        for waiting, thread in enumerate(threads.values()):
            thread.start()
            _wait_for(url, running=1, waiting=waiting)
    for thread in threads.values():
        thread.join(60)
    assert finished == ["first", "second", "third"]


def test_the_device_queue_is_first_come_first_served_and_bounded() -> None:
    async def scenario() -> list[str]:
        queue = DeviceQueue(max_waiting=2)
        order: list[str] = []
        first = queue.admit()
        tickets = {name: queue.admit() for name in ("b", "c")}
        with pytest.raises(QueueFull, match="1 answer\\(s\\) running and 2 waiting"):
            queue.admit()

        async def take(name: str) -> None:
            await tickets[name].wait()
            order.append(name)
            tickets[name].release()

        waiters = [asyncio.create_task(take(name)) for name in ("c", "b")]  # c starts waiting first, b is ahead
        await asyncio.sleep(0)
        assert order == [] and (queue.running, queue.waiting) == (1, 2)
        first.release()
        await asyncio.gather(*waiters)
        assert (queue.running, queue.waiting) == (0, 0)
        gone = [queue.admit(), queue.admit()]
        gone[1].release()  # leaves the line before its turn
        gone[0].release()
        assert (queue.running, queue.waiting) == (0, 0)
        return order

    assert asyncio.run(scenario()) == ["b", "c"]


def test_a_full_line_is_429_and_a_long_wait_is_503(dirs: dict[str, Path]) -> None:
    backend = _backend(dirs["llama"])
    with serving(backend, max_waiting=1, queue_timeout=0.5) as url:
        results: list[Any] = []
        first = threading.Thread(target=lambda: results.append(client(url).chat.completions.create(
            model="tiny", messages=HELLO, max_tokens=4)))
        with device_lock(backend.loaded.device):
            first.start()
            _wait_for(url, running=1)
            started = time.monotonic()
            with pytest.raises(openai.InternalServerError) as waited:  # waits in line, then gives up
                client(url).chat.completions.create(model="tiny", messages=HELLO, max_tokens=4)
            assert time.monotonic() - started >= 0.5 and waited.value.status_code == 503
            assert waited.value.body["message"] == "the device stayed busy for 0.5 s; retry later"
            filler = threading.Thread(target=lambda: raw(url, "POST", "/v1/chat/completions", {
                "model": "tiny", "messages": HELLO, "max_tokens": 4}))
            filler.start()
            _wait_for(url, waiting=1)
            with pytest.raises(openai.RateLimitError) as full:
                client(url).chat.completions.create(model="tiny", messages=HELLO, max_tokens=4)
            assert full.value.body["message"] == "the server is busy: 1 answer(s) running and 1 waiting, the most " \
                                                 "it queues; retry later"
            assert full.value.response.headers["retry-after"] == "1"
        first.join(60)
        filler.join(60)
        assert results and results[0].choices[0].message.content is not None


def test_a_client_that_leaves_the_line_frees_its_place(dirs: dict[str, Path]) -> None:
    backend = _backend(dirs["llama"])
    with serving(backend) as url, device_lock(backend.loaded.device):
        running = threading.Thread(target=lambda: raw(url, "POST", "/v1/chat/completions", {
            "model": "tiny", "messages": HELLO, "max_tokens": 4}))
        running.start()
        _wait_for(url, running=1)
        with pytest.raises(TimeoutError):  # the client gives up while waiting in line
            raw(url, "POST", "/v1/chat/completions", {"model": "tiny", "messages": HELLO, "max_tokens": 4,
                                                      "stream": True}, timeout=1)
        _wait_for(url, running=1, waiting=0)
    running.join(30)


class CountingBackend:
    """The real backend, with a record of what its stream produced and whether it was stopped early."""

    def __init__(self, backend: LocalBackend) -> None:
        self.backend = backend
        self.produced = ""
        self.finished = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.backend, name)

    def stream(self, messages: list[Message], options: GenerationOptions, adapter: str | None = None) -> Iterator[str]:
        for chunk in self.backend.stream(messages, options, adapter):
            self.produced += chunk
            yield chunk
        self.finished = True


def test_a_client_that_disconnects_stops_its_generation(dirs: dict[str, Path]) -> None:
    backend = _backend(dirs["llama"])
    story = [Message(Role.USER, "Tell me a story")]
    chunks = list(backend.stream(story, GenerationOptions(temperature=0, max_new_tokens=200)))
    assert len(chunks) > 40  # the whole answer comes in many chunks: the server sees the client leave in time
    full = "".join(chunks)
    counting = CountingBackend(backend)
    with serving(counting) as url:
        body = {"model": "tiny", "messages": [{"role": "user", "content": "Tell me a story"}], "temperature": 0,
                "max_tokens": 200, "stream": True}
        connection = _connection(url, 30)
        connection.request("POST", "/v1/chat/completions", body=json.dumps(body).encode(),
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        while line := response.readline():
            if line.startswith(b"data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                break  # one piece of the answer, then the client leaves
        connection.close()
        _wait_for(url, running=0)
    assert not counting.finished and len(counting.produced) < len(full) / 2


class FailingBackend(CountingBackend):
    """The real backend, whose stream breaks (as a bug would) after ``after`` chunks."""

    def __init__(self, backend: LocalBackend, after: int) -> None:
        super().__init__(backend)
        self.after = after

    def stream(self, messages: list[Message], options: GenerationOptions, adapter: str | None = None) -> Iterator[str]:
        chunks = super().stream(messages, options, adapter)
        try:
            for _ in range(self.after):
                yield next(chunks)
        finally:
            getattr(chunks, "close", lambda: None)()
        raise RuntimeError("boom\nin two lines")


@pytest.mark.parametrize("after", [0, 1], ids=["before the answer", "during the answer"])
def test_a_bug_during_generation_is_an_error_object_and_the_server_keeps_serving(dirs: dict[str, Path],
                                                                                  after: int) -> None:
    broken = FailingBackend(_backend(dirs["llama"]), after)
    story = {"model": "tiny", "messages": [{"role": "user", "content": "Tell me a story"}], "max_tokens": 60}
    with serving(broken) as url:
        if after == 0:
            with pytest.raises(openai.InternalServerError) as error:
                client(url).chat.completions.create(**story)
            assert error.value.body == {"message": "internal error: RuntimeError: boom in two lines",
                                        "type": "server_error", "param": None, "code": None}
        with pytest.raises(openai.APIError, match="internal error: RuntimeError: boom in two lines"):
            list(client(url).chat.completions.create(**story, stream=True))
        assert _health(url) == {"status": "ok", "running": 0, "waiting": 0}
        assert client(url).models.list().data[0].id == "tiny"


# Iris's own clients against the server ---------------------------------------------------------------------------


def test_iris_openai_backend_shares_the_model_with_adapters_by_name(llama: tuple[LocalBackend, str],
                                                                     tmp_path: Path) -> None:
    backend, url = llama
    remote = OpenAIBackend(url, "tiny")
    assert remote.context_length == 512 and remote.adapter_names() == ["pirate"]
    manager = DialogueManager(remote, Store(tmp_path / "iris.db"), default_system_prompt="sys",
                              default_options=GenerationOptions(temperature=0, max_new_tokens=8))
    conversation = manager.new_conversation()
    assert manager.send(conversation, "hello there").run() == local(backend, HELLO_MESSAGES)
    manager.set_adapter(conversation, "pirate")
    history = [*manager.prompt_messages(conversation), Message(Role.USER, "and again")]
    assert manager.send(conversation, "and again").run() == local(backend, history, adapter="pirate")


def test_iris_ask_with_the_openai_backend_gets_the_served_answer(llama: tuple[LocalBackend, str]) -> None:
    backend, url = llama
    result = CliRunner().invoke(app, ["ask", "hello there", "--backend", "openai", "--base-url", url, "--model",
                                      "tiny", "--temperature", "0", "--max-new-tokens", "8"])
    assert result.exit_code == 0, result.output
    system = Message(Role.SYSTEM, "You are a helpful AI assistant named Iris.")
    assert result.stdout == local(backend, [system, Message(Role.USER, "hello there")]) + "\n"


def test_iris_chat_with_the_openai_backend_answers_and_switches_adapters_by_name(
        llama: tuple[LocalBackend, str], monkeypatch: pytest.MonkeyPatch) -> None:
    backend, url = llama
    keys = "/set temperature 0\r/set max_new_tokens 8\rhello there\r/adapter pirate\rhello there\r/exit\r"
    with create_pipe_input() as pipe:
        pipe.send_text(keys)
        make_reader = cli.prompt_input.make_reader
        monkeypatch.setattr(cli.prompt_input, "make_reader",
                            lambda history, **_: make_reader(history, input=pipe, output=DummyOutput()))
        result = CliRunner().invoke(app, ["chat", "--plain", "--backend", "openai", "--base-url", url,
                                          "--model", "tiny"])
    assert result.exit_code == 0, result.output
    store = Store(Paths.default().database)
    try:
        conversation = store.latest_conversation_id()
        assert conversation is not None
        thread = store.thread(conversation)
    finally:
        store.close()
    system = Message(Role.SYSTEM, "You are a helpful AI assistant named Iris.")
    first = [system, Message(Role.USER, "hello there")]
    assert [m.text for m in thread if m.role is Role.ASSISTANT] == [
        local(backend, first), local(backend, [*first, thread[1], Message(Role.USER, "hello there")], adapter="pirate")]


@pytest.mark.asyncio
async def test_the_discord_bot_with_the_openai_backend_answers_from_the_served_model(
        llama: tuple[LocalBackend, str], store: Store) -> None:
    backend, url = llama
    manager = DialogueManager(OpenAIBackend(url, "tiny"), store, default_system_prompt="You are tiny.",
                              default_options=GenerationOptions(temperature=0, max_new_tokens=8))
    harness = await Harness.start(manager)
    try:
        question = await harness.say("hello model")
        reply = harness.transcript.reply_to(question.id)
    finally:
        await harness.close()
    conversation = store.list_conversations(source="discord")[-1]
    *prompt, answer = manager.prompt_messages(conversation.id)
    assert reply and answer.role is Role.ASSISTANT and answer.text == local(backend, prompt)


def test_a_hot_loaded_adapter_reaches_a_connected_iris_client(dirs: dict[str, Path], tmp_path: Path) -> None:
    backend = _backend(dirs["llama"])
    with serving(backend) as url:
        remote = OpenAIBackend(url, "tiny")
        manager = DialogueManager(remote, Store(tmp_path / "iris.db"),
                                  default_options=GenerationOptions(temperature=0, max_new_tokens=8))
        conversation = manager.new_conversation()
        backend.load_adapter(str(dirs["pirate"]))
        manager.set_adapter(conversation, "pirate")  # the client asks the server afresh
        assert manager.send(conversation, "hello there").run() == \
            local(backend, [Message(Role.USER, "hello there")], adapter="pirate")


# the command -----------------------------------------------------------------------------------------------------


def test_iris_serve_runs_until_ctrl_c(dirs: dict[str, Path], iris_home: Path) -> None:
    environment = {**os.environ, "IRIS_HOME": str(iris_home), "IRIS_SERVE_TOKEN": "tok", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "-m", "cli.app", "serve", "--model", str(dirs["llama"]), "--quant",
                                "none", "--adapter", str(dirs["pirate"]), "--name", "smol", "--port", "0"],
                               stderr=subprocess.PIPE, text=True, env=environment, cwd=Path(__file__).parent.parent)
    try:
        assert process.stderr is not None
        banner = ""
        while "http://" not in banner:
            banner = process.stderr.readline()
            assert banner or process.poll() is None, "iris serve exited before it listened"
        assert "smol · adapters: pirate" in banner and "token required" in banner
        url = banner[banner.index("http://"):].split()[0]
        assert [m.id for m in client(url, "tok").models.list()] == ["smol", "pirate"]
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(30) == 0


def test_a_taken_port_fails_in_one_line_before_the_model_loads(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(app, ["serve", "--model", str(tmp_path / "not-loaded"), "--port", str(port)])
    assert result.exit_code == 1
    assert result.output.strip() == f"error: cannot listen on 127.0.0.1:{port} (Address already in use)"

