"""The roots of an index: where a new one goes (never a second copy of a folder already indexed), what each
remembers (options such as include_hidden, listing errors), listing them with their counts and state,
and forgetting one.

Kept in the index state (alignsearch/storage/state.py, RootsState): the roots, each root's options
{"include_hidden": true} (only options that differ from the defaults), its listing errors
[{"folder", "reason"}] from the last run that scanned the root (a folder, or the whole root, that could not
be listed: its rows were kept).

A local folder root's options also record its device ("device": st_dev) whenever a run lists it with entries in
it: a drive's own. A root found empty on another device than that, while the catalog holds its files, is the
mount point an unplugged drive left (`looks_unmounted`): a listing error keeps its files, as for a missing root,
and `roots` shows it "missing". Emptied on its own device (by the user), or with no device recorded (an index from
before the record), a run removes its files as it always did. Never recorded from an empty folder.
The same for a drive mounted on a folder inside a folder root (MOUNTS: each folder a listing found with entries on
another device than the folder above it): found on another device than recorded (or on it, but no mount point now:
numbers are reused), empty or holding none of the files
indexed there, it is a listing error that keeps its files, and what is there (the disk below) is not indexed
(`unplugged_mounts`); gone, or emptied on its own device, it is a folder like any other.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable

from sqlalchemy import delete, func, select, update
from sqlalchemy.engine import Connection

from alignsearch.storage import catalog, state
from alignsearch.media import sources
from alignsearch.errors import BadInputError, UsageError
from indexer import scan

log = logging.getLogger(__name__)


DEVICE = "device"  # the root option that records a folder root's st_dev (internal: `roots` does not show it)
# the root option that records {folder (relative): st_dev} of each folder inside a folder root that is on another
# device than the folder above it (a drive mounted inside the library), from the last listing that found files there
MOUNTS = "mounts"
# the root option that records when the last listing of a whole folder root started (time.time()): captions made or
# edited since are read again by the next listings (scan.scan_folder's captions_since)
LISTED = "listed"
# the root option that records {folder (relative): time} of the folders the last whole listing could not list (an
# unreadable lost+found, an unplugged drive): their captions count as read only up to that time (LISTED before it),
# so the listing that set LISTED need not have listed every folder
UNREAD = "unread"
# the root option that records {folder (relative): time} of the folders a run listing only some folders of the root
# (`index --watch`) listed since its last whole listing, with no listing error at, above or under them, once it had
# read their captions changed: those under them count as read up to that time (LISTED, UNREAD are older). Without
# it, each such run read again every caption changed since the last whole listing, and all of a folder changed
READ = "read"
READ_MOST = 1_000  # folders READ records at the most, the latest: one dropped only reads its captions again
INTERNAL = (DEVICE, MOUNTS, LISTED, UNREAD, READ)  # options a run records for itself: never shown, never given


def looks_unmounted(recorded: int | None, now: int | None, empty: bool) -> bool:
    """A folder root that is now an empty folder (`empty`) on another device (`now`, its st_dev; None: missing)
    than the one recorded when it last held files: the mount point an unmounted drive left. A run would find no
    file there and drop them all; a missing root, by contrast, keeps its files. No record (None): not known.
    Shared by a run (scan_all, report) and `index --watch` (indexer/watch.py, which records the device it saw)."""
    return recorded is not None and now is not None and recorded != now and empty


def unplugged_reason(root: str, empty: bool = True) -> str:
    """Why a folder root, or a mount folder inside one (`unplugged_mounts`: empty False, one holding files now, none
    of those indexed there), is not listed."""
    what = "an empty folder" if empty else "a folder holding none of the files indexed there"
    return f"{root} is {what} on another device than when indexed (an unplugged drive?): its files are kept until it is back"


def unplugged_mounts(root: str, recorded: dict[str, int], within: tuple[str, ...] | None = None, *,
                     include_hidden: bool = False, indexed: Callable[[str], Iterable[tuple[str, int]]] | None = None) -> list[str]:
    """The folders of `recorded` (a root's MOUNTS: {relative folder: st_dev}) that look unmounted now: on another
    device than recorded, or no mount point now (on the device of the folder above it), and empty (`looks_unmounted`) or, where `indexed(folder)` gives (path, size) of the files
    indexed under it, holding none of them (a file of the name and size): a photo saved into the mount point while
    the drive was away (an import, a download) is no sign that the drive's photos were deleted. Listed, each folder's files looked deleted and a run
    dropped them all, vectors and tags, though the drive mounted there was only unplugged. within: only folders at,
    under or above these (a scoped listing's folders; None: all); include_hidden: the root's (scan.empty_folder)."""
    out = []
    for rel, device in sorted(recorded.items()):
        if within is not None and not any(scan.at_or_under(rel, f) or scan.at_or_under(f, rel) for f in within):
            continue
        path = os.path.join(root, rel)
        now = scan.folder_device(path)
        # gone; or the drive there, a mount point on its device (emptied by the user). The recorded device alone
        # did not tell: numbers are reused (another drive remounted above it may get it), and a nested drive's
        # empty mount point on its parent drive, back with the number the nested one had, lost the nested files
        if now is None or (now == device and now != scan.folder_device(os.path.dirname(path))):
            continue
        if scan.empty_folder(path, include_hidden=include_hidden) or (indexed is not None and _none_there(indexed(rel))):
            out.append(rel)
    return out


def _none_there(files: Iterable[tuple[str, int]]) -> bool:
    """Whether there is a file (path, size indexed) and none of them is there now (one stat each, up to the first
    that is): gone, or another file of its name, not unknown (a folder that cannot be read, whose listing error says
    why). By name alone, a photo saved into an unplugged drive's mount point as img000.jpg, a name the drive holds
    too (cameras number alike), was taken for the drive's: the folder was listed, the drive's other files removed."""
    seen = False
    for path, size in files:
        try:
            if os.stat(path).st_size == size:
                return False
            seen = True
        except (FileNotFoundError, NotADirectoryError):
            seen = True
        except OSError:
            return False
    return seen


def _kept_mounts(recorded: dict[str, int], found: dict[str, int], unlisted: list[str],
                 listed: tuple[str, ...] | None) -> dict[str, int]:
    """A root's MOUNTS after a listing: those it found with files, those at or under a folder it could not list
    (judged unplugged, or unreadable: a share refusing access, a drive's I/O error; dropped, the drive unplugged
    after such a run lost its files, as its mount point was then a folder like any other), and, of a scoped listing,
    those outside the folders it listed. A mount folder found gone or empty on its own device is dropped: a later
    run treats it as any folder (emptied or deleted by the user)."""
    kept = {rel: d for rel, d in recorded.items()
            if any(scan.at_or_under(rel, u) for u in unlisted)
            or (listed is not None and not any(scan.at_or_under(rel, f) for f in listed))}
    return {**kept, **found}


def _inside(path: str, folder: str) -> bool:
    return path != folder and scan.at_or_under(path, folder)


def place(db, given: list[str], known: list[str],
          include_hidden: bool | None = None) -> tuple[list[str], list[str], dict[str, str], list[str]]:
    """Fit the roots given on the command line among the known ones, so that no file is indexed twice:
    a folder inside a known folder root is indexed as part of it (a re-scan of that root covers it); a
    folder that contains known folder roots takes them over (their rows move under it, vectors and ids
    kept, in one transaction). Returns (every root, the roots remembered now, {given root: the root that
    holds it}, notes to print). include_hidden: this run's flag (None: not given)."""
    roots, known = list(known), list(known)
    holder: dict[str, str] = {}
    notes: list[str] = []
    _refuse_hidden_takeovers(db, given, known, include_hidden)  # every one before the first takeover commits
    for root in given:
        if root in roots or sources.kind(root) != sources.FOLDER:
            roots += [] if root in roots else [root]
            holder[root] = root
            continue
        folders = [k for k in roots if sources.kind(k) == sources.FOLDER]
        outer = next((k for k in folders if _inside(root, k)), None)
        if outer is not None:
            notes.append(f"{root} is inside the indexed folder {outer}: indexed as part of it")
            holder[root] = outer
            continue
        inner = [k for k in folders if _inside(k, root)]
        if inner:
            with db.begin() as conn:
                for k in inner:
                    rebase_root(conn, k, root)
                roots = [k for k in roots if k not in inner] + [root]
                known = [k for k in known if k not in inner] + [root]
                recorded = state.read(conn).roots
                options = dict(recorded.options)
                merged = next(({n: v for n, v in options[k].items() if n not in INTERNAL} for k in inner
                               if k in options), None)  # the device is the new root's own, recorded when it lists
                mounts = _taken_over_mounts(root, {k: options[k] for k in inner if k in options})
                # the captions edited since the earliest of their whole listings are read again by the new
                # root's listing (their rows move unchanged); an inner root never listed whole gives none to go by
                since = [options.get(k, {}).get(LISTED) for k in inner]
                since += [t for k in inner for t in options.get(k, {}).get(UNREAD, {}).values()]
                listed = {LISTED: min(since)} if None not in since else {}
                for k in inner:
                    options.pop(k, None)
                if merged or mounts or listed:
                    options[root] = {**(merged or {}), **({MOUNTS: mounts} if mounts else {}), **listed}
                errors = {k: v for k, v in recorded.listing_errors.items() if k not in inner}
                state.write(conn, roots=replace(recorded, roots=tuple(roots), options=options, listing_errors=errors))
            notes += [f"{k} is inside {root}: its files now belong to {root}" for k in inner]
        else:
            roots.append(root)
        holder[root] = root
    return roots, known, holder, notes


def _taken_over_mounts(root: str, inner: dict[str, dict]) -> dict[str, int]:
    """The MOUNTS of a root that takes over the known roots inside it (inner: {root: options}): each inner root on
    another device than the folder above it (a drive it was the mount point of) and each folder such a root
    recorded, relative to the new root, so that an unplugged drive there keeps its files as it did. An inner root
    that is gone is judged by the nearest folder above it that is there: a folder on the drive (photos/nas/2019,
    the drive at photos/nas) is gone with the drive, whose empty mount point was then no record, and the new
    root's listing removed the inner root's files."""
    out = {}
    for k, options in inner.items():
        there = k
        while not os.path.lexists(there) and os.path.dirname(there) != root:
            there = os.path.dirname(there)
        if options.get(DEVICE) is not None and options[DEVICE] != scan.folder_device(os.path.dirname(there)):
            out[os.path.relpath(there, root)] = options[DEVICE]
        rel = os.path.relpath(k, root)
        out.update({os.path.join(rel, f): d for f, d in options.get(MOUNTS, {}).items()})
    return out


def _refuse_hidden_takeovers(db, given: list[str], known: list[str], include_hidden: bool | None) -> None:
    """_refuse_hidden_takeover for each given folder that would take over known roots, all before `place` commits
    any takeover: a refusal of the second folder given left the first one's takeover written (exit 6, "nothing
    written"). A root inside a given folder that `place` takes over as part of another one is a known root inside
    that one too, so checking the known roots inside each given folder covers every takeover."""
    folders = [k for k in known if sources.kind(k) == sources.FOLDER]
    for root in given:
        if root in known or sources.kind(root) != sources.FOLDER or any(_inside(root, k) for k in folders):
            continue
        inner = [k for k in folders if _inside(k, root)]
        if inner:
            _refuse_hidden_takeover(db, root, inner, include_hidden)


def _refuse_hidden_takeover(db, root: str, inner: list[str], include_hidden: bool | None) -> None:
    """Refuse (before anything is written) a folder that would take over known roots some of whose indexed files
    its listing skips as hidden: a root inside a hidden folder (~/.photos/trip inside ~), or hidden files of a
    root indexed with --include-hidden. Taken over, they were all "removed" by the same run, vectors and tags
    with them, after its note said they now belonged to the new root. The new root lists hidden files when
    this run says --include-hidden, else when the options it inherits (the first inner root's) say so."""
    with db.connect() as conn:
        options = state.read(conn).roots.options
        inherited = next((options[k] for k in inner if k in options), {})
        lists_hidden = include_hidden if include_hidden is not None else bool(inherited.get("include_hidden"))
        if lists_hidden:
            return
        for k in inner:
            prefix = os.path.relpath(k, root)
            n = sum(1 for row in catalog.rows_under(conn, k)
                    if row.moment == 0 and any(scan._hidden(part) for part in f"{prefix}/{row.relpath}".split("/")))
            if n:
                raise BadInputError(f"cannot index {root}: it holds the indexed root {k}, and {n} indexed file(s) there "
                                    f"are hidden or in a hidden folder, which a listing of {root} skips: they would be "
                                    f"removed; add --include-hidden, or `alignsearch forget {k}` first")


def rebase_root(conn, old: str, new: str) -> None:
    """Rows of root `old` (a folder inside `new`) become rows of `new`, ids and vectors unchanged."""
    raw_prefix = os.fsencode(os.path.relpath(old, new))
    moved = []
    for row in catalog.rows_under(conn, old):  # every moment of a video too
        name = raw_prefix + b"/" + sources.name_bytes(row.relpath, row.relpath_raw)
        move_file(conn, row.id, new, *scan.printable(os.fsdecode(name)))
        moved.append(row.id)
    catalog.refresh_keywords(conn, moved)  # their folders' words are keywords: the new path's, as a fresh index has


def options_for(db, given_roots: list[str], include_hidden: bool | None) -> dict[str, dict]:
    """Each root's remembered options, updated by this run's flag (None: not given) for the roots it names."""
    with db.connect() as conn:
        options = dict(state.read(conn).roots.options)
    if include_hidden is not None:
        for root in given_roots:
            mine = {k: v for k, v in options.get(root, {}).items() if k != "include_hidden"}
            if include_hidden:
                mine["include_hidden"] = True
            options[root] = mine
    return {root: opts for root, opts in options.items() if opts}


@dataclass
class Scanned:
    """Every root scanned and compared with the catalog."""

    todo: list = field(default_factory=list)
    removed: list = field(default_factory=list)
    changed: set = field(default_factory=set)  # (root, relpath) of todo files the catalog held already
    unchanged: int = 0
    kept: int = 0  # rows kept because their folder could not be listed
    listing_errors: list = field(default_factory=list)  # [{"root", "folder", "reason"}]
    no_images: list = field(default_factory=list)  # roots that listed fine and hold no image
    errors_by_root: dict = field(default_factory=dict)  # for meta listing_errors
    devices: dict = field(default_factory=dict)  # {folder root: st_dev} of those listed with entries in them
    mounts: dict = field(default_factory=dict)  # {folder root: its MOUNTS after this listing}, of those listed
    # {folder root: (when this run's listing of it started, its UNREAD: the folders it could not list, of a whole
    # listing; None, the folders it listed with no listing error, of a listing of some folders: READ)}
    listed: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)  # entries that share one catalog key (see _one_per_key)
    caption_links: list = field(default_factory=list)  # unchanged rows whose sidecar caption is a link: read again
    # (root, relpath, when its listing began) of files whose status changed but whose content is the one recorded
    # (scan.confirm): their rows' indexed_at moves to that listing, so the next run does not hash them again
    confirmed: list = field(default_factory=list)


@dataclass(frozen=True, kw_only=True)
class Scope:
    """What a run lists, where changes were seen (`index --watch`): {root: folders relative to it, "" the whole
    root}. A known root not named is not listed, its rows and listing errors stay as they are; a folder root is
    listed only under its folders (each lifted to the nearest one a listing of the root reaches: scan.listable),
    so only the rows under them can be found gone. Its folders holding links (LinkFolders) and those the last
    runs could not list are listed too, named or not. A root new to the index, a list, a shard or a URL prefix is
    listed whole."""

    folders: dict[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass
class LinkFolders:
    """The folders (relative, "" the root) of each folder root that hold links to files, as the listings so far
    found them; `index --watch` keeps one across its runs. A link's row holds its target's size and time, and the
    target may change in another folder or root, where the watcher sees it; a caption that is a link is read again
    by each listing of its photo's folder: every scoped run lists these folders too, so a link follows its target
    as a full listing would."""

    folders: dict[str, set[str]] = field(default_factory=dict)
    # the links to folders (relative) the listings met: inotify watches a folder once whatever the paths to it, and
    # watchfiles names it by the last path it came to it by, maybe such a link; the link removed takes that one
    # watch with it, so `index --watch` starts its watcher anew when one of these changes
    to_folders: dict[str, set[str]] = field(default_factory=dict)

    def listed(self, root: str, folders: tuple[str, ...] | None, found: list[str], unlisted: list[str],
               to_folders: list[str] = ()) -> None:
        """A listing of `root` (under `folders`, None the whole root) found links to files in the folders `found`,
        and the links to folders `to_folders`; those known under the folders it could not list (`unlisted`) stay."""
        listed = [""] if folders is None else list(folders)
        for known, now in ((self.folders, found), (self.to_folders, to_folders)):
            known[root] = {k for k in known.get(root, ()) if scan._under(k, unlisted)
                           or not scan._under(k, listed)} | set(now)

    def caption_targets(self) -> set[str]:
        """The real paths of the texts that the caption links (photo.txt) in these folders lead to, read now: an
        edit of one changes a caption each listing of the link's folder reads again."""
        return {target for target, (_, name) in self._targets().items() if name.endswith(".txt")}

    def targets_outside(self, roots: list[str]) -> dict[str, str]:
        """{real path: the root of a link leading there} of what the links in these folders lead to outside every
        root, read now: no watch of a root sees a change there, which each listing of the link's folder finds (a
        link's row holds its target's size and time; a caption link's text is read again)."""
        return {target: root for target, (root, _) in self._targets().items()
                if not any(scan.at_or_under(target, r) for r in roots)}

    def _targets(self) -> dict[str, tuple[str, str]]:
        """{real path: (root, the link's name)} of what the links in these folders lead to, read now."""
        out: dict[str, tuple[str, str]] = {}
        for root, folders in self.folders.items():
            for folder in folders:
                try:
                    with os.scandir(os.path.join(root, folder) if folder else root) as it:
                        out.update((os.path.realpath(e.path), (root, e.name)) for e in it if e.is_symlink() and not e.is_dir())
                except OSError:
                    continue  # gone or unreadable now: the next run lists it and says so
        return out


def outermost(folders) -> tuple[str, ...]:
    """The folders (relative) that none of the others holds, sorted; "" holds them all."""
    given = set(folders)
    if "" in given:
        return ("",)

    def held(folder: str) -> bool:
        while folder:
            folder = os.path.dirname(folder)
            if folder in given:
                return True
        return False

    return tuple(sorted(f for f in given if not held(f)))


def _scoped(scope: Scope | None, root: str, known: list[str], include_hidden: bool,
            skip: str | None, also: set[str] = frozenset()) -> tuple[str, ...] | None:
    """The folders of `root` this run lists: None the whole root, () none. also: folders every scoped run lists
    (those holding links to files, LinkFolders; those the last runs could not list)."""
    if scope is None or root not in known:
        return None
    if sources.kind(root) != sources.FOLDER:
        return None if root in scope.folders else ()
    wanted = [*scope.folders.get(root, ()), *sorted(also)]
    if not wanted:
        return ()
    folders = outermost(scan.listable(root, f, include_hidden, skip) for f in wanted)
    return None if folders == ("",) else folders


def _relative(root: str, shown: str) -> str:
    """A folder of a root as a listing error names it (_shown_folder), relative again ("" the root); a name shown
    with \\xNN for bytes that are not UTF-8 names no folder, and `listable` lifts it to the nearest one above."""
    return "" if shown == root else os.path.relpath(shown, root)


def unlisted(root: str, errors: list[dict]) -> set[str]:
    """The folders (relative, "" the root itself) that the listing errors remembered for `root` name."""
    return {_relative(root, e["folder"]) for e in errors}


def _shown_folder(root: str, folder: str) -> str:
    """A folder of a root (relative) as a listing error names it."""
    return sources.shown_name(*scan.printable(sources.location(root, folder))) if folder else root


def scan_all(db, roots: list[str], known: list[str], options: dict, columns: dict, skip: str | None = None,
             scope: Scope | None = None, links: LinkFolders | None = None, lists: dict | None = None) -> Scanned:
    """List every root (those of `scope`, and only there, when given) and diff it with its catalog rows. A root
    or folder that cannot be listed keeps its rows and is reported; a new root that cannot be listed at all is
    refused (BadInputError). skip: a folder never listed (the index's own, resolved). links: the folders holding
    links to files, listed too when scoped, updated by each listing. lists: the run's tables of list roots
    (sources.list_table), the ones privacy.keep_private judged."""
    out = Scanned()
    with db.connect() as conn:
        before = state.read(conn).roots.listing_errors if scope is not None else {}
        recorded_links = catalog.links_of(conn)  # {file id: target}: the rows whose name was a link
        for root in roots:
            errors: list[scan.ListingError] = []
            hidden = options.get(root, {}).get("include_hidden", False)
            # a folder a run could not list is listed again, as a full run would (a flaky disk, too many open files)
            also = unlisted(root, before.get(root, [])) | (links.folders.get(root, set()) if links else set())
            folders = _scoped(scope, root, known, hidden, skip, also)
            if folders == ():
                out.errors_by_root[root] = before.get(root, [])
                continue
            log.info("listing %s%s", root, f" under {', '.join(folders)}" if folders else "")
            linked: list[str] = []
            to_folders: list[str] = []
            rows = catalog.files_under(conn, root, folders and tuple(scan.printable(f)[0] for f in folders))
            local = sources.kind(root) == sources.FOLDER and not sources.is_url(root)
            device = scan.folder_device(root) if local else None
            recorded = options.get(root, {}).get(DEVICE)
            # looked into only where the device is not the one recorded: a scoped run lists no more than its folders
            empty = device is not None and device != recorded and scan.empty_folder(root, include_hidden=hidden)
            if rows and root in known and looks_unmounted(recorded, device, empty):
                found, errors = [], [scan.ListingError("", unplugged_reason(root))]
            else:
                mounts: dict[str, int] | None = {} if local else None
                started = time.time()
                since = _since(options.get(root, {}).get(LISTED), started, bool(rows)) if local else None
                recorded_mounts = options.get(root, {}).get(MOUNTS, {}) if local else {}
                away = [rel for rel in unplugged_mounts(root, recorded_mounts, folders, include_hidden=hidden,
                                                        indexed=lambda rel: _files_under(root, rows, rel))
                        if any(scan.at_or_under(r, scan.printable(rel)[0]) for r in rows)]
                # their rows are kept as under any folder that cannot be listed: the next run looks again
                errors += [scan.ListingError(rel, unplugged_reason(_shown_folder(root, rel), scan.empty_folder(
                    os.path.join(root, rel), include_hidden=hidden))) for rel in away]
                try:
                    if not sources.exists(root):
                        raise FileNotFoundError(f"{root} is missing")
                    found = list(scan.scan(root, hidden, columns.get(root), errors, options.get(root, {}).get(
                        "caption_column"), skip, folders, linked, to_folders, mounts=mounts,
                        captions_since=since, captions_unread=options.get(root, {}).get(UNREAD),
                        captions_read={f: t for f, t in options.get(root, {}).get(READ, {}).items() if t <= started},
                        lists=lists))
                except Exception as exc:  # noqa: BLE001 - a source that cannot be listed, whatever its backend says
                    reason = str(exc) if isinstance(exc, (BadInputError, FileNotFoundError)) else f"{type(exc).__name__}: {exc}"
                    if root not in known:  # a new root is only remembered once it could be listed
                        raise BadInputError(f"cannot index {root}: {reason}") from None
                    found, errors = [], [scan.ListingError("", reason)]
                if away:  # what is there is the disk below the drive (a photo saved there meanwhile): not indexed,
                    # or indexed, it was a file of that folder that is there, and the drive's looked deleted next run
                    keys = [scan.printable(a)[0] for a in away]
                    found = [f for f in found if not any(scan.at_or_under(f.relpath, k) for k in keys)]
                if device is not None and device != recorded and not empty and not any(e.folder == "" for e in errors):
                    out.devices[root] = device  # listed with entries in it: the device its files are on
                if mounts is not None and not any(e.folder == "" for e in errors):
                    out.mounts[root] = _kept_mounts(recorded_mounts, mounts, [e.folder for e in errors], folders)
                    if folders is None:  # whole: what it saw changed before it started, but for what it could not list
                        out.listed[root] = (started, _unread(options.get(root, {}), [e.folder for e in errors]), None)
                    elif since is not None:  # some folders: those it listed whole, nothing under them left unlisted
                        done = tuple(f for f in folders if not any(scan.at_or_under(e.folder, f)
                                                                   or scan.at_or_under(f, e.folder) for e in errors))
                        if done:
                            out.listed[root] = (started, None, done)
            if root not in known and any(e.folder == "" for e in errors):
                raise BadInputError(f"cannot index {root}: {errors[0].reason}")
            if links is not None and sources.kind(root) == sources.FOLDER:
                links.listed(root, folders, linked, [e.folder for e in errors], to_folders)
            found = _one_per_key(root, found, out.notes)
            d = scan.diff(found, rows, [e.folder for e in errors], recorded_links)
            same, differ = scan.confirm(d.suspects)
            d.todo += differ
            d.unchanged += len(d.suspects) - len(differ)  # the same content, and those that cannot be read now
            out.confirmed += [(f.root, f.relpath, f.listed_at) for f in same]
            out.todo += d.todo
            out.removed += d.removed
            out.changed.update((f.root, f.relpath) for f in d.todo if f.relpath in rows)
            out.unchanged += d.unchanged
            todo = {f.relpath for f in d.todo}
            # captions read again on unchanged photos: a link's (its target may have changed), and one made, edited or
            # removed since the root's last whole listing (scan.scan_folder's captions_since)
            out.caption_links += [rows[f.relpath] for f in found if f.caption_link and f.relpath in rows
                                  and f.relpath not in todo and rows[f.relpath].status == catalog.INDEXED]
            out.kept += d.kept
            listed = [{"folder": _shown_folder(root, e.folder), "reason": e.reason} for e in errors]
            out.errors_by_root[root] = listed if folders is None else [  # those of folders not listed now stay
                e for e in before.get(root, []) if not any(scan.at_or_under(e["folder"], _shown_folder(root, f))
                                                           for f in folders)] + listed
            out.listing_errors += [{"root": root, **e} for e in listed]
            if not found and not errors and folders is None:
                out.no_images.append(root)
    return out


def _since(listed: float | None, now: float, indexed: bool) -> float | None:
    """The time captions count as read up to (LISTED); 0 (every caption read again, once) when it is ahead of the
    clock (recorded while the clock was ahead, every caption edited until the clock caught up looked read), or when
    none is recorded for a root holding indexed files (an index made before LISTED was: a caption fixed meanwhile
    stayed old for good). None: a root new to the index, whose captions are all read as its files are indexed."""
    if listed is None:
        return 0 if indexed else None
    return 0 if listed > now else listed


def _unread(recorded: dict, unlisted: list[str]) -> dict[str, float]:
    """A root's UNREAD after a whole listing that could not list `unlisted` (relative folders): each keeps the time
    its captions were read up to (LISTED, an earlier UNREAD at, above or under it; 0 when none: read them all once
    it can be listed). Had LISTED stayed as it was until a listing listed every folder, a root holding one folder
    it can never list (a drive's lost+found) never read an edited caption again."""
    before = recorded.get(UNREAD, {})
    return {u: min([recorded.get(LISTED) or 0] + [t for f, t in before.items()
                                                  if scan.at_or_under(u, f) or scan.at_or_under(f, u)])
            for u in unlisted}


def _files_under(root: str, rows: dict, folder: str) -> Iterable[tuple[str, int]]:
    """(path, size indexed) of the catalogued files (rows: files_under's) under `folder` (relative) of a root."""
    key = scan.printable(folder)[0]
    return ((sources.location(root, r.relpath, r.relpath_raw), r.size) for k, r in rows.items()
            if scan.at_or_under(k, key))


def _one_per_key(root: str, found: list, notes: list) -> list:
    """One entry per catalog key (root, relpath). Keys are lossless (sources.catalog_key), so only entries
    with one name share one: duplicate members of a tar shard. The last one listed is kept, as tar extracts
    the last member of a name, and each name is reported once per run (without this, every run "updated" it
    and added a vector row)."""
    seen: dict[str, int] = {}
    counts: dict[str, int] = {}
    for i, f in enumerate(found):
        seen[f.relpath] = i
        counts[f.relpath] = counts.get(f.relpath, 0) + 1
    if len(seen) == len(found):
        return found
    for relpath, n in counts.items():
        if n > 1:
            notes.append(f"{sources.location(root, relpath, found[seen[relpath]].relpath_raw)}: {n} entries share this name in the catalog "
                         "(duplicate members); only the last one listed is indexed")
    return [f for i, f in enumerate(found) if seen[f.relpath] == i]


def remember(db, roots: list[str], columns: dict, options: dict, scanned: Scanned) -> None:
    """Record the roots, their options (with the device each folder root listed with entries is on) and errors."""
    options = {r: o for r, o in options.items() if r in roots}
    for r, device in scanned.devices.items():
        if r in roots:
            options[r] = {**options.get(r, {}), DEVICE: device}
    for r, mounts in scanned.mounts.items():
        if r in roots:
            mine = {k: v for k, v in options.get(r, {}).items() if k != MOUNTS}
            options[r] = {**mine, MOUNTS: mounts} if mounts else mine
    options = {r: o for r, o in options.items() if o}
    with db.begin() as conn:
        errors = {r: e for r, e in scanned.errors_by_root.items() if e}
        state.write(conn, roots=state.RootsState(roots=tuple(roots), list_columns=columns, listing_errors=errors,
                                                 options=options))


def remember_listed(db, scanned: Scanned) -> None:
    """Record when each root this run listed whole started its listing (LISTED), or, listed only under some folders,
    those folders with that time (READ), once the captions it found changed are read again (photos.recaption):
    recorded with the roots, before the encoding, a run killed meanwhile left the next one taking those captions for
    read, and their old text stayed for good."""
    if not scanned.listed:
        return
    with db.begin() as conn:
        recorded = state.read(conn, "roots").roots
        options = dict(recorded.options)
        for r, (started, unread, some) in scanned.listed.items():
            if r in recorded.roots and some is None:  # a whole listing: READ's folders are all older
                mine = {k: v for k, v in options.get(r, {}).items() if k not in (UNREAD, READ)}
                options[r] = {**mine, LISTED: started, **({UNREAD: unread} if unread else {})}
            elif r in recorded.roots:
                read = {f: t for f, t in options.get(r, {}).get(READ, {}).items()
                        if not any(scan.at_or_under(f, g) for g in some)}  # those under its folders are older
                read.update(dict.fromkeys(some, started))
                latest = sorted(read.items(), key=lambda item: item[1])[-READ_MOST:]
                options[r] = {**options.get(r, {}), READ: dict(latest)}
        state.write(conn, roots=replace(recorded, options=options))


def report(db) -> list[dict]:
    """Every root with its counts (indexed, failed), state (ok, missing, listing errors), options (not the
    recorded device) and the folders its last run could not list. A folder root that looks unmounted now (an
    empty folder on another device than recorded, holding indexed files) is missing too."""
    with db.connect() as conn:
        remembered = state.read(conn).roots
        roots, options, errors = remembered.roots, remembered.options, remembered.listing_errors
        counts = count_by_root(conn)
    out = []
    for root in roots:
        try:
            present = sources.exists(root)
        except BadInputError:
            present = False
        recorded = errors.get(root, [])
        c = counts.get(root, {})
        mine = options.get(root, {})
        device = scan.folder_device(root) if present and sources.kind(root) == sources.FOLDER and not sources.is_url(root) else None
        unplugged = (any(c.values()) and device is not None and device != mine.get(DEVICE)
                     and looks_unmounted(mine.get(DEVICE), device, scan.empty_folder(
                         root, include_hidden=bool(mine.get("include_hidden")))))
        if present:  # a root the last run found missing and that is back (a restored shard, a remounted disk)
            recorded = [e for e in recorded if not (e["folder"] == root and e["reason"] == f"{root} is missing")]
        if not unplugged:  # ... or a drive back in place of its empty mount point
            recorded = [e for e in recorded if not (e["folder"] == root and e["reason"] == unplugged_reason(root))]
        health = "missing" if not present or unplugged else "listing errors" if recorded else "ok"
        out.append({"root": root, "indexed": c.get(catalog.INDEXED, 0), "failed": c.get(catalog.FAILED, 0),
                    "state": health, "options": {k: v for k, v in mine.items() if k not in INTERNAL},
                    "listing_errors": recorded})
    return out


def refuse_names_not_utf8(roots: list[str]) -> None:
    """A root whose path (as given, or the absolute path it stands for) is not UTF-8 is refused (exit 6), nothing
    written: the catalog records a root as text, and such a root failed at its first read of the catalog with
    "unexpected UnicodeEncodeError" (the names of files and folders below a root may be any bytes: path_b64)."""
    for root in roots:
        for name in (root,) if sources.is_url(root) else (root, os.path.abspath(root)):
            try:
                name.encode("utf-8")
            except UnicodeEncodeError:
                shown = os.fsencode(name).decode("utf-8", "backslashreplace")
                raise BadInputError(f"cannot index {shown}: its path is not UTF-8, which a root's must be (the names "
                                    "below it may be any bytes): rename the folder, or index a folder above it") from None


def refuse_index_folder(roots: list[str], index_dir: Path) -> None:
    """A root that is the index folder or inside it would index the index's own files (the server's thumbnail
    cache as photos): refused (exit 6)."""
    try:
        own = Path(index_dir).resolve()
    except RuntimeError:  # a symlink loop, as Python before 3.13 reports one
        raise UsageError(f"--index {index_dir} is a symlink loop: give a folder") from None
    for root in roots:
        if sources.kind(root) == sources.FOLDER and not sources.is_url(root):
            path = Path(root).resolve()
            if path == own or own in path.parents:
                where = "the index folder" if path == own else f"inside the index folder {own}"
                raise BadInputError(f"{root} is {where}: give the folder of your images, e.g. "
                                    "`alignsearch index ./photos`")


def match(root: str, roots: list[str]) -> str | None:
    """The known root a name given on the command line means, even when its folder is gone."""
    if root in roots:
        return root
    candidates = {root.rstrip("/"), os.path.abspath(root)}
    if not sources.is_url(root):
        candidates.add(str(Path(root).resolve()))
    return next((r for r in roots if r in candidates), None)


def forget(conn, root: str) -> tuple[str, int]:
    """Drop a root and its rows from the catalog, in the caller's transaction (forget_root: the ANN index's
    commit); returns (root, files)."""
    recorded = state.read(conn).roots
    roots = list(recorded.roots)
    name = known_root(root, roots)
    removed = delete_root(conn, name)
    state.write(conn, roots=state.RootsState(
        roots=tuple(r for r in roots if r != name),
        options={r: o for r, o in recorded.options.items() if r != name},
        list_columns={r: c for r, c in recorded.list_columns.items() if r != name},
        listing_errors={r: e for r, e in recorded.listing_errors.items() if r != name}))
    return name, removed


def known_root(root: str, roots: list[str]) -> str:
    """The root of `roots` that `root` names; BadInputError if none. An empty name is said so, as `index ''` says
    it (it was "error:  is not a root": the name shown as nothing)."""
    listed = ", ".join(roots) or "none"
    if not root.strip():
        raise BadInputError(f"an empty root was given: name one of this index's roots ({listed}); see `alignsearch roots`")
    name = match(root, roots)
    if name is None:
        raise BadInputError(f"{root} is not a root of this index (its roots: {listed}); see `alignsearch roots`")
    return name


def forget_root(index_dir, root: str) -> dict:
    """`alignsearch forget ROOT`: drop the root's rows from the catalog in the transaction that commits the ANN
    index without them (one writer at a time; a run killed before leaves both as they were: a catalog ahead
    of its ANN index answered fewer than k). Works when the root's folder is gone. ROOT may be the shard pattern
    `index` was given (`part-{000..099}.tar`): every root it names is forgotten in that one commit, and none when
    one of them is not a root (the pattern was refused as no root, so 100 shards took 100 commands)."""
    from alignsearch.storage import vectors
    from alignsearch.storage.paths import ANN_FILE, DB_FILE
    from indexer import build, compact
    from indexer.lock import writer_lock

    out = Path(index_dir)
    with writer_lock(out):
        db = catalog.connect(out / DB_FILE)
        try:
            with db.connect() as conn:
                st = state.read(conn)
                given = sources.expand(root) if sources.is_pattern(root) else [root]
                names = list(dict.fromkeys(known_root(r, list(st.roots.roots)) for r in given))
                store = vectors.load(conn, out, st.model.dim) if st.model else None
                live = catalog.live_pairs(conn, without_root=names)  # the ANN index once they are forgotten
            compact.remove_leftovers(db, out)  # a killed compaction's copy (a mistyped root touched nothing)
            done = []
            if store is None:
                with db.begin() as conn:
                    done += [forget(conn, name) for name in names]
                built = {}
            else:
                built = build.sync_index(db, store, out / ANN_FILE, live=live,
                                         on_commit=lambda conn: done.extend(forget(conn, name) for name in names))
            compacted = compact.compact(db, out) if store is not None else None  # when due
        finally:
            db.dispose()
    shown = done[0][0] if len(done) == 1 else f"{root} ({len(done)} roots)"
    return {"root": shown, "files": sum(n for _, n in done), "vectors": built.get("vectors"),
            "compacted": compacted.to_dict() if compacted else None}


# Catalog queries on roots (the tables are alignsearch/storage/catalog.py's).


def count_by_root(conn: Connection) -> dict[str, dict[str, int]]:
    """{root: {status: files}} for every root that has rows."""
    files = catalog.files
    out: dict[str, dict[str, int]] = {}
    query = select(files.c.root, files.c.status, func.count()).where(files.c.moment == 0)  # a video once
    for root, status, n in conn.execute(query.group_by(files.c.root, files.c.status)):
        out.setdefault(root, {})[status] = n
    return out


def delete_root(conn: Connection, root: str) -> int:
    """Delete every row of one root (and their tags, photo fields, keyword text and perceptual hashes: nothing of
    a forgotten root stays in the catalog); returns how many files it held, a video once (its first moment), as
    `roots` and `info` count them: the deleted rows counted each moment, so `forget` named more files than `roots`."""
    files, tags = catalog.files, catalog.tags
    held = conn.execute(select(func.count()).select_from(files).where(files.c.root == root, files.c.moment == 0)).scalar()
    conn.execute(delete(tags).where(tags.c.file_id.in_(select(files.c.id).where(files.c.root == root).scalar_subquery())))
    catalog.forget_extras(conn, [i for (i,) in conn.execute(select(files.c.id).where(files.c.root == root))])
    conn.execute(delete(files).where(files.c.root == root))
    if catalog.has_phashes(conn):
        catalog.forget_stale_phashes(conn)
    return int(held or 0)


def move_file(conn: Connection, file_id: int, root: str, relpath: str, relpath_raw: bytes | None) -> None:
    """Give a row another root and relative path (a root taken over by a folder containing it): id, vector
    and everything else stay."""
    files = catalog.files
    conn.execute(update(files).where(files.c.id == file_id).values(root=root, relpath=relpath, relpath_raw=relpath_raw))
