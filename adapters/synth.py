"""Synthetic shape scenes → images and question/answer text that is true by construction.

Real image–text data is not available offline, yet the default model has to learn to see. A scene is one kind of
object (one shape in one colour), one to four of them, all in the left half or all in the right half, at random
non-overlapping positions and sizes. Questions about colour, shape, count, side, a caption, and yes/no ("is there
a red star?", half of them about an object that is absent) come in many phrasings, so a model learns the skill
rather than the sentence; a training sample asks 2–4 of them in random order.

Scenes are drawn in one of two families of styles. Training styles: flat shapes on plain light, plain dark or
textured backgrounds. The held-out style (``HELD_OUT_BACKGROUND``), which the training generator never produces:
outlined shapes with a highlight, on a paper gradient. ``write_eval_suite`` uses only the held-out style, plus
phrasings never used in training, so its scores say what a trained model sees rather than what it memorised.
Same seed → byte-identical files.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image, ImageDraw

from assistant.errors import BadDataset, BadSetting, one_line

IMAGE_SIZE = 112
HALF = IMAGE_SIZE // 2
MAX_OBJECTS = 4
COLOURS = {"red": (215, 35, 35), "orange": (245, 135, 20), "yellow": (240, 215, 35), "green": (35, 165, 60),
           "blue": (35, 75, 215), "purple": (135, 50, 175)}
SHADE_JITTER = 14  # per channel, training only: the answer set keeps clear hue gaps
SHAPES = ("circle", "square", "triangle", "star")
SIDES = ("left", "right")
COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
SKILLS = ("colour", "shape", "count", "side", "describe", "pope")
EVAL_PER_SKILL = 50  # the eval suite's default size: 300 questions, 2 % steps per skill

# Training backgrounds, in three style groups drawn equally often; the name is what a caption says.
PLAIN_BACKGROUNDS = {"white": (255, 255, 255), "off-white": (246, 244, 238), "light grey": (210, 210, 210),
                     "cream": (250, 242, 210), "black": (0, 0, 0), "dark grey": (58, 58, 58), "navy": (22, 30, 78)}
TEXTURES = ("noisy grey", "striped", "checkered", "two-tone")
BACKGROUND_GROUPS = (("white", "off-white", "light grey", "cream"), ("black", "dark grey", "navy"), TEXTURES)
BACKGROUNDS = tuple(name for group in BACKGROUND_GROUPS for name in group)
# Texture colours: low saturation, each tagged with the object colours it would blend with.
TINTS = (((250, 250, 250), ()), ((200, 200, 200), ()), ((128, 128, 128), ()), ((64, 64, 64), ()),
         ((15, 15, 15), ()), ((245, 208, 208), ("red", "orange")), ((245, 222, 200), ("orange", "red", "yellow")),
         ((245, 240, 200), ("yellow", "orange")), ((208, 238, 212), ("green",)), ((205, 218, 245), ("blue", "purple")),
         ((226, 212, 242), ("purple", "blue")))
CLASHES = {"cream": ("yellow", "orange"), "navy": ("blue", "purple")}  # plain backgrounds too close to a colour
RADII = {1: (11, 20), 2: (9, 16), 3: (8, 13), 4: (8, 11)}  # training size range per count, in pixels

# The held-out style: a paper gradient with fine grain, shapes outlined in ink with a highlight, other sizes.
HELD_OUT_BACKGROUND = "paper"
PAPER_TONES = ((252, 248, 236), (236, 240, 250), (244, 236, 226), (232, 238, 230))
INK = (35, 35, 35)
HELD_OUT_RADII = {1: (14, 17), 2: (11, 14), 3: (10, 12), 4: (10, 11)}
MARGIN, GAP = 2, 3  # pixels between a shape and its half's edge, and between two shapes

# Question templates. Fields: {be} is/are, {Be}, {does} does/do, {they} it/they, {obj} shape(s), {item} object(s),
# {noun} circle(s), {nouns} circles, {colour}; yes/no questions: {target} "a red circle", {targets} "red circles".
TRAIN_PHRASINGS: dict[str, tuple[str, ...]] = {
    "colour": ("What colour {be} the {noun}?", "What color {be} the {obj}?",
               "Which colour {be} the {obj} in the image?", "What is the colour of the {noun}?",
               "Name the colour of the {item}.", "What colour {be} {they}?",
               "Tell me the color of the {noun}.", "In what colour {be} the {obj} drawn?",
               "What's the colour of the {item} in this picture?"),
    "shape": ("What shape {be} {they}?", "What shape {be} the {colour} {item}?", "Which shape do you see?",
              "What kind of {obj} {be} in the image?", "Name the shape of the {item}.",
              "What is the shape of the {colour} {item}?", "What geometric {obj} {be} drawn here?",
              "What shape {does} the {item} have?", "Tell me which shape the {item} {be}."),
    "count": ("How many {nouns} are there?", "How many shapes are in the image?", "How many objects can you see?",
              "Count the {nouns}.", "How many {colour} {nouns} are there?",
              "What is the number of shapes in the picture?", "How many {nouns} does the image show?",
              "Count the objects in this picture.", "How many things are drawn?"),
    "side": ("Where {be} the {noun}?", "Which side {be} the {obj} on?", "{Be} the {obj} on the left or the right?",
             "On which side of the image {be} the {colour} {item}?", "Left or right: where {be} the {noun}?",
             "Which half of the image {does} the {item} sit in?", "Where {be} {they} located?",
             "Where in the picture {be} the {colour} {obj}?", "In which half {be} the {noun}?"),
    "describe": ("Describe the image.", "What is in this image?", "What do you see?", "Describe this picture.",
                 "What's in the picture?", "What is this?", "Tell me what the image shows.",
                 "Can you describe this image?", "Describe the scene.", "What does this picture show?"),
    "pope": ("Is there {target} in the image?", "Do you see {target}?", "Is there {target}?",
             "Does the picture contain {target}?", "Can you find {target} here?", "Is {target} visible?",
             "Does this image show {target}?", "Are there any {targets}?",
             "Look closely: is there {target} in the picture?"),
}
# Phrasings only the eval suite asks, to measure whether a skill carries over to new wording.
EVAL_ONLY_PHRASINGS: dict[str, tuple[str, ...]] = {
    "colour": ("Identify the colour of the {item} in this picture.", "The {noun} {be} painted in which colour?",
               "Which hue {does} the {item} have?"),
    "shape": ("Identify the shape you see here.", "Which geometric form {does} the {item} in this picture have?",
              "Name the shape drawn in this image."),
    "count": ("Tell me how many objects appear in this picture.", "What's the total number of {nouns} here?",
              "Give the number of {colour} {nouns} you can see."),
    "side": ("Tell me whether the {noun} {be} in the left half or the right half.",
             "Which side of the frame {be} the {item} placed on?",
             "{Be} the {colour} {item} on the left half or the right half of the picture?"),
    "describe": ("Give a short description of this picture.", "Summarise what is shown here.",
                 "Explain in a sentence what you see in this image."),
    "pope": ("Is {target} present in this picture? Answer yes or no.", "Would you say the image includes {target}?",
             "Check the picture: does it have {target} in it?"),
}
EVAL_PHRASINGS = {skill: TRAIN_PHRASINGS[skill][:3] + EVAL_ONLY_PHRASINGS[skill] for skill in SKILLS}
CAPTION_PROMPTS = TRAIN_PHRASINGS["describe"]

T = TypeVar("T")


@dataclass(frozen=True)
class Scene:
    """What one image shows; every answer is derived from it (layout, sizes and shades are left to drawing)."""

    shape: str
    colour: str
    count: int
    side: str
    background: str  # one of BACKGROUNDS, or HELD_OUT_BACKGROUND

    @property
    def held_out(self) -> bool:
        return self.background == HELD_OUT_BACKGROUND

    def noun(self) -> str:
        return self.shape if self.count == 1 else f"{self.shape}s"

    def evidence(self) -> str:
        """What a yes/no answer states before its verdict ("I see three red circles"): the model names what it sees,
        then compares that with the question in text (``make_question``)."""
        return f"I see {COUNT_WORDS[self.count]} {self.colour} {self.noun()}"

    def caption(self) -> str:
        """One sentence naming count, colour, shape, side and background."""
        article = "an" if self.background[0] in "aeiou" else "a"
        return (f"{COUNT_WORDS[self.count].capitalize()} {self.colour} {self.noun()} on the {self.side} "
                f"of {article} {self.background} background.")


@dataclass(frozen=True)
class Question:
    """One question about a scene: the answer training teaches and the bare reference ``iris eval`` scores."""

    skill: str
    text: str
    answer: str
    reference: str


def make_question(scene: Scene, skill: str, phrasing: str, rng: random.Random,
                  present: bool | None = None) -> Question:
    """``phrasing`` (a template of ``TRAIN_PHRASINGS``/``EVAL_PHRASINGS``) asked about ``scene``. For a yes/no
    question ``present`` says whether the asked-about object is in the scene (None: a coin toss); an absent one
    differs from the scene in colour or in shape. Its answer names what is seen, then the verdict ("I see three red
    circles, so no."): SmolLM2-135M cannot match a question against an image in one step, nor even against a
    sentence (asked "The picture shows a green star. Is there a green star?" it answers "No"), so the answer
    splits the work into seeing (which it learns: colour, shape) and comparing in text (``write_compare_set``)."""
    one = scene.count == 1
    words = {"be": "is" if one else "are", "Be": "Is" if one else "Are", "does": "does" if one else "do",
             "they": "it" if one else "they", "obj": "shape" if one else "shapes",
             "item": "object" if one else "objects", "noun": scene.noun(), "nouns": f"{scene.shape}s",
             "colour": scene.colour}
    if skill == "pope":
        present = rng.random() < 0.5 if present is None else present
        colour, shape = scene.colour, scene.shape
        if not present and rng.random() < 0.5:
            colour = rng.choice([name for name in COLOURS if name != scene.colour])
        elif not present:
            shape = rng.choice([name for name in SHAPES if name != scene.shape])
        words |= {"target": f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {shape}",
                  "targets": f"{colour} {shape}s"}
        verdict = "yes" if present else "no"
        return Question(skill, phrasing.format(**words), f"{scene.evidence()}, so {verdict}.", verdict)
    answers = {
        "colour": (f"{scene.colour.capitalize()}.", scene.colour),
        "shape": (f"A {scene.shape}." if one else f"{scene.noun().capitalize()}.", scene.noun()),
        "count": (f"{COUNT_WORDS[scene.count].capitalize()}.", str(scene.count)),
        "side": (f"On the {scene.side}.", scene.side),
        "describe": (scene.caption(), f"{scene.count} {scene.colour} {scene.noun()} {scene.side}"),
    }
    answer, reference = answers[skill]
    return Question(skill, phrasing.format(**words), answer, reference)


def random_scene(rng: random.Random, max_objects: int = MAX_OBJECTS) -> Scene:
    """A training scene (never the held-out style): its background never shares the objects' hue."""
    colour = rng.choice(list(COLOURS))
    group = rng.choice(BACKGROUND_GROUPS)
    background = rng.choice([name for name in group if colour not in CLASHES.get(name, ())])
    return Scene(rng.choice(SHAPES), colour, rng.randint(1, max_objects), rng.choice(SIDES), background)


def training_questions(scene: Scene, rng: random.Random) -> list[Question]:
    """2–4 questions on different skills, in random order, each in a random training phrasing; a yes/no question
    always comes first. After another turn it could be answered from the text alone ("How many red circles are
    there?" / "Three." then "Is there a red circle?"), and a model taught that way answers yes/no without looking:
    ``iris eval`` asks it first, about the image only."""
    skills = rng.sample(SKILLS, rng.randint(2, 4))
    if "pope" in skills:
        skills.remove("pope")
        skills.insert(0, "pope")
    return [make_question(scene, skill, rng.choice(TRAIN_PHRASINGS[skill]), rng) for skill in skills]


# writing datasets ---------------------------------------------------------------------------------------------


def synthesize(out_dir: Path, n: int, seed: int, *, max_objects: int = MAX_OBJECTS) -> Path:
    """Write ``n`` training samples as ``out_dir/dataset.json`` + ``out_dir/images/``; returns the dataset file.

    ``max_objects`` caps the count (1: single-object scenes, for a first curriculum stage). Each human turn carries
    its skill as ``"category"`` and each record its ``"scene"``, so ``iris eval`` and tests can group and check them.
    """
    if n < 1:
        raise BadSetting(f"--n must be at least 1, got {n}")
    if not 1 <= max_objects <= MAX_OBJECTS:
        raise BadSetting(f"--max-objects must be between 1 and {MAX_OBJECTS}, got {max_objects}")
    rng = random.Random(seed)

    def samples() -> Iterator[tuple[Image.Image, dict[str, object]]]:
        for index in range(n):
            scene = random_scene(rng, max_objects)
            image = draw_scene(scene, rng)
            turns: list[dict[str, str]] = []
            for question in training_questions(scene, rng):
                text = question.text if turns else f"<image>\n{question.text}"
                turns += [{"from": "human", "value": text, "category": question.skill},
                          {"from": "gpt", "value": question.answer}]
            yield image, {"id": f"synth-{seed}-{index:05d}", "image": f"images/{index:05d}.png",
                          "scene": asdict(scene), "conversations": turns}

    return _write(Path(out_dir), samples())


COMPARE_STATEMENTS = ("The picture shows {seen}.", "The image contains {seen}.", "In the photo there {be} {seen}.",
                      "Someone drew {seen}.", "Here is a drawing of {seen}.", "My picture has {seen} in it.")


def write_compare_set(out_dir: Path, n: int, seed: int) -> Path:
    """Write ``n`` text-only yes/no samples as ``out_dir/data.jsonl``: a sentence says what a picture shows, a
    training phrasing asks about an object (present or not, 50/50, an absent one differing in colour or shape), and
    the answer is the one an image question gets ("I see two red circles, so no."). They teach the comparing half
    of a yes/no answer cheaply (no image to encode); mix them into a LoRA stage with ``iris train --mix``."""
    if n < 1:
        raise BadSetting(f"--n must be at least 1, got {n}")
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        scene = random_scene(rng)
        question = make_question(scene, "pope", rng.choice(TRAIN_PHRASINGS["pope"]), rng)
        statement = rng.choice(COMPARE_STATEMENTS).format(seen=scene.evidence().removeprefix("I see "),
                                                           be="is" if scene.count == 1 else "are")
        lines.append(json.dumps({"messages": [{"role": "user", "content": f"{statement} {question.text}"},
                                              {"role": "assistant", "content": question.answer}],
                                 "category": "pope"}))
    out_dir = Path(out_dir)
    with _new_dir(out_dir):
        data_file = out_dir / "data.jsonl"
        data_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return data_file


def write_eval_suite(out_dir: Path, per_skill: int, seed: int) -> Path:
    """Write a held-out LLaVA eval set: ``per_skill`` one-question samples for each of ``SKILLS``, all in the
    held-out style, tagged with ``"category"`` (the skill), answers being bare references ("red", "circle"/"circles",
    "3", "left", "yes"/"no"; describe: "3 red circles left"). Within a skill, colours, shapes, counts, sides and
    phrasings (``EVAL_PHRASINGS``: some from training, some never trained) are balanced, and yes/no is 50/50."""
    if per_skill < 1:
        raise BadSetting(f"--per-skill must be at least 1, got {per_skill}")
    rng = random.Random(seed)

    def samples() -> Iterator[tuple[Image.Image, dict[str, object]]]:
        for skill in SKILLS:
            columns = [_balanced(values, per_skill, rng) for values in
                       (list(COLOURS), SHAPES, range(1, MAX_OBJECTS + 1), SIDES, EVAL_PHRASINGS[skill],
                        (True, False))]
            for index, (colour, shape, count, side, phrasing, present) in enumerate(zip(*columns, strict=True)):
                scene = Scene(shape, colour, count, side, HELD_OUT_BACKGROUND)
                image = draw_scene(scene, rng)
                question = make_question(scene, skill, phrasing, rng, present)
                name = f"{skill}-{index:04d}"
                yield image, {"id": f"eval-{seed}-{name}", "image": f"images/{name}.png", "category": skill,
                              "scene": asdict(scene),
                              "conversations": [{"from": "human", "value": f"<image>\n{question.text}"},
                                                {"from": "gpt", "value": question.reference}]}

    return _write(Path(out_dir), samples())


def _balanced(values: Iterable[T], n: int, rng: random.Random) -> list[T]:
    """``n`` of ``values`` in random order, each appearing as often as the others (±1)."""
    pool = list(values)
    picked = pool * (n // len(pool)) + rng.sample(pool, n % len(pool))
    rng.shuffle(picked)
    return picked


def _write(out_dir: Path, samples: Iterable[tuple[Image.Image, dict[str, object]]]) -> Path:
    """Images and ``dataset.json`` into a new or empty ``out_dir`` (old images never mix with a new dataset)."""
    with _new_dir(out_dir):
        (out_dir / "images").mkdir(parents=True, exist_ok=True)
        records = []
        for image, record in samples:
            image.save(out_dir / str(record["image"]), format="PNG")
            records.append(record)
        data_file = out_dir / "dataset.json"
        data_file.write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
    return data_file


@contextmanager
def _new_dir(out_dir: Path) -> Iterator[None]:
    """Refuse a used ``out_dir`` (old files never mix with a new dataset); writing in it fails in one line."""
    try:
        if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
            raise BadDataset(f"{out_dir}: already exists and is not empty; choose a new --out")
        out_dir.mkdir(parents=True, exist_ok=True)
        yield
    except OSError as exc:  # a read-only place, /proc or /sys, a full disk
        raise BadDataset(f"{out_dir}: cannot write the dataset there ({exc.strerror or one_line(exc)})") from None


# drawing ------------------------------------------------------------------------------------------------------


def draw_scene(scene: Scene, rng: random.Random) -> Image.Image:
    """The scene as a 112-px RGB image; ``rng`` picks layout, sizes, shade and texture (no answer depends on them)."""
    if scene.held_out:
        image, radii = _paper(rng), HELD_OUT_RADII[scene.count]
        fill = COLOURS[scene.colour]
    else:
        image, radii = _background(scene, rng), RADII[scene.count]
        red, green, blue = (min(255, max(0, c + rng.randint(-SHADE_JITTER, SHADE_JITTER)))
                            for c in COLOURS[scene.colour])
        fill = red, green, blue
    draw = ImageDraw.Draw(image)
    for cx, cy, r in _layout(scene.count, scene.side, radii, rng):
        if scene.held_out:
            _draw_shape(draw, scene.shape, cx, cy, r, fill, outline=INK)
            _draw_highlight(draw, scene.shape, cx, cy, r, _mix(fill, (255, 255, 255), 0.5))
        else:
            _draw_shape(draw, scene.shape, cx, cy, r, fill)
    return image


def _layout(count: int, side: str, radii: tuple[int, int], rng: random.Random) -> list[tuple[int, int, int]]:
    """(x, y, radius) of ``count`` shapes inside one half whose bounding boxes keep ``GAP`` pixels apart;
    sizes shrink towards the low end of ``radii`` until a random placement fits."""
    low, high = radii
    left = 0 if side == "left" else HALF
    while True:
        placed: list[tuple[int, int, int]] = []
        for r in sorted((rng.randint(low, high) for _ in range(count)), reverse=True):
            for _ in range(100):
                x = rng.randint(left + MARGIN + r, left + HALF - MARGIN - r - 1)
                y = rng.randint(MARGIN + r, IMAGE_SIZE - MARGIN - r - 1)
                if all(abs(x - px) > r + pr + GAP or abs(y - py) > r + pr + GAP for px, py, pr in placed):
                    placed.append((x, y, r))
                    break
        if len(placed) == count:
            return placed
        high = max(low, high - 1)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: int, cy: int, r: int, fill: Sequence[int],
                outline: tuple[int, int, int] | None = None) -> None:
    """A shape inside the box ``cx ± r, cy ± r``, flat or (held-out style) with a 2-px ``outline``."""
    colour, width = tuple(fill), 2 if outline else 1
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour, outline=outline, width=width)
    elif shape == "square":
        side = round(0.85 * r)  # a square of the circle's width looks bigger than the circle
        draw.rectangle((cx - side, cy - side, cx + side, cy + side), fill=colour, outline=outline, width=width)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=colour, outline=outline, width=width)
    else:  # star: five points, inner radius 0.45 r
        points = [(cx + radius * math.sin(math.pi * k / 5), cy - radius * math.cos(math.pi * k / 5))
                  for k, radius in enumerate([r, 0.45 * r] * 5)]
        draw.polygon(points, fill=colour, outline=outline, width=width)


