"""``iris train``: fit the vision projector (stage ``projector``) or LoRA on the LLM plus the projector
(stage ``lora``, optionally on a 4-bit base: QLoRA), with ``accelerate`` so that the same code runs
on one CPU, one GPU or several processes under ``accelerate launch``.

The vision tower is always frozen, which is what makes ``cache_features`` valid: its output for an
image never changes, so it is computed once per image and reused. Loss is on assistant tokens only
(``PromptRenderer.training_example``). Outputs: see ``adapters.manifest``; checkpoints: see
``adapters.checkpoint``; metrics and the loss plot: see ``adapters.report``.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from adapters import checkpoint, manifest
from adapters.collate import Collator, EncodedDataset, EpochSampler, split_samples
from adapters.dataset import read_dataset
from adapters.features import FeatureCache, loss_module
from adapters.report import MetricsLog, plot_loss
from assistant import model as model_loading
from assistant.architecture import DEFAULT_LORA_MODULES, Architecture, describe_model
from assistant.builders.default_model import with_default_model
from assistant.config import ModelOptions, Paths
from assistant.errors import BadSetting, one_line
from assistant.prompt import PromptRenderer

STAGES = ("projector", "lora")
TRAIN_QUANTS = ("none", "4bit")
WARMUP_FRACTION = 0.05  # of the total steps, linear from 0; then cosine down to MIN_LR_FRACTION
MIN_LR_FRACTION = 0.1
MAX_GRAD_NORM = 1.0
# Settings that may change between a run and its --resume (everything else must stay the same).
RESUMABLE = ("out", "resume", "save_every")


@dataclass(frozen=True)
class TrainOptions:
    """Everything ``iris train`` takes; ``validate`` turns bad values into one-line ``BadSetting``s."""

    data: Path
    out: Path
    model: str | None = None
    stage: str = "lora"
    quant: str = "none"
    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 4
    grad_accum: int = 1
    lr_projector: float = 1e-3
    lr_lora: float = 2e-4
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] = DEFAULT_LORA_MODULES
    eval_split: float = 0.0
    seed: int = 0
    save_every: int = 0
    resume: bool = False
    cache_features: bool = False
    gradient_checkpointing: bool = False

    def validate(self) -> TrainOptions:
        checks = [
            (self.stage in STAGES, f"--stage must be one of {', '.join(STAGES)}, got {self.stage!r}"),
            (self.quant in TRAIN_QUANTS, f"--quant must be one of {', '.join(TRAIN_QUANTS)}, got {self.quant!r}"),
            (self.steps is None or self.epochs is None, "give --steps or --epochs, not both"),
            (self.steps is None or self.steps >= 1, "--steps must be >= 1"),
            (self.epochs is None or self.epochs > 0, "--epochs must be > 0"),
            (self.batch_size >= 1 and self.grad_accum >= 1, "--batch-size and --grad-accum must be >= 1"),
            (self.lr_projector >= 0 and self.lr_lora > 0, "--lr-lora must be > 0 and --lr-projector >= 0"),
            (self.stage == "lora" or self.lr_projector > 0, "--stage projector needs --lr-projector > 0"),
            (self.lora_r >= 1 and self.lora_alpha > 0, "--lora-r must be >= 1 and --lora-alpha > 0"),
            (0 <= self.lora_dropout < 1, "--lora-dropout must be in [0, 1)"),
            (bool(self.target_modules), "--target-modules needs at least one module name"),
            (0 <= self.eval_split < 1, "--eval-split must be in [0, 1)"),
            (self.save_every >= 0, "--save-every must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise BadSetting(message)
        return self

    def settings(self) -> dict[str, Any]:
        """The options as JSON values, without those a resume may change."""
        values = {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
                  for k, v in dataclasses.asdict(self).items()}
        return {k: v for k, v in values.items() if k not in RESUMABLE}


@dataclass(frozen=True)
class TrainResult:
    """What a run did; ``loss`` is the last step's, ``samples_per_second`` the mean over steps."""

    out: Path
    steps: int
    loss: float
    eval_loss: float | None
    samples_per_second: float
    seconds: float
    features_computed: int
    model: Any  # the trained model (PEFT-wrapped for the lora stage), for callers that keep using it


@dataclass
class _Base:
    model: Any
    tokenizer: Any
    processor: Any | None
    config: Any
    architecture: Architecture
    source: str
    name: str

    @property
    def vision(self) -> bool:
        return self.architecture.accepts_images


