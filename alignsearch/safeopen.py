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
link judged on the very inode followed (planted_link: not one another user may have planted in a folder they
can write) and the file finally opened as the entry judged, never by a second lookup of its name.

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
_PATH = getattr(os, "O_PATH", 0)
_DIR = (_PATH or os.O_RDONLY) | getattr(os, "O_DIRECTORY", 0) | _CLOEXEC
MAX_LINKS = 40  # as the kernel's own limit on a path's links


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
    own = None  # the folder this call opened (open_regular names a path, not a folder and a name)
    if dir_fd is None:
        folder, name = os.path.split(name)
        own = dir_fd = os.open(folder or ".", _DIR)
    try:
        # An lstat first, so a device or FIFO is refused without being opened at all (opening some devices acts)
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if stat.S_ISLNK(st.st_mode):
            if not follow:
                raise Refused("is a symbolic link")
            dir_fd, name, st = _through_links(name, dir_fd)
            if own is not None:
                os.close(own)
            own = dir_fd
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


def stat_through(path: str | os.PathLike) -> os.stat_result:
    """The lstat of what path names, its links followed as a read follows them (each judged by planted_link),
    nothing opened: for a scan that compares what a link leads to with the catalog. Raises Refused for a
    planted link, FileNotFoundError for a broken one, other OSErrors as they come."""
    folder, name = os.path.split(os.fspath(path))
    dir_fd = os.open(folder or ".", _DIR)
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if not stat.S_ISLNK(st.st_mode):
            return st
        last_fd, _, st = _through_links(name, dir_fd)
        os.close(last_fd)
        return st
    finally:
        os.close(dir_fd)


def planted_link(link: os.stat_result, folder: os.stat_result, me: int) -> bool:
    """Whether a symbolic link may have been planted by another user to lead this one's reads to their files:
    it was made by neither this user, root nor the folder's owner (Linux's protected_symlinks rule), in a folder
    other users may write (group- or other-writable: the only place another user can make an entry). A link
    another user planted in a shared photo folder (photo.txt -> ~/.aws/credentials, a photo -> a private one)
    carried this user's files into the index, its captions, places and answers. Links in folders only their
    owner writes (a library of links on a drive from another machine, another uid's disk) are followed."""
    return (link.st_uid not in (0, me, folder.st_uid)
            and bool(folder.st_mode & (stat.S_IWGRP | stat.S_IWOTH)))


def _through_links(name: str, dir_fd: int) -> tuple[int, str, os.stat_result]:
    """(an open descriptor of the folder holding the entry the link `name` in dir_fd finally names, that entry's
    name, its lstat): every link on the way (a chain of them, and links among the folders of a target) judged by
    planted_link against the folder holding it, each on the very inode followed (an O_PATH descriptor of the link,
    whose content is read from it), so a link swapped in after the judgement is never followed. At most
    MAX_LINKS links. The caller closes the descriptor."""
    cur = os.dup(dir_fd)
    try:
        pending, links = [name], 0  # components still to walk, the next last
        while True:
            part = pending.pop()
            if part in ("", ".", ".."):
                if not pending:
                    raise Refused("not a file: a symbolic link leads to a folder")
                if part == "..":
                    cur = _replace(cur, os.open("..", _DIR, dir_fd=cur))
                continue
            st, target, entry_fd = _entry(part, cur, last=not pending)
            if target is None:
                if not pending:
                    if entry_fd is not None:
                        os.close(entry_fd)
                    return cur, part, st
                if not stat.S_ISDIR(st.st_mode):
                    raise NotADirectoryError(errno.ENOTDIR, "not a folder on a symbolic link's way", part)
                cur = _replace(cur, entry_fd if entry_fd is not None else os.open(part, _DIR | _NOFOLLOW, dir_fd=cur))
                continue
            links += 1
            if links > MAX_LINKS:
                raise Refused(f"more than {MAX_LINKS} symbolic links on the way")
            if target.startswith("/"):
                cur = _replace(cur, os.open("/", _DIR))
            pending.extend(reversed(target.split("/")))
    except BaseException:
        os.close(cur)
        raise


def _replace(old: int, new: int) -> int:
    os.close(old)
    return new


def _entry(part: str, folder_fd: int, last: bool) -> tuple[os.stat_result, str | None, int | None]:
    """(the lstat of part in folder_fd, a link's target or None, an O_PATH descriptor of a folder to walk on, or
    None): a link is judged (planted_link, Refused) on the inode its target is read from."""
    if not _PATH:  # no O_PATH (not Linux): the link's lstat, compared by inode after its target is read
        st = os.stat(part, dir_fd=folder_fd, follow_symlinks=False)
        if not stat.S_ISLNK(st.st_mode):
            return st, None, None
        _judge(st, folder_fd)
        target = os.readlink(part, dir_fd=folder_fd)
        again = os.stat(part, dir_fd=folder_fd, follow_symlinks=False)
        if (again.st_dev, again.st_ino) != (st.st_dev, st.st_ino):
            raise Refused("a symbolic link replaced while it was followed")
        return st, target, None
    fd = os.open(part, _PATH | _NOFOLLOW | _CLOEXEC, dir_fd=folder_fd)  # the entry itself; opens no file
    try:
        st = os.fstat(fd)
        if stat.S_ISLNK(st.st_mode):
            _judge(st, folder_fd)
            return st, os.readlink("", dir_fd=fd), None  # the content of the inode judged
        if stat.S_ISDIR(st.st_mode) and not last:
            return st, None, fd  # the folder to walk on, as judged
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    return st, None, None


def _judge(link: os.stat_result, folder_fd: int) -> None:
    if link.st_uid in (0, os.geteuid()):
        return  # no need for the folder's stat
    if planted_link(link, os.fstat(folder_fd), os.geteuid()):
        raise Refused(f"a symbolic link made by another user (uid {link.st_uid}) in a folder others may write")


def read_fd(fd: int, max_bytes: int) -> bytes:
    """At most max_bytes + 1 bytes of an open file (the caller tells "too large" from the length), read
    with plain reads; closes fd."""
    with os.fdopen(fd, "rb") as f:
        return f.read(max_bytes + 1)
