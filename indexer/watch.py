"""`alignsearch index --watch`: after the run, watch the index's local roots and run `index` again (the same job,
indexer/job.py's index_folders) once changes settle.

How it goes: watchfiles (inotify, or polling on network file systems) watches each local folder root and each
local list or shard file, in a thread that queues every change, also while a run is going, so a change made
during a run starts the next one. The main thread waits for a batch, keeps the changes that matter (`matters`:
a file the indexer reads, a folder; not hidden files unless the root includes them, not the index's own folder,
not an editor's or a browser's temporary file) and runs `index` again, listing only the folders that hold the
changes (`listing_folder`; indexer/roots.py Scope) rather than every root: a run after a watcher restart, a
flood of changes (full_after) or a failed run lists every root whole, as the first does. Batches that came during
a run make one run after it. The writer lock is taken per run, so `forget`, `tag` or another `index` work between
runs; a run that finds the lock taken waits and tries again. The encoder stays loaded between runs (job.EncoderCache)
while the index's model is the one it loaded.

A root that disappears (a drive unmounted, a folder moved away) is left to the run: the index keeps its files
(state "missing" in `alignsearch roots`) as a normal run does. The watch checks each root's identity (device,
inode, and whether it can be read) every second: a root back, replaced, moved in again or made readable is watched
anew and indexed. So is each drive mounted inside a root (`inner_mounts`, from /proc/self/mountinfo every second,
and one unmounted since, even if mounted again with the id it had: DrivesGone):
inotify reports no mount nor unmount, so a drive plugged in at photos/nas was never watched and an unplugged one's
mount point no longer; a change makes a run listing every root, which keeps an unplugged drive's files
(indexer/roots.py MOUNTS). A folder root that
came back empty on another device (an unmount that leaves its mount point) holds every run until it is back
(`looks_unmounted`, indexer/roots.py: the rule a run applies to the device the index recorded, which keeps the
root's files as for a missing one). URL roots (s3://..., https://...) cannot be watched: said once; each run lists them
as `index` does, and --watch-interval makes a run that often to list them.

One watch per index: a second `index --watch` of it is refused (WATCH_LOCK). The index folder deleted or moved
away ends the watch (a run would start a new, empty index there). watchfiles follows links to folders, which a run
never does (scan.scan_folder): a change reached through one is a change where the link leads, if a root holds
that (inotify watches a folder once, and names its changes by whichever path it came to it by last), else none.

The decisions (`matters`, `touched`, `listing_folder`, `run_scope`, `listed_again`, `relinked`, `unnamed_change`,
`identity_changed`, `inner_mounts`, `later_job`, `ends_watch`, `network_fs`; `looks_unmounted` in indexer/roots.py) are pure functions.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import queue
import re
import select
import signal
import stat
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from alignsearch.errors import BadInputError, CatalogBusyError, IndexDamagedError, \
    IndexNotFoundError, ModelLoadError, ModelMismatchError
from alignsearch.media import sources
from indexer import scan
from indexer.lock import WATCH_LOCK, take_lock
from indexer.roots import Scope, looks_unmounted

log = logging.getLogger(__name__)

# Names of files still being written by an editor, an office suite or a browser, renamed when done.
TEMPORARY_SUFFIXES = (".part", ".partial", ".crdownload", ".download", ".opdownload", ".filepart", ".tmp", ".temp",
                      ".swp", ".swo", ".swx", ".!qb", ".!ut", "~")
TEMPORARY_PREFIXES = ("~$", ".~lock.", ".#", "#")
# File systems where inotify sees only this machine's changes: polled.
NETWORK_FS = frozenset({"nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "afs", "ceph", "glusterfs", "lustre", "davfs",
                        "fuse.sshfs", "fuse.rclone", "fuse.s3fs", "fuse.gcsfuse", "fuse.glusterfs", "virtiofs",
                        "vboxsf", "fuse.vmhgfs-fuse"})
ADDED, MODIFIED, DELETED = 1, 2, 3  # watchfiles.Change values


@dataclass(frozen=True, kw_only=True)
class WatchOptions:
    polling: bool | None = None  # None: poll the roots on network file systems (NETWORK_FS), inotify elsewhere
    settle_ms: int = 1_000  # a batch is due once no change came for this long
    max_batch_ms: int = 10_000  # ... or this long after its first change, when changes keep coming
    tick_s: float = 1.0  # how often roots are checked (gone, back, replaced) while waiting
    lock_retry_s: float = 2.0  # wait before trying again when another process writes the index
    interval_s: float | None = None  # with URL roots (not watched): a run at least this often, to list them
    # A run lists only the folders where changes were seen, unless its batches held this many changes: then every
    # root whole, as after a watcher restart (changes may be missed in between) or a failed run. inotify drops
    # events when its queue (fs.inotify.max_queued_events, 16,384 by default) overflows, and watchfiles passes no
    # word of it on (notify's rescan event carries no path), so a flood is taken for a possible loss.
    full_after: int = 2_000
    # The caller exits once the watch returns (the CLI): after a stop by SIGINT or SIGTERM both stay ignored until
    # the process ends. Restored, a second Ctrl-C (a terminal's to the process group, a key pressed twice) while
    # closing raised KeyboardInterrupt past the one line said, or once Python's own finalization had put SIGINT
    # back to the system default, killed the process by the signal (exit -2) with no line at all.
    process_ends: bool = False


@dataclass
class Root:
    """What the watch knows of one root of the index."""

    name: str
    include_hidden: bool = False
    identity: tuple[int, int, bool] | None = None  # (st_dev, st_ino, readable) when it last held files; None: missing
    seen: tuple[int, int, bool] | None = None  # (st_dev, st_ino, readable) when last looked at
    held: bool = False  # looks unmounted: runs wait


def watchable(root: str) -> bool:
    """A local folder, list or shard: watched. A URL prefix, list or shard is not."""
    return not sources.is_url(root)


def _temporary(name: str) -> bool:
    lower = name.lower()
    return lower.endswith(TEMPORARY_SUFFIXES) or name.startswith(TEMPORARY_PREFIXES)


def owner(path: str, roots: list[str]) -> str | None:
    """The root a changed path belongs to (the root itself included), the deepest when roots nest."""
    best = None
    for root in roots:
        if scan.at_or_under(path, root):
            if best is None or len(root) > len(best):
                best = root
    return best


def matters(change: int, path: str, root: str, *, include_hidden: bool, skip: str, is_dir: bool | None,
            known_folder: bool = False, caption_link: bool = False, unlisted: bool = False) -> bool:
    """Whether a change at `path` (under `root`, or the root itself) may change what a run indexes.

    is_dir: whether the path is a folder now (None: it is gone). A folder added, deleted or renamed may carry images
    (a rename reports the folder alone); a folder "modified" is only its own time stamps (polling sees those for
    every file made in it) or modes, unless an earlier run could not list it (unlisted: a chmod that makes it
    readable shows as nothing else, and inotify could not watch inside it). A file counts when the indexer would
    read it (scan._wanted: an image or video by extension, not junk, not hidden unless the root includes hidden
    files); a gone path with no extension may have been a folder, and so was one the catalog holds files under
    (known_folder: "2024.trip" moved away, or "#2024", named like a temporary file; a file now, made in the place of
    a moved folder). A link made or removed is a change of its folder (one put in the place of a folder takes that
    folder's files away); a path through a link to a folder is first made the one it leads to (`touched`).
    caption_link: the path is a .txt that is a link (a photo's sidecar caption, which every listing of its folder
    reads again: one made or pointed elsewhere changes the photo's caption), or a photo's sidecar caption (the
    listing reads one made, edited or removed since the root's last whole listing). Never the index's own folder (skip),
    nor a temporary file: a name no listing reads (a folder is none, whatever its name, nor is a photo named
    `#1.jpg`)."""
    if scan.at_or_under(path, skip):
        return False
    if path == root:  # the root itself came or went, or a list or shard file changed
        return True
    rel = os.path.relpath(path, root)
    name = os.path.basename(path)
    if not include_hidden and any(part.startswith(".") for part in rel.split(os.sep)):
        return False
    if is_dir:  # whatever its name: a listing walks `#2024` and `scans.tmp` too
        return change != MODIFIED or unlisted
    if known_folder or caption_link:  # a folder the catalog holds files under (gone, or a file now); a caption link
        return True
    if scan._wanted(rel.replace(os.sep, "/"), include_hidden):  # a listing reads `#1.jpg` whatever its name
        return True
    return not _temporary(name) and is_dir is None and not os.path.splitext(name)[1]


def listing_folder(path: str, root: str) -> str:
    """The folder (relative to `root`, "" the root) whose listing shows a change at `path` (a path under `root`,
    or the root itself): the folder holding it. A file made, changed or gone shows there, and so does a folder
    made, gone or renamed (which, gone, has no listing of its own); the root itself, a list or a shard: the
    whole root."""
    return "" if path == root else os.path.dirname(os.path.relpath(path, root))


def real_location(path: str) -> str:
    """`path` with no link to a folder on the way (its folder resolved; the path itself, a file or a link, kept)."""
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


def touched(changes, roots: dict[str, bool], skip: str, is_dir: Callable[[str], bool | None],
            known_folder: Callable[[str, str], bool] = lambda root, path: False,
            linked: Callable[[str, str], bool] = lambda root, path: False,
            unlinked: Callable[[str], str] = real_location,
            is_link: Callable[[str], bool] = os.path.islink,
            unlisted: Callable[[str, str], bool] = lambda root, path: False,
            caption_target: Callable[[str], bool] = lambda path: False,
            outside: Callable[[str], str | None] = lambda path: None,
            sidecar: Callable[[str], bool] = lambda path: False) -> dict[str, list[str]]:
    """{root: the listing_folder of each change that matters} for a batch of (change, path); roots: {root:
    include_hidden}. known_folder(root, path) is asked only of paths gone, or deleted and now files, that would not be a
    file the indexer reads; linked(root, path) of every path below a root, and unlinked(path) of those it says are
    reached through a link to a folder: the path without links (`real_location`). A run never follows such a link, so
    the change is one of the folder the link leads to: inotify watches a folder once whatever the paths to it, and names
    its changes by the path it came to it by last, so a root's own folder linked from elsewhere in the roots (other/fav
    -> photos/2024) had its changes named through the link only, and they started no run. is_link(path) is asked of .txt
    files (a caption that is a link), unlisted(root, path) of folders modified (one an earlier run could not list?),
    caption_target(path) of .txt paths: one a caption link leads to (hidden or not) makes a run with no folder of its
    own, as the folders holding such links are listed by every scoped run; outside(path) of paths outside every root:
    the root of a link leading there (watched in its own folder: `_Outside`), which makes such a run too; sidecar(path)
    of .txt paths that are no link: whether a photo or video of its stem is beside it (its caption, made, edited or
    removed: a run lists its folder, which reads the caption again)."""
    out: dict[str, list[str]] = {}
    gone = {path for change, path in changes if int(change) == DELETED}
    for change, path in changes:
        root = owner(path, list(roots))
        if root is not None and path != root and linked(root, path):
            path = unlinked(path)
            root = owner(path, list(roots))  # none: a folder outside the roots, which no run lists
        if root is None:
            linker = outside(path)
            if linker is not None:
                out.setdefault(linker, [])
            continue
        if path.endswith(".txt") and not scan.at_or_under(path, skip) and caption_target(path):
            out.setdefault(root, [])
            continue
        kind = is_dir(path)
        # a path gone, or deleted and made a file in one batch (a folder moved away and a file of its name made), that
        # is no file a listing reads may have been a folder: the catalog tells
        odd = (kind is None or (kind is False and path in gone)) and path != root and not scan._wanted(
            os.path.relpath(path, root).replace(os.sep, "/"), True)
        if matters(int(change), path, root, include_hidden=roots[root], skip=skip, is_dir=kind,
                   known_folder=odd and known_folder(root, path),
                   caption_link=path.endswith(".txt") and ((kind is False and is_link(path)) or sidecar(path)),
                   unlisted=kind is True and int(change) == MODIFIED and unlisted(root, path)):
            out.setdefault(root, []).append(listing_folder(path, root))
    return out


def run_scope(pending: dict[str, list[str]], roots: list[str]) -> Scope:
    """What a run after these changes ({root: listing folders}, from `touched`) lists: those folders, and each
    root that is not watched (a URL: every run lists it) or is a list (its entries are files elsewhere, a folder
    root's photos say, whose changes are seen there, never in the list file: every run lists it)."""
    return Scope(folders={**{r: ("",) for r in roots if not watchable(r) or sources.kind(r) == sources.LIST},
                          **{r: tuple(sorted(set(folders))) for r, folders in pending.items()}})


def listed_again(before: dict[str, set[str]], after: dict[str, set[str]]) -> dict[str, list[str]]:
    """{root: folders} that a run could not list before a run and could after it ({root: folders} each, relative):
    inotify cannot watch a folder it cannot read and never comes back to one made readable, so the watcher is
    started anew, and a run lists every root (as after any restart: watchfiles drops the changes a watcher holds
    as it stops)."""
    out = {root: sorted(folders - after.get(root, set())) for root, folders in before.items()}
    return {root: folders for root, folders in out.items() if folders}


def relinked(changes, links) -> bool:
    """Whether a change of the batch is at a link to a folder that listings met (links: roots.LinkFolders): made
    anew, or gone, it may have taken with it the one inotify watch of the folder it led to (see LinkFolders)."""
    if not any(links.to_folders.values()):
        return False
    for _, path in changes:
        for root, known in links.to_folders.items():
            if path != root and scan.at_or_under(path, root) and os.path.relpath(path, root) in known:
                return True
    return False


def unnamed_change(exc: BaseException) -> bool:
    """Whether the watcher ended on a change at a path it cannot give as text (a name that is not UTF-8:
    watchfiles raises for its whole batch, polling too): notifications work, and what changed is found by a
    run listing every root."""
    return isinstance(exc, RuntimeError) and "Unable to decode path" in str(exc)


def through_link(root: str, path: str) -> bool:
    """Whether `path` is reached from `root` through a link to a folder (roots are real paths:
    sources.normalise resolves them)."""
    folder = os.path.dirname(path)
    try:
        real = os.path.normpath(os.path.join(os.path.realpath(root), os.path.relpath(folder, root)))
        return os.path.realpath(folder) != real
    except OSError:
        return False


def path_kind(path: str) -> bool | None:
    """True a folder, False a file (or something else), None gone."""
    try:
        return os.path.isdir(path) if os.path.lexists(path) else None
    except OSError:
        return None


def identity(path: str) -> tuple[int, int, bool] | None:
    """(device, inode, readable now) of a root; None when it is not there. Readable counts: inotify cannot watch a
    folder this process cannot read, so a root unreadable when the watch started (made readable by a chmod, which
    inotify reports to no one) was never watched; a change of it now starts the watcher anew."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, _readable(path, stat.S_ISDIR(st.st_mode))


def _readable(path: str, is_dir: bool) -> bool:
    """Can this process read `path` (list it and reach its entries, for a folder)? Opened, not os.access'd: the
    open is what a run does, whatever the user ids and capabilities say. O_NONBLOCK: a FIFO put in a root's place
    does not wait for a writer."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (os.O_DIRECTORY if is_dir else 0))
    except OSError:
        return False
    os.close(fd)
    return not is_dir or os.access(path, os.X_OK, effective_ids=os.access in os.supports_effective_ids)


def identity_changed(before: tuple | None, now: tuple | None) -> bool:
    """A root gone, back, replaced by another folder or file (moved in, remounted), or made readable or unreadable:
    watched anew."""
    return before != now


def _device(ident: tuple | None) -> int | None:
    """The device of an identity (device, inode, readable); None: missing."""
    return None if ident is None else ident[0]


def network_fs(fstype: str) -> bool:
    return fstype.lower() in NETWORK_FS


def _mountinfo(mountinfo: str) -> list[tuple[str, str, str]]:
    """(mount id, mount point, file system type) of every mount (Linux); none when unknown."""
    try:
        with open(mountinfo, "rb") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        fields, _, rest = line.partition(b" - ")
        parts = fields.split()
        if len(parts) >= 5 and rest:
            # \040 for a space; other bytes as they are, named as the file system's paths are (os.fsdecode): read as
            # text and unescaped, /home/jürgen's mounts were /home/jÃ¼rgen, under no root
            point = re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m[1], 8) & 0xFF]), parts[4])
            out.append((os.fsdecode(parts[0]), os.fsdecode(point), os.fsdecode(rest.split()[0])))
    return out


