"""A ``ChatBackend`` that drives any OpenAI-compatible server (vLLM, llama.cpp, Ollama, TGI).

Streaming uses server-sent events; images travel as ``image_url`` data-URL
parts; adapters map to served model names (vLLM's ``--lora-modules name=path``).
Connection failures, timeouts and 429/5xx answers are retried a few times
before streaming starts, then reported as one-line ``BackendError``s. Only the
standard library is used for HTTP.

The server is not trusted: every reply is checked for shape and size (lines,
bodies), whatever it sends ends as one ``BackendError`` line with control
characters escaped, and the API key goes to the ``--base-url`` origin only (a
redirect elsewhere is refused rather than followed with the key).
"""

from __future__ import annotations

import base64
import http.client
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from typing import Any

from assistant.config import GenerationOptions
from assistant.errors import BackendError, BadAdapter
from assistant.messages import BASE_MODEL, ImageAttachment, Message

# Without the server's tokenizer, prompt length is estimated; both figures are conservative.
CHARS_PER_TOKEN = 3.0
IMAGE_TOKEN_ESTIMATE = 768
# Bounds on what a server may send: one stream line, one JSON body, the part of an error body that is read.
MAX_LINE_BYTES = 1 << 20
MAX_BODY_BYTES = 8 << 20
MAX_ERROR_BYTES = 64 << 10
SERVER_ADAPTERS = ("the server loads adapters itself; load it where the server runs (iris serve --adapter PATH, "
                   "vLLM --lora-modules NAME=PATH) and choose it here by name with /adapter NAME")


