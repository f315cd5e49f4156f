"""One text search on a tiny index three ways: the Python API (Engine.search on the caller's thread), the steps of the
server's endpoint on the caller's thread (server.Library, no HTTP: what bench_judge_once.py timed) and GET /api/search
over HTTP (server.start_in_thread), each in a fresh process; and the CLI's `alignsearch query` end to end (a process,
no server running). This tree against git --base (a temporary worktree), alternating, with `--busy N` processes
spinning beside them (0: only whatever else runs on the machine).

Why it exists: bench_judge_once.py found the in-process steps 13.7 ms and HTTP 3.7 ms. Both ran the same code; the
in-process column ran on the main thread before any other thread had searched, so faiss's OpenMP thread spun after
each search (libgomp's default) and, on a busy machine, the next search waited for it to be scheduled again. Once a
second thread drives an OpenMP team (the server's worker threads), libgomp has more threads than CPUs and throttles
the spinning: the HTTP column did not pay it. Each process here starts without OMP_WAIT_POLICY (a caller's own
setting stands in this tree, so the bench clears it).

    python benchmarks/bench_inproc.py [--base main] [--rounds 3] [--calls 200] [--cli 3] [--busy 0,2] [--own-index]
                                      [--no-save]

--own-index: each tree indexes the photos itself (indexer.job.index_folders in a process with PYTHONPATH at the
tree) and searches its own index: a base of an older catalog schema refuses an index this tree wrote.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from common import add_worktree, load_note, record, remove_worktree, tiny_photos  # noqa: E402

# One process's figures: per-call medians (ms) of the API, the endpoint's steps and HTTP, on the index argv[1].
CHILD = r"""
import json, os, statistics, sys, time, urllib.request
from pathlib import Path
import alignsearch
from alignsearch.search.request import build
from alignsearch.surfaces import server

def per_call(fn, n):
    times = []
    for _ in range(n):
        start = time.perf_counter(); fn(); times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3

def get(url, token):
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        r.read()

calls = int(sys.argv[2])
engine = alignsearch.open(Path(sys.argv[1]), device="cpu")
request = build(text="red", k=5)
library = server.Library(engine, server.ServerConfig())

def steps():  # as the endpoint runs them (server.encode_and_search), on this thread
    snap = library.snapshot()
    library.search(request, library.parts_of(request, snap), snap)

engine.search("red", k=5); steps()  # the encoder loaded, the snapshot read
out = {"policy": os.environ.get("OMP_WAIT_POLICY"), "api": per_call(lambda: engine.search("red", k=5), calls),
       "steps": per_call(steps, calls)}
