"""``iris eval``: held-out accuracy of a model, or of an adapter beside its base (see ``adapters.evaluate``).

One model is loaded: the base rows run first, then the adapter is attached (as ``iris ask --adapter`` attaches
it) for its own rows, so both sides see the same weights, prompts and greedy decoding. ``--text`` adds the
built-in text questions (``adapters.text_probe``) on that model, then on the language model it was built on,
loaded once the first is let go. Progress goes to stderr (a plain line every few seconds when it is not a
terminal); the table, or ``--json``, to stdout.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from assistant.config import Paths
from assistant.errors import BadSetting
from assistant.messages import BASE_MODEL
from cli.options import ModelOption, QuantOption, TrustPickleOption
from cli.terminal import visible, visible_json

if TYPE_CHECKING:
    from adapters.evaluate import EvalItem, Report
    from assistant.config import Settings

PROGRESS_EVERY_SECONDS = 15.0


def evaluate(data: Annotated[Path | None, typer.Argument(help="Held-out dataset: directory, LLaVA .json or messages "
                                                        ".jsonl (a \"category\" field groups the questions); "
                                                        "optional with --text.")] = None,
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
                                                        "one, as ask and chat send it).")] = None,
             text: Annotated[bool, typer.Option("--text", help="Also ask built-in text-only questions of the model "
                                                "and of its base language model (what vision training "
                                                "cost).")] = False,
             text_base: Annotated[str | None, typer.Option("--text-base", help="The base language model for "
                                                           "--text when -m is not the default model: HF dir, hub "
                                                           "id or .gguf.")] = None) -> None:
    """Accuracy on held-out questions: exact and keyword match, per category, base beside adapter."""
    from adapters import evaluate as scoring
    from adapters import text_probe
    from adapters.merge import adapter_base
    from assistant.builders.default_model import drop_shipped_lora
    from assistant.engine import LocalBackend
    from assistant.model import resolve_source
    from cli import runtime
    from cli.adapters_cmd import resolve_adapter

    if data is None and not text:
        raise BadSetting("give a DATA set to evaluate, or --text for the built-in text questions")
    if text_base is not None and not text:
        raise BadSetting("--text-base only matters with --text")
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
    items = scoring.load_items(data, settings.system_prompt) if data is not None else []
    if text_base is not None:  # a wrong name fails now, not after the model under test has answered
        resolve_source(dataclasses.replace(settings.model, model=text_base, name=None), paths)
    backend = runtime.open_backend(settings, paths)
    assert isinstance(backend, LocalBackend)
    model_name = backend.describe()["model"]
    adapter_name = adapter_dir.name if adapter_dir is not None else None
    attached: list[str] = []

    def prepare(spec: scoring.RowSpec) -> None:
        """Attach the adapter once the base rows are done (a projector-only adapter replaces the base's). On the
        default model, its shipped LoRA comes off first: an adapter trained on it was trained without."""
        if adapter_dir is not None and spec.adapter != BASE_MODEL and not attached:
            drop_shipped_lora(backend.loaded)
            attached.append(backend.load_adapter(str(adapter_dir)))

    if items:
        budget = max_new_tokens or scoring.answer_budget(
            items, lambda words: len(backend.renderer.tokenizer(words, add_special_tokens=False)["input_ids"]))
        report = scoring.evaluate(backend, items, scoring.plan_rows(adapter_dir is not None, ablation=ablation),
                                  data=str(data), model=model_name, adapter=adapter_name, max_new_tokens=budget,
                                  progress=_progress_printer(), prepare=prepare)
    else:
        report = scoring.Report(None, model_name, adapter_name, 0, None, [])
    if text:
        questions = text_probe.text_items(settings.system_prompt)
        text_report = scoring.evaluate(backend, questions, text_probe.text_rows(adapter_dir is not None),
                                       data=text_probe.TEXT_DATA, model=model_name, adapter=adapter_name,
                                       max_new_tokens=text_probe.TEXT_MAX_NEW_TOKENS, progress=_progress_printer(),
                                       prepare=prepare)
        del backend, prepare  # done with the model under test: let it go before the base LM loads
        report.text = _with_base_lm(text_report, questions, settings, paths, text_base)
    if as_json:
        sys.stdout.write(visible_json(report.as_json()) + "\n")
    else:
        for line in scoring.format_report(report):
            typer.echo(visible(line))


def _with_base_lm(report: Report, questions: list[EvalItem], settings: Settings, paths: Paths,
                  text_base: str | None) -> Report:
    """``report`` with the ``text: base LM`` row: the default model's own language model (its GGUF's HF copy),
    or ``--text-base``; without either, a note says why the row is missing."""
    from adapters import evaluate as scoring
    from adapters import text_probe
    from assistant.builders.default_model import default_llm_path
    from cli import runtime

    if text_base is None and settings.model.model is not None:
        report.notes.append(f"{text_probe.BASE_LM_LABEL}: left out; pass --text-base MODEL (the language model "
                            "-m was built on)")
        return report
    source = text_base or str(default_llm_path(paths))
    base_settings = dataclasses.replace(settings, model=dataclasses.replace(settings.model, model=source, name=None,
                                                                            adapters=()))
    base = runtime.open_backend(base_settings, paths)
    base_report = scoring.evaluate(base, questions, [text_probe.base_lm_row()], data=text_probe.TEXT_DATA,
                                   model=base.describe()["model"], max_new_tokens=text_probe.TEXT_MAX_NEW_TOKENS,
                                   progress=_progress_printer())
    return scoring.combined(report, base_report)


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
