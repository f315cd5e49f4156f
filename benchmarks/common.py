"""Shared by the benchmark scripts: machine description, result logging, generated data."""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time
from functools import lru_cache
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
CACHE = Path(os.environ.get("ALIGNSEARCH_BENCH_CACHE", "/tmp/alignsearch-bench"))
sys.path.insert(0, str(HERE.parent / "tests"))  # the random-checkpoint builder the tests use


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = ""
    try:
        import torch

        if torch.cuda.is_available():
            gpu = f", GPU {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    return f"{platform.node()}: {os.cpu_count()} cores {cpu}{gpu}, Python {platform.python_version()}"


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, cwd=HERE)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except OSError:
        return "unknown"


def module_at(rev: str, path: str, name: str):
    """The module at `path` (relative to the repository) as it was at git `rev`, loaded under `name` beside the
    current one: a benchmark's baseline, measured in the same run."""
    import importlib.util
    import sys
    import tempfile

    source = subprocess.run(["git", "show", f"{rev}:{path}"], capture_output=True, text=True, check=True,
                            cwd=HERE.parent).stdout
    file = Path(tempfile.mkdtemp()) / f"{name}.py"
    file.write_text(source)
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module



def base_functions(old_catalog) -> contextlib.ExitStack:
    """The catalog functions a base commit's columns.py calls that this tree's catalog has merged or renamed since
    (count_photos and count_indexed_photos_scanned: count_photos_scanned; photo_rows_sealed: rows_sealed), lent from
    the base's own catalog.py (module_at) while its load runs: else that load raised AttributeError, and a stand-in of
    today's would time today's counts as the base's."""
    from unittest import mock

    from alignsearch.storage import catalog

    stack = contextlib.ExitStack()
    for name in ("count_photos", "count_indexed_photos_scanned", "photo_rows_sealed"):
        if hasattr(old_catalog, name) and not hasattr(catalog, name):
            stack.enter_context(mock.patch.object(catalog, name, getattr(old_catalog, name), create=True))
    return stack

def add_worktree(rev: str, folder: Path) -> str:
    """A detached git worktree of `rev` at folder (a baseline run from its own tree); returns rev's short hash.
    remove_worktree takes it away."""
    short = subprocess.run(["git", "rev-parse", "--short", rev], capture_output=True, text=True, cwd=HERE.parent,
                           check=True).stdout.strip()
    subprocess.run(["git", "worktree", "add", "--detach", str(folder), short], cwd=HERE.parent, check=True,
                   capture_output=True)
    return short


def remove_worktree(folder: Path) -> None:
    subprocess.run(["git", "worktree", "remove", "--force", str(folder)], cwd=HERE.parent, capture_output=True)


def against_base(ap, rounds: int):
    """ap's arguments parsed, with those of a run against a baseline commit: --rounds, --base (main), --no-save."""
    ap.add_argument("--rounds", type=int, default=rounds)
    ap.add_argument("--base", default="main")
    ap.add_argument("--no-save", action="store_true")
    return ap.parse_args()


@contextlib.contextmanager
def base_worktree(rev: str):
    """(a temporary folder, a worktree of rev in it, rev's short hash), the worktree and folder taken away after."""
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "base-tree"
        short = add_worktree(rev, old)
        try:
            yield Path(tmp), old, short
        finally:
            remove_worktree(old)


def per_request_ms(fn, n: int) -> float:
    """The mean milliseconds of n calls of fn, one after another."""
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e3


def load_note(at_start: float) -> str:
    """A results line: the 1-minute load average at the start (os.getloadavg()[0] then) and now, other work on
    the machine being shared by the columns that alternate in one run."""
    return (f"- load average (1 min): {at_start:.2f} at the start, {os.getloadavg()[0]:.2f} at the end; other sessions' "
            f"tests were running on the same {os.cpu_count()} cores: the columns alternate in one run and share that "
            "load, so compare within this run only")


def record(title: str, lines: list[str], save: bool = True) -> None:
    """Print the figures and (save) append them, dated and attributed, to RESULTS.md."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    block = [f"## {title}", "", f"- date: {now}", f"- machine: {machine()}", f"- commit: {commit()}", ""] + lines + [""]
    text = "\n".join(block)
    print(text)
    if save and not os.environ.get("ALIGNSEARCH_BENCH_DRY"):  # a dry run checks a script, records nothing
        with open(RESULTS, "a") as f:
            f.write(text + "\n")


def align_base_checkpoint() -> Path:
    """align-base's geometry with random weights (the hub is not reachable here): right for speed, not quality."""
    from tiny_align import build_tiny_align

    out = CACHE / "align-base-geometry-random"
    if not (out / "config.json").exists():
        build_tiny_align(out, full_size=True)
    return out


