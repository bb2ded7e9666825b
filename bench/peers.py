"""Iris side by side with llama.cpp's native server (``xllamacpp``) on the same GGUF model, prompt and greedy decoding.

1. Local: Iris's in-process backend against llama.cpp's server, end-to-end tokens/s of 128 greedy tokens (target for
   the default model as users get it: >= 0.5 x llama.cpp, the faster of its 2-thread and 1-thread servers: on a busy
   machine a 2-thread team stalls on the other core). Iris runs the default vision model on a text turn with
   ``--quant auto`` (int4 weights on an AVX2/AVX-512 CPU), ``--quant fp16``, ``--quant int8`` and ``--quant none``
   (fp32), and the bare SmolLM2 (the GGUF as ``--model``): the vision model must decode as fast as its language
   model alone (target >= 0.95).
2. Served: Iris's OpenAI backend in front of that server vs calling it directly over HTTP (target >= 0.95).
3. The physical limit: this machine's memory bandwidth over the bytes of weights one token reads.
Every round runs all of them once, in turn; medians of the rounds are compared. Beside each wall-clock ratio, the
same ratio in CPU time (tokens per CPU second: Iris's process, all threads; llama.cpp's server process is read
from ``psutil``), which other work on a shared machine disturbs far less. Run: ``python bench/peers.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from llama_server import MODEL_ALIAS, llama_server  # noqa: E402

from assistant import cpu_quant  # noqa: E402
from assistant.builders.default_model import embedded_gguf_path, with_default_model  # noqa: E402
from assistant.config import GenerationOptions, ModelOptions, Paths  # noqa: E402
from assistant.cpu_quant import packed_weights  # noqa: E402
from assistant.dialogue import DialogueManager  # noqa: E402
from assistant.engine import LocalBackend  # noqa: E402
from assistant.model import load  # noqa: E402
from assistant.openai_backend import OpenAIBackend  # noqa: E402
from assistant.store import Store  # noqa: E402

SYSTEM = "You are a helpful AI assistant named Iris."
QUESTION = "Write a long story about a lighthouse keeper and a storm."
NEW_TOKENS = 128
ROUNDS = 3
THREADS = 2
SERVERS = (THREADS, 1)  # llama.cpp thread counts
LOCAL = {"default": "default model, --quant auto (int4 weights)", "fp16": "default model, --quant fp16",
         "int8": "default model, --quant int8", "none": "default model, --quant none (fp32)",
         "bare": "bare SmolLM2 (the GGUF), --quant auto"}


def iris_rate(backend: LocalBackend, work: Path, tokenizer: Any) -> tuple[float, float]:
    """Tokens per second of one answer, and per CPU second of this process (all its threads)."""
    manager = DialogueManager(backend, Store(work / f"{time.monotonic_ns()}.db"), default_system_prompt=SYSTEM,
                              default_options=GenerationOptions(temperature=0, max_new_tokens=NEW_TOKENS))
    conversation = manager.new_conversation()
    started, cpu_started = time.perf_counter(), time.process_time()
    text = manager.send(conversation, QUESTION).run()
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    return tokens / seconds, tokens / cpu_seconds


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def direct_http(url: str) -> tuple[float, int]:
    """Seconds for one streamed greedy answer straight from the server, and its completion tokens."""
    body = json.dumps({"model": MODEL_ALIAS, "stream": True, "stream_options": {"include_usage": True},
                       "max_tokens": NEW_TOKENS, "temperature": 0.0,
                       "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]})
    request = urllib.request.Request(url + "/chat/completions", data=body.encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=300) as response:
        lines = list(response)
    seconds = time.perf_counter() - started
    chunks = [json.loads(line[len(b"data: "):]) for line in lines if line.startswith(b"data: {")]
    return seconds, int(chunks[-1]["usage"]["completion_tokens"])  # the last chunk carries the usage


def iris_http_seconds(url: str, work: Path) -> float:
    manager = DialogueManager(OpenAIBackend(url, MODEL_ALIAS), Store(work / f"{time.monotonic_ns()}.db"),
                              default_system_prompt=SYSTEM,
                              default_options=GenerationOptions(temperature=0, max_new_tokens=NEW_TOKENS, top_k=0,
                                                                top_p=1.0))
    conversation = manager.new_conversation()
    started = time.perf_counter()
    manager.send(conversation, QUESTION).run()
    return time.perf_counter() - started


def read_bandwidth(threads: int) -> float:
    """Bytes per second this machine reads from memory (a 512 MiB reduction, far past the caches; best of 5)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    data = torch.ones(128 << 20, dtype=torch.float32)
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - started)
    torch.set_num_threads(before)
    return data.numel() * 4 / best


