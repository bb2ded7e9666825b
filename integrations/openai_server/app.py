"""``iris serve``'s HTTP application (Starlette): OpenAI's chat-completions API on Iris's own engine.

Routes: ``POST /v1/chat/completions`` (server-sent events with ``stream: true``, one JSON answer otherwise),
``GET /v1/models`` (the base model, then each loaded adapter, read afresh on every call so an adapter loaded
while the server runs is listed at once; a request naming an adapter runs it), ``GET /health``.

Requests are stateless: each carries its conversation, rendered by the loaded model's own chat template, and is
answered by ``LocalBackend.stream`` in a worker thread. Every request waits its turn in one first-come,
first-served line for the device (``DeviceQueue``): 429 when the line is full, 503 when the wait outlasts the
queue timeout. A client that disconnects leaves the line, or its generation stops after the chunk in progress.
With a token (``IRIS_SERVE_TOKEN``), every route but ``/health`` needs ``Authorization: Bearer TOKEN``, compared
in constant time. Errors are OpenAI error objects with one-line messages.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio.to_thread
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from assistant.config import GenerationOptions
from assistant.engine import LocalBackend
from assistant.errors import BadAdapter, IrisError, one_line
from assistant.files import describe_size
from assistant.messages import BASE_MODEL, Message
from integrations.openai_server.device_queue import DeviceQueue, QueueFull, Ticket
from integrations.openai_server.wire import (
    ApiError,
    ChatRequest,
    Limits,
    chunk,
    completion,
    error_body,
    event,
    parse_chat_request,
    usage,
    usage_chunk,
)

log = logging.getLogger("iris.serve")
CLIENT_GONE = 499  # what the access log shows for a request whose client left (nginx's convention)


@dataclass(frozen=True)
class ServeOptions:
    """How the server admits requests; ``base_name`` is the base model's name in ``/v1/models``."""

    base_name: str
    token: str | None = None
    limits: Limits = field(default_factory=Limits)
    defaults: GenerationOptions = field(default_factory=GenerationOptions)
    max_waiting: int = 16
    queue_timeout: float = 600.0


class ClientGone(Exception):
    """The request's generation was cancelled because its client went away."""


class Generation:
    """One answer: waits its turn for the device, then streams from a worker thread into the event loop.

    ``cancel()`` takes the request out of the line, or stops the generation after the chunk in progress; the
    device passes to the next request only once the worker has stopped.
    """

    def __init__(self, backend: LocalBackend, messages: list[Message], options: GenerationOptions,
                 adapter: str | None) -> None:
        self._backend = backend
        self._messages = messages
        self._options = options
        self._adapter = adapter
        self._events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._stop = threading.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self, ticket: Ticket, queue_timeout: float) -> None:
        self._task = asyncio.create_task(self._wait_turn(ticket, queue_timeout))

    def cancel(self) -> None:
        self._stop.set()
        if self._task is not None and not self._task.done():
            self._task.cancel()

    async def texts(self) -> AsyncIterator[str]:
        """The answer's chunks as they come; raises what generation raised, or ``ClientGone``."""
        while True:
            kind, value = await self._events.get()
            if kind == "text":
                yield value
            elif kind == "end":
                return
            else:
                raise value

    async def _wait_turn(self, ticket: Ticket, queue_timeout: float) -> None:
        try:
            await asyncio.wait_for(ticket.wait(), queue_timeout)
        except TimeoutError:
            ticket.release()
            self._events.put_nowait(("error", ApiError(
                f"the device stayed busy for {queue_timeout:g} s; retry later", 503, "server_error",
                code="server_busy", headers={"Retry-After": "5"})))
            return
        except asyncio.CancelledError:
            ticket.release()
            self._events.put_nowait(("error", ClientGone()))
            raise
        worker = threading.Thread(target=self._generate, args=(asyncio.get_running_loop(), ticket),
                                  name="iris-serve-generate", daemon=True)
        worker.start()

    def _generate(self, loop: asyncio.AbstractEventLoop, ticket: Ticket) -> None:
        """Worker thread: run the backend's stream, send its chunks to the loop, stop when asked; the ticket is
        released (in the loop) only after the backend let go of the device."""
        outcome: tuple[str, Any] = ("end", None)
        try:
            stream = self._backend.stream(self._messages, self._options, self._adapter)
            try:
                for text in stream:
                    if self._stop.is_set():
                        outcome = ("error", ClientGone())
                        break
                    loop.call_soon_threadsafe(self._events.put_nowait, ("text", text))
            finally:
                getattr(stream, "close", lambda: None)()  # the backend's generator lets go of the device
        except BaseException as error:  # handed to the request's coroutine, which reports it
            outcome = ("error", error)
        try:
            loop.call_soon_threadsafe(self._finish, ticket, outcome)
        except RuntimeError:  # the server's loop is already closed
            pass

    def _finish(self, ticket: Ticket, outcome: tuple[str, Any]) -> None:
        ticket.release()
        self._events.put_nowait(outcome)


