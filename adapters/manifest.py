"""What an Iris adapter directory holds besides PEFT's files, and whether it fits a loaded base.

An output of ``iris train`` is a plain PEFT adapter (lora stage) and/or ``projector.safetensors``
(the trained vision projector, both stages), plus ``iris_manifest.json``: the base model's identity
(``base_fingerprint`` is what loading checks), hashes of its config, weights, chat template and of the
dataset, the vision tower, projector shapes, image resolution, the training settings, steps and final
metrics. A directory with only ``projector.safetensors`` (projector stage) is a valid ``--adapter``:
loading it replaces the base model's projector weights. Reading and checking these files is the core's
(``assistant.adapter_files``); this module writes them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from assistant.adapter_files import MANIFEST_FILE, PROJECTOR_FILE

MANIFEST_FORMAT = 1


def write_manifest(directory: Path, manifest: dict[str, Any]) -> Path:
    path = Path(directory) / MANIFEST_FILE
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


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


def projector_weights(module: Any) -> dict[str, Any]:
    """The active projector's tensors (the trained copy under a PEFT ``modules_to_save`` wrapper)."""
    copies = getattr(module, "modules_to_save", None)
    if copies is not None:
        module = copies[module.active_adapters[0]]
    return {name: tensor.detach().to("cpu").contiguous() for name, tensor in module.state_dict().items()}


def save_projector(model: Any, projector_path: str | None, directory: Path) -> dict[str, list[int]] | None:
    """Write ``projector.safetensors``; returns its tensor shapes (None for a model without a projector)."""
    from safetensors.torch import save_file

    if projector_path is None:
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    weights = projector_weights(base.get_submodule(projector_path))
    save_file(weights, str(Path(directory) / PROJECTOR_FILE), metadata={"format": "pt"})
    return {name: list(tensor.shape) for name, tensor in weights.items()}
