"""The model contract, family by family: every supported VLM family on a tiny random model built with its real
transformers classes (tests/tiny_families.py) goes through the same checks — info, ask and chat with images,
exact token budget, images reaching the model, prefix-KV reuse, 4-bit layout, the three training stages at batch
size 2, the trained adapter active from the command line, and merge/export reloaded by plain transformers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_families import FAMILY_BUILDERS
from typer.testing import CliRunner

from adapters.merge import export_adapter, merge_adapter
from adapters.synth import synthesize
from adapters.train import TrainOptions, train
from assistant.architecture import KNOWN_FAMILIES, describe_model
from assistant.config import GenerationOptions, ModelOptions, Paths
from assistant.dialogue import DialogueManager
from assistant.engine import LocalBackend
from assistant.messages import BASE_MODEL, Message, Role
from assistant.model import LoadedModel, load
from assistant.store import Store
from assistant.vision import load_image_path
from cli.app import app

FAMILIES = sorted(FAMILY_BUILDERS)
GREEDY = GenerationOptions(temperature=0, max_new_tokens=6)


def test_every_known_family_has_a_tiny_model() -> None:
    assert set(FAMILIES) == set(KNOWN_FAMILIES)


@pytest.fixture(scope="module")
def model_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("families")


@pytest.fixture(scope="module", params=FAMILIES)
def family(request: pytest.FixtureRequest, model_root: Path) -> tuple[str, Path]:
    name = request.param
    return name, FAMILY_BUILDERS[name](model_root / name)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    from PIL import Image
    from skimage import data

    root = tmp_path_factory.mktemp("images")
    paths = []
    for name, array, size in (("astronaut.png", data.astronaut(), (64, 64)), ("coffee.png", data.coffee(), (96, 48))):
        Image.fromarray(array).resize(size).save(root / name)
        paths.append(root / name)
    return paths


def _load(model_dir: Path, **options: Any) -> LoadedModel:
    return load(ModelOptions(model=str(model_dir), **{"quant": "none", **options}), Paths.default())


def _user(text: str, *images: Path) -> Message:
    return Message(Role.USER, text, tuple(load_image_path(path) for path in images))


def test_info_names_the_family_and_what_it_can_do(family: tuple[str, Path]) -> None:
    name, model_dir = family
    result = CliRunner().invoke(app, ["info", "--model", str(model_dir), "--quant", "none"])
    assert result.exit_code == 0, result.output
    assert f"family: {name}" in result.output and "accepts images: True" in result.output
    assert "prefix cache: " in result.output and "image feature cache: " in result.output


def test_chat_with_one_two_and_follow_up_images_counts_tokens_exactly(family: tuple[str, Path], images: list[Path],
                                                                       tmp_path: Path) -> None:
    _, model_dir = family
    backend = LocalBackend(_load(model_dir))
    store = Store(tmp_path / "chat.db")
    manager = DialogueManager(backend, store)
    conversation = manager.new_conversation(options=GREEDY)
    turns = [("what is this?", images[:1]), ("compare them", images), ("and now?", images[1:])]
    for text, attached in turns:  # a random model may answer with special tokens only: "" is a valid answer
        assert isinstance(manager.send(conversation, text, [load_image_path(path) for path in attached]).run(), str)
    history = manager.prompt_messages(conversation)
    assert [len(m.images) for m in history if m.role is Role.USER] == [1, 2, 1]
    assert sum(m.role is Role.ASSISTANT for m in history) == 3
    renderer = backend.renderer
    assert renderer.count(history) == renderer.encode(history)["input_ids"].shape[-1]
    for path in images:  # images of other sizes cost other token counts in several families
        one = [Message(Role.USER, "x", (load_image_path(path),))]
        assert renderer.count(one) == renderer.encode(one)["input_ids"].shape[-1]
        assert 0 < backend.image_tokens(one[0].images[0]) <= renderer.count(one) - renderer.count([_user("x")])
    store.close()


def test_the_image_reaches_the_model(family: tuple[str, Path], images: list[Path]) -> None:
    _, model_dir = family
    loaded = _load(model_dir)
    backend = LocalBackend(loaded)
    logits = []
    for path in images:
        inputs = backend.renderer.encode([_user("describe", path)])
        with torch.no_grad():
            logits.append(loaded.model(**inputs).logits[0, -1])
    assert not torch.allclose(logits[0], logits[1])


def test_prefix_reuse_gives_the_cold_answer_or_is_off(family: tuple[str, Path], images: list[Path],
                                                      tmp_path: Path) -> None:
    _, model_dir = family
    warm, cold = LocalBackend(_load(model_dir)), LocalBackend(_load(model_dir), kv_cache_bytes=0)
    answers = []
    for index, backend in enumerate((warm, cold)):
        store = Store(tmp_path / f"{index}.db")
        manager = DialogueManager(backend, store)
        conversation = manager.new_conversation(options=GREEDY)
        answers.append([manager.send(conversation, text, [load_image_path(p) for p in attached]).run()
                        for text, attached in (("hello", []), ("and this?", images[:1]), ("more", []))])
        store.close()
    assert answers[0] == answers[1]
    if warm.loaded.architecture.prefix_reuse:
        assert len(warm.prefix_cache) > 0
    else:
        assert len(warm.prefix_cache) == 0


def test_4bit_quantizes_the_language_model_only(family: tuple[str, Path]) -> None:
    import bitsandbytes as bnb

    _, model_dir = family
    loaded = _load(model_dir, quant="4bit")
    architecture = loaded.architecture
    quantized = {name for name, module in loaded.model.named_modules() if isinstance(module, bnb.nn.Linear4bit)}
    assert quantized and all(name.startswith(f"{architecture.language_model}.") for name in quantized)
    full = [name for name, module in loaded.model.named_modules() if isinstance(module, torch.nn.Linear)
            and any(name.startswith(f"{path}.") for path in architecture.vision_modules()) or name == "lm_head"]
    assert full and not quantized & set(full)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthesize(tmp_path_factory.mktemp("data") / "shapes", 4, seed=0).parent


def _train(model_dir: Path, data: Path, out: Path, **options: Any) -> Path:
    settings: dict[str, Any] = {"steps": 2, "batch_size": 2, "seed": 0, **options}
    return train(TrainOptions(data=data, out=out, model=str(model_dir), **settings), show_progress=False).out


def test_training_stages_and_the_adapter_by_flag(family: tuple[str, Path], dataset: Path, images: list[Path],
                                                 tmp_path: Path) -> None:
    _, model_dir = family
    projector = _train(model_dir, dataset, tmp_path / "projector", stage="projector")
    assert (projector / "projector.safetensors").is_file()
    qlora = _train(model_dir, dataset, tmp_path / "qlora", stage="lora", quant="4bit")
    assert (qlora / "adapter_model.safetensors").is_file()
    lora = _train(model_dir, dataset, tmp_path / "lora", stage="lora", lr_lora=0.05, lr_projector=0.05, steps=3)
    manifest = json.loads((lora / "iris_manifest.json").read_text())
    assert manifest["projector"]["module"] == describe_model(_load(model_dir).model).projector

    question = ["ask", "what is this?", "--image", str(images[0]), "--model", str(model_dir), "--quant", "none",
                "--temperature", "0", "--max-new-tokens", "6"]
    base = CliRunner().invoke(app, question)
    adapted = CliRunner().invoke(app, [*question, "--adapter", str(lora)])
    assert base.exit_code == 0 and adapted.exit_code == 0, adapted.output
    assert adapted.stdout != base.stdout  # active from the first answer, no /adapter needed

    loaded = _load(model_dir, adapters=(str(lora),))
    backend = LocalBackend(loaded)
    messages = [_user("what is this?", images[0])]
    assert loaded.active_adapter == "lora"
    assert "".join(backend.stream(messages, GREEDY)) != "".join(backend.stream(messages, GREEDY, adapter=BASE_MODEL))


def test_the_training_loss_is_the_models_own_answer_token_loss(family: tuple[str, Path], dataset: Path) -> None:
    """Training computes logits only at answer positions (and on cached features where the family splices them):
    the loss must still be what the model's own ``labels=`` forward gives."""
    from adapters.collate import Collator, EncodedDataset
    from adapters.dataset import read_dataset
    from adapters.features import FeatureCache, loss_module
    from assistant.prompt import PromptRenderer

    _, model_dir = family
    loaded = _load(model_dir)
    model, architecture = loaded.model.float(), loaded.architecture
    examples = EncodedDataset(read_dataset(dataset)[:2], PromptRenderer(loaded.tokenizer, loaded.processor))
    batch = Collator(loaded.tokenizer.pad_token_id, architecture)([examples[0], examples[1]])
    batch.pop("image_keys")
    with torch.no_grad():
        own = model(**batch).loss
        answer_only = loss_module(model, architecture)(**batch)
        batch["image_keys"] = [image.sha256 for sample in examples.samples for m in sample.messages
                               for image in m.images]
        cache = FeatureCache(model, architecture, requested=True)
        cached = loss_module(model, architecture)(**cache.prepare(batch))
    assert float(answer_only) == pytest.approx(float(own), rel=1e-4)
    assert float(cached) == pytest.approx(float(own), rel=1e-4)


