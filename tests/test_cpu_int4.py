"""``--quant int4`` on a CPU: 4-bit weights in groups of 32 (GGUF's Q4_1 comes back as stored), multiplied by ATen's
int4 kernel; stacked siblings, PEFT adapters, every family's decode; and the thread count the decode loop picks by
timing its tokens (``DecodeThreads``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_families import FAMILY_BUILDERS
from tiny_models import save_strong_lora, save_tiny_llama

from assistant.config import GenerationOptions, ModelOptions, Paths
from assistant.cpu_quant import INT4_GROUP, PackedProduct, int4_kernels, int4_weights_supported, quantize_groups
from assistant.decode_threads import RECENT, TRY_EVERY, TRY_TOKENS, DecodeThreads
from assistant.engine import LocalBackend, generation_kwargs
from assistant.errors import BadSetting
from assistant.messages import BASE_MODEL, Message, Role
from assistant.model import load

GREEDY = GenerationOptions(temperature=0, max_new_tokens=16)
needs_int4 = pytest.mark.skipif(not int4_weights_supported(), reason="int4 weights need an AVX2 or AVX-512 CPU")


def _dequantized(codes: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """The weights the kernel reads: ``(code - 8) * scale + zero`` per group."""
    scale, zero = (scales_and_zeros[..., index].float().t().repeat_interleave(INT4_GROUP, dim=1) for index in (0, 1))
    return (codes.float() - 8) * scale + zero


def _messages(text: str) -> list[Message]:
    return [Message(Role.SYSTEM, "You are terse."), Message(Role.USER, text)]


def _generate(backend: LocalBackend, messages: list[Message]) -> str:
    loaded = backend.loaded
    encoded = backend.renderer.encode(messages)
    with torch.inference_mode():
        output = loaded.model.generate(**encoded, **generation_kwargs(GREEDY),
                                       pad_token_id=loaded.tokenizer.pad_token_id)
    return str(loaded.tokenizer.decode(output[0][encoded["input_ids"].shape[1]:], skip_special_tokens=True))


def test_a_q4_1_matrix_comes_back_as_stored() -> None:
    """A matrix stored as GGUF's Q4_1 stores it (per 32 inputs: ``d * q + m``, q spanning 0-15, d and m exact in
    bf16) gets its codes and steps back exactly, its weights within bf16's rounding of the kernel's zero
    (``m + 8 d``); any other matrix lands within half a step of its group's grid."""
    generator = torch.Generator().manual_seed(0)
    steps = torch.randn(48, 4, 1, generator=generator).abs().bfloat16().float() / 16
    centred = -7.5 + torch.rand(48, 4, 1, generator=generator) * 2 - 1  # a block's weights sit around zero
    lows = (centred * steps).bfloat16().float()
    q = torch.randint(0, 16, (48, 4, INT4_GROUP), generator=generator)
    q[..., 0], q[..., 1] = 0, 15  # the quantizer maps a block's minimum to 0 and maximum to 15
    stored = (steps * q + lows).reshape(48, 4 * INT4_GROUP)
    codes, scales_and_zeros = quantize_groups(stored)
    assert codes.dtype == torch.int32 and scales_and_zeros.shape == (4, 48, 2)
    assert torch.equal(codes, q.reshape(48, -1).int())
    assert torch.equal(scales_and_zeros[..., 0].float().t(), steps[..., 0])
    zero = scales_and_zeros[..., 1].float().t().repeat_interleave(INT4_GROUP, dim=1)
    assert bool(((_dequantized(codes, scales_and_zeros) - stored).abs() <= zero.abs() * 2 ** -8).all())
    weight = torch.randn(32, 64, generator=generator)
    codes, scales_and_zeros = quantize_groups(weight)
    step = scales_and_zeros[..., 0].float().t().repeat_interleave(INT4_GROUP, dim=1)
    assert int(codes.min()) >= 0 and int(codes.max()) <= 15
    assert bool(((_dequantized(codes, scales_and_zeros) - weight).abs() <= step * 0.51 + 1e-6).all())


