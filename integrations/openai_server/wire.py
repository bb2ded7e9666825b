"""The OpenAI chat-completions wire format: a request body into Iris messages and sampling options, and Iris's
answers and errors back into OpenAI's JSON shapes.

Everything a client sends is checked here, before the device is involved: the body is a JSON object, each
message has a known role and text or image parts, images come as base64 ``data:`` URLs (the server fetches
nothing) and pass the same checks as everywhere in Iris (byte cap, sniffed format, pixel cap, full decode),
and sampling values obey Iris's option rules. A refusal is an ``ApiError``: HTTP status, OpenAI error type,
the parameter at fault, and a one-line message.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import re
from dataclasses import dataclass
from typing import Any

from assistant.config import GENERATION_RULES, GenerationOptions, parse
from assistant.errors import BadImage, BadSetting, one_line
from assistant.files import describe_size
from assistant.messages import Message, Role, valid_text
from assistant.vision import load_image_bytes

ROLES = {"system": Role.SYSTEM, "developer": Role.SYSTEM, "user": Role.USER, "assistant": Role.ASSISTANT}
# Request fields Iris cannot honour: refused when set, rather than silently ignored.
UNSUPPORTED = ("tools", "functions", "tool_choice", "function_call", "logprobs", "top_logprobs", "logit_bias",
               "response_format", "audio", "modalities", "prediction")
MAX_STOPS = 4
_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(?:;[^,;]*)*),", re.ASCII)


class ApiError(Exception):
    """A request the server refuses: ``str()`` is the one-line message sent in an OpenAI error object."""

    def __init__(self, message: str, status: int = 400, kind: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(" ".join(message.split()))
        self.status = status
        self.kind = kind
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(str(self), self.kind, self.param, self.code)


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass(frozen=True)
class Limits:
    """What one request may carry (``iris serve`` flags and the image caps of ``config.toml``)."""

    max_request_bytes: int = 64_000_000
    max_images: int = 16
    max_image_bytes: int = 20 << 20
    max_image_pixels: int = 50_000_000


@dataclass(frozen=True)
class ChatRequest:
    """A checked chat-completions request; ``max_tokens`` is None when the client left it to the server."""

    model: str
    messages: list[Message]
    options: GenerationOptions
    max_tokens: int | None
    stream: bool
    include_usage: bool
    stop: tuple[str, ...]


def parse_chat_request(body: bytes, defaults: GenerationOptions, limits: Limits,
                       accepts_images: bool) -> ChatRequest:
    """The request in ``body``, with the server's ``defaults`` for sampling values it does not set."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as error:  # JSONDecodeError, bad UTF-8, huge integers, deep nesting
        raise ApiError(f"the body is not valid JSON ({one_line(error)[:200]})") from None
    if not isinstance(data, dict):
        raise ApiError("the body must be a JSON object")
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError("model is required: one of the names GET /v1/models lists", param="model")
    for name in UNSUPPORTED:
        if data.get(name):
            raise ApiError(f"{name} is not supported by this server", param=name)
    if data.get("n", 1) not in (1, None):
        raise ApiError("n must be 1: this server generates one answer per request", param="n")
    for name in ("frequency_penalty", "presence_penalty"):
        if data.get(name) not in (None, 0, 0.0):
            raise ApiError(f"{name} is not supported by this server (it takes repetition_penalty)", param=name)
    stream = _flag(data, "stream")
    stream_options = data.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise ApiError("stream_options must be an object", param="stream_options")
    options, max_tokens = _options(data, defaults)
    return ChatRequest(model=model, messages=_messages(data.get("messages"), limits, accepts_images),
                       options=options, max_tokens=max_tokens, stream=stream,
                       include_usage=stream and _flag(stream_options, "include_usage", "stream_options."),
                       stop=_stops(data.get("stop")))


def _flag(data: dict[str, Any], name: str, prefix: str = "") -> bool:
    value = data.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ApiError(f"{prefix}{name} must be true or false", param=prefix + name)
    return value


def _options(data: dict[str, Any], defaults: GenerationOptions) -> tuple[GenerationOptions, int | None]:
    """Sampling options from OpenAI's names (and the ``top_k``/``repetition_penalty`` extensions), by Iris's rules."""
    names = {"temperature": "temperature", "top_p": "top_p", "seed": "seed", "top_k": "top_k",
             "repetition_penalty": "repetition_penalty", "max_completion_tokens": "max_new_tokens",
             "max_tokens": "max_new_tokens"}
    values: dict[str, Any] = {}
    given: dict[str, str] = {}
    for field, option in names.items():
        value = data.get(field)
        if value is None:
            continue
        if option in given:
            raise ApiError(f"give {given[option]} or {field}, not both", param=field)
        try:
            values[option] = parse(GENERATION_RULES[option], value, field)
        except BadSetting as error:
            raise ApiError(str(error), param=field) from None
        given[option] = field
    return dataclasses.replace(defaults, **values), values.get("max_new_tokens")


