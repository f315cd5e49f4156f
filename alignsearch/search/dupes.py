"""Duplicates: exact (same SHA-256), near (perceptual-hash distance) and similar (embedding cosine).

Nothing here deletes anything: groups are reported, with the file to keep named by one rule (the largest
resolution, then the oldest modification time, then the lowest id).

- exact: files whose bytes hash alike (the catalog's sha256 column).
- near: the same picture re-saved, resized, recompressed or lightly cropped. Each image's 64-bit DCT
  perceptual hash (imagehash.phash) is taken at index time from the decoded image; two images are near
  duplicates when their hashes differ in at most `threshold` bits. Candidates come from faiss's
  multi-index hashing (IndexBinaryMultiHash: 4 tables of 16 bits, probing every key within
  threshold // 4 flipped bits, so no pair within the threshold is missed), never from all pairs.
- similar: embedding cosine >= threshold (bursts, near-identical shots): an exact range search through the
  index's own IVF lists (similar_pairs): every stored vector is scored, on the stored vectors, against the
  vectors of the nprobe lists (default 8) whose centroids rank best for it. Measured (benchmarks/RESULTS.md,
  bench_dupes): 1M vectors in IVF4096 in 103 s on 2 shared cores; against exact all pairs on 50k vectors with
  bursts of copies at cosine 0.90-1.00, pair recall at nprobe 8 1.000 in the 1M index's lists, 0.999-1.000 in
  the 100k index's (nprobe 1: 0.88-0.95); precision 1 by construction (every pair is scored exactly).

Groups are the connected components of the pairs found (union-find); a similar-tier one is split around the files
to keep, each member at the threshold or more to its kept file (around_kept).

The hashes themselves are taken and compared in alignsearch/media/phash.py; older indexes are filled by
indexer/phashfill.py.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Sequence

import numpy as np

from alignsearch.media.phash import NEAR_THRESHOLD, PHASH_BITS, colour_close, hamming, hashes_to_bytes

log = logging.getLogger(__name__)

TIERS = ("exact", "near", "similar")
SIMILAR_THRESHOLD = 0.95  # cosine
SIMILAR_NPROBE = 8  # IVF lists each stored vector visits (the CLI's --nprobe default)
SIMILAR_K = 10  # partners each vector keeps per list it visits
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


def similar_pairs(index, store, live: np.ndarray, threshold: float = SIMILAR_THRESHOLD, k: int = SIMILAR_K,
                  nprobe: int = SIMILAR_NPROBE) -> np.ndarray:
    """(m, 2) id pairs (a < b) whose stored vectors have cosine >= threshold.

    An exact range search through the ANN index's inverted lists, not all pairs: each stored vector visits
    the `nprobe` IVF lists whose centroids score best with it (as an IVF search would) and is scored
    exactly, on the stored vectors, against the vectors those lists hold: one matrix product per list, for
    all the vectors that visit it. IVF-PQ's own scores are not used (too rough to filter on: a vector's
    score with itself can read 0.74). A pair is found when either vector visits the other's list; each
    vector keeps its k best partners per list visited, so a low threshold cannot flood the result (a
    burst larger than k still comes out as one group through its links). A flat index is one list.
    The stored fp16 rows are copied into memory in list order (N x 1,280 bytes: 1.3 GB at 1M).
    live: (n, 2) rows of (file id, vector address), as catalog.live_pairs gives."""
    live = np.asarray(live, dtype=np.int64).reshape(-1, 2)
    if len(live) < 2:
        return np.zeros((0, 2), dtype=np.int64)
    with _blas_on_one_thread() as workers, ThreadPoolExecutor(workers) as pool:
        held, norms, ids, lists, probes = _read_in_list_order(index, store, live, nprobe, pool)
        starts = np.searchsorted(lists, np.arange(int(lists[-1]) + 2))  # list i holds rows starts[i]:starts[i + 1]
        visits = np.argsort(probes, axis=None, kind="stable")  # (row, list) visits, grouped by list
        visited = probes.reshape(-1)[visits]
        visitors = visits // probes.shape[1]
        bounds = np.searchsorted(visited, np.arange(int(lists[-1]) + 2))

        def join(i: int) -> list[np.ndarray]:  # the vectors visiting list i against the ones it holds
            out = []
            for m0 in range(starts[i], starts[i + 1], 2 * SIMILAR_BLOCK):
                members = np.arange(m0, min(starts[i + 1], m0 + 2 * SIMILAR_BLOCK))
                x = held[members].astype(np.float32) / norms[members, None]
                for q0 in range(bounds[i], bounds[i + 1], SIMILAR_BLOCK):
                    queries = visitors[q0 : min(bounds[i + 1], q0 + SIMILAR_BLOCK)]
                    scores = (held[queries].astype(np.float32) / norms[queries, None]) @ x.T
                    out.append(_block_pairs(scores, queries, members, ids, threshold, k))
            return out

        found = [pairs for part in pool.map(join, np.unique(lists).tolist()) for pairs in part]
    return _unique_pairs(np.concatenate(found) if found else np.zeros((0, 2), dtype=np.int64))


SIMILAR_BLOCK = 2048  # visiting vectors per matrix product (x 4096 list members at most: 32 MB of scores)
READ_BLOCK = 16_384  # stored vectors read (and scored against the centroids) at a time


def _read_in_list_order(index, store, live: np.ndarray, nprobe: int, pool: ThreadPoolExecutor):
    """The live vectors read once, in storage order, into memory in the order of their IVF lists: (fp16 rows,
    their norms, ids, own list of each row (ascending), the `nprobe` lists each row visits). The lists a
    vector visits are those whose centroids score best with it over all centroids (a matrix product, as
    faiss's coarse search; neighbouring centroids of its own list miss half of them on the benchmark's data).
    A flat index: one list (0), visited by all."""
    import faiss

    from alignsearch.storage import ann

    ids, addresses = live[:, 0], live[:, 1]
    ivf = faiss.try_extract_index_ivf(ann.parts(index)[0])
    own, centroids, nprobe = np.zeros(len(ids), dtype=np.int64), None, nprobe if ivf is not None else 1
    if ivf is not None:
        own = _own_lists(index, ids)
        missing = np.flatnonzero(own < 0)  # catalog rows the index does not hold (yet): their best list
        for s in range(0, len(missing), READ_BLOCK):
            own[missing[s : s + READ_BLOCK]] = ivf.quantizer.assign(store.get(addresses[missing[s : s + READ_BLOCK]]), 1)[:, 0]
        centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist)
        nprobe = max(1, min(int(nprobe), int(ivf.nlist)))
        bias = np.zeros(ivf.nlist, dtype=np.float32)  # inner product ranks; an L2 quantizer ranks by x.c - |c|^2 / 2
        if ivf.metric_type != faiss.METRIC_INNER_PRODUCT:
            bias = -0.5 * np.einsum("ij,ij->i", centroids, centroids)
    order = np.argsort(own, kind="stable")
    at = np.empty_like(order)
    at[order] = np.arange(len(order))  # where each live vector goes
    held = np.empty((len(ids), store.dim), dtype=np.float16)
    norms = np.empty(len(ids), dtype=np.float32)
    probes = np.zeros((len(ids), nprobe), dtype=np.int64)

    def read(start: int) -> None:
        x, where = store.get(addresses[start : start + READ_BLOCK]), at[start : start + READ_BLOCK]
        held[where] = x
        norms[where] = np.maximum(np.linalg.norm(x, axis=1), 1e-12)
        if centroids is not None:
            probes[where] = _top_columns(x @ centroids.T + bias, nprobe)

    list(pool.map(read, range(0, len(ids), READ_BLOCK)))
    return held, norms, ids[order], own[order], probes


@contextmanager
def _blas_on_one_thread():
    """Every OpenBLAS loaded (numpy's, faiss's) held to one thread while we yield the number of Python threads
    to run (the cores): OpenBLAS threads spin-wait and lose half their speed when another process takes a
    core (at 100k: 5.1 s with OPENBLAS_NUM_THREADS=1, 13.6 s with 2, while tests ran beside). numpy releases
    the GIL in matrix products and copies, so threads over IVF lists use the cores. No OpenBLAS found (another
    BLAS, or no /proc): one Python thread, the BLAS's own threads."""
    import ctypes

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    held = []  # (set, threads before)
    try:
        with open("/proc/self/maps") as maps:
            found = sorted({line.split()[-1] for line in maps if "openblas" in line.lower() and ".so" in line})
        for path in found:
            lib = ctypes.CDLL(path)
            for name in ("scipy_openblas_%s_num_threads64_", "openblas_%s_num_threads64_", "openblas_%s_num_threads"):
                if hasattr(lib, name % "set") and hasattr(lib, name % "get"):
                    held.append((getattr(lib, name % "set"), getattr(lib, name % "get")()))
                    break
    except OSError:
        pass
    for put, _ in held:
        put(1)
    try:
        yield cores if held else 1
    finally:
        for put, before in held:
            put(before)


