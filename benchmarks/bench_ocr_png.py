"""Decoding a large PNG twice for `index --ocr`: what the second decode costs next to the rest.

    python benchmarks/bench_ocr_png.py [--repeats 5]

A decode worker reading text (indexer/decode.py read_item with ocr) decodes an image for the encoder, which
box-reduces a PNG whose shorter side is at least 2x2 times the model's input (align-base: 289 px, so from
1156 px: 2560x1440 and 2880x1800 screenshots, 4000x3000 photos), then decodes it again whole for the text
reader (_read_text_whole). Timed per image, median of --repeats after a warm-up, one thread as in one worker:
the encoder's decode (decode), the second whole decode (open_rgb), the OCR of the whole image, and read_item's
pixel work with OCR: decoded twice (decode, then _read_text_whole: the path before bench_ocr_png's fix, the
baseline) and decoded once (decode keeping the image whole, as read_item now does), alternating.
ALIGNSEARCH_BENCH_DRY=1 prints without recording.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import load_note, record

from alignsearch.media import ocr
from alignsearch.media.images import ImageSpec, decode, open_rgb
from indexer import decode as decode_mod

SPEC = ImageSpec((289, 289), Image.BICUBIC, None, 1 / 255, False, None, None, None)  # align-base's input


def screenshot(size) -> bytes:
    """A screenshot-like PNG: flat panels and lines of dark text on light ground."""
    w, h = size
    img = Image.new("RGB", size, (245, 245, 240))
    draw = ImageDraw.Draw(img)
    draw.rectangle([0, 0, w, 60], fill=(40, 60, 90))
    font = ImageFont.load_default(size=24)
    for row, y in enumerate(range(100, h - 40, 48)):
        draw.text((40, y), f"Invoice INV-{4711 + row} total {row * 37 % 1000}.50 EUR zanzibar spice", fill="black",
                  font=font)
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def photo(size) -> bytes:
    """A photo-like PNG (smooth colour with grain): PNG compresses it poorly, as it does a camera's picture."""
    w, h = size
    rng = np.random.default_rng(0)
    small = Image.fromarray((rng.random((12, 16, 3)) * 255).astype(np.uint8)).resize(size, Image.BICUBIC)
    grain = rng.integers(-6, 7, (h, w, 3))
    img = Image.fromarray(np.clip(np.asarray(small, dtype=np.int16) + grain, 0, 255).astype(np.uint8))
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def timed(fn, repeats: int) -> float:
    """The median of `repeats` runs after a warm-up; with 0, one run (no warm-up)."""
    if repeats == 0:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    fn()  # warm-up
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    load = os.getloadavg()[0]
    ocr.read_text(open_rgb(screenshot((320, 120)))[0])  # the engine loads once, as in a worker
    cases = [("screenshot 1920x1080 (not reduced)", screenshot((1920, 1080))),
             ("screenshot 2560x1440", screenshot((2560, 1440))),
             ("screenshot 2880x1800", screenshot((2880, 1800))),
             ("photo 4000x3000", photo((4000, 3000)))]
    lines = ["One image at a time, one thread; median seconds of %d runs after a warm-up." % args.repeats, "",
             "| PNG | MB | decode (encoder) | second decode (whole) | OCR | decoded twice + text (before) | "
             "decoded once + text (now) | now vs before |",
             "|---|---|---|---|---|---|---|---|"]
    for name, data in cases:
        whole = open_rgb(data)[0]
        img = decode(data, SPEC)
        reduced = max(img.image.size) < max(img.width, img.height)
        t_decode = timed(lambda: decode(data, SPEC), args.repeats)
        t_second = timed(lambda: open_rgb(data), args.repeats) if reduced else 0.0
        t_ocr = timed(lambda: ocr.read_text(whole), args.repeats)
        def twice():
            decode_mod._read_text_whole(data, decode(data, SPEC), 10**9, name)

        def once():
            kept = decode(data, SPEC, keep_whole=True)
            decode_mod.read_text(kept.whole if kept.whole is not None else kept.image, name)

        t_twice, t_once = [], []
        for _ in range(args.repeats):  # alternating: both share the machine's load
            t_twice.append(timed(twice, 0))
            t_once.append(timed(once, 0))
        t_twice, t_once = statistics.median(t_twice), statistics.median(t_once)
        lines.append(f"| {name} | {len(data) / 1e6:.1f} | {t_decode:.3f} | {t_second:.3f} | {t_ocr:.3f} | "
                     f"{t_twice:.3f} | {t_once:.3f} | {t_once / t_twice - 1:+.1%} |")
    lines += ["", load_note(load)]
    record("A large PNG decoded twice for index --ocr (bench_ocr_png)", lines)


if __name__ == "__main__":
    main()
