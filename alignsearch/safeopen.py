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

The root itself is opened as named: it is the folder (or the list's folder) the user chose.
Light to import: decode workers and the server use it.
"""

from __future__ import annotations

import errno
import os
import stat

from alignsearch.errors import BadImageError

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
# A folder on the way is only passed through: O_PATH needs no read permission on it (Linux).
_DIR = getattr(os, "O_PATH", os.O_RDONLY) | getattr(os, "O_DIRECTORY", 0) | _CLOEXEC


class Refused(BadImageError):
    """The path does not lead, without a symlinked folder, to a regular file (the message says what it met);
    the indexer records it as the file's reason, the server answers 409."""


class Changed(Refused):
    """The regular file found is not the one the catalog describes (another size or mtime)."""


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


def open_under(root: str | os.PathLike, relpath: str | bytes, *, follow_last: bool = False,
               expect: tuple[int, float] | None = None) -> int:
    """A read-only descriptor of the regular file at relpath ("a/b/c.jpg", or its raw bytes) under root.

    No folder below root may be a symlink; follow_last: the file itself may be (the indexer follows file
    symlinks met in a folder, as the scan stat'ed them), else a symlink there is refused. expect: the
    (size, mtime) the catalog recorded. Raises Refused (or Changed) with the reason, FileNotFoundError
    when something on the way is gone, other OSErrors as they come. The caller closes the descriptor."""
    parts = _parts(relpath)
    dir_fd = os.open(root, _DIR)
    try:
        for name in parts[:-1]:
            try:
                fd = os.open(name, _DIR | _NOFOLLOW, dir_fd=dir_fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise _folder_refused(name, dir_fd) from None
                raise
            os.close(dir_fd)
            dir_fd = fd
        return _open_leaf(parts[-1], dir_fd, follow_last, expect)
    finally:
        os.close(dir_fd)


def open_regular(path: str | os.PathLike, *, follow: bool = True, expect: tuple[int, float] | None = None) -> int:
    """A read-only descriptor of the regular file at path, named by the user (a list file, a tar shard, a
    query image): its folders are taken as named; the file is checked as open_under checks it."""
    return _open_leaf(os.fspath(path), None, follow, expect)


def open_pinned(path: str | os.PathLike) -> tuple[int, os.stat_result]:
    """A read-only descriptor of the regular file at path, not a symlink, opened relative to its folder, and
    that folder's stat, taken on the folder opened: who owns and may write the folder that held the file
    when it was opened (a folder renamed in its place later does not change the answer). For records whose
    trust depends on their folder (client.read_record). The caller closes the descriptor."""
    path = os.fspath(path)
    folder, name = os.path.split(path)
    dir_fd = os.open(folder or ".", _DIR)
    try:
        folder_st = os.fstat(dir_fd)
        return _open_leaf(name, dir_fd, False, None), folder_st
    finally:
        os.close(dir_fd)


def _open_leaf(name: str, dir_fd: int | None, follow: bool, expect: tuple[int, float] | None) -> int:
    if follow:
        _refuse_planted_link(name, dir_fd)
    # A stat first, so a device or FIFO is refused without being opened at all (opening some devices acts).
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=follow)
    if stat.S_ISLNK(st.st_mode):
        raise Refused("is a symbolic link")
    if not stat.S_ISREG(st.st_mode):
        raise Refused(f"not a regular file: {file_kind(st.st_mode)}")
    try:
        fd = os.open(name, os.O_RDONLY | _NONBLOCK | _CLOEXEC | (0 if follow else _NOFOLLOW), dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP and not follow:  # replaced by a link since the stat
            raise Refused("is a symbolic link") from None
        raise
    try:
        _regular(fd, expect)  # replaced between the stat and the open
    except BaseException:
        os.close(fd)
        raise
    return fd


def _refuse_planted_link(name: str, dir_fd: int | None) -> None:
    """A file symlink is followed only when this user or the folder's owner made it (Linux's protected_symlinks
    rule): one that another user planted in a folder they may write (a shared photo folder) led the indexer to
    this user's private files, whose text (a sidecar caption linked to ~/.aws/credentials), EXIF place and
    words in the picture it then stored and served with every result."""
    try:
        link = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return  # gone: the open says so
    if not stat.S_ISLNK(link.st_mode) or link.st_uid in (0, os.geteuid()):
        return
    folder = os.fstat(dir_fd) if dir_fd is not None else os.stat(os.path.dirname(name) or ".")
    if link.st_uid != folder.st_uid:
        raise Refused(f"a symbolic link made by another user (uid {link.st_uid}) than you or the folder's owner")


def read_fd(fd: int, max_bytes: int) -> bytes:
    """At most max_bytes + 1 bytes of an open file (the caller tells "too large" from the length), read
    with plain reads; closes fd."""
    with os.fdopen(fd, "rb") as f:
        return f.read(max_bytes + 1)
