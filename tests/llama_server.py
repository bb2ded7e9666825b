"""Start llama-cpp-python's OpenAI-compatible server on loopback, serving the embedded SmolLM2 GGUF."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

from assistant.model import embedded_gguf_path

MODEL_ALIAS = "smollm2"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def llama_server(threads: int = 2, timeout: float = 120.0) -> Iterator[str]:
    """Yield the server's ``/v1`` URL once it answers ``/v1/models``; stop it afterwards."""
    port = free_port()
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(embedded_gguf_path()),
               "--model_alias", MODEL_ALIAS, "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048",
               "--n_threads", str(threads), "--verbose", "False"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                output = process.stderr.read()[-2000:] if process.stderr else ""
                raise RuntimeError(f"llama_cpp.server exited: {output}")
            try:
                with urllib.request.urlopen(url + "/models", timeout=2) as response:
                    if json.loads(response.read())["data"]:
                        break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("llama_cpp.server did not start in time") from None
                time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
