"""Slash commands through the bot's CommandTree, and allow/block lists on messages and commands."""

from __future__ import annotations

from pathlib import Path

import pytest
from discord_harness import Harness, fast_settings
from fakes import FakeBackend

from assistant.dialogue import DialogueManager
from assistant.messages import Role
from assistant.store import Store

pytestmark = pytest.mark.asyncio


async def start(store: Store, backend: FakeBackend | None = None, **settings: object) -> Harness:
    harness = await Harness.start(DialogueManager(backend or FakeBackend(adapters=["pirate"]), store,
                                                  default_system_prompt="default prompt"),
                                  fast_settings(**settings), members=3)
    return harness


async def test_commands_are_registered_and_synced_in_setup_hook(store: Store) -> None:
    harness = await start(store)
    names = {command.name for command in harness.bot.tree.get_commands()}
    assert names == {"reset", "stop", "info", "system", "thread", "persona", "adapter", "set"}
    adapter = harness.bot.tree.get_command("adapter")
    assert {command.name for command in adapter.commands} == {"use", "load", "unload"}  # type: ignore[union-attr]
    synced: list[bool] = []

    async def fake_sync(**kwargs: object) -> list[object]:
        synced.append(True)
        return []

    harness.bot.tree.sync = fake_sync  # type: ignore[method-assign]
    harness.bot.settings = fast_settings(sync_commands=True)
    await harness.bot.remove_cog("IrisCommands")
    await harness.bot.setup_hook()
    assert synced == [True]
    await harness.close()


async def test_reset_starts_a_new_conversation(store: Store) -> None:
    backend = FakeBackend(["first answer", "second answer"])
    harness = await start(store, backend)
    await harness.say("remember the word banana")
    reply = await harness.slash("reset")
    assert reply.startswith("🆕 new conversation")
    await harness.say("what was the word?")
    texts = [m.text for m in backend.calls[1]["messages"]]
    assert not any("banana" in text for text in texts)
    assert len(store.list_conversations(source="discord")) == 2
    await harness.close()


async def test_info_shows_model_adapter_and_queue(store: Store) -> None:
    harness = await start(store)
    assert await harness.slash("info") == "model fake · adapter none · queue 0 waiting · no conversation yet"
    await harness.close()


async def test_system_for_everyone_sets_the_conversation_prompt(store: Store) -> None:
    backend = FakeBackend()
    harness = await start(store, backend)
    assert (await harness.slash("system", member=1, prompt="Answer in French.")).startswith("✅")
    await harness.say("hello")
    assert backend.calls[0]["messages"][0].role is Role.SYSTEM
    assert backend.calls[0]["messages"][0].text == "Answer in French."
    await harness.close()


async def test_system_can_be_admin_only(store: Store) -> None:
    harness = await start(store, users_can_set_system=False, admin_ids=frozenset())
    assert await harness.slash("system", prompt="x") == "⚠️ only Iris admins can change the system prompt here"
    await harness.close()


@pytest.mark.parametrize(("command", "options"), [("persona", {"prompt": "You are a pirate."}),
                                                  ("adapter use", {"name": "pirate"}),
                                                  ("adapter load", {"path": "/tmp", "name": "x"}),
                                                  ("adapter unload", {"name": "pirate"}),
                                                  ("set", {"name": "temperature", "value": "0.2"}),
                                                  ("set", {"name": "auto_thread", "value": "on"})])
async def test_admin_commands_are_refused_for_others(store: Store, command: str, options: dict[str, str]) -> None:
    harness = await start(store)
    name, _, subcommand = command.partition(" ")
    reply = await harness.slash(name, member=1, subcommand=subcommand or None, **options)
    assert reply.startswith("⚠️ only Iris admins can")
    assert store.get_value("discord.channel", str(harness.channel().id)) is None
    await harness.close()


