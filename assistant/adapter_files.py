"""The read side of an adapter directory: its JSON files, manifest check, weight checks and projector file.

Loading needs all of this before PEFT touches the model, so it lives in the core; ``adapters/`` writes
these files (training, merge) and imports from here, never the other way round. Everything is checked
before PEFT sees it: JSON files are read as regular files with a size cap, ``adapter_config.json``'s
values must have the types PEFT assumes, and weights must be finite and fit the base.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from assistant.config import Rule, bound, parse
from assistant.errors import AdapterMismatch, BadAdapter, one_line
from assistant.files import read_user_text

MANIFEST_FILE = "iris_manifest.json"
PROJECTOR_FILE = "projector.safetensors"
CONFIG_FILE = "adapter_config.json"
JSON_MAX_BYTES = 16_000_000


def read_adapter_json(directory: Path, name: str) -> dict[str, Any]:
    """A JSON object file of an adapter directory; ``BadAdapter`` naming the file if it is corrupt."""
    content = read_user_text(Path(directory) / name, max_bytes=JSON_MAX_BYTES, what="adapter file", error=BadAdapter)
    try:
        value = json.loads(content)
    except ValueError as exc:  # JSONDecodeError, or an integer too long to convert
        raise BadAdapter(f"{directory}: corrupt {name} ({one_line(exc)})") from None
    except RecursionError:
        raise BadAdapter(f"{directory}: corrupt {name} (nested too deeply)") from None
    if not isinstance(value, dict):
        raise BadAdapter(f"{directory}: corrupt {name} (not an object)")
    return value


def _exactly(*kinds: type, low: float = -math.inf, high: float = math.inf, above: bool = False) -> Rule:
    """A JSON value of one of ``kinds`` (no text standing in for numbers or booleans: PEFT reads the file itself)."""
    labels = {bool: "true/false", int: "an integer", float: "a number", str: "text", type(None): "null"}
    names = " or ".join(labels[kind] for kind in kinds if not (kind is int and float in kinds))

    def rule(value: Any) -> Any:
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise ValueError(f"must be {names}")
        if isinstance(value, int | float) and not isinstance(value, bool):
            if not math.isfinite(value) or value < low or value > high or (above and value <= low):
                raise ValueError(f"must be {'>' if above else '>='} {bound(low)} and <= {bound(high)}")
        return value
    return rule


def _names(*, single: bool) -> Rule:
    """A list of module names (or, for ``target_modules``, one name or regular expression), or null."""
    def rule(value: Any) -> Any:
        if value is None or (single and isinstance(value, str)):
            return value
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise ValueError("must be a list of module names" + (" or one name" if single else "") + " or null")
        return value
    return rule


def _pattern(value: Any) -> Any:
    if not isinstance(value, dict) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in value.values()):
        raise ValueError("must be an object of module names to numbers")
    return value


def _lora(value: Any) -> Any:
    if value != "LORA":
        raise ValueError("must be LORA (only LoRA adapters are supported)")
    return value


def _bias(value: Any) -> Any:
    if value not in ("none", "all", "lora_only"):
        raise ValueError("must be none, all or lora_only")
    return value


def _layers(value: Any) -> Any:
    def whole(item: Any) -> bool:
        return isinstance(item, int) and not isinstance(item, bool)

    if not (value is None or whole(value) or isinstance(value, list) and all(whole(item) for item in value)):
        raise ValueError("must be a layer number, a list of them or null")
    return value


# The keys of adapter_config.json whose types PEFT trusts; wrong ones would fail deep inside it (or not at all).
ADAPTER_CONFIG_RULES: dict[str, Rule] = {
    "peft_type": _lora,
    "r": _exactly(int, low=1, high=65_536),
    "lora_alpha": _exactly(int, float, low=0, high=1e6, above=True),
    "lora_dropout": _exactly(int, float, low=0, high=1),
    "target_modules": _names(single=True),
    "modules_to_save": _names(single=False),
    "bias": _bias,
    "task_type": _exactly(str, type(None)),
    "base_model_name_or_path": _exactly(str, type(None)),
    "fan_in_fan_out": _exactly(bool),
    "use_dora": _exactly(bool),
    "use_rslora": _exactly(bool),
    "inference_mode": _exactly(bool),
    "rank_pattern": _pattern,
    "alpha_pattern": _pattern,
    "layers_to_transform": _layers,
}


def read_adapter_config(directory: Path) -> dict[str, Any]:
    """``adapter_config.json``, with every value PEFT relies on of the right type (``BadAdapter`` naming it)."""
    config = read_adapter_json(directory, CONFIG_FILE)
    if "peft_type" not in config:
        raise BadAdapter(f"{directory}: corrupt {CONFIG_FILE} (no peft_type)")
    for key, rule in ADAPTER_CONFIG_RULES.items():
        if key in config:
            parse(rule, config[key], f"{directory}: {CONFIG_FILE}: {key}", error=BadAdapter)
    return config


def read_manifest(directory: Path) -> dict[str, Any] | None:
    """The manifest of an adapter directory, or None when it has none; ``BadAdapter`` if corrupt."""
    if not os.path.lexists(Path(directory) / MANIFEST_FILE):
        return None
    return read_adapter_json(Path(directory), MANIFEST_FILE)


def check_manifest(directory: Path, fingerprint: str) -> dict[str, Any] | None:
    """Refuse an adapter trained for another base (``AdapterMismatch``); returns the manifest if any."""
    manifest = read_manifest(directory)
    if manifest is None:
        return None
    expected = manifest.get("base_fingerprint")
    if expected and expected != fingerprint:
        raise AdapterMismatch(f"{directory}: trained for base {manifest.get('base_model', '?')} "
                              f"(fingerprint {expected}), but the loaded base is {fingerprint}")
    return manifest


def check_adapter_dir(path: Path, fingerprint: str, *, trust_pickle: bool = False) -> dict[str, Any]:
    """Validate an adapter directory before PEFT touches it; returns its ``adapter_config.json`` ({} if
    it is a projector-stage output, which holds only projector weights)."""
    if not path.is_dir():
        raise BadAdapter(f"{path}: no such adapter directory")
    if not os.path.lexists(path / CONFIG_FILE):
        if (path / PROJECTOR_FILE).is_file():
            check_manifest(path, fingerprint)
            return {}
        raise BadAdapter(f"{path}: not a PEFT adapter (no adapter_config.json)")
    config = read_adapter_config(path)
    if not (path / "adapter_model.safetensors").is_file():
        if not (path / "adapter_model.bin").is_file():
            raise BadAdapter(f"{path}: no adapter weights (adapter_model.safetensors)")
        if not trust_pickle:
            raise BadAdapter(f"{path}: adapter weights are a pickle (.bin), which can run code; "
                             "pass --trust-pickle if you trust its source")
    check_manifest(path, fingerprint)
    return config


def check_adapter_weights(path: Path, base: Any) -> None:
    """Compare every LoRA tensor with the module it adapts, and refuse NaN or infinite values, before PEFT
    modifies the model in place."""
    import torch
    from safetensors import SafetensorError, safe_open

    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        return  # a trusted pickle: PEFT's own loading reports mismatches
    try:
        with safe_open(str(weights), framework="pt") as handle:
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
            for key in shapes:
                tensor = handle.get_tensor(key)
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    raise BadAdapter(f"{path}: adapter weights hold NaN or infinite values ({key})")
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise BadAdapter(f"{path}: corrupt adapter weights ({one_line(exc)})") from None
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


def load_projector(model: Any, projector_path: str | None, directory: Path) -> None:
    """Replace the model's projector weights with ``directory``'s ``projector.safetensors`` (shapes must match)."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if projector_path is None:
        raise AdapterMismatch(f"{directory}: holds projector weights, but the loaded model has no vision projector")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    found = base.get_submodule(projector_path)
    module = getattr(found, "original_module", found)  # the base's own copy under a PEFT wrapper
    try:
        weights = load_file(str(Path(directory) / PROJECTOR_FILE))
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise BadAdapter(f"{directory}: corrupt {PROJECTOR_FILE} ({one_line(exc)})") from None
    for name, tensor in weights.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise BadAdapter(f"{directory}: {PROJECTOR_FILE} holds NaN or infinite values ({name})")
    target = module.state_dict()
    mismatched = [name for name in set(target) | set(weights)
                  if name not in target or name not in weights or target[name].shape != weights[name].shape]
    if mismatched:
        raise AdapterMismatch(f"{directory}: projector does not fit this base model (differs at "
                              f"{sorted(mismatched)[0]})")
    with torch.no_grad():
        for name, tensor in target.items():
            tensor.copy_(weights[name].to(tensor.dtype))
