"""The Ray path's driver load: encoder actors writing vector segments vs sending vectors to the driver.

    python benchmarks/bench_ray.py [--images 4000] [--repeats 3] [--dim 640]

One local Ray instance (2 CPUs) indexes the same small generated JPEGs with a tiny model whose
embeddings are `dim` wide (align-base's 640 by default), three ways in one run: the single-process
path (the baseline), `--ray` with actors appending to vector segments of their own (the default), and
`--ray` with every vector sent to the driver (what actors on machines that do not see the index
folder do). Figures per mode are medians over the repeats: images/s end to end, the driver's seconds
in the write stage per 1,000 images, and the vector bytes that reached the driver per 1,000 images.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import CACHE, record  # also puts tests/ on the path


def small_jpegs(n: int) -> Path:
    from PIL import Image

    out = CACHE / f"small-jpegs-{n}"
    if out.exists() and len(list(out.glob("*.jpg"))) == n:
        return out
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        pixels = rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)
        Image.fromarray(pixels).resize((96, 72), Image.BICUBIC).save(out / f"img{i:05d}.jpg", quality=90)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=4000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dim", type=int, default=640, help="embedding width of the tiny model (align-base: 640)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--record", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args()

    import ray
    from tiny_align import build_tiny_align

    from indexer.job import index_folders

    model = CACHE / f"tiny-align-{args.dim}d"
    if not (model / "config.json").exists():
        build_tiny_align(model, vision_channels=(16, 24, args.dim))
    corpus = small_jpegs(args.images)
    modes = {"one process (baseline)": {}, "ray, actors write segments": {"use_ray": True},
             "ray, vectors sent to the driver": {"use_ray": True, "ray_actor_segments": False}}
    runs: dict[str, list] = {mode: [] for mode in modes}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for _ in range(args.repeats):
            for mode, options in modes.items():  # interleaved, so drift in the machine hits every mode alike
                with tempfile.TemporaryDirectory() as tmp:
                    start = time.perf_counter()
                    summary = index_folders([corpus], Path(tmp) / "ix", model=str(model), device="cpu",
                                            batch_size=args.batch_size, **options)
                    wall = time.perf_counter() - start
                    shutil.rmtree(tmp, ignore_errors=True)
                assert summary.added == args.images, summary
                runs[mode].append((wall, summary.times))
    finally:
        ray.shutdown()

    lines = [f"- corpus: {args.images} JPEGs 96x72, tiny ALIGN with {args.dim}-d embeddings, batch {args.batch_size}, "
             f"local Ray instance with 2 CPUs (one encoder actor), {args.repeats} repeats interleaved; medians"]
    base = statistics.median(w for w, _ in runs["one process (baseline)"])
    for mode, results in runs.items():
        wall = statistics.median(w for w, _ in results)
        write = statistics.median(t["write"] for _, t in results) / args.images * 1000
        sent = statistics.median(t["extra"].get("vectors_sent_to_driver", args.images if mode.startswith("one") else 0)
                                 for _, t in results)
        lines.append(f"- {mode}: {wall:.1f} s, {args.images / wall:.0f} images/s ({base / wall:.2f}x the baseline); "
                     f"write stage {write * 1000:.0f} ms per 1,000 images; vectors reaching the writing process "
                     f"{sent * args.dim * 2 / args.images:.0f} KB per 1,000 images")
    record("Ray path: vector segments written by the encoder actors vs vectors sent to the driver", lines, args.record)


if __name__ == "__main__":
    main()
