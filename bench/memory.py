"""Weight memory of 4-bit (bitsandbytes NF4) vs bf16, for the default model and a 1B Llama-shaped model.

The 1B model has random weights built in-process. Prints the whole-model ratio
and the language-model linear layers' ratio (target <= 0.35): embeddings and
norms stay in 16 bits under bitsandbytes, which weighs heavily in small models.
Run: ``python bench/memory.py``.
"""

from __future__ import annotations

import gc
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from assistant.architecture import describe  # noqa: E402
from assistant.builders.default_model import default_llm_path  # noqa: E402
from assistant.config import Paths  # noqa: E402
from assistant.model import quantization_config  # noqa: E402


def linear_bytes(model) -> int:  # type: ignore[no-untyped-def]
    """Bytes of the weights of Linear-like layers (nn.Linear or bitsandbytes Linear4bit), lm_head excluded."""
    import torch

    total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
            weight = module.weight
            total += weight.numel() * weight.element_size()
            quant_state = getattr(weight, "quant_state", None)
            if quant_state is not None:  # absmax and the double-quant statistics live beside the packed weight
                total += sum(t.numel() * t.element_size() for t in _state_tensors(quant_state))
    return total


def _state_tensors(state) -> list:  # type: ignore[no-untyped-def]
    import torch

    tensors = [value for value in vars(state).values() if isinstance(value, torch.Tensor)]
    nested = getattr(state, "state2", None)
    if nested is not None:
        tensors += [value for value in vars(nested).values() if isinstance(value, torch.Tensor)]
    return tensors


def measure(source: str) -> tuple[tuple[int, int], tuple[int, int]]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    bf16 = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16)
    full = (bf16.get_memory_footprint(), linear_bytes(bf16))
    del bf16
    gc.collect()
    bnb = quantization_config("4bit", "cpu", describe(AutoConfig.from_pretrained(source)))
    quantized = AutoModelForCausalLM.from_pretrained(source, quantization_config=bnb, device_map={"": "cpu"},
                                                     dtype=torch.bfloat16)
    four = (quantized.get_memory_footprint(), linear_bytes(quantized))
    del quantized
    gc.collect()
    return full, four


def random_1b(directory: Path) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                         num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    print(f"1B Llama-shaped model: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters")
    model.save_pretrained(directory)
    del model
    gc.collect()
    return str(directory)


def main() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    rows = [("SmolLM2-135M (default)", measure(str(default_llm_path(Paths.default()))))]
    with tempfile.TemporaryDirectory() as work:
        rows.append(("Llama-shaped 1B (random)", measure(random_1b(Path(work) / "llama-1b"))))
    header = f"{'model':<26} {'bf16 MiB':>9} {'4bit MiB':>9} {'ratio':>6}"
    print(f"{header}   {'LM linear bf16':>14} {'4bit':>7} {'ratio':>6}")
    for name, ((full_all, full_linear), (four_all, four_linear)) in rows:
        print(f"{name:<26} {full_all / 2**20:>9.1f} {four_all / 2**20:>9.1f} {four_all / full_all:>6.3f}   "
              f"{full_linear / 2**20:>14.1f} {four_linear / 2**20:>7.1f} {four_linear / full_linear:>6.3f}")
    print("target: 4-bit / bf16 <= 0.35 on the language model's linear layers")


if __name__ == "__main__":
    main()
