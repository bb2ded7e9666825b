"""Held-out accuracy of a model, and of an adapter beside its base: what ``iris eval`` measures.

Every assistant turn of a dataset (LLaVA JSON or messages JSONL, read by ``adapters.dataset``) is one
question: the conversation before it is the prompt (the configured system prompt first, as ``iris ask``
sends it, unless the sample has its own) and the turn's text is the reference answer. Answers are greedy,
generated through the backend's own ``stream`` (the path ``iris ask`` and ``iris chat`` take), so a score
is what a user of the model or adapter gets.

Scoring compares normalised text (lower case, punctuation dropped, articles dropped, number words as
digits): *exact* means the whole answer equals the reference; *keyword* means every key word of the
reference (its words that are neither in the question nor stop words: for "The digit is 7." asked as
"Which digit is written here?", just "7") appears in the answer. References of at most three key words
are *short*: their rows get a confusion summary (which label was answered for which), and yes/no
references a yes-rate (a model that says yes to everything is caught).

A row is one way of running the questions: a model or adapter (``adapter``: a loaded adapter's name, or
``BASE_MODEL``) and what the images are (``given``; ``blank``: every image replaced by a plain grey one
of the same size, so a model that answers from the text alone scores as well as it does with the images).
Rows are planned by the caller (``plan_rows``), so other evaluations (per-skill phrasings, yes/no probes,
text-only regressions) are datasets and rows on this same code.

The category of a question (for per-category rows) is the dataset's ``"category"`` field: on the question
turn (a LLaVA ``conversations`` turn or a JSONL message) or on the whole record.
"""

from __future__ import annotations

import dataclasses
import io
import json
import re
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from adapters.dataset import Sample, read_dataset
from assistant.config import GenerationOptions
from assistant.errors import BadDataset
from assistant.messages import BASE_MODEL, ImageAttachment, Message, Role

CATEGORY_FIELD = "category"
IMAGE_VARIANTS = ("given", "blank")
BLANK_GREY = (128, 128, 128)
SHORT_WORDS = 3  # references with at most this many key words get a confusion summary
OTHER = "(other)"
NUMBER_WORDS = {word: str(value) for value, word in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}
ARTICLES = frozenset({"a", "an", "the"})
STOP_WORDS = frozenset(("is are was were be been am it its it's this that these those there here of in on at to and "
                        "or for with by as i you he she they we there's do does").split())


class Generator(Protocol):
    """What evaluation needs from a backend: ``assistant.engine.LocalBackend.stream``."""

    def stream(self, messages: Sequence[Message], options: GenerationOptions,
               adapter: str | None = None) -> Any: ...


@dataclass(frozen=True)
class EvalItem:
    """One question: the prompt messages, the reference answer and the question's category ("" if untagged)."""

    messages: tuple[Message, ...]
    reference: str
    category: str
    source: str

    @property
    def question(self) -> str:
        return self.messages[-1].text


@dataclass(frozen=True)
class RowSpec:
    """How a row runs the questions: which adapter (None: the loaded model's active one; ``BASE_MODEL``: the base
    with adapters off) and which images (``given`` or ``blank``)."""

    label: str
    adapter: str | None
    images: str = "given"


@dataclass(frozen=True)
class Score:
    """Accuracy over ``n`` questions; ``yes_rate`` over the yes/no ones (None without any)."""

    n: int
    exact: float
    keyword: float
    yes_rate: float | None = None


@dataclass
class Row:
    label: str
    adapter: str
    images: str
    overall: Score
    categories: dict[str, Score]
    confusion: dict[str, dict[str, int]]
    seconds: float


@dataclass
class Report:
    """Everything ``iris eval --json`` prints; ``chance`` is the share of the most common short answer. ``text``
    holds the text-regression rows (``adapters.text_probe``) when asked for; ``data`` is None without a dataset.
    ``notes`` say what was left out and why."""

    data: str | None
    model: str
    adapter: str | None
    questions: int
    chance: float | None
    rows: list[Row]
    answers: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    text: Report | None = None

    def as_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, indent=2)


# normalisation and scoring ------------------------------------------------------------------------------------


def normalise(text: str) -> list[str]:
    """Words of ``text`` for comparison: lower case, no punctuation, no articles, number words as digits."""
    words = re.sub(r"[^\w\s]|_", " ", text.lower()).split()
    return [NUMBER_WORDS.get(word, word) for word in words if word not in ARTICLES]


