"""One decode token through a Llama-shaped language model, without transformers' per-module machinery.

On a CPU a decode step of a 135M model is about a thousand tiny kernels, and the Python around them (module calls,
decorators, keyword plumbing, mask and position bookkeeping per layer) cost a quarter of the step (21 ms against 17
ms on the default model). ``lean_token_step`` computes what transformers' Llama code computes for one new token with
as few kernels as give the same numbers: one ``rms_norm`` per norm, q and k rotated together by a roll, q/k/v and
gate/up as one product where their packed weights are stacked (``cpu_quant.PackedProduct``), every other projection
through its module's ``forward`` (fp32 and int8 layers work as they are). A LoRA adapter's terms are added as two
plain products per layer: through PEFT's wrappers the default model's shipped LoRA halved the decode rate. The
logits are the same bit for bit (tests/test_decode.py; default model, one thread: 16.4-17.0 -> 15.1-15.6 ms a step).
Anything else (other families, RoPE scaling, hooks, several tokens, other dtypes than fp32) takes the model's own
forward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# The decoder classes whose layer code ``lean_token_step`` reproduces, by module path and class name.
LLAMA_CLASSES = {"decoder": "LlamaModel", "layer": "LlamaDecoderLayer", "attention": "LlamaAttention",
                 "mlp": "LlamaMLP", "norm": "LlamaRMSNorm", "rotary": "LlamaRotaryEmbedding"}
LLAMA_MODULE = "transformers.models.llama.modeling_llama"


def _is(module: Any, role: str) -> bool:
    kind = type(module)
    return kind.__module__ == LLAMA_MODULE and kind.__name__ == LLAMA_CLASSES[role]


def _has_hooks(module: Any) -> bool:
    import torch

    hooks = torch.nn.modules.module
    if hooks._global_forward_hooks or hooks._global_forward_pre_hooks:
        return True
    return any(part._forward_hooks or part._forward_pre_hooks for part in module.modules())


def _lean_decoder(decoder: Any) -> bool:
    """Whether ``decoder`` is built exactly as transformers' Llama code that ``lean_token_step`` reproduces."""
    from assistant.engine import CPU_ATTENTION  # attends to one token exactly as transformers' SDPA does

    config = decoder.config
    rope = getattr(config, "rope_parameters", None) or {}
    return (_is(decoder, "decoder") and _is(decoder.norm, "norm") and _is(decoder.rotary_emb, "rotary")
            and rope.get("rope_type", "default") == "default" and decoder.rotary_emb.attention_scaling == 1.0
            and config.hidden_act == "silu" and config._attn_implementation in ("sdpa", CPU_ATTENTION)
            and all(_is(layer, "layer") and _is(layer.self_attn, "attention") and _is(layer.mlp, "mlp")
                    and _is(layer.input_layernorm, "norm") and _is(layer.post_attention_layernorm, "norm")
                    for layer in decoder.layers)
            and len(decoder.layers) == config.num_hidden_layers and not _has_hooks(decoder))


def lean_token_step(model: Any) -> Callable[[Any, Any], Any] | None:
    """``step(cache, token)``: extend ``cache`` by one token (ids of shape (1, 1)) and return its logits, shape
    (1, vocabulary); None when the language model is not Llama-shaped. Build it for each turn: it holds the modules
    as they are now (an adapter loaded later replaces some)."""
    import torch
    from torch.nn.functional import rms_norm, scaled_dot_product_attention, silu

    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT: LoRA layers stay in place
    decoder, head = base.get_decoder(), base.get_output_embeddings()
    if (head is None or not _lean_decoder(decoder) or _has_hooks(head)
            or decoder.embed_tokens.weight.dtype != torch.float32):  # rms_norm matches the module's bits in fp32
        return None
    attention = decoder.layers[0].self_attn
    head_dim, scaling, half = attention.head_dim, attention.scaling, attention.head_dim // 2
    heads, kv_heads = decoder.config.num_attention_heads, decoder.config.num_key_value_heads
    grouped, width = heads != kv_heads, (decoder.config.hidden_size,)
    embed, inv_freq = decoder.embed_tokens.forward, decoder.rotary_emb.inv_freq.float()
    epsilon = decoder.config.rms_norm_eps  # every LlamaRMSNorm's
    layers = [(layer.input_layernorm.weight, _stacked(layer.self_attn, ("q_proj", "k_proj", "v_proj")),
               _stacked(layer.self_attn, ("o_proj",)), layer.post_attention_layernorm.weight,
               _stacked(layer.mlp, ("gate_proj", "up_proj")), _stacked(layer.mlp, ("down_proj",)))
              for layer in decoder.layers]
    split = decoder.config.intermediate_size

    def step(cache: Any, token: Any) -> Any:
        hidden = embed(token)
        angles = inv_freq * float(cache.get_seq_length())
        angles = torch.cat((angles, angles))
        cos, sin = angles.cos(), angles.sin()
        signed_sin = torch.cat((-sin[:half], sin[half:]))  # rotate_half(x) * sin == x.roll(half) * signed_sin
        for index, (norm_in, qkv, o_proj, norm_out, gate_up, down) in enumerate(layers):
            projected = qkv(rms_norm(hidden, width, norm_in, epsilon)).view(1, heads + 2 * kv_heads, 1, head_dim)
            rotated = projected[:, :heads + kv_heads]
            rotated = rotated * cos + rotated.roll(half, -1) * signed_sin
            key, value = cache.update(rotated[:, heads:], projected[:, heads + kv_heads:], index)
            attended = scaled_dot_product_attention(rotated[:, :heads], key, value, scale=scaling, enable_gqa=grouped)
            hidden = hidden + o_proj(attended.reshape(1, 1, -1))
            gate_and_up = gate_up(rms_norm(hidden, width, norm_out, epsilon))
            hidden = hidden + down(silu(gate_and_up[..., :split]) * gate_and_up[..., split:])
        return head.forward(rms_norm(hidden, width, decoder.norm.weight, epsilon)[:, -1])

    return step


