"""Query latency at align-base size on a 100k index: warm engine per encoder (torch, ONNX, int8, bf16) and a
cold `alignsearch query` process against a fresh process that imports transformers and embeds one text.

    python benchmarks/bench_query.py [--n 100000] [--repeats 30]
    python benchmarks/bench_query.py --suite server [--n 20000]
    python benchmarks/bench_query.py --suite pending [--n 20000] [--pending 1000,10000] [--base main]

--suite pending: Engine.search_vector (no encoding) with the engine module of git --base against this tree's,
alternating in one run: on the finished index, then with N more files committed by a run recorded as unfinished
(state.IndexRun; no ANN entries for them), which this tree scores exactly beside the ANN candidates; also the
snapshot's open (Engine._open_snapshot) on each; and for the largest N, engines opened once the next run is at
work (recorded with this process's pid and the id its own commits begin at, IndexRun.pending_below).

--suite server: cold `alignsearch query` processes answered by a running `alignsearch serve` (a plain text, a
filter, --explain, an image), against the same commands answered locally before the server started (the
baseline, same run), and the server's own answer time (HTTP from a warm client).

The index holds a few real JPEGs plus synthetic 640-d vectors written through the real writer.
Baseline in the same run: transformers' own tokenizer + get_text_features and an exact numpy search.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_ann import structured
from common import align_base_checkpoint, jpeg_corpus, load_note, module_at, record

import alignsearch
from alignsearch.storage import catalog
from alignsearch.search.engine import ANN_FILE
from indexer.build import sync_index
from indexer.decode import Item
from indexer.job import index_folders
from indexer.scan import Found
from indexer.writer import catalog_writer


def ms(samples: list[float]) -> str:
    s = sorted(samples)
    return f"p50 {statistics.median(s) * 1000:.1f} ms, p99 {s[min(len(s) - 1, int(0.99 * len(s)))] * 1000:.1f} ms"


def timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def build(index_dir: Path, model: Path, corpus: Path, n: int) -> None:
    index_folders([corpus], index_dir, model=str(model), device="cpu", workers=0)
    db = catalog.connect(index_dir / "catalog.db")
    store = alignsearch.open(index_dir).store
    write = catalog_writer(db, store)
    x = structured(n, seed=3)
    for start in range(0, n, 5000):
        chunk = x[start : start + 5000]
        write([Item(Found("/synthetic", f"{start + j}.jpg", 1, 0.0), crop=np.zeros(1)) for j in range(len(chunk))], chunk)
    sync_index(db, store, index_dir / ANN_FILE)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--suite", choices=["engines", "server", "pending"], default="engines")
    ap.add_argument("--pending", default="1000,10000", help="--suite pending: files committed by the unfinished run")
    ap.add_argument("--base", default="main", help="--suite pending: commit whose engine.py is the baseline")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    if args.suite == "server":
        return server_suite(args)
    if args.suite == "pending":
        return pending_suite(args)
    model, corpus = align_base_checkpoint(), jpeg_corpus(8, seed=1)
    with tempfile.TemporaryDirectory() as tmp:
        index_dir = Path(tmp) / "ix"
        t = time.perf_counter()
        build(index_dir, model, corpus, args.n)
        build_s = time.perf_counter() - t
        query = "a red car parked on the beach at night"
        engines = {name: alignsearch.open(index_dir, device="cpu", **kw) for name, kw in VARIANTS.items()}
        ref = engines["torch fp32"]
        info = ref.info()
        image = sorted(corpus.glob("*.jpg"))[0]
        rows = {}
        for name, engine in engines.items():
            engine.search(text=query, k=10)  # loads (and on first use exports) the model
            end_to_end = timed(lambda: engine.search(text=query, k=10), args.repeats)
            encode = timed(lambda: engine._text_encoder_of(engine.snap).encode_text([query]), args.repeats)
            enc = engine._text_encoder_of(engine.snap)
            cos = (enc.encode_text(PROBES) * ref.encoder.encode_text(PROBES)).sum(axis=1).min()
            overlap = statistics.mean(
                len({h.id for h in engine.search(text=q, k=10)} & {h.id for h in ref.search(text=q, k=10)}) / 10
                for q in PROBES)
            rows[name] = (end_to_end, encode, cos, overlap, engine.encoder_plan())
        default = engines["default (onnx fp32)"]
        img = timed(lambda: default.search(image=image, k=10), max(5, args.repeats // 3))
        both = timed(lambda: default.search(text="at night", image=image, k=10), max(5, args.repeats // 3))

        import torch
        from transformers import AlignModel, AutoTokenizer

        hf_model, tok = AlignModel.from_pretrained(model).eval(), AutoTokenizer.from_pretrained(model)
        allv = ref.store.get(np.arange(ref.store.rows))

        def naive():
            with torch.inference_mode():
                out = hf_model.get_text_features(**tok([query], return_tensors="pt"))
            v = (out if isinstance(out, torch.Tensor) else out.pooler_output)[0].numpy()
            np.argsort(-(allv @ (v / np.linalg.norm(v))))[:10]

        baseline = timed(naive, args.repeats)
        cold = {label: cold_runs([sys.executable, "-m", "alignsearch", "query", "red car", "--index", str(index_dir), *extra])
                for label, extra in COLD.items()}
        cold["baseline: fresh python, import transformers, load AlignModel + tokenizer, embed one text"] = cold_runs(
            [sys.executable, "-c", COLD_BASELINE, str(model)])
    ix = info["index"]
    lines = [
        f"- index: {ix['factory']} nprobe {ix['nprobe']}, re-rank {ix['rerank_factor']}x, tuned recall@10 "
        f"{ix['tuned_recall_at_10']}; built in {build_s:.0f} s",
        "- warm text query through the Python API (encode + ANN + re-rank + catalog), per encoder; cosine of its text",
        "  vectors to torch fp32 on 5 probes (min); overlap@10 of its results with torch fp32's (mean of 5 queries):",
    ]
    for name, (end_to_end, encode, cos, overlap, plan) in rows.items():
        lines.append(f"  - {name}: {ms(end_to_end)}; text encoding alone {ms(encode)}; cosine {cos:.6f}; "
                     f"overlap@10 {overlap:.2f}; ran {plan}")
    lines += [
        f"- warm image query, default encoder (decode + encode + search): {ms(img)}",
        f"- warm text+image query, default encoder: {ms(both)}",
        f"- baseline, same run: transformers tokenizer + get_text_features + exact numpy search: {ms(baseline)}",
    ] + [f"- cold {label} (3 runs, start to output): median {statistics.median(t):.2f} s (runs "
         f"{', '.join(f'{x:.2f}' for x in t)})" for label, t in cold.items()]
    record(f"Query latency, {info['images']:,} vectors, align-base geometry with random weights, CPU", lines)


VARIANTS = {
    "torch fp32": {"backend": "torch"},
    "default (onnx fp32)": {},
    "onnx int8 text (--precision int8)": {"precision": "int8"},
    "bf16 (--precision bf16: OpenVINO where the CPU has BF16, else torch)": {"precision": "bf16"},
}
PROBES = ["a red car parked on the beach at night", "a dog", "two people in the snow", "a bowl of fruit on a table",
          "the skyline of a big city at dusk"]
COLD = {
    "`alignsearch query` (cached ONNX text tower: no torch, no transformers)": [],
    "`alignsearch query --precision int8`": ["--precision", "int8"],
    "`alignsearch query --backend torch` (imports torch and transformers, loads the checkpoint)": ["--backend", "torch"],
}
COLD_BASELINE = """
import sys, torch
from transformers import AlignModel, AutoTokenizer
model, tok = AlignModel.from_pretrained(sys.argv[1]).eval(), AutoTokenizer.from_pretrained(sys.argv[1])
with torch.inference_mode():
    out = model.get_text_features(**tok(["red car"], return_tensors="pt"))
