"""What digesting a photos row's key costs (schema 21, rowdigest.PHOTO_KEYED_FIELDS): the upgrade's step 21
(migrate.rekey_photo_digests: each row read, its keyless digest checked, digested again with its key), and the
reader's look at the photos rows of no file (catalog.photo_keys_off) that Engine.photos_of adds to its rare path
(a hit without its photos row) after SQLite's check of the photos table, the old rare path alone, alternating in
one run on one catalog; and the snapshot's filter columns load (search/columns.py), with the share of it its own
look at the photos rows of no indexed file takes (photo_keys_off(unindexed=True)); then, the leftovers deleted,
that load as it was (always looking) and as it is (columns.all_joined: no look where no row lies off a file).

    python benchmarks/bench_photo_keys.py [--n 100000] [--rounds 5] [--leftovers 10] [--no-save]
    python benchmarks/bench_photo_keys.py --seals [--base 7d28022^1] [--n 100000] [--rounds 9] [--no-save]

--seals measures the photos rows' field seals instead (schema 23, rowdigest.field_seal): the filter columns load
with its check of every row's seal and --base's (search/columns.py before the seals' merge, loaded beside it: no seal
read or checked)
on the same catalog, alternating; the check alone
(rowdigest.fields_sealed over the load's arrays); verify's photo_seals_off; and step 23 (migrate.seal_photo_fields,
every row's digest checked then sealed, rolled back).

    python benchmarks/bench_photo_keys.py --file-seals [--base main] [--n 100000] [--rounds 9] [--inserts 20000] [--batch 32]

--file-seals measures the files rows' field seals (schema 24, rowdigest.FILE_SEALED): the filter columns load with its
check of every files row's seal and --base's (the load before them, loaded beside it: no files seal read or checked),
alternating on one catalog; the check alone; verify's file_seals_off; step 24 (migrate.seal_file_fields, rolled back);
and catalog.insert_file's rate with its field seal's UPDATE against --base's insert_file (no UPDATE), alternating,
--inserts rows a round in a transaction rolled back; and insert_file with its seal collected and written by one
catalog.seal_files (executemany) every --batch rows, as indexer/writer.py writes a batch.

The catalog: common.keyword_catalog (catalog.upsert_file and set_photo, the code an index run uses), two thirds of
its files captioned, with --leftovers photos rows of no file (an old version's leftovers, their digests holding).
Step 21 runs on the catalog's photos rows digested without their keys (as schema 20 left them), in a transaction
rolled back after each round.
"""

from __future__ import annotations

import argparse
import os
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import base_functions, keyword_catalog, load_note, module_at, record

from alignsearch.search import columns
from alignsearch.search.columns import Columns
from alignsearch.storage import catalog, migrate, rowdigest

# the snapshot's filter columns load every query of the CLI pays (search/columns.py), which reads the photos rows of
# no indexed file once (photo_keys_off(unindexed=True)) since the attacker's fix of a key flipped out of a date filter
COLUMNS = "filter columns load (Columns, with its photo_keys_off(unindexed=True))"
UNINDEXED = "photo_keys_off(unindexed=True) alone (the columns' share)"
# the same load on the catalog with its leftover rows deleted (every photos row an indexed file's), before and after
# columns.all_joined let it skip the look when counting the photos rows shows none lie off an indexed file
HEALTHY_OLD = "filter columns load, no photos row off an indexed file: always looking (before)"
HEALTHY_NEW = "filter columns load, no photos row off an indexed file: counted, not looked at (now)"


