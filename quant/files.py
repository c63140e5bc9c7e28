"""Files the converter and the runtime share: the gates for names and JSON that come from
outside, atomic writes, and an exclusive lock on a directory.

(Here, in `quant`, because the runtime may import `quant` and not the other way round.)
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import QuantError

LOCK = ".localmix.lock"


def is_plain_name(name: object) -> bool:
    """True for a file name that stays directly inside any directory it is joined to: a
    non-empty string without path separators, not `.` or `..`, without control characters."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and not any(c in name for c in "/\\")
        and all(ord(c) >= 32 for c in name)
    )


def read_json(path: Path) -> object:
    """A JSON file's value, or a QuantError naming the file (unreadable, not UTF-8, not JSON,
    nested too deep)."""
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError as e:
        raise QuantError(f"{path}: file not found") from e
    except OSError as e:
        raise QuantError(f"{path}: cannot read it ({e.strerror or e})") from e
    except UnicodeDecodeError as e:
        raise QuantError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    except ValueError as e:
        raise QuantError(f"{path}: not valid JSON ({e})") from e
    except RecursionError as e:
        raise QuantError(f"{path}: not valid JSON (nested too deep)") from e


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """`write(tmp)` into a temporary file beside `path`, then rename it to `path`: a reader sees
    the old file or the new one, never half of one. The temporary file never outlives a failure;
    a full disk or an unwritable directory becomes a one-line QuantError."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            if e.errno == errno.ENOSPC:
                raise QuantError(
                    f"disk full while writing {path}; free some space and run the same command "
                    "again: finished work is kept"
                ) from e
            raise QuantError(f"cannot write {path} ({e.strerror or e})") from e
        raise


def write_json(path: Path, data: object) -> None:
    """`data` as JSON at `path`, atomically."""
    text = json.dumps(data, indent=1)
    write_atomic(path, lambda tmp: tmp.write_text(text))


@contextmanager
def exclusive(folder: Path, waiting: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold the lock of `folder` (created if missing): one writer at a time. A second one waits
    for the first (`waiting()` is called once if it has to), then goes on with what the first
    left. The lock file is removed by the holder when it is done."""
    path = folder / LOCK
    try:
        folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    if waiting:
                        waiting()
                        waiting = None
                    fcntl.flock(fd, fcntl.LOCK_EX)
                if _same_file(fd, path):  # not a lock file its last holder already removed
                    break
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
    except OSError as e:
        raise QuantError(f"cannot lock {folder} ({e.strerror or e})") from e
    try:
        yield
    finally:
        if folder.exists():
            path.unlink(missing_ok=True)
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def free_space(path: Path) -> tuple[Path, int]:
    """Where `path` will be written (the nearest folder at or above it that exists) and the
    bytes free on that disk."""
    probe = path
    while not probe.exists():
        probe = probe.parent
    return probe, shutil.disk_usage(probe).free