def _draw_highlight(draw: ImageDraw.ImageDraw, shape: str, cx: int, cy: int, r: int,
                    colour: tuple[int, int, int]) -> None:
    """A light spot well inside the shape, where light would catch it (held-out style only)."""
    x, y, size = {"circle": (cx - 0.3 * r, cy - 0.3 * r, 0.22 * r), "square": (cx - 0.25 * r, cy - 0.25 * r, 0.2 * r),
                  "triangle": (cx, cy + 0.35 * r, 0.2 * r), "star": (cx, cy, 0.14 * r)}[shape]
    draw.ellipse((x - size, y - size, x + size, y + size), fill=colour)


def _mix(colour: Sequence[int], other: Sequence[int], share: float) -> tuple[int, int, int]:
    red, green, blue = (round(a + (b - a) * share) for a, b in zip(colour, other, strict=True))
    return red, green, blue


def _background(scene: Scene, rng: random.Random) -> Image.Image:
    """A training background: plain, pixel noise, stripes, a checkerboard or a two-tone split."""
    if scene.background in PLAIN_BACKGROUNDS:
        return Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), PLAIN_BACKGROUNDS[scene.background])
    noise = np.random.default_rng(rng.getrandbits(64))
    shape = (IMAGE_SIZE, IMAGE_SIZE)
    if scene.background == "noisy grey":
        level = noise.integers(-40, 41, (*shape, 1)) + noise.integers(-6, 7, (*shape, 3))
        pixels = np.clip(rng.randint(80, 180) + level, 0, 255)
    else:
        first, second = rng.sample([rgb for rgb, hues in TINTS if scene.colour not in hues], 2)
        y, x = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
        if scene.background == "striped":
            mask = (rng.choice((x, y, x + y, x - y + IMAGE_SIZE)) // rng.randint(3, 9)) % 2 == 0
        elif scene.background == "checkered":
            cell = rng.randint(4, 14)
            mask = (x // cell + y // cell) % 2 == 0
        else:  # two-tone: split across, down or diagonally
            mask = rng.choice((x, y, (x + y) // 2)) < rng.randint(28, 84)
        pixels = np.where(mask[..., None], np.array(first), np.array(second))
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


def _paper(rng: random.Random) -> Image.Image:
    """The held-out background: a light gradient between two paper tones with a fine grain."""
    noise = np.random.default_rng(rng.getrandbits(64))
    start, end = (np.array(tone, dtype=np.int64) for tone in rng.sample(PAPER_TONES, 2))
    y, x = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
    position = rng.choice((x, y, (x + y) // 2))[..., None]  # 0 … IMAGE_SIZE - 1
    pixels = start + (end - start) * position // (IMAGE_SIZE - 1) + noise.integers(-5, 6, (IMAGE_SIZE, IMAGE_SIZE, 1))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