@needs_int4
def test_the_int4_kernel_multiplies_by_the_dequantized_weights() -> None:
    """Within bf16 rounding of the activations and outputs, with the bias added in fp32."""
    pack, multiply = int4_kernels()
    weight, bias = torch.randn(48, 96), torch.randn(48)
    x = torch.randn(2, 3, 96)
    codes, scales_and_zeros = quantize_groups(weight)
    expected = x.bfloat16().float() @ _dequantized(codes, scales_and_zeros).t() + bias
    got = multiply(x, pack(weight, bias))
    assert got.shape == (2, 3, 48) and got.dtype == torch.float32
    assert (got - expected).abs().max() < 2e-2 * float(expected.abs().max())


@needs_int4
@pytest.mark.parametrize("name", sorted(FAMILY_BUILDERS))
def test_every_familys_int4_weights_give_the_logits_of_their_dequantized_weights(name: str, tmp_path: Path) -> None:
    """Each family's language model (biases, q/k norms, stacked q/k/v and gate/up) in int4 computes what full
    precision computes on the dequantized weights, up to bf16 activations, and the CPU decode picks the tokens
    ``generate`` picks; the output head stays fp16."""
    model_dir = FAMILY_BUILDERS[name](tmp_path / name)
    backend = LocalBackend(load(ModelOptions(model=str(model_dir), quant="int4"), Paths.default()), kv_cache_bytes=0)
    full = load(ModelOptions(model=str(model_dir), quant="none"), Paths.default()).model
    model = backend.loaded.model
    assert backend.loaded.quant == "int4"
    products = {name: module.product for name, module in model.named_modules() if hasattr(module, "product")}
    assert {product.kind for product in products.values()} == {"int4", "fp16"}
    assert model.get_output_embeddings().product.kind == "fp16"
    for layer_name, product in products.items():  # full precision gets each int4 layer's dequantized weights
        if product.kind == "int4":
            full_layer = full.get_submodule(layer_name)
            stacked = _dequantized(*_unpacked_codes(product))
            start = sum(product.sizes[:model.get_submodule(layer_name).part])
            own = stacked[start:start + full_layer.out_features]  # this layer's rows of the stacked product
            assert torch.equal(own, _dequantized(*quantize_groups(full_layer.weight.detach())))
            full_layer.weight.data = own.clone()
    messages = _messages("hello there")
    encoded = backend.renderer.encode(messages)
    with torch.inference_mode():
        ours, exact = model(**encoded).logits, full(**encoded).logits
    assert (ours - exact).abs().max() < 5e-2 * max(1.0, float(exact.abs().max()))
    assert "".join(backend.stream(messages, GREEDY)) == _generate(backend, messages)


def _unpacked_codes(product: PackedProduct) -> tuple[torch.Tensor, torch.Tensor]:
    """A product's codes, read back through the kernel (one-hot inputs with unit scales), and its scales/zeros."""
    packed_weights, scales_and_zeros, _ = product.packed
    inputs = scales_and_zeros.shape[0] * INT4_GROUP
    unit = torch.zeros_like(scales_and_zeros)
    unit[..., 0] = 1  # (code - 8) * 1 + 0
    rows = torch.ops.aten._weight_int4pack_mm_for_cpu(torch.eye(inputs, dtype=torch.bfloat16), packed_weights,
                                                      INT4_GROUP, unit)
    return (rows.float().t() + 8).round().to(torch.int32), scales_and_zeros