def key_words(reference: str, question: str = "") -> list[str]:
    """What an answer must contain: the reference's words not in the question and not stop words (falling back
    to its words that are not stop words, then to all its words)."""
    words = normalise(reference)
    asked = set(normalise(question))
    for candidate in ([w for w in words if w not in STOP_WORDS and w not in asked],
                      [w for w in words if w not in STOP_WORDS], words):
        if candidate:
            return list(dict.fromkeys(candidate))
    return []


def exact_match(answer: str, reference: str) -> bool:
    return normalise(answer) == normalise(reference)


def keyword_match(answer: str, reference: str, question: str = "") -> bool:
    expected = _polar(reference)
    if expected is not None:  # a yes/no question: the answer's verdict, whatever else it says
        return _yes_no(answer) == expected
    found = set(normalise(answer))
    return all(word in found for word in key_words(reference, question))


def short_label(item: EvalItem) -> str | None:
    """The item's answer as a label (its key words) when it is short enough for a confusion summary."""
    words = key_words(item.reference, item.question)
    return " ".join(words) if 0 < len(words) <= SHORT_WORDS else None


def answered_label(answer: str, labels: Sequence[str]) -> str:
    """The known label that appears first in the answer (as whole words), else ``OTHER``."""
    words = normalise(answer)
    best: tuple[int, int, str] | None = None
    for label in labels:
        target = label.split()
        for start in range(len(words) - len(target) + 1):
            if words[start:start + len(target)] == target:
                candidate = (start, -len(target), label)  # earliest, then longest
                best = candidate if best is None or candidate < best else best
                break
    return best[2] if best else OTHER


def _polar(reference: str) -> str | None:
    """"yes" or "no" when ``reference`` answers a yes/no question (it starts with one), else None."""
    words = normalise(reference)
    return words[0] if words and words[0] in ("yes", "no") else None


def _yes_no(text: str) -> str | None:
    """The verdict of a yes/no answer: its first word when that is yes or no ("No, there is none."), else its last
    yes or no ("I see two red circles, so no."); None when it has neither."""
    words = normalise(text)
    polar = [word for word in words if word in ("yes", "no")]
    if not polar:
        return None
    return words[0] if words[0] in ("yes", "no") else polar[-1]


def score(items: Sequence[EvalItem], answers: Sequence[str]) -> Score:
    """Exact and keyword accuracy (and the yes-rate on yes/no references) of ``answers`` to ``items``."""
    if not items:
        return Score(0, 0.0, 0.0)
    exact = sum(exact_match(a, i.reference) for i, a in zip(items, answers, strict=True))
    keyword = sum(keyword_match(a, i.reference, i.question) for i, a in zip(items, answers, strict=True))
    polar = [a for i, a in zip(items, answers, strict=True) if _polar(i.reference) is not None]
    yes_rate = sum(_yes_no(a) == "yes" for a in polar) / len(polar) if polar else None
    return Score(len(items), exact / len(items), keyword / len(items), yes_rate)


def confusion(items: Sequence[EvalItem], answers: Sequence[str]) -> dict[str, dict[str, int]]:
    """For short references: reference label → answered label → count (a yes/no answer's label is its verdict)."""
    labelled = [(short_label(i), _polar(i.reference) is not None, a) for i, a in zip(items, answers, strict=True)]
    labels = sorted({label for label, _, _ in labelled if label is not None})
    table: dict[str, Counter[str]] = defaultdict(Counter)
    for label, polar, answer in labelled:
        if label is not None:
            table[label][(_yes_no(answer) or OTHER) if polar else answered_label(answer, labels)] += 1
    return {label: dict(counts.most_common()) for label, counts in sorted(table.items())}


def chance_level(items: Sequence[EvalItem]) -> float | None:
    """Accuracy of always giving the most common short answer: what a model that ignores the image can reach."""
    labels = [label for label in map(short_label, items) if label is not None]
    return Counter(labels).most_common(1)[0][1] / len(labels) if labels else None


# questions from a dataset -------------------------------------------------------------------------------------


def eval_items(samples: Sequence[Sample], categories: dict[tuple[str, int], str] | None = None,
               system_prompt: str | None = None) -> list[EvalItem]:
    """One item per assistant turn: the conversation before it (the reference's earlier answers included) as the
    prompt, with ``system_prompt`` first unless the sample starts with its own."""
    items = []
    for sample in samples:
        messages = sample.messages
        if system_prompt and messages[0].role is not Role.SYSTEM:
            messages = (Message(Role.SYSTEM, system_prompt), *messages)
        offset = len(messages) - len(sample.messages)
        for index, message in enumerate(messages):
            if message.role is Role.ASSISTANT and index > 0 and messages[index - 1].role is Role.USER:
                category = (categories or {}).get((sample.source, index - 1 - offset), "")
                items.append(EvalItem(messages[:index], message.text, category, sample.source))
    if not items:
        raise BadDataset("no question to evaluate: every assistant turn needs a user turn before it")
    return items


