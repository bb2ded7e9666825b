"""The architecture contract: everything that differs between model families, computed once per model.

Vision-language families differ in where the language model, vision tower and projector live, in the
tokens that stand for images, in whether image features can be spliced into the input embeddings (and
so cached per image), in how a batch holds several samples' images, and in what must stay in full
precision under 4-bit. ``describe(config)`` works this out before any weight is read (the module tree
is built on PyTorch's ``meta`` device, which allocates nothing) and the result rides on the loaded
model. Loading, the engine, prompt rendering, training, collation, the feature caches, merge/export and
the int8 path read it; nothing else looks at module names or ``model_type`` strings.

A family transformers can load but that Iris has not proven end to end still chats (``known`` is
False): what it cannot do yet is refused with a one-line ``Unsupported`` error, never a traceback.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from assistant.errors import IrisError

DEFAULT_LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Projections that a decoder layer of every family here calls on one and the same input (cpu_quant stacks them).
SHARED_INPUT_PROJECTIONS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
TEXT_ONLY = "text"


class Unsupported(IrisError):
    """Something this model family cannot do in Iris (yet)."""


@dataclass(frozen=True)
class FamilyTraits:
    """What Iris has measured about one family (the rest of the contract is discovered from the model).

    ``projector``: the projector's path when it is not a direct child of the inner model (Qwen's merger
    sits inside the vision tower). ``splices_features``: features of one image depend on that image only
    and replace its placeholder tokens one for one, so they can be cached and scattered into the
    embeddings. ``prefix_reuse``: a stored KV cache continued with new text gives the cold run's tokens.
    ``images_per_sample``: the processor stacks images per sample (``[batch, images, ...]``) instead of
    concatenating every image along the first axis.
    """

    projector: str | None = None
    splices_features: bool = False
    prefix_reuse: bool = True
    images_per_sample: bool = False


# Families proven end to end by tests/test_families.py (chat, 4-bit, training, merge and export).
KNOWN_FAMILIES: dict[str, FamilyTraits] = {
    "llava": FamilyTraits(splices_features=True),
    "llava_next": FamilyTraits(),
    "llava_onevision": FamilyTraits(),
    "qwen2_vl": FamilyTraits(projector="merger", prefix_reuse=False),
    "qwen2_5_vl": FamilyTraits(projector="merger", prefix_reuse=False),
    "qwen3_vl": FamilyTraits(projector="merger", prefix_reuse=False),
    "idefics3": FamilyTraits(images_per_sample=True),
    "smolvlm": FamilyTraits(images_per_sample=True),
    "gemma3": FamilyTraits(),
    "mistral3": FamilyTraits(),
    "internvl": FamilyTraits(),
}


@dataclass(frozen=True)
class Architecture:
    """A frozen description of one loaded model; module paths are dotted names from the model's root."""

    family: str
    known: bool
    accepts_images: bool
    language_model: str | None
    vision_tower: str | None = None
    projector: str | None = None
    image_token_ids: tuple[int, ...] = ()
    splices_features: bool = False
    prefix_reuse: bool = True
    images_per_sample: bool = False
    lora_modules: tuple[str, ...] = DEFAULT_LORA_MODULES

    @property
    def image_token_id(self) -> int | None:
        return self.image_token_ids[0] if self.image_token_ids else None

    def vision_modules(self) -> list[str]:
        """Paths of the vision tower and projector: never quantized, never given LoRA."""
        return [path for path in (self.vision_tower, self.projector) if path]

    def full_precision_modules(self) -> list[str]:
        """Module paths bitsandbytes leaves alone: the vision modules and ``lm_head``."""
        return [*self.vision_modules(), "lm_head"]

    def lora_targets(self, modules: Sequence[str] | None = None) -> str | list[str]:
        """PEFT ``target_modules``: the named linear layers, inside the language model only (a regex) when the
        model has other parts."""
        chosen = list(modules or self.lora_modules)
        if not self.language_model:
            return chosen
        names = "|".join(re.escape(name) for name in chosen)
        return rf"{re.escape(self.language_model)}\.(.*\.)?({names})"

    def require(self, capability: str) -> None:
        """Refuse ``capability`` (e.g. "training") for a family Iris has not proven."""
        if not self.known:
            raise Unsupported(f"{capability} is not supported yet for {self.family} models "
                              f"(supported: {', '.join(sorted(KNOWN_FAMILIES))})")

    def describe(self) -> dict[str, Any]:
        """What ``iris info`` shows about the architecture."""
        return {"family": self.family, "family_supported": self.known,
                "prefix_cache": "on" if self.prefix_reuse else "off for this family",
                "image_feature_cache": "on" if self.splices_features else "off for this family"}


