"""Per-stage cost of a sharded, on-disk index build, for docs/scaling.md.

    python benchmarks/bench_scale.py [--n 1000000] [--shards 4]

Stages: encode (the tiny test model on random crops, to show the pipeline's own overhead; align-base
speed is in bench_index), train IVF-PQ once on a random sample, add shards in parallel processes,
merge the shards' lists on disk (or keep them as separate files searched with IndexShards), and search
each memory-mapped result. Baseline in the same run: adding the same vectors to one in-memory index in
one process, and searching it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_ann import DIM, structured
from common import CACHE, record

from alignsearch.storage import ann, shards
from alignsearch.storage.ann import rerank
from alignsearch.storage.vectors import VectorStore
from indexer import ondisk
from indexer.tune import off_distribution_queries


def encode_rate() -> float:
    from alignsearch.encoders.model import Encoder
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


def rss_gib() -> float:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def search_latency(index, store: VectorStore, queries: np.ndarray) -> tuple[float, float]:
    """(p50, p99) ms of one query: nprobe 16, 100 candidates re-ranked exactly (ids are rows + 1)."""
    lat = []
    for qi in range(len(queries)):
        t = time.perf_counter()
        _, cand = ann.search(index, queries[qi : qi + 1], 100, 16)
        cand = cand[0][cand[0] >= 0]
        rerank(queries[qi], cand, store.get(cand - 1), 10)
        lat.append((time.perf_counter() - t) * 1000)
    return statistics.median(lat), sorted(lat)[int(0.99 * len(lat)) - 1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--shards", type=int, default=4)
    args = ap.parse_args()
    n, per_m, workers = args.n, 1_000_000 / args.n, min(args.shards, os.cpu_count())
    lines = [f"- N = {n:,} x {DIM}-d structured unit vectors, {args.shards} shards added by {workers} processes", ""]
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
        index = ondisk.build_ondisk(store, ids, rows, tmp / "lists.ivfdata", args.shards, workers, trained=trained)
        merged_s = time.perf_counter() - t
        ann.write_atomic(index, tmp / "index.faiss")
        lines.append(f"- add {args.shards} shards in parallel + merge on disk: {merged_s:.1f} s "
                     f"({merged_s * per_m:.1f} s per million); lists file {os.path.getsize(tmp / 'lists.ivfdata') / n:.0f} B/vector")

        owner = shards.shard_of(ids, args.shards)
        paths = [tmp / f"shard-{s}.faiss" for s in range(args.shards)]
        t = time.perf_counter()
        ondisk.add_shards(trained, store, [(ids[owner == s], rows[owner == s]) for s in range(args.shards)], paths, workers)
        files_s = time.perf_counter() - t
        lines.append(f"- add {args.shards} shards in parallel, kept as separate files (--index-shards): {files_s:.1f} s "
                     f"({files_s * per_m:.1f} s per million); {sum(p.stat().st_size for p in paths) / n:.0f} B/vector")

        baseline = faiss.clone_index(trained)
        t = time.perf_counter()
        for start in range(0, n, 65_536):
            ann.add(baseline, store.get(rows[start : start + 65_536]), ids[start : start + 65_536])
        single_s = time.perf_counter() - t
        lines.append(f"- baseline, one process adding to an in-memory index: {single_s:.1f} s "
                     f"(merged/baseline {merged_s / single_s:.2f}x, separate files/baseline {files_s / single_s:.2f}x)")
        q = off_distribution_queries(structured(200, seed=99), seed=5)
        base_p50, base_p99 = search_latency(baseline, store, q)
        del baseline

        before = rss_gib()
        served = ann.read(tmp / "index.faiss")
        merged_rss = rss_gib() - before
        merged_p50, merged_p99 = search_latency(served, store, q)
        before = rss_gib()
        sharded = shards.open_shards(paths)
        sharded_rss = rss_gib() - before
        sharded_p50, sharded_p99 = search_latency(sharded, store, q)
        lines.append(f"- search, nprobe 16 + re-rank 100, p50 / p99 ms: in-memory baseline {base_p50:.2f} / {base_p99:.2f}; "
                     f"merged on-disk {merged_p50:.2f} / {merged_p99:.2f}; {args.shards} shard files (IndexShards) "
                     f"{sharded_p50:.2f} / {sharded_p99:.2f}")
        lines.append(f"- RAM taken by opening the index: merged on-disk {merged_rss:.2f} GiB, shard files "
                     f"(memory-mapped) {sharded_rss:.2f} GiB; process RSS now {rss_gib():.1f} GiB")
    record("Scale: sharded IVF-PQ builds (merged on disk, separate shard files), per-stage cost", lines)


if __name__ == "__main__":
    main()
