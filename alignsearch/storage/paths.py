"""Where an index lives: the file names inside it and how a command finds it. Light to import:
the CLI's route to a warm server needs nothing heavier."""

from __future__ import annotations

import errno
import logging
import os
import stat
from pathlib import Path
from urllib.parse import urlencode

from alignsearch.errors import IndexDamagedError, IndexNotFoundError

log = logging.getLogger(__name__)

INDEX_DIRNAME = ".alignsearch"
DB_FILE, VECTORS_FILE, ANN_FILE = "catalog.db", "vectors.f16", "index.faiss"
# the files SQLite keeps beside a database and opens by name: its write-ahead log, its shared memory, and the
# rollback journal (WAL mode writes none, but SQLite looks for a hot one before every first read)
SIDE_SUFFIXES = ("-wal", "-shm", "-journal")
SERVER_FILE = "server.json"  # written by a running `alignsearch serve`
LISTS_SUFFIX = ".ivfdata"  # the on-disk ANN layout's inverted lists: lists-<ns>.ivfdata
SEGMENTS_DIR = "vectors"  # the vector segments of rows added since the last compaction (vectors.py)
THUMBS_DIR = "thumbs"  # the thumbnails `serve` draws, kept for the next request


def untrusted(path: str | os.PathLike, owners: tuple[int, ...] = (), sticky_ok: bool = False) -> str | None:
    """Why another user could have written path, or None: it belongs to someone other than this user (or
    one of `owners`, e.g. root for a system folder), or others may write it: every user (o+w), or a group
    other than this user's private group (the user-private-group convention: umask 002 leaves a user's
    files g+w for a group of one). As ssh treats its keys; follows symlinks (the target is what is read).
    sticky_ok: a folder every user (or its group) may write with the sticky bit (/tmp, 1777) passes: others cannot
    rename or remove what this user keeps in it."""
    return untrusted_stat(os.stat(path), path, owners, sticky_ok)


def untrusted_stat(st: os.stat_result, path: str | os.PathLike, owners: tuple[int, ...] = (),
                   sticky_ok: bool = False) -> str | None:
    """untrusted's rule on a stat already taken: of an open descriptor (os.fstat), so the file judged is the
    file read, whatever is renamed over its path meanwhile. path only names it in the reason."""
    if st.st_uid != os.geteuid() and st.st_uid not in owners:
        return f"{path} belongs to another user (uid {st.st_uid})"
    # the sticky bit covers the group's write as it covers everyone's: /tmp is 1777, g+w for root's group, and was
    # refused as "writable by its group (gid 0)" to every user but root (whose own group that is): an index in /tmp,
    # the model cache under it, a server record kept there
    sticky = sticky_ok and stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX
    if st.st_mode & 0o002 and not sticky:
        return f"{path} is writable by every user"
    if st.st_mode & 0o020 and not sticky and not _private_group(st.st_gid):
        return f"{path} is writable by its group (gid {st.st_gid})"
    return None


def _private_group(gid: int) -> bool:
    """Is gid this user's own group of one (named after the user, no other members listed)?"""
    import grp
    import pwd

    try:
        user, group = pwd.getpwuid(os.geteuid()).pw_name, grp.getgrgid(gid)
    except (KeyError, OSError):
        return False
    return gid == os.getegid() and group.gr_name == user and set(group.gr_mem) <= {user}


def foreign(index: Path) -> str | None:
    """Why an index found by walking up must not be used, or None: it or its catalog belongs to another user
    or others may write it. Another user's `.alignsearch` above a shared, world-writable folder would
    otherwise receive this user's paths, hashes, EXIF and embeddings (git's CVE-2022-24765: git refuses such
    a repository)."""
    return untrusted(index) or untrusted(index / DB_FILE) or untrusted_parent(index, owners=(os.stat(index).st_uid, 0))


