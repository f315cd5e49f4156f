"""What reading each ANN hit's status (catalog.addresses_of: every status read, one no writer stores refused) costs a
search: Engine.search_vector (no encoding) with catalog.addresses_of taken from git --base (common.module_at)
against this tree's, alternating in one run, on bench_catalog_names.py's synthetic index; and addresses_of alone for
k ids. The engine is this tree's in both columns (the change touches no other module a search runs).

    python benchmarks/bench_catalog_status.py [--n 100000] [--dim 64] [--searches 200] [--rounds 5] [--base main]
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_catalog_names import build
from common import load_note, module_at, record

import alignsearch
from alignsearch.storage import catalog


def main() -> None:
    ap = argparse.ArgumentParser(description="the cost of reading each hit's status")
    for flag, default in (("--n", 100_000), ("--dim", 64), ("--searches", 200), ("--rounds", 5)):
        ap.add_argument(flag, type=int, default=default)
    ap.add_argument("--base", default="main", help="commit whose catalog.addresses_of is the baseline")
    ap.add_argument("--no-save", action="store_true")
    args, load_at_start = ap.parse_args(), os.getloadavg()[0]
    new = catalog.addresses_of
    old = module_at(args.base, "alignsearch/storage/catalog.py", "catalog_old").addresses_of
    columns = {f"base {args.base}": old, "this tree": new}
    search_ms: dict = {}
    read_us: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        ix = Path(tmp) / "ix"
        build(ix, args.n, args.dim)
        rng = np.random.default_rng(1)
        queries = rng.standard_normal((args.searches, args.dim)).astype(np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        with alignsearch.open(ix, device="cpu") as engine:
            for k in (10, 100):
                ids = (rng.choice(args.n, k * 10, replace=False) + 1).tolist()  # a search reads k x rerank_factor
                for name, read in columns.items():
                    catalog.addresses_of = read
                    assert len(engine.search_vector(queries[0], k=k)) == k, name  # warm: snapshot, columns
                for _ in range(args.rounds):  # alternating, so both share the machine's load
                    for name, read in columns.items():
                        catalog.addresses_of = read
                        start = time.perf_counter()
                        for q in queries:
                            engine.search_vector(q, k=k)
                        search_ms.setdefault((k, name), []).append((time.perf_counter() - start) / len(queries) * 1e3)
                        with engine.db.connect() as conn:
                            start = time.perf_counter()
                            for _ in range(args.searches):
                                assert len(read(conn, ids)) == len(ids)
                            read_us.setdefault((k, name), []).append((time.perf_counter() - start) / args.searches * 1e6)
            catalog.addresses_of = new
    lines = [f"- {args.n:,} files in a synthetic catalog ({args.dim}-d vectors; bench_catalog_names.build), this tree's "
             f"Engine.search_vector (a random unit vector, no encoding) with catalog.addresses_of of {args.base} or of "
             f"this tree; median of {args.rounds} alternating rounds, each the mean of {args.searches} searches; last "
             "column: addresses_of alone of 10 x k random ids", load_note(load_at_start), "",
             "| k | addresses_of of | ms/search | addresses_of of 10 x k ids, us |", "|---|---|---|---|"]
    for (k, name), runs in search_ms.items():
        lines.append(f"| {k} | {name} | {statistics.median(runs):.2f} | {statistics.median(read_us[(k, name)]):.0f} |")
    record("Reading each hit's status (catalog.addresses_of, status_known)", lines, save=not args.no_save)


if __name__ == "__main__":
    main()
