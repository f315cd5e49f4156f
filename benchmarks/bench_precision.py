"""The vision tower per engine and precision: speed, drift from torch fp32, and the effect on retrieval.

    python benchmarks/bench_precision.py [--images 64] [--rounds 2]

One process, align-base geometry (random weights), the crops of camera-size JPEGs decoded once. Each engine
(torch fp32 channels_last: the reference; ONNX Runtime fp32; OpenVINO fp32; OpenVINO bf16; torch bf16) encodes
all crops in micro-batches as `alignsearch index` calls it, the engines alternated round by round (medians).
Drift: cosine of each image vector to torch fp32's. Retrieval: overlap@10 with torch fp32's ranking for text
queries (fixed text vectors, torch fp32) and for image-to-image neighbours over the same images.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import align_base_checkpoint, jpeg_corpus, record

from alignsearch.media.images import crop_uint8, open_rgb
from alignsearch.encoders.model import Encoder

TEXTS = ["a red car parked on the beach", "a dog", "two people in the snow", "a bowl of fruit on a table",
         "the skyline of a big city at dusk", "a cat asleep on a sofa", "mountains under a blue sky", "a bicycle"]


def overlap(a: np.ndarray, b: np.ndarray, k: int = 10) -> float:
    """Mean share of the top k of each row of score matrix a that are in b's top k."""
    ta, tb = np.argsort(-a, axis=1)[:, :k], np.argsort(-b, axis=1)[:, :k]
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(ta, tb)]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    model, corpus = align_base_checkpoint(), jpeg_corpus(args.images)
    engines = {
        "torch fp32 (reference)": Encoder(str(model), device="cpu", backend="torch", precision="fp32"),
        "ONNX Runtime fp32": Encoder(str(model), device="cpu", backend="onnx"),
        "OpenVINO fp32": Encoder(str(model), device="cpu", backend="openvino"),
        "OpenVINO bf16": Encoder(str(model), device="cpu", backend="openvino", precision="bf16"),
        "torch bf16": Encoder(str(model), device="cpu", backend="torch", precision="bf16"),
    }
    ref = engines["torch fp32 (reference)"]
    crops = np.stack([crop_uint8(open_rgb(p.read_bytes())[0], ref.spec) for p in sorted(corpus.glob("*.jpg"))])
    for enc in engines.values():
        enc.encode_crops(crops[:4])  # exports, compiles, warms up
    rates: dict[str, list[float]] = {name: [] for name in engines}
    vecs: dict[str, np.ndarray] = {}
    for _ in range(args.rounds):
        for name, enc in engines.items():
            t = time.perf_counter()
            vecs[name] = enc.encode_crops(crops)
            rates[name].append(len(crops) / (time.perf_counter() - t))
    text = ref.encode_text(TEXTS)
    want = vecs["torch fp32 (reference)"]
    lines = [f"- {len(crops)} crops of {corpus.name}, {args.rounds} rounds, engines alternated; images/s median; "
             "drift = cosine to torch fp32 (min, median); overlap@10 with torch fp32's results"]
    for name, enc in engines.items():
        v = vecs[name]
        cos = (v * want).sum(axis=1)
        lines.append(
            f"  - {name}: {statistics.median(rates[name]):.2f} images/s; cosine min {cos.min():.6f}, median "
            f"{np.median(cos):.6f}; text->image overlap@10 {overlap(text @ v.T, text @ want.T):.3f}; image->image "
            f"overlap@10 {overlap(v @ v.T, want @ want.T):.3f}; ran {enc.plan.to_dict()}")
    record(f"Vision tower per engine and precision, {len(crops)} camera-size JPEGs, align-base geometry, CPU", lines)


if __name__ == "__main__":
    main()