def main() -> None:
    ap = argparse.ArgumentParser(description="the cost of step 21 and of the reader's photo key check")
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--leftovers", type=int, default=10)
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--seals", action="store_true", help="the field seals' cost (schema 23) instead")
    ap.add_argument("--file-seals", action="store_true", help="the files rows' field seals' cost (schema 24) instead")
    ap.add_argument("--inserts", type=int, default=20_000, help="--file-seals: rows insert_file writes a round")
    ap.add_argument("--batch", type=int, default=32, help="--file-seals: a writer's batch (the CPU default, 32)")
    # main's columns.py checks the seals itself since their merge (7d28022): the baseline is main before it
    ap.add_argument("--base", default="7d28022^1",
                    help="--seals: the commit whose filter columns load is the baseline (no field seal)")
    args = ap.parse_args()
    if args.file_seals:
        return file_seals(args)
    if args.seals:
        return seals(args)
    load_at_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        db_path = Path(tmp) / "catalog.db"
        keyword_catalog(db_path, args.n, 50, random.Random(0))
        db = catalog.connect(db_path)
        with db.begin() as conn:
            for i in range(args.leftovers):
                catalog.set_photo(conn, 10 * args.n + i, f"gone{i}.jpg", {"taken": 1.6e9, "caption": "left"})
        db.dispose()
        with sqlite3.connect(db_path) as conn:  # addresses, sealed, as an index run writes them (the columns read them)
            conn.execute("UPDATE files SET vec_row = id - 1")
            migrate.seal_rows(conn)
        conn.close()
        size_mb = db_path.stat().st_size / 1e6
        seconds: dict[str, list[float]] = {"rare path before (photos table check)": [],
                                           "rare path now (check + photo_keys_off)": [], "photo_keys_off alone": [],
                                           COLUMNS: [], UNINDEXED: []}
        reader = catalog.connect(db_path, readonly=True)
        for _ in range(args.rounds):
            start = time.perf_counter()
            assert catalog.integrity_problems(db_path, "photos") == []
            seconds["rare path before (photos table check)"].append(time.perf_counter() - start)
            start = time.perf_counter()
            assert catalog.integrity_problems(db_path, "photos") == []
            with reader.connect() as conn:
                middle = time.perf_counter()
                assert catalog.photo_keys_off(conn) == []
                end = time.perf_counter()
            seconds["rare path now (check + photo_keys_off)"].append(end - start)
            seconds["photo_keys_off alone"].append(end - middle)
            start = time.perf_counter()
            Columns(reader)
            seconds[COLUMNS].append(time.perf_counter() - start)
            with reader.connect() as conn:
                start = time.perf_counter()
                assert catalog.photo_keys_off(conn, unindexed=True) == []
                seconds[UNINDEXED].append(time.perf_counter() - start)
        reader.dispose()
        step = []
        conn = sqlite3.connect(db_path, isolation_level=None)
        conn.execute("BEGIN")
        migrate.digest_rows(conn, keyed=False)  # the photos rows as schema 20 left them
        conn.execute("COMMIT")
        for _ in range(args.rounds):
            conn.execute("BEGIN")
            start = time.perf_counter()
            done = migrate.rekey_photo_digests(conn)
            step.append(time.perf_counter() - start)
            conn.execute("ROLLBACK")
            assert done == args.n + args.leftovers, done
        conn.execute("DELETE FROM photos WHERE file_id NOT IN (SELECT id FROM files)")  # no leftovers: a healthy catalog
        conn.close()
        seconds.update({HEALTHY_OLD: [], HEALTHY_NEW: []})
        reader = catalog.connect(db_path, readonly=True)
        for _ in range(args.rounds):  # alternating: the load as before this change, then as now
            counted = catalog.count_photos_scanned  # never all joined: it looks
            with mock.patch.object(columns.catalog, "count_photos_scanned", lambda conn: (-1, counted(conn)[1])):
                start = time.perf_counter()
                Columns(reader)
                seconds[HEALTHY_OLD].append(time.perf_counter() - start)
            start = time.perf_counter()
            Columns(reader)
            seconds[HEALTHY_NEW].append(time.perf_counter() - start)
        reader.dispose()
    lines = [f"- a catalog of {args.n:,} files ({size_mb:.1f} MB: files, photos, keyword and trigram indexes; "
             f"common.keyword_catalog) and {args.leftovers} photos rows of no file, median of {args.rounds}",
             load_note(load_at_start), "",
             "| what | ms (median) | min | max |", "|---|---|---|---|"]
    for name, runs in {**seconds, f"step 21: {args.n + args.leftovers:,} photos rows digested with their key "
                                  "(rekey_photo_digests, rolled back)": step}.items():
        lines.append(f"| {name} | {statistics.median(runs) * 1e3:.0f} | {min(runs) * 1e3:.0f} | {max(runs) * 1e3:.0f} |")
    record("A photos row's key digested (schema 21): step 21's cost and the reader's look at photos rows of no file",
           lines, save=not args.no_save)


