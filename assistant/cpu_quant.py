"""Smaller language-model weights for CPUs: ``int4`` (the CPU default), ``fp16`` and ``int8``.

A CPU decodes at the speed it streams weights from memory, so fewer bytes per weight is most of the speed.

- ``int4`` (what ``--quant auto`` picks on an AVX2 or AVX-512 CPU): 4 bits per weight with a scale and a zero per 32
  inputs, GGUF's Q4_1 layout (a Q4_1 file, like the default model's, keeps its own codes; with the step and zero
  rounded to bf16 each weight lands within 0.07 of a step of the file's), multiplied by ATen's int4 kernel on bf16
  activations (``int4_kernels``), which spreads each product over the threads. A third of fp16's bytes; the default
  model decodes a token in 11.4 ms on 2 idle cores against fp16's 14-17 ms on one (fp16's kernel cannot share a
  one-row product). bench/agreement.py on the default model: 97.4% token agreement with full precision, where
  llama.cpp's own server on the same GGUF agrees on 96.8% of the text tokens (int4: 97.8%). The output head stays
  fp16, as GGUF files keep it at 8 bits or more.
- ``fp16``: fbgemm's packed half-precision weights multiplied in fp32 (``fp16_kernels``): half the bytes of fp32,
  twice its decode speed or more, and the same greedy answers (99.7% token agreement, 26 of 28 answers identical).
  Picked by ``auto`` on an x86 CPU without the int4 kernel.
- ``int8`` (PyTorch's dynamic int8, ``torch.ao``, asked for by name only): int8 weights, and activations quantized
  to 7 bits on the fly, which changes a small model's answers (40% token agreement, vision key words 0.67 -> 0.12),
  so it is no default. Adapters attach at load time only (PEFT cannot wrap its modules).

``PackedLinear`` (int4 and fp16) is still an ``nn.Linear`` to PEFT, so LoRA adapters attach, switch and detach on
top of it as on full precision. torchao 0.18 was measured too, without ``torch.compile`` (bare SmolLM2, one thread,
same run): int8 weight-only 8.7 tok/s and int8 dynamic 4.1, against 8.8 for fp32 and 25.9 for ``torch.ao``'s int8.
Its CPU speed needs compiling, which would cost every start.
The vision tower, the projector and LoRA matrices stay in full precision.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from typing import Any

from assistant.architecture import SHARED_INPUT_PROJECTIONS, Architecture

FP16_MAX = 65504.0
# Below this many bytes of weights, a decode step is hundreds of tiny kernels: an OpenMP team costs more than it
# gains, and on a shared machine a team waiting for a busy core stalls every step (SmolLM2-135M, 2 cores, other work
# running: int8 41 tok/s on one thread, 5 on two; fp32 11 and 1.5).
SINGLE_THREAD_BYTES = 1 << 30
# Below this many rows (tokens) an fp16 product is too short to share between threads.
PARALLEL_ROWS = 16


def quantizable(model: Any, architecture: Architecture) -> list[str]:
    """Names of the plain ``nn.Linear`` layers of the language model: not the vision tower or projector, nor LoRA
    matrices (``lm_head`` is included: it is a fifth of a small model's decode time)."""
    import torch

    keep = architecture.vision_modules()
    return [name for name, module in model.named_modules()
            if type(module) is torch.nn.Linear and ".lora_" not in name
            and not any(name == path or name.startswith(path + ".") for path in keep)]


def half_weights_supported() -> bool:
    """fbgemm (x86 CPUs) runs the packed fp16 matrix products; other CPUs keep fp32."""
    import torch

    return "fbgemm" in torch.backends.quantized.supported_engines


@cache
def fp16_kernels() -> tuple[Callable[[Any, Any], Any], Callable[[Any, Any], Any]]:
    """``(pack, multiply)`` for fp16 weights: ``packed = pack(weight, bias)`` once, then ``multiply(x, packed)``.

    ATen's own fbgemm functions where this PyTorch still has them (deprecated since 2022; each warns once per
    process, silenced here); else the quantized engine's ops: the same fbgemm kernel and the same numbers, but each
    call costs about 10 us more through TorchBind, and a SmolLM2 token takes 211 products (a decode step measured
    25.8 ms of CPU against 23.0).
    """
    import warnings

    import torch

    if not hasattr(torch, "fbgemm_linear_fp16_weight"):
        return torch.ops.quantized.linear_prepack_fp16, torch.ops.quantized.linear_dynamic_fp16
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        probe = torch.fbgemm_pack_gemm_matrix_fp16(torch.zeros(1, 1))
        torch.fbgemm_linear_fp16_weight(torch.zeros(1, 1), probe, torch.zeros(1))

    def pack(weight: Any, bias: Any) -> tuple[Any, Any]:
        return (torch.fbgemm_pack_gemm_matrix_fp16(weight),
                bias.detach() if bias is not None else weight.new_zeros(weight.shape[0]))

    def multiply(x: Any, packed: tuple[Any, Any]) -> Any:
        return torch.fbgemm_linear_fp16_weight(x, *packed)

    return pack, multiply


INT4_GROUP = 32  # weights per scale and zero along the inputs: GGUF's Q4_0/Q4_1 block


def int4_weights_supported() -> bool:
    """PyTorch's CPU int4 kernel is vectorized for bf16 inputs on AVX-512 and AVX2 CPUs (fp32 inputs are 30x
    slower); elsewhere it would be slower than fp16. The layers it cannot take (the output head) need fp16's."""
    import torch

    return (half_weights_supported() and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
            and torch.backends.cpu.get_cpu_capability() in ("AVX512", "AVX2"))


@cache
def int4_kernels() -> tuple[Callable[[Any, Any], Any], Callable[[Any, Any], Any]]:
    """``(pack, multiply)`` for 4-bit weights, as fp16's: an affine scale and zero per ``INT4_GROUP`` inputs of each
    output row (GGUF's Q4_1: a Q4_1 file's weights come back with their own codes, the step and zero rounded to
    bf16), multiplied by ATen's int4 kernel on bf16 activations, which spreads each product over the threads."""
    import torch

    def pack(weight: Any, bias: Any) -> tuple[Any, Any, Any]:
        codes, scales_and_zeros = quantize_groups(weight.detach().float())
        return (torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1), scales_and_zeros,
                None if bias is None else bias.detach().float())

    def multiply(x: Any, packed: tuple[Any, Any, Any]) -> Any:
        weights, scales_and_zeros, bias = packed
        rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, weights, INT4_GROUP, scales_and_zeros).float()
        if bias is not None:
            out += bias
        return out.view(*x.shape[:-1], -1)

    return pack, multiply


