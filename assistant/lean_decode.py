"""One decode token through a Llama-shaped language model, without transformers' per-module machinery.

On a CPU a decode step of a 135M model is about a thousand tiny kernels, and the Python around them (module calls,
decorators, keyword plumbing, mask and position bookkeeping per layer) cost a quarter of the step (21 ms against
17 ms on the default model). ``lean_token_step`` runs the operations of transformers' Llama code for one new token,
in the same order, on the model's own modules (their ``forward``, so fp16/int8/LoRA layers work as they are): the
same logits bit for bit (tests/test_decode.py). Anything else (other families, RoPE scaling, hooks, several tokens)
takes the model's own forward.
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
    from torch.nn.functional import scaled_dot_product_attention, silu

    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT: LoRA layers stay in place
    decoder, head = base.get_decoder(), base.get_output_embeddings()
    if head is None or not _lean_decoder(decoder) or _has_hooks(head):
        return None
    embed, final_norm, inv_freq = decoder.embed_tokens.forward, decoder.norm.forward, decoder.rotary_emb.inv_freq
    layers = [(layer.input_layernorm.forward, layer.self_attn.q_proj.forward, layer.self_attn.k_proj.forward,
               layer.self_attn.v_proj.forward, layer.self_attn.o_proj.forward, layer.post_attention_layernorm.forward,
               layer.mlp.gate_proj.forward, layer.mlp.up_proj.forward, layer.mlp.down_proj.forward)
              for layer in decoder.layers]
    attention = decoder.layers[0].self_attn
    head_dim, scaling = attention.head_dim, attention.scaling
    grouped = attention.num_key_value_groups > 1

    def rotated(states: Any, cos: Any, sin: Any) -> Any:
        half = states.shape[-1] // 2
        return states * cos + torch.cat((-states[..., half:], states[..., :half]), dim=-1) * sin

    def step(cache: Any, token: Any) -> Any:
        hidden = embed(token)
        position = torch.tensor([[cache.get_seq_length()]], device=hidden.device)
        frequencies = position[..., None].float() * inv_freq.to(device=hidden.device, dtype=torch.float)
        angles = torch.cat((frequencies, frequencies), dim=-1)
        cos, sin = angles.cos().to(hidden.dtype).unsqueeze(1), angles.sin().to(hidden.dtype).unsqueeze(1)
        for index, (norm_in, q_proj, k_proj, v_proj, o_proj, norm_out, gate, up, down) in enumerate(layers):
            states = norm_in(hidden)
            shape = (1, 1, -1, head_dim)
            query = rotated(q_proj(states).view(shape).transpose(1, 2), cos, sin)
            key = rotated(k_proj(states).view(shape).transpose(1, 2), cos, sin)
            key, value = cache.update(key, v_proj(states).view(shape).transpose(1, 2), index)
            attended = scaled_dot_product_attention(query, key, value, scale=scaling, enable_gqa=grouped)
            hidden = hidden + o_proj(attended.transpose(1, 2).contiguous().reshape(1, 1, -1).contiguous())
            states = norm_out(hidden)
            hidden = hidden + down(silu(gate(states)) * up(states))
        return head.forward(final_norm(hidden)[:, -1])

    return step
