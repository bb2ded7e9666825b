"""Threads the bot opens: where a conversation moves (``/thread``) or starts (``auto_thread``), and their names.

A thread is named from the conversation's first message, made safe for Discord: mentions of users, roles and
channels, ``@everyone`` and ``@here`` are taken out, control characters become spaces, and the name fits
Discord's 100-character limit.
"""

from __future__ import annotations

import re

THREAD_NAME_LIMIT = 100
FALLBACK_NAME = "Iris conversation"
_MENTIONS = re.compile(r"<(?:@[!&]?|#)\d+>|<a?:\w+:\d+>|</[^<>:]+:\d+>")
_MASS_MENTIONS = re.compile(r"@(?:everyone|here)", re.IGNORECASE)


def thread_name(text: str) -> str:
    """A thread name from a message's text: no mentions, one line, at most ``THREAD_NAME_LIMIT`` characters."""
    text = _MASS_MENTIONS.sub(" ", _MENTIONS.sub(" ", text))
    text = " ".join("".join(ch if ch.isprintable() else " " for ch in text).split())
    if len(text) > THREAD_NAME_LIMIT:
        text = text[: THREAD_NAME_LIMIT - 1].rstrip() + "…"
    return text or FALLBACK_NAME
