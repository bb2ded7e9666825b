"""The bot's configuration: the ``[discord]`` table of ``config.toml``, then ``IRIS_DISCORD_*`` variables.

The token is deliberately *not* a field: it is read once, from ``DISCORD_TOKEN`` or
the file named by ``token_file``, and handed straight to the gateway, so it can never
end up in a repr, a log line or an error message.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from assistant.config import Paths
from assistant.errors import BadSetting

IDS = frozenset[int]


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
        positive = ("max_images", "max_image_bytes", "max_image_pixels", "rate_limit", "rate_window_s",
                    "per_user_queue", "max_queue", "edits_per_window", "edit_window_s")
        for name in positive:
            if getattr(self, name) <= 0:
                raise BadSetting(f"[discord] {name} must be > 0")


_FIELDS = {f.name: f for f in dataclasses.fields(DiscordSettings)}


def _parse(name: str, value: Any) -> Any:
    """Coerce a TOML value or an environment string to the field's type."""
    kind = str(_FIELDS[name].type)
    try:
        if kind == "IDS":
            items = value.split(",") if isinstance(value, str) else list(value)
            return frozenset(int(str(item).strip()) for item in items if str(item).strip())
        if kind == "bool":
            if isinstance(value, bool):
                return value
            lowered = str(value).strip().lower()
            if lowered not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError(value)
            return lowered in ("1", "true", "yes", "on")
        if kind == "int":
            return int(value)
        if kind == "float":
            return float(value)
        return None if value in ("", None) else str(value)
    except (TypeError, ValueError):
        raise BadSetting(f"[discord] {name}: cannot read {value!r} as {kind}") from None


def load_discord_settings(paths: Paths, environ: dict[str, str] | None = None) -> DiscordSettings:
    """Layer the config file's ``[discord]`` table under ``IRIS_DISCORD_<NAME>`` variables."""
    environ = dict(os.environ) if environ is None else environ
    raw: dict[str, Any] = {}
    if paths.config_file.is_file():
        try:
            raw = dict(tomllib.loads(paths.config_file.read_text(encoding="utf-8")).get("discord", {}))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise BadSetting(f"{paths.config_file}: {exc}") from None
    unknown = set(raw) - set(_FIELDS)
    if unknown:
        raise BadSetting(f"{paths.config_file}: unknown [discord] keys {', '.join(sorted(unknown))}")
    values = {name: _parse(name, value) for name, value in raw.items()}
    for name in _FIELDS:
        env_value = environ.get(f"IRIS_DISCORD_{name.upper()}")
        if env_value is not None:
            values[name] = _parse(name, env_value)
    return DiscordSettings(**values)


def read_token(settings: DiscordSettings, paths: Paths, environ: dict[str, str] | None = None) -> str:
    """``DISCORD_TOKEN`` wins over ``token_file`` (relative paths are under the config dir)."""
    environ = dict(os.environ) if environ is None else environ
    token = environ.get("DISCORD_TOKEN", "").strip()
    if token:
        return token
    if settings.token_file:
        path = Path(os.path.expanduser(settings.token_file))
        if not path.is_absolute():
            path = paths.config / path
        try:
            token = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise BadSetting(f"[discord] token_file {path}: cannot read ({exc.strerror or exc})") from None
        if token:
            return token
        raise BadSetting(f"[discord] token_file {path} is empty")
    raise BadSetting("no Discord bot token: set DISCORD_TOKEN or [discord] token_file in "
                     f"{paths.config_file} (see `iris discord --help`)")
