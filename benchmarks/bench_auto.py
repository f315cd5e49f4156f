"""Relevance of the default query mode (`auto`: the similarity ranking fused with keyword evidence from
captions, text in images and tags) with each of its fusions (engine.AUTO_FUSION set for the column): auto-rrf
(reciprocal rank fusion, the default), auto-belief (the model's belief plus a keyword share) and auto (the gate:
belief or rrf by the query's best cosine against null queries'), against pure similarity (`--mode vector`, the
baseline) and keyword alone, in the same run, through `alignsearch finetune`, `index` and the Python API
(alignsearch.open(...).search).

    python benchmarks/bench_auto.py [--seeds 0,1,2,3,4,5] [--tuning-seeds 0,1,2] [--epochs 30] [--no-ocr]
        [--no-record] [--gate-z Z] [--dump results.json] [--kinds places,none,true,wrong,ocr,copies]

auto-sequential, keyword-sequential: auto-rrf and keyword with the ranks ties took before shared ranks
(sequential_ranks, sequential_keyword_ranks: the old code quoted), the baseline of that change, measured on every variant and above all on `copies` (below), where ties exist.

The belief fusion's constants (query.BELIEF_TEMPERATURE, BELIEF_NONE, KEYWORD_SHARE) and the gate's GATE_Z were
chosen on seeds 0,1,2 only (--tuning-seeds; --dump keeps every query's result and z for that): the figures that
count are those of the other seeds (3,4,5 by default: other models, other renderings of the training set and
corpus), reported apart.

A tiny ALIGN from random weights is fine-tuned (CPU, a few minutes) on renderings of scikit-image's sample
photos captioned with the word that names each (bench_quality.py's compose photos), so its similarity
ranking means something. The corpus is 4 fresh renderings of each of the 12 photos (48 images, names carry
nothing); four indexes of it differ only in their sidecar captions (`img0001.txt`):

- places: half the images carry a caption naming a place ("holiday in zanzibar, 2019"), a word the model
  never saw; the other half carry none.
- none: no image carries a caption (the library without text).
- true: one image per subject carries a caption naming its subject ("our cat at home").
- wrong: one image per subject carries a caption naming another subject (a mug photo captioned "cat mug").
- ocr: no captions; half the images have a place name painted on a light band across their foot (32 px
  type on a 240 px picture), indexed with `index --ocr` (RapidOCR): the answer is only in the pixels' text.
- copies: as places, plus byte copies (with their caption files) of 24 images, half named to sort before their
  originals, half after: two names of one vector, each pair tied in similarity; a copy is relevant where its
  original is.

Queries: a place's name on `places` and `ocr` (the answer is only in text: 1 relevant image each), and each subject's
word on every index (4 relevant images each; on `places`, `none` and `ocr` no caption
or sign holds the query's words).
RRF_K = 60 (the literature), FUSION_DEPTH = KEYWORD_DEPTH = 100, the stop words and MIN_PARTIAL = 3 were set
before this benchmark existed and are not changed by it; BELIEF_TEMPERATURE, BELIEF_NONE and KEYWORD_SHARE were chosen on
the tuning seeds (the best place-name MRR with the wrong captions' R@1 at 0.8 or more), GATE_Z as the middle of
the thresholds meeting every target there (place names within 0.05 of auto-rrf, wrong captions' R@1 >= 0.5).
R@1: the top hit is relevant; R@10: the share of the relevant images in the top 10; MRR: 1 / rank of the
first relevant hit (0 beyond 10).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_quality import PHOTOS, TINTS, photos, render
from common import record  # also puts tests/ on the path
from tiny_align import build_tiny_align

PLACES = ("zanzibar", "reykjavik", "lisbon", "kyoto", "oaxaca", "tbilisi", "valparaiso", "marrakesh", "tromso",
          "hobart", "cusco", "samarkand", "dubrovnik", "galway", "hanoi", "bergen", "quebec", "mombasa", "tallinn",
          "ushuaia", "palermo", "lhasa", "granada", "nairobi")
MODES = ("vector", "auto-rrf", "auto-belief", "auto", "keyword", "auto-sequential", "keyword-sequential")
KINDS = ("places", "none", "true", "wrong", "ocr", "copies")
# auto with each of its fusions (engine.AUTO_FUSION): auto-rrf what `--mode auto` does (the default, the baseline),
# auto-belief the model's belief plus a keyword share, and the column named auto the gate (belief or rrf by the
# query's best cosine against null queries), the candidate measured against the default
FUSIONS = {"auto-rrf": "rrf", "auto-belief": "belief", "auto": "gate", "auto-sequential": "rrf"}


def sequential_ranks(similarity, tiebreak):
    """The similarity ranks fused rankings took before query.shared_ranks (92e8183), quoted: one after the other,
    ties in the candidates' order (the ANN's), so copies took two ranks. auto-sequential = auto-rrf with these."""
    import numpy as np

    ranks = np.empty(len(similarity), np.int64)
    ranks[np.lexsort((-tiebreak, -similarity))] = np.arange(1, len(similarity) + 1)
    return ranks


def sequential_keyword_ranks(bm25):
    """The keyword ranks before query.keyword_ranks (ae92f6a), quoted: one per match in the keyword list's order
    (SQLite's order among equal bm25)."""
    import numpy as np

    return np.arange(1, len(bm25) + 1)
PER_SUBJECT = 4


def make_sets(root: Path, per_subject_train: int, seed: int):
    """train/ (captioned renderings), corpus/ (PER_SUBJECT fresh renderings per photo); returns the corpus
    files' subjects in order."""
    import numpy as np

    rng = np.random.default_rng(seed)
    pics, colours = photos(), list(TINTS)
    (root / "train").mkdir(parents=True)
    n = 0
    for name, word in PHOTOS.items():
        for _ in range(per_subject_train):
            path = root / "train" / f"t{n:05d}.png"
            render(pics[name], colours[int(rng.integers(len(colours)))], rng).save(path)
            path.with_suffix(".txt").write_text(("a photo of a {}", "{}", "a {}")[n % 3].format(word))
            n += 1
    rng = np.random.default_rng(seed + 1000)  # renderings the model was not trained on
    subjects = []
    for name, word in PHOTOS.items():
        for _ in range(PER_SUBJECT):
            subjects.append((f"img{len(subjects):04d}.png", word, render(pics[name], colours[int(rng.integers(len(colours)))], rng)))
    return subjects


def painted(image, word: str):
    """The rendering at 240 px with `word` on a light band across its foot (what `index --ocr` reads)."""
    from PIL import Image, ImageDraw, ImageFont

    big = image.resize((240, 240), Image.BILINEAR)
    draw = ImageDraw.Draw(big)
    draw.rectangle([0, 186, 240, 240], fill=(240, 240, 232))
    draw.text((12, 194), word.upper(), fill=(20, 20, 20), font=ImageFont.load_default(size=32))
    return big


def copies(corpus: Path, subjects: list) -> dict:
    """Byte copies, with their caption files, of the corpus images at places 0 and 1 of every 4 (one captioned, one
    not, per photo: 24), named to sort before their originals for half of them ("a" + name) and after for the other
    half ("z" + name): two names of one vector, what shared ranks change. Returns original -> copy."""
    import shutil

    out = {}
    for i, (f, _, _) in enumerate(subjects):
        if i % 4 < 2:
            out[f] = ("a" if i % 8 < 4 else "z") + f
            shutil.copyfile(corpus / f, corpus / out[f])
            if (corpus / f).with_suffix(".txt").exists():
                shutil.copyfile((corpus / f).with_suffix(".txt"), (corpus / out[f]).with_suffix(".txt"))
    return out


def captions(kind: str, subjects: list) -> dict:
    """file -> caption for one index's variant (copies: as places; copies() adds the copies' own)."""
    words = list(PHOTOS.values())
    if kind in ("none", "ocr"):
        return {}
    if kind in ("places", "copies"):  # every other image: a place name the model never saw
        return {f: f"holiday in {PLACES[i // 2]}, {2001 + i // 2}" for i, (f, _, _) in enumerate(subjects) if i % 2 == 0}
    out = {}
    for s, word in enumerate(words):
        if kind == "true":
            f = subjects[s * PER_SUBJECT][0]
            out[f] = f"our {word} at home"
        else:  # wrong: an image of the next subject is captioned with this one's word
            f = subjects[((s + 1) % len(words)) * PER_SUBJECT][0]
            out[f] = f"{word} mug"
    return out


def search(engine, text: str, mode: str) -> list:
    """The top 10 in a mode; auto-rrf, auto-belief and auto: auto with that fusion (FUSIONS); auto-sequential and
    keyword-sequential: auto-rrf and keyword with the ranks ties took before shared ranks (similarity and keyword)."""
    from alignsearch.search import engine as engine_module
    from alignsearch.search import query as query_module

    kept = engine_module.AUTO_FUSION, query_module.shared_ranks, query_module.keyword_ranks
    if mode.endswith("-sequential"):
        query_module.shared_ranks, query_module.keyword_ranks = sequential_ranks, sequential_keyword_ranks
    engine_module.AUTO_FUSION = FUSIONS.get(mode, kept[0])
    try:
        return engine.search(text, k=10, mode="auto" if mode in FUSIONS else mode.removesuffix("-sequential"))
    finally:
        engine_module.AUTO_FUSION, query_module.shared_ranks, query_module.keyword_ranks = kept


def score(engine, queries: list, mode: str) -> dict:
    r1 = r10 = rr = 0.0
    per_query = []  # (R@1, R@10, RR, the gate's z or None, the top 10's names): for choosing GATE_Z on the tuning seeds
    for text, relevant in queries:
        hits = search(engine, text, mode)
        names = [Path(h.path).name for h in hits]
        z = next((h.parts["model_z"] for h in hits if h.parts and "model_z" in h.parts), None)
        q = (float(bool(names) and names[0] in relevant), len(set(names) & relevant) / min(len(relevant), 10),
             next((1 / (i + 1) for i, n in enumerate(names) if n in relevant), 0.0), z, names)
        per_query.append(q)
        r1, r10, rr = r1 + q[0], r10 + q[1], rr + q[2]
    n = len(queries)
    return {"R@1": round(r1 / n, 3), "R@10": round(r10 / n, 3), "MRR": round(rr / n, 3), "queries": n,
            "per_query": per_query}


def one_seed(tmp: Path, seed: int, args) -> tuple[dict, float]:
    """Train a model from this seed, index every variant, score every query set in every mode."""
    import alignsearch

    cli = [sys.executable, "-m", "alignsearch"]
    tmp = tmp / f"seed{seed}"
    subjects = make_sets(tmp, args.per_subject, seed)
    base = build_tiny_align(tmp / "base", seed=seed, image=(40, 32), text_init=0.1, text_hidden=64,
                            vision_channels=(32, 48, 64), vision_hidden=128, vision_strides=(2, 2, 2),
                            extra_words=tuple(sorted(set(PHOTOS.values()))))
    t = time.perf_counter()
    done = subprocess.run(cli + ["finetune", str(tmp / "train"), "--model", str(base), "--out", str(tmp / "tuned"),
                                 "--epochs", str(args.epochs), "--batch-size", "64", "--lr", "2e-3",
                                 "--seed", str(seed), "--device", "cpu"], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    train_s = time.perf_counter() - t
    by_word: dict[str, set] = {}
    for f, word, _ in subjects:
        by_word.setdefault(word, set()).add(f)
    subject_queries = list(by_word.items())
    results = {}
    for kind in [k for k in args.kinds.split(",") if k != "ocr" or args.ocr]:
        corpus = tmp / f"corpus-{kind}"
        corpus.mkdir()
        signs = {}
        for i, (f, _, image) in enumerate(subjects):
            if kind == "ocr" and i % 2 == 0:
                signs[f] = PLACES[i // 2]
                image = painted(image, signs[f])
            image.save(corpus / f)
        caps = captions(kind, subjects)
        for f, text in caps.items():
            (corpus / f).with_suffix(".txt").write_text(text)
        copied = copies(corpus, subjects) if kind == "copies" else {}
        ix = tmp / f"ix-{kind}"
        subprocess.run(cli + ["index", str(corpus), "--index", str(ix), "--model", str(tmp / "tuned"), "--device", "cpu"]
                       + (["--ocr"] if kind == "ocr" else []), check=True, capture_output=True)
        engine = alignsearch.open(ix)
        sets = {"subject words": [(word, relevant | {copied[f] for f in relevant if f in copied})
                                  for word, relevant in subject_queries]}
        if kind in ("places", "copies"):
            sets["place names (answer only in a caption)"] = [(text.split(",")[0].split()[-1], {f} | ({copied[f]} if f in copied else set()))
                                                              for f, text in caps.items()]
        if kind == "ocr":
            sets["place names (answer only painted in the image)"] = [(word, {f}) for f, word in signs.items()]
        for label, queries in sets.items():
            results[f"{kind}: {label}"] = {mode: score(engine, queries, mode) for mode in MODES}
    return results, train_s


def main() -> None:
    from alignsearch.search import query as query_module
    from alignsearch.search.query import BELIEF_NONE, BELIEF_TEMPERATURE, KEYWORD_SHARE

    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1,2,3,4,5", help="model initialisations (and corpus renderings) to run")
    ap.add_argument("--tuning-seeds", default="0,1,2", help="the seeds auto's constants were chosen on (reported apart)")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--per-subject", type=int, default=30, help="training renderings per photo")
    ap.add_argument("--ocr", action=argparse.BooleanOptionalAction, default=True,
                    help="also the variant with the place names painted in the images (needs rapidocr)")
    ap.add_argument("--record", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--gate-z", type=float, default=None, help="the gate's threshold (default query.GATE_Z)")
    ap.add_argument("--dump", default=None, help="write every seed's results, per query, to this JSON file")
    ap.add_argument("--kinds", default=",".join(KINDS), help="the index variants to run (default: all)")
    args = ap.parse_args()
    if args.gate_z is not None:
        query_module.GATE_Z = args.gate_z
    seeds = [int(x) for x in args.seeds.split(",")]
    tuning = {int(x) for x in args.tuning_seeds.split(",") if x}
    started = time.perf_counter()
    runs, train = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            runs[seed], train[seed] = one_seed(Path(tmp), seed, args)
    total = time.perf_counter() - started
    keys = ("R@1", "R@10", "MRR")
    groups = [(f"held out (seeds {','.join(map(str, g))})", g) for g in [[s for s in seeds if s not in tuning]] if g]
    groups += [(f"tuning (seeds {','.join(map(str, g))})", g) for g in [[s for s in seeds if s in tuning]] if g]
    lines = [f"- model: tiny ALIGN from random weights (text width 64, init 0.1; vision 32,48,64, width 128, 32 px), "
             f"fine-tuned with `alignsearch finetune` on {args.per_subject * len(PHOTOS)} captioned renderings of the "
             f"12 scikit-image photos, {args.epochs} epochs, CPU, seeds {args.seeds} "
             f"({' / '.join(f'{t:.0f}' for t in train.values())} s each); whole run {total:.0f} s",
             f"- corpus per seed: {len(PHOTOS) * PER_SUBJECT} fresh renderings (4 per photo), indexed once per variant "
             "(places: 24 of 48 captioned with a place name; none: no captions; true: 12 captioned with their subject; "
             "wrong: 12 captioned with another subject's word" + ("; ocr: 24 of 48 with a place name painted in, "
             "`index --ocr`" if args.ocr else "") + "; copies: as places, with byte copies of 24 images and their caption files, "
             "12 named to sort before their originals and 12 after, relevant with them); variants run: " + args.kinds,
             "- through alignsearch.open(ix).search(text, k=10, mode=...); vector = the baseline (pure similarity); "
             "auto-rrf = auto with its default fusion (reciprocal rank fusion, RRF_K 60); auto-belief = the belief fusion "
             f"(BELIEF_TEMPERATURE {BELIEF_TEMPERATURE}, BELIEF_NONE {BELIEF_NONE}, KEYWORD_SHARE {KEYWORD_SHARE}); auto = "
             f"the gate: belief where the query's best cosine stands GATE_Z {query_module.GATE_Z} or more null sds above "
             f"{query_module.NULL_PROMPTS} null queries' (sd floor {query_module.NULL_SD_FLOOR}), else rrf; constants chosen "
             f"on seeds {args.tuning_seeds} only; FUSION_DEPTH/KEYWORD_DEPTH 100, stop words, MIN_PARTIAL 3 not tuned here; "
             "auto-sequential / keyword-sequential = auto-rrf / keyword with the ranks ties took before shared ranks: "
             "similarity ranks one after the other in the ANN's order (before query.shared_ranks, 92e8183), keyword ranks "
             "one after the other in SQLite's order (before query.keyword_ranks, ae92f6a); fewer files than "
             "KEYWORD_DEPTH, so the keyword list's cut (query.through_ties) is never reached",
             "- figures: means over the seeds of each group; R@1 = top hit relevant, R@10 = share of the relevant in "
             "the top 10, MRR = 1/rank of the first relevant (0 beyond 10)"]
    for title, group in groups:
        lines += ["", f"{title}:", "",
                  "| index: queries | queries x seeds | " + " | ".join(f"{m} R@1 / R@10 / MRR" for m in MODES) + " |",
                  "|---|---|" + "---|" * len(MODES)]
        for label in runs[seeds[0]]:
            cells = [" / ".join(f"{statistics.mean(runs[s][label][m][k] for s in group):.2f}" for k in keys) for m in MODES]
            lines.append(f"| {label} | {runs[seeds[0]][label]['vector']['queries']} x {len(group)} | " + " | ".join(cells) + " |")
    lines += ["", "- MRR per seed, vector / auto-rrf / auto-belief / auto: " + "; ".join(
        f"{label}: " + ", ".join("/".join(f"{runs[s][label][m]['MRR']:.2f}" for m in MODES[:4]) for s in seeds)
        for label in runs[seeds[0]])]
    for new, old in (("auto-rrf", "auto-sequential"), ("keyword", "keyword-sequential")):
        pairs = {label: [(a[4], b[4]) for s in seeds for a, b in zip(runs[s][label][new]["per_query"],
                                                                      runs[s][label][old]["per_query"])]
                 for label in runs[seeds[0]]}
        lines += [f"- top-10 lists (names in order) of {new} differing from {old}'s, all seeds (of those, lists whose "
                  "names differ, not only their order): " + "; ".join(
                      f"{label}: {sum(a != b for a, b in got)} of {len(got)} ({sum(set(a) != set(b) for a, b in got)})"
                      for label, got in pairs.items())]
    if args.dump:
        Path(args.dump).write_text(json.dumps(runs))
    record("Default query mode (auto): fusions, shared vs sequential ranks of ties, vs vector: bench_auto.py", lines,
           save=args.record)


if __name__ == "__main__":
    main()
