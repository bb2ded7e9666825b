"""The one line in front of the device: first come, first served, with a cap on how many may wait.

The device runs one generation at a time (``LocalBackend`` holds a lock per device), so requests wait here, in
the event loop, rather than on that lock in threads: a waiting request costs no thread, a client that goes away
leaves the line at once, nobody barges ahead, and a full line is refused at the door (HTTP 429) instead of
growing without bound.
"""

from __future__ import annotations

import asyncio
from collections import deque


class QueueFull(Exception):
    """Every place in the line is taken."""


class Ticket:
    """One request's place: ``wait()`` until it is its turn; ``release()`` (always, idempotent) leaves the line
    or hands the device to the next in line."""

    def __init__(self, queue: DeviceQueue) -> None:
        self._queue = queue
        self._turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._released = False

    async def wait(self) -> None:
        await asyncio.shield(self._turn)  # a cancelled waiter leaves through release(); the future stays usable

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._queue._leave(self)


class DeviceQueue:
    """``slots`` requests hold the device at once; at most ``max_waiting`` more wait their turn."""

    def __init__(self, max_waiting: int, slots: int = 1) -> None:
        self.max_waiting = max_waiting
        self.slots = slots
        self._free = slots
        self._line: deque[Ticket] = deque()

    @property
    def running(self) -> int:
        return self.slots - self._free

    @property
    def waiting(self) -> int:
        return len(self._line)

    def admit(self) -> Ticket:
        """A place in line (the device at once when it is free and nobody waits); ``QueueFull`` when none is left."""
        if self._free == 0 and len(self._line) >= self.max_waiting:
            raise QueueFull(f"the server is busy: {self.running} answer(s) running and {len(self._line)} waiting, "
                            "the most it queues; retry later")
        ticket = Ticket(self)
        if self._free and not self._line:
            self._free -= 1
            ticket._turn.set_result(None)
        else:
            self._line.append(ticket)
        return ticket

    def _leave(self, ticket: Ticket) -> None:
        if not ticket._turn.done():
            self._line.remove(ticket)
            ticket._turn.cancel()
            return
        if self._line:
            self._line.popleft()._turn.set_result(None)
        else:
            self._free += 1
