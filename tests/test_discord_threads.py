"""Discord threads: ``auto_thread`` opens one per new mention, ``/thread`` moves a conversation into one.

Threads are discord.py's own ``Thread`` objects, announced through its own THREAD_CREATE handling
(``tests/discord_harness.py``), and every message and command goes through discord.py's dispatch.
"""

from __future__ import annotations

import discord
import pytest
from discord_harness import Harness, fast_settings
from fakes import FakeBackend
from hypothesis import given
from hypothesis import strategies as st

from assistant.dialogue import DialogueManager
from assistant.messages import Role
from assistant.store import Store
from integrations.discord_bot.answer import NO_THREAD
from integrations.discord_bot.threads import FALLBACK_NAME, THREAD_NAME_LIMIT, thread_name


async def start(store: Store, backend: FakeBackend | None = None, **settings: object) -> Harness:
    harness = await Harness.start(DialogueManager(backend or FakeBackend(), store), fast_settings(**settings))
    harness.bot.permissions._s = fast_settings(admin_ids=frozenset({harness.member(0).id}), **settings)
    return harness


def user_texts(store: Store, conversation_id: int) -> list[str]:
    return [m.text for m in store.thread(conversation_id) if m.role is Role.USER]


@pytest.mark.asyncio
async def test_auto_thread_opens_a_thread_named_from_the_message_and_talks_there(store: Store) -> None:
    backend = FakeBackend(["first answer", "second answer", "channel answer"])
    harness = await start(store, backend)
    channel = harness.channel()
    assert await harness.slash("set", name="auto_thread", value="on") == "✅ mentions here now open a thread."
    assert store.get_value("discord.channel", str(channel.id))["auto_thread"] is True
    question = await harness.say("<@&77> @everyone how do   rainbows\nform?")
    assert [t["name"] for t in harness.transcript.threads] == ["how do rainbows form?"]
    thread = harness.thread()
    assert isinstance(thread, discord.Thread) and thread.id == question.id and thread.parent_id == channel.id
    assert harness.transcript.in_channel(thread.id) == ["first answer"]
    assert harness.transcript.in_channel(channel.id) == []  # nothing answered in the channel itself
    follow_up = await harness.say("and why curved?", channel=thread, mention=False)  # no mention needed
    assert harness.transcript.in_channel(thread.id)[-1] == "second answer" and follow_up.channel.id == thread.id
    conversation = store.find_external("discord", f"channel:{thread.id}")
    assert conversation is not None
    assert [t.split(": ", 1)[-1] for t in user_texts(store, conversation[0])] == [
        "<@&77> @everyone how do   rainbows\nform?", "and why curved?"]
    assert store.find_external("discord", f"channel:{channel.id}") is None  # the channel has no conversation
    assert await harness.slash("set", name="auto_thread", value="off") == \
        "✅ mentions here are answered in the channel."
    plain = await harness.say("no thread now")
    assert harness.transcript.reply_to(plain.id) == "channel answer" and len(harness.transcript.threads) == 1
    await harness.close()


@pytest.mark.asyncio
async def test_auto_thread_from_the_config_and_a_reply_in_the_channel_stays_there(store: Store) -> None:
    backend = FakeBackend(["in a thread", "in the channel"])
    harness = await start(store, backend, auto_thread=True)
    await harness.slash("set", name="auto_thread", value="off")
    first = await harness.say("answered here")  # the channel's own setting wins over the config's
    assert harness.transcript.threads == []
    await harness.slash("set", name="auto_thread", value="on")
    answer = next(i for i, ref in harness.transcript.reference.items() if ref == first.id)
    await harness.say("a reply continues where it is", reply_to=answer, mention=False)
    assert harness.transcript.threads == [] and len(backend.calls) == 2
    assert await harness.slash("set", name="auto_thread", value="maybe") == \
        "⚠️ auto_thread needs true or false, got 'maybe'"
    await harness.close()


