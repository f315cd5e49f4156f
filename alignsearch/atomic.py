"""Writing files and folders atomically: written beside the target under a fresh name, fsync'ed, renamed over it.

The one way alignsearch writes what it keeps or hands over (README, "How it works"): the ANN index, the shard
manifest, thumbnails, the server record, an emptied vector file, the ONNX cache, `export` (both layouts) and
`finetune`'s model folders.

- A reader sees the old file (folder) or the new one, never half of one; a crash or an error leaves the old
  one, and an error removes what was written.
- The temporary name is made by mkstemp / mkdtemp (O_EXCL, random) in the target's folder: never a fixed
  `OUT.tmp` that another user could plant a symlink at, and never a sibling the user owns (`DIR.old`,
  `DIR.tmp`) that it would overwrite or delete.
- The file written has the umask's modes and never gives the group or others more than the file it replaces
  (file_mode): an export its owner made 0600 stays 0600.
- While a write is in progress, up to its rename, its temporary file or folder is locked (flock): what a killed writer left is
  told from a write at work by taking that lock, and remove_stale deletes only the former.
- A folder is swapped whole (renameat2 RENAME_EXCHANGE where the kernel has it), and what the old one held
  besides what the writer superseded (the user's own files, a checkpoint written separately) is moved into
  the new one, not deleted.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import logging
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger(__name__)


def file_mode(requested: int, umask: int, replaced: int | None) -> int:
    """The permission bits of a file written in place of one with bits `replaced` (None: there is none): those
    `requested`, less what the umask takes from the group and others, less what the replaced file denied them.
    A fixed 0644 made `export lib.parquet` (and index.faiss beside a 0600 catalog) readable by every user under
    umask 077, and a re-export of a file its owner had made 0600. The owner's bits are kept whatever the umask:
    a writer given the temporary path (FAISS, the ONNX exporter) opens it by name to write it."""
    others = requested & ~umask & 0o077
    if replaced is not None:
        others &= replaced
    return (requested & 0o700) | others


NAME_BYTES = 200  # of the target's name kept in a temporary's: its `.` + `.XXXXXXXX.tmp` fit in 255 bytes beside it
_RANDOM = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_")  # of the 8 characters mkstemp / mkdtemp add
SUFFIXES = ("tmp", "new", "old")


def temp_prefix(path: Path) -> str:
    """`.NAME.`, the start of every temporary this module makes for `path` (and all remove_stale looks for).
    A name over NAME_BYTES bytes is cut on a character boundary and a digest of the whole name added,
    `.CUT~DIGEST.`: the whole name made the temporary's longer than the filesystem's limit (255 bytes) for a
    target whose own name is valid (`export` of a 245-byte name failed "File name too long"), and the cut
    alone named two long names alike (a sweep for one removed and named the other's leftovers). Names of
    NAME_BYTES bytes or fewer are kept whole, as earlier versions named them."""
    whole = os.fsencode(path.name)  # surrogateescape: a byte the name's encoding could not decode is that byte
    if len(whole) <= NAME_BYTES:
        return f".{path.name}."
    kept, size = [], 0
    for ch in path.name:
        size += len(os.fsencode(ch))
        if size > NAME_BYTES - 9:  # room for `~` and the digest
            break
        kept.append(ch)
    return f".{''.join(kept)}~{hashlib.sha256(whole).hexdigest()[:8]}."


def is_temporary(name: str, prefix: str | None) -> bool:
    """Whether `name` is one this module gives a temporary: `prefix`, then mkstemp's 8 random characters, then
    `.tmp`, `.new` or `.old` (prefix None: any target's `.NAME.`). A name merely starting with the prefix was
    taken for one: `export lib` deleted the user's own `.lib.backup.tmp` and `.lib.notes.new/` folder (unchanged
    for a minute), and swept and named the leftovers of `lib.parquet` (`.lib.parquet.XXXXXXXX.tmp`) as its own."""
    stem, dot, suffix = name.rpartition(".")
    head, random = stem[:-8], stem[-8:]
    if not dot or suffix not in SUFFIXES or len(random) != 8 or not set(random) <= _RANDOM:
        return False
    if prefix is None:
        return len(head) > 2 and head.startswith(".") and head.endswith(".")
    return head == prefix


def follow_umask(path: Path) -> None:
    """Give a file a library made with modes of its own the umask's, as open() gives a new file: safetensors
    writes 0600, so `finetune`'s model.safetensors alone could not be read by the group the rest of its
    output folder is readable by (a model fine-tuned for a team)."""
    os.chmod(path, file_mode(0o666, _umask(), None), follow_symlinks=False)


def _temp_file(path: Path, mode: int) -> tuple[int, str, int]:
    """A fresh temporary file beside path, 0600 and locked (flock) while its descriptor is open; and the mode it gets
    when it is put in place (_commit)."""
    try:  # one lstat for both questions (every write, each thumbnail, asked three times)
        st = os.lstat(path)
    except OSError:
        st = None
    if st is not None and stat.S_ISDIR(st.st_mode):  # a folder, not a link to one: os.replace would fail only
        raise IsADirectoryError(errno.EISDIR, "is a folder", str(path))  # after all the writing
    replaced = stat.S_IMODE(st.st_mode) if st is not None and stat.S_ISREG(st.st_mode) else None
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent)
    fcntl.flock(fd, fcntl.LOCK_EX)  # held while fd is open: this write is at work (remove_stale)
    # mkstemp makes it 0600, and it stays 0600 until _commit: a secret written with mode 0o600 is never readable by
    # others, and no other user can open the temporary to hold its lock (flock needs only read access): made 0644 here,
    # one left by a writer killed mid-way could be locked by another user for ever, and remove_stale never removed it
    return fd, tmp, file_mode(mode, _umask(), replaced)


def _commit(tmp: str, path: Path, durable: bool, mode: int, fd: int | None = None) -> None:
    """Give the temporary its mode and put it in place. fd: the file written (writing), else the file at tmp now (a
    writer given the path, replacing, may have replaced the one made), never through a symbolic link: chmod by name
    followed one that another user who may rename entries of the folder (a group's shared folder) put at tmp, and
    made the file it named, any file of this user's, readable by all (ELOOP now: the write fails, nothing chmod'ed)."""
    if fd is not None:
        os.fchmod(fd, mode)
    else:
        held = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            os.fchmod(held, mode)
        finally:
            os.close(held)
    os.replace(tmp, path)
    if durable:
        fsync_dir(path.parent)


@contextmanager
def replacing(path: str | os.PathLike, mode: int = 0o644, durable: bool = True) -> Iterator[Path]:
    """Yields a temporary path beside `path` for a writer that takes a path (FAISS, the ONNX exporter);
    when the block ends without an error, the file is fsync'ed and renamed over `path` (and the folder
    fsync'ed, so the rename survives a power cut). On an error it is removed and `path` is untouched.
    durable=False skips the fsyncs (a cache that may be lost, such as thumbnails)."""
    path = Path(path)
    fd, tmp, final = _temp_file(path, mode)
    try:
        yield Path(tmp)
        if durable:
            with open(tmp, "rb") as f:  # the file at tmp now: a writer may have replaced the one made here
                os.fsync(f.fileno())
        _commit(tmp, path, durable, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)  # kept open until here: its lock says the write is at work


class FolderChanged(OSError):
    """The folder a write goes to is not the one its caller checked (writing's `folder`)."""


@contextmanager
def writing(path: str | os.PathLike, mode: int = 0o644, durable: bool = True,
            folder: tuple[int, int] | None = None) -> Iterator[BinaryIO]:
    """As replacing, but yields the temporary file open for writing (the descriptor mkstemp created: the
    name is never opened again, so nothing planted under it can be written through). folder: the (st_dev, st_ino)
    of path's folder when the caller checked it (export: not inside an index folder); the folder is opened once
    and must be that one (else FolderChanged, nothing written), and the temporary is made and renamed within the
    folder opened, never through its name again: a user who may write the folder's parent swapped it for a link to
    the index folder between the check and the rename, and `export DIR/catalog.db` replaced the index's catalog."""
    with _opened_folder(Path(path), folder) as (path, still):
        yield from _writing(path, mode, durable, still)


FD_FOLDER = "/proc/self/fd"  # where Linux shows this process's open descriptors as links (absent: no /proc mounted)


def _unchecked() -> None:
    """A write with no folder to check (writing's folder None)."""


@contextmanager
def _opened_folder(path: Path, folder: tuple[int, int] | None) -> Iterator[tuple[Path, Callable[[], None]]]:
    """(the path to write, what to call just before the rename). folder None: path, nothing. Else path's name
    within its folder opened once and checked: FD_FOLDER/N/NAME, which the kernel resolves through the open
    descriptor, not by the folder's name. Without /proc the name is all there is: the folder is looked up by it
    again just before the rename, FolderChanged if it is another by then (a swap in that last instant is not seen)."""
    if folder is None:
        yield path, _unchecked
        return
    held = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        st = os.fstat(held)
        if (st.st_dev, st.st_ino) != tuple(folder):
            raise FolderChanged(errno.ESTALE, "its folder was replaced since it was checked", str(path.parent))
        through = Path(FD_FOLDER) / str(held)
        if through.is_dir():
            yield through / path.name, _unchecked
        else:
            # checked only once, no /proc: a swap just after the check, as the temporary was made, had it made and
            # renamed by name in the folder the link named (over its file); a later swap failed the rename with a
            # FileNotFoundError naming the temporary
            yield path, lambda: _still_folder(path.parent, folder)
    finally:
        os.close(held)


def _still_folder(parent: Path, folder: tuple[int, int]) -> None:
    st = os.stat(parent)
    if (st.st_dev, st.st_ino) != tuple(folder):
        raise FolderChanged(errno.ESTALE, "its folder was replaced during the write", str(parent))


def _writing(path: Path, mode: int, durable: bool, still: Callable[[], None] = _unchecked) -> Iterator[BinaryIO]:
    fd, tmp, final = _temp_file(path, mode)
    try:
        # closefd=False: closing f closed fd, and its lock with it, before the rename; a remove_stale in between
        # (the next `export` of OUT, after a last write over STALE_AFTER ago and a slow fsync) took the
        # temporary for a killed write's and deleted it, and the rename failed: the whole write lost
        with os.fdopen(fd, "w+b", closefd=False) as f:
            yield f
            f.flush()
            if durable:
                os.fsync(f.fileno())
        still()
        _commit(tmp, path, durable, final, fd)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)  # as replacing's: its lock says the write is at work until the file is in place


def write_bytes(path: str | os.PathLike, data: bytes, mode: int = 0o644, durable: bool = True) -> None:
    with writing(path, mode, durable) as f:
        f.write(data)


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a folder's entries (a new or renamed file) durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def replacing_dir(path: str | os.PathLike, superseded: Callable[[Path], Iterable[str]] = lambda old: (),
                  durable: bool = True, allowed: int = 0o777, folder: tuple[int, int] | None = None) -> Iterator[Path]:
    """Yields a fresh empty folder (mkdtemp) beside `path` to fill; when the block ends without an error it
    takes `path`'s place in one rename, with the mode of the folder it replaces (else the umask's).

    Of the folder replaced, the entries the new one also has and those `superseded(old folder)` names (what
    the previous write made: stale shards, model files of another layout) are deleted; every other entry (the
    user's own files, a checkpoint folder written by another call) is moved into the new folder. On an error
    the new folder is removed and `path` is untouched. A symlink at `path` is followed (its target is
    replaced), so the link stays as the user made it. allowed: the group's and others' bits it may have at most
    (an export of a private index: 0700), whatever the folder replaced or the umask would give. folder: as
    writing's, the (st_dev, st_ino) of path's folder (the link followed) when the caller checked it: the clip-retrieval
    export's folder swapped for a link to the index folder after its check wrote its layout into the index folder."""
    path = Path(os.path.realpath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    with _opened_folder(path, folder) as (through, still):
        yield from _replacing_dir(through, superseded, durable, allowed, still, named=path)


def _replacing_dir(path: Path, superseded: Callable[[Path], Iterable[str]], durable: bool,
                   allowed: int, still: Callable[[], None], named: Path) -> Iterator[Path]:
    """replacing_dir's work on path (FD_FOLDER/N/NAME where its folder is held open); named: path by its name, for
    what an error says (a /proc/self/fd path means nothing once this process has exited)."""
    new = Path(tempfile.mkdtemp(prefix=temp_prefix(path), suffix=".new", dir=path.parent))
    held = os.open(new, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(held, fcntl.LOCK_EX)  # this write is at work (remove_stale), until the swap is done
    try:
        yield new
        try:
            mode = os.stat(path).st_mode & 0o7777
        except FileNotFoundError:
            mode = 0o777 & ~_umask()  # mkdtemp's 0700 otherwise
        mode &= allowed | ~0o077
        if durable:
            _fsync_tree(new)
        still()
        old = _swap(new, path)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        os.close(held)
        raise
    try:
        # given its mode only once in place, through its descriptor: a `.new` (or `.old`) a killed swap left stays
        # 0700, so no other user can open it and hold the lock that keeps it from remove_stale (it was made 0755
        # first, and another user who held a killed export's lock kept it, as large as the export, for ever)
        os.fchmod(held, mode)
    finally:
        os.close(held)
    if old is not None:
        _carry_over(old, path, set(superseded(old)), named)
    if durable:
        fsync_dir(path.parent)


class SharedTempError(PermissionError):
    """scratch's temporary folder is one where other users may rename entries."""


@contextmanager
def scratch(name: str) -> Iterator[Path]:
    """A fresh private (0700) folder in the temporary folder, `.NAME.XXXX.new`, removed when the block ends:
    for work that must not write its input (verify's copy of the keyword tables). Locked while in use, so
    what a killed user left is told from one at work and removed by the next use (remove_stale): a
    TemporaryDirectory killed mid-way kept its copy of every caption, text read and path there for good.
    SharedTempError where other users may rename entries of the temporary folder (_others_may_rename)."""
    place = Path(tempfile.gettempdir()) / name
    if _others_may_rename(os.stat(place.parent)):
        # there another user may rename this folder away and put theirs (the copy then written where they read
        # it) or one of this user's own folders (emptied by the rmtree below) under its name mid-use
        raise SharedTempError(errno.EPERM, "other users may rename what is in it (another user's, or writable "
                              "by its group or everyone without the sticky bit): set TMPDIR to a folder only you "
                              "can write", str(place.parent))
    remove_stale(place, writer="a use")
    folder = Path(tempfile.mkdtemp(prefix=temp_prefix(place), suffix=".new", dir=place.parent))
    held = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(held, fcntl.LOCK_EX)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        os.close(held)


STALE_AFTER = 60.0  # seconds: younger temporaries are left alone (between mkstemp and its lock, a write holds none)


def remove_stale(path: str | os.PathLike, min_age: float = STALE_AFTER, *, writer: str = "a write") -> int:
    """Delete what writes of `path` killed mid-way left beside it (`.NAME.XXXX.tmp` files, `.NAME.XXXX.new`
    folders: a killed export's can be the size of the export), and return how many. Only this user's, not a
    link, not changed for min_age seconds, and only while no write holds its lock (a write at work, in this
    or another process, keeps it). `.NAME.XXXX.old` folders are never deleted: a swap cut short leaves the
    user's previous folder there, or the new copy; each is named in a warning (_report_swap_left). Nothing in a folder where another user may rename entries (an attacker's
    rename of this user's folder to such a name would have this user delete it). `writer` names the writes
    in the log line said for each ("an export": "removed X, left by an export of OUT killed mid-way")."""
    path = Path(os.path.realpath(path))
    return _sweep(path.parent, temp_prefix(path), min_age, f"{writer} of {path.name}")


def remove_stale_in(folder: str | os.PathLike, min_age: float = STALE_AFTER) -> int:
    """As remove_stale, for the writes of every file in `folder` (`.*.tmp`, `.*.new`): for a folder whose
    files only this tool writes, each under a name not known beforehand (the ONNX cache and its records)."""
    folder = Path(os.path.realpath(folder))
    return _sweep(folder, None, min_age, f"a write in {folder}")


def remove_stale_of(folder: str | os.PathLike, targets: Callable[[str], bool], min_age: float = STALE_AFTER, *,
                    writer: str = "a write") -> int:
    """As remove_stale, for the writes of each file in `folder` whose name `targets` accepts (the NAME of
    `.NAME.XXXXXXXX.tmp`): for a folder that may hold others' files beside this tool's, such as an index folder
    made inside one of the user's (their own `.notes.txt.a1b2c3d4.tmp` is no leftover of ours)."""
    folder = Path(os.path.realpath(folder))
    return _sweep(folder, None, min_age, f"{writer} in {folder}", targets)


def target_of(temporary: str) -> str:
    """The name of the file a temporary (is_temporary, a name of 255 bytes or fewer) was written for: NAME of
    `.NAME.XXXXXXXX.tmp`."""
    return temporary.rpartition(".")[0][1:-9]


def _sweep(parent: Path, prefix: str | None, min_age: float, writes: str,
           targets: Callable[[str], bool] | None = None) -> int:
    """remove_stale's rule on the entries of `parent` named as temporaries of `prefix` (is_temporary) and, given
    `targets`, written for a name it accepts; `writes` names whose leftovers they are, in the log."""
    removed = 0
    try:
        if _others_may_rename(os.stat(parent)):
            return 0  # there a leftover's name is not this user's word: anyone may rename an entry to it
        entries = [e for e in os.scandir(parent)
                   if is_temporary(e.name, prefix) and (targets is None or targets(target_of(e.name)))]
    except OSError:
        return 0
    for entry in entries:
        try:
            st = entry.stat(follow_symlinks=False)
            folder = stat.S_ISDIR(st.st_mode)
            if entry.name.endswith(".old"):
                _report_swap_left(entry, st, min_age, writes)
                continue
            if st.st_uid != os.geteuid() or time.time() - st.st_mtime < min_age or not (folder or stat.S_ISREG(st.st_mode)):
                continue
            fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | (os.O_DIRECTORY if folder else os.O_NONBLOCK))
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a write at work
            if os.fstat(fd).st_ino != os.lstat(entry.path).st_ino:
                continue  # replaced since it was looked at
            if folder:
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed += 1
            log.info("removed %s, left by %s killed mid-way", entry.name, writes)  # an error removes its own
        except OSError:
            continue
        finally:
            os.close(fd)
    return removed


_REPORTED: set[str] = set()  # the `.old` folders _report_swap_left has named in this process


def _report_swap_left(entry: os.DirEntry, st: os.stat_result, min_age: float, writes: str) -> None:
    """Say where a folder swap killed mid-way left a `.old` folder: killed after the exchange it is the
    folder replaced, holding the user's own files not yet moved into the new one; killed just before, the
    new copy. Which one cannot be told from here, and the former may hold the only copy of the user's files:
    it is never deleted, but said once each run until the user moves what they want and deletes it (it was
    left unsaid, for good). Not while a swap may be at work: own, a folder, unchanged (ctime: a rename sets
    it, not the mtime) for min_age, and not locked, where a lock is this user's word (lock_is_own)."""
    if (entry.path in _REPORTED or st.st_uid != os.geteuid() or not stat.S_ISDIR(st.st_mode)
            or time.time() - max(st.st_mtime, st.st_ctime) < min_age):
        return
    if not lock_is_own(st.st_mode):
        _warn_swap_left(entry.path, writes)  # a lock there may be anyone's, and says nothing (the age does)
        return
    try:
        fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_DIRECTORY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return  # the new copy of a swap at work
    finally:
        os.close(fd)
    _warn_swap_left(entry.path, writes)


def _warn_swap_left(path: str, writes: str) -> None:
    _REPORTED.add(path)  # finetune sweeps beside its checkpoint each epoch: one warning a run, not each
    log.warning("warning: %s was left by %s killed mid-swap: the folder replaced (with any files of your own it "
                "held) or the unfinished new one; move what you want from it, then delete it", path, writes)


def lock_is_own(mode: int) -> bool:
    """Whether an flock on a file or folder of this user's with this mode can only be this user's (or root's): no
    group or other bits, so no other user can open it (flock needs no more than an open for reading). A `.old`
    folder has the mode of the folder swapped (0755 for most): another user could open one left by a killed swap
    and hold a shared lock on it for ever, and it was taken for a swap at work and never named."""
    return stat.S_IMODE(mode) & 0o077 == 0


def _others_may_rename(folder: os.stat_result) -> bool:
    """Whether a user besides this one (and root) may rename the entries of a folder: its owner, or its group
    or everyone where it is writable by them and not sticky."""
    if folder.st_uid not in (0, os.geteuid()):
        return True
    return bool(folder.st_mode & (stat.S_IWGRP | stat.S_IWOTH)) and not folder.st_mode & stat.S_ISVTX


def make_folders(folder: str | os.PathLike, mode: int = 0o755) -> None:
    """Create folder and any missing parents (mkdir -p) with `mode` less the umask: never writable by the group or
    others where mode is not, whatever the umask. A folder alignsearch keeps is refused when others may write it
    (paths.untrusted_index, backend.cache_untrusted): under umask 000 `index` made its folder 0777 and then refused
    the index it had just made ("is writable by every user"), and every command after it."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(errno.EEXIST, "not a folder", str(folder))  # as mkdir(exist_ok=True) says
    missing = []
    for p in (folder, *folder.parents):
        if p.exists():
            break
        missing.append(p)
    for p in reversed(missing):
        try:
            os.mkdir(p, mode)
        except FileExistsError:  # another process made it meanwhile
            if not p.is_dir():
                raise


def _umask() -> int:
    """The process's umask, read where Linux shows it: setting it to read it (os.umask) left another thread's
    file made meanwhile (the server writes thumbnails from several) with the wrong modes."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # a kernel before 4.7, or no /proc
    os.umask(mask)
    return mask


def _fsync_tree(folder: Path) -> None:
    for where, _dirs, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(where, name), os.O_RDONLY | os.O_NOFOLLOW)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(where)


