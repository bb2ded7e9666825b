"""The CPU decode loop (``LocalBackend`` decoding in the caller's thread through the language model alone) picks
the tokens ``model.generate`` picks for the same inputs: greedy and seeded sampling, text and LLaVA image prompts,
cold and continuing a stored prefix KV cache, every VLM family's text turn, and after an interrupted answer."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_families import FAMILY_BUILDERS
from tiny_models import save_strong_lora, save_tiny_llama, save_tiny_llava

from assistant.config import GenerationOptions, ModelOptions, Paths
from assistant.dialogue import DialogueManager
from assistant.engine import LocalBackend, generation_kwargs
from assistant.messages import Message, Role
from assistant.model import load
from assistant.store import Store
from assistant.vision import load_image_path

GREEDY = GenerationOptions(temperature=0, max_new_tokens=16)
SAMPLED = GenerationOptions(temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.3, max_new_tokens=16,
                            seed=1234)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("decode_models")
    llama = save_tiny_llama(root / "llama", context=2048)
    return {"llama": llama, "llava": save_tiny_llava(root / "llava", context=2048),
            "lora": save_strong_lora(llama, root / "pirate", seed=3)}


def _backend(model_dir: Path, quant: str = "none", **sizes: int) -> LocalBackend:
    return LocalBackend(load(ModelOptions(model=str(model_dir), quant=quant), Paths.default()), **sizes)


def _generate(backend: LocalBackend, messages: list[Message], options: GenerationOptions) -> str:
    """What ``model.generate`` answers on the processor's own inputs (pixel values for images), cold."""
    loaded = backend.loaded
    encoded = backend.renderer.encode(messages)
    if options.seed is not None:
        torch.manual_seed(options.seed)
    with torch.inference_mode():
        output = loaded.model.generate(**encoded, **generation_kwargs(options),
                                       pad_token_id=loaded.tokenizer.pad_token_id)
    return str(loaded.tokenizer.decode(output[0][encoded["input_ids"].shape[1]:], skip_special_tokens=True))


def _conversation(*texts: str, images: tuple[Any, ...] = ()) -> list[Message]:
    messages = [Message(Role.SYSTEM, "You are terse.")]
    for index, text in enumerate(texts):
        if index:
            messages.append(Message(Role.ASSISTANT, f"answer {index}"))
        messages.append(Message(Role.USER, text, images if index == 0 else ()))
    return messages


