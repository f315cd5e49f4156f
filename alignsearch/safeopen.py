"""The one way an indexed file is opened: under its root, without following a symlinked folder, and only
when it is a regular file.

An indexed file is (root, path under it). O_NOFOLLOW guards only a path's last component, so a folder on
the way swapped for a symlink would lead anywhere; here the path is walked from the root one component
at a time, each folder opened relative to the one before with O_NOFOLLOW | O_DIRECTORY (what openat2's
RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS do in one call, portable to every POSIX system), and `..`,
absolute and empty components are refused. The file itself is stat'ed first and opened with O_NONBLOCK
(a FIFO never blocks the open), then checked on the open descriptor: anything but a regular file (a
FIFO, /dev/zero, a socket) is refused before a byte is read, and so is a file whose size or mtime no
longer match what the catalog recorded, when the caller gives them.

A file symlink, where followed, is walked one link at a time (a chain, links among its target's folders), each
link judged on the very inode followed (planted: not one another user may have planted in a folder they
can write) and the file finally opened as the entry judged, never by a second lookup of its name.

The root itself is opened as named: it is the folder (or the list's folder) the user chose.
Light to import: decode workers and the server use it.
"""

from __future__ import annotations

import errno
import os
import stat
import weakref

from alignsearch.errors import BadImageError

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
# A folder on the way is only passed through: O_PATH needs no read permission on it (Linux).
_PATH = getattr(os, "O_PATH", 0)
_DIR = (_PATH or os.O_RDONLY) | getattr(os, "O_DIRECTORY", 0) | _CLOEXEC
MAX_LINKS = 40  # as the kernel's own limit on a path's links
# _start_trusted's walks from / by folder (st_dev, st_ino) and place: the folders' descriptors (None: not there),
# kept while one folder's links are stat'ed
Starts = dict[tuple[int, int, str], list[int] | None]


class Refused(BadImageError):
    """The path does not lead, without a symlinked folder, to a regular file (the message says what it met);
    the indexer records it as the file's reason, the server answers 409."""


class Changed(Refused):
    """The regular file found is not the one the catalog describes (another size or mtime)."""


STATUS_SLACK_S = 60  # a file time a little before a listing started still counts: coarse clocks, a server's skew


def status_changed(ctime: float, indexed_at: float, now: float) -> bool:
    """Whether a file's status changed (st_ctime) after the listing its catalog row was made from began (indexed_at):
    its content may differ though its size and mtime do not (`cp -p`, `rsync -a`, `exiftool -P`), so it is hashed
    before it is trusted, by `index` (scan.confirm) and by the server alike. A ctime ahead of this machine's clock
    (`now`, give or take STATUS_SLACK_S: a file server's clock, one set wrong when the file changed) says nothing: it
    would be "changed" at every look until the clock caught up."""
    return indexed_at < ctime <= now + STATUS_SLACK_S


def file_kind(mode: int) -> str:
    """What a stat mode names, in words ("fifo", "character device"...), for reasons a person reads."""
    for test, name in ((stat.S_ISREG, "regular file"), (stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "fifo"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISLNK, "symbolic link")):
        if test(mode):
            return name
    return "special file"


def _parts(relpath: str | bytes) -> list[str]:
    text = os.fsdecode(relpath)
    parts = text.split("/")
    if text.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise Refused(f"not a path under its root: {text!r}")
    return parts


def _folder_refused(name: str, dir_fd: int) -> Refused:
    try:
        mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
    except OSError:
        mode = 0
    met = "a symbolic link" if stat.S_ISLNK(mode) else f"a {file_kind(mode)}" if mode else "not a folder"
    return Refused(f"a folder on its path is {met}: {name}")


def _regular(fd: int, expect: tuple[int, float] | None) -> os.stat_result:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise Refused(f"not a regular file: {file_kind(st.st_mode)}")
    if expect is not None and (st.st_size, st.st_mtime) != (expect[0], expect[1]):
        raise Changed("changed since it was indexed (size or modification time)")
    return st


def _walk(root: str | os.PathLike, parts: list[str]) -> list[int]:
    """Descriptors of root and of each folder of parts[:-1] below it, each opened relative to the one before,
    none through a symlink (Refused). Kept open, not one at a time: whether a link another user made in the last
    one may be followed depends on who made the folders above it (_trusted). The caller closes them."""
    folders = [os.open(root, _DIR)]
    try:
        for name in parts[:-1]:
            try:
                folders.append(os.open(name, _DIR | _NOFOLLOW, dir_fd=folders[-1]))
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise _folder_refused(name, folders[-1]) from None
                raise
    except BaseException:
        _close(folders)
        raise
    return folders