def mounts(mountinfo: str = "/proc/self/mountinfo") -> list[tuple[str, str]]:
    """(mount point, file system type) of every mount (Linux); none when unknown."""
    return [(point, fstype) for _, point, fstype in _mountinfo(mountinfo)]


def mounted(mountinfo: str = "/proc/self/mountinfo") -> list[tuple[str, str]]:
    """(mount id, mount point) of every mount (Linux): a mount made again at a point has another id."""
    return [(mount_id, point) for mount_id, point, _ in _mountinfo(mountinfo)]


def inner_mounts(table: list[tuple[str, str]], roots: dict[str, bool], skip: str) -> frozenset[tuple[str, str]]:
    """The mounts of `table` (`mounted`) inside a folder root (roots: {root: include_hidden}), not the root's own
    mount: those a run lists (not in a hidden folder unless the root includes hidden files, not in the index's own
    folder, skip). inotify reports neither a mount nor an unmount: a drive plugged in at photos/nas went unseen, its
    photos and every later change on it (nothing watched it: the watch was on the folder below), and an unplugged
    drive's mount point was watched no more (its watches went with the drive). A change of these restarts the
    watcher and makes a run."""
    out = set()
    for mount_id, point in table:
        for root, include_hidden in roots.items():
            if point == root or not scan.at_or_under(point, root) or scan.at_or_under(point, skip):
                continue
            if include_hidden or not any(part.startswith(".") for part in os.path.relpath(point, root).split(os.sep)):
                out.add((mount_id, point))
    return frozenset(out)