def load_base(options: TrainOptions, device: Any, paths: Paths) -> _Base:
    """The base in float32 (4-bit NF4 for QLoRA, what the contract keeps in full precision unquantized)."""
    import torch

    model_options = with_default_model(ModelOptions(model=options.model, quant=options.quant), paths)
    source, name = model_loading.resolve_source(model_options, paths)
    config = model_loading.read_config(source, name)
    architecture = model_loading.describe(config)
    architecture.require("training")
    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if options.quant == "4bit":
        kwargs["quantization_config"] = model_loading.quantization_config("4bit", device.type, architecture)
        kwargs["device_map"] = {"": device}
    model, tokenizer, processor = model_loading.from_pretrained(source, name, architecture, **kwargs)
    return _Base(model, tokenizer, processor, config, describe_model(model), source, name)


def make_trainable(base: _Base, options: TrainOptions) -> Any:
    """Freeze what does not train; wrap in PEFT LoRA for the lora stage. Returns the model to optimize."""
    model = base.model
    projector = base.architecture.projector
    train_projector = base.vision and options.lr_projector > 0
    if options.stage == "projector" and not base.vision:
        raise BadSetting(f"{base.name} is a text-only model: --stage projector needs a vision-language model")
    if options.quant == "4bit":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=options.gradient_checkpointing)
    elif options.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    model.requires_grad_(False)
    if options.stage == "projector":
        assert projector is not None
        model.get_submodule(projector).requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=options.lora_r, lora_alpha=options.lora_alpha, lora_dropout=options.lora_dropout,
                      target_modules=base.architecture.lora_targets(options.target_modules), task_type="CAUSAL_LM",
                      modules_to_save=[projector] if train_projector and projector else None)
    try:
        return get_peft_model(model, lora)
    except ValueError as exc:
        raise BadSetting(f"--target-modules {','.join(options.target_modules)}: {one_line(exc)}") from None


def param_groups(model: Any, options: TrainOptions, architecture: Architecture) -> list[dict[str, Any]]:
    """Separate learning rates: projector tensors (incl. PEFT's trainable copy) and LoRA tensors."""
    groups: dict[str, list[Any]] = {"projector": [], "lora": []}
    projector = f"{architecture.projector}." if architecture.projector else None
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            is_projector = projector is not None and projector in f"{name}."
            groups["projector" if is_projector else "lora"].append(parameter)
    lrs = {"projector": options.lr_projector, "lora": options.lr_lora}
    return [{"params": params, "lr": lrs[name], "name": name} for name, params in groups.items() if params]


def lr_schedule(total: int) -> Callable[[int], float]:
    """Linear warmup then cosine decay to ``MIN_LR_FRACTION`` of the peak."""
    warmup = max(1, round(total * WARMUP_FRACTION))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _check_out_dir(out: Path, resume: bool) -> Path | None:
    """The checkpoint to resume from; refuses to mix a new run into a used directory."""
    latest = checkpoint.latest_checkpoint(out)
    if resume:
        if latest is None:
            raise BadSetting(f"{out}: no checkpoint to resume (train with --save-every N to write some)")
        return latest
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BadSetting(f"{out}: already exists; pass --resume to continue it, or choose a new --out/--name")
    return None