@needs_int4
def test_int4_keeps_adapters_switchable_and_lean_steps_exact(tmp_path: Path) -> None:
    """PEFT wraps the int4 layers (their ``weight`` is a placeholder), so a LoRA adapter and the base answer
    differently, each as ``generate`` does."""
    llama = save_tiny_llama(tmp_path / "llama", context=2048)
    lora = save_strong_lora(llama, tmp_path / "pirate", seed=3)
    backend = LocalBackend(load(ModelOptions(model=str(llama), quant="int4", adapters=(str(lora),)),
                                Paths.default()), kv_cache_bytes=0)
    messages = _messages("ahoy")
    pirate = "".join(backend.stream(messages, GREEDY))
    plain = "".join(backend.stream(messages, GREEDY, adapter=BASE_MODEL))
    assert pirate != plain and pirate == _generate(backend, messages)
    with backend.loaded.model.disable_adapter():
        assert plain == _generate(backend, messages)


@needs_int4
def test_the_cpu_default_is_int4_for_the_language_model_only(tmp_path: Path) -> None:
    """``--quant auto`` on a CPU with the int4 kernel: the language model's layers in int4 (its head fp16), the
    vision tower and projector in full precision; ``info`` counts every weight once."""
    from tiny_models import save_tiny_llava

    model_dir = save_tiny_llava(tmp_path / "llava")
    loaded = load(ModelOptions(model=str(model_dir)), Paths.default())
    full = load(ModelOptions(model=str(model_dir), quant="none"), Paths.default())
    assert loaded.quant == "int4"
    kinds = {name: module.product.kind for name, module in loaded.model.named_modules() if hasattr(module, "product")}
    assert kinds.pop("lm_head") == "fp16" and kinds and set(kinds.values()) == {"int4"}
    assert all(name.startswith("model.language_model.") for name in kinds)
    info = LocalBackend(loaded).describe()
    assert info["quantization"] == "int4" and info["parameters"] == sum(p.numel() for p in full.model.parameters())
    assert info["memory_bytes"] < int(full.model.get_memory_footprint())


@needs_int4
def test_a_merged_adapter_loads_in_fp16_where_int4_would_round_its_deltas_away(tmp_path: Path) -> None:
    """``--quant auto`` picks fp16 for an ``iris adapters merge`` output (int4 packing put the default's merged
    LoRA back on the GGUF's codes: yes/no 99% -> 53%); named, int4 still loads; a broken manifest changes nothing."""
    from adapters.merge import merge_adapter

    model_dir = save_tiny_llama(tmp_path / "llama")
    merged = merge_adapter(save_strong_lora(model_dir, tmp_path / "lora", seed=2), tmp_path / "merged",
                           model=str(model_dir))
    assert load(ModelOptions(model=str(merged)), Paths.default()).quant == "fp16"
    assert load(ModelOptions(model=str(merged), quant="int4"), Paths.default()).quant == "int4"
    (merged / "iris_manifest.json").write_text("{not json")
    assert load(ModelOptions(model=str(merged)), Paths.default()).quant == "int4"
    assert load(ModelOptions(model=str(model_dir)), Paths.default()).quant == "int4"


