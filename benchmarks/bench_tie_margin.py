"""What the flat index's tie margin costs a search (ann.TIE_MARGIN: a flat index is asked for k + 40 candidates, so
that copies tied at place k are both re-ranked and settled by name; of those past k only the ones within
query.tied_at_cut's gap of the k-th are re-ranked): Engine.search_vector (no encoding: FAISS flat search, exact
re-rank from the stored vectors, catalog rows) with the margin at 0 (before: k candidates) and at its value (now),
alternating in one run, median of --rounds of the mean per search over --queries queries.

    python benchmarks/bench_tie_margin.py [--n 1000,5000,9999] [--k 1,10,100] [--rounds 7] [--queries 50] [--no-save]
        [--path GLOB]

--path: searches filtered by that glob (every allowed vector scored exactly, Engine._exact/_best_of, which keeps
those within the gap of the k-th past it, up to TIE_MARGIN more); "*.jpg" admits every synthetic row.

    python benchmarks/bench_tie_margin.py --late [--n 20000,50000] [--k 10] [--rounds 7] [--queries 50] [--no-save]

--late: late-fused queries instead (a text half and an image half, compose="product": Engine.search_vector of their
Parts, the encoding left out), on a flat index built past ann.FLAT_BELOW (plan_index's flat_below raised for the
build): such a query asks each half for ann.candidate_count(max(k, LATE_DEPTH)) candidates (Engine._late_want), 140
with the margin, 100 without; on a flat index every vector is scored exactly and that many kept per half.

The index is bench_dupes.py's synthetic one (structured 640-d vectors, written directly; below ann.FLAT_BELOW
vectors: a flat index); the queries are stored vectors with noise.
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
from alignsearch.storage import ann


def main() -> None:
    ap = argparse.ArgumentParser(description="the cost of a flat index's tie margin")
    ap.add_argument("--n", default="1000,5000,9999")
    ap.add_argument("--k", default="1,10,100")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--path", default=None, help="filter the searches by this glob (the exact path)")
    ap.add_argument("--late", action="store_true", help="late-fused text+image queries on a flat index past FLAT_BELOW")
    args = ap.parse_args()
    if args.late:
        return late(args)
    load_at_start = os.getloadavg()[0]
    margin = ann.TIE_MARGIN
    lines = [f"- Engine.search_vector on a flat index of synthetic 640-d vectors (bench_dupes.synthetic_index), "
             f"{args.queries} queries (stored vectors with noise); mean ms a search, median of {args.rounds} rounds, "
             f"before (TIE_MARGIN 0: k candidates) and now (TIE_MARGIN {margin}) alternating"
             + (f"; filtered by path {args.path!r} (every allowed vector scored exactly)" if args.path else ""),
             load_note(load_at_start),
             "", "| vectors | k | before: k candidates (ms) | now: k + margin (ms) | ratio |", "|---|---|---|---|---|"]
    rng = np.random.default_rng(1)
    try:
        for n in (int(v) for v in args.n.split(",")):
            with tempfile.TemporaryDirectory() as tmp:
                synthetic_index(Path(tmp) / "ix", n)
                with alignsearch.open(Path(tmp) / "ix") as engine:
                    assert engine.info()["index"]["type"] == "flat"
                    stored = engine.store.get(rng.choice(n, args.queries, replace=False)).astype(np.float32)
                    queries = stored + 0.05 * rng.standard_normal(stored.shape).astype(np.float32)
                    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
                    for k in (int(v) for v in args.k.split(",")):
                        samples = {0: [], margin: []}
                        for _ in range(args.rounds):
                            for m in samples:
                                ann.TIE_MARGIN = m
                                at = iter(queries)
                                samples[m].append(per_request_ms(lambda: engine.search_vector(next(at), k=k, path=args.path),
                                                                 len(queries)))
                        b, a = statistics.median(samples[0]), statistics.median(samples[margin])
                        lines.append(f"| {n:,} | {k} | {b:.2f} | {a:.2f} | {a / b:.2f} |")
    finally:
        ann.TIE_MARGIN = margin
    record("A flat index's tie margin: k + TIE_MARGIN candidates, against k", lines, save=not args.no_save)


def late(args) -> None:
    """Late-fused queries (compose="product") on a flat index of each --n, TIE_MARGIN 0 and its value alternating."""
    from unittest import mock

    from alignsearch.search.query import Parts

    load_at_start = os.getloadavg()[0]
    margin = ann.TIE_MARGIN
    sizes = [int(v) for v in (args.n if args.n != "1000,5000,9999" else "20000,50000").split(",")]
    ks = [int(v) for v in (args.k if args.k != "1,10,100" else "10").split(",")]
    lines = [f"- Engine.search_vector of a query's two halves (Parts: a text and an image vector, each a stored vector "
             f"with noise; compose='product', late fusion; the encoding left out) on a flat index of synthetic 640-d "
             f"vectors (bench_dupes.synthetic_index, built flat past ann.FLAT_BELOW), {args.queries} queries; mean ms a "
             f"search, median of {args.rounds} rounds, TIE_MARGIN 0 (100 candidates a half) and {margin} "
             f"({100 + margin}) alternating, each first in every other round", load_note(load_at_start),
             "", "| vectors | k | TIE_MARGIN 0 (ms) | TIE_MARGIN " + str(margin) + " (ms) | ratio |", "|---|---|---|---|---|"]
    rng = np.random.default_rng(1)
    real_plan = ann.plan_index
    try:
        for n in sizes:
            with tempfile.TemporaryDirectory() as tmp:
                with mock.patch.object(ann, "plan_index", lambda count, dim: real_plan(count, dim, flat_below=n + 1)):
                    synthetic_index(Path(tmp) / "ix", n)
                with alignsearch.open(Path(tmp) / "ix") as engine:
                    assert engine.info()["index"]["type"] == "flat"
                    halves = []
                    for _ in range(2):
                        stored = engine.store.get(rng.choice(n, args.queries, replace=False)).astype(np.float32)
                        noisy = stored + 0.05 * rng.standard_normal(stored.shape).astype(np.float32)
                        halves.append(noisy / np.linalg.norm(noisy, axis=1, keepdims=True))
                    queries = [Parts(text=t, image=i) for t, i in zip(*halves)]
                    engine.search_vector(queries[0], k=10, compose="product")  # the snapshot's columns, loaded once
                    for k in ks:
                        samples = {0: [], margin: []}
                        for round_ in range(args.rounds):
                            for m in list(samples)[::-1] if round_ % 2 else samples:  # each first every other round
                                ann.TIE_MARGIN = m
                                at = iter(queries)
                                samples[m].append(per_request_ms(
                                    lambda: engine.search_vector(next(at), k=k, compose="product"), len(queries)))
                        b, a = statistics.median(samples[0]), statistics.median(samples[margin])
                        lines.append(f"| {n:,} | {k} | {b:.2f} | {a:.2f} | {a / b:.2f} |")
    finally:
        ann.TIE_MARGIN = margin
    record("A late-fused query on a flat index: 100 + TIE_MARGIN candidates a half, against 100", lines,
           save=not args.no_save)


if __name__ == "__main__":
    main()