def _own_lists(index, ids: np.ndarray) -> np.ndarray:
    """The IVF list each id is held in (in any shard), -1 for ids the index does not hold."""
    import faiss

    from alignsearch.storage import ann

    held, where = [], []
    for part in ann.parts(index):
        invlists = faiss.extract_index_ivf(part).invlists
        for i in range(invlists.nlist):
            size = invlists.list_size(i)
            if size:
                held.append(faiss.rev_swig_ptr(invlists.get_ids(i), size).astype(np.int64))
                where.append(np.full(size, i, dtype=np.int64))
    out = np.full(len(ids), -1, dtype=np.int64)
    if held:
        held, where = np.concatenate(held), np.concatenate(where)
        order = np.argsort(held)
        held, where = held[order], where[order]
        at = np.minimum(np.searchsorted(held, ids), len(held) - 1)
        out = np.where(held[at] == ids, where[at], -1)
    return out


def _top_columns(scores: np.ndarray, p: int) -> np.ndarray:
    """The column numbers of each row's p largest scores, best first (p argmax passes: cheaper than
    argpartition for the few lists a vector visits)."""
    out = np.empty((len(scores), p), dtype=np.int64)
    rows = np.arange(len(scores))
    for j in range(p):
        out[:, j] = scores.argmax(axis=1)
        scores[rows, out[:, j]] = -np.inf
    return out


