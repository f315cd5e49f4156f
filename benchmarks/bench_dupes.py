"""Issue 16's targets: `dupes --tier similar` on N stored vectors, the near tier's recall and precision on
generated photos with re-saved / resized / cropped copies, and `export` of N rows with its peak memory.

    python benchmarks/bench_dupes.py [--n 1000000] [--photos 300] [--skip-export]

The synthetic index is written directly (catalog rows + vectors.f16 + an IVF-PQ index.faiss built as
`alignsearch index` plans it), with 1% of the rows near copies (cosine ~0.99) of another row, so the
similar tier's recall on them is measured too. Export runs in a child process whose peak RSS is read from
its own /proc/self/status VmHWM (ru_maxrss of a child started by fork + exec can report the parent's peak).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_ann import DIM, structured  # noqa: E402
from common import CACHE, record  # noqa: E402

from alignsearch import ann, catalog, dupes, vectors  # noqa: E402
from alignsearch.paths import ANN_FILE, DB_FILE, VECTORS_FILE  # noqa: E402


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
        catalog.set_meta(conn, "model", {"model": "synthetic", "fingerprint": "synthetic", "dim": DIM})
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


def similar_tier(n: int, lines: list[str]) -> None:
    from alignsearch.engine import open as open_index

    with tempfile.TemporaryDirectory(dir=CACHE if CACHE.exists() else None) as tmp:
        t = time.perf_counter()
        planted = synthetic_index(Path(tmp), n)
        built = time.perf_counter() - t
        engine = open_index(tmp)
        t = time.perf_counter()
        groups = dupes.find_groups(engine, "similar", 0.95)
        took = time.perf_counter() - t
        together = {}
        for g in groups:
            for item in g.items:
                together[item["id"]] = g.keep
        found = sum(1 for a, b in planted.tolist() if a in together and together.get(a) == together.get(b))
        lines.append(f"- similar tier, N = {n:,} stored {DIM}-d vectors ({engine.plan.factory}, nprobe 8, k 10, "
                     f"cosine >= 0.95): {took:.1f} s; {len(groups):,} groups; planted near-copy pairs found "
                     f"{found}/{len(planted)} ({found / len(planted):.3f}); synthetic index built in {built:.0f} s")
        engine.close()
        if not args.skip_export:
            export_memory(Path(tmp), n, lines)


def export_memory(folder: Path, n: int, lines: list[str]) -> None:
    for fmt in ("parquet", "clip-retrieval"):
        out = folder / f"export-{fmt}"
        code = ("import resource, sys, time, json; from alignsearch.engine import open as o; from alignsearch.export import "
                f"export; t = time.perf_counter(); r = export(o({str(folder)!r}), {str(out) + ('.parquet' if fmt == 'parquet' else '')!r}, "
                f"{fmt!r}); print(json.dumps([r['rows'], time.perf_counter() - t, "
                "[int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')][0]]))")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        rows, took, peak_kb = json.loads(proc.stdout.strip().splitlines()[-1])
        lines.append(f"- export --format {fmt}, {rows:,} rows: {took:.1f} s, peak RSS {peak_kb / 1024:.0f} MiB")


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
        hashes = [dupes.phash_of(Image.open(p).convert("RGB")) for p in paths]
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
    args = ap.parse_args()
    CACHE.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []
    if args.photos:  # 0: the similar tier and export only
        near_tier(args.photos, lines)
    for n in args.n or [1_000_000]:
        similar_tier(n, lines)
    lines.append(f"- this process's peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    record("Duplicates and export (issue 16)", lines)
