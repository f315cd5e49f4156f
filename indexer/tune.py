"""Pick nprobe and the re-rank depth that reach a target recall@10 on the collection's own vectors.

Queries are perturbed stored vectors pushed off the data distribution (a shared offset plus noise),
as text queries sit off an image index: tuning on database vectors themselves would flatter IVF-PQ.
"""

from __future__ import annotations

import time

import numpy as np

from alignsearch.storage import ann
from alignsearch.storage.ann import rerank
from alignsearch.storage.vectors import VectorStore

K = 10
RERANK_FACTORS = (5, 10, 20, 40)  # candidates = factor * k


def off_distribution_queries(base: np.ndarray, seed: int = 0, offset: float = 1.0, noise: float = 0.5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dim = base.shape[1]
    gap = rng.standard_normal(dim)
    gap /= np.linalg.norm(gap)
    q = base + offset * gap + noise * rng.standard_normal(base.shape) / np.sqrt(dim)
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def exact_top_k(queries: np.ndarray, store: VectorStore, ids: np.ndarray, rows: np.ndarray, k: int = K) -> np.ndarray:
    """Exact top-k ids over all stored vectors, streamed in chunks."""
    best_s = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((len(queries), 0), dtype=np.int64)
    for start in range(0, len(ids), 65_536):
        scores = queries @ store.get(rows[start : start + 65_536]).T
        s = np.concatenate([best_s, scores], axis=1)
        i = np.concatenate([best_i, np.broadcast_to(ids[start : start + 65_536], scores.shape)], axis=1)
        top = np.argsort(-s, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(s, top, 1), np.take_along_axis(i, top, 1)
    return best_i


def pick(table: dict[tuple[int, int], float], target: float) -> tuple[int, int, float]:
    """The cheapest (nprobe, factor) reaching the target, cost ~ nprobe then factor; else the best recall."""
    reaching = [setting for setting, r in table.items() if r >= target]
    if reaching:
        nprobe, factor = min(reaching)  # fewest lists first: scanning them costs more than re-ranking
    else:
        nprobe, factor = max(table, key=lambda s: (table[s], -s[0], -s[1]))
    return nprobe, factor, table[(nprobe, factor)]


def tune(index, store: VectorStore, ids: np.ndarray, rows: np.ndarray, target: float = 0.95,
         queries: int = 200, seed: int = 0) -> dict:
    """Measure recall@10 with re-ranking over a grid of nprobe x depth; return the chosen setting."""
    start = time.perf_counter()
    plan = ann.describe(index)
    if plan.kind == "flat" or len(ids) == 0:
        return {"nprobe": 0, "rerank_factor": 1, "recall": 1.0, "target": target}
    rng = np.random.default_rng(seed)
    pick_rows = np.sort(rng.choice(len(ids), size=min(queries, len(ids)), replace=False))
    q = off_distribution_queries(store.get(rows[pick_rows]), seed)
    truth = exact_top_k(q, store, ids, rows)
    row_of = dict(zip(ids.tolist(), rows.tolist()))
    table: dict[tuple[int, int], float] = {}
    nprobe = 1
    while True:
        _, cand = ann.search(index, q, max(RERANK_FACTORS) * K, nprobe)
        hits = dict.fromkeys(RERANK_FACTORS, 0)
        for qi in range(len(q)):
            c = cand[qi][cand[qi] >= 0]
            vectors = store.get(np.array([row_of[i] for i in c.tolist()], dtype=np.int64))
            for factor in RERANK_FACTORS:
                depth = factor * K  # candidates come best-PQ-score first: a prefix is a shallower search
                top, _ = rerank(q[qi], c[:depth], vectors[:depth], K)
                hits[factor] += len(set(top.tolist()) & set(truth[qi].tolist()))
        for factor in RERANK_FACTORS:
            table[(nprobe, factor)] = hits[factor] / truth.size
        if nprobe >= plan.nlist or table[(nprobe, max(RERANK_FACTORS))] >= 0.999:
            break
        nprobe = min(plan.nlist, nprobe * 2)
    chosen, factor, recall = pick(table, target)
    return {"nprobe": chosen, "rerank_factor": factor, "recall": round(recall, 4), "target": target,
            "queries": len(q), "seconds": round(time.perf_counter() - start, 2)}
