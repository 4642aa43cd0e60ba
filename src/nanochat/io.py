"""Atomic file writes: a killed process leaves either the old file or the new one, never half of one.

The data goes to a temporary file beside the target, is flushed and fsync'ed, then renamed over the target
(rename is atomic within a file system) and the directory is fsync'ed so the rename survives a power cut too.
Leftover temporaries of a killed writer are named `.<name>.<random>.tmp`; `remove_partial` deletes them.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

TMP_SUFFIX = ".tmp"


@contextlib.contextmanager
def atomic_open(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file to write `path` through; it replaces `path` only if the block finishes without an error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)  # mkstemp's 0600 would hide reports and exports from other users
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write(path: str | Path, data: bytes | str) -> None:
    with atomic_open(path) as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)


def fsync_dir(directory: str | Path) -> None:
    """Make renames and deletions in `directory` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_partial(directory: str | Path) -> list[Path]:
    """Delete the temporaries a killed `atomic_open` left in `directory`; returns what was deleted."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    leftovers = [p for p in directory.glob(f".*{TMP_SUFFIX}") if p.is_file()]
    for p in leftovers:
        p.unlink(missing_ok=True)
    return leftovers
