"""`iris train` on tiny in-process models: what each stage trains, QLoRA, loss going down, exact resume,
feature caching, outputs that load, and a 2-process `accelerate launch` run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import save_tiny_llama, save_tiny_llava

from adapters.synth import synthesize
from adapters.train import TrainOptions, train
from assistant.config import GenerationOptions, ModelOptions, Paths
from assistant.engine import LocalBackend
from assistant.errors import BadDataset, BadSetting
from assistant.messages import Message, Role
from assistant.model import load

FAST = {"batch_size": 2, "lora_r": 4, "lora_alpha": 8}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("train")
    synthesize(root / "data", 16, seed=0)
    synthesize(root / "small", 4, seed=1)
    return {"llava": save_tiny_llava(root / "llava"), "llama": save_tiny_llama(root / "llama"),
            "data": root / "data", "small": root / "small"}


def _run(tiny: dict[str, Path], out: Path | None = None, **overrides: object) -> object:
    values = {"data": tiny["data"], "out": out, "model": str(tiny["llava"]), "steps": 2, **FAST, **overrides}
    return train(TrainOptions(**values), show_progress=False)  # type: ignore[arg-type]


def _base_state(model_dir: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(model_dir).state_dict()


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_projector_stage_changes_only_the_projector(tiny: dict[str, Path], tmp_path: Path) -> None:
    result = _run(tiny, tmp_path / "proj", stage="projector", steps=3)
    trained = {name: p for name, p in result.model.named_parameters()}
    assert {n for n, p in trained.items() if p.requires_grad} == {n for n in trained if "multi_modal_projector" in n}
    base = _base_state(tiny["llava"])
    changed = {name for name, tensor in base.items() if not torch.equal(tensor, trained[name].detach())}
    assert changed and all("multi_modal_projector" in name for name in changed)
    files = {p.name for p in result.out.iterdir()}
    assert {"projector.safetensors", "iris_manifest.json", "metrics.jsonl", "loss.png"} <= files
    assert "adapter_config.json" not in files
    saved = load_file(str(result.out / "projector.safetensors"))
    assert torch.equal(saved["linear_1.weight"], trained["model.multi_modal_projector.linear_1.weight"])
    # a projector-only output is a valid --adapter: it replaces the base's projector
    loaded = load(ModelOptions(model=str(tiny["llava"]), quant="none", adapters=(str(result.out),)), Paths.default())
    assert "projector proj" in loaded.name and loaded.adapters == {}
    assert torch.equal(loaded.model.model.multi_modal_projector.linear_1.weight, saved["linear_1.weight"])


def test_lora_stage_changes_only_lora_and_projector_and_loads_back(tiny: dict[str, Path], tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    result = _run(tiny, tmp_path / "lora", steps=3)
    trainable = [n for n, p in result.model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n or ".modules_to_save." in n for n in trainable)
    assert any("multi_modal_projector.modules_to_save" in n for n in trainable)
    assert not any("vision_tower" in n for n in trainable)
    assert all("language_model" in n for n in trainable if ".lora_" in n)  # not the CLIP tower's q/k/v
    base = _base_state(tiny["llava"])
    for name, parameter in result.model.named_parameters():
        if parameter.requires_grad:
            continue
        key = name.removeprefix("base_model.model.").replace(".base_layer", "").replace(".original_module", "")
        assert torch.equal(base[key], parameter.detach()), key
    lora_b = [p for n, p in result.model.named_parameters() if "lora_B" in n]
    assert any(bool(p.abs().sum() > 0) for p in lora_b)  # B starts at zero: it trained
    plain = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(tiny["llava"]), str(result.out))
    assert {n for n, _ in plain.named_parameters() if "lora_A" in n} == {n for n in trainable if "lora_A" in n}
    loaded = load(ModelOptions(model=str(tiny["llava"]), quant="none", adapters=(str(result.out),)), Paths.default())
    backend = LocalBackend(loaded)
    messages = [Message(Role.USER, "hi")]
    options = GenerationOptions(temperature=0, max_new_tokens=6)
    assert "".join(backend.stream(messages, options, adapter="lora")) is not None


def test_qlora_trains_and_keeps_the_base_4bit(tiny: dict[str, Path], tmp_path: Path) -> None:
    import bitsandbytes as bnb

    result = _run(tiny, tmp_path / "qlora", quant="4bit")
    layers = [m for n, m in result.model.named_modules() if n.endswith("self_attn.q_proj") and "language_model" in n]
    assert layers and all(isinstance(layer.base_layer, bnb.nn.Linear4bit) for layer in layers)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for n, m in result.model.named_modules() if "vision_tower" in n)
    assert all(".lora_" in n or ".modules_to_save." in n for n, p in result.model.named_parameters()
               if p.requires_grad)
    manifest = json.loads((result.out / "iris_manifest.json").read_text())
    assert manifest["quant"] == "4bit" and (result.out / "adapter_model.safetensors").is_file()


def test_loss_goes_down_on_a_repeated_tiny_dataset(tiny: dict[str, Path], tmp_path: Path) -> None:
    result = _run(tiny, tmp_path / "fit", data=tiny["small"], steps=30, lora_r=8, lora_alpha=16, lr_lora=1e-2,
                  lr_projector=1e-2, cache_features=True)
    losses = [m["loss"] for m in _metrics(result.out)]
    assert len(losses) == 30
    # The tiny random model's frozen lm_head keeps logits small, so the floor is high; still a clear drop:
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.25
    assert result.features_computed == 4  # one tower pass per distinct image over 15 epochs
    assert (result.out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cached_features_give_the_same_loss(tiny: dict[str, Path], tmp_path: Path) -> None:
    plain = _metrics(_run(tiny, tmp_path / "plain").out)
    cached = _metrics(_run(tiny, tmp_path / "cached", cache_features=True).out)
    assert [m["loss"] for m in cached] == pytest.approx([m["loss"] for m in plain], rel=1e-5)


def test_resume_continues_exactly(tiny: dict[str, Path], tmp_path: Path) -> None:
    options = {"steps": 4, "save_every": 2, "eval_split": 0.25, "lora_dropout": 0.3}
    straight = _run(tiny, tmp_path / "straight", **options).out
    resumed = tmp_path / "resumed"
    shutil.copytree(straight / "checkpoints" / "step-000002", resumed / "checkpoints" / "step-000002")
    lines = (straight / "metrics.jsonl").read_text().splitlines()
    (resumed / "metrics.jsonl").write_text("".join(line + "\n" for line in lines if json.loads(line)["step"] <= 2))
    _run(tiny, resumed, resume=True, **options)
    def without_speed(records: list[dict]) -> list[dict]:
        return [{k: v for k, v in record.items() if k != "samples_per_second"} for record in records]

    assert without_speed(_metrics(resumed)) == without_speed(_metrics(straight))  # losses bit-identical
    expected, actual = (load_file(str(d / "adapter_model.safetensors")) for d in (straight, resumed))
    assert expected.keys() == actual.keys() and all(torch.equal(expected[k], actual[k]) for k in expected)
    with pytest.raises(BadSetting, match="different settings.*lr_lora"):
        _run(tiny, resumed, resume=True, **{**options, "lr_lora": 1e-3})


def test_text_only_model_trains_lora_and_refuses_the_projector_stage(tiny: dict[str, Path], tmp_path: Path) -> None:
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "Say hi"},
                                             {"role": "assistant", "content": "Hi!"}]}) + "\n")
    result = _run(tiny, tmp_path / "text", data=data, model=str(tiny["llama"]), steps=None, epochs=3.0)
    assert result.steps == 3  # one batch per epoch
    config = json.loads((result.out / "adapter_config.json").read_text())
    assert set(config["target_modules"]) >= {"q_proj", "down_proj"} and not config["modules_to_save"]
    assert not (result.out / "projector.safetensors").exists()
    with pytest.raises(BadSetting, match="text-only"):
        _run(tiny, tmp_path / "text-proj", data=data, model=str(tiny["llama"]), stage="projector")


def test_bad_settings_and_data_are_one_line_errors(tiny: dict[str, Path], tmp_path: Path) -> None:
    used = tmp_path / "used"
    used.mkdir()
    (used / "x").write_text("x")
    corrupt = tmp_path / "corrupt"
    (corrupt / "checkpoints" / "step-000001").mkdir(parents=True)
    (corrupt / "checkpoints" / "step-000001" / "state.json").write_text('{"settings": [')
    cases = [({"out": corrupt, "resume": True}, BadSetting, "corrupt state.json"),
             ({"stage": "full"}, BadSetting, "--stage"), ({"steps": 2, "epochs": 1.0}, BadSetting, "not both"),
             ({"out": used}, BadSetting, "already exists"), ({"resume": True}, BadSetting, "no checkpoint"),
             ({"data": tmp_path / "missing.json"}, BadDataset, "no such file"),
             ({"eval_split": 0.99}, BadDataset, "no training samples"),
             ({"target_modules": ("qkv_linear",)}, BadSetting, "--target-modules qkv_linear")]
    for overrides, error, message in cases:
        with pytest.raises(error, match=message) as caught:
            _run(tiny, **{"out": tmp_path / "fresh", **overrides})
        assert "\n" not in str(caught.value)


def test_accelerate_launch_with_two_processes(tiny: dict[str, Path], tmp_path: Path) -> None:
    script = tmp_path / "iris_train.py"
    script.write_text("import typer\nfrom cli.train_cmd import train\ntyper.run(train)\n")
    out = tmp_path / "ddp"
    # On CPU, accelerate's multi-process launcher is torchrun ("--multi_gpu") plus ACCELERATE_USE_CPU (gloo).
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script),
               str(tiny["data"]), "--model", str(tiny["llava"]), "--out", str(out), "--steps", "3",
               "--batch-size", "2", "--grad-accum", "2", "--lora-r", "4", "--save-every", "3", "--eval-split", "0.25"]
    root = Path(__file__).resolve().parents[1]
    env = {"PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
           "ACCELERATE_USE_CPU": "1", "HOME": str(tmp_path)}
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("wrote ") == 1  # only the main process reports
    assert (out / "adapter_model.safetensors").is_file() and (out / "checkpoints" / "step-000003").is_dir()
    assert sorted(p.name for p in (out / "checkpoints" / "step-000003").glob("rng-*.pt")) == ["rng-0.pt", "rng-1.pt"]
    steps = [m for m in _metrics(out) if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3]
    assert json.loads((out / "checkpoints" / "step-000003" / "state.json").read_text())["world_size"] == 2
