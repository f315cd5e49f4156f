"""Relevance of the default query mode (`auto`: the similarity ranking fused with keyword evidence from
captions, text in images and tags) against pure similarity (`--mode vector`, the baseline) and keyword alone,
in the same run, through `alignsearch finetune`, `index` and the Python API (alignsearch.open(...).search).

    python benchmarks/bench_auto.py [--seed 0] [--epochs 30] [--no-record]

A tiny ALIGN from random weights is fine-tuned (CPU, a few minutes) on renderings of scikit-image's sample
photos captioned with the word that names each (bench_quality.py's compose photos), so its similarity
ranking means something. The corpus is 4 fresh renderings of each of the 12 photos (48 images, names carry
nothing); four indexes of it differ only in their sidecar captions (`img0001.txt`):

- places: half the images carry a caption naming a place ("holiday in zanzibar, 2019"), a word the model
  never saw; the other half carry none.
- none: no image carries a caption (the library without text).
- true: one image per subject carries a caption naming its subject ("our cat at home").
- wrong: one image per subject carries a caption naming another subject (a mug photo captioned "cat mug").

Queries: a place's name on `places` (the answer is only in text: 1 relevant image each), and each subject's
word on every index (4 relevant images each; on `places` and `none` no caption holds the query's words).
Nothing here tuned the method's constants (RRF_K = 60 from the literature, FUSION_DEPTH = KEYWORD_DEPTH = 100,
the stop words, MIN_PARTIAL = 3): they were set before this benchmark existed and are not changed by it.
R@1: the top hit is relevant; R@10: the share of the relevant images in the top 10; MRR: 1 / rank of the
first relevant hit (0 beyond 10).
"""

from __future__ import annotations

import argparse
import json
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
MODES = ("vector", "auto", "keyword")
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


def captions(kind: str, subjects: list) -> dict:
    """file -> caption for one index's variant."""
    words = list(PHOTOS.values())
    if kind == "none":
        return {}
    if kind == "places":  # every other image: a place name the model never saw
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


def score(engine, queries: list, mode: str) -> dict:
    r1 = r10 = rr = 0.0
    for text, relevant in queries:
        names = [Path(h.path).name for h in engine.search(text, k=10, mode=mode)]
        r1 += bool(names) and names[0] in relevant
        r10 += len(set(names) & relevant) / min(len(relevant), 10)
        rr += next((1 / (i + 1) for i, n in enumerate(names) if n in relevant), 0.0)
    n = len(queries)
    return {"R@1": round(r1 / n, 3), "R@10": round(r10 / n, 3), "MRR": round(rr / n, 3), "queries": n}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--per-subject", type=int, default=30, help="training renderings per photo")
    ap.add_argument("--record", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args()
    import alignsearch

    cli = [sys.executable, "-m", "alignsearch"]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subjects = make_sets(tmp, args.per_subject, args.seed)
        base = build_tiny_align(tmp / "base", seed=args.seed, image=(40, 32), text_init=0.1, text_hidden=64,
                                vision_channels=(32, 48, 64), vision_hidden=128, vision_strides=(2, 2, 2),
                                extra_words=tuple(sorted(set(PHOTOS.values()))))
        t = time.perf_counter()
        done = subprocess.run(cli + ["finetune", str(tmp / "train"), "--model", str(base), "--out", str(tmp / "tuned"),
                                     "--epochs", str(args.epochs), "--batch-size", "64", "--lr", "2e-3",
                                     "--seed", str(args.seed), "--device", "cpu"], capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(done.stderr[-3000:])
        train_s = time.perf_counter() - t
        by_word = {}
        for f, word, _ in subjects:
            by_word.setdefault(word, set()).add(f)
        subject_queries = [(word, files) for word, files in by_word.items()]
        results = {}
        for kind in ("places", "none", "true", "wrong"):
            corpus = tmp / f"corpus-{kind}"
            corpus.mkdir()
            for f, _, image in subjects:
                image.save(corpus / f)
            caps = captions(kind, subjects)
            for f, text in caps.items():
                (corpus / f).with_suffix(".txt").write_text(text)
            ix = tmp / f"ix-{kind}"
            subprocess.run(cli + ["index", str(corpus), "--index", str(ix), "--model", str(tmp / "tuned"), "--device", "cpu"],
                           check=True, capture_output=True)
            engine = alignsearch.open(ix)
            sets = {"subject words": subject_queries}
            if kind == "places":
                sets["place names (answer only in a caption)"] = [(text.split(",")[0].split()[-1], {f}) for f, text in caps.items()]
            for label, queries in sets.items():
                results[f"{kind}: {label}"] = {mode: score(engine, queries, mode) for mode in MODES}
    total = time.perf_counter() - started
    lines = [f"- model: tiny ALIGN from random weights (text width 64, init 0.1; vision 32,48,64, width 128, 32 px), "
             f"fine-tuned with `alignsearch finetune` on {args.per_subject * len(PHOTOS)} captioned renderings of the "
             f"12 scikit-image photos, {args.epochs} epochs, seed {args.seed}, CPU, {train_s:.0f} s; whole run {total:.0f} s",
             f"- corpus: {len(subjects)} fresh renderings (4 per photo), indexed 4 times with different sidecar captions "
             "(places: 24 of 48 captioned with a place name; none: no captions; true: 12 captioned with their subject; "
             "wrong: 12 captioned with another subject's word)",
             "- through alignsearch.open(ix).search(text, k=10, mode=...); vector = the baseline (pure similarity); "
             "constants (RRF_K 60, FUSION_DEPTH/KEYWORD_DEPTH 100, stop words, MIN_PARTIAL 3) not tuned here",
             "", "| index: queries | n | vector R@1 / R@10 / MRR | auto R@1 / R@10 / MRR | keyword R@1 / R@10 / MRR |",
             "|---|---|---|---|---|"]
    for label, r in results.items():
        cells = [" / ".join(f"{r[m][k]:.2f}" for k in ("R@1", "R@10", "MRR")) for m in MODES]
        lines.append(f"| {label} | {r['vector']['queries']} | " + " | ".join(cells) + " |")
    print(json.dumps(results))
    record("Default query mode (auto) vs vector baseline: bench_auto.py", lines, save=args.record)


if __name__ == "__main__":
    main()
