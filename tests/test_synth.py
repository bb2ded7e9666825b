"""The synthetic shapes dataset: deterministic, readable, and its captions match the pixels."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage.measure import label, regionprops

from adapters.dataset import check_dataset, read_dataset
from adapters.synth import CAPTION_PROMPTS, COLOURS, synthesize
from assistant.errors import BadDataset
from assistant.messages import Role

CAPTION = re.compile(r"^(A|An|Two|Three) (\w+) (\w+?)s? on the (left|right) "
                     r"of a (\w+)(?: and (\w+))? background\.$")
COUNTS = {"A": 1, "An": 1, "Two": 2, "Three": 3}
# fraction of its bounding box a drawn shape fills
FILL = {"square": (0.95, 1.01), "circle": (0.7, 0.86), "triangle": (0.45, 0.62), "star": (0.25, 0.45)}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthesize(tmp_path_factory.mktemp("synth") / "shapes", 60, seed=3)


def test_same_seed_same_bytes_other_seed_other_data(dataset: Path, tmp_path: Path) -> None:
    again = synthesize(tmp_path / "again", 60, seed=3)
    other = synthesize(tmp_path / "other", 60, seed=4)
    assert again.read_bytes() == dataset.read_bytes()
    for image in sorted((dataset.parent / "images").iterdir()):
        assert (again.parent / "images" / image.name).read_bytes() == image.read_bytes()
    assert other.read_bytes() != dataset.read_bytes()


def test_it_is_a_clean_multi_turn_llava_dataset(dataset: Path) -> None:
    assert dataset.name == "dataset.json" and check_dataset(dataset.parent) == []
    samples = read_dataset(dataset.parent)
    assert len(samples) == 60
    for sample in samples:
        first, caption, *rest = sample.messages
        assert (first.role, first.text in CAPTION_PROMPTS, len(first.images)) == (Role.USER, True, 1)
        assert first.images[0].mime == "image/png" and first.images[0].width == 112
        assert caption.role is Role.ASSISTANT and CAPTION.match(caption.text), caption.text
        assert len(rest) in (4, 6)  # two or three follow-up questions
        assert [m.role for m in rest] == [Role.USER, Role.ASSISTANT] * (len(rest) // 2)
        assert all(not m.images for m in rest)


def test_captions_and_answers_are_true_to_the_pixels(dataset: Path) -> None:
    seen: dict[str, set[object]] = {"shape": set(), "count": set(), "side": set(), "tones": set()}
    for record in json.loads(dataset.read_text()):
        turns = [turn["value"] for turn in record["conversations"]]
        article, colour, shape, side, top, bottom = CAPTION.match(turns[1]).groups()
        count = COUNTS[article]
        pixels = np.asarray(Image.open(dataset.parent / record["image"]).convert("RGB"))
        assert tuple(pixels[0, 0]) == COLOURS[top] and tuple(pixels[-1, -1]) == COLOURS[bottom or top]

        regions = regionprops(label(np.all(pixels == COLOURS[colour], axis=-1)))
        assert len(regions) == count, record["id"]
        for region in regions:
            _, left, _, right = region.bbox
            assert (right <= 56) if side == "left" else (left >= 56), record["id"]
            low, high = FILL[shape]
            assert low <= region.extent <= high, (record["id"], shape, region.extent)

        facts = {"colour": colour, "shape": shape, "many": ["one", "two", "three"][count - 1], "Where": side}
        for question, answer in zip(turns[2::2], turns[3::2], strict=True):
            for keyword, fact in facts.items():
                if keyword in question and "background" not in question:
                    assert fact in answer, (question, answer)
        seen["shape"].add(shape)
        seen["count"].add(count)
        seen["side"].add(side)
        seen["tones"].add(bottom is not None)
    assert seen == {"shape": {"circle", "square", "triangle", "star"}, "count": {1, 2, 3},
                    "side": {"left", "right"}, "tones": {False, True}}


def test_refuses_to_write_into_a_non_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "old.txt").write_text("keep me")
    with pytest.raises(BadDataset, match="not empty"):
        synthesize(tmp_path, 3, seed=0)
    assert [p.name for p in tmp_path.iterdir()] == ["old.txt"]