def untrusted_parent(index: str | os.PathLike, owners: tuple[int, ...]) -> str | None:
    """Why others could swap the index folder for one of theirs, or None: its parents and each folder holding a link
    its path goes through (_parents) judged by untrusted's rule for the folders above the model cache (sticky_ok:
    /tmp passes), and each such link made by this user or `owners` (in /tmp its maker may point it elsewhere).
    owners: the index's owner and root. A folder not made yet is made by this run, as this user."""
    parents, links = _parents(index)
    judged = [(folder, "its parent folder {why}: they may swap the whole index folder for one of theirs")
              for folder in parents]
    judged += [(link.parent, f"{{why}}, and holds the link {link} on its path: they may point it at a folder of theirs")
               for link in links if link.parent not in parents]
    for folder, reason in judged:
        try:
            why = untrusted(folder, owners=owners, sticky_ok=True)
        except FileNotFoundError:
            continue
        if why is not None:
            return reason.format(why=why)
    for link in links:
        uid = os.lstat(link).st_uid
        if uid != os.geteuid() and uid not in owners:
            return f"the link {link} on its path was made by another user (uid {uid}): they may point it at a folder of theirs"
    return None


def _parents(index: str | os.PathLike) -> tuple[tuple[Path, ...], tuple[Path, ...]]:
    """The folders whose writers could swap the index folder, and the links its path goes through (_route). The
    folders: the one its path names (abspath's, where a link at the index's name lies), the one it really lies in
    (`--index mine` with mine -> a folder every user may write; a '..': abspath drops 'a/..' by the letters, the
    kernel resolves it through a linked 'a'); and the folder holding each link (`--index a/link/ix`: whoever may
    write `a` may point `link` at a folder of theirs, where only the folder it led to was judged)."""
    real, links = _route(index)
    return tuple(dict.fromkeys((Path(os.path.abspath(index)).parent, real.parent))), links


def _judged_folders(index: str | os.PathLike) -> tuple[Path, ...]:
    """Every folder untrusted_parent judges: the parents and the folders holding a link on the way."""
    parents, links = _parents(index)
    return tuple(dict.fromkeys((*parents, *(link.parent for link in links))))


MAX_LINKS = 40  # the kernel's limit (ELOOP) on links followed in one path


def _route(index: str | os.PathLike) -> tuple[Path, tuple[Path, ...]]:
    """Where the path really leads (os.path.realpath's answer) and the symbolic links it goes through, in the order the
    kernel follows them: a link met in a link's target too, a '..' after a link going up from where it led. What is
    not made yet is taken as written; a loop of links (which no open goes through) ends the walk where it is."""
    path = os.fspath(index)
    here = os.sep if os.path.isabs(path) else os.getcwd()  # getcwd: a real path, no link in it
    todo = path.split(os.sep)[::-1]
    links: list[Path] = []
    while todo:
        name = todo.pop()
        if name in ("", "."):
            continue
        if name == "..":
            here = os.path.dirname(here)
            continue
        step = os.path.join(here, name)
        try:
            st = os.lstat(step)
        except (FileNotFoundError, NotADirectoryError):  # not made yet: a name as written, as realpath takes it
            st = None
        if st is None or not stat.S_ISLNK(st.st_mode):
            here = step
            continue
        if len(links) == MAX_LINKS:
            break
        links.append(Path(step))
        target = os.readlink(step)
        if os.path.isabs(target):
            here = os.sep
        todo += target.split(os.sep)[::-1]
    return Path(here), tuple(links)


def untrusted_index(index_dir: str | os.PathLike, *, writing: bool) -> str | None:
    """Why the index in index_dir may hold what another user put there, or None; every command asks before it
    opens the catalog (catalog.connect). Its folder must be writable by its owner alone (a folder others may write
    let them rename their own catalog.db over this user's: the next `index` run read the folders that catalog named,
    a private one too, into a catalog they could read), and every file or folder in it (and under vectors/) must
    be its owner's, this user's or root's and writable by no one else. The folder may be another user's own (their
    index, queried as it is), not for a writer: this user's paths would go into it. Its parent is judged by the
    model cache's rule for the folders above it (untrusted, sticky_ok: /tmp passes): a parent other users may write
    let them rename the index folder away and put their own in its place, which a reader then read as this one."""
    folder = Path(index_dir)
    try:
        st = os.stat(folder)
    except FileNotFoundError:
        st = None  # a new index: made by this run, as this user, in a parent judged as any index's
    try:
        why = untrusted_parent(folder, owners=(0,) if st is None else (st.st_uid, 0))
    except FileNotFoundError:
        why = None  # made by this run too (index makes the folders on the way)
    if why is not None:
        return why
    if st is None:
        return None
    owners = (st.st_uid, 0)
    if writing and st.st_uid not in (os.geteuid(), 0):
        return f"{folder} belongs to another user (uid {st.st_uid}): this user's paths and pictures would go into it"
    why = untrusted_stat(st, folder, owners)
    if why is not None:
        return why
    for path in _index_entries(folder):
        try:
            lst = os.lstat(path)
        except FileNotFoundError:  # a writer's `.next` renamed into place, a segment compacted away: not planted
            continue
        if stat.S_ISLNK(lst.st_mode):  # a link's own mode is always 0777: only who made it says anything
            why = None if lst.st_uid in (*owners, os.geteuid()) else f"{path} was made by another user (uid {lst.st_uid})"
        else:
            why = untrusted_stat(lst, path, (*owners, os.geteuid()))
        if why is not None:
            return why
    return None


