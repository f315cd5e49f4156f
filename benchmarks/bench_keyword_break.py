"""Keyword relevance with a file's parts joined by keywords.BREAK (now) against a plain space (before 78ea7a9, the
baseline), in the same run, on the same files and queries.

    python benchmarks/bench_keyword_break.py [--files 1500] [--seed 0] [--no-record]

The text is real: benchmarks/data/coco_captions_1500.tsv.gz holds five captions that people wrote for each of
1,500 COCO val2017 photos (Chen et al. 2015, captions_val2017.json, the COCO Consortium's annotations under CC BY
4.0; a sample of the 5,000 with random.Random(0), each photo's first five captions by annotation id, written
independently of alignsearch). Each photo is one file of a catalog made through
catalog.upsert_file and catalog.set_photo (the code an index run uses), with the parts keyword_text joins:

- caption: the photo's caption #0;
- text found in the image (OCR): on a third of the files, 2 to 5 words cut from another photo's caption #0 (a
  sign's words, unrelated to the picture: no OCR of these photos exists);
- name words: folder and file name (`holiday/2011 summer/000000000139.jpg`), folders from a fixed list;
- tags: on two thirds of the files, up to two words of caption #1 that caption #0 lacks, each a tag.

The baseline's keyword text is written by catalog.keyword_text as it was at 78ea7a9^ (common.module_at), the same
rows as the new one otherwise; its auto-mode evidence is keywords.evidence as it was there.

Relevance: known-item. A query is made from one of the photo's captions #2-#4, which no part holds, so what
people wrote about the photo decides which file is right, not either join: the relevant file is that photo's,
whatever else matches. Classes (a photo gives at most one query of each):
- words: up to four words of caption #2 (keywords.words: no common words), bare (any of them; bm25 ranks);
- phrase: the first two adjacent words of caption #3 that are both no common word, quoted;
- prefix: two words of caption #4, the second cut to its first 4 letters and `*`;
- spread: one word only in the caption and one only in a tag of the file (words that are in two parts), bare;
- boundary phrase: the caption's last word and the next part's first word, quoted: the pair the old join made
  adjacent and BREAK separates. Its known item is, by the documented meaning of a phrase (within one part), not a
  match; it is reported to show what BREAK gives up, not as a relevance judgement.
For every phrase query, the files found that hold the phrase in none of their parts (only across two) are counted.
A third catalog has a plain word in BREAK's place (word_join): where its top 10 equals BREAK's, BREAK changed the
ranking only by the length it adds to a file's text (bm25 normalises by length). Medians are per query, the joins
taking turns query by query; the words queries are timed again after FTS5's `optimize` of both keyword tables.

Modes: `keyword` (keywords.search as engine._keyword_matches calls it), and the keyword list the default `auto` mode
fuses (parse with partial_last, evidence_only: caption, text in the image and tags only). auto's other half, the
similarity ranking, is not measured: it does not read the keyword text, and a meaningful one needs a trained ALIGN
(bench_auto.py fine-tunes one for minutes), so the fused rank is not reported here.
R@10: the known item in the top 10; MRR: 1 / its rank (0 beyond 10).
"""

from __future__ import annotations

import argparse
import gzip
import os
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import HERE, load_note, module_at, record

BEFORE = "78ea7a9^"  # the commit before keywords.BREAK
DATA = HERE / "data" / "coco_captions_1500.tsv.gz"
FOLDERS = ("holiday/2011 summer", "camera roll", "family", "phone/DCIM", "trips/lake", "weekend", "kids/park",
           "2012/march")
CLASSES = ("words", "phrase", "prefix", "spread", "boundary phrase")


def captions() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    with gzip.open(DATA, "rt", encoding="utf-8") as f:
        for line in f:
            key, cap = line.rstrip("\n").split("\t", 1)
            out.setdefault(key.split("#")[0], []).append(cap)
    return out


def files_of(caps: dict[str, list[str]], n: int, rng: random.Random) -> list[dict]:
    """The catalog's files: relpath, caption, ocr, labels, and the photo's held-out captions."""
    from alignsearch.storage import keywords

    photos = sorted(caps)[:n]
    out = []
    for i, photo in enumerate(photos):
        c = caps[photo]
        ocr = None
        if i % 3 == 0:
            words = caps[photos[rng.randrange(len(photos))]][0].split()
            start = rng.randrange(max(1, len(words) - 2))
            ocr = " ".join(words[start:start + rng.randint(2, 5)]).strip(" .")
        own = set(keywords.words(c[0]))
        # sorted: tags are labels of their own, not words in the order a sentence puts them (adjacent tags in
        # sentence order would make phrases of caption #1 that no tagger writes)
        labels = sorted([w for w in keywords.words(c[1]) if w not in own and len(w) > 2][:2]) if i % 3 != 1 else []
        out.append({"relpath": f"{FOLDERS[i % len(FOLDERS)]}/{photo}", "caption": c[0], "ocr": ocr,
                    "labels": labels, "held": c[2:]})
    return out