def train(options: TrainOptions, paths: Paths | None = None, show_progress: bool = True) -> TrainResult:
    """Run a training job; every process of an ``accelerate launch`` calls this with the same options."""
    import torch
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    options.validate()
    paths = paths or Paths.default()
    accelerator = Accelerator()
    out = Path(options.out)
    resume_from = _check_out_dir(out, options.resume)
    accelerator.wait_for_everyone()  # every process has looked at ``out`` before the main one writes to it
    samples = read_dataset(Path(options.data))
    train_samples, eval_samples = split_samples(samples, options.eval_split, options.seed)
    random.seed(options.seed)
    torch.manual_seed(options.seed)
    base = load_base(options, accelerator.device, paths)
    model = make_trainable(base, options)
    renderer = PromptRenderer(base.tokenizer, base.processor)
    collate = Collator(base.tokenizer.pad_token_id, base.architecture)
    context = model_loading.context_length_of(base.config)
    train_set, eval_set = EncodedDataset(train_samples, renderer), EncodedDataset(eval_samples, renderer)
    train_set.check_lengths(context)
    eval_set.check_lengths(context)
    sampler = EpochSampler(len(train_set), options.seed)
    # Own generators: creating a loader iterator must not draw from the global RNG, or a resumed run's
    # dropout masks would differ from an uninterrupted run's.
    loader: Any = DataLoader(cast(Any, train_set), batch_size=options.batch_size, sampler=sampler, collate_fn=collate,
                        generator=torch.Generator().manual_seed(options.seed))
    cache = FeatureCache(model, base.architecture, options.cache_features)
    forward = loss_module(model, base.architecture)
    optimizer = torch.optim.AdamW(param_groups(model, options, base.architecture), weight_decay=0.0)
    forward, optimizer, loader = accelerator.prepare(forward, optimizer, loader)
    eval_loader = (accelerator.prepare(DataLoader(cast(Any, eval_set), batch_size=options.batch_size,
                                                  collate_fn=collate,
                                                  generator=torch.Generator().manual_seed(options.seed)))
                   if eval_samples else None)
    per_epoch = len(loader)
    total = options.steps or max(1, math.ceil((options.epochs or 1.0) * per_epoch / options.grad_accum))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer.optimizer, lr_schedule(total))
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    settings = {**options.settings(), "base_fingerprint": model_loading.base_fingerprint(base.config),
                "dataset_sha256": manifest.dataset_hash(samples)}
    start = 0
    if resume_from is not None:
        start = checkpoint.load_state(resume_from, settings=settings, trainable=trainable, optimizer=optimizer,
                                      scheduler=scheduler, accelerator=accelerator)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    metrics = MetricsLog(out / "metrics.jsonl", start) if accelerator.is_main_process else None
    writer = _OutputWriter(base, options, samples, len(train_samples), len(eval_samples), accelerator)

    def evaluate(step: int) -> float | None:
        if eval_loader is None:
            return None
        loss = _evaluate(forward, eval_loader, cache, accelerator)
        _train_mode(forward, base)
        if metrics is not None:
            metrics.write({"step": step, "eval_loss": loss})
        return loss

    _train_mode(forward, base)
    batches = _batches(accelerator, loader, sampler, start * options.grad_accum, per_epoch)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    started, loss_value, eval_loss, rates = time.perf_counter(), float("nan"), None, []
    with _progress(show_progress and accelerator.is_main_process) as progress:
        task = progress.add_task("training", total=total, completed=start, loss=float("nan"), lr=0.0)
        for step in range(start + 1, total + 1):
            step_started, loss_sum, rows = time.perf_counter(), torch.zeros((), device=accelerator.device), 0
            for micro in range(options.grad_accum):
                batch = cache.prepare(next(batches))
                rows += int(batch["input_ids"].shape[0])
                sync = accelerator.no_sync(forward) if micro < options.grad_accum - 1 else nullcontext()
                with sync:
                    loss = forward(**batch)
                    accelerator.backward(loss / options.grad_accum)
                loss_sum += loss.detach()
            accelerator.clip_grad_norm_(params, MAX_GRAD_NORM)
            lrs = {group["name"]: group["lr"] for group in optimizer.param_groups}
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss_value = accelerator.gather((loss_sum / options.grad_accum).reshape(1)).mean().item()
            rate = rows * accelerator.num_processes / (time.perf_counter() - step_started)
            rates.append(rate)
            if metrics is not None:
                metrics.write({"step": step, "loss": loss_value, "lr": next(iter(lrs.values())),
                               **{f"lr_{name}": lr for name, lr in lrs.items()}, "samples_per_second": rate})
            progress.update(task, advance=1, loss=loss_value, lr=next(iter(lrs.values())))
            if options.save_every and step % options.save_every == 0:
                eval_loss = evaluate(step)
                target = checkpoint.checkpoint_dir(out, step)
                writer.write(target, forward, step, _final_metrics(loss_value, eval_loss, rates))
                checkpoint.save_state(target, step=step, settings=settings, trainable=trainable,
                                      optimizer=optimizer, scheduler=scheduler, accelerator=accelerator)
    if eval_loader is not None and not (options.save_every and total % options.save_every == 0):
        eval_loss = evaluate(total)
    seconds = time.perf_counter() - started
    result = TrainResult(out, total, loss_value, eval_loss, sum(rates) / len(rates) if rates else 0.0, seconds,
                         cache.computed, accelerator.unwrap_model(forward).model)
    writer.write(out, forward, total, _final_metrics(loss_value, eval_loss, rates))
    if metrics is not None:
        plot_loss(metrics.records(), out / "loss.png")
    accelerator.wait_for_everyone()
    return result


def _final_metrics(loss: float, eval_loss: float | None, rates: list[float]) -> dict[str, Any]:
    values: dict[str, Any] = {"loss": loss, "samples_per_second": sum(rates) / len(rates) if rates else None}
    if eval_loss is not None:
        values["eval_loss"] = eval_loss
    return values


def _train_mode(forward: Any, base: _Base) -> None:
    """Train mode for dropout in LoRA/LLM; the frozen vision tower stays in eval mode."""
    forward.train()
    if base.architecture.vision_tower is not None:
        base.model.get_submodule(base.architecture.vision_tower).eval()


