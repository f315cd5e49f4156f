"""What the tie margin costs a search (query.TIE_MARGIN: FAISS is asked for 40 candidates past those re-ranked, k on a
flat index, candidate_count's k x rerank_factor (at least 50) on IVF-PQ, so that copies tied at the cut are all
re-ranked and settled by name; of those past the cut only the ones within query.tied_at_cut's gap of the last are
re-ranked): Engine.search_vector (no encoding: FAISS search, exact re-rank from the stored vectors, catalog rows) with
the margin at 0 (before) and at its value (now), alternating in one run, median of --rounds of the mean per search
over --queries queries.

    python benchmarks/bench_tie_margin.py [--n 1000,5000,9999] [--k 1,10,100] [--rounds 7] [--queries 50] [--no-save]
        [--path GLOB]

--path: searches filtered by that glob (every allowed vector scored exactly, Engine._exact/_best_of, which keeps
those within the gap of the k-th past it, up to TIE_MARGIN more); "*.jpg" admits every synthetic row.

A late-fused query on a flat index asked each half for 100 + TIE_MARGIN candidates until dbb9f03 (the margin is asked
of the ANN index past candidate_count since, not within it): this script's --late measured that, 140 against 100 a half,
no cost above the noise (RESULTS.md); with the margin out of the count it had nothing left to measure, and went.

The index is bench_dupes.py's synthetic one (structured 640-d vectors, written directly; below ann.FLAT_BELOW
vectors a flat index, from it IVF-PQ); the queries are stored vectors with noise.
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

from bench_dupes import synthetic_index
from common import load_note, per_request_ms, record

import alignsearch
from alignsearch.search import query


def main() -> None:
    ap = argparse.ArgumentParser(description="the cost of the tie margin")
    ap.add_argument("--n", default="1000,5000,9999")
    ap.add_argument("--k", default="1,10,100")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--path", default=None, help="filter the searches by this glob (the exact path)")
    args = ap.parse_args()
    load_at_start = os.getloadavg()[0]
    margin = query.TIE_MARGIN
    lines = [f"- Engine.search_vector on an index of synthetic 640-d vectors (bench_dupes.synthetic_index), "
             f"{args.queries} queries (stored vectors with noise); mean ms a search, median of {args.rounds} rounds, "
             f"before (TIE_MARGIN 0: the candidates re-ranked alone) and now (TIE_MARGIN {margin}) alternating"
             + (f"; filtered by path {args.path!r} (every allowed vector scored exactly)" if args.path else ""),
             load_note(load_at_start),
             "", "| vectors | index | k | before: no margin (ms) | now: margin (ms) | ratio |", "|---|---|---|---|---|---|"]
    rng = np.random.default_rng(1)
    try:
        for n in (int(v) for v in args.n.split(",")):
            with tempfile.TemporaryDirectory() as tmp:
                synthetic_index(Path(tmp) / "ix", n)
                with alignsearch.open(Path(tmp) / "ix") as engine:
                    kind = engine.info()["index"]["type"]
                    stored = engine.store.get(rng.choice(n, args.queries, replace=False)).astype(np.float32)
                    queries = stored + 0.05 * rng.standard_normal(stored.shape).astype(np.float32)
                    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
                    for k in (int(v) for v in args.k.split(",")):
                        samples = {0: [], margin: []}
                        for _ in range(args.rounds):
                            for m in samples:
                                query.TIE_MARGIN = m
                                at = iter(queries)
                                samples[m].append(per_request_ms(lambda: engine.search_vector(next(at), k=k, path=args.path),
                                                                 len(queries)))
                        b, a = statistics.median(samples[0]), statistics.median(samples[margin])
                        lines.append(f"| {n:,} | {kind} | {k} | {b:.2f} | {a:.2f} | {a / b:.2f} |")
    finally:
        query.TIE_MARGIN = margin
    record("The tie margin: TIE_MARGIN candidates past the cut, against none", lines, save=not args.no_save)


if __name__ == "__main__":
    main()
