"""``iris serve`` beside llama.cpp's native server (``xllamacpp``) on the same GGUF, and beside Iris in process.

1. Requests/s, completion tokens/s and time to first token with 1, 2 and 4 concurrent clients: Iris serve vs
   llama.cpp's server (both answer one request at a time: llama.cpp with one slot). Both get the same streamed,
   greedy requests (distinct prompts, the same system prompt) in the same order.
2. One client: each request through ``iris serve`` then straight from ``LocalBackend.stream`` in this process,
   alternating, completion tokens/s (target >= 0.95: HTTP, the device line and SSE cost almost nothing next to
   generation; tokens/s, since the two processes' KV caches differ and quantized answers may depend on them).
Every round runs everything once, in turn; medians of the rounds are compared. Run: ``python bench/serve.py``
(``--quant auto``, the default: int4 on an AVX2/AVX-512 CPU; or fp16, int8, none).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from llama_server import MODEL_ALIAS, llama_server  # noqa: E402

from assistant.builders.default_model import embedded_gguf_path  # noqa: E402
from assistant.config import GenerationOptions, ModelOptions, Paths  # noqa: E402
from assistant.engine import LocalBackend  # noqa: E402
from assistant.messages import Message, Role  # noqa: E402
from assistant.model import load  # noqa: E402

SYSTEM = "You are a helpful AI assistant named Iris."
TOPICS = ["a lighthouse keeper and a storm", "a dragon afraid of fire", "a robot learning to paint",
          "a city under the sea", "a clockmaker's last clock", "two rival bakers", "a train that never stops",
          "a garden on the moon"]
NEW_TOKENS = 64
CLIENTS = (1, 2, 4)
THREADS = 2  # torch's (a small model's tokens use one or both: assistant/decode_threads.py)
# llama.cpp's spinning thread barriers collapse on 2 busy shared cores; one thread holds up (test_llama_server.py).
LLAMA_THREADS = 1


@dataclass
class Run:
    seconds: float  # wall time for all requests
    first_token: list[float]  # per request, seconds to the first piece of text
    tokens: int  # completion tokens, all requests

    @property
    def requests_per_s(self) -> float:
        return len(self.first_token) / self.seconds


def question(index: int) -> str:
    return f"Write a long story about {TOPICS[index % len(TOPICS)]}."


def streamed(url: str, model: str, text: str) -> tuple[float, int]:
    """One streamed greedy answer: seconds to its first text, and its completion tokens (from the usage chunk)."""
    body = json.dumps({"model": model, "stream": True, "stream_options": {"include_usage": True},
                       "max_tokens": NEW_TOKENS, "temperature": 0.0,
                       "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}]})
    request = urllib.request.Request(url + "/chat/completions", data=body.encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    started = time.perf_counter()
    first, tokens = None, 0
    with urllib.request.urlopen(request, timeout=600) as response:
        for line in response:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[len(b"data: "):])
            if first is None and any((c.get("delta") or {}).get("content") for c in chunk.get("choices") or []):
                first = time.perf_counter() - started
            if chunk.get("usage"):
                tokens = int(chunk["usage"]["completion_tokens"])
    assert first is not None, f"{url}: no text in the answer"
    return first, tokens


def load_run(url: str, model: str, clients: int, requests: int) -> Run:
    """``requests`` questions answered by ``clients`` threads at once (each takes the next question)."""
    firsts: list[float] = []
    tokens: list[int] = []
    taken = iter(range(requests))
    lock = threading.Lock()

    def client() -> None:
        while True:
            with lock:
                index = next(taken, None)
            if index is None:
                return
            first, count = streamed(url, model, question(index))
            with lock:
                firsts.append(first)
                tokens.append(count)

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return Run(time.perf_counter() - started, firsts, sum(tokens))


def in_process(backend: LocalBackend, index: int) -> tuple[float, float, int]:
    """One question straight from the backend: seconds to its first text, seconds in all, completion tokens
    (counted as the server counts them)."""
    messages = [Message(Role.SYSTEM, SYSTEM), Message(Role.USER, question(index))]
    started = time.perf_counter()
    stream = backend.stream(messages, GenerationOptions(temperature=0, max_new_tokens=NEW_TOKENS))
    text = next(stream)
    first = time.perf_counter() - started
    text += "".join(stream)
    return first, time.perf_counter() - started, len(backend.loaded.tokenizer(text, add_special_tokens=False)
                                                        ["input_ids"])


def paired(url: str, model: str, backend: LocalBackend, requests: int) -> tuple[Run, Run]:
    """One client, each question through the server then in process, alternating, so that both see the same
    moment of a shared machine: (served, in process)."""
    served, local = Run(0.0, [], 0), Run(0.0, [], 0)
    for index in range(requests):
        started = time.perf_counter()
        first, tokens = streamed(url, model, question(index))
        served.seconds += time.perf_counter() - started
        served.first_token.append(first)
        served.tokens += tokens
        first, seconds, tokens = in_process(backend, index)
        local.seconds += seconds
        local.first_token.append(first)
        local.tokens += tokens
    return served, local


class IrisServe:
    """``iris serve`` on the GGUF in a child process (stopped with Ctrl+C's signal, as a user would)."""

    def __init__(self, gguf: str, quant: str) -> None:
        environment = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "HF_HUB_OFFLINE": "1"}
        environment.pop("IRIS_SERVE_TOKEN", None)
        self.process = subprocess.Popen([sys.executable, "-m", "cli.app", "serve", "--model", gguf, "--quant", quant,
                                         "--port", "0"], stderr=subprocess.PIPE, text=True, env=environment,
                                        cwd=Path(__file__).resolve().parent.parent)
        assert self.process.stderr is not None
        while "http://" not in (line := self.process.stderr.readline()):
            if not line and self.process.poll() is not None:
                raise RuntimeError("iris serve exited before it listened")
        self.url = line[line.index("http://"):].split()[0]
        threading.Thread(target=self.process.stderr.read, daemon=True).start()  # drain its log
        with urllib.request.urlopen(self.url + "/models", timeout=60) as response:
            self.model = json.load(response)["data"][0]["id"]

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quant", default="auto", choices=("auto", "int4", "fp16", "int8", "none"))
    parser.add_argument("--requests", type=int, default=8, help="requests per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    arguments = parser.parse_args()
    torch.set_num_threads(THREADS)
    gguf = str(embedded_gguf_path())
    backend = LocalBackend(load(ModelOptions(model=gguf, quant=arguments.quant), Paths.default()))
    iris = IrisServe(gguf, arguments.quant)
    runs: dict[tuple[str, int], list[Run]] = {}
    pairs: list[tuple[Run, Run]] = []
    try:
        with llama_server(threads=LLAMA_THREADS) as llama_url:
            servers = {"iris serve": (iris.url, iris.model), "llama.cpp": (llama_url, MODEL_ALIAS)}
            for url, model in servers.values():  # warm-ups
                streamed(url, model, question(0))
            in_process(backend, 0)
            for _ in range(arguments.rounds):
                for clients in CLIENTS:
                    for name, (url, model) in servers.items():
                        runs.setdefault((name, clients), []).append(load_run(url, model, clients, arguments.requests))
                pairs.append(paired(iris.url, iris.model, backend, arguments.requests))
    finally:
        iris.stop()
    print(f"SmolLM2-135M-Instruct GGUF, {arguments.requests} streamed greedy requests of up to {NEW_TOKENS} tokens "
          f"per run, Iris --quant {arguments.quant} vs llama.cpp Q4_1 (one slot, {LLAMA_THREADS} thread), "
          f"median of {arguments.rounds} rounds")
    print(f"{'clients':>7}  {'':10}  {'req/s':>6}  {'tok/req':>7}  {'tok/s':>6}  {'TTFT median':>11}  {'TTFT max':>8}")
    for clients in CLIENTS:
        for name in ("iris serve", "llama.cpp"):
            measured = runs[(name, clients)]
            rate = statistics.median(run.requests_per_s for run in measured)
            tokens = statistics.median(run.tokens / run.seconds for run in measured)
            ttft = statistics.median(statistics.median(run.first_token) for run in measured)
            worst = statistics.median(max(run.first_token) for run in measured)
            per_request = statistics.median(run.tokens / len(run.first_token) for run in measured)
            print(f"{clients:>7}  {name:10}  {rate:6.2f}  {per_request:7.1f}  {tokens:6.1f}  {ttft * 1000:9.0f}ms  "
                  f"{worst * 1000:6.0f}ms")
    ratios = [(served.tokens / served.seconds) / (local.tokens / local.seconds) for served, local in pairs]

    def summary(runs: list[Run]) -> str:
        rate = sum(run.tokens for run in runs) / sum(run.seconds for run in runs)
        return f"{rate:.1f} tok/s, TTFT {statistics.median(t for run in runs for t in run.first_token) * 1000:.0f}ms"

    print(f"one client, {arguments.requests} requests a round, each served then in process: in process "
          f"{summary([local for _, local in pairs])}; through iris serve {summary([served for served, _ in pairs])}; "
          f"ratio {statistics.median(ratios):.3f} (rounds: {', '.join(f'{r:.3f}' for r in ratios)}; target >= 0.95)")


if __name__ == "__main__":
    main()