def fs_type(path: str, table: list[tuple[str, str]]) -> str:
    """The file system type of the mount (of `mounts`) holding `path`, or "" when unknown."""
    path = os.path.realpath(path)
    best, kind = "", ""
    for point, fstype in table:
        if scan.at_or_under(path, point) and len(point) >= len(best):
            best, kind = point, fstype
    return kind


def later_job(job: dict) -> dict:
    """The options of the runs after the first: its one-time actions dropped (--rebuild, --reindex, --compact now)
    and the choices the first run remembered (the model, hidden files, list and caption columns, video interval,
    OCR, the layout) left to the index, as a later `alignsearch index` with no option applies them. The model too:
    another process's `index --reindex --model NEW` changes the one the index records, and a run still naming the
    first run's --model was refused as the wrong model, which ended the watch."""
    return {**job, "model": None, "rebuild": False, "reindex": False,
            "compact": False if job.get("compact") is False else None,
            "include_hidden": None, "list_column": None, "caption_column": None, "video_interval": None,
            "ocr": None, "ondisk_shards": None, "index_shards": None}


def ends_watch(exc: BaseException, index_dir: str) -> bool:
    """Whether an error would fail every run, so the watch ends with it: no index, a model that cannot load or
    differs, a damaged index, an index folder that cannot be written. Anything else (a full disk, a busy
    catalog, one bad file) is reported and the watch goes on."""
    if isinstance(exc, (IndexNotFoundError, ModelLoadError, ModelMismatchError, IndexDamagedError)):
        return True
    if isinstance(exc, CatalogBusyError):
        return False
    if isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return bool(exc.filename) and scan.at_or_under(os.path.realpath(str(exc.filename)), index_dir)
    return False


