"""The writer stage: one transaction per batch for catalog rows, vector rows and the row count."""

from __future__ import annotations

from typing import Callable

import numpy as np
from sqlalchemy.engine import Engine

from alignsearch.storage import catalog, state, vectors
from alignsearch.storage.vectors import VectorStore
from indexer import scan
from indexer.decode import Item


def catalog_writer(db: Engine, store: VectorStore) -> Callable[..., None]:
    """A write(batch, new_vectors, actor_rows=()) that appends the new vectors (fsync'ed) and then commits the
    rows that point at them, with a checksum of the rows as written (catalog.vector_chunks). Killed in
    between, the next run cuts the uncommitted vectors off. Items whose vector is stored already (vec_row
    set: reused content, or written by an encoder actor) take none of them; actor_rows are the addresses
    encoder actors wrote for this batch (hashed here as they lie on disk)."""

    def write(batch: list[Item], new_vectors: np.ndarray, actor_rows=()) -> None:
        encoded = [it for it in batch if it.crop is not None and it.vec_row is None]
        # Copies of one content met before any of them was stored (one batch, or batches gathered for one
        # write) share one row, as copies met later do through `known`: the first copy's vector is kept.
        # Before, a first run stored each copy's vector, and "one row per content" held only across runs.
        slot: dict = {}
        for i, it in enumerate(encoded):
            slot.setdefault(it.sha256 or id(it), i)
        kept = sorted(set(slot.values()))
        at = {i: n for n, i in enumerate(kept)}
        new_vectors = new_vectors[kept] if len(kept) < len(encoded) else new_vectors
        start = store.append(new_vectors) if encoded else store.rows
        row_of = {id(it): start + at[slot[it.sha256 or id(it)]] for it in encoded}
        with db.begin() as conn:
            seals: list = []  # the rows' field seals, written in one executemany before the batch commits
            for it in batch:
                file_id = catalog.upsert_file(conn, file_values(it, it.vec_row if it.vec_row is not None or it.crop is None
                                                                else row_of[id(it)]), seals=seals)
                if it.phash and it.crop is not None:
                    catalog.set_phashes(conn, [(file_id, it.phash)])
                if it.photo is not None and it.crop is not None:
                    catalog.set_photo(conn, file_id, it.found.relpath, {**it.photo, "ocr": it.ocr})
            catalog.seal_files(conn, seals)
            vectors.record_chunk(conn, store, 0, start, len(kept))
            record_runs(conn, store, actor_rows)
            vectors.save(conn, store)

    return write


def file_values(it: Item, vec_row: int | None) -> dict:
    """The catalog row of a decoded item (failed when it has no crop)."""
    f, ok = it.found, it.crop is not None
    return dict(root=f.root, relpath=f.relpath, relpath_raw=f.relpath_raw, size=f.size, mtime=f.mtime,
                sha256=it.sha256, width=it.width, height=it.height, format=it.format,
                status=catalog.INDEXED if ok else catalog.FAILED, reason=it.reason, vec_row=vec_row if ok else None,
                link=f.link, **scan.row_time(f))


def record_runs(conn, store: VectorStore, addresses) -> None:
    """One checksum per run of consecutive addresses (rows an encoder actor wrote for one batch)."""
    addresses = np.unique(np.asarray(list(addresses), dtype=np.int64))
    if not len(addresses):
        return
    breaks = np.flatnonzero(np.diff(addresses) != 1) + 1
    for run in np.split(addresses, breaks):
        segment, first = int(run[0]) >> vectors.SEGMENT_BITS, int(run[0]) & vectors.ROW_MASK
        vectors.record_chunk(conn, store, segment, first, len(run))


FOLD_BELOW_ROWS = 1_000_000  # 1.3 GB at 640-d: seconds to copy, against a GPU-hour to encode that many
CHUNK = 65_536


def fold_small_segments(db: Engine, store: VectorStore, below: int = FOLD_BELOW_ROWS) -> int:
    """Move segments of fewer than `below` rows into segment 0 and repoint the catalog; returns rows moved.

    Each Ray run leaves a segment per encoder actor: without this, runs of a few thousand images would
    pile up files, and a long-lived reader an open map per file. The rows are copied (fsync'ed) first,
    then one transaction re-addresses the catalog and drops the segments; killed in between, the copy
    is cut off as uncommitted, and killed after it, the old files are deleted as unknown by the next writer.
    Every segment is read against its checksums before anything moves (ChunkChanged): the copy records a fresh
    checksum over what it read, so a row damaged on disk since its segment was written went live as sound.
    """
    small = [n for n in sorted(store.segments) if store.committed(n) < below]
    if not small:
        return 0
    paths = [store.segment_path(n) for n in small]
    moved = 0
    with db.begin() as conn:
        for n in small:
            damaged = vectors.changed_chunks(conn, store, n)
            if damaged:
                start, rows = damaged[0]
                raise vectors.ChunkChanged(f"{store.segment_path(n).name}: vector rows {start} to {start + rows - 1} "
                                           "changed since they were written (checksum): run `alignsearch verify "
                                           "--repair`")
        for n in small:
            rows, base = store.committed(n), store.rows
            for start in range(0, rows, CHUNK):
                first = store.append(store.get(vectors.address(n, start) + np.arange(min(CHUNK, rows - start))))
                vectors.record_chunk(conn, store, 0, first, min(CHUNK, rows - start))
            vectors.forget_chunks(conn, vectors.segment_key(store, n))
            catalog.readdress(conn, vectors.address(n, 0), vectors.address(n + 1, 0), base - vectors.address(n, 0))
            store.forget(n)
            moved += rows
        vectors.save(conn, store)
        # addresses moved and the old files go, as in a compaction: a reader's snapshot (its filter columns, its
        # store) of the addresses before must not meet the store after, so it searches the new generation
        state.write(conn, generation=state.read(conn, "generation").generation + 1)
    for path in paths:
        path.unlink(missing_ok=True)
    return moved
