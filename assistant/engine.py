"""Local generation: a ``ChatBackend`` over a loaded transformers model.

Text streams out as it is generated (``generate`` runs in a worker thread and
feeds a ``TextIteratorStreamer``). Closing the stream early stops generation at
the next token. One lock per device: a single GPU runs one generation at a time.

Work is reused across turns: the KV cache of each finished generation is kept
(bounded LRU) and the next prompt that shares its token prefix prefills only the
new tokens (where the architecture contract says this reproduces a cold run); where
image features can be spliced into the input embeddings, they are cached per image,
so the vision tower runs once per image, and the prompt's image placeholders are
expanded from counts measured once, so an image already in the history is neither
decoded nor preprocessed again. Elsewhere images are decoded once per process
(``DecodedImageCache``) and preprocessed by the family's processor each turn.

Adapters: a conversation names one, or ``BASE_MODEL`` for none; a conversation that
names nothing gets the loaded model's active adapter (the last one given at start).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import Any

from assistant.caches import DecodedImageCache, ImageFeatureCache, PrefixKVCache
from assistant.config import GenerationOptions
from assistant.errors import BadAdapter
from assistant.messages import BASE_MODEL, ImageAttachment, Message
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

    def __init__(self, loaded: LoadedModel, *, kv_cache_bytes: int = 1 << 30,
                 feature_cache_bytes: int = 256 << 20, decoded_image_bytes: int = 256 << 20) -> None:
        self.loaded = loaded
        self.decoded_images = DecodedImageCache(decoded_image_bytes)
        self.renderer = PromptRenderer(loaded.tokenizer, loaded.processor, self.decoded_images)
        self.accepts_images = loaded.accepts_images
        self.context_length = loaded.context_length
        self.prefix_cache = PrefixKVCache(kv_cache_bytes)
        self.feature_cache = ImageFeatureCache(feature_cache_bytes)
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
                "adapters": self.adapter_names(), "active_adapter": self.loaded.active_adapter or BASE_MODEL,
                **self.loaded.architecture.describe(),
                "parameters": sum(p.numel() for p in model.parameters()),
                "memory_bytes": int(model.get_memory_footprint())}

    def resolve_adapter(self, adapter: str | None) -> str | None:
        """The loaded adapter to run (None: the base model) for a conversation's choice."""
        if adapter is None:
            return self.loaded.active_adapter
        if adapter == BASE_MODEL:
            return None
        if adapter not in self.loaded.adapters:
            raise BadAdapter(f"unknown adapter {adapter!r}")
        return adapter

    def stream(self, messages: Sequence[Message], options: GenerationOptions,
               adapter: str | None = None) -> Iterator[str]:
        """Yield text chunks; closing the iterator stops generation and releases the device."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        adapter = self.resolve_adapter(adapter)
        stop = threading.Event()

        class _StopWhenAsked(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

        model = self.loaded.model
        streamer = TextIteratorStreamer(self.loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
        failure: list[BaseException] = []

        def run() -> None:
            threads = torch.get_num_threads()
            if self.loaded.quant == "int8":
                # PyTorch's dynamic int8 kernels are tiny per token; from a non-main thread, a 2-thread OpenMP
                # team made them ~3x slower (measured: 40 vs 71 tok/s on SmolLM2, 2 cores). One thread wins.
                torch.set_num_threads(1)
            try:
                with torch.inference_mode(), self._adapter_scope(adapter):
                    inputs, cache_key = self._inputs(messages, adapter)
                    hit = self.prefix_cache.take(adapter, cache_key) if cache_key is not None else None
                    if hit is not None:
                        inputs["cache"] = hit.cache
                    if options.seed is not None:
                        torch.manual_seed(options.seed)
                    output = model.generate(**inputs, **generation_kwargs(options), streamer=streamer,
                                            stopping_criteria=StoppingCriteriaList([_StopWhenAsked()]),
                                            pad_token_id=self.loaded.tokenizer.pad_token_id,
                                            return_dict_in_generate=True)
                    if cache_key is not None and getattr(output, "cache", None) is not None:
                        length = output.cache.get_seq_length()
                        generated = tuple(output.sequences[0][len(cache_key):length].tolist())
                        self.prefix_cache.store(adapter, (cache_key + generated)[:length], output.cache)
            except BaseException as exc:  # re-raised in the consumer thread below
                failure.append(exc)
                streamer.end()
            finally:
                torch.set_num_threads(threads)  # the thread count is process-wide in PyTorch

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

    def _inputs(self, messages: Sequence[Message],
                adapter: str | None) -> tuple[dict[str, Any], tuple[int, ...] | None]:
        """Generation inputs, and the key their KV cache is stored under (None: not reusable).

        The key is the token ids with each image's placeholder tokens replaced by a value
        derived from that image's hash: the same text with another picture must not match.
        Text-only prompts and prompts whose image features are spliced into the embeddings here
        are position-for-position reusable where the contract says so; other prompts get the
        processor's own inputs and a cold prefill.
        """
        architecture = self.loaded.architecture
        device = self.loaded.model.device
        images = [image for message in messages for image in message.images]
        if images and architecture.prefix_reuse and architecture.splices_features \
                and architecture.image_token_id is not None:
            expanded = self.renderer.encode_expanded(messages, architecture.image_token_id)
            if expanded is not None:
                return self._spliced({key: value.to(device) for key, value in expanded.items()}, images, adapter)
        encoded = self.renderer.encode(messages)
        inputs = {key: value.to(device) for key, value in encoded.items()}
        if not architecture.prefix_reuse:
            return inputs, None
        if not images:
            return inputs, tuple(inputs["input_ids"][0].tolist())
        if not (architecture.splices_features and set(encoded) <= {"input_ids", "attention_mask", "pixel_values"}):
            return inputs, None
        return self._spliced(inputs, images, adapter)

    def _spliced(self, inputs: dict[str, Any], images: list[ImageAttachment],
                 adapter: str | None) -> tuple[dict[str, Any], tuple[int, ...]]:
        """Inputs with each image's cached features scattered over its placeholder tokens, and their cache key."""
        import torch

        input_ids = inputs["input_ids"]
        token_ids = input_ids[0].tolist()
        embeddings = self.loaded.model.get_input_embeddings()(input_ids)
        per_image = [self.image_features(image, adapter) for image in images]
        features = torch.cat(per_image).to(embeddings.dtype)
        image_token = self.loaded.architecture.image_token_id
        mask = (input_ids == image_token).unsqueeze(-1)
        spliced = {"input_ids": input_ids, "attention_mask": inputs["attention_mask"],
                   "inputs_embeds": embeddings.masked_scatter(mask, features)}
        image_values = iter([-1 - int(image.sha256[:15], 16) for image, f in zip(images, per_image, strict=True)
                             for _ in range(f.shape[0])])
        return spliced, tuple(next(image_values) if token == image_token else token for token in token_ids)

    def image_features(self, image: ImageAttachment, adapter: str | None) -> Any:
        """Vision tower + projector output for one image, computed once while it stays cached."""
        cached = self.feature_cache.get(image.sha256, adapter)
        if cached is not None:
            return cached
        config = self.loaded.model.config
        assert self.loaded.processor is not None, "image features need a vision model's processor"
        pixels = self.loaded.processor.image_processor(images=[self.decoded_images.get(image)],
                                                       return_tensors="pt")["pixel_values"]
        output = self.loaded.model.get_image_features(
            pixel_values=pixels.to(self.loaded.model.device, self.loaded.model.dtype),
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy)
        features = output.pooler_output[0] if hasattr(output, "pooler_output") else output[0]
        self.feature_cache.put(image.sha256, adapter, features)
        return features

    def _adapter_scope(self, adapter: str | None) -> Any:
        """Activate the resolved ``adapter`` for one generation; None runs the base model with adapters off."""
        from contextlib import nullcontext

        model = self.loaded.model
        if not self.loaded.adapters:
            return nullcontext()
        if adapter is None:
            return model.disable_adapter()
        model.set_adapter(adapter)
        return nullcontext()