class _Watcher:
    """watchfiles in a thread: each batch of changes under `paths` (in them alone when not `recursive`) goes to
    `batches`, also while a run is going."""

    def __init__(self, paths: list[str], opts: WatchOptions, polling: bool | None, recursive: bool = True):
        import watchfiles

        self.batches: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self.failed: BaseException | None = None

        def loop():
            try:
                for changes in watchfiles.watch(*paths, watch_filter=None, debounce=opts.max_batch_ms,
                                                step=opts.settle_ms, stop_event=self._stop, rust_timeout=200,
                                                yield_on_timeout=True, raise_interrupt=False, force_polling=polling,
                                                ignore_permission_denied=True, recursive=recursive):
                    self._ready.set()
                    if changes:
                        self.batches.put(changes)
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread (a path gone as it started)
                self.failed = exc
            finally:
                self._ready.set()

        self._thread = threading.Thread(target=loop, name="alignsearch-watch", daemon=True)
        self._thread.start()
        self._ready.wait(30)  # watching (its first yield) before the caller runs: no change is missed

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


@dataclass
class Watch:
    """The state of one `index --watch`."""

    index_dir: str
    roots: dict[str, Root] = field(default_factory=dict)
    unwatched_said: set = field(default_factory=set)
    runs: int = 0
    polling: bool = False  # notifications failed once: polled from then on
    mounts: frozenset = frozenset()  # inner_mounts when the watcher started
    table: "MountTable | None" = None  # tells a change of the mount table between two looks
    drives: "DrivesGone | None" = None  # tells whether a drive of `mounts` was unmounted since the watcher started
    interval_s: float | None = None  # --watch-interval: URL roots listed this often


