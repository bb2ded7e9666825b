"""Slash commands: /reset, /stop, /info, /system for everyone; /persona, /adapter, /set for admins.

Channel settings (persona) are persisted in the store and apply to new
conversations in that channel; they are also applied to the current one so an
admin sees the effect at once. Replies never mention anyone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from assistant.errors import BadAdapter, IrisError
from assistant.messages import BASE_MODEL
from integrations.discord_bot.conversations import Persona
from integrations.discord_bot.permissions import requester
from integrations.discord_bot.streaming import NO_MENTIONS

if TYPE_CHECKING:
    from integrations.discord_bot.bot import IrisBot


def _place(interaction: discord.Interaction) -> tuple[int, int | None]:
    channel = interaction.channel
    if channel is None:
        raise IrisError("this command only works in a channel, thread or DM")
    return channel.id, getattr(channel, "parent_id", None)


class IrisCommands(commands.Cog):
    """The bot's slash commands; every reply is one line, ⚠️ for anything refused."""

    def __init__(self, bot: IrisBot) -> None:
        self.bot = bot
        self.conversations = bot.answerer.conversations

    async def _reply(self, interaction: discord.Interaction, text: str, *, ephemeral: bool = True) -> None:
        await interaction.response.send_message(text, ephemeral=ephemeral, allowed_mentions=NO_MENTIONS)

    async def interaction_check(self, interaction: discord.Interaction) -> bool:  # type: ignore[override]
        """Commands obey the same allow/block lists as messages."""
        if interaction.channel is not None and self.bot.permissions.allowed(
                requester(interaction.user, interaction.channel)):
            return True
        await self._reply(interaction, "⚠️ you can't use Iris here.")
        return False

    async def cog_app_command_error(self, interaction: discord.Interaction,
                                    error: app_commands.AppCommandError) -> None:
        if isinstance(error, app_commands.CheckFailure) and interaction.response.is_done():
            return  # interaction_check already told the user
        cause = error.original if isinstance(error, app_commands.CommandInvokeError) else error
        if isinstance(cause, IrisError):
            await self._reply(interaction, f"⚠️ {cause}")
            return
        raise error

    def _require_admin(self, interaction: discord.Interaction, what: str) -> None:
        if not self.bot.permissions.is_admin(interaction.user.id):
            raise IrisError(f"only Iris admins can {what}")

    # everyone ---------------------------------------------------------------

    @app_commands.command(name="reset", description="Start a new conversation in this channel.")
    async def reset(self, interaction: discord.Interaction) -> None:
        channel_id, parent_id = _place(interaction)
        conversation_id = self.conversations.start(channel_id, title="(reset)", parent_id=parent_id)
        await self._reply(interaction, f"🆕 new conversation (#{conversation_id}); earlier messages are "
                          "forgotten here (replying to one still continues it).", ephemeral=False)

    @app_commands.command(name="stop", description="Stop your answers in progress or waiting in this channel.")
    async def stop(self, interaction: discord.Interaction) -> None:
        channel_id, _ = _place(interaction)
        jobs = [job for job in self.bot.answerer.jobs
                if job.user_id == interaction.user.id and job.channel_id == channel_id]
        for job in jobs:
            self.bot.answerer.stop(job)
        await self._reply(interaction, f"⏹ stopped {len(jobs)} answer(s)." if jobs else
                          "⚠️ you have no answer in progress here.")

    @app_commands.command(name="info", description="Model, adapter and queue length.")
    async def info(self, interaction: discord.Interaction) -> None:
        channel_id, parent_id = _place(interaction)
        described = self.bot.manager.backend.describe()
        current = self.conversations.current(channel_id)
        if current is not None:
            adapter = self.bot.manager.conversation(current).adapter
        else:
            adapter = self.conversations.persona(channel_id, parent_id).adapter
        queue = self.bot.answerer.queue
        await self._reply(interaction, " · ".join([
            f"model {described.get('model', '?')}", f"adapter {adapter or described.get('active_adapter', BASE_MODEL)}",
            f"queue {queue.waiting} waiting" + (", 1 answering" if queue.busy else ""),
            f"conversation #{current}" if current is not None else "no conversation yet"]))

    @app_commands.command(name="system", description="Set the system prompt of this channel's conversation.")
    @app_commands.describe(prompt="The new system prompt; leave empty to remove it.")
    async def system(self, interaction: discord.Interaction, prompt: str = "") -> None:
        if not self.bot.settings.users_can_set_system:
            self._require_admin(interaction, "change the system prompt here")
        channel_id, parent_id = _place(interaction)
        conversation_id = self.conversations.current_or_start(channel_id, parent_id=parent_id)
        self.bot.manager.set_system_prompt(conversation_id, prompt or None)
        await self._reply(interaction, "✅ system prompt set for this conversation." if prompt else
                          "✅ system prompt removed for this conversation.", ephemeral=False)

    # admins -----------------------------------------------------------------

    @app_commands.command(name="persona", description="Admin: bind a system prompt to this channel.")
    @app_commands.describe(prompt="System prompt for new conversations here; empty restores the default.")
    async def persona(self, interaction: discord.Interaction, prompt: str = "") -> None:
        self._require_admin(interaction, "change a channel's persona")
        channel_id, parent_id = _place(interaction)
        old = self.conversations.persona(channel_id, parent_id)
        self.conversations.set_persona(channel_id, Persona(prompt or None, old.adapter, old.options))
        self.conversations.start(channel_id, title="(persona)", parent_id=parent_id)
        await self._reply(interaction, "✅ persona saved; a new conversation starts with it.",
                          ephemeral=False)

    @app_commands.command(name="adapter", description="Admin: switch the LoRA adapter used in this channel.")
    @app_commands.describe(name="A loaded adapter's name, or 'none' for the base model.")
    async def adapter(self, interaction: discord.Interaction, name: str) -> None:
        self._require_admin(interaction, "switch the adapter")
        chosen = BASE_MODEL if name.strip().lower() in ("", BASE_MODEL, "base") else name.strip()
        loaded = self.bot.manager.backend.adapter_names()
        if chosen != BASE_MODEL and chosen not in loaded:
            raise BadAdapter(f"unknown adapter {chosen!r}; loaded: {', '.join(loaded) or 'none'}")
        channel_id, parent_id = _place(interaction)
        old = self.conversations.persona(channel_id, parent_id)
        self.conversations.set_persona(channel_id, Persona(old.system_prompt, chosen, old.options))
        current = self.conversations.current(channel_id)
        if current is not None:
            self.bot.manager.set_adapter(current, chosen)
        shown = chosen if chosen != BASE_MODEL else "none (base model)"
        await self._reply(interaction, f"✅ adapter here is now {shown}.", ephemeral=False)

    @app_commands.command(name="set", description="Admin: set a sampling option for this channel.")
    @app_commands.describe(name="temperature, top_p, top_k, max_new_tokens, repetition_penalty or seed",
                           value="The new value.")
    async def set_option(self, interaction: discord.Interaction, name: str, value: str) -> None:
        self._require_admin(interaction, "change sampling settings")
        channel_id, parent_id = _place(interaction)
        old = self.conversations.persona(channel_id, parent_id)
        options = self.conversations.options_with(old, name, value)
        self.conversations.set_persona(channel_id, Persona(old.system_prompt, old.adapter, options))
        current = self.conversations.current(channel_id)
        if current is not None:
            self.bot.manager.set_option(current, name, value)
        await self._reply(interaction, f"✅ {name} = {value} in this channel.", ephemeral=False)
