"""Files Iris does not control: what a user names, and the cache entries several processes may build at once.

A user-named file is opened as a *regular* file only: a FIFO, a device (``/dev/zero``), a socket or a
directory is refused before anything is read, and the open is non-blocking so a FIFO cannot hang it.
Reading stops at a hard byte cap counted while reading, never trusting ``st_size`` (0 for special files).

A cache entry (a converted or composed model directory) is built under an exclusive ``flock`` on a lock
file beside it (``NAME.lock``, kept: removing a lock file races with its users), in a staging directory
private to the builder, and renamed into place only when complete.
Whoever takes the lock next removes what a killed builder left behind.
"""

from __future__ import annotations

import errno
import fcntl
import io
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from assistant.errors import IrisError

READ_CHUNK = 1 << 20


class UnreadableFile(IrisError):
    """A user-named file that is missing, not a regular file, too big or unreadable."""


class CacheUnwritable(IrisError):
    """The cache directory cannot hold a new entry (read-only, full, not a directory)."""


_KINDS = ((stat.S_ISDIR, "is a directory"), (stat.S_ISFIFO, "is a FIFO (named pipe), not a regular file"),
          (stat.S_ISCHR, "is a character device, not a regular file"),
          (stat.S_ISBLK, "is a block device, not a regular file"),
          (stat.S_ISSOCK, "is a socket, not a regular file"))


def shown_name(name: str | Path) -> str:
    """A file name as it goes into a one-line message: as is, or quoted with escapes if it holds a newline,
    an escape or another control character."""
    text = str(name)
    return text if text.isprintable() else repr(text)


def describe_size(size: int) -> str:
    """A byte count the way people read one (``512 bytes``, ``64 kB``, ``21 MB``)."""
    if size >= 1_000_000:
        return f"{size / 1e6:.3g} MB"
    if size >= 1_000:
        return f"{size / 1e3:.3g} kB"
    return f"{size} bytes"


def read_user_file(path: str | Path, *, max_bytes: int, what: str = "file",
                   error: type[IrisError] = UnreadableFile) -> bytes:
    """The bytes of the regular file ``path``, at most ``max_bytes``; ``error`` (one line naming the file) else.

    ``what`` names the limit in the message ("over the 21 MB image limit").
    """
    path = Path(path)
    name = shown_name(path)
    try:
        _refuse_special(os.stat(path).st_mode, name, error)  # before opening: opening a device can act
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0))
    except ValueError:  # os.stat refuses the name before asking the system
        raise error(f"{name}: not a usable file name (it holds a NUL character)") from None
    except FileNotFoundError:
        raise error(f"{name}: no such file") from None
    except PermissionError:
        raise error(f"{name}: permission denied") from None
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # a socket (or a device without a driver) swapped in after the stat
            raise error(f"{name}: not a regular file") from None
        raise error(f"{name}: cannot read ({exc.strerror or exc})") from None
    with os.fdopen(descriptor, "rb", buffering=0) as handle:
        status = os.fstat(handle.fileno())
        _refuse_special(status.st_mode, name, error)  # what was opened, in case the path changed meanwhile
        if status.st_size > max_bytes:
            raise error(f"{name}: {describe_size(status.st_size)} is over the {describe_size(max_bytes)} {what} limit")
        try:
            data = _read_capped(handle, max_bytes, status.st_size)
        except OSError as exc:
            raise error(f"{name}: cannot read ({exc.strerror or exc})") from None
    if len(data) > max_bytes:
        raise error(f"{name}: over the {describe_size(max_bytes)} {what} limit")
    return data


