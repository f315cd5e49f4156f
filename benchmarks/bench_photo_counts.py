"""What the filter columns load's two counts of the photos table cost (search/columns.py): catalog.count_photos (every
row, for columns.all_joined) and catalog.count_indexed_photos_scanned (the rows joined to indexed files, in a scan),
two passes over the table per snapshot load, against one scan giving both (catalog.count_photos_scanned, where the
working tree has it). Rows with long text (a caption of --caption characters, an OCR text of --ocr) make the table
wider: a scan reads every page of it, where the join of the load reads each file's row by its key.

    python benchmarks/bench_photo_counts.py [--n 100000] [--caption 0,2000] [--ocr 0] [--rounds 9] [--base main]
        [--no-save]

For each caption length: the counts alone (--base's two statements, the one scan), then the whole load, --base's
columns.py and catalog.py (loaded beside the working tree's) and the working tree's, alternating in one run on one
catalog. The catalog: common.keyword_catalog (upsert_file and set_photo, as an index run writes), its photos rows'
captions (and OCR text) then set to that length (distinct hex text per row), addresses set, every row digested and
sealed again (migrate.seal_rows), every photos row an indexed file's (the healthy case: no photo_keys_off read).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import keyword_catalog, load_note, module_at, record

from alignsearch.search.columns import Columns
from alignsearch.storage import catalog, migrate


def base_modules(rev: str):
    """--base's columns.py with --base's catalog.py under it (its count functions as they were), beside ours."""
    old_catalog = module_at(rev, "alignsearch/storage/catalog.py", "catalog_base")
    old_columns = module_at(rev, "alignsearch/search/columns.py", "columns_base")
    old_columns.catalog = old_catalog
    return old_catalog, old_columns


def widen(db_path: Path, caption: int, ocr: int) -> None:
    """Every photos row's caption (and OCR text) this long, distinct per row; rows digested and sealed again."""
    with sqlite3.connect(db_path) as conn:
        conn.execute("UPDATE files SET vec_row = id - 1")
        if caption:
            conn.execute("UPDATE photos SET caption = substr(hex(randomblob(?)), 1, ?)", ((caption + 1) // 2, caption))
        if ocr:
            conn.execute("UPDATE photos SET ocr = substr(hex(randomblob(?)), 1, ?)", ((ocr + 1) // 2, ocr))
        migrate.seal_rows(conn)
    conn.close()
    with sqlite3.connect(db_path) as conn:
        conn.execute("VACUUM")
    conn.close()


def main() -> None:
    ap = argparse.ArgumentParser(description="the filter columns load's counts of the photos table")
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--caption", default="0,2000", help="caption lengths (characters per photos row), comma-separated")
    ap.add_argument("--ocr", type=int, default=0, help="OCR text length per photos row")
    ap.add_argument("--rounds", type=int, default=9)
    # main before the one scan merged (6b56b1f): main's catalog.py has no count_photos since (AttributeError, exit 1)
    ap.add_argument("--base", default="6b56b1f^1", help="the commit whose columns.py and catalog.py are the baseline")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    load_at_start = os.getloadavg()[0]
    old_catalog, old_columns = base_modules(args.base)
    one_scan = getattr(catalog, "count_photos_scanned", None)
    lines = [f"- a catalog of {args.n:,} indexed files, each with a photos row (common.keyword_catalog, captions then "
             f"widened), OCR text {args.ocr} characters a row; median of {args.rounds}, {args.base}'s and the working "
             "tree's alternating in one run (each first in every other round)", load_note(load_at_start), "",
             "| caption chars | DB MB | what | ms (median) | min | max |", "|---|---|---|---|---|---|"]
    built = tempfile.TemporaryDirectory()
    base = Path(built.name) / "catalog.db"  # built once, copied and widened for each caption length
    keyword_catalog(base, args.n, 50, random.Random(0))
    for caption in (int(c) for c in args.caption.split(",")):
        seconds: dict[str, list[float]] = {}

        def timed(name, fn):
            start = time.perf_counter()
            out = fn()
            seconds.setdefault(name, []).append(time.perf_counter() - start)
            return out

        with tempfile.TemporaryDirectory() as tmp:
            db_path = Path(tmp) / "catalog.db"
            shutil.copyfile(base, db_path)
            widen(db_path, caption, args.ocr)
            size_mb = db_path.stat().st_size / 1e6
            reader = catalog.connect(db_path, readonly=True)
            for round_ in range(args.rounds):
                with reader.connect() as conn:
                    total = timed(f"{args.base}: count_photos", lambda: old_catalog.count_photos(conn))
                    scanned = timed(f"{args.base}: count_indexed_photos_scanned",
                                    lambda: old_catalog.count_indexed_photos_scanned(conn))
                    assert total == scanned == args.n, (total, scanned)
                    if one_scan:
                        assert timed("one scan: count_photos_scanned", lambda: one_scan(conn)) == (args.n, args.n)
                loads = [(f"filter columns load, {args.base}'s", old_columns.Columns),
                         ("filter columns load, the working tree's", Columns)]
                for name, load in loads[::-1] if round_ % 2 else loads:  # each first in every other round
                    timed(name, lambda: load(reader))
            reader.dispose()
        for name, runs in seconds.items():
            lines.append(f"| {caption:,} | {size_mb:.0f} | {name} | {statistics.median(runs) * 1e3:.1f} | "
                         f"{min(runs) * 1e3:.1f} | {max(runs) * 1e3:.1f} |")
    built.cleanup()
    record("The filter columns load's counts of the photos table: two passes (count_photos, then the scanned count) "
           "against one scan", lines, save=not args.no_save)


if __name__ == "__main__":
    main()
