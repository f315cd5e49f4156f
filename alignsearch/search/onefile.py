"""One file on disk is one entry: in search and `similar` results, `dupes` groups, `export` and the recent listing.

Several catalog rows can name one file: a folder root and a list naming one of its photos (by path or file:// URL),
two lists, a symlink in a folder to a photo beside it (or a folder symlink). Each such row was an entry of its own:
a search listed the photo and its link as two hits, an export wrote the file once per root, while `dupes` (which
resolved links) called them one file. Every place now asks this module.

- The key (file_key): a local file's real path (symlinks resolved, as bytes: a name that is not UTF-8 stays whole),
  with the video moment; a URL or tar member keys by its own path. Resolving costs an lstat per path component, so
  it is done only for rows whose content (sha256, moment) another indexed row holds (a search reads the rows holding
  its hits' contents, catalog.rows_holding, per read of hits; catalog.shared_contents for a few ids): one file has one content, so a row whose content is its own cannot be another
  row's file, and its name stands for it with no system call (`alone`).
- Which row represents a file (shown_first): the file's own name (direct): its real path, or that path reached
  through a link above the root's folder (a folder that is itself a symlink), not through a symlink below it, not
  a file:// URL; else the shortest name, then the first in byte order, then the lowest id. The real path is what
  `dupes` keys on, it opens without a link and outlives the link; among names that all go through links, the
  shortest is the least nested. Root order or row ids were not chosen: they change with `forget` and re-indexing,
  and the shown path would change with them.
- Hard links (one inode, two real paths) stay two files: only a stat of each name can tell them (the catalog stores
  no inode), and each name is its own directory entry that can be moved or deleted on its own. `dupes --tier exact`
  lists them as copies.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterable

from alignsearch.errors import AlignSearchError
from alignsearch.media import sources
from alignsearch.storage import catalog

Key = tuple[bytes | str, int]


def _local(row) -> tuple | None:
    """sources.local_file of a row, None also for another host's file:// URL (never indexed, so never here)."""
    try:
        return sources.local_file(row.root, row.relpath, row.relpath_raw)
    except AlignSearchError:
        return None


def real_path(row, folders: dict | None = None, local: tuple | None | bool = False) -> bytes | None:
    """Where a local row's file really lies (bytes), else None (a URL, a tar member, another host's file:// URL).
    folders: {folder: its real path} of earlier calls, added to: os.path.realpath takes an lstat per component
    of the path, and the names of one folder share all but the last, so each further name costs one lstat (its
    own link, if it is one, resolved whole): the real path of folder/name is the folder's real path joined
    with name unless name is a symlink. local: the row's _local when the caller has it (False: look it up)."""
    local = _local(row) if local is False else local
    if local is None:
        return None
    folder, under = local
    path = os.path.join(os.fsencode(folder), os.fsencode(under))
    if folders is None:
        return os.path.realpath(path)
    head, name = os.path.split(path)
    if head not in folders:
        folders[head] = os.path.realpath(head)
    real = os.path.join(folders[head], name)
    try:
        if stat.S_ISLNK(os.lstat(real).st_mode):
            return _through_link(real, folders) or os.path.realpath(path)
    except OSError:  # gone (or unreadable folder): realpath too keeps the name as it is
        pass
    return real


LINK_HOPS = 8  # a longer chain (or a loop) is left to os.path.realpath, whose answer for a loop is its own


def _through_link(link: bytes, folders: dict) -> bytes | None:
    """Where a symlink leads, its folder already resolved (link: that folder's real path joined with the link's
    name), as os.path.realpath answers: the target read (readlink) and joined to the link's folder, that target's
    folder resolved once in the memo (`folders`) and its name lstat'ed, a link there followed the same way. None
    where realpath must answer (a chain over LINK_HOPS, a loop, a target ending in `..`, the link gone meanwhile).
    os.path.realpath of the whole name took an lstat per component of the link's path and of its target, in Python:
    the recent listing's first page resolved every link of a library half links so (benchmarks/bench_recent_links.py)."""
    for _ in range(LINK_HOPS):
        try:
            target = os.readlink(link)
        except OSError:
            return None
        head, name = os.path.split(os.path.join(os.path.dirname(link), target))
        if name in (b"", b".", b".."):  # a folder's name, not a file's: realpath decides
            return None
        if head not in folders:
            folders[head] = os.path.realpath(head)
        link = os.path.join(folders[head], name)
        try:
            if not stat.S_ISLNK(os.lstat(link).st_mode):
                return link
        except OSError:  # a missing target: realpath keeps its name, its folder resolved
            return link
    return None


def file_key(row, alone: bool = False) -> bytes | str:
    """The file a row names, the same whatever root or link names it. alone: no other indexed row holds its content,
    so no other row can be its file: its normalised name (FileRow.file) stands for it, no system call."""
    if alone:
        return row.file
    real = real_path(row)
    return row.path if real is None else real


def key(row, alone: bool = False) -> Key:
    """The entry a row is: its file and moment (a video's moments are entries of their own)."""
    return file_key(row, alone), row.moment


def keys(conn, rows: Iterable) -> dict[int, Key]:
    """{id: key} of these rows, links resolved only for rows whose content another indexed row holds."""
    rows = list(rows)
    shared = catalog.shared_contents(conn, (r.sha256 for r in rows))
    return {r.id: key(r, alone=(r.sha256, r.moment) not in shared) for r in rows}


