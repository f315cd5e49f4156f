"""Per-stage cost of a sharded, on-disk index build, for docs/scaling.md.

    python benchmarks/bench_scale.py [--n 1000000] [--shards 4]

Stages: encode (the tiny test model on random crops, to show the pipeline's own overhead; align-base
speed is in bench_index), train IVF-PQ once on a random sample, add shards in parallel processes,
merge the shards' lists on disk, and search the memory-mapped result. Baseline in the same run: adding
the same vectors to one in-memory index in one process.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_ann import DIM, structured  # noqa: E402
from common import CACHE, record  # noqa: E402

from alignsearch import ann  # noqa: E402
from alignsearch.query import rerank  # noqa: E402
from alignsearch.vectors import VectorStore  # noqa: E402
from indexer import ondisk  # noqa: E402
from indexer.tune import off_distribution_queries  # noqa: E402


def encode_rate() -> float:
    from alignsearch.model import Encoder
    from tiny_align import build_tiny_align

    path = CACHE / "tiny-align"
    if not (path / "config.json").exists():
        build_tiny_align(path)
    enc = Encoder(str(path), "cpu")
    crops = np.random.default_rng(0).integers(0, 255, (256, *enc.spec.output_size, 3), dtype=np.uint8)
    enc.encode_crops(crops[:8])
    start = time.perf_counter()
    enc.encode_crops(crops)
    return len(crops) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--shards", type=int, default=4)
    args = ap.parse_args()
    n, per_m = args.n, 1_000_000 / args.n
    lines = [f"- N = {n:,} x {DIM}-d structured unit vectors, {args.shards} shards added by "
             f"{min(args.shards, os.cpu_count())} processes", ""]
    rate = encode_rate()
    lines.append(f"- encode, tiny test model, CPU: {rate:,.0f} vectors/s ({1e6 / rate / 60:.1f} min per million)")
    with tempfile.TemporaryDirectory(dir=CACHE.parent if CACHE.parent.exists() else None) as tmp:
        tmp = Path(tmp)
        store = VectorStore(tmp / "v.f16", DIM, 0)
        for start in range(0, n, 250_000):
            store.append(structured(min(250_000, n - start), seed=start))
        ids, rows = np.arange(n, dtype=np.int64) + 1, np.arange(n, dtype=np.int64)
        t = time.perf_counter()
        trained = ondisk.train_empty(store, rows)
        train_s = time.perf_counter() - t
        plan = ann.describe(trained)
        lines.append(f"- train {plan.factory} on {ann.train_size(n, plan):,} random vectors: {train_s:.1f} s")

        t = time.perf_counter()
        index = ondisk.build_ondisk(store, ids, rows, tmp / "lists.ivfdata", args.shards, min(args.shards, os.cpu_count()))
        sharded_s = time.perf_counter() - t - train_s  # build_ondisk trains again: same cost, subtracted
        ann.write_atomic(index, tmp / "index.faiss")
        lines.append(f"- add {args.shards} shards in parallel + merge on disk: {sharded_s:.1f} s "
                     f"({sharded_s * per_m:.1f} s per million); lists file {os.path.getsize(tmp / 'lists.ivfdata') / n:.0f} B/vector")

        baseline = ondisk.train_empty(store, rows)
        t = time.perf_counter()
        for start in range(0, n, 65_536):
            ann.add(baseline, store.get(rows[start : start + 65_536]), ids[start : start + 65_536])
        single_s = time.perf_counter() - t
        lines.append(f"- baseline, one process adding to an in-memory index: {single_s:.1f} s "
                     f"(sharded/baseline {sharded_s / single_s:.2f}x)")
        del baseline

        served = ann.read(tmp / "index.faiss")
        q = off_distribution_queries(structured(200, seed=99), seed=5)
        lat = []
        for qi in range(len(q)):
            t = time.perf_counter()
            _, cand = ann.search(served, q[qi : qi + 1], 100, 16)
            cand = cand[0][cand[0] >= 0]
            rerank(q[qi], cand, store.get(cand - 1), 10)
            lat.append((time.perf_counter() - t) * 1000)
        lines.append(f"- search the memory-mapped index, nprobe 16 + re-rank 100: p50 {statistics.median(lat):.2f} ms, "
                     f"p99 {sorted(lat)[int(0.99 * len(lat)) - 1]:.2f} ms; RSS after loading "
                     f"{int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**30:.1f} GiB")
    record("Scale: sharded on-disk IVF-PQ build, per-stage cost", lines)


if __name__ == "__main__":
    main()
