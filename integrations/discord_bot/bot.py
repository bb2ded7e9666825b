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
        """⏹ on the question or the answer stops it, for its author or an admin."""
        if str(payload.emoji) not in STOP_EMOJIS:
            return
        for job in list(self.answerer.jobs):
            if job.shows(payload.message_id) and (payload.user_id == job.user_id
                                                  or self.permissions.is_admin(payload.user_id)):
                self.answerer.stop(job)

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
