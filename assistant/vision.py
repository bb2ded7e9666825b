"""Turn a path or raw bytes into a validated ``ImageAttachment``, and an attachment into upright pixels.

A path is read as a regular file with a hard byte cap (``assistant.files``), the format is sniffed
from the bytes (never the file name), the pixel count is capped before decoding (decompression-bomb
guard), and the whole image is decoded once so truncated files fail here, not in the model. A photo's
EXIF orientation is applied when it is decoded for a model, so a rotated JPEG reaches it upright; the
attachment keeps the original bytes (and their SHA-256 as its identity) and reports upright dimensions.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from assistant.errors import BadImage, one_line
from assistant.files import describe_size, read_user_file, shown_name
from assistant.messages import ImageAttachment

DEFAULT_MAX_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_PIXELS = 50_000_000
EXIF_ORIENTATION = 0x0112
TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that turn the image a quarter: width and height swap
SUPPORTED_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "GIF": "image/gif", "WEBP": "image/webp",
                     "BMP": "image/bmp", "TIFF": "image/tiff"}


def sniff_format(data: bytes) -> str | None:
    """The image format named by the file's magic bytes, or None."""
    signatures = [(b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF87a", "GIF"),
                  (b"GIF89a", "GIF"), (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF")]
    for signature, name in signatures:
        if data.startswith(signature):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def load_image_bytes(data: bytes, name: str = "image", *, max_bytes: int = DEFAULT_MAX_BYTES,
                     max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageAttachment:
    """Validate image bytes; raises ``BadImage`` with a one-line reason naming ``name``."""
    from PIL import Image, UnidentifiedImageError

    shown = shown_name(name)
    if len(data) > max_bytes:
        raise BadImage(f"{shown}: {describe_size(len(data))} is over the {describe_size(max_bytes)} image limit")
    if not data:
        raise BadImage(f"{shown}: the file is empty")
    kind = sniff_format(data)
    if kind is None:
        if data[:5] in (b"%PDF-",) or data.lstrip()[:1] in (b"{", b"<") or _looks_like_text(data):
            raise BadImage(f"{shown}: not an image")
        raise BadImage(f"{shown}: unsupported image format (use PNG, JPEG, GIF, WebP, BMP or TIFF)")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise BadImage(f"{shown}: {width}x{height} is over the {max_pixels:,} pixel limit")
            image.load()
            if _orientation(image) in TRANSPOSING_ORIENTATIONS:
                width, height = height, width
    except BadImage:
        raise
    except Image.DecompressionBombError:
        raise BadImage(f"{shown}: image is too large to decode safely") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise BadImage(f"{shown}: corrupt or truncated {kind} image ({one_line(exc)})") from None
    return ImageAttachment(data=data, mime=SUPPORTED_FORMATS[kind], width=width, height=height, name=name)


def _looks_like_text(data: bytes) -> bool:
    sample = data[:512]
    return all(b in b"\t\n\r" or 32 <= b < 127 or b >= 128 for b in sample)


def _orientation(image: Any) -> int | None:
    """The EXIF orientation tag, or None when absent or unreadable (a corrupt EXIF block is not a corrupt image)."""
    try:
        value = image.getexif().get(EXIF_ORIENTATION)
    except (OSError, SyntaxError, ValueError, TypeError, KeyError):
        return None
    return value if isinstance(value, int) else None


def load_image_path(path: str | Path, *, max_bytes: int = DEFAULT_MAX_BYTES,
                    max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageAttachment:
    """Read and validate an image file; every failure (a FIFO or device too) is a ``BadImage`` naming the path."""
    path = Path(os.path.expanduser(str(path)))
    data = read_user_file(path, max_bytes=max_bytes, what="image", error=BadImage)
    return load_image_bytes(data, str(path), max_bytes=max_bytes, max_pixels=max_pixels)


def to_pil(image: ImageAttachment):  # type: ignore[no-untyped-def]
    """Decode an attachment to an upright RGB PIL image for a processor (EXIF orientation applied)."""
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(image.data)) as decoded:
        if _orientation(decoded) in (None, 1):
            return decoded.convert("RGB")
        try:
            return ImageOps.exif_transpose(decoded).convert("RGB")
        except (OSError, SyntaxError, ValueError, TypeError, KeyError):
            return decoded.convert("RGB")