def judged_key(index_dir: str | os.PathLike, like: tuple | None = None) -> tuple:
    """What untrusted_index's answer rests on: the stats of the index folder, its vectors/ folder, its catalog and the
    folders above it that untrusted_parent judges (its parent; where its path goes through a link or a '..', its real
    parent and the folders holding the links; where the folder is a link, the folder it names too: each's inode,
    mode, owner and change times; None where missing), then the inode, mode, owner and group of every entry
    untrusted_index judges (_index_entries; a folder's mtime too: its names). A file renamed in, a mode or owner
    changed, changes one of them; a reader open for long (Engine.judge, every request of `serve`) judges the whole
    folder again only then. A file's own chmod changes nothing of its folder's stat (`chmod o+w vectors.f16` left the
    folder's mtime and ctime as they were, and a reader trusted the file others could then rewrite), so every entry is
    stat'ed: an lstat each, and an index keeps a few (segments under a million rows are folded into vectors.f16; an
    ANN layout adds its shards or lists). like: an earlier key, whose entries are stat'ed again instead of the folder
    being listed (a scandir and a walk of vectors/ cost more than the stats): a name come or gone changes the
    folders' stats, which are taken anew."""
    folder = Path(index_dir)
    key: list = []

    def judged(path: Path, follow: bool) -> os.stat_result | None:
        try:
            st = os.stat(path, follow_symlinks=follow)
        except FileNotFoundError:
            key.append(None)
            return None
        key.append((st.st_ino, st.st_mode, st.st_uid, st.st_ctime_ns, st.st_mtime_ns))
        return st

    st = judged(folder, False)
    linked = st is not None and stat.S_ISLNK(st.st_mode)
    judged(folder / "vectors", False)
    judged(folder / DB_FILE, False)
    # the folder a link names and the parents followed: a link's own stat stays the same when what it names is made
    # writable by others; the parents and the folders holding a link on the way, as one made writable by others since
    # (untrusted_index judges them): a link swapped changes its folder's stat
    for path in ((folder,) if linked else ()) + _judged_folders(folder):
        judged(path, True)
    # listed after the folders' stats: a name that comes after the listing changes them
    if like is not None:
        names = [name for name, _ in like[-1]]
    else:
        try:
            names = [str(path) for path in _index_entries(folder)]
        except (FileNotFoundError, NotADirectoryError):
            names = []
    return (*key, tuple((name, _entry_stat(name)) for name in names))


def _entry_stat(path: str) -> tuple | None:
    """What untrusted_index's judgement of one entry rests on (judged_key), or None where it is gone."""
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    # not a file's times: a writer appending to vectors.f16 is no reason to judge again; a folder's are its names
    names = st.st_mtime_ns if stat.S_ISDIR(st.st_mode) else None
    return st.st_ino, st.st_mode, st.st_uid, st.st_gid, names


