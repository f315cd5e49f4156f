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
--before REV adds a third column, the worker as REV's code starts it (git archive of REV's alignsearch/ and
indexer/, on PYTHONPATH for its runs and its decode alone, in a child process then), in the same run: the baseline
for a change to how the worker starts.
ALIGNSEARCH_BENCH_DRY=1 prints without recording.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
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


DECODE_ONLY = r"""
import contextlib, json, sys, time
from pathlib import Path

def main(way, paths):
    # imported here, not at the top: a spawn worker runs this file's top again (as __mp_main__)
    from alignsearch.media.images import ImageSpec
    from indexer import videos
    from indexer.scan import Found
    from indexer.videos import _threaded, decode_moments
    from indexer.workers import StreamWorker

    spec = ImageSpec((289, 289), 3, None, 1 / 255, False, None, None, None)
    first, n = None, 0
    t0 = time.perf_counter()
    if way == "in-process":
        worker = contextlib.nullcontext()
    else:  # as the run's video pass starts it: videos.decoder where the code has it, else a StreamWorker at first use
        worker = videos.decoder(1, 32) if hasattr(videos, "decoder") else StreamWorker(32)
    with worker:
        for path in map(Path, paths):
            args = (Found(str(path.parent), path.name, path.stat().st_size, path.stat().st_mtime), spec, 10.0)
            for _ in worker.stream(decode_moments, args) if way != "in-process" else _threaded(decode_moments(*args), 32):
                n += 1
                first = first if first is not None else time.perf_counter() - t0
    print(json.dumps({"first": first, "all": time.perf_counter() - t0, "moments": n}))

if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
"""


def decode_only(paths: list[Path], way: str, env: dict | None = None) -> dict:
    """The corpus's moments decoded the way a run's video pass takes them (indexer.videos: decode_moments in a
    fresh decode worker, or in _threaded, the --workers 0 path), nothing encoded or written, in a child process
    whose own imports are done before the clock starts: seconds to the first moment (the worker's start and
    imports) and to the last. env: PYTHONPATH for another version's code."""
    with tempfile.TemporaryDirectory(prefix="bench-decode-") as tmp:
        script = Path(tmp) / "decode_only.py"
        script.write_text(DECODE_ONLY)
        out = subprocess.run([sys.executable, str(script), way, *map(str, paths)], capture_output=True, text=True,
                             check=True, env={**os.environ, **(env or {})}).stdout
    return json.loads(out.splitlines()[-1])


def old_tree(rev: str, into: Path) -> Path:
    """REV's alignsearch/ and indexer/ (git archive) under into: PYTHONPATH for a run of REV's code."""
    root = Path(__file__).resolve().parent.parent
    archive = subprocess.run(["git", "archive", rev, "alignsearch", "indexer"], capture_output=True, check=True,
                             cwd=root).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=24.0)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--before", metavar="REV", help="add the worker as REV's code starts it (git rev)")
    args = ap.parse_args()
    from tiny_align import build_tiny_align

    tiny = CACHE / "tiny-align"
    if not (tiny / "config.json").exists():
        build_tiny_align(tiny)
    load_at_start = os.getloadavg()[0]
    paths = corpus(args.videos, args.seconds)
    ways = {"worker": ("--workers", "1"), "in-process": ("--workers", "0")}
    envs: dict[str, dict | None] = {w: None for w in ways}
    keep = tempfile.TemporaryDirectory(prefix="bench-before-")
    if args.before:
        ways["before"] = ("--workers", "1")
        envs["before"] = {"PYTHONPATH": os.pathsep.join(
            [str(old_tree(args.before, Path(keep.name))), str(Path(__file__).resolve().parent.parent / "tests")])}
    runs: dict[str, list[dict]] = {w: [] for w in ways}
    for way in ways:  # warms the page cache and Python's bytecode cache, not counted
        index_run(paths, tiny, ways[way], envs[way])
    for i in range(args.runs):
        for way in (list(ways) if i % 2 == 0 else list(ways)[::-1]):
            runs[way].append(index_run(paths, tiny, ways[way], envs[way]))
            r = runs[way][-1]
            print(f"{way}: {r['wall']:.2f} s, decode wait {r['video_decode']:.2f} s, {r['moments']} moments, "
                  f"peak RSS {r['peak_rss'] / 2**20:.0f} MiB", flush=True)

    alone: dict[str, list[dict]] = {w: [] for w in ways}
    for i in range(args.runs):
        for way in (list(ways) if i % 2 == 0 else list(ways)[::-1]):
            alone[way].append(decode_only(paths, way, envs[way]))
    keep.cleanup()

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
    labels = [("in-process", "a thread of the index process (`--workers 0`, baseline)")]
    if args.before:
        labels.append(("before", f"one StreamWorker process as {args.before} starts it (`--workers 1`)"))
    labels.append(("worker", f"one StreamWorker process (default, `--workers 1` here){', this commit' * bool(args.before)}"))
    for way, label in labels:
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
    if args.before:
        paired = [w["wall"] - b["wall"] for w, b in zip(runs["worker"], runs["before"])]
        lines.append(f"- worker minus before ({args.before}): {med('worker', 'wall') - med('before', 'wall'):+.2f} s "
                     f"wall (medians); median of the {len(paired)} paired differences {statistics.median(paired):+.2f} s,"
                     f" {sum(d < 0 for d in paired)} of {len(paired)} faster now; "
                     f"{(med('worker', 'peak_rss') - med('before', 'peak_rss')) / 2**20:+.0f} MiB peak RSS")
    lines.append("- the decode alone, in a child process (decode_moments through a fresh decode worker as the video pass "
                 "starts it, or _threaded as `--workers 0`; nothing encoded or written), medians: "
                 + "; ".join(f"{way}: first moment after {statistics.median(r['first'] for r in alone[way]):.2f} s, "
                             f"all {alone[way][0]['moments']} after {statistics.median(r['all'] for r in alone[way]):.2f} s"
                             for way in ways))
    lines.append(load_note(load_at_start))
    record(f"Video decode in a StreamWorker process vs in the index process, {args.videos} short videos", lines)


if __name__ == "__main__":
    main()
