"""Local generation: a ``ChatBackend`` over a loaded transformers model.

Text streams out as it is generated. On a CPU the decode loop runs in the caller's
thread through the language model alone (a vision model's wrapper only matters while
pixels become features), picking the tokens ``generate`` would; elsewhere ``generate``
runs in a worker thread and feeds a ``TextIteratorStreamer``. Closing the stream early
stops generation at the next token. One lock per device: one generation at a time.

Work is reused across turns: the KV cache of each finished generation is kept
(bounded LRU) and the next prompt that shares its token prefix prefills only the
new tokens (where the architecture contract says this reproduces a cold run); where
image features can be spliced into the input embeddings, they are cached per image,
so the vision tower runs once per image, and the prompt's image placeholders are
expanded from counts measured once, so an image already in the history is neither
decoded nor preprocessed again. Elsewhere images are decoded once per process
(``DecodedImageCache``) and preprocessed by the family's processor each turn. On a CPU,
the prefill of a turn over its cached history attends in SDPA's grouped-query mode
(``use_cpu_attention``): the cost left at turn 20 is the attention itself.

Adapters: a conversation names one, or ``BASE_MODEL`` for none; a conversation that
names nothing gets the loaded model's active adapter (the last one given at start).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from functools import cache
from typing import Any

from assistant.caches import DecodedImageCache, ImageFeatureCache, PrefixHit, PrefixKVCache
from assistant.config import GenerationOptions
from assistant.cpu_quant import packed_weights, single_thread_decode, threaded_products
from assistant.decode_threads import DecodeThreads
from assistant.errors import BadAdapter
from assistant.lean_decode import lean_token_step
from assistant.messages import BASE_MODEL, ImageAttachment, Message
from assistant.model import LoadedModel, attach_adapter, detach_adapter
from assistant.prompt import PromptRenderer
from assistant.threads import torch_threads

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


# What the language model alone takes: anything else (pixel values, image sizes, M-RoPE positions) needs the
# family's own forward, through ``generate``.
LANGUAGE_MODEL_INPUTS = frozenset({"input_ids", "attention_mask", "inputs_embeds"})


def _language_model_step(model: Any, vision: bool) -> Callable[..., Any]:
    """``step(cache, input_ids=... or inputs_embeds=...)``: extend ``cache`` and return the last position's logits.

    A text model's own forward is its language model; a vision model's decoder and output head are called
    directly, skipping the wrapper that only matters while pixels are turned into features.
    """
    import torch

    if not vision:
        def forward(cache: Any, **inputs: Any) -> Any:
            return model(**inputs, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]

        return forward
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT: LoRA layers stay in place
    decoder, head = base.get_decoder(), base.get_output_embeddings()
    softcap = getattr(base.config.get_text_config(), "final_logit_softcapping", None)

    def step(cache: Any, **inputs: Any) -> Any:
        logits = head(decoder(**inputs, cache=cache, use_cache=True).last_hidden_state[:, -1])
        return torch.tanh(logits / softcap) * softcap if softcap else logits

    return step


CPU_ATTENTION = "iris_cpu_sdpa"


@cache
def _cpu_attention() -> str:
    """Register (once) transformers' SDPA attention with one change for CPUs: queries of several tokens over a
    cached prefix (a masked prefill: the next turn of a conversation) run SDPA's grouped-query mode instead of
    copying every key/value head once per query head. Same numbers; at 2000 cached tokens the attention of a
    SmolLM2 prefill takes half the time. Everything else goes to transformers' own SDPA function."""
    import torch
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any,
                  **kwargs: Any) -> tuple[Any, None]:
        if (getattr(module, "num_key_value_groups", 1) > 1 and query.shape[2] > 1 and attention_mask is not None
                and query.device.type == "cpu" and kwargs.get("position_bias") is None
                and kwargs.get("softcap") is None and not kwargs.get("output_attentions")):
            output = torch.nn.functional.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, dropout_p=kwargs.get("dropout", 0.0),
                scale=kwargs.get("scaling"), enable_gqa=True)
            return output.transpose(1, 2).contiguous(), None
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(CPU_ATTENTION, attention)
    AttentionMaskInterface.register(CPU_ATTENTION, sdpa_mask)
    return CPU_ATTENTION


