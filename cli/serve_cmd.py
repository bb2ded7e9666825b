"""``iris serve``: one loaded model behind an OpenAI-compatible HTTP API (registered in ``cli/app.py``)."""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Annotated

import typer

from assistant.config import BackendOptions, Paths
from assistant.errors import BadSetting
from cli import runtime
from cli.options import AdapterOption, QuantOption, TrustPickleOption
from cli.terminal import VisibleLogRecords, make_console, styled

TOKEN_ENV = "IRIS_SERVE_TOKEN"
ModelOption = Annotated[str | None, typer.Option("--model", "-m", help="HF model dir, hub id or .gguf file "
                                                 "(default: the embedded model).")]
LOOPBACK = ("127.0.0.1", "::1", "localhost")


def serve(model: ModelOption = None, quant: QuantOption = None, adapter: AdapterOption = None,
          trust_pickle: TrustPickleOption = False,
          name: Annotated[str | None, typer.Option("--name", help="The base model's name for clients (their "
                                                   "--model NAME; default: the model's own name).")] = None,
          host: Annotated[str, typer.Option(help="Address to listen on; anything but loopback lets other "
                                            "machines in (set IRIS_SERVE_TOKEN then).")] = "127.0.0.1",
          port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port (0: any free one).")] = 8000,
          max_queue: Annotated[int, typer.Option(min=0, max=10_000, help="Requests that may wait for the "
                                                 "device; more are refused with 429.")] = 16,
          queue_timeout: Annotated[float, typer.Option(min=0.1, max=86_400, help="Seconds a request may wait "
                                                       "for the device before a 503.")] = 600.0,
          max_request_mb: Annotated[int, typer.Option(min=1, max=4096, help="Largest request body, in "
                                                      "MB.")] = 64,
          max_images: Annotated[int, typer.Option(min=0, max=1000, help="Most images in one request.")] = 16,
          ) -> None:
    """Serve the model over an OpenAI-compatible API, so several front ends share one loaded model.

    Endpoints: POST /v1/chat/completions (streaming or not; images as data: URLs), GET /v1/models (the base model and each adapter, by name: naming an adapter as the model runs it), GET /health.

    Clients: iris chat --backend openai --base-url http://127.0.0.1:8000/v1 --model NAME (NAME as GET /v1/models lists it, or --name here; iris discord and iris ask the same way), or any OpenAI client. Set IRIS_SERVE_TOKEN to require "Authorization: Bearer TOKEN" (clients: --api-key-env IRIS_SERVE_TOKEN).
    """  # noqa: E501 (typer keeps line breaks, so each paragraph is one line)
    from assistant.engine import LocalBackend
    from integrations.openai_server.app import ServeOptions, create_app
    from integrations.openai_server.server import base_url, bind, uvicorn_server
    from integrations.openai_server.wire import Limits

    paths = Paths.default()
    settings = runtime.resolve_settings(paths, model=model, quant=quant, adapters=adapter or (),
                                        trust_pickle=trust_pickle)
    settings = dataclasses.replace(settings, backend=BackendOptions())  # the server runs the model itself
    token = os.environ.get(TOKEN_ENV, "").strip() or None
    if name is not None and (not name.strip() or not name.isprintable()):
        raise BadSetting(f"--name must be printable text, got {name!r}")
    sock = bind(host, port)  # before loading: a taken port fails at once
    try:
        with runtime.loading_on_one_thread():  # each request is answered on a thread of its own
            backend = runtime.open_backend(settings, paths)
        assert isinstance(backend, LocalBackend)  # the local kind, set above
        name = name or backend.loaded.name
        limits = Limits(max_request_bytes=max_request_mb * 1_000_000, max_images=max_images,
                        max_image_bytes=settings.max_image_bytes, max_image_pixels=settings.max_image_pixels)
        app = create_app(backend, ServeOptions(base_name=name, token=token, limits=limits,
                                               defaults=settings.generation, max_waiting=max_queue,
                                               queue_timeout=queue_timeout))
        console = make_console(stderr=True, soft_wrap=True)
        adapters = ", ".join(backend.adapter_names()) or "none"
        console.print(styled(("Iris serve", "bold"), f" · {name} · adapters: {adapters} · {base_url(sock)} · "
                             f"{'token required' if token else 'no token'} · Ctrl+C stops"))
        if token is None and host not in LOOPBACK:
            console.print(styled(("warning:", "bold yellow"), f" listening on {host} without {TOKEN_ENV}: anyone "
                                 "who can reach this port can use the model"))
        _log_to_stderr()
        try:
            uvicorn_server(app).run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn stopped gracefully, then passed Ctrl+C on: the end we asked for
            pass
    finally:
        sock.close()


def _log_to_stderr() -> None:
    """Access and error lines on stderr; request paths come from clients, so they are made visible first."""
    handler = logging.StreamHandler()
    handler.addFilter(VisibleLogRecords())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("uvicorn", "iris.serve"):
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.setLevel(logging.INFO)
        logger.propagate = False
