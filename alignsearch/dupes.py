"""Duplicates: exact (same SHA-256), near (perceptual-hash distance) and similar (embedding cosine).

Nothing here deletes anything: groups are reported, with the file to keep named by one rule (the largest
resolution, then the oldest modification time, then the lowest id).

- exact: files whose bytes hash alike (the catalog's sha256 column).
- near: the same picture re-saved, resized, recompressed or lightly cropped. Each image's 64-bit DCT
  perceptual hash (imagehash.phash) is taken at index time from the decoded image; two images are near
  duplicates when their hashes differ in at most `threshold` bits. Candidates come from faiss's
  multi-index hashing (IndexBinaryMultiHash: 4 tables of 16 bits, probing every key within
  threshold // 4 flipped bits, so no pair within the threshold is missed), never from all pairs.
- similar: embedding cosine >= threshold (bursts, near-identical shots), from a k-NN search of every stored
  vector in the index's own ANN index, confirmed with the exact stored vectors.

Groups are the connected components of the pairs found (union-find).

This module imports neither torch nor faiss at the top: decode workers import it for phash_of.
"""

from __future__ import annotations

import logging
import multiprocessing
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Sequence

import numpy as np

log = logging.getLogger(__name__)

TIERS = ("exact", "near", "similar")
NEAR_THRESHOLD = 12  # bits of 64; benchmarks/bench_dupes.py measured recall and false positives (README)
SIMILAR_THRESHOLD = 0.95  # cosine
PHASH_BITS = 64
PHASH_SIDE = 256  # images are box-reduced to about this before hashing: same hash, far less work on big photos
FILL_BATCH = 256  # files hashed per transaction when an older index is filled


def phash_of(image) -> str | None:
    """The 64-bit perceptual hash (16 hex digits) of a decoded RGB PIL image; None when it has no pixels."""
    if image is None or min(image.size) < 1:
        return None
    import imagehash

    factor = min(image.size) // PHASH_SIDE
    if factor >= 2:
        image = image.reduce(factor)
    return str(imagehash.phash(image))