def _jpeg(args) -> None:
    """One camera-size JPEG with smooth content, from its own seed (so images are made in parallel)."""
    from PIL import Image, ImageDraw, ImageFilter

    path, i, seed = args
    sizes = [(640, 480), (1024, 768), (1600, 1200), (1920, 1080), (3000, 2000), (4000, 3000)]
    w, h = sizes[i % len(sizes)]
    rng = np.random.default_rng([seed, i])
    small = Image.fromarray((rng.random((12, 16, 3)) * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)
    draw = ImageDraw.Draw(small)
    for _ in range(6):
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        r = int(rng.integers(w // 20, w // 4))
        draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    small.filter(ImageFilter.GaussianBlur(2)).save(path, quality=90)


def jpeg_corpus(n: int, seed: int = 0) -> Path:
    """n JPEGs of camera-like sizes (640x480 to 4000x3000) with smooth content, as photos compress; made
    on every core (512 take two minutes on one)."""
    import multiprocessing

    from alignsearch.workerpool import exit_with_parent  # a killed benchmark leaves no workers behind

    out = CACHE / f"jpegs-v2-{n}-{seed}"
    if out.exists() and len(list(out.glob("*.jpg"))) == n:
        return out
    out.mkdir(parents=True, exist_ok=True)
    with multiprocessing.get_context("spawn").Pool(initializer=exit_with_parent) as pool:
        pool.map(_jpeg, [(out / f"photo{i:05d}.jpg", i, seed) for i in range(n)], chunksize=4)
    return out


# -- issue 29: photographs at camera and web size, and the GPU's utilisation while a command runs --------------

PHOTO_SIZES = {"camera": (4000, 3000), "web": (1280, 800)}  # 12 MP, and ~1 MP
SAMPLES = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "cat", "camera",
           "brick", "grass", "gravel", "coins", "moon", "page", "text", "clock", "horse", "retina", "colorwheel")


@lru_cache(maxsize=1)
def _samples() -> list:
    """scikit-image's sample pictures that load without a download, as RGB arrays."""
    import skimage.data

    out = []
    for name in SAMPLES:
        try:
            arr = np.asarray(getattr(skimage.data, name)())
        except Exception:  # noqa: BLE001 - a sample that needs a download (none here): skipped
            continue
        if arr.dtype != np.uint8:
            arr = (arr.astype(np.float64) / max(1, arr.max()) * 255).astype(np.uint8)
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, -1)
        out.append(arr[..., :3])
    return out


def _photo(args) -> None:
    """One picture: a sample cropped, flipped, lit and (camera) given sensor-like noise, at the corpus's size;
    every 8th is stored on its side with an EXIF orientation that stands it up again."""
    from PIL import Image

    path, i, seed, size, noise = args
    rng = np.random.default_rng([seed, i])
    samples = _samples()
    arr = samples[i % len(samples)]
    h, w = arr.shape[:2]
    ch, cw = int(h * rng.uniform(0.6, 1.0)), int(w * rng.uniform(0.6, 1.0))
    top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    arr = arr[top : top + ch, left : left + cw]
    if rng.random() < 0.5:
        arr = arr[:, ::-1]
    img = Image.fromarray(np.ascontiguousarray(arr)).resize(size, Image.BICUBIC)
    arr = np.asarray(img, dtype=np.float32) * rng.uniform(0.8, 1.2)
    if noise:
        arr += rng.normal(0, noise, arr.shape).astype(np.float32)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    exif = Image.Exif()
    if i % 8 == 7:
        img = img.transpose(Image.Transpose.ROTATE_90)  # stored turned; orientation 6 turns it back
        exif[0x0112] = 6
    img.save(path, quality=int(rng.integers(85, 96)), exif=exif.tobytes())


def photo_corpus(kind: str, n: int, seed: int = 0, distinct: int | None = None, size: tuple[int, int] | None = None) -> Path:
    """n JPEGs made from scikit-image's photographs at camera (12 MP) or web (~1 MP) size: `distinct` pictures
    (cropped, flipped, lit and noised differently; default 48), each copied until there are n files that differ
    in their bytes (a JPEG comment naming the copy), so no copy is taken for one already indexed. Named
    b{picture}-{copy}.jpg; made on every core."""
    import multiprocessing

    from alignsearch.workerpool import exit_with_parent

    size = size or PHOTO_SIZES[kind]
    distinct = min(n, distinct or 48)
    out = CACHE / f"photos-{kind}-{size[0]}x{size[1]}-{n}-{distinct}-{seed}"
    if out.exists() and len(list(out.glob("*.jpg"))) == n:
        return out
    out.mkdir(parents=True, exist_ok=True)
    noise = 4.0 if kind == "camera" else 2.0
    bases = [out / f"b{i:03d}-00000.jpg" for i in range(distinct)]
    with multiprocessing.get_context("spawn").Pool(initializer=exit_with_parent) as pool:
        pool.map(_photo, [(p, i, seed, size, noise) for i, p in enumerate(bases)], chunksize=1)
    for copy in range(distinct, n):
        base = bases[copy % distinct]
        data = base.read_bytes()
        comment = f"copy {copy}".encode()
        data = data[:2] + b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment + data[2:]
        (out / f"{base.name[:4]}-{copy:05d}.jpg").write_bytes(data)
    return out


class TreeRss:
    """The peak of the summed RSS of a process and its descendants (every 20 ms, from /proc), while the block
    runs: watch(pid) once the process is started. Sampled: a peak shorter than a sample can be missed."""

    def __enter__(self):
        import threading

        self.peak, self.pid, self.done = 0, None, threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def watch(self, pid: int) -> None:
        self.pid = pid

    @staticmethod
    def _tree(pid: int) -> list[int]:
        out, todo = [], [pid]
        while todo:
            p = todo.pop()
            out.append(p)
            for task in Path(f"/proc/{p}/task").glob("*/children"):
                try:
                    todo += [int(c) for c in task.read_text().split()]
                except OSError:
                    pass
        return out

    def _sample(self) -> None:
        while not self.done.wait(0.02):
            if self.pid is None:
                continue
            total = 0
            for p in self._tree(self.pid):
                try:
                    total += next(int(line.split()[1]) * 1024 for line in Path(f"/proc/{p}/status").read_text().splitlines()
                                  if line.startswith("VmRSS"))
                except (OSError, StopIteration):
                    pass
            self.peak = max(self.peak, total)

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()


class GpuUtil:
    """nvidia-smi sampled every 200 ms while the block runs; summary() is None where there is no nvidia-smi."""

    def __enter__(self):
        import threading

        self.samples: list[tuple[float, float]] = []
        try:
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used",
                                          "--format=csv,noheader,nounits", "-lms", "200"],
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:
            self.proc = None
            return self
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        return self

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                util, mem = (float(v) for v in line.split(",")[:2])
            except ValueError:
                continue
            self.samples.append((util, mem))

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)

    def summary(self) -> dict | None:
        if not self.samples:
            return None
        util = [u for u, _ in self.samples]
        return {"mean_pct": round(float(np.mean(util)), 1), "peak_pct": max(util), "samples": len(util),
                "memory_peak_mib": max(m for _, m in self.samples)}


