"""How many threads decode the next token on a CPU: one, or the process's team, whichever is faster right now.

A decode step of a small model is a few hundred tiny kernels. Most run on one thread whatever the setting, but the
int4 products (``cpu_quant``) share their work among the team: on 2 idle cores a default-model step takes 11.4 ms
with 2 threads against 14.4 ms with one. An OpenMP team, though, waits for every member at each of its ~120
products per step, so when another process keeps one core busy the same step takes 38 ms with 2 threads and
14.6 ms with one. No fixed setting is right on a shared machine; the engine measures as it goes.
"""

from __future__ import annotations

import statistics
from collections import deque

# Every TRY_EVERY tokens the count not in use decodes TRY_TOKENS tokens, so a change of load is noticed within a
# fraction of a second. Each count is judged by the median of its last RECENT step times: a lone slow step (a page
# fault, another process's burst) does not send a whole answer to the slower count, a lasting change does in 3 steps.
TRY_EVERY = 32
TRY_TOKENS = 2
RECENT = 5


class DecodeThreads:
    """Chooses one thread or ``team`` threads for each token from the measured step times of both. Kept by the
    backend across turns, so a conversation starts with what the last turn learnt."""

    def __init__(self, team: int) -> None:
        self._step_seconds: dict[int, deque[float]] = {team: deque(maxlen=RECENT), 1: deque(maxlen=RECENT)}
        self._tokens = 0

    def next_count(self) -> int:
        """The thread count for the next token: an unmeasured count first, then mostly the faster one."""
        unmeasured = [count for count, seconds in self._step_seconds.items() if not seconds]
        if unmeasured:
            return unmeasured[0]
        faster, slower = sorted(self._step_seconds, key=lambda count: statistics.median(self._step_seconds[count]))
        return slower if self._tokens % TRY_EVERY < TRY_TOKENS else faster

    def record(self, count: int, seconds: float) -> None:
        """A token took ``seconds`` on ``count`` threads."""
        self._step_seconds[count].append(seconds)
        self._tokens += 1