def hashes_to_bytes(hexes: Sequence[str]) -> np.ndarray:
    """(n, 8) uint8 codes of 16-hex-digit hashes, in the bit order faiss's binary indexes compare."""
    if not len(hexes):
        return np.zeros((0, PHASH_BITS // 8), dtype=np.uint8)
    return np.frombuffer(bytes.fromhex("".join(hexes)), dtype=np.uint8).reshape(len(hexes), PHASH_BITS // 8)


def hamming(a: str, b: str) -> int:
    return (int(a, 16) ^ int(b, 16)).bit_count()


# -- filling the hashes of an index written before they existed -------------------------------------------

def _hash_file(row) -> tuple[int, str | None]:
    from alignsearch.images import open_rgb

    try:
        image, _ = open_rgb(row.read())
        return row.id, phash_of(image)
    except Exception as exc:  # noqa: BLE001 - a file that changed or vanished since indexing: no hash
        log.info("no phash for %s: %s", row.path, exc)
        return row.id, None


def fill_phashes(db, workers: int = 0, batch: int = FILL_BATCH, on_batch: Callable[[int], None] = lambda n: None) -> int:
    """Hash every indexed file that has no phash yet (indexed before phashes existed), decoding it again but
    never encoding it; in batches of `batch` files, each committed in its own transaction, so a killed run
    keeps what it did. Returns the files hashed. Files that can no longer be read are left without one."""
    from alignsearch import catalog

    with db.begin() as conn:
        stale = catalog.forget_stale_phashes(conn)
    if stale:
        log.info("dropped %d phashes of files no longer indexed", stale)
    done, after = 0, 0
    pool = None
    try:
        while True:
            with db.connect() as conn:
                rows = catalog.files_without_phash(conn, after, batch)
            if not rows:
                return done
            after = rows[-1].id
            if pool is None and workers > 0 and len(rows) == batch:  # many to do: decode in processes
                pool = multiprocessing.get_context("spawn").Pool(workers)
            found = pool.map(_hash_file, rows, chunksize=8) if pool is not None else [_hash_file(r) for r in rows]
            found = [(i, h) for i, h in found if h]
            with db.begin() as conn:
                catalog.set_phashes(conn, found)
            done += len(found)
            on_batch(len(rows))
    finally:
        if pool is not None:
            pool.close()
            pool.join()


def fill_index(db, workers: int = 0) -> int:
    """The `index` run's step (indexer/job.py): hash files indexed before phashes existed."""
    done = fill_phashes(db, workers)
    if done:
        log.info("perceptual hashes filled for %d files indexed before they existed", done)
    return done


# -- grouping ----------------------------------------------------------------------------------------------

class _Union:
    def __init__(self):
        self.parent: dict[int, int] = {}

    def find(self, x: int) -> int:
        root = x
        while self.parent.get(root, root) != root:
            root = self.parent[root]
        while self.parent.get(x, x) != root:
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, a: int, b: int) -> None:
        self.parent.setdefault(a, a)
        self.parent.setdefault(b, b)
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def groups(self) -> list[list[int]]:
        out: dict[int, list[int]] = {}
        for x in list(self.parent):
            out.setdefault(self.find(x), []).append(x)
        return [sorted(g) for g in out.values() if len(g) > 1]


def components(pairs: Iterable[tuple[int, int]]) -> list[list[int]]:
    """Connected components (of two or more ids) of the pairs, each sorted."""
    u = _Union()
    for a, b in pairs:
        u.union(int(a), int(b))
    return u.groups()


def near_pairs(ids: np.ndarray, hexes: Sequence[str], threshold: int = NEAR_THRESHOLD) -> np.ndarray:
    """(m, 3) rows (id a, id b, Hamming distance), a < b, of every pair within `threshold` bits.

    Multi-index hashing: the 64 bits split in 4 tables of 16; two hashes within t bits agree within
    t // 4 bits in at least one table (pigeonhole), which the search probes exhaustively."""
    import faiss

    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) < 2:
        return np.zeros((0, 3), dtype=np.int64)
    if not 0 <= threshold < PHASH_BITS:
        raise ValueError(f"near threshold must be in [0, {PHASH_BITS}), got {threshold}")
    codes = hashes_to_bytes(hexes)
    nhash = 4
    index = faiss.IndexBinaryMultiHash(PHASH_BITS, nhash, PHASH_BITS // nhash)
    index.nflip = threshold // nhash
    index.add(codes)
    found = []
    for start in range(0, len(codes), 65_536):
        lims, dist, labels = index.range_search(codes[start : start + 65_536], threshold + 1)
        query = np.repeat(np.arange(start, start + len(lims) - 1), np.diff(lims.astype(np.int64)))
        keep = (labels > query) & (dist <= threshold)
        found.append(np.stack([query[keep], labels[keep], dist[keep]], axis=1))
    rows = np.concatenate(found).astype(np.int64)
    rows[:, 0], rows[:, 1] = ids[rows[:, 0]], ids[rows[:, 1]]
    return rows


def similar_pairs(index, store, live: np.ndarray, threshold: float = SIMILAR_THRESHOLD, k: int = 10,
                  nprobe: int = 8, chunk: int = 4096) -> np.ndarray:
    """(m, 2) id pairs (a < b) whose stored vectors have cosine >= threshold.

    Every stored vector queries the ANN index for its k nearest (k-NN, not all pairs); each candidate is
    scored exactly on the stored vectors (IVF-PQ's own scores are too rough to filter on: a vector's score
    with itself can read 0.74), as queries are. live: (n, 2) rows of (file id, vector address), as catalog.live_vectors gives."""
    from alignsearch import ann

    live = np.asarray(live, dtype=np.int64).reshape(-1, 2)
    if len(live) < 2 or index.ntotal < 2:
        return np.zeros((0, 2), dtype=np.int64)
    margin = 0.001 if ann.describe(index).kind == "flat" else 2.0  # fp16 rows; PQ scores: no filter at all
    address_of = dict(zip(live[:, 0].tolist(), live[:, 1].tolist()))
    k = min(k, int(index.ntotal))
    found = []
    for start in range(0, len(live), chunk):
        part = live[start : start + chunk]
        queries = store.get(part[:, 1])
        scores, labels = ann.search(index, queries, k, nprobe)
        keep = (labels >= 0) & (labels != part[:, :1]) & (scores >= threshold - margin)
        a, b = np.repeat(part[:, 0], keep.sum(axis=1)), labels[keep]
        a, b = np.minimum(a, b), np.maximum(a, b)  # a pair either side found (the ANN may miss one direction)
        if len(a):  # confirmed on the stored vectors (cosine: fp16 rows are unit length within 1e-3)
            ok = np.array([x in address_of for x in b.tolist()], dtype=bool)
            a, b = a[ok], b[ok]
            rows_a = store.get(np.array([address_of[x] for x in a.tolist()], dtype=np.int64))
            rows_b = store.get(np.array([address_of[x] for x in b.tolist()], dtype=np.int64))
            sure = _cosines(rows_a, rows_b) >= threshold
            a, b = a[sure], b[sure]
        found.append(np.unique(np.stack([a, b], axis=1), axis=0) if len(a) else np.zeros((0, 2), np.int64))
        log.debug("similar: %d of %d vectors searched", start + len(part), len(live))
    return np.concatenate(found).astype(np.int64) if found else np.zeros((0, 2), dtype=np.int64)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.clip(np.einsum("ij,ij->i", a, b) / np.maximum(norms, 1e-12), -1.0, 1.0)


@dataclass
class Group:
    tier: str
    items: list[dict]  # {"id", "path", "score", "width", "height", "size", "mtime", "keep"}; the kept one first
    keep: int = 0

    def to_dict(self) -> dict:
        return {"tier": self.tier, "keep": self.keep, "items": self.items}


def keep_order(row) -> tuple:
    """The rule for the file to keep: largest resolution, then oldest (modification time), then lowest id."""
    return (-((row.width or 0) * (row.height or 0)), row.mtime, row.id)


def _describe(tier: str, ids: list[int], rows: dict, score: Callable[[int, int], float]) -> Group:
    members = sorted((rows[i] for i in ids if i in rows), key=keep_order)
    kept = members[0]
    items = [{"id": r.id, "path": r.path, "score": round(float(score(kept.id, r.id)), 6) if r.id != kept.id else 1.0,
              "width": r.width, "height": r.height, "size": r.size, "mtime": r.mtime, "keep": r.id == kept.id}
             for r in members]
    return Group(tier, items, kept.id)


def find_groups(engine, tier: str = "near", threshold: float | None = None, nprobe: int = 8) -> list[Group]:
    """Duplicate groups of an opened index (alignsearch.engine.Engine), largest first. Scores: 1.0 for the
    kept file and exact copies; near: 1 - distance / 64 to the kept file's hash; similar: cosine to it."""
    from alignsearch import catalog

    if tier not in TIERS:
        raise ValueError(f"tier must be one of {', '.join(TIERS)}")
    db = engine.db
    if tier == "exact":
        with db.connect() as conn:
            groups = catalog.duplicate_hashes(conn)
        score = lambda a, b: 1.0  # noqa: E731
    elif tier == "near":
        t = NEAR_THRESHOLD if threshold is None else int(threshold)
        with db.connect() as conn:
            hashes = catalog.phashes_of(conn)
            missing = catalog.counts(conn)[catalog.INDEXED] - len(hashes)
        if missing:
            log.warning("%d indexed files have no perceptual hash yet (run `alignsearch index` to fill them)", missing)
        ids = np.array(sorted(hashes), dtype=np.int64)
        pairs = near_pairs(ids, [hashes[i] for i in ids.tolist()], t)
        groups = components(pairs[:, :2].tolist())
        score = lambda a, b: 1 - hamming(hashes[a], hashes[b]) / PHASH_BITS  # noqa: E731
    else:
        t = SIMILAR_THRESHOLD if threshold is None else float(threshold)
        snap = engine.snap
        with db.connect() as conn:
            live = np.array(list(catalog.live_vectors(conn)), dtype=np.int64).reshape(-1, 2)
        pairs = similar_pairs(snap.index, snap.store, live, t, nprobe=nprobe)
        groups = components(pairs.tolist())
        address_of = dict(zip(live[:, 0].tolist(), live[:, 1].tolist()))

        def score(a: int, b: int) -> float:
            va, vb = snap.store.get(np.array([address_of[a], address_of[b]], dtype=np.int64))
            return float(_cosines(va[None], vb[None])[0])
    with db.connect() as conn:
        rows = catalog.get_files(conn, [i for g in groups for i in g])
    out = [_describe(tier, g, rows, score) for g in groups if sum(i in rows for i in g) > 1]
    out.sort(key=lambda g: (-len(g.items), g.keep))
    return out


# -- collapsed results -----------------------------------------------------------------------------------

def collapse(hits: list, phashes: dict[int, str], threshold: int = NEAR_THRESHOLD) -> list:
    """Fold each hit that is a near duplicate (phash within threshold bits) of a better one into it, best
    first: the kept hit's `duplicates` lists the folded ids. Hits without a phash are never folded."""
    kept: list = []
    folded: dict[int, list[int]] = {}
    for hit in hits:
        mine = phashes.get(hit.id)
        owner = None
        if mine is not None:
            owner = next((k for k in kept if k.id in phashes and hamming(phashes[k.id], mine) <= threshold), None)
        if owner is None:
            kept.append(hit)
            folded[hit.id] = list(getattr(hit, "duplicates", []) or [])
        else:
            folded[owner.id].append(hit.id)
    return [replace(h, duplicates=folded[h.id]) for h in kept]


def collapse_hits(db, hits: list, k: int, threshold: int = NEAR_THRESHOLD) -> list:
    """collapse() with the hits' phashes read from the catalog; at most k results."""
    from alignsearch import catalog

    with db.connect() as conn:
        hashes = catalog.phashes_of(conn, [h.id for h in hits])
    return collapse(hits, hashes, threshold)[:k]


def find_indexed(engine, ref: str):
    """The catalog row of an indexed file named by its id or its path (local roots), or None."""
    import os

    from alignsearch import catalog, sources

    if ref.isdigit() and not os.path.exists(ref):
        return engine.file(int(ref))
    path = os.path.abspath(ref)
    with engine.db.connect() as conn:
        for root in engine.roots:
            if sources.kind(root) != sources.FOLDER:
                continue
            inside = os.path.relpath(path, root)
            if not inside.startswith(os.pardir):
                row = catalog.file_at(conn, root, inside)
                if row is not None:
                    return row
    return None
