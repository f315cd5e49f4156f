"""The vector store: every embedding, fp16, in append-only files of fixed-width rows.

Segment 0 is vectors.f16, appended to by the process that commits the catalog. The encoder actors
of a distributed run (indexer/ray_pipeline.py) each append to a segment of their own under
vectors/ and send back only where they wrote, so no vector passes through the driver. The catalog
addresses a vector as (segment << 40) | row: segment 0's addresses are plain row numbers, as in
indexes written before segments existed.

The catalog records how many rows of each segment are committed; bytes past that (a run killed
between writing vectors and committing their catalog rows) are cut off by the next writer, and a
segment file the catalog does not list is deleted: an actor's killed before its first commit, or one
whose rows a committed switch (compaction, re-encode: drop_generation) or fold moved elsewhere, killed
before it deleted the file. Rows an actor wrote for a batch that was then retried elsewhere stay in
the middle of its segment, unused.
Readers memory-map the committed rows, so exact re-ranking touches only the rows it needs.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sqlalchemy import delete, insert, select
from sqlalchemy.engine import Connection

from alignsearch import safeopen
from alignsearch.storage import catalog, state
from alignsearch.atomic import fsync_dir, write_bytes, writing
from alignsearch.errors import IndexDamagedError
from alignsearch.storage.paths import SEGMENTS_DIR, VECTORS_FILE

log = logging.getLogger(__name__)

DTYPE = np.dtype("<f2")
SEGMENT_BITS = 40  # 1.1e12 rows per segment, 8.4e6 segments in an int64 address
ROW_MASK = (1 << SEGMENT_BITS) - 1


class ChunkChanged(IndexDamagedError):
    """A batch of vector rows read by a query does not match its checksum."""


def address(segment: int, row: int) -> int:
    return (segment << SEGMENT_BITS) | row


class VectorStore:
    """Segment 0 at `path`; `segments` maps the number of each other segment to (name, committed rows)."""

    def __init__(self, path: Path, dim: int, rows: int, segments: dict[int, tuple[str, int]] | None = None):
        self.path = Path(path)
        self.dim = dim
        self.rows = rows  # committed rows of segment 0
        self.segments = {int(k): (str(name), int(n)) for k, (name, n) in (segments or {}).items()}
        self._maps: dict[int, tuple[mmap.mmap, np.ndarray]] = {}  # segment -> (its map, its rows)
        # A reader's checksums (expect_chunks): {segment: (starts, rows, digests)}, and the chunks this store
        # has hashed and found intact. None: nothing is checked on read (writers, which check() first).
        self._chunks: dict[int, tuple[np.ndarray, np.ndarray, list[str]]] | None = None
        self._verified: set[tuple[int, int]] = set()

    def __getstate__(self) -> dict:  # sent to worker processes without its maps
        return {**self.__dict__, "_maps": {}}

    def expect_chunks(self, conn: Connection) -> None:
        """Check each recorded chunk's checksum the first time a read touches it (once per store, so once
        per snapshot of a generation): permuted rows or a flipped bit keep vectors unit length, so only the
        checksum tells a damaged vector from a good one. Rows no checksum covers (written before checksums
        existed) are read unchecked, as `verify` reports them."""
        c = catalog.vector_chunks.c
        by_key = {segment_key(self, n): n for n in self.numbers()}
        table: dict[int, list[tuple[int, int, str]]] = {}
        for key, start, rows, expected in conn.execute(select(c.segment, c.start, c.rows, c.digest).order_by(
                c.segment, c.start)):
            if key in by_key:
                table.setdefault(by_key[key], []).append((int(start), int(rows), str(expected)))
        self._chunks = {n: (np.array([t[0] for t in found], dtype=np.int64),
                            np.array([t[1] for t in found], dtype=np.int64), [t[2] for t in found])
                        for n, found in table.items()}

    def _check_read(self, segment: int, rows: np.ndarray, mapped: np.ndarray) -> None:
        """Hash the not yet checked chunks that hold these rows; IndexDamagedError if one changed."""
        table = self._chunks.get(segment) if self._chunks is not None else None
        if table is None or not len(rows):
            return
        starts, counts, digests = table
        at = np.searchsorted(starts, rows, side="right") - 1
        at = at[at >= 0]
        for i in np.unique(at).tolist():
            if (segment, i) in self._verified:
                continue
            start, n = int(starts[i]), int(counts[i])
            if start + n > len(mapped) or digest(np.ascontiguousarray(mapped[start : start + n]).data) != digests[i]:
                raise ChunkChanged(f"{self.segment_path(segment).name}: vector rows {start} to {start + n - 1} "
                                        "changed since they were written (checksum): run `alignsearch verify --repair`")
            self._verified.add((segment, i))

    @property
    def row_bytes(self) -> int:
        return self.dim * DTYPE.itemsize

    @property
    def folder(self) -> Path:
        return self.path.parent / SEGMENTS_DIR

    def numbers(self) -> list[int]:
        return [0, *sorted(self.segments)]

    def segment_path(self, segment: int) -> Path:
        return self.path if segment == 0 else self.folder / f"{self.segments[segment][0]}.f16"

    def committed(self, segment: int) -> int:
        return self.rows if segment == 0 else self.segments[segment][1]

    @property
    def committed_rows(self) -> int:
        """Committed rows of every segment together: what the files hold, used or not."""
        return sum(self.committed(n) for n in self.numbers())

    def valid(self, addresses: np.ndarray) -> np.ndarray:
        """Which addresses name a committed row of this store (a reader's store may predate a commit)."""
        addresses = np.asarray(addresses, dtype=np.int64)
        segment_of, rows = addresses >> SEGMENT_BITS, addresses & ROW_MASK
        counts = np.zeros(max(self.numbers()) + 1, dtype=np.int64)  # 0 rows for numbers not in use
        counts[self.numbers()] = [self.committed(s) for s in self.numbers()]
        ok = (addresses >= 0) & (segment_of < len(counts))
        ok[ok] = rows[ok] < counts[segment_of[ok]]
        return ok

    def holds(self, addresses: np.ndarray) -> bool:
        return bool(self.valid(addresses).all())

    def unknown_files(self) -> list[Path]:
        """Segment files directly under vectors/ the store does not list: an encoder actor's killed before its
        first commit, or one whose rows a committed switch or fold moved elsewhere, killed before it deleted
        the file. (Under vectors/next/, where a re-encode's segment waits unlisted, indexer/reindex.py's
        remove_leftovers looks.)"""
        listed = {f"{name}.f16" for name, _ in self.segments.values()}
        return sorted(p for p in self.folder.glob("*.f16") if p.name not in listed) if self.folder.exists() else []

    def truncate_uncommitted(self) -> None:
        """Drop what killed runs wrote past the committed rows, and unknown segment files. Only the holder
        of the index's writer lock (indexer/lock.py) may call this, with no actors of its own running.
        A file shorter than its committed rows is left for `alignsearch verify` to report."""
        os.close(_open_to_write(self.path, create=True))
        for segment in self.numbers():
            path, keep = self.segment_path(segment), self.committed(segment) * self.row_bytes
            size = path.stat().st_size if path.exists() else 0
            if size > keep:
                log.info("%s: cutting %d uncommitted bytes after its %d committed rows", path.name, size - keep,
                         self.committed(segment))
            if keep == 0 and segment == 0 and size:
                empty_file(path)  # a generation replaced whole: readers of the old one keep their map
            elif size > keep:
                with os.fdopen(_open_to_write(path), "r+b") as f:
                    f.truncate(keep)
                    os.fsync(f.fileno())
        for path in self.unknown_files():
            # an encoder actor's killed before its first commit, or an old generation's that a switch
            # (compaction, re-encode) committed and was killed before it deleted
            log.info("%s: deleting a segment no commit knows", path.name)
            path.unlink()
        self._maps.clear()

    def append(self, vectors: np.ndarray) -> int:
        """Write rows after segment 0's committed ones and fsync; returns the first new row (its address).

        The caller commits the catalog rows that point at them (and the new row count) afterwards.
        """
        vectors = np.ascontiguousarray(vectors, dtype=DTYPE)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"expected (n, {self.dim}) vectors, got {vectors.shape}")
        start, created = self.rows, not self.path.exists()
        with os.fdopen(_open_to_write(self.path, create=created), "r+b") as f:
            f.seek(start * self.row_bytes)
            f.write(vectors.tobytes())
            f.flush()
            os.fsync(f.fileno())
        if created:  # the file's name must survive a power cut as surely as its rows
            fsync_dir(self.path.parent)
        self.rows += len(vectors)
        self._maps.pop(0, None)
        return start

    def linked(self) -> list[Path]:
        """The store's files that are symbolic links (writers refuse to write through them: _open_to_write)."""
        return [p for p in (self.segment_path(s) for s in self.numbers()) if p.is_symlink()]

    def own_linked(self) -> list[str]:
        """Replace each file that is a symbolic link by a copy of the file it names (that file is left as it is):
        what `verify --repair` does, under the writer lock; the names copied."""
        import shutil

        done = []
        for path in self.linked():
            try:  # the file it names read as a photo's link is (safeopen): a regular file, not one planted by another
                # user; a link to a FIFO hung the copy, one to /dev/zero filled the disk
                src_fd = safeopen.open_regular(path, follow=True)
            except safeopen.Refused as exc:
                raise IndexDamagedError(f"{path.name} is a symbolic link that cannot be copied into its place ({exc}): "
                                        "remove it, then run `alignsearch verify --repair` again") from None
            with os.fdopen(src_fd, "rb") as src, writing(path) as out:  # the new file is renamed over the link
                shutil.copyfileobj(src, out, 1 << 22)
            done.append(path.name)
        self._maps.clear()
        return done

    def commit(self, name: str, rows: int) -> int:
        """Record that segment `name` holds at least `rows` durable rows; returns its number.

        Its writer fsync'ed them; the caller saves the store (save()) with the catalog rows that use them."""
        for number, (known, n) in self.segments.items():
            if known == name:
                if rows > n:
                    self.segments[number] = (name, rows)
                    self._maps.pop(number, None)
                return number
        number = max(self.numbers()) + 1
        self.segments[number] = (name, rows)
        return number

    def forget(self, segment: int) -> None:
        """Drop a segment whose rows now live elsewhere (the caller re-addressed the catalog)."""
        del self.segments[segment]
        self._maps.pop(segment, None)

    def _mapped(self, segment: int) -> np.ndarray:
        """The committed rows of a segment, memory-mapped once. Each call checks the mapped file's size first
        (fstat on the map's own descriptor, so a file replaced by a new one does not count): touching a
        page past the end of a file cut short under a reader is SIGBUS, which kills the process."""
        rows = self.committed(segment)
        if rows == 0:
            return np.zeros((0, self.dim), dtype=DTYPE)
        held = self._maps.get(segment)
        if held is None or len(held[1]) != rows:
            try:
                with os.fdopen(_open_to_read(self.segment_path(segment)), "rb") as f:
                    mapped = mmap.mmap(f.fileno(), rows * self.row_bytes, access=mmap.ACCESS_READ)
            except (FileNotFoundError, ValueError):  # ValueError: the file is shorter than the map asked for
                raise self._short(segment) from None
            held = self._maps[segment] = (mapped, np.frombuffer(mapped, dtype=DTYPE).reshape(rows, self.dim))
        if held[0].size() < rows * self.row_bytes:
            raise self._short(segment)
        return held[1]

    def _short(self, segment: int) -> IndexDamagedError:
        return IndexDamagedError(f"{self.segment_path(segment).name} is shorter than its committed vectors: "
                                 "run `alignsearch verify --repair`")

    def get(self, addresses: np.ndarray) -> np.ndarray:
        """float32 copies of the vectors at the given addresses, in the given order."""
        addresses = np.asarray(addresses, dtype=np.int64)
        out = np.empty((len(addresses), self.dim), dtype=np.float32)
        segment_of = addresses >> SEGMENT_BITS
        for segment in np.unique(segment_of).tolist():
            where = np.flatnonzero(segment_of == segment)
            rows = addresses[where] & ROW_MASK
            order = np.argsort(rows)  # sorted reads are kinder to the page cache
            mapped = self._mapped(segment)
            self._check_read(segment, rows, mapped)
            out[where[order]] = mapped[rows[order]]
        return out


