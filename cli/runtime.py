"""Build the objects a front end runs on: settings, store, backend and dialogue manager.

Kept apart from the commands so the Discord bot and the CLI start the same way,
and tests can swap ``open_backend`` for a fake.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from assistant.config import BackendOptions, ModelOptions, Paths, Settings, load_settings
from assistant.dialogue import ChatBackend, DialogueManager
from assistant.store import Store
from assistant.threads import one_thread
from cli.terminal import make_console, styled


def resolve_settings(paths: Paths, *, model: str | None = None, quant: str | None = None,
                     adapters: Sequence[str] = (), trust_pickle: bool = False, device: str | None = None,
                     system: str | None = None, backend: str | None = None, base_url: str | None = None,
                     api_key_env: str | None = None) -> Settings:
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
    backend_overrides = {key: value for key, value in
                         (("kind", backend), ("base_url", base_url), ("api_key_env", api_key_env)) if value}
    if backend_overrides:
        backend_options: BackendOptions = dataclasses.replace(settings.backend, **backend_overrides)  # type: ignore[arg-type]
        settings = dataclasses.replace(settings, backend=backend_options)
    return settings


@contextmanager
def loading_on_one_thread() -> Iterator[None]:
    """For commands that answer on threads of their own (``iris discord``, ``iris serve``): load with one thread,
    so that parallel ATen ops run inline and leave no OpenMP team here. A team left behind by the loading thread
    slows every 2-thread int4 decode step of an answering thread about twofold (22-24 ms against 11.4 on 2 cores:
    assistant/decode_threads.py)."""
    with one_thread():
        yield


def open_backend(settings: Settings, paths: Paths) -> ChatBackend:
    """Load the model with a progress line on stderr (stdout stays clean for ``iris ask``)."""
    if settings.backend.kind == "openai":
        return open_server_backend(settings)
    from assistant import model as model_loading
    from assistant.builders.default_model import with_default_model
    from assistant.engine import LocalBackend

    # One status line with the current step (libraries' own bars and notices are off: cli.quiet).
    with make_console(stderr=True).status("loading model…") as status:
        def progress(text: str) -> None:
            status.update(styled(text))  # paths in the text are data, never markup

        loaded = model_loading.load(with_default_model(settings.model, paths, progress), paths, progress)
    return LocalBackend(loaded, kv_cache_bytes=settings.kv_cache_mb << 20,
                        feature_cache_bytes=settings.feature_cache_mb << 20)


def open_server_backend(settings: Settings) -> ChatBackend:
    """An OpenAI-compatible server; ``--model`` names the served model."""
    from assistant.errors import BadSetting
    from assistant.openai_backend import OpenAIBackend

    options = settings.backend
    if not settings.model.model:
        raise BadSetting("--backend openai needs --model NAME (a model the server serves)")
    api_key = None
    if options.api_key_env:
        api_key = os.environ.get(options.api_key_env)
        if not api_key:
            raise BadSetting(f"--api-key-env {options.api_key_env}: that environment variable is not set")
    assert options.base_url is not None
    return OpenAIBackend(options.base_url, settings.model.model, api_key=api_key, timeout=options.timeout,
                         context_length=options.context_length)


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

