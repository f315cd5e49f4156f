"""Issue 16's targets: `dupes --tier similar` on N stored vectors, the near tier's recall and precision on
generated photos with re-saved / resized / cropped copies, and `export` of N rows with its peak memory.

    python benchmarks/bench_dupes.py [--n 1000000] [--photos 300] [--skip-export] [--nprobe 8] [--rebuild]
    python benchmarks/bench_dupes.py --photos 0 --n 100000 --n 1000000 --recall 50000
    python benchmarks/bench_dupes.py --photos 0 --n 1000000 --export-only [--format parquet] [--again R]

--export-only measures only `alignsearch export` on each --n's cached index (the similar tier is not run);
--format picks one of its formats (default: both); --again R times R rounds of an export into a fresh OUT then
over that export (an OUT export must check first). ALIGNSEARCH_BENCH_DRY=1 prints without recording.

The synthetic index of N vectors is built once under $ALIGNSEARCH_BENCH_CACHE/dupes-N (default
/tmp/alignsearch-bench) and reused by later runs (--rebuild builds it again). --recall N times nothing: it
compares the similar tier with exact all pairs on N vectors held in each cached index's trained lists.

The synthetic index is written directly (catalog rows + vectors.f16 + an IVF-PQ index.faiss built as
`alignsearch index` plans it), with 1% of the rows near copies (cosine ~0.99) of another row, so the
similar tier's recall on them is measured too. Export runs in a child process whose peak RSS is read from
its own /proc/self/status VmHWM (ru_maxrss of a child started by fork + exec can report the parent's peak).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_ann import DIM, structured
from common import CACHE, record, seal_rows

from alignsearch.storage import ann, catalog, state, vectors
from alignsearch.search import dupes
from alignsearch.media import phash
from alignsearch.storage.paths import ANN_FILE, DB_FILE, VECTORS_FILE


def synthetic_index(folder: Path, n: int) -> np.ndarray:
    """Write an index of n vectors; returns the planted (a, b) id pairs (b a near copy of a)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    store = vectors.VectorStore(folder / VECTORS_FILE, DIM, 0)
    copies = max(1, n // 100)
    planted_src = rng.choice(n - copies, copies, replace=False)
    chunk = 100_000
    for start in range(0, n, chunk):
        block = structured(min(chunk, n - start), seed=start)
        store.append(block)
    # the last `copies` rows become near copies of planted rows
    src = store.get(planted_src)
    noisy = src + 0.1 / np.sqrt(DIM) * rng.standard_normal(src.shape).astype(np.float32)
    noisy /= np.linalg.norm(noisy, axis=1, keepdims=True)
    with open(store.path, "r+b") as f:
        f.seek((n - copies) * store.row_bytes)
        f.write(noisy.astype(vectors.DTYPE).tobytes())
    store._maps.clear()
    db = catalog.connect(folder / DB_FILE)
    with db.begin() as conn:
        for start in range(0, n, 50_000):
            rows = [dict(root="/synthetic", relpath=f"{i:07d}.jpg", size=1000 + i, mtime=1.6e9 + i, sha256=f"{i:064x}",
                         width=640, height=480, format="JPEG", status=catalog.INDEXED, indexed_at=0.0, vec_row=i)
                    for i in range(start, min(n, start + 50_000))]
            conn.execute(catalog.insert(catalog.files), rows)
        seal_rows(conn)  # digested and sealed as a writer writes rows (schemas 14, 17)
        state.write(conn, model=state.ModelIdentity(name="synthetic", fingerprint="synthetic", dim=DIM))
        vectors.save(conn, store)
    db.dispose()
    plan = ann.plan_index(n, DIM)
    index = ann.create(plan, DIM)
    sample = store.get(np.sort(rng.choice(n, ann.train_size(n, plan) or 1, replace=False)))
    ids = np.arange(n, dtype=np.int64)
    index = ann.train_and_fill(index, sample, ((store.get(ids[s : s + 65_536]), ids[s : s + 65_536] + 1)
                                               for s in range(0, n, 65_536)))
    ann.write_atomic(index, folder / ANN_FILE)
    return np.stack([planted_src + 1, np.arange(n - copies, n) + 1], axis=1)


def cached_index(n: int, rebuild: bool = False) -> tuple[Path, np.ndarray, float | None]:
    """The synthetic index of n vectors under CACHE/dupes-{n}, built once and reused (its planted pairs are
    saved last, so a build killed half-way is not taken for a finished one). Returns the folder, the planted
    pairs and the build time (None when it was reused)."""
    folder = CACHE / f"dupes-{n}"
    marker = folder / "planted.npy"
    if marker.exists() and not rebuild:
        return folder, np.load(marker), None
    if folder.exists():
        shutil.rmtree(folder)
    t = time.perf_counter()
    planted = synthetic_index(folder, n)
    built = time.perf_counter() - t
    np.save(folder / "planted.tmp.npy", planted)
    os.replace(folder / "planted.tmp.npy", marker)
    return folder, planted, built


def similar_tier(n: int, lines: list[str]) -> None:
    from alignsearch.search.engine import open as open_index

    folder, planted, built = cached_index(n, args.rebuild)
    engine = open_index(folder)
    t = time.perf_counter()
    groups = dupes.find_groups(engine, "similar", 0.95, nprobe=args.nprobe)
    took = time.perf_counter() - t
    together = {}
    for g in groups:
        for item in g.items:
            together[item["id"]] = g.keep
    found = sum(1 for a, b in planted.tolist() if a in together and together.get(a) == together.get(b))
    how = f"synthetic index built in {built:.0f} s" if built is not None else f"synthetic index reused from {folder}"
    lines.append(f"- similar tier, N = {n:,} stored {DIM}-d vectors ({engine.plan.factory}, nprobe {args.nprobe}, "
                 f"cosine >= 0.95): {took:.1f} s; {len(groups):,} groups; planted near-copy pairs found "
                 f"{found}/{len(planted)} ({found / len(planted):.3f}); {how}")
    engine.close()
    if not args.skip_export:
        export_memory(folder, n, lines)


def bursts(n: int, sources: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n structured unit vectors of which the last rows are 1-4 copies of each of `sources` rows, each at a
    cosine drawn uniformly from [0.90, 1.00) to its source, moved half along the data's own subspace (which
    changes its IVF list, as a different shot of a scene would) and half in random directions. Returns the
    vectors and each row's source (itself when it is not a copy)."""
    rng = np.random.default_rng(seed)
    x = structured(n, seed=seed)
    copies = rng.integers(1, 5, sources)
    src = np.repeat(rng.choice(n - int(copies.sum()), sources, replace=False), copies)
    rows = np.arange(n - len(src), n)
    along = structured(len(src), seed=seed + 1) + rng.standard_normal((len(src), DIM)).astype(np.float32) / np.sqrt(DIM)
    along -= np.einsum("ij,ij->i", along, x[src])[:, None] * x[src]  # orthogonal to the source
    along /= np.linalg.norm(along, axis=1, keepdims=True)
    c = rng.uniform(0.90, 1.00, len(src)).astype(np.float32)[:, None]
    x[rows] = c * x[src] + np.sqrt(1 - c**2) * along
    source = np.arange(n)
    source[rows] = src
    return x, source


def exact_pairs(x: np.ndarray, threshold: float, block: int = 4096) -> set[tuple[int, int]]:
    """Every pair (i < j) of rows with cosine >= threshold, from all pairs (the ground truth)."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    found = set()
    for i in range(0, len(x), block):
        scores = x[i : i + block] @ x[i:].T
        a, b = np.nonzero(scores >= threshold)
        b += i
        keep = b > a + i
        found.update(zip((a[keep] + i).tolist(), b[keep].tolist()))
    return found


def recall_vs_exact(n: int, trained_on: int, lines: list[str]) -> None:
    """The similar tier's pairs against the exact all-pairs truth on n vectors with bursts of near copies,
    held in the trained IVF-PQ index of the cached synthetic index of `trained_on` vectors (its lists, not
    its vectors: emptied, then filled with these), for each nprobe and threshold."""
    import faiss

    folder, _, _ = cached_index(trained_on)
    index = faiss.read_index(str(folder / ANN_FILE))
    index.reset()
    x, source = bursts(n, n // 50, seed=321)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        store = vectors.VectorStore(Path(tmp) / VECTORS_FILE, DIM, 0)
        store.append(x)
        store.rows = n
        stored = store.get(np.arange(n))  # what the index and the truth see: fp16 rows
        index.add_with_ids(stored, np.arange(n, dtype=np.int64) + 1)
        live = np.stack([np.arange(n) + 1, np.arange(n)], axis=1)
        plan = ann.describe(index)
        for threshold in (0.90, 0.95):
            t = time.perf_counter()
            truth = exact_pairs(stored, threshold)
            exact_s = time.perf_counter() - t
            for nprobe in (1, 2, 4, 8):
                t = time.perf_counter()
                pairs = dupes.similar_pairs(index, store, live, threshold, nprobe=nprobe) - 1
                took = time.perf_counter() - t
                got = set(map(tuple, pairs.tolist()))
                group = {i: g[0] for g in dupes.components(got) for i in g}
                grouped = sum(1 for a, b in truth if a in group and group.get(a) == group.get(b))
                lines.append(f"- similar tier vs exact, {n:,} vectors ({len(truth):,} true pairs at cosine >= {threshold}; "
                             f"exact all pairs {exact_s:.0f} s) in {plan.factory} lists trained on {trained_on:,}, "
                             f"nprobe {nprobe}: pair recall {len(got & truth) / max(1, len(truth)):.4f}, pairs in one group "
                             f"{grouped / max(1, len(truth)):.4f}, precision {len(got & truth) / max(1, len(got)):.4f}; {took:.1f} s")


def export_memory(folder: Path, n: int, lines: list[str]) -> None:
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:  # the exports are not kept
        for fmt in args.format or ("parquet", "clip-retrieval"):
            if args.again:
                export_again(folder, Path(tmp), fmt, args.again, lines)
            else:
                export_peak(folder, Path(tmp) / f"export-{fmt}", fmt, lines)


def export_again(folder: Path, tmp: Path, fmt: str, rounds: int, lines: list[str]) -> None:
    """An export into a fresh OUT, then the same export over it (export checks that OUT holds only its own
    earlier export: a clip-retrieval OUT's files are read back for their sha256, clip_refusal), `rounds` times in
    turn, so both share the machine's load; medians of each."""
    fresh, over = [], []
    for r in range(rounds):
        out = tmp / f"again-{fmt}-{r}"
        for times in (fresh, over):
            probe: list[str] = []
            export_peak(folder, out, fmt, probe)
            times.append(float(probe[0].split(" rows: ")[1].split(" s,")[0]))
        shutil.rmtree(out, ignore_errors=True)
        Path(str(out) + ".parquet").unlink(missing_ok=True)
    lines.append(f"- `alignsearch export --format {fmt}` over its own earlier export vs into a fresh OUT, {rounds} "
                 f"rounds in turn: median {np.median(over):.1f} s vs {np.median(fresh):.1f} s (over: "
                 f"{', '.join(f'{t:.1f}' for t in over)}; fresh: {', '.join(f'{t:.1f}' for t in fresh)})")


def export_peak(folder: Path, out: Path, fmt: str, lines: list[str]) -> None:
    """`alignsearch export` itself (the click command, in a child Python): its peak RSS read from the child's own
    /proc/self/status VmHWM once the command returned, and the peaks of its two parts, sampled every 20 ms:
    RssAnon (memory the process allocated) and RssFile (pages of files it maps, here vectors.f16 read through
    a memory map: page cache the kernel can drop, counted in RSS while mapped)."""
    target = str(out) + (".parquet" if fmt == "parquet" else "")
    code = ("import json, threading, time; from alignsearch.surfaces.cli import main\n"
            "peak = {'RssAnon:': 0, 'RssFile:': 0}\n"
            "def sample():\n"
            "    while True:\n"
            "        for l in open('/proc/self/status'):\n"
            "            if l.split()[0] in peak: peak[l.split()[0]] = max(peak[l.split()[0]], int(l.split()[1]))\n"
            "        time.sleep(0.02)\n"
            "threading.Thread(target=sample, daemon=True).start(); t = time.perf_counter()\n"
            f"main(['export', {target!r}, '--format', {fmt!r}, '--index', {str(folder)!r}, '--json'], standalone_mode=False)\n"
            "took = time.perf_counter() - t\n"
            "hwm = [int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')][0]\n"
            "print(json.dumps([took, hwm, peak['RssAnon:'], peak['RssFile:']]))")
    load = os.getloadavg()[0]
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    load = f"load average (1 min, 2 cores) {load:.1f} before, {os.getloadavg()[0]:.1f} after"
    out_lines = proc.stdout.strip().splitlines()
    report, (took, hwm, anon, mapped) = json.loads(out_lines[-2]), json.loads(out_lines[-1])
    lines.append(f"- `alignsearch export --format {fmt}`, {report.get('rows', '?'):,} rows: {took:.1f} s, peak RSS (VmHWM) "
                 f"{hwm / 1024:.0f} MiB; sampled peaks: RssAnon {anon / 1024:.0f} MiB, RssFile {mapped / 1024:.0f} MiB; {load}")


def near_tier(photos: int, lines: list[str]) -> None:
    from PIL import Image

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from helpers import near_copies, smooth_photos

    with tempfile.TemporaryDirectory() as tmp:
        originals = smooth_photos(Path(tmp) / "p", photos, seed=11, size=(640, 480))
        paths, family = [], []
        for i, p in enumerate(originals):
            for q in [p, *near_copies(p, Path(tmp) / "c")]:
                paths.append(q)
                family.append(i)
        t = time.perf_counter()
        hashes = [phash.phash_of(Image.open(p).convert("RGB")) for p in paths]
        hash_ms = (time.perf_counter() - t) / len(paths) * 1000
        family = np.array(family)
        truth = sum(int(c) * (int(c) - 1) // 2 for c in np.bincount(family))
        for threshold in (6, 8, 10, 12, 14):
            pairs = dupes.near_pairs(np.arange(len(paths)), hashes, threshold)
            right = int((family[pairs[:, 0]] == family[pairs[:, 1]]).sum())
            recall, precision = right / truth, right / max(1, len(pairs))
            false_rate = (len(pairs) - right) / (len(paths) * (len(paths) - 1) / 2 - truth)
            lines.append(f"- near tier, threshold {threshold:2d} bits: recall {recall:.3f}, precision {precision:.3f}, "
                         f"false-positive rate per distinct pair {false_rate:.1e} ({photos} photos x 4 versions)")
        lines.append(f"- phash per 640x480 image: {hash_ms:.1f} ms")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, action="append")
    ap.add_argument("--photos", type=int, default=300)
    ap.add_argument("--skip-export", action="store_true")
    ap.add_argument("--export-only", action="store_true", help="only `alignsearch export` on each --n's cached index")
    ap.add_argument("--format", action="append", choices=["parquet", "clip-retrieval"],
                    help="the export format(s) measured (repeatable; default both)")
    ap.add_argument("--again", type=int, default=0, metavar="R",
                    help="with --export-only: R rounds of an export into a fresh OUT then the same export over it")
    ap.add_argument("--nprobe", type=int, default=dupes.SIMILAR_NPROBE, help="similar tier: IVF lists visited per vector")
    ap.add_argument("--recall", type=int, default=0, metavar="N",
                    help="instead of timing: the similar tier's recall against exact all pairs on N vectors, held in the lists of "
                         "each --n's cached index")
    ap.add_argument("--rebuild", action="store_true", help="build the synthetic index again (else reused from the cache)")
    args = ap.parse_args()
    CACHE.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []
    load_before = os.getloadavg()[0]  # the machine is shared: say how busy it was
    if args.photos:  # 0: the similar tier and export only
        near_tier(args.photos, lines)
    for n in args.n or [1_000_000]:
        if args.recall:
            recall_vs_exact(args.recall, n, lines)
        elif args.export_only:
            export_memory(cached_index(n, args.rebuild)[0], n, lines)
        else:
            similar_tier(n, lines)
    lines.append(f"- load average (1 min, 2 cores) at start {load_before:.1f}, at end {os.getloadavg()[0]:.1f}")
    lines.append(f"- this process's peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    record("bench_dupes: similar tier against exact all pairs (issue 16)" if args.recall else
           "bench_dupes: export peak memory (issue 16)" if args.export_only else "Duplicates and export (issue 16)", lines)
