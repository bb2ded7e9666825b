"""`iris train` on tiny in-process models: what each stage trains, the default chain (projector, then LoRA from
it), continuing from an earlier adapter, time budgets, QLoRA, loss going down, exact resume, feature caching,
progress you can watch, outputs that load, and a 2-process `accelerate launch` run."""

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
from assistant.errors import AdapterMismatch, BadDataset, BadSetting
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

    result = _run(tiny, tmp_path / "lora", stage="lora", steps=3)
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

    result = _run(tiny, tmp_path / "qlora", stage="lora", quant="4bit")
    layers = [m for n, m in result.model.named_modules() if n.endswith("self_attn.q_proj") and "language_model" in n]
    assert layers and all(isinstance(layer.base_layer, bnb.nn.Linear4bit) for layer in layers)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for n, m in result.model.named_modules() if "vision_tower" in n)
    assert all(".lora_" in n or ".modules_to_save." in n for n, p in result.model.named_parameters()
               if p.requires_grad)
    manifest = json.loads((result.out / "iris_manifest.json").read_text())
    assert manifest["quant"] == "4bit" and (result.out / "adapter_model.safetensors").is_file()


def test_loss_goes_down_on_a_repeated_tiny_dataset(tiny: dict[str, Path], tmp_path: Path) -> None:
    result = _run(tiny, tmp_path / "fit", data=tiny["small"], stage="lora", steps=30, lora_r=8, lora_alpha=16,
                  lr_lora=1e-2, lr_projector=1e-2, cache_features=True)
    losses = [m["loss"] for m in _metrics(result.out)]
    assert len(losses) == 30
    # The tiny random model's frozen lm_head keeps logits small, so the floor is high; still a clear drop (about
    # 0.24 measured with synth's yes/no answers naming what is seen):
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.2
    assert result.features_computed == 4  # one tower pass per distinct image over 15 epochs
    assert (result.out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cached_features_give_the_same_loss(tiny: dict[str, Path], tmp_path: Path) -> None:
    plain = _metrics(_run(tiny, tmp_path / "plain", cache_features=False, precision="fp32").out)
    cached = _metrics(_run(tiny, tmp_path / "cached", cache_features=True, precision="fp32").out)
    assert [m["loss"] for m in cached] == pytest.approx([m["loss"] for m in plain], rel=1e-5)


def test_mixed_datasets_train_together(tiny: dict[str, Path], tmp_path: Path) -> None:
    result = _run(tiny, tmp_path / "mixed", mix=(tiny["small"], tiny["small"]), steps=1)
    dataset = json.loads((result.out / "iris_manifest.json").read_text())["dataset"]
    assert dataset["samples"] == 16 + 4 + 4 and dataset["path"].count(str(tiny["small"])) == 2


def test_resume_continues_exactly(tiny: dict[str, Path], tmp_path: Path) -> None:
    options = {"stage": "chain", "steps": 4, "save_every": 2, "eval_split": 0.25, "lora_dropout": 0.3}
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
             ({"precision": "fp8"}, BadSetting, "--precision must be one of"),
             ({"mix": (tmp_path / "missing-mix",)}, BadDataset, "missing-mix"),
             ({"stage": "lora", "target_modules": ("qkv_linear",)}, BadSetting, "--target-modules qkv_linear")]
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
               "--batch-size", "2", "--grad-accum", "2", "--lora-r", "4", "--save-every", "3", "--eval-split", "0.25",
               "--stage", "lora"]
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


def test_default_stage_trains_the_projector_of_a_vision_model_and_lora_of_a_text_model(
        tiny: dict[str, Path], tmp_path: Path) -> None:
    vision = _run(tiny, tmp_path / "vision", steps=2)
    assert vision.stages == (("projector", 2),) and (vision.out / "projector.safetensors").is_file()
    assert not (vision.out / "adapter_config.json").exists()
    text = _run(tiny, tmp_path / "text", data=tiny["small"], model=str(tiny["llama"]), steps=2)
    assert text.stages == (("lora", 2),)


