"""What a reader pays when a search hit has no photos row (Engine._hits: a page hiding it, or a photo whose fields
wait for a later run): SQLite's integrity check of the photos table alone (catalog.integrity_problems(table=
"photos"), what the engine runs) against the whole catalog's check (what verify runs, the first form of the fix),
alternating in one run on one catalog. A CLI query is a new process: it pays the check at each query while such a
photo is a hit.

    python benchmarks/bench_photos_check.py [--n 50000] [--rounds 5] [--no-save]

The catalog: common.keyword_catalog (catalog.upsert_file and set_photo, the code an index run uses: files, photos,
the keyword and trigram indexes), two thirds of its files captioned.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import keyword_catalog, load_note, record

from alignsearch.storage import catalog


def main() -> None:
    ap = argparse.ArgumentParser(description="the photos table's integrity check against the whole catalog's")
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    load_at_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        db_path = Path(tmp) / "catalog.db"
        keyword_catalog(db_path, args.n, 50, random.Random(0))
        size_mb = db_path.stat().st_size / 1e6
        seconds: dict[str, list[float]] = {"whole catalog": [], "photos table": []}
        for _ in range(args.rounds):
            for name, table in (("whole catalog", None), ("photos table", "photos")):
                start = time.perf_counter()
                assert catalog.integrity_problems(db_path, table) == []
                seconds[name].append(time.perf_counter() - start)
    lines = [f"- a catalog of {args.n:,} files ({size_mb:.1f} MB: files, photos, keyword and trigram indexes; "
             "common.keyword_catalog), catalog.integrity_problems of the whole catalog and of the photos table alone, "
             f"alternating, median of {args.rounds}", load_note(load_at_start), "",
             "| check | ms (median) | min | max |", "|---|---|---|---|"]
    for name, runs in seconds.items():
        lines.append(f"| {name} | {statistics.median(runs) * 1e3:.0f} | {min(runs) * 1e3:.0f} | {max(runs) * 1e3:.0f} |")
    record("A hit without its photos row: the photos table's integrity check against the whole catalog's", lines,
           save=not args.no_save)


if __name__ == "__main__":
    main()
