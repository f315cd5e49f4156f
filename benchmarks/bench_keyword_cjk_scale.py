"""The cost of a one-ideograph keyword query (`海`) on a large catalog of Chinese and Japanese captions, against
multi-character ones in the same run: a lone Han ideograph was dropped from a query (keywords._atom, as a lone Latin
letter is) and is a word now, so its cost (one FTS5 token lookup, but a token in many captions) is new.

    python benchmarks/bench_keyword_cjk_scale.py [--files 100000] [--rounds 15] [--seed 0] [--base main] [--no-save]

The catalog is SYNTHETIC: --files files written by catalog.upsert_file and catalog.set_photo (the code an index run
uses), each caption 3 to 6 words drawn (random.Random(seed)) from a fixed list of everyday Japanese and Chinese words
(WORDS), joined without spaces, a Japanese caption with a particle between words; so a common ideograph (海, 山) is
in a large share of captions, as it is in real text. Queries are timed as the keyword mode runs them
(keywords.search(conn, keywords.parse(q), KEYWORD_DEPTH)) and as auto's keyword list (parse partial_last,
evidence_only), the queries taking turns round by round; medians. The baseline (--base) is keywords.py at that
commit (common.module_at) on the same catalog: it drops a one-ideograph query, so its time there is that of
finding nothing.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

from common import against_base, load_note, module_at, record

WORDS = ["海", "山", "猫", "犬", "駅", "桜", "空", "東京", "京都", "大阪", "公園", "写真", "花火", "夕日", "電車",
         "富士山", "海岸", "山道", "子供", "友達", "家族", "旅行", "食事", "寿司", "ラーメン", "カメラ", "タワー",
         "上海", "北京", "长城", "熊猫", "朋友", "城市", "夜景", "雪山", "湖", "河", "森林", "寺", "神社"]
PARTICLES = ["の", "と", "で", "に", ""]
QUERIES = ["海", "駅", "湖", "東京", "富士山", "ラーメン", "海 AND 山"]


def build(db_path: Path, n: int, rng: random.Random) -> None:
    from alignsearch.storage import catalog

    db = catalog.connect(db_path)
    with db.begin() as conn:
        for i in range(n):
            picked = rng.sample(WORDS, rng.randint(3, 6))
            caption = picked[0] + "".join(rng.choice(PARTICLES) + w for w in picked[1:])
            relpath = f"trip/{i}.jpg"
            fid = catalog.upsert_file(conn, {"root": "/photos", "relpath": relpath, "size": 1, "mtime": 0.0,
                                             "status": catalog.INDEXED})
            catalog.set_photo(conn, fid, relpath, {"caption": caption})
    db.dispose()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    args = against_base(ap, rounds=15)
    at_start = os.getloadavg()[0]
    from alignsearch.search.engine import KEYWORD_DEPTH
    from alignsearch.storage import catalog, keywords

    old = module_at(args.base, "alignsearch/storage/keywords.py", "keywords_base")
    trees = {"base": old, "new": keywords}
    times = {(q, mode, t): [] for q in QUERIES for mode in ("keyword", "auto") for t in trees}
    found = {}
    with tempfile.TemporaryDirectory() as tmp:
        db_path = Path(tmp) / "catalog.db"
        start = time.perf_counter()
        build(db_path, args.files, random.Random(args.seed))
        built = time.perf_counter() - start
        db = catalog.connect(db_path)
        with db.connect() as conn:
            for _ in range(args.rounds):
                for q in QUERIES:
                    for mode in ("keyword", "auto"):
                        for t, kw in trees.items():
                            auto = mode == "auto"
                            t0 = time.perf_counter()
                            got = kw.search(conn, kw.parse(q, partial_last=auto), KEYWORD_DEPTH, evidence_only=auto)
                            times[(q, mode, t)].append((time.perf_counter() - t0) * 1e3)
                            found[(q, mode, t)] = len(got)
            total = {q: conn.exec_driver_sql(f"SELECT count(*) FROM {catalog.KEYWORDS} WHERE {catalog.KEYWORDS} MATCH ?",
                                             (keywords.parse(q).groups[0][0].fts(),)).scalar() for q in QUERIES[:-1]}
        db.dispose()
    lines = [f"- SYNTHETIC catalog (see the script's docstring): {args.files} files of Japanese/Chinese captions "
             f"(3-6 of {len(WORDS)} words, seed {args.seed}), written in {built:.0f} s; {args.rounds} rounds, medians; "
             f"limit KEYWORD_DEPTH={KEYWORD_DEPTH}; base = keywords.py at {args.base}", "",
             "| query | captions holding it | mode | base ms | base found | new ms | new found |",
             "|---|---|---|---|---|---|---|"]
    for q in QUERIES:
        for mode in ("keyword", "auto"):
            lines.append(f"| `{q}` | {total.get(q, '-')} | {mode} | {statistics.median(times[(q, mode, 'base')]):.2f} | "
                         f"{found[(q, mode, 'base')]} | {statistics.median(times[(q, mode, 'new')]):.2f} | "
                         f"{found[(q, mode, 'new')]} |")
    lines.append(load_note(at_start))
    record("One-ideograph keyword query at scale (bench_keyword_cjk_scale.py)", lines, save=not args.no_save)


if __name__ == "__main__":
    main()
