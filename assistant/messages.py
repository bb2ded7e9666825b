"""Pure conversation values: roles, messages and image attachments (no torch here)."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from enum import StrEnum

# The adapter name that runs the base model with every adapter off; a conversation with no adapter of its own
# uses the backend's active adapter (the last one given at start).
BASE_MODEL = "none"

_SURROGATES = re.compile("[\ud800-\udfff]")


def valid_text(text: str) -> str:
    """``text`` with lone surrogates (what undecodable bytes in argv or stdin, or ``\\ud800`` escapes in JSON,
    become) replaced by U+FFFD: they cannot be stored as UTF-8, tokenized or shown."""
    return _SURROGATES.sub("\ufffd", text)


class Role(StrEnum):
    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"


@dataclass(frozen=True)
class ImageAttachment:
    """A validated image; ``sha256`` of the original bytes is its identity everywhere."""

    data: bytes
    mime: str
    width: int
    height: int
    name: str = ""
    sha256: str = field(default="")

    def __post_init__(self) -> None:
        if not self.sha256:
            object.__setattr__(self, "sha256", hashlib.sha256(self.data).hexdigest())

    @property
    def extension(self) -> str:
        return {"image/png": ".png", "image/jpeg": ".jpg", "image/gif": ".gif",
                "image/webp": ".webp", "image/bmp": ".bmp", "image/tiff": ".tiff"}.get(self.mime, ".img")

    def __repr__(self) -> str:  # keep bytes out of logs and test failure output
        return f"ImageAttachment({self.name or self.sha256[:12]}, {self.mime}, {self.width}x{self.height})"


@dataclass(frozen=True)
class Message:
    """One turn. ``author`` names the speaker among several humans (Discord)."""

    role: Role
    text: str
    images: tuple[ImageAttachment, ...] = ()
    interrupted: bool = False
    author: str | None = None
    id: int | None = None

    def without_images(self) -> Message:
        return Message(self.role, self.text, (), self.interrupted, self.author, self.id)
