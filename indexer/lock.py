"""One writer per index: `index`, `tag`, `tune` and `verify --repair` hold an exclusive lock on the folder.

Readers never take it. Without it, a second writer's start-up clean-up (vectors.truncate_uncommitted)
would cut rows the first one's encoder actors had written but not yet committed.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from alignsearch.errors import BadInputError
from alignsearch.storage.paths import LOCK_FILE, writer_running  # noqa: F401 - the probe readers use lives in the core


class WriterBusy(BadInputError):
    """Another process holds the writer lock (exit 6, as any BadInputError): `index --watch` waits and retries."""


@contextmanager
def writer_lock(index_dir: Path) -> Iterator[None]:
    """Held for the block; an index another process is writing is a clear error, not a wait."""
    fd = os.open(Path(index_dir) / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WriterBusy(f"another alignsearch process is writing {index_dir} (index, tag, tune or "
                                "verify --repair): run this again when it has finished") from None
        yield  # the lock goes with the descriptor, also when the process dies
    finally:
        os.close(fd)
