"""What compacting the vector store costs and frees (indexer/compact.py), at a size no test should encode.

A synthetic index of N rows of 640-d unit vectors (fp16, with their checksums, as the writer commits them)
whose files were half deleted, as a library that keeps changing leaves it. In the same run, as the baseline:
the integrity pass every `index` run already makes before it appends (vectors.check: every recorded chunk
re-hashed), over the same store, before and after. Medians of --repeat runs, each on a fresh copy.

    python benchmarks/bench_compact.py [--rows 400000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import record

from alignsearch.storage import catalog, state, vectors
from alignsearch.storage.paths import DB_FILE, VECTORS_FILE
from indexer import compact

DIM = 640
BATCH = 8_192


def build(folder: Path, rows: int, seed: int = 0) -> None:
    """rows vectors committed batch by batch with their checksums; every other file then deleted."""
    folder.mkdir(parents=True)
    store = vectors.VectorStore(folder / VECTORS_FILE, DIM, 0)
    db = catalog.connect(folder / DB_FILE)
    rng = np.random.default_rng(seed)
    with db.begin() as conn:
        for start in range(0, rows, BATCH):
            n = min(BATCH, rows - start)
            x = rng.standard_normal((n, DIM)).astype(np.float32)
            first = store.append(x / np.linalg.norm(x, axis=1, keepdims=True))
            vectors.record_chunk(conn, store, 0, first, n)
            conn.execute(catalog.insert(catalog.files), [
                dict(root="/synthetic", relpath=f"{i:08d}.jpg", size=1000 + i, mtime=1.6e9 + i, sha256=f"{i:064x}",
                     width=640, height=480, format="JPEG", status=catalog.INDEXED, indexed_at=0.0, vec_row=i)
                for i in range(start, start + n)])
        state.write(conn, model=state.ModelIdentity(name="synthetic", fingerprint="synthetic", dim=DIM))
        vectors.save(conn, store)
        conn.execute(catalog.files.delete().where(catalog.files.c.id % 2 == 0))  # half the library deleted
    db.dispose()


def check_seconds(folder: Path) -> float:
    db = catalog.connect(folder / DB_FILE)
    with db.connect() as conn:
        store = vectors.load(conn, folder, DIM)
        started = time.perf_counter()
        problems = vectors.check(conn, store).problems
        took = time.perf_counter() - started
    db.dispose()
    assert problems == [], problems
    return took


def store_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in [folder / VECTORS_FILE, *(folder / "vectors").rglob("*.f16")] if p.exists())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=400_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        pristine = Path(tmp) / "pristine"
        build(pristine, args.rows)
        before_bytes = store_bytes(pristine)
        runs = []
        for i in range(args.repeat):
            ix = Path(tmp) / f"run{i}"
            shutil.copytree(pristine, ix)
            check_before = check_seconds(ix)
            db = catalog.connect(ix / DB_FILE)
            started = time.perf_counter()
            done = compact.compact(db, ix, force=True)  # due by the rule at --rows >= 131,072 anyway
            took = time.perf_counter() - started
            db.dispose()
            assert done is not None and done.rows_after == args.rows // 2, done
            runs.append((took, check_before, check_seconds(ix), store_bytes(ix)))
            shutil.rmtree(ix)
    took, check_before, check_after, after_bytes = (statistics.median(r[k] for r in runs) for k in range(4))
    record(f"compaction of the vector store (bench_compact.py, {args.rows:,} rows of {DIM}-d, half dead)", [
        f"- compaction (copy {args.rows // 2:,} live rows, each chunk checked; one switching transaction): "
        f"{took:.2f} s median of {args.repeat} ({args.rows // 2 / took:,.0f} live rows/s)",
        f"- vector files: {before_bytes / 2**20:.0f} MiB before, {after_bytes / 2**20:.0f} MiB after",
        f"- baseline, the integrity pass every `index` run makes before appending (vectors.check): "
        f"{check_before:.2f} s before, {check_after:.2f} s after",
    ], save=not args.no_save)


if __name__ == "__main__":
    main()
