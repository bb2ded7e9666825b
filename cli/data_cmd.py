"""``iris data``: make a synthetic training set and check a dataset before spending time training on it.

A dataset's problems quote its contents, so they are printed through ``cli.terminal``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from adapters.dataset import scan_dataset
from adapters.synth import synthesize
from cli.terminal import visible

data_app = typer.Typer(help="Make and check training datasets (LLaVA JSON or messages JSONL).",
                       no_args_is_help=True)


@data_app.command()
def synth(out: Annotated[Path, typer.Option("--out", help="New directory for dataset.json and images/.")],
          n: Annotated[int, typer.Option("--n", min=1, help="Number of samples.")] = 200,
          seed: Annotated[int, typer.Option("--seed", help="Same seed, same dataset.")] = 0) -> None:
    """Write a synthetic LLaVA dataset of coloured shapes with captions and questions."""
    data_file = synthesize(out, n, seed)
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
