"""Training data on disk → validated conversations (``Sample``s of ``Message``s with images attached).

Two formats, the ones users already have:

- LLaVA JSON: a list of ``{"id", "image": "a.png" | ["a.png", ...], "conversations":
  [{"from": "human" | "gpt" | "system", "value": "<image>\\n..."}]}``; errors point at ``file#index``
  (0-based list index).
- messages JSONL: one ``{"messages": [{"role", "content"}], "images": [...]}`` per line; ``content``
  is a string with ``<image>`` markers or a list of ``{"type": "text" | "image"}`` parts (TRL style);
  errors point at ``file:line`` (1-based).

Images are resolved relative to the data file and validated like chat attachments. The n-th
``<image>`` marker takes the n-th image and belongs to the user turn it appears in; markers are
removed from the text. ``check_dataset`` lists every problem; ``read_dataset`` refuses on the first.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from assistant.errors import BadDataset, BadImage
from assistant.messages import ImageAttachment, Message, Role
from assistant.vision import load_image_path

IMAGE_MARKER = "<image>"
DATA_FILE_NAMES = ("dataset.json", "data.jsonl")
ROLE_NAMES = {"system": Role.SYSTEM, "human": Role.USER, "user": Role.USER, "gpt": Role.ASSISTANT,
              "assistant": Role.ASSISTANT}


@dataclass(frozen=True)
class Sample:
    """One training conversation; ``source`` ("file:line" or "file#index") lets errors point at it."""

    messages: tuple[Message, ...]
    source: str


class _Problem(Exception):
    """What is wrong with one record or file, one line per problem (collected by ``scan_dataset``)."""

    def __init__(self, *lines: str) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


def read_dataset(path: Path) -> list[Sample]:
    """Every sample of a dataset file or directory; ``BadDataset`` (naming file and line) on a problem."""
    samples, problems = scan_dataset(path)
    if problems:
        more = f" (and {len(problems) - 1} more; run `iris data check`)" if len(problems) > 1 else ""
        raise BadDataset(problems[0] + more)
    return samples


def check_dataset(path: Path) -> list[str]:
    """Every problem in a dataset, one line each with its location; an empty list means it is usable."""
    return scan_dataset(path)[1]


def scan_dataset(path: Path) -> tuple[list[Sample], list[str]]:
    """The good samples and one line per problem, so a single pass serves both check and read."""
    try:
        data_file = _find_data_file(Path(path))
        reader = _jsonl_records if data_file.suffix == ".jsonl" else _json_records
        records = list(reader(data_file))
    except _Problem as problem:
        return [], list(problem.lines)
    images: dict[Path, ImageAttachment] = {}
    samples: list[Sample] = []
    problems: list[str] = []
    for source, record in records:
        try:
            if isinstance(record, _Problem):
                raise record
            samples.append(Sample(_messages(record, data_file.parent, images), source))
        except _Problem as problem:
            problems.extend(f"{source}: {line}" for line in problem.lines)
    if not records:
        problems.append(f"{data_file}: no samples")
    return samples, problems


def _find_data_file(path: Path) -> Path:
    """The data file itself, or the one in a directory (``dataset.json``, ``data.jsonl``, or the only one)."""
    if path.is_file():
        if path.suffix not in (".json", ".jsonl"):
            raise _Problem(f"{path}: not a .json or .jsonl dataset file")
        return path
    if not path.is_dir():
        raise _Problem(f"{path}: no such file or directory")
    for name in DATA_FILE_NAMES:
        if (path / name).is_file():
            return path / name
    candidates = sorted(p for p in path.iterdir() if p.suffix in (".json", ".jsonl") and p.is_file())
    if len(candidates) == 1:
        return candidates[0]
    found = f"found {', '.join(p.name for p in candidates)}" if candidates else "found none"
    raise _Problem(f"{path}: needs dataset.json or data.jsonl ({found})")


def _read_text(data_file: Path) -> str:
    try:
        return data_file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise _Problem(f"{data_file}: not UTF-8 text") from None
    except OSError as exc:
        raise _Problem(f"{data_file}: cannot read ({exc.strerror or exc})") from None


def _json_records(data_file: Path) -> Iterator[tuple[str, Any]]:
    try:
        records = json.loads(_read_text(data_file))
    except json.JSONDecodeError as exc:
        raise _Problem(f"{data_file}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    if not isinstance(records, list):
        raise _Problem(f"{data_file}: expected a JSON list of samples (LLaVA format)")
    for index, record in enumerate(records):
        yield f"{data_file}#{index}", record


def _jsonl_records(data_file: Path) -> Iterator[tuple[str, Any]]:
    for number, line in enumerate(_read_text(data_file).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield f"{data_file}:{number}", json.loads(line)
        except json.JSONDecodeError as exc:
            yield f"{data_file}:{number}", _Problem(f"invalid JSON ({exc.msg} at column {exc.colno})")


def _messages(record: Any, base: Path, cache: dict[Path, ImageAttachment]) -> tuple[Message, ...]:
    """The record's messages; raises ``_Problem`` listing everything wrong with it."""
    if not isinstance(record, dict):
        raise _Problem("expected a JSON object")
    if "conversations" in record:
        raw_turns, role_key, text_key = record["conversations"], "from", "value"
        names = record.get("image", [])
        names = [names] if isinstance(names, str) else names
    elif "messages" in record:
        raw_turns, role_key, text_key = record["messages"], "role", "content"
        names = record.get("images", [])
    else:
        raise _Problem('needs "conversations" (LLaVA) or "messages"')
    if not isinstance(raw_turns, list) or not raw_turns:
        raise _Problem("needs a non-empty list of turns")
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise _Problem("images must be a file name or a list of file names")
    issues: list[str] = []
    turns: list[tuple[Role, str]] = []
    for number, raw in enumerate(raw_turns, start=1):
        try:
            role, text = _turn(raw, role_key, text_key)
        except _Problem as problem:
            issues.append(f"turn {number}: {problem}")
            continue
        if IMAGE_MARKER in text and role is not Role.USER:
            issues.append(f"turn {number} ({role.value}): {IMAGE_MARKER} may only appear in user turns")
        turns.append((role, text))
    markers = sum(text.count(IMAGE_MARKER) for _, text in turns)
    if len(turns) == len(raw_turns) and markers != len(names):
        issues.append(f"{markers} {IMAGE_MARKER} marker(s) but {len(names)} image(s)")
    if not any(role is Role.ASSISTANT for role, _ in turns):
        issues.append("no assistant turn to learn from")
    images = []
    for name in names:
        try:
            images.append(_image(base / name, cache))
        except BadImage as exc:
            issues.append(str(exc))
    if issues:
        raise _Problem(*issues)
    remaining = iter(images)
    return tuple(Message(role, text.replace(IMAGE_MARKER, "").strip(),
                         tuple(next(remaining) for _ in range(text.count(IMAGE_MARKER))))
                 for role, text in turns)


def _turn(raw: Any, role_key: str, text_key: str) -> tuple[Role, str]:
    if not isinstance(raw, dict):
        raise _Problem(f"needs {role_key!r} and {text_key!r}")
    name = raw.get(role_key)
    if not isinstance(name, str) or name not in ROLE_NAMES:
        raise _Problem(f"unknown role {name!r} (use {', '.join(ROLE_NAMES)})")
    return ROLE_NAMES[name], _text(raw.get(text_key), text_key)


def _text(content: Any, text_key: str) -> str:
    """String content as is; a list of typed parts (TRL style) becomes text with a marker per image."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(part, dict) for part in content):
        if all(part.get("type") == "image" or isinstance(part.get("text"), str) for part in content):
            return "\n".join(IMAGE_MARKER if part.get("type") == "image" else part["text"]
                             for part in content)
    raise _Problem(f'{text_key!r} must be a string or a list of {{"type": "text" | "image"}} parts')


def _image(path: Path, cache: dict[Path, ImageAttachment]) -> ImageAttachment:
    """Load once per file: datasets often reuse an image across many conversations."""
    if path not in cache:
        cache[path] = load_image_path(path)
    return cache[path]
