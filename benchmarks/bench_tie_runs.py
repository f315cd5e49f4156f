"""What asking again wider costs a search when a library holds a run of identical photos (query.margin_spent,
WIDER_MARGIN): a run of copies longer than query.TIE_MARGIN straddling the cut makes the engine ask FAISS (or the
exact path, or the keyword index) again with the margin four times wider until the run ends, and re-rank the whole run
exactly, so that the copies shown are the first by name. Engine.search_vector with the copy's own vector as the query
(the run straddles every cut), unfiltered (the ANN index) and filtered by path "*.jpg" (every allowed vector scored
exactly: Engine._exact/_best_of), widening (now: up to engine.SETTLE_MAX + 1, engine._wider) against no widening
(query.margin_spent always False: the run cut at TIE_MARGIN in the order the copies were indexed, as before 3f11de6..)
and against widening with no bound (_wider without its SETTLE_MAX bound: as merged), alternating in one run, median of
--rounds of the mean per search over --queries searches.

    python benchmarks/bench_tie_runs.py [--sizes 20000:20000,100000:20000] [--k 10] [--rounds 3] [--queries 3]
        [--no-save]

--sizes: vectors:copies pairs; the first `copies` stored vectors are made one vector (bench_dupes.synthetic_index's
index otherwise: structured 640-d vectors, below ann.FLAT_BELOW a flat index, from it IVF-PQ).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_dupes
from bench_ann import structured
from bench_dupes import synthetic_index
from common import load_note, per_request_ms, record

import alignsearch
from alignsearch.search import engine as engine_module
from alignsearch.search import query


def copies_index(folder: Path, n: int, copies: int) -> np.ndarray:
    """synthetic_index's index of n vectors with its first `copies` rows one vector (its last n // 100 are still made
    near copies of others, synthetic_index's planted pairs); that vector."""
    copy = bench_dupes.structured(1, seed=n)[0]

    def with_copies(rows: int, seed: int) -> np.ndarray:
        block = structured(rows, seed=seed)
        block[: max(0, copies - seed)] = copy  # seed: the block's first row
        return block

    bench_dupes.structured = with_copies
    try:
        synthetic_index(folder, n)
    finally:
        bench_dupes.structured = structured
    return (copy / np.linalg.norm(copy)).astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description="the cost of widening the tie margin over a run of copies")
    ap.add_argument("--sizes", default="20000:20000,100000:20000")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--queries", type=int, default=3)
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    load_at_start = os.getloadavg()[0]
    lines = [f"- Engine.search_vector(copy, k={args.k}) on bench_dupes.synthetic_index's 640-d vectors with the first "
             f"`copies` made one vector, the query that vector; mean ms a search over {args.queries}, median of "
             f"{args.rounds} rounds; before: no widening (margin_spent always False: the run cut at TIE_MARGIN in "
             "index order), unbounded: widened (WIDER_MARGIN) until the run ends, now: widened up to SETTLE_MAX + 1 "
             "(engine._wider), alternating; first: the results' first path",
             load_note(load_at_start),
             "", "| vectors | copies | index | path | before: no widening (ms) | unbounded (ms) | now: bounded (ms) | "
             "now / before | first before | first unbounded | first now |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    spent, wider = query.margin_spent, engine_module._wider
    try:
        for size in args.sizes.split(","):
            n, copies = (int(v) for v in size.split(":"))
            with tempfile.TemporaryDirectory() as tmp:
                copy = copies_index(Path(tmp) / "ix", n, copies)
                with alignsearch.open(Path(tmp) / "ix") as engine:
                    kind = engine.info()["index"]["type"]
                    for path in (None, "*.jpg"):
                        samples, first = {"before": [], "unbounded": [], "now": []}, {}
                        for _ in range(args.rounds):
                            for label in samples:
                                query.margin_spent = (lambda *a: False) if label == "before" else spent
                                engine_module._wider = (lambda m: m * query.WIDER_MARGIN) if label == "unbounded" \
                                    else wider
                                first[label] = engine.search_vector(copy, k=args.k, path=path)[0].relpath
                                samples[label].append(per_request_ms(
                                    lambda: engine.search_vector(copy, k=args.k, path=path), args.queries))
                        b, u, a = (statistics.median(samples[label]) for label in ("before", "unbounded", "now"))
                        lines.append(f"| {n:,} | {copies:,} | {kind} | {path or 'ANN'} | {b:.1f} | {u:.1f} | {a:.1f} | "
                                     f"{a / b:.2f} | {first['before']} | {first['unbounded']} | {first['now']} |")
    finally:
        query.margin_spent, engine_module._wider = spent, wider
    record("Widening the tie margin over a run of identical photos, against no widening", lines,
           save=not args.no_save)


if __name__ == "__main__":
    main()
