"""Running the application: the listening socket (bound before the model loads, so a taken port fails at once)
and the uvicorn server that serves on it."""

from __future__ import annotations

import socket
from typing import Any

from assistant.errors import BadSetting

BACKLOG = 2048  # uvicorn's default
GRACEFUL_SHUTDOWN_S = 5  # on Ctrl+C, answers in flight get this long before they are cancelled


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket listening on ``host:port`` (port 0: one the system picks); ``BadSetting`` in one line
    otherwise."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as error:
        raise BadSetting(f"--host {host!r}: not an address of this machine ({error})") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(BACKLOG)  # clients may connect from now on; they are answered once the server runs
    except OSError as error:
        sock.close()
        raise BadSetting(f"cannot listen on {host}:{port} ({error.strerror or error})") from None
    return sock


def base_url(sock: socket.socket) -> str:
    """The ``/v1`` URL clients use for a bound socket."""
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/v1"


def uvicorn_server(app: Any) -> Any:
    """A uvicorn server for ``app``; its ``run(sockets=[...])`` serves until Ctrl+C or ``should_exit``.
    Logging is left to the caller (``log_config=None``)."""
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, log_config=None, ws="none", lifespan="off",
                                         timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S))