def use_cpu_attention(model: Any) -> None:
    """Switch a CPU model's language model from transformers' SDPA attention to ``_cpu_attention``'s (other
    attention implementations are left as they are)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.get_decoder().config
    if config._attn_implementation == "sdpa":
        config._attn_implementation = _cpu_attention()


@cache
def _growing_layer() -> type:
    """A transformers cache layer that appends each token into spare room instead of concatenating its whole
    cache on every token, which costs O(context) per token (15% of a SmolLM2 step).

    The room grows by half when full and is kept when the cache is stored (``kv_cache_bytes`` counts it), so the
    next turn of a conversation writes its tokens straight after the stored ones. Giving the room back on store
    meant copying the whole history into new room on every turn: a tenth of turn 20's prefill in a conversation
    with an image per turn."""
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        room: tuple[Any, Any] | None = None  # (keys, values) buffers; ``keys``/``values`` are views of their start

        def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            length = self.get_seq_length()
            needed = length + key_states.shape[-2]
            room = self.room
            fits = room is not None and room[0].shape[-2] >= needed
            if fits and length:  # the cached tokens must still be this room's start (a crop keeps them there)
                fits = self.keys is not None and room is not None and self.keys.data_ptr() == room[0].data_ptr()
            if room is None or not fits:
                capacity = max(needed + needed // 2, 64)
                room = (key_states.new_empty((*key_states.shape[:-2], capacity, key_states.shape[-1])),
                        value_states.new_empty((*value_states.shape[:-2], capacity, value_states.shape[-1])))
                if length:
                    room[0][..., :length, :] = self.keys
                    room[1][..., :length, :] = self.values
                self.room = room
            room[0][..., length:needed, :] = key_states
            room[1][..., length:needed, :] = value_states
            self.keys, self.values = room[0][..., :needed, :], room[1][..., :needed, :]
            return self.keys, self.values

    return GrowingLayer


def _growing_cache(config: Any) -> Any:
    """A ``DynamicCache`` for ``config`` whose full-attention layers grow in place (sliding-window layers stay)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    kv_cache = DynamicCache(config=config)
    kv_cache.layers = [_growing_layer()() if type(layer) is DynamicLayer else layer for layer in kv_cache.layers]
    return kv_cache


class TokenPicker:
    """The next token from logits, as ``generate`` picks it for ``options``: repetition penalty, then (sampling)
    temperature, top-k, top-p and one multinomial draw; greedy takes the arg-max."""

    def __init__(self, options: GenerationOptions, generation_config: Any) -> None:
        from transformers import (
            LogitsProcessorList,
            RepetitionPenaltyLogitsProcessor,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        self.processors = LogitsProcessorList()
        if options.repetition_penalty != 1.0:
            self.processors.append(RepetitionPenaltyLogitsProcessor(options.repetition_penalty))
        self.sample = options.temperature > 0
        if self.sample:
            if options.temperature != 1.0:
                self.processors.append(TemperatureLogitsWarper(options.temperature))
            if options.top_k:
                self.processors.append(TopKLogitsWarper(options.top_k))
            if options.top_p < 1.0:
                self.processors.append(TopPLogitsWarper(options.top_p))
        eos = generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])

    def __call__(self, sequence: Any, logits: Any) -> Any:
        """A ``[1, 1]`` tensor holding the next token of ``sequence`` (``[1, length]``)."""
        import torch

        scores = self.processors(sequence, logits.float())
        if self.sample:
            return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1)
        return scores.argmax(dim=-1, keepdim=True)


