"""The cost of telling a file whose status changed (ctime later than its row's listing: indexer/scan.py
status_changed) on a listing with nothing changed, and of confirming those whose status did change.

Lists a library of --files small JPEG names (100 to a folder) and diffs it with rows that match every file, as
`index` does on a run that finds nothing to do: scan.py as it was before the check (git BASELINE, loaded from git in
the same run) and now. Then the price of a `chmod -R` of the library: every file's status changed, each hashed once
(scan.confirm) instead of decoded and encoded again. Warm cache; medians of passes in an order turned each pass.

    python benchmarks/bench_status_change.py [--files 20000] [--repeat 15] [--baseline 4715f7a]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import load_note, module_at, record

from indexer import scan


def library(root: str, files: int, size: int) -> None:
    for i in range(files):
        folder = os.path.join(root, f"a{i // 100:04d}")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"img{i % 100:03d}.jpg"), "wb") as f:
            f.write(b"\xff\xd8" + os.urandom(size - 2))


def rows_of(found, indexed_at: float, sha: dict) -> dict:
    """A row matching each listed file, as the catalog holds them (files_under's FileRow: the fields diff reads)."""
    return {f.relpath: SimpleNamespace(id=i, relpath=f.relpath, size=f.size, mtime=f.mtime, status="indexed",
                                       reason=None, indexed_at=indexed_at, sha256=sha.get(f.relpath))
            for i, f in enumerate(found)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", default="4715f7a", help="scan.py before the status check (git revision)")
    ap.add_argument("--files", type=int, default=20_000)
    ap.add_argument("--file-bytes", type=int, default=200_000, help="each file's size (a camera JPEG: ~3 MB)")
    ap.add_argument("--repeat", type=int, default=15, help="passes; the median is reported")
    ap.add_argument("--no-save", action="store_true", help="print only, RESULTS.md untouched")
    args = ap.parse_args()
    loaded = os.getloadavg()[0]
    old = module_at(args.baseline, "indexer/scan.py", "scan_old")
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(tmp, "library")
        library(root, args.files, args.file_bytes)
        later = time.time() + 3600  # every row listed after every file last changed: nothing to do
        listed = list(scan.scan_folder(root, errors=[]))
        sha = {f.relpath: scan.content_sha256(f) for f in listed}

        def run(module):
            found = list(module.scan_folder(root, errors=[]))
            d = module.diff(found, rows_of(found, later, sha))
            assert not d.todo and d.unchanged == args.files and not getattr(d, "suspects", [])

        variants = {f"before the check ({args.baseline})": lambda: run(old), "now": lambda: run(scan)}
        for fn in variants.values():
            fn()
        times: dict[str, list[float]] = {name: [] for name in variants}
        names = list(variants)
        for i in range(args.repeat):
            for name in names[i % len(names):] + names[:i % len(names)]:
                start = time.perf_counter()
                variants[name]()
                times[name].append(time.perf_counter() - start)
        # a chmod -R: every row made before the files' status changed; each hashed once (threads of scan.confirm)
        earlier = min(f.ctime for f in listed) - 1
        confirms = []
        for _ in range(max(3, args.repeat // 5)):
            found = list(scan.scan_folder(root, errors=[]))
            d = scan.diff(found, rows_of(found, earlier, sha))
            start = time.perf_counter()
            same, differ = scan.confirm(d.suspects)
            confirms.append(time.perf_counter() - start)
            assert len(same) == args.files and not differ
    medians = {name: statistics.median(t) for name, t in times.items()}
    base = medians[names[0]]
    confirm = statistics.median(confirms)
    record(f"Listing and diffing {args.files:,} unchanged files with the status (ctime) check", [
        f"{args.files:,} files of {args.file_bytes:,} bytes, 100 to a folder, warm cache; indexer/scan.py scan_folder "
        f"then diff against rows matching every file, median of {args.repeat} passes.",
        "",
        "| listing + diff | seconds | vs before |",
        "|---|---|---|",
        *(f"| {name} | {m:.3f} | {m / base - 1:+.1%} |" for name, m in medians.items()),
        "",
        f"Per file: {(medians['now'] - base) / args.files * 1e6:+.2f} µs. After a `chmod -R` (every status changed), "
        f"scan.confirm hashed the {args.files:,} files in {confirm:.2f} s (median of {len(confirms)}; "
        f"{confirm / args.files * 1e3:.3f} ms a file, warm cache), and kept every row.",
        load_note(loaded),
    ], save=not args.no_save)


if __name__ == "__main__":
    main()
