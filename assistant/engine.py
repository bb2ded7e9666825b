"""Local generation: a ``ChatBackend`` over a loaded transformers model.

Text streams out as it is generated (``generate`` runs in a worker thread and
feeds a ``TextIteratorStreamer``). Closing the stream early stops generation at
the next token. One lock per device: a single GPU runs one generation at a time.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import Any

from assistant.config import GenerationOptions
from assistant.errors import BadAdapter
from assistant.messages import ImageAttachment, Message
from assistant.model import LoadedModel
from assistant.prompt import PromptRenderer

_DEVICE_LOCKS: dict[str, threading.Lock] = {}
_DEVICE_LOCKS_GUARD = threading.Lock()


def device_lock(device: str) -> threading.Lock:
    with _DEVICE_LOCKS_GUARD:
        return _DEVICE_LOCKS.setdefault(device, threading.Lock())


def generation_kwargs(options: GenerationOptions) -> dict[str, Any]:
    """``generate`` arguments for ``options``; temperature 0 means greedy decoding."""
    kwargs: dict[str, Any] = {"max_new_tokens": options.max_new_tokens,
                              "repetition_penalty": options.repetition_penalty}
    if options.temperature > 0:
        kwargs.update(do_sample=True, temperature=options.temperature, top_p=options.top_p, top_k=options.top_k)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return kwargs


class LocalBackend:
    """Runs a ``LoadedModel`` in this process."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.renderer = PromptRenderer(loaded.tokenizer, loaded.processor)
        self.accepts_images = loaded.accepts_images
        self.context_length = loaded.context_length
        self._lock = device_lock(loaded.device)

    def count_tokens(self, messages: Sequence[Message]) -> int:
        return self.renderer.count(messages)

    def image_tokens(self, image: ImageAttachment) -> int:
        return self.renderer.image_tokens(image)

    def adapter_names(self) -> list[str]:
        return list(self.loaded.adapters)

    def describe(self) -> dict[str, Any]:
        model = self.loaded.model
        return {"model": self.loaded.name, "device": self.loaded.device, "quantization": self.loaded.quant,
                "context_length": self.context_length, "accepts_images": self.accepts_images,
                "adapters": self.adapter_names(), "parameters": sum(p.numel() for p in model.parameters()),
                "memory_bytes": int(model.get_memory_footprint())}

    def stream(self, messages: Sequence[Message], options: GenerationOptions,
               adapter: str | None = None) -> Iterator[str]:
        """Yield text chunks; closing the iterator stops generation and releases the device."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        if adapter is not None and adapter not in self.loaded.adapters:
            raise BadAdapter(f"unknown adapter {adapter!r}")
        stop = threading.Event()

        class _StopWhenAsked(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

        model = self.loaded.model
        inputs = {k: v.to(model.device) for k, v in self.renderer.encode(messages).items()}
        streamer = TextIteratorStreamer(self.loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
        failure: list[BaseException] = []

        def run() -> None:
            try:
                with torch.inference_mode(), self._adapter_scope(adapter):
                    if options.seed is not None:
                        torch.manual_seed(options.seed)
                    model.generate(**inputs, **generation_kwargs(options), streamer=streamer,
                                   stopping_criteria=StoppingCriteriaList([_StopWhenAsked()]),
                                   pad_token_id=self.loaded.tokenizer.pad_token_id)
            except BaseException as exc:  # re-raised in the consumer thread below
                failure.append(exc)
                streamer.end()

        with self._lock:
            worker = threading.Thread(target=run, name="iris-generate", daemon=True)
            worker.start()
            try:
                for chunk in streamer:
                    if chunk:
                        yield chunk
            finally:
                stop.set()
                worker.join()
        if failure:
            raise failure[0]

    def _adapter_scope(self, adapter: str | None) -> Any:
        """Activate ``adapter`` for one generation; with none, the base model runs with adapters off."""
        from contextlib import nullcontext

        model = self.loaded.model
        if not self.loaded.adapters:
            return nullcontext()
        if adapter is None:
            return model.disable_adapter()
        model.set_adapter(adapter)
        return nullcontext()
