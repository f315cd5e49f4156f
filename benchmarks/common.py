"""Shared by the benchmark scripts: machine description, result logging, generated data."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
CACHE = Path(os.environ.get("ALIGNSEARCH_BENCH_CACHE", "/tmp/alignsearch-bench"))
sys.path.insert(0, str(HERE.parent / "tests"))  # the random-checkpoint builder the tests use


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = ""
    try:
        import torch

        if torch.cuda.is_available():
            gpu = f", GPU {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    return f"{platform.node()}: {os.cpu_count()} cores {cpu}{gpu}, Python {platform.python_version()}"


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, cwd=HERE)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except OSError:
        return "unknown"


def record(title: str, lines: list[str], save: bool = True) -> None:
    """Print the figures and (save) append them, dated and attributed, to RESULTS.md."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    block = [f"## {title}", "", f"- date: {now}", f"- machine: {machine()}", f"- commit: {commit()}", ""] + lines + [""]
    text = "\n".join(block)
    print(text)
    if save and not os.environ.get("ALIGNSEARCH_BENCH_DRY"):  # a dry run checks a script, records nothing
        with open(RESULTS, "a") as f:
            f.write(text + "\n")


def align_base_checkpoint() -> Path:
    """align-base's geometry with random weights (the hub is not reachable here): right for speed, not quality."""
    from tiny_align import build_tiny_align

    out = CACHE / "align-base-geometry-random"
    if not (out / "config.json").exists():
        build_tiny_align(out, full_size=True)
    return out


def _jpeg(args) -> None:
    """One camera-size JPEG with smooth content, from its own seed (so images are made in parallel)."""
    from PIL import Image, ImageDraw, ImageFilter

    path, i, seed = args
    sizes = [(640, 480), (1024, 768), (1600, 1200), (1920, 1080), (3000, 2000), (4000, 3000)]
    w, h = sizes[i % len(sizes)]
    rng = np.random.default_rng([seed, i])
    small = Image.fromarray((rng.random((12, 16, 3)) * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)
    draw = ImageDraw.Draw(small)
    for _ in range(6):
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        r = int(rng.integers(w // 20, w // 4))
        draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    small.filter(ImageFilter.GaussianBlur(2)).save(path, quality=90)


def jpeg_corpus(n: int, seed: int = 0) -> Path:
    """n JPEGs of camera-like sizes (640x480 to 4000x3000) with smooth content, as photos compress; made
    on every core (512 take two minutes on one)."""
    import multiprocessing

    out = CACHE / f"jpegs-v2-{n}-{seed}"
    if out.exists() and len(list(out.glob("*.jpg"))) == n:
        return out
    out.mkdir(parents=True, exist_ok=True)
    with multiprocessing.get_context("spawn").Pool() as pool:
        pool.map(_jpeg, [(out / f"photo{i:05d}.jpg", i, seed) for i in range(n)], chunksize=4)
    return out