def read_into(store: VectorStore, addresses: np.ndarray, out: np.ndarray) -> np.ndarray:
    """The fp16 rows at `addresses`, in their order, in out[:len(addresses)] (a reusable (n, dim) fp16
    buffer), read with plain reads, not through the memory map: a bulk reader (export) touches every row
    once, and mapped pages would stay counted in its resident memory until unmapped, while read pages are
    the kernel's page cache. Consecutive rows are read in one call each."""
    addresses = np.asarray(addresses, dtype=np.int64)
    dst = out[: len(addresses)]
    if not len(addresses):
        return dst
    if not store.holds(addresses):
        raise IndexDamagedError("catalog rows point past the stored vectors: run `alignsearch verify --repair`")
    unique, inverse = np.unique(addresses, return_inverse=True)
    direct = len(unique) == len(addresses) and bool(np.all(unique == addresses))  # sorted, distinct: read in place
    into = dst if direct else np.empty((len(unique), store.dim), dtype=DTYPE)
    breaks = np.flatnonzero((np.diff(unique) != 1) | (np.diff(unique >> SEGMENT_BITS) != 0)) + 1
    starts, ends = np.r_[0, breaks], np.r_[breaks, len(unique)]
    files: dict[int, object] = {}
    try:
        for i, j in zip(starts.tolist(), ends.tolist()):
            segment, row = int(unique[i]) >> SEGMENT_BITS, int(unique[i]) & ROW_MASK
            if segment not in files:
                files[segment] = open(_open_to_read(store.segment_path(segment)), "rb", buffering=0)  # noqa: SIM115
            f, view = files[segment], memoryview(into[i:j]).cast("B")
            f.seek(row * store.row_bytes)
            done = 0
            while done < len(view):
                got = f.readinto(view[done:])
                if not got:
                    raise IndexDamagedError(f"{store.segment_path(segment).name} is shorter than its committed vectors: "
                                            "run `alignsearch verify --repair`")
                done += got
    except FileNotFoundError as exc:
        raise IndexDamagedError(f"{exc.filename} is missing: run `alignsearch verify --repair`") from exc
    finally:
        for f in files.values():
            f.close()
    if not direct:
        dst[:] = into[inverse.reshape(-1)]
    return dst


