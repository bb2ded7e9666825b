"""``iris data distill``: text-only training samples answered by a model itself (see ``adapters.distill``).

The default model is the embedded default's base language model (SmolLM2-135M-Instruct, text only): the point
is to keep the base's own answers while a LoRA learns something else. It runs in this process through
``LocalBackend.stream`` in full precision (``--quant none``) unless told otherwise, so the answers are the
model's own, not a quantized approximation. Progress goes to stderr, a line every few seconds.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from adapters.distill import DEFAULT_MAX_NEW_TOKENS
from assistant.config import Paths
from cli.terminal import visible

PROGRESS_EVERY_SECONDS = 15.0


def distill(out: Annotated[Path, typer.Option("--out", help="New directory for data.jsonl and distill.json.")],
            n: Annotated[int, typer.Option("--n", help="Number of prompts to answer.")] = 300,
            seed: Annotated[int, typer.Option("--seed", help="Same seed, same prompts.")] = 0,
            model: Annotated[str | None, typer.Option("--model", "-m", help="Text model that answers: HF dir, hub "
                                                      "id or .gguf (default: the default model's base language "
                                                      "model, SmolLM2-135M-Instruct).")] = None,
            quant: Annotated[str, typer.Option(help="none (full precision: the model's own answers; config.toml's "
                                               "quant is not used) | auto | 4bit | 8bit | int8.")] = "none",
            max_new_tokens: Annotated[int, typer.Option(help="Longest answer; answers cut here mid-sentence are "
                                                        "dropped.")] = DEFAULT_MAX_NEW_TOKENS,
            system: Annotated[str | None, typer.Option("--system", help="System prompt, the first turn of every "
                                                       "sample (default: the configured one, as train adds "
                                                       "it).")] = None) -> None:
    """Write text-only samples whose answers are a model's own greedy answers (to keep them through a LoRA)."""
    from adapters.distill import check_request, write_distill_set
    from assistant.builders.default_model import default_llm_path
    from assistant.engine import LocalBackend
    from cli import runtime

    check_request(out, n, max_new_tokens)
    paths = Paths.default()
    settings = runtime.resolve_settings(paths, model=model, quant=quant, system=system)
    source = settings.model.model or str(default_llm_path(paths))  # text only, not the composed vision model
    settings = dataclasses.replace(settings, model=dataclasses.replace(settings.model, model=source, adapters=()),
                                   backend=dataclasses.replace(settings.backend, kind="local"))
    backend = runtime.open_backend(settings, paths)
    assert isinstance(backend, LocalBackend)
    tokenizer = backend.renderer.tokenizer
    result = write_distill_set(
        out, n, seed, backend.stream, system_prompt=settings.system_prompt or None, max_new_tokens=max_new_tokens,
        count_tokens=lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"]),
        model=backend.describe()["model"], progress=_progress_printer())
    typer.echo(visible(f"wrote {result.kept} samples to {result.data_file} ({result.cut} cut at "
                       f"--max-new-tokens {max_new_tokens} and {result.empty} empty dropped, of {n}; "
                       f"{result.seconds / 60:.1f} min)"))


def _progress_printer() -> Callable[[int, int, int], None]:
    """``distill: done/total answered, kept`` on stderr, at most every ``PROGRESS_EVERY_SECONDS`` and at the end."""
    started = time.monotonic()
    last = [started]

    def show(done: int, total: int, kept: int) -> None:
        now = time.monotonic()
        if done == total or now - last[0] >= PROGRESS_EVERY_SECONDS:
            last[0] = now
            sys.stderr.write(f"distill: {done}/{total} answered, {kept} kept, {(now - started) / done:.1f} s each\n")
            sys.stderr.flush()

    return show
