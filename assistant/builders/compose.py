"""``iris build``: compose a LLaVA model from any causal LM and any vision tower transformers can load.

The result is transformers' own ``LlavaForConditionalGeneration`` + ``LlavaProcessor`` saved with
``save_pretrained``, so it loads with plain transformers (``AutoModelForImageTextToText`` +
``AutoProcessor``) and with ``assistant.model.load``. The LM and the tower are copied unchanged (the LM
gains one embedding row for ``<image>`` if its tokenizer lacks one); only the two-layer GELU projector
between them is new, and stays random until trained. The LLM's own chat template is kept: Iris's
``PromptRenderer`` inlines ``<image>`` for templates that only take strings.

Every image is resized to one square size, so it always costs ``(image_size // patch_size) ** 2`` tokens:
the projector reads the tower's last encoder layer as LLaVA selects it (before any final layer norm, so
DINOv2's and SigLIP's final norm go unused), minus the CLS token if the tower has one, unless ``class_token``
keeps it (one more token per image: a summary of the whole image, which small LMs read more easily than the
patches). ``vision_layers`` keeps only the tower's first layers, so the projector reads a middle layer: DINOv2 is
trained to ignore colour changes, and hue fades with depth (a linear probe on the shape's patches finds the hue
93-98% right at layers 3-8 of 12, 64% at the last, on held-out drawings), while shape and position stay readable;
the layers dropped also cost nothing any more. Towers whose
positions are fixed to a native size (CLIP, SigLIP) get their position table resampled once, with the
tower's own ``interpolate_pos_encoding``, to the chosen size; DINOv2 interpolates at run time as is.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from assistant.builders.vision_tower import IMAGENET_MEAN, IMAGENET_STD, make_image_processor
from assistant.errors import IrisError, one_line

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

BUILD_FILE = "iris_build.json"
IMAGE_TOKEN = "<image>"


class BuildError(IrisError):
    """The parts given to ``iris build`` cannot be composed (unreadable, wrong kind, bad size, busy output)."""


def compose_llava(llm_dir: Path, vision_dir: Path, out_dir: Path, image_size: int = 112, seed: int = 0,
                  class_token: bool = False, vision_layers: int | None = None) -> Path:
    """Write a LLaVA model made of ``llm_dir``'s LM, ``vision_dir``'s tower and a fresh projector to ``out_dir``.

    ``seed`` fixes the projector (and a new ``<image>`` embedding row), so the same parts give the same
    model. ``out_dir`` must not exist or be empty; it appears only once complete.
    """
    import torch
    from transformers import LlavaConfig, LlavaProcessor

    check_out_dir(out_dir)
    torch.manual_seed(seed)
    tower, extra_tokens = load_vision_tower(vision_dir, image_size, vision_layers)
    patch_size = int(tower.config.patch_size)
    lm, tokenizer = _load_llm(llm_dir)
    image_token_id = _add_image_token(lm, tokenizer)
    keep_extra = class_token or extra_tokens == 0
    tokens_per_image = (image_size // patch_size) ** 2 + (extra_tokens if keep_extra else 0)
    strategy: Literal["default", "full"] = "full" if keep_extra else "default"
    config = LlavaConfig(vision_config=tower.config, text_config=lm.config, image_token_index=image_token_id,
                         image_seq_length=tokens_per_image, projector_hidden_act="gelu",
                         vision_feature_select_strategy=strategy, vision_feature_layer=-1)
    model = _assemble(config, lm, tower)
    model.generation_config = lm.generation_config
    processor = LlavaProcessor(image_processor=_image_processor(vision_dir, image_size), tokenizer=tokenizer,
                               patch_size=patch_size, vision_feature_select_strategy=strategy,
                               num_additional_image_tokens=extra_tokens, image_token=IMAGE_TOKEN,
                               chat_template=tokenizer.chat_template)
    projector = model.model.multi_modal_projector
    record = {"llm": str(llm_dir), "vision": str(vision_dir), "vision_model_type": tower.config.model_type,
              "image_size": image_size, "patch_size": patch_size, "tokens_per_image": tokens_per_image,
              "vision_layers": tower.config.num_hidden_layers,
              "class_token": bool(extra_tokens and keep_extra), "image_token": IMAGE_TOKEN,
              "image_token_id": image_token_id,
              "projector": {"in": projector.linear_1.in_features, "hidden": projector.linear_1.out_features,
                            "out": projector.linear_2.out_features, "act": "gelu", "trained": False},
              "seed": seed}
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    except OSError as exc:  # a read-only place, /proc or /sys
        raise BuildError(f"{out_dir}: cannot write the model there ({exc.strerror or one_line(exc)})") from None
    try:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        (staging / BUILD_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        check_out_dir(out_dir)  # nobody filled it while we worked
        if out_dir.exists():
            out_dir.rmdir()
        os.rename(staging, out_dir)
    except OSError as exc:  # a full disk, or the output changed under us
        raise BuildError(f"{out_dir}: cannot write the model there ({exc.strerror or one_line(exc)})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def check_out_dir(out_dir: Path) -> None:
    """Refuse to write over anything: the output must be a new or empty directory."""
    try:
        busy = out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir()))
    except OSError as exc:
        raise BuildError(f"{out_dir}: cannot use it as the output ({exc.strerror or one_line(exc)})") from None
    if busy:
        raise BuildError(f"{out_dir}: already exists and is not an empty directory; choose a new --out")


def load_vision_tower(vision_dir: Path, image_size: int,
                      layers: int | None = None) -> tuple[PreTrainedModel, int]:
    """The vision part of ``vision_dir`` as a standalone tower for ``image_size`` px (its first ``layers`` layers,
    or all), and its extra tokens.

    Full models (CLIP, SigLIP, even a LLaVA) give up their ``vision_config`` and its weights. The extra
    token count (1 for a CLS token, 0 for SigLIP) is measured by running the tower once, not assumed.
    """
    import torch
    from transformers import AutoModel

    vision_config = _vision_config(vision_dir)
    patch_size = _fit(vision_config, image_size)
    if layers is not None:
        vision_config = _first_layers(vision_config, check_vision_layers(vision_dir, layers))
    try:
        source = AutoModel.from_pretrained(vision_dir, dtype=torch.float32)
        tower = AutoModel.from_config(vision_config)
    except (OSError, ValueError, KeyError) as exc:
        raise BuildError(f"{vision_dir}: cannot load the vision tower ({one_line(exc)})") from None
    state = _tower_state(source, tower, vision_dir)
    native = getattr(vision_config, "image_size", image_size)
    fixed = _fixed_positions(tower)
    if native != image_size and fixed is not None:
        state = _resampled_positions(*fixed, state, image_size)
        vision_config = copy.deepcopy(vision_config)
        vision_config.image_size = image_size
        tower = AutoModel.from_config(vision_config)
    tower.load_state_dict(state, strict=True)
    tower.eval()
    with torch.inference_mode():
        seq = tower(pixel_values=torch.zeros(1, 3, image_size, image_size)).last_hidden_state.shape[1]
    extra = seq - (image_size // patch_size) ** 2
    if extra not in (0, 1):
        raise BuildError(f"{vision_dir}: the tower adds {extra} tokens besides the patches; "
                         "only a CLS token (or none) can be dropped")
    return tower, extra


def _first_layers(vision_config: Any, layers: int) -> Any:
    """A copy of ``vision_config`` for the tower's first ``layers`` layers; a backbone's (DINOv2's) stages follow."""
    vision_config = copy.deepcopy(vision_config)
    vision_config.num_hidden_layers = layers
    if hasattr(vision_config, "stage_names"):
        vision_config.stage_names = ["stem"] + [f"stage{index}" for index in range(1, layers + 1)]
        vision_config.set_output_features_output_indices(out_features=None, out_indices=None)
    return vision_config


def check_vision_layers(vision_dir: Path, layers: int) -> int:
    """``layers`` once it is known to be between 1 and the tower's own number of layers."""
    available = int(getattr(_vision_config(vision_dir), "num_hidden_layers", 0) or 0)
    if not 1 <= layers <= available:
        raise BuildError(f"--vision-layers {layers}: the tower has {available} layers; keep 1 to {available}")
    return layers


def check_image_size(vision_dir: Path, image_size: int) -> int:
    """The tower's patch size, once ``image_size`` is known to be a whole number of patches."""
    return _fit(_vision_config(vision_dir), image_size)


def _fit(vision_config: Any, image_size: int) -> int:
    patch_size = int(vision_config.patch_size)
    if image_size < patch_size or image_size % patch_size:
        raise BuildError(f"image size {image_size} must be a positive multiple of the patch size {patch_size}")
    return patch_size


def _vision_config(vision_dir: Path) -> Any:
    """The vision part's config: the whole config for a tower, ``vision_config`` for CLIP, SigLIP, LLaVA..."""
    config = _read_config(vision_dir, "vision tower")
    vision_config = getattr(config, "vision_config", None) or config
    if not isinstance(getattr(vision_config, "patch_size", None), int):
        raise BuildError(f"{vision_dir}: not a vision tower ({config.model_type} has no patch_size)")
    return vision_config


def _read_config(directory: Path, what: str) -> Any:
    from transformers import AutoConfig

    if not (directory / "config.json").is_file():
        raise BuildError(f"{directory}: not a model directory (no config.json) for the {what}")
    try:
        return AutoConfig.from_pretrained(directory)
    except (OSError, ValueError, KeyError) as exc:
        raise BuildError(f"{directory}: cannot read the {what}'s config ({one_line(exc)})") from None


def _tower_state(source: torch.nn.Module, tower: torch.nn.Module, vision_dir: Path) -> dict[str, torch.Tensor]:
    """The source's tensors that make up ``tower``, found under whatever prefix the source keeps them."""
    wanted = list(tower.state_dict())
    have = source.state_dict()
    first = wanted[0]
    for prefix in sorted({key[: -len(first)] for key in have if key.endswith(first)}, key=len):
        if all(prefix + key in have for key in wanted):
            return {key: have[prefix + key] for key in wanted}
    raise BuildError(f"{vision_dir}: its weights do not contain a complete {type(tower).__name__}")


def _fixed_positions(tower: torch.nn.Module) -> tuple[str, Any] | None:
    """(name, module) of a position table that refuses other sizes unless asked to interpolate (CLIP, SigLIP).

    DINOv2 interpolates on every call, so it has none.
    """
    for name, module in tower.named_modules():
        if hasattr(module, "position_embedding") and hasattr(module, "interpolate_pos_encoding"):
            if "interpolate_pos_encoding" in inspect.signature(module.forward).parameters:
                return name, module
    return None


def _resampled_positions(name: str, module: Any, state: dict[str, torch.Tensor],
                         image_size: int) -> dict[str, torch.Tensor]:
    """``state`` with its position table resampled to ``image_size`` exactly as the tower does at run time."""
    import torch

    key = f"{name}.position_embedding.weight"
    module.position_embedding.weight.data.copy_(state[key])
    extra = module.num_positions - module.num_patches
    grid = (image_size // module.patch_size) ** 2
    with torch.no_grad():
        table = module.interpolate_pos_encoding(torch.zeros(1, grid + extra, module.embed_dim), image_size,
                                                image_size)
    return {**state, key: table[0].contiguous()}


def _load_llm(llm_dir: Path) -> tuple[PreTrainedModel, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from assistant.architecture import is_vision_config

    config = _read_config(llm_dir, "LLM")
    if is_vision_config(config) or config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise BuildError(f"{llm_dir}: not a text-only causal LM ({config.model_type})")
    try:
        tokenizer = AutoTokenizer.from_pretrained(llm_dir)
        lm = AutoModelForCausalLM.from_pretrained(llm_dir, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as exc:
        raise BuildError(f"{llm_dir}: cannot load the LLM ({one_line(exc)})") from None
    if not tokenizer.chat_template:
        raise BuildError(f"{llm_dir}: the LLM's tokenizer has no chat template; use an instruct/chat model")
    return lm, tokenizer


def _add_image_token(lm: PreTrainedModel, tokenizer: Any) -> int:
    """Make ``<image>`` one special token, growing the LM's embeddings only if the tokenizer lacked it."""
    from tokenizers import AddedToken

    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    embeddings: Any = lm.get_input_embeddings()
    if len(tokenizer) > embeddings.num_embeddings:
        lm.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    return int(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))


def _assemble(config: Any, lm: PreTrainedModel, tower: PreTrainedModel) -> PreTrainedModel:
    """A LLaVA skeleton (no memory) filled with the given LM and tower modules and a fresh projector."""
    import torch
    from transformers import LlavaForConditionalGeneration
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    model.model.vision_tower = tower
    model.model.language_model = lm.base_model
    model.lm_head = lm.get_output_embeddings()
    projector = LlavaMultiModalProjector(config)
    std = config.text_config.initializer_range
    for layer in (projector.linear_1, projector.linear_2):  # the init LlavaForConditionalGeneration itself uses
        torch.nn.init.normal_(layer.weight, std=std)
        torch.nn.init.zeros_(layer.bias)
    model.model.multi_modal_projector = projector
    leftover = [name for name, tensor in model.state_dict().items() if tensor.is_meta]
    if leftover:
        raise BuildError(f"cannot compose: {leftover[0]} was not filled by the LM or the tower")
    return model.eval()


def _image_processor(vision_dir: Path, image_size: int) -> Any:
    """A square resize to ``image_size`` (no crop) with the tower's own normalisation when it ships one."""
    from transformers import AutoImageProcessor

    processor = make_image_processor(image_size)
    mean, std = list(IMAGENET_MEAN), list(IMAGENET_STD)
    if (vision_dir / "preprocessor_config.json").is_file():
        try:
            own = AutoImageProcessor.from_pretrained(vision_dir)
            mean, std = list(own.image_mean), list(own.image_std)
        except (OSError, ValueError, KeyError, AttributeError, TypeError):
            pass  # an unreadable preprocessor config: ImageNet statistics are the common choice
    processor.image_mean, processor.image_std = mean, std
    return processor