def test_merge_and_export_reload_with_plain_transformers(family: tuple[str, Path], dataset: Path,
                                                         tmp_path: Path) -> None:
    _, model_dir = family
    lora = _train(model_dir, dataset, tmp_path / "lora", stage="lora", lr_lora=0.05)
    merged = merge_adapter(lora, tmp_path / "merged", model=str(model_dir))
    assert (merged / "config.json").is_file() and _load(merged).architecture.accepts_images
    check = export_adapter(lora, tmp_path / "export", model=str(model_dir))
    assert check.same_greedy_tokens and check.max_logit_difference < 1e-3


def test_a_family_outside_the_contract_chats_and_refuses_training_in_one_line(
        model_root: Path, dataset: Path, images: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    import assistant.architecture

    model_dir = FAMILY_BUILDERS["gemma3"](model_root / "unlisted-gemma3")
    monkeypatch.delitem(assistant.architecture.KNOWN_FAMILIES, "gemma3")
    backend = LocalBackend(_load(model_dir))
    assert not backend.loaded.architecture.known and backend.describe()["family_supported"] is False
    assert isinstance("".join(backend.stream([_user("what is this?", images[0])], GREEDY)), str)
    result = CliRunner().invoke(app, ["train", str(dataset), "--model", str(model_dir), "--steps", "1",
                                      "--out", str(model_root / "unlisted-out")])
    assert result.exit_code == 1
    assert result.output.startswith("error: training is not supported yet for gemma3 models")
    assert result.output.count("\n") == 1


def test_a_missing_processor_dependency_names_the_install_command(
        model_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    import transformers

    model_dir = model_root / "qwen2_vl"
    if not model_dir.is_dir():
        FAMILY_BUILDERS["qwen2_vl"](model_dir)
    find_spec = importlib.util.find_spec

    def without_torchvision(*args: Any, **kwargs: Any) -> Any:
        raise ImportError("Qwen2VLVideoProcessor requires the Torchvision library but it was not found")

    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", without_torchvision)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchvision"
                        else find_spec(name, *a))
    result = CliRunner().invoke(app, ["info", "--model", str(model_dir), "--quant", "none"])
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert "qwen2_vl models need torchvision" in result.output
    assert "pip install 'iris-assistant[vlm]'" in result.output
