"""``iris train``: fit the vision projector (stage ``projector``), LoRA on the LLM plus the projector (stage
``lora``, optionally on a 4-bit base: QLoRA), or both in turn (stage ``chain``: the projector alone first, then
LoRA starting from it); stage ``auto``, the default, picks (see ``plan_phases``). ``accelerate`` runs the same code
on one CPU, one GPU or several processes under ``accelerate launch``; forwards run under bf16 autocast where the
device computes bf16 natively (``precision``).

What a user leaves out comes from the recipe below (``plan_phases``), measured on small real-image tasks
(``bench/own_task.py``): learning rates and length from the dataset size, image features cached, and with
``max_minutes`` the schedule planned for the time budget from the samples/s measured after a few steps and
replanned as the run goes (a shared machine's speed drifts), so that the learning rate still decays to its end
inside the budget rather than being cut off. ``from_dir`` starts from an earlier output (its projector, or its
LoRA trained further).

The vision tower is always frozen, which is what makes ``cache_features`` valid: its output for an image never
changes, so it is computed once per image and reused. Loss is on assistant tokens only
(``PromptRenderer.training_example``); a ``system_prompt`` is put before samples that have none, so the
adapter learns under the prompt it will be served with. Outputs: see ``adapters.manifest``; checkpoints: see
``adapters.checkpoint``; metrics, the loss plot and progress lines: see ``adapters.report``.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from adapters import checkpoint, manifest
from adapters.collate import Collator, EncodedDataset, EpochSampler, split_samples
from adapters.dataset import Sample, read_dataset
from adapters.features import FeatureCache, loss_module
from adapters.report import MetricsLog, TrainingProgress, format_duration, plot_loss
from assistant import model as model_loading
from assistant.adapter_files import CONFIG_FILE, check_adapter_dir, load_projector, read_manifest
from assistant.architecture import DEFAULT_LORA_MODULES, Architecture, describe_model
from assistant.builders.default_model import with_default_model
from assistant.config import ModelOptions, Paths
from assistant.errors import BadSetting, one_line
from assistant.messages import Message, Role
from assistant.prompt import PromptRenderer

STAGES = ("auto", "projector", "lora", "chain")
TRAIN_QUANTS = ("none", "4bit")
PRECISIONS = ("auto", "fp32", "bf16")
WARMUP_FRACTION = 0.05  # of a phase's steps, linear from 0; then cosine down to MIN_LR_FRACTION
MIN_LR_FRACTION = 0.1
MAX_GRAD_NORM = 1.0
# Settings that may change between a run and its --resume (everything else must stay the same).
RESUMABLE = ("out", "resume", "save_every")

# The recipe for what the user leaves out (bench/own_task.py measures it; the README quotes the runs).
# Stage auto trains the projector alone for a vision model: on the digits task (bench/own_task.py, 6 minutes) it
# reached 70% held out where projector-then-LoRA reached 36%, at 1.6x the samples/s, and it leaves the LLM's text
# answers exactly as they were.
PROJECTOR_SHARE = 0.25  # stage chain: this share of the steps trains the projector alone before LoRA joins
TARGET_SAMPLES = 3000  # default length: about this many samples seen, in whole epochs within the bounds below
MIN_EPOCHS, MAX_EPOCHS = 1, 10
LR_PROJECTOR = 2e-3
LR_LORA = 2e-4  # at 1e-3 the loss rose when LoRA joined the projector (digits); LLaVA's LoRA rate
LR_REFERENCE_SAMPLES = 5000  # above this many training samples, learning rates shrink as 1/sqrt(size)
# Time budgets: plan after this many steps of a phase (the first one, which allocates and caches, not counted),
# then replan every REPLAN_SHARE of its steps; a LoRA step costs about LORA_COST projector steps until measured.
PLAN_AFTER = 3
REPLAN_SHARE = 0.1
LORA_COST = 1.5
RESERVE_SECONDS = 15.0  # kept for writing the outputs at the end of a budgeted run (at most 5% of the budget)
_clock = time.perf_counter  # the one clock for step times and budgets (tests replace it)


@dataclass(frozen=True)
class TrainOptions:
    """Everything ``iris train`` takes; ``validate`` turns bad values into one-line ``BadSetting``s. ``None``
    means "the recipe's choice" (see ``plan_phases``)."""

    data: Path
    out: Path
    model: str | None = None
    stage: str = "auto"
    quant: str = "none"
    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 8
    grad_accum: int = 1
    lr_projector: float | None = None
    lr_lora: float | None = None
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] = DEFAULT_LORA_MODULES
    eval_split: float = 0.0
    seed: int = 0
    save_every: int = 0
    resume: bool = False
    cache_features: bool = True
    gradient_checkpointing: bool = False
    from_dir: Path | None = None
    max_minutes: float | None = None
    system_prompt: str | None = None
    precision: str = "auto"
    mix: tuple[Path, ...] = ()  # more datasets trained together with ``data`` (e.g. text that keeps the base's answers)

    def validate(self) -> TrainOptions:
        checks = [
            (self.stage in STAGES, f"--stage must be one of {', '.join(STAGES)}, got {self.stage!r}"),
            (self.quant in TRAIN_QUANTS, f"--quant must be one of {', '.join(TRAIN_QUANTS)}, got {self.quant!r}"),
            (self.precision in PRECISIONS,
             f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"),
            (self.steps is None or self.epochs is None, "give --steps or --epochs, not both"),
            (self.steps is None or self.steps >= 1, "--steps must be >= 1"),
            (self.epochs is None or self.epochs > 0, "--epochs must be > 0"),
            (self.batch_size >= 1 and self.grad_accum >= 1, "--batch-size and --grad-accum must be >= 1"),
            ((self.lr_projector is None or self.lr_projector >= 0) and (self.lr_lora is None or self.lr_lora > 0),
             "--lr-lora must be > 0 and --lr-projector >= 0"),
            (self.stage != "projector" or self.lr_projector != 0, "--stage projector needs --lr-projector > 0"),
            (self.lora_r >= 1 and self.lora_alpha > 0, "--lora-r must be >= 1 and --lora-alpha > 0"),
            (0 <= self.lora_dropout < 1, "--lora-dropout must be in [0, 1)"),
            (bool(self.target_modules), "--target-modules needs at least one module name"),
            (0 <= self.eval_split < 1, "--eval-split must be in [0, 1)"),
            (self.save_every >= 0, "--save-every must be >= 0"),
            (self.max_minutes is None or (math.isfinite(self.max_minutes) and self.max_minutes > 0),
             "--max-minutes must be > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise BadSetting(message)
        return self

    def settings(self) -> dict[str, Any]:
        """The options as JSON values, without those a resume may change."""
        values = {k: (str(v) if isinstance(v, Path) else [str(item) for item in v] if isinstance(v, tuple) else v)
                  for k, v in dataclasses.asdict(self).items()}
        return {k: v for k, v in values.items() if k not in RESUMABLE}


@dataclass
class Phase:
    """One stage of a run. ``steps`` is the plan (a time budget may shorten it, never past ``max_steps``)."""

    stage: str
    steps: int
    max_steps: int
    lr_projector: float
    lr_lora: float


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
    model: Any  # the trained model (PEFT-wrapped after a lora stage), for callers that keep using it
    stages: tuple[tuple[str, int], ...] = ()  # (stage, steps) in the order they ran


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


# the recipe ---------------------------------------------------------------------------------------------------


def default_epochs(samples: int) -> float:
    """Whole epochs that see about ``TARGET_SAMPLES`` samples: small datasets are repeated more."""
    return float(min(MAX_EPOCHS, max(MIN_EPOCHS, round(TARGET_SAMPLES / max(samples, 1)))))


def default_learning_rates(samples: int) -> tuple[float, float]:
    """(projector, LoRA) learning rates: the measured ones, shrinking as 1/sqrt(size) for large datasets (which
    take many more steps, where a smaller rate ends lower)."""
    scale = min(1.0, math.sqrt(LR_REFERENCE_SAMPLES / max(samples, 1)))
    return LR_PROJECTOR * scale, LR_LORA * scale


def plan_phases(options: TrainOptions, samples: int, steps_per_epoch: int, *, vision: bool,
                from_kind: str | None = None) -> list[Phase]:
    """The stages to run and their steps and learning rates, for ``samples`` training samples.

    Length: ``steps`` or ``epochs`` if given, else ``default_epochs``; with a time budget and neither given,
    up to ``MAX_EPOCHS`` (the budget then decides). Stage ``auto``: the projector alone for a vision model
    (it learns to say what the image holds in embeddings the frozen LLM already reads), unless continuing a LoRA;
    LoRA for a text-only model. Stage ``chain``: for a vision model not continuing an earlier adapter,
    ``PROJECTOR_SHARE`` of the steps trains the projector alone before LoRA and the projector train together.
    """
    per_epoch = max(1, math.ceil(steps_per_epoch / options.grad_accum))
    epochs = options.epochs or (float(MAX_EPOCHS) if options.max_minutes else default_epochs(samples))
    total = options.steps or max(1, math.ceil(epochs * per_epoch))
    lr_projector, lr_lora = default_learning_rates(samples)
    lr_projector = lr_projector if options.lr_projector is None else options.lr_projector
    lr_lora = lr_lora if options.lr_lora is None else options.lr_lora
    if not vision:
        if options.stage == "projector":
            raise BadSetting("a text-only model has no projector: --stage projector needs a vision-language model")
        lr_projector = 0.0
    stage = options.stage
    if stage == "auto":
        stage = "projector" if vision and from_kind != "lora" and lr_projector > 0 else "lora"
    if stage == "chain":
        first = round(total * PROJECTOR_SHARE) if vision and from_kind is None and lr_projector > 0 else 0
        phases = [("projector", first), ("lora", total - first)] if first and total - first else [("lora", total)]
    else:
        phases = [(stage, total)]
    return [Phase(name, steps, steps, lr_projector, lr_lora) for name, steps in phases]


class Budget:
    """Fits the remaining phases into ``seconds`` from ``started``: step counts scale down together (never below
    what is done, never above each phase's ``max_steps``) by the seconds per step measured in each stage."""

    def __init__(self, seconds: float | None, started: float, spent: float = 0.0) -> None:
        self.seconds = seconds
        self.started = started - spent  # a resumed run has already used ``spent`` of the budget
        self.durations: dict[str, list[float]] = {}

    def record(self, stage: str, seconds: float) -> None:
        self.durations.setdefault(stage, []).append(seconds)

    def elapsed(self) -> float:
        return _clock() - self.started

    def due(self, phase: Phase, done: int) -> bool:
        """Whether to (re)plan now: after ``PLAN_AFTER`` measured steps of a phase, then every ``REPLAN_SHARE``."""
        if self.seconds is None or done < PLAN_AFTER + 1:
            return False
        every = max(PLAN_AFTER, round(phase.steps * REPLAN_SHARE))
        return done == PLAN_AFTER + 1 or (done - PLAN_AFTER - 1) % every == 0

    def cost(self, stage: str) -> float | None:
        """Seconds per step of ``stage``: measured (the first step left out), else derived from the other stage."""
        measured = self.durations.get(stage, [])[1:]
        if measured:
            return sum(measured) / len(measured)
        other = "projector" if stage == "lora" else "lora"
        known = self.durations.get(other, [])[1:]
        if not known:
            return None
        mean = sum(known) / len(known)
        return mean * LORA_COST if stage == "lora" else mean / LORA_COST

    def replan(self, phases: Sequence[Phase], current: int, done: int) -> None:
        """Scale phase ``current`` (``done`` of its steps run) and the phases after it by one factor of their
        ``max_steps``, the one whose remaining steps fill the time left: the stages keep their shares of the run."""
        assert self.seconds is not None
        remaining = self.seconds - self.elapsed() - min(RESERVE_SECONDS, self.seconds * 0.05)
        costs = [self.cost(phase.stage) or 0.0 for phase in phases[current:]]
        full = sum(phase.max_steps * cost for phase, cost in zip(phases[current:], costs, strict=True))
        if full <= 0:
            return
        factor = min(1.0, max(0.0, remaining + done * costs[0]) / full)
        for offset, phase in enumerate(phases[current:]):
            planned = math.floor(phase.max_steps * factor)
            phase.steps = max(done + 1, planned) if offset == 0 else max(1, planned)

    def describe(self, phases: Sequence[Phase], current: int, batch: int) -> str:
        parts = [f"{phase.stage} {phase.steps} steps" for phase in phases[current:]]
        cost = self.cost(phases[current].stage)
        rate = f" at {batch / cost:.2f} samples/s" if cost else ""
        assert self.seconds is not None
        return (f"time budget {format_duration(self.seconds)}: {', '.join(parts)}{rate}, "
                f"{format_duration(self.seconds - self.elapsed())} left")


def lr_schedule(total: int) -> Callable[[int], float]:
    """Linear warmup then cosine decay to ``MIN_LR_FRACTION`` of the peak, reached at the last of ``total`` steps."""
    warmup = max(1, round(total * WARMUP_FRACTION))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - 1 - warmup))
        return MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def bf16_supported(device: Any) -> bool:
    """Whether ``device`` computes in bfloat16 natively (a CUDA GPU that says so; a CPU with AVX512-BF16 or AMX):
    elsewhere bf16 is emulated and slower than fp32."""
    import torch

    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        cpu = torch.cpu
        return any(bool(getattr(cpu, probe, lambda: False)()) for probe in
                   ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return False


def compute_precision(precision: str, device: Any) -> str:
    """``auto`` → bf16 where the device has it natively (1.2–1.6× the fp32 step rate measured on this project's
    AVX512-BF16 CPU), else fp32. Weights, gradients and the optimizer stay fp32 either way (autocast)."""
    if precision == "bf16" and not bf16_supported(device):
        raise BadSetting(f"--precision bf16: this {device.type} has no native bfloat16; use --precision fp32")
    if precision == "auto":
        return "bf16" if bf16_supported(device) else "fp32"
    return precision


def autocast(device: Any, precision: str) -> Any:
    """The context a forward runs in: bf16 autocast, or nothing for fp32."""
    import torch

    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


# the model ----------------------------------------------------------------------------------------------------


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


def prepare_base(base: _Base, options: TrainOptions) -> None:
    """Once per run, before any stage: k-bit preparation for QLoRA, gradient checkpointing, all frozen."""
    if options.quant == "4bit":
        from peft import prepare_model_for_kbit_training

        base.model = prepare_model_for_kbit_training(base.model,
                                                     use_gradient_checkpointing=options.gradient_checkpointing)
    elif options.gradient_checkpointing:
        base.model.gradient_checkpointing_enable()
        base.model.enable_input_require_grads()
    base.model.requires_grad_(False)


def from_kind(from_dir: Path | None, base: _Base) -> str | None:
    """What ``from_dir`` holds ("lora" or "projector"), checked against the base; None without one."""
    if from_dir is None:
        return None
    config = check_adapter_dir(Path(from_dir).expanduser(), model_loading.base_fingerprint(base.config))
    return "lora" if config else "projector"


def make_trainable(base: _Base, options: TrainOptions, stage: str, lr_projector: float,
                   from_dir: Path | None = None, keep_projector: bool = False) -> Any:
    """The model to optimize in ``stage``: the base with only its projector trainable, or PEFT LoRA around the
    base (a new LoRA, or ``from_dir``'s trained further) with the projector in ``modules_to_save`` when it trains
    or when ``keep_projector`` (it was trained before this stage, so the adapter must carry it)."""
    projector = base.architecture.projector
    if stage == "projector" and not base.vision:
        raise BadSetting(f"{base.name} is a text-only model: --stage projector needs a vision-language model")
    model = base.model
    if stage == "projector":
        assert projector is not None
        model.get_submodule(projector).requires_grad_(True)
        return model
    from peft import LoraConfig, PeftModel, get_peft_model

    model.requires_grad_(False)  # a projector stage before this one left the projector trainable
    if from_dir is not None and (Path(from_dir).expanduser() / CONFIG_FILE).is_file():
        try:
            return PeftModel.from_pretrained(model, str(Path(from_dir).expanduser()), is_trainable=True)
        except (RuntimeError, ValueError, KeyError, OSError) as exc:
            raise BadSetting(f"--from {from_dir}: cannot continue this adapter ({one_line(exc)})") from None
    train_projector = base.vision and (lr_projector > 0 or keep_projector)
    lora = LoraConfig(r=options.lora_r, lora_alpha=options.lora_alpha, lora_dropout=options.lora_dropout,
                      target_modules=base.architecture.lora_targets(options.target_modules), task_type="CAUSAL_LM",
                      modules_to_save=[projector] if train_projector and projector else None)
    try:
        return get_peft_model(model, lora)
    except ValueError as exc:
        raise BadSetting(f"--target-modules {','.join(options.target_modules)}: {one_line(exc)}") from None


def param_groups(model: Any, phase: Phase, architecture: Architecture) -> list[dict[str, Any]]:
    """Separate learning rates: projector tensors (incl. PEFT's trainable copy) and LoRA tensors."""
    groups: dict[str, list[Any]] = {"projector": [], "lora": []}
    projector = f"{architecture.projector}." if architecture.projector else None
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            is_projector = projector is not None and projector in f"{name}."
            groups["projector" if is_projector else "lora"].append(parameter)
    lrs = {"projector": phase.lr_projector, "lora": phase.lr_lora}
    return [{"params": params, "lr": lrs[name], "name": name} for name, params in groups.items() if params]


def with_system_prompt(samples: Sequence[Sample], system_prompt: str | None) -> list[Sample]:
    """Samples with ``system_prompt`` first where they have no system turn of their own."""
    if not system_prompt:
        return list(samples)
    return [sample if sample.messages[0].role is Role.SYSTEM else
            Sample((Message(Role.SYSTEM, system_prompt), *sample.messages), sample.source) for sample in samples]


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


# the run ------------------------------------------------------------------------------------------------------


@dataclass
class _Run:
    """What every phase of one run shares."""

    options: TrainOptions
    accelerator: Any
    base: _Base
    loader: Any
    eval_loader: Any
    sampler: EpochSampler
    cache: FeatureCache
    metrics: MetricsLog | None
    writer: _OutputWriter
    budget: Budget
    settings: dict[str, Any]
    phases: list[Phase]
    progress: TrainingProgress
    precision: str
    rates: list[float] = field(default_factory=list)
    loss: float = float("nan")
    eval_loss: float | None = None
    batches: Iterator[Any] | None = None

    @property
    def total(self) -> int:
        return sum(phase.steps for phase in self.phases)


def train(options: TrainOptions, paths: Paths | None = None, show_progress: bool = True) -> TrainResult:
    """Run a training job; every process of an ``accelerate launch`` calls this with the same options."""
    import torch
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    started = _clock()
    options.validate()
    paths = paths or Paths.default()
    accelerator = Accelerator()
    precision = compute_precision(options.precision, accelerator.device)
    out = Path(options.out)
    resume_from = _check_out_dir(out, options.resume)
    state = checkpoint.read_state(resume_from) if resume_from is not None else None
    accelerator.wait_for_everyone()  # every process has looked at ``out`` before the main one writes to it
    samples = [sample for path in (options.data, *options.mix) for sample in read_dataset(Path(path))]
    train_samples, eval_samples = split_samples(with_system_prompt(samples, options.system_prompt),
                                                options.eval_split, options.seed)
    random.seed(options.seed)
    torch.manual_seed(options.seed)
    base = load_base(options, accelerator.device, paths)
    kind = from_kind(options.from_dir, base)
    prepare_base(base, options)
    if kind == "projector":
        assert options.from_dir is not None
        load_projector(base.model, base.architecture.projector, Path(options.from_dir).expanduser())
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
    loader = accelerator.prepare(loader)
    eval_loader = (accelerator.prepare(DataLoader(cast(Any, eval_set), batch_size=options.batch_size,
                                                  collate_fn=collate,
                                                  generator=torch.Generator().manual_seed(options.seed)))
                   if eval_samples else None)
    phases = plan_phases(options, len(train_samples), len(loader), vision=base.vision, from_kind=kind)
    settings = {**options.settings(), "base_fingerprint": model_loading.base_fingerprint(base.config),
                "dataset_sha256": manifest.dataset_hash(samples)}
    start_phase, start_step, spent = 0, 0, 0.0
    if state is not None:
        start_phase, start_step, spent = _restore_plan(state, phases)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    metrics = MetricsLog(out / "metrics.jsonl", state["step"] if state else 0) if accelerator.is_main_process \
        else None
    writer = _OutputWriter(base, options, samples, len(train_samples), len(eval_samples), accelerator, kind)
    progress = TrainingProgress(show_progress and accelerator.is_main_process, sum(p.steps for p in phases))
    run = _Run(options, accelerator, base, loader, eval_loader, sampler, FeatureCache(base.model, base.architecture,
               options.cache_features), metrics, writer, Budget(options.max_minutes and options.max_minutes * 60,
                                                                started, spent),
               settings, phases, progress, precision)
    forward: Any = None
    with progress:
        for index in range(start_phase, len(phases)):
            forward = _run_phase(run, index, start_step if index == start_phase else 0, resume_from
                                 if index == start_phase else None)
    total = run.total
    if eval_loader is not None and not (options.save_every and total % options.save_every == 0):
        run.eval_loss = _evaluate_now(run, forward, total)
    result = TrainResult(out, total, run.loss, run.eval_loss, sum(run.rates) / len(run.rates) if run.rates else 0.0,
                         _clock() - started, run.cache.computed, accelerator.unwrap_model(forward).model,
                         tuple((phase.stage, phase.steps) for phase in phases))
    writer.write(out, forward, phases[-1].stage, total, _final_metrics(run), phases)
    if metrics is not None:
        plot_loss(metrics.records(), out / "loss.png")
    accelerator.wait_for_everyone()
    return result


def _restore_plan(state: dict[str, Any], phases: list[Phase]) -> tuple[int, int, float]:
    """(phase index, steps done in it, budget seconds spent) from a checkpoint, with its planned step counts."""
    plan = state.get("plan")
    if not isinstance(plan, list) or len(plan) != len(phases) or not all(isinstance(n, int) for n in plan):
        raise BadSetting("the checkpoint's stage plan does not match these settings; train again without --resume")
    for phase, steps in zip(phases, plan, strict=True):
        phase.steps = steps
    phase_index = int(state.get("phase", 0))
    before = sum(phase.steps for phase in phases[:phase_index])
    return phase_index, int(state["step"]) - before, float(state.get("elapsed", 0.0))


def _run_phase(run: _Run, index: int, done: int, resume_from: Path | None) -> Any:
    """Train phase ``index`` from its step ``done`` (a resume) to its planned end; returns the prepared forward."""
    import torch

    options, accelerator, base, phase = run.options, run.accelerator, run.base, run.phases[index]
    keep_projector = run.writer.from_kind == "projector" or any(p.stage == "projector" for p in run.phases[:index])
    model = make_trainable(base, options, phase.stage, phase.lr_projector,
                           options.from_dir if phase.stage == "lora" else None, keep_projector)
    run.cache.base = model.get_base_model() if hasattr(model, "get_base_model") else model
    forward = loss_module(model, base.architecture)
    optimizer = torch.optim.AdamW(param_groups(model, phase, base.architecture), weight_decay=0.0)
    forward, optimizer = accelerator.prepare(forward, optimizer)
    schedule_total = [phase.steps]
    factor = lr_schedule(phase.steps)

    def scheduled(step: int) -> float:  # the cosine follows the plan when a time budget changes it
        nonlocal factor
        if schedule_total[0] != phase.steps:
            schedule_total[0], factor = phase.steps, lr_schedule(phase.steps)
        return factor(step)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer.optimizer, scheduled)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    offset = sum(p.steps for p in run.phases[:index])
    if resume_from is not None:
        checkpoint.load_state(resume_from, settings=run.settings, trainable=trainable, optimizer=optimizer,
                              scheduler=scheduler, accelerator=accelerator)
    if run.batches is None:
        run.batches = _batches(accelerator, run.loader, run.sampler, (offset + done) * options.grad_accum,
                               len(run.loader))
    _train_mode(forward, base)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if len(run.phases) > 1:
        run.progress.note(f"stage {index + 1}/{len(run.phases)}: {phase.stage} ({phase.steps} steps)")
    step, last = done, _clock()
    while step < phase.steps:
        step += 1
        step_started, loss_sum, rows = _clock(), torch.zeros((), device=accelerator.device), 0
        for micro in range(options.grad_accum):
            batch = run.cache.prepare(next(run.batches))
            rows += int(batch["input_ids"].shape[0])
            sync = accelerator.no_sync(forward) if micro < options.grad_accum - 1 else nullcontext()
            with sync, autocast(accelerator.device, run.precision):
                loss = forward(**batch)
                accelerator.backward(loss / options.grad_accum)
            loss_sum += loss.detach()
        accelerator.clip_grad_norm_(params, MAX_GRAD_NORM)
        lrs = {group["name"]: group["lr"] for group in optimizer.param_groups}
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        run.loss = accelerator.gather((loss_sum / options.grad_accum).reshape(1)).mean().item()
        ended = _clock()
        rate = rows * accelerator.num_processes / max(ended - step_started, 1e-9)
        run.rates.append(rate)
        # From the previous step's end: checkpoints, evaluations and logging are part of what a step costs.
        step_seconds, last = ended - last, ended
        run.budget.record(phase.stage, _agreed(accelerator, step_seconds))
        if run.budget.due(phase, step):
            run.budget.replan(run.phases, index, step)
            if step == PLAN_AFTER + 1:
                run.progress.note(run.budget.describe(run.phases, index, options.batch_size * options.grad_accum
                                                      * accelerator.num_processes))
        global_step = offset + step
        lr = lrs.get(phase.stage, next(iter(lrs.values())))  # the stage's own rate (LoRA's in the lora stage)
        if run.metrics is not None:
            run.metrics.write({"step": global_step, "stage": phase.stage, "loss": run.loss, "lr": lr,
                               **{f"lr_{name}": value for name, value in lrs.items()}, "samples_per_second": rate})
        eta = sum((later.steps - (step if later is phase else 0)) * (run.budget.cost(later.stage) or step_seconds)
                  for later in run.phases[index:])
        run.progress.update(global_step, total=run.total, loss=run.loss, lr=lr, rate=rate, eta=eta,
                            stage=phase.stage)
        if options.save_every and global_step % options.save_every == 0:
            _save_checkpoint(run, forward, optimizer, scheduler, trainable, index, global_step)
    return forward


