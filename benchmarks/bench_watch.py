"""`index --watch`: the time of a run after one change, listing the changed folder (indexer/roots.py Scope, what
the watch passes) against listing every root whole (the full listing, scope=None, as each watch run did before).

    python benchmarks/bench_watch.py [--folders 100] [--per-folder 200] [--reps 5]

The library is placeholder files named like photos (empty .jpg: they fail to decode once and are then only
listed and compared), so the listing, not encoding, is what a run pays; each change is one real small photo
added to one folder, encoded by the tests' tiny model, which the runs keep loaded (job.EncoderCache), as the
watch does. Both kinds of run alternate in the same process over the same index.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import CACHE, record

from indexer import roots as index_roots
from indexer.job import EncoderCache, index_folders
from indexer.roots import Scope


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folders", type=int, default=100)
    ap.add_argument("--per-folder", type=int, default=200)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()

    from PIL import Image
    from tiny_align import build_tiny_align

    model = CACHE / "tiny-align"
    if not (model / "config.json").exists():
        build_tiny_align(model)
    listing = []  # seconds in scan_all (listing and comparing with the catalog) of the current run
    real_scan_all = index_roots.scan_all

    def timed_scan_all(*a, **kw):
        t0 = time.perf_counter()
        try:
            return real_scan_all(*a, **kw)
        finally:
            listing.append(time.perf_counter() - t0)

    index_roots.scan_all = timed_scan_all
    with tempfile.TemporaryDirectory() as tmp:
        root, ix = Path(tmp) / "photos", Path(tmp) / "ix"
        for i in range(args.folders):
            folder = root / f"f{i:03d}"
            folder.mkdir(parents=True)
            for j in range(args.per_folder):
                (folder / f"p{j:04d}.jpg").touch()
        files = args.folders * args.per_folder
        job = {"index_dir": ix, "model": str(model), "device": "cpu", "workers": 0, "encoders": EncoderCache()}
        t0 = time.perf_counter()
        first = index_folders([root], **job)
        first_s = time.perf_counter() - t0
        changed = root / f"f{args.folders // 2:03d}"
        scope = Scope(folders={str(root.resolve()): (changed.name,)})
        times: dict[str, list[float]] = {"full": [], "scoped": []}
        scans: dict[str, list[float]] = {"full": [], "scoped": []}
        for rep in range(args.reps):
            for kind in ("full", "scoped"):
                Image.new("RGB", (64, 48), (rep * 40 % 256, 90, 200 if kind == "full" else 20)).save(
                    changed / f"new-{kind}-{rep}.png")
                listing.clear()
                t0 = time.perf_counter()
                done = index_folders([], **job, scope=None if kind == "full" else scope)
                times[kind].append(time.perf_counter() - t0)
                scans[kind].append(listing[0])
                assert done.added == 1 and done.removed == 0, done.to_dict()

    def line(kind: str) -> str:
        return (f"- {kind}: run median {statistics.median(times[kind]):.3f} s (all {', '.join(f'{t:.3f}' for t in times[kind])}); "
                f"of which listing and comparing median {statistics.median(scans[kind]):.3f} s")

    ratio = statistics.median(times["full"]) / statistics.median(times["scoped"])
    record(f"index --watch: a run after one change, {files:,} files in {args.folders} folders", [
        f"- library: {files:,} empty placeholder .jpg files ({args.folders} folders of {args.per_folder}), failed once "
        f"by the first run ({first_s:.1f} s, {first.failed:,} failed); each change one new 64x48 PNG in one folder, "
        "tiny model kept loaded (EncoderCache), workers 0",
        f"- runs: {args.reps} of each, alternating, same process and index",
        line("full") + " [every root listed: the watch's runs before scoping]",
        line("scoped") + " [the changed folder listed: what the watch runs now]",
        f"- ratio (full / scoped, run medians): {ratio:.1f}x",
    ])


if __name__ == "__main__":
    main()
