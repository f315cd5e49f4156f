"""The index folder is no more readable by other users than the photos it holds.

An index holds what its photos show: their paths, captions, GPS places, OCR text, vectors, and the server's
thumbnails. Made 0755 under the usual umask, it let every local user read the thumbnails and text of photos kept
in a 0700 folder (another user's `cat` of thumbs/*.jpg). Each `index` run takes away from the index folder the
read and search bits of a class of users (group, others) that cannot reach one of the local roots it is given: a
folder or list that class could not open itself. Only taken away, never given back: a user who opens the index to
others (chmod) after their photos became private does so on purpose, and is told so again at the next run that
finds it so. Every run judges every root the index holds, named or remembered: a folder made private after it was
indexed narrows the index at the next `alignsearch index`, named or not (it waited for the root's next naming).
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from collections.abc import Collection, Mapping
from typing import NamedTuple

from alignsearch.errors import AlignSearchError, BadInputError
from alignsearch.media import sources

log = logging.getLogger(__name__)

GROUP, OTHERS = 0o070, 0o007


class Step(NamedTuple):
    """One folder on the way to a root (the root last): its mode bits and group."""

    mode: int
    gid: int


def reachable(steps: list[Step], gid: int) -> int:
    """Which classes of users (GROUP, OTHERS bits) can read the root at the end of `steps` (every folder before it
    searchable, the root readable, and searchable where it is a folder): OTHERS by the others bits alone, GROUP by
    the group bits of a step whose group is `gid` (the index folder's; as the kernel does, its others bits do not
    count for that group's members) or else its others bits."""
    if not steps:
        return GROUP | OTHERS
    *above, root = steps
    need = stat.S_IROTH | (stat.S_IXOTH if stat.S_ISDIR(root.mode) else 0)

    def grants(step: Step, bits: int, group: bool) -> bool:
        if group and step.gid == gid:  # a member of the file's group gets its group bits alone, never the others'
            return (step.mode >> 3) & bits == bits
        return step.mode & bits == bits

    out = 0
    for cls, group in ((OTHERS, False), (GROUP, True)):
        if all(grants(s, stat.S_IXOTH, group) for s in above) and grants(root, need, group):
            out |= cls
    return out


def narrowed(mode: int, gid: int, roots: list[list[Step]]) -> int:
    """The index folder's permission bits with the read and search bits of each class that cannot reach every root
    taken away (its own write bits untouched: others never have them, paths.untrusted_index refuses that)."""
    keep = GROUP | OTHERS
    for steps in roots:
        keep &= reachable(steps, gid)
    cut = (~keep) & (GROUP | OTHERS) & 0o055
    return stat.S_IMODE(mode) & ~cut


def _steps(path: str, seen: dict[Path, Step] | None = None) -> list[Step] | None:
    """The folders from / to path (path last), None where one cannot be looked at. seen: {folder: its Step} of the
    folders stat'ed by earlier calls of one judgement, added to: a list's photos in 10,000 folders of one library
    stat'ed /, /home, /home/me... once each, not once a folder (the path itself is stat'ed every time)."""
    real = Path(os.path.realpath(path))
    seen = {} if seen is None else seen
    try:
        out = []
        for folder in reversed(real.parents):
            if folder not in seen:
                st = os.stat(folder)
                seen[folder] = Step(st.st_mode, st.st_gid)
            out.append(seen[folder])
        st = os.stat(real)
        return [*out, Step(st.st_mode, st.st_gid)]
    except OSError:
        return None


def _local(roots: list[str]) -> list[str]:
    """The local paths of roots: a file:// URL is a local folder read through fsspec (file:///home/me/private left
    the index 0755), other URLs no local user reads."""
    out = []
    for root in roots:
        if sources.is_pattern(root):
            continue
        try:
            out.append(sources.file_path(root) if sources.is_url(root) else root)
        except BadInputError:  # file:// naming another host: not this machine's
            continue
    return [r for r in out if r]


def _listed(root: str, column: str | None, lists: dict | None = None) -> list[str]:
    """Of a local list (a path or a file:// URL, as the run names the root), one local photo it names in each folder
    (its first): a list others may read, naming photos in a 0700 folder, left the index as open as the list. One per
    folder, as a library's folder keeps one mode for its photos; [] where the list cannot be read (the scan says
    why) or is not a local list. lists: the run's tables of lists (sources.list_table), added to under the root's
    own name, the scan's: the scan lists the table judged here, not the file read again."""
    local = _local([root])
    if not local or sources.kind(local[0]) != sources.LIST:
        return []
    try:
        entries = sources.list_entries(root, column, lists)
    except (AlignSearchError, OSError, ValueError):
        return []
    base, first = os.path.dirname(local[0]), {}
    for entry in (e.strip() for e in entries):  # as the scan reads them (scan.scan_list)
        if sources.is_url(entry):
            local = _local([entry])
            path = local[0] if local else None
        else:
            path = os.path.normpath(os.path.join(base, entry))
        if path:
            first.setdefault(os.path.dirname(path), path)
    return list(first.values())


def keep_private(index_dir: Path, roots: list[str], columns: Mapping[str, str | None] | str | None = None,
                 lists: dict | None = None, judged: tuple[int, int] | None = None,
                 by_photos: Collection[str] | None = None) -> str | None:
    """Narrow index_dir's mode to what the local roots, and the local photos their lists name, allow (narrowed); a
    line saying so where an index folder that existed was opened wider, else None (a folder made now is narrowed
    without a word). columns: each list's path column ({root: column}, a missing root: the default column; one
    name: every list's). lists: the run's tables of lists (sources.list_table), added to, for its scan to list the
    lists judged here. judged: the (st_dev, st_ino) of the folder the caller judged and holds (job: the one it made,
    or the one whose write.lock it holds); another folder at index_dir's name now is left as it is, and None
    returned. by_photos: the lists judged by the photos they name (None: all); the others by the list file alone."""
    local = _local(roots)
    column = columns.get if isinstance(columns, Mapping) else (lambda root: columns)
    local += [photo for root in roots if by_photos is None or root in by_photos
              for photo in _listed(root, column(root), lists)]
    seen: dict[Path, Step] = {}
    paths = [s for s in (_steps(path, seen) for path in local) if s is not None]
    if not paths:
        return None
    # the mode read and the mode set are those of one open folder, the one judged: a chmod by name followed
    # whatever was put at index_dir's name after the judgement (a link to another folder of this user's, or of
    # anyone's where run as root), and gave that folder the index's mode, opening it to users it was closed to.
    # Not O_NOFOLLOW: `--index mine`, mine -> /mnt/big/ix is this user's own link, and the identity is the check
    try:
        fd = os.open(index_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if judged is not None and (st.st_dev, st.st_ino) != judged:
            log.warning("warning: %s is no longer the index folder this run judged (replaced meanwhile): its mode "
                        "is left as it is", index_dir)
            return None
        mode = narrowed(st.st_mode, st.st_gid, paths)
        if mode == stat.S_IMODE(st.st_mode):
            return None
        try:
            os.fchmod(fd, mode)
        except PermissionError:  # not this user's folder (an index shared with a group): its owner decides
            return None
    finally:
        os.close(fd)
    return (f"notice: {index_dir} made {mode:04o} (was {stat.S_IMODE(st.st_mode):04o}): the photos it indexes are not "
            "readable by every user it was open to, and it holds their paths, text, places and thumbnails")
