"""The bot's configuration: the ``[discord]`` table of ``config.toml``, then ``IRIS_DISCORD_*`` variables.

The token is deliberately *not* a field: it is read once, from ``DISCORD_TOKEN`` or
the file named by ``token_file``, and handed straight to the gateway, so it can never
end up in a repr, a log line or an error message.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from assistant.config import (
    Paths,
    Rule,
    check_fields,
    flag,
    id_set,
    integer,
    number,
    optional,
    parse_environ,
    parse_table,
    read_config_file,
    text,
)
from assistant.errors import BadSetting
from assistant.files import read_user_text, shown_name

IDS = frozenset[int]
TOKEN_MAX_BYTES = 64 * 1024  # a bot token is about 70 characters


@dataclass(frozen=True)
class DiscordSettings:
    """Who may talk to the bot, and how hard it may be pushed. Empty allow lists mean everyone."""

    token_file: str | None = None
    allow_dms: bool = False
    admin_ids: IDS = frozenset()
    allowed_guild_ids: IDS = frozenset()
    blocked_guild_ids: IDS = frozenset()
    allowed_channel_ids: IDS = frozenset()
    blocked_channel_ids: IDS = frozenset()
    allowed_role_ids: IDS = frozenset()
    blocked_role_ids: IDS = frozenset()
    allowed_user_ids: IDS = frozenset()
    blocked_user_ids: IDS = frozenset()
    users_can_set_system: bool = True
    auto_thread: bool = False  # mentions in a channel open a thread (admins override it per channel)
    max_images: int = 4
    max_image_bytes: int = 10 * 1024 * 1024
    max_image_pixels: int = 50_000_000
    rate_limit: int = 6
    rate_window_s: float = 60.0
    per_user_queue: int = 2
    max_queue: int = 16
    edits_per_window: int = 5
    edit_window_s: float = 5.0
    shutdown_grace_s: float = 10.0
    sync_commands: bool = True

    def __post_init__(self) -> None:
        check_fields(self, DISCORD_RULES, lambda name: f"[discord] {name}")


_POSITIVE_COUNT = integer(1, 1_000_000)
_WINDOW = number(0, 86_400, above=True)
DISCORD_RULES: dict[str, Rule] = {
    "token_file": optional(text(allow_empty=False)), "allow_dms": flag(), "users_can_set_system": flag(),
    "sync_commands": flag(), "max_images": integer(1, 100), "max_image_bytes": integer(1, 1 << 30),
    "auto_thread": flag(),
    "max_image_pixels": integer(1, 1_000_000_000), "rate_limit": _POSITIVE_COUNT, "rate_window_s": _WINDOW,
    "per_user_queue": _POSITIVE_COUNT, "max_queue": _POSITIVE_COUNT, "edits_per_window": _POSITIVE_COUNT,
    "edit_window_s": _WINDOW, "shutdown_grace_s": number(0, 86_400),
    **{f.name: id_set() for f in dataclasses.fields(DiscordSettings) if f.name.endswith("_ids")},
}
_ENV_NAMES = {f"IRIS_DISCORD_{name.upper()}": name for name in DISCORD_RULES}


def load_discord_settings(paths: Paths, environ: Mapping[str, str] | None = None) -> DiscordSettings:
    """Layer the config file's ``[discord]`` table under ``IRIS_DISCORD_<NAME>`` variables (lists comma-separated),
    with the same rules and one-line errors as every other setting."""
    environ = os.environ if environ is None else environ
    table = read_config_file(paths).get("discord", {})
    values = parse_table(table, DISCORD_RULES, shown_name(paths.config_file), "discord")
    values |= parse_environ(environ, _ENV_NAMES, DISCORD_RULES, keep_empty=True)  # empty: an empty list
    return DiscordSettings(**values)


def read_token(settings: DiscordSettings, paths: Paths, environ: Mapping[str, str] | None = None) -> str:
    """``DISCORD_TOKEN`` wins over ``token_file`` (relative paths are under the config dir), which must be a
    regular file (a FIFO or device is refused at once, never waited on)."""
    environ = os.environ if environ is None else environ
    token = environ.get("DISCORD_TOKEN", "").strip()
    if token:
        return token
    if settings.token_file:
        path = Path(os.path.expanduser(settings.token_file))
        if not path.is_absolute():
            path = paths.config / path
        try:
            token = read_user_text(path, max_bytes=TOKEN_MAX_BYTES, what="token file", error=BadSetting).strip()
        except BadSetting as exc:
            raise BadSetting(f"[discord] token_file {exc}") from None
        if token:
            return token
        raise BadSetting(f"[discord] token_file {shown_name(path)} is empty")
    raise BadSetting("no Discord bot token: set DISCORD_TOKEN or [discord] token_file in "
                     f"{paths.config_file} (see `iris discord --help`)")
