"""Who may use the bot where: allow/block lists for guilds, channels, roles and users, DMs, admins.

Pure logic over ids (no discord objects beyond duck-typed attribute reads) so the
rules are easy to test. A block always wins; a non-empty allow list restricts;
admins pass every list (llmcord's semantics).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from integrations.discord_bot.settings import DiscordSettings


@dataclass(frozen=True)
class Requester:
    """Where a message or command came from, reduced to the ids the rules look at."""

    user_id: int
    role_ids: frozenset[int]
    guild_id: int | None
    channel_ids: frozenset[int]  # the channel, a thread's parent, and their category

    @property
    def is_dm(self) -> bool:
        return self.guild_id is None


def requester(user: Any, channel: Any) -> Requester:
    """Collect the ids of ``user`` (a User or Member) in ``channel`` (any channel or thread)."""
    ids = {channel.id}
    parent = getattr(channel, "parent", None)
    for place in (channel, parent):
        if place is None:
            continue
        ids.add(place.id)
        category_id = getattr(place, "category_id", None)
        if category_id:
            ids.add(category_id)
    parent_id = getattr(channel, "parent_id", None)
    if parent_id:
        ids.add(parent_id)
    guild = getattr(channel, "guild", None)
    roles = frozenset(role.id for role in getattr(user, "roles", ()))
    return Requester(user.id, roles, guild.id if guild is not None else None, frozenset(ids))


class Permissions:
    """Answers 'may this requester talk to the bot here?' and 'is this an admin?'."""

    def __init__(self, settings: DiscordSettings) -> None:
        self._s = settings

    def is_admin(self, user_id: int) -> bool:
        return user_id in self._s.admin_ids

    def allowed(self, who: Requester) -> bool:
        s = self._s
        if self.is_admin(who.user_id):
            return True
        if who.user_id in s.blocked_user_ids or who.role_ids & s.blocked_role_ids:
            return False
        if who.is_dm:
            if not s.allow_dms:
                return False
            return not s.allowed_user_ids or who.user_id in s.allowed_user_ids
        user_ok = (not s.allowed_user_ids and not s.allowed_role_ids) or who.user_id in s.allowed_user_ids \
            or bool(who.role_ids & s.allowed_role_ids)
        if not user_ok:
            return False
        if who.guild_id in s.blocked_guild_ids:
            return False
        if s.allowed_guild_ids and who.guild_id not in s.allowed_guild_ids:
            return False
        if who.channel_ids & s.blocked_channel_ids:
            return False
        return not s.allowed_channel_ids or bool(who.channel_ids & s.allowed_channel_ids)