def tiny_photos(folder: Path, n: int) -> Path:
    """The tiny test model (built once into the bench cache; its folder returned) and n small noise pictures
    folder/img{i:03d}.jpg to index with it."""
    from PIL import Image
    from tiny_align import build_tiny_align

    model = CACHE / "tiny-align"
    if not (model / "config.json").exists():
        build_tiny_align(model)
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray((rng.random((48, 64, 3)) * 255).astype(np.uint8)).save(folder / f"img{i:03d}.jpg")
    return model


# -- a keyword catalog built in code (bench_keyword_evidence, bench_keyword_format) ---------------------------------

KEYWORD_PLAIN = ("a quiet street with parked cars and trees along the side walk in the late afternoon light near the "
                 "old market hall").split()


def keyword_query_words() -> list[str]:
    """64 letter-only words (no digit: a digit makes a code, the trigram index's)."""
    letters = "bcdfghjklmnpqrstvwz"
    return [f"{a}o{b}an" for a in letters[:8] for b in letters[8:16]]


def keyword_catalog(db_path: Path, n: int, every: int, rng) -> int:
    """A catalog of n files written by catalog.upsert_file and catalog.set_photo (the code an index run uses): each
    named with 2 of the 64 query words and its number (`trip/<w1>_<w2>_<n>.jpg`), two thirds with a caption of 8 plain
    words (KEYWORD_PLAIN), every `every`th file's caption with a query word too; rng: a random.Random."""
    from alignsearch.storage import catalog

    words = keyword_query_words()
    db = catalog.connect(db_path)
    with db.begin() as conn:
        for i in range(n):
            w1, w2 = rng.sample(words, 2)
            relpath = f"trip/{w1}_{w2}_{i}.jpg"
            fid = catalog.upsert_file(conn, {"root": "/photos", "relpath": relpath, "size": 1, "mtime": 0.0,
                                             "status": catalog.INDEXED})
            caption = None
            if i % 3:
                caption = " ".join(rng.sample(KEYWORD_PLAIN, 8))
                if i % every == 0:
                    caption += " " + rng.choice(words)
            catalog.set_photo(conn, fid, relpath, {"caption": caption})
    db.dispose()
    return n


def seal_rows(conn) -> None:
    """Digest every files and photos row written by hand (schema 14: migrate.digest_rows) and seal its vector address
    (schema 17: rowdigest.seal), as a writer digests and seals what it writes: readers refuse a row off its digest or
    seal (exit 7). conn: a SQLAlchemy connection."""
    from alignsearch.storage import migrate

    migrate.seal_rows(conn.connection.dbapi_connection)
