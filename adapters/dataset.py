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
Files are read as regular files with a byte cap (``assistant.files``): a FIFO or device is a problem
line, never a hang. Checking holds one image at a time; only reading for training keeps the bytes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from assistant.errors import BadDataset, BadImage
from assistant.files import UnreadableFile, read_user_text, shown_name
from assistant.messages import ImageAttachment, Message, Role
from assistant.vision import load_image_path

IMAGE_MARKER = "<image>"
DATA_FILE_NAMES = ("dataset.json", "data.jsonl")
DATA_MAX_BYTES = 1 << 30
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
    samples, problems = scan_dataset(path, keep_images=True)
    if problems:
        more = f" (and {len(problems) - 1} more; run `iris data check`)" if len(problems) > 1 else ""
        raise BadDataset(problems[0] + more)
    return samples


def check_dataset(path: Path) -> list[str]:
    """Every problem in a dataset, one line each with its location; an empty list means it is usable."""
    return scan_dataset(path)[1]


def scan_dataset(path: Path, *, keep_images: bool = False) -> tuple[list[Sample], list[str]]:
    """The good samples and one line per problem, so a single pass serves both check and read.

    Every image is loaded and validated, but unless ``keep_images`` the samples carry only what identifies
    and measures it (SHA-256, type, size), so checking a dataset never holds all its images at once.
    """
    try:
        data_file = _find_data_file(Path(path))
        reader = _jsonl_records if data_file.suffix == ".jsonl" else _json_records
        records = list(reader(data_file))
    except _Problem as problem:
        return [], list(problem.lines)
    images: dict[Path, ImageAttachment | BadImage] = {}
    samples: list[Sample] = []
    problems: list[str] = []
    for source, record in records:
        try:
            if isinstance(record, _Problem):
                raise record
            samples.append(Sample(_messages(record, data_file.parent, images, keep_images), source))
        except _Problem as problem:
            problems.extend(f"{source}: {line}" for line in problem.lines)
    if not records:
        problems.append(f"{shown_name(data_file)}: no samples")
    return samples, problems


def _find_data_file(path: Path) -> Path:
    """The data file itself, or the one in a directory (``dataset.json``, ``data.jsonl``, or the only one).

    Anything that is not a directory is taken as the data file: reading it refuses FIFOs and devices.
    """
    if path.is_dir():
        for name in DATA_FILE_NAMES:
            if os.path.lexists(path / name):
                return path / name
        candidates = sorted(p for p in path.iterdir() if p.suffix in (".json", ".jsonl") and not p.is_dir())
        if len(candidates) == 1:
            return candidates[0]
        found = f"found {', '.join(shown_name(p.name) for p in candidates)}" if candidates else "found none"
        raise _Problem(f"{shown_name(path)}: needs dataset.json or data.jsonl ({found})")
    if not os.path.lexists(path):
        raise _Problem(f"{shown_name(path)}: no such file or directory")
    if path.suffix not in (".json", ".jsonl"):
        raise _Problem(f"{shown_name(path)}: not a .json or .jsonl dataset file")
    return path


def _read_text(data_file: Path) -> str:
    try:
        return read_user_text(data_file, max_bytes=DATA_MAX_BYTES, what="dataset file")
    except UnreadableFile as exc:
        raise _Problem(str(exc)) from None


def _parse_json(text: str) -> Any:
    """``json.loads``, with every way hostile text can make it fail turned into a ``_Problem`` reason."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise
    except ValueError as exc:  # e.g. an integer of thousands of digits
        raise _Problem(f"invalid JSON ({exc})") from None
    except RecursionError:
        raise _Problem("invalid JSON (nested too deeply)") from None


def _json_records(data_file: Path) -> Iterator[tuple[str, Any]]:
    try:
        records = _parse_json(_read_text(data_file))
    except json.JSONDecodeError as exc:
        raise _Problem(f"{shown_name(data_file)}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    except _Problem as problem:
        raise _Problem(f"{shown_name(data_file)}: {problem}") from None
    if not isinstance(records, list):
        raise _Problem(f"{shown_name(data_file)}: expected a JSON list of samples (LLaVA format)")
    for index, record in enumerate(records):
        yield f"{shown_name(data_file)}#{index}", record


def _jsonl_records(data_file: Path) -> Iterator[tuple[str, Any]]:
    for number, line in enumerate(_read_text(data_file).split("\n"), start=1):  # only \n ends a JSONL line
        if not line.strip():
            continue
        source = f"{shown_name(data_file)}:{number}"
        try:
            yield source, _parse_json(line)
        except json.JSONDecodeError as exc:
            yield source, _Problem(f"invalid JSON ({exc.msg} at column {exc.colno})")
        except _Problem as problem:
            yield source, problem


def _messages(record: Any, base: Path, cache: dict[Path, ImageAttachment | BadImage],
              keep_images: bool) -> tuple[Message, ...]:
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
            images.append(_image(base / name, cache, keep_images))
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


def _image(path: Path, cache: dict[Path, ImageAttachment | BadImage], keep_bytes: bool) -> ImageAttachment:
    """Load once per file (datasets often reuse an image across many conversations); without ``keep_bytes``
    only the attachment's identity and size are kept."""
    if path not in cache:
        try:
            image = load_image_path(path)
            cache[path] = image if keep_bytes else ImageAttachment(b"", image.mime, image.width, image.height,
                                                                   image.name, image.sha256)
        except BadImage as exc:
            cache[path] = exc
    found = cache[path]
    if isinstance(found, BadImage):
        raise found
    return found
