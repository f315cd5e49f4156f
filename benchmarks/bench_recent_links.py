"""What recording the catalog's links (schema 13, catalog.links) costs: the recent listing's first page (/api/recent,
Library.recent with its left-out ids not yet cached: onefile.left_out) and `index` of an unchanged library (a
rescan: each listed name's link read and compared), this tree against git --base, run from a temporary worktree of
that commit, alternating in one run. The library: --photos tiny pictures and a symlink beside each to it, so half
the rows are links sharing their target's content (the case the fix tried before, which resolved every shared row's
link on each first page, made slow). Each side indexes its own copy (a schema 13 catalog is refused by the base).

    python benchmarks/bench_recent_links.py [--photos 2000] [--rounds 5] [--base main] [--no-save]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import add_worktree, load_note, record, remove_worktree, tiny_photos

HERE = Path(__file__).resolve().parents[1]

# the first page as a server answers it once the catalog changed: its connection warm, its left-out ids not cached
# (Library._same emptied before each), the median of 5 in one process; then as it answers it while the catalog stays
# as it was (the left-out ids kept), the median of 5
FIRST_PAGE = """
import statistics, sys, time
from alignsearch.search.engine import open as open_index
from alignsearch.surfaces.server import Library, ServerConfig
library = Library(open_index(sys.argv[1]), ServerConfig())
library.recent(0, 60)
times = []
for _ in range(5):
    library._same = ((), frozenset())
    start = time.perf_counter()
    page = library.recent(0, 60)
    times.append((time.perf_counter() - start) * 1e3)
kept = []
for _ in range(5):
    start = time.perf_counter()
    library.recent(0, 60)
    kept.append((time.perf_counter() - start) * 1e3)
print(statistics.median(times), page["total"], statistics.median(kept))
"""

# the part of `index` the change touches: every root listed and diffed with its rows (roots.scan_all), the median
# of 3 in one process after one to warm the file system's caches
SCAN = """
import statistics, sys, time
from alignsearch.storage import catalog
from indexer import roots
db = catalog.connect(sys.argv[1] + "/catalog.db")
times = []
for _ in range(4):
    start = time.perf_counter()
    out = roots.scan_all(db, [sys.argv[2]], [sys.argv[2]], {}, {})
    times.append((time.perf_counter() - start) * 1e3)
    assert not out.todo and not out.removed, (len(out.todo), len(out.removed))
print(statistics.median(times[1:]))
"""


def run_in(tree: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=tree, env=env, check=True)


def index_s(tree: Path, ix: Path, lib: Path, *more: str) -> tuple[float, dict]:
    start = time.perf_counter()
    out = run_in(tree, "-m", "alignsearch", "index", "--index", str(ix), str(lib), "--device", "cpu", "--json", *more)
    return time.perf_counter() - start, json.loads(out.stdout)


def first_page_ms(tree: Path, ix: Path) -> tuple[float, int, float]:
    ms, total, kept = run_in(tree, "-c", FIRST_PAGE, str(ix)).stdout.split()
    return float(ms), int(total), float(kept)


def scan_ms(tree: Path, ix: Path, lib: Path) -> float:
    return float(run_in(tree, "-c", SCAN, str(ix), str(lib)).stdout.split()[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--base", default="main")
    ap.add_argument("--no-save", action="store_true")
    a = ap.parse_args()
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        old = tmp / "base-tree"
        base_rev = add_worktree(a.base, old)
        try:
            lib = tmp / "lib"
            model = tiny_photos(lib, a.photos)
            for p in sorted(lib.iterdir()):
                (lib / f"link-{p.name}").symlink_to(p)
            trees = {"base": old, "new": HERE}
            ixs = {name: tmp / f"ix-{name}" for name in trees}
            for name, tree in trees.items():
                built, summary = index_s(tree, ixs[name], lib, "--model", str(model))
                print(name, "indexed", summary.get("added"), f"in {built:.1f} s", flush=True)
            page = {name: [] for name in trees}
            rescan = {name: [] for name in trees}
            listing = {name: [] for name in trees}
            cached = {name: [] for name in trees}
            totals = {}
            for _ in range(a.rounds):
                for name, tree in trees.items():
                    ms, totals[name], kept = first_page_ms(tree, ixs[name])
                    page[name].append(ms)
                    cached[name].append(kept)
                    s, summary = index_s(tree, ixs[name], lib)
                    assert summary["updated"] == summary["added"] == 0, summary
                    rescan[name].append(s)
                    listing[name].append(scan_ms(tree, ixs[name], lib))
                print({n: (round(page[n][-1], 1), round(rescan[n][-1], 2), round(listing[n][-1], 1)) for n in trees},
                      flush=True)
        finally:
            remove_worktree(old)
    rows = 2 * a.photos
    lines = [
        f"- library: {a.photos:,} tiny photos and a symlink beside each to it: {rows:,} indexed rows, half of them "
        f"links sharing their target's content; tiny test model; base {a.base} ({base_rev}) from a temporary worktree, "
        f"each side its own index of the same folder; {a.rounds} rounds alternating; the listing's total "
        f"{totals['base']:,} (base) and {totals['new']:,} (this tree)",
        f"- first page of the recent listing (Library.recent(0, 60), its connection warm, its left-out ids not "
        f"cached: each round's figure the median of 5 in one process), median of the rounds: base {statistics.median(page['base']):.1f} ms, this tree "
        f"{statistics.median(page['new']):.1f} ms (each: {', '.join(f'{x:.1f}' for x in page['base'])} / "
        f"{', '.join(f'{x:.1f}' for x in page['new'])})",
        f"- first page with the left-out ids kept (the catalog unchanged since the last page: what a server answers "
        f"but after a change), each round's figure the median of 5 in one process, median of the rounds: base "
        f"{statistics.median(cached['base']):.1f} ms, this tree {statistics.median(cached['new']):.1f} ms (each: "
        f"{', '.join(f'{x:.1f}' for x in cached['base'])} / {', '.join(f'{x:.1f}' for x in cached['new'])})",
        f"- `index` of the unchanged library (a rescan: nothing added or updated; wall of the whole command, its "
        f"start and model load included), median: base {statistics.median(rescan['base']):.2f} s, this tree "
        f"{statistics.median(rescan['new']):.2f} s (each: {', '.join(f'{x:.2f}' for x in rescan['base'])} / "
        f"{', '.join(f'{x:.2f}' for x in rescan['new'])})",
        f"- listing and diff of the unchanged library (roots.scan_all, what `index` does before it writes; each "
        f"round's figure the median of 3 in one process after one to warm), median of the rounds: base "
        f"{statistics.median(listing['base']):.1f} ms, this tree {statistics.median(listing['new']):.1f} ms (each: "
        f"{', '.join(f'{x:.1f}' for x in listing['base'])} / {', '.join(f'{x:.1f}' for x in listing['new'])})",
        load_note(load),
    ]
    record(f"The catalog's links (schema 13): the recent listing's first page and a rescan, {rows:,} rows half links",
           lines, save=not a.no_save)


if __name__ == "__main__":
    main()
