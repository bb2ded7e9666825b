"""How well the default model sees: held-out synthetic shapes, trained projector vs a fresh (untrained) one.

Questions come from ``iris data synth`` with a seed not used for training; an answer scores the
fraction of its key words (colours, shapes, counts, sides) that the model's greedy answer contains.
Prints accuracy per question kind for both models side by side. Run: ``python bench/vision_quality.py``.
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adapters.synth import CAPTION_PROMPTS, COLOURS, COUNT_WORDS, SHAPES, SIDES, synthesize  # noqa: E402
from assistant.config import GenerationOptions, ModelOptions, Paths  # noqa: E402
from assistant.engine import LocalBackend  # noqa: E402
from assistant.messages import Message, Role  # noqa: E402
from assistant.model import load  # noqa: E402
from assistant.vision import load_image_path  # noqa: E402

SAMPLES = 40
HELD_OUT_SEED = 424242
KEY_WORDS = set(COLOURS) | set(SHAPES) | {f"{shape}s" for shape in SHAPES} | set(COUNT_WORDS.values()) | set(SIDES)
OPTIONS = GenerationOptions(temperature=0, max_new_tokens=24)


def kind_of(question: str) -> str:
    if question in CAPTION_PROMPTS:
        return "describe"
    lowered = question.lower()
    for kind in ("describe", "colour is the background", "how many", "where", "colour", "shape"):
        if kind in lowered:
            return {"colour is the background": "background", "how many": "count"}.get(kind, kind)
    return "other"


def score(backend: LocalBackend, dataset: Path) -> dict[str, list[float]]:
    records = json.loads((dataset / "dataset.json").read_text())
    results: dict[str, list[float]] = defaultdict(list)
    for record in records:
        image = load_image_path(dataset / record["image"])
        turns = record["conversations"]
        for question, answer in zip(turns[::2], turns[1::2], strict=False):
            text = question["value"].replace("<image>", "").strip()
            expected = {w for w in re.findall(r"[a-z]+", answer["value"].lower()) if w in KEY_WORDS}
            if not expected:
                continue
            reply = "".join(backend.stream([Message(Role.USER, text, (image,))], OPTIONS)).lower()
            found = set(re.findall(r"[a-z]+", reply))
            results[kind_of(text)].append(len(expected & found) / len(expected))
    return results


def main() -> None:
    from assistant.builders.compose import compose_llava
    from assistant.builders.default_model import DEFAULT_IMAGE_SIZE, default_llm_path, default_model_path
    from assistant.builders.vision_tower import default_vision_tower_dir

    paths = Paths.default()
    trained_dir = default_model_path(paths)
    with tempfile.TemporaryDirectory() as work_dir:
        work = Path(work_dir)
        dataset = synthesize(work / "held-out", SAMPLES, HELD_OUT_SEED).parent
        fresh_dir = compose_llava(default_llm_path(paths), default_vision_tower_dir(paths), work / "fresh",
                                  image_size=DEFAULT_IMAGE_SIZE)
        trained = score(LocalBackend(load(ModelOptions(model=str(trained_dir), quant="none"), paths)), dataset)
        fresh = score(LocalBackend(load(ModelOptions(model=str(fresh_dir), quant="none"), paths)), dataset)
    print(f"{SAMPLES} held-out synthetic images (seed {HELD_OUT_SEED}); key-word accuracy, greedy")
    print(f"{'question':<12} {'n':>4} {'trained':>8} {'untrained':>10}")
    for kind in sorted(trained):
        mean = sum(trained[kind]) / len(trained[kind])
        baseline = sum(fresh[kind]) / len(fresh[kind])
        print(f"{kind:<12} {len(trained[kind]):>4} {mean:>8.2f} {baseline:>10.2f}")
    overall = [v for values in trained.values() for v in values]
    overall_fresh = [v for values in fresh.values() for v in values]
    print(f"{'all':<12} {len(overall):>4} {sum(overall) / len(overall):>8.2f} "
          f"{sum(overall_fresh) / len(overall_fresh):>10.2f}")


if __name__ == "__main__":
    main()