def _agreed(accelerator: Any, seconds: float) -> float:
    """The slowest process's step time, so every process plans the same schedule under a time budget."""
    if accelerator.num_processes == 1:
        return seconds
    import torch

    return float(accelerator.reduce(torch.tensor([seconds], device=accelerator.device), reduction="max")[0])


def _save_checkpoint(run: _Run, forward: Any, optimizer: Any, scheduler: Any, trainable: dict[str, Any],
                     index: int, step: int) -> None:
    run.eval_loss = _evaluate_now(run, forward, step)
    target = checkpoint.checkpoint_dir(Path(run.options.out), step)
    run.writer.write(target, forward, run.phases[index].stage, step, _final_metrics(run), run.phases[:index + 1])
    checkpoint.save_state(target, step=step, settings=run.settings, trainable=trainable, optimizer=optimizer,
                          scheduler=scheduler, accelerator=run.accelerator,
                          extra={"phase": index, "plan": [phase.steps for phase in run.phases],
                                 "elapsed": run.budget.elapsed()})
    if run.metrics is not None:
        plot_loss(run.metrics.records(), Path(run.options.out) / "loss.png")


def _evaluate_now(run: _Run, forward: Any, step: int) -> float | None:
    if run.eval_loader is None or forward is None:
        return None
    with autocast(run.accelerator.device, run.precision):
        loss = _evaluate(forward, run.eval_loader, run.cache, run.accelerator)
    _train_mode(forward, run.base)
    if run.metrics is not None:
        run.metrics.write({"step": step, "eval_loss": loss})
    return loss


