"""Shared dpytest harness for the Discord tests and ``bench/discord_load.py`` (it holds no tests).

It starts an ``IrisBot`` on dpytest's fake gateway and HTTP client, posts
messages (with mentions, replies and attachments) through discord.py's own
``parse_message_create`` dispatch, invokes slash commands (and subcommands) through
``parse_interaction_create`` and the real ``CommandTree``, and records every
send, edit and interaction response (deferred ones and their follow-ups too) with
its payload, so tests can check the final text of each reply, ``allowed_mentions``
on every request, and pacing.

Threads, which dpytest lacks: the bot's thread-creating requests answer with a
thread payload that goes through discord.py's own ``parse_thread_create`` (as the
gateway's THREAD_CREATE would), so the bot, messages and commands meet discord.py's
own ``Thread`` objects, and messages in a thread are dispatched like any other.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import discord
import discord.abc
import discord.ext.test as dpytest
from discord.ext.test import backend as back
from discord.ext.test import callbacks
from discord.ext.test import factories as facts
from discord.webhook import async_ as webhook_async

from assistant.dialogue import DialogueManager
from integrations.discord_bot.bot import IrisBot, bot_intents
from integrations.discord_bot.settings import DiscordSettings

FAST = {"edits_per_window": 50, "edit_window_s": 0.1, "sync_commands": False, "shutdown_grace_s": 2.0}


def fast_settings(**overrides: Any) -> DiscordSettings:
    """Settings for tests: quick pacing, no command sync over the network."""
    return DiscordSettings(**{**FAST, **overrides})


@dataclass
class Transcript:
    """Everything the bot asked Discord to do, in order."""

    payloads: list[dict[str, Any]] = field(default_factory=list)  # every send, edit and interaction response
    content: dict[int, str] = field(default_factory=dict)  # bot message id -> latest content
    channel_of: dict[int, int] = field(default_factory=dict)  # bot message id -> channel (or thread) id
    threads: list[dict[str, Any]] = field(default_factory=list)  # every thread the bot opened, as Discord saw it
    reference: dict[int, int] = field(default_factory=dict)  # bot message id -> message it replies to
    channel_ops: dict[int, list[float]] = field(default_factory=lambda: defaultdict(list))
    edits: int = 0
    interaction_replies: list[str] = field(default_factory=list)
    _pending_sends: list[dict[str, Any]] = field(default_factory=list)

    def replies_to(self, message_id: int) -> list[str]:
        """The final text of each bot message answering ``message_id`` (a split answer has several)."""
        parts: list[str] = []
        current = message_id
        while True:
            following = [bot_id for bot_id, ref in self.reference.items() if ref == current]
            if not following:
                return parts
            current = min(following)
            parts.append(self.content[current])

    def reply_to(self, message_id: int) -> str:
        return "\n".join(self.replies_to(message_id))

    def in_channel(self, channel_id: int) -> list[str]:
        """The final text of every bot message in a channel or thread, oldest first."""
        return [self.content[i] for i in sorted(self.content) if self.channel_of.get(i) == channel_id]


class _FakeInteractionAdapter:
    """Stands in for the webhook adapter that would POST interaction responses to Discord."""

    def __init__(self, transcript: Transcript, bot: IrisBot) -> None:
        self.transcript = transcript
        self.bot = bot
        self.channel_id = 0  # where the interaction being answered was invoked

    async def create_interaction_response(self, interaction_id: int, token: str,
                                          **kwargs: Any) -> dict[str, Any]:
        payload = kwargs["params"].payload
        if payload["type"] != discord.InteractionResponseType.deferred_channel_message.value:
            self.transcript.payloads.append(payload.get("data") or {})
            self.transcript.interaction_replies.append((payload.get("data") or {}).get("content", ""))
        return {"interaction": {"id": str(interaction_id), "type": 2}}

    async def execute_webhook(self, webhook_id: int, token: str, **kwargs: Any) -> dict[str, Any]:
        """A follow-up after a deferred response; Discord answers with the message it posted."""
        payload = kwargs["payload"] or {}
        self.transcript.payloads.append(payload)
        self.transcript.interaction_replies.append(payload.get("content", ""))
        assert self.bot.user is not None
        return {"id": str(facts.make_id()), "channel_id": str(self.channel_id), "content": payload.get("content", ""),
                "author": facts.dict_from_user(self.bot.user), "attachments": [], "embeds": [], "mentions": [],
                "mention_roles": [], "pinned": False, "tts": False, "type": 0, "mention_everyone": False,
                "timestamp": discord.utils.utcnow().isoformat(), "edited_timestamp": None, "flags": 0}


class Harness:
    """One bot on dpytest's fake Discord; ``members`` are plain users, index 0 first."""

    def __init__(self, bot: IrisBot) -> None:
        self.bot = bot
        self.transcript = Transcript()
        self._real_params = discord.abc.handle_message_parameters

    @classmethod
    async def start(cls, manager: DialogueManager, settings: DiscordSettings | None = None, *,
                    members: int = 3, text_channels: int = 1, **bot_kwargs: Any) -> Harness:
        intents = bot_intents()
        intents.members = True  # dpytest resolves mentions through the member cache
        bot = IrisBot(manager, settings or fast_settings(), intents=intents, **bot_kwargs)
        dpytest.configure(bot, members=members, text_channels=text_channels)
        await bot._async_setup_hook()  # binds the fake state to the running loop
        bot._connection._command_tree = bot.tree
        harness = cls(bot)
        harness._install()
        await bot.setup_hook()
        return harness

    def _install(self) -> None:
        transcript = self.transcript
        real = self._real_params

        def recording_params(*args: Any, **kwargs: Any) -> Any:
            params = real(*args, **kwargs)
            transcript._pending_sends.append(params.payload)
            return params

        async def on_send(message: discord.Message) -> None:
            payload = transcript._pending_sends.pop(0)
            transcript.payloads.append(payload)
            transcript.content[message.id] = message.content
            transcript.channel_of[message.id] = message.channel.id
            reference = payload.get("message_reference")
            if reference:
                transcript.reference[message.id] = int(reference["message_id"])
            transcript.channel_ops[message.channel.id].append(time.monotonic())

        async def on_edit(channel: Any, message: discord.Message, fields: dict[str, Any]) -> None:
            payload = fields["params"].payload
            transcript.payloads.append(payload)
            transcript.content[message.id] = payload["content"]
            transcript.channel_ops[channel.id].append(time.monotonic())
            transcript.edits += 1

        http = back.get_state().http

        async def start_thread(channel_id: int, message_id: int | None = None, *, name: str,
                               **options: Any) -> dict[str, Any]:
            """POST /channels/{id}[/messages/{id}]/threads: a thread owned by the bot (its id is the message's when
            opened on one), announced like the gateway's THREAD_CREATE."""
            channel = self.bot.get_channel(channel_id)
            assert isinstance(channel, discord.TextChannel)
            thread_type = options.get("type", discord.ChannelType.public_thread.value)
            data = {"id": str(message_id or facts.make_id()), "guild_id": str(channel.guild.id),
                    "parent_id": str(channel_id), "owner_id": str(self.bot.user.id), "name": name,
                    "type": thread_type, "last_message_id": None, "rate_limit_per_user": 0, "message_count": 0,
                    "member_count": 1, "flags": 0, "newly_created": True,
                    "thread_metadata": {"archived": False, "auto_archive_duration": 1440, "locked": False,
                                        "archive_timestamp": discord.utils.utcnow().isoformat()}}
            transcript.threads.append(data)
            back.get_state().parse_thread_create(data)  # type: ignore[arg-type]
            return data

        async def start_thread_with_message(channel_id: int, message_id: int, **options: Any) -> dict[str, Any]:
            return await start_thread(channel_id, message_id, **options)

        async def start_thread_without_message(channel_id: int, **options: Any) -> dict[str, Any]:
            return await start_thread(channel_id, **options)

        http.start_thread_with_message = start_thread_with_message  # type: ignore[method-assign]
        http.start_thread_without_message = start_thread_without_message  # type: ignore[method-assign]
        discord.abc.handle_message_parameters = recording_params  # type: ignore[assignment]
        callbacks.set_callback(on_send, "send_message")
        callbacks.set_callback(on_edit, "edit_message")
        self._interactions = _FakeInteractionAdapter(transcript, self.bot)
        webhook_async.async_context.set(self._interactions)  # type: ignore[arg-type]

    # the fake Discord -----------------------------------------------------

    @property
    def config(self) -> dpytest.RunnerConfig:
        return dpytest.get_config()

    def member(self, index: int) -> discord.Member:
        return self.config.members[index]

    def channel(self, index: int = 0) -> discord.TextChannel:
        return [c for c in self.config.channels if isinstance(c, discord.TextChannel)][index]

    def thread(self, index: int = -1) -> discord.Thread:
        """A thread the bot opened (default: the latest), as discord.py keeps it."""
        thread = self.channel().guild.get_thread(int(self.transcript.threads[index]["id"]))
        assert thread is not None
        return thread

    async def say(self, text: str, *, member: int | discord.abc.User = 0, channel: Any = 0,
                  mention: bool = True, reply_to: discord.Message | int | None = None, files: Sequence[Path] = (),
                  settle: bool = True) -> discord.Message:
        """Post a message as a user, dispatched like a gateway MESSAGE_CREATE."""
        author = self.member(member) if isinstance(member, int) else member
        place = self.channel(channel) if isinstance(channel, int) else channel
        assert self.bot.user is not None
        content = f"{self.bot.user.mention} {text}" if mention else text
        guild = getattr(place, "guild", None)
        attachments = [back.make_attachment(Path(path)) for path in files]
        data = facts.make_message_dict(place, author, content=content, attachments=attachments,
                                       mentions=back.find_user_mentions(content, guild),
                                       **({"guild_id": guild.id} if guild is not None else {}))
        if reply_to is not None:
            target_id = reply_to if isinstance(reply_to, int) else reply_to.id
            data["message_reference"] = {"message_id": target_id, "channel_id": place.id}
            stored = back._cur_config.messages.get(place.id, [])
            data["referenced_message"] = next(m for m in stored if m["id"] == target_id)
        state = back.get_state()
        state.parse_message_create(data)
        back._cur_config.messages.setdefault(place.id, []).append(data)
        await dpytest.run_all_events()
        if settle:
            await self.settle()
        message = state._get_message(data["id"])
        assert message is not None
        return message

    async def settle(self) -> None:
        """Until the bot has finished every answer it started."""
        await dpytest.run_all_events()
        await self.bot.wait_idle()

    async def react(self, member: int, message_id: int, emoji: str = "⏹") -> None:
        """A MESSAGE_REACTION_ADD from a user (dpytest's own helper lacks the ``type`` discord.py 2.7 reads)."""
        channel_id = next(channel for channel, messages in back._cur_config.messages.items()
                          if any(m["id"] == message_id for m in messages))
        author = self.member(member)
        data = {"message_id": message_id, "channel_id": channel_id, "user_id": author.id, "type": 0,
                "emoji": {"id": None, "name": emoji}, "guild_id": author.guild.id,
                "member": facts.dict_from_member(author), "burst": False}
        back.get_state().parse_message_reaction_add(data)  # type: ignore[arg-type]
        await dpytest.run_all_events()

    async def slash(self, name: str, /, *, member: int = 0, channel: int | discord.TextChannel | discord.Thread = 0,
                    subcommand: str | None = None, **options: str) -> str:
        """Invoke a slash command (``/adapter load`` is ``slash("adapter", subcommand="load", ...)``) through the
        bot's CommandTree, in a channel or a thread; returns the response text (a deferred one's follow-up)."""
        author = self.member(member)
        place = self.channel(channel) if isinstance(channel, int) else channel
        before = len(self.transcript.interaction_replies)
        assert self.bot.user is not None
        arguments: list[dict[str, Any]] = [{"name": key, "type": 3, "value": value} for key, value in options.items()]
        if subcommand is not None:
            arguments = [{"name": subcommand, "type": 1, "options": arguments}]
        self._interactions.channel_id = place.id
        where = {"id": str(place.id), "type": place.type.value, "guild_id": str(place.guild.id), "name": place.name}
        if isinstance(place, discord.Thread):
            where["parent_id"] = str(place.parent_id)
        data = {
            "id": str(facts.make_id()), "application_id": str(self.bot.user.id), "type": 2, "token": "t",
            "version": 1, "guild_id": str(place.guild.id), "attachment_size_limit": 8_000_000,
            "channel": where, "member": facts.dict_from_member(author),
            "data": {"id": str(facts.make_id()), "name": name, "type": 1, "options": arguments},
        }
        back.get_state().parse_interaction_create(data)  # type: ignore[arg-type]
        for _ in range(100):
            invokers = [t for t in asyncio.all_tasks() if t.get_name() == "CommandTree-invoker"]
            if invokers:
                await asyncio.gather(*invokers)
            if len(self.transcript.interaction_replies) > before:
                return self.transcript.interaction_replies[-1]
            await asyncio.sleep(0)
        raise AssertionError(f"/{name} gave no response")

    async def close(self) -> None:
        """Shut the bot down like SIGTERM would, and undo the harness's patches."""
        try:
            await self.settle()
            self.bot.ws = None  # dpytest's fake socket cannot be closed
            await self.bot.close()
        finally:
            discord.abc.handle_message_parameters = self._real_params  # type: ignore[assignment]
