"""A ``ChatBackend`` that drives any OpenAI-compatible server (vLLM, llama.cpp, Ollama, TGI).

Streaming uses server-sent events; images travel as ``image_url`` data-URL
parts; adapters map to served model names (vLLM's ``--lora-modules name=path``).
Connection failures, timeouts and 429/5xx answers are retried a few times
before streaming starts, then reported as one-line ``BackendError``s. Only the
standard library is used for HTTP.
"""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from typing import Any

from assistant.config import GenerationOptions
from assistant.errors import BackendError, BadAdapter
from assistant.messages import BASE_MODEL, ImageAttachment, Message

# Without the server's tokenizer, prompt length is estimated; both figures are conservative.
CHARS_PER_TOKEN = 3.0
IMAGE_TOKEN_ESTIMATE = 768


class OpenAIBackend:
    """Chat through ``POST {base_url}/chat/completions`` with ``stream: true``."""

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, timeout: float = 60.0,
                 retries: int = 2, context_length: int | None = None, accepts_images: bool = True) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.timeout = timeout
        self.retries = retries
        self.accepts_images = accepts_images
        self._api_key = api_key
        self._served: list[dict[str, Any]] | None = None
        self.context_length = context_length or self._served_context_length() or 4096

    # protocol ----------------------------------------------------------------

    def count_tokens(self, messages: Sequence[Message]) -> int:
        return sum(4 + int(len(m.text) / CHARS_PER_TOKEN) + IMAGE_TOKEN_ESTIMATE * len(m.images) for m in messages)

    def image_tokens(self, image: ImageAttachment) -> int:
        return IMAGE_TOKEN_ESTIMATE

    def adapter_names(self) -> list[str]:
        return [entry["id"] for entry in self.served_models() if entry.get("id") != self.model]

    def describe(self) -> dict[str, Any]:
        return {"model": self.model, "device": f"server {self.base_url}", "quantization": "server-side",
                "context_length": self.context_length, "accepts_images": self.accepts_images,
                "adapters": self.adapter_names(),
                "served_models": [entry.get("id", "?") for entry in self.served_models()]}

    def stream(self, messages: Sequence[Message], options: GenerationOptions,
               adapter: str | None = None) -> Iterator[str]:
        if adapter == BASE_MODEL:
            adapter = None
        if adapter is not None and adapter not in self.adapter_names():
            raise BadAdapter(f"the server does not serve an adapter named {adapter!r}")
        payload = {"model": adapter or self.model, "messages": [_wire_message(m) for m in messages],
                   "stream": True, **_sampling(options)}
        response = self._open("POST", "/chat/completions", payload)
        try:
            yield from _sse_text(response, self.base_url)
        except TimeoutError:
            raise BackendError(f"{self.base_url}: no data for {self.timeout:.0f} s while streaming") from None
        finally:
            response.close()

    # server ------------------------------------------------------------------

    def served_models(self) -> list[dict[str, Any]]:
        """The server's ``/models`` list (fetched once)."""
        if self._served is None:
            response = self._open("GET", "/models")
            try:
                body = json.loads(response.read().decode("utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise BackendError(f"{self.base_url}/models: not a JSON model list") from None
            finally:
                response.close()
            self._served = [entry for entry in body.get("data", []) if isinstance(entry, dict)]
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
                if isinstance(value, int) and value > 0:
                    return value
        return None

    def _open(self, method: str, path: str, payload: dict[str, Any] | None = None) -> Any:
        """Send a request, retrying connection errors, timeouts, 429 and 5xx with backoff."""
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream, application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        data = json.dumps(payload).encode("utf-8") if payload is not None else None
        url = self.base_url + path
        last_problem = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(0.5 * 2 ** (attempt - 1), 4.0))
            request = urllib.request.Request(url, data=data, headers=headers, method=method)
            try:
                return urllib.request.urlopen(request, timeout=self.timeout)
            except urllib.error.HTTPError as error:
                detail = _error_detail(error)
                if error.code in (401, 403):
                    raise BackendError(f"{url}: HTTP {error.code} — check the API key ({detail})") from None
                if error.code == 404:
                    raise BackendError(f"{url}: HTTP 404 — wrong --base-url or model name ({detail})") from None
                if error.code != 429 and error.code < 500:
                    raise BackendError(f"{url}: HTTP {error.code} ({detail})") from None
                last_problem = f"HTTP {error.code} ({detail})"
            except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
                reason = getattr(error, "reason", error)
                last_problem = f"cannot connect ({reason})"
        raise BackendError(f"{url}: {last_problem} after {self.retries + 1} attempts")


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
    """Text deltas from an SSE stream of chat completion chunks."""
    for raw in response:
        line = raw.decode("utf-8", errors="replace").strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        try:
            chunk = json.loads(data)
        except json.JSONDecodeError:
            raise BackendError(f"{base_url}: malformed stream data {data[:60]!r}") from None
        if "error" in chunk:
            raise BackendError(f"{base_url}: server error while streaming ({_message_of(chunk['error'])})")
        for choice in chunk.get("choices", []):
            text = (choice.get("delta") or {}).get("content")
            if text:
                yield text


def _message_of(error: Any) -> str:
    return str(error.get("message", error) if isinstance(error, dict) else error)[:160]


def _error_detail(error: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(error.read().decode("utf-8"))
        return _message_of(body.get("error", body))
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, OSError):
        return error.reason if isinstance(error.reason, str) else "no details"