@pytest.mark.parametrize("options", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_text_prompts_decode_as_generate_does(model_dirs: dict[str, Path], options: GenerationOptions) -> None:
    backend = _backend(model_dirs["llama"], kv_cache_bytes=0)
    for messages in (_conversation("hello"), _conversation("tell me", "more", "and more about it")):
        ours = "".join(backend.stream(messages, options))
        assert ours and ours == _generate(backend, messages, options)


@pytest.mark.parametrize("options", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_llava_image_and_text_prompts_decode_as_generate_does(model_dirs: dict[str, Path], sample_png: Path,
                                                              sample_jpg: Path, options: GenerationOptions) -> None:
    backend = _backend(model_dirs["llava"], kv_cache_bytes=0)
    png, jpg = load_image_path(sample_png), load_image_path(sample_jpg)
    for messages in (_conversation("no picture here"), _conversation("what is this?", images=(png,)),
                     _conversation("compare", "and now?", images=(png, jpg))):
        ours = "".join(backend.stream(messages, options))
        assert ours and ours == _generate(backend, messages, options)


def test_continuing_a_stored_prefix_gives_what_generate_gives_cold(model_dirs: dict[str, Path], tmp_path: Path,
                                                                   sample_png: Path) -> None:
    """Each turn continues the previous turn's KV cache (text, then an image, then text again)."""
    backend = _backend(model_dirs["llava"])
    manager = DialogueManager(backend, Store(tmp_path / "x.db"), default_system_prompt="sys", default_options=GREEDY)
    conversation = manager.new_conversation()
    png = load_image_path(sample_png)
    for text, images in (("hello there", []), ("what is this?", [png]), ("tell me more", []), ("again", [])):
        answer = manager.send(conversation, text, images).run()
        history = manager.prompt_messages(conversation)
        assert answer == _generate(backend, history[:-1], GREEDY)  # the system prompt, the thread before the answer
    assert backend.prefix_cache.hits == 3


def test_a_vision_model_decodes_through_its_language_model_alone(model_dirs: dict[str, Path],
                                                                 sample_png: Path) -> None:
    """The LLaVA wrapper's forward never runs: the tower runs once for the image's features, the language model
    for the prefill and each token."""
    backend = _backend(model_dirs["llava"])
    model = backend.loaded.model
    calls = {"wrapper": 0, "language model": 0, "tower": 0}
    for name, module in (("wrapper", model), ("language model", model.get_decoder()),
                         ("tower", model.model.vision_tower)):
        module.register_forward_hook(lambda *args, name=name: calls.__setitem__(name, calls[name] + 1))
    answer = "".join(backend.stream(_conversation("what is this?", images=(load_image_path(sample_png),)),
                                    GenerationOptions(temperature=0, max_new_tokens=5)))
    assert answer and calls["wrapper"] == 0 and calls["tower"] == 1
    assert 1 < calls["language model"] <= 5
    "".join(backend.stream(_conversation("only words"), GenerationOptions(temperature=0, max_new_tokens=5)))
    assert calls["wrapper"] == 0 and calls["tower"] == 1


def test_the_int8_path_and_adapters_decode_as_generate_does(model_dirs: dict[str, Path]) -> None:
    from assistant.messages import BASE_MODEL

    loaded = load(ModelOptions(model=str(model_dirs["llama"]), quant="int8", adapters=(str(model_dirs["lora"]),)),
                  Paths.default())
    backend = LocalBackend(loaded, kv_cache_bytes=0)
    messages = _conversation("ahoy")
    pirate = "".join(backend.stream(messages, GREEDY))
    plain = "".join(backend.stream(messages, GREEDY, adapter=BASE_MODEL))
    assert pirate != plain and pirate == _generate(backend, messages, GREEDY)
    with loaded.model.disable_adapter():
        assert plain == _generate(backend, messages, GREEDY)


def test_an_interrupted_answer_leaves_a_cache_that_continues_correctly(model_dirs: dict[str, Path]) -> None:
    backend = _backend(model_dirs["llama"])
    first = _conversation("go on and on")
    stream = backend.stream(first, GenerationOptions(temperature=0, max_new_tokens=200))
    partial = next(stream) + next(stream)
    stream.close()
    assert len(backend.prefix_cache) == 1  # stored as far as it got
    follow_up = [*first, Message(Role.ASSISTANT, partial), Message(Role.USER, "and then?")]
    assert "".join(backend.stream(follow_up, GREEDY)) == _generate(backend, follow_up, GREEDY)
    assert backend.prefix_cache.hits == 1


@pytest.mark.parametrize("name", sorted(FAMILY_BUILDERS))
def test_every_familys_text_turn_decodes_as_generate_does(name: str, tmp_path: Path) -> None:
    backend = _backend(FAMILY_BUILDERS[name](tmp_path / name), kv_cache_bytes=0)
    messages = _conversation("hello", "and more")
    assert "".join(backend.stream(messages, GREEDY)) == _generate(backend, messages, GREEDY)


@pytest.mark.parametrize("name", sorted(FAMILY_BUILDERS))
def test_every_familys_fp16_weights_stack_their_projections_and_decode_as_generate_does(name: str,
                                                                                        tmp_path: Path) -> None:
    """On each family's own forward (``generate``: biases, q/k norms, several inputs per layer), the stacked fp16
    q/k/v and gate/up products give every projection its own output: the tokens are those the CPU decode picks."""
    from assistant.cpu_quant import half_weights_supported

    if not half_weights_supported():
        pytest.skip("fp16 weights need fbgemm (an x86 CPU)")
    model_dir = FAMILY_BUILDERS[name](tmp_path / name)
    backend, full = _backend(model_dir, quant="fp16", kv_cache_bytes=0), _backend(model_dir)
    assert backend.loaded.quant == "fp16"
    stacked = [module for module in backend.loaded.model.modules()
               if hasattr(module, "q_proj") and getattr(module.q_proj, "product", None) is not None]
    assert stacked and all(module.q_proj.product is module.v_proj.product for module in stacked)
    messages = _conversation("hello", "and more")
    encoded = backend.renderer.encode(messages)
    with torch.inference_mode():  # within fp16 rounding of full precision: each projection got its own slice
        half, exact = backend.loaded.model(**encoded).logits, full.loaded.model(**encoded).logits
    assert (half - exact).abs().max() < 1e-2 * max(1.0, float(exact.abs().max()))
    assert "".join(backend.stream(messages, GREEDY)) == _generate(backend, messages, GREEDY)


def test_a_prefill_over_a_cached_prefix_attends_as_transformers_sdpa_does(model_dirs: dict[str, Path],
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """On a CPU, a prefill over cached tokens (a conversation's next turn) runs SDPA's grouped-query mode instead of
    copying each key/value head per query head: the logits transformers' own SDPA gives, bit for bit."""
    from transformers import DynamicCache

    from assistant.engine import CPU_ATTENTION

    model = _backend(model_dirs["llama"]).loaded.model
    config = model.get_decoder().config
    assert config._attn_implementation == CPU_ATTENTION and config.num_key_value_heads < config.num_attention_heads
    calls: list[tuple[int, bool, bool]] = []  # (query tokens, masked, grouped-query mode)
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recorded(query: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append((query.shape[2], kwargs.get("attn_mask") is not None, bool(kwargs.get("enable_gqa"))))
        return sdpa(query, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recorded)
    ids = torch.arange(3, 33).view(1, -1)

    def logits(implementation: str) -> torch.Tensor:
        config._attn_implementation = implementation
        cache = DynamicCache(config=config)
        with torch.inference_mode():
            model(input_ids=ids[:, :20], cache=cache, use_cache=True)
            return model(input_ids=ids[:, 20:], cache=cache, use_cache=True).logits

    ours = logits(CPU_ATTENTION)
    assert (10, True, True) in calls
    calls.clear()
    assert torch.equal(ours, logits("sdpa")) and (10, True, False) in calls


def test_fp16_weights_multiply_alike_on_either_kernel() -> None:
    """The fp16 layers' fast path (ATen's fbgemm functions) gives the numbers of the quantized engine's ops, which
    serve in its place on a PyTorch without it."""
    from assistant.cpu_quant import fp16_kernels, half_weights_supported

    if not half_weights_supported():
        pytest.skip("fp16 weights need fbgemm (an x86 CPU)")
    pack, multiply = fp16_kernels()
    for linear in (torch.nn.Linear(64, 96), torch.nn.Linear(64, 96, bias=False)):
        weight = linear.weight.detach()
        x = torch.randn(2, 5, 64)
        packed = torch.ops.quantized.linear_prepack_fp16(weight, linear.bias)
        expected = torch.ops.quantized.linear_dynamic_fp16(x, packed)
        assert torch.equal(multiply(x, pack(weight, linear.bias)), expected)


def test_stacked_fp16_siblings_give_each_layer_its_own_output(monkeypatch: pytest.MonkeyPatch) -> None:
    """q/k/v (or gate/up) packed as one product give each layer exactly its own product; one input's product is
    computed once for all siblings and then let go, and siblings called on different inputs (a cross-attention's
    k/v) still get their own input's output."""
    from assistant.cpu_quant import PackedProduct, fp16_kernels, half_weights_supported

    if not half_weights_supported():
        pytest.skip("fp16 weights need fbgemm (an x86 CPU)")
    pack, multiply = fp16_kernels()
    linears = [torch.nn.Linear(64, size, bias=bias) for size, bias in ((96, True), (32, False), (32, True))]
    product = PackedProduct([linear.weight for linear in linears], [linear.bias for linear in linears])
    alone = [pack(linear.weight.detach(), linear.bias) for linear in linears]
    x, y = torch.randn(1, 7, 64), torch.randn(1, 3, 64)
    stacked_calls: list[torch.Tensor] = []
    original = torch.fbgemm_linear_fp16_weight

    def counting(inputs: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        if packed is product.packed[0]:
            stacked_calls.append(inputs)
        return original(inputs, packed, bias)

    monkeypatch.setattr(torch, "fbgemm_linear_fp16_weight", counting)
    with torch.inference_mode():
        parts = [product.output(x, part) for part in range(3)]
        assert len(stacked_calls) == 1 and product._input is None  # one product for the three, not kept after
        assert all(torch.equal(part, multiply(x, own)) for part, own in zip(parts, alone, strict=True))
        assert torch.equal(product.output(x, 0), multiply(x, alone[0]))
        assert torch.equal(product.output(y, 1), multiply(y, alone[1]))  # another input: its own product
        assert torch.equal(product.output(y, 2), multiply(y, alone[2]))
    assert len(stacked_calls) == 3


def test_a_long_fp16_product_shares_its_rows_among_the_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """A prefill's products (many rows) are split between the calling thread and a pool, one share per torch
    thread, with the numbers of one call; a decode token's single row stays on the calling thread."""
    import threading

    from assistant.cpu_quant import fp16_kernels, half_weights_supported, multiply_rows

    if not half_weights_supported():
        pytest.skip("fp16 weights need fbgemm (an x86 CPU)")
    pack, multiply = fp16_kernels()
    linear = torch.nn.Linear(64, 48)
    packed = pack(linear.weight.detach(), linear.bias)
    x, token = torch.randn(1, 70, 64), torch.randn(1, 1, 64)
    expected, expected_token = multiply(x, packed), multiply(token, packed)
    callers: list[tuple[str, int]] = []
    original = torch.fbgemm_linear_fp16_weight

    def recording(inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        callers.append((threading.current_thread().name, inputs.numel() // inputs.shape[-1]))
        return original(inputs, weight, bias)

    monkeypatch.setattr(torch, "fbgemm_linear_fp16_weight", recording)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert torch.equal(multiply_rows(x, packed), expected)
        assert sorted(callers) == [("MainThread", 35), ("iris-fp16_0", 35)]
        callers.clear()
        assert torch.equal(multiply_rows(token, packed), expected_token) and callers == [("MainThread", 1)]
        torch.set_num_threads(1)
        callers.clear()
        assert torch.equal(multiply_rows(x, packed), expected) and callers == [("MainThread", 70)]
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("quant", ["none", "fp16", "int4", "int8"])
def test_a_llama_decoders_token_step_gives_its_own_forwards_logits(model_dirs: dict[str, Path], quant: str) -> None:
    """``lean_token_step`` runs one token through a Llama decoder's modules without their machinery: logits equal,
    bit for bit, to the module path's, for a text model, a vision model's language model and a LoRA adapter."""
    from assistant.engine import _growing_cache, _language_model_step
    from assistant.lean_decode import lean_token_step

    for name, adapters in (("llama", ()), ("llava", ()), ("llama", (str(model_dirs["lora"]),))):
        model = load(ModelOptions(model=str(model_dirs[name]), quant=quant, adapters=adapters), Paths.default()).model
        token_step, module_step = lean_token_step(model), _language_model_step(model, name == "llava")
        assert token_step is not None
        lean_cache, module_cache = (_growing_cache(model.config.get_text_config(decoder=True)) for _ in range(2))
        with torch.inference_mode():
            prompt = torch.arange(5, 25).view(1, -1)
            module_step(lean_cache, input_ids=prompt)
            module_step(module_cache, input_ids=prompt)
            for token in (7, 30, 12, 12, 19):
                ids = torch.tensor([[token]])
                assert torch.equal(token_step(lean_cache, ids), module_step(module_cache, input_ids=ids))
        assert lean_cache.get_seq_length() == module_cache.get_seq_length() == 25


def test_a_lora_adds_its_terms_without_peft_s_wrappers_and_switches_off(model_dirs: dict[str, Path],
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The token step adds an active adapter's low-rank terms itself (PEFT's wrapper forwards halved the default
    model's decode rate) and skips the wrappers when adapters are off, with PEFT's logits either way."""
    from peft.tuners.lora import Linear as LoraLinear

    from assistant.engine import _growing_cache, _language_model_step
    from assistant.lean_decode import lean_token_step

    model = load(ModelOptions(model=str(model_dirs["llama"]), quant="int4", adapters=(str(model_dirs["lora"]),)),
                 Paths.default()).model
    wrapped = LoraLinear.forward
    calls: list[object] = []
    monkeypatch.setattr(LoraLinear, "forward", lambda self, *args, **kwargs: calls.append(self) or wrapped(
        self, *args, **kwargs))
    for scope in (contextlib.nullcontext, model.disable_adapter):
        with scope(), torch.inference_mode():
            token_step, module_step = lean_token_step(model), _language_model_step(model, False)
            assert token_step is not None
            caches = [_growing_cache(model.config.get_text_config(decoder=True)) for _ in range(2)]
            for cache in caches:
                module_step(cache, input_ids=torch.arange(5, 15).view(1, -1))
            calls.clear()
            lean = token_step(caches[0], torch.tensor([[9]]))
            assert calls == []
            assert torch.equal(lean, module_step(caches[1], input_ids=torch.tensor([[9]]))) and calls


def test_other_decoders_and_hooked_ones_take_the_modules_path(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    """Only decoders whose code the lean step reproduces get it; a forward hook (a profiler, a test's counter) keeps
    the module path, so the hook sees every token."""
    from assistant.lean_decode import lean_token_step

    gemma = load(ModelOptions(model=str(FAMILY_BUILDERS["gemma3"](tmp_path / "gemma3")), quant="none"),
                 Paths.default()).model
    assert lean_token_step(gemma) is None
    llama = load(ModelOptions(model=str(model_dirs["llama"]), quant="none"), Paths.default()).model
    hook = llama.model.layers[1].mlp.register_forward_hook(lambda *args: None)
    assert lean_token_step(llama) is None
    hook.remove()
    assert lean_token_step(llama) is not None


def test_the_prefill_uses_the_process_threads_and_each_token_one(model_dirs: dict[str, Path]) -> None:
    """A small model's tokens decode on one thread (tiny kernels, where a thread team only waits); the prefill's
    large products and long attention keep the process's threads; the setting is restored after the answer."""
    backend = _backend(model_dirs["llama"], kv_cache_bytes=0)
    seen: list[tuple[int, int]] = []  # (tokens in the forward, threads)
    backend.loaded.model.get_decoder().register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((kwargs["input_ids"].shape[1], torch.get_num_threads())),
        with_kwargs=True)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert "".join(backend.stream(_conversation("hello"), GREEDY))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    prefill, *tokens = seen
    assert prefill[0] > 1 and prefill[1] == 2
    assert tokens and all(count == 1 and threads == 1 for count, threads in tokens)
