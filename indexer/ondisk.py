"""Sharded build of an IVF-PQ index whose inverted lists live on disk, memory-mapped when served.

Train once on a random sample, add disjoint shards of (catalog id, vector) in parallel processes,
merge the shards' lists into one file with faiss.contrib.ondisk.merge_ondisk. The result searches
like the in-memory index while only the coarse quantizer and PQ tables stay in RAM.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import faiss
import numpy as np
from faiss.contrib.ondisk import merge_ondisk

from alignsearch.storage import ann
from alignsearch.storage.vectors import VectorStore
from alignsearch.workerpool import spawn_executor


def add_shard(trained_path: str, store: VectorStore, ids: np.ndarray, rows: np.ndarray, out_path: str) -> str:
    """One worker's share: the trained (empty) index plus these vectors, written to out_path."""
    index = faiss.read_index(trained_path)
    for start in range(0, len(ids), 65_536):
        ann.add(index, store.get(rows[start : start + 65_536]), ids[start : start + 65_536])
    faiss.write_index(index, out_path)
    with open(out_path, "rb") as f:  # durable before any manifest names it
        os.fsync(f.fileno())
    return out_path


def train_empty(store: VectorStore, rows: np.ndarray, seed: int = 0) -> faiss.Index:
    """The IVF-PQ index for len(rows) vectors, trained on a random sample of them, holding nothing yet."""
    n, dim = len(rows), store.dim
    plan = ann.plan_index(n, dim)
    if plan.kind != "ivfpq":
        raise ValueError(f"{n} vectors make a flat index; on-disk lists are for IVF-PQ")
    sample = np.sort(np.random.default_rng(seed).choice(rows, size=ann.train_size(n, plan), replace=False))
    return ann.train_and_fill(ann.create(plan, dim), store.get(sample), [])


def add_shards(trained: faiss.Index, store: VectorStore, parts: list[tuple[np.ndarray, np.ndarray]],
               out_paths: list[Path], workers: int = 1) -> None:
    """Write one index per (ids, rows) part to its out path: copies of `trained` filled in parallel processes."""
    with tempfile.TemporaryDirectory(dir=Path(out_paths[0]).parent) as tmp:
        trained_path = str(Path(tmp) / "trained.index")
        faiss.write_index(trained, trained_path)
        jobs = [(trained_path, store, part_ids, part_rows, str(out))
                for (part_ids, part_rows), out in zip(parts, out_paths)]
        if workers > 1:
            with spawn_executor(workers) as pool:  # its workers end with a run killed -9
                list(pool.map(add_shard, *zip(*jobs)))
        else:
            for job in jobs:
                add_shard(*job)


def build_ondisk(store: VectorStore, ids: np.ndarray, rows: np.ndarray, lists_path: Path, shards: int,
                 workers: int = 1, seed: int = 0, trained: faiss.Index | None = None) -> faiss.Index:
    """A populated IVF-PQ index whose lists are in lists_path (a new file: readers of an older index keep
    theirs), from `trained` or an index trained here. The caller writes the returned index next to it."""
    trained = train_empty(store, rows, seed) if trained is None else faiss.clone_index(trained)
    with tempfile.TemporaryDirectory(dir=lists_path.parent) as tmp:
        paths = [Path(tmp) / f"shard{s}.index" for s in range(shards)]
        add_shards(trained, store, [(ids[s::shards], rows[s::shards]) for s in range(shards)], paths, workers)
        merge_ondisk(trained, [str(p) for p in paths], str(lists_path))
    return trained
