"""The synthetic shapes data: deterministic, clean, varied in phrasing, true to the pixels, and an eval suite in a
style and wording that training never produces, whose references ``iris eval`` scores the way they are meant."""

from __future__ import annotations

import json
import random
import re
import string
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import binary_dilation, binary_fill_holes
from skimage.measure import label, regionprops

from adapters.dataset import check_dataset, read_dataset
from adapters.evaluate import key_words, keyword_match, load_items
from adapters.synth import (
    BACKGROUNDS,
    COLOURS,
    COUNT_WORDS,
    EVAL_ONLY_PHRASINGS,
    EVAL_PHRASINGS,
    HELD_OUT_BACKGROUND,
    PLAIN_BACKGROUNDS,
    SHAPES,
    SIDES,
    SKILLS,
    TRAIN_PHRASINGS,
    Scene,
    make_question,
    random_scene,
    synthesize,
    write_compare_set,
    write_eval_suite,
)
from assistant.errors import BadDataset, BadSetting
from assistant.messages import Role

PER_SKILL = 24
CAPTION = re.compile(r"^(One|Two|Three|Four) (\w+) (\w+?)s? on the (left|right) of an? ([\w -]+) background\.$")
# fraction of its bounding box a drawn shape fills (measured for radii 8-20)
FILL = {"square": (0.95, 1.01), "circle": (0.7, 0.86), "triangle": (0.45, 0.62), "star": (0.3, 0.47)}
SATURATED = 90  # object colours are far above this (max - min channel), every background colour far below
COLOUR_WORDS = "|".join(COLOURS)
SHAPE_WORDS = "|".join(SHAPES)
FIELDS = {"be": "is|are", "Be": "Is|Are", "does": "does|do", "they": "it|they", "obj": "shapes?",
          "item": "objects?", "noun": f"(?:{SHAPE_WORDS})s?", "nouns": f"(?:{SHAPE_WORDS})s", "colour": COLOUR_WORDS,
          "target": f"an? (?:{COLOUR_WORDS}) (?:{SHAPE_WORDS})", "targets": f"(?:{COLOUR_WORDS}) (?:{SHAPE_WORDS})s"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthesize(tmp_path_factory.mktemp("synth") / "shapes", 120, seed=3)


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_eval_suite(tmp_path_factory.mktemp("suite") / "eval", PER_SKILL, seed=5)


def _records(data_file: Path) -> list[dict[str, Any]]:
    return json.loads(data_file.read_text())


def _pixels(data_file: Path, record: dict[str, Any]) -> np.ndarray:
    return np.asarray(Image.open(data_file.parent / record["image"]).convert("RGB")).astype(int)


def _objects(pixels: np.ndarray) -> tuple[str, np.ndarray, list[Any]]:
    """The nearest colour name of the objects' fill (the commonest saturated pixel), its pixel mask, its regions."""
    saturated = pixels[pixels.max(-1) - pixels.min(-1) > SATURATED]
    values, counts = np.unique(saturated, axis=0, return_counts=True)
    fill = values[counts.argmax()]
    colour = min(COLOURS, key=lambda name: int(((fill - np.array(COLOURS[name])) ** 2).sum()))
    mask = np.all(pixels == fill, axis=-1)
    return colour, mask, regionprops(label(mask))


def _side(regions: list[Any]) -> str | None:
    if all(region.bbox[3] <= 56 for region in regions):
        return "left"
    return "right" if all(region.bbox[1] >= 56 for region in regions) else None


def _template(text: str, templates: tuple[str, ...]) -> str | None:
    """The template that ``text`` is a rendering of, if any."""
    for template in templates:
        pattern = "".join(re.escape(literal) + (f"(?:{FIELDS[field]})" if field else "")
                          for literal, field, _, _ in string.Formatter().parse(template))
        if re.fullmatch(pattern, text):
            return template
    return None


def test_same_seed_same_bytes_other_seed_other_data(dataset: Path, suite: Path, tmp_path: Path) -> None:
    again = synthesize(tmp_path / "again", 120, seed=3)
    other = synthesize(tmp_path / "other", 120, seed=4)
    suite_again = write_eval_suite(tmp_path / "suite", PER_SKILL, seed=5)
    for first, second in ((dataset, again), (suite, suite_again)):
        assert second.read_bytes() == first.read_bytes()
        images = sorted((first.parent / "images").iterdir())
        assert [p.name for p in images] == sorted(p.name for p in (second.parent / "images").iterdir())
        assert all((second.parent / "images" / image.name).read_bytes() == image.read_bytes() for image in images)
    assert other.read_bytes() != dataset.read_bytes()


def test_training_samples_are_clean_llava_with_two_to_four_questions_in_any_order(dataset: Path) -> None:
    assert dataset.name == "dataset.json" and check_dataset(dataset.parent) == []
    samples = read_dataset(dataset.parent)
    assert len(samples) == 120
    for sample in samples:
        messages = sample.messages
        assert 4 <= len(messages) <= 8 and len(messages) % 2 == 0
        assert [m.role for m in messages] == [Role.USER, Role.ASSISTANT] * (len(messages) // 2)
        assert len(messages[0].images) == 1 and not any(m.images for m in messages[1:])
        assert messages[0].images[0].mime == "image/png" and messages[0].images[0].width == 112
    skills = [[turn["category"] for turn in record["conversations"][::2]] for record in _records(dataset)]
    assert all(len(set(asked)) == len(asked) and set(asked) <= set(SKILLS) for asked in skills)
    assert {asked[0] for asked in skills} == set(SKILLS)  # the caption is not always first
    assert Counter(len(asked) for asked in skills).keys() == {2, 3, 4}


def test_answers_are_true_to_the_pixels(dataset: Path) -> None:
    seen: dict[str, set[object]] = {"colour": set(), "shape": set(), "count": set(), "side": set(),
                                    "background": set()}
    for record in _records(dataset):
        pixels = _pixels(dataset, record)
        colour, mask, regions = _objects(pixels)
        count, side = len(regions), _side(regions)
        shapes = {name for region in regions for name, (low, high) in FILL.items() if low <= region.extent <= high}
        assert len(shapes) == 1 and side is not None, record["id"]
        shape = shapes.pop()
        noun = shape if count == 1 else f"{shape}s"
        scene = record["scene"]
        assert scene == {"shape": shape, "colour": colour, "count": count, "side": side,
                         "background": scene["background"]}, record["id"]
        background = {tuple(rgb) for rgb in pixels[~mask]}
        if scene["background"] in PLAIN_BACKGROUNDS:
            assert background == {PLAIN_BACKGROUNDS[scene["background"]]}, record["id"]
        else:
            assert len(background) > 100 if scene["background"] == "noisy grey" else len(background) == 2

        turns = record["conversations"]
        for question, answer in zip(turns[::2], turns[1::2], strict=True):
            expected = {"colour": f"{colour.capitalize()}.", "shape": f"A {shape}." if count == 1 else
                        f"{noun.capitalize()}.", "count": f"{COUNT_WORDS[count].capitalize()}.",
                        "side": f"On the {side}."}
            skill, text, reply = question["category"], question["value"], answer["value"]
            if skill == "describe":
                words = CAPTION.match(reply).groups()  # type: ignore[union-attr]
                assert words == (COUNT_WORDS[count].capitalize(), colour, shape, side, scene["background"]), reply
            elif skill == "pope":
                asked = re.search(rf"({COLOUR_WORDS}) ({SHAPE_WORDS})", text).groups()  # type: ignore[union-attr]
                verdict = "yes" if asked == (colour, shape) else "no"
                assert reply == f"I see {COUNT_WORDS[count]} {colour} {noun}, so {verdict}.", (text, reply)
            else:
                assert reply == expected[skill], (text, reply)
        for key, value in (("colour", colour), ("shape", shape), ("count", count), ("side", side),
                           ("background", scene["background"])):
            seen[key].add(value)
    assert seen == {"colour": set(COLOURS), "shape": set(SHAPES), "count": {1, 2, 3, 4}, "side": set(SIDES),
                    "background": set(BACKGROUNDS)}


def test_every_skill_is_asked_in_many_phrasings(dataset: Path) -> None:
    assert all(len(set(TRAIN_PHRASINGS[skill])) >= 8 for skill in SKILLS)
    used: dict[str, set[str]] = {skill: set() for skill in SKILLS}
    for record in _records(dataset):
        for turn in record["conversations"][::2]:
            text = turn["value"].removeprefix("<image>\n")
            template = _template(text, TRAIN_PHRASINGS[turn["category"]])
            assert template is not None and _template(text, EVAL_ONLY_PHRASINGS[turn["category"]]) is None, text
            used[turn["category"]].add(template)
    assert all(len(templates) >= 6 for templates in used.values()), {k: len(v) for k, v in used.items()}
    replies = [turn["value"] for record in _records(dataset) for turn in record["conversations"][1::2]]
    polar = [reply for reply in replies if reply.endswith((", so yes.", ", so no."))]
    assert 0.35 <= sum(reply.endswith("yes.") for reply in polar) / len(polar) <= 0.65


def test_every_phrasing_reads_well_and_its_answer_scores_against_its_reference() -> None:
    """Training answers keyword-match their own eval reference, for every phrasing, singular and plural."""
    rng = random.Random(0)
    for scene in (Scene("circle", "orange", 1, "left", "white"), Scene("star", "red", 3, "right", "striped")):
        for skill in SKILLS:
            for phrasing in TRAIN_PHRASINGS[skill] + EVAL_ONLY_PHRASINGS[skill]:
                for present in (True, False):
                    question = make_question(scene, skill, phrasing, rng, present)
                    assert "{" not in question.text and question.text[0].isupper(), question.text
                    assert question.text.endswith(("?", ".")) and "  " not in question.text
                    assert keyword_match(question.answer, question.reference, question.text), question
                    assert not keyword_match("I cannot tell.", question.reference, question.text), question


def test_describe_references_check_count_colour_shape_and_side() -> None:
    scene = Scene("circle", "red", 3, "left", "white")
    question = make_question(scene, "describe", "Describe the image.", random.Random(0))
    assert question.answer == "Three red circles on the left of a white background."
    assert key_words(question.reference, question.text) == ["3", "red", "circles", "left"]
    assert keyword_match(question.answer, question.reference, question.text)
    for wrong in (Scene("circle", "blue", 3, "left", "white"), Scene("square", "red", 3, "left", "white"),
                  Scene("circle", "red", 2, "left", "white"), Scene("circle", "red", 3, "right", "white")):
        assert not keyword_match(wrong.caption(), question.reference, question.text), wrong.caption()
    single = make_question(Scene("star", "orange", 1, "right", "off-white"), "describe", "What do you see?",
                           random.Random(0))
    assert single.answer == "One orange star on the right of an off-white background."
    assert keyword_match(single.answer, single.reference, single.text)
    assert not keyword_match("Two orange stars on the right of an off-white background.", single.reference,
                             single.text)


def test_max_objects_limits_the_count(tmp_path: Path) -> None:
    data_file = synthesize(tmp_path / "single", 24, seed=1, max_objects=1)
    for record in _records(data_file):
        assert record["scene"]["count"] == 1 and len(_objects(_pixels(data_file, record))[2]) == 1
    rng = random.Random(0)
    assert {random_scene(rng, max_objects=2).count for _ in range(200)} == {1, 2}


def test_training_never_produces_the_held_out_style(dataset: Path, suite: Path) -> None:
    """Held out: a paper background, and shapes with an ink outline around a fill that a highlight holes."""
    rng = random.Random(0)
    backgrounds = Counter(random_scene(rng, max_objects).background for _ in range(3000) for max_objects in (1, 4))
    assert HELD_OUT_BACKGROUND not in backgrounds and set(backgrounds) == set(BACKGROUNDS)
    for record in _records(dataset):
        pixels = _pixels(dataset, record)
        saturated = pixels[pixels.max(-1) - pixels.min(-1) > SATURATED]
        assert len(np.unique(saturated, axis=0)) == 1, record["id"]  # one flat colour, no highlight
        assert all(region.euler_number == 1 for region in _objects(pixels)[2]), record["id"]
    for record in _records(suite):
        pixels = _pixels(suite, record)
        _, mask, regions = _objects(pixels)
        solid = binary_fill_holes(mask)
        ring = binary_dilation(solid) & ~solid
        assert all(region.euler_number <= 0 for region in regions), record["id"]
        assert (pixels[ring].max(-1) < 80).mean() > 0.9, record["id"]
    assert all(not set(EVAL_ONLY_PHRASINGS[skill]) & {p for ps in TRAIN_PHRASINGS.values() for p in ps}
               for skill in SKILLS)


def test_eval_suite_is_balanced_tagged_and_true_to_its_pixels(suite: Path) -> None:
    assert check_dataset(suite.parent) == []
    records = _records(suite)
    assert Counter(record["category"] for record in records) == {skill: PER_SKILL for skill in SKILLS}
    for skill in SKILLS:
        chosen = [record for record in records if record["category"] == skill]
        for key in ("colour", "shape", "count", "side"):
            spread = Counter(record["scene"][key] for record in chosen).values()
            assert max(spread) - min(spread) <= 1 and len(spread) == {"colour": 6, "shape": 4, "count": 4,
                                                                        "side": 2}[key], (skill, key)
        questions = [record["conversations"][0]["value"].removeprefix("<image>\n") for record in chosen]
        templates = Counter(_template(text, EVAL_PHRASINGS[skill]) for text in questions)
        assert None not in templates and len(templates) >= 5, templates
        assert len(set(templates) & set(EVAL_ONLY_PHRASINGS[skill])) >= 2
        assert len(set(templates) - set(TRAIN_PHRASINGS[skill])) >= 2
    for record in records:
        (question, reference), scene = (turn["value"] for turn in record["conversations"]), record["scene"]
        noun = scene["shape"] if scene["count"] == 1 else f"{scene['shape']}s"
        assert reference == {"colour": scene["colour"], "shape": noun, "count": str(scene["count"]),
                             "side": scene["side"], "describe": f"{scene['count']} {scene['colour']} {noun} "
                             f"{scene['side']}"}.get(record["category"], reference)
        assert key_words(reference, question) == key_words(reference)  # no question gives its answer away
        colour, _, regions = _objects(_pixels(suite, record))
        assert (colour, len(regions), _side(regions)) == (scene["colour"], scene["count"], scene["side"])
        assert scene["background"] == HELD_OUT_BACKGROUND
    polar = Counter(record["conversations"][1]["value"] for record in records if record["category"] == "pope")
    assert polar == {"yes": PER_SKILL // 2, "no": PER_SKILL // 2}
    items = load_items(suite.parent)  # what `iris eval` reads: one question per sample, tagged
    assert Counter(item.category for item in items) == {skill: PER_SKILL for skill in SKILLS}


@pytest.mark.parametrize(("call", "message"), [
    (lambda out: synthesize(out, 0, seed=0), "--n must be at least 1, got 0"),
    (lambda out: synthesize(out, 2, seed=0, max_objects=0), "--max-objects must be between 1 and 4, got 0"),
    (lambda out: synthesize(out, 2, seed=0, max_objects=5), "--max-objects must be between 1 and 4, got 5"),
    (lambda out: write_eval_suite(out, 0, seed=0), "--per-skill must be at least 1, got 0"),
    (lambda out: write_compare_set(out, 0, seed=0), "--n must be at least 1, got 0"),
])
def test_bad_sizes_are_refused_before_writing(call: Any, message: str, tmp_path: Path) -> None:
    with pytest.raises(BadSetting, match=f"^{re.escape(message)}$"):
        call(tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("write", [lambda out: synthesize(out, 3, seed=0),
                                   lambda out: write_eval_suite(out, 1, seed=0),
                                   lambda out: write_compare_set(out, 3, seed=0)])
def test_refuses_to_write_into_a_non_empty_directory(write: Any, tmp_path: Path) -> None:
    (tmp_path / "old.txt").write_text("keep me")
    with pytest.raises(BadDataset, match="not empty"):
        write(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["old.txt"]


def test_compare_samples_state_a_scene_and_answer_by_comparing_the_question_with_it(tmp_path: Path) -> None:
    """Text-only yes/no samples: the sentence names what is seen; the answer repeats it, then the true verdict."""
    data_file = write_compare_set(tmp_path / "compare", 400, seed=5)
    samples = read_dataset(data_file)
    assert len(samples) == 400 and all(not message.images for sample in samples for message in sample.messages)
    verdicts = Counter()
    for line in data_file.read_text(encoding="utf-8").splitlines():
        user, assistant = json.loads(line)["messages"]
        seen = re.search(rf"(one|two|three|four) ({COLOUR_WORDS}) ({SHAPE_WORDS})s?\b", user["content"]).groups()
        asked = re.search(rf"(?:an?|any) ({COLOUR_WORDS}) ({SHAPE_WORDS})", user["content"]).groups()
        verdict = "yes" if asked == seen[1:] else "no"
        evidence = re.match(r"I see (\w+) (\w+) (\w+?)s?, so (yes|no)\.$", assistant["content"]).groups()
        assert evidence == (*seen, verdict), (user, assistant)
        verdicts[verdict] += 1
    assert 0.4 <= verdicts["yes"] / 400 <= 0.6
    assert write_compare_set(tmp_path / "again", 400, seed=5).read_bytes() == data_file.read_bytes()