_LIVE = f"FROM files WHERE status = '{catalog.INDEXED}' AND vec_row IS NOT NULL"


def live_addresses(conn: Connection) -> np.ndarray:
    """Every address an indexed file points at, each once (files of the same content share one), ascending."""
    return np.array([a for (a,) in conn.exec_driver_sql(f"SELECT DISTINCT vec_row {_LIVE} ORDER BY vec_row")],
                    dtype=np.int64)


def usage(conn: Connection, store: VectorStore) -> dict:
    """Rows the store holds, rows files use, and the bytes the others take (what compaction would free)."""
    stored = store.committed_rows
    live = int(conn.exec_driver_sql(f"SELECT COUNT(DISTINCT vec_row) {_LIVE}").scalar())
    return {"rows": stored, "live_rows": live, "dead_bytes": max(0, stored - live) * store.row_bytes}


def _open_to_write(path: Path, create: bool = False) -> int:
    """A descriptor of a vector file to write or cut, never through a symbolic link: one put at vectors.f16 made
    `verify --repair` cut the file it named (any file of this user's) to the committed rows and append to it."""
    try:
        return os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_CREAT if create else 0), 0o644)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        raise IndexDamagedError(f"{path.name} is a symbolic link, and alignsearch never writes through one: run "
                                "`alignsearch verify --repair` (it copies the file the link names into its place)"
                                ) from None


