"""Decode speed through Iris's DialogueManager vs a bare ``model.generate`` on the same model and prompt.

Both runs are greedy with the same prompt and produce the same tokens; runs
alternate and the median of each is compared (target ratio >= 0.95).
Run: ``python bench/overhead.py [--quant none|int8|4bit]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from assistant.builders.default_model import with_default_model  # noqa: E402
from assistant.config import GenerationOptions, ModelOptions, Paths  # noqa: E402
from assistant.dialogue import DialogueManager  # noqa: E402
from assistant.engine import LocalBackend  # noqa: E402
from assistant.messages import Message, Role  # noqa: E402
from assistant.model import load  # noqa: E402
from assistant.store import Store  # noqa: E402

QUESTION = "Write a long story about a lighthouse keeper and a storm."
NEW_TOKENS = 96
ROUNDS = 3


def bare_generate(loaded, prompt_ids) -> tuple[float, int]:  # type: ignore[no-untyped-def]
    """``generate`` on a worker thread, as Iris runs it: on a loaded 2-core machine the main
    thread's OpenMP pool was measured ~10x slower than a worker's, which would flatter Iris."""
    import torch

    result: list[tuple[float, int]] = []

    def work() -> None:
        started = time.perf_counter()
        with torch.inference_mode():
            output = loaded.model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), do_sample=False,
                                           max_new_tokens=NEW_TOKENS, pad_token_id=loaded.tokenizer.pad_token_id)
        result.append((time.perf_counter() - started, int(output.shape[1] - prompt_ids.shape[1])))

    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
    return result[0]


def through_iris(backend: LocalBackend, store: Store) -> tuple[float, int, str]:
    manager = DialogueManager(backend, store, default_system_prompt=None,
                              default_options=GenerationOptions(temperature=0, max_new_tokens=NEW_TOKENS))
    conversation = manager.new_conversation()
    started = time.perf_counter()
    text = manager.send(conversation, QUESTION).run()
    elapsed = time.perf_counter() - started
    return elapsed, len(backend.loaded.tokenizer(text, add_special_tokens=False)["input_ids"]), text


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quant", default="none")
    args = parser.parse_args()
    loaded = load(with_default_model(ModelOptions(quant=args.quant), Paths.default()), Paths.default())
    backend = LocalBackend(loaded, kv_cache_bytes=0)  # a cold prompt each round, like the bare loop
    prompt_ids = backend.renderer.encode([Message(Role.USER, QUESTION)])["input_ids"]
    bare_rates, iris_rates = [], []
    with tempfile.TemporaryDirectory() as work:
        bare_generate(loaded, prompt_ids)  # warm-up
        for round_index in range(ROUNDS):
            seconds, tokens = bare_generate(loaded, prompt_ids)
            bare_rates.append(tokens / seconds)
            seconds, iris_tokens, _ = through_iris(backend, Store(Path(work) / f"{round_index}.db"))
            iris_rates.append(iris_tokens / seconds)
    bare, iris = statistics.median(bare_rates), statistics.median(iris_rates)
    print(f"model: {loaded.name} ({loaded.quant}, {loaded.device}); {NEW_TOKENS} greedy tokens, {ROUNDS} rounds")
    print(f"bare model.generate: {bare:.1f} tok/s   through DialogueManager: {iris:.1f} tok/s")
    print(f"ratio Iris / bare: {iris / bare:.3f} (target >= 0.95)")


if __name__ == "__main__":
    main()
