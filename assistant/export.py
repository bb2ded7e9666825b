"""Write conversations as LLaVA JSON training data, with the image files beside it."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from assistant.messages import Message, Role

_LLAVA_ROLES = {Role.SYSTEM: "system", Role.USER: "human", Role.ASSISTANT: "gpt"}


def llava_record(record_id: str, messages: Sequence[Message], image_dir: str = "images") -> dict[str, Any]:
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


def export_llava(records: Sequence[tuple[str, Sequence[Message]]], out_dir: Path) -> Path:
    """Write ``dataset.json`` and ``images/`` under ``out_dir``; returns the JSON path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "images").mkdir(exist_ok=True)
    for _, messages in records:
        for message in messages:
            for image in message.images:
                target = out_dir / "images" / f"{image.sha256}{image.extension}"
                if not target.exists():
                    target.write_bytes(image.data)
    target = out_dir / "dataset.json"
    target.write_text(json.dumps([llava_record(rid, messages) for rid, messages in records], indent=2,
                                 ensure_ascii=False), encoding="utf-8")
    return target
