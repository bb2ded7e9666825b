"""The one way text reaches the operator's terminal: control characters shown, never emitted; no markup parsed.

Answers, stored conversations, titles, server errors, paths and manifest values are data that
someone else may have written (a Discord user, the model, a server). Printed raw, an ESC in them
changes the window title, clears the screen, writes the clipboard (OSC 52) or plants links
(OSC 8); bidi overrides reorder what the operator reads. ``visible`` turns every such character
into printable ASCII (``^[`` for ESC, ``\\x9b`` for a C1 control, ``\\u202e`` for a bidi
override, ``\\xff`` for an undecodable byte that Python carries as a lone surrogate). Newlines
and tabs stay; a CR of a CRLF pair goes, a lone CR is shown. Zero-width joiners and the LRM/RLM
marks stay: emoji sequences and right-to-left scripts need them, and they command nothing.

Rich would read ``[/x]`` in data as markup (and crash on it), ``:smile:`` as an emoji code and
numbers as something to highlight: ``styled`` builds rich ``Text`` from data, which is never
parsed, and ``make_console`` turns markup, emoji and highlighting off as a second guard.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from rich.console import Console
from rich.text import Text

# C0 controls except tab and newline, DEL, C1 controls, bidi embeddings/overrides/isolates, lone surrogates.
_HIDDEN = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def _show(match: re.Match[str]) -> str:
    code = ord(match.group())
    if code < 0x20:
        return "^" + chr(code + 0x40)
    if code == 0x7F:
        return "^?"
    if code <= 0x9F:
        return f"\\x{code:02x}"
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8, carried by Python's surrogateescape
        return f"\\x{code - 0xDC00:02x}"
    return f"\\u{code:04x}"


def visible(text: str) -> str:
    """``text`` with every control character shown as printable ASCII; printable text comes back unchanged."""
    return _HIDDEN.sub(_show, text.replace("\r\n", "\n"))


def visible_json(dumped: str) -> str:
    """JSON text with the characters ``json.dumps(ensure_ascii=False)`` leaves raw (DEL, C1, bidi, lone
    surrogates) written as ``\\uXXXX`` escapes: the same JSON value, safe on a terminal and always encodable."""
    return _HIDDEN.sub(lambda match: f"\\u{ord(match.group()):04x}", dumped)


class VisibleStream:
    """``visible`` for text that arrives in chunks: a CR at the end of a chunk waits to see whether an LF follows."""

    def __init__(self) -> None:
        self._held = ""

    def feed(self, chunk: str) -> str:
        text = self._held + chunk
        self._held = "\r" if text.endswith("\r") else ""
        return visible(text[:-1] if self._held else text)

    def end(self) -> str:
        held, self._held = self._held, ""
        return visible(held)


def styled(*parts: str | tuple[str, str]) -> Text:
    """A rich ``Text`` from plain strings and ``(text, style)`` pairs, every piece made visible, none parsed."""
    return Text.assemble(*(visible(part) if isinstance(part, str) else (visible(part[0]), part[1])
                           for part in parts))


def make_console(*, stderr: bool = False, **options: Any) -> Console:
    """A console that never interprets data: no markup, no emoji codes, no highlighting."""
    return Console(stderr=stderr, markup=False, emoji=False, highlight=False, **options)


class VisibleLogRecords(logging.Filter):
    """Makes a log record's message and traceback visible before a handler formats them (Discord names,
    library errors quoting user text); the handler's own colours stay."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
        record.msg, record.args, record.exc_text = visible(message), (), None
        return True