def is_vision_config(config: Any) -> bool:
    """True when transformers maps this config to an image-text-to-text model with a vision part."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES and hasattr(config, "vision_config")


def describe(config: Any) -> Architecture:
    """The contract for ``config``, from its module tree built on the meta device (no memory, no weights)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    vision = is_vision_config(config)
    loader = AutoModelForImageTextToText if vision else AutoModelForCausalLM
    try:
        with torch.device("meta"):
            skeleton = loader.from_config(config)
    except (ValueError, KeyError, TypeError, AttributeError, NotImplementedError):
        return generic(config)  # loading reports the real problem, if there is one
    return describe_model(skeleton)


def generic(config: Any) -> Architecture:
    """The contract of a vision family whose parts Iris cannot find: it chats, nothing more is promised."""
    return Architecture(family=config.model_type, known=False, accepts_images=True, language_model=None,
                        image_token_ids=_image_token_ids(config), prefix_reuse=False)


def describe_model(model: Any) -> Architecture:
    """The contract for a built model (real or on the meta device)."""
    config = model.config
    if not is_vision_config(config):
        return Architecture(family=getattr(config, "model_type", TEXT_ONLY), known=True, accepts_images=False,
                            language_model="")
    family = config.model_type
    traits = KNOWN_FAMILIES.get(family)
    modules = dict(model.named_modules())
    language = _path_of(modules, model.get_decoder())
    tower = _child_with_config(model, modules, config.vision_config)
    projector = _projector(model, modules, language, tower, traits)
    if language is None or tower is None or projector is None:
        return generic(config)
    return Architecture(
        family=family, known=traits is not None, accepts_images=True, language_model=language, vision_tower=tower,
        projector=projector, image_token_ids=_image_token_ids(config),
        splices_features=bool(traits and traits.splices_features),
        prefix_reuse=bool(traits and traits.prefix_reuse),
        images_per_sample=bool(traits and traits.images_per_sample))


def _path_of(modules: dict[str, Any], target: Any) -> str | None:
    return next((name for name, module in modules.items() if module is target), None)


def _child_with_config(model: Any, modules: dict[str, Any], sub_config: Any) -> str | None:
    """The shallowest module whose own config is ``sub_config``'s type (the vision tower)."""
    kind = type(sub_config)
    found = [name for name, module in modules.items()
             if name and isinstance(getattr(module, "config", None), kind) and module is not model]
    return min(found, key=lambda name: name.count(".")) if found else None


def _projector(model: Any, modules: dict[str, Any], language: str | None, tower: str | None,
               traits: FamilyTraits | None) -> str | None:
    """The projector: a family's known path inside the tower, else the inner model's remaining child."""
    if traits is not None and traits.projector is not None and tower is not None:
        inside = f"{tower}.{traits.projector}"
        return inside if inside in modules else None
    if language is None or tower is None:
        return None
    parent = tower.rpartition(".")[0]
    owner = model.get_submodule(parent) if parent else model
    prefix = f"{parent}." if parent else ""
    rest = [prefix + name for name, child in owner.named_children()
            if prefix + name not in (language, tower) and any(True for _ in child.parameters())]
    return rest[0] if len(rest) == 1 else None


def _image_token_ids(config: Any) -> tuple[int, ...]:
    ids = [getattr(config, name, None) for name in ("image_token_id", "image_token_index")]
    return tuple(dict.fromkeys(value for value in ids if isinstance(value, int)))
