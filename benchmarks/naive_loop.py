"""The baseline: the model card's usage, batch by batch, in one process (AlignProcessor + AlignModel)."""

import sys
import time
from pathlib import Path

import torch
from PIL import Image
from transformers import AlignModel, AlignProcessor

start = time.perf_counter()
model_dir, corpus, batch_size = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
device = sys.argv[4] if len(sys.argv) > 4 else "cpu"  # the model card's .to("cuda") on a GPU
limit = int(sys.argv[5]) if len(sys.argv) > 5 else None  # the first N images only (12 MP photos are slow here)
model = AlignModel.from_pretrained(model_dir).eval().to(device)
processor = AlignProcessor.from_pretrained(model_dir)
paths = sorted(corpus.glob("*.jpg"))[:limit]
loaded = time.perf_counter()
vectors = []
with torch.inference_mode():
    for i in range(0, len(paths), batch_size):
        images = [Image.open(p).convert("RGB") for p in paths[i : i + batch_size]]
        out = model.get_image_features(**processor(images=images, return_tensors="pt").to(device))
        out = out if isinstance(out, torch.Tensor) else out.pooler_output
        vectors.append(out / out.norm(dim=-1, keepdim=True))
print(f"{len(torch.cat(vectors).cpu())} images in {time.perf_counter() - start:.2f}s "
      f"(loading {loaded - start:.2f}s, loop {time.perf_counter() - loaded:.2f}s)")
