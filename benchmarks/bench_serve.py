"""`alignsearch serve` under concurrent clients: text searches and thumbnails on a 100k-vector index.

    python benchmarks/bench_serve.py [--n 100000] [--clients 20] [--texts 200] [--thumbs 500] [--baseline-rev 93d02f3]

The index holds 24 real JPEGs plus synthetic vectors (clustered, unit length) written through the real
writer, with the tiny test model, so the figures measure the server rather than the model. Each
request opens its own connection, as a browser's parallel loads and the CLI do.

Baseline in the same run: the standard-library http.server implementation of `serve` as of
--baseline-rev, read with `git show` into a temporary module and run the same way, in its own
process. Thumbnails are generated once per image before the thumbnail round (both servers cache
them), so that round measures serving, not JPEG decoding.
"""

from __future__ import annotations

import argparse
import http.client
import json
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from common import CACHE, jpeg_corpus, record  # noqa: E402

import alignsearch  # noqa: E402
from alignsearch.storage import catalog  # noqa: E402
from alignsearch.storage.paths import ANN_FILE, SERVER_FILE  # noqa: E402
from indexer.build import sync_index  # noqa: E402
from indexer.decode import Item  # noqa: E402
from indexer.job import index_folders  # noqa: E402
from indexer.scan import Found  # noqa: E402
from indexer.writer import catalog_writer  # noqa: E402

OLD_RUNNER = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("old_server", sys.argv[1])
old = importlib.util.module_from_spec(spec)
sys.modules["old_server"] = old
spec.loader.exec_module(old)
import alignsearch
from pathlib import Path
old.WEB_DIR = Path(alignsearch.__file__).parent / "web"
old.serve(alignsearch.open(sys.argv[2], device="cpu"), old.ServerConfig(port=int(sys.argv[3])))
"""
WORDS = "red green blue yellow car beach dog cat night day small big circle square tree house sky road".split()


def clustered(n: int, dim: int, seed: int = 3, clusters: int = 500) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + 0.5 * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def build(index_dir: Path, model: Path, corpus: Path, n: int) -> None:
    index_folders([corpus], index_dir, model=str(model), device="cpu", workers=0)
    db = catalog.connect(index_dir / "catalog.db")
    engine = alignsearch.open(index_dir)
    store, dim = engine.store, int(engine.model_info["dim"])
    engine.close()
    write = catalog_writer(db, store)
    x = clustered(n, dim)
    for start in range(0, n, 5000):
        chunk = x[start : start + 5000]
        write([Item(Found("/synthetic", f"{start + j}.jpg", 1, 0.0), crop=np.zeros(1)) for j in range(len(chunk))], chunk)
    sync_index(db, store, index_dir / ANN_FILE)
    db.dispose()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(command: list[str], port: int, log: Path) -> subprocess.Popen:
    """The server in its own process, its stderr in log (read when something fails)."""
    with open(log, "w") as err:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err)
    for _ in range(600):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1)
            return proc
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(log.read_text())
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the server did not start")


def get(port: int, path: str, token: str | None) -> tuple[int, float]:
    """One request on a fresh connection: (status or 0 on a connection error, seconds)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    t = time.perf_counter()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        response.read()
        conn.close()
        return response.status, time.perf_counter() - t
    except (OSError, http.client.HTTPException):
        return 0, time.perf_counter() - t


def round_of(port: int, paths: list[str], token: str | None, clients: int) -> dict:
    with ThreadPoolExecutor(clients) as pool:
        t = time.perf_counter()
        results = list(pool.map(lambda p: get(port, p, token), paths))
        wall = time.perf_counter() - t
    times = sorted(s for _, s in results)
    return {"errors": sum(1 for status, _ in results if status != 200), "p50": statistics.median(times),
            "p95": times[int(0.95 * (len(times) - 1))], "max": times[-1], "rps": len(paths) / wall}


