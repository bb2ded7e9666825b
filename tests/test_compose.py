"""``iris build``: LLaVA composed from a causal LM and a vision tower, on tiny towers and on the real parts."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from skimage import data
from tiny_models import save_tiny_llama
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    CLIPConfig,
    CLIPModel,
    Dinov2Config,
    Dinov2Model,
    SiglipVisionConfig,
    SiglipVisionModel,
)
from typer.testing import CliRunner

from assistant.builders.compose import BUILD_FILE, BuildError, compose_llava
from assistant.config import GenerationOptions, ModelOptions, Paths
from assistant.engine import LocalBackend
from assistant.messages import ImageAttachment, Message, Role
from assistant.model import LoadedModel, load
from cli.app import app

TINY_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
               "patch_size": 14, "image_size": 28}


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny Llama and three tiny towers: DINOv2 (CLS, interpolates), full CLIP (CLS, fixed size), SigLIP (no CLS)."""
    root = tmp_path_factory.mktemp("parts")
    torch.manual_seed(1)
    Dinov2Model(Dinov2Config(**TINY_VISION)).save_pretrained(root / "dinov2")
    CLIPModel(CLIPConfig(vision_config=TINY_VISION, projection_dim=16,
                         text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                      "num_attention_heads": 2})).save_pretrained(root / "clip")
    SiglipVisionModel(SiglipVisionConfig(**TINY_VISION)).save_pretrained(root / "siglip")
    return {"llm": save_tiny_llama(root / "llm"), "dinov2": root / "dinov2", "clip": root / "clip",
            "siglip": root / "siglip"}