def quantize_groups(weight: Any) -> tuple[Any, Any]:
    """``(codes, scales_and_zeros)`` of an (outputs, inputs) fp32 matrix for ATen's int4 kernel, which computes
    ``(code - 8) * scale + zero``: codes 0-15 spanning each group's minimum to maximum (int32, the matrix's shape),
    scales and zeros (bf16, shape (inputs / INT4_GROUP, outputs, 2)). Codes are rounded against the bf16 scales and
    zeros the kernel will read."""
    import torch

    outputs, inputs = weight.shape
    groups = weight.reshape(outputs, inputs // INT4_GROUP, INT4_GROUP)
    low, high = groups.amin(-1), groups.amax(-1)
    scale = ((high - low) / 15).bfloat16()
    zero = (low + 8 * scale.float()).bfloat16()
    divisor = torch.where(scale > 0, scale.float(), torch.ones_like(low))
    codes = ((groups - zero.float()[..., None]) / divisor[..., None] + 8).round().clamp(0, 15)
    scales_and_zeros = torch.stack((scale, zero), dim=-1).transpose(0, 1).contiguous()
    return codes.to(torch.int32).reshape(outputs, inputs), scales_and_zeros


def int4_fits(weight: Any) -> bool:
    """The int4 kernel's shapes: outputs a multiple of 16, inputs of ``INT4_GROUP``."""
    outputs, inputs = weight.shape
    return outputs % 16 == 0 and inputs % INT4_GROUP == 0


class PackedProduct:
    """One packed matrix (fp16 or int4) for one layer, or for sibling layers that always read the same input (a
    decoder layer's q/k/v and gate/up projections, ``SHARED_INPUT_PROJECTIONS``), stacked along the outputs.

    A stacked product streams the same bytes in one kernel call instead of two or three: fewer calls on a decode step
    of hundreds (about 0.9 ms of a 15 ms SmolLM2 step on one thread), with every output element computed as in its own
    layer (the same numbers). Each sibling takes its slice (``output``); the product of an input is kept until every
    sibling has taken its part, so a module path (the prefill) still computes it once. An input is recognised by
    identity: the models call the siblings on the same tensor, unchanged in between. Not for concurrent use: the
    engine runs one model call at a time (``device_lock``)."""

    def __init__(self, weights: Sequence[Any], biases: Sequence[Any], kind: str = "fp16") -> None:
        import torch

        pack, self.kernel = (int4_kernels if kind == "int4" else fp16_kernels)()
        self.kind, self.sizes = kind, [weight.shape[0] for weight in weights]
        bias = None
        if any(b is not None for b in biases):
            bias = torch.cat([b.detach() if b is not None else w.new_zeros(w.shape[0])
                              for w, b in zip(weights, biases, strict=True)])
        self.packed = pack(torch.cat([weight.detach() for weight in weights]), bias)
        self.elements = sum(self.sizes) * weights[0].shape[1]
        self.bytes = self.elements * 2 if kind == "fp16" else self.elements // 2 + self.elements // INT4_GROUP * 4
        self._input: Any = None
        self._parts: tuple[Any, ...] = ()
        self._untaken = 0

    def multiply(self, x: Any) -> Any:
        """``x`` times the whole (stacked) matrix. fbgemm's fp16 kernel runs on the calling thread alone, so a long
        fp16 product is shared out by rows (``multiply_rows``); the int4 kernel shares its own work."""
        return multiply_rows(x, self.packed) if self.kind == "fp16" else self.kernel(x, self.packed)

    def output(self, x: Any, part: int) -> Any:
        """Part ``part`` of the product of ``x``: the output of the ``part``-th stacked layer."""
        if len(self.sizes) == 1:
            return self.multiply(x)
        if x is not self._input or not self._untaken:
            self._input, self._untaken = x, len(self.sizes)
            self._parts = self.multiply(x).split_with_sizes(self.sizes, dim=-1)
        taken = self._parts[part]
        self._untaken -= 1
        if not self._untaken:  # every sibling has its part: hold no activations between forwards
            self._input, self._parts = None, ()
        return taken


def multiply_rows(x: Any, packed: tuple[Any, Any]) -> Any:
    """``x`` times an fp16 ``packed`` matrix, its rows shared among the process's threads (``torch.get_num_threads``):
    fbgemm's fp16 kernel runs on the calling thread alone, and a prefill is mostly these products (one of 200 rows on
    2 cores: 3.4 -> 2.0 ms). Rows are independent, so the numbers are those of one call."""
    import torch

    _, multiply = fp16_kernels()
    rows = x.numel() // x.shape[-1]
    shares = min(torch.get_num_threads(), rows // PARALLEL_ROWS)
    if shares < 2:
        return multiply(x, packed)
    first, *others = x.reshape(rows, x.shape[-1]).tensor_split(shares)
    pending = [_product_pool(shares - 1).submit(multiply, chunk, packed) for chunk in others]
    products = [multiply(first, packed), *(future.result() for future in pending)]
    return torch.cat(products).view(*x.shape[:-1], -1)


@cache
def _product_pool(workers: int) -> ThreadPoolExecutor:
    """Threads that take a share of a long fp16 product (the calling thread takes one more)."""
    return ThreadPoolExecutor(workers, thread_name_prefix="iris-fp16")


@cache
def _packed_linear_class() -> type:
    import torch

    class PackedLinear(torch.nn.Linear):
        """An ``nn.Linear`` whose weight lives packed (fp16 or int4), alone or stacked with its siblings'
        (``PackedProduct``); inputs and outputs stay fp32.

        ``weight`` is an empty placeholder that tells PEFT the device and dtype its LoRA matrices should take.
        """

        def __init__(self, linear: torch.nn.Linear, product: PackedProduct, part: int) -> None:
            torch.nn.Module.__init__(self)
            self.in_features, self.out_features = linear.in_features, linear.out_features
            self.weight = torch.nn.Parameter(linear.weight.new_empty(0), requires_grad=False)
            self.register_parameter("bias", None)  # packed with the weight
            self.product, self.part = product, part

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.product.output(x, self.part)

    return PackedLinear


def quantize_packed(model: Any, architecture: Architecture, kind: str = "fp16") -> int:
    """Pack the language model's Linear weights (of ``model`` or a PEFT model's base) in ``kind`` (fp16 or int4),
    in place, siblings (``SHARED_INPUT_PROJECTIONS``) stacked into one product. With int4 the output head stays fp16
    (GGUF files keep it at 8 bits or more: a vocabulary-wide arg-max is where 4 bits would change answers), as does a
    layer of a shape the int4 kernel cannot take; a layer with weights beyond fp16's range stays fp32. Returns how
    many layers were packed."""
    import torch

    packed_linear = _packed_linear_class()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = {name: base.get_submodule(name) for name in quantizable(base, architecture)}
    head = base.get_output_embeddings()
    packable = {name for name, linear in layers.items() if float(linear.weight.detach().abs().max()) <= FP16_MAX}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one pass over each small matrix: a thread team only waits (2x slower on 2 busy cores)
    try:
        for group in _sibling_groups(packable):
            linears = [layers.pop(name) for name in group]  # each fp32 layer freed once packed
            fits = kind == "int4" and all(linear is not head and int4_fits(linear.weight) for linear in linears)
            product = PackedProduct([linear.weight for linear in linears], [linear.bias for linear in linears],
                                    "int4" if fits else "fp16")
            for part, (name, linear) in enumerate(zip(group, linears, strict=True)):
                parent, _, child = name.rpartition(".")
                setattr(base.get_submodule(parent), child, packed_linear(linear, product, part))
    finally:
        torch.set_num_threads(threads)
    return len(packable)


def _sibling_groups(names: set[str]) -> list[list[str]]:
    """``names`` in groups to stack: each complete set of ``SHARED_INPUT_PROJECTIONS`` under one module (a
    PEFT-wrapped sibling is its ``base_layer``) is one group, every other layer a group of its own."""
    groups: list[list[str]] = []
    grouped: set[str] = set()
    for name in sorted(names):
        parts = name.split(".")
        role_at = len(parts) - (2 if parts[-1] == "base_layer" else 1)
        for siblings in SHARED_INPUT_PROJECTIONS:
            if parts[role_at] != siblings[0]:
                continue
            group = [".".join([*parts[:role_at], role, *parts[role_at + 1:]]) for role in siblings]
            if all(member in names for member in group):
                groups.append(group)
                grouped.update(group)
    return groups + [[name] for name in sorted(names - grouped)]


def quantize_int8(model: Any, architecture: Architecture) -> int:
    """Quantize ``model`` (or a PEFT model's base) in place, int8 weights per output channel; returns how many
    layers were converted."""
    import torch
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    targets = quantizable(base, architecture)
    quantize_dynamic(base, {name: per_channel_dynamic_qconfig for name in targets}, dtype=torch.qint8,
                     inplace=True)
    return len(targets)


def packed_weights(model: Any) -> tuple[int, int]:
    """(elements, bytes) of the weights held packed outside ``model.parameters()`` (fp16, int4 and int8 layers)."""
    elements = size = 0
    products = {id(product): product for module in model.modules()
                if (product := getattr(module, "product", None)) is not None}
    for product in products.values():
        elements += product.elements
        size += product.bytes
    for module in model.modules():
        if hasattr(module, "_packed_params") and hasattr(module, "in_features"):  # an int8 layer, not its params
            count = module.in_features * module.out_features
            elements += count
            size += count
    return elements, size


def threaded_products(model: Any) -> bool:
    """Whether some of ``model``'s packed products share their work among the threads (int4)."""
    return any(getattr(getattr(module, "product", None), "kind", None) == "int4" for module in model.modules())


def single_thread_decode(model: Any) -> bool:
    """Whether a CPU decodes this model faster on one thread than on an OpenMP team: small models."""
    weights = packed_weights(model)[1] + sum(p.numel() * p.element_size() for p in model.parameters())
    return weights < SINGLE_THREAD_BYTES
