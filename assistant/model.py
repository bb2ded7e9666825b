"""Load a model for chat: HF directory, hub id or ``.gguf`` file → model + tokenizer/processor.

The model's architecture contract (``assistant.architecture``) is worked out from
its config before the weights load, and decides the Auto classes
(``AutoModelForImageTextToText`` + ``AutoProcessor`` for vision-language models,
``AutoModelForCausalLM`` + ``AutoTokenizer`` otherwise) and what bitsandbytes
(NF4 + double quant for 4bit, applied at load time only) leaves in full precision.
LoRA adapters attach on top without merging; the last one attached is active.
Heavy imports live inside functions so ``iris --help`` is fast.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from assistant.adapter_files import check_adapter_dir, check_adapter_weights, load_projector, read_manifest
from assistant.architecture import Architecture, describe
from assistant.config import ModelOptions, Paths
from assistant.cpu_quant import half_weights_supported, int4_weights_supported, quantize_int8, quantize_packed
from assistant.errors import AdapterMismatch, BadAdapter, BadSetting, ModelNotFound, one_line
from assistant.files import build_once
from assistant.messages import BASE_MODEL

Progress = Callable[[str], None]


@dataclass
class LoadedModel:
    """A model ready for generation, and what the rest of Iris needs to know about it.

    ``active_adapter`` is the adapter a conversation gets unless it chooses another: the last one
    attached, so an adapter given on the command line or in ``config.toml`` answers from the start.
    """

    model: Any
    tokenizer: Any
    processor: Any | None
    architecture: Architecture
    name: str
    device: str
    quant: str
    context_length: int
    fingerprint: str
    adapters: dict[str, str] = field(default_factory=dict)  # adapter name → path
    active_adapter: str | None = None
    images_only: set[str] = field(default_factory=set)  # adapters whose manifest says so: text-only turns skip them

    @property
    def accepts_images(self) -> bool:
        return self.architecture.accepts_images


def _quiet(message: str) -> None:
    return None


def resolve_device(requested: str = "auto") -> str:
    """The device to load on: ``auto`` picks CUDA, then MPS, then CPU; a named one must exist here."""
    import torch

    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if _mps_available():
            return "mps"
        return "cpu"
    kind, _, index = requested.partition(":")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise BadSetting(f"device {requested}: CUDA is not available on this machine (use cpu or auto)")
        if index and int(index) >= torch.cuda.device_count():
            raise BadSetting(f"device {requested}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"numbered from 0")
    elif kind == "mps":
        if not _mps_available():
            raise BadSetting(f"device {requested}: MPS (Apple GPU) is not available on this machine (use cpu or auto)")
    elif requested != "cpu":
        raise BadSetting(f"device {requested!r}: must be auto, cpu, cuda, cuda:N or mps")
    return requested


def _mps_available() -> bool:
    import torch

    return getattr(torch.backends, "mps", None) is not None and bool(torch.backends.mps.is_available())


def _is_cuda(device: str) -> bool:
    return device.partition(":")[0] == "cuda"


# What transformers' GGUF reader raises for a file cut short or garbled (struct.error: cut inside the header).
GGUF_READ_ERRORS = (OSError, ValueError, KeyError, RuntimeError, IndexError, TypeError, EOFError, OverflowError,
                    struct.error)


def cached_hf_copy(gguf: Path, paths: Paths, progress: Progress = _quiet) -> Path:
    """Dequantize a GGUF once into an HF directory under the cache; later loads skip the conversion.

    Several processes may start on a cold cache at once: the copy is built under a lock, by one of them.
    """
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = paths.cache / "models" / f"{gguf.stem}-{key}"

    def convert(out: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        progress(f"converting {gguf.name} to a cached HF copy (once)")
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        except GGUF_READ_ERRORS as exc:
            raise ModelNotFound(f"{gguf}: cannot read this GGUF file ({one_line(exc)})") from None
        # The weights are plain dequantized tensors now; transformers refuses to save
        # while the GGUF quantizer marker is still attached.
        model.hf_quantizer = None  # type: ignore[assignment]
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)

    return build_once(target, convert,
                      wait=lambda: progress(f"waiting for another Iris process to convert {gguf.name}"))


def context_length_of(config: Any) -> int:
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(text_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def base_fingerprint(config: Any) -> str:
    """Identity of a base model's architecture, stable across quantization and file location."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    keys = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads")
    identity = {key: getattr(text, key, None) for key in keys}
    vision = getattr(config, "vision_config", None)
    if vision is not None:
        vision_keys = ("model_type", "hidden_size", "num_hidden_layers")
        identity["vision"] = {key: getattr(vision, key, None) for key in vision_keys}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def quantization_config(quant: str, device: str, architecture: Architecture) -> Any | None:
    """bitsandbytes settings for ``quant``; what the architecture keeps in full precision stays unquantized."""
    import torch
    from transformers import BitsAndBytesConfig

    skip = architecture.full_precision_modules()
    if quant == "4bit":
        compute = torch.bfloat16 if _is_cuda(device) else torch.float32
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute, llm_int8_skip_modules=skip)
    if quant == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return None


