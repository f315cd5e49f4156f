"""Query latency at align-base size on a 100k index: warm engine and a cold `alignsearch query`.

    python benchmarks/bench_query.py [--n 100000] [--repeats 30]

The index holds a few real JPEGs plus synthetic 640-d vectors written through the real writer.
Baseline in the same run: transformers' own tokenizer + get_text_features and an exact numpy search.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_ann import structured  # noqa: E402
from common import align_base_checkpoint, jpeg_corpus, record  # noqa: E402

import alignsearch  # noqa: E402
from alignsearch import catalog  # noqa: E402
from alignsearch.engine import ANN_FILE  # noqa: E402
from indexer.build import sync_index  # noqa: E402
from indexer.decode import Item  # noqa: E402
from indexer.job import index_folders  # noqa: E402
from indexer.scan import Found  # noqa: E402
from indexer.writer import catalog_writer  # noqa: E402


def ms(samples: list[float]) -> str:
    s = sorted(samples)
    return f"p50 {statistics.median(s) * 1000:.1f} ms, p99 {s[min(len(s) - 1, int(0.99 * len(s)))] * 1000:.1f} ms"


def timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def build(index_dir: Path, model: Path, corpus: Path, n: int) -> None:
    index_folders([corpus], index_dir, model=str(model), device="cpu", workers=0)
    db = catalog.connect(index_dir / "catalog.db")
    store = alignsearch.open(index_dir).store
    write = catalog_writer(db, store)
    x = structured(n, seed=3)
    for start in range(0, n, 5000):
        chunk = x[start : start + 5000]
        write([Item(Found("/synthetic", f"{start + j}.jpg", 1, 0.0), crop=np.zeros(1)) for j in range(len(chunk))], chunk)
    sync_index(db, store, index_dir / ANN_FILE)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    model, corpus = align_base_checkpoint(), jpeg_corpus(8, seed=1)
    with tempfile.TemporaryDirectory() as tmp:
        index_dir = Path(tmp) / "ix"
        t = time.perf_counter()
        build(index_dir, model, corpus, args.n)
        build_s = time.perf_counter() - t
        engine = alignsearch.open(index_dir, device="cpu")
        info = engine.info()
        image = sorted(corpus.glob("*.jpg"))[0]
        text = timed(lambda: engine.search(text="a red car parked on the beach at night", k=10), args.repeats)
        img = timed(lambda: engine.search(image=image, k=10), max(5, args.repeats // 3))
        both = timed(lambda: engine.search(text="at night", image=image, k=10), max(5, args.repeats // 3))
        encode_only = timed(lambda: engine.encoder.encode_text(["a red car parked on the beach at night"]), args.repeats)
        fast = alignsearch.open(index_dir, device="cpu", text_bf16=True)
        fast_text = timed(lambda: fast.search(text="a red car parked on the beach at night", k=10), args.repeats)
        probe = ["a red car parked on the beach at night", "a dog", "two people in the snow"]
        cosine = (engine.encoder.encode_text(probe) * fast.encoder.encode_text(probe)).sum(axis=1).min()

        import torch
        from transformers import AlignModel, AutoTokenizer

        hf_model, tok = AlignModel.from_pretrained(model).eval(), AutoTokenizer.from_pretrained(model)
        allv = engine.store.get(np.arange(engine.store.rows))

        def naive():
            with torch.inference_mode():
                out = hf_model.get_text_features(**tok(["a red car parked on the beach at night"], return_tensors="pt"))
            v = (out if isinstance(out, torch.Tensor) else out.pooler_output)[0].numpy()
            np.argsort(-(allv @ (v / np.linalg.norm(v))))[:10]

        baseline = timed(naive, args.repeats)
        cold = []
        for _ in range(3):
            t = time.perf_counter()
            subprocess.run([sys.executable, "-m", "alignsearch", "query", "red car", "--index", str(index_dir)],
                           check=True, capture_output=True)
            cold.append(time.perf_counter() - t)
    ix = info["index"]
    record(
        f"Query latency, {info['images']:,} vectors, align-base geometry with random weights, CPU",
        [
            f"- index: {ix['factory']} nprobe {ix['nprobe']}, re-rank {ix['rerank_factor']}x, tuned recall@10 "
            f"{ix['tuned_recall_at_10']}; built in {build_s:.0f} s",
            f"- warm text query, end to end (encode + ANN + re-rank + catalog): {ms(text)}",
            f"  - of which text encoding alone: {ms(encode_only)}",
            f"- warm text query with bf16 text encoding on the CPU (`serve --bf16-text`): {ms(fast_text)}; "
            f"cosine to fp32 text vectors >= {cosine:.5f}",
            f"- warm image query (decode + encode + search): {ms(img)}",
            f"- warm text+image query: {ms(both)}",
            f"- baseline, same run: transformers tokenizer + get_text_features + exact numpy search: {ms(baseline)}",
            f"- cold `alignsearch query` process, start to output (3 runs): median {statistics.median(cold):.2f} s",
        ],
    )


if __name__ == "__main__":
    main()
