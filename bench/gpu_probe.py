"""Where a turn's time goes on this machine's accelerator: a short probe for a lent GPU, printed as it goes.

On the first lease (README, "GPU"), Iris's own paths ran far below the GPU's speed: bench/turns.py did not finish one
20-turn conversation in 145 s, and `iris train` stepped at 8-10 samples/s. One cause was found after it, on a CPU:
image preprocessing's small ops on an OpenMP team, which waits for cores at each op on a busy machine (now on one
thread: assistant/threads.py). This prints that op's cost on all threads and on one, then, for the default model in
4-bit and in full precision: load seconds, the first token's latency and the decode rate of a text turn and an image
turn, then the hottest functions of one 4-bit image turn (cProfile, by own time), so the next lease starts from a
cause. Run: ``python bench/gpu_probe.py`` (on a CPU it probes the CPU).
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from assistant.builders.default_model import with_default_model  # noqa: E402
from assistant.config import GenerationOptions, ModelOptions, Paths  # noqa: E402
from assistant.dialogue import DialogueManager  # noqa: E402
from assistant.engine import LocalBackend  # noqa: E402
from assistant.messages import ImageAttachment  # noqa: E402
from assistant.model import load  # noqa: E402
from assistant.store import Store  # noqa: E402
from assistant.threads import torch_threads  # noqa: E402
from bench.overhead import astronaut  # noqa: E402

NEW_TOKENS = 32


def timed_turn(backend: LocalBackend, store: Store, images: list[ImageAttachment]) -> tuple[float, float]:
    """(seconds to the first chunk, tokens/s after it) of one greedy answer."""
    manager = DialogueManager(backend, store, default_system_prompt=None,
                              default_options=GenerationOptions(temperature=0, max_new_tokens=NEW_TOKENS,
                                                                repetition_penalty=1.0))
    started = time.perf_counter()
    stream = iter(manager.send(manager.new_conversation(), "Describe this picture in detail." if images else
                               "Write a long story about a lighthouse keeper.", images))
    first = next(stream)
    first_at = time.perf_counter()
    rest = "".join(stream)
    tokens = backend.loaded.tokenizer
    generated = len(tokens(first + rest)["input_ids"]) - len(tokens(first)["input_ids"])
    return first_at - started, generated / max(time.perf_counter() - first_at, 1e-9)


def main() -> None:
    import torch

    print(f"torch {torch.__version__}, CUDA {torch.cuda.is_available()}, {os.cpu_count()} CPUs, "
          f"{torch.get_num_threads()} intra-op threads", flush=True)
    values = torch.rand(3, 224, 224)  # one image's worth of the processor's small ops (assistant/threads.py)
    for threads in (torch.get_num_threads(), 1):
        with torch_threads(threads):
            started = time.perf_counter()
            for _ in range(200):
                values.sub(0.5).div(0.25).contiguous()
            print(f"a 3x224x224 normalise on {threads} thread(s): {(time.perf_counter() - started) / 200 * 1e3:.3f} ms",
                  flush=True)
    paths = Paths.default()
    image = astronaut()
    with tempfile.TemporaryDirectory() as work:
        for quant in ("auto", "none"):
            started = time.perf_counter()
            backend = LocalBackend(load(with_default_model(ModelOptions(quant=quant), paths), paths))
            print(f"--quant {quant} ({backend.loaded.quant}): loaded in {time.perf_counter() - started:.1f} s",
                  flush=True)
            for label, images in (("text turn", []), ("image turn", [image])):
                for attempt in range(3):
                    ttft, rate = timed_turn(backend, Store(Path(work) / f"{quant}-{label}-{attempt}.db"), images)
                    print(f"  {label} {attempt + 1}: first token {ttft:.3f} s, then {rate:.1f} tok/s", flush=True)
            if quant == "auto":
                profile = cProfile.Profile()
                profile.enable()
                timed_turn(backend, Store(Path(work) / "profiled.db"), [image])
                profile.disable()
                report = io.StringIO()
                pstats.Stats(profile, stream=report).sort_stats("tottime").print_stats(15)
                print("  one image turn, hottest by own time:", flush=True)
                print("\n".join("    " + line for line in report.getvalue().splitlines()[6:] if line.strip()),
                      flush=True)
            del backend


if __name__ == "__main__":
    main()