def _batches(accelerator: Any, loader: Any, sampler: EpochSampler, skip: int, per_epoch: int) -> Iterator[Any]:
    """Endless batches in (seed, epoch) order, starting ``skip`` micro-batches in (for a resume)."""
    epoch, offset = divmod(skip, per_epoch)
    while True:
        sampler.set_epoch(epoch)
        yield from (accelerator.skip_first_batches(loader, offset) if offset else loader)
        epoch, offset = epoch + 1, 0


def _evaluate(forward: Any, loader: Any, cache: FeatureCache, accelerator: Any) -> float:
    """Token-weighted mean loss over the held-out samples, summed over all processes."""
    import torch

    forward.eval()
    totals = torch.zeros(2, device=accelerator.device, dtype=torch.float64)
    with torch.no_grad():
        for batch in loader:
            batch = cache.prepare(batch)
            tokens = int((batch["labels"][:, 1:] != -100).sum())
            totals += torch.tensor([float(forward(**batch)) * tokens, tokens], device=accelerator.device,
                                   dtype=torch.float64)
    totals = accelerator.reduce(totals, reduction="sum")
    return float(totals[0] / max(totals[1], 1.0))


def _progress(enabled: bool) -> Any:
    """A rich progress bar with loss, learning rate and ETA on stderr."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("lr {task.fields[lr]:.2e}"),
                    TimeRemainingColumn(), console=Console(stderr=True), disable=not enabled)


class _OutputWriter:
    """Writes the adapter directory (PEFT files, projector, manifest) from the main process."""

    def __init__(self, base: _Base, options: TrainOptions, samples: list[Any], n_train: int, n_eval: int,
                 accelerator: Any) -> None:
        self.base, self.options, self.accelerator = base, options, accelerator
        self._static: dict[str, Any] | None = None
        self._dataset = {"path": str(options.data), "sha256": manifest.dataset_hash(samples),
                         "samples": len(samples), "train": n_train, "eval": n_eval}

    def write(self, directory: Path, forward: Any, step: int, metrics: dict[str, Any]) -> None:
        if self.accelerator.is_main_process:
            directory.mkdir(parents=True, exist_ok=True)
            model = self.accelerator.unwrap_model(forward).model
            if self.options.stage == "lora":
                model.save_pretrained(str(directory))
            shapes = (manifest.save_projector(model, self.base.architecture.projector, directory)
                      if self.trains_projector else None)
            record = {**self.static(), "steps": step, "metrics": metrics,
                      "created": datetime.now(UTC).isoformat(timespec="seconds")}
            if shapes is not None:
                record["projector"]["shapes"] = shapes
            manifest.write_manifest(directory, record)
        self.accelerator.wait_for_everyone()

    @property
    def trains_projector(self) -> bool:
        return self.base.vision and self.options.lr_projector > 0

    def static(self) -> dict[str, Any]:
        """The manifest fields that do not change during a run (weights are hashed once, on first save)."""
        if self._static is None:
            base, options = self.base, self.options
            vision = getattr(base.config, "vision_config", None)
            projector = base.architecture.projector
            self._static = {
                "format": manifest.MANIFEST_FORMAT, "kind": options.stage, "base_model": base.name,
                "family": base.architecture.family,
                "base_model_path": options.model, "base_fingerprint": model_loading.base_fingerprint(base.config),
                "base_config_sha256": manifest.config_hash(base.config),
                "base_weights_sha256": manifest.weights_hash(Path(base.source)), "quant": options.quant,
                "vision_tower": {key: getattr(vision, key, None) for key in
                                 ("model_type", "hidden_size", "num_hidden_layers", "image_size", "patch_size")}
                if vision is not None else None,
                "image_size": _input_size(base.processor) or getattr(vision, "image_size", None),
                "projector": {"module": projector, "in_adapter": options.stage == "lora"}
                if projector is not None and self.trains_projector else None,
                "chat_template_sha256": manifest.template_hash(base.tokenizer, base.processor),
                "dataset": self._dataset, "training": options.settings(),
            }
        return {key: (dict(value) if isinstance(value, dict) else value) for key, value in self._static.items()}


def _input_size(processor: Any) -> int | None:
    """The square size images reach the tower at, from the image processor (a tower's config keeps its native
    size, e.g. DINOv2's 518, whatever the composed model uses)."""
    image_processor = getattr(processor, "image_processor", None)
    size = getattr(image_processor, "crop_size" if getattr(image_processor, "do_center_crop", False) else "size", None)
    for key in ("height", "shortest_edge"):
        value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
        if isinstance(value, int):
            return value
    return None
