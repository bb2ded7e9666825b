"""Input for ``iris chat``: prompt_toolkit on a terminal (history, path completion), plain lines from a pipe.

``iris chat < questions.txt`` reads its input line by line from stdin without prompts, history or a
terminal to draw on. The input history holds what the user typed, so it is private (0600).
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, BinaryIO

from prompt_toolkit import PromptSession
from prompt_toolkit.completion import CompleteEvent, Completer, Completion, PathCompleter
from prompt_toolkit.document import Document
from prompt_toolkit.history import FileHistory, InMemoryHistory
from prompt_toolkit.key_binding import KeyBindings
from prompt_toolkit.keys import Keys

from cli.chat import HELP

SLASH_COMMANDS = [line.split()[0] for line in HELP.splitlines() if line.startswith("/")]


class ChatCompleter(Completer):
    """Slash commands at the start of a line; file paths for the word under the cursor."""

    def __init__(self) -> None:
        self._paths = PathCompleter(expanduser=True)

    def get_completions(self, document: Document, complete_event: CompleteEvent) -> Iterable[Completion]:
        before = document.text_before_cursor
        if before.startswith("/") and " " not in before:
            for command in SLASH_COMMANDS:
                if command.startswith(before):
                    yield Completion(command, start_position=-len(before))
            return
        word = before.split(" ")[-1]
        if not word or not ("/" in word or word.startswith(("~", "."))):
            return
        yield from self._paths.get_completions(Document(word, len(word)), complete_event)


def make_reader(history_file: Path | None, **session_options: Any) -> Callable[[str], str]:
    """A line reader: prompt_toolkit on a terminal, plain lines when stdin is a pipe or a file.

    ``session_options`` lets tests pass a pipe ``input`` and a dummy ``output`` to prompt_toolkit.
    """
    if not session_options and (sys.stdin is None or not sys.stdin.isatty()):
        return read_lines(sys.stdin.buffer if sys.stdin is not None else io.BytesIO())
    history = _private_history(history_file) if history_file is not None else InMemoryHistory()
    session: PromptSession[str] = PromptSession(history=history, completer=ChatCompleter(),
                                                complete_while_typing=False, key_bindings=_no_mouse_reports(),
                                                **session_options)

    def read(prompt: str, default: str = "") -> str:  # default: /edit's pre-filled text
        return session.prompt(prompt, default=default)

    return read


def _no_mouse_reports() -> KeyBindings:
    """Drop what prompt_toolkit parses as a mouse report. Iris asks the terminal for none, so one is escape bytes
    typed at the prompt (``ESC [ 31 m``), on which prompt_toolkit's own handler raised and stopped the prompt."""
    bindings = KeyBindings()

    @bindings.add(Keys.Vt100MouseEvent)
    def _drop(event: Any) -> None:
        return None

    return bindings


def read_lines(stream: BinaryIO) -> Callable[[str], str]:
    """Lines of ``stream`` without their line ending; bytes that are not UTF-8 arrive as lone surrogates,
    which the chat refuses line by line."""

    def read_line(_prompt: str) -> str:
        line = stream.readline()
        if not line:
            raise EOFError
        line = line[:-1] if line.endswith(b"\n") else line
        line = line[:-1] if line.endswith(b"\r") else line
        return line.decode("utf-8", "surrogateescape")

    return read_line


def _private_history(path: Path) -> FileHistory:
    """The history file, created (or tightened) to 0600 before prompt_toolkit appends to it."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.fchmod(descriptor, 0o600)
    finally:
        os.close(descriptor)
    return FileHistory(str(path))
