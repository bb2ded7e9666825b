"""llama.cpp's native OpenAI-compatible server (``xllamacpp``'s prebuilt wheel) serving the embedded SmolLM2 GGUF.

``llama_server()`` runs it in a child process (this file as a script): a native abort cannot take the tests down, its
threads stay out of the caller's process, and it stops when its stdin closes, so it also ends with a killed parent.
"""

from __future__ import annotations

import contextlib
import select
import subprocess
import sys
import tempfile
from collections.abc import Iterator

MODEL_ALIAS = "smollm2"
CONTEXT = 2048


@contextlib.contextmanager
def llama_server(threads: int = 2, timeout: float = 120.0) -> Iterator[str]:
    """Yield the server's ``/v1`` URL once it listens with the model loaded; stop it afterwards."""
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen([sys.executable, __file__, str(threads)], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=log, text=True)
        assert process.stdin is not None and process.stdout is not None
        try:
            ready, _, _ = select.select([process.stdout], [], [], timeout)
            address = process.stdout.readline().strip() if ready else ""
            if not address:
                log.seek(0)
                state = "exited" if process.poll() is not None else f"did not start in {timeout:g} s"
                raise RuntimeError(f"llama.cpp server {state}: {log.read()[-2000:]}")
            yield address + "/v1"
        finally:
            process.stdin.close()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def serve(threads: int) -> None:
    """Child side: load the model, print the listening address, serve until stdin closes."""
    import xllamacpp

    from assistant.builders.default_model import embedded_gguf_path

    params = xllamacpp.CommonParams()
    params.model.path = str(embedded_gguf_path())
    params.model_alias = {MODEL_ALIAS}
    params.n_ctx = CONTEXT
    params.n_parallel = 1
    params.cpuparams.n_threads = threads
    params.cpuparams_batch.n_threads = threads
    params.verbosity = 0  # quiet: no load or per-request log lines
    server = xllamacpp.Server(params)  # port 0 (the default): the OS picks a free one, no race
    print(server.listening_address, flush=True)
    sys.stdin.read()


if __name__ == "__main__":
    serve(int(sys.argv[1]))