def test_chain_trains_the_projector_then_lora_from_it(tiny: dict[str, Path], tmp_path: Path) -> None:
    result = _run(tiny, tmp_path / "chain", stage="chain", steps=8)
    assert result.stages == (("projector", 2), ("lora", 6))
    records = [m for m in _metrics(result.out) if "loss" in m]
    assert [m["stage"] for m in records] == ["projector"] * 2 + ["lora"] * 6
    assert [m["step"] for m in records] == list(range(1, 9))
    manifest = json.loads((result.out / "iris_manifest.json").read_text())
    assert manifest["kind"] == "lora" and [s["stage"] for s in manifest["stages"]] == ["projector", "lora"]
    # the LoRA stage started from the projector stage's weights: the base's own copy under PEFT's wrapper holds
    # them (frozen in stage 2), and they differ from the untrained base's
    wrapper = result.model.get_base_model().model.multi_modal_projector
    stage_one = wrapper.original_module.linear_1.weight
    assert not torch.equal(stage_one, _base_state(tiny["llava"])["model.multi_modal_projector.linear_1.weight"])
    saved = load_file(str(result.out / "projector.safetensors"))
    assert torch.equal(saved["linear_1.weight"], wrapper.modules_to_save["default"].linear_1.weight)


def test_from_continues_an_earlier_projector_or_lora(tiny: dict[str, Path], tmp_path: Path) -> None:
    projector = _run(tiny, tmp_path / "p", stage="projector", steps=2).out
    # from a projector: only LoRA trains (auto skips the projector stage); with the projector frozen, the adapter
    # carries exactly the earlier projector
    continued = _run(tiny, tmp_path / "c", from_dir=projector, lr_projector=0.0, steps=2)
    assert continued.stages == (("lora", 2),)
    carried = load_file(str(continued.out / "projector.safetensors"))
    earlier = load_file(str(projector / "projector.safetensors"))
    assert carried.keys() == earlier.keys() and all(torch.equal(carried[k], earlier[k]) for k in earlier)
    manifest = json.loads((continued.out / "iris_manifest.json").read_text())
    assert manifest["from"]["kind"] == "projector" and manifest["from"]["steps"] == 2
    # from a LoRA: the same LoRA trains further
    again = _run(tiny, tmp_path / "again", from_dir=continued.out, steps=2, lr_lora=1e-2)
    before, after = (load_file(str(d / "adapter_model.safetensors")) for d in (continued.out, again.out))
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(AdapterMismatch, match="trained for base"):
        _run(tiny, tmp_path / "wrong", data=tiny["small"], model=str(tiny["llama"]), from_dir=projector)