class StopScanner:
    """Cuts an answer at the first stop sequence, holding back text that could be the start of one."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.hold = max((len(stop) for stop in stops), default=1) - 1
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """The text that is safe to send, and whether a stop sequence ended the answer."""
        self.pending += text
        found = [index for index in (self.pending.find(stop) for stop in self.stops) if index >= 0]
        if found:
            safe, self.pending = self.pending[:min(found)], ""
            return safe, True
        cut = max(len(self.pending) - self.hold, 0)
        safe, self.pending = self.pending[:cut], self.pending[cut:]
        return safe, False

    def end(self) -> str:
        rest, self.pending = self.pending, ""
        return rest


@dataclass
class Answer:
    """What one request is sent: its text pieces as they come, then why it finished."""

    generation: Generation
    stops: tuple[str, ...]
    stopped: bool = False
    text: str = ""

    async def pieces(self) -> AsyncIterator[str]:
        scanner = StopScanner(self.stops)
        async for text in self.generation.texts():
            safe, self.stopped = scanner.feed(text)
            if safe:
                self.text += safe
                yield safe
            if self.stopped:
                self.generation.cancel()
                return
        if rest := scanner.end():
            self.text += rest
            yield rest


class OpenAIServer:
    """The routes over one ``LocalBackend``; its device is shared through one ``DeviceQueue``."""

    def __init__(self, backend: LocalBackend, options: ServeOptions) -> None:
        self.backend = backend
        self.options = options
        self.queue = DeviceQueue(options.max_waiting)
        self.created = int(time.time())

    # routes ------------------------------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "running": self.queue.running, "waiting": self.queue.waiting})

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": self._model_entries()})

    async def model(self, request: Request) -> Response:
        name = request.path_params["name"]
        for entry in self._model_entries():
            if entry["id"] == name:
                return JSONResponse(entry)
        raise self._unknown_model(name, "name")

    async def chat_completions(self, request: Request) -> Response:
        body = await read_body(request, self.options.limits.max_request_bytes)
        chat, adapter, prompt_tokens, options = await anyio.to_thread.run_sync(self._prepare, body)
        try:
            ticket = self.queue.admit()
        except QueueFull as error:
            raise ApiError(str(error), 429, "rate_limit_error", code="server_busy",
                           headers={"Retry-After": "1"}) from None
        generation = Generation(self.backend, chat.messages, options, adapter)
        generation.start(ticket, self.options.queue_timeout)
        watcher = asyncio.create_task(_cancel_on_disconnect(request.receive, generation))
        answer = Answer(generation, chat.stop)
        pieces = answer.pieces()
        request_id, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
        try:
            first = await anext(pieces, None)  # errors before the first token get their own HTTP status
        except ClientGone:
            return Response(status_code=CLIENT_GONE)
        except BaseException:
            watcher.cancel()
            generation.cancel()
            raise

        def finish_and_usage() -> tuple[str, dict[str, int]]:
            tokens = len(self.backend.loaded.tokenizer(answer.text, add_special_tokens=False)["input_ids"])
            finish = "length" if not answer.stopped and tokens >= options.max_new_tokens else "stop"
            return finish, usage(prompt_tokens, tokens)

        if not chat.stream:
            try:
                async for _ in pieces:
                    pass
            except ClientGone:
                return Response(status_code=CLIENT_GONE)
            finally:
                watcher.cancel()
            finish, counts = finish_and_usage()
            return JSONResponse(completion(request_id, created, chat.model, answer.text, finish, counts))

        async def events() -> AsyncIterator[bytes]:
            try:
                yield event(chunk(request_id, created, chat.model, {"role": "assistant", "content": ""}))
                if first is not None:
                    yield event(chunk(request_id, created, chat.model, {"content": first}))
                async for piece in pieces:
                    yield event(chunk(request_id, created, chat.model, {"content": piece}))
                finish, counts = finish_and_usage()
                yield event(chunk(request_id, created, chat.model, {}, finish))
                if chat.include_usage:
                    yield event(usage_chunk(request_id, created, chat.model, counts))
                yield event("[DONE]")
            except ClientGone:
                return
            except Exception as error:  # the answer has started: the error goes in the stream
                yield event(api_error(error).body())
            finally:
                watcher.cancel()
                generation.cancel()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # helpers -----------------------------------------------------------------------------------------------

    def _model_entries(self) -> list[dict[str, Any]]:
        common = {"object": "model", "created": self.created, "owned_by": "iris",
                  "context_length": self.backend.context_length}
        return [{"id": self.options.base_name, **common},
                *({"id": name, **common, "parent": self.options.base_name} for name in self.backend.adapter_names()
                  if name != self.options.base_name)]

    def _adapter_for(self, model: str) -> str:
        """The adapter a request's ``model`` runs: the base model's name runs it with every adapter off."""
        if model == self.options.base_name:
            return BASE_MODEL
        if model in self.backend.adapter_names():
            return model
        raise self._unknown_model(model, "model")

    def _unknown_model(self, name: str, param: str) -> ApiError:
        served = ", ".join(entry["id"] for entry in self._model_entries())
        return ApiError(f"the model {name[:100]!r} does not exist; this server serves: {served}", 404,
                        param=param, code="model_not_found")

    def _prepare(self, body: bytes) -> tuple[ChatRequest, str, int, GenerationOptions]:
        """Worker thread: the checked request, the adapter it runs, its prompt's size and its fitted options
        (image decoding and prompt rendering stay off the event loop)."""
        chat = parse_chat_request(body, self.options.defaults, self.options.limits, self.backend.accepts_images)
        adapter = self._adapter_for(chat.model)
        return chat, adapter, *self._fit(chat)

    def _fit(self, chat: ChatRequest) -> tuple[int, GenerationOptions]:
        """The prompt's size, and the options with ``max_new_tokens`` fitted to the context window: what is left
        of it when the client did not say, a refusal when what it asked for does not fit."""
        from jinja2 import TemplateError

        try:
            prompt = self.backend.count_tokens(chat.messages)
        except IrisError as error:
            raise ApiError(one_line(error), param="messages") from None
        except TemplateError as error:
            raise ApiError(f"the model's chat template refuses these messages ({one_line(error)})",
                           param="messages") from None
        context = self.backend.context_length
        room = context - prompt
        wanted = chat.max_tokens if chat.max_tokens is not None else min(chat.options.max_new_tokens, room)
        if room < 1 or wanted > room:
            raise ApiError(f"the messages take {prompt} tokens and the answer may take {wanted}, but the model's "
                           f"context is {context} tokens: send less or lower max_tokens", param="messages",
                           code="context_length_exceeded")
        return prompt, dataclasses.replace(chat.options, max_new_tokens=wanted)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 past ``limit`` bytes; the rest is read and dropped (up to a bound) so
    the client gets the answer rather than a broken pipe."""
    declared = request.headers.get("content-length", "")
    parts: list[bytes] = []
    size = 0
    async for part in request.stream():
        size += len(part)
        if size <= limit:
            parts.append(part)
        elif size > 8 * limit:
            break
    if size > limit:
        shown = int(declared) if declared.isdigit() else size
        raise ApiError(f"the request is {describe_size(shown)}, over this server's "
                       f"{describe_size(limit)} limit", 413, code="request_too_large")
    return b"".join(parts)


