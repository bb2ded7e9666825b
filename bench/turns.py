"""Time to first token across a 20-turn conversation with 2 images, with and without caches.

Uses the default (vision) model. Prints TTFT per turn for both runs side by side and the turn-20 / turn-1 ratios
(target with caching: <= 1.5). Run: ``python bench/turns.py``.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from assistant.builders.default_model import with_default_model  # noqa: E402
from assistant.config import GenerationOptions, ModelOptions, Paths  # noqa: E402
from assistant.dialogue import DialogueManager  # noqa: E402
from assistant.engine import LocalBackend  # noqa: E402
from assistant.model import load  # noqa: E402
from assistant.store import Store  # noqa: E402
from assistant.vision import load_image_bytes  # noqa: E402

TURNS = 20
OPTIONS = GenerationOptions(temperature=0, max_new_tokens=24)


def sample_images() -> list:  # type: ignore[type-arg]
    import io

    from PIL import Image
    from skimage import data

    images = []
    for name, array in (("astronaut", data.astronaut()), ("coffee", data.coffee())):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        images.append(load_image_bytes(buffer.getvalue(), name))
    return images


def run(backend: LocalBackend, store: Store, images: list) -> tuple[list[float], list[str]]:  # type: ignore[type-arg]
    manager = DialogueManager(backend, store, default_system_prompt="You are a helpful AI assistant named Iris.",
                              default_options=OPTIONS)
    conversation = manager.new_conversation()
    ttft, answers = [], []
    for turn in range(TURNS):
        attached = [images[turn % 2]] if turn < 2 else []
        started = time.perf_counter()
        turn_stream = manager.send(conversation, f"Turn {turn + 1}: tell me one short fact about it.", attached)
        stream = iter(turn_stream)
        next(stream)
        ttft.append(time.perf_counter() - started)
        for _ in stream:
            pass
        answers.append(turn_stream.text)
    return ttft, answers


def main() -> None:
    with tempfile.TemporaryDirectory() as work_dir:
        work = Path(work_dir)
        images = sample_images()
        loaded = load(with_default_model(ModelOptions(quant="none"), Paths.default()), Paths.default())
        cached = LocalBackend(loaded)
        uncached = LocalBackend(loaded, kv_cache_bytes=0, feature_cache_bytes=0)
        run(uncached, Store(work / "warmup.db"), images)  # warm up kernels and allocators once
        with_caches, cached_answers = run(cached, Store(work / "cached.db"), images)
        without, uncached_answers = run(uncached, Store(work / "uncached.db"), images)
    print(f"model: {loaded.name} ({loaded.quant}, {loaded.device}); {TURNS} turns, images in turns 1 and 2")
    print("turn  ttft cached (s)  ttft uncached (s)")
    for index, (warm, cold) in enumerate(zip(with_caches, without, strict=True)):
        print(f"{index + 1:>4}  {warm:>15.3f}  {cold:>17.3f}")
    cached_ratio = with_caches[-1] / with_caches[0]
    uncached_ratio = without[-1] / without[0]
    print(f"turn-20 / turn-1 TTFT: cached {cached_ratio:.2f} (target <= 1.5), uncached {uncached_ratio:.2f}")
    print(f"turn-20 uncached / cached: {without[-1] / with_caches[-1]:.2f}x")
    print(f"greedy answers identical with and without caches: {cached_answers == uncached_answers}")
    print(f"prefix cache: {cached.prefix_cache.hits} hits, {cached.prefix_cache.used_bytes / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
