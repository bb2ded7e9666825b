"""Fine-tuning on a user's own small image task, end to end, as the README tells a new user to do it.

Builds real-image datasets offline, trains with ``iris train``'s defaults (plus ``--max-minutes``), and
evaluates the result through ``iris eval`` (the same code path as ``iris ask --adapter``), printing held-out
accuracy, training minutes and samples/s. Tasks:

- ``digits``: scikit-learn's 1,797 handwritten digits (8×8, upscaled to the default model's 112 px), 1,497 for
  training and 100 held out, "Which digit is written in this image?", answered with the digit.
- ``textures``: crops of scikit-image's sample photos (brick, grass, gravel, coins, text, stars), training crops
  from the left three quarters of each photo and held-out crops from the right quarter, "What is shown in this
  image?", answered with the class name: the same recipe, unchanged, on other real data.

Run: ``python bench/own_task.py [digits|textures] [--max-minutes 20] [--work DIR] [other iris train flags]``.
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

DIGITS_QUESTION = "Which digit is written in this image?"
TEXTURES_QUESTION = "What is shown in this image?"
IMAGE_SIZE = 112


def _write(out: Path, name: str, records: Sequence[tuple[str, object, str, str]]) -> Path:
    """``out/name/dataset.json`` + ``images/`` from (id, PIL image, question, answer) records."""
    root = out / name
    (root / "images").mkdir(parents=True, exist_ok=True)
    samples = []
    for sample_id, image, question, answer in records:
        file = f"images/{sample_id}.png"
        image.save(root / file)  # type: ignore[attr-defined]
        samples.append({"id": sample_id, "image": file, "category": name.split("-")[0],
                        "conversations": [{"from": "human", "value": f"<image>\n{question}"},
                                          {"from": "gpt", "value": answer}]})
    (root / "dataset.json").write_text(json.dumps(samples, indent=1) + "\n", encoding="utf-8")
    return root


def digits(out: Path, train: int = 1497, held_out: int = 100, seed: int = 0) -> tuple[Path, Path]:
    """scikit-learn's digits as dark ink on white, upscaled (bicubic) to 112 px; a seeded split."""
    from PIL import Image
    from sklearn.datasets import load_digits

    data = load_digits()
    order = list(range(len(data.images)))
    random.Random(seed).shuffle(order)
    records = []
    for index in order[:train + held_out]:
        pixels = (255 - data.images[index] * (255 / 16)).clip(0, 255).astype("uint8")
        image = Image.fromarray(pixels, mode="L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)
        records.append((f"digit-{index:04d}", image.convert("RGB"), DIGITS_QUESTION, str(int(data.target[index]))))
    return _write(out, "digits-train", records[:train]), _write(out, "digits-test", records[train:])


TEXTURES = {"brick": "brick", "grass": "grass", "gravel": "gravel", "coins": "coins", "text": "text",
            "hubble_deep_field": "stars"}


def textures(out: Path, per_class_train: int = 60, per_class_test: int = 15, seed: int = 0) -> tuple[Path, Path]:
    """Random square crops (random size, flips) of six scikit-image photos; train and test from disjoint regions."""
    from PIL import Image, ImageOps
    from skimage import data as samples

    rng = random.Random(seed)
    train: list[tuple[str, object, str, str]] = []
    test: list[tuple[str, object, str, str]] = []
    for source, label in TEXTURES.items():
        photo = Image.fromarray(getattr(samples, source)()).convert("RGB")
        width, height = photo.size
        split = width * 3 // 4
        for part, count, (left, right) in ((train, per_class_train, (0, split)),
                                           (test, per_class_test, (split, width))):
            for number in range(count):
                side = rng.randint(min(height, right - left) // 3, min(height, right - left))
                x, y = rng.randint(left, right - side), rng.randint(0, height - side)
                crop = photo.crop((x, y, x + side, y + side)).resize((IMAGE_SIZE, IMAGE_SIZE),
                                                                      Image.Resampling.BICUBIC)
                if rng.random() < 0.5:
                    crop = ImageOps.mirror(crop)
                part.append((f"{label}-{'train' if part is train else 'test'}-{number:03d}", crop,
                             TEXTURES_QUESTION, label))
    rng.shuffle(train)
    return _write(out, "textures-train", train), _write(out, "textures-test", test)


def run(task: str, work: Path, max_minutes: float | None, extra: list[str]) -> dict[str, object]:
    """Build the task's data, ``iris train`` it with the defaults, ``iris eval`` the result; returns the figures."""
    import os
    import subprocess
    import time

    train_dir, test_dir = (digits if task == "digits" else textures)(work / "data")
    out = work / f"{task}-adapter"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    iris = [sys.executable, "-m", "cli.app"]
    root = Path(__file__).resolve().parent.parent
    command = [*iris, "train", str(train_dir), "--out", str(out), *extra]
    if max_minutes:
        command += ["--max-minutes", str(max_minutes)]
    print("$", " ".join(command[2:]), flush=True)
    started = time.perf_counter()
    subprocess.run(command, cwd=root, env=env, check=True)
    train_minutes = (time.perf_counter() - started) / 60
    started = time.perf_counter()
    evaluated = subprocess.run([*iris, "eval", str(test_dir), "--adapter", str(out), "--json"], cwd=root, env=env,
                               check=True, capture_output=True, text=True)
    eval_minutes = (time.perf_counter() - started) / 60
    report = json.loads(evaluated.stdout)
    (work / f"{task}-eval.json").write_text(evaluated.stdout, encoding="utf-8")  # every answer, for a look later
    manifest = json.loads((out / "iris_manifest.json").read_text(encoding="utf-8"))
    rows = {row["label"]: row["overall"] for row in report["rows"]}
    return {"task": task, "train_minutes": round(train_minutes, 1), "eval_minutes": round(eval_minutes, 1),
            "samples_per_second": manifest["metrics"]["samples_per_second"], "steps": manifest["steps"],
            "stages": manifest["stages"], "samples_seen": manifest["steps"] * manifest["training"]["batch_size"],
            "adapter": rows["adapter"]["exact"], "adapter_keyword": rows["adapter"]["keyword"],
            "base": rows["base"]["exact"], "blank_images": rows.get("adapter, blank images", {}).get("exact"),
            "chance": report["chance"], "load_average": os.getloadavg()}


def main() -> None:
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task", choices=("digits", "textures"), nargs="?", default="digits")
    parser.add_argument("--max-minutes", type=float, default=20.0, help="training budget (0: the recipe's length)")
    parser.add_argument("--work", type=Path, default=None, help="keep data and adapter here (default: a temp dir)")
    args, extra = parser.parse_known_args()  # anything else is passed to `iris train` (e.g. --lr-lora 5e-4)
    with tempfile.TemporaryDirectory() as temporary:
        work = args.work or Path(temporary)
        figures = run(args.task, work, args.max_minutes or None, extra)
    print(json.dumps(figures))
    print(f"{figures['task']}: held-out exact accuracy {figures['adapter']:.0%} with the adapter "
          f"(base {figures['base']:.0%}, blank images {figures['blank_images']:.0%}, chance {figures['chance']:.0%}); "
          f"trained {figures['train_minutes']} min at {figures['samples_per_second']:.2f} samples/s "
          f"({figures['samples_seen']} samples seen), evaluated in {figures['eval_minutes']} min")


if __name__ == "__main__":
    main()
