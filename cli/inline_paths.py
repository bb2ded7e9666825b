"""Find image paths written inline in a chat message.

Terminals paste dragged files as absolute paths, often quoted or with
backslash-escaped spaces; users type relative and ``~`` paths. A word becomes
an attachment only when it names an existing file that is an image (by
extension or magic bytes); anything else stays in the text. Words are whatever the user or a pipe
sends: one that no file system could name (too long, a NUL byte, an unknown ``~user``) is text too,
never an error.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from assistant.vision import sniff_format

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp", ".tif", ".tiff"}


@dataclass(frozen=True)
class Word:
    text: str  # unquoted, unescaped
    start: int
    end: int


def split_words(line: str) -> list[Word]:
    """Split on whitespace, honouring '...' / "..." quoting and backslash-escaped spaces."""
    words: list[Word] = []
    index = 0
    while index < len(line):
        if line[index].isspace():
            index += 1
            continue
        start = index
        if line[index] in "'\"":
            quote = line[index]
            close = line.find(quote, index + 1)
            if close != -1:
                words.append(Word(line[index + 1:close], start, close + 1))
                index = close + 1
                continue
        chars: list[str] = []
        while index < len(line) and not line[index].isspace():
            if line[index] == "\\" and index + 1 < len(line) and line[index + 1] in " \\'\"()&":
                chars.append(line[index + 1])
                index += 2
                continue
            chars.append(line[index])
            index += 1
        words.append(Word("".join(chars), start, index))
    return words


def _is_image_file(path: Path) -> bool:
    if not os.path.isfile(path):  # False, not an error, for names too long, unreadable places and NUL bytes
        return False
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return True
    try:
        with path.open("rb") as handle:
            return sniff_format(handle.read(16)) is not None
    except OSError:
        return False


def resolve_candidate(text: str, cwd: Path) -> Path | None:
    """The image file a word names, if it names one; ``None`` leaves the word as text."""
    if not text or text.startswith("/") and text.count("/") == 1 and "." not in text:
        return None  # "/help"-like words are commands, not paths
    looks_like_path = "/" in text or text.startswith("~") or Path(text).suffix.lower() in IMAGE_SUFFIXES
    if not looks_like_path:
        return None
    try:
        path = Path(os.path.expanduser(text))
    except ValueError:  # "~user" lookups refuse NUL bytes
        return None
    if not path.is_absolute():
        path = cwd / path
    return path if _is_image_file(path) else None


def extract_images(line: str, cwd: Path | None = None) -> tuple[str, list[Path]]:
    """Return the message text without the image paths, and the paths in order."""
    cwd = cwd or Path.cwd()
    found: list[Path] = []
    pieces: list[str] = []
    last = 0
    for word in split_words(line):
        path = resolve_candidate(word.text, cwd)
        if path is None:
            continue
        found.append(path)
        pieces.append(line[last:word.start])
        last = word.end
    pieces.append(line[last:])
    text = " ".join("".join(pieces).split()) if found else line
    return text, found
