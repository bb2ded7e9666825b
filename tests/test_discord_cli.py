"""`iris discord`: set-up help, token handling (never shown), model flags, signals and clean shutdown."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from fakes import FakeBackend
from typer.testing import CliRunner

import cli.discord_cmd as discord_cmd
from assistant.config import Paths
from assistant.dialogue import DialogueManager
from assistant.store import Store
from cli.app import app
from integrations.discord_bot import bot as bot_module

SECRET = "MTIz.secret-token-value.xyz"


def test_help_documents_set_up() -> None:
    result = CliRunner().invoke(app, ["discord", "--help"])
    assert result.exit_code == 0
    for needle in ("DISCORD_TOKEN", "token_file", "MESSAGE CONTENT", "--model", "--quant", "--adapter"):
        assert needle in result.output


def test_missing_token_fails_before_loading_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DISCORD_TOKEN", raising=False)
    monkeypatch.setattr(discord_cmd.runtime, "open_manager", lambda *a: pytest.fail("model loaded"))
    result = CliRunner().invoke(app, ["discord"])
    assert result.exit_code == 1 and "no Discord bot token" in result.output


def test_token_reaches_the_gateway_but_never_the_output(monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    store = Store(tmp_path / "bot.db")
    opened: dict[str, Any] = {}

    def fake_open_manager(settings: Any, paths: Paths) -> tuple[DialogueManager, Store]:
        opened["model"], opened["threads"] = settings.model, torch.get_num_threads()
        return DialogueManager(FakeBackend(), store), store

    async def fake_run_bot(bot: bot_module.IrisBot, token: str) -> None:
        opened["token"] = token
        logging.getLogger("iris.discord").info("bot running")

    monkeypatch.setenv("DISCORD_TOKEN", SECRET)
    monkeypatch.setattr(discord_cmd.runtime, "open_manager", fake_open_manager)
    monkeypatch.setattr(bot_module, "run_bot", fake_run_bot)
    caplog.set_level(logging.DEBUG)
    before = torch.get_num_threads()
    result = CliRunner().invoke(app, ["discord", "--model", "some/model", "--quant", "none",
                                        "--adapter", "a1", "--adapter", "a2"])
    assert result.exit_code == 0, result.output
    assert opened["threads"] == 1 and torch.get_num_threads() == before  # loaded on one thread (no second team)
    assert opened["token"] == SECRET
    assert opened["model"].model == "some/model" and opened["model"].quant == "none"
    assert opened["model"].adapters == ("a1", "a2")
    assert SECRET not in result.output and SECRET not in caplog.text
    with pytest.raises(Exception, match="closed"):
        store.list_conversations()  # the store was closed on the way out


def test_rejected_token_is_one_line_without_the_token(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import discord

    store = Store(tmp_path / "bot.db")

    async def refused(bot: bot_module.IrisBot, token: str) -> None:
        raise discord.LoginFailure("Improper token has been passed.")

    monkeypatch.setenv("DISCORD_TOKEN", SECRET)
    monkeypatch.setattr(discord_cmd.runtime, "open_manager",
                        lambda *a: (DialogueManager(FakeBackend(), store), store))
    monkeypatch.setattr(bot_module, "run_bot", refused)
    result = CliRunner().invoke(app, ["discord"])
    assert result.exit_code == 1 and "Discord rejected the token" in result.output
    assert SECRET not in result.output


class GatewayStub(bot_module.IrisBot):
    """An IrisBot whose gateway connection just waits, so run_bot's signal handling can be tested."""

    closed_with_answerer_shut = False

    async def start(self, token: str, *, reconnect: bool = True) -> None:
        await asyncio.Event().wait()

    async def close(self) -> None:
        await super().close()
        type(self).closed_with_answerer_shut = self.answerer.closing


def test_sigterm_shuts_the_bot_down_cleanly(store: Store) -> None:
    from discord_harness import fast_settings

    async def run() -> None:
        bot = GatewayStub(DialogueManager(FakeBackend(), store), fast_settings())
        asyncio.get_running_loop().call_later(0.05, os.kill, os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(bot_module.run_bot(bot, SECRET), timeout=5)

    asyncio.run(run())
    assert GatewayStub.closed_with_answerer_shut
