"""The cost of catalog.relisted after a `chmod -R` of a library: every file's status changed, each confirmed by its
hash (indexer/scan.py confirm), and every row's indexed_at moved to the listing in one transaction before the
pipeline starts. catalog.py as it was (git --baseline, loaded from git in the same run) and now, on copies of one
catalog of --rows rows, alternating; medians, and the peak of Python's allocations (tracemalloc) in a pass of each.

    python benchmarks/bench_relisted.py [--rows 50000] [--repeat 5] [--baseline 2393f46]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import load_note, module_at, record

from alignsearch.storage import catalog


def build(folder: Path, rows: int) -> list[tuple[str, str, float]]:
    db = catalog.connect(folder / "catalog.db")
    with db.begin() as conn:
        for i in range(rows):
            catalog.insert_file(conn, {"root": "/lib", "relpath": f"a{i // 100:04d}/img{i % 100:03d}.jpg", "size": 1000,
                                       "mtime": 1.0, "sha256": "ab" * 32, "status": "indexed", "vec_row": i,
                                       "format": "jpg", "width": 64, "height": 64, "indexed_at": 100.0})
    db.dispose()
    return [("/lib", f"a{i // 100:04d}/img{i % 100:03d}.jpg", 200.0) for i in range(rows)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", default="2393f46", help="catalog.py before the batched lookups (git revision)")
    ap.add_argument("--rows", type=int, default=50_000)
    ap.add_argument("--repeat", type=int, default=5, help="passes; the median is reported")
    ap.add_argument("--no-save", action="store_true", help="print only, RESULTS.md untouched")
    args = ap.parse_args()
    loaded = os.getloadavg()[0]
    old = module_at(args.baseline, "alignsearch/storage/catalog.py", "catalog_old")
    variants = {f"before ({args.baseline})": old, "now": catalog}
    with tempfile.TemporaryDirectory() as tmp:
        master = Path(tmp) / "master"
        master.mkdir(mode=0o700)
        confirmed = build(master, args.rows)

        def once(module, traced: bool = False) -> tuple[float, int]:
            copy = Path(tmp) / "copy"
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(master, copy)
            db = catalog.connect(copy / "catalog.db")
            if traced:
                tracemalloc.start()
            start = time.perf_counter()
            with db.begin() as conn:
                module.relisted(conn, confirmed)
            took = time.perf_counter() - start
            peak = tracemalloc.get_traced_memory()[1] if traced else 0
            tracemalloc.stop()
            with db.connect() as conn:
                assert catalog.off_digest(conn) == []
            db.dispose()
            return took, peak

        names = list(variants)
        peaks = {name: once(variants[name], traced=True)[1] for name in names}
        times: dict[str, list[float]] = {name: [] for name in names}
        for i in range(args.repeat):
            for name in names[i % len(names):] + names[:i % len(names)]:
                times[name].append(once(variants[name])[0])
    medians = {name: statistics.median(t) for name, t in times.items()}
    base = medians[names[0]]
    record(f"catalog.relisted of {args.rows:,} rows (a chmod -R of the library confirmed)", [
        f"A catalog of {args.rows:,} rows (one root, 100 to a folder), every row relisted in one transaction; a fresh "
        f"copy of it a pass, median of {args.repeat} passes, alternating.",
        "",
        "| relisted | seconds | µs a row | vs before | peak Python allocations |",
        "|---|---|---|---|---|",
        *(f"| {name} | {m:.2f} | {m / args.rows * 1e6:.0f} | {m / base - 1:+.0%} | {peaks[name] / 2**20:.0f} MiB |"
          for name, m in medians.items()),
        "",
        load_note(loaded),
    ], save=not args.no_save)


if __name__ == "__main__":
    main()
