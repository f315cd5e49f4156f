"""The live (file id, vector row) pairs of a large catalog, less the files gone in a run: catalog.live_pairs.

    python benchmarks/bench_live_pairs.py [--n 500000] [--gone 0.01] [--runs 7] [--seals-only] [--save]

A synthetic catalog of N rows written through the catalog module into a real SQLite file: photos in two
roots, and one row in a hundred a moment of a 4-moment video. A fraction `gone` of the photos and videos
(one moment named per video, as a run's `removed` does) is left out, as an `index` run does to build its
ANN index while the gone files' deletion waits for the commit. Timed, median of --runs each (all taken in
turn each round), same file:
- before: 5d7a6db's indexer/job.py `_live_without` (with_moments in chunks of 500 ids, then every live pair
  iterated in Python and filtered against a set), reproduced here verbatim but for the name of the iterator;
- after: catalog.live_pairs(conn, without_ids=...), the filter in SQL (ids as one JSON array);
- the unfiltered pairs, as seven call sites built them before (np.array(list(live_vectors))) and now;
- the pairs outside one root, as `forget` built them before (np.array over SQLAlchemy's Row objects) and now;
- each of the three calls with main 414cdc3's live_pairs (catalog.py loaded from git beside the current one): the
  cost of reading each address's seal beside it and checking it in numpy (schema 17; rows sealed as writers do);
  --seals-only times these six alone (more runs in the time the slow baselines above take).
All answers are checked equal before anything is timed.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import load_note, module_at, record, seal_rows
from sqlalchemy import select

from alignsearch.storage import catalog

MOMENTS = 4  # per video


def build(db, n: int) -> None:
    """n rows: photos in /a and /b, and every 100th group of MOMENTS rows one video's moments in /v."""
    rows, i = [], 0
    while i < n:
        if (i // MOMENTS) % 100 == 99 and i + MOMENTS <= n:
            rows += [{"root": "/v", "relpath": f"clip{i}.mp4", "moment": m, "t": 2.0 * m, "vec_row": i + m}
                     for m in range(MOMENTS)]
            i += MOMENTS
        else:
            rows.append({"root": "/a" if i % 2 else "/b", "relpath": f"{i:07d}.jpg", "moment": 0, "t": None, "vec_row": i})
            i += 1
    with db.begin() as conn:
        for start in range(0, len(rows), 50_000):
            conn.execute(catalog.files.insert(), [{"size": 1, "mtime": 0.0, "status": catalog.INDEXED, "indexed_at": 0.0,
                                                   **r} for r in rows[start : start + 50_000]])
        seal_rows(conn)  # digested and sealed as a writer writes rows (schemas 14, 17): live_pairs checks the seals


def gone_ids(db, fraction: float, seed: int = 0) -> list[int]:
    """A run's removed ids: a sample of the files, a video named by one of its moments."""
    with db.connect() as conn:
        ids = [i for (i,) in conn.execute(select(catalog.files.c.id).where(catalog.files.c.moment == 0))]
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(ids, size=int(len(ids) * fraction), replace=False).tolist())


def _live_vectors(conn):
    """5d7a6db's catalog.live_vectors."""
    files = catalog.files
    query = select(files.c.id, files.c.vec_row).where(files.c.status == catalog.INDEXED).order_by(files.c.id)
    for file_id, vec_row in conn.execute(query):
        yield file_id, vec_row


def _with_moments(conn, ids):
    """5d7a6db's catalog.with_moments."""
    ids = sorted({int(i) for i in ids})
    out = set(ids)
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        sql = (f"SELECT o.id FROM files f JOIN files o ON o.root = f.root AND o.relpath = f.relpath "
               f"WHERE f.id IN ({','.join('?' * len(chunk))}) AND (f.t IS NOT NULL OR o.t IS NOT NULL)")
        out.update(i for (i,) in conn.exec_driver_sql(sql, tuple(chunk)))
    return sorted(out)


def live_without_before(db, ids):
    """5d7a6db's indexer/job.py _live_without."""
    with db.connect() as conn:
        gone = set(_with_moments(conn, ids))
        return np.array([p for p in _live_vectors(conn) if p[0] not in gone], dtype=np.int64).reshape(-1, 2)


def live_without_after(db, ids):
    with db.connect() as conn:
        return catalog.live_pairs(conn, without_ids=ids)