def _read_roots(index_dir: Path) -> dict[str, bool] | None:
    """{root: include_hidden} as the index remembers them, read-only; None when it cannot be read now (read
    again on the next tick). Called about once a second: state.peek reads with sqlite3 alone, no engine."""
    from alignsearch.storage import state
    from alignsearch.storage.paths import DB_FILE

    st = state.peek(index_dir / DB_FILE, "roots")
    if st is None:
        return None
    return {r: bool(st.roots.options.get(r, {}).get("include_hidden")) for r in st.roots.roots}


def _unlisted(index_dir: Path) -> dict[str, set[str]] | None:
    """{root: the folders (relative) below each folder root that the last runs could not list}, read-only; None when
    it cannot be read now. Not the root itself: one gone and back is watched anew by its identity (`_paths`), and
    listed whole then."""
    from alignsearch.storage import state
    from alignsearch.storage.paths import DB_FILE
    from indexer.roots import unlisted

    st = state.peek(index_dir / DB_FILE, "roots")
    if st is None:
        return None
    return {root: unlisted(root, errors) - {""} for root, errors in st.roots.listing_errors.items()
            if watchable(root) and sources.kind(root) == sources.FOLDER}


class _CatalogLook:
    """Read-only questions to the catalog (opened at the first, closed after the batch) and to the links known
    (`links`, the watch's LinkFolders) for one batch of changes."""

    def __init__(self, index_dir: Path, links=None):
        self.index_dir = index_dir
        self.links = links
        self._targets: set[str] | None = None
        self._db = None
        self._conn = None
        self._unread = False  # the catalog could not be read: not asked again in this batch (each try waits)
        self._unlisted: dict[str, set[str]] | None = None
        self._stems: dict[str, set[str]] = {}  # {folder: the stems of the photos and videos in it}, listed once a batch

    def known_folder(self, root: str, path: str) -> bool:
        """Whether the catalog holds files under `path` (a folder of `root`); True when it cannot tell now (a run
        lists only the folders changes were seen in, so a folder moved away and taken for nothing would keep its
        files until some other change lists its parent; taken for one, its parent is listed, a cheap mistake)."""
        from sqlalchemy import select

        from alignsearch.storage import catalog
        from alignsearch.storage.paths import DB_FILE

        if self._unread:
            return True
        key = scan.printable(os.path.relpath(path, root).replace(os.sep, "/"))[0]
        try:
            if self._conn is None:
                self._db = catalog.connect(self.index_dir / DB_FILE, readonly=True)
                self._conn = self._db.connect()
            files = catalog.files.c
            return self._conn.execute(select(files.id).where(
                files.root == root, *catalog.under_folder(key)).limit(1)).first() is not None
        except Exception as exc:  # noqa: BLE001 - a catalog held locked, unreadable now: whatever the error
            log.info("catalog not read now: %s", exc)
            self._unread = True
            return True

    def unlisted(self, root: str, path: str) -> bool:
        """Whether the last runs could not list the folder `path` of `root`; True when that cannot be read now (a
        run lists such folders anyway, and a folder modified otherwise lists its parent, a cheap mistake)."""
        if self._unlisted is None:
            self._unlisted = _unlisted(self.index_dir)
        return self._unlisted is None or os.path.relpath(path, root) in self._unlisted.get(root, set())

    def caption_target(self, path: str) -> bool:
        """Whether a caption link known to the watch leads to `path` (the links read once a batch)."""
        if self.links is None:
            return False
        if self._targets is None:
            self._targets = self.links.caption_targets()
        return bool(self._targets) and os.path.realpath(path) in self._targets

    def sidecar(self, path: str) -> bool:
        """Whether a photo or video of the stem of `path` (a .txt) is in its folder: `path` is its caption."""
        folder, name = os.path.split(path)
        if folder not in self._stems:
            try:
                with os.scandir(folder) as it:
                    self._stems[folder] = {os.path.splitext(e.name)[0] for e in it if scan._wanted(e.name, True)}
            except OSError:
                self._stems[folder] = set()
        return os.path.splitext(name)[0] in self._stems[folder]

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
        if self._db is not None:
            self._db.dispose()
        self._db = self._conn = None


def _watch_lock(index_dir: Path) -> int:
    """The descriptor holding the index's watch lock (closed when the watch ends, or with the process): a
    second `index --watch` of the index is refused rather than running every change twice."""
    fd, _ = take_lock(index_dir, WATCH_LOCK)  # never through a link planted there (it created the link's target)
    if fd is None:
        raise BadInputError(f"another `alignsearch index --watch` is watching {index_dir}: one watch per index "
                            "(stop that one first, Ctrl-C or SIGTERM)")
    return fd


def _check_index(index_dir: Path) -> None:
    """The index deleted or moved away while watched ends the watch (a run would start a new, empty one)."""
    from alignsearch.storage.paths import DB_FILE

    if not (index_dir / DB_FILE).exists():
        raise IndexNotFoundError(f"the index {index_dir} is gone (deleted or moved away): the watch ends")


