"""GPU report: decode tokens/s and peak memory, 4-bit (bitsandbytes NF4) vs bf16, on a 7B-shaped Llama
with random weights. Without CUDA the GPU rows are skipped (the script still runs end to end).
Used by ``bench/gpu.sh``, which adds the turns and overhead benchmarks.
"""

from __future__ import annotations

import gc
import time

SEVEN_B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
NEW_TOKENS = 128


def build_bf16():  # type: ignore[no-untyped-def]
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(LlamaConfig(**SEVEN_B))
    torch.set_default_dtype(torch.float32)
    return model.eval()


def to_nf4(model):  # type: ignore[no-untyped-def]
    """Swap every decoder Linear for a bitsandbytes NF4 Linear4bit (double quant), in place on the GPU."""
    import bitsandbytes as bnb
    import torch

    for parent in list(model.model.layers.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear):
                quantized = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False,
                                              compute_dtype=torch.bfloat16, quant_type="nf4",
                                              compress_statistics=True)
                quantized.weight = bnb.nn.Params4bit(child.weight.data.cpu(), requires_grad=False,
                                                     quant_type="nf4", compress_statistics=True)
                setattr(parent, name, quantized.cuda())
                del child
        torch.cuda.empty_cache()
    return model


def decode_rate(model) -> float:  # type: ignore[no-untyped-def]
    import torch

    prompt = torch.randint(0, 32000, (1, 256), device="cuda")
    with torch.inference_mode():
        model.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        torch.cuda.synchronize()
        started = time.perf_counter()
        model.generate(prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
        torch.cuda.synchronize()
    return NEW_TOKENS / (time.perf_counter() - started)


def main() -> None:
    import torch

    if not torch.cuda.is_available():
        print("7B-shaped 4-bit vs bf16: skipped (no CUDA device)")
        return
    print(f"device: {torch.cuda.get_device_name(0)}")
    rows = []
    model = build_bf16()
    for label in ("bf16", "4bit NF4"):
        if label == "4bit NF4":
            model = to_nf4(model)
            gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        weights = torch.cuda.memory_allocated()
        rate = decode_rate(model)
        rows.append((label, weights, torch.cuda.max_memory_allocated(), rate))
    print(f"{'7B-shaped':<10} {'weights GiB':>11} {'peak GiB':>9} {'tok/s':>7}")
    for label, weights, peak, rate in rows:
        print(f"{label:<10} {weights / 2**30:>11.2f} {peak / 2**30:>9.2f} {rate:>7.1f}")
    print(f"4bit / bf16: weights {rows[1][1] / rows[0][1]:.3f}, peak {rows[1][2] / rows[0][2]:.3f}, "
          f"speed {rows[1][3] / rows[0][3]:.3f}")


if __name__ == "__main__":
    main()
