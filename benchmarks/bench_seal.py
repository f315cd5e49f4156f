"""What the vector address seal (schema 17, ae003b9) costs its readers: this tree against --base (default
ae003b9^, the last commit before the seal), each in its own processes with PYTHONPATH at its tree, alternating.

    python benchmarks/bench_seal.py [--base ae003b9^ | --base-tree PATH] [--rows 50000,480000] [--rounds 5]
                                    [--loads 3] [--calls 300] [--hits 100] [--no-save]

Per tree and row count, one catalog is written by that tree's own code (catalog.connect, then files rows
inserted through catalog.files with SQLAlchemy core, digested (migrate.digest_rows, schema 14) and, where the
tree has the column, sealed as common.seal_rows does), so each tree reads the schema it writes. Then, in a fresh
process per round:

- snapshot load: search.columns.Columns(db), what the engine builds once per snapshot (the new code checks every
  address's seal in numpy there); median of --loads per process;
- addresses_of: catalog.addresses_of(conn, ids) for --hits random indexed ids, what every query runs on its hits
  (the new code reads vec_seal and checks each hit's seal); median of --calls per process.

In this tree the seal check's own steps (the seals' array from the rows read, rowdigest.sealed) are also timed alone,
on the same rows: the load as a whole also differs by other changes (at ae003b9 Columns slices each row, r[:-1],
which makes SQLAlchemy Rows plain tuples: numpy's np.array over Row objects probed each for array attributes).
Figures are medians over the rounds' per-process medians. A whole query on an in-process engine is
bench_inproc.py (run it with --base for the same comparison); its tiny index makes these two steps a small part.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import base_worktree, load_note, record  # noqa: E402

BUILD = r"""
import sys, time
from pathlib import Path
from alignsearch.storage import catalog, migrate, rowdigest

path, n = Path(sys.argv[1]), int(sys.argv[2])
db = catalog.connect(path)
rows = [{"root": "/photos", "relpath": f"trip/{i // 1000}/{i}.jpg", "size": 1000 + i, "mtime": 1.6e9 + i,
         "width": 640, "height": 480, "format": "JPEG", "status": catalog.INDEXED, "indexed_at": 1.7e9,
         "vec_row": i} for i in range(n)]
with db.begin() as conn:
    for start in range(0, n, 50000):
        conn.execute(catalog.files.insert(), rows[start:start + 50000])
    migrate.digest_rows(conn.connection.dbapi_connection)
    if "vec_seal" in catalog.files.c:
        conn.exec_driver_sql(f"UPDATE files SET vec_seal = {rowdigest.seal_sql('vec_row')}")
db.dispose()
"""

TIME = r"""
import json, random, statistics, sys, time
from pathlib import Path
from alignsearch.storage import catalog
from alignsearch.search.columns import Columns
from sqlalchemy import select

path, n, loads, calls, hits = Path(sys.argv[1]), *map(int, sys.argv[2:6])
db = catalog.connect(path, readonly=True)
load = []
for _ in range(loads):
    start = time.perf_counter(); cols = Columns(db); load.append(time.perf_counter() - start)
assert len(cols) == n, (len(cols), n)
rng = random.Random(0)
ids = [int(i) for i in cols.ids]
per = []
with db.connect() as conn:
    for _ in range(calls):
        chosen = rng.sample(ids, hits)
        start = time.perf_counter(); got = catalog.addresses_of(conn, chosen); per.append(time.perf_counter() - start)
        assert len(got) == hits
out = {"load_ms": statistics.median(load) * 1e3, "addresses_us": statistics.median(per) * 1e6}
if "vec_seal" in catalog.files.c:  # the seal check's own steps in Columns, apart from the rest of the load
    import numpy as np
    from alignsearch.storage import rowdigest
    f = catalog.files.c
    with db.connect() as conn:
        rows = conn.execute(select(f.id, f.vec_row, f.vec_seal).where(f.status == catalog.INDEXED).order_by(f.id)).all()
    parts = []
    for _ in range(loads):
        start = time.perf_counter()
        seals = np.array([r[-1] if type(r[-1]) is int else -1 for r in rows], dtype=np.int64)
        assert rowdigest.sealed(cols.vec_rows, seals)
        parts.append(time.perf_counter() - start)
    out["check_ms"] = statistics.median(parts) * 1e3
print(json.dumps(out))
"""


def run(tree: Path, code: str, *args) -> str:
    env = dict(os.environ, PYTHONPATH=str(tree))
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], env=env, cwd=tree, check=True,
                          capture_output=True, text=True).stdout


def measure(trees: dict[str, Path], rows: list[int], args, tmp: Path) -> dict:
    """{(label, n): [per-round figures]}, the trees alternating round by round."""
    figures: dict = {}
    for n in rows:
        for label, tree in trees.items():
            (tmp / label / str(n)).mkdir(parents=True)
            run(tree, BUILD, tmp / label / str(n) / "catalog.db", n)
        for r in range(args.rounds):
            order = list(trees.items()) if r % 2 == 0 else list(reversed(trees.items()))
            for label, tree in order:
                out = run(tree, TIME, tmp / label / str(n) / "catalog.db", n, args.loads, args.calls, args.hits)
                figures.setdefault((label, n), []).append(json.loads(out))
    return figures


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="ae003b9^")
    ap.add_argument("--base-tree", type=Path, help="an existing worktree of the baseline (else one is made of --base)")
    ap.add_argument("--rows", default="50000,480000")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--loads", type=int, default=3)
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--hits", type=int, default=100)
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    rows = [int(x) for x in args.rows.split(",")]
    at_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        if args.base_tree:
            short = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                   cwd=args.base_tree, check=True).stdout.strip()
            figures = measure({"base": args.base_tree, "this": HERE.parent}, rows, args, Path(tmp))
        else:
            with base_worktree(args.base) as (_, old, short):
                figures = measure({"base": old, "this": HERE.parent}, rows, args, Path(tmp))
    lines = []
    for n in rows:
        for label, name in (("base", f"baseline {short} (no seal)"), ("this", "this tree (seal checked)")):
            got = figures[(label, n)]
            load = statistics.median(g["load_ms"] for g in got)
            addr = statistics.median(g["addresses_us"] for g in got)
            check = (f"; of the load, the seal check's own steps (seals array + rowdigest.sealed) "
                     f"{statistics.median(g['check_ms'] for g in got):.1f} ms" if "check_ms" in got[0] else "")
            lines.append(f"- {n:,} rows, {name}: snapshot load (Columns) {load:.1f} ms, addresses_of "
                         f"({args.hits} hits) {addr:.0f} us{check}")
    lines.append(f"- medians of {args.rounds} processes per tree (each: median of {args.loads} loads, "
                 f"{args.calls} addresses_of calls), trees alternating; run under `nice -n 10`")
    lines.append(load_note(at_start))
    record(f"vector address seal's cost to readers (bench_seal.py, --base {args.base})", lines, save=not args.no_save)


if __name__ == "__main__":
    main()