def shown_first(row, real: bytes | None | bool = False, folders: dict | None = None,
                local: tuple | None | bool = False) -> tuple:
    """Sort key of the rows of one file, the one to show first: its own name (direct), else the shortest name, then
    byte order, then the lowest id. real: the row's real_path when the caller has it (False: look it up); folders:
    real_path's memo; local: the row's _local when the caller has it (False: looked up if needed)."""
    name = os.fsencode(row.path)
    real = real_path(row, folders, local) if real is False else real
    return (not direct(row, name, real, folders, local), len(name), name, row.id)


def direct(row, name: bytes, real: bytes | None, folders: dict | None = None,
           local: tuple | None | bool = False) -> bool:
    """Whether a row's name is its file's own name: its real path, or that path reached through a link above the
    root (a root folder that is itself a symlink: ~/Pictures on another disk, macOS's /tmp and /var), with no link
    below it and not a file:// URL. Comparing the name with the real path alone called no name of such a root
    direct, and the shortest won: a symlink `l.jpg` beside IMG_0001.jpg was shown (and exported) for it, the
    file's own name left out. A name that is its real path costs nothing more; else one realpath per folder."""
    if real is None or name == real:
        return name == real
    local = _local(row) if local is False else local
    if local is None:
        return False
    folder, under = os.fsencode(local[0]), os.fsencode(local[1])
    if name != os.path.join(folder, under):  # a file:// URL, a name as the list spells it
        return False
    if folders is None:
        folders = {}
    if folder not in folders:
        folders[folder] = os.path.realpath(folder)
    return os.path.normpath(os.path.join(folders[folder], under)) == real


def named(row, reals: dict | None = None) -> tuple[Key, tuple]:
    """(key, shown_first) of a row of shared content, its links resolved once. reals: a memo (a search's, an
    export's), added to: {id: real_path} of the rows looked up, and {folder (bytes): its real path}."""
    if reals is None:
        reals = {}
    local: tuple | None | bool = False  # sources.local_file, asked at most once (real_path and direct both read it)
    if row.id not in reals:
        local = _local(row)
        reals[row.id] = real_path(row, reals, local)  # int keys are rows', bytes keys folders': never the same
    real = reals[row.id]
    return ((row.path if real is None else real), row.moment), shown_first(row, real, reals, local)


def others(rows: Iterable, admitted: Callable[[object], bool] | None = None) -> set[int]:
    """Ids of the rows (all of shared content: catalog.rows_of_contents) that name an entry another admitted row
    stands for: the rows export and the recent listing leave out. Rows not admitted (filtered out) stand for
    nothing and are not returned."""
    best: dict[Key, tuple] = {}
    out: set[int] = set()
    reals: dict = {}  # folders' real paths (and rows'), looked up once
    for row in rows:
        if admitted is not None and not admitted(row):
            continue
        k, order = named(row, reals)
        held = best.get(k)
        if held is None:
            best[k] = (order, row.id)
        elif order < held[0]:
            out.add(held[1])
            best[k] = (order, row.id)
        else:
            out.add(row.id)
    return out


def left_out(conn, admitted: Callable[[object], bool] | None = None) -> set[int]:
    """Ids of the indexed rows, among those admitted, that another admitted row's file entry stands for."""
    return others(catalog.rows_of_contents(conn), admitted)


def captions_by_entry(conn, rows: Iterable, reals: dict | None = None) -> dict[Key, str]:
    """{file entry: caption} of these rows' captions, one per entry: of several, the caption of the name search
    would show first (shown_first). reals: named's memo, added to. A file is listed once, by the name search
    shows; where that row has no caption of its own, the file's is one of its other names' (a list's caption of a
    photo whose folder row has no sidecar), as a hit shows it (engine._own_caption_else)."""
    rows = list(rows)
    reals = {} if reals is None else reals
    captions = {i: p["caption"] for i, p in catalog.photos_of(conn, [r.id for r in rows]).items() if p.get("caption")}
    best: dict[Key, tuple] = {}
    for row in rows:
        if row.id in captions:
            entry, order = named(row, reals)
            if entry not in best or order < best[entry][0]:
                best[entry] = (order, captions[row.id])
    return {entry: caption for entry, (_, caption) in best.items()}


def lent_captions(conn, rows: Iterable, photos: dict[int, dict]) -> dict[int, str]:
    """{row id: caption} for those of `rows` (each shown for its file) with no caption of their own in `photos`
    whose file another name holds with one (captions_by_entry of the file's other rows). One grouped read of the
    shared contents, only of the captionless rows': a library without copies reads nothing more."""
    lacking = [r for r in rows if r.sha256 and not (photos.get(r.id) or {}).get("caption")]
    shared = catalog.shared_contents(conn, [r.sha256 for r in lacking]) if lacking else set()
    lacking = [r for r in lacking if (r.sha256, r.moment) in shared]
    if not lacking:
        return {}
    ids = {r.id for r in lacking}
    reals: dict = {}
    holders = catalog.rows_holding(conn, {(r.sha256, r.moment) for r in lacking})
    held = captions_by_entry(conn, [h for h in holders if h.id not in ids], reals)
    return {r.id: held[entry] for r in lacking if (entry := named(r, reals)[0]) in held}
