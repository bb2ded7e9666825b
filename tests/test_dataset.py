"""Reading and checking training datasets: LLaVA JSON and messages JSONL."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from adapters.dataset import Sample, check_dataset, read_dataset
from assistant.errors import BadDataset
from assistant.messages import Role


@pytest.fixture
def data_dir(tmp_path: Path, sample_png: Path, sample_jpg: Path) -> Path:
    """A dataset directory with two real photos under images/."""
    directory = tmp_path / "ds"
    (directory / "images").mkdir(parents=True)
    shutil.copy(sample_png, directory / "images" / "astronaut.png")
    shutil.copy(sample_jpg, directory / "images" / "coffee.jpg")
    return directory


def write_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


def test_llava_json_attaches_each_image_to_the_user_turn_holding_its_marker(data_dir: Path) -> None:
    (data_dir / "dataset.json").write_text(json.dumps([
        {"id": "a", "image": "images/astronaut.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is this?"},
            {"from": "gpt", "value": "An astronaut."}]},
        {"id": "b", "image": ["images/coffee.jpg", "images/astronaut.png"], "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "<image> Compare with"},
            {"from": "gpt", "value": "Which one?"},
            {"from": "human", "value": "this one <image>"},
            {"from": "gpt", "value": "Coffee is not a person."}]},
        {"id": "text-only", "conversations": [{"from": "human", "value": "Hi"},
                                              {"from": "gpt", "value": "Hello"}]},
    ]))

    first, second, third = read_dataset(data_dir)

    assert first.source == f"{data_dir / 'dataset.json'}#0"
    assert [(m.role, m.text) for m in first.messages] == [(Role.USER, "What is this?"),
                                                          (Role.ASSISTANT, "An astronaut.")]
    assert [(i.mime, i.width) for i in first.messages[0].images] == [("image/png", 64)]
    roles = [m.role for m in second.messages]
    assert roles == [Role.SYSTEM, Role.USER, Role.ASSISTANT, Role.USER, Role.ASSISTANT]
    assert second.messages[1].text == "Compare with" and second.messages[3].text == "this one"
    assert [i.mime for i in second.messages[1].images] == ["image/jpeg"]
    assert [i.mime for i in second.messages[3].images] == ["image/png"]
    assert second.messages[3].images[0] is first.messages[0].images[0]  # a reused file is loaded once
    assert all(not m.images for m in third.messages)
    assert isinstance(third, Sample) and third.source.endswith("#2")


def test_messages_jsonl_with_string_and_typed_part_content(data_dir: Path) -> None:
    data_file = write_jsonl(data_dir / "data.jsonl", [
        {"messages": [{"role": "user", "content": "<image>Describe it."},
                      {"role": "assistant", "content": "A photo."}], "images": ["images/coffee.jpg"]},
        "",
        {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this?"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "An astronaut."}]}],
         "images": ["images/astronaut.png"]},
    ])

    first, second = read_dataset(data_file)

    assert first.source == f"{data_file}:1" and second.source == f"{data_file}:3"  # blank line 2 skipped
    assert first.messages[0].text == "Describe it." and first.messages[0].images[0].mime == "image/jpeg"
    assert second.messages[0].text == "And this?" and second.messages[0].images[0].mime == "image/png"
    assert second.messages[1].text == "An astronaut."


def test_check_reports_every_problem_with_its_line(data_dir: Path) -> None:
    ok = {"messages": [{"role": "user", "content": "<image>Hi"}, {"role": "assistant", "content": "Hey"}],
          "images": ["images/astronaut.png"]}
    data_file = write_jsonl(data_dir / "data.jsonl", [
        ok,
        '{"messages": [',
        dict(ok, images=["images/missing.png"]),
        {"messages": [{"role": "robot", "content": "beep"}, {"role": "assistant", "content": "ok"}]},
        dict(ok, images=[]),
        {"messages": [{"role": "user", "content": "Hi"}]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<image>"}],
         "images": ["images/coffee.jpg"]},
    ])

    problems = check_dataset(data_dir)

    assert len(problems) == 6, problems
    expected = ["invalid JSON", "missing.png: no such file", "unknown role 'robot'",
                "1 <image> marker(s) but 0", "no assistant turn",
                "turn 2 (assistant): <image> may only appear in user turns"]
    for line, (problem, fragment) in enumerate(zip(problems, expected, strict=True), start=2):
        assert problem.startswith(f"{data_file}:{line}: ") and fragment in problem, problem
        assert "\n" not in problem


def test_read_refuses_a_bad_dataset_with_one_line_naming_file_and_line(data_dir: Path) -> None:
    (data_dir / "images" / "fake.png").write_text("this is not a picture")
    data_file = data_dir / "dataset.json"
    data_file.write_text(json.dumps([
        {"image": "images/fake.png", "conversations": [{"from": "human", "value": "<image>"},
                                                       {"from": "gpt", "value": "?"}]},
        {"conversations": [{"from": "gpt", "value": "<image>"}]},
    ]))

    with pytest.raises(BadDataset) as caught:
        read_dataset(data_dir)

    message = str(caught.value)
    assert message.startswith(f"{data_file}#0: ") and "fake.png: not an image" in message
    assert "and 2 more" in message and "\n" not in message


@pytest.mark.parametrize(("content", "fragment"), [
    ("[{", "dataset.json:1: invalid JSON"),
    ('{"conversations": []}', "expected a JSON list"),
    ("[]", "no samples"),
])
def test_broken_json_files_are_one_problem(data_dir: Path, content: str, fragment: str) -> None:
    (data_dir / "dataset.json").write_text(content)
    problems = check_dataset(data_dir)
    assert len(problems) == 1 and fragment in problems[0], problems


def test_data_file_discovery(tmp_path: Path) -> None:
    record = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"}]}
    assert check_dataset(tmp_path / "nowhere") == [f"{tmp_path / 'nowhere'}: no such file or directory"]
    assert "found none" in check_dataset(tmp_path)[0]
    write_jsonl(tmp_path / "train.jsonl", [record])
    assert read_dataset(tmp_path)[0].source == f"{tmp_path / 'train.jsonl'}:1"  # the only data file
    write_jsonl(tmp_path / "eval.jsonl", [record])
    assert "found eval.jsonl, train.jsonl" in check_dataset(tmp_path)[0]
    write_jsonl(tmp_path / "data.jsonl", [record, record])
    assert len(read_dataset(tmp_path)) == 2  # the conventional name wins
    (tmp_path / "notes.txt").write_text("hi")
    assert "not a .json or .jsonl" in check_dataset(tmp_path / "notes.txt")[0]
