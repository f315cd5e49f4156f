"""The default mode's keyword list (keywords.search with evidence_only, as engine._keyword_matches calls it in auto) on
many matching files: the evidence check (caption, text in the image, tags hold the query) run by SQLite on every
match before the limit (the baseline, --base) against the check in rank order until the limit is filled (now), in
the same run, on the same catalog and queries.

    python benchmarks/bench_keyword_evidence.py [--files 20000] [--repeat 5] [--base main] [--no-record]

The catalog is built in code (catalog.upsert_file, catalog.set_photo: the code an index run uses): every file's name
holds two of 64 query words (`trip/<w1>_<w2>_<n>.jpg`); each file has a caption of plain words that none of the
query's words is in, except every `--every`th file, whose caption holds one; a third of the files have no caption.
Queries (the text as typed in the default mode, limit KEYWORD_DEPTH 100 as engine._keyword_matches asks):
- 64 words: all 64 query words (every file matches; the captioned ones that hold a word are the evidence, fewer
  than the limit: every captioned match is checked, now as before);
- 63 words and a caption word: `street`, in most captions, for the first (every file matches, most captioned ones
  hold evidence: now the check stops once the limit is filled);
- 1 word: one of them (1/32 of the files match).
Each query's results are compared between the two (they must be equal), then timed; the two take turns.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import keyword_catalog, keyword_query_words, load_note, module_at, record

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=20000)
    ap.add_argument("--every", type=int, default=200, help="every Nth file's caption holds a query word")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--base", default="main")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    load0 = os.getloadavg()[0]
    from alignsearch.search.engine import KEYWORD_DEPTH
    from alignsearch.storage import catalog, keywords

    old = module_at(args.base, "alignsearch/storage/keywords.py", "keywords_base")
    words = keyword_query_words()
    with tempfile.TemporaryDirectory(prefix="bench-keyword-evidence-") as where:
        tmp = Path(where)
        t = time.perf_counter()
        keyword_catalog(tmp / "catalog.db", args.files, args.every, random.Random(0))
        built = time.perf_counter() - t
        db = catalog.connect(tmp / "catalog.db", readonly=True)
        lines = [f"- {args.files} files, each named with 2 of 64 query words; captions on 2/3 of them, a query word in "
                 f"every {args.every}th file's caption; built in code in {built:.0f} s; limit {KEYWORD_DEPTH} "
                 f"(KEYWORD_DEPTH), {args.repeat} runs each, alternating; baseline: keywords.py at {args.base}", "",
                 "| query | matches | kept | median s base | median s now |", "|---|---|---|---|---|"]
        with db.connect() as conn:
            for name, text in (("64 words", " ".join(words)), ("63 words and a caption word", " ".join(words[1:]) + " street"),
                               ("1 word", words[0])):
                matches = len(keywords.search(conn, keywords.parse(text, partial_last=True), 10**9))
                times: dict[str, list[float]] = {"base": [], "now": []}
                results = {}
                for _ in range(args.repeat):
                    for label, kw in (("base", old), ("now", keywords)):
                        t = time.perf_counter()
                        results[label] = kw.search(conn, kw.parse(text, partial_last=True), KEYWORD_DEPTH,
                                                   evidence_only=True)
                        times[label].append(time.perf_counter() - t)
                assert results["base"] == results["now"], name  # the same results, in the same order
                lines.append(f"| {name} | {matches} | {len(results['now'])} | {statistics.median(times['base']):.3f} | "
                             f"{statistics.median(times['now']):.3f} |")
                print(lines[-1], flush=True)
        db.dispose()
        lines.append(load_note(load0))
        record("Default mode's keyword list: evidence checked lazily in rank order (bench_keyword_evidence)", lines,
               save=not args.no_record)


if __name__ == "__main__":
    main()