def _read_capped(handle: io.RawIOBase, max_bytes: int, size_hint: int) -> bytes:
    """Up to ``max_bytes + 1`` bytes, read in pieces: asking for the whole cap at once would allocate it."""
    chunks: list[bytes] = []
    total = 0
    want = size_hint + 1 if size_hint else READ_CHUNK  # st_size is a hint (0 for /proc files), never a limit
    while total <= max_bytes:
        request = min(want, max_bytes + 1 - total)
        chunk = handle.read(request)
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
        want = READ_CHUNK if len(chunk) == request else 4096  # a short read is usually the end: probe it cheaply
    return b"".join(chunks)


def read_user_text(path: str | Path, *, max_bytes: int, what: str = "file",
                   error: type[IrisError] = UnreadableFile) -> str:
    """``read_user_file`` decoded as UTF-8; undecodable bytes are ``error`` too."""
    try:
        return read_user_file(path, max_bytes=max_bytes, what=what, error=error).decode("utf-8")
    except UnicodeDecodeError:
        raise error(f"{shown_name(path)}: not UTF-8 text") from None


def _refuse_special(mode: int, name: str, error: type[IrisError]) -> None:
    if stat.S_ISREG(mode):
        return
    for test, reason in _KINDS:
        if test(mode):
            raise error(f"{name}: {reason}")
    raise error(f"{name}: not a regular file")


# ---------------------------------------------------------------------------------------------------------
# Cache entries built once across processes


def build_once(target: Path, build: Callable[[Path], object], *,
               complete: Callable[[Path], bool] = lambda directory: (directory / "config.json").is_file(),
               wait: Callable[[], None] = lambda: None) -> Path:
    """``target``, built by ``build(out)`` unless already ``complete``; safe with other processes doing the same.

    ``build`` must create the directory ``out`` (inside a staging directory private to this process); it is
    renamed to ``target`` once ``build`` returns. Only one process builds at a time (the others wait on the
    lock and then find the entry complete), and partial entries left by a killed builder are removed.
    ``wait`` is called when another process holds the lock, so a front end can say why it is waiting.
    """
    if complete(target):
        _clean_if_idle(target)
        return target
    with _locked(target, wait):
        if complete(target):
            return target
        remove_partials(target)
        try:
            workspace = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial.", dir=target.parent))
        except OSError as exc:
            raise CacheUnwritable(f"{target.parent}: cannot write the cache ({exc.strerror or exc})") from None
        try:
            out = workspace / target.name
            build(out)
            if target.exists() or target.is_symlink():  # an incomplete entry from an older Iris: nobody writes it
                _remove(target)
            os.rename(out, target)
        finally:
            shutil.rmtree(workspace, ignore_errors=True)
    return target


def partials_of(target: Path) -> list[Path]:
    """What unfinished builds of ``target`` left beside it (this version's and older Iris versions' names)."""
    if not target.parent.is_dir():
        return []
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(partial\..+|[a-z0-9_]{{8}})|{re.escape(target.name)}\.partial")
    return sorted(entry for entry in target.parent.iterdir() if pattern.fullmatch(entry.name) and entry.is_dir())


def remove_partials(target: Path) -> None:
    """Delete the leftovers of killed builds of ``target``; only call while holding its lock."""
    for partial in partials_of(target):
        _remove(partial)


@contextmanager
def _locked(target: Path, wait: Callable[[], None]) -> Iterator[None]:
    """Hold the exclusive lock of ``target`` (released by the kernel even if this process is killed)."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        lock = open(_lock_path(target), "a+b")  # closed by the with below
    except OSError as exc:
        raise CacheUnwritable(f"{target.parent}: cannot write the cache ({exc.strerror or exc})") from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            wait()
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _clean_if_idle(target: Path) -> None:
    """Remove leftovers beside a complete entry, if no process is building it right now."""
    if not partials_of(target):
        return
    try:
        lock = open(_lock_path(target), "a+b")  # closed by the with below
    except OSError:
        return  # a read-only cache: the leftovers cannot be removed, and the entry still loads
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return
        try:
            remove_partials(target)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _lock_path(target: Path) -> Path:
    return target.parent / f"{target.name}.lock"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
