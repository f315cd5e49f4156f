"""What `serve` pays to refuse a file replaced keeping its size and mtime (server.Contents): an indexed photo served
whole and as a cached thumbnail, by the server module of git --base (common.module_at) and by this tree's, in the
same run, on the same engine, in-process (Library.original / Library.thumbnail on this thread, no HTTP: the figures
are the serving path's, not the socket's). Three cases:

- common: the file's ctime is not later than its row's indexed_at: nothing hashed (a stat more);
- suspect, verdict kept: chmod'ed after indexing (same content), its verdict known (every request after the first);
- suspect, first look: the verdict cleared before each request (the first request after a chmod, `cp -p`...): the
  photo hashed from the bytes read, the cached thumbnail's check reading the file for its hash.

And the hash's read rate over one large file (file_sha256, pread in 1 MiB chunks): what a suspect video's first
range request waits for, per GB.

    python benchmarks/bench_serve_suspect.py [--mpix 12] [--requests 200] [--rounds 5] [--base main] [--no-save]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CACHE, against_base, load_note, module_at, per_request_ms, record

import alignsearch
from alignsearch.surfaces import server as server_new


def photo_index(base: Path, mpix: float) -> tuple[Path, Path]:
    """One camera-sized JPEG (smooth gradients and noise, quality 90) indexed by the tiny test model."""
    from PIL import Image
    from tiny_align import build_tiny_align
    from indexer.job import index_folders

    model = CACHE / "tiny-align"
    if not (model / "config.json").exists():
        build_tiny_align(model)
    w = int((mpix * 1e6 * 4 / 3) ** 0.5)
    h = int(w * 3 / 4)
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 255 // w, y * 255 // h, (x + y) * 255 // (w + h)], axis=-1).astype(np.int16)
    img = np.clip(img + rng.integers(-20, 20, img.shape), 0, 255).astype(np.uint8)
    (base / "corpus").mkdir()
    photo = base / "corpus" / "photo.jpg"
    Image.fromarray(img).save(photo, quality=90)
    index_folders([base / "corpus"], base / "ix", model=str(model), device="cpu", workers=0)
    return base / "ix", photo


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mpix", type=float, default=12.0)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--hash-mb", type=int, default=256)
    args = against_base(ap, rounds=5)  # --base: the commit whose alignsearch/surfaces/server.py is the baseline
    load_at_start = os.getloadavg()[0]
    old = module_at(args.base, "alignsearch/surfaces/server.py", "server_old")
    old.WEB_DIR = server_new.WEB_DIR
    modules = {f"base {args.base}": old, "this tree": server_new}
    cases = ("common", "suspect, verdict kept", "suspect, first look")
    results = {(name, case, what): [] for name in modules for case in cases for what in ("photo", "thumb")}
    with tempfile.TemporaryDirectory() as tmp:
        ix, photo = photo_index(Path(tmp), args.mpix)
        size_mb = photo.stat().st_size / 1e6
        engine = alignsearch.open(ix, device="cpu")
        libraries = {name: m.Library(engine, m.ServerConfig()) for name, m in modules.items()}
        file_id = libraries["this tree"].recent(0, 1)["results"][0]["id"]
        for library in libraries.values():  # the thumbnail drawn once and cached (both read the same cache)
            plan = library.thumbnail(file_id, 256)
            if not isinstance(plan, bytes):
                library.draw(plan)
        for case in cases:
            if case != "common":
                os.chmod(photo, 0o600)  # a status change after indexed_at: a suspect from here on
            for _ in range(args.rounds):  # alternating, so both share the machine's load
                for name, library in libraries.items():
                    clear = (getattr(library, "contents", None) is not None and case == "suspect, first look")

                    def whole(lib=library, clear=clear):
                        if clear:
                            lib.contents._verdicts.clear()
                        assert len(lib.original(file_id)[0]) == photo.stat().st_size

                    def thumb(lib=library, clear=clear):
                        if clear:
                            lib.contents._verdicts.clear()
                        assert isinstance(lib.thumbnail(file_id, 256), bytes)

                    whole(), thumb()  # warm: the first call of a case (its stat, its verdict) is not a request's cost
                    results[(name, case, "photo")].append(per_request_ms(whole, args.requests))
                    results[(name, case, "thumb")].append(per_request_ms(thumb, args.requests))
        engine.close()
        big = Path(tmp) / "big.bin"
        with open(big, "wb") as f:
            for _ in range(args.hash_mb):
                f.write(os.urandom(1 << 20))
        rates = []
        fd = os.open(big, os.O_RDONLY)
        try:
            for _ in range(args.rounds):
                t = time.perf_counter()
                server_new.file_sha256(fd)
                rates.append(args.hash_mb * (1 << 20) / 1e6 / (time.perf_counter() - t))
        finally:
            os.close(fd)
    lines = [f"- tiny model, one {args.mpix:g} MP JPEG of {size_mb:.1f} MB; in-process Library calls (no HTTP); "
             f"median of {args.rounds} alternating rounds, each the mean of {args.requests} requests",
             "", "| server.py | case | GET /api/image/ID (whole), ms | GET ?size=256 (cached thumbnail), ms |",
             "|---|---|---|---|"]
    for case in cases:
        for name in modules:
            lines.append(f"| {name} | {case} | {statistics.median(results[(name, case, 'photo')]):.3f} | "
                         f"{statistics.median(results[(name, case, 'thumb')]):.3f} |")
    lines += ["", f"- file_sha256 over a {args.hash_mb} MB file (page cache warm): median {statistics.median(rates):.0f} "
              f"MB/s ({', '.join(f'{r:.0f}' for r in rates)}): a suspect video's first range request waits for "
              "one such pass, later ones reuse the verdict", load_note(load_at_start)]
    record("serve: the content check of a file whose ctime is later than indexed_at (bench_serve_suspect.py)", lines,
           save=not args.no_save)


if __name__ == "__main__":
    main()