def adjacent_pair(text: str) -> tuple[str, str] | None:
    from alignsearch.storage import keywords

    raw = [w.lower() for w in text.replace(".", " ").split()]
    for a, b in zip(raw, raw[1:]):
        if keywords.words(a) == [a] and keywords.words(b) == [b]:
            return a, b
    return None


def queries(files: list[dict]) -> dict[str, list[tuple[str, int]]]:
    """{class: [(query text, index of the relevant file)]}."""
    from alignsearch.storage import keywords

    out: dict[str, list[tuple[str, int]]] = {c: [] for c in CLASSES}
    for i, f in enumerate(files):
        words = keywords.words(f["held"][0])[:4]
        if words:
            out["words"].append((" ".join(words), i))
        pair = adjacent_pair(f["held"][1])
        if pair:
            out["phrase"].append((f'"{pair[0]} {pair[1]}"', i))
        long = [w for w in keywords.words(f["held"][2]) if len(w) > 4]
        if len(long) >= 2:
            out["prefix"].append((f"{long[0]} {long[1][:4]}*", i))
        caption = set(keywords.words(f["caption"]))
        only_tag = [w for w in f["labels"] if w not in caption]
        only_caption = [w for w in keywords.words(f["caption"]) if w not in " ".join(f["labels"]).split()]
        if only_tag and only_caption:
            out["spread"].append((f"{only_caption[-1]} {only_tag[0]}", i))
        nxt = (f["ocr"] or f["relpath"].replace("/", " ")).split()[0].lower()  # keyword_text's next part
        last = f["caption"].lower().replace(".", " ").split()
        if last and keywords.words(last[-1]) and keywords.words(nxt):
            out["boundary phrase"].append((f'"{last[-1]} {nxt}"', i))
    return out


def build(db_path: Path, files: list[dict], keyword_text) -> list[int]:
    """A catalog of these files with their keyword text written by `keyword_text`; their ids in order."""
    from alignsearch.storage import catalog, keywords

    db = catalog.connect(db_path)
    ids = []
    with db.begin() as conn:
        for f in files:
            fid = catalog.upsert_file(conn, {"root": "/photos", "relpath": f["relpath"], "size": 1, "mtime": 0.0,
                                             "status": catalog.INDEXED})
            ids.append(fid)
            catalog.replace_tags(conn, [{"file_id": fid, "label": t, "probability": 1.0} for t in f["labels"]], [])
            catalog.set_photo(conn, fid, f["relpath"], {"caption": f["caption"], "ocr": f["ocr"]}, f["labels"])
            text = keyword_text(f["relpath"], f["caption"], f["labels"], f["ocr"])
            conn.exec_driver_sql(f"UPDATE {catalog.KEYWORDS} SET body = ? WHERE rowid = ?",
                                 (keywords.spaced(text), fid))
    db.dispose()
    return ids


def run(joins, qs, ids: list[int], auto: bool) -> list[dict]:
    """For each join ((catalog path, keywords module)): {class: (R@10, MRR, [ids found per query], [seconds per
    query])} in one mode. The joins take turns query by query, so load on the machine falls on each alike."""
    from alignsearch.storage import catalog

    dbs = [catalog.connect(path, readonly=True) for path, _ in joins]
    conns = [db.connect() for db in dbs]
    out: list[dict] = [{} for _ in joins]
    try:
        for cls, items in qs.items():
            found: list[list] = [[] for _ in joins]
            times: list[list] = [[] for _ in joins]
            for text, _ in items:
                for n, (conn, (_, kw)) in enumerate(zip(conns, joins)):
                    t = time.perf_counter()
                    # every match (limit: all files): the phrase matches across parts are counted from them
                    got = kw.search(conn, kw.parse(text, partial_last=auto), len(ids), evidence_only=auto)
                    times[n].append(time.perf_counter() - t)
                    found[n].append([i for i, _ in got])
            for n in range(len(joins)):
                ranks = [f[:10].index(ids[rel]) + 1 if ids[rel] in f[:10] else 0
                         for f, (_, rel) in zip(found[n], items)]
                out[n][cls] = (sum(r > 0 for r in ranks) / max(1, len(items)),
                               sum(1 / r for r in ranks if r) / max(1, len(items)), found[n], times[n])
    finally:
        for conn, db in zip(conns, dbs):
            conn.close()
            db.dispose()
    return out


