"""prompt_toolkit input for ``iris chat``: persistent history and tab-completion of file paths."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from prompt_toolkit import PromptSession
from prompt_toolkit.completion import CompleteEvent, Completer, Completion, PathCompleter
from prompt_toolkit.document import Document
from prompt_toolkit.history import FileHistory, InMemoryHistory

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
    """A line reader; ``session_options`` lets tests pass a pipe ``input`` and a dummy ``output``."""
    if history_file is not None:
        history_file.parent.mkdir(parents=True, exist_ok=True)
    history = FileHistory(str(history_file)) if history_file is not None else InMemoryHistory()
    session: PromptSession[str] = PromptSession(history=history, completer=ChatCompleter(),
                                                complete_while_typing=False, **session_options)
    return lambda prompt: session.prompt(prompt)