print((out if isinstance(out, torch.Tensor) else out.pooler_output).shape)
"""


SERVED_FORMS = {
    "plain text": ["red car"],
    "a filter (--where width >= 1)": ["red car", "--where", "width >= 1"],
    "--explain": ["red car", "--explain"],
    "an image (--image, its bytes uploaded)": ["--image", "IMAGE"],
}


def pending_suite(args) -> None:
    """Search cost while an unfinished run left files the ANN index lacks, against --base (which leaves them out)."""
    import os

    from alignsearch.search import engine as engine_new
    from alignsearch.storage import state

    load_at_start = os.getloadavg()[0]
    modules = {f"base {args.base}": module_at(args.base, "alignsearch/search/engine.py", "engine_old"),
               "this tree": engine_new}
    model, corpus = align_base_checkpoint(), jpeg_corpus(8, seed=1)
    lines = [f"- align-base geometry (640-d), {args.n:,} synthetic vectors + 8 JPEGs through the real writer and ANN "
             f"build; Engine.search_vector(k=10) of random unit vectors (no encoding), median of {args.rounds} "
             f"alternating rounds, each the mean of {args.repeats} searches; open: Engine._open_snapshot, median of 5",
             "", "| files the ANN index lacks | engine.py | ms/search | ms/open | hits from them (of 10) |",
             "|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        index_dir = Path(tmp) / "ix"
        build(index_dir, model, corpus, args.n)
        db = catalog.connect(index_dir / "catalog.db")
        rng = np.random.default_rng(1)
        dim = alignsearch.open(index_dir).store.dim
        queries = rng.standard_normal((args.repeats, dim)).astype(np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        added, sizes = 0, [0] + [int(x) for x in args.pending.split(",")]
        for pending, resumed in [(n, False) for n in sizes] + [(sizes[-1], True)]:
            if resumed:  # the next run begun, at work (this process): a reader opened now
                with db.begin() as conn:
                    state.write(conn, index_run=state.IndexRun(started=time.time(), pid=os.getpid(),
                                                               pending_below=catalog.next_id(conn)))
            elif pending > added:  # committed by a run that stops before its ANN build, recorded as unfinished
                store = alignsearch.open(index_dir).store
                write, x = catalog_writer(db, store), structured(pending - added, seed=11 + pending)
                for start in range(0, len(x), 5000):
                    chunk = x[start : start + 5000]
                    write([Item(Found("/pending", f"{added + start + j}.jpg", 1, 0.0), crop=np.zeros(1))
                           for j in range(len(chunk))], chunk)
                with db.begin() as conn:
                    # a stopped run's record: a pid above the kernel's largest (2**22) is no process (a run at
                    # work's files are not read beside the ANN index, engine.run_at_work)
                    state.write(conn, index_run=state.IndexRun(started=time.time(), pid=2**22 + 1))
                added = pending
            engines = {name: m.Engine(index_dir, device="cpu") for name, m in modules.items()}
            runs = {name: [] for name in engines}
            for name, engine in engines.items():
                engine.search_vector(queries[0], k=10)  # warm: snapshot, columns
            for _ in range(args.rounds):
                for name, engine in engines.items():
                    t = time.perf_counter()
                    for q in queries:
                        engine.search_vector(q, k=10)
                    runs[name].append((time.perf_counter() - t) / len(queries) * 1e3)
            for name, engine in engines.items():
                opens = []
                for _ in range(5):
                    t = time.perf_counter()
                    engine._open_snapshot()
                    opens.append((time.perf_counter() - t) * 1e3)
                found = sum(h.path.startswith("/pending") for q in queries[:10] for h in engine.search_vector(q, k=10))
                lines.append(f"| {pending:,}{', next run at work' if resumed else ''} | {name} | "
                             f"{statistics.median(runs[name]):.2f} | "
                             f"{statistics.median(opens):.1f} | {found / 10:.1f} |")
                engine.close()
    lines += ["", load_note(load_at_start)]
    record("search: files an unfinished run committed, scored exactly (bench_query.py --suite pending)", lines)


def server_suite(args) -> None:
    """Cold CLI queries through a warm server against the same queries answered locally (the baseline)."""
    import json
    import os
    import signal
    import urllib.request

    from alignsearch.storage.paths import SERVER_FILE

    model, corpus = align_base_checkpoint(), jpeg_corpus(8, seed=1)
    image = str(sorted(corpus.glob("*.jpg"))[0])
    with tempfile.TemporaryDirectory() as tmp:
        index_dir = Path(tmp) / "ix"
        build(index_dir, model, corpus, args.n)
        commands = {label: [sys.executable, "-m", "alignsearch", "query", "--index", str(index_dir), "--json",
                            *(image if a == "IMAGE" else a for a in extra)] for label, extra in SERVED_FORMS.items()}
        local = {label: cold_runs(cmd, runs=5) for label, cmd in commands.items()}
        proc = subprocess.Popen([sys.executable, "-m", "alignsearch", "serve", "--index", str(index_dir), "--port", "0",
                                 "--device", "cpu"], stderr=subprocess.DEVNULL)
        try:
            for _ in range(1200):
                if (index_dir / SERVER_FILE).exists():
                    break
                time.sleep(0.1)
            record_ = json.loads((index_dir / SERVER_FILE).read_text())
            explained = json.loads(subprocess.run(commands["--explain"], check=True, capture_output=True).stdout)
            assert explained["plan"]["via"] == "server", explained["plan"]
            served = {label: cold_runs(cmd, runs=5) for label, cmd in commands.items()}
            request = urllib.request.Request(f"{record_['url']}/api/search?q=red+car",
                                             headers={"Authorization": f"Bearer {record_['token']}"})
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            answer = timed(lambda: opener.open(request).read(), args.repeats)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        info = alignsearch.open(index_dir).info()
    lines = [f"- index: {info['images']:,} vectors ({info['index']['factory']}); {os.cpu_count()} CPUs, load average "
             f"{os.getloadavg()[0]:.1f} at the end",
             f"- the server's answer to GET /api/search?q=red+car from a warm HTTP client: {ms(answer)}",
             "- cold `alignsearch query ... --json` process, start to output, 5 runs each (median; runs):"]
    for label in SERVED_FORMS:
        lines.append(f"  - {label}: through the server {statistics.median(served[label]):.3f} s "
                     f"({', '.join(f'{x:.2f}' for x in served[label])}); baseline, local in the same run "
                     f"{statistics.median(local[label]):.3f} s ({', '.join(f'{x:.2f}' for x in local[label])})")
    record("Cold CLI queries through a warm `alignsearch serve` (issue 26 step 2), align-base geometry, CPU", lines)


def cold_runs(cmd: list[str], runs: int = 3) -> list[float]:
    subprocess.run(cmd, check=True, capture_output=True)  # first: exports what is missing, fills the page cache
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        out.append(time.perf_counter() - t)
    return out


if __name__ == "__main__":
    main()
