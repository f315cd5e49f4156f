"""One writer per index: `index`, `tag`, `tune` and `verify --repair` hold an exclusive lock on the folder.

Readers never take it. Without it, a second writer's start-up clean-up (vectors.truncate_uncommitted)
would cut rows the first one's encoder actors had written but not yet committed.
"""

from __future__ import annotations

import errno
import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from alignsearch.errors import BadInputError, IndexDamagedError
from alignsearch.storage.paths import LOCK_FILE, writer_running  # noqa: F401 - the probe readers use lives in the core


WATCH_LOCK = "watch.lock"  # held by the one `index --watch` of an index (the writer lock is held per run only)


class WriterBusy(BadInputError):
    """Another process holds the writer lock (exit 6, as any BadInputError): `index --watch` waits and retries."""


@contextmanager
def writer_lock(index_dir: Path) -> Iterator[tuple[int, int]]:
    """Held for the block; an index another process is writing is a clear error, not a wait. Yields the (st_dev,
    st_ino) of the folder whose lock file is held: the lock file is opened in that open folder, so what a run does
    to "its" folder by name later can be checked to be this one (privacy.keep_private)."""
    folder = os.open(index_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        held = os.fstat(folder)
        fd = open_lock_file(Path(index_dir) / LOCK_FILE, dir_fd=folder)
    finally:
        os.close(folder)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WriterBusy(f"another alignsearch process is writing {index_dir} (index, tag, tune or "
                                "verify --repair): run this again when it has finished") from None
        yield held.st_dev, held.st_ino  # the lock goes with the descriptor, also when the process dies
    finally:
        os.close(fd)


def open_lock_file(path: Path, dir_fd: int | None = None) -> int:
    """The one way a lock file of the index (write.lock, watch.lock) is opened: created if need be, never through
    a symbolic link. One planted there (by anyone who can write the folder) made every writer create the file it
    names, or lock a file of another program's; O_NONBLOCK: a FIFO there opens at once. Anything a lock cannot
    be taken on is IndexDamagedError (exit 7), nothing changed. The caller closes the descriptor. dir_fd: an open
    folder the file is opened in (by path's name alone), as os.open's.
    Mode 0600, and one this user made readable by others (0644, as every release before this one made it) is made
    0600: flock needs only read access, so another user who could open it held it for ever, and every `index`,
    `tag`, `tune` and `index --watch` of this user's index was refused as "another alignsearch process is writing"."""
    try:
        fd = os.open(path if dir_fd is None else path.name,
                     os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
            raise
        raise IndexDamagedError(f"{path} is {lock_trouble(path)}, not the lock file alignsearch makes: nothing was "
                                "changed; remove it and run again") from None
    try:
        st = os.fstat(fd)
        if st.st_uid == os.geteuid() and st.st_mode & 0o077:
            os.fchmod(fd, 0o600)  # who opened it before keeps it open (and may hold it): they cannot open it again
    except OSError:
        pass  # a filesystem without modes (vfat) has no other users' opens to keep out either
    return fd


def lock_trouble(path: Path) -> str | None:
    """What is at the lock file's place that no writer may lock (a symbolic link, a folder, a socket), in words;
    None for a file a writer can lock (or nothing there)."""
    import stat

    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISDIR(mode):
        return "a folder"
    return None if stat.S_ISREG(mode) or stat.S_ISFIFO(mode) else "a socket or device"
