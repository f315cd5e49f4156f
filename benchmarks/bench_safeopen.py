"""The cost of one guarded read open (alignsearch/safeopen.py: open_under, as the indexer, the fills and the server
open every file), against the previous release's safeopen (git REV, loaded from git in the same run) and a plain
os.open + fstat. The new code walks a followed link one link at a time on O_PATH descriptors and opens the file as
the inode it judged; a plain file should cost no more than before, a link more (only where links are met).

    python benchmarks/bench_safeopen.py [--files 2000] [--repeat 5] [--baseline b15ced5] [--no-save]
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

from common import module_at, record

from alignsearch import safeopen


def plain(root: str, rel: str, follow_last: bool = True) -> int:
    fd = os.open(os.path.join(root, rel), os.O_RDONLY)
    os.fstat(fd)
    return fd


def per_open(fn, root: str, names: list[str], repeat: int) -> float:
    """Median over repeats of the microseconds one open (and close) takes."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        for name in names:
            os.close(fn(root, name, follow_last=True))
        times.append((time.perf_counter() - start) / len(names) * 1e6)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--baseline", default="b15ced5")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    old = module_at(args.baseline, "alignsearch/safeopen.py", "safeopen_old")
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(tmp, "library")
        os.makedirs(os.path.join(root, "album", "2024"))
        files = [os.path.join("album", "2024", f"img{i:05d}.jpg") for i in range(args.files)]
        for rel in files:
            with open(os.path.join(root, rel), "wb") as f:
                f.write(b"\xff\xd8" + os.urandom(64))
        links = []
        for i, rel in enumerate(files):  # the user's own links, in the same folder
            link = os.path.join("album", "2024", f"link{i:05d}.jpg")
            os.symlink(os.path.basename(rel), os.path.join(root, link))
            links.append(link)
        rows = []
        for label, names in (("plain file", files), ("file behind the user's own link", links)):
            figures = {name: per_open(fn, root, names, args.repeat)
                       for name, fn in (("os.open + fstat", plain), (f"safeopen at {args.baseline}", old.open_under),
                                        ("safeopen now", safeopen.open_under))}
            rows.append(f"| {label} | " + " | ".join(f"{v:.1f}" for v in figures.values()) + " |")
    record("Guarded read open (safeopen.open_under), µs per open", [
        f"{args.files} files two folders deep, each opened and closed; median of {args.repeat} passes.",
        "",
        f"| file | os.open + fstat (no checks) | safeopen at {args.baseline} (baseline) | safeopen now |",
        "|---|---|---|---|",
        *rows,
    ], save=not args.no_save)


if __name__ == "__main__":
    main()