def watch_index(roots: list[str], job: dict, opts: WatchOptions, run: Callable[..., object],
                report: Callable[[object | None, dict, BaseException | None], None],
                say: Callable[[str], None]) -> int:
    """Run `run(roots, **job)` (indexer/job.py's index_folders), then again after every batch of changes that
    matter, until SIGINT or SIGTERM. report(summary or None, watch facts, error or None) after each run; say(line)
    for notes. Returns the exit code: 130 after SIGINT, 0 after SIGTERM. An error of the first run, or one that
    `ends_watch`, is raised."""
    from indexer.job import EncoderCache, chosen_index_dir
    from indexer.roots import LinkFolders

    out = chosen_index_dir(job.get("index_dir")).resolve()
    # the model stays loaded between runs; the folders holding links to files are listed by every scoped run
    job = {**job, "index_dir": str(out), "encoders": EncoderCache(), "links": LinkFolders()}
    given = [name for root in roots for name in sources.normalise(str(root))]
    stopped: list[int] = []

    def terminate(signum, _frame):
        stopped.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, terminate), signal.getsignal(signal.SIGINT)
    w = Watch(str(out), interval_s=opts.interval_s, table=MountTable())
    watcher: _Watcher | None = None
    running = False
    closing = False  # stopped by SIGINT or SIGTERM: both ignored from then on
    lock_fd = None
    outside = _Outside()
    try:
        lock_fd = _watch_lock(out) if out.is_dir() else None  # a new index: once its first run made the folder
        known = _read_roots(out) or {}
        w.roots = {r: Root(r, hidden) for r, hidden in {**{g: False for g in given}, **known}.items()}
        watcher = _start(w, opts, say)
        running = True
        started = time.time()
        summary = run(given, **job)
        running = False
        w.runs = 1
        lock_fd = _watch_lock(out) if lock_fd is None else lock_fd
        report(summary, {"run": 1, "changes": 0, "roots": []}, None)
        outside.follow(job["links"], list(w.roots), opts, w.polling, since=started)
        say(f"watching {sum(1 for r in w.roots.values() if watchable(r.name))} root(s) for changes; Ctrl-C stops")
        later = later_job(job)
        pending: dict[str, list[str]] = {}  # {root: listing folders}: what the next run lists
        due = False
        full = False  # the next run lists every root whole: changes may have gone unseen
        seen = 0  # changes in the batches since the last run, those that do not matter too
        next_look = 0.0
        next_listing = time.monotonic() + (opts.interval_s or 0)
        while True:
            if watcher.failed is not None and unnamed_change(watcher.failed):
                log.info("a change watchfiles could not name (%s): every root listed", watcher.failed)
                watcher = _restart(w, watcher, opts, say)
                due = full = True
            elif watcher.failed is not None:  # notifications refused (inotify's watch limit, a file system without)
                if not w.polling:
                    say(f"change notifications failed ({watcher.failed}): polling instead")
                w.polling = True
                watcher = _restart(w, watcher, opts, say)
                due = full = True
            try:
                batch = watcher.batches.get(timeout=opts.tick_s)
            except queue.Empty:
                batch = None
            changes = set(batch or ())
            for batches in (watcher.batches, outside.batches):  # every batch that came during the last run: one run
                while True:
                    try:
                        changes |= batches.get_nowait()
                    except queue.Empty:
                        break
            if time.monotonic() >= next_look or changes:
                _check_index(out)
                fresh = _read_roots(out)
                if fresh is not None and set(fresh) != set(w.roots):  # a root added or forgotten by another process
                    w.roots = {r: w.roots.get(r, Root(r)) for r in fresh}
                    for r, hidden in fresh.items():
                        w.roots[r].include_hidden = hidden
                    watcher = _restart(w, watcher, opts, say)
                    due = full = True  # what changed while no watcher ran is found by a run listing everything
                elif fresh is not None:
                    for r, hidden in fresh.items():
                        w.roots[r].include_hidden = hidden
                if _roots_changed(w):
                    watcher = _restart(w, watcher, opts, say)
                    due = full = True
                next_look = time.monotonic() + opts.tick_s
            seen += len(changes)
            full = full or seen >= opts.full_after
            if relinked(changes, job["links"]):  # the folder it led to may have lost its one watch with it
                log.info("a link to a folder changed: watched anew, every root listed")
                watcher = _restart(w, watcher, opts, say)
                due = full = True
            look = _CatalogLook(out, job["links"])
            try:
                for root, folders in touched(changes, {r.name: r.include_hidden for r in w.roots.values()}, str(out),
                                             path_kind, look.known_folder, through_link, unlisted=look.unlisted,
                                             caption_target=look.caption_target, outside=outside.root_of,
                                             sidecar=look.sidecar).items():
                    pending.setdefault(root, []).extend(folders)
            finally:
                look.close()
            if opts.interval_s and time.monotonic() >= next_listing and any(not watchable(r) for r in w.roots):
                due = True
            if not (pending or due):
                continue
            if any(r.held for r in w.roots.values()):
                continue
            _check_index(out)
            running = True
            facts = {"run": w.runs + 1, "changes": sum(map(len, pending.values())), "roots": sorted(pending)}
            scope = None if full else run_scope(pending, list(w.roots))
            log.info("run %d lists %s", facts["run"], "every root" if scope is None else scope.folders)
            unlisted_before = _unlisted(out) or {}
            started = time.time()
            summary, error = _run_once(run, {**later, "scope": scope}, opts, say)
            running = False
            w.runs += 1
            pending, due, seen = {}, False, 0
            full = error is not None  # what that run did not finish is found by listing everything
            unlisted_after = _unlisted(out)
            if listed_again(unlisted_before, unlisted_before if unlisted_after is None else unlisted_after):
                watcher = _restart(w, watcher, opts, say)  # watched from now on; what came before, and what the old
                due = full = True  # watcher held as it closed, found by a run listing every root
            next_listing = time.monotonic() + (opts.interval_s or 0)
            if error is not None and ends_watch(error, str(out)):
                raise error
            report(summary, facts, error)
            outside.follow(job["links"], list(w.roots), opts, w.polling, since=started)
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C while closing: no traceback
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        closing = True
        if watcher is not None:  # closed before the line is said, and only here
            watcher.close()
            watcher = None
        outside.close()
        say("watch stopped" + (": the run in progress was abandoned; the index is as the last finished run left it, "
                               "the next `alignsearch index` finishes the work" if running else ""))
        return 0 if stopped and stopped[0] == signal.SIGTERM else 130
    finally:
        if watcher is not None:
            watcher.close()
        outside.close()
        w.table.close()
        if w.drives is not None:
            w.drives.close()
        if lock_fd is not None:
            os.close(lock_fd)
        if not (opts.process_ends and closing):
            try:
                signal.signal(signal.SIGTERM, previous[0])
                signal.signal(signal.SIGINT, previous[1])
            except (ValueError, TypeError):
                pass