def _stops(value: Any) -> tuple[str, ...]:
    stops = [value] if isinstance(value, str) else value if value is not None else []
    if not isinstance(stops, list) or not all(isinstance(stop, str) and stop for stop in stops):
        raise ApiError("stop must be a non-empty string or a list of them", param="stop")
    if len(stops) > MAX_STOPS:
        raise ApiError(f"stop takes at most {MAX_STOPS} sequences", param="stop")
    return tuple(stops)


def _messages(value: Any, limits: Limits, accepts_images: bool) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise ApiError("messages must be a non-empty list", param="messages")
    messages: list[Message] = []
    images = 0
    for index, entry in enumerate(value):
        where = f"messages[{index}]"
        if not isinstance(entry, dict):
            raise ApiError(f"{where} must be an object", param=where)
        name = entry.get("role")
        role = ROLES.get(name) if isinstance(name, str) else None
        if role is None:
            raise ApiError(f"{where}.role must be one of {', '.join(ROLES)}, got {_shown(name)}",
                           param=f"{where}.role")
        text, attached = _content(entry.get("content"), role, f"{where}.content", limits)
        images += len(attached)
        if attached and not accepts_images:
            raise ApiError("this model reads text only; send no image_url parts", param=f"{where}.content")
        if images > limits.max_images:
            raise ApiError(f"a request may carry at most {limits.max_images} images", param=f"{where}.content")
        messages.append(Message(role, valid_text(text), tuple(attached)))
    return messages


def _content(value: Any, role: Role, where: str, limits: Limits) -> tuple[str, list[Any]]:
    """A message's text and images: a string, or a list of ``text`` and ``image_url`` parts."""
    if isinstance(value, str):
        return value, []
    if value is None and role is Role.ASSISTANT:
        return "", []
    if not isinstance(value, list):
        raise ApiError(f"{where} must be a string or a list of parts", param=where)
    texts: list[str] = []
    images = []
    for index, part in enumerate(value):
        at = f"{where}[{index}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            if role is not Role.USER:
                raise ApiError(f"{at}: images go in user messages", param=at)
            images.append(decode_image(part.get("image_url"), at, limits))
        else:
            raise ApiError(f"{at} must be a text or image_url part, got {_shown(part)}", param=at)
    return "\n".join(texts), images


def decode_image(value: Any, where: str, limits: Limits) -> Any:
    """An ``image_url`` part's ``data:`` URL as a validated ``ImageAttachment`` (Iris's image checks)."""
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str):
        raise ApiError(f"{where}.image_url.url must be a data: URL string", param=where)
    match = _DATA_URL.match(url)
    if match is None:
        scheme = url.split(":", 1)[0][:10] if ":" in url else "no scheme"
        raise ApiError(f"{where}: images must be base64 data: URLs (data:image/png;base64,...), this server fetches "
                       f"nothing (got {_shown(scheme)})", param=where)
    if ";base64" not in match["params"].lower():
        raise ApiError(f"{where}: the data: URL must be base64-encoded (;base64,)", param=where)
    payload = url[match.end():]
    if len(payload) // 4 * 3 > limits.max_image_bytes:  # refused before decoding
        raise ApiError(f"{where}: about {describe_size(len(payload) // 4 * 3)} is over the "
                       f"{describe_size(limits.max_image_bytes)} image limit", param=where)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(f"{where}: the data: URL is not valid base64", param=where) from None
    try:
        return load_image_bytes(data, where, max_bytes=limits.max_image_bytes, max_pixels=limits.max_image_pixels)
    except BadImage as error:
        raise ApiError(str(error), param=where) from None


def _shown(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=True) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# answers -------------------------------------------------------------------------------------------------------


def completion(request_id: str, created: int, model: str, text: str, finish: str,
               usage: dict[str, int]) -> dict[str, Any]:
    return {"id": request_id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
            "usage": usage}


def chunk(request_id: str, created: int, model: str, delta: dict[str, Any],
          finish: str | None = None) -> dict[str, Any]:
    return {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def usage_chunk(request_id: str, created: int, model: str, usage: dict[str, int]) -> dict[str, Any]:
    return {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [], "usage": usage}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def event(value: dict[str, Any] | str) -> bytes:
    """One server-sent event."""
    data = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return f"data: {data}\n\n".encode()
