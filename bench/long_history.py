"""Per-turn overhead on long conversations: everything before the first generated token, minus the model.

Conversations of 10, 100, 1000 and 5000 stored messages, text only and with images (every fifth user message
carries one of four small images, or a 49-megapixel PNG of 160 KB like the issue's), each continued for a few turns
through ``DialogueManager`` on a tiny LLaVA (tests/tiny_models.py: its real chat template, tokenizer and
processor) whose backend prepares the model's inputs as ``LocalBackend`` does (prompt encoding, image-feature
splicing, prefix key) and then answers at once instead of generating. The first turn after opening a
conversation is shown apart (it measures each kept message once); the median of the later turns is the
steady per-turn overhead. Targets: <= 50 ms at 1000 messages, growth no worse than linear.
Run: ``python bench/long_history.py``.
"""

from __future__ import annotations

import io
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from assistant.config import GenerationOptions, ModelOptions, Paths  # noqa: E402
from assistant.dialogue import DialogueManager  # noqa: E402
from assistant.engine import LocalBackend  # noqa: E402
from assistant.messages import ImageAttachment, Message, Role  # noqa: E402
from assistant.model import load  # noqa: E402
from assistant.store import Store  # noqa: E402
from assistant.vision import load_image_bytes  # noqa: E402

SIZES = (10, 100, 1000, 5000)
TURNS = 6  # per conversation: one first turn, then the steady ones
CONTEXT = 4096
OPTIONS = GenerationOptions(temperature=0, max_new_tokens=256)
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jovial frogs".split()


class InstantBackend(LocalBackend):
    """``LocalBackend`` up to the model's first forward pass: inputs are prepared, then it answers at once."""

    def stream(self, messages: Sequence[Message], options: GenerationOptions,
               adapter: str | None = None) -> Iterator[str]:
        adapter = self.resolve_adapter(adapter)
        import torch

        with self._lock, torch.inference_mode():
            inputs, key = self._inputs(messages, adapter)
            if key is not None:
                self.prefix_cache.take(adapter, key)
        yield f"ok ({inputs['input_ids'].shape[-1]} prompt tokens)"


def sample_images() -> list[ImageAttachment]:
    """Four small photos and one 7000x7000 PNG (a gradient, so it compresses to a few hundred KB)."""
    import numpy as np
    from PIL import Image
    from skimage import data

    images = []
    for name, array in (("astronaut", data.astronaut()), ("coffee", data.coffee()), ("chelsea", data.chelsea()),
                        ("rocket", data.rocket())):
        buffer = io.BytesIO()
        Image.fromarray(array).resize((96, 64)).save(buffer, format="PNG")
        images.append(load_image_bytes(buffer.getvalue(), name))
    ramp = np.tile((np.arange(7000, dtype=np.uint32) * 255 // 6999).astype(np.uint8), (7000, 1))
    buffer = io.BytesIO()
    Image.fromarray(ramp).convert("RGB").save(buffer, format="PNG", optimize=True)
    images.append(load_image_bytes(buffer.getvalue(), "big-49mp"))
    return images


def build_conversation(store: Store, size: int, images: list[ImageAttachment]) -> int:
    """``size`` stored messages alternating user/assistant, 10-40 words each; with ``images``, every fifth user
    message carries one (the big one twice, early on)."""
    conversation = store.create_conversation(system_prompt="You are a helpful assistant.",
                                             options=OPTIONS.as_dict())
    for index in range(size):
        role = Role.USER if index % 2 == 0 else Role.ASSISTANT
        words = [WORDS[(index * 7 + k) % len(WORDS)] for k in range(10 + (index * 13) % 31)]
        attached: tuple[ImageAttachment, ...] = ()
        if images and role is Role.USER and index % 10 == 0:
            attached = (images[-1],) if index in (0, 20) else (images[(index // 10) % (len(images) - 1)],)
        store.add_message(conversation, Message(role, f"{index}: " + " ".join(words), attached))
    return conversation


def turn_times(backend: LocalBackend, store: Store, conversation: int, images: list[ImageAttachment]) -> list[float]:
    """Seconds from ``send`` to the first chunk for each of ``TURNS`` turns in a fresh manager (a resumed chat)."""
    manager = DialogueManager(backend, store)
    times = []
    for turn_index in range(TURNS):
        attached = [images[turn_index % (len(images) - 1)]] if images and turn_index == 2 else []
        started = time.perf_counter()
        turn = manager.send(conversation, f"turn {turn_index}: tell me one more thing about it", attached)
        chunks = iter(turn)
        next(chunks)
        times.append(time.perf_counter() - started)
        for _ in chunks:
            pass
    return times


def main() -> None:
    from tiny_models import save_tiny_llava

    work = Path(tempfile.mkdtemp())
    model_dir = save_tiny_llava(work / "llava", context=CONTEXT)
    loaded = load(ModelOptions(model=str(model_dir), quant="none"), Paths.default())
    backend = InstantBackend(loaded)
    pool = sample_images()
    results: dict[tuple[int, bool], list[float]] = {}
    for with_images in (False, True):
        for size in SIZES:
            store = Store(work / f"{size}-{with_images}.db")
            conversation = build_conversation(store, size, pool if with_images else [])
            results[size, with_images] = turn_times(backend, store, conversation, pool if with_images else [])
            store.close()
    print(f"per-turn overhead before the first token (tiny LLaVA, {CONTEXT}-token context, char-level tokenizer), "
          f"ms; steady = median of turns 2-{TURNS}; first = first turn after opening the conversation")
    print(f"{'messages':>9} | {'text: steady':>12} {'first':>8} | {'images: steady':>14} {'first':>8}"
          f" | steady growth vs the row above (text / images)")
    previous: tuple[int, float, float] | None = None
    for size in SIZES:
        text, images = (results[size, flag] for flag in (False, True))
        steady = (statistics.median(text[1:]) * 1000, statistics.median(images[1:]) * 1000)
        change = "" if previous is None else \
            f"x{steady[0] / previous[1]:.2f} / x{steady[1] / previous[2]:.2f} for x{size / previous[0]:.0f} messages"
        print(f"{size:>9} | {steady[0]:>12.1f} {text[0] * 1000:>8.1f} | {steady[1]:>14.1f} {images[0] * 1000:>8.1f}"
              f" | {change}")
        previous = (size, *steady)
    text_1000 = statistics.median(results[1000, False][1:]) * 1000
    images_1000 = statistics.median(results[1000, True][1:]) * 1000
    growth = [statistics.median(results[5000, flag][1:]) / statistics.median(results[1000, flag][1:])
              for flag in (False, True)]
    print(f"at 1000 messages: {text_1000:.1f} ms text, {images_1000:.1f} ms with images (target <= 50 ms)")
    print(f"5000 / 1000 messages: x{growth[0]:.2f} text, x{growth[1]:.2f} with images (linear would be x5)")
    print(f"images decoded: {backend.decoded_images.decodes} (distinct images in the histories: {len(pool)})")


if __name__ == "__main__":
    main()