def _close(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def open_under(root: str | os.PathLike, relpath: str | bytes, *, follow_last: bool = False,
               expect: tuple[int, float] | None = None) -> int:
    """A read-only descriptor of the regular file at relpath ("a/b/c.jpg", or its raw bytes) under root.

    No folder below root may be a symlink; follow_last: the file itself may be (the indexer follows file
    symlinks met in a folder, as the scan stat'ed them), else a symlink there is refused. expect: the
    (size, mtime) the catalog recorded. Raises Refused (or Changed) with the reason, FileNotFoundError
    when something on the way is gone, other OSErrors as they come. The caller closes the descriptor."""
    parts = _parts(relpath)
    folders = _walk(root, parts)
    try:
        return _open_leaf(parts[-1], folders, follow_last, expect)
    finally:
        _close(folders)


def open_regular(path: str | os.PathLike, *, follow: bool = True, expect: tuple[int, float] | None = None) -> int:
    """A read-only descriptor of the regular file at path, named by the user (a list file, a tar shard, a
    query image): its folders are taken as named; the file is checked as open_under checks it."""
    return _open_in_folder(path, follow, expect)[0]


def open_pinned(path: str | os.PathLike) -> tuple[int, os.stat_result]:
    """A read-only descriptor of the regular file at path, not a symlink, opened relative to its folder, and
    that folder's stat, taken on the folder opened: who owns and may write the folder that held the file
    when it was opened (a folder renamed in its place later does not change the answer). For records whose
    trust depends on their folder (client.read_record). The caller closes the descriptor."""
    return _open_in_folder(path, False, None)


def _open_in_folder(path: str | os.PathLike, follow: bool,
                    expect: tuple[int, float] | None) -> tuple[int, os.stat_result]:
    """The file at path opened in its folder (taken as named, opened once), and that folder's stat."""
    folder, name = os.path.split(os.fspath(path))
    dir_fd = os.open(folder or ".", _DIR)
    try:
        folder_st = os.fstat(dir_fd)
        return _open_leaf(name, [dir_fd], follow, expect), folder_st
    finally:
        os.close(dir_fd)


def stat_through(root: str | os.PathLike, relpath: str | bytes) -> os.stat_result:
    """The lstat of what relpath under root names, walked as open_under(..., follow_last=True) walks it, its
    links followed and judged the same way, nothing opened: for a scan that compares what a link leads to with
    the catalog. Raises Refused for a planted link, FileNotFoundError for a broken one, other OSErrors."""
    parts = _parts(relpath)
    folders = _walk(root, parts)
    try:
        return _stat_leaf(parts[-1], folders)
    finally:
        _close(folders)


class FolderWalks:
    """stat_through for many files under one root, listed a folder at a time: each folder's chain is walked once
    and kept open until a file of another folder is asked for (close(), or this object's end, closes it), not
    walked again for every link in it. The links themselves are followed and judged as stat_through does."""

    def __init__(self, root: str | os.PathLike):
        self.root = root
        self._folder: list[str] | None = None  # the parts of the folder walked
        self._fds: list[int] = []  # its walk; emptied in place, so the finalizer closes what is open then
        self._starts: Starts = {}  # the walks from / to its links' walks' first folders (_trusted)
        weakref.finalize(self, _forget, self._fds, self._starts)

    def stat_through(self, relpath: str | bytes) -> os.stat_result:
        parts = _parts(relpath)
        if parts[:-1] != self._folder:
            self.close()
            self._fds.extend(_walk(self.root, parts))  # raises with nothing kept: the next file walks again
            self._folder = parts[:-1]
        return _stat_leaf(parts[-1], self._fds, self._starts)

    def close(self) -> None:
        _forget(self._fds, self._starts)
        self._folder = None


def _forget(fds: list[int], starts: Starts) -> None:
    """Close a FolderWalks' descriptors: its walk's and those its starts hold; both emptied in place."""
    _close(fds)
    fds.clear()
    for chain in starts.values():
        _close(chain or [])
    starts.clear()


def _stat_leaf(name: str, folders: list[int], starts: Starts | None = None) -> os.stat_result:
    """name in folders[-1] (borrowed), lstat'ed; a link followed and judged as _open_leaf follows it."""
    st = os.stat(name, dir_fd=folders[-1], follow_symlinks=False)
    if stat.S_ISLNK(st.st_mode):
        last_fd, _, st = _through_links(name, folders, starts)
        os.close(last_fd)
    return st


def _open_leaf(name: str, folders: list[int], follow: bool, expect: tuple[int, float] | None) -> int:
    """name in folders[-1] (folders: the walk's folders, the first one trusted; borrowed), opened."""
    dir_fd, own = folders[-1], None  # own: the folder a link led to, opened here
    try:
        # An lstat first, so a device or FIFO is refused without being opened at all (opening some devices acts)
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if stat.S_ISLNK(st.st_mode):
            if not follow:
                raise Refused("is a symbolic link")
            own, name, st = _through_links(name, folders)
            dir_fd = own
        if not stat.S_ISREG(st.st_mode):
            raise Refused(f"not a regular file: {file_kind(st.st_mode)}")
        # Never through a link here: the entry judged above is the one opened, or the open fails. Three calls
        # for a plain file (lstat, open, fstat), one lookup of its name each time, compared by inode.
        try:
            fd = os.open(name, os.O_RDONLY | _NONBLOCK | _CLOEXEC | _NOFOLLOW, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # replaced by a link since the lstat
                raise Refused("is a symbolic link") from None
            raise
        try:
            got = _regular(fd, expect)
            if (got.st_dev, got.st_ino) != (st.st_dev, st.st_ino):
                raise Refused("replaced by another file while it was opened")
        except BaseException:
            os.close(fd)
            raise
        return fd
    finally:
        if own is not None:
            os.close(own)


def planted(entry: os.stat_result, folder: os.stat_result, folder_trusted: bool, me: int) -> bool:
    """Whether an entry (a symbolic link, or a folder on the way to one) may have been made by another user to
    lead this one's reads to their files. Made by this user or root: no. Else only where no other user could
    have made it: its folder is trusted (not itself such an entry) and either the folder's owner made it
    (Linux's protected_symlinks rule) or the folder is writable by its owner alone (neither group- nor
    other-writable: the only way another user makes an entry). A link another user planted in a shared photo
    folder (photo.txt -> ~/.aws/credentials, a photo -> a private one), or in a folder they made in it, carried
    this user's files into the index, its captions, places and answers; links on a drive from another machine
    or another uid's disk, in folders only their owner writes, are followed."""
    if entry.st_uid in (0, me):
        return False
    return not folder_trusted or (entry.st_uid != folder.st_uid and bool(folder.st_mode & (stat.S_IWGRP | stat.S_IWOTH)))


def _trusted(folders: list[int], starts: Starts | None = None) -> tuple[bool, os.stat_result]:
    """(whether the last folder is trusted, its stat): each one unless planted in the one before, the first one
    judged from / down (_start_trusted). Asked only when another user's link is met."""
    me = os.geteuid()
    trusted, above = _start_trusted(folders[0], me, starts)
    for fd in folders[1:]:
        st = os.fstat(fd)
        trusted, above = not planted(st, above, trusted, me), st
    return trusted, above


def _start_trusted(fd: int, me: int, starts: Starts | None = None) -> tuple[bool, os.stat_result]:
    """(whether a walk's first folder is trusted, its stat): its folders from / judged one by one (the root the
    user chose, or a named file's folder, may itself be a folder another user made in a shared one). Where the
    system cannot say where fd lies (no /proc), it is trusted as named; one moved meanwhile is not. starts: the
    walks from / already made to a folder at a place, where the caller keeps them (FolderWalks: one folder's
    links): their folders are not opened again, but judged again each time on their descriptors, as a folder
    above may be made writable by others (or given to another user) while the links are stat'ed; remembering
    only the verdict followed links there that a fresh walk refused."""
    st = os.fstat(fd)
    try:
        where = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return True, st
    if starts is None:
        chain = _walk_from_root(where, st)
        try:
            return chain is not None and _chain_trusted(chain, me), st
        finally:
            _close(chain or [])
    key = (st.st_dev, st.st_ino, where)
    if key not in starts:
        starts[key] = _walk_from_root(where, st)
    chain = starts[key]
    return chain is not None and _chain_trusted(chain, me), st


def _walk_from_root(where: str, st: os.stat_result) -> list[int] | None:
    """Descriptors of / and of each folder of where below it, none through a link, the last one the folder of
    stat st; None where that walk fails or leads elsewhere (moved, deleted: judged as planted)."""
    chain = [os.open("/", _DIR)]
    try:
        for name in (p for p in where.split("/") if p):
            chain.append(os.open(name, _DIR | _NOFOLLOW, dir_fd=chain[-1]))
        last = os.fstat(chain[-1])
    except OSError:
        _close(chain)
        return None
    if (last.st_dev, last.st_ino) != (st.st_dev, st.st_ino):
        _close(chain)
        return None
    return chain


def _chain_trusted(chain: list[int], me: int) -> bool:
    """Whether the last folder of a walk from / (_walk_from_root) is trusted: each one judged in the one before,
    on its stat now."""
    trusted, above = True, os.fstat(chain[0])
    for fd in chain[1:]:
        here = os.fstat(fd)
        trusted, above = not planted(here, above, trusted, me), here
    return trusted


def _through_links(name: str, folders: list[int], starts: Starts | None = None) -> tuple[int, str, os.stat_result]:
    """(an open descriptor of the folder holding the entry the link `name` in folders[-1] finally names, that
    entry's name, its lstat): every link on the way (a chain of them, and links among the folders of a target)
    judged by planted against the folder holding it, each on the very inode followed (an O_PATH descriptor of
    the link, whose content is read from it), so a link swapped in after the judgement is never followed; the
    folders a target names walked one at a time, from / for an absolute one. At most MAX_LINKS links. folders
    are borrowed; the caller closes the descriptor returned. starts: see _start_trusted."""
    path = [os.dup(fd) for fd in folders]  # the folders from the walk's start to the current one
    try:
        pending, links = [name], 0  # components still to walk, the next last
        while True:
            part = pending.pop()
            if part in ("", ".", ".."):
                if not pending:
                    raise Refused("not a file: a symbolic link leads to a folder")
                if part == ".." and len(path) > 1:
                    os.close(path.pop())
                elif part == "..":  # above the walk's start: a new start
                    path = [_replace(path[0], os.open("..", _DIR, dir_fd=path[0]))]
                continue
            st, target, entry_fd = _entry(part, path, last=not pending, starts=starts)
            if target is None:
                if not pending:
                    return path.pop(), part, st
                if not stat.S_ISDIR(st.st_mode):
                    raise NotADirectoryError(errno.ENOTDIR, "not a folder on a symbolic link's way", part)
                path.append(entry_fd if entry_fd is not None else os.open(part, _DIR | _NOFOLLOW, dir_fd=path[-1]))
                continue
            links += 1
            if links > MAX_LINKS:
                raise Refused(f"more than {MAX_LINKS} symbolic links on the way")
            if target.startswith("/"):
                root = os.open("/", _DIR)
                _close(path)
                path = [root]
            pending.extend(reversed(target.split("/")))
    finally:
        _close(path)


def _replace(old: int, new: int) -> int:
    os.close(old)
    return new


def _entry(part: str, path: list[int], last: bool,
           starts: Starts | None = None) -> tuple[os.stat_result, str | None, int | None]:
    """(the lstat of part in path[-1], a link's target or None, an O_PATH descriptor of a folder to walk on, or
    None): a link is judged (planted, Refused) on the inode its target is read from."""
    if not _PATH:  # no O_PATH (not Linux): the link's lstat, compared by inode after its target is read
        st = os.stat(part, dir_fd=path[-1], follow_symlinks=False)
        if not stat.S_ISLNK(st.st_mode):
            return st, None, None
        _judge(st, path, starts)
        target = os.readlink(part, dir_fd=path[-1])
        again = os.stat(part, dir_fd=path[-1], follow_symlinks=False)
        if (again.st_dev, again.st_ino) != (st.st_dev, st.st_ino):
            raise Refused("a symbolic link replaced while it was followed")
        return st, target, None
    fd = os.open(part, _PATH | _NOFOLLOW | _CLOEXEC, dir_fd=path[-1])  # the entry itself; opens no file
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode) and not last:
            fd, walk_on = -1, fd  # the folder to walk on, as judged: the caller's
            return st, None, walk_on
        if stat.S_ISLNK(st.st_mode):
            _judge(st, path, starts)
            return st, os.readlink("", dir_fd=fd), None  # the content of the inode judged
        return st, None, None
    finally:
        if fd >= 0:
            os.close(fd)


def _judge(link: os.stat_result, path: list[int], starts: Starts | None = None) -> None:
    me = os.geteuid()
    if link.st_uid in (0, me):
        return  # no need for the folders' stats
    trusted, folder = _trusted(path, starts)
    if planted(link, folder, trusted, me):
        where = "in a folder others may write" if trusted else "in a folder another user made where others may write"
        raise Refused(f"a symbolic link made by another user (uid {link.st_uid}) {where}")


PREAD_CHUNK = 1 << 20


def pread_chunks(fd: int, *, offset: int = 0, size: int | None = None):
    """An open file's bytes from offset (size of them at most; None: to its end) in chunks of PREAD_CHUNK, read
    with pread: the descriptor's offset is left where it was (one shared by threads, or by a caller reading on).
    Fewer where the file ends first (a file cut short since its listing)."""
    got = 0
    while size is None or got < size:
        chunk = os.pread(fd, PREAD_CHUNK if size is None else min(size - got, PREAD_CHUNK), offset + got)
        if not chunk:
            return
        yield chunk
        got += len(chunk)


def read_fd(fd: int, max_bytes: int) -> bytes:
    """At most max_bytes + 1 bytes of an open file (the caller tells "too large" from the length), read
    with plain reads; closes fd."""
    with os.fdopen(fd, "rb") as f:
        return f.read(max_bytes + 1)
