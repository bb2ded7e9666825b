"""Slash commands: /reset, /stop, /info, /system, /thread for everyone; /persona, /adapter, /set for admins.

Channel settings (persona, ``auto_thread``) are persisted in the store and apply to new
conversations in that channel; they are also applied to the current one so an
admin sees the effect at once. ``/adapter use|load|unload`` chooses the channel's
adapter, or attaches and detaches adapters on the running model for everyone.
Replies never mention anyone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands
from discord.ext import commands

from assistant.config import flag, parse
from assistant.errors import BadAdapter, BadSetting, IrisError, one_line
from assistant.messages import BASE_MODEL, Role
from integrations.discord_bot.conversations import Persona
from integrations.discord_bot.permissions import requester
from integrations.discord_bot.streaming import NO_MENTIONS
from integrations.discord_bot.threads import thread_name

if TYPE_CHECKING:
    from integrations.discord_bot.bot import IrisBot


def _place(interaction: discord.Interaction) -> tuple[int, int | None]:
    channel = interaction.channel
    if channel is None:
        raise IrisError("this command only works in a channel, thread or DM")
    return channel.id, getattr(channel, "parent_id", None)


CHANNEL_SETTINGS = ("auto_thread",)  # /set names that are the channel's, not sampling options


class IrisCommands(commands.Cog):
    """The bot's slash commands; every reply is one line, ⚠️ for anything refused."""

    adapter = app_commands.Group(name="adapter", description="Admin: LoRA adapters for this channel and the model.")

    def __init__(self, bot: IrisBot) -> None:
        self.bot = bot
        self.conversations = bot.answerer.conversations

    async def _reply(self, interaction: discord.Interaction, text: str, *, ephemeral: bool = True) -> None:
        if interaction.response.is_done():  # deferred while something slow ran (loading an adapter)
            await interaction.followup.send(text, ephemeral=ephemeral, allowed_mentions=NO_MENTIONS)
            return
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

    @app_commands.command(name="thread", description="Carry this channel's conversation on in a new thread.")
    async def thread(self, interaction: discord.Interaction) -> None:
        channel = interaction.channel
        if not isinstance(channel, discord.TextChannel):
            raise IrisError("/thread works in a server's text channel (not in a thread or a DM)")
        current = self.conversations.current(channel.id)
        if current is None:
            raise IrisError("no conversation here yet to carry into a thread: mention Iris first")
        first = next((m.text for m in self.bot.manager.history(current) if m.role is Role.USER), "")
        try:
            thread = await channel.create_thread(name=thread_name(first), type=discord.ChannelType.public_thread)
        except discord.HTTPException as error:
            raise IrisError(f"could not open a thread here (Iris needs the Create Public Threads permission; "
                            f"Discord said: {one_line(error)})") from None
        self.conversations.move(channel.id, thread.id)
        await thread.send(f"🧵 conversation #{current} continues here from {channel.mention}; no need to mention "
                          "Iris in this thread.", allowed_mentions=NO_MENTIONS)
        await self._reply(interaction, f"🧵 this conversation continues in {thread.mention}.", ephemeral=False)

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
        self.conversations.set_persona(channel_id, old.replace(system_prompt=prompt or None))
        self.conversations.start(channel_id, title="(persona)", parent_id=parent_id)
        await self._reply(interaction, "✅ persona saved; a new conversation starts with it.",
                          ephemeral=False)

    @adapter.command(name="use", description="Admin: switch the LoRA adapter used in this channel.")
    @app_commands.describe(name="A loaded adapter's name, or 'none' for the base model.")
    async def adapter_use(self, interaction: discord.Interaction, name: str) -> None:
        self._require_admin(interaction, "switch the adapter")
        chosen = BASE_MODEL if name.strip().lower() in ("", BASE_MODEL, "base") else name.strip()
        loaded = self.bot.manager.backend.adapter_names()
        if chosen != BASE_MODEL and chosen not in loaded:
            raise BadAdapter(f"unknown adapter {chosen!r}; loaded: {', '.join(loaded) or 'none'}")
        channel_id, parent_id = _place(interaction)
        old = self.conversations.persona(channel_id, parent_id)
        self.conversations.set_persona(channel_id, old.replace(adapter=chosen))
        current = self.conversations.current(channel_id)
        if current is not None:
            self.bot.manager.set_adapter(current, chosen)
        shown = chosen if chosen != BASE_MODEL else "none (base model)"
        await self._reply(interaction, f"✅ adapter here is now {shown}.", ephemeral=False)

    @adapter.command(name="load", description="Admin: attach a PEFT adapter directory to the running model.")
    @app_commands.describe(path="The adapter's directory on the machine running Iris.",
                           name="The name to choose it by (default: the directory's name).")
    async def adapter_load(self, interaction: discord.Interaction, path: str, name: str = "") -> None:
        self._require_admin(interaction, "load adapters")
        await interaction.response.defer(thinking=True)  # loading takes longer than Discord waits for a reply
        loaded = await self.bot.answerer.run_on_device(self.bot.manager.load_adapter, path, name.strip() or None)
        active = self.bot.manager.backend.describe().get("active_adapter", BASE_MODEL)
        await self._reply(interaction, f"✅ loaded adapter {loaded}; /adapter use {loaded} picks it for a channel "
                          f"(active adapter: {active}).", ephemeral=False)

    @adapter.command(name="unload", description="Admin: detach an adapter from the running model.")
    @app_commands.describe(name="A loaded adapter's name.")
    async def adapter_unload(self, interaction: discord.Interaction, name: str) -> None:
        self._require_admin(interaction, "unload adapters")
        await interaction.response.defer(thinking=True)
        moved = await self.bot.answerer.run_on_device(self.bot.manager.unload_adapter, name.strip())
        active = self.bot.manager.backend.describe().get("active_adapter", BASE_MODEL)
        await self._reply(interaction, f"✅ unloaded adapter {name.strip()}; {moved} conversation(s) that used it "
                          f"now use the active adapter ({active}).", ephemeral=False)

    @app_commands.command(name="set", description="Admin: set a sampling option or auto_thread for this channel.")
    @app_commands.describe(name="temperature, top_p, top_k, max_new_tokens, repetition_penalty, seed or auto_thread",
                           value="The new value (auto_thread: on or off).")
    async def set_option(self, interaction: discord.Interaction, name: str, value: str) -> None:
        self._require_admin(interaction, "change sampling settings")
        channel_id, parent_id = _place(interaction)
        old = self.conversations.persona(channel_id, parent_id)
        if name in CHANNEL_SETTINGS:
            await self._set_channel(interaction, old, name, value)
            return
        options = self.conversations.options_with(old, name, value)
        self.conversations.set_persona(channel_id, old.replace(options=options))
        current = self.conversations.current(channel_id)
        if current is not None:
            self.bot.manager.set_option(current, name, value)
        await self._reply(interaction, f"✅ {name} = {value} in this channel.", ephemeral=False)

    async def _set_channel(self, interaction: discord.Interaction, old: Persona, name: str, value: str) -> None:
        """A channel setting: saved with the channel's persona, for this channel only (not its threads)."""
        channel = interaction.channel
        if not isinstance(channel, discord.TextChannel):
            raise IrisError(f"{name} is set in a server's text channel (not in a thread or a DM)")
        enabled: Any = parse(flag(), value, name, BadSetting)
        self.conversations.set_persona(channel.id, old.replace(auto_thread=enabled))
        await self._reply(interaction, "✅ mentions here now open a thread." if enabled else
                          "✅ mentions here are answered in the channel.", ephemeral=False)
