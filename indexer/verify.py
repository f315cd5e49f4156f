"""`alignsearch verify`: do catalog, vector store, FAISS index and model agree? `--repair` mends what it can."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from alignsearch import ann, catalog, shards, vectors
from alignsearch.engine import ANN_FILE, DB_FILE
from alignsearch.errors import AlignSearchError
from alignsearch.vectors import VectorStore
from indexer.build import sync_index
from indexer.lock import writer_lock, writer_running


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    checked: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(index_dir: Path, repair: bool = False, check_model: bool = True) -> Report:
    report = _check(index_dir, check_model)
    if repair and report.problems:
        fixed = _repair(index_dir)
        report = _check(index_dir, check_model)
        report.repaired = fixed
    return report


def _check(index_dir: Path, check_model: bool) -> Report:
    r = Report()
    db = catalog.connect(index_dir / DB_FILE)
    try:
        with db.connect() as conn:
            model = catalog.get_meta(conn, "model")
            store = vectors.load(conn, index_dir, int(model["dim"])) if model else None
            live = np.array(list(catalog.live_vectors(conn)), dtype=np.int64).reshape(-1, 2)
    finally:
        db.dispose()
    if model is None:
        r.problems.append("no model recorded: the index was never built")
        return r
    writing = writer_running(index_dir)  # then rows past the commits, and new segment files, are in flight
    r.checked.update(images=len(live), vector_segments=len(store.numbers()),
                     vector_rows=sum(store.committed(s) for s in store.numbers()), writer_running=writing)
    for segment in store.numbers():
        path, rows = store.segment_path(segment), store.committed(segment)
        size = _size(path)
        if size < rows * store.row_bytes:
            r.problems.append(f"{path.name} holds {size // store.row_bytes} rows but the catalog committed {rows}")
        elif size > rows * store.row_bytes and not writing:
            r.problems.append(f"{path.name} has {size - rows * store.row_bytes} uncommitted bytes past row {rows}")
    unknown = [] if writing else store.unknown_files()
    if unknown:
        r.problems.append(f"{len(unknown)} vector segment files the catalog does not know (left by encoder actors "
                          "killed before their first commit)")
    dangling = len(_dangling(_held(store), live))
    if dangling:
        r.problems.append(f"{dangling} indexed files point past the stored vectors")
    path = index_dir / ANN_FILE
    if not path.exists() and shards.files(index_dir) is None:
        r.problems.append(f"{path.name} is missing")
    else:
        index = shards.open_served(index_dir)
        ids = ann.stored_ids(index)
        r.checked.update(index_vectors=len(ids), index_type=ann.describe(index).kind)
        if index.d != store.dim:
            r.problems.append(f"index dimension {index.d} differs from the model's {store.dim}")
        if len(ids) != len(np.unique(ids)):
            r.problems.append(f"{len(ids) - len(np.unique(ids))} ids appear twice in the index")
        missing, extra = np.setdiff1d(live[:, 0], ids), np.setdiff1d(ids, live[:, 0])
        if len(missing):
            r.problems.append(f"{len(missing)} indexed files are missing from the ANN index")
        if len(extra):
            r.problems.append(f"{len(extra)} ANN ids name no indexed file")
    if check_model:
        from alignsearch.model import Encoder

        try:
            fingerprint = Encoder(model["model"], "cpu").fingerprint
        except AlignSearchError as exc:
            r.problems.append(f"the index's model cannot be loaded: {exc}".splitlines()[0])
        else:
            r.checked["model_fingerprint"] = fingerprint
            if fingerprint != model["fingerprint"]:
                r.problems.append(f"model {model['model']} now has fingerprint {fingerprint}, the index {model['fingerprint']}")
    return r


def _repair(index_dir: Path) -> list[str]:
    done = []
    with writer_lock(index_dir):
        db = catalog.connect(index_dir / DB_FILE)
        try:
            with db.connect() as conn:
                model = catalog.get_meta(conn, "model")
                store = vectors.load(conn, index_dir, int(model["dim"])) if model else None
            if model is None:
                return done
            cut = [store.segment_path(s).name for s in store.numbers()
                   if _size(store.segment_path(s)) != store.committed(s) * store.row_bytes]
            store = _held(store)
            store.truncate_uncommitted()
            with db.begin() as conn:
                live = np.array(list(catalog.live_vectors(conn)), dtype=np.int64).reshape(-1, 2)
                lost = _dangling(store, live).tolist()
                catalog.delete_files(conn, lost)  # forgotten, so the next `alignsearch index` encodes them again
                vectors.save(conn, store)
            if lost:
                done.append(f"forgot {len(lost)} files whose vectors were lost; `alignsearch index` re-encodes them")
            if cut:
                done.append(f"cut {', '.join(cut)} to the committed rows")
            built = sync_index(db, store, index_dir / ANN_FILE, rebuild=_has_duplicates(index_dir))
            done.append(f"ANN index {built['action']}, {built['vectors']} vectors")
        finally:
            db.dispose()
    return done


def _has_duplicates(index_dir: Path) -> bool:
    if not (index_dir / ANN_FILE).exists() and shards.files(index_dir) is None:
        return False
    ids = ann.stored_ids(shards.open_served(index_dir))
    return len(ids) != len(np.unique(ids))


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _held(store: VectorStore) -> VectorStore:
    """The store as its files stand: each segment's committed rows cut to the whole rows its file holds."""
    def held(s: int) -> int:
        return min(store.committed(s), _size(store.segment_path(s)) // store.row_bytes)

    return VectorStore(store.path, store.dim, held(0), {s: (name, held(s)) for s, (name, _) in store.segments.items()})


def _dangling(store: VectorStore, live: np.ndarray) -> np.ndarray:
    """Ids of the (id, address) rows whose address names no committed row."""
    return live[~store.valid(live[:, 1]), 0]