class TextChunks:
    """transformers' streaming detokenizer (the chunks a ``TextIteratorStreamer`` yields), read in this thread."""

    def __init__(self, tokenizer: Any) -> None:
        from transformers import TextStreamer

        ready: list[str] = []

        class _Collect(TextStreamer):
            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                if text:
                    ready.append(text)

        self._ready = ready
        self._streamer = _Collect(tokenizer, skip_special_tokens=True)

    def put(self, token_ids: Any) -> list[str]:
        self._streamer.put(token_ids)
        return self._take()

    def end(self) -> list[str]:
        self._streamer.end()
        return self._take()

    def _take(self) -> list[str]:
        taken = list(self._ready)
        self._ready.clear()
        return taken


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
        # A small model decodes in hundreds of tiny kernels per token: on a CPU one thread beats an OpenMP team
        # (assistant/cpu_quant.py), unless its products share their work among the threads (int4): then the
        # tokens are timed on both (assistant/decode_threads.py).
        self._one_thread = loaded.device == "cpu" and single_thread_decode(loaded.model)
        self._timed_threads = self._one_thread and threaded_products(loaded.model)
        self._decode_threads: DecodeThreads | None = None
        if loaded.device == "cpu":
            use_cpu_attention(loaded.model)

    def count_tokens(self, messages: Sequence[Message]) -> int:
        return self.renderer.count(messages)

    def image_tokens(self, image: ImageAttachment) -> int:
        return self.renderer.image_tokens(image)

    def adapter_names(self) -> list[str]:
        return list(self.loaded.adapters)

    def describe(self) -> dict[str, Any]:
        model = self.loaded.model
        packed_elements, packed_bytes = packed_weights(model)  # CPU-packed weights are no parameters to PyTorch
        return {"model": self.loaded.name, "device": self.loaded.device, "quantization": self.loaded.quant,
                "context_length": self.context_length, "accepts_images": self.accepts_images,
                "adapters": self.adapter_names(), "active_adapter": self.loaded.active_adapter or BASE_MODEL,
                **self.loaded.architecture.describe(),
                "parameters": sum(p.numel() for p in model.parameters()) + packed_elements,
                "memory_bytes": int(model.get_memory_footprint()) + packed_bytes}

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
        """Yield text chunks; closing the iterator stops generation and releases the device.

        On a CPU the tokens are decoded here, in the caller's thread, through the language model alone
        (``_decode_here``): the images' encoding and the prefill (large products, long attention) use the
        process's threads, each token of a small model one thread (a few hundred tiny kernels, where a thread team
        only waits), or with int4 weights whichever of one thread and the team is faster now (``DecodeThreads``).
        ``generate`` in a worker thread serves other devices and inputs that only the family's own forward
        understands (pixel values given to the processor, M-RoPE positions).
        """
        import torch

        adapter = self.resolve_adapter(adapter)
        if adapter in self.loaded.images_only and not any(message.images for message in messages):
            adapter = None  # trained for pictures: a text-only conversation gets the base model's own answers
        with self._lock, self._adapter_scope(adapter):
            with torch.inference_mode():
                inputs, cache_key = self._inputs(messages, adapter)
            hit = self.prefix_cache.take(adapter, cache_key) if cache_key is not None else None
            if options.seed is not None:
                torch.manual_seed(options.seed)
            if self.loaded.device == "cpu" and set(inputs) <= LANGUAGE_MODEL_INPUTS:
                yield from self._decode_here(inputs, hit, cache_key, options, adapter)
            else:
                with torch_threads(1 if self._one_thread else None):
                    yield from self._generate_in_worker(inputs, hit, cache_key, options, adapter)

    def _decode_here(self, inputs: dict[str, Any], hit: PrefixHit | None, cache_key: tuple[int, ...] | None,
                     options: GenerationOptions, adapter: str | None) -> Iterator[str]:
        """Prefill, then one token at a time, in this thread: the tokens ``generate`` picks for these inputs
        (same logits processors, same sampling draw), without its per-token bookkeeping or a thread hand-off
        per token. A vision model's decoder and output head run directly, so a text turn, and every token
        after an image turn's prefill, cost what the bare language model costs."""
        import torch

        model = self.loaded.model
        step = _language_model_step(model, self.loaded.accepts_images)
        token_step = lean_token_step(model) if self.loaded.device == "cpu" else None
        pick = TokenPicker(options, model.generation_config)
        chunks = TextChunks(self.loaded.tokenizer)
        sequence = inputs["input_ids"]
        kv_cache = hit.cache if hit is not None else _growing_cache(model.config.get_text_config(decoder=True))
        done = kv_cache.get_seq_length()
        generated: list[int] = []
        consistent = False  # the cache holds exactly the prompt and the generated tokens but the last
        try:
            with torch.inference_mode():
                if "inputs_embeds" in inputs:
                    logits = step(kv_cache, inputs_embeds=inputs["inputs_embeds"][:, done:])
                else:
                    logits = step(kv_cache, input_ids=sequence[:, done:])
            consistent = True
            threads = self._thread_chooser()
            with torch_threads(torch.get_num_threads() if threads else 1 if self._one_thread else None):
                while True:  # tokens: see ``stream``
                    with torch.inference_mode():
                        token = pick(sequence, logits)
                    sequence = torch.cat([sequence, token], dim=-1)
                    generated.append(int(token))
                    yield from chunks.put(token[0])
                    if generated[-1] in pick.eos or len(generated) >= options.max_new_tokens:
                        break
                    consistent = False
                    if threads:
                        count = threads.next_count()
                        torch.set_num_threads(count)
                        started = time.perf_counter()
                    with torch.inference_mode():
                        logits = token_step(kv_cache, token) if token_step else step(kv_cache, input_ids=token)
                    if threads:
                        threads.record(count, time.perf_counter() - started)
                    consistent = True
            yield from chunks.end()
        finally:
            if consistent and cache_key is not None:
                length = kv_cache.get_seq_length()
                self.prefix_cache.store(adapter, (cache_key + tuple(generated))[:length], kv_cache)

    def _thread_chooser(self) -> DecodeThreads | None:
        """The tokens' thread chooser, made by the first thread that decodes: its team is the one the tokens use
        (the Discord bot decodes on its own thread)."""
        import torch

        if self._decode_threads is None and self._timed_threads and torch.get_num_threads() > 1:
            self._decode_threads = DecodeThreads(torch.get_num_threads())
        return self._decode_threads

    def _generate_in_worker(self, inputs: dict[str, Any], hit: PrefixHit | None,
                            cache_key: tuple[int, ...] | None, options: GenerationOptions,
                            adapter: str | None) -> Iterator[str]:
        """``generate`` in a worker thread feeding a ``TextIteratorStreamer``; stops at the next token once the
        consumer closes the stream."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        stop = threading.Event()

        class _StopWhenAsked(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

        model = self.loaded.model
        streamer = TextIteratorStreamer(self.loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
        failure: list[BaseException] = []
        if hit is not None:
            inputs = {**inputs, "cache": hit.cache}

        def run() -> None:
            try:
                with torch.inference_mode():
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
        if adapter is not None and adapter not in self.loaded.adapters:  # unloaded after the request resolved it
            raise BadAdapter(f"adapter {adapter!r} was unloaded")
        if not self.loaded.adapters:
            return nullcontext()
        if adapter is None:
            return model.disable_adapter()
        model.set_adapter(adapter)
        return nullcontext()

    def load_adapter(self, path: str, name: str | None = None) -> str:
        """Attach a LoRA adapter to the running model (``/adapter load``) and make it the active one; returns its
        name. It waits for the generation in progress: none runs while PEFT changes the model's layers.

        A projector-only directory replaces the projector for every adapter, so cached image features and the
        KV caches built on them are all stale.
        """
        with self._lock:
            adapters = len(self.loaded.adapters)
            attached = attach_adapter(self.loaded, path, name=name)
            if len(self.loaded.adapters) == adapters:  # a projector, not a LoRA
                self.feature_cache.clear()
                self.prefix_cache.clear()
            return attached

    def unload_adapter(self, name: str) -> None:
        """Detach a loaded adapter (``/adapter unload``) once no generation runs, and forget what was computed
        with it, so a later adapter of the same name starts from clean caches."""
        with self._lock:
            detach_adapter(self.loaded, name)
            self.prefix_cache.drop_adapter(name)
            self.feature_cache.drop_adapter(name)
