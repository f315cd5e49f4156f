"""What checking each shown row's name against the catalog's unique index (catalog.check_names), its text's types
(catalog._sound, photos_of) and status, each ANN hit's status (addresses_of, status_known) and, from schema 14,
its shown fields against their digest (rowdigest.py: check_rows, photos_of) costs a search: Engine.search_vector
(no encoding) with catalog.get_files, rows_holding, photos_of and addresses_of, the reads that now carry the
checks, taken from git --base (alignsearch/storage/catalog.py loaded from
git, common.module_at) against this tree's, alternating in one run, on one synthetic index; and get_files with
rows_holding alone for k rows. The engine is this tree's in both columns (the change touches no other module a
search runs).

    python benchmarks/bench_catalog_names.py [--n 100000] [--dim 64] [--searches 200] [--rounds 5] [--base main]
        [--changes 2000]

The base's catalog.py runs with the base's rowdigest.py where it has one (the digest's own code is what a change of
it changes), and beside the search: check_rows alone over k rows read once (the digest check of the rows a search
shows), catalog._change over --changes photos rows (the OCR fill's and captions' write, rolled back each time) and
verify's read of every row against its digest (catalog.off_digest), each base and this tree alternating. A third
column, this tree with every digest taken to hold (rowdigest.holds and holds_shown answer True), is the search less
its digest checks: what they cost a search.

A synthetic index: N random unit vectors (a small --dim, so the catalog's part of a search is not hidden under the
scoring), each file a row with its own content hash and a photos row (a caption, a camera), written straight into the catalog and the vector store
(their digests then written as the upgrade to schema 14 writes them: migrate.digest_rows), then the flat or IVF index
the real build makes (sync_index).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import load_note, module_at, record, seal_rows

import alignsearch
from alignsearch.storage import catalog, migrate, rowdigest, state, vectors
from alignsearch.search.engine import ANN_FILE, DB_FILE
from indexer.build import sync_index

# the reads a search makes that the checks changed; addresses_of reads each ANN hit's status (status_known)
READS = ("get_files", "rows_holding", "photos_of", "addresses_of")


def build(index_dir: Path, n: int, dim: int) -> None:
    index_dir.mkdir()
    x = np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    db = catalog.connect(index_dir / DB_FILE)
    store = vectors.VectorStore(index_dir / "vectors.f16", dim, 0)
    with db.begin() as conn:
        for start in range(0, n, 50_000):
            stop = min(n, start + 50_000)
            first = store.append(x[start:stop])
            conn.execute(catalog.files.insert(), [
                {"id": i + 1, "root": "/synthetic/photos", "relpath": f"{i // 1000:03d}/IMG_{i:07d}.jpg", "size": 1,
                 "mtime": 0.0, "format": "JPEG", "sha256": f"{i:064x}", "status": catalog.INDEXED, "indexed_at": 0.0,
                 "vec_row": first + i - start} for i in range(start, stop)])
            conn.execute(catalog.photos.insert(), [{"file_id": i + 1, "caption": f"photo {i} of the trip", "camera": "Canon"}
                                                   for i in range(start, stop)])
            for chunk in range(start, stop, 65_536):
                vectors.record_chunk(conn, store, 0, chunk, min(65_536, stop - chunk))
        seal_rows(conn)  # digested and sealed as a writer writes rows (schemas 14, 17)
        vectors.save(conn, store)
        state.write(conn, model=state.ModelIdentity(name="synthetic", fingerprint="synthetic", dim=dim))
        state.write(conn, roots=state.RootsState(roots=("/synthetic/photos",)))
    sync_index(db, store, index_dir / ANN_FILE)
    db.dispose()


def use(module) -> None:
    for name in READS:
        setattr(catalog, name, getattr(module, name))


def base_catalog(rev: str):
    """catalog.py at rev, with rev's own rowdigest.py where it has one (module_at loads one file: its catalog would
    digest with this tree's rowdigest otherwise)."""
    old = module_at(rev, "alignsearch/storage/catalog.py", "catalog_old")
    try:
        digests = module_at(rev, "alignsearch/storage/rowdigest.py", "rowdigest_old")
    except subprocess.CalledProcessError:  # before schema 14: no digests to check
        return old
    old.rowdigest = digests
    old.FILE_DIGESTED, old.PHOTO_DIGESTED = digests.FILE_FIELDS, digests.PHOTO_FIELDS  # its digest tells them by identity
    return old


UNCHECKED = "this tree, no digest check"


@contextlib.contextmanager
def unchecked(on: bool):
    """With on, every digest this tree's catalog compares holds (the column of a search less its digest checks)."""
    saved = rowdigest.holds, getattr(rowdigest, "holds_shown", None)
    if on:
        rowdigest.holds = rowdigest.holds_shown = lambda *_: True
    try:
        yield
    finally:
        rowdigest.holds, rowdigest.holds_shown = saved


def median_us(runs: dict, key) -> str:
    return f"{statistics.median(runs[key]):.0f}"