def seals(args) -> None:
    """The field seals' cost: the columns load with their check and --base's, alternating, and what else reads them."""
    load_at_start = os.getloadavg()[0]
    old = module_at(args.base, "alignsearch/search/columns.py", "columns_base")
    old_catalog = module_at(args.base, "alignsearch/storage/catalog.py", "catalog_base")
    unsealed = f"filter columns load, {args.base}'s (no seal read or checked)"
    sealed = "filter columns load, every row's field seal checked (now)"
    seconds: dict[str, list[float]] = {unsealed: [], sealed: [], "the check alone (rowdigest.fields_sealed)": [],
                                       "verify: catalog.photo_seals_off": [],
                                       f"step 23: {args.n:,} photos rows sealed (seal_photo_fields, rolled back)": []}
    with tempfile.TemporaryDirectory() as tmp:
        db_path = Path(tmp) / "catalog.db"
        size_mb = _sealed_catalog(db_path, args.n)
        reader = catalog.connect(db_path, readonly=True)
        with base_functions(old_catalog):
            _loads(args, reader, old, seconds, rowdigest.PHOTO_SEALED, rowdigest.PHOTO_SEED, catalog.photo_seals_off,
                   names=(unsealed, sealed, "the check alone (rowdigest.fields_sealed)",
                          "verify: catalog.photo_seals_off"))
        reader.dispose()
        _steps(args, db_path, seconds[f"step 23: {args.n:,} photos rows sealed (seal_photo_fields, rolled back)"],
               "photos", migrate.seal_photo_fields)
    lines = _load_table(args, size_mb, load_at_start, seconds)
    record("The photos rows' field seals (schema 23): the filter columns load with every row's seal checked, against "
           "the load before", lines, save=not args.no_save)


def file_seals(args) -> None:
    """The files rows' field seals' cost: the columns load with their check and --base's, alternating; insert_file with
    its UPDATE and --base's, alternating; and what else reads or writes them."""
    # --seals' default is before the photos seals; this one's is main before the files seals merged (cedc39a): main
    # itself checks them since, and its load against this one's measured the check against itself
    base = "cedc39a^1" if args.base == "7d28022^1" else args.base
    load_at_start = os.getloadavg()[0]
    old = module_at(base, "alignsearch/search/columns.py", "columns_base")
    old_catalog = module_at(base, "alignsearch/storage/catalog.py", "catalog_base")
    # the default base reads no files seal; another (main, say) is labelled by its commit alone
    before = " (photos seals checked, no files seal read or checked)" if base == "cedc39a^1" else ""
    unsealed = f"filter columns load, {base}'s{before}"
    sealed = "filter columns load, every files row's field seal checked too (now)"
    check = "the files check alone (rowdigest.fields_sealed, FILE_SEED)"
    verify = "verify: catalog.file_seals_off"
    step = f"step 24: {args.n:,} files rows sealed (seal_file_fields, rolled back)"
    seconds: dict[str, list[float]] = {unsealed: [], sealed: [], check: [], verify: [], step: []}
    inserts = {f"insert_file, {base}'s" + (" (no UPDATE)" if before else ""): _each(old_catalog.insert_file),
               "insert_file with its field seal's UPDATE (now)": _each(catalog.insert_file),
               f"insert_file, its seal written by one seal_files a batch of {args.batch} (writer.py, now)":
                   _batched(args.batch)}
    rates: dict[str, list[float]] = {name: [] for name in inserts}
    with tempfile.TemporaryDirectory() as tmp:
        db_path = Path(tmp) / "catalog.db"
        size_mb = _sealed_catalog(db_path, args.n,
                                  files="width = 640 + id % 7, height = 480, size = 1000 + id, mtime = 1.6e9 + id")
        reader = catalog.connect(db_path, readonly=True)
        with base_functions(old_catalog):
            _loads(args, reader, old, seconds, rowdigest.FILE_SEALED, rowdigest.FILE_SEED, catalog.file_seals_off,
                   names=(unsealed, sealed, check, verify))
        reader.dispose()
        _steps(args, db_path, seconds[step], "files", migrate.seal_file_fields)
        writer = catalog.connect(db_path)
        for r in range(args.rounds):
            order = list(inserts.items())
            for name, insert_file in order[r % len(order):] + order[:r % len(order)]:  # each first in turn
                rows = [{"root": "/bench", "relpath": f"{r}/{i}.jpg", "size": 1000 + i, "mtime": 1.6e9 + i,
                         "width": 640, "height": 480, "format": "JPEG", "status": catalog.INDEXED,
                         "vec_row": args.n + i} for i in range(args.inserts)]
                with writer.connect() as conn:
                    tx = conn.begin()
                    start = time.perf_counter()
                    insert_file(conn, rows)
                    rates[name].append(args.inserts / (time.perf_counter() - start))
                    tx.rollback()
        writer.dispose()
    lines = _load_table(args, size_mb, load_at_start, seconds)
    lines += ["", f"insert_file, {args.inserts:,} rows a round into that catalog (one transaction, rolled back):", "",
              "| what | rows/s (median) | min | max |", "|---|---|---|---|"]
    for name, runs in rates.items():
        lines.append(f"| {name} | {statistics.median(runs):,.0f} | {min(runs):,.0f} | {max(runs):,.0f} |")
    record("The files rows' field seals (schema 24): the filter columns load with every files row's seal checked, "
           "and insert_file with its seal's UPDATE, against main's", lines, save=not args.no_save)


