"""The Discord bot's pure parts: splitting, pacing, the fair queue, permissions and settings."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import discord
import pytest

from assistant.config import Paths
from assistant.errors import BadSetting
from integrations.discord_bot.permissions import Permissions, Requester
from integrations.discord_bot.queue import FairQueue, QueueRefused
from integrations.discord_bot.settings import DiscordSettings, load_discord_settings, read_token
from integrations.discord_bot.streaming import ChannelPacer, split_message


def test_short_text_is_one_message() -> None:
    assert split_message("hello") == ["hello"]


def test_split_reopens_code_fences_and_keeps_every_line() -> None:
    lines = [f"print({i})" for i in range(600)]
    text = "Intro.\n\n```py\n" + "\n".join(lines) + "\n```\nOutro."
    parts = split_message(text)
    assert len(parts) > 2 and all(len(p) <= 2000 for p in parts)
    for part in parts:
        assert len(re.findall(r"^```", part, flags=re.M)) % 2 == 0
    assert all(p.startswith("```py\n") for p in parts[1:-1])
    body = "\n".join(parts)
    assert all(line in body for line in lines) and body.endswith("Outro.")


def test_split_prefers_paragraphs_over_words() -> None:
    text = "a" * 1500 + "\n\n" + "b " * 600
    parts = split_message(text)
    assert parts[0] == "a" * 1500


def test_pacer_keeps_to_its_window() -> None:
    async def run() -> list[float]:
        pacer = ChannelPacer(3, 0.2)
        stamps = []
        for _ in range(7):
            await pacer.slot(1)
            stamps.append(time.monotonic())
        return stamps

    stamps = asyncio.run(run())
    for i in range(len(stamps) - 3):
        assert stamps[i + 3] - stamps[i] >= 0.2 - 1e-3


def test_pacer_honours_retry_after() -> None:
    calls: list[float] = []

    async def request() -> str:
        calls.append(time.monotonic())
        if len(calls) == 1:
            raise discord.RateLimited(0.15)
        return "ok"

    async def run() -> str:
        return await ChannelPacer(50, 1.0).call(7, request)

    assert asyncio.run(run()) == "ok"
    assert calls[1] - calls[0] >= 0.15


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_queue_is_round_robin_between_users() -> None:
    async def run() -> None:
        queue = FairQueue(max_waiting=10, per_user_pending=5, rate_limit=10, rate_window_s=60)
        first = queue.enter(1)  # runs at once
        a2, a3 = queue.enter(1), queue.enter(1)
        b1 = queue.enter(2)
        assert first.running and [queue.position(t) for t in (a2, b1, a3)] == [1, 2, 3]
        queue.release(first)
        assert a2.running and queue.position(b1) == 1
        queue.release(a2)
        assert b1.running and queue.position(a3) == 1

    asyncio.run(run())


def test_queue_caps_and_rate_limit() -> None:
    async def run() -> None:
        clock = Clock()
        queue = FairQueue(max_waiting=2, per_user_pending=2, rate_limit=3, rate_window_s=10, clock=clock)
        queue.enter(1)
        queue.enter(1)
        with pytest.raises(QueueRefused, match="already have 2"):
            queue.enter(1)
        queue.enter(2)
        with pytest.raises(QueueRefused, match="busy"):
            queue.enter(3)
        fresh = FairQueue(max_waiting=9, per_user_pending=9, rate_limit=2, rate_window_s=10, clock=clock)
        fresh.enter(5)
        fresh.enter(5)
        with pytest.raises(QueueRefused, match="try again in 10 s"):
            fresh.enter(5)
        clock.now = 10.0
        fresh.enter(5)

    asyncio.run(run())


def test_cancelled_ticket_stops_waiting() -> None:
    async def run() -> None:
        queue = FairQueue(max_waiting=5, per_user_pending=5, rate_limit=9, rate_window_s=60)
        queue.enter(1)
        waiting = queue.enter(2)
        seen: list[int] = []

        async def on_position(position: int) -> None:
            seen.append(position)

        waiter = asyncio.create_task(queue.wait(waiting, on_position))
        await asyncio.sleep(0)
        queue.cancel(waiting)
        assert await waiter is False and seen == [1] and queue.waiting == 0

    asyncio.run(run())


def who(user: int = 1, roles: frozenset[int] = frozenset(), guild: int | None = 10,
        channels: frozenset[int] = frozenset({100})) -> Requester:
    return Requester(user, roles, guild, channels)


def test_permissions() -> None:
    everyone = Permissions(DiscordSettings())
    assert everyone.allowed(who()) and not everyone.allowed(who(guild=None))
    assert Permissions(DiscordSettings(allow_dms=True)).allowed(who(guild=None))
    blocked = Permissions(DiscordSettings(blocked_user_ids=frozenset({1}), admin_ids=frozenset({9})))
    assert not blocked.allowed(who()) and blocked.allowed(who(user=9, guild=None))
    by_role = Permissions(DiscordSettings(allowed_role_ids=frozenset({5})))
    assert by_role.allowed(who(roles=frozenset({5}))) and not by_role.allowed(who())
    assert not Permissions(DiscordSettings(blocked_role_ids=frozenset({5}))).allowed(who(roles=frozenset({5})))
    category = Permissions(DiscordSettings(allowed_channel_ids=frozenset({200})))
    assert category.allowed(who(channels=frozenset({100, 200}))) and not category.allowed(who())
    assert not Permissions(DiscordSettings(blocked_channel_ids=frozenset({200}))).allowed(
        who(channels=frozenset({100, 200})))
    assert not Permissions(DiscordSettings(allowed_guild_ids=frozenset({11}))).allowed(who())
    assert not Permissions(DiscordSettings(blocked_guild_ids=frozenset({10}))).allowed(who())


def test_settings_from_toml_and_env(iris_home: Path) -> None:
    paths = Paths.default()
    paths.config.mkdir(parents=True)
    paths.config_file.write_text('[discord]\nadmin_ids = [1, 2]\nallow_dms = true\nmax_queue = 5\n')
    settings = load_discord_settings(paths, {"IRIS_DISCORD_MAX_QUEUE": "7", "IRIS_DISCORD_BLOCKED_USER_IDS": "3,4"})
    assert settings.admin_ids == {1, 2} and settings.allow_dms and settings.max_queue == 7
    assert settings.blocked_user_ids == {3, 4}
    paths.config_file.write_text('[discord]\nadmins = [1]\n')
    with pytest.raises(BadSetting, match="unknown \\[discord\\] keys admins"):
        load_discord_settings(paths, {})
    paths.config_file.unlink()
    with pytest.raises(BadSetting, match="allow_dms"):
        load_discord_settings(Paths.default(), {"IRIS_DISCORD_ALLOW_DMS": "maybe"})


def test_token_from_env_or_file_never_in_settings(iris_home: Path) -> None:
    paths = Paths.default()
    paths.config.mkdir(parents=True)
    (paths.config / "token").write_text("file-secret\n")
    settings = DiscordSettings(token_file="token")
    assert read_token(settings, paths, {"DISCORD_TOKEN": "env-secret"}) == "env-secret"
    assert read_token(settings, paths, {}) == "file-secret"
    assert "secret" not in repr(settings)
    with pytest.raises(BadSetting, match="no Discord bot token"):
        read_token(DiscordSettings(), paths, {})
    with pytest.raises(BadSetting, match="token_file .*missing: no such file"):
        read_token(DiscordSettings(token_file="missing"), paths, {})
