"""Every file this project writes goes through here: complete or not at all.

`atomic_path(path)` hands out a temporary name in the destination folder; when the block ends
without an error the file is flushed to disk and renamed over `path` (a rename within one folder is
atomic), otherwise it is removed. A reader, a crash or a full disk therefore never sees a truncated
file, and an existing good file is replaced only by a complete new one. The temporary file is
created with the process's umask (teammates can read a shared run, as with any other file).
"""

from __future__ import annotations

import itertools
import json
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Callable, Iterator

_counter = itertools.count()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success fsync it and rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{next(_counter)}")
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # whatever wrote it (some libraries create files 0600)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)  # the rename itself reaches the disk
    finally:
        tmp.unlink(missing_ok=True)


def fsync_dir(folder: str | os.PathLike) -> None:
    """Flush a folder's entries (renames, new files) to disk, where the platform allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a folder
        pass
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call `write(file)` on a binary file that becomes `path` only when `write` returns."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def _finite_or_none(data):
    """A copy of nested dicts/lists with every NaN or infinite float replaced by None (JSON has neither)."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: _finite_or_none(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_finite_or_none(v) for v in data]
    return data


def write_json(path: str | os.PathLike, data) -> Path:
    """`data` as indented, strictly valid JSON (NaN and infinities written as null)."""
    return write_text(path, json.dumps(_finite_or_none(data), indent=1, allow_nan=False) + "\n")


def expand_path(path: str | os.PathLike) -> str:
    """`~` and `$VARS` expanded, then absolute (relative to the current folder)."""
    return os.path.abspath(os.path.expanduser(os.path.expandvars(os.fspath(path))))
