"""Issue 27's target: minutes of video indexed per minute of wall time (>= 10x real time for 720p on 2 cores),
where the time goes, against plain decoding of the same file as the floor.

    python benchmarks/bench_video.py [--minutes 2] [--height 720] [--height 1080] [--full-model]

For each height a H.264 video (30 fps, yuv420p, x264 preset medium, a scene cut every 8 s and motion between
them) is generated once under $ALIGNSEARCH_BENCH_CACHE. Measured on it, each in a fresh process state:
- floor: PyAV decoding every frame (FFmpeg's threads, nothing converted), as `ffmpeg -i f -f null -` does;
- floor without non-reference frames (skip_frame=NONREF, what alignsearch decodes);
- moments: alignsearch.media.video.moments (decode, scene detection on sampled frames, the representative crops);
- index: `alignsearch index` of a folder holding the video, its stage times (decode thread, encoder, write),
  with the tiny random test checkpoint (the video path's own cost) and, with --full-model, align-base's
  geometry with random weights (the real encoder's cost; no hub here).
ALIGNSEARCH_BENCH_DRY=1 prints without recording.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import CACHE, TreeRss, align_base_checkpoint, record

from alignsearch.media.images import ImageSpec
from alignsearch.media.video import moments

FPS = 30
SCENE_SECONDS = 8


def make_video(path: Path, minutes: float, height: int) -> Path:
    """A H.264 video of smooth scenes that drift (motion) with a cut every SCENE_SECONDS."""
    import av
    from PIL import Image, ImageDraw, ImageFilter

    if path.exists():
        return path
    width = height * 16 // 9
    tmp = path.with_suffix(".part.mp4")
    rng = np.random.default_rng(0)
    with av.open(str(tmp), mode="w") as out:
        stream = out.add_stream("libx264", rate=FPS, options={"preset": "medium"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        frames = int(minutes * 60 * FPS)
        scene = None
        for i in range(frames):
            if i % (SCENE_SECONDS * FPS) == 0:
                img = Image.fromarray((rng.random((9, 16, 3)) * 255).astype(np.uint8)).resize(
                    (width + 64, height), Image.BICUBIC)
                draw = ImageDraw.Draw(img)
                for _ in range(8):
                    x, y, r = int(rng.integers(0, width)), int(rng.integers(0, height)), int(rng.integers(height // 12, height // 3))
                    draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
                scene = np.asarray(img.filter(ImageFilter.GaussianBlur(3)))
            shift = (i % (SCENE_SECONDS * FPS)) * 64 // (SCENE_SECONDS * FPS)  # a slow pan across the scene
            frame = np.ascontiguousarray(scene[:, shift : shift + width])
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    tmp.rename(path)
    return path


def decode_floor(path: Path, skip: str | None = None) -> tuple[float, int]:
    import av

    start = time.perf_counter()
    n = 0
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        if skip:
            stream.codec_context.skip_frame = skip
        for _ in container.decode(stream):
            n += 1
    return time.perf_counter() - start, n


def moments_only(path: Path) -> tuple[float, int]:
    spec = ImageSpec((289, 289), 3, None, 1 / 255, False, None, None, None)
    start = time.perf_counter()
    n = sum(1 for _ in moments(str(path), spec))
    return time.perf_counter() - start, n


def index_run(path: Path | list[Path], model: Path, extra: tuple = (), env: dict | None = None) -> dict:
    """`alignsearch index` of a fresh folder linking the video(s) (extra: more options) into a fresh index: its wall
    time, the summary's video stage times and the peak RSS of its process tree (the index process and any
    decode worker, summed; sampled); env: more environment for it (PYTHONPATH: another version's code)."""
    paths = path if isinstance(path, list) else [path]
    with tempfile.TemporaryDirectory(prefix="bench-video-") as tmp:
        folder = Path(tmp) / "lib"
        folder.mkdir()
        for p in paths:
            os.symlink(p, folder / p.name)  # a file symlink is followed, the video is not copied
        cmd = [sys.executable, "-m", "alignsearch", "index", str(folder), "--index", str(Path(tmp) / "ix"), "--model",
               str(model), "--device", "cpu", "--json", *extra]
        start = time.perf_counter()
        with TreeRss() as rss:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
            rss.watch(proc.pid)
            out, err = proc.communicate()
        wall = time.perf_counter() - start
        if proc.returncode:
            raise SystemExit(err[-2000:])
        summary = json.loads(out)
    return {"wall": wall, "peak_rss": rss.peak, **summary["times"]["extra"],
            "encoder": summary["encoder"].get("image_backend") or summary["encoder"].get("backend")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=2.0)
    ap.add_argument("--height", type=int, action="append")
    ap.add_argument("--full-model", action="store_true", help="also index with align-base's geometry (slow)")
    args = ap.parse_args()
    from tiny_align import build_tiny_align

    tiny = CACHE / "tiny-align"
    if not (tiny / "config.json").exists():
        build_tiny_align(tiny)
    models = [("tiny test checkpoint", tiny)] + ([("align-base geometry, random weights", align_base_checkpoint())]
                                                 if args.full_model else [])
    lines = []
    for height in args.height or [720]:
        path = make_video(CACHE / f"video-{height}p-{args.minutes:g}min.mp4", args.minutes, height)
        seconds = args.minutes * 60
        floor, frames = decode_floor(path)
        floor_nonref, kept = decode_floor(path, "NONREF")
        found_s, found = moments_only(path)

        def rt(s: float, seconds: float = seconds) -> str:
            return f"{seconds / s:.1f}x real time ({seconds / 60 / (s / 60):.1f} video min/min)"

        lines += [(f"- {height}p H.264 {FPS} fps, {args.minutes:g} min ({path.stat().st_size / 2**20:.1f} MiB), "
                   f"cut every {SCENE_SECONDS} s:"),
                  f"  - floor, every frame decoded (PyAV, FFmpeg threads): {floor:.2f} s, {frames / floor:.0f} fps, {rt(floor)}",
                  f"  - decoded without non-reference frames: {floor_nonref:.2f} s ({kept} of {frames} frames), {rt(floor_nonref)}",
                  f"  - moments (decode + scene detection + crops): {found_s:.2f} s, {found} moments, {rt(found_s)}"]
        for name, model in models:
            r = index_run(path, model)
            lines.append(f"  - `alignsearch index`, {name} ({r['encoder']}): {r['wall']:.2f} s wall with model load, "
                         f"{rt(r['wall'])}; video pass: decode wait {r['video_decode']:.2f} s, encode "
                         f"{r['video_encode']:.2f} s, write {r['video_write']:.2f} s, {r['moments']} moments; "
                         f"video pass alone {rt(r['video_decode'] + r['video_encode'] + r['video_write'])}")
    record(f"Video indexing, {args.minutes:g} min H.264, CPU", lines)


if __name__ == "__main__":
    main()