def test_a_time_budget_plans_the_whole_schedule(tiny: dict[str, Path], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A fake clock (one second per reading) makes the run's speed known: the plan fits the budget and the learning
    rate still decays to its end (planned, not cut off)."""
    import itertools

    import adapters.train

    ticks = itertools.count()
    monkeypatch.setattr(adapters.train, "_clock", lambda: float(next(ticks)))
    result = _run(tiny, tmp_path / "budget", stage="chain", steps=None, max_minutes=1.0, lr_lora=1e-3,
                  lr_projector=2e-3)
    records = [m for m in _metrics(result.out) if "loss" in m]
    upper = adapters.train.MAX_EPOCHS * 8  # 16 samples at batch 2
    assert 8 <= result.steps < upper and len(records) == result.steps
    assert result.seconds <= 60
    stages = [name for name, _ in result.stages]
    assert stages == ["projector", "lora"]
    last = records[-1]
    assert last["lr_lora"] == pytest.approx(1e-3 * adapters.train.MIN_LR_FRACTION, rel=0.35)


def test_budget_scales_the_remaining_stages_together() -> None:
    from adapters.train import Budget, Phase

    clock = [0.0]
    budget = Budget(100.0, 0.0)
    import adapters.train

    original = adapters.train._clock
    adapters.train._clock = lambda: clock[0]
    try:
        phases = [Phase("projector", 100, 100, 1e-3, 1e-3), Phase("lora", 300, 300, 1e-3, 1e-3)]
        for _ in range(5):
            budget.record("projector", 1.0)
        clock[0] = 5.0
        budget.replan(phases, 0, 5)
        # 95 s left (minus a 5 s reserve); a LoRA step is estimated at 1.5 projector steps
        assert budget.cost("lora") == pytest.approx(1.5)
        needed = (phases[0].steps - 5) * 1.0 + phases[1].steps * 1.5
        assert 88 <= needed <= 90
        assert phases[0].steps / 100 == pytest.approx(phases[1].steps / 300, abs=0.02)  # the stages keep their shares
    finally:
        adapters.train._clock = original


def test_progress_lines_when_stderr_is_not_a_terminal_and_a_plot_at_every_save(
        tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    import adapters.train
    from adapters.report import TrainingProgress

    plots: list[int] = []
    plot = adapters.train.plot_loss
    monkeypatch.setattr(adapters.train, "plot_loss", lambda records, target: plots.append(len(records))
                        or plot(records, target))
    stream = io.StringIO()
    monkeypatch.setattr(adapters.train, "TrainingProgress",
                        lambda enabled, total, start=0: TrainingProgress(enabled, total, start, stream=stream))
    result = train(TrainOptions(data=tiny["data"], out=tmp_path / "watched", model=str(tiny["llava"]), steps=6,
                                stage="chain", save_every=2, **FAST))  # type: ignore[arg-type]
    assert len(plots) == 4 and plots == sorted(plots)  # at steps 2, 4 and 6, and at the end
    lines = stream.getvalue().splitlines()
    steps = [line for line in lines if " step " in f" {line}"]
    assert steps and steps[-1].startswith("lora step 6/6 (100%) loss ") and "samples/s ETA 0m00s" in steps[-1]
    assert any(line.startswith("stage 2/2: lora") for line in lines)
    assert (result.out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_loss_plot_uses_a_log_axis_and_marks_evals(tmp_path: Path) -> None:
    from PIL import Image

    from adapters.report import EVAL_COLOUR, TRAIN_COLOUR, plot_loss

    records = [{"step": 1, "loss": 100.0}, {"step": 2, "loss": 1.0}, {"step": 3, "loss": 0.01},
               {"step": 3, "eval_loss": 1.0}]
    image = Image.open(plot_loss(records, tmp_path / "loss.png")).convert("RGB")
    width, height = image.size
    middle = width // 2 + 8  # the plot area is offset by its left margin
    column = [y for y in range(height) if image.getpixel((middle, y)) == TRAIN_COLOUR]
    top, bottom = 56 // 2, height - 56
    assert column and abs(sum(column) / len(column) - (top + bottom) / 2) < 0.2 * (bottom - top)
    assert any(image.getpixel((x, y)) == EVAL_COLOUR for x in range(width - 40, width) for y in range(height))


def test_line_progress_prints_every_few_percent_or_seconds() -> None:
    import io

    from adapters.report import LineProgress

    now = [0.0]
    stream = io.StringIO()
    progress = LineProgress(stream, every_seconds=30, clock=lambda: now[0])
    for step in range(1, 201):
        now[0] += 0.1
        progress.update(step, 200, loss=1.0, lr=1e-3, rate=2.0, eta=10.0)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 20 and lines[-1] == "step 200/200 (100%) loss 1.0000 lr 1.00e-03 2.00 samples/s ETA 0m10s"
    now[0] += 100  # a slow step: a line after 30 s even before the next 5%
    progress.update(201, 400)
    assert stream.getvalue().splitlines()[-1] == "step 201/400 (50%)"
