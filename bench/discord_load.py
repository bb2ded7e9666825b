"""Load test of the Discord bot: 20 simulated users x 5 messages on dpytest's fake Discord.

The model is the test FakeBackend with a fixed per-token delay; pacing uses the
bot's real defaults (5 sends/edits per 5 s per channel). Prints whether every
message was answered or told busy (none lost), the longest queue wait, and the
request rate per channel against Discord's limit. Run: ``python bench/discord_load.py``.
"""

from __future__ import annotations

import asyncio
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from discord_harness import Harness  # noqa: E402
from fakes import FakeBackend  # noqa: E402

from assistant.dialogue import DialogueManager  # noqa: E402
from assistant.store import Store  # noqa: E402
from integrations.discord_bot.settings import DiscordSettings  # noqa: E402

USERS, MESSAGES, CHANNELS = 20, 5, 10
TOKEN_DELAY_S = 0.005
REPLY = " ".join(f"token{i}" for i in range(40))
LIMIT_OPS, LIMIT_WINDOW_S = 5, 5.0


def max_in_window(stamps: list[float], window: float) -> int:
    """Most requests inside any ``window``-second span."""
    best, start = 0, 0
    for end in range(len(stamps)):
        while stamps[end] - stamps[start] >= window:
            start += 1
        best = max(best, end - start + 1)
    return best


async def user(harness: Harness, index: int, sent: list[int], rng: random.Random) -> None:
    for number in range(MESSAGES):
        await asyncio.sleep(rng.uniform(0.5, 4.0))
        message = await harness.say(f"user {index} message {number}", member=index, channel=index % CHANNELS,
                                    settle=False)
        sent.append(message.id)


async def main() -> None:
    with tempfile.TemporaryDirectory() as directory:
        store = Store(Path(directory) / "bench.db")
        backend = FakeBackend([REPLY] * (USERS * MESSAGES), delay=TOKEN_DELAY_S)
        settings = DiscordSettings(sync_commands=False, shutdown_grace_s=1.0)
        harness = await Harness.start(DialogueManager(backend, store), settings, members=USERS,
                                      text_channels=CHANNELS)
        rng = random.Random(0)
        sent: list[int] = []
        started = time.monotonic()
        await asyncio.gather(*(user(harness, i, sent, rng) for i in range(USERS)))
        await harness.settle()
        elapsed = time.monotonic() - started
        transcript = harness.transcript
        replies = [transcript.reply_to(message_id) for message_id in sent]
        answered = sum(reply == REPLY for reply in replies)
        busy = sum(reply.startswith("⚠️") for reply in replies)
        lost = len(replies) - answered - busy
        per_channel = [max_in_window(sorted(stamps), LIMIT_WINDOW_S) for stamps in transcript.channel_ops.values()]
        mean_rates = [len(stamps) / elapsed for stamps in transcript.channel_ops.values()]
        print(f"messages: {len(sent)} from {USERS} users in {CHANNELS} channels, {elapsed:.1f} s")
        print(f"answered: {answered}   told busy/limited: {busy}   lost: {lost}")
        print(f"generations run: {len(backend.calls)} (one at a time)")
        print(f"max queue wait: {harness.bot.answerer.queue.max_wait_s:.2f} s")
        print(f"sends+edits per channel: at most {max(per_channel)} in any {LIMIT_WINDOW_S:g} s window "
              f"= {max(per_channel) / LIMIT_WINDOW_S:.2f}/s (Discord: {LIMIT_OPS} per {LIMIT_WINDOW_S:g} s); "
              f"mean over the run {sum(mean_rates) / len(mean_rates):.2f}/s")
        ok = lost == 0 and answered + busy == USERS * MESSAGES and max(per_channel) <= LIMIT_OPS
        print("OK" if ok else "FAILED")
        await harness.close()
        store.close()
        if not ok:
            raise SystemExit(1)


if __name__ == "__main__":
    asyncio.run(main())