def own_entry(path: str | os.PathLike) -> os.stat_result | None:
    """The lstat of a file the index keeps and SQLite opens by name (the catalog), or None when nothing is there;
    IndexDamagedError (exit 7) when it is not a regular file at its own name. Writers only ever make one there, so a
    symbolic link (to another index's catalog, to /dev/zero) or a FIFO (which hung every reader's open) is damage.
    SQLite follows links and opens FIFOs, and cannot be given a descriptor: the callers judge the name before the
    open and again after it (same inode), as the vector and ANN files are judged on the descriptor opened."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return None
    if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):  # a folder: the open says so, as it did
        return st
    from alignsearch.safeopen import file_kind

    raise IndexDamagedError(f"{Path(path).name} is a {file_kind(st.st_mode)}, where the index keeps its own file: "
                            "alignsearch never opens one through it (replace it with the file it should be, or "
                            "move the index aside and rebuild it with `alignsearch index ROOTS`)")


def side_file_problems(db_path: Path, *, reading: bool = False) -> list[str]:
    """SQLite's files beside the catalog (SIDE_SUFFIXES) that are not plain files (a symbolic link, a folder, a FIFO),
    in words: SQLite will not open the catalog through them (or only for reading), and every command said "catalog.db
    cannot be read" or "damaged: restore it from a backup" of a sound catalog; a FIFO blocked SQLite's open of it
    (at -journal, every command hung). Asked before SQLite opens the catalog, by readers and writers alike. Never
    removed here: the log may hold committed changes, and readers may have the shared memory open. reading: only what a
    reader's SQLite would open as it stands: not a link or a folder at -wal or -shm, which its open fails on (the
    reader's connection then names them: catalog.open_readonly), but a link at -journal, which it follows."""
    from alignsearch.safeopen import file_kind

    found = []
    for suffix in SIDE_SUFFIXES:
        path = Path(f"{db_path}{suffix}")
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            continue
        if reading and suffix != "-journal" and (stat.S_ISLNK(mode) or stat.S_ISDIR(mode)):
            continue
        if not stat.S_ISREG(mode):
            kind = "a folder" if stat.S_ISDIR(mode) else f"a {file_kind(mode)}"  # a fifo, a socket, a device
            found.append(f"{path.name} is {kind}, not SQLite's own file: with no alignsearch process using the index, "
                         "put the file a link names in its place (it may hold committed changes) or move it away")
    return found


def same_entry(before: os.stat_result | None, path: str | os.PathLike) -> None:
    """IndexDamagedError unless path (own_entry) is still the file `before` judged: the open read that one."""
    after = own_entry(path)
    if before is not None and (after is None or (after.st_dev, after.st_ino) != (before.st_dev, before.st_ino)):
        raise IndexDamagedError(f"{Path(path).name} was replaced while it was opened: run the command again")


def _index_entries(folder: Path) -> list[Path]:
    """The files an index folder keeps that a command reads (the catalog and SQLite's files beside it, the vectors,
    the ANN files: storage/shards.py's manifest and shards, the on-disk lists, each layout's `.next` file), and
    what is under its vectors/ folder. Not the lock files (never read), server.json (client.read_record judges
    it) nor the thumbnail cache (the server judges it, and makes its thumbnails again)."""
    found = []
    for entry in os.scandir(folder):
        name = entry.name.removesuffix(".next")
        if name in (DB_FILE, f"{DB_FILE}-wal", f"{DB_FILE}-shm", VECTORS_FILE, ANN_FILE, "shards.json", "vectors") or (
                name.startswith("shard-") and name.endswith(".faiss")) or name.endswith(LISTS_SUFFIX):
            found.append(Path(entry.path))
        if entry.name == "vectors" and entry.is_dir(follow_symlinks=False):
            for where, dirs, files in os.walk(entry.path):
                found += [Path(where) / name for name in (*dirs, *files)]
    return found