async def test_admin_binds_a_persisted_persona(store: Store) -> None:
    backend = FakeBackend(adapters=["pirate"])
    harness = await start(store, backend)
    admin = harness.member(0).id
    harness.bot.permissions._s = fast_settings(admin_ids=frozenset({admin}))
    assert (await harness.slash("persona", prompt="You are a pirate.")).startswith("✅")
    assert (await harness.slash("adapter", subcommand="use", name="pirate")).startswith("✅")
    assert (await harness.slash("set", name="temperature", value="0.2")).startswith("✅")
    assert await harness.slash("set", name="temperature", value="hot") == \
        "⚠️ temperature needs a number, got 'hot'"
    assert await harness.slash("adapter", subcommand="use", name="ninja") == \
        "⚠️ unknown adapter 'ninja'; loaded: pirate"
    await harness.say("ahoy")
    call = backend.calls[0]
    assert call["messages"][0].text == "You are a pirate."
    assert call["adapter"] == "pirate" and call["options"].temperature == 0.2
    saved = store.get_value("discord.channel", str(harness.channel().id))
    assert saved == {"system_prompt": "You are a pirate.", "adapter": "pirate", "options": {"temperature": "0.2"},
                     "auto_thread": None}
    await harness.slash("reset", member=1)  # a new conversation keeps the channel's persona
    await harness.say("again", member=1)
    assert backend.calls[1]["adapter"] == "pirate" and backend.calls[1]["messages"][0].text == "You are a pirate."
    await harness.close()


async def test_blocked_user_is_ignored_and_refused_commands(store: Store) -> None:
    backend = FakeBackend()
    harness = await start(store, backend)
    harness.bot.permissions._s = fast_settings(blocked_user_ids=frozenset({harness.member(1).id}))
    await harness.say("hello", member=1)
    assert backend.calls == []
    assert await harness.slash("info", member=1) == "⚠️ you can't use Iris here."
    await harness.say("hello", member=0)
    assert len(backend.calls) == 1
    await harness.close()


async def test_channel_and_role_allow_lists(store: Store) -> None:
    backend = FakeBackend()
    harness = await Harness.start(DialogueManager(backend, store), members=2, text_channels=2)
    allowed, other = harness.channel(0), harness.channel(1)
    harness.bot.permissions._s = fast_settings(allowed_channel_ids=frozenset({allowed.id}))
    await harness.say("in the wrong channel", channel=1)
    assert backend.calls == [] and other.id != allowed.id
    await harness.say("in the right channel", channel=0)
    assert len(backend.calls) == 1
    role_id = 4242
    harness.bot.permissions._s = fast_settings(allowed_role_ids=frozenset({role_id}))
    await harness.say("no role", channel=0)
    assert len(backend.calls) == 1
    await harness.close()


async def test_admin_loads_and_unloads_adapters_while_the_bot_runs(store: Store, tmp_path: Path) -> None:
    (tmp_path / "pirate").mkdir()
    (tmp_path / "pirate" / "adapter_config.json").write_text("{}")
    backend = FakeBackend()
    harness = await start(store, backend)
    harness.bot.permissions._s = fast_settings(admin_ids=frozenset({harness.member(0).id}))
    assert await harness.slash("adapter", subcommand="load", path=str(tmp_path / "pirate"), name="sea") == \
        "✅ loaded adapter sea; /adapter use sea picks it for a channel (active adapter: none)."
    assert await harness.slash("adapter", subcommand="load", path=str(tmp_path / "missing")) == \
        f"⚠️ {tmp_path / 'missing'}: not a PEFT adapter directory (no adapter_config.json)"
    assert (await harness.slash("adapter", subcommand="use", name="sea")).startswith("✅")
    await harness.say("ahoy")
    assert await harness.slash("adapter", subcommand="unload", name="sea") == \
        "✅ unloaded adapter sea; 1 conversation(s) that used it now use the active adapter (none)."
    assert await harness.slash("adapter", subcommand="unload", name="sea") == "⚠️ no adapter named 'sea' is loaded"
    await harness.say("again")
    await harness.slash("reset")  # the channel's persona still names sea: a new conversation falls back too
    question = await harness.say("fresh")
    assert [call["adapter"] for call in backend.calls] == ["sea", None, None]
    assert not harness.transcript.reply_to(question.id).startswith("⚠️")
    await harness.close()
