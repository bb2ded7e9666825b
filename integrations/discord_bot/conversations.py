"""Discord places and messages → stored conversations, and each channel's persona.

Every Discord message the bot takes part in (the user's and its own) is linked
to ``(conversation_id, stored message id)`` in the store, with the channel it
was posted in, so a reply to any of them in that channel, even after a restart,
continues that conversation from that message (branching when it is an old
one); a reference from another channel never reaches it. A channel, thread or DM also has a *current*
conversation that plain mentions continue and ``/reset`` replaces; new ones take
the channel's persona (system prompt, adapter, sampling), set by admins, who also
choose whether mentions there open a thread (``auto_thread``). ``/thread`` moves a
channel's current conversation into a thread. Each answer remembers who asked
and where, so its asker (or an admin) can have it regenerated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from assistant.config import GenerationOptions
from assistant.dialogue import DialogueManager
from assistant.messages import BASE_MODEL

SOURCE = "discord"
PERSONA_NAMESPACE = "discord.channel"
ANSWER_NAMESPACE = "discord.answer"


@dataclass(frozen=True)
class Persona:
    """What an admin bound to a channel; ``None`` fields fall back to the bot's defaults."""

    system_prompt: str | None = None
    adapter: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    auto_thread: bool | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"system_prompt": self.system_prompt, "adapter": self.adapter, "options": dict(self.options),
                "auto_thread": self.auto_thread}

    def replace(self, **changes: Any) -> Persona:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Asked:
    """Who asked for a stored answer, and the Discord message (with its channel) that asked."""

    user_id: int
    question_id: int
    question_channel_id: int


@dataclass(frozen=True)
class Target:
    """Where a new user message goes; ``parent_id`` None means after the conversation's head."""

    conversation_id: int
    parent_id: int | None


class Conversations:
    """The mapping, kept entirely in the store so a restarted bot picks up where it was."""

    def __init__(self, manager: DialogueManager) -> None:
        self._manager = manager
        self._store = manager.store

    # personas --------------------------------------------------------------

    def persona(self, channel_id: int, parent_id: int | None = None) -> Persona:
        """The channel's persona, else its parent's (a thread inherits its channel's)."""
        for key in (channel_id, parent_id):
            if key is not None:
                raw = self._store.get_value(PERSONA_NAMESPACE, str(key))
                if raw is not None:
                    return Persona(raw.get("system_prompt"), raw.get("adapter"), dict(raw.get("options", {})),
                                   raw.get("auto_thread"))
        return Persona()

    def set_persona(self, channel_id: int, persona: Persona) -> None:
        self._store.put_value(PERSONA_NAMESPACE, str(channel_id), persona.as_dict())

    # conversations ---------------------------------------------------------

    def current(self, channel_id: int) -> int | None:
        found = self._store.find_external(SOURCE, f"channel:{channel_id}")
        return None if found is None else found[0]

    def start(self, channel_id: int, *, title: str = "", parent_id: int | None = None) -> int:
        """A new current conversation for the channel, with its persona."""
        persona = self.persona(channel_id, parent_id)
        options = self._manager.default_options
        for name, value in persona.options.items():
            options = options.with_setting(name, str(value))
        adapter = persona.adapter
        if adapter not in (None, BASE_MODEL, *self._manager.backend.adapter_names()):
            adapter = None  # unloaded since the admin chose it (or not loaded at this start): the active one
        conversation_id = self._manager.new_conversation(
            title=title[:80], system_prompt=persona.system_prompt, options=options, adapter=adapter,
            source=SOURCE)
        self._store.link_external(SOURCE, f"channel:{channel_id}", conversation_id)
        return conversation_id

    def move(self, channel_id: int, to_channel_id: int) -> int | None:
        """Make the channel's current conversation the current one of ``to_channel_id`` (a thread) instead; the
        channel starts afresh at its next mention. Returns the conversation moved, if there was one."""
        conversation_id = self.current(channel_id)
        if conversation_id is not None:
            self._store.link_external(SOURCE, f"channel:{to_channel_id}", conversation_id)
            self._store.unlink_external(SOURCE, f"channel:{channel_id}")
        return conversation_id

    def remember_asker(self, answer_id: int, asked: Asked) -> None:
        self._store.put_value(ANSWER_NAMESPACE, str(answer_id), dataclasses.asdict(asked))

    def asker(self, answer_id: int) -> Asked | None:
        """Who asked for stored answer ``answer_id`` (None for anything that is not the bot's answer)."""
        raw = self._store.get_value(ANSWER_NAMESPACE, str(answer_id))
        return None if raw is None else Asked(**raw)

    def linked(self, channel_id: int, discord_message_id: int) -> tuple[int, int | None] | None:
        """``(conversation id, stored message id)`` of a Discord message the bot saw in this channel."""
        return self._store.find_external(SOURCE, str(discord_message_id), scope=str(channel_id))

    def current_or_start(self, channel_id: int, *, title: str = "", parent_id: int | None = None) -> int:
        return self.current(channel_id) or self.start(channel_id, title=title, parent_id=parent_id)

    def target(self, channel_id: int, reply_to: int | None, *, title: str = "",
               parent_id: int | None = None) -> Target:
        """A reply to a message known in this channel continues from it; anything else continues the channel's
        current conversation."""
        if reply_to is not None:
            found = self._store.find_external(SOURCE, str(reply_to), scope=str(channel_id))
            if found is not None:
                return Target(*found)
        return Target(self.current_or_start(channel_id, title=title, parent_id=parent_id), None)

    def is_known(self, channel_id: int, discord_message_id: int) -> bool:
        return self._store.find_external(SOURCE, str(discord_message_id), scope=str(channel_id)) is not None

    def known_elsewhere(self, channel_id: int, discord_message_id: int) -> bool:
        """Whether the message was linked in another channel (a reference to it here claims the wrong channel)."""
        return self._store.find_external(SOURCE, str(discord_message_id)) is not None \
            and not self.is_known(channel_id, discord_message_id)

    def link(self, channel_id: int, discord_message_ids: Iterable[int], conversation_id: int,
             message_id: int | None) -> None:
        """Link messages posted in ``channel_id`` to a stored message."""
        for discord_id in discord_message_ids:
            self._store.link_external(SOURCE, str(discord_id), conversation_id, message_id, scope=str(channel_id))

    @staticmethod
    def options_with(persona: Persona, name: str, value: str) -> dict[str, Any]:
        """The persona's options plus one validated setting (``BadSetting`` if invalid)."""
        GenerationOptions().with_setting(name, value)
        return {**persona.options, name: value}