def _open_to_read(path: Path) -> int:
    """A read-only descriptor of a vector file, only when it is a regular file at its own name (safeopen, as the ANN
    files are opened: ann.open_own). Writers never write through a link (_open_to_write), yet readers followed one:
    to a FIFO (a query hung for ever), /dev/zero or another user's file. Judged when a segment is mapped, not per
    query. IndexDamagedError (exit 7) for what it refuses; OSErrors (missing, unreadable) name the whole path."""
    try:
        return safeopen.open_regular(path, follow=False)
    except safeopen.Refused as exc:
        if os.path.isdir(path) and not os.path.islink(path):  # said as before: "move it away" (surfaces/boundary.py)
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path)) from None
        said = str(exc) if str(exc).startswith("is ") else f"is {exc}"
        raise IndexDamagedError(f"{path.name} {said}, and alignsearch never reads vectors through one: run "
                                "`alignsearch verify --repair` (it copies the file a link names into its place)"
                                ) from None
    except OSError as exc:  # opened in its folder, the error names the file alone: the whole path, as open() gave,
        # tells the CLI an index file is unreadable (surfaces/boundary.py), not an unexpected error
        raise type(exc)(exc.errno, exc.strerror, str(path)) from None


def empty_file(path: Path) -> None:
    """Replace `path` by an empty file (a new inode: processes that map the old one are unharmed)."""
    write_bytes(path, b"")


