"""The cost of recording the drives mounted inside a root (indexer/scan.py scan_folder's `mounts=`: one lstat per
folder listed, none per file) on a listing of many folders: scan_folder as it was before the record (git
BASELINE, loaded from git in the same run), and now without and with `mounts`; and with `mounts` and
`captions_since` (a folder root's listing by `index`), as --captions-baseline had it (an lstat of each folder for
each) and now (one for both). Warm cache; the median of passes, each pass listing the whole tree once per variant,
in an order turned each pass.

    python benchmarks/bench_mounts.py [--folders 20000] [--files-per-folder 1] [--repeat 15] [--baseline efe5e2f^]
                                      [--captions-baseline 183c476]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import load_note, module_at, record

from indexer import scan


def tree(root: str, folders: int, files: int) -> None:
    """`folders` folders, 100 to a parent folder (year/album as a photo library has them), `files` small JPEG
    names in each."""
    for i in range(folders):
        folder = os.path.join(root, f"y{i // 100:04d}", f"a{i % 100:02d}")
        os.makedirs(folder)
        for j in range(files):
            with open(os.path.join(folder, f"img{j:03d}.jpg"), "wb") as f:
                f.write(b"\xff\xd8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", default="efe5e2f^", help="scan.py before the record (git revision)")
    ap.add_argument("--captions-baseline", default="183c476",
                    help="scan.py asking each folder's lstat twice with mounts and captions (git revision)")
    ap.add_argument("--folders", type=int, default=20_000)
    ap.add_argument("--files-per-folder", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=15, help="passes; the median is reported")
    ap.add_argument("--no-save", action="store_true", help="print only, RESULTS.md untouched")
    args = ap.parse_args()
    loaded = os.getloadavg()[0]
    old = module_at(args.baseline, "indexer/scan.py", "scan_old")
    twice = module_at(args.captions_baseline, "indexer/scan.py", "scan_twice")
    since = time.time() + 3600  # no caption flagged: the folders' lstats alone differ
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(tmp, "library")
        tree(root, args.folders, args.files_per_folder)
        variants = {f"before the record ({args.baseline})": lambda: list(old.scan_folder(root, errors=[])),
                    "now, mounts not asked": lambda: list(scan.scan_folder(root, errors=[])),
                    "now, mounts recorded": lambda: list(scan.scan_folder(root, errors=[], mounts={})),
                    f"mounts and captions, two lstats ({args.captions_baseline})":
                        lambda: list(twice.scan_folder(root, errors=[], mounts={}, captions_since=since)),
                    "now, mounts and captions": lambda: list(scan.scan_folder(root, errors=[], mounts={},
                                                                              captions_since=since))}
        for fn in variants.values():  # warm the cache, and every variant finds every file
            assert len(fn()) == args.folders * args.files_per_folder
        times: dict[str, list[float]] = {name: [] for name in variants}
        names = list(variants)
        for i in range(args.repeat):  # the order turned each pass: no variant always first after another's
            for name in names[i % len(names):] + names[:i % len(names)]:
                fn = variants[name]
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    base = next(iter(medians.values()))
    record(f"Listing {args.folders:,} folders with and without the record of drives mounted inside a root", [
        f"{args.folders:,} folders ({args.folders // 100} of 100), {args.files_per_folder} file each, warm cache; "
        f"indexer/scan.py scan_folder, median of {args.repeat} passes.",
        "",
        "| scan_folder | seconds | vs before |",
        "|---|---|---|",
        *(f"| {name} | {m:.3f} | {m / base - 1:+.1%} |" for name, m in medians.items()),
        "",
        f"Recorded vs not asked, the same code: {(medians['now, mounts recorded'] - medians['now, mounts not asked']) / args.folders * 1e6:+.2f} µs a folder.",
        f"Mounts and captions, one lstat a folder vs two: {(medians['now, mounts and captions'] - medians[names[3]]) / args.folders * 1e6:+.2f} µs a folder.",
        load_note(loaded),
    ], save=not args.no_save)


if __name__ == "__main__":
    main()