async def _cancel_on_disconnect(receive: Receive, generation: Generation) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    generation.cancel()


def api_error(error: BaseException) -> ApiError:
    """Any failure as the error object a client is sent: Iris's one-line errors as such, bugs as 500."""
    if isinstance(error, ApiError):
        return error
    if isinstance(error, BadAdapter):
        return ApiError(one_line(error), 404, param="model", code="model_not_found")
    if isinstance(error, IrisError):
        return ApiError(one_line(error))
    log.error("internal error", exc_info=error)
    return ApiError(f"internal error: {type(error).__name__}: {one_line(error)}", 500, "server_error")


async def _error_response(request: Request, error: Exception) -> Response:
    refusal = api_error(error)
    return JSONResponse(refusal.body(), refusal.status, headers=refusal.headers)


async def _http_error_response(request: Request, error: Exception) -> Response:
    assert isinstance(error, HTTPException)
    message = {404: f"no route {request.method} {request.url.path[:200]}",
               405: f"{request.method} is not allowed on {request.url.path[:200]}"}.get(error.status_code,
                                                                                        one_line(error))
    return JSONResponse(error_body(message, "invalid_request_error", code=str(error.status_code)), error.status_code,
                        headers=error.headers)


class BearerToken:
    """Every route but ``/health`` needs ``Authorization: Bearer TOKEN``; compared in constant time."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] == "/health" or self._valid(scope):
            await self.app(scope, receive, send)
            return
        body = error_body("a valid API key is required (Authorization: Bearer $IRIS_SERVE_TOKEN)",
                          "authentication_error", code="invalid_api_key")
        await JSONResponse(body, 401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)

    def _valid(self, scope: Scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, value = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(value.strip(), self.token)


def create_app(backend: LocalBackend, options: ServeOptions) -> Starlette:
    server = OpenAIServer(backend, options)
    routes = [Route("/health", server.health), Route("/v1/models", server.models),
              Route("/v1/models/{name:path}", server.model),
              Route("/v1/chat/completions", server.chat_completions, methods=["POST"])]
    middleware = [Middleware(BearerToken, token=options.token)] if options.token else []
    app = Starlette(routes=routes, middleware=middleware,
                    exception_handlers={ApiError: _error_response, HTTPException: _http_error_response,
                                        Exception: _error_response})
    app.state.server = server
    return app
