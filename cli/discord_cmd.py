"""``iris discord``: run the assistant as a Discord bot (registered in ``cli/app.py``)."""

from __future__ import annotations

import asyncio
import logging

from assistant.config import Paths
from assistant.errors import BackendError, one_line
from cli import runtime
from cli.options import AdapterOption, ApiKeyEnvOption, BackendOption, BaseUrlOption, ModelOption, QuantOption
from cli.terminal import VisibleLogRecords


def discord(model: ModelOption = None, quant: QuantOption = None, adapter: AdapterOption = None,
            backend: BackendOption = None, base_url: BaseUrlOption = None,
            api_key_env: ApiKeyEnvOption = None) -> None:
    """Run Iris as a Discord bot: the same assistant and conversation history as `iris chat`.

    Set-up: create an application at https://discord.com/developers/applications, add a bot, and on its Bot page enable the MESSAGE CONTENT privileged intent. Invite it with the `bot` and `applications.commands` scopes (View Channels, Send Messages, Send Messages in Threads, Read Message History, Add Reactions).

    Token: the DISCORD_TOKEN environment variable, or a file named by `token_file` in the \\[discord] table of config.toml (relative to the config dir). Never a flag, never printed or logged.

    The \\[discord] table also sets admin_ids, allow/block lists (allowed_/blocked_ guild, channel, role and user ids), allow_dms, image caps, rate limit and queue caps; IRIS_DISCORD_<KEY> variables override it. People mention the bot, reply to its messages, or DM it; /reset, /stop, /info, /system for everyone, /persona, /adapter, /set for admins.

    Ctrl+C or SIGTERM finishes (or marks interrupted) the answers in flight and closes the store.
    """  # noqa: E501 (typer keeps line breaks, so each paragraph is one line)
    from integrations.discord_bot.bot import IrisBot, run_bot
    from integrations.discord_bot.settings import load_discord_settings, read_token

    paths = Paths.default()
    discord_settings = load_discord_settings(paths)
    token = read_token(discord_settings, paths)  # before loading the model: fail fast
    settings = runtime.resolve_settings(paths, model=model, quant=quant, adapters=adapter or (),
                                        backend=backend, base_url=base_url, api_key_env=api_key_env)
    with runtime.loading_on_one_thread():  # the bot answers on its own thread
        manager, store = runtime.open_manager(settings, paths)
    _log_to_stderr()
    bot = IrisBot(manager, discord_settings, max_image_bytes=settings.max_image_bytes,
                  max_image_pixels=settings.max_image_pixels)
    try:
        asyncio.run(run_bot(bot, token))
    except Exception as error:  # LoginFailure, gateway errors: one line, never the token
        import discord as discord_lib

        if isinstance(error, discord_lib.LoginFailure):
            raise BackendError("Discord rejected the token (check DISCORD_TOKEN / token_file)") from None
        raise BackendError(f"Discord: {type(error).__name__}: {one_line(error)}") from None
    finally:
        store.close()


def _log_to_stderr() -> None:
    """INFO logs on stderr for the bot and discord.py: ids and events, never contents or the token. Names and
    library errors in them come from Discord, so they are made visible before they reach the terminal."""
    import discord as discord_lib

    handler = logging.StreamHandler()
    handler.addFilter(VisibleLogRecords())
    discord_lib.utils.setup_logging(handler=handler, level=logging.INFO)
