"""Bring the FAISS index in line with the catalog: add new ids, drop gone ones, retrain when due."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
from sqlalchemy.engine import Engine

from alignsearch import ann, catalog
from alignsearch.vectors import VectorStore
from indexer import ondisk
from indexer.tune import tune

DEFAULT_RECALL = 0.95

CHUNK = 65_536


def _chunks(store: VectorStore, ids: np.ndarray, rows: np.ndarray):
    for start in range(0, len(ids), CHUNK):
        yield store.get(rows[start : start + CHUNK]), ids[start : start + CHUNK]


def sync_index(db: Engine, store: VectorStore, path: Path, rebuild: bool = False, seed: int = 0,
               target_recall: float | None = None, ondisk_shards: int | None = None) -> dict:
    """Make the index at `path` hold exactly the catalog's indexed files; written atomically.

    An existing IVF-PQ index is updated in place (no retraining) unless the collection crossed the
    exact/IVF-PQ threshold or grew 4x past its training size; a flat index is always rebuilt (cheap).
    Comparing ids rather than replaying a log makes this repair any earlier interrupted run.
    nprobe and the re-rank depth are tuned after a (re)build, when N changed by a quarter since the
    last tuning, or when a target recall is given. With ondisk_shards (remembered by the index), an
    IVF-PQ index is rebuilt from shards added in parallel and merged into on-disk lists (indexer/ondisk.py).
    """
    start = time.perf_counter()
    with db.connect() as conn:
        live = np.array(list(catalog.live_vectors(conn)), dtype=np.int64).reshape(-1, 2)
        trained_n = catalog.get_meta(conn, "index_trained_n", 0)
        tuning = catalog.get_meta(conn, "tuning") or {}
        if ondisk_shards is None:
            ondisk_shards = catalog.get_meta(conn, "ondisk_shards", 0)
    ids, rows = live[:, 0], live[:, 1]
    n, dim = len(ids), store.dim
    index = ann.read(path) if path.exists() and not rebuild else None
    current = ann.describe(index) if index is not None else None
    lists = None
    if ondisk_shards and ann.plan_index(n, dim).kind == "ivfpq":
        lists = ondisk.lists_file(path.parent)  # lists on disk cannot drop ids: rebuilt from shards each time
        index = ondisk.build_ondisk(store, ids, rows, lists, ondisk_shards, min(ondisk_shards, os.cpu_count() or 1), seed)
        trained_n, action = n, f"built on disk from {ondisk_shards} shards"
    elif index is None or current.kind == "flat" or ann.needs_rebuild(current, trained_n, n, dim):
        plan = ann.plan_index(n, dim)
        sample_rows = np.random.default_rng(seed).choice(rows, size=ann.train_size(n, plan), replace=False)
        index = ann.train_and_fill(ann.create(plan, dim), store.get(np.sort(sample_rows)), _chunks(store, ids, rows))
        trained_n, action = n, "built"
    else:
        present = ann.stored_ids(index)
        gone = np.setdiff1d(present, ids)
        new = np.isin(ids, present, invert=True)
        ann.remove(index, gone)
        for vectors, chunk_ids in _chunks(store, ids[new], rows[new]):
            ann.add(index, vectors, chunk_ids)
        action = f"updated (+{int(new.sum())} -{len(gone)})"
    target = target_recall or tuning.get("target", DEFAULT_RECALL)
    stale = action == "built" or abs(n - tuning.get("n", 0)) > 0.25 * max(n, 1) or target_recall is not None
    if stale or tuning.get("target") != target:
        tuning = {**tune(index, store, ids, rows, target=target, seed=seed), "n": n}
    ann.write_atomic(index, path)
    for old in path.parent.glob("lists-*.ivfdata"):  # open readers keep their mapping of an unlinked file
        if old != lists:
            old.unlink()
    with db.begin() as conn:
        catalog.set_meta(conn, "index_trained_n", trained_n)
        catalog.set_meta(conn, "tuning", tuning)
        catalog.set_meta(conn, "ondisk_shards", ondisk_shards)
    plan = ann.describe(index)
    return {"action": action, "plan": plan.to_dict(), "vectors": int(index.ntotal), "tuning": tuning,
            "layout": ann.layout(index), "seconds": time.perf_counter() - start}
