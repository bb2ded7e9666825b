"""Showing a growing answer in Discord: paced edits, 429 back-off, and 2000-character splits.

Discord allows about 5 message edits per 5 s per channel, so every send and edit
in a channel goes through one ``ChannelPacer`` and the streamer always shows the
*latest* text when its turn comes (chunks that arrive meanwhile are coalesced).
Long answers continue in new messages; a split inside a fenced code block closes
the fence and reopens it, with its language, in the next message.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import discord

log = logging.getLogger("iris.discord")

DISCORD_LIMIT = 2000
CURSOR = " ▌"
NO_MENTIONS = discord.AllowedMentions.none()
_FENCE = re.compile(r"^\s*(```|~~~)(.*)$")


def _open_fence(text: str) -> str | None:
    """The opening line of the code fence still open at the end of ``text``, if any."""
    opening: str | None = None
    for line in text.split("\n"):
        match = _FENCE.match(line)
        if match is None:
            continue
        if opening is None:
            opening = line.strip()
        elif match.group(1) == opening[:3] and not match.group(2).strip():
            opening = None
    return opening


def split_first(text: str, limit: int = DISCORD_LIMIT) -> tuple[str, int, str]:
    """Cut ``text`` for one message: ``(head, cut, reopen)``.

    ``head`` (at most ``limit`` chars) is ``text[:cut]`` plus a closing fence if
    the cut fell inside a code block; ``reopen`` is what the next message must
    start with to continue that block. Breaks prefer a blank line, then a line
    end, then a space, in the second half of the window.
    """
    if len(text) <= limit:
        return text, len(text), ""
    window = limit - 4  # room for "\n```"
    cut = -1
    for separator in ("\n\n", "\n", " "):
        found = text.rfind(separator, window // 2, window)
        if found > 0:
            cut = found + len(separator)
            break
    if cut <= 0:
        cut = window
    fence = _open_fence(text[:cut])
    head = text[:cut].rstrip("\n") if fence is None else text[:cut].rstrip("\n") + "\n" + fence[:3]
    reopen = "" if fence is None else fence + "\n"
    return head, cut, reopen


def split_message(text: str, limit: int = DISCORD_LIMIT) -> list[str]:
    """Split a whole answer into Discord-sized messages without breaking code blocks."""
    pieces: list[str] = []
    while True:
        head, cut, reopen = split_first(text, limit)
        pieces.append(head)
        if cut >= len(text):
            return pieces
        text = reopen + text[cut:]


def _retry_after(error: discord.HTTPException | discord.RateLimited) -> float | None:
    """Seconds to wait when Discord answered 429, else None."""
    if isinstance(error, discord.RateLimited):
        return error.retry_after
    if error.status == 429:  # discord.py retries most 429s itself; this is what got through
        headers = getattr(error.response, "headers", None) or {}
        try:
            return float(headers.get("Retry-After", 1.0))
        except ValueError:
            return 1.0
    return None


class ChannelPacer:
    """At most ``ops`` sends/edits per ``window_s`` seconds per channel (sliding window)."""

    def __init__(self, ops: int, window_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ops = ops
        self.window_s = window_s * 1.05  # margin: Discord's clock sees our requests with some jitter
        self._clock = clock
        self._history: dict[int, deque[float]] = {}
        self._blocked_until: dict[int, float] = {}
        self._locks: dict[int, asyncio.Lock] = {}

    async def slot(self, channel_id: int) -> None:
        """Wait until one more request in this channel stays inside the limit, then claim it."""
        lock = self._locks.setdefault(channel_id, asyncio.Lock())
        async with lock:
            history = self._history.setdefault(channel_id, deque())
            while True:
                now = self._clock()
                while history and now - history[0] >= self.window_s:
                    history.popleft()
                wait = self._blocked_until.get(channel_id, 0.0) - now
                if len(history) >= self.ops:
                    wait = max(wait, history[0] + self.window_s - now)
                if wait <= 0:
                    history.append(now)
                    return
                await asyncio.sleep(wait)

    def back_off(self, channel_id: int, seconds: float) -> None:
        """Discord said 429: nothing more in this channel for ``seconds``."""
        until = self._clock() + seconds
        self._blocked_until[channel_id] = max(self._blocked_until.get(channel_id, 0.0), until)

    async def call(self, channel_id: int, request: Callable[[], Awaitable[Any]], attempts: int = 3) -> Any:
        """Run one paced request, honouring 429 retry-after up to ``attempts`` times."""
        for attempt in range(attempts):
            await self.slot(channel_id)
            try:
                return await request()
            except (discord.HTTPException, discord.RateLimited) as error:
                retry_after = _retry_after(error)
                if retry_after is None or attempt == attempts - 1:
                    raise
                log.warning("rate limited in channel %s; retrying in %.1f s", channel_id, retry_after)
                self.back_off(channel_id, retry_after)
        raise AssertionError("unreachable")


class ReplyStream:
    """The bot's message(s) answering one user message, rewritten as the text grows.

    ``show(text)`` makes Discord display ``text`` (the whole reply so far). Messages
    that filled up are frozen and only the live (last) one is edited, so the text
    must only grow past what is frozen, which holds for an answer after a fixed prefix.
    Callers must not run two ``show`` calls of one stream at once. With ``channel`` (a thread
    opened for the anchor) the reply is posted there, its first part referring to nothing.
    """

    def __init__(self, anchor: discord.Message, pacer: ChannelPacer, limit: int = DISCORD_LIMIT, *,
                 channel: discord.abc.Messageable | None = None) -> None:
        self.anchor = anchor
        self.channel: Any = channel or anchor.channel
        self.messages: list[discord.Message] = []
        self._pacer = pacer
        self._limit = limit
        self._frozen = 0  # chars of the text already shown in frozen messages
        self._carry = ""  # the fence reopening that starts the live message
        self._live: discord.Message | None = None
        self._shown = ""

    async def show(self, text: str, *, final: bool = False) -> None:
        """Display ``text``; while not ``final`` a cursor shows that more is coming."""
        live_limit = self._limit if final else self._limit - len(CURSOR)
        rest = self._carry + text[self._frozen:]
        while True:
            head, cut, reopen = split_first(rest, live_limit)
            if cut >= len(rest):
                break
            await self._render(head)
            self._frozen += cut - len(self._carry)
            self._carry = reopen
            self._live, self._shown = None, ""
            rest = reopen + rest[cut:]
        await self._render(rest if final else rest + CURSOR)

    async def _render(self, content: str) -> None:
        content = content if content.strip() else "…"
        live = self._live
        if live is not None and content == self._shown:
            return
        channel = self.channel
        if live is None:
            # each part replies to the one before, so the answer reads as one chain under the question
            previous = self.messages[-1] if self.messages else \
                self.anchor if channel.id == self.anchor.channel.id else None
            reference = previous.to_reference(fail_if_not_exists=False) if previous is not None else None
            sent = await self._pacer.call(channel.id, lambda: channel.send(
                content, reference=reference, mention_author=False, allowed_mentions=NO_MENTIONS))
            self.messages.append(sent)
            self._live = sent
        else:
            edited = await self._pacer.call(channel.id, lambda: live.edit(content=content,
                                                                          allowed_mentions=NO_MENTIONS))
            self.messages[-1] = self._live = edited
        self._shown = content
