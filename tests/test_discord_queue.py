"""Fair use of one device through the bot: queue positions, caps, rate limit, stopping, shutdown."""

from __future__ import annotations

import asyncio

import pytest
from discord_harness import Harness, fast_settings
from fakes import FakeBackend

from assistant.dialogue import DialogueManager
from assistant.store import Store

pytestmark = pytest.mark.asyncio

SLOW_REPLY = " ".join(f"w{i}" for i in range(30))


async def wait_for(condition, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


async def test_waiting_users_see_their_position_and_all_get_answers(store: Store) -> None:
    backend = FakeBackend([SLOW_REPLY] * 4, delay=0.01)
    harness = await Harness.start(DialogueManager(backend, store), members=4)
    questions = [await harness.say(f"question {i}", member=i, settle=False) for i in range(4)]
    await harness.settle()
    shown = [p["content"] for p in harness.transcript.payloads]
    assert any("position 3 in the queue" in text for text in shown)
    assert any("position 1 in the queue" in text for text in shown)
    for question in questions:
        assert harness.transcript.reply_to(question.id) == SLOW_REPLY
    assert harness.bot.answerer.queue.max_wait_s > 0
    await harness.close()


async def test_one_generation_at_a_time(store: Store) -> None:
    running = 0
    peak = 0
    backend = FakeBackend(delay=0.005)
    real_stream = backend.stream

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        try:
            yield from real_stream(*args, **kwargs)
        finally:
            running -= 1

    backend.stream = counting  # type: ignore[method-assign]
    harness = await Harness.start(DialogueManager(backend, store), members=3)
    for i in range(3):
        await harness.say("a b c d e f g h", member=i, settle=False)
    await harness.settle()
    assert peak == 1 and len(backend.calls) == 3
    await harness.close()


async def test_rate_limit_and_per_user_cap(store: Store) -> None:
    backend = FakeBackend(delay=0.01)
    settings = fast_settings(rate_limit=3, rate_window_s=60, per_user_queue=2)
    harness = await Harness.start(DialogueManager(backend, store), settings)
    first = [await harness.say(f"{SLOW_REPLY} {i}", settle=False) for i in range(3)]
    await harness.settle()
    replies = [harness.transcript.reply_to(q.id) for q in first]
    assert replies[2].startswith("⚠️ you already have 2 message(s) waiting")
    assert not replies[0].startswith("⚠️") and not replies[1].startswith("⚠️")
    third = await harness.say("a third one")  # the refused message did not use up the rate limit
    assert not harness.transcript.reply_to(third.id).startswith("⚠️")
    limited = await harness.say("one more")
    assert harness.transcript.reply_to(limited.id).startswith("⚠️ slow down: 3 messages per 60 s")
    other = await harness.say("I am someone else", member=1)
    assert not harness.transcript.reply_to(other.id).startswith("⚠️")
    await harness.close()


async def test_global_cap_answers_busy_at_once(store: Store) -> None:
    backend = FakeBackend(delay=0.01)
    harness = await Harness.start(DialogueManager(backend, store), fast_settings(max_queue=1), members=3)
    questions = [await harness.say(SLOW_REPLY, member=i, settle=False) for i in range(3)]
    await harness.settle()
    replies = [harness.transcript.reply_to(q.id) for q in questions]
    assert [r.startswith("⚠️ busy") for r in replies] == [False, False, True]
    await harness.close()


async def test_stop_reaction_from_the_author_only(store: Store) -> None:
    backend = FakeBackend([" ".join(["word"] * 400)], delay=0.01)
    harness = await Harness.start(DialogueManager(backend, store))
    question = await harness.say("talk a lot", settle=False)
    await wait_for(lambda: harness.transcript.replies_to(question.id))
    await harness.react(1, question.id)  # someone else: ignored
    await asyncio.sleep(0.05)
    assert harness.bot.answerer.jobs
    answer_id = next(i for i, ref in harness.transcript.reference.items() if ref == question.id)
    await harness.react(0, answer_id)  # the author, on the answer
    await harness.settle()
    reply = harness.transcript.reply_to(question.id)
    assert reply.endswith("⏹ stopped.") and reply.count("word") < 400
    conversation = store.list_conversations(source="discord")[0]
    assert store.thread(conversation.id)[-1].interrupted
    await harness.close()


async def test_slash_stop_cancels_running_and_queued(store: Store) -> None:
    backend = FakeBackend([" ".join(["word"] * 400)] * 2, delay=0.01)
    harness = await Harness.start(DialogueManager(backend, store))
    running = await harness.say("first", settle=False)
    queued = await harness.say("second", settle=False)
    await wait_for(lambda: harness.transcript.replies_to(running.id))
    assert await harness.slash("stop") == "⏹ stopped 2 answer(s)."
    await harness.settle()
    assert harness.transcript.reply_to(running.id).endswith("⏹ stopped.")
    assert harness.transcript.reply_to(queued.id) == "⏹ stopped."
    assert len(backend.calls) == 1
    assert await harness.slash("stop") == "⚠️ you have no answer in progress here."
    await harness.close()


async def test_shutdown_interrupts_answers_and_refuses_new_ones(store: Store) -> None:
    backend = FakeBackend([" ".join(["word"] * 400)] * 2, delay=0.01)
    harness = await Harness.start(DialogueManager(backend, store), fast_settings(shutdown_grace_s=0.1))
    running = await harness.say("first", settle=False)
    queued = await harness.say("second", member=1, settle=False)
    await wait_for(lambda: harness.transcript.replies_to(running.id))
    harness.bot.ws = None
    closing = asyncio.create_task(harness.bot.close())
    await wait_for(lambda: harness.bot.answerer.closing)
    late = await harness.say("anyone there?", member=2, settle=False)
    await closing
    assert harness.transcript.reply_to(running.id).endswith("⏹ interrupted: Iris is shutting down.")
    assert harness.transcript.reply_to(queued.id) == "⏹ interrupted: Iris is shutting down."
    assert harness.transcript.reply_to(late.id).startswith("⚠️ Iris is shutting down")
    conversation = store.list_conversations(source="discord")[0]
    assert store.thread(conversation.id)[-1].interrupted
    await harness.close()
