"""Iris side by side with llama.cpp's native server (``xllamacpp``) on the same GGUF model, prompt and greedy decoding.

1. Local: Iris's in-process backend (transformers; fp32 and the int8 CPU path) vs llama.cpp's server, end-to-end
   tokens/s (target for the local backend on CPU: >= 0.5 x llama.cpp).
2. Served: Iris's OpenAI backend in front of that server vs calling it directly over HTTP (target >= 0.95).
Every round runs all four once, in turn; medians of 3 rounds are compared. Run: ``python bench/peers.py``.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from llama_server import MODEL_ALIAS, llama_server  # noqa: E402

from assistant.builders.default_model import embedded_gguf_path  # noqa: E402
from assistant.config import GenerationOptions, ModelOptions, Paths  # noqa: E402
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


def iris_rate(backend: LocalBackend, work: Path, tokenizer: Any) -> float:
    manager = DialogueManager(backend, Store(work / f"{time.monotonic_ns()}.db"), default_system_prompt=SYSTEM,
                              default_options=GenerationOptions(temperature=0, max_new_tokens=NEW_TOKENS))
    conversation = manager.new_conversation()
    started = time.perf_counter()
    text = manager.send(conversation, QUESTION).run()
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) / (time.perf_counter() - started)


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


def main() -> None:
    import torch

    torch.set_num_threads(THREADS)
    gguf = str(embedded_gguf_path())
    backends = {quant: LocalBackend(load(ModelOptions(model=gguf, quant=quant), Paths.default()), kv_cache_bytes=0)
                for quant in ("none", "int8")}
    tokenizer = backends["none"].loaded.tokenizer
    rates: dict[str, list[float]] = {"llama.cpp": [], "none": [], "int8": []}
    served: dict[str, list[float]] = {"direct": [], "iris": []}
    with tempfile.TemporaryDirectory() as work_dir, llama_server(threads=THREADS) as url:
        work = Path(work_dir)
        direct_http(url)  # warm-ups
        iris_http_seconds(url, work)
        for backend in backends.values():
            iris_rate(backend, work, tokenizer)
        for _ in range(ROUNDS):
            seconds, tokens = direct_http(url)
            served["direct"].append(seconds)
            rates["llama.cpp"].append(tokens / seconds)
            served["iris"].append(iris_http_seconds(url, work))
            for quant, backend in backends.items():
                rates[quant].append(iris_rate(backend, work, tokenizer))
    medians = {name: statistics.median(values) for name, values in rates.items()}
    print(f"SmolLM2-135M-Instruct, {NEW_TOKENS} greedy tokens, {THREADS} threads, median of {ROUNDS} alternating "
          "rounds")
    print(f"llama.cpp server (xllamacpp, GGUF Q4_1)  {medians['llama.cpp']:6.1f} tok/s")
    for quant, label in (("none", "fp32 (--quant none)"), ("int8", "int8 (--quant int8)")):
        ratio = medians[quant] / medians["llama.cpp"]
        print(f"Iris local, {label}         {medians[quant]:6.1f} tok/s   ratio {ratio:.2f}   (target >= 0.5)")
    direct, through = statistics.median(served["direct"]), statistics.median(served["iris"])
    print(f"llama.cpp server direct: {direct:.2f} s   through Iris's OpenAI backend: {through:.2f} s   "
          f"ratio {direct / through:.3f} (target >= 0.95)")


if __name__ == "__main__":
    main()
