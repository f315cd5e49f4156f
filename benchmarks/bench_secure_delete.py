"""What `PRAGMA secure_delete=ON` (alignsearch/storage/catalog.py connect(): a deleted row's bytes are overwritten)
costs the operations that delete catalog rows, against OFF (and FAST: zeroed within pages, freed pages not
written) in the same run.

    python benchmarks/bench_secure_delete.py [--rows 50000] [--repeat 5] [--dim 640]

A synthetic catalog of N rows written by the index's own writer (indexer/writer.catalog_writer: file row,
perceptual hash, photo fields with a caption on every row and text read in every 5th, their keyword text in
both FTS5 tables; unit vectors with their checksums), 3/4 of the rows under root /lib/a, 1/4 under /lib/b, with
its ANN index (indexer.build.sync_index). Each run copies it afresh and times, each mode in turn (the order
rotates from run to run):
- delete: the transaction an `index` run commits when files are gone (and `verify --repair` for lost rows):
  catalog.delete_files of every 4th row of /lib/a, scattered over the file as deletions across a library are;
- compact: then the vector store compacted (indexer.compact.compact, forced): rows readdressed, chunks dropped;
- forget: on a second fresh copy, `alignsearch forget /lib/b` (indexer.roots.forget_root: the root's rows
  dropped in the transaction that commits the ANN index without them).
The pragma is switched in this process only: catalog.connect is wrapped so that each new connection of a writer's
engine runs `PRAGMA secure_delete=<mode>` after the shipped pragmas (the connections opened under them are closed
first), and the mode is read back from a connection. Medians of --repeat runs; file sizes after; how many of the
deleted rows' captions can still be read in the file's bytes.
ALIGNSEARCH_BENCH_DRY=1 prints without recording.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import load_note, record
from sqlalchemy import event, select

from alignsearch.storage import catalog, state, vectors
from alignsearch.storage.paths import ANN_FILE, DB_FILE, VECTORS_FILE
from indexer import build, compact, roots
from indexer.decode import Item
from indexer.scan import Found
from indexer.writer import catalog_writer

MODES = ("OFF", "ON", "FAST")
ROOT_A, ROOT_B = "/lib/a", "/lib/b"
BATCH = 2_000
SHIPPED_CONNECT = catalog.connect
CAPTION = re.compile(rb"by the harbour, frame (\d+),")


def use_mode(mode: str) -> None:
    """catalog.connect for this process: a writer's connections run PRAGMA secure_delete=<mode> after the
    shipped pragmas."""

    def connect(db_path, readonly: bool = False):
        engine = SHIPPED_CONNECT(db_path, readonly)
        if not readonly:
            engine.dispose()  # the connection connect() opened ran the shipped pragma only

            @event.listens_for(engine, "connect")
            def _mode(dbapi_conn, _record):
                cur = dbapi_conn.cursor()
                cur.execute(f"PRAGMA secure_delete={mode}")
                cur.close()
        return engine

    catalog.connect = connect


def mode_in_use(db) -> int:
    with db.connect() as conn:
        return conn.exec_driver_sql("PRAGMA secure_delete").scalar()


def build_catalog(folder: Path, rows: int, dim: int) -> None:
    folder.mkdir(parents=True)
    store = vectors.VectorStore(folder / VECTORS_FILE, dim, 0)
    db = SHIPPED_CONNECT(folder / DB_FILE)
    with db.begin() as conn:
        state.write(conn, model=state.ModelIdentity(name="synthetic", fingerprint="synthetic", dim=dim),
                    roots=state.RootsState(roots=(ROOT_A, ROOT_B)))
    write = catalog_writer(db, store)
    rng = np.random.default_rng(0)
    cameras = ["Canon EOS 80D", "NIKON D750", "iPhone 13 Pro", "Pixel 7", "FC3582"]
    for start in range(0, rows, BATCH):
        items = []
        for i in range(start, min(rows, start + BATCH)):
            root = ROOT_A if i < rows * 3 // 4 else ROOT_B
            relpath = f"{2015 + i % 9}/trip-{i // 250:04d} summer/IMG_{i:06d}.jpg"
            photo = {"taken": 1.5e9 + i * 37.0, "taken_source": "exif:DateTimeOriginal", "camera": cameras[i % 5],
                     "lens": "24-70mm f/2.8", "lat": 48.0 + (i % 100) / 1000, "lon": 2.0 + (i % 77) / 1000,
                     "caption": f"a red bicycle leaning on a stone wall by the harbour, frame {i}, morning light"}
            ocr = f"INV{4000 + i} total {i % 97}.50 EUR paid" if i % 5 == 0 else None
            items.append(Item(Found(root, relpath, 2_000_000 + i, 1.6e9 + i), crop=np.zeros(1), sha256=f"{i:064x}",
                              width=4000, height=3000, format="JPEG", phash=f"{i * 2654435761 % 2**64:016x}",
                              photo=photo, ocr=ocr))
        x = rng.standard_normal((len(items), dim)).astype(np.float32)
        write(items, x / np.linalg.norm(x, axis=1, keepdims=True))
    build.sync_index(db, store, folder / ANN_FILE)
    db.dispose()


def sizes(folder: Path) -> tuple[int, int]:
    db, wal = folder / DB_FILE, folder / (DB_FILE + "-wal")
    return db.stat().st_size, wal.stat().st_size if wal.exists() else 0


def captions_left(folder: Path, gone: set[int]) -> int:
    """How many of the deleted rows' captions can still be read in the catalog's bytes (db and WAL)."""
    found = set()
    for name in (DB_FILE, DB_FILE + "-wal"):
        path = folder / name
        if path.exists():
            found |= {int(m) for m in CAPTION.findall(path.read_bytes())}
    return len(found & gone)


def delete_and_compact(folder: Path, rows: int, dim: int, mode: str) -> dict:
    db = catalog.connect(folder / DB_FILE)
    assert mode_in_use(db) == MODES.index(mode), (mode, mode_in_use(db))
    with db.connect() as conn:
        ids = [i for (i,) in conn.execute(select(catalog.files.c.id).where(catalog.files.c.root == ROOT_A)
                                          .order_by(catalog.files.c.id))][::4]
        gone_frames = {int(CAPTION.search(c.encode()).group(1)) for (c,) in conn.execute(
            select(catalog.photos.c.caption).where(catalog.photos.c.file_id.in_(ids[:500])))}
    t0 = time.perf_counter()
    with db.begin() as conn:
        catalog.delete_files(conn, ids)
    deleted = time.perf_counter() - t0
    db_bytes, wal_bytes = sizes(folder)
    t0 = time.perf_counter()
    done = compact.compact(db, folder, force=True)
    compacted = time.perf_counter() - t0
    assert done is not None and done.rows_after == rows - len(ids), done
    db.dispose()  # the last connection checkpoints the WAL into the file and removes it
    return {"delete": deleted, "rows": len(ids), "wal_after_delete": wal_bytes, "db_after_delete": db_bytes,
            "compact": compacted, "db_after": sizes(folder)[0], "left": captions_left(folder, gone_frames),
            "checked": len(gone_frames)}


def forget(folder: Path, mode: str) -> dict:
    t0 = time.perf_counter()
    report = roots.forget_root(folder, ROOT_B)
    took = time.perf_counter() - t0
    db = catalog.connect(folder / DB_FILE)
    assert mode_in_use(db) == MODES.index(mode)
    with db.connect() as conn:
        assert conn.execute(select(catalog.files.c.id).where(catalog.files.c.root == ROOT_B)).first() is None
    db.dispose()
    return {"forget": took, "forgotten": report["files"], "db_after_forget": sizes(folder)[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--dim", type=int, default=640)
    args = parser.parse_args()
    load_at_start = os.getloadavg()[0]
    built = sqlite3.connect(":memory:")
    default = built.execute("PRAGMA secure_delete").fetchone()[0]
    compiled = [o for (o,) in built.execute("PRAGMA compile_options") if "SECURE_DELETE" in o]
    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory(prefix="bench-secure-delete-") as tmp:
        pristine = Path(tmp) / "pristine"
        t0 = time.perf_counter()
        build_catalog(pristine, args.rows, args.dim)
        print(f"built {args.rows} rows in {time.perf_counter() - t0:.1f} s", flush=True)
        start_bytes = sizes(pristine)[0]
        for i in range(args.repeat):
            for mode in MODES[i % 3:] + MODES[: i % 3]:
                use_mode(mode)
                try:
                    a, b = Path(tmp) / "a", Path(tmp) / "b"
                    shutil.copytree(pristine, a)
                    shutil.copytree(pristine, b)
                    r = {**delete_and_compact(a, args.rows, args.dim, mode), **forget(b, mode)}
                finally:
                    catalog.connect = SHIPPED_CONNECT
                    shutil.rmtree(a, ignore_errors=True)
                    shutil.rmtree(b, ignore_errors=True)
                runs[mode].append(r)
                print(mode, {k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}, flush=True)

    def med(mode: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[mode])

    r0 = runs["ON"][0]
    mib = 2**20
    lines = [f"- catalog: {args.rows:,} rows written by indexer.writer.catalog_writer (file row, phash, photo fields, "
             f"a caption on each, text read on every 5th, both FTS5 keyword tables), {args.dim}-d vectors, ANN index; "
             f"{start_bytes / mib:.1f} MiB catalog.db",
             f"- this SQLite: {sqlite3.sqlite_version}, compile options {compiled or 'none'} (default secure_delete="
             f"{default}: {'already on before the pragma, here' if default else 'off unless set'})",
             f"- runs: {args.repeat} of each mode, mode order rotating; each on fresh copies; medians (s)",
             f"- delete: {r0['rows']:,} scattered rows of {ROOT_A} (an `index` run's commit of gone files; "
             f"`verify --repair`'s); compact: forced, after it; forget: `forget {ROOT_B}` ({r0['forgotten']:,} rows, "
             "the ANN index rebuilt and committed with it)",
             "",
             "| secure_delete | delete s | WAL after delete MiB | compact s | forget s | catalog.db after compact MiB | "
             "after forget MiB | deleted captions still in the file |",
             "|---|---|---|---|---|---|---|---|"]
    for mode in MODES:
        label = {"ON": "ON (shipped)", "OFF": "OFF (baseline)", "FAST": "FAST"}[mode]
        lines.append(f"| {label} | {med(mode, 'delete'):.3f} | {med(mode, 'wal_after_delete') / mib:.1f} | "
                     f"{med(mode, 'compact'):.2f} | {med(mode, 'forget'):.2f} | {med(mode, 'db_after') / mib:.1f} | "
                     f"{med(mode, 'db_after_forget') / mib:.1f} | {int(med(mode, 'left'))} of {r0['checked']} |")
    lines.append("")
    for key in ("delete", "compact", "forget"):
        lines.append(f"- all {key}: " + "; ".join(f"{m} " + ", ".join(f"{r[key]:.3f}" for r in runs[m]) for m in MODES))
    lines.append(load_note(load_at_start))
    record(f"SQLite secure_delete on the catalog's deleting operations, {args.rows:,} rows", lines)


if __name__ == "__main__":
    main()
