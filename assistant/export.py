"""Write conversations as LLaVA JSON training data, with the image files beside it.

An export never destroys anything by surprise: a directory that already holds something is refused
unless the caller forces it (the same rule as ``iris data synth``), and nothing is ever written
through a symlink (a planted ``dataset.json``, ``images/`` or image link would send the bytes
elsewhere). Files land by rename, so a failed export leaves no half-written ``dataset.json``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from assistant.errors import IrisError
from assistant.messages import Message, Role

_LLAVA_ROLES = {Role.SYSTEM: "system", Role.USER: "human", Role.ASSISTANT: "gpt"}
DATA_FILE = "dataset.json"
IMAGE_DIR = "images"


def llava_record(record_id: str, messages: Sequence[Message], image_dir: str = IMAGE_DIR) -> dict[str, Any]:
    """One LLaVA sample: ``<image>`` markers in the human turns, image paths relative to the JSON."""
    images: list[str] = []
    conversations = []
    for message in messages:
        if message.role is Role.ASSISTANT and message.interrupted and not message.text:
            continue
        markers = "<image>\n" * len(message.images)
        images.extend(f"{image_dir}/{image.sha256}{image.extension}" for image in message.images)
        conversations.append({"from": _LLAVA_ROLES[message.role], "value": markers + message.text})
    record: dict[str, Any] = {"id": record_id, "conversations": conversations}
    if len(images) == 1:
        record["image"] = images[0]
    elif images:
        record["image"] = images
    return record


def export_llava(records: Sequence[tuple[str, Sequence[Message]]], out_dir: Path, *, force: bool = False) -> Path:
    """Write ``dataset.json`` and ``images/`` under ``out_dir``; returns the JSON path.

    ``out_dir`` must be new or empty unless ``force``, which replaces its ``dataset.json`` and adds images.
    """
    try:
        _check_target(out_dir, force)
        images = out_dir / IMAGE_DIR
        images.mkdir(parents=True, exist_ok=True)
        for _, messages in records:
            for message in messages:
                for image in message.images:
                    _write_image(images / f"{image.sha256}{image.extension}", image.data)
        target = out_dir / DATA_FILE
        text = json.dumps([llava_record(rid, messages) for rid, messages in records], indent=2, ensure_ascii=False)
        _replace(target, text.encode("utf-8"))
    except OSError as error:  # read-only places, /proc, /sys, a full disk
        raise IrisError(f"{out_dir}: cannot export there ({error.strerror or type(error).__name__})") from None
    return target


def _check_target(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise IrisError(f"{out_dir}: exists and is not a directory")
    for name in (DATA_FILE, IMAGE_DIR):
        if (out_dir / name).is_symlink():
            raise IrisError(f"{out_dir / name}: is a symlink; an export never writes through one")
    if (out_dir / IMAGE_DIR).exists() and not (out_dir / IMAGE_DIR).is_dir():
        raise IrisError(f"{out_dir / IMAGE_DIR}: exists and is not a directory")
    if not force and out_dir.is_dir() and any(out_dir.iterdir()):
        raise IrisError(f"{out_dir}: already exists and is not empty; choose a new directory or pass --force "
                        f"to replace its {DATA_FILE}")


def _write_image(target: Path, data: bytes) -> None:
    """Images are named by content: an existing regular file with the same bytes stays as it is."""
    if target.is_symlink():
        raise IrisError(f"{target}: is a symlink; an export never writes through one")
    if target.is_file() and target.stat().st_size == len(data) and target.read_bytes() == data:
        return
    _replace(target, data)


def _replace(target: Path, data: bytes) -> None:
    """Write beside ``target`` and rename over it: a rename replaces a name, it never follows a link."""
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
