"""One generation at a time on the device, shared fairly between users.

Waiting requests are served round-robin across users (one request per user per
round), so someone who queues several messages cannot starve the others. Before
a request joins, three checks run: the per-user rate limit (sliding window), the
per-user cap on pending requests, and the global cap past which the bot says
"busy" at once instead of making people wait behind a long line.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from assistant.errors import IrisError


class QueueRefused(IrisError):
    """The request was not queued (busy, rate-limited or too many pending); the message says why."""


@dataclass(eq=False)
class Ticket:
    """One request's place in the queue; ``running`` once it holds the device."""

    user_id: int
    enqueued_at: float
    running: bool = False
    cancelled: bool = False
    started_at: float | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event, repr=False)


class FairQueue:
    """Round-robin queue with per-user and global caps; ``clock`` is injectable for tests."""

    def __init__(self, *, max_waiting: int, per_user_pending: int, rate_limit: int, rate_window_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_waiting = max_waiting
        self.per_user_pending = per_user_pending
        self.rate_limit = rate_limit
        self.rate_window_s = rate_window_s
        self._clock = clock
        self._waiting: dict[int, deque[Ticket]] = {}
        self._turn_order: deque[int] = deque()  # users with waiting tickets, next to be served first
        self._running: Ticket | None = None
        self._recent: dict[int, deque[float]] = {}
        self.max_wait_s = 0.0

    @property
    def waiting(self) -> int:
        return sum(len(tickets) for tickets in self._waiting.values())

    @property
    def busy(self) -> bool:
        return self._running is not None

    def pending_for(self, user_id: int) -> int:
        running = 1 if self._running is not None and self._running.user_id == user_id else 0
        return running + len(self._waiting.get(user_id, ()))

    def enter(self, user_id: int) -> Ticket:
        """Queue a request, or raise ``QueueRefused`` with a one-line reason."""
        now = self._clock()
        recent = self._recent.setdefault(user_id, deque())
        while recent and now - recent[0] >= self.rate_window_s:
            recent.popleft()
        if len(recent) >= self.rate_limit:
            retry = self.rate_window_s - (now - recent[0])
            raise QueueRefused(f"slow down: {self.rate_limit} messages per {self.rate_window_s:g} s; "
                               f"try again in {max(1, round(retry))} s")
        if self.pending_for(user_id) >= self.per_user_pending:
            raise QueueRefused(f"you already have {self.per_user_pending} message(s) waiting for an answer; "
                               "wait for them or /stop")
        if self.waiting >= self.max_waiting:
            raise QueueRefused(f"busy: {self.waiting} messages are already waiting; try again in a minute")
        recent.append(now)
        ticket = Ticket(user_id, now)
        if user_id not in self._waiting:
            self._waiting[user_id] = deque()
            self._turn_order.append(user_id)
        self._waiting[user_id].append(ticket)
        self._advance()
        return ticket

    def position(self, ticket: Ticket) -> int:
        """1 = next to run; 0 = running (or gone). Simulates the round-robin order."""
        if ticket.running or ticket.cancelled:
            return 0
        queues = [list(self._waiting[user]) for user in self._turn_order]
        position = 0
        for depth in range(max((len(q) for q in queues), default=0)):
            for tickets in queues:
                if depth < len(tickets):
                    position += 1
                    if tickets[depth] is ticket:
                        return position
        return 0

    async def wait(self, ticket: Ticket, on_position: Callable[[int], Awaitable[None]]) -> bool:
        """Wait for the device, reporting each new position; False if the ticket was cancelled."""
        shown = -1
        while not (ticket.running or ticket.cancelled):
            position = self.position(ticket)
            if position != shown:
                shown = position
                await on_position(position)
                continue  # the callback awaited; re-check before sleeping
            ticket._changed.clear()
            await ticket._changed.wait()
        return ticket.running

    def cancel(self, ticket: Ticket) -> None:
        """Take a waiting ticket out of line (a running one is stopped by cancelling its turn)."""
        if ticket.running or ticket.cancelled:
            return
        ticket.cancelled = True
        self._remove_waiting(ticket)
        self._notify_all()
        ticket._changed.set()

    def release(self, ticket: Ticket) -> None:
        """The running request is done with the device: hand it to the next user in turn."""
        if self._running is ticket:
            self._running = None
            self._advance()

    def _remove_waiting(self, ticket: Ticket) -> None:
        tickets = self._waiting.get(ticket.user_id)
        if tickets is not None and ticket in tickets:
            tickets.remove(ticket)
            if not tickets:
                del self._waiting[ticket.user_id]
                self._turn_order.remove(ticket.user_id)

    def _advance(self) -> None:
        if self._running is None and self._turn_order:
            user = self._turn_order.popleft()
            ticket = self._waiting[user].popleft()
            if self._waiting[user]:
                self._turn_order.append(user)  # back of the line for this user's next request
            else:
                del self._waiting[user]
            ticket.running = True
            ticket.started_at = self._clock()
            self.max_wait_s = max(self.max_wait_s, ticket.started_at - ticket.enqueued_at)
            self._running = ticket
            ticket._changed.set()
        self._notify_all()

    def _notify_all(self) -> None:
        for tickets in self._waiting.values():
            for ticket in tickets:
                ticket._changed.set()
