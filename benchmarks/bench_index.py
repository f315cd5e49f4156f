"""Indexing throughput, whole process, against the naive transformers loop run alongside.

    python benchmarks/bench_index.py [--images 64] [--repeats 3] [--device cpu]

Both sides start a fresh process, load the same checkpoint (align-base geometry, random weights)
and encode the same generated JPEGs; ours also writes the catalog, vectors and FAISS index.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time

from common import HERE, align_base_checkpoint, jpeg_corpus, record


def timed(cmd: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start, proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--precision", default=None, help="also measure `index --precision P` (bf16, fp32...)")
    ap.add_argument("--also", action="append", default=[], metavar="ARGS",
                    help="also measure `index ARGS` (repeatable), e.g. --also='--backend onnx'")
    ap.add_argument("--backend", default="auto", help="ours: --backend (auto: ONNX Runtime on CPU, torch on GPU)")
    ap.add_argument("--fast-decode", action="store_true", help="also measure `index --fast-decode` and its cosine to exact")
    args = ap.parse_args()

    model = align_base_checkpoint()
    corpus = jpeg_corpus(args.images)
    naive, ours, stages, fast = [], [], [], []

    def index_once(*extra) -> tuple[float, dict]:
        with tempfile.TemporaryDirectory() as index_dir:
            cmd = [sys.executable, "-m", "alignsearch", "index", str(corpus), "--index", index_dir, "--model", str(model),
                   "--device", args.device, "--batch-size", str(args.batch_size), "--backend", args.backend, "--json", *extra]
            if args.workers is not None:
                cmd += ["--workers", str(args.workers)]
            t, out = timed(cmd)
        summary = json.loads(out)
        return t, {**summary["times"], "encoder": summary.get("encoder")}

    t_first, first = index_once()  # untimed warm-up: fills the ONNX cache (an export, once per model) and page cache
    variants = [("--precision " + args.precision, ["--precision", args.precision])] if args.precision else []
    variants += [(extra, extra.split()) for extra in args.also]
    other: dict[str, list] = {name: [] for name, _ in variants}
    for _ in range(args.repeats):
        t, _ = timed([sys.executable, str(HERE / "naive_loop.py"), str(model), str(corpus), str(args.batch_size),
                      "cuda" if args.device.startswith("cuda") else "cpu"])
        naive.append(t)
        t, times = index_once()
        ours.append(t)
        stages.append(times)
        for name, extra in variants:
            other[name].append(index_once(*extra))
        if args.fast_decode:
            fast.append(index_once("--fast-decode"))
    n = args.images
    med_naive, med_ours = statistics.median(naive), statistics.median(ours)

    def stage(key, runs=stages):
        return statistics.median(s[key] if key in s else s["extra"][key] for s in runs)

    def variant_line(name, runs) -> str:
        med = statistics.median(t for t, _ in runs)
        st = [times for _, times in runs]
        return (f"- alignsearch index {name}: {med:.1f} s, {n / med:.2f} images/s, {med_naive / med:.2f}x the naive loop; "
                f"encode {stage('encode', st):.1f} s ({n / max(stage('encode', st), 1e-9):.1f} images/s in the encoder), "
                f"waiting on decode {stage('read_wait', st):.1f} s")

    record(
        f"Indexing throughput, {n} JPEGs (640x480 to 4000x3000), align-base geometry with random weights, {args.device}",
        [
            f"- runs: {args.repeats}, batch size {args.batch_size}; medians of whole-process wall time (model load included)",
            f"- encoder that ran: {first['encoder'] if 'encoder' in first else 'torch (before backends)'}; first run "
            f"(exports the ONNX towers when the cache is empty): {t_first:.1f} s",
            f"- naive loop (AlignProcessor + AlignModel, one process): {med_naive:.1f} s, {n / med_naive:.2f} images/s",
            f"- alignsearch index: {med_ours:.1f} s, {n / med_ours:.2f} images/s",
            f"- ratio: {med_naive / med_ours:.2f}x",
            f"- alignsearch stages (median s): waiting on decode {stage('read_wait'):.1f}, decode in workers "
            f"{stage('decode_worker'):.1f} (overlapped), encode {stage('encode'):.1f} ({n / max(stage('encode'), 1e-9):.1f} "
            f"images/s in the encoder), write {stage('write'):.2f}, index build {stage('index_build'):.2f}, "
            f"pipeline wall {stage('wall'):.1f}",
            f"- all runs naive: {', '.join(f'{t:.1f}' for t in naive)}; ours: {', '.join(f'{t:.1f}' for t in ours)}",
        ] + [variant_line(name, runs) for name, runs in other.items()]
        + (fast_lines(fast, n, med_naive, model, corpus, args.device) if fast else []),
    )


def fast_lines(fast, n, med_naive, model, corpus, device) -> list[str]:
    """`--fast-decode` figures, and how far its embeddings move from the exact decode's."""
    import numpy as np

    from alignsearch.media.images import decode
    from alignsearch.encoders.model import Encoder

    med = statistics.median(t for t, _ in fast)
    decode_s = statistics.median(times["decode_worker"] for _, times in fast)
    enc = Encoder(str(model), device, precision="fp32")
    data = [p.read_bytes() for p in sorted(corpus.glob("*.jpg"))[:16]]
    exact_crops = np.stack([decode(d, enc.spec).crop for d in data])
    fast_crops = np.stack([decode(d, enc.spec, fast=True).crop for d in data])
    cosine = (enc.encode_crops(exact_crops) * enc.encode_crops(fast_crops)).sum(axis=1)
    diff = np.abs(exact_crops.astype(int) - fast_crops.astype(int))
    return [f"- alignsearch index --fast-decode: {med:.1f} s, {n / med:.2f} images/s, {med_naive / med:.2f}x the naive loop; "
            f"decode in workers {decode_s:.1f} s; embedding cosine to the exact decode (16 images, random weights): "
            f"min {cosine.min():.4f}, mean {cosine.mean():.4f}; crop pixels differ by {diff.mean():.2f} levels on "
            f"average (p99 {np.percentile(diff, 99):.0f}, max {diff.max()})"]


if __name__ == "__main__":
    main()