def read_categories(path: Path) -> dict[tuple[str, int], str]:
    """(sample source, turn index) → the ``category`` of that turn, else of its record, for tagged datasets."""
    from adapters.dataset import _find_data_file, _json_records, _jsonl_records, _Problem

    try:
        data_file = _find_data_file(Path(path))
        reader = _jsonl_records if data_file.suffix == ".jsonl" else _json_records
        records = list(reader(data_file))
    except _Problem as problem:
        raise BadDataset(str(problem)) from None
    found: dict[tuple[str, int], str] = {}
    for source, record in records:
        if not isinstance(record, dict):
            continue
        turns = record.get("conversations", record.get("messages"))
        default = record.get(CATEGORY_FIELD)
        for index, turn in enumerate(turns if isinstance(turns, list) else []):
            own = turn.get(CATEGORY_FIELD) if isinstance(turn, dict) else None
            category = own if isinstance(own, str) else default
            if isinstance(category, str) and category:
                found[(source, index)] = category
    return found


def load_items(path: Path, system_prompt: str | None = None) -> list[EvalItem]:
    """The questions of the dataset at ``path`` (validated like training data)."""
    return eval_items(read_dataset(Path(path)), read_categories(Path(path)), system_prompt)


# running rows -------------------------------------------------------------------------------------------------


def plan_rows(with_adapter: bool, *, ablation: bool = True) -> list[RowSpec]:
    """The base (adapters off), then the adapter (the backend's active one, attached after the base row: a LoRA,
    or a projector that replaced the base's), or the model alone; then the same questions with blank images."""
    rows = [RowSpec("base", BASE_MODEL), RowSpec("adapter", None)] if with_adapter else [RowSpec("model", None)]
    if ablation:
        rows.append(RowSpec(f"{rows[-1].label}, blank images", None, "blank"))
    return rows


def blank_like(image: ImageAttachment) -> ImageAttachment:
    """A plain grey PNG of the image's size: the question's text without its picture."""
    from PIL import Image

    from assistant.vision import load_image_bytes

    buffer = io.BytesIO()
    Image.new("RGB", (image.width, image.height), BLANK_GREY).save(buffer, format="PNG")
    return load_image_bytes(buffer.getvalue(), f"blank-{image.width}x{image.height}.png")


def with_images(item: EvalItem, variant: str, blanks: dict[tuple[int, int], ImageAttachment]) -> tuple[Message, ...]:
    if variant == "given":
        return item.messages

    def blank(image: ImageAttachment) -> ImageAttachment:
        size = (image.width, image.height)
        if size not in blanks:
            blanks[size] = blank_like(image)
        return blanks[size]

    return tuple(Message(m.role, m.text, tuple(blank(i) for i in m.images), m.interrupted, m.author)
                 for m in item.messages)


def answer_all(backend: Generator, items: Sequence[EvalItem], spec: RowSpec, options: GenerationOptions,
               progress: Callable[[int], None] = lambda done: None) -> list[str]:
    """Greedy answers to every item for one row."""
    blanks: dict[tuple[int, int], ImageAttachment] = {}
    answers = []
    for number, item in enumerate(items, 1):
        answers.append("".join(backend.stream(with_images(item, spec.images, blanks), options,
                                              adapter=spec.adapter)).strip())
        progress(number)
    return answers


def make_row(spec: RowSpec, items: Sequence[EvalItem], answers: Sequence[str], seconds: float,
             adapter_name: str | None) -> Row:
    grouped: dict[str, list[int]] = defaultdict(list)
    for index, item in enumerate(items):
        if item.category:
            grouped[item.category].append(index)
    categories = {name: score([items[i] for i in indices], [answers[i] for i in indices])
                  for name, indices in sorted(grouped.items())}
    shown_adapter = "base" if spec.adapter == BASE_MODEL else (spec.adapter or adapter_name or "model")  # a name
    return Row(spec.label, shown_adapter, spec.images, score(items, answers), categories,
               confusion(items, answers), round(seconds, 2))


