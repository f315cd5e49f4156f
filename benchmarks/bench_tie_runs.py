"""What asking again wider costs a search when a library holds a run of identical photos (query.margin_spent,
WIDER_MARGIN): a run of copies longer than query.TIE_MARGIN straddling the cut makes the engine ask FAISS (or the
exact path, or the keyword index) again with the margin four times wider until the run ends, and re-rank the whole run
exactly, so that the copies shown are the first by name. Engine.search_vector with the copy's own vector as the query
(the run straddles every cut), unfiltered (the ANN index) and filtered by path "*.jpg" (every allowed vector scored
exactly: Engine._exact/_best_of), widening (now: up to engine.SETTLE_MAX + 1, engine._wider) against no widening
(query.margin_spent always False: the run cut at TIE_MARGIN in the order the copies were indexed, as before 3f11de6..)
and against widening with no bound (_wider without its SETTLE_MAX bound: as merged), alternating in one run, median of
--rounds of the mean per search over --queries searches.

The keyword path widened the same way until b9ba349 (the figures at b9ba349 in RESULTS.md): a folder's word matches
every file of the folder with one bm25 where the files are named alike (photos/beach/IMG_00001.jpg...), so every match
past the keyword limit (KEYWORD_DEPTH) tied with the last one and the margin was spent at each ask. It no longer
widens: matches equal in bm25 are cut in name order in SQL (keywords.TIE_ORDER). --keyword times
Engine.search_vector(vector, k, text=word, mode="keyword" / "hybrid") over such an index with that order by id (as
before) and by name (now), alternating (the vector side from a query vector: no model is loaded, the keyword and
re-rank path is Engine.search's).

    python benchmarks/bench_tie_runs.py [--sizes 20000:20000,100000:20000] [--keyword 20000:10000] [--k 10]
        [--rounds 3] [--queries 3] [--no-save]

--sizes: vectors:copies pairs; the first `copies` stored vectors are made one vector (bench_dupes.synthetic_index's
index otherwise: structured 640-d vectors, below ann.FLAT_BELOW a flat index, from it IVF-PQ). "" leaves that part out.
--keyword: vectors:files pairs; the first `files` files are renamed photos/beach/IMG_<n>.jpg (the others
other/<n>.jpg), their keyword text written by catalog.refresh_keywords (what a writer writes); "" leaves it out.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_dupes
from bench_ann import structured
from bench_dupes import synthetic_index
from common import load_note, per_request_ms, record, seal_rows

import alignsearch
from alignsearch.search import engine as engine_module
from alignsearch.search import query
from alignsearch.storage import keywords
from alignsearch.storage import catalog
from alignsearch.storage.paths import DB_FILE

FOLDER_WORD = "beach"
VARIANTS = ("before", "unbounded", "now")


def copies_index(folder: Path, n: int, copies: int) -> np.ndarray:
    """synthetic_index's index of n vectors with its first `copies` rows one vector (its last n // 100 are still made
    near copies of others, synthetic_index's planted pairs); that vector."""
    copy = bench_dupes.structured(1, seed=n)[0]

    def with_copies(rows: int, seed: int) -> np.ndarray:
        block = structured(rows, seed=seed)
        block[: max(0, copies - seed)] = copy  # seed: the block's first row
        return block

    bench_dupes.structured = with_copies
    try:
        synthetic_index(folder, n)
    finally:
        bench_dupes.structured = structured
    return (copy / np.linalg.norm(copy)).astype(np.float32)


def folder_word_index(folder: Path, n: int, files: int) -> np.ndarray:
    """synthetic_index's index of n vectors with its first `files` files renamed photos/beach/IMG_<n>.jpg (the
    others other/<n>.jpg): FOLDER_WORD matches each of them with one bm25, their keyword text being as long and as
    alike. The rows sealed again and the keyword index written by catalog.refresh_keywords, as a writer writes them;
    a query vector (unit) that is none of the stored ones."""
    synthetic_index(folder, n)
    db = catalog.connect(folder / DB_FILE)
    with db.begin() as conn:
        conn.exec_driver_sql("UPDATE files SET relpath = CASE WHEN vec_row < ? THEN printf('photos/beach/IMG_%05d.jpg', "
                             "vec_row + 1) ELSE printf('other/%07d.jpg', vec_row) END", (files,))
        seal_rows(conn)
        catalog.refresh_keywords(conn)
    db.dispose()
    vector = structured(1, seed=n + 1)[0]
    return (vector / np.linalg.norm(vector)).astype(np.float32)


def as_variant(label: str, spent, wider) -> None:
    """Patch the engine to a variant: before (margin_spent always False), unbounded (_wider without its bound), now."""
    query.margin_spent = (lambda *a: False) if label == "before" else spent
    engine_module._wider = (lambda m: m * query.WIDER_MARGIN) if label == "unbounded" else wider


def alternated(search, rounds: int, queries: int, spent, wider, note=lambda hits: hits[0].relpath
               ) -> tuple[list[float], dict[str, str]]:
    """Median ms a search (mean over `queries`, median of `rounds`) for each of VARIANTS, alternating in each round,
    and each variant's note on its hits (their first path); search() -> hits."""
    samples, first = {label: [] for label in VARIANTS}, {}
    for _ in range(rounds):
        for label in VARIANTS:
            as_variant(label, spent, wider)
            first[label] = note(search())
            samples[label].append(per_request_ms(search, queries))
    return [statistics.median(samples[label]) for label in VARIANTS], first