def drop_generation(old: VectorStore, why: str) -> None:
    """After a switch (compaction, re-encode) committed a new generation: the old store's files, each logged
    with `why` (what became of its rows). vectors.f16 is replaced by an empty file (a new inode: readers of the
    old generation keep their map), then each other segment deleted, under vectors/next/ too. A kill in
    between leaves files no commit lists, which the next writer deletes (truncate_uncommitted; under
    vectors/next/, indexer/reindex.remove_leftovers)."""
    if _size(old.path):
        empty_file(old.path)
        log.info("%s: emptied (the old generation: %s)", old.path.name, why)
    for n in old.numbers()[1:]:
        _delete_old_segment(old.segment_path(n), old.path.parent, why)


def _delete_old_segment(path: Path, index_dir: Path, why: str) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        return
    log.info("%s: deleted (the old generation: %s)", path.relative_to(index_dir), why)


def load(conn: Connection, index_dir: Path, dim: int, recorded: state.VectorState | None = None) -> VectorStore:
    """The store of the index at index_dir as the catalog last committed it. recorded: the state's vectors
    where the caller has read the state in this transaction already (not read a second time)."""
    if recorded is None:
        recorded = state.read(conn, "vectors").vectors
    return VectorStore(Path(index_dir) / VECTORS_FILE, dim, recorded.rows,
                       {number: (name, rows) for number, name, rows in recorded.segments})


def holding(conn: Connection, store: VectorStore, addresses: np.ndarray, index_dir: Path) -> VectorStore:
    """store, or the store as committed now where addresses lie past it: rows a writer committed since store
    was loaded, in the same generation (the caller checks that). Its chunks are checked on read."""
    if store.holds(addresses):
        return store
    fresh = load(conn, index_dir, store.dim)
    fresh.expect_chunks(conn)
    return fresh


def save(conn: Connection, store: VectorStore) -> None:
    """Commit the store's row counts, in the transaction that commits the catalog rows using them."""
    state.write(conn, vectors=state.VectorState(rows=store.rows, segments=tuple(
        (n, *store.segments[n]) for n in sorted(store.segments))))


# -- checksums: each committed batch of rows is hashed as it lies on disk (catalog.vector_chunks) --------

ADOPT_CHUNK = 65_536  # rows per checksum when rows written before checksums existed are adopted


def segment_key(store: VectorStore, segment: int) -> str:
    """How catalog.vector_chunks names a segment: "" for vectors.f16, else the segment's own name."""
    return "" if segment == 0 else store.segments[segment][0]


def _read_rows(store: VectorStore, segment: int, start: int, rows: int) -> bytes:
    """The bytes of rows [start, start + rows) as the file holds them (shorter when the file is)."""
    path = store.segment_path(segment)
    try:
        fd = _open_to_read(path)
    except FileNotFoundError:
        return b""
    except IndexDamagedError:  # a link (verify names it, --repair copies its file in first), a FIFO: none read
        return b""
    with os.fdopen(fd, "rb") as f:
        f.seek(start * store.row_bytes)
        return f.read(rows * store.row_bytes)


def digest(data) -> str:
    return hashlib.sha256(data).hexdigest()