def _block_pairs(scores: np.ndarray, queries: np.ndarray, members: np.ndarray, ids: np.ndarray, threshold: float,
                 k: int) -> np.ndarray:
    """(m, 2) id pairs (a < b) of one block of exact scores (visiting rows x list member rows, both ascending)
    at or above the threshold, itself left out, at most k per visiting row (its best; more only on ties)."""
    pos = np.minimum(np.searchsorted(members, queries), len(members) - 1)
    me = np.flatnonzero(members[pos] == queries)
    scores[me, pos[me]] = -np.inf  # a vector is not its own duplicate
    keep = scores >= threshold
    over = np.flatnonzero(keep.sum(axis=1) > k)
    if len(over):
        kth = -np.partition(-scores[over], k - 1, axis=1)[:, k - 1]
        keep[over] &= scores[over] >= kth[:, None]
    qi, mj = np.nonzero(keep)
    a, b = ids[queries[qi]], ids[members[mj]]
    return np.stack([np.minimum(a, b), np.maximum(a, b)], axis=1)


def _unique_pairs(pairs: np.ndarray) -> np.ndarray:
    """The distinct rows of (m, 2) non-negative id pairs, sorted."""
    if not len(pairs):
        return np.zeros((0, 2), dtype=np.int64)
    width = int(pairs.max()) + 1
    if width < 3_037_000_499:  # a * width + b fits in int64: one 1-d sort instead of a row sort
        codes = np.unique(pairs[:, 0] * width + pairs[:, 1])
        return np.stack([codes // width, codes % width], axis=1)
    return np.unique(pairs, axis=0)


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


def _one_per_file(ids: list[int], rows: dict) -> list[int]:
    """A group's ids, one per file: the moments of one video that look alike (a still shot, a scene shown twice)
    are that file, not copies of it. `dupes` listed a still video as three duplicates of itself, counted among
    the "files besides the ones to keep" the very file it said to keep. A video stands for its first moment
    in the group. A file several rows name (a folder root and a list naming one of its photos, a file:// URL, a
    symlink to it) is one member, keyed and shown as search and export show it (onefile.py): `dupes` listed it
    as a group of itself, the kept one or its link's target among those to remove."""
    from alignsearch.search import onefile

    best: dict = {}
    reals: dict = {}  # onefile.named's memo: each folder's real path looked up once for the group, not once a row
    for i in (i for i in ids if i in rows):
        row = rows[i]
        (file, _), shown = onefile.named(row, reals)
        order = (shown[:3], row.moment, row.id)
        if file not in best or order < best[file][0]:
            best[file] = (order, i)
    return sorted(i for _, i in best.values())


def around_kept(ids: list[int], order: Callable[[int], tuple], cosines: Callable[[int, list[int]], np.ndarray],
                threshold: float) -> list[list[int]]:
    """A similar-tier component split into groups each of a file to keep (the first by `order`, keep_order) and the
    files at `threshold` or more to it (`cosines(kept, others)`), the rest split the same way. A component is
    connected through its pairs: at `--threshold 0.5` a burst's chain put a file at cosine -0.8 to the kept one in
    its group, among the "files besides the ones to keep", and at the default 0.95 two steps reach 0.8. Groups of
    one are dropped by the caller."""
    left, out = sorted(ids, key=order), []
    while left:
        kept, others = left[0], left[1:]
        close = cosines(kept, others) >= threshold if others else np.zeros(0, dtype=bool)
        out.append([kept, *(i for i, c in zip(others, close) if c)])
        left = [i for i, c in zip(others, close) if not c]
    return out


def _describe(tier: str, ids: list[int], rows: dict, score: Callable[[int, int], float]) -> Group:
    members = sorted((rows[i] for i in ids if i in rows), key=keep_order)
    kept = members[0]
    items = [{"id": r.id, "path": r.path, "score": round(float(score(kept.id, r.id)), 6) if r.id != kept.id else 1.0,
              "width": r.width, "height": r.height, "size": r.size, "mtime": r.mtime, "keep": r.id == kept.id}
             for r in members]
    return Group(tier, items, kept.id)


def check_threshold(tier: str, threshold: float | None) -> None:
    """Refuse a tier or threshold that is out of range, as every option value is (UsageError, exit 2; `tag
    --threshold` and `query --min-score` the same): a NaN too, and a threshold for the exact tier, which has none
    (it was ignored)."""
    from alignsearch.errors import UsageError

    if tier not in TIERS:
        raise UsageError(f"tier must be one of {', '.join(TIERS)}, got {tier!r}")
    if threshold is None:
        return
    if tier == "exact":
        raise UsageError("--threshold is for --tier near or similar: exact copies have the same SHA-256")
    if tier == "near" and not (0 <= threshold < PHASH_BITS and threshold == int(threshold)):
        raise UsageError(f"--threshold for --tier near is a number of bits from 0 to {PHASH_BITS - 1}")
    if tier == "similar" and not -1 <= threshold <= 1:
        raise UsageError("--threshold for --tier similar is a cosine from -1 to 1")


def _kept_everywhere(groups: list[Group]) -> list[Group]:
    """groups, a file kept in one of them marked kept in every other too: a video's scenes fall in different groups,
    so it was kept beside a smaller photo of one scene and listed to be rid of beside a larger photo of the other;
    removing the files besides the ones to keep lost the first scene (the video and its one other copy)."""
    kept = {i["path"] for g in groups for i in g.items if i["keep"]}
    for g in groups:
        for i in g.items:
            i["keep"] = i["keep"] or i["path"] in kept
    return groups


def to_be_rid_of(groups: list[Group]) -> list[str]:
    """The paths a user would remove to keep one of each group, each once: a video whose scenes fall in two groups
    where a larger photo is kept is one file, counted twice in "files besides the ones to keep"."""
    return list(dict.fromkeys(i["path"] for g in groups for i in g.items if not i["keep"]))


def find_groups(engine, tier: str = "near", threshold: float | None = None, nprobe: int = SIMILAR_NPROBE) -> list[Group]:
    """Duplicate groups of an opened index (alignsearch.search.engine.Engine), largest first. Scores: 1.0 for the
    kept file and exact copies; near: 1 - distance / 64 to the kept file's hash; similar: cosine to it."""
    from alignsearch.storage import catalog

    check_threshold(tier, threshold)
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
        if missing > 0:  # a video counts once but has a hash per moment
            log.warning("%d indexed files have no perceptual hash yet (run `alignsearch index` to fill them)", missing)
        ids = np.array(sorted(hashes), dtype=np.int64)
        pairs = near_pairs(ids, [hashes[i] for i in ids.tolist()], t)
        pairs = pairs[[colour_close(hashes[a], hashes[b]) for a, b in pairs[:, :2].tolist()]] if len(pairs) else pairs
        groups = components(pairs[:, :2].tolist())
        score = lambda a, b: 1 - hamming(hashes[a], hashes[b]) / PHASH_BITS  # noqa: E731
    else:
        t = SIMILAR_THRESHOLD if threshold is None else float(threshold)
        store, live, pairs = _similar_of_one_generation(engine, t, nprobe)
        groups = components(pairs.tolist())
        address_of = dict(zip(live[:, 0].tolist(), live[:, 1].tolist()))

        def score(a: int, b: int) -> float:
            va, vb = store.get(np.array([address_of[a], address_of[b]], dtype=np.int64))
            return float(_cosines(va[None], vb[None])[0])
    with db.connect() as conn:
        rows = catalog.get_files(conn, [i for g in groups for i in g])
    groups = [_one_per_file(g, rows) for g in groups]
    if tier == "similar":  # every member similar to the file kept, not only linked to it through others

        def cosines(kept: int, others: list[int]) -> np.ndarray:
            found = store.get(np.array([address_of[i] for i in [kept, *others]], dtype=np.int64))
            found = found.astype(np.float32)
            return _cosines(np.broadcast_to(found[:1], found[1:].shape), found[1:])

        groups = [part for g in groups for part in around_kept(g, lambda i: keep_order(rows[i]), cosines, t)]
    out = _kept_everywhere([_describe(tier, g, rows, score) for g in groups if len(g) > 1])
    out.sort(key=lambda g: (-len(g.items), g.keep))
    return out


def _similar_of_one_generation(engine, threshold: float, nprobe: int):
    """(vector store, live pairs, similar pairs) of one generation. The pairs are read with the generation they
    belong to, on a fresh snapshot (and the store as now, when an `index` run committed rows since it); a
    switch (a re-encode's, a compaction's) that lands before the scan, or during it (a store not yet mapped
    meets the emptied vectors.f16: "damaged"), is a new generation to scan, not damage."""
    from alignsearch.errors import CatalogBusyError, IndexDamagedError
    from alignsearch.storage import catalog, state, vectors

    for _ in range(4):
        snap = engine.snapshot()
        with engine.db.connect() as conn:
            live = catalog.live_pairs(conn)
            if state.read(conn, "generation").generation != snap.generation:
                continue  # the rows are a newer generation's than the snapshot just taken
            store = vectors.holding(conn, snap.store, live[:, 1], engine.dir)  # and rows committed since it
        if not store.holds(live[:, 1]):  # addresses of this generation past its committed rows (IndexError before)
            raise IndexDamagedError("catalog rows point past the stored vectors: run `alignsearch verify --repair`")
        try:
            return store, live, similar_pairs(snap.index, store, live, threshold, nprobe=nprobe)
        except IndexDamagedError:
            with engine.db.connect() as conn:
                if state.read(conn, "generation").generation == snap.generation:
                    raise  # the same generation: real damage
    raise CatalogBusyError("the index kept switching generations (re-encodes or compactions of its vectors) "
                           "while duplicates were looked for: run it again")


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
            owner = next((k for k in kept if k.id in phashes and hamming(phashes[k.id], mine) <= threshold
                          and colour_close(phashes[k.id], mine)), None)
        if owner is None:
            kept.append(hit)
            folded[hit.id] = list(getattr(hit, "duplicates", []) or [])
        else:
            folded[owner.id].append(hit.id)
    return [replace(h, duplicates=folded[h.id]) for h in kept]


def collapse_hits(db, hits: list, k: int, threshold: int = NEAR_THRESHOLD) -> list:
    """collapse() with the hits' phashes read from the catalog; at most k results."""
    from alignsearch.storage import catalog

    with db.connect() as conn:
        hashes = catalog.phashes_of(conn, [h.id for h in hits])
    return collapse(hits, hashes, threshold)[:k]


def find_indexed(engine, ref: str):
    """The catalog row of an indexed file named by its id or its path (local roots), or None; an id that can never
    be one (querycheck.check_id) is a UsageError."""
    import os
    import re

    from alignsearch.storage import catalog, state
    from alignsearch.media import sources
    from alignsearch.errors import IndexDamagedError, UsageError
    from alignsearch.search.querycheck import MAX_ID, check_id

    if re.fullmatch(r"[+-]?[0-9]+", ref) and not os.path.exists(ref):
        # an id is checked as the Python API's similar= and HTTP's are (querycheck): 0, -1 or one past 2^63-1
        # can never be an id, a UsageError (exit 2); they were "not an indexed image" (exit 6) as 999999 is
        try:
            number = int(ref)
        except ValueError:  # past Python's 4300 digits for int() (exit 1, "unexpected"): far past 2^63-1 too
            raise UsageError(f"an image id must be an integer from 1 to {MAX_ID}, got one of {len(ref)} digits") from None
        return engine.file(check_id(number))
    path = os.path.abspath(ref)
    with engine.db.connect() as conn:
        for root in engine.roots:
            if sources.kind(root) != sources.FOLDER:
                continue
            inside = os.path.relpath(path, root)
            if not inside.startswith(os.pardir):
                # by its catalog key, as the scan stored it: a name that is not UTF-8 (bytes as \xNN) failed to
                # encode in SQLite's query (exit 1), one with a backslash (doubled in the key) was never found
                key = sources.catalog_key(inside)[0]
                row = catalog.file_at(conn, root, key)
                if row is not None:
                    return row
                damage = catalog.name_problem(conn, root, key)
                if damage:  # a flipped byte of its name is damage (exit 7), not "not an indexed image" (exit 6)
                    raise IndexDamagedError(f"{damage}: run `alignsearch verify`")
        # not found under the roots the meta table lists: a flipped byte of that list (the key `roots`, or a root's
        # name) hid every file from `similar FILE`; a run lists a root before it writes any row of it (job.py:
        # roots.remember), and `forget` drops both at once, so rows of an unlisted root holding the file are damage;
        # asked only on this miss (a read of the names' index)
        for root in catalog.unlisted_roots(conn, engine.roots):
            inside = os.path.relpath(path, root)
            if sources.kind(root) == sources.FOLDER and not inside.startswith(os.pardir) and \
                    catalog.file_at(conn, root, sources.catalog_key(inside)[0]) is not None:
                raise IndexDamagedError(f"{catalog.unlisted_problem([root])}: {state.RESTORE}")
    return None
