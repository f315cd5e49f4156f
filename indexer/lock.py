"""One writer per index: `index`, `tag`, `tune` and `verify --repair` hold an exclusive lock on the folder.

Readers never take it. Without it, a second writer's start-up clean-up (vectors.truncate_uncommitted)
would cut rows the first one's encoder actors had written but not yet committed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import secrets
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from alignsearch.errors import BadInputError, IndexDamagedError
from alignsearch.storage.paths import LOCK_FILE, writer_running  # noqa: F401 - the probe readers use lives in the core


log = logging.getLogger(__name__)

WATCH_LOCK = "watch.lock"  # held by the one `index --watch` of an index (the writer lock is held per run only)


class WriterBusy(BadInputError):
    """Another process holds the writer lock (exit 6, as any BadInputError): `index --watch` waits and retries."""


# Held while a process of this release takes write.lock or watch.lock (take_lock): only ever made 0600 by this
# release, so no other user has ever opened it, and a lock file another user holds is replaced in its turn alone.
LOCK_TURN = "locks.turn"


@contextmanager
def writer_lock(index_dir: Path) -> Iterator[tuple[int, int]]:
    """Held for the block; an index another process is writing is a clear error, not a wait. Yields the (st_dev,
    st_ino) of the folder whose lock file is held: the lock file is opened in that open folder, so what a run does
    to "its" folder by name later can be checked to be this one (privacy.keep_private)."""
    fd, held = take_lock(Path(index_dir), LOCK_FILE)
    if fd is None:
        raise WriterBusy(f"another alignsearch process is writing {index_dir} (index, tag, tune or "
                         "verify --repair): run this again when it has finished")
    try:
        from alignsearch.storage.layout import remove_killed_writes  # faiss: not for the light paths importing this

        # only the writer may: a write at work holds its temporary's flock, and none but a writer writes the folder
        remove_killed_writes(Path(index_dir), names=(LOCK_FILE, WATCH_LOCK))
        yield held.st_dev, held.st_ino  # the lock goes with the descriptor, also when the process dies
    finally:
        os.close(fd)


def take_lock(index_dir: Path, name: str) -> tuple[int | None, os.stat_result]:
    """An exclusive flock on the index's lock file `name` (write.lock, watch.lock), taken in the open index folder:
    (the descriptor holding it, or None where another process of this user's, or root's, holds it; the folder's
    stat). The caller closes the descriptor.

    A lock file an earlier release made 0644 is made 0600 at its next open here (open_lock_file), but whoever opened
    it before keeps it open: another user who held its flock refused every writer of this user's for ever. A lock
    held only by processes of other users (lock_holders, foreign_hold) is no writer of this index (a writer refuses
    an index folder not its own): the file is replaced by a fresh 0600 one, locked before it is renamed into place,
    and the other user keeps a lock on a file no longer at the name. Two writers of this user's: a replacement and
    every taking of the lock happen in LOCK_TURN's turn, so no replacement renames over a file another writer has
    just locked (it finds that writer holding it, this user's), and no writer locks the file being replaced. An
    earlier release's writer takes no turn: one that opened the old file before the rename and locks it once the
    other user lets it go, in that instant, is the one case not excluded."""
    folder = os.open(index_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        held = os.fstat(folder)
        with _lock_turn(index_dir, folder) as turn:
            fd = open_lock_file(index_dir / name, dir_fd=folder)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if turn or _still_at(fd, folder, name):
                    return fd, held
            except BlockingIOError:
                pass
            try:
                why = turn and foreign_hold(fd)
            finally:
                os.close(fd)
            if not why:
                return None, held
            log.warning("note: %s was held by %s, who opened it while an earlier release left it readable by all: "
                        "replaced by a fresh lock file only you can open", index_dir / name, why)
            return _fresh_lock(folder, name), held
    finally:
        os.close(folder)


# How long a taking of a lock file waits for LOCK_TURN: another process holds it for a few system calls, so only
# one stopped while holding it (SIGSTOP, a debugger) makes one wait this long; then the lock is taken without it.
TURN_WAIT = 10.0


@contextmanager
def _lock_turn(index_dir: Path, folder: int) -> Iterator[bool]:
    """LOCK_TURN's flock, held for the block; whether it is had. Not had (no lock file is then replaced): a folder
    where it cannot be made (this user may not write it: nor replace a lock file there), one not this user's
    alone (made by another user, as root's run in this user's index would), or held past TURN_WAIT."""
    try:
        fd = open_lock_file(index_dir / LOCK_TURN, dir_fd=folder)
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        yield False
        return
    try:
        st = os.fstat(fd)
        yield st.st_uid == os.geteuid() and not st.st_mode & 0o077 and _flock_within(fd, TURN_WAIT)
    finally:
        os.close(fd)


def _flock_within(fd: int, wait: float) -> bool:
    """An exclusive flock on fd, tried until `wait` seconds have passed: whether it is had."""
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)


def _still_at(fd: int, folder: int, name: str) -> bool:
    """Whether fd's file is the one at `name` in folder (a lock taken without the turn: not replaced meanwhile)."""
    try:
        at, st = os.stat(name, dir_fd=folder, follow_symlinks=False), os.fstat(fd)
    except OSError:
        return False
    return (at.st_dev, at.st_ino) == (st.st_dev, st.st_ino)


def _fresh_lock(folder: int, name: str) -> int:
    """A new 0600 lock file renamed over `name` in folder, locked before it is at the name: its descriptor."""
    tmp = f".{name}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=folder)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(tmp, name, src_dir_fd=folder, dst_dir_fd=folder)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=folder)
        raise
    return fd


def lock_holders(locks: str, dev: int, ino: int) -> list[int]:
    """The process ids /proc/locks (its text, `locks`) gives as holding an flock on the file (dev, ino): not those
    waiting for one ("->" lines). A line reads `N: FLOCK ADVISORY WRITE PID MAJ:MIN:INODE START END`."""
    key = f"{os.major(dev):02x}:{os.minor(dev):02x}:{ino}"
    out = []
    for line in locks.splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == key:
            with contextlib.suppress(ValueError):
                out.append(int(fields[4]))
    return out


def foreign_hold(fd: int) -> str | None:
    """Who holds the flock on fd's file, in words, where it is only processes of other users (root and this user
    excepted); None where it is, or may be, a process of this user's or root's, or cannot be told. A holder gone
    (the process that took it ended, a child it made keeps the file open) counts as this user's while any process
    of this user's has the file open."""
    st = os.fstat(fd)
    try:
        with open("/proc/locks") as f:
            pids = lock_holders(f.read(), st.st_dev, st.st_ino)
    except OSError:
        return None
    if not pids:
        return None
    for pid in pids:
        uid = _process_uid(pid)
        # None: a number that names no process here (another pid namespace's, a remote lock): it may be a writer
        # of this user's, and replacing the file under it let two writers run at once
        if uid is None or uid in (os.geteuid(), 0) or (uid is _GONE and _open_here(st, fd)):
            return None
    return f"process {pids[0]} of another user"


_GONE = object()  # _process_uid: no such process
_OTHER = -1  # _process_uid: another user's, whose /proc entry is hidden (hidepid)


def _process_uid(pid: int):
    """The uid of process pid: its /proc entry's owner; _OTHER where that is hidden but the process is there and not
    this user's (kill: EPERM), _GONE where it is not there, None where the number is none (0, -1: another pid
    namespace's, an open file description's lock)."""
    if pid <= 0:
        return None
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return _GONE
    except PermissionError:
        return _OTHER
    return os.geteuid()


def _open_here(st: os.stat_result, own: int) -> bool:
    """Whether any process this user may look into holds the file `st` open (other than this one's descriptor own)."""
    me = str(os.getpid())
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            for fd in os.listdir(f"/proc/{entry.name}/fd"):
                if entry.name == me and fd == str(own):
                    continue
                seen = os.stat(f"/proc/{entry.name}/fd/{fd}")
                if (seen.st_dev, seen.st_ino) == (st.st_dev, st.st_ino):
                    return True
        except OSError:
            continue
    return False


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
