"""What decoding a run's videos in a StreamWorker process costs (indexer/workers.py, the default since a decoder
crash became a failed video rather than the end of the run), against decoding them in a thread of the index
process (`--workers 0`, the path every run took before), in the same run.

    python benchmarks/bench_video_worker.py [--videos 4] [--seconds 24] [--runs 7]

A small corpus of H.264 videos (tests/helpers.make_video: 640x360, 15 fps, a cut every 4 s, drifting scenes) is
made once under $ALIGNSEARCH_BENCH_CACHE; each run is a whole `alignsearch index` process (tiny random test
checkpoint, cpu) of a fresh folder linking them into a fresh index, the two ways alternating. Medians of the
wall time (process start and model load included), the summary's video decode wait, and the peak RSS of the
process tree (index process + decode worker, summed; sampled every 20 ms). Then, as many times each, the decode
alone in this process, as the video pass takes it (decode_moments through a fresh StreamWorker or through
_threaded): seconds to the first moment (where the worker's start shows) and to the last.
ALIGNSEARCH_BENCH_DRY=1 prints without recording.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_video import index_run
from common import CACHE, load_note, record

SIZE, FPS, SCENE = (640, 360), 15, 4.0


def corpus(videos: int, seconds: float) -> list[Path]:
    from helpers import make_video

    out = CACHE / f"videos-{videos}x{seconds:g}s-{SIZE[0]}x{SIZE[1]}"
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for v in range(videos):
        path = out / f"clip{v:02d}.mp4"
        if not path.exists():
            part = out / f"clip{v:02d}.part.mp4"
            make_video(part, [(v * 100 + s, SCENE) for s in range(int(seconds // SCENE))], fps=FPS, size=SIZE)
            part.rename(path)
        paths.append(path)
    return paths


def decode_only(paths: list[Path], way: str) -> dict:
    """The corpus's moments decoded the way a run's video pass takes them (indexer.videos: decode_moments in a
    fresh StreamWorker, or in _threaded, the --workers 0 path), nothing encoded or written, in this process:
    seconds to the first moment (the worker's start and imports) and to the last."""
    from alignsearch.media.images import ImageSpec
    from indexer.scan import Found
    from indexer.videos import _threaded, decode_moments
    from indexer.workers import StreamWorker

    spec = ImageSpec((289, 289), 3, None, 1 / 255, False, None, None, None)
    first, n = None, 0
    t0 = time.perf_counter()
    with StreamWorker(32) if way == "worker" else contextlib.nullcontext() as worker:
        for path in paths:
            args = (Found(str(path.parent), path.name, path.stat().st_size, path.stat().st_mtime), spec, 10.0)
            for _ in worker.stream(decode_moments, args) if worker else _threaded(decode_moments(*args), 32):
                n += 1
                first = first if first is not None else time.perf_counter() - t0
    return {"first": first, "all": time.perf_counter() - t0, "moments": n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=24.0)
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    from tiny_align import build_tiny_align

    tiny = CACHE / "tiny-align"
    if not (tiny / "config.json").exists():
        build_tiny_align(tiny)
    load_at_start = os.getloadavg()[0]
    paths = corpus(args.videos, args.seconds)
    ways = {"worker": ("--workers", "1"), "in-process": ("--workers", "0")}
    runs: dict[str, list[dict]] = {w: [] for w in ways}
    index_run(paths, tiny, ways["worker"])  # warms the page cache and Python's bytecode cache, not counted
    for i in range(args.runs):
        for way in (list(ways) if i % 2 == 0 else list(ways)[::-1]):
            runs[way].append(index_run(paths, tiny, ways[way]))
            r = runs[way][-1]
            print(f"{way}: {r['wall']:.2f} s, decode wait {r['video_decode']:.2f} s, {r['moments']} moments, "
                  f"peak RSS {r['peak_rss'] / 2**20:.0f} MiB", flush=True)

    alone: dict[str, list[dict]] = {w: [] for w in ways}
    for i in range(args.runs):
        for way in (list(ways) if i % 2 == 0 else list(ways)[::-1]):
            alone[way].append(decode_only(paths, way))

    def med(way: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[way])

    moments = {r["moments"] for rs in runs.values() for r in rs}
    lines = [f"- corpus: {args.videos} H.264 videos of {args.seconds:g} s, {SIZE[0]}x{SIZE[1]} {FPS} fps, a cut every "
             f"{SCENE:g} s (tests/helpers.make_video), {sorted(moments)} moments a run; tiny random test checkpoint, cpu",
             f"- runs: {args.runs} of each, alternating, each a whole `alignsearch index` process into a fresh index "
             "(process start and model load included); medians"]
    lines.append("")
    lines.append("| decode | wall s | video decode wait s | video encode s | peak RSS MiB (process tree) |")
    lines.append("|---|---|---|---|---|")
    for way, label in (("in-process", "a thread of the index process (`--workers 0`, baseline)"),
                       ("worker", "one StreamWorker process (default, `--workers 1` here)")):
        lines.append(f"| {label} | {med(way, 'wall'):.2f} | {med(way, 'video_decode'):.2f} | "
                     f"{med(way, 'video_encode'):.2f} | {med(way, 'peak_rss') / 2**20:.0f} |")
    lines.append("")
    for way in ways:
        lines.append(f"- all {way} walls: " + ", ".join(f"{r['wall']:.2f}" for r in runs[way]))
    paired = [w["wall"] - b["wall"] for w, b in zip(runs["worker"], runs["in-process"])]
    lines.append(f"- worker minus in-process: {med('worker', 'wall') - med('in-process', 'wall'):+.2f} s wall (medians); "
                 f"median of the {len(paired)} paired differences (run i of each, back to back) "
                 f"{statistics.median(paired):+.2f} s, {sum(d > 0 for d in paired)} of {len(paired)} slower with the "
                 f"worker; {(med('worker', 'peak_rss') - med('in-process', 'peak_rss')) / 2**20:+.0f} MiB peak RSS")
    lines.append("- the decode alone, in the bench process (decode_moments through a fresh StreamWorker, or _threaded as "
                 "`--workers 0`; nothing encoded or written), medians: "
                 + "; ".join(f"{way}: first moment after {statistics.median(r['first'] for r in alone[way]):.2f} s, "
                             f"all {alone[way][0]['moments']} after {statistics.median(r['all'] for r in alone[way]):.2f} s"
                             for way in ("in-process", "worker")))
    lines.append(load_note(load_at_start))
    record(f"Video decode in a StreamWorker process vs in the index process, {args.videos} short videos", lines)


if __name__ == "__main__":
    main()