def _stacked(parent: Any, names: tuple[str, ...]) -> Callable[[Any], Any]:
    """The outputs of ``parent``'s layers ``names`` on one input, side by side: one product where the layers are
    stacked packed siblings (``cpu_quant.PackedProduct``), each layer's own forward otherwise (int8, fp32); a LoRA
    wrapper's active adapters added as plain products (``_low_rank_terms``), its own forward where it needs it."""
    import torch

    layers = [getattr(parent, name) for name in names]
    unwrapped = [_low_rank_terms(layer) for layer in layers]
    if any(found is None for found in unwrapped):
        forwards = [layer.forward for layer in layers]
        return forwards[0] if len(forwards) == 1 else lambda x: torch.cat([forward(x) for forward in forwards], dim=-1)
    bases = [base for base, _ in unwrapped]  # type: ignore[misc]
    terms = [found_terms for _, found_terms in unwrapped]  # type: ignore[misc]
    product = getattr(bases[0], "product", None)
    if product is not None and all(getattr(base, "product", None) is product and base.part == part
                                   for part, base in enumerate(bases)) and len(product.sizes) == len(bases):
        multiply, packed = product.kernel, product.packed
        outputs: Callable[[Any], Any] = lambda x: multiply(x, packed)  # noqa: E731
    else:
        forwards = [base.forward for base in bases]
        outputs = forwards[0] if len(forwards) == 1 else lambda x: torch.cat([forward(x) for forward in forwards], -1)
    if not any(terms):
        return outputs
    ends = [sum(base.out_features for base in bases[:index + 1]) for index in range(len(bases))]
    columns = [(end - base.out_features, end, found) for base, end, found in zip(bases, ends, terms, strict=True)
               if found]
    return lambda x: _plus_terms(outputs(x), x, columns)


def _plus_terms(result: Any, x: Any, columns: list[tuple[int, int, list[tuple[Any, Any, float]]]]) -> Any:
    """``result`` with each sibling's columns plus its adapters' ``lora_B(lora_A(x)) * scaling``, added in PEFT's
    order, so the sum is PEFT's bit for bit."""
    from torch.nn.functional import linear

    result = result.clone()  # a packed product may hand out a view of what its siblings read too
    for start, end, found in columns:
        for down, up, scaling in found:
            result[..., start:end] += linear(linear(x, down), up) * scaling
    return result


def _low_rank_terms(layer: Any) -> tuple[Any, list[tuple[Any, Any, float]]] | None:
    """(the layer under a PEFT LoRA wrapper, the (lora_A, lora_B, scaling) of each active adapter); the layer itself
    and no terms when it is not wrapped or its adapters are off; None where only PEFT's forward computes it
    (merged, training, DoRA and other variants, a LoRA bias, weights other than fp32)."""
    import torch

    if not hasattr(layer, "lora_A") or not hasattr(layer, "base_layer"):
        return layer, []
    if layer.disable_adapters:
        return layer.base_layer, []
    if layer.merged or layer.training:
        return None
    terms = []
    for name in layer.active_adapters:
        if name not in layer.lora_A:
            continue
        down, up = layer.lora_A[name].weight, layer.lora_B[name].weight
        if (name in getattr(layer, "lora_variant", {}) or getattr(layer, "lora_bias", {}).get(name, False)
                or down.dtype != torch.float32 or up.dtype != torch.float32):
            return None
        terms.append((down, up, layer.scaling[name]))
    return layer.base_layer, terms