@pytest.fixture(scope="module")
def llava_dir(parts: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compose_llava(parts["llm"], parts["dinov2"], tmp_path_factory.mktemp("built") / "llava", image_size=56)


def photo(name: str = "astronaut", size: tuple[int, int] = (90, 60)) -> ImageAttachment:
    buffer = io.BytesIO()
    Image.fromarray(getattr(data, name)()).convert("RGB").resize(size).save(buffer, format="PNG")
    return ImageAttachment(data=buffer.getvalue(), mime="image/png", width=size[0], height=size[1])


def pixels(loaded: LoadedModel, image: ImageAttachment) -> torch.Tensor:
    from assistant.vision import to_pil

    return loaded.processor.image_processor(images=[to_pil(image)], return_tensors="pt")["pixel_values"]


def projector_input(model: Any, pixel_values: torch.Tensor) -> torch.Tensor:
    """What LLaVA's own ``get_image_features`` hands the projector: the selected tower features."""
    seen: list[torch.Tensor] = []
    hook = model.model.multi_modal_projector.register_forward_hook(lambda _m, args, _out: seen.append(args[0]))
    try:
        with torch.no_grad():
            model.get_image_features(pixel_values=pixel_values)
    finally:
        hook.remove()
    return seen[0]


@pytest.mark.parametrize(("image_size", "tokens"), [(56, 16), (112, 64)])
def test_an_image_costs_the_documented_tokens(parts: dict[str, Path], tmp_path: Path, image_size: int,
                                              tokens: int) -> None:
    out = compose_llava(parts["llm"], parts["dinov2"], tmp_path / "llava", image_size=image_size)
    backend = LocalBackend(load(ModelOptions(model=str(out), quant="none")))
    assert backend.accepts_images
    assert backend.image_tokens(photo()) == tokens
    record = json.loads((out / BUILD_FILE).read_text())
    assert record["tokens_per_image"] == tokens and record["image_size"] == image_size
    assert record["projector"] == {"in": 32, "hidden": 64, "out": 64, "act": "gelu", "trained": False}
    # Plain transformers agrees, and the model accepts exactly that many image positions.
    processor = AutoProcessor.from_pretrained(out)
    inputs = processor(text="Look: <image>", images=[Image.new("RGB", (40, 70), "red")], return_tensors="pt")
    assert int((inputs["input_ids"] == record["image_token_id"]).sum()) == tokens
    model = AutoModelForImageTextToText.from_pretrained(out)
    with torch.no_grad():
        assert model(**inputs).logits.shape[1] == inputs["input_ids"].shape[1]


def test_generation_with_an_image_streams_and_the_image_matters(llava_dir: Path) -> None:
    loaded = load(ModelOptions(model=str(llava_dir), quant="none"))
    backend = LocalBackend(loaded)
    question = [Message(Role.USER, "What is this?", images=(photo(),))]
    assert backend.count_tokens(question) == backend.renderer.encode(question)["input_ids"].shape[-1]
    chunks = list(backend.stream(question, GenerationOptions(temperature=0, max_new_tokens=8)))
    assert chunks
    logits = []
    for name in ("astronaut", "coffee"):
        inputs = backend.renderer.encode([Message(Role.USER, "What is this?", images=(photo(name),))])
        with torch.no_grad():
            logits.append(loaded.model(**inputs).logits[0, -1])
    assert not torch.allclose(logits[0], logits[1])


def test_lm_weights_are_copied_unchanged(parts: dict[str, Path], llava_dir: Path) -> None:
    source = AutoModelForCausalLM.from_pretrained(parts["llm"]).eval()
    composed = load(ModelOptions(model=str(llava_dir), quant="none"))
    inputs = composed.tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(source(**inputs).logits, composed.model(**inputs).logits)
    language_model = composed.model.model.language_model.state_dict()
    for name, tensor in source.model.state_dict().items():
        assert torch.equal(tensor, language_model[name]), name


@pytest.mark.parametrize(("tower", "image_size", "extra"),
                         [("dinov2", 56, 1), ("clip", 28, 1), ("clip", 56, 1), ("siglip", 56, 0)])
def test_tower_is_copied_unchanged(parts: dict[str, Path], tmp_path: Path, tower: str, image_size: int,
                                   extra: int) -> None:
    """Same outputs as the source tower (fixed-size towers: as with run-time interpolation); the projector gets
    the last encoder layer's output (before any final norm, as LLaVA selects it), CLS dropped."""
    out = compose_llava(parts["llm"], parts[tower], tmp_path / "llava", image_size=image_size)
    composed = load(ModelOptions(model=str(out), quant="none"))
    pixel_values = pixels(composed, photo())
    assert pixel_values.shape[-2:] == (image_size, image_size)
    if tower == "dinov2":
        source, kwargs = Dinov2Model.from_pretrained(parts[tower]), {}
    elif tower == "clip":
        source, kwargs = CLIPModel.from_pretrained(parts[tower]).vision_model, {"interpolate_pos_encoding": True}
    else:
        source, kwargs = SiglipVisionModel.from_pretrained(parts[tower]), {"interpolate_pos_encoding": True}
    with torch.no_grad():
        expected = source.eval()(pixel_values=pixel_values, output_hidden_states=True, **kwargs)
        actual = composed.model.model.vision_tower(pixel_values=pixel_values)
    torch.testing.assert_close(actual.last_hidden_state, expected.last_hidden_state, rtol=0, atol=1e-6)
    features = expected.hidden_states[-1][:, extra:]
    assert features.shape[1] == (image_size // 14) ** 2
    torch.testing.assert_close(projector_input(composed.model, pixel_values), features, rtol=0, atol=1e-6)


def test_4bit_quantizes_the_lm_only_and_still_sees_images(llava_dir: Path) -> None:
    import bitsandbytes as bnb

    loaded = load(ModelOptions(model=str(llava_dir), quant="4bit"))
    quantized = [name for name, module in loaded.model.named_modules() if isinstance(module, bnb.nn.Linear4bit)]
    assert len(quantized) == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 layers
    assert all(".language_model." in name for name in quantized)
    backend = LocalBackend(loaded)
    question = [Message(Role.USER, "Describe it.", images=(photo(),))]
    assert backend.image_tokens(question[0].images[0]) == 16
    list(backend.stream(question, GenerationOptions(temperature=0, max_new_tokens=4)))


def test_same_seed_same_projector(parts: dict[str, Path], llava_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    again = compose_llava(parts["llm"], parts["dinov2"], tmp_path / "again", image_size=56)
    other = compose_llava(parts["llm"], parts["dinov2"], tmp_path / "other", image_size=56, seed=1)
    def projector(directory: Path) -> torch.Tensor:
        weights = load_file(directory / "model.safetensors")
        return next(tensor for key, tensor in weights.items() if key.endswith("multi_modal_projector.linear_1.weight"))

    first, second, third = (projector(directory) for directory in (llava_dir, again, other))
    assert torch.equal(first, second) and not torch.equal(first, third)


@pytest.mark.parametrize("tower", ["dinov2", "clip", "siglip"])
def test_vision_layers_keep_the_towers_first_layers(parts: dict[str, Path], llava_dir: Path, tmp_path: Path,
                                                    tower: str) -> None:
    """``vision_layers`` drops the tower's last layers: the projector then reads what the whole tower's middle
    layer gives (its hidden state at that depth), and the model reloads from its saved config."""
    full = compose_llava(parts["llm"], parts[tower], tmp_path / "full", image_size=56)
    short = compose_llava(parts["llm"], parts[tower], tmp_path / "short", image_size=56, vision_layers=1)
    assert json.loads((short / BUILD_FILE).read_text())["vision_layers"] == 1
    whole, first = (AutoModelForImageTextToText.from_pretrained(directory) for directory in (full, short))
    assert first.config.vision_config.num_hidden_layers == 1 and whole.config.vision_config.num_hidden_layers == 2
    first.model.multi_modal_projector.load_state_dict(whole.model.multi_modal_projector.state_dict())
    pixels = torch.rand(1, 3, 56, 56)
    with torch.inference_mode():  # the full tower read at its first layer
        expected = whole.get_image_features(pixel_values=pixels, vision_feature_layer=1)
        got = first.get_image_features(pixel_values=pixels)
    expected, got = (getattr(out, "pooler_output", out) for out in (expected, got))
    assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))


def test_refuses_bad_parts_and_busy_output(parts: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="multiple of the patch size 14"):
        compose_llava(parts["llm"], parts["dinov2"], tmp_path / "a", image_size=50)
    with pytest.raises(BuildError, match="not a vision tower"):
        compose_llava(parts["llm"], parts["llm"], tmp_path / "b")
    with pytest.raises(BuildError, match="not a model directory"):
        compose_llava(tmp_path, parts["dinov2"], tmp_path / "c")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(BuildError, match="not an empty directory"):
        compose_llava(parts["llm"], parts["dinov2"], busy)
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]  # no half-written output or staging dir


