"""Replacing a file atomically: written beside it under a temporary name, fsync'ed, renamed over it.

A reader sees the old file or the new one, never half of one; a crash leaves the old one (and at most a
stray temporary file). The one helper for every file alignsearch replaces: the ANN index, the shard
manifest, thumbnails, the server record, an emptied vector file.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def replacing(path: str | os.PathLike, mode: int = 0o644, durable: bool = True) -> Iterator[Path]:
    """Yields a temporary path beside `path` to write; when the block ends without an error, the file is
    fsync'ed and renamed over `path` (and the folder fsync'ed, so the rename survives a power cut). On an
    error it is removed and `path` is untouched. The file has `mode` from the start (mkstemp creates it
    0600), so a secret written with mode 0o600 is never readable by others. durable=False skips the
    fsyncs (a cache that may be lost, such as thumbnails)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        if mode != 0o600:
            os.chmod(tmp, mode)
        yield Path(tmp)
        if durable:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def write_bytes(path: str | os.PathLike, data: bytes, mode: int = 0o644, durable: bool = True) -> None:
    with replacing(path, mode, durable) as tmp:
        tmp.write_bytes(data)


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a folder's entries (a new or renamed file) durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
