"""What the vision wrapper costs at decode: the default vision model against its bare language model.

Decode speed (tokens after the first one, per second, through ``DialogueManager``) of the default vision model on a
text turn and on an image turn (after the image's prefill), each against the bare SmolLM2 (the GGUF as ``--model``)
on a text turn of the same prompt length (a token attends to the whole context: the image's 64 tokens cost the bare
model as many words). Both run the language model alone per token, so the ratios should be >= 0.95. Runs alternate;
medians of each are compared. Run: ``python bench/overhead.py [--quant auto|none|int8]``.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from assistant.builders.default_model import embedded_gguf_path, with_default_model  # noqa: E402
from assistant.config import GenerationOptions, ModelOptions, Paths  # noqa: E402
from assistant.dialogue import DialogueManager  # noqa: E402
from assistant.engine import LocalBackend  # noqa: E402
from assistant.messages import ImageAttachment  # noqa: E402
from assistant.model import load  # noqa: E402
from assistant.store import Store  # noqa: E402
from assistant.vision import load_image_bytes  # noqa: E402

QUESTION = "Write a long story about a lighthouse keeper and a storm."
IMAGE_QUESTION = "Describe this picture, then write a long story about it."
NEW_TOKENS = 96
ROUNDS = 3


def astronaut() -> ImageAttachment:
    from PIL import Image
    from skimage import data

    buffer = io.BytesIO()
    Image.fromarray(data.astronaut()).save(buffer, format="PNG")
    return load_image_bytes(buffer.getvalue(), "astronaut.png")


def decode_rate(backend: LocalBackend, store: Store, question: str, images: list[ImageAttachment]) -> float:
    """Tokens per second after the first chunk of a greedy answer (the prefill is not counted)."""
    manager = DialogueManager(backend, store, default_system_prompt=None,
                              default_options=GenerationOptions(temperature=0, max_new_tokens=NEW_TOKENS,
                                                                repetition_penalty=1.0))
    turn = manager.send(manager.new_conversation(), question, images)
    stream = iter(turn)
    first = next(stream)
    started = time.perf_counter()
    rest = "".join(stream)
    seconds = time.perf_counter() - started
    tokens = backend.loaded.tokenizer
    return (len(tokens(first + rest)["input_ids"]) - len(tokens(first)["input_ids"])) / seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quant", default="auto")
    quant = parser.parse_args().quant
    paths = Paths.default()
    load_average = os.getloadavg()[0]
    vision = LocalBackend(load(with_default_model(ModelOptions(quant=quant), paths), paths), kv_cache_bytes=0)
    bare = LocalBackend(load(ModelOptions(model=str(embedded_gguf_path()), quant=quant), paths), kv_cache_bytes=0)
    image = astronaut()
    words = "word " * (vision.image_tokens(image) - 1)  # the bare model's stand-in for the image's tokens
    cases = {"bare language model, text turn": (bare, QUESTION, []),
             "vision model, text turn": (vision, QUESTION, []),
             "bare language model, as long as the image turn": (bare, words + IMAGE_QUESTION, []),
             "vision model, image turn": (vision, IMAGE_QUESTION, [image])}
    rates: dict[str, list[float]] = {name: [] for name in cases}
    with tempfile.TemporaryDirectory() as work:
        for round_index in range(ROUNDS + 1):  # the first round warms up
            for name, (backend, question, images) in cases.items():
                rate = decode_rate(backend, Store(Path(work) / f"{round_index}-{len(rates[name])}.db"), question,
                                   images)
                if round_index:
                    rates[name].append(rate)
    medians = {name: statistics.median(values) for name, values in rates.items()}
    print(f"decode tokens/s after the first token, {NEW_TOKENS} greedy tokens, --quant {quant} "
          f"({vision.loaded.quant}), median of {ROUNDS} alternating rounds, load average {load_average:.1f}")
    for name, rate in medians.items():
        print(f"{name:<48} {rate:6.1f} tok/s")
    for name, base in (("vision model, text turn", "bare language model, text turn"),
                       ("vision model, image turn", "bare language model, as long as the image turn")):
        print(f"{name} / {base}: {medians[name] / medians[base]:.2f} (target >= 0.95)")


if __name__ == "__main__":
    main()