def cache_root() -> Path:
    """Where exported towers are kept, shared by every index of the same model: $ALIGNSEARCH_CACHE, else
    $XDG_CACHE_HOME/alignsearch, else ~/.cache/alignsearch."""
    if os.environ.get("ALIGNSEARCH_CACHE"):
        return Path(os.environ["ALIGNSEARCH_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "alignsearch"


def private_record(index_dir: str | os.PathLike) -> Path:
    """Where `serve` keeps its record for an index it must not write (read-only, or another user's): in this
    user's runtime folder ($XDG_RUNTIME_DIR/alignsearch, else the cache folder's servers/), named by the
    index's real path. `query` looks there after the index's own server.json."""
    from hashlib import sha256

    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) / "alignsearch" if runtime and os.path.isdir(runtime) else cache_root() / "servers"
    return base / f"{sha256(os.fsencode(os.path.realpath(index_dir))).hexdigest()[:32]}.json"


_noted: set[str] = set()  # indexes already skipped with a note in this process


def find_index_dir(start: str | os.PathLike | None = None) -> Path | None:
    """The nearest `.alignsearch` directory in start (default: cwd) or its parents, like `.git`; one owned
    by another user or writable by others is skipped with a warning logged (stderr; another user's own index can be
    named with --index or ALIGNSEARCH_INDEX to use it anyway: _remedy)."""
    here = Path(start or os.getcwd()).resolve()
    for folder in (here, *here.parents):
        candidate = folder / INDEX_DIRNAME
        if not (candidate / DB_FILE).exists():
            continue
        try:
            why = foreign(candidate)
        except OSError as exc:
            why = f"it cannot be checked ({exc.strerror or exc})"
        if why is None:
            return candidate
        if str(candidate) not in _noted:
            _noted.add(str(candidate))
            log.warning("note: ignoring the index %s: %s; %s", candidate, why, _remedy(candidate))
    return None


def _remedy(candidate: Path) -> str:
    """What to do about an index discovery skipped: --index where that opens it (another user's own index, read as
    it is); else what --index refuses too (catalog.refuse_untrusted): the note sent users to a second refusal."""
    try:
        why = untrusted_index(candidate, writing=False)
    except OSError:
        why = None
    if why is None:
        return f"pass --index {candidate} to use it anyway"
    return "--index refuses it too: `chmod go-w` what is named, or keep the index in a folder only you can write"


def resolve_index_dir(index_dir: str | os.PathLike | None) -> Path:
    """An explicit directory, else $ALIGNSEARCH_INDEX, else the nearest `.alignsearch` in cwd or above."""
    chosen = index_dir or os.environ.get("ALIGNSEARCH_INDEX")
    if chosen:
        path = Path(chosen)
        if not (path / DB_FILE).exists():
            if (path / INDEX_DIRNAME / DB_FILE).exists():  # the folder holding one, as discovery starts from: the
                # advice below would have made a second index beside it
                raise IndexNotFoundError(f"{path} is not an alignsearch index, but holds one: name "
                                         f"{path / INDEX_DIRNAME} (--index and ALIGNSEARCH_INDEX name the index folder)")
            raise IndexNotFoundError(f"{path} is not an alignsearch index: run `alignsearch index ROOT --index {path}` first")
        return path
    found = find_index_dir()
    if found is None:
        raise IndexNotFoundError(
            f"no {INDEX_DIRNAME}/ index in {os.getcwd()} or its parents: run `alignsearch index FOLDER` "
            "first, or point --index / ALIGNSEARCH_INDEX at one"
        )
    return found


LOCK_FILE = "write.lock"  # held by one writer at a time (indexer/lock.py)


def writer_running(index_dir: Path) -> bool:
    """Whether a process holds the index's writer lock now (an index run; its uncommitted rows are in flight).
    A read-only probe, so readers (info, a query's lock message) can ask without importing the write path."""
    import fcntl

    path = Path(index_dir) / LOCK_FILE
    if not path.exists():
        return False
    # flock needs no write access: a read-only index is checked too. O_NONBLOCK: a FIFO put there blocked the
    # open for ever (verify, info and verify --repair hung) until some process opened it for writing
    try:  # not through a symbolic link (indexer/lock.py: writers refuse one, so no writer holds it)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except OSError as exc:
        # EACCES: another user's index, whose lock file is theirs alone to open (0600, indexer/lock.py: one others could
        # open, others could hold): whether they write it now cannot be told here, and is taken as not
        if exc.errno in (errno.ELOOP, errno.EACCES):
            return False
        raise
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def readonly_uri(db_path: Path) -> str:
    """The SQLite URI that opens the catalog at db_path read-only (catalog.open_readonly, and state.peek, which
    runs before SQLAlchemy is imported): a file: URI of its absolute path (as_uri escapes '?', '#' and
    '%', which would otherwise start a query or a fragment), mode=ro, and immutable=1 when the folder cannot be
    written and holds no shared-memory file (SQLite could not create one, and would refuse to read WAL mode)."""
    path = Path(db_path).resolve()
    query = {"mode": "ro"}
    if not os.access(path.parent, os.W_OK) and not (path.parent / (path.name + "-shm")).exists():
        query["immutable"] = "1"
    return path.as_uri() + "?" + urlencode(query)