def _final_metrics(run: _Run) -> dict[str, Any]:
    values: dict[str, Any] = {"loss": run.loss, "precision": run.precision,
                              "samples_per_second": sum(run.rates) / len(run.rates) if run.rates else None}
    if run.eval_loss is not None:
        values["eval_loss"] = run.eval_loss
    return values


def _train_mode(forward: Any, base: _Base) -> None:
    """Train mode for dropout in LoRA/LLM; the frozen vision tower stays in eval mode."""
    forward.train()
    if base.architecture.vision_tower is not None:
        base.model.get_submodule(base.architecture.vision_tower).eval()


def _batches(accelerator: Any, loader: Any, sampler: EpochSampler, skip: int, per_epoch: int) -> Iterator[Any]:
    """Endless batches in (seed, epoch) order, starting ``skip`` micro-batches in (for a resume); stages continue
    one stream, so a chained run sees the data in the same order as a single stage would."""
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


class _OutputWriter:
    """Writes the adapter directory (PEFT files, projector, manifest) from the main process."""

    def __init__(self, base: _Base, options: TrainOptions, samples: list[Any], n_train: int, n_eval: int,
                 accelerator: Any, kind: str | None) -> None:
        self.base, self.options, self.accelerator = base, options, accelerator
        self._static: dict[str, Any] | None = None
        paths = ", ".join(str(path) for path in (options.data, *options.mix))
        self._dataset = {"path": paths, "sha256": manifest.dataset_hash(samples),
                         "samples": len(samples), "train": n_train, "eval": n_eval}
        self.from_kind = kind
        self._from = _from_record(options.from_dir, kind)

    def write(self, directory: Path, forward: Any, stage: str, step: int, metrics: dict[str, Any],
              phases: Sequence[Phase]) -> None:
        if self.accelerator.is_main_process:
            directory.mkdir(parents=True, exist_ok=True)
            model = self.accelerator.unwrap_model(forward).model
            if stage == "lora":
                model.save_pretrained(str(directory))
            changed = self.from_kind == "projector" or any(p.stage == "projector" for p in phases)
            has_projector = self.base.vision and (phases[-1].lr_projector > 0 or changed)
            shapes = (manifest.save_projector(model, self.base.architecture.projector, directory)
                      if has_projector else None)
            record = {**self.static(), "kind": stage, "steps": step, "metrics": metrics,
                      "stages": [{"stage": p.stage, "steps": p.steps, "lr_projector": p.lr_projector,
                                  "lr_lora": p.lr_lora} for p in phases],
                      "created": datetime.now(UTC).isoformat(timespec="seconds")}
            projector = self.base.architecture.projector
            record["projector"] = ({"module": projector, "in_adapter": stage == "lora", "shapes": shapes}
                                   if projector is not None and shapes is not None else None)
            manifest.write_manifest(directory, record)
        self.accelerator.wait_for_everyone()

    def static(self) -> dict[str, Any]:
        """The manifest fields that do not change during a run (weights are hashed once, on first save)."""
        if self._static is None:
            base, options = self.base, self.options
            vision = getattr(base.config, "vision_config", None)
            self._static = {
                "format": manifest.MANIFEST_FORMAT, "base_model": base.name, "family": base.architecture.family,
                "base_model_path": options.model, "base_fingerprint": model_loading.base_fingerprint(base.config),
                "base_config_sha256": manifest.config_hash(base.config),
                "base_weights_sha256": manifest.weights_hash(Path(base.source)), "quant": options.quant,
                "vision_tower": {key: getattr(vision, key, None) for key in
                                 ("model_type", "hidden_size", "num_hidden_layers", "image_size", "patch_size")}
                if vision is not None else None,
                "image_size": _input_size(base.processor) or getattr(vision, "image_size", None),
                "chat_template_sha256": manifest.template_hash(base.tokenizer, base.processor),
                "dataset": self._dataset, "training": options.settings(), "from": self._from,
            }
        return {key: (dict(value) if isinstance(value, dict) else value) for key, value in self._static.items()}


def _from_record(from_dir: Path | None, kind: str | None) -> dict[str, Any] | None:
    """What the run started from, for the manifest: the earlier adapter's path, kind, steps and dataset."""
    if from_dir is None:
        return None
    earlier = read_manifest(Path(from_dir).expanduser()) or {}
    return {"path": str(Path(from_dir).expanduser().resolve()), "kind": kind, "steps": earlier.get("steps"),
            "dataset_sha256": (earlier.get("dataset") or {}).get("sha256")}


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
