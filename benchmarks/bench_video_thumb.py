"""The web page's picture of a video moment far past its keyframe (alignsearch/media/video.py frame_at), before
and after its run-up was bounded, in the same run.

    python benchmarks/bench_video_thumb.py [--runs 3] [--baseline f42597d]

H.264 videos with a single keyframe (a screen recording's), made with PyAV (libx264, 3 B-frames, 25 fps), each
frame showing its number in binary (tests/helpers.make_numbered_video; flat, so cheap to decode): ten minutes
at 128x48 and 90 s at 1280x720; and 90 s at 1280x720 of moving noise (costly to decode) with the number in a
band at its top. The picture of the last moment of each (t = end - 1 s, half a second in) is drawn by
--baseline's frame_at (decoding every frame from the keyframe) and by this one's (non-reference frames skipped
until a second before, THUMB_RUNUP_SECONDS at most), alternating; medians of --runs, and which frame each showed
against the frame at that time. ALIGNSEARCH_BENCH_DRY=1 prints without recording.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from common import CACHE, load_note, module_at, record
from helpers import encode_pictures, frame_number, make_numbered_video, numbered_picture

from alignsearch.media import video


def made(name: str, frames: int, size) -> Path:
    path = CACHE / "video-thumb" / name
    if not path.exists():
        tmp = path.with_suffix(".part" + path.suffix)
        make_numbered_video(tmp, frames, fps=25, b_frames=3, gop=frames, size=size)
        tmp.rename(path)
    return path


def noisy(name: str, frames: int) -> Path:
    """Moving noise at 1280x720 (ultrafast), its frame number in a 48 px band at the top."""
    import av
    import numpy as np

    path = CACHE / "video-thumb" / name
    if path.exists():
        return path
    tmp = path.with_suffix(".part" + path.suffix)
    noise = (np.random.default_rng(0).random((720, 2560, 3)) * 255).astype(np.uint8)

    def picture(n: int) -> np.ndarray:
        shifted = np.ascontiguousarray(noise[:, 8 * n % 1280:8 * n % 1280 + 1280])
        shifted[:48] = numbered_picture(n, (1280, 48))
        return shifted

    with av.open(str(tmp), mode="w") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 1280, 720, "yuv420p"
        stream.options = {"bf": "3", "g": str(frames), "keyint_min": str(frames), "sc_threshold": "0",
                          "preset": "ultrafast"}
        encode_pictures(out, stream, (picture(n) for n in range(frames)))
    tmp.rename(path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--baseline", default="f42597d")
    args = ap.parse_args()
    old = module_at(args.baseline, "alignsearch/media/video.py", "video_old")
    load = os.getloadavg()[0]
    cases = [("10 min, 128x48", made("ten-minutes-128x48.mkv", 600 * 25, (128, 48)), 599.0),
             ("90 s, 1280x720", made("ninety-seconds-720p.mkv", 90 * 25, (1280, 720)), 89.0),
             ("90 s, 1280x720 noise", noisy("ninety-seconds-720p-noise.mkv", 90 * 25), 89.0)]
    lines = [f"Medians of {args.runs} runs, alternating; frame: the number shown / the frame at that time.", "",
             "| video | moment at | before (s) | frame | now (s) | frame |", "|---|---|---|---|---|---|"]
    for name, path, t in cases:
        want = math.ceil((t + video.REPRESENTATIVE_AFTER) * 25)
        times = {"old": [], "new": []}
        shown = {}
        for _ in range(args.runs):
            for key, module in (("old", old), ("new", video)):
                start = time.perf_counter()
                picture = module.frame_at(str(path), t, t + 10)
                times[key].append(time.perf_counter() - start)
                shown[key] = frame_number(picture.crop((0, 0, picture.width, 48)))
        lines.append(f"| {name} | {t:.0f} s | {statistics.median(times['old']):.2f} | {shown['old']}/{want} | "
                     f"{statistics.median(times['new']):.2f} | {shown['new']}/{want} |")
    lines += ["", f"THUMB_RUNUP_SECONDS = {video.THUMB_RUNUP_SECONDS}", load_note(load)]
    record(f"A video moment's picture far past its only keyframe (bench_video_thumb, baseline {args.baseline})", lines)


if __name__ == "__main__":
    main()
