"""The default model's training data: a yes/no question is never answerable from the turns before it."""

from __future__ import annotations

import json
import random
from pathlib import Path

from adapters.synth import random_scene, synthesize, training_questions


def test_a_yes_no_question_is_always_the_first_turn() -> None:
    rng = random.Random(5)
    asked = [[q.skill for q in training_questions(random_scene(rng), rng)] for _ in range(400)]
    with_pope = [skills for skills in asked if "pope" in skills]
    assert len(with_pope) > 100  # still about half the samples
    assert all(skills[0] == "pope" for skills in with_pope)
    assert {skills[0] for skills in asked} > {"pope"}  # the other skills still open samples without one


def test_written_samples_ask_yes_no_before_anything_else(tmp_path: Path) -> None:
    records = json.loads(synthesize(tmp_path / "set", 40, seed=3).read_text())
    for record in records:
        skills = [turn["category"] for turn in record["conversations"][::2]]
        assert "pope" not in skills[1:]
