"""Text in images (issue 28): what `index --ocr` costs and how many words it finds.

    python benchmarks/bench_ocr.py [--signs 24] [--photos 24] [--index-images 32] [--skip-index]

- OCR alone (alignsearch/media/ocr.py, one thread, as in one decode worker), on images already decoded: images per
  second on camera-size photos without text (640x480 to 4000x3000, benchmarks/common.py's JPEGs) and on
  rendered signs with text;
- quality: words found / words present on the rendered signs (font sizes 14-48 px, light backgrounds, some
  on a photo) and on scikit-image's photographed page (`skimage.data.page`, transcribed below); a word counts
  as found when the text read holds it as a whole token (case-insensitive);
- the share of a full `alignsearch index` run OCR adds: the same folder (half photos, half signs) indexed
  into a fresh index with and without `--ocr`, whole processes, align-base geometry (random weights), median
  of --repeats runs each after a warm-up.
ALIGNSEARCH_BENCH_DRY=1 prints without recording.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import CACHE, align_base_checkpoint, jpeg_corpus, record

from alignsearch.media import ocr
from alignsearch.media.images import open_rgb

# skimage.data.page(), as printed (the last line is cut off by the photo's edge: left out)
PAGE_TEXT = """Region-based segmentation Let us first determine markers of the coins and the background. These
markers are pixels that we can label unambiguously as either object or background. Here, the markers are found
at the two extreme parts of the histogram of grey values: >>> markers = np.zeros_like(coins)"""

SYLLABLES = ["ka", "ri", "mo", "zan", "zi", "bar", "lis", "bo", "a", "ter", "na", "ve", "lo", "qui", "sto", "pel",
             "mar", "den", "tu", "ro", "fa", "gel"]


def words_of(text: str) -> list[str]:
    return [w.lower() for w in re.findall(r"\w+", text)]


def sign(rng: np.random.Generator, i: int, out: Path):
    """A sign of 2-4 lines of made-up words and codes; returns (path, words drawn)."""
    from PIL import Image, ImageDraw, ImageFont

    size = int(rng.choice([14, 18, 24, 32, 48]))
    lines = []
    for _ in range(int(rng.integers(2, 5))):
        line = []
        for _ in range(int(rng.integers(1, 4))):
            if rng.random() < 0.25:
                line.append(f"{''.join(rng.choice(list('ABCDEFGHKMNPRSTX'), 3))}-{int(rng.integers(100, 99999))}")
            else:
                word = "".join(rng.choice(SYLLABLES, int(rng.integers(2, 4))))
                line.append(word.capitalize() if rng.random() < 0.5 else word.upper())
        lines.append(" ".join(line))
    font = ImageFont.load_default(size=size)
    width = max(int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(s, font=font)) for s in lines) + 40
    height = int(size * 1.6) * len(lines) + 40
    if i % 3 == 0:  # on a photo: a camera-size picture with the sign pasted in
        canvas = Image.open(sorted(jpeg_corpus(6, seed=7).glob("*.jpg"))[i % 6]).convert("RGB")
    else:
        canvas = Image.new("RGB", (max(width, 320), max(height, 200)), tuple(int(c) for c in rng.integers(200, 256, 3)))
    board = Image.new("RGB", (width, height), tuple(int(c) for c in rng.integers(215, 256, 3)))
    draw = ImageDraw.Draw(board)
    for n, text in enumerate(lines):
        draw.text((20, 20 + int(size * 1.6) * n), text, fill=tuple(int(c) for c in rng.integers(0, 60, 3)), font=font)
    canvas.paste(board, (int(rng.integers(0, max(1, canvas.width - width))), int(rng.integers(0, max(1, canvas.height - height)))))
    path = out / f"sign{i:03d}.png"
    canvas.save(path)
    return path, words_of(" ".join(lines))


def rate(images) -> tuple[float, list[float], list[str]]:
    """Images per CPU-second (one thread: the wall time of one quiet core; the CPU time is what a busy shared
    machine cannot inflate), each image's CPU seconds, the texts."""
    times, texts = [], []
    for image in images:
        t0 = time.process_time()
        texts.append(ocr.read_text(image))
        times.append(time.process_time() - t0)
    return len(images) / sum(times), times, texts


def recall(texts: list[str], present: list[list[str]]) -> tuple[int, int]:
    found = total = 0
    for text, words in zip(texts, present):
        got = set(words_of(text))
        want = set(words)
        found += len(want & got)
        total += len(want)
    return found, total


