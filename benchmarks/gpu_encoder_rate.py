"""Steady-state vision-tower rate on a GPU (no decode): batches of uint8 crops through Encoder.encode_crops.

    python benchmarks/gpu_encoder_rate.py [--batch 256] [--batches 8]

Warm-up batches first (cuDNN autotuning, allocator), then the median of timed batches, bf16 and fp32,
NCHW and channels_last. Prints figures; the caller records them in RESULTS.md.
"""

import argparse
import statistics
import time

import numpy as np
import torch

from common import align_base_checkpoint
from alignsearch.encoders.model import Encoder

ap = argparse.ArgumentParser()
ap.add_argument("--batch", type=int, default=256)
ap.add_argument("--batches", type=int, default=8)
args = ap.parse_args()
torch.backends.cudnn.benchmark = True
crops = np.random.default_rng(0).integers(0, 256, (args.batch, 289, 289, 3), dtype=np.uint8)
for precision in ("bf16", "fp32"):
    enc = Encoder(str(align_base_checkpoint()), "cuda", precision=precision)
    for layout in ("nchw", "channels_last"):
        if layout == "channels_last":
            enc.model.vision_model.to(memory_format=torch.channels_last)
        for _ in range(2):
            enc.encode_crops(crops)
        times = []
        for _ in range(args.batches):
            torch.cuda.synchronize()
            t = time.perf_counter()
            enc.encode_crops(crops)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        med = statistics.median(times)
        print(f"{precision} {layout}: batch {args.batch}, median {med * 1000:.0f} ms, {args.batch / med:.0f} images/s", flush=True)
    del enc
    torch.cuda.empty_cache()