def copies_part(args, spent, wider) -> list[str]:
    lines = [f"- Engine.search_vector(copy, k={args.k}) on bench_dupes.synthetic_index's 640-d vectors with the first "
             f"`copies` made one vector, the query that vector; mean ms a search over {args.queries}, median of "
             f"{args.rounds} rounds; before: no widening (margin_spent always False: the run cut at TIE_MARGIN in "
             "index order), unbounded: widened (WIDER_MARGIN) until the run ends, now: widened up to SETTLE_MAX + 1 "
             "(engine._wider), alternating; first: the results' first path",
             "", "| vectors | copies | index | path | before: no widening (ms) | unbounded (ms) | now: bounded (ms) | "
             "now / before | first before | first unbounded | first now |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for size in filter(None, args.sizes.split(",")):
        n, copies = (int(v) for v in size.split(":"))
        with tempfile.TemporaryDirectory() as tmp:
            copy = copies_index(Path(tmp) / "ix", n, copies)
            with alignsearch.open(Path(tmp) / "ix") as engine:
                kind = engine.info()["index"]["type"]
                for path in (None, "*.jpg"):
                    (b, u, a), first = alternated(lambda: engine.search_vector(copy, k=args.k, path=path),
                                                  args.rounds, args.queries, spent, wider)
                    lines.append(f"| {n:,} | {copies:,} | {kind} | {path or 'ANN'} | {b:.1f} | {u:.1f} | {a:.1f} | "
                                 f"{a / b:.2f} | {first['before']} | {first['unbounded']} | {first['now']} |")
    return lines


def keyword_part(args) -> list[str]:
    lines = [f"- Engine.search_vector(vector, k={args.k}, text=\"{FOLDER_WORD}\", mode=keyword / hybrid) on "
             "bench_dupes.synthetic_index's 640-d vectors, the first `files` files renamed photos/beach/IMG_<n>.jpg "
             "(one bm25 each for the folder's word), the others other/<n>.jpg, keyword text by "
             "catalog.refresh_keywords; the query vector none of the stored ones (no model loaded); mean ms a search "
             f"over {args.queries}, median of {args.rounds} rounds; by id: matches equal in bm25 ordered by id in SQL "
             "(keywords.TIE_ORDER \"h.id\", as before), by name: by the shown path (now; by root and relpath at 3ca4411); the limit's margin asked "
             "once in both (the widening measured above at b9ba349 was taken out), alternating; first: the results' "
             "first path (in brackets: the keyword matches the search kept, each re-ranked exactly)",
             "", "| vectors | files with the word | index | mode | by id (ms) | by name (ms) | by name / by id | "
             "first by id | first by name |", "|---|---|---|---|---|---|---|---|---|"]
    order = keywords.TIE_ORDER
    for size in filter(None, args.keyword.split(",")):
        n, files = (int(v) for v in size.split(":"))
        with tempfile.TemporaryDirectory() as tmp:
            vector = folder_word_index(Path(tmp) / "ix", n, files)
            with alignsearch.open(Path(tmp) / "ix") as engine:
                kind, matches, kept = engine.info()["index"]["type"], engine._keyword_matches, []

                def counted(*a, **kw):  # how many keyword matches a search kept (re-ranked exactly)
                    found = matches(*a, **kw)
                    kept.append(len(found))
                    return found

                engine._keyword_matches = counted
                for mode in ("keyword", "hybrid"):
                    samples, first = {"h.id": [], order: []}, {}
                    try:
                        for _ in range(args.rounds):
                            for variant in samples:
                                keywords.TIE_ORDER = variant
                                hits = engine.search_vector(vector, k=args.k, text=FOLDER_WORD, mode=mode)
                                first[variant] = f"{hits[0].relpath} ({kept[-1]:,})"
                                samples[variant].append(per_request_ms(
                                    lambda: engine.search_vector(vector, k=args.k, text=FOLDER_WORD, mode=mode),
                                    args.queries))
                    finally:
                        keywords.TIE_ORDER = order
                    b, a = statistics.median(samples["h.id"]), statistics.median(samples[order])
                    lines.append(f"| {n:,} | {files:,} | {kind} | {mode} | {b:.1f} | {a:.1f} | {a / b:.2f} | "
                                 f"{first['h.id']} | {first[order]} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description="the cost of widening the tie margin over a run of copies")
    ap.add_argument("--sizes", default="20000:20000,100000:20000")
    ap.add_argument("--keyword", default="20000:10000")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--queries", type=int, default=3)
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    load_at_start = os.getloadavg()[0]
    spent, wider = query.margin_spent, engine_module._wider
    try:
        if args.sizes:
            lines = copies_part(args, spent, wider)
            record("Widening the tie margin over a run of identical photos, against no widening",
                   lines[:1] + [load_note(load_at_start)] + lines[1:], save=not args.no_save)
            load_at_start = os.getloadavg()[0]
        if args.keyword:
            lines = keyword_part(args)
            record("The keyword limit's cut over a folder's word: matches equal in bm25 by name, against by id",
                   lines[:1] + [load_note(load_at_start)] + lines[1:], save=not args.no_save)
    finally:
        query.margin_spent, engine_module._wider = spent, wider


if __name__ == "__main__":
    main()