def index_runs(folder: Path, model: Path, repeats: int) -> dict:
    def once(*extra) -> tuple[float, dict]:
        with tempfile.TemporaryDirectory() as ix:
            cmd = [sys.executable, "-m", "alignsearch", "index", str(folder), "--index", ix, "--model", str(model),
                   "--device", "cpu", "--json", *extra]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode:
                raise SystemExit(proc.stderr[-3000:])
            return time.perf_counter() - t0, json.loads(proc.stdout)

    once()  # warm-up: the ONNX export of the model, the page cache
    plain, with_ocr, ocr_seconds = [], [], []
    for _ in range(repeats):  # alternated, so a busy moment hits both
        plain.append(once()[0])
        t, summary = once("--ocr")
        with_ocr.append(t)
        ocr_seconds.append(summary["times"]["ocr"])
    return {"plain": statistics.median(plain), "ocr": statistics.median(with_ocr), "runs_plain": plain,
            "runs_ocr": with_ocr, "ocr_worker_seconds": statistics.median(ocr_seconds)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--signs", type=int, default=24)
    ap.add_argument("--photos", type=int, default=24)
    ap.add_argument("--index-images", type=int, default=32, help="images in the indexed folder (half signs)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--skip-index", action="store_true", help="OCR alone, no `alignsearch index` runs")
    args = ap.parse_args()

    work = CACHE / "ocr-signs"
    work.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    signs = [sign(rng, i, work) for i in range(args.signs)]
    photos = sorted(jpeg_corpus(args.photos).glob("*.jpg"))
    sign_images = [open_rgb(p.read_bytes())[0] for p, _ in signs]
    photo_images = [open_rgb(p.read_bytes())[0] for p in photos]
    t0 = time.perf_counter()
    ocr.read_text(sign_images[0])  # loads the engine (reported apart)
    load = time.perf_counter() - t0

    photo_rate, photo_times, photo_texts = rate(photo_images)
    sign_rate, sign_times, sign_texts = rate(sign_images)
    found, total = recall(sign_texts, [w for _, w in signs])
    lines = [
        (f"- engine: RapidOCR {_version()} (PP-OCR det + rec on ONNX Runtime, 1 thread), detector side "
         f"{ocr.DET_SIDE}, confidence >= {ocr.MIN_CONFIDENCE}; engine load {load:.2f} s once per worker"),
        (f"- photos without text ({len(photo_images)}, 640x480 to 4000x3000, decoded beforehand): "
         f"{photo_rate:.2f} images per CPU-second (median {statistics.median(photo_times) * 1000:.0f} ms); "
         f"text read in {sum(1 for t in photo_texts if t)} of them"),
        (f"- rendered signs ({len(sign_images)}, 14-48 px text, a third pasted on photos): {sign_rate:.2f} images "
         f"per CPU-second (median {statistics.median(sign_times) * 1000:.0f} ms); words found {found}/{total} = "
         f"{found / total:.3f}"),
    ]
    try:
        import skimage.data
        from PIL import Image

        page = Image.fromarray(skimage.data.page()).convert("RGB")
        got = ocr.read_text(page)
        want = set(words_of(PAGE_TEXT))
        hit = len(want & set(words_of(got)))
        lines.append(f"- scikit-image's photographed page (skimage.data.page, 384x191): words found {hit}/{len(want)} "
                     f"= {hit / len(want):.3f}; skimage.data.text (handwritten formulas, no words): "
                     f"{ocr.read_text(Image.fromarray(skimage.data.text()).convert('RGB'))!r}")
    except ImportError:
        lines.append("- scikit-image not installed: its photographed page was not measured")

    if not args.skip_index:
        folder = CACHE / f"ocr-index-{args.index_images}"
        folder.mkdir(parents=True, exist_ok=True)
        half = args.index_images // 2
        for i, p in enumerate(sorted(jpeg_corpus(half, seed=3).glob("*.jpg"))):
            target = folder / f"photo{i:03d}.jpg"
            if not target.exists():
                target.symlink_to(p)
        for i in range(args.index_images - half):
            target = folder / f"sign{i:03d}.png"
            if not target.exists():
                target.symlink_to(signs[i % len(signs)][0])
        model = align_base_checkpoint()
        runs = index_runs(folder, model, args.repeats)
        added = runs["ocr"] - runs["plain"]
        lines.append(
            f"- `alignsearch index` of {args.index_images} images ({half} camera-size photos, the rest signs), "
            f"align-base geometry, fresh index, median of {args.repeats}: {runs['plain']:.1f} s without OCR, "
            f"{runs['ocr']:.1f} s with `--ocr` (+{added:.1f} s, {added / runs['plain'] * 100:.0f}% more; OCR "
            f"{runs['ocr_worker_seconds']:.1f} s in the decode worker); runs {[round(t, 1) for t in runs['runs_plain']]} "
            f"/ {[round(t, 1) for t in runs['runs_ocr']]}")
    lines.append(f"- load average at the end (other processes on the machine): {os.getloadavg()[0]:.1f}")
    record("Text in images: OCR cost and words found (bench_ocr)", lines)


def _version() -> str:
    from importlib.metadata import version

    return version("rapidocr")


if __name__ == "__main__":
    main()
