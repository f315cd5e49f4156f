"""What compacting the vector store costs and frees (indexer/compact.py), at a size no test should encode.

A synthetic index of N rows of 640-d unit vectors (fp16, with their checksums, as the writer commits them)
whose files were half deleted, as a library that keeps changing leaves it. In the same run, as the baseline:
the integrity pass every `index` run already makes before it appends (vectors.check: every recorded chunk
re-hashed), over the same store, before and after. Medians of --repeat runs, each on a fresh copy.

    python benchmarks/bench_compact.py [--rows 400000] [--repeat 3]
    python benchmarks/bench_compact.py --fold 8 [--rows 400000] [--repeat 3]
    python benchmarks/bench_compact.py --base main [--rows 400000] [--repeat 3]

--base REV also runs REV's own bench_compact.py, from a temporary worktree, in the same run (after this tree's), and
records its compaction line beside this tree's: the cost of what a change added to compaction (schema 17: each vector
address's seal moved with it in the switching UPDATE).

--fold S measures instead the fold at the end of a Ray run (writer.fold_small_segments): --rows rows in S
segments (one per encoder actor) moved into vectors.f16, each segment first read against its checksums; the
baseline in the same run, on the same store, is that checksum pass alone (vectors.changed_chunks), the share
of the fold added when the fold began to check before copying.
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

from common import base_worktree, record, seal_rows

from alignsearch.storage import catalog, state, vectors
from alignsearch.storage.paths import DB_FILE, VECTORS_FILE
from indexer import compact, writer

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
        seal_rows(conn)  # digested and sealed as a writer writes rows (schemas 14, 17): vectors.check reads the seals
        state.write(conn, model=state.ModelIdentity(name="synthetic", fingerprint="synthetic", dim=DIM))
        vectors.save(conn, store)
        conn.execute(catalog.files.delete().where(catalog.files.c.id % 2 == 0))  # half the library deleted
    db.dispose()


def build_segments(folder: Path, rows: int, segments: int, seed: int = 0) -> None:
    """An index whose rows lie in `segments` segment files (as Ray's actors leave them), each committed with
    its checksums and catalog rows; vectors.f16 empty."""
    folder.mkdir(parents=True)
    store = vectors.VectorStore(folder / VECTORS_FILE, DIM, 0)
    store.folder.mkdir()
    db = catalog.connect(folder / DB_FILE)
    rng = np.random.default_rng(seed)
    each = rows // segments
    with db.begin() as conn:
        for s in range(segments):
            part = vectors.VectorStore(store.folder / f"actor-{s}.f16", DIM, 0)
            for start in range(0, each, BATCH):
                x = rng.standard_normal((min(BATCH, each - start), DIM)).astype(np.float32)
                part.append(x / np.linalg.norm(x, axis=1, keepdims=True))
            n = store.commit(f"actor-{s}", each)
            for start in range(0, each, BATCH):
                vectors.record_chunk(conn, store, n, start, min(BATCH, each - start))
            conn.execute(catalog.insert(catalog.files), [
                dict(root="/synthetic", relpath=f"{s}-{i:08d}.jpg", size=1000 + i, mtime=1.6e9 + i,
                     sha256=f"{s:08x}{i:056x}", width=640, height=480, format="JPEG", status=catalog.INDEXED,
                     indexed_at=0.0, vec_row=vectors.address(n, i)) for i in range(each)])
        seal_rows(conn)  # digested and sealed as a writer writes rows (schemas 14, 17): vectors.check reads the seals
        state.write(conn, model=state.ModelIdentity(name="synthetic", fingerprint="synthetic", dim=DIM))
        vectors.save(conn, store)
    db.dispose()


def fold_run(folder: Path) -> tuple[float, float, int]:
    """(seconds of the checksum pass alone, seconds of the whole fold, rows moved), on folder's store."""
    db = catalog.connect(folder / DB_FILE)
    with db.connect() as conn:
        store = vectors.load(conn, folder, DIM)
        started = time.perf_counter()
        damaged = [vectors.changed_chunks(conn, store, n) for n in sorted(store.segments)]
        check = time.perf_counter() - started
    assert not any(damaged), damaged
    started = time.perf_counter()
    moved = writer.fold_small_segments(db, store)
    took = time.perf_counter() - started
    db.dispose()
    return check, took, moved


def fold_main(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        pristine = Path(tmp) / "pristine"
        build_segments(pristine, args.rows, args.fold)
        runs = []
        for i in range(args.repeat):
            ix = Path(tmp) / f"run{i}"
            shutil.copytree(pristine, ix)
            runs.append(fold_run(ix))
            shutil.rmtree(ix)
    check, took, moved = (statistics.median(r[k] for r in runs) for k in range(3))
    rows = args.rows // args.fold * args.fold
    assert moved == rows, (moved, rows)
    record(f"fold of a Ray run's segments (bench_compact.py --fold, {rows:,} rows of {DIM}-d in {args.fold} segments)", [
        f"- writer.fold_small_segments (checksum pass, then copy into vectors.f16, one re-addressing transaction): "
        f"{took:.2f} s median of {args.repeat} ({rows / took:,.0f} rows/s); runs: "
        + ", ".join(f"{r[1]:.2f}" for r in runs),
        f"- baseline, the checksum pass alone on the same store before each fold (vectors.changed_chunks of every "
        f"segment, the part added to the fold): {check:.2f} s median ({check / took:.0%} of the fold)",
    ], save=not args.no_save)


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
    parser.add_argument("--base", default=None, help="also run this commit's bench_compact.py, as the baseline")
    parser.add_argument("--fold", type=int, default=0, metavar="S",
                        help="measure the fold of S segments instead of a compaction")
    args = parser.parse_args()
    if args.fold:
        return fold_main(args)
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
    base = [] if args.base is None else [f"- baseline {args.base} ({line}" for line in base_compaction(args)]
    record(f"compaction of the vector store (bench_compact.py, {args.rows:,} rows of {DIM}-d, half dead)", base + [
        f"- compaction (copy {args.rows // 2:,} live rows, each chunk checked; one switching transaction): "
        f"{took:.2f} s median of {args.repeat} ({args.rows // 2 / took:,.0f} live rows/s)",
        f"- vector files: {before_bytes / 2**20:.0f} MiB before, {after_bytes / 2**20:.0f} MiB after",
        f"- baseline, the integrity pass every `index` run makes before appending (vectors.check): "
        f"{check_before:.2f} s before, {check_after:.2f} s after",
    ], save=not args.no_save)


def base_compaction(args) -> list[str]:
    """The baseline commit's compaction line ("<short hash>: - compaction ..."), its own script run from its own
    tree with the same --rows and --repeat, nothing recorded."""
    import os
    import subprocess

    with base_worktree(args.base) as (_, old, short):
        out = subprocess.run([sys.executable, str(old / "benchmarks" / "bench_compact.py"), "--rows", str(args.rows),
                              "--repeat", str(args.repeat), "--no-save"], cwd=old, capture_output=True, text=True,
                             check=True, env={**os.environ, "PYTHONPATH": str(old)}).stdout
    return [f"{short}) {line[2:]}" for line in out.splitlines() if line.startswith("- compaction")]


if __name__ == "__main__":
    main()