def record_chunk(conn: Connection, store: VectorStore, segment: int, start: int, rows: int,
                 key: str | None = None) -> None:
    """Hash rows [start, start + rows) of a segment as written (fsync'ed) and record it, in the transaction
    that commits them. key: the segment's name when it differs from the store's (a re-encode's segment)."""
    if rows <= 0:
        return
    data = _read_rows(store, segment, start, rows)
    if len(data) != rows * store.row_bytes:
        raise OSError(f"{store.segment_path(segment).name} is shorter than the rows just written to it")
    key = segment_key(store, segment) if key is None else key
    conn.execute(delete(catalog.vector_chunks).where(catalog.vector_chunks.c.segment == key,
                                                     catalog.vector_chunks.c.start == start))
    conn.execute(insert(catalog.vector_chunks).values(segment=key, start=start, rows=rows, digest=digest(data)))


def changed_chunks(conn: Connection, store: VectorStore, segment: int, key: str | None = None) -> list[tuple[int, int]]:
    """(start, rows) of the segment's recorded chunks whose bytes no longer hash to their checksum, or that the
    file no longer holds whole. key: as record_chunk's (a re-encode's segment, read as segment 0 of its own store)."""
    c = catalog.vector_chunks.c
    key = segment_key(store, segment) if key is None else key
    out = []
    for start, rows, expected in conn.execute(select(c.start, c.rows, c.digest).where(c.segment == key)
                                              .order_by(c.start)).all():
        data = _read_rows(store, segment, int(start), int(rows))
        if len(data) != rows * store.row_bytes or digest(data) != expected:
            out.append((int(start), int(rows)))
    return out


def forget_chunks(conn: Connection, key: str, low: int = 0, high: int | None = None) -> None:
    """Drop the checksums of a segment's chunks that start in [low, high) (all of them by default)."""
    c = catalog.vector_chunks.c
    where = [c.segment == key, c.start >= low]
    if high is not None:
        where.append(c.start < high)
    conn.execute(delete(catalog.vector_chunks).where(*where))


@dataclass
class ChunkCheck:
    """What hashing every recorded chunk found: bad address ranges, and live files they hit."""

    problems: list[str] = field(default_factory=list)
    bad: list[tuple[str, int, int]] = field(default_factory=list)  # (segment key, start, rows)
    damaged_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # live files with a bad vector
    unchecked_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # live files with no checksum
    legacy_segments: list[int] = field(default_factory=list)  # segments written before checksums existed
    rows_hashed: int = 0


def check_chunks(conn: Connection, store: VectorStore, live: np.ndarray) -> ChunkCheck:
    """Re-hash every recorded chunk of every segment and place the live (id, address) rows against them."""
    out = ChunkCheck()
    c = catalog.vector_chunks.c
    live = np.asarray(live, dtype=np.int64).reshape(-1, 2)
    good_ranges, bad_ranges = [], []
    for segment in store.numbers():
        key = segment_key(store, segment)
        chunks = conn.execute(select(c.start, c.rows, c.digest).where(c.segment == key).order_by(c.start)).all()
        mine = live[(live[:, 1] >> SEGMENT_BITS) == segment]
        if not chunks and len(mine):
            out.legacy_segments.append(segment)
        name, committed = store.segment_path(segment).name, store.committed(segment)
        short = zeroed = changed = 0
        for start, rows, expected in chunks:
            data = _read_rows(store, segment, start, rows)
            out.rows_hashed += rows
            lo, hi = address(segment, start), address(segment, start + rows)
            if start + rows <= committed and len(data) == rows * store.row_bytes and digest(data) == expected:
                good_ranges.append((lo, hi))
                continue
            bad_ranges.append((lo, hi))
            out.bad.append((key, start, rows))
            if len(data) < rows * store.row_bytes or start + rows > committed:
                short += rows
            elif not any(data):
                zeroed += rows
            else:
                changed += rows
        if short:
            out.problems.append(f"{name} is truncated: {short} committed vector rows are missing")
        if zeroed:
            out.problems.append(f"{name} has {zeroed} vector rows filled with zeros")
        if changed:
            out.problems.append(f"{name} has {changed} vector rows whose bytes changed since they were written")
    out.damaged_ids = live[_inside(live[:, 1], bad_ranges), 0]
    legacy = np.isin(live[:, 1] >> SEGMENT_BITS, out.legacy_segments)
    unchecked = ~_inside(live[:, 1], good_ranges) & ~_inside(live[:, 1], bad_ranges) & ~legacy
    out.unchecked_ids = live[unchecked, 0]
    if len(out.damaged_ids):
        out.problems.append(f"{len(out.damaged_ids)} indexed files have a damaged vector")
    if len(out.unchecked_ids):
        out.problems.append(f"{len(out.unchecked_ids)} indexed files point at vector rows no checksum covers")
    return out