def measure(name: str, proc: subprocess.Popen, port: int, token: str | None, ids: list[int], args, log: Path) -> dict:
    try:
        rng = np.random.default_rng(0)
        texts = [f"/api/search?q={'+'.join(rng.choice(WORDS, 3))}+{i}&k=20" for i in range(args.texts)]
        round_of(port, texts[:40], token, args.clients)  # warm-up
        for i in ids:  # thumbnails generated once: the round below measures serving them
            get(port, f"/api/image/{i}?size=256", token)
        thumbs = [f"/api/image/{ids[i % len(ids)]}?size=256" for i in range(args.thumbs)]
        out = {"text": round_of(port, texts, token, args.clients), "thumbs": round_of(port, thumbs, token, args.clients)}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
    print(name, json.dumps(out), flush=True)
    if out["text"]["errors"] or out["thumbs"]["errors"]:
        print(f"{name} server's log ends:", log.read_text()[-3000:], sep="\n", flush=True)
    return out


def line(label: str, r: dict) -> str:
    return (f"{label}: {r['errors']} errors, p50 {r['p50'] * 1000:.1f} ms, p95 {r['p95'] * 1000:.1f} ms "
            f"(p95/p50 {r['p95'] / r['p50']:.1f}), max {r['max'] * 1000:.0f} ms, {r['rps']:.0f} req/s")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--texts", type=int, default=200)
    ap.add_argument("--thumbs", type=int, default=500)
    ap.add_argument("--baseline-rev", default="93d02f3", help="commit whose alignsearch/surfaces/server.py is the baseline")
    ap.add_argument("--baseline-file", type=Path, help="the baseline server.py itself (instead of --baseline-rev)")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    from tiny_align import build_tiny_align

    model = CACHE / "tiny-align"
    if not (model / "config.json").exists():
        build_tiny_align(model)
    corpus = jpeg_corpus(24, seed=2)
    old_source = args.baseline_file.read_text() if args.baseline_file else subprocess.run(
        ["git", "show", f"{args.baseline_rev}:alignsearch/surfaces/server.py"], cwd=HERE, capture_output=True, text=True, check=True).stdout
    with tempfile.TemporaryDirectory() as tmp:
        ix = Path(tmp) / "ix"
        t = time.perf_counter()
        build(ix, model, corpus, args.n)
        build_s = time.perf_counter() - t
        with alignsearch.open(ix) as engine:
            info = engine.info()
            with engine.db.connect() as conn:
                ids = catalog.live_pairs(conn)[:24, 0].tolist()  # the real JPEGs come first
        (Path(tmp) / "old_server.py").write_text(old_source)
        (Path(tmp) / "runner.py").write_text(OLD_RUNNER)

        port = free_port()
        log = Path(tmp) / "baseline.log"
        proc = start([sys.executable, str(Path(tmp) / "runner.py"), str(Path(tmp) / "old_server.py"), str(ix), str(port)], port, log)
        old = measure("baseline", proc, port, None, ids, args, log)
        (ix / SERVER_FILE).unlink(missing_ok=True)
        for p in (ix / "thumbs").glob("*"):
            p.unlink()

        port = free_port()
        proc = start([sys.executable, "-m", "alignsearch", "serve", "--index", str(ix), "--port", str(port), "--device", "cpu",
                      "--token", "bench"], port, Path(tmp) / "asgi.log")
        new = measure("asgi", proc, port, "bench", ids, args, Path(tmp) / "asgi.log")
    record(
        f"Serving under concurrency, {info['images']:,} vectors, tiny model, {args.clients} clients",
        [
            f"- index: {info['index']['factory']} ({info['index']['type']}), built in {build_s:.0f} s; "
            f"every request on a fresh connection",
            f"- {args.texts} text searches (k=20), this server (FastAPI + uvicorn, encoder queue): " + line("", new["text"]).lstrip(": "),
            f"- {args.thumbs} thumbnails (256 px, cached), this server: " + line("", new["thumbs"]).lstrip(": "),
            f"- baseline, same run: http.server implementation at {args.baseline_rev}, text searches: "
            + line("", old["text"]).lstrip(": "),
            "- baseline, thumbnails: " + line("", old["thumbs"]).lstrip(": "),
            f"- targets: 0 errors and text p95 <= 3x p50: {'met' if new['text']['errors'] == 0 and new['text']['p95'] <= 3 * new['text']['p50'] else 'NOT met'}; "
            f"thumbnails 0 errors and p95 <= 100 ms: {'met' if new['thumbs']['errors'] == 0 and new['thumbs']['p95'] <= 0.1 else 'NOT met'}",
        ],
        save=not args.no_save,
    )


if __name__ == "__main__":
    main()