def _each(insert_file):
    """A writer of a list of rows by `insert_file`, one call a row (its seal's UPDATE in it)."""
    def write(conn, rows: list) -> None:
        for values in rows:
            insert_file(conn, values)
    return write


def _batched(size: int):
    """A writer of a list of rows as indexer/writer.py writes a batch: insert_file collecting each row's seal, then one
    catalog.seal_files (executemany) every `size` rows, in the same transaction."""
    def write(conn, rows: list) -> None:
        for start in range(0, len(rows), size):
            seals: list = []
            for values in rows[start:start + size]:
                catalog.insert_file(conn, values, seals=seals)
            catalog.seal_files(conn, seals)
    return write


def _sealed_catalog(db_path: Path, n: int, *, files: str | None = None) -> float:
    """common.keyword_catalog's n files with addresses, a date and place each photo (and `files`' values, SQL), sealed
    as a writer seals them; its size in MB."""
    keyword_catalog(db_path, n, 50, random.Random(0))
    with sqlite3.connect(db_path) as conn:
        conn.execute("UPDATE files SET vec_row = id - 1" + (f", {files}" if files else ""))
        conn.execute("UPDATE photos SET taken = 1.5e9 + file_id * 37.5, lat = file_id % 180 - 89.5, "
                     "lon = file_id % 360 - 179.25")
        migrate.seal_rows(conn)
    conn.close()
    return db_path.stat().st_size / 1e6


def _loads(args, reader, old, seconds: dict, sealed_names: tuple, seed: int, seals_off, *, names: tuple) -> None:
    """args.rounds of: the base's columns load and this one's (first in turn), the seal check alone over the loaded
    arrays, and verify's seals_off; each time under its name in `names`, in that order."""
    base, now, check, verify = names
    for r in range(args.rounds):
        for name, load in ((base, old.Columns), (now, Columns))[:: 1 if r % 2 == 0 else -1]:
            start = time.perf_counter()
            cols = load(reader)
            seconds[name].append(time.perf_counter() - start)
        cols = Columns(reader)
        fields = [cols.column(name) for name in sealed_names]
        stored = rowdigest.field_seals(cols.ids, *fields, seed=seed)  # as read: the check's inputs, made apart from it
        start = time.perf_counter()
        assert rowdigest.fields_sealed(cols.ids, fields, stored, seed=seed).all()
        seconds[check].append(time.perf_counter() - start)
        with reader.connect() as conn:
            start = time.perf_counter()
            assert seals_off(conn) == []
            seconds[verify].append(time.perf_counter() - start)


def _steps(args, db_path: Path, seconds: list, table: str, seal) -> None:
    """args.rounds of the upgrade step's sealing of `table` (its rows found unsealed, as the step finds them once it
    added the column), each in a transaction rolled back."""
    conn = sqlite3.connect(db_path, isolation_level=None)
    for _ in range(args.rounds):
        conn.execute("BEGIN")
        conn.execute(f"UPDATE {table} SET field_seal = NULL")
        start = time.perf_counter()
        done = seal(conn)
        seconds.append(time.perf_counter() - start)
        conn.execute("ROLLBACK")
        assert done == args.n, done
    conn.close()


def _load_table(args, size_mb: float, load_at_start: float, seconds: dict) -> list[str]:
    lines = [f"- a catalog of {args.n:,} files, each with a photos row ({size_mb:.1f} MB: files, photos, keyword and "
             f"trigram indexes; common.keyword_catalog), median of {args.rounds}; before and after alternate in one run",
             load_note(load_at_start), "",
             "| what | ms (median) | min | max |", "|---|---|---|---|"]
    for name, runs in seconds.items():
        lines.append(f"| {name} | {statistics.median(runs) * 1e3:.1f} | {min(runs) * 1e3:.1f} | {max(runs) * 1e3:.1f} |")
    return lines


if __name__ == "__main__":
    main()
