"""Every way an image input can be wrong gets a one-line BadImage naming the problem."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from PIL import Image

from assistant.errors import BadImage
from assistant.vision import load_image_bytes, load_image_path, sniff_format


def _one_line(error: pytest.ExceptionInfo[BadImage]) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_valid_png_and_jpeg_are_sniffed_from_bytes_not_names(sample_png: Path, sample_jpg: Path,
                                                            tmp_path: Path) -> None:
    disguised = tmp_path / "photo.txt"
    disguised.write_bytes(sample_jpg.read_bytes())
    image = load_image_path(disguised)
    assert (image.mime, image.width, image.height) == ("image/jpeg", 48, 32)
    assert load_image_path(sample_png).mime == "image/png"


@pytest.mark.parametrize("case, expected", [
    ("missing", "no such file"),
    ("directory", "is a directory"),
    ("text", "not an image"),
    ("truncated", "corrupt or truncated"),
    ("unsupported", "unsupported image format"),
    ("empty", "empty"),
])
def test_bad_files(case: str, expected: str, tmp_path: Path, sample_png: Path) -> None:
    target = tmp_path / f"{case}.png"
    if case == "directory":
        target.mkdir()
    elif case == "text":
        target.write_text("just some notes, not pixels\n")
    elif case == "truncated":
        target.write_bytes(sample_png.read_bytes()[:300])
    elif case == "unsupported":
        buffer = io.BytesIO()
        Image.new("RGB", (16, 16)).save(buffer, format="ICO")
        target.write_bytes(buffer.getvalue())
    elif case == "empty":
        target.write_bytes(b"")
    with pytest.raises(BadImage) as error:
        load_image_path(target)
    message = _one_line(error)
    assert expected in message and str(target) in message


def test_unreadable_file(tmp_path: Path, sample_png: Path) -> None:
    if os.geteuid() == 0:  # root reads through permission bits; this file exists but refuses reads
        target = Path("/proc/self/mem")
    else:
        target = tmp_path / "locked.png"
        target.write_bytes(sample_png.read_bytes())
        target.chmod(0)
    with pytest.raises(BadImage, match="cannot read|permission denied") as error:
        load_image_path(target)
    _one_line(error)


def test_byte_cap_is_checked_before_reading(sample_png: Path) -> None:
    with pytest.raises(BadImage, match="kB is over the 100 bytes image limit") as error:
        load_image_path(sample_png, max_bytes=100)
    _one_line(error)


def test_pixel_cap_guards_against_decompression_bombs(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.png"
    Image.new("L", (6000, 6000)).save(bomb)  # ~36 MP of zeros compresses to a few KB
    assert bomb.stat().st_size < 200_000
    with pytest.raises(BadImage, match="6000x6000 is over the 1,000,000 pixel limit") as error:
        load_image_path(bomb, max_pixels=1_000_000)
    _one_line(error)


def test_bytes_from_a_chat_attachment_get_the_same_checks(sample_png: Path) -> None:
    assert load_image_bytes(sample_png.read_bytes(), "cat.png").name == "cat.png"
    with pytest.raises(BadImage, match="cat.png: not an image"):
        load_image_bytes(b"hello there", "cat.png")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF"])
def test_sniffing_knows_every_supported_format(fmt: str) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buffer, format=fmt)
    assert sniff_format(buffer.getvalue()) == fmt
    assert load_image_bytes(buffer.getvalue()).width == 8
