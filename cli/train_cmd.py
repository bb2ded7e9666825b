"""``iris train``: fine-tune a model on a dataset (see ``adapters.train``); with no other flag, the default model
with the measured recipe (the projector alone; length and learning rates from the dataset's size).

Runs unchanged under ``accelerate launch --num_processes N iris train ...``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from adapters.dataset import DATA_FILE_NAMES
from adapters.train import TrainOptions
from assistant.architecture import DEFAULT_LORA_MODULES
from assistant.config import Paths
from assistant.errors import BadSetting
from cli.terminal import visible


def default_out(data: Path, stage: str, name: str | None, paths: Paths) -> Path:
    """``<user data>/adapters/<name>``; the name defaults to the dataset's name (and the stage when one is chosen),
    not a time, so that every process of a multi-process launch picks the same directory."""
    if name is None:
        stem = data.parent.name if data.name in DATA_FILE_NAMES else (data.name if data.is_dir() else data.stem)
        name = stem if stage == "auto" else f"{stem}-{stage}"
    if not name or "/" in name or name in (".", ".."):
        raise BadSetting(f"--name must be a plain directory name, got {name!r}")
    return paths.data / "adapters" / name


def train(data: Annotated[Path, typer.Argument(help="Dataset: directory, LLaVA .json or messages .jsonl.")],
          model: Annotated[str | None, typer.Option("--model", "-m", help="Base model: HF dir, hub id or .gguf "
                                                    "(default: the embedded default model).")] = None,
          stage: Annotated[str, typer.Option(help="auto (the projector for a vision model, LoRA for a "
                                             "text-only one or to continue a LoRA) | projector | lora (LoRA on the "
                                             "LLM + projector) | chain (projector, then LoRA from it).")] = "auto",
          quant: Annotated[str, typer.Option(help="none | 4bit (QLoRA: NF4 base).")] = "none",
          out: Annotated[Path | None, typer.Option(help="Output directory (default: the user adapter dir / "
                                                   "NAME).")] = None,
          name: Annotated[str | None, typer.Option(help="Adapter name under the user adapter dir "
                                                   "(default: the dataset's name).")] = None,
          from_dir: Annotated[Path | None, typer.Option("--from", help="Start from an earlier output: its projector, "
                                                        "or its LoRA trained further.")] = None,
          max_minutes: Annotated[float | None, typer.Option(help="Fit the run into this many minutes: the schedule "
                                                            "is planned from the measured speed.")] = None,
          steps: Annotated[int | None, typer.Option(help="Optimizer steps (default: from the dataset size).")] = None,
          epochs: Annotated[float | None, typer.Option(help="Epochs instead of --steps.")] = None,
          batch_size: Annotated[int, typer.Option(help="Samples per process per micro-batch.")] = 8,
          grad_accum: Annotated[int, typer.Option(help="Micro-batches per optimizer step.")] = 1,
          lr_projector: Annotated[float | None, typer.Option(help="Learning rate of the projector (0: frozen; "
                                                             "default: from the dataset size).")] = None,
          lr_lora: Annotated[float | None, typer.Option(help="Learning rate of the LoRA weights (default: from "
                                                        "the dataset size).")] = None,
          lora_r: Annotated[int, typer.Option(help="LoRA rank.")] = 16,
          lora_alpha: Annotated[int, typer.Option(help="LoRA alpha.")] = 32,
          lora_dropout: Annotated[float, typer.Option(help="LoRA dropout.")] = 0.05,
          target_modules: Annotated[str, typer.Option(help="Comma-separated LLM linear layer names.")]
          = ",".join(DEFAULT_LORA_MODULES),
          eval_split: Annotated[float, typer.Option(help="Fraction of samples held out for eval loss.")] = 0.0,
          seed: Annotated[int, typer.Option(help="Seed for init, shuffling and the eval split.")] = 0,
          save_every: Annotated[int, typer.Option(help="Checkpoint every N steps (0: only the final "
                                                  "output).")] = 0,
          resume: Annotated[bool, typer.Option("--resume", help="Continue from the latest checkpoint in the "
                                               "output directory.")] = False,
          cache_features: Annotated[bool, typer.Option("--cache-features/--no-cache-features",
                                                       help="Compute the frozen vision tower's features once per "
                                                       "image (where the family allows it).")] = True,
          mix: Annotated[list[Path] | None, typer.Option("--mix", help="Another dataset trained together with "
                                                         "DATA (repeatable): e.g. text-only samples from "
                                                         "`iris data distill` that keep the base's answers.")] = None,
          precision: Annotated[str, typer.Option(help="auto (bf16 autocast where the device has it natively, "
                                                 "else fp32) | fp32 | bf16.")] = "auto",
          gradient_checkpointing: Annotated[bool, typer.Option("--gradient-checkpointing",
                                                               help="Trade compute for memory.")] = False,
          system: Annotated[str | None, typer.Option("--system", help="System prompt put before samples without "
                                                     "one (default: the configured one, as chat and ask send "
                                                     "it).")] = None,
          ) -> None:
    """Fine-tune on your images: writes a PEFT adapter, projector.safetensors and iris_manifest.json."""
    from accelerate import PartialState

    from adapters.train import train as run_training
    from assistant.config import load_settings

    paths = Paths.default()
    target = out or default_out(data, stage, name, paths)
    system_prompt = system if system is not None else load_settings(paths).system_prompt
    options = TrainOptions(data=data, out=target, model=model, stage=stage, quant=quant, steps=steps,
                           epochs=epochs, batch_size=batch_size, grad_accum=grad_accum,
                           lr_projector=lr_projector, lr_lora=lr_lora, lora_r=lora_r, lora_alpha=lora_alpha,
                           lora_dropout=lora_dropout, eval_split=eval_split, seed=seed, save_every=save_every,
                           resume=resume, cache_features=cache_features,
                           gradient_checkpointing=gradient_checkpointing, from_dir=from_dir, precision=precision,
                           mix=tuple(mix or ()),
                           max_minutes=max_minutes, system_prompt=system_prompt or None,
                           target_modules=tuple(t.strip() for t in target_modules.split(",") if t.strip()))
    result = run_training(options)
    if PartialState().is_main_process:
        evaluated = f", eval loss {result.eval_loss:.4f}" if result.eval_loss is not None else ""
        stages = " + ".join(f"{stage_name} {count}" for stage_name, count in result.stages)
        model_flag = f" -m {model}" if model else ""
        typer.echo(visible(f"wrote {result.out} ({result.steps} steps: {stages}, loss {result.loss:.4f}{evaluated}, "
                           f"{result.samples_per_second:.2f} samples/s, {result.seconds / 60:.1f} min)"))
        typer.echo(visible(f"use it: iris ask{model_flag} --adapter {result.out} \"...\" --image IMAGE; measure it: "
                           f"iris eval HELD_OUT_DATA --adapter {result.out}"))