def main() -> None:
    ap = argparse.ArgumentParser(description="the cost of checking shown rows' names")
    for flag, default in (("--n", 100_000), ("--dim", 64), ("--searches", 200), ("--rounds", 5), ("--changes", 2000)):
        ap.add_argument(flag, type=int, default=default)
    ap.add_argument("--base", default="main", help="commit whose catalog.get_files and rows_holding are the baseline")
    ap.add_argument("--no-save", action="store_true")
    args, load_at_start = ap.parse_args(), os.getloadavg()[0]
    new = {name: getattr(catalog, name) for name in READS}
    old = base_catalog(args.base)
    columns = {f"base {args.base}": old, "this tree": type("new", (), new), UNCHECKED: type("new", (), new)}
    whole = {f"base {args.base}": old, "this tree": catalog}  # check_rows, _change, off_digest: each module's own
    search_ms: dict = {}
    read_us: dict = {}
    check_us: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        ix = Path(tmp) / "ix"
        build(ix, args.n, args.dim)
        rng = np.random.default_rng(1)
        queries = rng.standard_normal((args.searches, args.dim)).astype(np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        with alignsearch.open(ix, device="cpu") as engine:
            for k in (10, 100):
                ids = rng.choice(args.n, k, replace=False) + 1
                for name, module in columns.items():
                    use(module)
                    shown = [h.path for h in engine.search_vector(queries[0], k=k)]  # warm: snapshot, columns
                    assert len(shown) == k, (name, len(shown))
                for _ in range(args.rounds):  # alternating, so both share the machine's load
                    for name, module in columns.items():
                        use(module)
                        with unchecked(name == UNCHECKED):
                            start = time.perf_counter()
                            for q in queries:
                                engine.search_vector(q, k=k)
                            search_ms.setdefault((k, name), []).append((time.perf_counter() - start) / len(queries) * 1e3)
                            with engine.db.connect() as conn:
                                start = time.perf_counter()
                                for _ in range(args.searches):
                                    rows = catalog.get_files(conn, ids.tolist())
                                    catalog.rows_holding(conn, ((r.sha256, r.moment) for r in rows.values()))
                                read_us.setdefault((k, name), []).append((time.perf_counter() - start) / args.searches * 1e6)
                                rows = list(new["get_files"](conn, ids.tolist()).values())
                                start = time.perf_counter()
                                for _ in range(args.searches):
                                    whole.get(name, catalog).check_rows(conn, rows)
                                check_us.setdefault((k, name), []).append((time.perf_counter() - start) / args.searches * 1e6)
            use(type("new", (), new))
        change_ms: dict = {}
        if hasattr(catalog, "_change"):
            db = catalog.connect(ix / DB_FILE)
            changed = (rng.choice(args.n, args.changes, replace=False) + 1).tolist()
            with db.connect() as conn:
                for _ in range(args.rounds):
                    for name, module in whole.items():
                        if not hasattr(module, "_change"):
                            continue
                        transaction = conn.begin()
                        start = time.perf_counter()
                        module._change(conn, module.photos, [(i, {"ocr": f"text {i}"}) for i in changed])
                        change_ms.setdefault(name, []).append((time.perf_counter() - start) * 1e3)
                        transaction.rollback()
            db.dispose()
        # the other design: SQLite's integrity check (what verify runs), e.g. once per catalog generation
        integrity_s = []
        for _ in range(3):
            start = time.perf_counter()
            assert catalog.integrity_problems(ix / DB_FILE) == []
            integrity_s.append(time.perf_counter() - start)
        # what verify adds to read every row against its digest (catalog.off_digest; [] on the base's catalog, none)
        digest_s: dict = {}
        if hasattr(catalog, "off_digest"):
            db = catalog.connect(ix / DB_FILE, readonly=True)
            with db.connect() as conn:
                for _ in range(3):
                    for name, module in whole.items():
                        if hasattr(module, "off_digest"):
                            start = time.perf_counter()
                            assert module.off_digest(conn) == []
                            digest_s.setdefault(name, []).append(time.perf_counter() - start)
            db.dispose()
    lines = [f"- {args.n:,} files in a synthetic catalog ({args.dim}-d vectors, each file its own content), "
             "this tree's Engine.search_vector (a random unit vector, no encoding) with catalog.get_files, "
             f"rows_holding, photos_of and addresses_of of {args.base} or of this tree (its own rowdigest.py each), or of "
             "this tree with every digest taken to hold (no digest check); median of "
             f"{args.rounds} alternating rounds, each the mean of {args.searches} searches; then get_files and rows_holding "
             "alone for k random ids, and check_rows alone over those k rows read once (types, status, digest)",
             load_note(load_at_start), "",
             "| k | catalog reads of | ms/search | get_files + rows_holding of k rows, us | check_rows of k rows, us |",
             "|---|---|---|---|---|"]
    for (k, name), runs in search_ms.items():
        lines.append(f"| {k} | {name} | {statistics.median(runs):.2f} | {median_us(read_us, (k, name))} | "
                     f"{median_us(check_us, (k, name))} |")
    lines += ["", f"- the alternative, SQLite's integrity check of this catalog (catalog.integrity_problems, as verify "
              f"runs it), median of 3: {statistics.median(integrity_s) * 1e3:.0f} ms, a reader's price per check (a CLI "
              "query is a new process each time: once per generation would be once per query)"]
    for name, runs in change_ms.items():
        lines.append(f"- catalog._change of {args.changes:,} photos rows' ocr (set_ocr's write, each row's digest with "
                     f"it; rolled back), {name}, median of {args.rounds}: {statistics.median(runs):.0f} ms")
    for name, runs in digest_s.items():
        lines.append(f"- verify's read of every files and photos row against its digest (catalog.off_digest), {name}, "
                     f"median of 3: {statistics.median(runs) * 1e3:.0f} ms for {args.n:,} files")
    record(f"The checks of shown rows and hits (names: catalog.check_names; status: _sound, status_known; digests, "
           f"schema {migrate.LATEST}: rowdigest.py), "
           f"against {args.base}", lines, save=not args.no_save)


if __name__ == "__main__":
    main()
