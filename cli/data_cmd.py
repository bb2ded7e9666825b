"""``iris data``: make a synthetic training set, text samples a model answers itself (``distill``), and check a
dataset before spending time training on it.

A dataset's problems quote its contents, so they are printed through ``cli.terminal``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from adapters.dataset import scan_dataset
from adapters.synth import EVAL_PER_SKILL, MAX_OBJECTS, SKILLS, synthesize, write_compare_set, write_eval_suite
from assistant.errors import BadSetting
from cli.distill_cmd import distill
from cli.terminal import visible

data_app = typer.Typer(help="Make and check training datasets (LLaVA JSON or messages JSONL).",
                       no_args_is_help=True)
data_app.command()(distill)


@data_app.command()
def synth(out: Annotated[Path, typer.Option("--out", help="New directory for dataset.json and images/.")],
          n: Annotated[int | None, typer.Option("--n", help="Number of training samples [default: 200].")] = None,
          seed: Annotated[int, typer.Option("--seed", help="Same seed, same dataset.")] = 0,
          max_objects: Annotated[int | None, typer.Option(
              "--max-objects", help=f"Most shapes in one image, 1-{MAX_OBJECTS} (1: a first curriculum stage) "
              f"[default: {MAX_OBJECTS}].")] = None,
          eval_suite: Annotated[bool, typer.Option(
              "--eval-suite", help="Write the held-out eval set for `iris eval` instead (a style and phrasings "
              "training never uses).")] = False,
          per_skill: Annotated[int | None, typer.Option(
              "--per-skill", help=f"With --eval-suite: questions per skill [default: {EVAL_PER_SKILL}].")] = None,
          compare: Annotated[bool, typer.Option(
              "--compare", help="Write text-only yes/no samples instead: a sentence says what a picture shows and "
              "the answer compares it with the question (the comparing half of a yes/no answer; mix into training "
              "with `iris train --mix`).")] = False,
          ) -> None:
    """Write a synthetic LLaVA dataset of coloured shapes with questions about colour, shape, count, side, a caption
    and yes/no, or (--eval-suite) the held-out set that measures them, or (--compare) text-only yes/no samples."""
    if compare:
        if eval_suite or max_objects is not None or per_skill is not None:
            raise BadSetting("--compare writes text-only samples: it takes --n and --seed only")
        n = 200 if n is None else n
        typer.echo(visible(f"wrote {n} text-only yes/no samples to {write_compare_set(out, n, seed)}"))
        return
    if eval_suite:
        if n is not None or max_objects is not None:
            raise BadSetting("--n and --max-objects shape a training set; the eval suite takes --per-skill")
        per_skill = EVAL_PER_SKILL if per_skill is None else per_skill
        data_file = write_eval_suite(out, per_skill, seed)
        typer.echo(visible(f"wrote {per_skill * len(SKILLS)} questions ({per_skill} per skill: "
                           f"{', '.join(SKILLS)}) to {data_file}"))
        return
    if per_skill is not None:
        raise BadSetting("--per-skill sizes the eval suite; add --eval-suite (or use --n for a training set)")
    n = 200 if n is None else n
    data_file = synthesize(out, n, seed, max_objects=MAX_OBJECTS if max_objects is None else max_objects)
    typer.echo(visible(f"wrote {n} samples to {data_file}"))


@data_app.command()
def check(path: Annotated[Path, typer.Argument(help="Dataset directory, .json or .jsonl file.")]) -> None:
    """Report every problem in a dataset, one per line (exit 1 if any)."""
    samples, problems = scan_dataset(path)
    for problem in problems:
        typer.echo(visible(problem))
    if problems:
        raise typer.Exit(1)
    images = {image.sha256 for sample in samples for message in sample.messages for image in message.images}
    turns = sum(len(sample.messages) for sample in samples)
    typer.echo(visible(f"OK: {path}: {len(samples)} samples, {turns} turns, {len(images)} distinct images"))
