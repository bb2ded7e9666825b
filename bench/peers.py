"""Iris side by side with llama.cpp on the same GGUF model, prompt and greedy decoding.

1. Local: Iris's in-process backend (transformers; fp32 and the int8 CPU path) vs llama-cpp-python
   in-process, decode tokens/s (target for the local backend on CPU: >= 0.5 x llama.cpp).
2. Served: Iris's OpenAI backend in front of llama-cpp-python's server vs calling that server
   directly over HTTP (target >= 0.95).
Runs alternate; medians of 3 rounds are compared. Run: ``python bench/peers.py``.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from llama_server import MODEL_ALIAS, llama_server  # noqa: E402

from assistant.config import GenerationOptions, ModelOptions, Paths  # noqa: E402
from assistant.dialogue import DialogueManager  # noqa: E402
from assistant.engine import LocalBackend  # noqa: E402
from assistant.model import embedded_gguf_path, load  # noqa: E402
from assistant.openai_backend import OpenAIBackend  # noqa: E402
from assistant.store import Store  # noqa: E402

SYSTEM = "You are a helpful AI assistant named Iris."
QUESTION = "Write a long story about a lighthouse keeper and a storm."
NEW_TOKENS = 128
ROUNDS = 3
THREADS = 2


def iris_rate(backend, work: Path, tokenizer) -> float:  # type: ignore[no-untyped-def]
    manager = DialogueManager(backend, Store(work / f"{time.monotonic_ns()}.db"), default_system_prompt=SYSTEM,
                              default_options=GenerationOptions(temperature=0, max_new_tokens=NEW_TOKENS))
    conversation = manager.new_conversation()
    started = time.perf_counter()
    text = manager.send(conversation, QUESTION).run()
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) / (time.perf_counter() - started)


def llama_cpp_rate(llm) -> float:  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    result = llm.create_chat_completion(messages=[{"role": "system", "content": SYSTEM},
                                                  {"role": "user", "content": QUESTION}],
                                        max_tokens=NEW_TOKENS, temperature=0.0)
    return result["usage"]["completion_tokens"] / (time.perf_counter() - started)


def direct_http_seconds(url: str) -> float:
    body = json.dumps({"model": MODEL_ALIAS, "stream": True, "max_tokens": NEW_TOKENS, "temperature": 0.0,
                       "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]})
    request = urllib.request.Request(url + "/chat/completions", data=body.encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=300) as response:
        for _ in response:
            pass
    return time.perf_counter() - started


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
    from llama_cpp import Llama

    torch.set_num_threads(THREADS)
    llm = Llama(model_path=str(embedded_gguf_path()), n_ctx=2048, n_threads=THREADS, verbose=False)
    backends = {quant: LocalBackend(load(ModelOptions(quant=quant), Paths.default()), kv_cache_bytes=0)
                for quant in ("none", "int8")}
    tokenizer = backends["none"].loaded.tokenizer
    rates: dict[str, list[float]] = {"llama.cpp": [], "none": [], "int8": []}
    with tempfile.TemporaryDirectory() as work_dir:
        work = Path(work_dir)
        llama_cpp_rate(llm)
        for backend in backends.values():
            iris_rate(backend, work, tokenizer)  # warm-up
        for _ in range(ROUNDS):
            rates["llama.cpp"].append(llama_cpp_rate(llm))
            for quant, backend in backends.items():
                rates[quant].append(iris_rate(backend, work, tokenizer))
        del llm
        served: dict[str, list[float]] = {"direct": [], "iris": []}
        with llama_server(threads=THREADS) as url:
            direct_http_seconds(url)
            for _ in range(ROUNDS):
                served["direct"].append(direct_http_seconds(url))
                served["iris"].append(iris_http_seconds(url, work))
    medians = {name: statistics.median(values) for name, values in rates.items()}
    print(f"SmolLM2-135M-Instruct, {NEW_TOKENS} greedy tokens, {THREADS} threads, median of {ROUNDS}")
    print(f"llama-cpp-python (GGUF Q4_1)     {medians['llama.cpp']:6.1f} tok/s")
    for quant, label in (("none", "fp32 (--quant none)"), ("int8", "int8 (--quant int8)")):
        ratio = medians[quant] / medians["llama.cpp"]
        print(f"Iris local, {label}  {medians[quant]:6.1f} tok/s   ratio {ratio:.2f}   (target >= 0.5)")
    direct, through = statistics.median(served["direct"]), statistics.median(served["iris"])
    print(f"llama.cpp server direct: {direct:.2f} s   through Iris's OpenAI backend: {through:.2f} s   "
          f"ratio {direct / through:.3f} (target >= 0.95)")


if __name__ == "__main__":
    main()
