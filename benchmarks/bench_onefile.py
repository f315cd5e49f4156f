"""What keying each hit by its file costs a search (alignsearch/search/onefile.py): Engine.search_vector (no
encoding: the part the change touches) with the engine module of git --base (alignsearch/search/engine.py loaded
from git, common.module_at) against this tree's, alternating in one run, on two tiny-model indexes of the same
photos: each photo named once (a folder), and each named twice (the folder and a CSV list naming every photo, so
every hit's content is shared and its links are resolved: the worst case).

    python benchmarks/bench_onefile.py [--images 300] [--searches 200] [--rounds 5] [--base e429b06] [--no-save]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import load_note, module_at, record, tiny_photos

import numpy as np

from alignsearch.search import engine as engine_new


def indexes(base: Path, images: int) -> tuple[Path, Path]:
    """(once, twice): `images` small pictures in a folder indexed by the tiny test model; the second index holds
    the folder and a CSV list naming each of its pictures."""
    from indexer.job import index_folders

    corpus = base / "corpus"
    model = tiny_photos(corpus, images)
    listed = base / "all.csv"
    listed.write_text("path\n" + "".join(f"{p}\n" for p in sorted(corpus.iterdir())))
    index_folders([corpus], base / "once", model=str(model), device="cpu", workers=0)
    index_folders([corpus], base / "twice", model=str(model), device="cpu", workers=0)
    index_folders([listed], base / "twice", model=str(model), device="cpu", workers=0)
    return base / "once", base / "twice"


def per_search_ms(engine, queries: np.ndarray, k: int) -> float:
    start = time.perf_counter()
    for q in queries:
        engine.search_vector(q, k=k)
    return (time.perf_counter() - start) / len(queries) * 1e3


def options() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="the cost of one entry per file to a search")
    for flag, default in (("--images", 300), ("--searches", 200), ("--rounds", 5)):
        ap.add_argument(flag, type=int, default=default)
    ap.add_argument("--base", default="e429b06", help="commit whose alignsearch/search/engine.py is the baseline")
    ap.add_argument("--no-save", action="store_true")
    return ap.parse_args()


def main() -> None:
    args, load_at_start = options(), os.getloadavg()[0]
    modules = {f"base {args.base}": module_at(args.base, "alignsearch/search/engine.py", "engine_old"),
               "this tree": engine_new}
    results, counts = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        once, twice = indexes(Path(tmp), args.images)
        for label, ix in (("once", once), ("twice", twice)):
            engines = {name: m.Engine(ix, device="cpu") for name, m in modules.items()}
            dim = int(engines["this tree"].snapshot().store.dim)
            rng = np.random.default_rng(1)
            queries = rng.standard_normal((args.searches, dim)).astype(np.float32)
            queries /= np.linalg.norm(queries, axis=1, keepdims=True)
            for k in (10, 100):
                for name, engine in engines.items():
                    hits = engine.search_vector(queries[0], k=k)  # warm: snapshot, columns
                    counts[(label, k, name)] = (len(hits), len({h.path for h in hits}))
                    results[(label, k, name)] = []
                for _ in range(args.rounds):  # alternating, so both share the machine's load
                    for name, engine in engines.items():
                        results[(label, k, name)].append(per_search_ms(engine, queries, k))
            for engine in engines.values():
                engine.close()
    lines = [f"- tiny model, {args.images} photos, flat index; Engine.search_vector (a random unit vector, no "
             f"encoding); median of {args.rounds} alternating rounds, each the mean of {args.searches} searches. "
             "'twice': the folder and a CSV list naming each photo (every hit's content shared: links resolved for "
             "each, plus one query for the rows to show)", "",
             "| index | k | engine.py | ms/search | hits (distinct paths) |", "|---|---|---|---|---|"]
    for (label, k, name), runs in results.items():
        n, distinct = counts[(label, k, name)]
        lines.append(f"| {label} | {k} | {name} | {statistics.median(runs):.3f} | {n} ({distinct}) |")
    lines += ["", load_note(load_at_start)]
    record("search: the cost of one entry per file (bench_onefile.py)", lines, save=not args.no_save)


if __name__ == "__main__":
    main()
