"""Bring the FAISS index in line with the catalog: add new ids, drop gone ones, retrain when due.

The index is kept in one of three layouts (alignsearch/storage/layout.py): one file, shard files with a
manifest, or inverted lists on disk. The layout objects live in storage and name, commit, publish, open and
check their files; building needs the indexer's training and on-disk merging (indexer/ondisk.py), which
storage may not import, so each layout's builder is here (BUILDERS). sync_index runs the same round for all:
build, tune, write, commit, publish.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import faiss
import numpy as np
from sqlalchemy.engine import Engine

from alignsearch.storage import ann, catalog, layouts, shards
from alignsearch.errors import BadInputError, IndexDamagedError
from alignsearch.storage.layouts import Layout, OnDisk, Sharded, Single
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
    """Make the index in `path`'s folder (path: its index.faiss) hold exactly the catalog's indexed files;
    written next to the one readers use, then swapped in.

    An existing IVF-PQ index is updated in place (no retraining) unless the collection crossed the
    exact/IVF-PQ threshold or grew 4x past its training size; a flat index is always rebuilt (cheap).
    Comparing ids rather than replaying a log makes this repair any earlier interrupted run.
    nprobe and the re-rank depth are tuned after a (re)build, when N changed by a quarter since the
    last tuning, or when a target recall is given. With ondisk_shards (remembered by the index), an
    IVF-PQ index is rebuilt from shards added in parallel and merged into on-disk lists (indexer/ondisk.py).
    With index_shards (remembered), an IVF-PQ index is kept as that many shard files searched together
    (alignsearch/storage/shards.py): built in parallel, then updated shard by shard.

    The layout's files are written, their checksums committed with the tuning (and whatever on_commit(conn)
    adds to that transaction: a re-encode's switch of generation), then published; a single file goes
    through index.faiss.next and readers accept only bytes with the recorded checksum (ann.read_verified).
    live: the (id, address) pairs to index instead of the catalog's (a generation not yet committed).
    """
    start = time.perf_counter()
    folder = Path(path).parent
    with db.connect() as conn:
        if live is None:
            live = catalog.live_pairs(conn)
        record = layouts.read_record(conn)
    if ondisk_shards is None:
        ondisk_shards = record.ondisk_shards
    if index_shards is None:
        index_shards = record.index_shards
    if ondisk_shards and index_shards:
        raise BadInputError("choose one layout: --ondisk-shards (one merged file) or --index-shards (several files)")
    ids, rows = live[:, 0], live[:, 1]
    n, dim = len(ids), store.dim
    kind = layouts.target_kind(ann.plan_index(n, dim).kind, ondisk_shards=ondisk_shards, index_shards=index_shards)
    out = layouts.new(folder, kind)
    job = BuildJob(store=store, ids=ids, rows=rows, trained_n=record.trained_n, rebuild=rebuild, seed=seed,
                   shards=ondisk_shards or index_shards, current=layouts.pick(folder, record))
    built = BUILDERS[kind](out, job)
    index, tuning = built.index, record.tuning
    target = target_recall or tuning.get("target", DEFAULT_RECALL)
    stale = (built.action.startswith(("built", "rebuilt")) or abs(n - tuning.get("n", 0)) > 0.25 * max(n, 1)
             or target_recall is not None)
    if stale or tuning.get("target") != target:
        tuning = {**tune(index, store, ids, rows, target=target, seed=seed), "n": n}
    out.write(index)
    with db.begin() as conn:
        out.commit(conn, replace(record, trained_n=built.trained_n, tuning=tuning, ondisk_shards=ondisk_shards,
                                 index_shards=index_shards))
        if on_commit is not None:
            on_commit(conn)
    out.publish()
    plan = ann.describe(index)
    return {"action": built.action, "plan": plan.to_dict(), "vectors": int(index.ntotal), "tuning": tuning,
            "layout": ann.layout(index), "seconds": time.perf_counter() - start}


@dataclass(frozen=True)
class BuildJob:
    """What a layout's builder brings the index in line with."""

    store: VectorStore
    ids: np.ndarray  # catalog ids to index
    rows: np.ndarray  # their vectors' addresses in the store
    trained_n: int  # vectors the current index was trained on (the catalog's record)
    rebuild: bool  # train anew even where an update in place would do
    seed: int
    shards: int  # --ondisk-shards or --index-shards, for the layouts that use it
    current: Layout  # the layout the index has now, to update in place when it is the same


