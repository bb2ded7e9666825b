"""What an Iris adapter directory holds besides PEFT's files, and whether it fits a loaded base.

An output of ``iris train`` is a plain PEFT adapter (lora stage) and/or ``projector.safetensors``
(the trained vision projector, both stages), plus ``iris_manifest.json``: the base model's identity
(``base_fingerprint`` is what loading checks), hashes of its config, weights, chat template and of the
dataset, the vision tower, projector shapes, image resolution, the training settings, steps and final
metrics. A directory with only ``projector.safetensors`` (projector stage) is a valid ``--adapter``:
loading it replaces the base model's projector weights.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from assistant.errors import AdapterMismatch, BadAdapter
from assistant.model import MANIFEST_FILE, read_adapter_json

PROJECTOR_FILE = "projector.safetensors"
MANIFEST_FORMAT = 1
PROJECTOR_NAMES = ("multi_modal_projector", "mm_projector", "connector")


def read_manifest(directory: Path) -> dict[str, Any] | None:
    """The manifest of an adapter directory, or None when it has none; ``BadAdapter`` if corrupt."""
    if not (Path(directory) / MANIFEST_FILE).is_file():
        return None
    return read_adapter_json(Path(directory), MANIFEST_FILE)


def write_manifest(directory: Path, manifest: dict[str, Any]) -> Path:
    path = Path(directory) / MANIFEST_FILE
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


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


# hashes ---------------------------------------------------------------------------------------


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def config_hash(config: Any) -> str:
    """Hash of the base config without file-location fields, so a moved copy hashes the same."""
    values = config.to_dict()
    for volatile in ("_name_or_path", "name_or_path", "transformers_version", "quantization_config", "dtype"):
        values.pop(volatile, None)
    return sha256_text(json.dumps(values, sort_keys=True, default=str))


def weights_hash(model_dir: Path) -> str | None:
    """SHA-256 over the base's weight files (sorted by name); None for a hub id with no local directory."""
    directory = Path(model_dir)
    files = sorted(directory.glob("*.safetensors")) if directory.is_dir() else []
    if not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        with file.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def template_hash(tokenizer: Any, processor: Any | None) -> str | None:
    """Hash of the chat template the adapter was trained with (processor's first, as rendering uses it)."""
    template = getattr(processor, "chat_template", None) or getattr(tokenizer, "chat_template", None)
    return sha256_text(template if isinstance(template, str) else json.dumps(template, sort_keys=True)) \
        if template else None


def dataset_hash(samples: Iterable[Any]) -> str:
    """Hash of the conversations themselves (roles, texts, image hashes), whatever file format held them."""
    digest = hashlib.sha256()
    for sample in samples:
        for message in sample.messages:
            record = [message.role.value, message.text, [image.sha256 for image in message.images]]
            digest.update(json.dumps(record).encode("utf-8"))
        digest.update(b"\x00")
    return digest.hexdigest()


# projector weights ----------------------------------------------------------------------------


def find_projector(model: Any) -> tuple[str, Any] | None:
    """(name, module) of the vision projector, or None for a text-only model.

    Under PEFT the projector may be a ``ModulesToSaveWrapper``; the shortest matching name is it.
    """
    found = [(name, module) for name, module in model.named_modules() if name.split(".")[-1] in PROJECTOR_NAMES]
    return min(found, key=lambda item: len(item[0])) if found else None


def projector_weights(module: Any) -> dict[str, Any]:
    """The active projector's tensors (the trained copy under a PEFT ``modules_to_save`` wrapper)."""
    copies = getattr(module, "modules_to_save", None)
    if copies is not None:
        module = copies[module.active_adapters[0]]
    return {name: tensor.detach().to("cpu").contiguous() for name, tensor in module.state_dict().items()}


def save_projector(model: Any, directory: Path) -> dict[str, list[int]] | None:
    """Write ``projector.safetensors``; returns its tensor shapes (None for a model without a projector)."""
    from safetensors.torch import save_file

    found = find_projector(model)
    if found is None:
        return None
    weights = projector_weights(found[1])
    save_file(weights, str(Path(directory) / PROJECTOR_FILE), metadata={"format": "pt"})
    return {name: list(tensor.shape) for name, tensor in weights.items()}


def load_projector(model: Any, directory: Path) -> None:
    """Replace the base model's projector weights with ``projector.safetensors`` (shapes must match)."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    found = find_projector(model)
    if found is None:
        raise AdapterMismatch(f"{directory}: holds projector weights, but the loaded model has no vision projector")
    module = getattr(found[1], "original_module", found[1])  # the base's own copy under a PEFT wrapper
    try:
        weights = load_file(str(Path(directory) / PROJECTOR_FILE))
    except (SafetensorError, OSError) as exc:
        raise BadAdapter(f"{directory}: corrupt {PROJECTOR_FILE} ({str(exc).splitlines()[0][:120]})") from None
    target = module.state_dict()
    mismatched = [name for name in set(target) | set(weights)
                  if name not in target or name not in weights or target[name].shape != weights[name].shape]
    if mismatched:
        raise AdapterMismatch(f"{directory}: projector does not fit this base model (differs at "
                              f"{sorted(mismatched)[0]})")
    with torch.no_grad():
        for name, tensor in target.items():
            tensor.copy_(weights[name].to(tensor.dtype))
