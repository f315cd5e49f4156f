"""Bring the FAISS index in line with the catalog: add new ids, drop gone ones, retrain when due."""

from __future__ import annotations

import os
import time
from pathlib import Path

import faiss
import numpy as np
from sqlalchemy.engine import Engine

from alignsearch.storage import ann, catalog, shards, state
from alignsearch.storage.paths import ANN_FILE
from alignsearch.errors import BadInputError, IndexDamagedError
from alignsearch.storage.vectors import VectorStore
from indexer import ondisk
from indexer.tune import tune

DEFAULT_RECALL = 0.95

CHUNK = 65_536


def _chunks(store: VectorStore, ids: np.ndarray, rows: np.ndarray):
    for start in range(0, len(ids), CHUNK):
        yield store.get(rows[start : start + CHUNK]), ids[start : start + CHUNK]


def sync_index(db: Engine, store: VectorStore, path: Path, rebuild: bool = False, seed: int = 0,
               target_recall: float | None = None, ondisk_shards: int | None = None,
               index_shards: int | None = None, live: np.ndarray | None = None, on_commit=None) -> dict:
    """Make the index at `path` hold exactly the catalog's indexed files; written atomically.

    An existing IVF-PQ index is updated in place (no retraining) unless the collection crossed the
    exact/IVF-PQ threshold or grew 4x past its training size; a flat index is always rebuilt (cheap).
    Comparing ids rather than replaying a log makes this repair any earlier interrupted run.
    nprobe and the re-rank depth are tuned after a (re)build, when N changed by a quarter since the
    last tuning, or when a target recall is given. With ondisk_shards (remembered by the index), an
    IVF-PQ index is rebuilt from shards added in parallel and merged into on-disk lists (indexer/ondisk.py).
    With index_shards (remembered), an IVF-PQ index is kept as that many shard files searched together
    (alignsearch/storage/shards.py): built in parallel, then updated shard by shard.

    A single-file index is written to index.faiss.next, its checksum committed with the tuning (and
    whatever on_commit(conn) adds to that transaction: a re-encode's switch of generation), then renamed
    over index.faiss; readers accept only bytes with the recorded checksum (ann.read_verified). live:
    the (id, address) pairs to index instead of the catalog's (a generation not yet committed).
    """
    start = time.perf_counter()
    with db.connect() as conn:
        if live is None:
            live = np.array(list(catalog.live_vectors(conn)), dtype=np.int64).reshape(-1, 2)
        recorded = state.read(conn).ann
        trained_n, tuning, recorded_digest = recorded.trained_n, dict(recorded.tuning), recorded.digest
        if ondisk_shards is None:
            ondisk_shards = recorded.ondisk_shards
        if index_shards is None:
            index_shards = recorded.index_shards
    if ondisk_shards and index_shards:
        raise BadInputError("choose one layout: --ondisk-shards (one merged file) or --index-shards (several files)")
    ids, rows = live[:, 0], live[:, 1]
    n, dim = len(ids), store.dim
    sharded = bool(index_shards) and ann.plan_index(n, dim).kind == "ivfpq"
    damaged = False
    index = None
    if path.exists() and not rebuild and not sharded and not ondisk_shards:
        try:  # never build on an index whose bytes changed since they were written: rebuild it from the vectors
            index = ann.read_verified(path, recorded_digest, tries=1)
        except (IndexDamagedError, RuntimeError):
            damaged = True
    current = ann.describe(index) if index is not None else None
    lists = None
    if sharded:
        index, trained_n, action = _sync_shards(store, ids, rows, path.parent, index_shards, trained_n, rebuild, seed)
    elif ondisk_shards and ann.plan_index(n, dim).kind == "ivfpq":
        lists = ondisk.lists_file(path.parent)  # lists on disk cannot drop ids: rebuilt from shards each time
        index = ondisk.build_ondisk(store, ids, rows, lists, ondisk_shards, min(ondisk_shards, os.cpu_count() or 1), seed)
        trained_n, action = n, f"built on disk from {ondisk_shards} shards"
    elif index is None or current.kind == "flat" or ann.needs_rebuild(current, trained_n, n, dim):
        plan = ann.plan_index(n, dim)
        sample_rows = np.random.default_rng(seed).choice(rows, size=ann.train_size(n, plan), replace=False)
        index = ann.train_and_fill(ann.create(plan, dim), store.get(np.sort(sample_rows)), _chunks(store, ids, rows))
        trained_n, action = n, "rebuilt (the old one was damaged)" if damaged else "built"
    else:
        present = ann.stored_ids(index)
        gone = np.setdiff1d(present, ids)
        new = np.isin(ids, present, invert=True)
        ann.remove(index, gone)
        for vectors, chunk_ids in _chunks(store, ids[new], rows[new]):
            ann.add(index, vectors, chunk_ids)
        action = f"updated (+{int(new.sum())} -{len(gone)})"
    target = target_recall or tuning.get("target", DEFAULT_RECALL)
    stale = action.startswith(("built", "rebuilt")) or abs(n - tuning.get("n", 0)) > 0.25 * max(n, 1) or target_recall is not None
    if stale or tuning.get("target") != target:
        tuning = {**tune(index, store, ids, rows, target=target, seed=seed), "n": n}
    single = not sharded and lists is None
    digest = ann.write_next(index, path) if single else None
    if lists is not None:
        ann.write_atomic(index, path)
    with db.begin() as conn:
        # the files of the other layouts are memory-mapped, not hashed on each open: `verify` checks them
        state.write(conn, ann=state.AnnState(digest=digest, files={} if single else ann_file_digests(path.parent, lists),
                                             trained_n=trained_n, tuning=tuning, ondisk_shards=ondisk_shards,
                                             index_shards=index_shards))
        if on_commit is not None:
            on_commit(conn)
    if single:
        ann.publish_next(path)
        shards.unpublish(path.parent)
    for old in path.parent.glob("lists-*.ivfdata"):  # open readers keep their mapping of an unlinked file
        if old != lists:
            old.unlink()
    plan = ann.describe(index)
    return {"action": action, "plan": plan.to_dict(), "vectors": int(index.ntotal), "tuning": tuning,
            "layout": ann.layout(index), "seconds": time.perf_counter() - start}