def evaluate(backend: Generator, items: Sequence[EvalItem], rows: Sequence[RowSpec], *, data: str, model: str,
             adapter: str | None = None, max_new_tokens: int = 32,
             progress: Callable[[str, int, int], None] = lambda label, done, total: None,
             prepare: Callable[[RowSpec], None] = lambda spec: None) -> Report:
    """Run every row over every item (greedy) and score them; ``prepare`` runs before each row (the CLI attaches
    the adapter there once the base rows are done)."""
    options = GenerationOptions(temperature=0, max_new_tokens=max_new_tokens, repetition_penalty=1.0)
    report = Report(data, model, adapter, len(items), chance_level(items), [])
    answers_by_row: list[list[str]] = []
    for spec in rows:
        prepare(spec)
        started = time.perf_counter()
        label = spec.label
        answers = answer_all(backend, items, spec, options,
                             lambda done: progress(label, done, len(items)))  # noqa: B023 (called in this loop)
        report.rows.append(make_row(spec, items, answers, time.perf_counter() - started, adapter))
        answers_by_row.append(answers)
    report.answers = [{"source": item.source, "category": item.category, "question": item.question,
                       "reference": item.reference,
                       "answers": {spec.label: row_answers[index] for spec, row_answers in
                                   zip(rows, answers_by_row, strict=True)}}
                      for index, item in enumerate(items)]
    return report


def combined(first: Report, *others: Report) -> Report:
    """One report of the same questions run on several loaded models: rows in order, answers side by side."""
    report = dataclasses.replace(first, rows=list(first.rows), notes=list(first.notes),
                                 answers=[{**item, "answers": dict(item["answers"])} for item in first.answers])
    for other in others:
        if [item["question"] for item in other.answers] != [item["question"] for item in report.answers]:
            raise ValueError("only reports on the same questions combine")
        report.rows += other.rows
        report.notes += other.notes
        for mine, theirs in zip(report.answers, other.answers, strict=True):
            mine["answers"].update(theirs["answers"])
    return report


def answer_budget(items: Sequence[EvalItem], count_tokens: Callable[[str], int]) -> int:
    """Enough new tokens for the longest reference, with room for a wordier answer: no row decodes far past it."""
    return min(256, max(count_tokens(item.reference) for item in items) * 2 + 8)


# text output --------------------------------------------------------------------------------------------------


def format_report(report: Report, max_confusions: int = 5) -> list[str]:
    """The table ``iris eval`` prints: one line per row (and per category), then confusions of short answers (at
    most ``max_confusions`` mistakes a row; 0: none), then the text-regression rows and how many each got right."""
    lines = _data_lines(report, max_confusions) if report.data is not None else []
    if report.text is not None:
        text = report.text
        lines += [""] if lines else []
        lines += [*_data_lines(text, confusions=0), "text right: " + ", ".join(
            f"{row.label.removeprefix('text: ')} {round(row.overall.keyword * row.overall.n)}/{row.overall.n}"
            for row in text.rows)]
        lines += text.notes
    return lines + report.notes


def _data_lines(report: Report, confusions: int) -> list[str]:
    """One report's header, rows and confusions (a text report's one-off answers get none: ``confusions=0``)."""
    chance = f", chance {report.chance:.0%}" if report.chance is not None else ""
    lines = [f"{report.questions} questions from {report.data}{chance}",
             f"{'row':<28} {'n':>5} {'exact':>7} {'keyword':>8} {'yes-rate':>9} {'seconds':>8}"]
    for row in report.rows:
        lines.append(_score_line(row.label, row.overall, row.seconds))
        for name, value in row.categories.items():
            lines.append(_score_line(f"  {name}", value, None))
    for row in report.rows:
        if not confusions or not row.confusion or row.images != "given":
            continue
        recall = ", ".join(f"{label} {counts.get(label, 0)}/{sum(counts.values())}"
                           for label, counts in row.confusion.items())
        mistakes = sorted(((count, label, answered) for label, counts in row.confusion.items()
                           for answered, count in counts.items() if answered != label), reverse=True)
        lines.append(f"{row.label}: right per answer: {recall}")
        if mistakes:
            lines.append(f"{row.label}: most confused: " + ", ".join(
                f"{label} → {answered} ×{count}" for count, label, answered in mistakes[:confusions]))
    return lines


def _score_line(label: str, value: Score, seconds: float | None) -> str:
    yes = f"{value.yes_rate:.0%}" if value.yes_rate is not None else "-"
    took = f"{seconds:.0f}" if seconds is not None else ""
    return f"{label[:28]:<28} {value.n:>5} {value.exact:>7.1%} {value.keyword:>8.1%} {yes:>9} {took:>8}"
