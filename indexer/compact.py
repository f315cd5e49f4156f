"""Reclaim the vector rows no file uses any more: a new generation of the vector store, never a rewrite.

The store is append-only (alignsearch/storage/vectors.py): a deleted, changed or forgotten file leaves its
row behind, so a library whose files come and go grows its vector files without end (1.3 KB a row at
640-d). When the rows no file points at are many (`due`), the live rows are copied, checked against their
checksums as they are read, into a new segment of their own (fsync'ed, with checksums), and one
transaction makes it live: every file's address moves to the new segment, the old segments' checksums go,
the generation number grows. Readers notice the generation on their next query and swap their snapshot
whole (their maps of the old files stay valid: the files are unlinked or replaced, never cut short). This
is the switch a re-encode makes (indexer/reindex.py), with copied rows instead of encoded ones.

Killed before the commit: the new segment is a file no commit knows (under vectors/next/), deleted when the
next `index` run or `forget` starts (remove_leftovers), and the index is as it was. Killed after it: the
new segment is the store's, the commit recorded a run under way (an index run's own, or one the switch
records for `forget`'s compaction, cleared once the old files are gone: `verify` says interrupted, not
damaged), and what is left of the old generation is what a writer tidies anyway:
vectors.f16's rows lie past its committed row 0 and the old top-level segments are files no commit lists
(both for the next `index` run: VectorStore.truncate_uncommitted), an old segment under vectors/next/ is
a leftover (remove_leftovers). Not killed, the compaction deletes them itself (vectors.drop_generation, as a
re-encode's switch does).
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sqlalchemy import text

from alignsearch.atomic import fsync_dir, make_folders
from alignsearch.errors import IndexDamagedError
from alignsearch.storage import rowdigest, state, vectors
from alignsearch.storage.paths import VECTORS_FILE
from alignsearch.storage.vectors import VectorStore
from indexer import reindex

log = logging.getLogger(__name__)

# Dead rows worth a copy of every live one: at least this many (65,536 rows are 84 MB at 640-d fp16; fewer
# are not worth re-reading the whole store for) and at least as many as the live rows (the files hold twice
# what is used), so a library that keeps changing copies each live row about once per doubling.
MIN_DEAD_ROWS = 65_536
DEAD_SHARE = 0.5
CHUNK = 65_536  # rows per checksum of the new segment
COPY = 8_192  # rows read and written at a time (32 MB as float32 at 1,024-d)


@dataclass(frozen=True)
class Compacted:
    rows_before: int  # committed rows in every segment
    rows_after: int  # the rows files point at: each kept once, however many files share it
    bytes_freed: int
    seconds: float

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def due(live_rows: int, stored_rows: int, force: bool = False) -> bool:
    """Is a copy of the live rows worth what it frees? force: whenever any row is dead (`index --compact`)."""
    dead = stored_rows - live_rows
    if force:
        return dead > 0
    return dead >= MIN_DEAD_ROWS and dead >= DEAD_SHARE * stored_rows


def remove_leftovers(db, out: Path) -> None:
    """At a writer's start (the caller holds the writer lock): delete the files under vectors/next/ that the
    catalog does not reference, a killed compaction's copy among them. Referenced ones stay: the store's
    segments (a switch committed and then killed is finished by the writer, not undone) and the segment
    of a re-encode in progress."""
    with db.connect() as conn:
        recorded = state.read(conn)
        if recorded.model is None:
            return
        store = vectors.load(conn, out, recorded.model.dim, recorded.vectors)
    reindex.remove_leftovers(store, pending=recorded.reindex.segment if recorded.reindex else None)


def compact(db, out: Path, *, force: bool = False) -> Compacted | None:
    """Compact the vector store of the index at `out` when `due` (the caller holds the writer lock, and
    deleted what a killed one left when it took it: remove_leftovers); None when it was not (or nothing is
    encoded yet, or a re-encode is in progress: its pending rows point into a segment of their own).
    IndexDamagedError, with nothing changed, when a live row fails its checksum: `verify --repair` first."""
    started = time.perf_counter()
    with db.connect() as conn:
        recorded = state.read(conn)
        if recorded.model is None or recorded.reindex is not None:
            return None
        store = vectors.load(conn, out, recorded.model.dim, recorded.vectors)
        counted = vectors.usage(conn, store)  # counts first: most runs end here, with no addresses loaded
        stored = counted["rows"]
        if not due(counted["live_rows"], stored, force):
            return None
        live = vectors.live_addresses(conn)
        if not store.holds(live):
            raise IndexDamagedError("catalog rows point past the stored vectors: run `alignsearch verify --repair`")
        store.expect_chunks(conn)  # each row copied is checked: a damaged row must not get a fresh checksum
    # under vectors/next/ until the commit, where a re-encode's new segment waits too: a copy a kill left
    # is no "unknown segment" to verify, and the next run deletes it (remove_leftovers)
    name = f"{reindex.NEXT_FOLDER}/{uuid.uuid4().hex}"
    number = max(store.numbers()) + 1  # a number no reader of the old generation knows
    new = VectorStore(out / VECTORS_FILE, store.dim, 0, {number: (name, len(live))})
    _copy(store, live, new.segment_path(number))
    # `forget` compacts with no index run under way: the switch records one, so that a kill before the old
    # generation's files are gone leaves an interrupted run's leftovers for verify, not damage (exit 7)
    mark = None if recorded.index_run else state.IndexRun(started=time.time(), pid=os.getpid())
    _switch(db, new, number, live, [vectors.segment_key(store, n) for n in store.numbers()], recorded.generation,
            mark)
    vectors.drop_generation(store, f"its live rows are copied to {new.segment_path(number).relative_to(out)}")
    if mark:  # an index run's own mark is the run's to clear, when it ends
        with db.begin() as conn:
            state.write(conn, index_run=None)
    done = Compacted(rows_before=stored, rows_after=len(live), bytes_freed=(stored - len(live)) * new.row_bytes,
                     seconds=round(time.perf_counter() - started, 3))
    log.info("vectors compacted: %d rows kept of %d (%d bytes freed)", done.rows_after, done.rows_before,
             done.bytes_freed)
    return done


def _copy(store: VectorStore, live: np.ndarray, path: Path) -> None:
    """The rows at `live`'s addresses, in that order, into a new file at path, fsync'ed with its name. Each
    chunk read is checked against its checksum (store.expect_chunks): ChunkChanged, and no file, when one
    changed since it was written; IndexDamagedError when a row is not unit length."""
    make_folders(path.parent)  # as the index folder: others writing vectors/ would have the index refused
    try:
        with open(path, "wb") as f:
            for start in range(0, len(live), COPY):
                rows = store.get(live[start : start + COPY])
                # rows no checksum covers (written before checksums existed) are read unchecked: one zeroed or
                # overwritten is not unit length (the rule adopt_segment applies), and must not get a checksum here
                if vectors.not_unit_length(rows):
                    raise IndexDamagedError(f"vector rows that are not unit length (damaged) in {store.path.name} "
                                            "or its segments: run `alignsearch verify --repair`")
                f.write(rows.astype(vectors.DTYPE).tobytes())  # fp16 -> 32 -> 16: exact
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(path.parent)
    except BaseException:
        path.unlink(missing_ok=True)  # not yet known to any commit: as if never written
        raise


def _switch(db, new: VectorStore, number: int, live: np.ndarray, old_keys: list[str], generation: int,
            mark: state.IndexRun | None = None) -> None:
    """One transaction: every file's address moves to the new segment (live[i] becomes its row i), the old
    segments' checksums go, the new one's are recorded, the store and the generation are the new ones (and
    mark, when given, is the run under way)."""
    with db.begin() as conn:
        if state.read(conn, "generation").generation != generation:
            raise RuntimeError("the index changed while its vectors were compacted")  # the writer lock forbids it
        conn.execute(text("CREATE TEMP TABLE IF NOT EXISTS compact_map (old INTEGER PRIMARY KEY, new INTEGER)"))
        conn.execute(text("DELETE FROM compact_map"))
        base = vectors.address(number, 0)
        # the driver's executemany: SQLAlchemy's per-row parameter handling cost more than the insert itself
        conn.exec_driver_sql("INSERT INTO compact_map (old, new) VALUES (?, ?)",
                             list(zip(live.tolist(), range(base, base + len(live)))))
        # rows no indexed file uses leave with the old segments: a file of another state keeps no address
        # each seal moves by its address's shift (rowdigest.shifted_seal_sql), in the same statement: a damaged
        # address is not sealed anew where it names another file's row. One lookup of the map sets both (a row
        # value): a second subquery for the seal cost ~10% more compaction (bench_compact.py, RESULTS.md)
        seal = rowdigest.shifted_seal_sql("files.vec_seal", "new - files.vec_row")
        conn.execute(text(f"UPDATE files SET (vec_row, vec_seal) = (SELECT new, {seal} FROM compact_map "
                          "WHERE old = files.vec_row) WHERE vec_row IS NOT NULL"))
        conn.execute(text("DROP TABLE compact_map"))
        for key in old_keys:
            vectors.forget_chunks(conn, key)
        for start in range(0, len(live), CHUNK):
            vectors.record_chunk(conn, new, number, start, min(CHUNK, len(live) - start))
        vectors.save(conn, new)
        state.write(conn, generation=generation + 1)
        if mark:
            state.write(conn, index_run=mark)
