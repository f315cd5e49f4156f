"""Helpers shared by several test modules (conftest.py keeps the fixtures and `run`)."""

from __future__ import annotations

import dataclasses
import ctypes
import errno
import hashlib
import io
import struct
import tarfile
import zlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.error import HTTPError

import numpy as np
import pytest
import torch
from PIL import Image

from alignsearch.storage.paths import SERVER_FILE

PR_CAPBSET_DROP = 24
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 1, 2


def _drop_dac_capabilities() -> None:
    """In a child before exec: drop root's power to read and list whatever the file modes say, so a
    chmod 000 folder really cannot be listed (the tests run as root, where chmod alone stops nothing)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


NOBODY = 65534


def as_nobody() -> None:
    """In a child before exec: become the user nobody (another user than the tests' root)."""
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)


def can_drop_dac() -> bool:
    """Whether a child can be started without the root file-permission bypass (else such tests skip)."""
    if os.geteuid() != 0:
        return True
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        locked = os.path.join(tmp, "locked")
        os.mkdir(locked, 0)
        try:
            probe = subprocess.run([sys.executable, "-c", f"import os; os.listdir({locked!r})"],
                                   preexec_fn=_drop_dac_capabilities, capture_output=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return False
        finally:
            os.chmod(locked, 0o700)
    return probe.returncode != 0  # a mode-0 folder lists only with the bypass


def alignsearch(*args, timeout: float = 300, unprivileged: bool = False, stdin=None, **kwargs) -> subprocess.CompletedProcess:
    """`python -m alignsearch ARGS` in a child process; unprivileged: without the root permission bypass."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **kwargs.pop("env", {})}
    preexec = _drop_dac_capabilities if unprivileged and os.geteuid() == 0 else None
    return subprocess.run([sys.executable, "-m", "alignsearch", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, preexec_fn=preexec, stdin=stdin, **kwargs)


# ru_maxrss (RUSAGE_SELF) of a child forked from pytest starts at pytest's own peak (Linux keeps it across
# fork and exec): with a 2 GB pytest process every child "peaked" at 2 GB. So the child resets its VmHWM
# first (clear_refs 5) and reports that, with its workers' ru_maxrss (they fork from it after the reset).
PEAK_RSS = """
import resource, sys
with open('/proc/self/clear_refs', 'w') as f:
    f.write('5')
from alignsearch.surfaces.cli import main
try:
    main(sys.argv[1:], prog_name="alignsearch")
except SystemExit as exc:
    code = exc.code
else:
    code = 0
with open('/proc/self/status') as f:
    hwm = next(int(line.split()[1]) for line in f if line.startswith('VmHWM:'))
peak = max(hwm, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
print("PEAK_RSS_KB", peak, file=sys.stderr)
sys.exit(code)
"""


def alignsearch_peak_rss(*args, timeout: float = 300) -> tuple[subprocess.CompletedProcess, int]:
    """Run the command in a child; returns the result and the peak resident memory (bytes) of the child
    and its worker processes (the larger of the two)."""
    proc = subprocess.run([sys.executable, "-c", PEAK_RSS, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    line = [x for x in proc.stderr.splitlines() if x.startswith("PEAK_RSS_KB")]
    assert line, proc.stderr[-3000:]
    return proc, int(line[-1].split()[1]) * 1024


def summary(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def near_copies(src, folder, stem: str | None = None) -> list:
    """Copies of one image as libraries hold them: re-saved as a lower-quality JPEG, resized to half, and
    cropped by 4% on each side (then re-saved). Returns their paths."""
    from pathlib import Path

    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stem = stem or Path(src).stem
    img = Image.open(src).convert("RGB")
    w, h = img.size
    out = [folder / f"{stem}-resaved.jpg", folder / f"{stem}-half.png", folder / f"{stem}-cropped.jpg"]
    img.save(out[0], quality=60)
    img.resize((max(1, w // 2), max(1, h // 2)), Image.LANCZOS).save(out[1])
    dx, dy = int(w * 0.04), int(h * 0.04)
    img.crop((dx, dy, w - dx, h - dy)).save(out[2], quality=85)
    return out


def smooth_photos(folder, n: int, seed: int = 0, size=(320, 240)) -> list:
    """n distinct photo-like images (smooth colour fields with blurred shapes, as photos compress)."""
    from pathlib import Path

    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    w, h = size
    for i in range(n):
        img = Image.fromarray((rng.random((6, 8, 3)) * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)
        draw = ImageDraw.Draw(img)
        for _ in range(5):
            x, y, r = int(rng.integers(0, w)), int(rng.integers(0, h)), int(rng.integers(w // 12, w // 4))
            draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        path = folder / f"photo{i:04d}.jpg"
        img.filter(ImageFilter.GaussianBlur(2)).save(path, quality=90)
        paths.append(path)
    return paths


# -- work a session does once (conftest.py's `prebuilt` fixture) ---------------------------------------


def _force_rmtree(path: Path) -> None:
    """rmtree that also removes what a test left unreadable (chmod 000 folders, read-only files)."""
    import shutil

    def unlock(func, name, _exc):
        os.chmod(os.path.dirname(name), 0o755)
        if os.path.isdir(name) and not os.path.islink(name):
            os.chmod(name, 0o755)
        func(name)

    if path.exists() or path.is_symlink():
        shutil.rmtree(path, onerror=unlock)


class Prebuilt:
    """Folders a session builds once (an indexed corpus, a model, an ONNX export) and every test that asks
    gets whole and private: the first build is kept as a pristine copy, and each later request puts that
    copy back at the very same absolute path, so what the build recorded inside (a catalog's roots, the
    model folder) still points at the test's own files. Tests run one at a time, so a test may write into
    its folder freely; ask from function-scoped fixtures only (a later test's request replaces the folder)."""

    def __init__(self, base: Path):
        self.base = Path(base)
        self.built: dict[str, object] = {}

    def folder(self, name: str, build) -> tuple[Path, object]:
        """(the folder, what build returned): build(folder) fills an empty folder on the first request."""
        import shutil

        work, pristine = self.base / "work" / name, self.base / "pristine" / name
        _force_rmtree(work)
        if name in self.built:
            shutil.copytree(pristine, work, symlinks=True)
            return work, self.built[name]
        work.mkdir(parents=True)
        result = build(work)
        shutil.copytree(work, pristine, symlinks=True)
        self.built[name] = result
        return work, result


# -- a real `alignsearch serve` over a socket (test_server.py, test_search_filters.py) -------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_serve(ix, *args, port=None, prelude: str = ""):
    """A real `alignsearch serve` process on a free port; (process, base URL) once it answers. prelude: Python run
    in that process before the CLI (a hook: KILLED_MID_HASH)."""
    port = port or free_port()
    program = ["-c", prelude + "\nfrom alignsearch.__main__ import run\nrun()\n"] if prelude else ["-m", "alignsearch"]
    proc = subprocess.Popen([sys.executable, *program, "serve", "--index", str(ix), "--port", str(port),
                             "--device", "cpu", *args], stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(url + "/healthz", timeout=1)
            break
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail("server did not start: " + proc.stderr.read())
    if proc.poll() is not None:
        pytest.fail("server exited: " + proc.stderr.read())
    for _ in range(50):  # the record is written as the server starts
        if (Path(ix) / SERVER_FILE).exists():
            break
        time.sleep(0.1)
    return proc, url


# for start_serve: the server kill -9s itself part way through hashing a suspect file (Contents.check), at the
# read of its second MiB (file_sha256 reads 1 MiB a pread): a file over 1 MiB is killed with its hash half taken
KILLED_MID_HASH = r"""
import os, signal
from alignsearch.surfaces import server

real_pread, real_hash = os.pread, server.file_sha256

def pread(fd, n, at):
    if at >= 1 << 20:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_pread(fd, n, at)

def file_sha256(fd):
    os.pread = pread
    return real_hash(fd)

server.file_sha256 = file_sha256
"""


def stop(proc, sig=signal.SIGTERM):
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def fake_server_record(ix, port: int, pid: int | None = None) -> None:
    """The server record of a server of this process's (or pid's) at 127.0.0.1:port for index ix, as `serve`
    writes it (a stand-in server: hung, or answering as the test chooses)."""
    from alignsearch.surfaces import client

    ix = Path(ix)
    record = {"pid": os.getpid() if pid is None else pid, "hostname": socket.gethostname(), "host": "127.0.0.1", "port": port,
              "url": f"http://127.0.0.1:{port}", "token": "t", "index_id": client.local_index_id(ix),
              "index_dir": str(ix.resolve()), "search_params": ["q", "k"]}
    (ix / SERVER_FILE).write_text(json.dumps(record))
    os.chmod(ix / SERVER_FILE, 0o600)


def call(url, path, token="s3cret", data=None, headers=None, method=None):
    headers = dict(headers or {})
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url + path, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, r.headers, r.read()
    except HTTPError as exc:
        return exc.code, exc.headers, exc.read()




def write_labels(path, lines) -> Path:
    """A --labels-file with these lines (comments and blanks included as given)."""
    path = Path(path)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# -- builders shared by several test modules ---------------------------------------------------------


def reference_processor(model_dir):
    """transformers' own AlignProcessor, with the PIL image backend that alignsearch reproduces."""
    from transformers import AlignProcessor

    processor = AlignProcessor.from_pretrained(model_dir)
    try:  # transformers 5 picks torchvision when it is installed
        from transformers import EfficientNetImageProcessorPil

        processor.image_processor = EfficientNetImageProcessorPil.from_pretrained(model_dir)
    except ImportError:  # transformers 4: PIL is the only backend
        pass
    return processor


def reference_embeddings(model_dir, texts=None, images=None):
    from transformers import AlignModel

    model = AlignModel.from_pretrained(model_dir).eval()
    processor = reference_processor(model_dir)
    with torch.no_grad():
        if texts is not None:
            out = model.get_text_features(**processor(text=texts, padding=True, return_tensors="pt"))
        else:
            out = model.get_image_features(**processor(images=images, return_tensors="pt"))
    out = out if isinstance(out, torch.Tensor) else out.pooler_output
    return (out / out.norm(dim=-1, keepdim=True)).numpy()  # as AlignModel.forward normalises


def write_shard(path, files, root):
    """A WebDataset shard: each image with a caption and a JSON sibling sharing its key."""
    with tarfile.open(path, "w") as tar:
        for f in files:
            key = f.relative_to(root).with_suffix("").as_posix()
            for name, data in ((f"{key}{f.suffix}", f.read_bytes()), (f"{key}.txt", b"a caption"),
                               (f"{key}.json", b"{}")):
                info = tarfile.TarInfo(name)
                info.size, info.mtime = len(data), 1_700_000_000
                tar.addfile(info, io.BytesIO(data))


def png_bomb(width, height) -> bytes:
    """A valid PNG whose header claims width x height pixels."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def clustered(n, dim, seed=0, clusters=50):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    x = centres[rng.integers(0, clusters, n)] + 0.4 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def list_root(db, root: str = "/synthetic") -> None:
    """Add root to the roots the index's meta table lists, as a run lists a root before it writes a row of it:
    rows of a root it does not list are damage (catalog.unlisted_roots, verify)."""
    from alignsearch.storage import state

    with db.begin() as conn:
        roots = state.read(conn, "roots").roots
        if root not in roots.roots:
            state.write(conn, roots=dataclasses.replace(roots, roots=(*roots.roots, root)))


def add_synthetic(index_dir, n, dim, seed=0):
    """n catalog rows with clustered unit vectors, written by the real writer."""
    return write_vectors(index_dir, clustered(n, dim, seed=seed))


def write_vectors(index_dir, x, names=None):
    """Catalog rows /synthetic/{name} (names: 0.jpg, 1.jpg... by default) holding these unit vectors, written by the
    real writer; a name the catalog holds is replaced (a new id, as a run that read the file again gives it)."""
    import alignsearch
    from alignsearch.storage import catalog
    from indexer.decode import Item
    from indexer.scan import Found
    from indexer.writer import catalog_writer

    names = names or [f"{j}.jpg" for j in range(len(x))]
    db = catalog.connect(index_dir / "catalog.db")
    list_root(db)
    engine = alignsearch.open(index_dir)
    store = engine.store
    write = catalog_writer(db, store)
    for start in range(0, len(x), 2000):
        chunk = x[start : start + 2000]
        write([Item(Found("/synthetic", name, 1, 0.0), crop=np.zeros(1)) for name in names[start : start + 2000]], chunk)
    return db, store


def vector_index(folder, n, dim, seed=0, rows=None):
    """An index of n catalog rows and their unit vectors at any width, written directly (catalog rows,
    vectors.f16, an empty flat ANN index), as benchmarks/bench_dupes.py writes its synthetic index: for
    commands that read the catalog and the stored vectors (export) at sizes no test should encode. rows: the
    (n, dim) vectors to store (unit length; equal rows give equal similarities), instead of random ones."""
    from alignsearch.storage import ann, catalog, state, vectors
    from alignsearch.storage.paths import ANN_FILE, DB_FILE, VECTORS_FILE

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    store = vectors.VectorStore(folder / VECTORS_FILE, dim, 0)
    rng = np.random.default_rng(seed)
    for start in range(0, n, 10_000):
        x = rng.standard_normal((min(10_000, n - start), dim)).astype(np.float32)
        store.append(x / np.linalg.norm(x, axis=1, keepdims=True) if rows is None else
                     np.asarray(rows[start : start + len(x)], np.float32))
    db = catalog.connect(folder / DB_FILE)
    with db.begin() as conn:
        for start in range(0, n, 10_000):
            conn.execute(catalog.insert(catalog.files), [
                dict(root="/synthetic", relpath=f"{i:07d}.jpg", size=1000 + i, mtime=1.6e9 + i, sha256=f"{i:064x}",
                     width=640, height=480, format="JPEG", status=catalog.INDEXED, indexed_at=0.0, vec_row=i)
                for i in range(start, min(n, start + 10_000))])
        seal(conn)  # synthetic rows with the digests a writer gives them
        state.write(conn, model=state.ModelIdentity(name="synthetic", fingerprint="synthetic", dim=dim))
        # as a run lists a root before it writes a row of it: rows of a root the meta table does not list are
        # damage (catalog.unlisted_roots, verify)
        state.write(conn, roots=state.RootsState(roots=("/synthetic",)))
        vectors.save(conn, store)
    db.dispose()
    ann.write_atomic(ann.create(ann.plan_index(0, dim), dim), folder / ANN_FILE)
    return store


def layout_index(folder, n=10_000, dim=16, **layout):
    """vector_index's n vectors with checksums recorded, and an ANN index built by the real writer in the layout
    the keywords ask for (ondisk_shards=, index_shards=; IVF-PQ from 10,000 vectors). Returns (db, store, report)."""
    from alignsearch.storage import catalog, vectors
    from alignsearch.storage.paths import ANN_FILE, DB_FILE
    from indexer.build import sync_index

    store = vector_index(folder, n, dim)
    db = catalog.connect(Path(folder) / DB_FILE)
    with db.begin() as conn:
        for segment in vectors.check(conn, store).legacy_segments:
            vectors.adopt_segment(conn, store, segment)
    return db, store, sync_index(db, store, Path(folder) / ANN_FILE, **layout)


VMHWM = """
import json, sys
exec(sys.argv[1])
import alignsearch.surfaces.cli, alignsearch.search.engine, alignsearch.search.export, faiss, pyarrow.parquet  # loaded before the baseline

def status():
    return {l.split(':')[0]: int(l.split()[1]) * 1024 for l in open('/proc/self/status')
            if l.startswith(('VmRSS', 'VmHWM', 'RssAnon', 'RssFile'))}

try:
    with open('/proc/self/clear_refs', 'w') as f:  # 5: VmHWM starts again from the current RSS
        f.write('5')
except OSError:
    pass
base = status()
try:
    alignsearch.surfaces.cli.main(sys.argv[2:], prog_name="alignsearch")
except SystemExit as exc:
    if exc.code:
        raise
print("VMHWM", json.dumps({"base": base, "end": status()}), file=sys.stderr)
"""


def alignsearch_vmhwm(*args, setup: str = "", timeout: float = 300) -> tuple[subprocess.CompletedProcess, dict]:
    """Run the command in a child Python (after `setup`, Python code) and return the result and its memory
    in bytes: "base" (VmRSS and VmHWM once the modules are imported, the peak then reset to it where the
    kernel allows), "peak" (VmHWM when the command returned: resident pages of every kind, memory-mapped
    files included) and "growth" (peak - base: what the command itself took)."""
    proc = subprocess.run([sys.executable, "-c", VMHWM, setup, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    line = [x for x in proc.stderr.splitlines() if x.startswith("VMHWM")]
    assert line, proc.stderr[-3000:]
    got = json.loads(line[-1].split(" ", 1)[1])
    return proc, {"base": got["base"]["VmRSS"], "peak": got["end"]["VmHWM"],
                  "growth": got["end"]["VmHWM"] - got["base"]["VmRSS"], "end": got["end"]}


# -- videos (alignsearch/media/video.py) ------------------------------------------------------------------------


def scene_frame(seed: int, size=(160, 90)) -> np.ndarray:
    """A distinct still picture (a smooth colour field with shapes), the same for the same seed."""
    from PIL import ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    w, h = size
    img = Image.fromarray((rng.random((3, 4, 3)) * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x, y, r = int(rng.integers(0, w)), int(rng.integers(0, h)), int(rng.integers(h // 8, h // 3))
        draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    return np.asarray(img.filter(ImageFilter.GaussianBlur(1)))


def make_video(path, scenes, fps: int = 10, size=(160, 90), codec: str = "libx264", drift: bool = True) -> Path:
    """Encode a video with PyAV: scenes is [(seed, seconds)], each a still picture (scene_frame) that drifts a
    pixel per frame when `drift` (motion, not a cut); the cuts lie at the scenes' boundaries."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for seed, seconds in scenes:
            still = scene_frame(seed, size)
            for i in range(int(round(seconds * fps))):
                picture = np.roll(still, i % 8, axis=1) if drift else still
                for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(picture), format="rgb24")):
                    out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def render_sign(path: Path, lines: list[str], size=(640, 240), font_size: int = 40, background="white") -> Path:
    """A sign: dark words on a plain background, drawn with Pillow's scalable default font (no font files)."""
    from PIL import ImageDraw, ImageFont

    img = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=font_size)
    for i, line in enumerate(lines):
        draw.text((20, 30 + int(font_size * 2.2) * i), line, fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def decode_or_die(item):
    """For decode-worker tests: a worker process that meets "die" dies at once (as the OOM killer ends one);
    "die-once" kills only the first worker that meets it (a marker file remembers)."""
    if item == "die" or (item.startswith("die-once:") and not os.path.exists(item.split(":", 1)[1])):
        if item != "die":
            open(item.split(":", 1)[1], "w").close()
        os._exit(9)
    time.sleep(0.01)
    return item.upper()


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is pid (from /proc), e.g. an index run's decode workers."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


DECODE_PEAK = """
import sys
from alignsearch.media.images import ImageSpec, decode
spec = ImageSpec(resize=(346, 346), resample=3, crop=(289, 289), rescale_factor=1 / 127.5, rescale_offset=True,
                 mean=None, std=None, include_top_std=None)  # align-base's preprocessing
data = open(sys.argv[1], "rb").read()
with open('/proc/self/clear_refs', 'w') as f:
    f.write('5')
base = int(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmRSS:')))
out = decode(data, spec)
peak = int(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')))
print(out.width, out.height, (peak - base) * 1024)
"""


def decode_growth(path) -> tuple[int, int, int]:
    """(width, height, bytes) of an image file decoded with align-base's preprocessing in a fresh process:
    its stored size and how far the peak resident memory rose above what the process held before."""
    proc = subprocess.run([sys.executable, "-c", DECODE_PEAK, str(path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    width, height, growth = proc.stdout.split()
    return int(width), int(height), int(growth)


# -- the index an older alignsearch wrote (tests/fixtures/index-v3: test_state.py, test_attacks.py) ----------

FIXTURES = Path(__file__).parent / "fixtures"
V3_EXPECTED = json.loads((FIXTURES / "index-v3.json").read_text())
_FLOATS = ("score", "similarity")


def answers_as_recorded(copy: Path, model_moved: bool = False) -> None:
    """Every query of index-v3.json answers what 590b6d4 answered: the same ids, paths and fields, scores
    within 1e-6; and `info` says the same (model_moved: but for the model's folder, which an `index --model`
    run remembers at its new place)."""
    from unittest import mock

    from conftest import run

    from alignsearch.search import query
    from alignsearch.storage import keywords

    expected = V3_EXPECTED
    build_photos = Path(expected["build_root"]) / "photos"
    # 590b6d4 ranked keyword matches one after the other, where matches equal in bm25 now share a rank
    # (query.keyword_ranks; "red circle" matches every file by "circle", four and two of them equal in bm25), in the
    # order of their ids, where equal ones are now ordered by the path they are listed by (keywords.TIE_ORDER): the
    # answers are checked as those rules give them, so that what is compared is the index as read, not the rules
    with mock.patch.object(query, "keyword_ranks", sequential_keyword_ranks), \
            mock.patch.object(keywords, "TIE_ORDER", "h.id"):
        for recorded in expected["answers"]:
            args = [str(copy / "photos" / Path(a).relative_to(build_photos)) if a.startswith(str(build_photos))
                    else a for a in recorded["args"]]
            out = run(*args, "--index", copy / ".alignsearch", "--model", copy / "model", *expected["options"],
                      "--json")
            got = json.loads(out.output)["results"]
            assert [(h["id"], h["path"]) for h in got] == [(h["id"], h["path"]) for h in recorded["results"]], args
            for mine, theirs in zip(got, recorded["results"]):
                for key in _FLOATS:
                    assert mine[key] == pytest.approx(theirs[key], abs=1e-6), (args, key)
                assert {k: v for k, v in mine.items() if k not in _FLOATS} == \
                       {k: v for k, v in theirs.items() if k not in _FLOATS}, args
    info = json.loads(run("info", "--index", copy / ".alignsearch", "--json").output)
    assert info["model"] == (str(copy / "model") if model_moved else expected["info"]["model"])
    # searched_exactly came later (the vectors an unfinished run committed beside the ANN index): none here
    assert info["index"].pop("searched_exactly") == 0
    for key in ("fingerprint", "dim", "roots", "images", "failed", "index", "last_run"):
        assert info[key] == expected["info"][key], key
    # The alignsearch that built the fixture counted a tag once per tagged row, so clip.mp4's two moments twice
    # (8 of a label on 7 files); since 2b40b04 a video counts once, as `tag` and `images` count it.
    moments_beyond_first = 1  # clip.mp4: 2 moments (tests/fixtures/build_index_v3.py)
    assert info["tags"] == {k: v - moments_beyond_first for k, v in expected["info"]["tags"].items()}
    assert info["images"] == expected["info"]["tags"]["beach"] - moments_beyond_first  # every file has each label


def unique_cut(snap, query: np.ndarray, want: int, nprobe: int, allowed: np.ndarray | None = None) -> tuple[int, int]:
    """(at, id): a place at or before want - 1 among the ANN index's candidates for the unit vector `query` (as the
    engine asks for them: nprobe lists, the filter's allowed ids) whose approximate score no neighbour shares within
    query.tied_at_cut's gap, and the id there: a cut at at + 1 falls after it and before the next."""
    from alignsearch.search.query import tied_at_cut
    from alignsearch.storage import ann

    scores, ids = ann.search(snap.index, query[None, :], want + 20, nprobe, allowed)
    scores = scores[0][ids[0] >= 0]
    at = want - 1
    while tied_at_cut(scores, at) != at or tied_at_cut(scores, at + 1) != at + 1:
        at -= 1
    assert at >= want - 10, scores[: want + 1]
    return at, int(ids[0][at])


def copies_index(tmp_path: Path, corpus: Path, tiny_model, first: str, later: str) -> Path:
    """A flat index (tmp_path/ix) of tmp_path/photos: three photos of the corpus (img007 captioned "a red kite") and
    two copies of img002, `first` indexed in a first run and `later` in a second (so `first` has the lower id)."""
    from indexer.job import index_folders

    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / first).write_bytes((corpus / "img002.jpg").read_bytes())
    for other in ("img007", "img005", "img011"):
        (folder / f"{other}.jpg").write_bytes((corpus / f"{other}.jpg").read_bytes())
    (folder / "img007.txt").write_text("a red kite")
    ix = tmp_path / "ix"
    index_folders([folder], ix, model=str(tiny_model), device="cpu", workers=0)
    (folder / later).write_bytes((corpus / "img002.jpg").read_bytes())
    index_folders([folder], ix, model=str(tiny_model), device="cpu", workers=0)
    return ix


def sequential_keyword_ranks(bm25) -> np.ndarray:
    """Keyword ranks one after the other (1, 2, 3, 4), equal bm25 or not: query.keyword_ranks before equal ones
    shared a rank."""
    return np.arange(1, len(bm25) + 1, dtype=np.int64)


def resave_with_other_weights(src, dest, seed: int) -> None:
    """The checkpoint `src` saved at `dest` with one weight changed: the same model (place) with other weights."""
    import torch
    from transformers import AlignModel

    model = AlignModel.from_pretrained(str(src))
    with torch.no_grad():
        model.text_projection.weight[0, 0] += 0.01 * (seed + 1)
    model.save_pretrained(str(dest))


# -- kill -9 at a chosen moment: a child runs the CLI with one function patched to SIGKILL itself ----------

KILL_HOOK = r"""
import importlib, os, signal, sys

where, when = sys.argv[1], sys.argv[2]  # module:attribute (a function or Class.method), before|after its call
module, _, name = where.partition(":")
owner = importlib.import_module(module)
*outer, attr = name.split(".")
for part in outer:
    owner = getattr(owner, part)
real = getattr(owner, attr)

def killed(*args, **kwargs):
    if when == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    real(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)

setattr(owner, attr, killed)
"""
KILLED_AT = KILL_HOOK + """
from alignsearch.surfaces.cli import main
main(sys.argv[3:], prog_name="alignsearch")
"""


def killed_at(where: str, when: str, *args) -> subprocess.CompletedProcess:
    """`alignsearch ARGS` in a child that kill -9s itself when the run reaches `where` (before or after it)."""
    return subprocess.run([sys.executable, "-c", KILLED_AT, where, when, *map(str, args)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})


KILLED_UPGRADING = KILL_HOOK + """
from alignsearch.storage import catalog
catalog.connect(sys.argv[3]).dispose()  # a writer's connection: it upgrades an older catalog
"""

# kill -9 at the n-th UPDATE of step 24's sealing (sqlite3's trace callback sees each row of its executemany), with a
# page cache of one page: the transaction's dirty pages spill into the WAL before the commit that never comes
KILLED_SEALING = r"""
import os, signal, sys
from alignsearch.storage import catalog, migrate

nth, real, seen = int(sys.argv[2]), migrate.seal_file_fields, [0]

def count(sql):
    if sql.startswith("UPDATE files SET field_seal"):
        seen[0] += 1
        if seen[0] == nth:
            os.kill(os.getpid(), signal.SIGKILL)

def traced(dbapi_conn):
    dbapi_conn.execute("PRAGMA cache_size = 1")
    dbapi_conn.set_trace_callback(count)
    return real(dbapi_conn)

migrate.seal_file_fields = traced
catalog.connect(sys.argv[1]).dispose()
"""


def killed_upgrading(db_path: Path, where: str, when: str = "after", *, nth: int = 0) -> subprocess.CompletedProcess:
    """A writer's catalog.connect(db_path), which upgrades an older catalog, in a child that kill -9s itself when it
    reaches `where` (module:attribute, before or after its call), or where is "sealing": at step 24's nth row sealed."""
    argv = [KILLED_SEALING, str(db_path), str(nth)] if where == "sealing" else \
        [KILLED_UPGRADING, where, when, str(db_path)]
    return subprocess.run([sys.executable, "-c", *argv], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


# -- kill -9 at the n-th return of a function: inside its caller's transaction, before its commit -----------

KILLED_AT_CALL = r"""
import importlib, json, os, signal, sys

def owner_of(where):
    module, _, name = where.partition(":")
    owner = importlib.import_module(module)
    *outer, attr = name.split(".")
    for part in outer:
        owner = getattr(owner, part)
    return owner, attr

where, nth = sys.argv[1], int(sys.argv[2])
for name, value in json.loads(sys.argv[3]).items():  # module settings for the run (e.g. a smaller batch)
    setattr(*owner_of(name), value)
owner, attr = owner_of(where)
real, calls = getattr(owner, attr), [0]

def killed(*args, **kwargs):  # after the n-th call returns: inside the caller's transaction, before its commit
    out = real(*args, **kwargs)
    calls[0] += 1
    if calls[0] == nth:
        os.kill(os.getpid(), signal.SIGKILL)
    return out

setattr(owner, attr, killed)
from alignsearch.surfaces.cli import main
main(sys.argv[4:], prog_name="alignsearch")
"""


def killed_at_call(where: str, nth: int, settings: dict, *args) -> subprocess.CompletedProcess:
    """`alignsearch ARGS` in a child that kill -9s itself when the nth call of `where` (module:attribute) returns."""
    return subprocess.run([sys.executable, "-c", KILLED_AT_CALL, where, str(nth), json.dumps(settings),
                           *map(str, args)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def fixed_answers(ix: Path, k: int = 100) -> list[str]:
    """The paths the index finds for one fixed query vector, best first (flat: exact, so comparable)."""
    import alignsearch

    with alignsearch.open(ix) as engine:
        query = np.random.default_rng(7).standard_normal(engine.store.dim).astype(np.float32)
        return [h.path for h in engine.search_vector(query / np.linalg.norm(query), k=k)]


def verify_problems(ix: Path) -> list[str]:
    """verify's problems (none expected), with the index opened read-only as a query opens it."""
    from indexer.verify import verify

    return verify(ix, check_model=False).problems


# -- an index's vector store as tests of compaction (indexer/compact.py) look at it -------------------------


def index_state(ix: Path):
    """The index's recorded state (alignsearch/storage/state.py), read as a query reads it."""
    from alignsearch.storage import catalog, state
    from alignsearch.storage.paths import DB_FILE

    db = catalog.connect(Path(ix) / DB_FILE, readonly=True)
    try:
        with db.connect() as conn:
            return state.read(conn)
    finally:
        db.dispose()


def index_dim(ix: Path) -> int:
    return index_state(ix).model.dim


def index_generation(ix: Path) -> int:
    return index_state(ix).generation


def vector_files(ix: Path) -> list[str]:
    """Every segment file under ix/vectors/ (vectors.f16 itself is not one), relative to that folder."""
    folder = Path(ix) / "vectors"
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*.f16")) if folder.exists() else []


def unlisted_vector_files(ix: Path) -> list[str]:
    """Files under vectors/ that the committed store does not list (a re-encode's pending segment included)."""
    listed = {f"{name}.f16" for _, name, _ in index_state(ix).vectors.segments}
    return [name for name in vector_files(ix) if name not in listed]


def compact_now(ix: Path):
    """Compact the index's vector store now if any row is dead (indexer/compact.py), holding its writer lock."""
    from alignsearch.storage import catalog
    from alignsearch.storage.paths import DB_FILE
    from indexer import compact
    from indexer.lock import writer_lock

    db = catalog.connect(Path(ix) / DB_FILE)
    try:
        with writer_lock(ix):
            return compact.compact(db, Path(ix), force=True)
    finally:
        db.dispose()


# -- a decode worker the OOM killer ends (tests/test_attacks_data.py) ---------------------------------------------


def ocr_read_or_die(row):
    """indexer.ocrfill._read in a worker process, but a worker that meets a file named die* dies at once (as the
    OOM killer or a crash in a codec ends one). For workers only: there ocrfill._read is still the real one."""
    from indexer import ocrfill

    if os.path.basename(row.relpath).startswith("die"):
        os._exit(9)
    return ocrfill._read(row)


def phash_or_die(row):
    """indexer.phashfill._hash_file in a worker process, dying as ocr_read_or_die does on a file named die*."""
    from indexer import phashfill

    if os.path.basename(row.relpath).startswith("die"):
        os._exit(9)
    return phashfill._hash_file(row)


def indexed_corpus(base: Path, tiny_model, n: int) -> Path:
    """n make_images pictures in base/corpus, indexed in-process by the tiny model into base/ix (returned)."""
    from click.testing import CliRunner
    from conftest import make_images

    from alignsearch.surfaces.cli import main

    make_images(base / "corpus", n)
    result = CliRunner().invoke(main, ["index", str(base / "corpus"), "--index", str(base / "ix"), "--model",
                                       str(tiny_model), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    return base / "ix"


# -- a fill whose worker is busy for long (tests/test_workers.py) -------------------------------------------------

SLOW_S = 30  # a worker's chunk that meets a slow item takes this long: far over any bound a test waits


def decode_slowly(item):
    """For decode-worker tests: a worker that meets "slow" is busy for SLOW_S seconds, then upper-cases it."""
    if item == "slow":
        time.sleep(SLOW_S)
    return item.upper()


def phash_slowly(row):
    """indexer.phashfill._hash_file in a worker process, but a file named slow* keeps its worker busy for SLOW_S
    seconds first (a huge or remote file); FILE.busy beside it says a worker is on it."""
    from indexer import phashfill

    if os.path.basename(row.relpath).startswith("slow"):
        open(row.path + ".busy", "w").close()
        time.sleep(SLOW_S)
    return phashfill._hash_file(row)


# -- a fill step's worker that dies, each death noted (tests/test_fills.py) ----------------------------------------

DEATHS_ENV = "ALIGNSEARCH_TEST_DEATHS"  # a file: one line per worker a die* file killed


def noting_deaths(fn, row):
    """fn(row), but a worker process that meets a file named die* dies at once (as the OOM killer or a crash in a
    codec ends one), noted first in the file $ALIGNSEARCH_TEST_DEATHS names. For a fill's worker processes:
    functools.partial(noting_deaths, the fill's own function), which they unpickle by name."""
    if os.path.basename(row.relpath).startswith("die"):
        with open(os.environ[DEATHS_ENV], "a") as f:
            f.write(f"{row.relpath}\n")
        os._exit(9)
    return fn(row)


def deaths(path: Path) -> int:
    """How many workers a die* file killed (the lines of the file $ALIGNSEARCH_TEST_DEATHS names)."""
    return len(path.read_text().splitlines()) if path.exists() else 0


def catalog_rows(ix: Path, sql: str) -> list:
    """What a query of the index's catalog answers, read-only."""
    import sqlite3

    conn = sqlite3.connect(f"file:{Path(ix) / 'catalog.db'}?mode=ro", uri=True)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


# -- a fill's decoder crashing on a file, in a child `alignsearch` (tests/test_fills.py) -----------------------------

DYING_FILLS = r"""
import sys
from functools import partial
sys.path.insert(0, sys.argv[1])
import helpers
from indexer import workers
real = workers.map_rows
workers.map_rows = lambda fn, *args, **kwargs: real(partial(helpers.noting_deaths, fn), *args, **kwargs)
from alignsearch.surfaces.cli import main
main(sys.argv[2:], prog_name="alignsearch")
"""


def with_dying_fills(noted: Path, *args) -> subprocess.CompletedProcess:
    """`alignsearch ARGS` in a child whose fill steps die on a file named die* wherever they decode it (as a crash
    in a C decoder ends a process: this one too, when it decodes the file itself), each death a line in `noted`."""
    return subprocess.run([sys.executable, "-c", DYING_FILLS, str(Path(__file__).parent), *map(str, args)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", DEATHS_ENV: str(noted)})


KILLED_IN_PHASH_FILL = KILL_HOOK + """
from indexer import phashfill
fill = phashfill.fill_phashes
phashfill.fill_index = lambda db, workers=0, *, without_ids=(): fill(db, workers, batch=2, without_ids=without_ids)
from alignsearch.surfaces.cli import main
main(sys.argv[3:], prog_name="alignsearch")
"""  # killed_at's child, its phash fill in batches of 2 (decoded in worker processes from 2 files on)


# -- the main decode crashing on a file, in a child `alignsearch` (tests/test_small_decode.py) -----------------------

def noting_deaths_kw(fn, found, **kwargs):
    """noting_deaths for a function called with keywords (indexer.decode.read_item's spec, fast, ...)."""
    from functools import partial

    return noting_deaths(partial(fn, **kwargs), found)


DYING_DECODE = r"""
import sys
from functools import partial
sys.path.insert(0, sys.argv[1])
import helpers
from indexer import pipeline
pipeline.read_item = partial(helpers.noting_deaths_kw, pipeline.read_item)
from alignsearch.surfaces.cli import main
main(sys.argv[2:], prog_name="alignsearch")
"""


def with_dying_decode(noted: Path, *args, **kwargs) -> subprocess.Popen | subprocess.CompletedProcess:
    """`alignsearch ARGS` in a child whose image decode dies on a file named die* wherever it decodes it (a worker
    process, or this child itself), each death a line in `noted`; kwargs go to subprocess.run, or with
    popen=True to subprocess.Popen (a watch that keeps running)."""
    argv = [sys.executable, "-c", DYING_DECODE, str(Path(__file__).parent), *map(str, args)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", DEATHS_ENV: str(noted)}
    if kwargs.pop("popen", False):
        return subprocess.Popen(argv, env=env, **kwargs)
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env, **kwargs)


# -- a video's decoder crashing on a file, in a child `alignsearch` (tests/test_video_workers.py) ---------------------

DYING_VIDEO_DECODE = r"""
import os, sys
sys.path.insert(0, sys.argv[1])
import helpers
from indexer import videos
helpers.note_video_decode("index", os.getpid(), "-")
if hasattr(videos, "decode_moments"):
    videos.real_decode_moments, videos.decode_moments = videos.decode_moments, helpers.dying_video_decode
else:  # the code before worker processes decoded videos: _source was called in this process
    real_source = videos._source
    videos._source = lambda found: helpers.dying_video_decode(found, source=real_source)
from alignsearch.surfaces.cli import main
main(sys.argv[2:], prog_name="alignsearch")
"""


def note_video_decode(kind: str, pid: int, relpath: str) -> None:
    """A line `kind pid relpath` in the file $ALIGNSEARCH_TEST_DEATHS names, with .pids added."""
    with open(os.environ[DEATHS_ENV] + ".pids", "a") as f:
        f.write(f"{kind} {pid} {relpath}\n")


def dying_video_decode(found, *args, source=None):
    """indexer.videos.decode_moments (or source, the _source it was given), but the process that decodes a video
    named die* dies at once (as a crash in a C codec ends one), noted in $ALIGNSEARCH_TEST_DEATHS; every decode's
    process id is noted (note_video_decode). Pickled by name into a decode worker, where indexer.videos is not
    patched: there decode_moments is the real one."""
    from indexer import videos

    note_video_decode("decode", os.getpid(), found.relpath)
    if os.path.basename(found.relpath).startswith("die"):
        with open(os.environ[DEATHS_ENV], "a") as f:
            f.write(f"{found.relpath}\n")
        os._exit(9)
    if source is not None:
        return source(found)
    return getattr(videos, "real_decode_moments", videos.decode_moments)(found, *args)


def video_decode_pids(noted: Path) -> dict[str, list[int]]:
    """{relpath: the process ids that decoded it}, "-": the index process's (note_video_decode)."""
    found: dict[str, list[int]] = {}
    path = Path(f"{noted}.pids")
    for line in path.read_text().splitlines() if path.exists() else []:
        _, pid, relpath = line.split(" ", 2)
        found.setdefault(relpath, []).append(int(pid))
    return found


def index_with_dying_video_decode(noted: Path, ix: Path, *args) -> dict:
    """`alignsearch index ARGS --index IX --device cpu --json`, parsed, in a child whose video decode dies on a video
    named die* wherever it decodes it (a worker process, or this child itself), each death a line in `noted`,
    each decode's pid in noted.pids; the child must exit 0."""
    import json

    proc = subprocess.run([sys.executable, "-c", DYING_VIDEO_DECODE, str(Path(__file__).parent), "index",
                           *map(str, args), "--index", str(ix), "--device", "cpu", "--json"],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", DEATHS_ENV: str(noted)})
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-3000:])
    return json.loads(proc.stdout)


CTRL_C_AT = KILL_HOOK.replace("signal.SIGKILL", "signal.SIGINT") + """
from alignsearch.surfaces.cli import main
main(sys.argv[3:], prog_name="alignsearch")
"""  # killed_at's child, stopped by a Ctrl-C (SIGINT) instead of kill -9


def ctrl_c_at(where: str, when: str, *args) -> subprocess.CompletedProcess:
    """`alignsearch ARGS` in a child that sends itself SIGINT (a Ctrl-C) when the run reaches `where`."""
    return subprocess.run([sys.executable, "-c", CTRL_C_AT, where, when, *map(str, args)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})


# -- a video decode worker that dies while it hands a moment over (tests/test_video_workers.py) ----------------------


def big_moments_then_wait(size: int):
    """For StreamWorker tests: a decoder that hands over moments of `size` bytes (far over a pipe's 64 KB, as
    align-base's 289 px crops are) and never ends, so a test can kill its worker while it hands one over."""
    while True:
        yield np.ones(size, np.uint8)


# -- an image decode worker that dies while it writes a large result back (tests/test_workers.py) -------------------


def _bytes_written() -> int:
    """What this process has written so far (/proc/self/io's wchar: counted when a write call returns)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("wchar:"))


def big_then_killed(item: str, size: int = 64 << 20):
    """For decode-worker tests: an item named big decodes to `size` bytes (far over a pipe's 64 KB, as a chunk of
    decoded images is) and its worker is killed -9 (the OOM killer) part way through writing that result back to
    the pool: a thread kills it once the message's header is written, while the result's own write is under way.
    Any other item is upper-cased."""
    import threading

    if item != "big":
        return item.upper()
    before = _bytes_written()

    def kill_mid_message() -> None:
        while _bytes_written() == before:
            time.sleep(0.0002)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=kill_mid_message, daemon=True).start()
    return np.ones(size, np.uint8)


def killed_holding_the_result_lock(item: str):
    """For decode-worker tests: upper-cases item; the worker that decodes one named last is then killed -9 holding
    the pool's result queue's lock once that result is written back (a worker killed between its write and the
    lock's release): a thread takes the lock, holds it half a second (the run ends meanwhile), then kills it."""
    import threading

    if item != "last":
        return item.upper()
    before = _bytes_written()
    frame = sys._getframe()
    while frame.f_code.co_name != "_process_worker":  # concurrent.futures' worker loop, which holds the queue
        frame = frame.f_back
    results = frame.f_locals["result_queue"]

    def kill_holding_the_lock() -> None:
        while _bytes_written() == before:
            time.sleep(0.0002)
        results._wlock.acquire()
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=kill_holding_the_lock, daemon=True).start()
    return item.upper()


def slow_upper(item: str, seconds: float = 0.5) -> str:
    """For decode-worker tests: upper-cases item after `seconds` (a decode slower than workers.WEDGED_S)."""
    time.sleep(seconds)
    return item.upper()


def mount_tmpfs(folder) -> bool:
    """Mount a small tmpfs at `folder` (made if need be), as a drive mounted inside a root; False where this test
    may not mount (not root, or no right to: a container). The caller unmounts it (`unmount`) in a finally."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    return os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "alignsearch-test",
                                                 str(folder)], capture_output=True).returncode == 0


def bind_mount(source, folder) -> None:
    """Mount `source` (a mount_tmpfs folder, filled) at `folder` too: a drive plugged in with its photos at once."""
    subprocess.run(["mount", "--bind", str(source), str(folder)], check=True, capture_output=True)


def unmount(folder) -> None:
    """Unmount `folder` (lazily: a mount below it goes too; nothing mounted there: nothing done)."""
    subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def refuse_listing(monkeypatch, refused: set, error: OSError) -> None:
    """os.scandir raises `error` for the folders whose paths are in `refused` (a set the test may change later):
    a folder a run cannot list (a permission, an I/O error), as root, whom a chmod does not stop."""
    scandir = os.scandir

    def listing(path="."):
        if str(path) in refused:
            raise error
        return scandir(path)

    monkeypatch.setattr(os, "scandir", listing)


# -- waiting for a condition, not for a time (the tests raced by threads and processes) ---------------------------


def wait_until(condition, what: str, timeout: float = 60, every: float = 0.05):
    """condition()'s first true value, polled every `every` s; a test failure naming `what` after `timeout` s. The
    limit is generous (a loaded 2-core CI machine): it costs nothing when the condition holds at once, where a
    fixed sleep either wastes its time or, under load, is too short."""
    end = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > end:
            pytest.fail(f"no {what} within {timeout} s")
        time.sleep(every)
    return value


def served_with_local_copy(base: Path, model, n: int, *serve_args) -> dict:
    """An index of n make_images pictures under base, served by a real `alignsearch serve` (start_serve), and a copy
    of it with no server record, which the CLI searches locally: {ix, alone, corpus, proc, url}; stop(proc) ends it."""
    import shutil

    from conftest import index_json, make_images

    corpus, ix = base / "corpus", base / "ix"
    make_images(corpus, n)
    index_json(ix, corpus, "--model", model, "--device", "cpu")
    alone = base / "alone"
    shutil.copytree(ix, alone)
    proc, url = start_serve(ix, "--token", "s3cret", *serve_args)
    return {"ix": ix, "alone": alone, "corpus": corpus, "proc": proc, "url": url}


NUMBER_BITS = 16  # frames a numbered video can tell apart: 2 ** NUMBER_BITS


def make_numbered_video(path, frames: int, fps: int = 25, codec: str = "libx264", b_frames: int = 3,
                        gop: int = 250, size=(128, 48)) -> Path:
    """A video whose frame n shows n in binary (NUMBER_BITS black or white columns, most significant first), so
    the frame a moment or a thumbnail holds can be read back by frame_number whatever the container's
    timestamps say. b_frames > 0 encodes with B-frames (frames stored out of display order); gop is the
    keyframe interval (a keyframe only at the start when gop >= frames)."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        if codec == "libx264":
            stream.options = {"bf": str(b_frames), "g": str(gop), "keyint_min": str(gop), "sc_threshold": "0"}
        else:
            stream.codec_context.max_b_frames = b_frames
            stream.codec_context.gop_size = gop
        encode_pictures(out, stream, (numbered_picture(n, size) for n in range(frames)))
    return path


def numbered_picture(n: int, size=(128, 48)) -> np.ndarray:
    """A (height, width, 3) picture of n in binary: NUMBER_BITS black or white columns, most significant first."""
    width, height = size
    column = width // NUMBER_BITS
    picture = np.zeros((height, width, 3), np.uint8)
    for bit in range(NUMBER_BITS):
        if n >> (NUMBER_BITS - 1 - bit) & 1:
            picture[:, bit * column:(bit + 1) * column] = 255
    return picture


def encode_pictures(out, stream, pictures) -> None:
    """Encode (H, W, 3) uint8 RGB pictures into a PyAV output's stream, the n-th at pts n, and flush it."""
    import av

    for n, picture in enumerate(pictures):
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(picture), format="rgb24")
        frame.pts = n
        for packet in stream.encode(frame):
            out.mux(packet)
    for packet in stream.encode():
        out.mux(packet)


def frame_number(image) -> int:
    """The number a make_numbered_video frame shows (a PIL image or an (H, W, 3) array, any size)."""
    grey = np.asarray(image.convert("L") if hasattr(image, "convert") else image, dtype=np.float32)
    if grey.ndim == 3:
        grey = grey.mean(axis=2)
    column = grey.shape[1] / NUMBER_BITS
    bits = [grey[:, int(b * column + column / 4):int((b + 1) * column - column / 4)].mean() > 127
            for b in range(NUMBER_BITS)]
    return int("".join("1" if b else "0" for b in bits), 2)


def turn_witness(turn, seen: list, text: str = ""):
    """A stand-in for indexer.decode.read_text: notes (the image's size, "held" or "free") as another worker would
    find the pool's turn file `turn` while the text is read, and answers `text`."""
    import fcntl

    def read_text(image, where):
        with open(turn, "rb") as other:  # another worker's turn: its own open file, its own flock
            try:
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
                seen.append((image.size, "free"))
            except BlockingIOError:
                seen.append((image.size, "held"))
        return text, 0.0

    return read_text


def plant_as_nobody(folder: Path, source: Path, name: str) -> None:
    """As another user (nobody): rename a copy of source over folder/name, as anyone who may write folder could
    (folder must let them: 0777). Python cannot run as nobody here, so sh's cp and mv do it, from inside the folder
    (the tests' own folders above it are root's, 0700)."""
    import shutil

    folder = Path(folder)
    shutil.copy(source, folder / ".theirs")
    os.chmod(folder / ".theirs", 0o644)

    def inside_as_nobody():
        os.chdir(folder)
        as_nobody()

    done = subprocess.run(["sh", "-c", f"cp .theirs .planted && mv .planted '{name}' && rm -f .theirs"],
                          preexec_fn=inside_as_nobody, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert (folder / name).stat().st_uid == NOBODY


def catalog_copy_at_generation(ix: Path, dest: Path, generation: int = 7) -> Path:
    """A copy of ix's catalog at dest that names another generation (a newer snapshot to a reader open for long)."""
    import shutil
    import sqlite3

    shutil.copy(Path(ix) / "catalog.db", dest)
    conn = sqlite3.connect(dest)
    with conn:
        conn.execute("UPDATE meta SET value = ? WHERE key = 'generation'", (str(generation),))
    conn.close()  # its WAL folded into the file copied
    return Path(dest)


def keyword_library(db_path, files, root: str = "/r") -> dict:
    """A catalog of files named as the keys of `files`, each with its caption (None: the name alone), written as an
    index run writes them (catalog.upsert_file, set_photo: the keyword text too); {name: file id}."""
    from alignsearch.storage import catalog

    db = catalog.connect(db_path)
    ids = {}
    with db.begin() as conn:
        for name, caption in files.items():
            fid = ids[name] = catalog.upsert_file(conn, {"root": root, "relpath": name, "size": 1, "mtime": 0.0,
                                                         "status": catalog.INDEXED})
            catalog.set_photo(conn, fid, name, {"caption": caption})
    db.dispose()
    return ids


def hashes(folder: Path) -> dict[str, str]:
    """{path under folder: sha256} of every file below it: what a reader must leave as it found."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def dump(path: Path) -> list[str]:
    """A SQLite file's whole content as SQL (iterdump), opened read-only: compared before and after."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return list(conn.iterdump())
    finally:
        conn.close()


def video_moments_index(folder, videos: int, moments: int, dim: int = 32):
    """layout_index's rows made the moments of `videos` videos of `moments` each (one sha256 a video, moments 1..,
    t in seconds), the ANN index built by the real writer: for searches over long videos at sizes no test should
    decode. Returns the folder."""
    from sqlalchemy import text

    db = layout_index(folder, videos * moments, dim)[0]
    with db.begin() as conn:
        conn.execute(text(f"UPDATE files SET sha256 = printf('%064x', (id - 1) / {moments}), moment = (id - 1) % "
                          f"{moments} + 1, t = (id - 1) % {moments}, t_end = (id - 1) % {moments} + 1, "
                          f"relpath = printf('v%d.mp4', (id - 1) / {moments}), format = 'MP4'"))
        seal(conn)
    db.dispose()
    return Path(folder)


def ipv6_loopback() -> bool:
    """Can ::1 be listened at here (IPv6 in the kernel and on lo)?"""
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def taken_by_another(address: str, port: int) -> bool:
    """Is address:port refused to another program's listening socket (IPV6_V6ONLY, as one would bind ::1 beside a
    server at 127.0.0.1)?"""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            s.bind((address, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
            raise
        return False


# -- other local users: alice and mallory (test_nonroot_users.py) --------------------------------------------------
# The tests run as root; the guarantees between users are tried by children that run as real, unprivileged users
# (runuser), which have neither root's permission bypass nor its right to signal any process.

LOCAL_USERS = ("alice", "mallory")
_USER_PYTHON: dict[str, tuple[list[str], dict[str, str], list[str]] | str] = {}
_SHOWN_TO_USERS: list[Path] = []  # folders the tests share with the users (users_folder, shown_to_users)
REQUIRE_USERS = "ALIGNSEARCH_REQUIRE_USERS"  # set (.ci/run): a test of other users that cannot run fails


def why_no_local_users() -> str | None:
    """Why the tests of other local users cannot run here (skip), or None."""
    import shutil

    if os.geteuid() != 0:
        return "needs root to make local users and run commands as them"
    for tool in ("runuser", "useradd"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    return None


def users_required(required: bool, root: bool, no_views: str | None) -> bool:
    """Whether a test of other local users that cannot run must fail rather than skip: where CI asks for them
    (ALIGNSEARCH_REQUIRE_USERS) on a machine that could run them (root, mount namespaces made). A run not as root, or
    in a container that makes no mount namespace, lacks what they need: that skips with the reason, since failing CI
    for what the machine lacks would say nothing of alignsearch."""
    return required and root and no_views is None


def cannot_run_as_users(reason: str):
    """A test of other local users that cannot run here: skipped, or failed where CI requires them and the machine
    could run them (users_required): a skip there would leave these guarantees untried unseen."""
    if users_required(bool(os.environ.get(REQUIRE_USERS)), os.geteuid() == 0, why_no_views()):
        pytest.fail(f"{reason} ({REQUIRE_USERS} is set)", pytrace=False)
    pytest.skip(reason)


def needs_local_users() -> None:
    """Skip (or fail: cannot_run_as_users) a test of other local users where none can be made or run."""
    reason = why_no_local_users()
    if reason is not None:
        cannot_run_as_users(reason)


def local_user(name: str):
    """The passwd entry of local user `name`, made (useradd -m) if there is none."""
    import pwd

    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "-m", name], check=True, capture_output=True, timeout=60)
        return pwd.getpwnam(name)


# -- what the other users can reach: a view of their own (mount namespace) -----------------------------------------
# The checkout, its virtual environment (.ci/run makes it in the clone), the Python it was made from (root's 0700
# home) or a test's folder may lie under a folder the users cannot enter: a clone in a 0700 `mktemp -d` folder, where
# every test here was skipped. That folder is not the tests' to chmod. A child run as another user instead starts in
# a mount namespace of its own where each such folder is covered by an empty tmpfs every user may enter, holding only
# the paths the tests share with the users, bound at their own paths: every path in sys.path and in the tests stays
# valid, nothing else of the private folder is shown, and the host's mounts are untouched.

def can_enter(mode: int, owner: int, group: int, uid: int, gids) -> bool:
    """Whether user uid (in groups gids) may enter a folder of this mode, owner and group (POSIX bits, no ACLs): the
    owner's bits alone apply to the owner, the group's to its members, the others' to the rest."""
    if uid == owner:
        return bool(mode & 0o100)
    return bool(mode & (0o010 if group in gids else 0o001))


def exposing_mounts(paths, blocked) -> list[tuple[str, str]]:
    """The mounts, in order, that show each of paths (absolute, resolved) to a user who cannot enter the folders
    blocked(folder) is true of: ("tmpfs", F) covers folder F with an empty one every user may enter, ("bind", P) then
    shows the real P at its own place in it. A folder a bound path holds is the real one again, so a blocked one
    below it is covered in turn. A path that is itself blocked (a clone made in the 0700 `mktemp -d` folder itself,
    as CI may make it) is ("spread", P): a tmpfs every user may enter covers it, holding each of its entries bound
    at its own place (a bind keeps the folder's own mode, so binding P itself showed nothing)."""
    mounts: list[tuple[str, str]] = []
    covered, bound = set(), set()
    for path in sorted(set(paths), key=lambda p: (len(Path(p).parts), p)):
        parts = Path(path).parts
        in_tmpfs = False  # whether the folder walked lies in a tmpfs (made by the view) rather than the real tree
        for depth in range(2, len(parts)):
            folder = str(Path(*parts[:depth]))
            if folder in covered or folder in bound:
                in_tmpfs = folder in covered
            elif not in_tmpfs and blocked(folder):
                mounts.append(("tmpfs", folder))
                covered.add(folder)
                in_tmpfs = True
        if path in covered | bound:
            continue
        if blocked(path):
            mounts.append(("spread", path))
            bound.add(path)  # its entries are the real ones: a path below it is walked as in the real tree
        elif in_tmpfs:
            mounts.append(("bind", path))
            bound.add(path)
    return mounts


# Run as root in a fresh mount namespace (VIEW): argv[1] the mounts (exposing_mounts, as JSON), then the command it
# becomes. Each bound path is opened first, then bound from its descriptor: once a tmpfs covers the folder above it,
# its own path names the tmpfs's.
SHOW = r"""
import ctypes, json, os, stat, sys
libc = ctypes.CDLL(None, use_errno=True)
def mount(source, target, kind, flags, data=None):
    if libc.mount(source.encode(), target.encode(), kind and kind.encode(), flags, data and data.encode()) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"mount {source} at {target}: {os.strerror(code)}")
def place(fd, path):  # the real file or folder fd opens, bound at path (made in a tmpfs)
    if stat.S_ISDIR(os.fstat(fd).st_mode):
        os.mkdir(path)
    else:
        open(path, "x").close()
    mount(f"/proc/self/fd/{fd}", path, None, 4096 | 16384)  # MS_BIND | MS_REC
mounts = json.loads(sys.argv[1])
held = {path: os.open(path, os.O_PATH) for kind, path in mounts if kind == "bind"}
spread = {}  # a blocked folder's entries: (name, a descriptor, or the text of a symbolic link)
for kind, path in mounts:
    if kind == "spread":
        folder = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        entries = []
        for name in os.listdir(folder):
            st = os.stat(name, dir_fd=folder, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                entries.append((name, os.readlink(name, dir_fd=folder)))
            elif stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode):
                entries.append((name, os.open(name, os.O_PATH | os.O_NOFOLLOW, dir_fd=folder)))
        spread[path] = entries
os.umask(0o022)  # the folders made in a tmpfs: 0755
for kind, path in mounts:
    if kind == "tmpfs":
        mount("tmpfs", path, "tmpfs", 2 | 4, "mode=0755")  # MS_NOSUID | MS_NODEV
    elif kind == "spread":
        os.makedirs(path, exist_ok=True)
        mount("tmpfs", path, "tmpfs", 2 | 4, "mode=0755")
        for name, entry in spread[path]:
            if isinstance(entry, str):
                os.symlink(entry, os.path.join(path, name))
            else:
                place(entry, os.path.join(path, name))
    else:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        place(held[path], path)
os.execvp(sys.argv[2], sys.argv[2:])
"""
VIEW = ["unshare", "--mount", "--propagation", "private", sys.executable, "-c", SHOW]


_NO_VIEWS: list[str | None] = []  # why_no_views's answer, once asked


def why_no_views() -> str | None:
    """Why no mount namespace of a child's own can be made here (VIEW: not in a container without CAP_SYS_ADMIN, say),
    or None; asked once."""
    import shutil

    if not _NO_VIEWS:
        reason = None
        if shutil.which("unshare") is None:
            reason = "needs unshare"
        else:
            try:
                made = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True,
                                      text=True, timeout=30)
                if made.returncode != 0:
                    reason = made.stderr.strip() or f"unshare exit {made.returncode}"
            except (OSError, subprocess.SubprocessError) as exc:
                reason = f"unshare: {exc}"
        _NO_VIEWS.append(reason)
    return _NO_VIEWS[0]


def shown_to_users(folder: Path) -> Path:
    """folder, shown to the users' children (users_view) wherever it lies: a folder the tests share with them."""
    folder = Path(folder)
    if folder not in _SHOWN_TO_USERS:
        _SHOWN_TO_USERS.append(folder)
    return folder


def _view_mounts(name: str, paths) -> list[tuple[str, str]]:
    """The mounts (exposing_mounts) that show paths and the folders shared with the users (shown_to_users) to user
    `name`, judged by the folders' modes now."""
    import pwd

    user = pwd.getpwnam(name)
    gids = set(os.getgrouplist(name, user.pw_gid))

    def blocked(folder: str) -> bool:
        st = os.stat(folder)
        return not can_enter(st.st_mode, st.st_uid, st.st_gid, user.pw_uid, gids)

    shared = [os.path.realpath(p) for p in _SHOWN_TO_USERS if p.exists()]
    return exposing_mounts([p for p in [*paths, *shared] if os.path.exists(p)], blocked)


def _no_view(name: str, mounts) -> str | None:
    """Why the view of these mounts cannot be made for user `name` (naming the folders closed to them), or None."""
    reason = why_no_views() if mounts else None
    if reason is None:
        return None
    closed = ", ".join(path for kind, path in mounts if kind == "tmpfs")
    return f"user {name} cannot enter {closed}, and no mount namespace can be made here to show what lies there ({reason})"


def users_view(name: str, paths) -> list[str]:
    """The command prefix (VIEW, or none where the user reaches them all already) that shows paths and the folders
    shared with the users (shown_to_users) to a child that becomes user `name`; the test skipped where it cannot be
    made (cannot_run_as_users)."""
    mounts = _view_mounts(name, paths)
    reason = _no_view(name, mounts)
    if reason is not None:
        cannot_run_as_users(reason)
    return [*VIEW, json.dumps(mounts)] if mounts else []


def _interpreter_paths(exe: str, pythonpath: list[str]) -> list[str]:
    """What Python exe needs to start and import this project, resolved: the PYTHONPATH given it (the checkout, the
    tests' site-packages), and for the tests' own interpreter all of sys.path (its standard library), its prefixes
    (the virtual environment's pyvenv.cfg, the Python it was made from) and the file it links to."""
    paths = list(pythonpath)
    if exe == sys.executable:
        paths += [p for p in sys.path if os.path.isabs(p)]
        paths += [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, os.path.dirname(exe),
                  os.path.dirname(os.path.realpath(exe))]
    return sorted({os.path.realpath(p) for p in paths if os.path.isdir(p)})


def user_python(name: str) -> tuple[list[str], dict[str, str], list[str]]:
    """The command, environment and paths (users_view) that start this project's Python as user `name`: the tests'
    interpreter, else the system's of the same version with the tests' site-packages, each shown to the user where it
    lies under a folder they cannot enter (users_view). Skipped (cannot_run_as_users) where that view is needed and
    cannot be made; failed where it is made and still no Python imports alignsearch as that user: the tests of other
    users must not turn into skips unseen."""
    if name not in _USER_PYTHON:
        _USER_PYTHON[name] = _find_user_python(name)
    found = _USER_PYTHON[name]
    if isinstance(found, str):
        if found.startswith("skip: "):
            cannot_run_as_users(found.removeprefix("skip: "))
        pytest.fail(found, pytrace=False)
    return found


def _find_user_python(name: str) -> tuple[list[str], dict[str, str], list[str]] | str:
    """user_python's search: its answer, or why none ("skip: ..." where the user cannot be shown the checkout)."""
    import shutil

    needs_local_users()
    user = local_user(name)
    repo = str(Path(__file__).resolve().parent.parent)
    paths = [repo, str(Path(__file__).resolve().parent)] + [p for p in sys.path if p.endswith("site-packages")]
    env = {"PATH": "/usr/bin:/bin", "HOME": user.pw_dir, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(paths),
           "LANG": "C.UTF-8"}
    runuser = shutil.which("runuser") or "runuser"  # in /usr/sbin, not on the user's PATH given
    no_view, tried = None, []
    for exe in dict.fromkeys([sys.executable, f"/usr/bin/python{sys.version_info[0]}.{sys.version_info[1]}"]):
        if not os.path.exists(exe):
            continue
        shown = _interpreter_paths(exe, paths)
        mounts = _view_mounts(name, shown)
        if _no_view(name, mounts) is not None:  # the next may need none (the system's Python, the checkout open)
            no_view = _no_view(name, mounts)
            continue
        command = [runuser, "-u", name, "--", exe]
        try:
            probe = subprocess.run([*users_view(name, shown), *command, "-c", "import alignsearch.surfaces.client"],
                                   env=env, cwd="/", capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.SubprocessError) as exc:
            tried.append(f"{exe}: {exc}")
            continue
        if probe.returncode == 0:
            return command, env, shown
        tried.append(f"{exe}: exit {probe.returncode}: {probe.stderr.strip()[-500:]}")
    if no_view and not tried:
        return "skip: " + no_view
    return f"no Python that user {name} can run imports alignsearch: " + "; ".join(tried)


# Runs its arguments where /proc hides every other user's processes (hidepid=2), in a mount namespace of its own.
HIDEPID = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
           'mount -t proc -o hidepid=2 proc /proc && exec "$@"', "hidepid"]


def can_hide_pids() -> bool:
    """Whether a /proc with hidepid=2 can be mounted here, in a mount namespace of the child's own (HIDEPID)."""
    try:
        return subprocess.run([*HIDEPID, "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def as_user(name: str, code: str, *args, timeout: float = 120, hidepid: bool = False, extra_env: dict | None = None,
            **popen) -> subprocess.CompletedProcess:
    """`python -c code ARGS` run as user `name` (user_python), to its end; hidepid: where /proc hides other users'
    processes from it (HIDEPID); extra_env: added to its environment."""
    command, env, shown = user_python(name)
    env = {**env, **(extra_env or {})}
    return subprocess.run([*(HIDEPID if hidepid else []), *users_view(name, shown), *command, "-c", code,
                           *map(str, args)], env=env, cwd="/", capture_output=True, text=True, timeout=timeout, **popen)


def started_as_user(name: str, code: str, *args, ready: str = "ready") -> tuple[subprocess.Popen, str]:
    """`python -c code ARGS` started as user `name`, once it printed a line starting with `ready`: (the process, that
    line). It runs until its stdin is closed (stopped_user), or whatever code does."""
    command, env, shown = user_python(name)
    proc = subprocess.Popen([*users_view(name, shown), *command, "-c", code, *map(str, args)], env=env, cwd="/",
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.startswith(ready):
        proc.kill()
        pytest.fail(f"the child of {name} did not start: {line}{proc.communicate(timeout=30)[1]}")
    return proc, line.strip()


def stopped_user(proc: subprocess.Popen) -> str:
    """Close the stdin of a started_as_user child, wait for its end (killed after 30 s); what it printed after."""
    try:
        out, _ = proc.communicate("", timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out


def users_folder(base: Path, name: str, mode: int = 0o755) -> Path:
    """base/name, owned by local user `name` with this mode, in a folder every user may enter (base, made 0755 and
    shown to the users wherever it lies: shown_to_users)."""
    base.mkdir(exist_ok=True)
    base.chmod(0o755)
    shown_to_users(base)
    user = local_user(name)
    folder = base / name
    folder.mkdir(exist_ok=True)
    os.chown(folder, user.pw_uid, user.pw_gid)
    folder.chmod(mode)
    return folder


def make_audio_only(path) -> Path:
    """An .mp4 holding one AAC stream of silence and no video stream."""
    import av

    path = Path(path)
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream("aac", rate=44100)
        for i in range(20):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 44100, i * 1024
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def make_stamped_video(path, stamps: list[int], fmt: str | None = None) -> Path:
    """A video of len(stamps) distinct frames (scene_frame) whose packets carry these pts/dts (in the encoder's
    1/10 s), as a damaged or hostile muxer writes them: negative, huge jumps."""
    import av

    path = Path(path)
    with av.open(str(path), mode="w", format=fmt) as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 160, 90, "yuv420p"
        packets = []
        for i in range(len(stamps)):
            frame = av.VideoFrame.from_ndarray(scene_frame(i), format="rgb24")
            frame.pts = i
            packets += list(stream.encode(frame))
        packets += list(stream.encode())
        for packet, stamp in zip(packets, stamps):
            packet.pts = packet.dts = stamp
            out.mux(packet)
    return path

# -- bytes flipped in a catalog table's page (tests/test_catalog_names.py) --------------------------------------------


def flip_in_table_page(db: Path, table: str, needle: bytes, at: int = 0) -> None:
    """Flip the lowest bit of byte `at` of `needle` where it lies in `table`'s root page of the catalog (a small
    table is that one page): a flipped byte of a row's own cell, not of an index holding a copy. SQLite pages carry
    no checksum, so the record still reads, with the byte changed."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        root = conn.execute("SELECT rootpage FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)).fetchone()[0]
    finally:
        conn.close()
    data = bytearray(Path(db).read_bytes())
    start = (root - 1) * page_size
    found = data.find(needle, start, start + page_size)
    assert found >= 0, f"{needle!r} is not in the root page of {table}"
    data[found + at] ^= 0x01
    Path(db).write_bytes(data)


def index_with_a_name_not_utf8(tmp_path: Path, tiny_model) -> tuple[Path, Path, Path]:
    """(folder, index, the file) of an index of two images, one named caf\\xe9.jpg (bytes that are not UTF-8):
    its row keeps the name's bytes in relpath_raw (test_catalog_names.py flips one of them)."""
    from conftest import make_images, run

    folder = tmp_path / "photos"
    make_images(folder, 2)
    named = os.path.join(os.fsencode(folder), b"caf\xe9.jpg")
    os.rename(folder / "img001.jpg", named)
    run("index", folder, "--index", tmp_path / "ix", "--model", tiny_model, "--device", "cpu")
    return folder, tmp_path / "ix", Path(os.fsdecode(named))


# -- per-row digests (alignsearch/storage/rowdigest.py, schema 14) ----------------------------------------------------

def without_digests(db: Path, copy: Path) -> list[str]:
    """The dump (iterdump) of a copy of the catalog `db` with the files and photos digest columns dropped, and the
    files' vector address seals (schema 17), a re-encode's (19) and the photos and files rows' field seals (23, 24): what an upgrade to schema 14 and on left of the
    catalog as it was
    (SQLite's DROP COLUMN takes the column's text back out)."""
    copy.mkdir(parents=True, exist_ok=True)
    target = copy / "catalog.db"
    source = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    conn = sqlite3.connect(target)
    try:
        source.backup(conn)
        for table in ("files", "photos"):
            conn.execute(f"ALTER TABLE {table} DROP COLUMN digest")
        for table, column in (("files", "vec_seal"), ("pending_vectors", "vec_seal"), ("photos", "field_seal"),
                              ("files", "field_seal")):
            # schema 17, 19 for a re-encode's addresses, 23 for the photos rows' dates and places, 24 for the files
            # rows' widths, heights, sizes and mtimes
            if any(row[1] == column for row in conn.execute(f"PRAGMA table_info({table})")):
                conn.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
        conn.commit()
        return list(conn.iterdump())
    finally:
        conn.close()
        source.close()


def leftover_photo_row(conn, file_id: int, **fields) -> None:
    """Insert a photos row of a file no longer in the catalog as a writer wrote it (its digest with its key,
    rowdigest.PHOTO_KEYED_FIELDS, as set_photo and migrate step 21 write it): an old version's leftover, which verify
    notes and --repair drops. conn: a sqlite3 connection."""
    from alignsearch.storage import rowdigest

    values = rowdigest.stored(rowdigest.PHOTO_KEYED_FIELDS, {"file_id": int(file_id), **fields})
    values["digest"] = rowdigest.digest(rowdigest.PHOTO_KEYED_FIELDS, values)
    conn.execute(f"INSERT INTO photos ({', '.join(values)}) VALUES ({', '.join('?' * len(values))})",
                 tuple(values.values()))


def as_schema(conn, version: int) -> None:
    """Record the catalog behind a sqlite3 connection at an older schema `version` (its readers check rows as that
    version wrote them): from 14 to 20 each photos row whose digest holds with its key digested again without it
    (rowdigest.PHOTO_FIELDS: the key is digested from schema 21); a row off its digest stays off. From 19 to 21 each
    pending address's seal less its file id's term (rowdigest.key_term, added by step 22): else the upgrade from
    there added it twice. Below 23 without photos.field_seal (step 23 adds it), below 24 without files.field_seal
    (step 24 adds it). In the caller's transaction."""
    from alignsearch.storage import migrate, rowdigest

    for table, since in (("photos", migrate.FIELD_SEALS), ("files", migrate.FILE_SEALS)):
        if version < since and any(row[1] == "field_seal" for row in conn.execute(f"PRAGMA table_info({table})")):
            conn.execute(f"ALTER TABLE {table} DROP COLUMN field_seal")

    if 19 <= version < migrate.PENDING_KEYS and any(row[1] == "vec_seal" for row in
                                                    conn.execute("PRAGMA table_info(pending_vectors)")):
        conn.execute(f"UPDATE pending_vectors SET vec_seal = (vec_seal - {rowdigest.key_term_sql('file_id')} + "
                     f"{rowdigest.SEAL_PRIME}) % {rowdigest.SEAL_PRIME}")

    if migrate.DIGESTS <= version < migrate.PHOTO_KEYS:
        keyed, fields = rowdigest.PHOTO_KEYED_FIELDS, rowdigest.PHOTO_FIELDS
        rows = conn.execute(f"SELECT digest, {', '.join(name for name, _ in keyed)} FROM photos").fetchall()
        conn.executemany("UPDATE photos SET digest = ? WHERE file_id = ?",
                         [(rowdigest.digest_of(fields, row[2:]), row[1]) for row in rows
                          if rowdigest.holds_shown(keyed, row[1:], row[0])])
    conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(version),))


def seal(conn) -> None:
    """Digest every files and photos row as it stands (migrate.digest_rows), and seal its vector address
    (rowdigest.seal, schema 17): for a test that writes rows by hand what
    a writer would have written (synthetic rows, a text not read yet), never for damage a test means readers to find.
    conn: a sqlite3 connection, or a SQLAlchemy one."""
    from alignsearch.storage import migrate

    migrate.seal_rows(getattr(getattr(conn, "connection", None), "dbapi_connection", None) or conn)


# The catalog flip sweep (a7af884's, extended): the lowest bit of each used byte of a catalog page flipped in turn,
# the commands run on each, their outcomes sorted into kinds. SQLite pages carry no checksum, so each flip is read
# as it stands; a reader must answer as before, or refuse in one line (exit 7), never answer short with exit 0.
SWEPT = ("query", "similar", "verify")
SAME, REFUSED, FEWER, WRONG, CRASH, OTHER, VERIFY_OK, VERIFY_FOUND = (
    "same", "exit 7, one line", "fewer rows, exit 0", "other rows or values, exit 0", "exit 1 / traceback",
    "other exit", "verify: ok", "verify: damage found")


def catalog_pages(db: Path) -> dict[str, list[tuple[int, int, int]]]:
    """{table or index name: [(page's first byte in the file, first used byte, end)]} of each page holding cells:
    the page header and cell pointers (first used byte: the page's start, after the file header on page 1) and the
    cell content area up to the page's end (the unused gap between them is left out: no reader looks at it)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        size = conn.execute("PRAGMA page_size").fetchone()[0]
        pages = conn.execute("SELECT name, pageno FROM dbstat WHERE ncell > 0 ORDER BY pageno").fetchall()
    finally:
        conn.close()
    data = Path(db).read_bytes()
    out: dict[str, list] = {}
    for name, pageno in pages:
        start = (pageno - 1) * size
        head = start + (100 if pageno == 1 else 0)
        interior = data[head] in (2, 5)
        cells = struct.unpack(">H", data[head + 3 : head + 5])[0]
        content = struct.unpack(">H", data[head + 5 : head + 7])[0] or 65536
        pointers_end = head + (12 if interior else 8) + 2 * cells
        out.setdefault(name, []).append((start, head, pointers_end, start + content, start + size))
    return out


def flip_offsets(db: Path, names=None, every: int = 1) -> list[tuple[str, int]]:
    """(table, byte offset) of each byte to flip: the pages of `names` (all pages holding cells if None), every
    `every`-th used byte."""
    offsets = []
    for name, spans in catalog_pages(db).items():
        if names is None or name in names:
            for _, head, pointers_end, content, end in spans:
                used = list(range(head, pointers_end)) + list(range(content, end))
                offsets += [(name, at) for at in used[::every]]
    return offsets


def swept_command(command: str, photos: Path, ix: Path) -> list:
    """The arguments of one swept command (a7af884's: `query "red circle" --json -k 12`, and so similar and verify)."""
    return {"query": ["query", "red circle", "--index", ix, "--json", "-k", 12],
            "similar": ["similar", photos / "img001.jpg", "--index", ix, "--json", "-k", 12],
            "verify": ["verify", "--skip-model", "--index", ix]}[command]


def swept_outcome(command: str, code: int, output: str, intact: str) -> str:
    """The kind of one command's outcome after a flip (pure): intact is its output on the intact catalog."""
    if command == "verify":
        return VERIFY_OK if code == 0 else VERIFY_FOUND if code == 7 else CRASH if code == 1 else OTHER
    if code == 0:
        if output == intact:
            return SAME
        try:
            got, want = json.loads(output)["results"], json.loads(intact)["results"]
        except (ValueError, KeyError):
            return WRONG
        return FEWER if len(got) < len(want) else WRONG
    if code == 7 and len(output.strip().splitlines()) == 1:
        return REFUSED
    return CRASH if code == 1 or "Traceback" in output else OTHER


def _varint(data: bytes, at: int) -> tuple[int, int]:
    """SQLite's varint at `at`: (value, the offset past it)."""
    value = 0
    for i in range(9):
        byte = data[at + i]
        if i == 8:
            return (value << 8) | byte, at + 9
        value = (value << 7) | (byte & 0x7F)
        if byte < 0x80:
            return value, at + i + 1
    raise AssertionError("unreachable")


def _serial_size(kind: int) -> int:
    return (0, 1, 2, 3, 4, 6, 8, 8, 0, 0, 0, 0)[kind] if kind < 12 else (kind - 12) // 2


def flipped_field(data: bytes, page_size: int, at: int, columns: list[str]) -> str:
    """Which part of a b-tree page the byte at `at` of a database file's bytes is (pure): the page header, a cell
    pointer, a cell's payload length, rowid or record header (a column's serial type), a column's value (columns:
    the table's or index's column names in record order), or free space. Overflow pages are not followed."""
    start = at - at % page_size
    head = start + (100 if start == 0 else 0)
    if at < head:
        return "file header"
    kind = data[head]
    size = 12 if kind in (2, 5) else 8
    cells = struct.unpack(">H", data[head + 3 : head + 5])[0]
    if at < head + size:
        return "page header"
    if at < head + size + 2 * cells:
        return f"cell pointer {(at - head - size) // 2}"
    for i in range(cells):
        cell = start + struct.unpack(">H", data[head + size + 2 * i : head + size + 2 * i + 2])[0]
        where = cell + (4 if kind in (2, 5) else 0)
        if kind == 5:  # an interior table cell: a child page and a rowid
            end = _varint(data, where)[1]
            if cell <= at < end:
                return f"cell {i}: child pointer or key"
            continue
        payload, where = _varint(data, where)
        rowid_at = where
        if kind == 13:
            _, where = _varint(data, where)
        end = where + payload
        if not cell <= at < end:
            continue
        if at < rowid_at:
            return f"cell {i}: payload length"
        if at < where:
            return f"cell {i}: rowid"
        header, body = _varint(data, where)
        offset, types, position = where + header, [], body
        while position < where + header:
            serial, following = _varint(data, position)
            if position <= at < following:
                name = columns[len(types)] if len(types) < len(columns) else f"column {len(types)}"
                return f"cell {i}: serial type of {name}"
            types.append(serial)
            position = following
        if at < body:
            return f"cell {i}: record header size"
        for n, serial in enumerate(types):
            if offset <= at < offset + _serial_size(serial):
                return f"cell {i}: value of {columns[n] if n < len(columns) else f'column {n}'}"
            offset += _serial_size(serial)
        return f"cell {i}: past its record"
    return "free space"


def record_columns(db: Path, name: str) -> list[str]:
    """The column names of a table's or index's records, in record order (an index's: its columns, then rowid)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        table = [r[1] for r in conn.execute(f'PRAGMA table_info("{name}")')]
        return table or [r[2] or "rowid" for r in conn.execute(f'PRAGMA index_info("{name}")')] + ["rowid"]
    finally:
        conn.close()


def result_difference(output: str, intact: str) -> str:
    """What differs between a search's JSON answer and the intact one (pure): each rank whose fields differ, with
    those fields' names and, for the path, both values; "" when no results differ (or the output is not JSON)."""
    try:
        got, want = json.loads(output)["results"], json.loads(intact)["results"]
    except (ValueError, KeyError):
        return ""
    parts = []
    for rank, (a, b) in enumerate(zip(want, got)):
        fields = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        if fields:
            moved = f" {a.get('relpath')} -> {b.get('relpath')}" if "relpath" in fields else f" ({a.get('relpath')})"
            parts.append(f"#{rank}{moved}: {','.join(fields)}")
    if len(got) != len(want):
        parts.append(f"{len(want)} -> {len(got)} results")
    return "; ".join(parts)


def flip_sweep(photos: Path, ix: Path, offsets, commands=SWEPT) -> list[dict]:
    """Each flip of offsets ((table, byte)) in turn, the commands run in-process on it, the catalog restored after:
    [{table, at, command: (kind, exit code, first line of its output, or the last of a traceback)}]."""
    from click.testing import CliRunner

    from alignsearch.surfaces.cli import main

    def invoke(command):
        result = CliRunner().invoke(main, [str(a) for a in swept_command(command, photos, ix)])
        output = result.output + ("".join(__import__("traceback").format_exception(result.exception))
                                  if result.exit_code == 1 and result.exception and not isinstance(result.exception, SystemExit) else "")
        return result.exit_code, output

    db = ix / "catalog.db"
    intact = {c: invoke(c)[1] for c in commands}
    original = db.read_bytes()
    page_size = sqlite3.connect(f"file:{db}?mode=ro", uri=True).execute("PRAGMA page_size").fetchone()[0]
    columns = {table: record_columns(db, table) for table in {t for t, _ in offsets}}
    out = []
    try:
        for table, at in offsets:
            data = bytearray(original)
            data[at] ^= 0x01
            db.write_bytes(data)
            row = {"table": table, "at": at, "field": flipped_field(original, page_size, at, columns[table])}
            for command in commands:
                code, output = invoke(command)
                kind = swept_outcome(command, code, output, intact[command])
                # another answer with exit 0: what differs (its first line is the JSON's "{")
                row[command] = (kind, code, result_difference(output, intact[command])[:300] if kind == WRONG else
                                (output.strip().splitlines() or [""])[-1 if code == 1 else 0][:200])
            out.append(row)
    finally:
        db.write_bytes(original)
    return out


def checkpointed_ids(db: Path, sql: str) -> tuple[int, set[int]]:
    """The WAL of the catalog `db` checkpointed into the file (so that a page flipped there is the one read), then
    (its page size, the ids `sql` selects)."""
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0  # not busy: all copied back
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        ids = {i for (i,) in conn.execute(sql)}
    conn.close()
    return page_size, ids


def flip_a_photo_key(db: Path, *, onto_a_file: bool = False) -> tuple[int, int]:
    """The lowest bit of one photos row's rowid (its file_id) flipped where its cell holds it, to an id no files row
    has, keeping the page's keys in order (SQLite's check of the table passes): the catalog flip sweep's damage that
    readers saw as a photo with no date, exit 0 ((the id written, the id it reads as)). The WAL is checkpointed into
    the file first, so that the page flipped is the one read. onto_a_file: to the id of another file that has a row of
    its own instead (two rows of one key, out of the page's order: SQLite's check of the table fails, and a look-up of
    the row's own id misses it)."""
    columns = record_columns(db, "photos")
    page_size, files = checkpointed_ids(db, "SELECT id FROM files")
    original = db.read_bytes()
    for _, _, _, first, end in catalog_pages(db)["photos"]:
        for at in range(first, end):
            written = original[at]
            if not (flipped_field(original, page_size, at, columns).endswith(": rowid") and written < 0x80
                    and written in files and (written ^ 1 in files) == onto_a_file):
                continue
            data = bytearray(original)
            data[at] ^= 0x01
            db.write_bytes(data)
            conn = sqlite3.connect(db)
            try:
                sound = conn.execute("PRAGMA integrity_check(photos)").fetchone()[0] == "ok"
                moved = conn.execute("SELECT 1 FROM photos WHERE file_id = ?", (written ^ 1,)).fetchone()
                if onto_a_file:
                    sound, moved = True, moved and not conn.execute("SELECT 1 FROM photos WHERE file_id = ?",
                                                                    (written,)).fetchone()
            finally:
                conn.close()
            if sound and moved:
                return written, written ^ 1
    db.write_bytes(original)
    raise AssertionError("no photos row whose key flips to an id as asked, the flip read as written")


def flip_sweep_index(base: Path, model) -> tuple[Path, Path]:
    """(photos, index) of the sweep: 12 pictures (conftest.make_images) indexed by the tiny model, as a7af884's."""
    from conftest import index_json, make_images

    photos = make_images(base / "photos", 12)[0].parent
    index_json(base / "ix", photos, "--model", model, "--device", "cpu")
    return photos, base / "ix"


# -- MP4 box layouts FFmpeg reads (alignsearch.media.video.container_type) --------------------------------------------


def make_fragmented_mp4(path) -> Path:
    """A fragmented MP4 (isom) of 3 frames whose fragments' offsets are their own (default_base_moof): bytes put
    before it leave it playable, as a box before its ftyp does."""
    import av

    path = Path(path)
    with av.open(str(path), "w", format="mp4",
                 options={"movflags": "frag_keyframe+empty_moov+default_base_moof"}) as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(3):
            out.mux(stream.encode(av.VideoFrame.from_ndarray(np.full((48, 64, 3), 60 * i, np.uint8), format="rgb24")))
        out.mux(stream.encode())
    return path


def top_level_boxes(data: bytes) -> list[tuple[bytes, int, int]]:
    """(type, offset, size) of each top-level box of an MP4 (32-bit sizes only, as a small file's are)."""
    boxes, at = [], 0
    while at + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[at:at + 8])
        boxes.append((kind, at, size))
        at += size
    return boxes


def decoded_frames(path) -> int:
    """How many video frames FFmpeg decodes from path."""
    import av

    with av.open(str(path)) as got:
        return sum(1 for _ in got.decode(video=0))


def same_size_other_content(path, like) -> None:
    """path's bytes put in place of like (a new file renamed over it, as a sync does) with 300 bytes mid-file
    inverted: another content of the same size, given like's mtime, which the listing cannot tell from it."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 300] = bytes(b ^ 0xFF for b in data[mid:mid + 300])
    st = like.stat()
    part = like.with_suffix(".part")
    part.write_bytes(bytes(data))
    os.utime(part, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(part, like)


def alignsearch_fsize(limit: int, *args, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m alignsearch ARGS` whose files cannot grow past limit bytes (RLIMIT_FSIZE, `ulimit -f`): a write
    past it fails with EFBIG (Python ignores SIGXFSZ), as on a full disk, without mounting one."""
    import resource

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run([sys.executable, "-m", "alignsearch", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"}, preexec_fn=limited)


NO_SHM_MAPS_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static int shm_file(int fd) {  /* a file whose name ends in -shm: SQLite's WAL index */
    char link[64], path[4096];
    if (fd < 0) return 0;
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof path - 1);
    if (n < 4) return 0;
    path[n] = 0;
    return strcmp(path + n - 4, "-shm") == 0;
}

void *mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off) {
    static void *(*real)(void *, size_t, int, int, int, off_t);
    if (!real) real = dlsym(RTLD_NEXT, "mmap");
    if ((flags & MAP_SHARED) && shm_file(fd)) { errno = ENODEV; return MAP_FAILED; }
    return real(addr, len, prot, flags, fd, off);
}

void *mmap64(void *addr, size_t len, int prot, int flags, int fd, off_t off) {
    return mmap(addr, len, prot, flags, fd, off);
}
"""


def alignsearch_without_shm_maps(build: Path, *args, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m alignsearch ARGS` in which a -shm file cannot be mapped: mmap fails with ENODEV, as on a filesystem
    without shared maps, so SQLite meets IOERR_SHMMAP, without mounting one. An LD_PRELOAD library, built in
    `build` with the C compiler (the test is skipped without one, or where SQLite does not call the libc's mmap)."""
    import shutil

    source, library = build / "no_shm_maps.c", build / "no_shm_maps.so"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LD_PRELOAD": str(library)}
    if not library.exists():  # built, and seen to work, once per folder
        compiler = shutil.which("cc") or shutil.which("gcc")
        if compiler is None:
            pytest.skip("no C compiler to build the LD_PRELOAD library that fails -shm maps")
        source.write_text(NO_SHM_MAPS_C)
        subprocess.run([compiler, "-shared", "-fPIC", "-o", library, source, "-ldl"], check=True, capture_output=True)
        probe = subprocess.run([sys.executable, "-c", "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); "
                                "c.execute('PRAGMA journal_mode=wal'); c.execute('CREATE TABLE t(x)')", build / "probe.db"],
                               capture_output=True, text=True, env=env)
        if "disk I/O error" not in probe.stderr:
            library.unlink()
            pytest.skip(f"SQLite here maps its -shm files without the libc's mmap: {probe.stderr[-300:]!r}")
    return subprocess.run([sys.executable, "-m", "alignsearch", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def flip_vector_address(db: Path, relpath: str) -> tuple[int, int]:
    """Flip the lowest bit of the last byte of one files row's vec_row, where its own cell holds it: (the address
    written, the address read after). Each value byte of a vec_row (flipped_field) is flipped in turn until the
    row named `relpath` reads another address; the others are put back. An address of 0 or 1 has no value byte
    (serial types 8, 9): the row must hold another."""
    def address() -> int:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            return conn.execute("SELECT vec_row FROM files WHERE relpath = ?", (relpath,)).fetchone()[0]
        finally:
            conn.close()

    before = address()
    assert before > 1, f"{relpath} has address {before}: no value byte to flip"
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    finally:
        conn.close()
    columns = record_columns(db, "files")
    data = bytearray(Path(db).read_bytes())
    for _, _, _, first, end in catalog_pages(db)["files"]:  # each page's cell content area
        for at in range(first, end):
            if not flipped_field(bytes(data), page_size, at, columns).endswith("value of vec_row"):
                continue
            nxt = at + 1  # the value's last byte: the flip moves the address by one
            if nxt < end and flipped_field(bytes(data), page_size, nxt, columns).endswith("value of vec_row"):
                continue
            data[at] ^= 0x01
            Path(db).write_bytes(data)
            if address() != before:
                return before, address()
            data[at] ^= 0x01
            Path(db).write_bytes(data)
    raise AssertionError(f"no value byte of {relpath}'s vec_row found")


def hide_a_photo_row(folder: Path) -> int:
    """Give each indexed file of the index at folder its photo row (a date and a caption, as a writer writes them),
    then flip the low byte of one cell pointer of the photos page so that a seek misses a row (the cell read one byte
    off): the catalog flip sweep's damage that readers saw as a photo with no date, exit 0 (the row is absent, not
    altered: no digest is read). Returns the id whose row the seek misses; SQLite's check of the photos table names
    the damage."""
    from alignsearch.storage import catalog

    db = catalog.connect(folder / "catalog.db")
    with db.begin() as conn:
        for (i,) in conn.exec_driver_sql("SELECT id FROM files WHERE status = 'indexed'").all():
            catalog.set_photo(conn, i, f"{i}.jpg", {"taken": 1.6e9 + i, "caption": f"photo {i}"})
    db.dispose()
    path = folder / "catalog.db"
    original = path.read_bytes()
    (_, head, pointers_end, _, _), = catalog_pages(path)["photos"]
    for at in range(head + 9, pointers_end, 2):  # each pointer's low byte (the page header is 8 bytes: a leaf)
        data = bytearray(original)
        data[at] ^= 0x01
        path.write_bytes(data)
        conn = sqlite3.connect(path)
        try:
            held = {i: conn.execute("SELECT 1 FROM photos WHERE file_id = ?", (i,)).fetchone()
                    for (i,) in conn.execute("SELECT id FROM files").fetchall()}
            sound = conn.execute("PRAGMA integrity_check(photos)").fetchone()[0] == "ok"
        except sqlite3.DatabaseError:
            continue
        finally:
            conn.close()
        missing = [i for i, row in held.items() if row is None]
        if missing and not sound:
            return missing[0]
    path.write_bytes(original)
    raise AssertionError("no flip of a photos cell pointer hides a row")


def with_synthetic(base, tiny_model, images: int, vectors: int, seed: int, kind: str):
    """base/photos (make_images) indexed, then clustered synthetic vectors (catalog rows and stored vectors)
    added: an ANN index of `kind`. Returns the index folder."""
    import alignsearch
    from conftest import index_json, make_images
    from indexer.build import sync_index

    root, ix = base / "photos", base / "ix"
    make_images(root, images)
    index_json(ix, root, "--model", tiny_model, "--device", "cpu")
    db, store = add_synthetic(ix, vectors, alignsearch.open(ix).store.dim, seed=seed)
    assert sync_index(db, store, ix / "index.faiss")["plan"]["kind"] == kind
    db.dispose()
    return ix


# -- field seals (schema 23: photos rows, 24: files rows; tests/test_field_seals.py, test_file_seals.py) ------------

def one_line_damage(result) -> None:
    """The command said the catalog is damaged in one line (no traceback), naming verify --repair."""
    out = result.output.strip()
    assert out.splitlines() == [out], out
    assert "catalog.db is damaged" in out and "alignsearch verify --repair" in out, out


def query_hits(ix: Path, *args, code: int = 0):
    """How many hits `query "red circle" -k 12` gives with ARGS (the result itself where code is not 0)."""
    from conftest import run

    result = run("query", "red circle", "--index", ix, "-k", 12, "--json", *args, code=code)
    return len(json.loads(result.stdout)["results"]) if code == 0 else result


def seal_found_and_resealed(ix: Path, args: list, *, found: str, resealed: str) -> None:
    """With a field seal alone damaged (its fields and their digest as written): a query filtered by ARGS refuses in
    one line, verify reports `found` (not a row to read again), --repair says `resealed`, and all is as before."""
    from conftest import run

    one_line_damage(query_hits(ix, *args, code=7))
    out = run("verify", "--skip-model", "--index", ix, code=7).output
    assert found in out, out
    assert "are not as written" not in out, out
    out = run("verify", "--repair", "--skip-model", "--index", ix).output
    assert resealed in out and "forgot" not in out, out
    assert run("verify", "--skip-model", "--index", ix).output.startswith("ok: ")
    assert query_hits(ix, *args) == 12


def filter_columns(db_path: Path, *, readonly: bool = False):
    """The snapshot's filter columns (search/columns.Columns) loaded from a catalog by a writer's or a reader's engine."""
    from alignsearch.search.columns import Columns
    from alignsearch.storage import catalog

    db = catalog.connect(db_path, readonly=readonly)
    try:
        return Columns(db)
    finally:
        db.dispose()
