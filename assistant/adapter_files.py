"""The read side of an adapter directory: its JSON files, manifest check, weight checks and projector file.

Loading needs all of this before PEFT touches the model, so it lives in the core; ``adapters/`` writes
these files (training, merge) and imports from here, never the other way round.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from assistant.errors import AdapterMismatch, BadAdapter, one_line

MANIFEST_FILE = "iris_manifest.json"
PROJECTOR_FILE = "projector.safetensors"


def read_adapter_json(directory: Path, name: str) -> dict[str, Any]:
    """A JSON object file of an adapter directory; ``BadAdapter`` naming the file if it is corrupt."""
    try:
        value = json.loads((Path(directory) / name).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadAdapter(f"{directory}: corrupt {name} ({exc})") from None
    if not isinstance(value, dict):
        raise BadAdapter(f"{directory}: corrupt {name} (not an object)")
    return value


def read_manifest(directory: Path) -> dict[str, Any] | None:
    """The manifest of an adapter directory, or None when it has none; ``BadAdapter`` if corrupt."""
    if not (Path(directory) / MANIFEST_FILE).is_file():
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
    if not (path / "adapter_config.json").is_file():
        if (path / PROJECTOR_FILE).is_file():
            check_manifest(path, fingerprint)
            return {}
        raise BadAdapter(f"{path}: not a PEFT adapter (no adapter_config.json)")
    config = read_adapter_json(path, "adapter_config.json")
    if not (path / "adapter_model.safetensors").is_file():
        if not (path / "adapter_model.bin").is_file():
            raise BadAdapter(f"{path}: no adapter weights (adapter_model.safetensors)")
        if not trust_pickle:
            raise BadAdapter(f"{path}: adapter weights are a pickle (.bin), which can run code; "
                             "pass --trust-pickle if you trust its source")
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
    except (SafetensorError, OSError) as exc:
        raise BadAdapter(f"{directory}: corrupt {PROJECTOR_FILE} ({one_line(exc)})") from None
    target = module.state_dict()
    mismatched = [name for name in set(target) | set(weights)
                  if name not in target or name not in weights or target[name].shape != weights[name].shape]
    if mismatched:
        raise AdapterMismatch(f"{directory}: projector does not fit this base model (differs at "
                              f"{sorted(mismatched)[0]})")
    with torch.no_grad():
        for name, tensor in target.items():
            tensor.copy_(weights[name].to(tensor.dtype))
