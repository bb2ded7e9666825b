"""``--quant int8``: dynamic int8 quantization of the language model's Linear layers, for CPUs.

bitsandbytes' kernels target GPUs; on a CPU, PyTorch's dynamic int8 Linear
(int8 weights, activations quantized on the fly) decodes several times faster
than fp32 with the same answers in practice. The vision tower, the projector
and LoRA matrices stay in full precision, so adapters still attach and switch.
"""

from __future__ import annotations

from typing import Any

from assistant.architecture import Architecture


def int8_targets(model: Any, architecture: Architecture) -> list[str]:
    """Names of the plain ``nn.Linear`` layers to quantize: not the vision tower or projector, nor LoRA
    matrices (``lm_head`` is quantized: it is a fifth of a small model's decode time)."""
    import torch

    keep = architecture.vision_modules()
    return [name for name, module in model.named_modules()
            if type(module) is torch.nn.Linear and ".lora_" not in name
            and not any(name == path or name.startswith(path + ".") for path in keep)]


def quantize_int8(model: Any, architecture: Architecture) -> int:
    """Quantize ``model`` (or a PEFT model's base) in place; returns how many layers were converted."""
    import torch
    from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    targets = int8_targets(base, architecture)
    quantize_dynamic(base, {name: default_dynamic_qconfig for name in targets}, dtype=torch.qint8, inplace=True)
    return len(targets)
