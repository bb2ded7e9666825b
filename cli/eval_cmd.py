"""``iris eval``: held-out accuracy of a model, or of an adapter beside its base (see ``adapters.evaluate``).

One model is loaded: the base rows run first, then the adapter is attached (as ``iris ask --adapter`` attaches
it) for its own rows, so both sides see the same weights, prompts and greedy decoding. Progress goes to stderr
(a plain line every few seconds when it is not a terminal); the table, or ``--json``, to stdout.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from assistant.config import Paths
from assistant.errors import BadSetting
from assistant.messages import BASE_MODEL
from cli.options import ModelOption, QuantOption, TrustPickleOption
from cli.terminal import visible, visible_json

PROGRESS_EVERY_SECONDS = 15.0


def evaluate(data: Annotated[Path, typer.Argument(help="Held-out dataset: directory, LLaVA .json or messages "
                                                 ".jsonl (a \"category\" field groups the questions).")],
             adapter: Annotated[str | None, typer.Option("--adapter", help="Adapter name (in the user adapter dir) "
                                                         "or directory, compared with its base.")] = None,
             model: ModelOption = None, quant: QuantOption = None, trust_pickle: TrustPickleOption = False,
             as_json: Annotated[bool, typer.Option("--json", help="Print the whole report (scores, confusions, "
                                                   "every answer) as JSON.")] = False,
             ablation: Annotated[bool, typer.Option("--ablation/--no-ablation", help="Also ask with blank images "
                                                    "(a model answering from the text alone is caught).")] = True,
             max_new_tokens: Annotated[int | None, typer.Option(help="Longest answer (default: twice the longest "
                                                                "reference, plus 8).")] = None,
             system: Annotated[str | None, typer.Option("--system", help="System prompt (default: the configured "
                                                        "one, as ask and chat send it).")] = None) -> None:
    """Accuracy on held-out questions: exact and keyword match, per category, base beside adapter."""
    from adapters import evaluate as scoring
    from adapters.merge import adapter_base
    from assistant.engine import LocalBackend
    from cli import runtime
    from cli.adapters_cmd import resolve_adapter

    paths = Paths.default()
    adapter_dir = resolve_adapter(adapter) if adapter else None
    base_model = adapter_base(adapter_dir, model) if adapter_dir is not None else model
    settings = runtime.resolve_settings(paths, model=base_model, quant=quant, trust_pickle=trust_pickle,
                                        system=system)
    # Exactly what the flags name: no adapters from config.toml, the adapter's own base, the model in-process.
    model_options = dataclasses.replace(settings.model, adapters=())
    if adapter_dir is not None and base_model is None:  # trained on the default model, whatever config.toml says
        model_options = dataclasses.replace(model_options, model=None)
    settings = dataclasses.replace(settings, model=model_options,
                                   backend=dataclasses.replace(settings.backend, kind="local"))
    if adapter_dir is not None and settings.model.quant == "int8":
        raise BadSetting("iris eval attaches the adapter after the base rows, which --quant int8 cannot do; "
                         "use --quant none")
    items = scoring.load_items(data, settings.system_prompt)
    backend = runtime.open_backend(settings, paths)
    assert isinstance(backend, LocalBackend)
    rows = scoring.plan_rows(adapter_dir is not None, ablation=ablation)
    budget = max_new_tokens or scoring.answer_budget(
        items, lambda text: len(backend.renderer.tokenizer(text, add_special_tokens=False)["input_ids"]))
    attached: list[str] = []

    def prepare(spec: scoring.RowSpec) -> None:
        """Attach the adapter once the base rows are done (a projector-only adapter replaces the base's)."""
        if adapter_dir is not None and spec.adapter != BASE_MODEL and not attached:
            attached.append(backend.load_adapter(str(adapter_dir)))

    report = scoring.evaluate(backend, items, rows, data=str(data), model=backend.describe()["model"],
                              adapter=adapter_dir.name if adapter_dir is not None else None, max_new_tokens=budget,
                              progress=_progress_printer(), prepare=prepare)
    if as_json:
        sys.stdout.write(visible_json(report.as_json()) + "\n")
    else:
        for line in scoring.format_report(report):
            typer.echo(visible(line))


def _progress_printer() -> Callable[[str, int, int], None]:
    """``label: done/total`` on stderr, at most every ``PROGRESS_EVERY_SECONDS`` and at each row's end."""
    last = [0.0]

    def show(label: str, done: int, total: int) -> None:
        now = time.monotonic()
        if done == total or now - last[0] >= PROGRESS_EVERY_SECONDS:
            last[0] = now
            sys.stderr.write(visible(f"{label}: {done}/{total}") + "\n")
            sys.stderr.flush()

    return show
