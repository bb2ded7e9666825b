"""Time to first token across 20-turn conversations on the default (vision) model, as users get it.

1. Images in turns 1 and 2 only, with and without caches: TTFT per turn side by side, and the turn-20 / turn-1
   ratios (target with caching: <= 1.5), and whether greedy answers are identical with and without caches.
2. One new image in every turn (20 images), three conversations on fresh backends: median TTFT at turn 1 and turn
   20 (target turn-20 / turn-1 <= 1.5), and how often each image was decoded and run through the vision tower
   (target: once per image per backend). Beside the wall-clock times, the CPU time of the same spans (the
   process's, all its threads: the prefill uses several), which other work on a shared machine disturbs less.
Run: ``python bench/turns.py``.
"""

from __future__ import annotations

import io
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import assistant.vision  # noqa: E402
from adapters.synth import synthesize  # noqa: E402
from assistant.builders.default_model import with_default_model  # noqa: E402
from assistant.config import GenerationOptions, ModelOptions, Paths  # noqa: E402
from assistant.dialogue import DialogueManager  # noqa: E402
from assistant.engine import LocalBackend  # noqa: E402
from assistant.messages import ImageAttachment  # noqa: E402
from assistant.model import LoadedModel, load  # noqa: E402
from assistant.store import Store  # noqa: E402
from assistant.vision import load_image_bytes, load_image_path  # noqa: E402

TURNS = 20
REPEATS = 3
OPTIONS = GenerationOptions(temperature=0, max_new_tokens=24)


def sample_images() -> list[ImageAttachment]:
    from PIL import Image
    from skimage import data

    images = []
    for name, array in (("astronaut", data.astronaut()), ("coffee", data.coffee())):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        images.append(load_image_bytes(buffer.getvalue(), name))
    return images


def run(backend: LocalBackend, store: Store,
        images_per_turn: list[list[ImageAttachment]]) -> tuple[list[float], list[str], list[float]]:
    """Seconds to the first text of each turn, the answers, and the process's CPU seconds to that text."""
    manager = DialogueManager(backend, store, default_system_prompt="You are a helpful AI assistant named Iris.",
                              default_options=OPTIONS)
    conversation = manager.new_conversation()
    ttft, answers, ttft_cpu = [], [], []
    for turn, attached in enumerate(images_per_turn):
        started, cpu_started = time.perf_counter(), time.process_time()
        turn_stream = manager.send(conversation, f"Turn {turn + 1}: tell me one short fact about it.", attached)
        stream = iter(turn_stream)
        next(stream)
        ttft.append(time.perf_counter() - started)
        ttft_cpu.append(time.process_time() - cpu_started)
        for _ in stream:
            pass
        answers.append(turn_stream.text)
    return ttft, answers, ttft_cpu


def two_images(loaded: LoadedModel, work: Path) -> None:
    images = sample_images()
    per_turn = [[images[turn % 2]] if turn < 2 else [] for turn in range(TURNS)]
    cached = LocalBackend(loaded)
    uncached = LocalBackend(loaded, kv_cache_bytes=0, feature_cache_bytes=0)
    run(uncached, Store(work / "warmup.db"), per_turn)  # warm up kernels and allocators once
    with_caches, cached_answers, _ = run(cached, Store(work / "cached.db"), per_turn)
    without, uncached_answers, _ = run(uncached, Store(work / "uncached.db"), per_turn)
    print(f"1. {TURNS} turns, images in turns 1 and 2")
    print("turn  ttft cached (s)  ttft uncached (s)")
    for index, (warm, cold) in enumerate(zip(with_caches, without, strict=True)):
        print(f"{index + 1:>4}  {warm:>15.3f}  {cold:>17.3f}")
    print(f"turn-20 / turn-1 TTFT: cached {with_caches[-1] / with_caches[0]:.2f} (target <= 1.5), "
          f"uncached {without[-1] / without[0]:.2f}")
    print(f"turn-20 uncached / cached: {without[-1] / with_caches[-1]:.2f}x")
    print(f"greedy answers identical with and without caches: {cached_answers == uncached_answers}")
    print(f"prefix cache: {cached.prefix_cache.hits} hits, {cached.prefix_cache.used_bytes / 2**20:.1f} MiB")


def image_every_turn(loaded: LoadedModel, work: Path) -> None:
    """Three conversations, each on a fresh backend (its caches empty); medians per turn."""
    dataset = synthesize(work / "shapes", TURNS, seed=2024).parent
    images = [load_image_path(path) for path in sorted((dataset / "images").iterdir())]
    decodes: Counter[str] = Counter()
    real_to_pil = assistant.vision.to_pil

    def counted(image: ImageAttachment):  # type: ignore[no-untyped-def]
        decodes[image.sha256] += 1
        return real_to_pil(image)

    runs, cpu_runs, tower_runs = [], [], []
    for repeat in range(REPEATS):
        backend = LocalBackend(loaded)
        tower = backend.loaded.model.get_submodule(backend.loaded.architecture.vision_tower or "")
        hook = tower.register_forward_hook(lambda module, args, output: tower_runs.append(args[0].shape[0]))
        assistant.vision.to_pil = counted
        try:
            ttft, _, ttft_cpu = run(backend, Store(work / f"every-turn-{repeat}.db"), [[image] for image in images])
            runs.append(ttft)
            cpu_runs.append(ttft_cpu)
        finally:
            hook.remove()
            assistant.vision.to_pil = real_to_pil
    ttft = [statistics.median(values) for values in zip(*runs, strict=True)]
    cpu = [statistics.median(values) for values in zip(*cpu_runs, strict=True)]
    print(f"2. {TURNS} turns, a new image in every turn (median of {REPEATS} conversations)")
    print(f"TTFT turn 1 {ttft[0]:.3f} s, turn 10 {ttft[9]:.3f} s, turn 20 {ttft[-1]:.3f} s; "
          f"turn-20 / turn-1 {ttft[-1] / ttft[0]:.2f} (target <= 1.5)")
    print(f"in CPU time: turn 1 {cpu[0]:.3f} s, turn 10 {cpu[9]:.3f} s, turn 20 {cpu[-1]:.3f} s; "
          f"turn-20 / turn-1 {cpu[-1] / cpu[0]:.2f}")
    print(f"per conversation: decoded {sum(decodes.values()) / REPEATS:g} times and encoded "
          f"{sum(tower_runs) / REPEATS:g} times for {len(images)} images (target: once each)")


def main() -> None:
    paths = Paths.default()
    load_average = os.getloadavg()[0]
    loaded = load(with_default_model(ModelOptions(), paths), paths)
    print(f"model: {loaded.name} ({loaded.quant}, {loaded.device}); load average at the start {load_average:.1f}")
    with tempfile.TemporaryDirectory() as work_dir:
        two_images(loaded, Path(work_dir))
        image_every_turn(loaded, Path(work_dir))


if __name__ == "__main__":
    main()