def resolve_source(options: ModelOptions, paths: Paths, progress: Progress = _quiet) -> tuple[str, str]:
    """(loadable HF dir or hub id, display name)."""
    if options.model is None:
        raise ModelNotFound("no model given: pass --model PATH|ID")
    if options.name is not None:
        return options.model, options.name
    path = Path(options.model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFound(f"{path}: {'not a regular file' if path.exists() else 'no such GGUF file'}")
        return str(cached_hf_copy(path, paths, progress)), path.name
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelNotFound(f"{path}: not a model directory (no config.json)")
        return str(path), path.name
    looks_like_hub_id = options.model.count("/") == 1 and not options.model.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise ModelNotFound(f"{options.model}: no such file or directory")
    return options.model, options.model


def read_config(source: str, display: str) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ModelNotFound(f"{display}: cannot load ({one_line(exc)})") from None


CPU_QUANTS = ("int4", "fp16", "int8")  # packed by assistant/cpu_quant.py after loading in fp32
VLM_EXTRAS = ("torchvision", "num2words")  # what some families' processors import (the ``vlm`` extra)


def from_pretrained(source: str, display: str, architecture: Architecture,
                    **kwargs: Any) -> tuple[Any, Any, Any | None]:
    """(model, tokenizer, processor or None) through the Auto classes that fit; ``ModelNotFound`` on failure."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    try:
        if architecture.accepts_images:
            processor = AutoProcessor.from_pretrained(source)  # first: a missing extra fails before the weights load
            tokenizer = processor.tokenizer
            model = AutoModelForImageTextToText.from_pretrained(source, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
            processor, tokenizer = None, AutoTokenizer.from_pretrained(source)
    except ImportError:
        missing = [name for name in VLM_EXTRAS if importlib.util.find_spec(name) is None]
        raise ModelNotFound(f"{display}: {architecture.family} models need {', '.join(missing) or 'extra packages'}; "
                            "install them with: pip install 'iris-assistant[vlm]'") from None
    except (OSError, ValueError) as exc:
        raise ModelNotFound(f"{display}: cannot load ({one_line(exc)})") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, processor


def load(options: ModelOptions, paths: Paths | None = None, progress: Progress = _quiet) -> LoadedModel:
    """Load the model, tokenizer/processor and adapters ``options`` names; errors are ``IrisError``s."""
    import torch

    paths = paths or Paths.default()
    device = resolve_device(options.device)  # first: a missing device fails before any conversion
    source, name = resolve_source(options, paths, progress)
    cuda = _is_cuda(device)
    quant = options.quant
    if quant == "auto":
        # NF4 on CUDA; on a CPU int4 weights where its kernel is fast (as faithful to full precision as llama.cpp
        # on the same GGUF), else fp16 (twice fp32's speed, the same greedy answers): assistant/cpu_quant.py,
        # bench/agreement.py; full precision elsewhere.
        quant = "4bit" if cuda else "none" if device != "cpu" else (
            "int4" if int4_weights_supported() and not _merged_adapter(source) else
            "fp16" if half_weights_supported() else "none")
    if quant in CPU_QUANTS and device != "cpu":
        raise BadSetting(f"--quant {quant} is a CPU path; on a GPU use 4bit or 8bit")
    if quant == "fp16" and not half_weights_supported() or quant == "int4" and not int4_weights_supported():
        raise BadSetting(f"--quant {quant}: this CPU has no fast kernel for it; use --quant none")
    progress(f"loading {name} on {device} ({quant})")
    config = read_config(source, name)
    architecture = describe(config)
    kwargs: dict[str, Any] = {"dtype": torch.bfloat16 if cuda else torch.float32}
    bnb = quantization_config(quant, device, architecture)
    if bnb is not None:
        kwargs["quantization_config"] = bnb
        kwargs["device_map"] = {"": int(device.partition(":")[2] or 0) if cuda else device}
    model, tokenizer, processor = from_pretrained(source, name, architecture, **kwargs)
    if bnb is None:
        model.to(device)  # type: ignore[arg-type]
    model.eval()
    loaded = LoadedModel(model=model, tokenizer=tokenizer, processor=processor, architecture=architecture,
                         name=name, device=device, quant="none" if quant in CPU_QUANTS else quant,
                         context_length=context_length_of(config), fingerprint=base_fingerprint(config))
    for adapter in options.adapters:
        progress(f"attaching adapter {adapter}")
        attach_adapter(loaded, adapter, trust_pickle=options.trust_pickle)
    if quant in CPU_QUANTS:  # after the adapters: PEFT cannot wrap int8 layers (it wraps fp16 and int4 ones later)
        progress(f"packing the language model's weights in {quant}")
        if quant == "int8":
            quantize_int8(loaded.model, architecture)
        else:
            quantize_packed(loaded.model, architecture, quant)
        loaded.quant = quant
    return loaded


def _merged_adapter(source: str) -> bool:
    """Whether ``source`` is an ``iris adapters merge`` output: int4 packing would round its LoRA's small deltas back
    to the base's own codes (the default's shipped LoRA, merged: yes/no 99% -> 53%), fp16 keeps them."""
    path = Path(source)
    try:
        manifest = read_manifest(path) if path.is_dir() else None
    except BadAdapter:  # a model's unreadable manifest is no reason to refuse the model
        return False
    return manifest is not None and manifest.get("kind") == "merged"


def attach_adapter(loaded: LoadedModel, path_text: str, *, name: str | None = None,
                   trust_pickle: bool = False) -> str:
    """Attach a LoRA adapter to the (possibly quantized) base without merging, and make it the active one;
    returns its name.

    A projector-only directory (``iris train --stage projector``) has no LoRA to switch: its
    projector weights replace the base's, for every conversation.
    """
    from peft import PeftModel

    path = Path(path_text).expanduser()
    if loaded.quant == "int8":
        raise BadAdapter(INT8_ADAPTERS)
    config = check_adapter_dir(path, loaded.fingerprint, trust_pickle=trust_pickle)
    name = name or path.name
    if not config:  # a projector-only directory
        load_projector(loaded.model, loaded.architecture.projector, path)
        loaded.name = f"{loaded.name} + projector {name}"
        return name
    if name in loaded.adapters or name == BASE_MODEL:
        raise BadAdapter(f"an adapter named {name!r} is already loaded" if name != BASE_MODEL else
                         f"{path}: {BASE_MODEL!r} means the base model; rename the adapter directory")
    base = loaded.model.get_base_model() if isinstance(loaded.model, PeftModel) else loaded.model
    check_adapter_weights(path, base)
    try:
        _peft_attach(loaded, path, name)
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        message = one_line(exc)
        if "size mismatch" in message or "not found in the base model" in message or "Target modules" in message:
            raise AdapterMismatch(f"{path}: adapter does not fit this base model ({message})") from None
        raise BadAdapter(f"{path}: cannot load adapter ({message})") from None
    except OSError as exc:
        raise BadAdapter(f"{path}: corrupt adapter weights ({one_line(exc)})") from None
    loaded.model.eval()
    loaded.adapters[name] = str(path)
    loaded.active_adapter = name
    if (read_manifest(path) or {}).get("images_only") is True:
        loaded.images_only.add(name)
    return name


INT8_ADAPTERS = ("with --quant int8, adapters attach at load time only (PEFT cannot wrap or unwrap dynamically "
                 "quantized layers): restart with the --adapter options you want")


def _peft_attach(loaded: LoadedModel, path: Path, name: str) -> None:
    """Let PEFT attach the adapter; if it fails part way (it injects LoRA layers before it loads their
    weights), undo what it did, so the model is exactly as before."""
    from peft import PeftModel

    model = loaded.model
    try:
        if isinstance(model, PeftModel):
            model.load_adapter(str(path), adapter_name=name, is_trainable=False)
        else:
            loaded.model = PeftModel.from_pretrained(model, str(path), adapter_name=name, is_trainable=False)
    except BaseException:
        if isinstance(model, PeftModel):
            if name in model.peft_config:
                model.delete_adapter(name)
        else:
            _strip_lora_layers(model)
        raise


def _strip_lora_layers(model: Any) -> None:
    """Put each PEFT layer's base layer back in its place and drop PEFT's mark on the model (what PEFT's
    ``unload`` does, for a model PEFT never finished wrapping)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for key, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            parent_name, _, child_name = key.rpartition(".")
            setattr(model.get_submodule(parent_name), child_name, module.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config


def detach_adapter(loaded: LoadedModel, name: str) -> None:
    """Remove a LoRA adapter from the running model (``/adapter unload``). If it was the active one, the
    adapter attached before it (the last one still loaded) becomes active, or the base model if none is left;
    once the last adapter goes, the model is the plain base again, as before the first attach."""
    if loaded.quant == "int8":
        raise BadAdapter(INT8_ADAPTERS)
    if name not in loaded.adapters:
        raise BadAdapter(f"no adapter named {name!r} is loaded (loaded: {', '.join(loaded.adapters) or 'none'})")
    loaded.model.delete_adapter(name)
    del loaded.adapters[name]
    loaded.images_only.discard(name)
    if not loaded.adapters:
        loaded.model = loaded.model.unload()
        loaded.model.eval()
    if loaded.active_adapter == name:
        loaded.active_adapter = next(reversed(loaded.adapters), None)