def outside_before(db, root):
    """5d7a6db's indexer/roots.py _live_outside (`forget`): np.array over the Row objects."""
    files = catalog.files
    with db.connect() as conn:
        rows = conn.execute(select(files.c.id, files.c.vec_row).where(files.c.status == catalog.INDEXED,
                                                                       files.c.root != root).order_by(files.c.id)).all()
        return np.array(rows, dtype=np.int64).reshape(-1, 2)


def outside_after(db, root):
    with db.connect() as conn:
        return catalog.live_pairs(conn, without_root=root)


def all_before(db):
    with db.connect() as conn:
        return np.array(list(_live_vectors(conn)), dtype=np.int64).reshape(-1, 2)


def live_pairs_now(db, **filters):
    with db.connect() as conn:
        return catalog.live_pairs(conn, **filters)


def all_after(db):
    with db.connect() as conn:
        return catalog.live_pairs(conn)


UNSEALED = "414cdc3"  # main before live_pairs checked seals: the baseline


@functools.cache
def _unsealed_catalog():
    """catalog.py at UNSEALED, loaded once (not inside a timing)."""
    return module_at(UNSEALED, "alignsearch/storage/catalog.py", "catalog_unsealed")


def unsealed(db, **filters):
    with db.connect() as conn:
        return _unsealed_catalog().live_pairs(conn, **filters)


def median_seconds(fns: dict, runs: int) -> dict:
    """{name: median seconds}, the functions taken in turn each round (a busy machine slows them alike)."""
    times: dict = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=500_000)
    ap.add_argument("--gone", type=float, default=0.01)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--seals-only", action="store_true", help="time only live_pairs now against UNSEALED's")
    ap.add_argument("--save", action="store_true", help="append the figures to RESULTS.md")
    args = ap.parse_args()
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        db = catalog.connect(Path(tmp) / "catalog.db")
        build(db, args.n)
        gone = gone_ids(db, args.gone)
        before, after = live_without_before(db, gone), live_without_after(db, gone)
        assert np.array_equal(before, after), "the two answers differ"
        assert np.array_equal(all_before(db), all_after(db))
        assert np.array_equal(outside_before(db, "/v"), outside_after(db, "/v"))
        for filters in ({}, {"without_ids": gone}, {"without_root": "/v"}):
            assert np.array_equal(unsealed(db, **filters), live_pairs_now(db, **filters))
        left_out = args.n - len(after)
        timed = {
            "without gone ids, before (Python filter)": lambda: live_without_before(db, gone),
            "without gone ids, after (live_pairs, SQL)": lambda: live_without_after(db, gone),
            "all pairs, before (np.array(list(live_vectors)))": lambda: all_before(db),
            "all pairs, after (live_pairs)": lambda: all_after(db),
            "without a root, before (forget's np.array over Rows)": lambda: outside_before(db, "/v"),
            "without a root, after (live_pairs)": lambda: outside_after(db, "/v"),
            f"all pairs, live_pairs at {UNSEALED} (no seal read)": lambda: unsealed(db),
            "all pairs, live_pairs now (seals read and checked)": lambda: live_pairs_now(db),
            f"without gone ids, live_pairs at {UNSEALED} (no seal read)": lambda: unsealed(db, without_ids=gone),
            "without gone ids, live_pairs now (seals checked)": lambda: live_pairs_now(db, without_ids=gone),
            f"without a root, live_pairs at {UNSEALED} (no seal read)": lambda: unsealed(db, without_root="/v"),
            "without a root, live_pairs now (seals checked)": lambda: live_pairs_now(db, without_root="/v"),
        }
        if args.seals_only:
            timed = {what: fn for what, fn in timed.items() if "live_pairs at" in what or "live_pairs now" in what}
        figures = median_seconds(timed, args.runs)
        db.dispose()
    lines = [load_note(load), f"- catalog: {args.n:,} rows (1 in 100 a moment of a {MOMENTS}-moment video), {len(gone):,} gone ids "
             f"({left_out:,} rows left out with their videos' moments); median of {args.runs} runs each, taken in turn", "",
             "| pairs | median |", "|---|---|"]
    lines += [f"| {what} | {seconds * 1000:.0f} ms |" for what, seconds in figures.items()]
    record("catalog.live_pairs: the live pairs less a run's gone files, filtered in SQL", lines, save=args.save)


if __name__ == "__main__":
    main()
