"""A synthetic LLaVA dataset of drawn shapes whose captions are true by construction.

Real image–text data is not available offline, yet training, data checking and smoke tests need
a dataset whose answers can be verified from the pixels: coloured shapes (1–3 of one kind, all on
the left or right half) on a plain or two-tone background, each sample a caption turn followed by
questions about colour, shape, count and position. Same ``seed`` → byte-identical dataset.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from assistant.errors import BadDataset, one_line

IMAGE_SIZE = 112
COLOURS = {"red": (220, 30, 30), "green": (30, 160, 60), "blue": (30, 60, 220), "yellow": (240, 210, 30),
           "orange": (245, 130, 20), "purple": (130, 40, 170), "white": (255, 255, 255), "black": (0, 0, 0),
           "gray": (128, 128, 128)}
BACKGROUNDS = ("white", "black", "gray", "yellow", "blue")
SHAPES = ("circle", "square", "triangle", "star")
SIDES = ("left", "right")
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
# Ways people ask for a caption; varied so a model trained on this answers more than one phrasing.
CAPTION_PROMPTS = ("Describe the image.", "What is in this image?", "What do you see?", "Describe this picture.",
                   "What's in the picture?", "What is this?", "Tell me what the image shows.",
                   "Can you describe this image?")


@dataclass(frozen=True)
class Scene:
    """What one image shows; the caption and every answer are derived from it."""

    shape: str
    colour: str
    count: int
    side: str
    background: tuple[str, ...]  # one colour, or (top, bottom) for a two-tone background

    def caption(self) -> str:
        article = "An" if self.count == 1 and self.colour[0] in "aeiou" else "A"
        amount = article if self.count == 1 else COUNT_WORDS[self.count].capitalize()
        return f"{amount} {self.colour} {self._noun()} on the {self.side} of {self._background_phrase()}."

    def questions(self) -> list[tuple[str, str]]:
        """(question, answer) pairs about the scene, in a fixed order (the caller picks and shuffles)."""
        one = self.count == 1
        noun, subject, be = self._noun(), f"the {self._noun()}", "is" if one else "are"
        background = " and ".join(self.background)
        return [
            (f"What colour {be} {subject}?", f"{subject.capitalize()} {be} {self.colour}."),
            ("What shape is it?" if one else "What shape are they?",
             f"It is a {self.shape}." if one else f"They are {noun}."),
            ("How many shapes are there?", f"There {be} {COUNT_WORDS[self.count]} {noun}."),
            (f"Where {be} {subject}?", f"On the {self.side} side of the image."),
            ("What colour is the background?", f"{background.capitalize()}."),
        ]

    def _noun(self) -> str:
        return self.shape if self.count == 1 else f"{self.shape}s"

    def _background_phrase(self) -> str:
        if len(self.background) == 1:
            return f"a {self.background[0]} background"
        return f"a {self.background[0]} and {self.background[1]} background"


def synthesize(out_dir: Path, n: int, seed: int) -> Path:
    """Write ``n`` samples as ``out_dir/dataset.json`` + ``out_dir/images/``; returns the dataset file.

    Refuses a non-empty ``out_dir`` so that old images never mix with a new dataset.
    """
    if n < 1:
        raise BadDataset(f"--n must be at least 1, got {n}")
    out_dir = Path(out_dir)
    try:
        return _write(out_dir, n, seed)
    except OSError as exc:  # a read-only place, /proc or /sys, a full disk
        raise BadDataset(f"{out_dir}: cannot write the dataset there ({exc.strerror or one_line(exc)})") from None


def _write(out_dir: Path, n: int, seed: int) -> Path:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise BadDataset(f"{out_dir}: already exists and is not empty; choose a new --out")
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    samples = []
    for index in range(n):
        scene = random_scene(rng)
        name = f"images/{index:05d}.png"
        draw_scene(scene, rng).save(out_dir / name, format="PNG")
        pairs = scene.questions()
        rng.shuffle(pairs)
        conversation = [{"from": "human", "value": f"<image>\n{rng.choice(CAPTION_PROMPTS)}"},
                        {"from": "gpt", "value": scene.caption()}]
        for question, answer in pairs[:rng.randint(2, 3)]:
            conversation += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
        samples.append({"id": f"synth-{seed}-{index:05d}", "image": name, "conversations": conversation})
    data_file = out_dir / "dataset.json"
    data_file.write_text(json.dumps(samples, indent=1) + "\n", encoding="utf-8")
    return data_file


def random_scene(rng: random.Random) -> Scene:
    """A scene whose shape colour differs from every background colour (so the shapes are visible)."""
    background = tuple(rng.sample(BACKGROUNDS, rng.choice((1, 2))))
    colour = rng.choice([name for name in COLOURS if name not in background])
    return Scene(rng.choice(SHAPES), colour, rng.randint(1, 3), rng.choice(SIDES), background)


def draw_scene(scene: Scene, rng: random.Random) -> Image.Image:
    """The scene as an RGB image: shapes stacked in separate slots inside their half, never touching."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), COLOURS[scene.background[0]])
    draw = ImageDraw.Draw(image)
    if len(scene.background) == 2:
        draw.rectangle((0, IMAGE_SIZE // 2, IMAGE_SIZE, IMAGE_SIZE), fill=COLOURS[scene.background[1]])
    half = IMAGE_SIZE // 2
    slot = IMAGE_SIZE // scene.count
    radius = min(slot, half) // 2 - 5
    for index in range(scene.count):
        cx = (0 if scene.side == "left" else half) + half // 2 + rng.randint(-3, 3)
        cy = slot * index + slot // 2 + rng.randint(-2, 2)
        _draw_shape(draw, scene.shape, cx, cy, radius, COLOURS[scene.colour])
    return image


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: int, cy: int, r: int,
                fill: tuple[int, int, int]) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    else:  # star: five points, inner radius 0.45 r
        points = [(cx + radius * math.sin(math.pi * k / 5), cy - radius * math.cos(math.pi * k / 5))
                  for k, radius in enumerate([r, 0.45 * r] * 5)]
        draw.polygon(points, fill=fill)