def _run_once(run, job: dict, opts: WatchOptions, say) -> tuple[object | None, BaseException | None]:
    """One run; another writer's lock is waited out (tried again every lock_retry_s)."""
    from indexer.lock import WriterBusy

    waited = False
    while True:
        try:
            return run([], **job), None
        except WriterBusy:
            if not waited:
                say("another alignsearch process is writing the index: the run waits for it")
                waited = True
            time.sleep(opts.lock_retry_s)
        except Exception as exc:  # reported, and the watch goes on unless ends_watch says otherwise
            log.debug("run failed", exc_info=exc)
            return None, exc


def _paths(w: Watch, say) -> list[str]:
    """The paths to watch: each local root that is there now. Notes each root's identity and whether it is held."""
    paths = []
    for r in w.roots.values():
        if not watchable(r.name):
            if r.name not in w.unwatched_said:
                say(f"{r.name} is not watched (a URL): " + (
                    f"listed again every {w.interval_s:g} s (--watch-interval)" if w.interval_s else
                    "its changes are indexed by each run the other roots start (or every --watch-interval seconds)"))
                w.unwatched_said.add(r.name)
            continue
        now = r.seen = identity(r.name)
        if sources.kind(r.name) == sources.FOLDER and looks_unmounted(
                _device(r.identity), _device(now), scan.empty_folder(r.name, include_hidden=r.include_hidden)):
            if not r.held:
                say(f"{r.name} is an empty folder on another device (an unmounted drive?): runs wait until it is back")
            r.held = True  # its identity stays the drive's
        else:
            r.held, r.identity = False, now
        if now is not None:
            paths.append(r.name)
    w.mounts = _inner_mounts(w)
    if w.drives is not None:
        w.drives.close()
    w.drives = DrivesGone([point for _, point in w.mounts])  # before the watcher's own watches on them
    return paths


def _inner_mounts(w: Watch) -> frozenset[tuple[str, str]]:
    folders = {r.name: r.include_hidden for r in w.roots.values()
               if watchable(r.name) and sources.kind(r.name) == sources.FOLDER}
    return inner_mounts(mounted(), folders, w.index_dir) if folders else frozenset()


def _roots_changed(w: Watch) -> bool:
    """A root gone, back or replaced, or a drive mounted or unmounted inside one (`inner_mounts`), also one unplugged
    and plugged in again since the last look (the mount table changed, with drives inside the roots)."""
    changed = w.table is not None and w.table.changed()  # asked each look: it answers for what came since the last
    gone = w.drives.gone() if w.drives is not None else None
    if any(watchable(r.name) and identity_changed(r.seen, identity(r.name)) for r in w.roots.values()):
        return True
    # any change of the table counted only where the drives cannot be watched: on a host whose mounts change all
    # the time elsewhere (a container host) it restarted the watcher and listed every root at every look
    if _inner_mounts(w) != w.mounts or (w.mounts and (changed if gone is None else gone)):
        log.info("a drive was mounted or unmounted inside a root: watched anew, every root listed")
        return True
    return False


class MountTable:
    """Whether the mount table changed since the last look: /proc/self/mountinfo polled for POLLPRI, as util-linux's
    findmnt --poll does (each poll answers for what came since the one before). A drive unmounted and mounted again
    between two looks came back with the mount id it had (ids are reused, lowest first), so `inner_mounts` was the
    same, but inotify's watches on it went with the unmount: photos added to it were never indexed. Never changed
    where the table cannot be polled (not Linux)."""

    def __init__(self, path: str = "/proc/self/mountinfo"):
        self._poll = None
        try:
            self._file = open(path, "rb")  # noqa: SIM115 - held for the watch, closed by close()
        except OSError:
            return
        self._poll = select.poll()
        self._poll.register(self._file, select.POLLPRI)

    def changed(self) -> bool:
        return self._poll is not None and bool(self._poll.poll(0))

    def close(self) -> None:
        if self._poll is not None:
            self._file.close()
            self._poll = None


