"""Build the objects a front end runs on: settings, store, backend and dialogue manager.

Kept apart from the commands so the Discord bot and the CLI start the same way,
and tests can swap ``open_backend`` for a fake.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence

from rich.console import Console

from assistant.config import ModelOptions, Paths, Settings, load_settings
from assistant.dialogue import ChatBackend, DialogueManager
from assistant.store import Store


def resolve_settings(paths: Paths, *, model: str | None = None, quant: str | None = None,
                     adapters: Sequence[str] = (), trust_pickle: bool = False, device: str | None = None,
                     system: str | None = None) -> Settings:
    """Config file and environment, then the command-line flags on top."""
    settings = load_settings(paths)
    overrides: dict[str, object] = {}
    if model is not None:
        overrides["model"] = model
    if quant is not None:
        overrides["quant"] = quant
    if device is not None:
        overrides["device"] = device
    if adapters:
        overrides["adapters"] = tuple(adapters)
    if trust_pickle:
        overrides["trust_pickle"] = True
    model_options: ModelOptions = dataclasses.replace(settings.model, **overrides)  # type: ignore[arg-type]
    settings = dataclasses.replace(settings, model=model_options)
    if system is not None:
        settings = dataclasses.replace(settings, system_prompt=system)
    return settings


def open_backend(settings: Settings, paths: Paths) -> ChatBackend:
    """Load the model with a progress line on stderr (stdout stays clean for ``iris ask``)."""
    from transformers.utils import logging as hf_logging

    from assistant import model as model_loading
    from assistant.engine import LocalBackend

    # One status line with the current stage instead of transformers' tqdm bars and notices.
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    status_console = Console(stderr=True)
    with status_console.status("loading model…") as status:
        loaded = model_loading.load(settings.model, paths, progress=lambda text: status.update(text))
    return LocalBackend(loaded)


def open_manager(settings: Settings, paths: Paths) -> tuple[DialogueManager, Store]:
    store = Store(paths.database)
    try:
        backend = open_backend(settings, paths)
    except BaseException:
        store.close()
        raise
    manager = DialogueManager(backend, store, default_system_prompt=settings.system_prompt,
                              default_options=settings.generation)
    return manager, store


def stdout_is_terminal() -> bool:
    return sys.stdout.isatty()
