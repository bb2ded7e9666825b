"""Image paths written inline in a message, in every form terminals and people write them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cli.inline_paths import extract_images, split_words


@pytest.fixture
def spaced_image(tmp_path: Path, sample_png: Path) -> Path:
    folder = tmp_path / "my photos"
    folder.mkdir()
    target = folder / "holiday shot.png"
    shutil.copy(sample_png, target)
    return target


def test_absolute_path(sample_png: Path, tmp_path: Path) -> None:
    assert extract_images(f"what is in {sample_png} please", tmp_path) == ("what is in please", [sample_png])


def test_relative_path(sample_png: Path, tmp_path: Path) -> None:
    assert extract_images("describe ./astronaut.png", tmp_path) == ("describe", [tmp_path / "astronaut.png"])
    assert extract_images("describe astronaut.png", tmp_path)[1] == [tmp_path / "astronaut.png"]


def test_home_relative_path(sample_png: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    text, paths = extract_images("see ~/astronaut.png", Path("/"))
    assert (text, paths) == ("see", [tmp_path / "astronaut.png"])


def test_quoted_paths_with_spaces(spaced_image: Path, tmp_path: Path) -> None:
    for quote in ("'", '"'):
        text, paths = extract_images(f"look {quote}{spaced_image}{quote} now", tmp_path)
        assert (text, paths) == ("look now", [spaced_image])


def test_backslash_escaped_spaces_as_dropped_by_terminals(spaced_image: Path, tmp_path: Path) -> None:
    escaped = str(spaced_image).replace(" ", "\\ ")
    assert extract_images(f"{escaped} what is this?", tmp_path) == ("what is this?", [spaced_image])


def test_several_images_keep_their_order(sample_png: Path, sample_jpg: Path, tmp_path: Path) -> None:
    assert extract_images(f"{sample_jpg} vs {sample_png}", tmp_path)[1] == [sample_jpg, sample_png]


def test_path_like_words_that_are_not_existing_images_stay_text(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    line = f"compare missing.png and {notes} and and/or 1/2 and ~/nothing.jpg"
    assert extract_images(line, tmp_path) == (line, [])


@given(st.text(alphabet="abc xyz/.~-_", max_size=40))
def test_plain_words_split_like_str_split(line: str) -> None:
    assert [w.text for w in split_words(line)] == line.split()


@given(st.text(alphabet="ab '\"\\/.", max_size=30))
def test_split_words_spans_stay_inside_the_line(line: str) -> None:
    words = split_words(line)
    assert all(0 <= w.start < w.end <= len(line) for w in words)
    assert [w.start for w in words] == sorted(w.start for w in words)