_RENAME_EXCHANGE, _AT_FDCWD = 2, -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (renameat2 RENAME_EXCHANGE); False where the C library, the kernel or the
    filesystem has no such call."""
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _swap(new: Path, path: Path) -> Path | None:
    """Put folder `new` at `path`; returns where the folder that was there now is (None: there was none)."""
    if not os.path.lexists(path):
        try:
            os.rename(new, path)
            return None
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):  # else one appeared meanwhile: swap with it
                raise
    if not path.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "not a folder", str(path))
    if not any(os.scandir(path)):  # nothing to lose: fill it in place (it may be a mount point or someone's cwd)
        for entry in os.listdir(new):
            os.rename(new / entry, path / entry)
        os.rmdir(new)
        return None
    # exchanged from a `.old` name (rename replaces an empty folder), so the old folder lands under one: until
    # _carry_over is done it holds the user's own files, and remove_stale takes an unlocked `.new` for a
    # killed write's leftover (a kill between the exchange and the move deleted them on the next run)
    aside = Path(tempfile.mkdtemp(prefix=temp_prefix(path), suffix=".old", dir=path.parent))
    os.rename(new, aside)
    try:
        if _exchange(aside, path):
            return aside
    except BaseException:
        os.rename(aside, new)
        raise
    os.rename(aside, new)
    # no exchange: move the old folder aside first, onto an empty folder of a fresh name (rename replaces
    # an empty folder), so it is never deleted nor renamed over anything of the user's
    old = Path(tempfile.mkdtemp(prefix=temp_prefix(path), suffix=".old", dir=path.parent))
    os.rename(path, old)
    try:
        os.rename(new, path)
    except BaseException:
        os.rename(old, path)
        raise
    return old


def _carry_over(old: Path, path: Path, superseded: set[str], named: Path | None = None) -> None:
    """Move the entries of the replaced folder `old` that the new one neither has nor supersedes into it,
    then delete `old` (now only what was replaced). If a move fails, `old` is kept and named in the error."""
    try:
        for entry in os.listdir(old):
            if entry not in superseded and not os.path.lexists(path / entry):
                os.rename(old / entry, path / entry)
    except OSError as exc:
        named = named or path
        kept = named.parent / old.name
        # the entry that failed, named through the folder's name too (exc.filename may be a /proc/self/fd path)
        failed = kept / Path(exc.filename).name if exc.filename is not None else None
        raise OSError(exc.errno, f"{exc.strerror}; what {named} held besides the files replaced is kept in {kept}",
                      None if failed is None else str(failed)) from exc
    shutil.rmtree(old, ignore_errors=True)