_IN_MOVE_SELF, _IN_DELETE_SELF = 0x800, 0x400  # <sys/inotify.h>; IN_UNMOUNT and IN_IGNORED come unasked


class DrivesGone:
    """Whether a drive mounted inside a root when the watcher started was unmounted since, even if mounted again with
    the mount id it had (`inner_mounts` the same: MountTable's case): an inotify watch of its own on each drive's top
    folder, which the kernel ends (IN_UNMOUNT, IN_IGNORED) when its drive goes. Only those drives count: any change
    of the mount table restarted the watcher and listed every root, at every look on a host mounting elsewhere all
    the time. A watch holds no drive busy (an open file would refuse its unmount). The inotify API by ctypes:
    neither the standard library nor watchfiles (which reports no unmount) offers it. gone() is None where it
    cannot be had (not Linux, the user's inotify instances used up, a drive's top folder unreadable): then any
    change of the mount table counts, as before."""

    def __init__(self, points: list[str]):
        self._fd = None
        if not points:
            return
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            init, add = libc.inotify_init1, libc.inotify_add_watch
        except (OSError, AttributeError):
            return
        add.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        fd = init(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            return
        if any(add(fd, os.fsencode(p), _IN_MOVE_SELF | _IN_DELETE_SELF) < 0 for p in points):
            os.close(fd)
            return
        self._fd = fd

    def gone(self) -> bool | None:
        """Whether one of the drives went since the watches were set (None: not known, see the class)."""
        if self._fd is None:
            return None
        try:
            return bool(os.read(self._fd, 65536))  # events stay until read: every one since the watches were set
        except BlockingIOError:
            return False

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _polling(opts: WatchOptions, paths: list[str], failed_before: bool) -> bool | None:
    if opts.polling:
        return True
    if failed_before:
        return True
    table = mounts()
    if any(network_fs(fs_type(p, table)) for p in paths):
        return True
    return None  # watchfiles' own choice (WATCHFILES_FORCE_POLLING, WSL)


def _start(w: Watch, opts: WatchOptions, say) -> _Watcher | None:
    paths = _paths(w, say)
    missing = [r.name for r in w.roots.values() if watchable(r.name) and r.identity is None]
    for name in missing:
        say(f"{name} is missing: its files stay indexed; the watch checks every {opts.tick_s:g} s for its return")
    log.info("watching %s", paths)
    return _Watcher(paths, opts, _polling(opts, paths, w.polling)) if paths else _Idle()


def _restart(w: Watch, watcher, opts: WatchOptions, say):
    """Watch the roots anew; the batches the old watcher queued carry over."""
    watcher.close()
    new = _start(w, opts, say)
    while True:
        try:
            new.batches.put(watcher.batches.get_nowait())
        except queue.Empty:
            return new


class _Outside:
    """The folders outside every root that hold what links in the roots lead to (LinkFolders.targets_outside),
    each watched alone (not what is below it): no watch of a root sees an edit there, which a full listing finds
    (the link's row holds its target's size and time; a caption link's text is read again). Followed anew after
    each run, as links come and go."""

    def __init__(self):
        self.targets: dict[str, str] = {}  # {real path: the root of a link leading there}
        self._folders: list[str] = []
        self._watcher: _Watcher | _Idle = _Idle()

    @property
    def batches(self) -> queue.Queue:
        return self._watcher.batches

    def root_of(self, path: str) -> str | None:
        return self.targets.get(path) or self.targets.get(os.path.realpath(path))

    def follow(self, links, roots: list[str], opts: WatchOptions, polling: bool, since: float) -> None:
        """Watch the folders of what links lead to now. since: when the run that found the links started (time.time):
        a target in a folder not watched before that was modified since may have changed after the run listed its
        link, unseen by any watch; each such target is taken as changed (one more run at most, of the folders holding
        links, which finds nothing where it had not changed)."""
        self.targets = links.targets_outside(roots)
        folders = sorted({os.path.dirname(t) for t in self.targets})
        if self._watcher.failed is not None:
            log.info("the folders of link targets outside the roots were not watched: %s", self._watcher.failed)
        elif folders == self._folders:
            return
        new = set(folders) - set(self._folders)
        self._watcher.close()
        self._folders = folders
        log.info("watching the folders of link targets outside the roots: %s", folders)
        self._watcher = _Watcher(folders, opts, _polling(opts, folders, polling), recursive=False) if folders \
            else _Idle()
        recent = {(MODIFIED, t) for t in self.targets if os.path.dirname(t) in new and scan.changed_since(t, since)}
        if recent and self._watcher.failed is None:
            self._watcher.batches.put(recent)

    def close(self) -> None:
        self._watcher.close()


class _Idle:
    """No root to watch now (all missing, or URLs): the loop only looks at the roots every tick."""

    def __init__(self):
        self.batches: queue.Queue = queue.Queue()
        self.failed = None

    def close(self) -> None:
        pass
