"""The ``commands.Bot`` subclass: decides which messages to answer and owns start-up and shutdown.

The dialogue manager is injected (discord.py's ``advanced_startup`` pattern), so
the bot adds no model code: answering is ``Answerer``'s job, slash commands
live in ``commands.py``, and this module only routes Discord events to them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

import discord
from discord.ext import commands

from assistant.dialogue import DialogueManager
from integrations.discord_bot.answer import Answerer
from integrations.discord_bot.permissions import Permissions, requester
from integrations.discord_bot.settings import DiscordSettings
from integrations.discord_bot.streaming import NO_MENTIONS

log = logging.getLogger("iris.discord")

STOP_EMOJIS = frozenset({"⏹", "⏹️", "🛑"})
RETRY_EMOJIS = frozenset({"🔁"})


def bot_intents() -> discord.Intents:
    """Default intents plus message content (privileged: enable it in the developer portal)."""
    intents = discord.Intents.default()
    intents.message_content = True
    return intents


class IrisBot(commands.Bot):
    """Iris on Discord: answers mentions, DMs (if allowed) and its own threads, through one queue."""

    def __init__(self, manager: DialogueManager, settings: DiscordSettings, *,
                 intents: discord.Intents | None = None, max_image_bytes: int | None = None,
                 max_image_pixels: int | None = None) -> None:
        super().__init__(command_prefix=commands.when_mentioned, intents=intents or bot_intents(),
                         allowed_mentions=NO_MENTIONS, help_command=None)
        self.manager = manager
        self.settings = settings
        self.permissions = Permissions(settings)
        self.answerer = Answerer(manager, settings, max_image_bytes=max_image_bytes,
                                 max_image_pixels=max_image_pixels)
        self._tasks: set[asyncio.Task[None]] = set()
        self._shut_down = False

    async def setup_hook(self) -> None:
        from integrations.discord_bot.commands import IrisCommands

        await self.add_cog(IrisCommands(self))
        if self.settings.sync_commands:
            synced = await self.tree.sync()
            log.info("synced %d slash commands", len(synced))

    async def on_ready(self) -> None:
        log.info("connected as %s (id %s) to %d server(s)", self.user, getattr(self.user, "id", "?"),
                 len(self.guilds))

    def should_answer(self, message: discord.Message) -> bool:
        """Mentions, DMs, replies to the bot in the same channel, and every message in a thread the bot started."""
        me = self.user
        if me is None or message.author.bot or message.author.id == me.id:
            return False
        if message.guild is None:
            return True
        if isinstance(message.channel, discord.Thread) and message.channel.owner_id == me.id:
            return True
        if any(user.id == me.id for user in message.mentions):
            return True
        if self.answerer.replied_to(message) is None:
            return False
        resolved = message.reference.resolved if message.reference is not None else None
        return isinstance(resolved, discord.Message) and resolved.author.id == me.id \
            and resolved.channel.id == message.channel.id

    async def on_message(self, message: discord.Message) -> None:
        if not self.should_answer(message):
            return
        if not self.permissions.allowed(requester(message.author, message.channel)):
            log.info("ignored a message from user %s in channel %s (not allowed)", message.author.id,
                     message.channel.id)
            return
        assert self.user is not None
        task = asyncio.create_task(self.answerer.answer(message, self.user.id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def on_raw_reaction_add(self, payload: discord.RawReactionActionEvent) -> None:
        """⏹ on the question or the answer stops it, 🔁 on the last answer regenerates it: for the person who
        asked, or an admin."""
        if str(payload.emoji) in RETRY_EMOJIS:
            await self._regenerate(payload)
        if str(payload.emoji) not in STOP_EMOJIS:
            return
        for job in list(self.answerer.jobs):
            if job.shows(payload.message_id) and (payload.user_id == job.user_id
                                                  or self.permissions.is_admin(payload.user_id)):
                self.answerer.stop(job)

    async def _regenerate(self, payload: discord.RawReactionActionEvent) -> None:
        """🔁 on an answer that is still its conversation's last and is no longer being written: answer its
        question again as a new reply (the old answer stays, and replying to it continues that branch)."""
        conversations = self.answerer.conversations
        conversation_id, answer_id = conversations.linked(payload.channel_id, payload.message_id) or (0, None)
        asked = conversations.asker(answer_id) if answer_id is not None else None
        if answer_id is None or asked is None or self.user is None or payload.user_id == self.user.id:
            return
        channel = self.get_channel(payload.channel_id)
        who = payload.member or discord.Object(payload.user_id)
        if channel is None or not (payload.user_id == asked.user_id or self.permissions.is_admin(payload.user_id)) \
                or not self.permissions.allowed(requester(who, channel)):
            return
        if self.manager.conversation(conversation_id).head_message_id != answer_id \
                or any(job.shows(payload.message_id) for job in self.answerer.jobs):
            return
        anchor = await self._message(asked.question_channel_id, asked.question_id) \
            or await self._message(payload.channel_id, payload.message_id)
        if anchor is None:
            return
        task = asyncio.create_task(self.answerer.regenerate(anchor, channel, asked, conversation_id, answer_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _message(self, channel_id: int, message_id: int) -> discord.Message | None:
        """A message from the cache, else from Discord; None if it is gone."""
        cached = discord.utils.get(self.cached_messages, id=message_id)
        if cached is not None:
            return cached
        channel = self.get_channel(channel_id)
        if not isinstance(channel, discord.abc.Messageable):
            return None
        try:
            return await channel.fetch_message(message_id)
        except discord.HTTPException:
            return None

    async def wait_idle(self) -> None:
        """Until every answer under way has been shown (tests, benchmarks and shutdown use it)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks))

    async def close(self) -> None:
        """Finish or interrupt the answers in flight, then disconnect."""
        if not self._shut_down:
            self._shut_down = True
            await self.answerer.shutdown(set(self._tasks), self.settings.shutdown_grace_s)
            await self.wait_idle()  # messages that arrived meanwhile, each told the bot is going away
        await super().close()


async def run_bot(bot: commands.Bot, token: str) -> None:
    """Run until the gateway stops or SIGINT/SIGTERM arrives; always closes the bot."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        async with bot:
            runner = asyncio.create_task(bot.start(token))
            stopper = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait({runner, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if stopper in done:
                log.info("signal received: finishing answers in flight and shutting down")
            else:
                stopper.cancel()
            await bot.close()
            if runner in done:
                runner.result()
            else:
                runner.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await runner
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
