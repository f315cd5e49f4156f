"""ANN quality and speed: exact vs IVF-PQ vs IVF-PQ + exact re-rank, with off-distribution queries.

    python benchmarks/bench_ann.py --n 100000 [--n 1000000] [--queries 200]

Vectors: 640-d unit vectors with structure (clusters in a 64-d subspace plus noise). Queries are fresh
points of the same clusters (not database vectors) pushed off the distribution by a shared offset,
as text queries sit off an image index. Re-ranking reads fp16 vectors memory-mapped from disk, as the
engine does. Latency is per single query on this machine's cores.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import record

from alignsearch.storage import ann
from alignsearch.storage.ann import rerank
from alignsearch.storage.vectors import VectorStore
from indexer.tune import off_distribution_queries, tune

DIM, K = 640, 10


def structured(n: int, seed: int, rng_basis: int = 7, clusters: int = 2000, latent: int = 64) -> np.ndarray:
    basis_rng = np.random.default_rng(rng_basis)
    basis = basis_rng.standard_normal((latent, DIM)).astype(np.float32) / np.sqrt(latent)
    centres = basis_rng.standard_normal((clusters, latent)).astype(np.float32)
    rng = np.random.default_rng(seed)
    out = np.empty((n, DIM), dtype=np.float32)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        z = centres[rng.integers(0, clusters, m)] + 1.0 * rng.standard_normal((m, latent)).astype(np.float32)
        x = z @ basis + 0.05 * rng.standard_normal((m, DIM)).astype(np.float32)
        out[start : start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def percentiles(samples_ms: list[float]) -> str:
    s = sorted(samples_ms)
    return f"p50 {statistics.median(s):.2f} ms, p99 {s[min(len(s) - 1, int(0.99 * len(s)))]:.2f} ms"


def recall(found: list[np.ndarray], truth: np.ndarray) -> float:
    return sum(len(set(f.tolist()) & set(t.tolist())) for f, t in zip(found, truth)) / truth.size


def bench(n: int, nq: int, workdir: Path, niters: list[int]) -> list[str]:
    lines = [f"### N = {n:,}", ""]
    t0 = time.perf_counter()
    x = structured(n, seed=1)
    ids = np.arange(n, dtype=np.int64) + 1
    q = off_distribution_queries(structured(nq, seed=99), seed=5)
    store = VectorStore(workdir / f"v{n}.f16", DIM, 0)
    store.append(x)
    lines.append(f"- data: {time.perf_counter() - t0:.1f} s to generate and store")

    flat = faiss.IndexFlatIP(DIM)
    flat.add(x)
    _, truth_pos = flat.search(q, K)
    truth = ids[truth_pos]
    lat = []
    for qi in range(nq):
        t = time.perf_counter()
        flat.search(q[qi : qi + 1], K)
        lat.append((time.perf_counter() - t) * 1000)
    lines.append(f"- exact (IndexFlatIP): recall@10 1.000, {percentiles(lat)}, RAM {4 * DIM} B/vector")
    del flat

    plan = ann.plan_index(n, DIM)
    sample = np.sort(np.random.default_rng(0).choice(n, ann.train_size(n, plan), replace=False))
    for niter in niters:  # the last one built is the one measured below
        t = time.perf_counter()
        index = ann.train_and_fill(ann.create(plan, DIM, niter), x[sample], [(x, ids)])
        build_s = time.perf_counter() - t
        _, cand = ann.search(index, q, 10 * K, 16)
        found = [rerank(q[i], c[c >= 0], store.get(c[c >= 0] - 1), K)[0] for i, c in enumerate(cand)]
        lines.append(f"- IVF-PQ {plan.factory}, k-means {niter} iterations: built in {build_s:.1f} s "
                     f"(train on {len(sample):,} random vectors); nprobe 16 + re-rank 100: recall@10 {recall(found, truth):.3f}")
    del x
    ram = len(faiss.serialize_index(index)) / n
    lines.append(f"- index RAM: {ram:.1f} B/vector (serialized size / N); re-rank vectors stay on disk (fp16, memory-mapped)")
    for nprobe in (8, 16, 32, 64, 128):
        if nprobe > plan.nlist:
            break
        for factor in (None, 10, 20):
            found, lat = [], []
            for qi in range(nq):
                t = time.perf_counter()
                depth = K if factor is None else factor * K
                _, cand = ann.search(index, q[qi : qi + 1], depth, nprobe)
                cand = cand[0][cand[0] >= 0]
                if factor is not None:
                    cand, _ = rerank(q[qi], cand, store.get(cand - 1), K)  # row = id - 1
                lat.append((time.perf_counter() - t) * 1000)
                found.append(cand[:K])
            label = "no re-rank" if factor is None else f"re-rank top {factor * K}"
            lines.append(f"  - nprobe {nprobe:>3}, {label:>16}: recall@10 {recall(found, truth):.3f}, {percentiles(lat)}")
    t = time.perf_counter()
    tuned = tune(index, store, ids, ids - 1, target=0.95)
    lines.append(f"- auto-tuned for 0.95 (on perturbed stored vectors, {time.perf_counter() - t:.1f} s): "
                 f"nprobe {tuned['nprobe']}, re-rank {tuned['rerank_factor'] * K}, tuning recall {tuned['recall']}")
    found, lat = [], []
    for qi in range(nq):
        t = time.perf_counter()
        _, cand = ann.search(index, q[qi : qi + 1], tuned["rerank_factor"] * K, tuned["nprobe"])
        cand = cand[0][cand[0] >= 0]
        cand, _ = rerank(q[qi], cand, store.get(cand - 1), K)
        lat.append((time.perf_counter() - t) * 1000)
        found.append(cand)
    lines.append(f"  - with the tuned setting on the benchmark's own queries: recall@10 {recall(found, truth):.3f}, {percentiles(lat)}")
    return lines + [""]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, action="append", help="collection sizes (repeatable; default 100000)")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--niter", type=int, action="append", help="k-means iterations to compare (default: 25 then 10)")
    args = ap.parse_args()
    lines = [f"- {args.queries} off-distribution queries (fresh cluster points + shared offset), k = {K}, "
             f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads; baseline = exact search in the same run", ""]
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.n or [100_000]:
            lines += bench(n, args.queries, Path(tmp), args.niter or [25, ann.KMEANS_ITERATIONS])
    record("ANN quality and speed, 640-d structured unit vectors", lines)


if __name__ == "__main__":
    main()
