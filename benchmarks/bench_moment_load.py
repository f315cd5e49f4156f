"""What the video moments' digest check costs the filter column a time filter loads (search/columns.py
Columns._load_moment: `--where "t > 30"`, `--media video`): every moment's row is read with its digested fields and
checked against its digest (rowdigest.holds_shown, BLAKE2 a row in Python) before its t or t_end is used.

    python benchmarks/bench_moment_load.py [--videos 25000] [--moments 4] [--photos 100000] [--rounds 7] [--no-save]

A synthetic catalog written through the catalog module into a real SQLite file, digested and sealed as a writer
writes rows (common.seal_rows): --photos photos and --videos videos of --moments moments each. Timed, alternating in
each round, median of --rounds: the moment column's load as it is (a fresh Columns each round, its files load not
timed), the same load with the digest check left out (rowdigest.holds_shown answering True: what the check adds),
and the check alone over the rows the load reads. The columns' answers are checked equal before anything is timed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import load_note, record, seal_rows

from alignsearch.search.columns import Columns, moment_query
from alignsearch.storage import catalog, rowdigest


def build(db, photos: int, videos: int, moments: int) -> None:
    """Photos in /p, then videos in /v: each `moments` rows, moment m at t = 2m, t_end = 2m + 2."""
    rows = [{"root": "/p", "relpath": f"{i:07d}.jpg", "moment": 0, "t": None, "t_end": None} for i in range(photos)]
    rows += [{"root": "/v", "relpath": f"clip{v:06d}.mp4", "moment": m, "t": 2.0 * m, "t_end": 2.0 * m + 2}
             for v in range(videos) for m in range(moments)]
    with db.begin() as conn:
        for start in range(0, len(rows), 50_000):
            conn.execute(catalog.files.insert(), [
                {"size": 1, "mtime": 0.0, "status": catalog.INDEXED, "indexed_at": 0.0, "vec_row": start + j, **r}
                for j, r in enumerate(rows[start : start + 50_000])])
        seal_rows(conn)  # digested and sealed as a writer writes rows: the load refuses a row off its digest


def moment_rows(db) -> list[tuple]:
    """The rows _load_moment reads (columns.moment_query: id, t, digest, the digested fields), as it reads them."""
    with db.connect() as conn:
        return catalog.driver_rows(conn, moment_query("t"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--videos", type=int, default=25_000)
    ap.add_argument("--moments", type=int, default=4)
    ap.add_argument("--photos", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    load_at_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        db = catalog.connect(Path(tmp) / "catalog.db")
        build(db, args.photos, args.videos, args.moments)

        def load(checked: bool) -> tuple[float, np.ndarray]:
            cols = Columns(db)  # the files load, not timed: the moment column loads on a filter's first ask
            with mock.patch.object(rowdigest, "holds_shown", rowdigest.holds_shown if checked else lambda *a: True):
                start = time.perf_counter()
                out = cols.column("t")
                return time.perf_counter() - start, out

        def check_alone() -> float:
            rows = moment_rows(db)
            start = time.perf_counter()
            assert all(rowdigest.holds_shown(catalog.FILE_DIGESTED, row[3:], row[2]) for row in rows)
            return time.perf_counter() - start

        checked, unchecked = load(True)[1], load(False)[1]
        assert np.array_equal(checked, unchecked, equal_nan=True)
        assert int(np.count_nonzero(~np.isnan(checked))) == args.videos * args.moments
        names = ("moment column load (digests checked, as now)", "moment column load, the check left out",
                 "the digest check alone")
        times: dict[str, list[float]] = {name: [] for name in names}
        for r in range(args.rounds):
            for name in names[:: 1 if r % 2 == 0 else -1]:
                times[name].append(check_alone() if name == names[2] else load(name == names[0])[0])
        db.dispose()
    med = {name: statistics.median(t) * 1000 for name, t in times.items()}
    moments = args.videos * args.moments
    lines = [f"- catalog: {args.photos:,} photos and {args.videos:,} videos of {args.moments} moments ({moments:,} moment "
             f"rows), digested and sealed (common.seal_rows); median of {args.rounds} rounds, alternating",
             *(f"- {name}: {med[name]:.1f} ms" for name in names),
             f"- the check's share of the load: {med[names[2]] / med[names[0]]:.0%}; per moment row "
             f"{med[names[2]] * 1000 / moments:.2f} us",
             load_note(load_at_start)]
    record("Video moments' digest check in the filter column load (bench_moment_load.py)", lines, save=not args.no_save)


if __name__ == "__main__":
    main()
