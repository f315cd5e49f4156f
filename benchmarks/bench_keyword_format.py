"""What dropping format characters (zero-width spaces and joiners, the BOM, the soft hyphen: keywords.narrow) costs a
keyword query and the text an index run writes: keywords.py at --base against this tree's, in the same run, on the
same catalog and texts.

    python benchmarks/bench_keyword_format.py [--files 20000] [--repeat 9] [--base main] [--no-record]

The catalog is common.keyword_catalog's, built by this tree: every file's name holds two of 64 query words and its
number (`trip/<w1>_<w2>_<n>.jpg`: the number is a code, found in the trigram index too), two thirds have a caption of
plain words, every 200th with a query word. No text holds a format character, so the two must answer alike
(checked): what is timed is the rule's price on ordinary text.
Timed, base and now taking turns (and taking turns going first), each figure the mean of the calls made in about
SAMPLE_S, the table the median of --repeat such figures:
- a keyword-mode query (keywords.parse then keywords.search, limit 100): one word, four words, a code, 64 words;
- the default mode's keyword list (parse with the last word a start, search with evidence_only: the match check folds
  each candidate's text, keywords._fold, narrow included), the same queries;
- the parse alone (the query side's own work, which the rule adds to; SQLite's search left out), the same queries;
- the text an index run writes for a file (keywords.spaced and keywords.coded_chunks of catalog.keyword_text), over
  every file's text;
- verify's scan of the keyword rows (keywords.holds_format of each file's text as a writer stores it: names the rows
  an older writer left holding such characters; its pattern cached, made in the untimed first call);
- narrow's table, made once a process on its first use (keywords._narrowing, uncached; since schema 16
  keywords._scanned, which also lists the marks a word holds).
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

LIMIT = 100


SAMPLE_S = 0.05  # each timing is of as many calls as take about this long: one call of ~1 ms was cut by other
# sessions' processes on the 2 cores (samples of 1.2 ms and of 5 to 9 ms in one run), and 25 such moved a median by 50%


def timed(fn, repeat: int, modules: dict) -> dict[str, list[float]]:
    """{label: [seconds a call]} of fn(module) for each module, taking turns (and turns going first), each figure the
    mean of the calls made in about SAMPLE_S; fn's answers must be equal."""
    times: dict[str, list[float]] = {label: [] for label in modules}
    took = []
    for kw in modules.values():  # once untimed: the first call of a process makes narrow's table (timed on its own)
        t = time.perf_counter()
        fn(kw)
        took.append(time.perf_counter() - t)
    calls = max(1, round(SAMPLE_S / min(took)))
    for n in range(repeat):
        answers = {}
        # which goes first alternates too: always second, "now" was 23% slower on a one-word query in two runs
        # (RESULTS.md, dba006f and 5c224f1), where timeit's best of 7 x 50 put the two within 1% either way round
        for label, kw in (list(modules.items()) if n % 2 == 0 else list(modules.items())[::-1]):
            t = time.perf_counter()
            for _ in range(calls):
                answers[label] = fn(kw)
            times[label].append((time.perf_counter() - t) / calls)
        first, *rest = answers.values()
        assert all(a == first for a in rest), "the two answered differently"
    return times


def row(name: str, times: dict[str, list[float]], scale: float, unit: str) -> str:
    base, now = statistics.median(times["base"]) * scale, statistics.median(times["now"]) * scale
    return f"| {name} | {base:.3f} | {now:.3f} | {(now / base - 1) * 100:+.1f}% | {unit} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=20000)
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--base", default="main")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    load0 = os.getloadavg()[0]
    from alignsearch.storage import catalog, keywords

    modules = {"base": module_at(args.base, "alignsearch/storage/keywords.py", "keywords_base"), "now": keywords}
    words = keyword_query_words()
    queries = [("1 word", words[0]), ("4 words", " ".join(words[:4])), ("a code", "4100"),
               ("64 words", " ".join(words))]
    with tempfile.TemporaryDirectory(prefix="bench-keyword-format-") as where:
        t = time.perf_counter()
        keyword_catalog(Path(where) / "catalog.db", args.files, 200, random.Random(0))
        built = time.perf_counter() - t
        lines = [f"- {args.files} files named with 2 of 64 query words and a number, captions on 2/3 (a query word in every "
                 f"200th), built in code (common.keyword_catalog) in {built:.0f} s; limit {LIMIT}; {args.repeat} runs each, base "
                 f"and now alternating; baseline: keywords.py at {args.base}; answers checked equal", "",
                 "| what | median base | median now | change | unit |", "|---|---|---|---|---|"]
        db = catalog.connect(Path(where) / "catalog.db", readonly=True)
        with db.connect() as conn:
            # what an index run writes for each file (catalog.keyword_text), for the write side below
            texts = [catalog.keyword_text(relpath, caption) for relpath, caption in conn.exec_driver_sql(
                "SELECT f.relpath, p.caption FROM files f LEFT JOIN photos p ON p.file_id = f.id")]
            for name, text in queries:
                for mode, partial, evidence in (("keyword mode", False, False), ("default mode's list", True, True)):
                    def query(kw, text=text, partial=partial, evidence=evidence):
                        return kw.search(conn, kw.parse(text, partial_last=partial), LIMIT, evidence_only=evidence)

                    lines.append(row(f"{mode}: {name}", timed(query, args.repeat, modules), 1000, "ms a query"))
                    print(lines[-1], flush=True)

                def parse(kw, text=text):  # the query side's own work, without SQLite's
                    return [a.fts() for a in kw.parse(text, partial_last=True).positive()]

                lines.append(row(f"parse alone: {name}", timed(parse, args.repeat, modules), 1e6, "µs a parse"))
                print(lines[-1], flush=True)
        db.dispose()

        def write_side(kw):
            return [(kw.spaced(x), kw.coded_chunks(x)) for x in texts]

        lines.append(row(f"write side: spaced + coded_chunks of {len(texts)} files' text",
                         timed(write_side, args.repeat, modules), 1e6 / len(texts), "µs a file"))
        print(lines[-1], flush=True)
        bodies = [keywords.spaced(x) for x in texts]  # the rows as a writer stores them, which verify reads

        def verify_scan(kw):
            return [kw.holds_format(b) for b in bodies]

        lines.append(row(f"verify's scan: holds_format of {len(bodies)} keyword rows",
                         timed(verify_scan, args.repeat, modules), 1e6 / len(bodies), "µs a row"))
        print(lines[-1], flush=True)
        # since schema 16 one scan makes narrow's table and the marks a word holds (keywords._scanned)
        lines.append(row("narrow's table, made on first use",
                         timed(lambda kw: len(getattr(kw, "_scanned", kw._narrowing).__wrapped__()) > 0,
                               args.repeat, modules), 1000, "ms once a process"))
        print(lines[-1], flush=True)
    lines.append(load_note(load0))
    record("Keyword search without format characters (zero-width): its price on ordinary text (bench_keyword_format)",
           lines, save=not args.no_record)


if __name__ == "__main__":
    main()
