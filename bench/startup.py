"""Seconds from launch to the first token: ``iris ask`` on a cold and on a warm start, against llama.cpp's native
server (``xllamacpp``) loading the same GGUF.

Cold: a fresh ``IRIS_HOME``, so the first start unpacks the GGUF, converts the vision tower and composes the
default model before it loads it. Warm: the same home again (the composed model is cached). llama.cpp: its server
process started (``tests/llama_server.py``), the model loaded, then one streamed chat request. Every round runs
the three in turn; medians of the rounds are compared. Run: ``python bench/startup.py [--rounds N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from llama_server import MODEL_ALIAS, llama_server  # noqa: E402

QUESTION = "What is the capital of France?"
NEW_TOKENS = 16
THREADS = 2


def iris_first_token(home: Path) -> float:
    """Seconds from launching ``iris ask`` to the first byte of its answer on stdout."""
    iris = Path(sys.executable).with_name("iris")
    environment = {**os.environ, "IRIS_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    process = subprocess.Popen([str(iris), "ask", QUESTION, "--temperature", "0", "--max-new-tokens",
                                str(NEW_TOKENS)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environment)
    assert process.stdout is not None and process.stderr is not None
    first = process.stdout.read(1)
    seconds = time.perf_counter() - started
    process.stdout.read()
    error = process.stderr.read().decode(errors="replace")
    if process.wait() != 0 or not first:
        raise RuntimeError(f"iris ask failed: {error[-2000:]}")
    return seconds


def llama_first_token() -> float:
    """Seconds from starting llama.cpp's server to the first streamed token of its answer."""
    started = time.perf_counter()
    with llama_server(threads=THREADS) as url:
        body = json.dumps({"model": MODEL_ALIAS, "stream": True, "max_tokens": NEW_TOKENS, "temperature": 0.0,
                           "messages": [{"role": "user", "content": QUESTION}]})
        request = urllib.request.Request(url + "/chat/completions", data=body.encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as response:
            for line in response:
                if not line.startswith(b"data: {"):
                    continue
                delta = json.loads(line[len(b"data: "):])["choices"][0].get("delta", {})
                if delta.get("content"):
                    return time.perf_counter() - started
    raise RuntimeError("llama.cpp answered no token")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    rounds = parser.parse_args().rounds
    times: dict[str, list[float]] = {"cold": [], "warm": [], "llama.cpp": []}
    with tempfile.TemporaryDirectory() as work_dir:
        for index in range(rounds):
            home = Path(work_dir) / f"home-{index}"
            times["cold"].append(iris_first_token(home))
            times["warm"].append(iris_first_token(home))
            times["llama.cpp"].append(llama_first_token())
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"seconds from launch to the first token, median of {rounds} alternating rounds "
          f"(iris ask on the default model as installed; llama.cpp server, {THREADS} threads, same GGUF)")
    for name, label in (("cold", "iris ask, first start (empty IRIS_HOME)"), ("warm", "iris ask, warm start"),
                        ("llama.cpp", "llama.cpp server start + first token")):
        print(f"{label:<42} {medians[name]:6.2f} s   {' '.join(f'{v:.2f}' for v in times[name])}")
    print(f"cold / llama.cpp: {medians['cold'] / medians['llama.cpp']:.1f}x   "
          f"warm / llama.cpp: {medians['warm'] / medians['llama.cpp']:.1f}x")


if __name__ == "__main__":
    main()