class OpenAIBackend:
    """Chat through ``POST {base_url}/chat/completions`` with ``stream: true``."""

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, timeout: float = 60.0,
                 retries: int = 2, context_length: int | None = None, accepts_images: bool = True) -> None:
        self.base_url = base_url.rstrip("/")
        parsed = urllib.parse.urlsplit(self.base_url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise BackendError(f"--base-url must be an http:// or https:// URL, not {_clean(base_url, 80)!r}")
        self.model = model
        self.timeout = timeout
        self.retries = retries
        self.accepts_images = accepts_images
        self._api_key = api_key
        self._served: list[dict[str, Any]] | None = None
        self._opener = urllib.request.build_opener(_SameOriginRedirects(_origin(self.base_url)))
        self.context_length = context_length or self._served_context_length() or 4096

    # protocol ----------------------------------------------------------------

    def count_tokens(self, messages: Sequence[Message]) -> int:
        return sum(4 + int(len(m.text) / CHARS_PER_TOKEN) + IMAGE_TOKEN_ESTIMATE * len(m.images) for m in messages)

    def image_tokens(self, image: ImageAttachment) -> int:
        return IMAGE_TOKEN_ESTIMATE

    def adapter_names(self) -> list[str]:
        """The served models besides ``model``, asked afresh: a server (``iris serve``) may load adapters as it runs."""
        self._served = None
        return self._adapters()

    def _adapters(self) -> list[str]:
        return [entry["id"] for entry in self.served_models() if entry["id"] != self.model]

    def describe(self) -> dict[str, Any]:
        return {"model": self.model, "device": f"server {self.base_url}", "quantization": "server-side",
                "context_length": self.context_length, "accepts_images": self.accepts_images,
                "adapters": self.adapter_names(),
                "served_models": [entry["id"] for entry in self.served_models()]}

    def stream(self, messages: Sequence[Message], options: GenerationOptions,
               adapter: str | None = None) -> Iterator[str]:
        if adapter == BASE_MODEL:
            adapter = None
        if adapter is not None and adapter not in self._adapters() and adapter not in self.adapter_names():
            raise BadAdapter(f"the server does not serve an adapter named {adapter!r}")
        payload = {"model": adapter or self.model, "messages": [_wire_message(m) for m in messages],
                   "stream": True, **_sampling(options)}
        response = self._open("POST", "/chat/completions", payload)
        try:
            yield from _sse_text(response, self.base_url)
        except TimeoutError:
            raise BackendError(f"{self.base_url}: no data for {self.timeout:.0f} s while streaming") from None
        except (OSError, http.client.HTTPException) as error:
            raise BackendError(f"{self.base_url}: the connection broke while streaming "
                               f"({_clean(error) or type(error).__name__})") from None
        finally:
            response.close()

    def load_adapter(self, path: str, name: str | None = None) -> str:
        raise BadAdapter(SERVER_ADAPTERS)

    def unload_adapter(self, name: str) -> None:
        raise BadAdapter(SERVER_ADAPTERS)

    # server ------------------------------------------------------------------

    def served_models(self) -> list[dict[str, Any]]:
        """The server's ``/models`` list (fetched once): entries with a string ``id``."""
        if self._served is None:
            url = f"{self.base_url}/models"
            response = self._open("GET", "/models")
            try:
                raw = response.read(MAX_BODY_BYTES + 1)
                if len(raw) > MAX_BODY_BYTES:
                    raise BackendError(f"{url}: the model list is over {MAX_BODY_BYTES >> 20} MB")
                body = json.loads(raw.decode("utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
                raise BackendError(f"{url}: not a JSON model list") from None
            except (OSError, http.client.HTTPException) as error:
                raise BackendError(f"{url}: the connection broke ({_clean(error) or type(error).__name__})") from None
            finally:
                response.close()
            entries = body.get("data", []) if isinstance(body, dict) else None
            if not isinstance(entries, list):
                raise BackendError(f"{url}: not a JSON model list")
            self._served = [entry for entry in entries if isinstance(entry, dict) and isinstance(entry.get("id"), str)]
        return self._served

    def _served_context_length(self) -> int | None:
        """Context size if the server reports it (vLLM ``max_model_len``, llama.cpp ``n_ctx``...)."""
        for entry in self.served_models():
            if entry.get("id") != self.model:
                continue
            meta = entry.get("meta")
            meta = meta if isinstance(meta, dict) else {}
            for key in ("max_model_len", "context_length", "n_ctx", "n_ctx_train"):
                value = entry.get(key, meta.get(key))
                if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                    return value
        return None

    def _open(self, method: str, path: str, payload: dict[str, Any] | None = None) -> Any:
        """Send a request, retrying connection errors, timeouts, 429 and 5xx with backoff."""
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream, application/json"}
        data = json.dumps(payload).encode("utf-8") if payload is not None else None
        url = self.base_url + path
        last_problem = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(0.5 * 2 ** (attempt - 1), 4.0))
            request = urllib.request.Request(url, data=data, headers=headers, method=method)
            if self._api_key:  # never copied to a redirect by urllib; _SameOriginRedirects adds it back
                request.add_unredirected_header("Authorization", f"Bearer {self._api_key}")
            try:
                return self._opener.open(request, timeout=self.timeout)
            except urllib.error.HTTPError as error:
                detail = _error_detail(error)
                if error.code in (401, 403):
                    raise BackendError(f"{url}: HTTP {error.code} — check the API key ({detail})") from None
                if error.code == 404:
                    raise BackendError(f"{url}: HTTP 404 — wrong --base-url or model name ({detail})") from None
                if error.code != 429 and error.code < 500:
                    raise BackendError(f"{url}: HTTP {error.code} ({detail})") from None
                last_problem = f"HTTP {error.code} ({detail})"
            except (urllib.error.URLError, OSError) as error:
                reason = getattr(error, "reason", error)
                last_problem = f"cannot connect ({_clean(reason) or type(reason).__name__})"
            except http.client.HTTPException as error:
                last_problem = f"not an HTTP reply ({_clean(error) or type(error).__name__})"
        raise BackendError(f"{url}: {last_problem} after {self.retries + 1} attempts")


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port or {"http": 80, "https": 443}.get(scheme)
    except ValueError:  # a port that is not a number
        port = None
    return scheme, (parts.hostname or "").lower(), port


class _SameOriginRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects within the server's origin (with the API key); one elsewhere carries no key, and one
    elsewhere from a request that had a key is refused, since the server asked for it to go there."""

    def __init__(self, origin: tuple[str, str, int | None]) -> None:
        self.origin = origin

    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any,
                         newurl: str) -> urllib.request.Request | None:
        key = req.unredirected_hdrs.get("Authorization")
        if key is not None and _origin(newurl) != self.origin:
            fp.close()
            scheme, host, port = _origin(newurl)
            raise BackendError(f"{req.full_url}: the server redirects to another origin ({scheme}://{host}:{port}); "
                               "the API key is sent only to --base-url's origin, so point --base-url there")
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and key is not None:
            new.add_unredirected_header("Authorization", key)
        return new


def _wire_message(message: Message) -> dict[str, Any]:
    if not message.images:
        return {"role": message.role.value, "content": message.text}
    parts: list[dict[str, Any]] = [
        {"type": "image_url",
         "image_url": {"url": f"data:{image.mime};base64,{base64.b64encode(image.data).decode('ascii')}"}}
        for image in message.images]
    parts.append({"type": "text", "text": message.text})
    return {"role": message.role.value, "content": parts}


def _sampling(options: GenerationOptions) -> dict[str, Any]:
    values: dict[str, Any] = {"max_tokens": options.max_new_tokens, "temperature": options.temperature,
                              "top_p": options.top_p}
    if options.seed is not None:
        values["seed"] = options.seed
    if options.top_k:
        values["top_k"] = options.top_k  # an extension most local servers accept
    if options.repetition_penalty != 1.0:
        values["repetition_penalty"] = options.repetition_penalty
    return values


def _sse_text(response: Any, base_url: str) -> Iterator[str]:
    """Text deltas from an SSE stream of chat completion chunks (or from a plain JSON reply, for servers that
    ignore ``stream``); anything else is a ``BackendError``."""
    seen_data = finished = False
    other: list[str] = []
    other_bytes = 0
    while raw := response.readline(MAX_LINE_BYTES + 1):
        if len(raw) > MAX_LINE_BYTES:
            raise BackendError(f"{base_url}: a line of the reply is over {MAX_LINE_BYTES >> 20} MB")
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise BackendError(f"{base_url}: the reply is not UTF-8 text") from None
        if not line.startswith("data:"):
            other_bytes += len(raw)
            if not seen_data and other_bytes <= MAX_BODY_BYTES:
                other.append(line)
            continue
        seen_data = True
        data = line[5:].strip()
        if data == "[DONE]":
            return
        try:
            chunk = json.loads(data)
        except (json.JSONDecodeError, RecursionError):
            raise BackendError(f"{base_url}: malformed stream data {_clean(data, 60)!r}") from None
        text, done = _chunk_text(chunk, base_url)
        finished = finished or done
        if text:
            yield text
    if finished:
        return
    if seen_data:
        raise BackendError(f"{base_url}: the stream ended before the answer was finished")
    yield _whole_reply("\n".join(other), base_url)


def _chunk_text(chunk: Any, base_url: str) -> tuple[str, bool]:
    """The text of one stream chunk, and whether it finishes the answer."""
    if isinstance(chunk, dict) and "error" in chunk:
        raise BackendError(f"{base_url}: server error while streaming ({_message_of(chunk['error'])})")
    choices = chunk.get("choices", []) if isinstance(chunk, dict) else None
    if not isinstance(choices, list) or not all(isinstance(choice, dict) for choice in choices):
        raise BackendError(f"{base_url}: malformed stream data {_clean(json.dumps(chunk), 60)!r}")
    text = ""
    for choice in choices:
        delta = choice.get("delta") or {}
        content = delta.get("content") if isinstance(delta, dict) else None
        if not (isinstance(delta, dict) and (content is None or isinstance(content, str))):
            raise BackendError(f"{base_url}: malformed stream data {_clean(json.dumps(chunk), 60)!r}")
        text += content or ""
    return text, any(choice.get("finish_reason") is not None for choice in choices)


def _whole_reply(body: str, base_url: str) -> str:
    """The answer of a non-streamed chat completion, from a server that did not stream."""
    try:
        reply = json.loads(body)
    except (json.JSONDecodeError, RecursionError):
        raise BackendError(f"{base_url}: the reply is not an event stream (it starts {_clean(body, 60)!r})") from None
    if isinstance(reply, dict) and "error" in reply:
        raise BackendError(f"{base_url}: server error ({_message_of(reply['error'])})")
    choices = reply.get("choices") if isinstance(reply, dict) else None
    first = choices[0] if isinstance(choices, list) and choices else None
    message = first.get("message") if isinstance(first, dict) else None
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, str):
        raise BackendError(f"{base_url}: the reply is neither an event stream nor a chat completion "
                           f"({_clean(body, 60)!r})")
    return content


def _clean(value: Any, limit: int = 160) -> str:
    """Server text for a one-line message: whitespace collapsed, control characters escaped, length capped."""
    text = " ".join(str(value).split())[:limit]
    return "".join(char if char.isprintable() else char.encode("unicode_escape").decode("ascii") for char in text)


def _message_of(error: Any) -> str:
    return _clean(error.get("message", error) if isinstance(error, dict) else error)


def _error_detail(error: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(error.read(MAX_ERROR_BYTES).decode("utf-8"))
        return _message_of(body.get("error", body))
    except (ValueError, RecursionError, AttributeError, OSError, http.client.HTTPException):
        return _clean(error.reason) if isinstance(error.reason, str) and error.reason else "no details"
