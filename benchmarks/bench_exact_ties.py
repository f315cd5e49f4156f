"""What scoring the candidates so that equal vectors score exactly alike costs (Scorer.parts(exact=True), which
Engine._hits uses since copies tied by name): the float32 product alone (before) against it plus the float64 sums of
the cosines within query.NEAR of another (now), on fp16 unit vectors as the store holds them, a share of them copies
of others, and 50,000 rows of one vector (a library's black video frames), for one probe (a text or image query) and
two (late fusion). Alternating in one run, median of --rounds.

    python benchmarks/bench_exact_ties.py [--rounds 9] [--copies 0.1] [--no-save]

The candidates of a search are k x the re-rank depth (hundreds for k=10); 100,000 is a deep collapse or a large k.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import load_note, record

from alignsearch.search.query import Scorer

SIZES = (100, 1_000, 10_000, 100_000)


def candidates(n: int, copies: float, rng) -> np.ndarray:
    stored = rng.standard_normal((n, 640)).astype(np.float32)
    stored /= np.linalg.norm(stored, axis=1, keepdims=True)
    stored = stored.astype(np.float16)
    copied = rng.choice(n, int(n * copies), replace=False)
    stored[copied] = stored[rng.integers(0, n, len(copied))]  # copies: equal rows anywhere in the matrix
    return stored


def main() -> None:
    ap = argparse.ArgumentParser(description="the cost of equal vectors scoring exactly alike")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--copies", type=float, default=0.1)
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    load_at_start = os.getloadavg()[0]
    rng = np.random.default_rng(0)
    probes = [p / np.linalg.norm(p) for p in rng.standard_normal((2, 640)).astype(np.float32)]
    lines = [f"- fp16 unit vectors of dimension 640, {args.copies:.0%} of them copies of others; median of "
             f"{args.rounds} rounds, before and after alternating", load_note(load_at_start), "",
             "| candidates | probes | before: float32 product (ms) | now: exact=True (ms) | ratio |", "|---|---|---|---|---|"]
    equal = np.repeat(candidates(1, 0.0, rng), 50_000, axis=0)  # every row one vector: a library's black frames
    for n, stored in [(n, candidates(n, args.copies, rng)) for n in SIZES] + [("50,000 equal rows", equal)]:
        for scorer in (Scorer(probes[:1]), Scorer(probes, method="product")):
            before, now = [], []
            for _ in range(args.rounds):
                start = time.perf_counter()
                scorer.parts(stored)
                before.append(time.perf_counter() - start)
                start = time.perf_counter()
                scorer.parts(stored, exact=True)
                now.append(time.perf_counter() - start)
            b, a = statistics.median(before) * 1e3, statistics.median(now) * 1e3
            lines.append(f"| {n if isinstance(n, str) else f'{n:,}'} | {len(scorer.probes)} | {b:.3f} | {a:.3f} | "
                         f"{a / b:.2f} |")
    record("Equal vectors scored exactly alike: the cost of Scorer.parts(exact=True)", lines, save=not args.no_save)


if __name__ == "__main__":
    main()