@dataclass(frozen=True)
class Built:
    index: faiss.Index
    trained_n: int
    action: str  # what was done, as `index --json` reports it


def _build_single(out: Single, job: BuildJob) -> Built:
    """Update the current single file in place, or train anew (also when it is damaged or its lists are on
    disk, which an update cannot change)."""
    n, dim = len(job.ids), job.store.dim
    index, damaged = None, False
    current = job.current
    if isinstance(current, Single) and current.exists() and not job.rebuild:
        try:  # never build on an index whose bytes changed since they were written: rebuild it from the vectors
            index = current.open()
        except (IndexDamagedError, RuntimeError):
            damaged = True
        if index is not None and ann.layout(index) != "memory":  # an on-disk index recorded before checksums
            index = None
    plan = ann.describe(index) if index is not None else None
    if index is None or plan.kind == "flat" or ann.needs_rebuild(plan, job.trained_n, n, dim):
        plan = ann.plan_index(n, dim)
        sample_rows = np.random.default_rng(job.seed).choice(job.rows, size=ann.train_size(n, plan), replace=False)
        index = ann.train_and_fill(ann.create(plan, dim), job.store.get(np.sort(sample_rows)),
                                   _chunks(job.store, job.ids, job.rows))
        return Built(index, n, "rebuilt (the old one was damaged)" if damaged else "built")
    present = ann.stored_ids(index)
    gone = np.setdiff1d(present, job.ids)
    new = np.isin(job.ids, present, invert=True)
    ann.remove(index, gone)
    for vectors, chunk_ids in _chunks(job.store, job.ids[new], job.rows[new]):
        ann.add(index, vectors, chunk_ids)
    return Built(index, job.trained_n, f"updated (+{int(new.sum())} -{len(gone)})")


def _build_ondisk(out: OnDisk, job: BuildJob) -> Built:
    """Always a new lists file: lists on disk cannot drop ids."""
    index = ondisk.build_ondisk(job.store, job.ids, job.rows, out.new_lists(), job.shards,
                                min(job.shards, os.cpu_count() or 1), job.seed)
    return Built(index, len(job.ids), f"built on disk from {job.shards} shards")


def _build_sharded(out: Sharded, job: BuildJob) -> Built:
    """Bring the shard files in line with (ids, rows): in place shard by shard, or built anew in parallel
    when there are none, their number changed, or the collection outgrew their training. Shards that
    change are written under new names; the rest are staged as they are."""
    store, ids, rows, count, folder = job.store, job.ids, job.rows, job.shards, out.folder
    try:
        current = shards.files(folder)
    except IndexDamagedError:  # a manifest that cannot be read: built anew (verify --repair's rebuild died here)
        current = None
    owner = shards.shard_of(ids, count)
    if current and len(current) == count and not job.rebuild:
        plan = ann.describe(faiss.read_index(ann.own(current[0]), faiss.IO_FLAG_MMAP_IFC))
        if not ann.needs_rebuild(plan, job.trained_n, len(ids), store.dim):
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
            out.stage(paths)
            return Built(shards.open_shards(paths), job.trained_n,
                         f"updated {changed} of {count} shards (+{added} -{removed})")
    trained = ondisk.train_empty(store, rows, job.seed)
    paths = [shards.new_name(folder, s) for s in range(count)]
    parts = [(ids[owner == s], rows[owner == s]) for s in range(count)]
    ondisk.add_shards(trained, store, parts, paths, min(count, os.cpu_count() or 1))
    out.stage(paths)
    return Built(shards.open_shards(paths), len(ids), f"built {count} shard files")


BUILDERS = {Single.kind: _build_single, Sharded.kind: _build_sharded, OnDisk.kind: _build_ondisk}
