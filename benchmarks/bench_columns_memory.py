"""The filter columns load's peak memory at scale: the rows read in one transposition (zip) with every photos row's
field seal (schema 23), against --base's load (2ca070c's: rows sliced apart from their address seals, no field seal
read; main's: the same load less the count of indexed files' photos rows in a scan of the table).

A catalog of --n indexed files, each with a photos row (a date and place, sealed as set_photo seals them), is written
straight into SQLite (no keyword rows: the load reads none). Each load runs in a process of its own, old and new
alternating, and reports the growth of its peak resident memory (ru_maxrss) over the opened catalog's, and its
seconds. The transposition holds one more reference a value (12 tuples of --n) beside the rows: the question is
whether that blows the load's memory up at a million files.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np

from common import base_functions, load_note, module_at, record

from alignsearch.storage import catalog, migrate, rowdigest


def build(db_path: Path, n: int) -> None:
    """n indexed files with their addresses and their width, height, size and mtime sealed (schema 24: else the load
    refused every row, exit 7), each with a photos row whose date and place are sealed."""
    catalog.connect(db_path).dispose()
    conn = sqlite3.connect(db_path)
    ids = np.arange(1, n + 1)
    mtimes = 1.6e9 + ids
    file_seals = rowdigest.field_seals(ids, np.full(n, 640), np.full(n, 480), np.full(n, 1000), mtimes,
                                       seed=rowdigest.FILE_SEED).tolist()
    conn.executemany(
        "INSERT INTO files (id, root, relpath, size, mtime, sha256, width, height, format, status, indexed_at, vec_row, "
        "moment, field_seal) VALUES (?, '/r', ?, 1000, ?, ?, 640, 480, 'JPEG', ?, 0.0, ?, 0, ?)",
        ((int(i), f"{i:08d}.jpg", float(m), f"{i:064x}", catalog.INDEXED, int(i) - 1, seal)
         for i, m, seal in zip(ids, mtimes, file_seals)))
    taken, lat, lon = 1.5e9 + ids * 37.5, ids % 180 - 89.5, ids % 360 - 179.25
    conn.executemany("INSERT INTO photos (file_id, taken, lat, lon, field_seal) VALUES (?, ?, ?, ?, ?)",
                     zip(ids.tolist(), taken.tolist(), lat.tolist(), lon.tolist(),
                         rowdigest.field_seals(ids, taken, lat, lon).tolist()))
    migrate.seal_addresses(conn)
    conn.commit()
    conn.close()


def child(db_path: Path, base: str | None) -> None:
    """One load, in this process: prints the peak memory's growth (MB) and the seconds."""
    lent = contextlib.ExitStack()
    if base:
        columns = module_at(base, "alignsearch/search/columns.py", "columns_base")
        lent = base_functions(module_at(base, "alignsearch/storage/catalog.py", "catalog_base"))
    else:
        from alignsearch.search import columns
    db = catalog.connect(db_path, readonly=True)
    with db.connect() as conn:
        conn.exec_driver_sql("SELECT count(*) FROM files").all()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with lent:
        loaded = columns.Columns(db)
    seconds = time.perf_counter() - start
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024  # KiB on Linux
    print(f"{grown:.1f} {seconds:.3f} {len(loaded)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--base", default="2ca070c", help="the commit whose filter columns load is the baseline")
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--child", nargs=2, metavar=("DB", "BASE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(Path(args.child[0]), args.child[1] if args.child[1] != "-" else None)
        return
    load_at_start = os.getloadavg()[0]
    old, new = f"{args.base}'s load", "the load now (zip transposition, field seals checked, keys counted in a scan)"
    runs: dict[str, list[tuple[float, float]]] = {old: [], new: []}
    with tempfile.TemporaryDirectory() as tmp:
        db_path = Path(tmp) / "catalog.db"
        build(db_path, args.n)
        size_mb = db_path.stat().st_size / 1e6
        for _ in range(args.rounds):
            for name, base in ((old, args.base), (new, "-")):
                out = subprocess.run([sys.executable, __file__, "--child", str(db_path), base], check=True,
                                     capture_output=True, text=True).stdout.split()
                assert int(out[2]) == args.n, out
                runs[name].append((float(out[0]), float(out[1])))
    lines = [f"- a catalog of {args.n:,} indexed files, each with a photos row ({size_mb:.0f} MB, no keyword rows), "
             f"median of {args.rounds}; each load in a process of its own, old and new alternating",
             load_note(load_at_start), "",
             "| load | peak memory growth, MB (median) | min | max | seconds (median) |", "|---|---|---|---|---|"]
    for name, got in runs.items():
        grown = [g for g, _ in got]
        lines.append(f"| {name} | {statistics.median(grown):.0f} | {min(grown):.0f} | {max(grown):.0f} | "
                     f"{statistics.median(s for _, s in got):.2f} |")
    record("The filter columns load's peak memory at scale: one transposition (zip) with the field seals, against "
           "the load before", lines, save=not args.no_save)


if __name__ == "__main__":
    main()
