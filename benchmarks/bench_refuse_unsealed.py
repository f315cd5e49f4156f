"""A re-encode's switch checks every pending address against its seal (schema 19): reindex.refuse_unsealed.

    python benchmarks/bench_refuse_unsealed.py [--n 480000] [--runs 7] [--save]

A catalog's pending_vectors of N rows, each address sealed as the re-encode writes it (reindex._pending_row's
rowdigest.seal), in a real SQLite file, read as the switch reads them (SQLAlchemy Rows of file id, address, seal,
in file id order; the join with files left out: it is the same for both). Timed on the same rows, median of --runs
each, taken in turn each round:
- before: refuse_unsealed at BASE (a Python generator over the rows, rowdigest.seal per row), loaded from git;
- after: refuse_unsealed now (the columns apart, their types checked, in numpy; from schema 22 each seal covers
  the file id too: rowdigest.pending_sealed, so its rows are sealed so, the same addresses in the same order).
Both are checked to accept their rows and to refuse them with one address flipped, before anything is timed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_live_pairs import median_seconds
from common import load_note, module_at, record
from sqlalchemy import insert, select

from alignsearch.errors import IndexDamagedError
from alignsearch.storage import catalog, rowdigest
from indexer import reindex

BASE = "81d1e07"  # main before refuse_unsealed used numpy


def build(db, n: int, seal) -> None:
    """n pending rows, one per file id, each address in a shuffled order (as copies and moments leave them) and sealed
    by seal(file id, address)."""
    addresses = list(range(n))[::-1]
    with db.begin() as conn:
        for start in range(0, n, 50_000):
            conn.execute(insert(catalog.pending_vectors), [
                {"file_id": i + 1, "vec_row": addresses[i], "vec_seal": seal(i + 1, addresses[i])}
                for i in range(start, min(n, start + 50_000))])


def read(db) -> list:
    p = catalog.pending_vectors.c
    with db.connect() as conn:
        return conn.execute(select(p.file_id, p.vec_row, p.vec_seal).order_by(p.file_id)).all()


def refuses(check, rows) -> bool:
    try:
        check(rows)
    except IndexDamagedError:
        return True
    return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=480_000)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--save", action="store_true", help="append the figures to RESULTS.md")
    args = ap.parse_args()
    load = os.getloadavg()[0]
    before = module_at(BASE, "indexer/reindex.py", "reindex_before").refuse_unsealed
    sets = {}
    for name, seal in (("before", lambda _, address: rowdigest.seal(address)), ("after", rowdigest.pending_seal)):
        with tempfile.TemporaryDirectory() as tmp:
            db = catalog.connect(Path(tmp) / "catalog.db")
            build(db, args.n, seal)
            sets[name] = read(db)
            db.dispose()
    for check, rows in ((before, sets["before"]), (reindex.refuse_unsealed, sets["after"])):
        flipped = list(rows)
        file_id, address, written = flipped[len(flipped) // 2]
        flipped[len(flipped) // 2] = (file_id, address ^ 1, written)
        assert not refuses(check, rows) and refuses(check, flipped), check
    figures = median_seconds({f"before ({BASE}: a seal per row in Python)": lambda: before(sets["before"]),
                              "after (in numpy, the seal over the file id too)":
                                  lambda: reindex.refuse_unsealed(sets["after"])}, args.runs)
    lines = [load_note(load), f"- {args.n:,} pending rows (SQLAlchemy Rows, as the switch reads them), every one sealed; "
             f"median of {args.runs} runs each, taken in turn", "", "| refuse_unsealed | median |", "|---|---|"]
    lines += [f"| {what} | {seconds * 1000:.1f} ms |" for what, seconds in figures.items()]
    record("reindex.refuse_unsealed: a re-encode's pending seals checked in numpy", lines, save=args.save)


if __name__ == "__main__":
    main()
