"""`iris train` and `iris adapters list|info|merge|export` through the typer CLI on a tiny LLaVA."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from tiny_models import save_tiny_llava
from typer.testing import CliRunner

from adapters.synth import synthesize
from adapters.train import TrainOptions, train
from assistant.config import ModelOptions, Paths
from assistant.messages import Message, Role
from assistant.model import load
from assistant.prompt import PromptRenderer
from assistant.vision import load_image_path
from cli.app import app


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters_cli")
    synthesize(root / "shapes", 4, seed=0)
    llava = save_tiny_llava(root / "llava")
    adapter = train(TrainOptions(data=root / "shapes", out=root / "trained", model=str(llava), stage="chain", steps=3,
                                 batch_size=2, lora_r=4, lr_lora=1e-2), show_progress=False).out
    with torch.no_grad():  # make the LoRA visibly change greedy output (three tiny steps barely move it)
        from safetensors.torch import load_file, save_file

        weights = load_file(str(adapter / "adapter_model.safetensors"))
        generator = torch.Generator().manual_seed(0)
        save_file({k: (torch.randn(v.shape, generator=generator) * 0.5 if "lora_" in k else v)
                   for k, v in weights.items()}, str(adapter / "adapter_model.safetensors"))
    return {"llava": llava, "data": root / "shapes", "adapter": adapter}


def _install(tiny: dict[str, Path], name: str = "shapes-lora") -> Path:
    target = Paths.default().data / "adapters" / name
    shutil.copytree(tiny["adapter"], target)
    return target


def _invoke(*args: str) -> object:
    return CliRunner().invoke(app, [str(a) for a in args])


def test_train_command_writes_to_the_user_adapter_dir_and_list_info_show_it(tiny: dict[str, Path]) -> None:
    done = _invoke("train", tiny["data"], "--model", tiny["llava"], "--stage", "projector", "--steps", "2",
                   "--batch-size", "2")
    assert done.exit_code == 0, done.output
    out = Paths.default().data / "adapters" / "shapes-projector"
    assert f"wrote {out} (2 steps" in done.output and (out / "projector.safetensors").is_file()
    listed = _invoke("adapters", "list")
    assert listed.exit_code == 0 and "shapes-projector" in listed.output and "projector" in listed.output
    info = _invoke("adapters", "info", "shapes-projector")
    manifest = json.loads(info.output)
    assert manifest["kind"] == "projector" and manifest["steps"] == 2 and manifest["path"] == str(out)
    again = _invoke("train", tiny["data"], "--model", tiny["llava"], "--stage", "projector", "--steps", "2")
    assert again.exit_code == 1 and again.output.startswith("error: ") and "already exists" in again.output


def test_user_errors_are_one_line(tiny: dict[str, Path]) -> None:
    cases = [("train", tiny["data"], "--stage", "full"), ("train", tiny["data"], "--quant", "8bit"),
             ("adapters", "info", "nope"), ("adapters", "merge", "nope")]
    for args in cases:
        done = _invoke(*args)
        assert done.exit_code == 1 and done.output.startswith("error: "), done.output
        assert done.output.count("\n") == 1 and "Traceback" not in done.output
    assert "no adapters in" in _invoke("adapters", "list").output


def test_merge_refuses_a_4bit_base_unless_dequantized(tiny: dict[str, Path]) -> None:
    from transformers import AutoModelForImageTextToText

    _install(tiny)
    refused = _invoke("adapters", "merge", "shapes-lora", "--quant", "4bit")
    assert refused.exit_code == 1 and "lossy" in refused.output and "--dequantize" in refused.output
    done = _invoke("adapters", "merge", "shapes-lora", "--quant", "4bit", "--dequantize")
    assert done.exit_code == 0, done.output
    merged = Paths.default().data / "models" / "shapes-lora-merged"
    model = AutoModelForImageTextToText.from_pretrained(merged)
    assert not hasattr(model.config, "quantization_config") and not any("lora" in n for n, _ in
                                                                      model.named_parameters())
    assert json.loads((merged / "iris_manifest.json").read_text())["kind"] == "merged"


@pytest.mark.parametrize("quant", ["int4", "fp16", "int8"])
def test_merge_refuses_a_cpu_packed_base_in_one_line(tiny: dict[str, Path], quant: str) -> None:
    from assistant.cpu_quant import int4_weights_supported

    if not int4_weights_supported():
        pytest.skip("int4 and fp16 weights need an x86 CPU with AVX2 or AVX-512")
    _install(tiny)
    refused = _invoke("adapters", "merge", "shapes-lora", "--quant", quant)
    assert refused.exit_code == 1 and refused.output.count("\n") == 1, refused.output
    assert f"--quant {quant} packs the base" in refused.output and "--quant none" in refused.output
    assert not (Paths.default().data / "models" / "shapes-lora-merged").exists()


def test_export_loads_with_plain_transformers_and_matches_base_plus_adapter(tiny: dict[str, Path],
                                                                           tmp_path: Path) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    _install(tiny)
    out = tmp_path / "exported"
    done = _invoke("adapters", "export", "shapes-lora", "--out", out)
    assert done.exit_code == 0, done.output
    assert "reload check" in done.output and (out / "README.md").is_file()
    image = load_image_path(next((tiny["data"] / "images").iterdir()))
    messages = [Message(Role.USER, "Describe the image.", (image,))]
    adapted = load(ModelOptions(model=str(tiny["llava"]), quant="none",
                                adapters=(str(Paths.default().data / "adapters" / "shapes-lora"),)), Paths.default())
    plain_model = AutoModelForImageTextToText.from_pretrained(out)
    plain_processor = AutoProcessor.from_pretrained(out)
    greedy = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": adapted.tokenizer.pad_token_id}
    with torch.no_grad():
        inputs = PromptRenderer(adapted.tokenizer, adapted.processor).encode(messages)
        expected = adapted.model.generate(**inputs, **greedy)
        plain_inputs = PromptRenderer(plain_processor.tokenizer, plain_processor).encode(messages)
        actual = plain_model.generate(**plain_inputs, **greedy)
        with adapted.model.disable_adapter():
            base_only = adapted.model.generate(**inputs, **greedy)
    assert torch.equal(actual, expected)
    assert not torch.equal(base_only, expected)  # the adapter really is in the exported weights


TEXT_ONLY_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                      "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                      "{% endif %}")


def test_export_of_a_composed_model_works_the_standard_transformers_way(tmp_path: Path) -> None:
    """`iris build` keeps the LLM's text-only template (SmolLM2's concatenates strings), which fails on typed image
    parts; the export's template takes them and renders what Iris rendered, so the standard
    ``apply_chat_template`` + ``generate`` answers as base + adapter did."""
    from tiny_models import save_strong_lora, save_tiny_llama
    from transformers import (
        AutoModelForImageTextToText,
        AutoProcessor,
        AutoTokenizer,
        Dinov2Config,
        Dinov2Model,
    )

    from assistant.builders.compose import compose_llava

    llm = save_tiny_llama(tmp_path / "llm")
    tokenizer = AutoTokenizer.from_pretrained(llm)
    tokenizer.chat_template = TEXT_ONLY_TEMPLATE
    tokenizer.save_pretrained(llm)
    torch.manual_seed(1)
    Dinov2Model(Dinov2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                             patch_size=14, image_size=28)).save_pretrained(tmp_path / "tower")
    built = compose_llava(llm, tmp_path / "tower", tmp_path / "built", image_size=28)
    typed = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    with pytest.raises(TypeError, match="can only concatenate str"):
        AutoProcessor.from_pretrained(built).apply_chat_template(typed, add_generation_prompt=True)
    adapter = save_strong_lora(built, tmp_path / "strong", seed=2, vision=True)
    done = _invoke("adapters", "export", adapter, "--out", tmp_path / "export", "--model", built)
    assert done.exit_code == 0, done.output

    processor = AutoProcessor.from_pretrained(tmp_path / "export")
    prompt = processor.apply_chat_template(typed, add_generation_prompt=True)
    image = load_image_path(_png(tmp_path))
    adapted = load(ModelOptions(model=str(built), quant="none", adapters=(str(adapter),)), Paths.default())
    messages = [Message(Role.USER, "What is this?", (image,))]
    assert prompt == PromptRenderer(adapted.tokenizer, adapted.processor).text(messages)  # what Iris sent
    assert processor.apply_chat_template([{"role": "user", "content": "plain text"}], add_generation_prompt=True) \
        == "<|im_start|>user\nplain text<|im_end|>\n<|im_start|>assistant\n"  # string contents as before
    from PIL import Image

    picture = Image.open(tmp_path / "red.png").convert("RGB")
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "export")
    greedy = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": processor.tokenizer.pad_token_id}
    with torch.no_grad():
        standard = model.generate(**processor(images=picture, text=prompt, return_tensors="pt"), **greedy)
        with_picture = [{"role": "user", "content": [{"type": "image", "image": picture},
                                                     {"type": "text", "text": "What is this?"}]}]
        chat_inputs = processor.apply_chat_template(
            with_picture, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
        tokenized = model.generate(**chat_inputs, **greedy)
        expected = adapted.model.generate(**PromptRenderer(adapted.tokenizer, adapted.processor).encode(messages),
                                          **greedy)
    assert torch.equal(standard, expected) and torch.equal(tokenized, expected)


def _png(directory: Path) -> Path:
    from PIL import Image

    path = directory / "red.png"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(path)
    return path


def test_train_with_no_other_flag_trains_the_projector_under_the_dataset_name(tiny: dict[str, Path]) -> None:
    done = _invoke("train", tiny["data"], "--model", tiny["llava"], "--epochs", "4")
    assert done.exit_code == 0, done.output
    out = Paths.default().data / "adapters" / "shapes"
    assert f"wrote {out} (4 steps: projector 4, loss " in done.output  # 4 samples: one batch per epoch
    assert f"use it: iris ask -m {tiny['llava']} --adapter {out}" in done.output
    manifest = json.loads((out / "iris_manifest.json").read_text())
    assert manifest["kind"] == "projector" and manifest["training"]["system_prompt"] == \
        "You are a helpful AI assistant named Iris."
    assert [m["stage"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())] == \
        ["projector"] * 4