running = server.start_in_thread(engine, server.ServerConfig(port=0))
try:
    url = running.url + "/api/search?q=red&k=5"
    get(url, running.token)
    out["http"] = per_call(lambda: get(url, running.token), max(1, calls // 3))
finally:
    running.shutdown()
engine.close()
print("RESULT " + json.dumps(out))
"""


def spin(stop) -> None:
    while not stop.is_set():
        pass


def env_for(tree: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    return {**env, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1"}


def child(tree: Path, ix: Path, calls: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(ix), str(calls)], capture_output=True, text=True,
                          env=env_for(tree), cwd=tree, timeout=900)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"the child failed in {tree}:\n{proc.stderr[-2000:]}")
    return json.loads(line[len("RESULT "):])


def index_in(tree: Path, corpus: Path, ix: Path, model: Path) -> None:
    """The photos indexed by the code of `tree` (its own catalog schema), in a process of its own."""
    code = ("import sys; from indexer.job import index_folders; "
            "index_folders([sys.argv[1]], sys.argv[2], model=sys.argv[3], device='cpu', workers=0)")
    proc = subprocess.run([sys.executable, "-c", code, str(corpus), str(ix), str(model)], capture_output=True,
                          text=True, env=env_for(tree), cwd=tree, timeout=900)
    if proc.returncode != 0:
        raise SystemExit(f"indexing failed in {tree}:\n{proc.stderr[-2000:]}")


def cli_query(tree: Path, ix: Path) -> float:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "alignsearch", "query", "red", "-k", "5", "--index", str(ix)],
                          capture_output=True, text=True, env=env_for(tree), cwd=tree, timeout=300)
    took = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"query failed in {tree}: {proc.stderr[-1000:]}")
    return took * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="main", help="commit measured as the baseline, from a temporary worktree")
    ap.add_argument("--images", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--calls", type=int, default=200, help="searches a process times (HTTP: a third of them)")
    ap.add_argument("--cli", type=int, default=3, help="`alignsearch query` runs a round")
    ap.add_argument("--busy", default="0,2", help="spinning processes beside the runs, one setting a row")
    ap.add_argument("--own-index", action="store_true", help="each tree searches an index it wrote itself")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    load_at_start = os.getloadavg()[0]
    busy_levels = [int(b) for b in args.busy.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base_tree = tmp / "base"
        base_sha = add_worktree(args.base, base_tree)
        try:
            from indexer.job import index_folders

            model = tiny_photos(tmp / "corpus", args.images)
            trees = {f"base {base_sha}": base_tree, "this tree": REPO}
            if args.own_index:
                ixs = {name: tmp / f"ix{n}" for n, name in enumerate(trees)}
                for name, tree in trees.items():
                    index_in(tree, tmp / "corpus", ixs[name], model)
            else:
                index_folders([tmp / "corpus"], tmp / "ix", model=str(model), device="cpu", workers=0)
                ixs = {name: tmp / "ix" for name in trees}
            runs = {(busy, name): [] for busy in busy_levels for name in trees}
            cli = {(busy, name): [] for busy in busy_levels for name in trees}
            for _ in range(args.rounds):
                for busy in busy_levels:
                    stop = multiprocessing.Event()
                    spinners = [multiprocessing.Process(target=spin, args=(stop,)) for _ in range(busy)]
                    for p in spinners:
                        p.start()
                    try:
                        for name, tree in trees.items():  # alternating: both share the machine's load
                            runs[busy, name].append(child(tree, ixs[name], args.calls))
                            cli[busy, name] += [cli_query(tree, ixs[name]) for _ in range(args.cli)]
                    finally:
                        stop.set()
                        for p in spinners:
                            p.join()
        finally:
            remove_worktree(base_tree)

    def med(busy, name, key):
        return statistics.median(r[key] for r in runs[busy, name])

    lines = [f"- tiny model, {args.images} images, text search \"red\" k=5, `--device cpu`; each process: the per-call "
             f"median of {args.calls} Engine.search calls, then of {args.calls} server steps in-process (server.Library "
             f"snapshot, parts_of, search on the main thread), then of {args.calls // 3} GET /api/search over HTTP "
             f"(server.start_in_thread); the table: the median over {args.rounds} processes a row, alternating base "
             f"and this tree; CLI: `alignsearch query red -k 5 --index IX` end to end (a process, no server), median "
             f"of {args.rounds * args.cli} runs; busy: processes spinning beside the runs; OMP_WAIT_POLICY cleared "
             "for every process" + ("; each tree searched an index it wrote (--own-index)" if args.own_index else ""), "",
             "| busy | tree | OMP_WAIT_POLICY seen | Engine.search ms | steps in-process ms | HTTP ms | CLI query ms |",
             "|---|---|---|---|---|---|---|"]
    for busy in busy_levels:
        for name in trees:
            policy = runs[busy, name][0]["policy"] or "unset"
            lines.append(f"| {busy} | {name} | {policy} | {med(busy, name, 'api'):.2f} | {med(busy, name, 'steps'):.2f}"
                         f" | {med(busy, name, 'http'):.2f} | {statistics.median(cli[busy, name]):.0f} |")
    lines += ["", load_note(load_at_start)]
    record("search: the Python API and the CLI against the server's path (bench_inproc.py)", lines,
           save=not args.no_save)


if __name__ == "__main__":
    main()
