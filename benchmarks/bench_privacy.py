"""What an `index` run of a large local list costs before its entries are stat'ed: the index folder's judgement
(privacy.keep_private: the list read, one photo a folder, each folder's ancestors stat'ed) and the scan's reading of
the list (scan.scan of the list root: its captions and entries), this tree against git --base, run from a temporary
worktree of that commit, alternating in one run. The base read the list three times a run (the judgement, the
scan's captions, its entries) and stat'ed the shared ancestors of every listed folder again; this tree reads it once
(sources.list_table, the run's tables), makes its entries strings once (sources.list_entries) and stats each folder
once per judgement.

The list: --entries paths in --folders folders (lib/y{i}/m{j}/, 20 top folders), the first entry of each folder a
real file (what the judgement stats), the others names the judgement never looks at. The scan's stat of each entry
(scan._stat_entry) is replaced by a constant answer on both sides, and its thread pool by a plain map: the same work
on both sides, left out so that what differs is measured. Wall and CPU time (the process's, all its threads) are
reported: on a shared machine the wall moves with others' load.

    python benchmarks/bench_privacy.py [--entries 1000000] [--folders 5000] [--rounds 3] [--base main] [--no-save]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import against_base, base_worktree, load_note, record

HERE = Path(__file__).resolve().parents[1]

# one run's list work as `index` does it (indexer/job.py then roots.scan_all), the entries' stats left out; a tree
# whose keep_private takes the run's tables (this one) is given them, as its job.py does, and its scan too
RUN = """
import inspect, sys, time
from pathlib import Path
from indexer import privacy, scan

ix, listed = Path(sys.argv[1]), sys.argv[2]
found = scan.Found(listed, "x.jpg", 1, 0.0)
scan._stat_entry = lambda root, entry: found


class Serial:
    def __init__(self, threads):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def map(self, f, items):
        return map(f, items)


scan.ThreadPoolExecutor = Serial
once = "lists" in inspect.signature(privacy.keep_private).parameters
lists = {} if once else None
start, cpu = time.perf_counter(), time.process_time()
privacy.keep_private(ix, [listed], None, *([lists] if once else []))
judged = time.perf_counter()
n = sum(1 for _ in scan.scan(listed, **({"lists": lists} if once else {})))
done, cpu_done = time.perf_counter(), time.process_time()
print((judged - start) * 1e3, (done - start) * 1e3, (cpu_done - cpu) * 1e3, n)
"""


# the judgement's stats alone: privacy._steps of the photo the judgement takes in each folder, a memo shared by the
# calls where this tree's _steps takes one (as its keep_private does), CPU time, median of 5 in one process
STEPS = """
import inspect, statistics, sys, time
from indexer import privacy

photos = sys.argv[1:]
shared = "seen" in inspect.signature(privacy._steps).parameters
times = []
for _ in range(5):
    seen = {}
    start = time.process_time()
    for photo in photos:
        privacy._steps(photo, seen) if shared else privacy._steps(photo)
    times.append((time.process_time() - start) * 1e3)
print(statistics.median(times))
"""


def steps_ms(tree: Path, photos: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return float(subprocess.run([sys.executable, "-c", STEPS, *photos], capture_output=True, text=True, cwd=tree,
                                env=env, check=True).stdout.split()[0])


def run_in(tree: Path, ix: Path, listed: Path) -> tuple[float, float, float, int]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, "-c", RUN, str(ix), str(listed)], capture_output=True, text=True, cwd=tree,
                         env=env, check=True).stdout.split()
    return float(out[0]), float(out[1]), float(out[2]), int(out[3])


def make_list(tmp: Path, entries: int, folders: int) -> Path:
    """The list file (see the docstring); each folder 0755, its first photo 0644."""
    per = -(-entries // folders)
    listed = tmp / "list.csv"
    with open(listed, "w") as f:
        f.write("path\n")
        written = 0
        for i in range(folders):
            folder = tmp / "lib" / f"y{i % 20}" / f"m{i}"
            folder.mkdir(parents=True)
            (folder / "p0.jpg").write_bytes(b"x")
            for k in range(min(per, entries - written)):
                f.write(f"{folder}/p{k}.jpg\n")
            written += min(per, entries - written)
    return listed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, default=1_000_000)
    ap.add_argument("--folders", type=int, default=5000)
    a = against_base(ap, rounds=3)
    load = os.getloadavg()[0]
    with base_worktree(a.base) as (tmp, old, base_rev):
        listed = make_list(tmp, a.entries, a.folders)
        trees = {"base": old, "new": HERE}
        judged = {name: [] for name in trees}
        whole = {name: [] for name in trees}
        cpu = {name: [] for name in trees}
        steps = {name: [] for name in trees}
        photos = sorted(str(p) for p in (tmp / "lib").glob("y*/m*/p0.jpg"))
        counts = {}
        for name, tree in trees.items():  # untimed: a fresh worktree compiles its modules, the list enters the cache
            (tmp / f"ix-{name}-warm").mkdir(mode=0o755)
            run_in(tree, tmp / f"ix-{name}-warm", listed)
        for r in range(a.rounds):
            for name, tree in trees.items():
                ix = tmp / f"ix-{name}-{r}"
                ix.mkdir(mode=0o755)
                j, w, c, counts[name] = run_in(tree, ix, listed)
                judged[name].append(j)
                whole[name].append(w)
                cpu[name].append(c)
                steps[name].append(steps_ms(tree, photos))
            print({n: (round(judged[n][-1]), round(whole[n][-1]), round(cpu[n][-1])) for n in trees}, flush=True)
    assert counts["base"] == counts["new"] == a.entries, counts

    def fig(values: dict) -> str:
        return (f"base {statistics.median(values['base']):.0f} ms, this tree {statistics.median(values['new']):.0f} ms "
                f"(each: {', '.join(f'{x:.0f}' for x in values['base'])} / "
                f"{', '.join(f'{x:.0f}' for x in values['new'])})")

    lines = [
        f"- list: a CSV of {a.entries:,} local paths in {a.folders:,} folders (20 top folders), the first of each "
        f"folder a real file; base {a.base} ({base_rev}) from a temporary worktree; one untimed run a side, then "
        f"{a.rounds} rounds alternating, each side a fresh process; entries listed by the scan: {counts['new']:,} "
        "(both)",
        f"- the judgement (privacy.keep_private of the list), median: {fig(judged)}",
        f"- the judgement and the scan's reading of the list (scan.scan of the list root, each entry's stat replaced "
        f"by a constant answer and its thread pool by a plain map on both sides), median: {fig(whole)}",
        f"- the same, CPU time of the process (time.process_time: all its threads, pyarrow's reader's too; less "
        f"moved by other sessions' load than the wall), median: {fig(cpu)}",
        f"- the judgement's stats alone (privacy._steps of the {len(photos):,} photos it takes, one a folder; this "
        f"tree's memo shared by the calls as its keep_private shares it), CPU time, each round's figure the median "
        f"of 5 in one process, median: {fig(steps)}",
        load_note(load),
    ]
    record(f"A local list's judgement and reading in one `index` run, {a.entries:,} entries", lines,
           save=not a.no_save)


if __name__ == "__main__":
    main()