def _sync_shards(store: VectorStore, ids: np.ndarray, rows: np.ndarray, folder: Path, count: int, trained_n: int,
                 rebuild: bool, seed: int) -> tuple[faiss.Index, int, str]:
    """Bring the shard files in line with (ids, rows): in place shard by shard, or built anew in parallel
    when there are none, their number changed, or the collection outgrew their training."""
    current = shards.files(folder)
    owner = shards.shard_of(ids, count)
    if current and len(current) == count and not rebuild:
        plan = ann.describe(faiss.read_index(str(current[0]), faiss.IO_FLAG_MMAP_IFC))
        if not ann.needs_rebuild(plan, trained_n, len(ids), store.dim):
            paths, added, removed, changed = [], 0, 0, 0
            for s, path in enumerate(current):  # one shard in memory at a time
                index = ann.read(path)
                mine, my_rows = ids[owner == s], rows[owner == s]
                present = ann.stored_ids(index)
                gone, new = np.setdiff1d(present, mine), np.isin(mine, present, invert=True)
                if len(gone) or new.any():
                    ann.remove(index, gone)
                    for vectors, chunk_ids in _chunks(store, mine[new], my_rows[new]):
                        ann.add(index, vectors, chunk_ids)
                    path = shards.new_name(folder, s)
                    ann.write_atomic(index, path)
                    added, removed, changed = added + int(new.sum()), removed + len(gone), changed + 1
                paths.append(path)
            shards.publish(folder, paths)
            return shards.open_shards(paths), trained_n, f"updated {changed} of {count} shards (+{added} -{removed})"
    trained = ondisk.train_empty(store, rows, seed)
    paths = [shards.new_name(folder, s) for s in range(count)]
    parts = [(ids[owner == s], rows[owner == s]) for s in range(count)]
    ondisk.add_shards(trained, store, parts, paths, min(count, os.cpu_count() or 1))
    shards.publish(folder, paths)
    return shards.open_shards(paths), len(ids), f"built {count} shard files"


def ann_file_digests(folder: Path, lists: Path | None) -> dict[str, str]:
    """Checksums of the files a sharded or on-disk layout serves (for `alignsearch verify`)."""
    paths = shards.files(folder) or [folder / ANN_FILE]
    if shards.files(folder):
        paths.append(folder / shards.MANIFEST)
    if lists is not None:
        paths.append(lists)
    return {p.name: ann.file_digest(p) for p in paths}
