"""Turn a path or raw bytes into a validated ``ImageAttachment``.

The format is sniffed from the bytes (never the file name), the byte size and
pixel count are capped before decoding (decompression-bomb guard), and the
whole image is decoded once so truncated files fail here, not in the model.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from assistant.errors import BadImage
from assistant.messages import ImageAttachment

DEFAULT_MAX_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_PIXELS = 50_000_000
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

    if len(data) > max_bytes:
        raise BadImage(f"{name}: {len(data) / 1e6:.1f} MB is over the {max_bytes / 1e6:.0f} MB image limit")
    if not data:
        raise BadImage(f"{name}: the file is empty")
    kind = sniff_format(data)
    if kind is None:
        if data[:5] in (b"%PDF-",) or data.lstrip()[:1] in (b"{", b"<") or _looks_like_text(data):
            raise BadImage(f"{name}: not an image")
        raise BadImage(f"{name}: unsupported image format (use PNG, JPEG, GIF, WebP, BMP or TIFF)")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise BadImage(f"{name}: {width}x{height} is over the {max_pixels:,} pixel limit")
            image.load()
    except BadImage:
        raise
    except Image.DecompressionBombError:
        raise BadImage(f"{name}: image is too large to decode safely") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise BadImage(f"{name}: corrupt or truncated {kind} image ({exc})") from None
    return ImageAttachment(data=data, mime=SUPPORTED_FORMATS[kind], width=width, height=height, name=name)


def _looks_like_text(data: bytes) -> bool:
    sample = data[:512]
    return all(b in b"\t\n\r" or 32 <= b < 127 or b >= 128 for b in sample)


def load_image_path(path: str | Path, *, max_bytes: int = DEFAULT_MAX_BYTES,
                    max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageAttachment:
    """Read and validate an image file; every failure is a ``BadImage`` naming the path."""
    path = Path(os.path.expanduser(str(path)))
    if not path.exists():
        raise BadImage(f"{path}: no such file")
    if path.is_dir():
        raise BadImage(f"{path}: is a directory, not an image")
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise BadImage(f"{path}: {size / 1e6:.1f} MB is over the {max_bytes / 1e6:.0f} MB image limit")
        data = path.read_bytes()
    except PermissionError:
        raise BadImage(f"{path}: permission denied") from None
    except OSError as exc:
        raise BadImage(f"{path}: cannot read ({exc.strerror or exc})") from None
    return load_image_bytes(data, str(path), max_bytes=max_bytes, max_pixels=max_pixels)


def to_pil(image: ImageAttachment):  # type: ignore[no-untyped-def]
    """Decode an attachment to an RGB PIL image for a processor."""
    from PIL import Image

    with Image.open(io.BytesIO(image.data)) as decoded:
        return decoded.convert("RGB")