def word_join(relpath: str, caption: str | None, labels=(), ocr: str | None = None) -> str:
    """The new keyword text with a plain word (no query's) in BREAK's place: as long to bm25 and, like BREAK, between
    a phrase's words; the same top 10 as BREAK's says that BREAK changes the ranking only as a token of length."""
    from alignsearch.storage import catalog, keywords

    return catalog.keyword_text(relpath, caption, labels, ocr).replace(keywords.BREAK, "qqpartbreak")


def across_parts(items, found: list[list[int]], parts: dict[int, str]) -> int:
    """How many of the files found for these phrase queries hold the phrase in none of their parts (caption, text
    in the image, name words, a tag: the new keyword text split at BREAK; keywords.evidence looks in each part)."""
    from alignsearch.storage import keywords

    return sum(not keywords.evidence(keywords.parse(text), parts[i]) for (text, _), got in zip(items, found)
               for i in got)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=1500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    load0 = os.getloadavg()[0]
    from alignsearch.storage import catalog, keywords

    old_catalog = module_at(BEFORE, "alignsearch/storage/catalog.py", "catalog_before_break")
    old_keywords = module_at(BEFORE, "alignsearch/storage/keywords.py", "keywords_before_break")
    files = files_of(captions(), args.files, random.Random(args.seed))
    qs = queries(files)
    tmp = Path(tempfile.mkdtemp(prefix="bench-keyword-break-"))
    try:
        old_ids = build(tmp / "space.db", files, old_catalog.keyword_text)
        new_ids = build(tmp / "break.db", files, catalog.keyword_text)
        # BREAK's place taken by a plain word: the ranking BREAK gives when only its length in bm25 counts
        assert build(tmp / "word.db", files, word_join) == old_ids == new_ids
        parts = {i: catalog.keyword_text(f["relpath"], f["caption"], f["labels"], f["ocr"]) for i, f in zip(new_ids, files)}
        lines = [f"- {len(files)} files from COCO val2017 captions (benchmarks/data), seed {args.seed}; parts: caption "
                 f"{len(files)}, text in the image {sum(bool(f['ocr']) for f in files)}, name words {len(files)}, "
                 f"files with tags {sum(bool(f['labels']) for f in files)}; known-item queries from held-out "
                 f"captions (see the script's docstring); baseline: keyword_text and evidence at {BEFORE}", "",
                 "| mode | class | queries | R@10 space | R@10 BREAK | MRR space | MRR BREAK | top 10 changed | "
                 "top 10 as with a word for BREAK | phrase found only across parts: space / BREAK | "
                 "median ms space / BREAK |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for mode, auto in (("keyword", False), ("auto's keyword list", True)):
            old, new, word = run([(tmp / "space.db", old_keywords), (tmp / "break.db", keywords),
                                  (tmp / "word.db", keywords)], qs, new_ids, auto)
            for cls in CLASSES:
                (r_old, m_old, f_old, t_old), (r_new, m_new, f_new, t_new) = old[cls], new[cls]
                changed = sum(a[:10] != b[:10] for a, b in zip(f_old, f_new))
                as_word = sum(a[:10] == b[:10] for a, b in zip(word[cls][2], f_new))
                across = (f"{across_parts(qs[cls], f_old, parts)} / {across_parts(qs[cls], f_new, parts)}"
                          if "phrase" in cls else "-")
                lines.append(f"| {mode} | {cls} | {len(qs[cls])} | {r_old:.3f} | {r_new:.3f} | {m_old:.3f} | "
                             f"{m_new:.3f} | {changed} | {as_word} | {across} | {statistics.median(t_old) * 1e3:.2f} / "
                             f"{statistics.median(t_new) * 1e3:.2f} |")
        for path in (tmp / "space.db", tmp / "break.db"):  # FTS5 merges its segments into one b-tree
            with sqlite3.connect(path) as conn:
                conn.execute(f"INSERT INTO {catalog.KEYWORDS}({catalog.KEYWORDS}) VALUES ('optimize')")
        old, new = run([(tmp / "space.db", old_keywords), (tmp / "break.db", keywords)], {"words": qs["words"]},
                       new_ids, False)
        lines += ["", f"- keyword mode, words, after FTS5 `optimize` of both keyword tables: median "
                  f"{statistics.median(old['words'][3]) * 1e3:.2f} / {statistics.median(new['words'][3]) * 1e3:.2f} ms "
                  "(space / BREAK)", load_note(load0)]
        record("Keyword relevance: a file's parts joined by BREAK vs a space (bench_keyword_break)", lines,
               save=not args.no_record)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