def _inside(addresses: np.ndarray, ranges: list[tuple[int, int]]) -> np.ndarray:
    """Which addresses fall in one of the (disjoint) [lo, hi) ranges."""
    if not ranges or not len(addresses):
        return np.zeros(len(addresses), dtype=bool)
    ranges = sorted(ranges)
    lows = np.array([lo for lo, _ in ranges], dtype=np.int64)
    highs = np.array([hi for _, hi in ranges], dtype=np.int64)
    at = np.searchsorted(lows, addresses, side="right") - 1
    ok = at >= 0
    ok[ok] = addresses[ok] < highs[at[ok]]
    return ok


UNIT_TOLERANCE = 0.05  # a stored row's norm is 1 to ~1e-4 (fp16): a zeroed or overwritten row is far off


def not_unit_length(rows: np.ndarray, *, tolerance: float = UNIT_TOLERANCE, norms: np.ndarray | None = None) -> int:
    """How many of the (n, dim) rows are not unit length (NaN among them): what tells a damaged row no
    checksum covers (one zero-filled or overwritten) from a good one. norms: the rows' norms, when the caller
    has them already (a query divides by them next)."""
    if norms is None:
        norms = np.linalg.norm(np.asarray(rows, dtype=np.float32), axis=1)
    return int((~(np.abs(norms - 1) < tolerance)).sum())


def adopt_segment(conn: Connection, store: VectorStore, segment: int) -> int:
    """Record checksums for a segment written before they existed, after checking that each committed row
    is a unit vector (a zero-filled or overwritten row is not). Returns the rows found damaged (then
    nothing is recorded: the caller reports them)."""
    rows = min(store.committed(segment), _size(store.segment_path(segment)) // store.row_bytes)
    for start in range(0, rows, ADOPT_CHUNK):
        n = min(ADOPT_CHUNK, rows - start)
        block = np.frombuffer(_read_rows(store, segment, start, n), dtype=DTYPE).reshape(n, store.dim)
        damaged = not_unit_length(block)
        if damaged:
            return damaged
    for start in range(0, rows, ADOPT_CHUNK):
        record_chunk(conn, store, segment, start, min(ADOPT_CHUNK, rows - start))
    return 0


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def check(conn: Connection, store: VectorStore, live: np.ndarray | None = None) -> ChunkCheck:
    """Everything a writer must know before appending, and `alignsearch verify` reports: committed rows cut
    short, chunks whose bytes changed, live files pointing past the committed rows or at no checksum.
    live: catalog.live_pairs(conn), when the caller has read it already."""
    live = catalog.live_pairs(conn) if live is None else live
    out = check_chunks(conn, store, live)
    for segment in store.numbers():
        path, rows = store.segment_path(segment), store.committed(segment)
        held = _size(path) // store.row_bytes
        if held < rows and segment in out.legacy_segments:  # chunks name the cut rows of the others
            out.problems.insert(0, f"{path.name} holds {held} rows but the catalog committed {rows}")
            hit = live[(live[:, 1] >= address(segment, held)) & (live[:, 1] < address(segment, rows)), 0]
            out.damaged_ids = np.union1d(out.damaged_ids, hit)
    dangling = live[~store.valid(live[:, 1]), 0]
    if len(dangling):
        out.problems.append(f"{len(dangling)} indexed files point past the stored vectors")
        out.damaged_ids = np.union1d(out.damaged_ids, dangling)
    return out
