"""What a search costs on an index of long videos, for the rows that show each hit's file (onefile.py): each hit's
other rows of one content are read with the ranked rows. All moments of a video hold the video's sha256, so reading
by hash read every moment of each video among the hits. Engine.search_vector (a random unit vector, no encoding)
with the engine.py and catalog.py of git --base (common.module_at) against this tree's, alternating in one run, on a
synthetic index (tests/helpers.video_moments_index) whose rows are the moments of `--videos` videos of `--moments` each.

    python benchmarks/bench_onefile_video.py [--videos 10] [--moments 3600] [--searches 20] [--rounds 5] [--base e5853c7]
        [--sha256-only]   # also this tree on schema 9's index on sha256 alone
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from common import load_note, module_at, record
from helpers import video_moments_index

import numpy as np
from alignsearch.search import engine as engine_new


def options() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="a search's cost on long videos, for the rows that show its files")
    for flag, default in (("--videos", 10), ("--moments", 3600), ("--searches", 20), ("--rounds", 5)):
        ap.add_argument(flag, type=int, default=default)
    ap.add_argument("--base", default="e5853c7", help="commit whose engine.py and catalog.py are the baseline")
    ap.add_argument("--sha256-only", action="store_true",
                    help="also this tree on a copy of the index whose files_sha256 is on sha256 alone (schema 9's)")
    ap.add_argument("--no-save", action="store_true")
    return ap.parse_args()


def main() -> None:
    args, load_at_start = options(), os.getloadavg()[0]
    old_catalog = module_at(args.base, "alignsearch/storage/catalog.py", "catalog_old")
    old_engine = module_at(args.base, "alignsearch/search/engine.py", "engine_old")
    old_engine.catalog = old_catalog  # the base's search with the base's catalog reads
    modules = {f"base {args.base}": old_engine, "this tree": engine_new}
    results, counts = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        ix = video_moments_index(Path(tmp) / "ix", args.videos, args.moments)
        engines = {name: m.Engine(ix, device="cpu") for name, m in modules.items()}
        if args.sha256_only:  # schema 9's index, to tell what migrate step 10's (sha256, moment) index saves
            old_ix = Path(shutil.copytree(ix, Path(tmp) / "ix-sha256"))
            with sqlite3.connect(old_ix / "catalog.db") as conn:
                conn.execute("DROP INDEX files_sha256")
                conn.execute("CREATE INDEX files_sha256 ON files (sha256)")
            conn.close()
            engines = {f"base {args.base}": engines[f"base {args.base}"],
                       "this tree, files_sha256 on (sha256)": engine_new.Engine(old_ix, device="cpu"),
                       "this tree": engines["this tree"]}
        dim = int(engines["this tree"].snapshot().store.dim)
        queries = np.random.default_rng(1).standard_normal((args.searches, dim)).astype(np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        for k in (10, 100):
            for name, engine in engines.items():
                hits = engine.search_vector(queries[0], k=k)  # warm: snapshot, columns
                counts[(k, name)] = (len(hits), len({h.path for h in hits}))
                results[(k, name)] = []
            for _ in range(args.rounds):  # alternating, so both share the machine's load
                for name, engine in engines.items():
                    start = time.perf_counter()
                    for q in queries:
                        engine.search_vector(q, k=k)
                    results[(k, name)].append((time.perf_counter() - start) / len(queries) * 1e3)
        for engine in engines.values():
            engine.close()
    lines = [f"- synthetic index: {args.videos} videos x {args.moments} moments ({args.videos * args.moments} rows, "
             f"dim 32, the writer's ANN index); Engine.search_vector (a random unit vector, no encoding, default per-video cap); median "
             f"of {args.rounds} alternating rounds, each the mean of {args.searches} searches", "",
             "| k | engine.py + catalog.py | ms/search | hits (distinct videos) |", "|---|---|---|---|"]
    for (k, name), runs in results.items():
        n, distinct = counts[(k, name)]
        lines.append(f"| {k} | {name} | {statistics.median(runs):.2f} | {n} ({distinct}) |")
    lines += ["", load_note(load_at_start)]
    record("search on long videos: reading the rows of each hit's content (bench_onefile_video.py)", lines,
           save=not args.no_save)


if __name__ == "__main__":
    main()
