"""Adapter manifests: reading, hashing, projector files, and refusing adapters made for another base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_models import save_tiny_llama, save_tiny_llava

from adapters.dataset import read_dataset
from adapters.manifest import config_hash, dataset_hash, save_projector, template_hash, write_manifest
from adapters.synth import synthesize
from adapters.train import TrainOptions, train
from assistant.adapter_files import check_manifest, load_projector, read_manifest
from assistant.architecture import describe_model
from assistant.config import ModelOptions, Paths
from assistant.errors import AdapterMismatch, BadAdapter
from assistant.model import attach_adapter, load


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One-step lora and projector outputs on a tiny LLaVA, and a tiny Llama to refuse them."""
    root = tmp_path_factory.mktemp("manifest")
    synthesize(root / "data", 4, seed=0)
    llava = save_tiny_llava(root / "llava")
    common = {"data": root / "data", "model": str(llava), "steps": 1, "batch_size": 2, "lora_r": 4}
    lora = train(TrainOptions(out=root / "lora", stage="lora", **common), show_progress=False).out  # type: ignore[arg-type]
    projector = train(TrainOptions(out=root / "proj", stage="projector", **common),  # type: ignore[arg-type]
                      show_progress=False).out
    return {"llava": llava, "llama": save_tiny_llama(root / "llama"), "lora": lora, "projector": projector,
            "data": root / "data"}


def test_manifest_round_trip_and_corruption(tmp_path: Path) -> None:
    assert read_manifest(tmp_path) is None and check_manifest(tmp_path, "abc") is None
    write_manifest(tmp_path, {"base_fingerprint": "abc", "base_model": "Base"})
    assert check_manifest(tmp_path, "abc") == {"base_fingerprint": "abc", "base_model": "Base"}
    with pytest.raises(AdapterMismatch, match="trained for base Base .fingerprint abc., but the loaded base is xyz"):
        check_manifest(tmp_path, "xyz")
    for text, expected in (("{oops", "corrupt iris_manifest.json"), ("[1]", "not an object")):
        (tmp_path / "iris_manifest.json").write_text(text)
        with pytest.raises(BadAdapter, match=expected):
            read_manifest(tmp_path)


def test_dataset_hash_follows_content_not_format(trained: dict[str, Path], tmp_path: Path) -> None:
    llava_json = read_dataset(trained["data"])
    records = json.loads((trained["data"] / "dataset.json").read_text())
    roles = {"human": "user", "gpt": "assistant"}
    lines = [json.dumps({"messages": [{"role": roles[t["from"]], "content": t["value"]} for t in r["conversations"]],
                         "images": [str(trained["data"] / r["image"])]}) for r in records]
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    assert dataset_hash(read_dataset(tmp_path / "data.jsonl")) == dataset_hash(llava_json)
    assert dataset_hash(llava_json[:-1]) != dataset_hash(llava_json)


def test_config_and_template_hashes_ignore_location(trained: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    copy = save_tiny_llama(tmp_path / "elsewhere", seed=3)
    assert config_hash(AutoConfig.from_pretrained(copy)) == config_hash(AutoConfig.from_pretrained(trained["llama"]))
    assert config_hash(AutoConfig.from_pretrained(copy)) != config_hash(AutoConfig.from_pretrained(trained["llava"]))
    tokenizer = AutoTokenizer.from_pretrained(copy)
    assert template_hash(tokenizer, None) and template_hash(tokenizer, None) == template_hash(tokenizer, None)


def test_manifest_records_what_loading_and_merging_need(trained: dict[str, Path]) -> None:
    from transformers import AutoConfig

    from assistant.model import base_fingerprint

    manifest = read_manifest(trained["lora"])
    assert manifest is not None
    assert manifest["base_fingerprint"] == base_fingerprint(AutoConfig.from_pretrained(trained["llava"]))
    assert manifest["base_model_path"] == str(trained["llava"]) and manifest["kind"] == "lora"
    assert manifest["projector"]["shapes"]["linear_1.weight"] == [64, 32] and manifest["image_size"] == 28
    assert manifest["vision_tower"]["model_type"] == "clip_vision_model" and manifest["steps"] == 1
    assert len(manifest["base_weights_sha256"]) == 64 and manifest["dataset"]["samples"] == 4
    assert set(manifest["metrics"]) >= {"loss", "samples_per_second"}


def test_projector_file_round_trip_and_shape_check(trained: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(trained["llava"])
    with torch.no_grad():
        model.model.multi_modal_projector.linear_2.bias.fill_(0.5)
    projector = describe_model(model).projector
    assert save_projector(model, projector, tmp_path) == {"linear_1.bias": [64], "linear_1.weight": [64, 32],
                                              "linear_2.bias": [64], "linear_2.weight": [64, 64]}
    fresh = AutoModelForImageTextToText.from_pretrained(trained["llava"])
    load_projector(fresh, projector, tmp_path)
    assert bool((fresh.model.multi_modal_projector.linear_2.bias == 0.5).all())
    with pytest.raises(AdapterMismatch, match="no vision projector"):
        text_model = AutoModelForCausalLM.from_pretrained(trained["llama"])
        load_projector(text_model, describe_model(text_model).projector, tmp_path)
    from safetensors.torch import save_file

    save_file({"linear_1.weight": torch.zeros(8, 8)}, str(tmp_path / "projector.safetensors"))
    with pytest.raises(AdapterMismatch, match="projector does not fit"):
        load_projector(fresh, projector, tmp_path)


def test_adapters_for_another_base_are_refused(trained: dict[str, Path]) -> None:
    text_model = load(ModelOptions(model=str(trained["llama"]), quant="none"), Paths.default())
    for adapter in (trained["lora"], trained["projector"]):
        with pytest.raises(AdapterMismatch, match="trained for base llava") as caught:
            attach_adapter(text_model, str(adapter))
        assert "\n" not in str(caught.value)


def test_pickled_adapter_weights_need_trust(trained: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    from safetensors.torch import load_file

    pickled = tmp_path / "pickled"
    shutil.copytree(trained["lora"], pickled)
    weights = pickled / "adapter_model.safetensors"
    torch.save(load_file(str(weights)), pickled / "adapter_model.bin")
    weights.unlink()
    loaded = load(ModelOptions(model=str(trained["llava"]), quant="none"), Paths.default())
    with pytest.raises(BadAdapter, match="pickle .* --trust-pickle"):
        attach_adapter(loaded, str(pickled))
    assert attach_adapter(loaded, str(pickled), trust_pickle=True) == "pickled"