def test_cli_builds_into_an_empty_dir(parts: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    result = CliRunner().invoke(app, ["build", "--llm", str(parts["llm"]), "--vision", str(parts["siglip"]),
                                        "--image-size", "42", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "9 tokens per image" in result.stdout
    assert (tmp_path / "out" / "config.json").is_file()


@pytest.mark.parametrize(("size", "make_busy", "message"), [
    ("50", False, "error: image size 50 must be a positive multiple of the patch size 14\n"),
    ("56", True, "already exists and is not an empty directory"),
    ("56 --vision-layers 3", False, "error: --vision-layers 3: the tower has 2 layers; keep 1 to 2\n"),
    ("56 --vision-layers 0", False, "error: --vision-layers 0: the tower has 2 layers; keep 1 to 2\n"),
])
def test_cli_errors_are_one_line(parts: dict[str, Path], tmp_path: Path, size: str, make_busy: bool,
                                 message: str) -> None:
    out = tmp_path / "out"
    if make_busy:
        out.mkdir()
        (out / "x").write_text("x")
    result = CliRunner().invoke(app, ["build", "--llm", str(parts["llm"]), "--vision", str(parts["dinov2"]),
                                        "--image-size", *size.split(), "--out", str(out)])
    assert result.exit_code == 1
    assert message in result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.output


@pytest.mark.slow
def test_real_smollm2_with_dinov2(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The embedded SmolLM2 + the converted DINOv2 ViT-S/14: 112 px costs 64 tokens, the LM is unchanged."""
    from assistant.builders.default_model import default_llm_path
    from assistant.builders.vision_tower import default_vision_tower_dir

    root = tmp_path_factory.mktemp("real_build")
    paths = Paths(data=root / "data", cache=root / "cache", config=root / "config")
    llm_dir = default_llm_path(paths)
    out = compose_llava(llm_dir, default_vision_tower_dir(paths), root / "llava", image_size=112)
    loaded = load(ModelOptions(model=str(out), quant="none"), paths)
    backend = LocalBackend(loaded)
    image = photo("chelsea", (200, 150))
    assert backend.image_tokens(image) == 64
    source = AutoModelForCausalLM.from_pretrained(llm_dir).eval()
    inputs = loaded.tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        expected = source(**inputs).logits
        actual = loaded.model(**inputs).logits
    assert actual.shape[-1] == expected.shape[-1] + 1  # one new row: <image>
    assert torch.equal(actual[..., :-1], expected)
    question = [Message(Role.USER, "What is in the picture?", images=(image,))]
    assert "".join(backend.stream(question, GenerationOptions(temperature=0, max_new_tokens=4)))