def test_int4_on_a_cpu_without_its_kernel_is_a_one_line_error(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import assistant.model

    monkeypatch.setattr(assistant.model, "int4_weights_supported", lambda: False)
    with pytest.raises(BadSetting, match="--quant int4: this CPU has no fast kernel for it") as error:
        load(ModelOptions(model=str(save_tiny_llama(tmp_path / "llama")), quant="int4"), Paths.default())
    assert "\n" not in str(error.value)


def test_decode_threads_follow_the_faster_count_and_notice_a_lasting_change() -> None:
    """Both counts are timed first; then the faster one decodes, the other is tried for ``TRY_TOKENS`` tokens every
    ``TRY_EVERY``. A lone slow step of the team changes nothing; when the team stays slow (another process took a
    core) one thread takes over within ``RECENT`` team steps, and the team runs only on its tries after that."""
    threads = DecodeThreads(2)
    seconds = {2: 0.011, 1: 0.014}

    def decode(tokens: int, slow_team_steps: int = 0) -> list[int]:
        counts = []
        for _ in range(tokens):
            count = threads.next_count()
            counts.append(count)
            slow = count == 2 and slow_team_steps > 0
            slow_team_steps -= slow
            threads.record(count, 0.038 if slow else seconds[count])
        return counts

    counts = decode(3 * TRY_EVERY)
    assert counts[:2] == [2, 1]
    assert counts.count(1) == 1 + 2 * TRY_TOKENS and counts[-1] == 2
    counts = decode(TRY_EVERY, slow_team_steps=1)  # a page fault, a burst elsewhere
    assert counts.count(1) <= TRY_TOKENS
    seconds[2] = 0.038  # a busy core: the team waits at every product
    counts = decode(2 * TRY_EVERY)
    assert counts.count(2) <= RECENT // 2 + 1 + 2 * TRY_TOKENS and counts[-1] == 1  # a majority, then tries only


@needs_int4
def test_the_decode_loop_times_both_thread_counts_and_answers_alike(tmp_path: Path) -> None:
    """With int4 products and two threads, the tokens run on one thread or two as the timings say, the answer is the
    same as ``generate``'s whatever the count, and the process setting is restored afterwards."""
    backend = LocalBackend(load(ModelOptions(model=str(save_tiny_llama(tmp_path / "llama", context=2048)),
                                             quant="int4"), Paths.default()), kv_cache_bytes=0)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        backend = LocalBackend(backend.loaded, kv_cache_bytes=0)
        seen: list[int] = []
        backend.loaded.model.get_decoder().register_forward_pre_hook(
            lambda module, args: seen.append(torch.get_num_threads()))
        messages = _messages("count to many")
        options = GenerationOptions(temperature=0, max_new_tokens=2 * TRY_EVERY)
        answer = "".join(backend.stream(messages, options))
        assert torch.get_num_threads() == 2 and backend._decode_threads is not None
        assert seen[0] == 2 and set(seen[1:]) == {1, 2}  # the prefill on the team, tokens on both
        encoded = backend.renderer.encode(messages)
        with torch.inference_mode():
            output = backend.loaded.model.generate(**encoded, **generation_kwargs(options),
                                                   pad_token_id=backend.loaded.tokenizer.pad_token_id)
        expected = backend.loaded.tokenizer.decode(output[0][encoded["input_ids"].shape[1]:], skip_special_tokens=True)
        assert answer == expected
    finally:
        torch.set_num_threads(before)


@needs_int4
def test_layers_the_int4_kernel_cannot_take_stay_fp16_and_still_answer(tmp_path: Path) -> None:
    """A language model 48 wide: the layers that read its hidden state (q/k/v, gate/up) stay fp16, 48 inputs being
    no whole number of 32-input groups; the down projection (64 inputs, 48 outputs) is int4; the answer is
    ``generate``'s."""
    from tiny_models import tiny_llama_config, tiny_tokenizer
    from transformers import LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    config = tiny_llama_config(len(tokenizer), 512)
    config.hidden_size, config.intermediate_size, config.num_attention_heads = 48, 64, 4
    config.eos_token_id, config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "odd")
    tokenizer.save_pretrained(tmp_path / "odd")
    backend = LocalBackend(load(ModelOptions(model=str(tmp_path / "odd"), quant="int4"), Paths.default()),
                           kv_cache_bytes=0)
    kinds = {name: module.product.kind for name, module in backend.loaded.model.named_modules()
             if hasattr(module, "product")}
    assert kinds["model.layers.0.self_attn.q_proj"] == "fp16" and kinds["model.layers.0.mlp.up_proj"] == "fp16"
    assert kinds["model.layers.0.mlp.down_proj"] == "int4"  # 64 inputs, 48 outputs
    messages = _messages("odd sizes")
    assert "".join(backend.stream(messages, GREEDY)) == _generate(backend, messages)