@pytest.mark.asyncio
async def test_a_thread_that_cannot_be_opened_is_answered_in_place_with_a_warning(store: Store) -> None:
    backend = FakeBackend(["still answered"])
    harness = await start(store, backend, auto_thread=True)

    async def forbidden(*args: object, **kwargs: object) -> None:
        from discord.ext.test.backend import FakeRequest

        raise discord.Forbidden(FakeRequest(403, "missing permissions"), "Missing Permissions")  # type: ignore[arg-type]

    harness.bot.http.start_thread_with_message = forbidden  # type: ignore[method-assign]
    question = await harness.say("hello")
    assert harness.transcript.reply_to(question.id) == f"{NO_THREAD}\nstill answered"
    await harness.close()


@pytest.mark.asyncio
async def test_thread_command_carries_the_conversation_into_a_new_thread(store: Store) -> None:
    backend = FakeBackend(["Paris.", "About two million.", "fresh"])
    harness = await start(store, backend)
    channel = harness.channel()
    await harness.say("what is the capital of <@123> France?")
    conversation_id = store.find_external("discord", f"channel:{channel.id}")[0]  # type: ignore[index]
    reply = await harness.slash("thread", member=1)  # for everyone, not only admins
    thread = harness.thread()
    assert reply == f"🧵 this conversation continues in <#{thread.id}>."
    assert thread.name == "what is the capital of France?" and thread.owner_id == harness.bot.user.id
    assert thread.type is discord.ChannelType.public_thread
    assert harness.transcript.in_channel(thread.id) == [
        f"🧵 conversation #{conversation_id} continues here from <#{channel.id}>; no need to mention Iris in "
        "this thread."]
    await harness.say("and its population?", channel=thread, mention=False)
    assert harness.transcript.in_channel(thread.id)[-1] == "About two million."
    seen = [m.text.split(": ", 1)[-1] for m in backend.calls[1]["messages"]]
    assert seen == ["what is the capital of <@123> France?", "Paris.", "and its population?"]
    await harness.say("something new")  # the channel starts afresh
    assert [m.text.split(": ", 1)[-1] for m in backend.calls[2]["messages"]] == ["something new"]
    assert len(store.list_conversations(source="discord")) == 2
    await harness.close()


@pytest.mark.asyncio
async def test_thread_command_refusals_are_one_line(store: Store) -> None:
    harness = await start(store)
    assert await harness.slash("thread") == \
        "⚠️ no conversation here yet to carry into a thread: mention Iris first"
    await harness.slash("set", name="auto_thread", value="on")
    await harness.say("open one")
    assert await harness.slash("thread", channel=harness.thread()) == \
        "⚠️ /thread works in a server's text channel (not in a thread or a DM)"
    assert await harness.slash("set", name="auto_thread", value="on", channel=harness.thread()) == \
        "⚠️ auto_thread is set in a server's text channel (not in a thread or a DM)"
    assert len(harness.transcript.threads) == 1
    await harness.close()


@given(st.text(max_size=300))
def test_thread_names_never_mention_anyone_and_fit_discord(text: str) -> None:
    name = thread_name(text)
    assert 0 < len(name) <= THREAD_NAME_LIMIT and name == name.strip()
    assert all(ch.isprintable() for ch in name)
    assert "<@" not in name and "<#" not in name
    assert "@everyone" not in name.lower() and "@here" not in name.lower()


def test_thread_names_keep_the_words_and_fall_back_when_empty() -> None:
    assert thread_name("<@123> <@!4> <#5> <:wave:6> hi\tthere @here") == "hi there"
    assert thread_name("x" * 150) == "x" * 99 + "…"
    assert thread_name("<@123>\n\x1b[31m") == "[31m"
    assert thread_name("<@1>  ") == FALLBACK_NAME
    assert thread_name("@@everyoneeveryone @HEREford") == "@ everyone ford"
