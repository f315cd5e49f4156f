"""A search request of `serve` on a tiny index: how many times it judges the index folder (Engine.judge: paths.
judged_key's stats of every file of the index and the walk of its path) and what a request takes end to end,
against the server module of git --base (alignsearch/surfaces/server.py loaded from git, common.module_at) in the
same run, on the same engine. Two figures: the request's steps as the endpoint runs them (snapshot, encoding,
search: Library in-process, no HTTP), and GET /api/search?q= over HTTP (one connection a request).

    python benchmarks/bench_judge_once.py [--images 6] [--requests 300] [--rounds 5] [--base b6e8e6a] [--no-save]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import load_note, module_at, per_request_ms, record, tiny_photos

import alignsearch
from alignsearch.search.request import build as build_request
from alignsearch.surfaces import server as server_new


def tiny_index(base: Path, images: int) -> Path:
    """`images` small pictures indexed by the tiny test model into base/ix."""
    from indexer.job import index_folders

    model = tiny_photos(base / "corpus", images)
    index_folders([base / "corpus"], base / "ix", model=str(model), device="cpu", workers=0)
    return base / "ix"


def steps(library, request) -> None:
    """The steps of a text search as the endpoint runs them (server.encode_and_search), on this thread."""
    snap = library.snapshot()
    parts = library.parts_of(request, snap)
    library.search(request, parts, snap)


def get(url: str, token: str) -> None:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        r.read()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=6)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--base", default="b6e8e6a", help="commit whose alignsearch/surfaces/server.py is the baseline")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    load_at_start = os.getloadavg()[0]
    old = module_at(args.base, "alignsearch/surfaces/server.py", "server_old")
    old.WEB_DIR = server_new.WEB_DIR  # the page's folder beside the module, not beside the copy from git
    modules = {f"base {args.base}": old, "this tree": server_new}
    with tempfile.TemporaryDirectory() as tmp:
        ix = tiny_index(Path(tmp), args.images)
        engine = alignsearch.open(ix, device="cpu")
        files = sum(1 for p in ix.rglob("*") if p.is_file())
        judged = [0]
        real = engine.judge

        def spy():
            judged[0] += 1
            return real()

        judge_us = statistics.median(per_request_ms(real, 2000) for _ in range(args.rounds)) * 1e3
        engine.judge = spy
        request = build_request(text="red", k=5)
        libraries = {name: m.Library(engine, m.ServerConfig()) for name, m in modules.items()}
        counts = {}
        for name, library in libraries.items():
            steps(library, request)  # the encoder loaded, the snapshot read
            judged[0] = 0
            steps(library, request)
            counts[name] = judged[0]
        inproc = {name: [] for name in libraries}
        for _ in range(args.rounds):  # alternating, so both share the machine's load
            for name, library in libraries.items():
                inproc[name].append(per_request_ms(lambda lib=library: steps(lib, request), args.requests))
        http = {name: [] for name in modules}
        for _ in range(args.rounds):
            for name, m in modules.items():
                running = m.start_in_thread(engine, m.ServerConfig(port=0))
                try:
                    url = running.url + "/api/search?q=red&k=5"
                    get(url, running.token)
                    http[name].append(per_request_ms(lambda u=url, t=running.token: get(u, t), args.requests // 3))
                finally:
                    running.shutdown()
        engine.close()
    lines = [f"- tiny model, {args.images} images ({files} files in the index folder), text search k=5; "
             f"median of {args.rounds} alternating rounds, each the mean of {args.requests} requests "
             f"({args.requests // 3} over HTTP); one judgement of this folder (Engine.judge, unchanged): "
             f"{judge_us:.0f} µs", "",
             "| server.py | judgements a request | steps in-process, ms/request | GET /api/search over HTTP, ms/request |",
             "|---|---|---|---|"]
    for name in modules:
        lines.append(f"| {name} | {counts[name]} | {statistics.median(inproc[name]):.3f} | "
                     f"{statistics.median(http[name]):.2f} |")
    lines += ["", load_note(load_at_start)]
    record("serve: judgements and latency of one search request (bench_judge_once.py)", lines, save=not args.no_save)


if __name__ == "__main__":
    main()