def main() -> None:
    import torch

    torch.set_num_threads(THREADS)
    # The fp16 row's prefill would share its products with a pool thread, whose own OpenMP team then slows every
    # later 2-thread int4 step in this process (11.3 -> 18.5 ms): a process that runs one model has no such second
    # team (int4's fp16 head multiplies one row). The split saves under a millisecond of this short prompt.
    cpu_quant.PARALLEL_ROWS = 1 << 30
    load_average = os.getloadavg()[0]  # other work on the machine slows both sides, not equally
    paths = Paths.default()
    gguf = str(embedded_gguf_path())
    backends = {name: LocalBackend(load(options, paths), kv_cache_bytes=0) for name, options in (
        ("default", with_default_model(ModelOptions(), paths)),
        ("fp16", with_default_model(ModelOptions(quant="fp16"), paths)),
        ("int8", with_default_model(ModelOptions(quant="int8"), paths)),
        ("none", with_default_model(ModelOptions(quant="none"), paths)),
        ("bare", ModelOptions(model=gguf)))}
    tokenizer = backends["bare"].loaded.tokenizer
    peers = [f"llama.cpp, {threads} thread(s)" for threads in SERVERS]
    rates: dict[str, list[float]] = {**{peer: [] for peer in peers}, **{name: [] for name in backends}}
    cpu_rates: dict[str, list[float]] = {name: [] for name in rates}
    served: dict[str, list[float]] = {"direct": [], "iris": []}
    with tempfile.TemporaryDirectory() as work_dir, contextlib.ExitStack() as servers:
        work = Path(work_dir)
        urls, processes = [], []
        for threads in SERVERS:
            known = {child.pid for child in psutil.Process().children()}
            urls.append(servers.enter_context(llama_server(threads=threads)))
            processes.append(next(child for child in psutil.Process().children() if child.pid not in known))
        for url in urls:  # warm-ups
            direct_http(url)
        iris_http_seconds(urls[-1], work)
        for backend in backends.values():
            iris_rate(backend, work, tokenizer)
        for _ in range(ROUNDS):
            for peer, url, process in zip(peers, urls, processes, strict=True):
                cpu_started = cpu_seconds(process)
                seconds, tokens = direct_http(url)
                rates[peer].append(tokens / seconds)
                cpu_rates[peer].append(tokens / (cpu_seconds(process) - cpu_started))
                if url == urls[-1]:  # the served comparison uses the 1-thread server: steadier on a busy machine
                    served["direct"].append(seconds)
            served["iris"].append(iris_http_seconds(urls[-1], work))
            for name, backend in backends.items():
                rate, cpu_rate = iris_rate(backend, work, tokenizer)
                rates[name].append(rate)
                cpu_rates[name].append(cpu_rate)
    medians = {name: statistics.median(values) for name, values in rates.items()}
    cpu_medians = {name: statistics.median(values) for name, values in cpu_rates.items()}
    peer, cpu_peer = max(peers, key=medians.__getitem__), peers[-1]  # CPU time: the 1-thread server
    print(f"SmolLM2-135M-Instruct, {NEW_TOKENS} greedy tokens, median of {ROUNDS} alternating rounds, "
          f"load average at the start: {load_average:.1f} on {os.cpu_count()} CPUs")
    for name in peers:
        print(f"{name + ' (xllamacpp server, GGUF Q4_1)':<50} {medians[name]:6.1f} tok/s   "
              f"{cpu_medians[name]:6.1f} tok per CPU s")
    for name, label in LOCAL.items():
        ratio = medians[name] / medians[peer]
        target = "   (target >= 0.5)" if name == "default" else ""
        print(f"Iris, {label:<44} {medians[name]:6.1f} tok/s   {cpu_medians[name]:6.1f} tok per CPU s   "
              f"ratio {ratio:.2f} to {peer}{target}, in CPU time {cpu_medians[name] / cpu_medians[cpu_peer]:.2f}")
    print(f"default vision model / bare language model: {medians['default'] / medians['bare']:.2f}, in CPU time "
          f"{cpu_medians['default'] / cpu_medians['bare']:.2f} (target >= 0.95)")
    direct, through = statistics.median(served["direct"]), statistics.median(served["iris"])
    print(f"llama.cpp server direct: {direct:.2f} s   through Iris's OpenAI backend: {through:.2f} s   "
          f"ratio {direct / through:.3f} (target >= 0.95)")
    bandwidth = {threads: read_bandwidth(threads) for threads in (1, THREADS)}
    for name in ("default", "fp16", "int8"):
        per_token = packed_weights(backends[name].loaded.model)[1]
        ceilings = "  ".join(f"{threads} thread(s) {bw / 2**30:.1f} GiB/s -> {bw / per_token:.0f} tok/s"
                             for threads, bw in bandwidth.items())
        print(f"memory-bandwidth ceiling, {name} ({per_token / 2**20:.0f} MiB of weights per token): {ceilings}")


if __name__ == "__main__":
    main()
