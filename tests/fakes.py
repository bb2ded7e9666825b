"""A scripted ChatBackend for manager, store, CLI and Discord tests (no torch)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from assistant.config import GenerationOptions
from assistant.errors import BadAdapter
from assistant.messages import BASE_MODEL, ImageAttachment, Message


class FakeBackend:
    """Answers with queued replies (or an echo), word by word.

    Token counting is one token per whitespace-separated word plus
    ``image_cost`` per image and 4 per message, so budgets are easy to reason about.
    Adapters load from any directory holding an ``adapter_config.json`` (named after it by default).
    """

    def __init__(self, replies: Sequence[str] = (), *, accepts_images: bool = True, context_length: int = 4096,
                 image_cost: int = 16, delay: float = 0.0, adapters: Sequence[str] = ()) -> None:
        self.replies = list(replies)
        self.accepts_images = accepts_images
        self.context_length = context_length
        self.image_cost = image_cost
        self.delay = delay
        self.adapters = list(adapters)
        self.calls: list[dict[str, Any]] = []
        self.closed_early = 0
        self._lock = threading.Lock()

    def count_tokens(self, messages: Sequence[Message]) -> int:
        return sum(4 + len(m.text.split()) + self.image_cost * len(m.images) for m in messages)

    def image_tokens(self, image: ImageAttachment) -> int:
        return self.image_cost

    def adapter_names(self) -> list[str]:
        return list(self.adapters)

    def load_adapter(self, path: str, name: str | None = None) -> str:
        directory = Path(path)
        if not (directory / "adapter_config.json").is_file():
            raise BadAdapter(f"{path}: not a PEFT adapter directory (no adapter_config.json)")
        name = name or directory.name
        if name in self.adapters or name == BASE_MODEL:
            raise BadAdapter(f"an adapter named {name!r} is already loaded")
        self.adapters.append(name)
        return name

    def unload_adapter(self, name: str) -> None:
        if name not in self.adapters:
            raise BadAdapter(f"no adapter named {name!r} is loaded")
        self.adapters.remove(name)

    def describe(self) -> dict[str, Any]:
        return {"model": "fake", "device": "cpu", "quantization": "none", "context_length": self.context_length,
                "accepts_images": self.accepts_images, "adapters": self.adapters}

    def stream(self, messages: Sequence[Message], options: GenerationOptions,
               adapter: str | None = None) -> Iterator[str]:
        with self._lock:
            self.calls.append({"messages": list(messages), "options": options, "adapter": adapter})
            reply = self.replies.pop(0) if self.replies else f"echo: {messages[-1].text}"
        words = reply.split(" ")
        finished = False
        try:
            for index, word in enumerate(words[: options.max_new_tokens]):
                if self.delay:
                    time.sleep(self.delay)
                yield word if index == 0 else " " + word
            finished = True
        finally:
            if not finished:
                self.closed_early += 1
