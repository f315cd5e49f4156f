"""Everything at once: a seeded soak over a small real library. A real `alignsearch serve` answers /api/search in a
loop, `alignsearch query --json` runs in a loop (through that server, and locally with --model), and a writer runs
random operations (file changes then `index`, --compact, forget and index again, tag, verify --repair, export,
--reindex, --watch stopped with Ctrl-C), some of them killed with -9 at a random moment. At the end one plain
`index` finishes what was killed; then verify is sound, the answers equal those of an index built from scratch
from the same files, no temporary is left that the next run does not remove, and the server never answered 5xx.
Below it, the races it found, each reduced to a fast test of its own.

The seed is printed; ALIGNSEARCH_CHAOS_SEED replays its choices (the moments the processes meet still vary
with the machine's load), ALIGNSEARCH_CHAOS_SECONDS sets how long the loops run."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlencode

import numpy as np
import pytest
from PIL import Image, ImageDraw

from helpers import call, index_state, start_serve, stop, unlisted_vector_files, verify_problems, write_labels

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
TEXTS = ["a red circle", "blue sky", "a dog", "green field at night", "something"]
LABELS = ["red", "green", "blue", "dark", "bright"]


def paint(path: Path, rng: random.Random) -> None:
    """A small distinct image (noise and an ellipse), its format by its suffix."""
    w, h = rng.randint(40, 120), rng.randint(40, 120)
    pixels = np.random.default_rng(rng.getrandbits(32)).random((h, w, 3))
    img = Image.fromarray((pixels * 255).astype(np.uint8))
    x0, y0 = rng.randint(0, w // 2), rng.randint(0, h // 2)
    ImageDraw.Draw(img).ellipse([x0, y0, x0 + w // 2, y0 + h // 2], fill=tuple(rng.randint(0, 255) for _ in range(3)))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def cli(*args, cwd=None, timeout=240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "alignsearch", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=ENV, cwd=cwd)


def well_formed(hits, ever: set[str]) -> str | None:
    """Why a list of hits is not what an answer holds (None when it is): each an id, a path that was once in the
    library, and a finite score."""
    for hit in hits:
        if not isinstance(hit.get("id"), int) or not isinstance(hit.get("path"), str):
            return f"malformed hit {hit}"
        if hit["path"] not in ever:
            return f"a path never in the library: {hit['path']}"
        score = hit.get("score")
        if score is not None and not (isinstance(score, float | int) and math.isfinite(score)):
            return f"bad score {hit}"
    return None


def exact_answers(ix: Path) -> dict[str, float]:
    """path -> score of every indexed image for one fixed query vector (flat search: exact)."""
    import alignsearch

    with alignsearch.open(ix) as engine:
        query = np.random.default_rng(7).standard_normal(engine.store.dim).astype(np.float32)
        hits = engine.search_vector(query / np.linalg.norm(query), k=1000)
        return {h.path: float(h.score) for h in hits}


def temporaries(ix: Path) -> list[Path]:
    """Files and folders under the index named as an atomic write's temporary (`.NAME.XXXX.tmp` / `.new`)."""
    return sorted(p for p in ix.rglob(".*") if p.name.endswith((".tmp", ".new")))


class Library:
    """The files of two roots, changed by the writer at random; `ever` holds every path that ever existed."""

    def __init__(self, base: Path, rng: random.Random):
        self.roots = [base / "a", base / "b"]
        self.rng = rng
        self.ever: set[str] = set()
        self.lock = threading.Lock()
        self.serial = 0
        # roots a `forget ROOT` then `index ROOT` left forgotten: the index was killed, maybe before it placed ROOT
        # again (as for any new root, a killed first run may leave it unknown: the user runs `index ROOT` again)
        self.forgotten: set[Path] = set()

    def files(self, root: Path) -> list[Path]:
        return sorted(p for p in root.rglob("*") if p.is_file())

    def new_path(self, root: Path) -> Path:
        self.serial += 1
        sub = self.rng.choice(["", "sub", "sub/deep"])
        path = root / sub / f"f{self.serial:04d}{self.rng.choice(['.jpg', '.png'])}"
        with self.lock:
            self.ever.add(str(path))
        return path

    def add(self, root: Path) -> None:
        paint(self.new_path(root), self.rng)

    def change(self, counts: Counter) -> None:
        """One to four random changes of files: add, delete, modify, rename."""
        for _ in range(self.rng.randint(1, 4)):
            root = self.rng.choice(self.roots)
            present = self.files(root)
            kind = self.rng.choice(["add", "delete", "modify", "rename"]) if len(present) > 4 else "add"
            counts["file-" + kind] += 1
            if kind == "add":
                self.add(root)
            elif kind == "delete":
                self.rng.choice(present).unlink()
            elif kind == "modify":
                paint(self.rng.choice(present), self.rng)
            else:
                src = self.rng.choice(present)
                dest = self.new_path(root).with_suffix(src.suffix)
                with self.lock:
                    self.ever.add(str(dest))
                dest.parent.mkdir(parents=True, exist_ok=True)
                src.rename(dest)


class Failures:
    """What went wrong, and a timeline of the writer's operations to read it against."""

    def __init__(self):
        self.lines: list[str] = []
        self.timeline: list[str] = []
        self.lock = threading.Lock()
        self.start = time.monotonic()

    def add(self, line: str) -> None:
        with self.lock:
            self.lines.append(f"{time.monotonic() - self.start:6.1f}s {line[:3000]}")

    def note(self, line: str) -> None:
        with self.lock:
            self.timeline.append(f"{time.monotonic() - self.start:6.1f}s {line}")


def _multipart(fields: dict, image: bytes) -> tuple[bytes, dict]:
    boundary = f"chaos{random.getrandbits(64):x}"
    body = b""
    for k, v in fields.items():
        body += f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
    body += (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="q.png"\r\n'
             "Content-Type: image/png\r\n\r\n").encode() + image + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def _filters(rng: random.Random) -> dict:
    return rng.choice([{}, {}, {"path": "sub/**"}, {"format": "png"}, {"tag": rng.choice(LABELS)},
                       {"sort": "path"}, {"min_score": -0.5}, {"where": "format = jpeg"}])


def guarded(loop):
    """The loop, with whatever it raises recorded as a failure rather than lost with its thread."""

    def run(*args):
        failures = args[-1]
        try:
            loop(*args)
        except Exception as exc:  # noqa: BLE001 - reported by the test
            import traceback

            failures.add(f"{loop.__name__} stopped: {exc!r}\n{traceback.format_exc()}")

    return run


def serve_queries(url: str, query_images: list[bytes], lib: Library, rng: random.Random, until: float,
                  counts: Counter, failures: Failures) -> None:
    """/api/search in a loop: text, image, text+image, with filters; every answer 200 and well formed."""
    while time.monotonic() < until:
        kind = rng.choice(["text", "image", "text+image"])
        params = {"k": rng.randint(1, 30), **_filters(rng)}
        if kind == "text":
            status, _, body = call(url, "/api/search?" + urlencode({"q": rng.choice(TEXTS), **params}), token="chaos")
        else:
            if kind == "text+image":
                params["q"] = rng.choice(TEXTS)
            data, headers = _multipart(params, rng.choice(query_images))
            status, _, body = call(url, "/api/search", data=data, headers=headers, token="chaos")
        counts[f"http-{kind}"] += 1
        if status != 200:
            failures.add(f"/api/search {kind} {params}: {status} {body[:500]!r}")
            continue
        with lib.lock:
            why = well_formed(json.loads(body)["results"], lib.ever)
        if why:
            failures.add(f"/api/search {kind} {params}: {why}")


def cli_queries(ix: Path, model: Path, query_image: Path, lib: Library, rng: random.Random, until: float,
                counts: Counter, failures: Failures) -> None:
    """`alignsearch query --json` in a loop: found from the working folder or given --index (both through the
    server), or with --model (searched locally, beside the writer)."""
    while time.monotonic() < until:
        route = rng.choice(["cwd", "index", "local"])
        args = ["query", rng.choice(TEXTS), "--json", "-k", rng.randint(1, 20)]
        if rng.random() < 0.3:
            args += ["--image", query_image]
        if rng.random() < 0.3:
            args += ["--path", "sub/**"]
        if route != "cwd":
            args += ["--index", ix]
        if route == "local":
            args += ["--model", model, "--device", "cpu"]
        proc = cli(*args, cwd=ix.parent)
        counts[f"cli-{route}"] += 1
        if proc.returncode != 0 or "Traceback" in proc.stderr:
            failures.add(f"query via {route} {args}: exit {proc.returncode}: {proc.stderr[-2000:]}")
            continue
        with lib.lock:
            why = well_formed(json.loads(proc.stdout)["results"], lib.ever)
        if why:
            failures.add(f"query via {route}: {why}")


KILLABLE = {"index", "compact", "reindex", "tag", "repair", "export", "forget+index", "watch"}


def writer(ix: Path, model: Path, lib: Library, base: Path, rng: random.Random, until: float, counts: Counter,
           failures: Failures) -> None:
    """Random write operations one after another; some killed with -9 after a random delay."""
    index_args = ["--index", ix, "--device", "cpu", "--workers", "0"]
    labels = write_labels(base / "labels.txt", LABELS)
    while time.monotonic() < until:
        op = rng.choice(["index", "index", "index", "compact", "forget+index", "tag", "repair", "export", "reindex",
                         "watch"])
        kill_after = rng.uniform(0.3, 8.0) if op in KILLABLE and rng.random() < 0.35 else None
        if op in ("index", "compact", "reindex"):
            lib.change(counts)
        extra = {"index": [], "compact": ["--compact"], "reindex": ["--reindex"]}
        if op in extra:
            steps = [["index", *extra[op], *index_args]]
        elif op == "forget+index":
            root = rng.choice(lib.roots)
            # a root an earlier killed forget+index left forgotten is no root to forget (exit 6, "not a root"):
            # its user, seeing it gone, indexes it again
            forget = [] if root in lib.forgotten else [["forget", root, "--index", ix]]
            steps = [*forget, ["index", root, *index_args]]
        elif op == "tag":
            steps = [["tag", "--labels-file", labels, "--index", ix, "--device", "cpu"]]
        elif op == "repair":
            steps = [["verify", "--repair", "--skip-model", "--index", ix]]
        elif op == "export":
            steps = [["export", base / "out.parquet", "--index", ix]]
        else:
            steps = None
        counts[f"op-{op}"] += 1
        failures.note(f"{op}" + (f" (kill -9 after {kill_after:.1f} s)" if kill_after is not None else ""))
        if op == "watch":
            watch(ix, index_args, lib, rng, kill_after, counts, failures)
            continue
        for step in steps:
            code, err = run_maybe_killed(step, kill_after if step is steps[-1] else None, counts)
            if code is None:
                failures.note(f"{op} killed")
                if op == "forget+index":
                    lib.forgotten.add(root)
                break
            if op == "forget+index" and step is steps[-1]:
                lib.forgotten.discard(root)
            if code != 0 or "Traceback" in err:
                failures.add(f"{op}: {step}: exit {code}: {err[-2000:]}")
                break


def run_maybe_killed(args, kill_after: float | None, counts: Counter) -> tuple[int | None, str]:
    """(exit code, stderr) of the command; (None, stderr) when it was killed with -9 before it ended."""
    proc = subprocess.Popen([sys.executable, "-m", "alignsearch", *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        _, err = proc.communicate(timeout=kill_after if kill_after is not None else 300)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        counts["kill-9"] += 1
        return None, err
    return proc.returncode, err


def watch(ix: Path, index_args, lib: Library, rng: random.Random, kill_after: float | None, counts: Counter,
          failures: Failures) -> None:
    """`index --watch` for a while, files changed under it, then Ctrl-C (or kill -9 after kill_after)."""
    proc = subprocess.Popen([sys.executable, "-m", "alignsearch", "index", *map(str, index_args), "--watch", "--json"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    started = time.monotonic()
    time.sleep(rng.uniform(2.0, 6.0))
    lib.change(counts)
    time.sleep(rng.uniform(1.0, 5.0))
    if kill_after is not None:
        time.sleep(max(0.0, started + kill_after - time.monotonic()))
        proc.kill()
        proc.communicate()
        counts["kill-9"] += 1
        return
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        failures.add(f"watch: did not stop on SIGINT within 120 s: {err[-2000:]}")
        return
    counts["watch-sigint"] += 1
    if proc.returncode not in (0, 130) or "Traceback" in err:
        failures.add(f"watch: exit {proc.returncode} on SIGINT: {err[-2000:]}")


# The full soak (75 s of loops, a random seed) is opt-in: set ALIGNSEARCH_CHAOS=1 (or a seed). Seeds 1 to 6 passed
# on a loaded 2-core machine, 104-125 s each; its two races (a filtered search during `index --reindex` answered
# 500, `index --watch` stopped by Ctrl-C exited killed by SIGINT) have their own tests below. Seed 8 found two
# defects of this test's end check (fixed in 46ffe39). Seeds 9 to 14 passed, each at its first run, on 2026-12-05
# on a loaded 2-core machine, 91-101 s each, with 1 to 6 kill -9 a seed (of index, --compact, --reindex,
# forget+index, verify --repair, export and --watch). Seeds 15 to 27 passed on 2026-12-05, 107-139 s each (seed 25
# after a defect of this test's writer was fixed: it forgot again a root a killed forget+index had left forgotten). A short soak of one seed runs by default (~40 s): seed 6
# meets, in its 15 s, a compaction, an export, a repair, tagging, a watch stopped by Ctrl-C and a kill -9.
SOAK = bool(os.environ.get("ALIGNSEARCH_CHAOS") or os.environ.get("ALIGNSEARCH_CHAOS_SEED"))
BRIEF_SEED, BRIEF_SECONDS = 6, 15.0


@pytest.mark.slow
@pytest.mark.skipif(not SOAK, reason="the chaos soak runs when ALIGNSEARCH_CHAOS=1 or ALIGNSEARCH_CHAOS_SEED is set")
def test_everything_at_once(tmp_path, tiny_model):
    seed = int(os.environ.get("ALIGNSEARCH_CHAOS_SEED") or random.SystemRandom().randrange(2**32))
    soak(tmp_path, tiny_model, seed, float(os.environ.get("ALIGNSEARCH_CHAOS_SECONDS", "75")))


@pytest.mark.slow
@pytest.mark.skipif(SOAK, reason="the full soak runs instead")
def test_everything_at_once_briefly(tmp_path, tiny_model):
    soak(tmp_path, tiny_model, BRIEF_SEED, BRIEF_SECONDS)


def soak(tmp_path: Path, tiny_model: Path, seed: int, seconds: float) -> None:
    print(f"\nchaos seed {seed} (ALIGNSEARCH_CHAOS_SEED={seed} replays it), {seconds:.0f} s")
    master = random.Random(seed)
    base = tmp_path / "lib"
    lib = Library(base, random.Random(master.getrandbits(64)))
    for root in lib.roots:
        for _ in range(6):
            lib.add(root)
    queries = tmp_path / "queries"
    query_images = []
    for i in range(3):
        paint(queries / f"q{i}.png", lib.rng)
        query_images.append((queries / f"q{i}.png").read_bytes())
    ix = base / ".alignsearch"
    first = cli("index", *lib.roots, "--index", ix, "--model", tiny_model, "--device", "cpu", "--workers", "0")
    assert first.returncode == 0, first.stderr[-3000:]

    os.environ["ALIGNSEARCH_LOG"] = "debug"  # the server logs an internal error's traceback at debug
    try:
        server, url = start_serve(ix, "--token", "chaos")
    finally:
        del os.environ["ALIGNSEARCH_LOG"]
    said: list[str] = []  # the server's stderr, read as it comes (a full pipe would stall the server)
    drain = threading.Thread(target=lambda: said.extend(server.stderr), daemon=True)
    drain.start()
    counts: Counter = Counter()
    failures = Failures()
    until = time.monotonic() + seconds
    loops = [threading.Thread(target=guarded(serve_queries), args=(url, query_images, lib, random.Random(master.getrandbits(64)),
                                                           until, counts, failures)),
             threading.Thread(target=guarded(cli_queries), args=(ix, tiny_model, queries / "q0.png", lib,
                                                         random.Random(master.getrandbits(64)), until, counts, failures)),
             threading.Thread(target=guarded(writer), args=(ix, tiny_model, lib, tmp_path, random.Random(master.getrandbits(64)),
                                                   until, counts, failures))]
    try:
        for t in loops:
            t.start()
        for t in loops:
            t.join()
        server_alive = server.poll() is None
    finally:
        stop(server)
    drain.join(15)
    log = "".join(said)
    print("chaos counts:", dict(sorted(counts.items())))
    assert server_alive, log[-3000:]
    assert not failures.lines, "\n".join(failures.lines[:10] + ["timeline:", *failures.timeline, *errors_in(log)])
    assert "Traceback" not in log and " 500 " not in log, log[-3000:]

    # Every root is known but one a killed `index ROOT` after `forget ROOT` may have left out, which is named
    # again as its user would; one plain run finishes what a kill cut short; then the index is sound and
    # answers as one built afresh.
    listed = cli("roots", "--json", "--index", ix)
    known = {r["root"] for r in json.loads(listed.stdout)}
    assert {str(r) for r in lib.roots if r not in lib.forgotten} <= known, (known, lib.forgotten)
    final = cli("index", *sorted(lib.forgotten), *index_args_of(ix))
    assert final.returncode == 0, final.stderr[-3000:]
    assert verify_problems(ix) == []
    sound = cli("verify", "--json", "--skip-model", "--index", ix)
    assert sound.returncode == 0 and json.loads(sound.stdout)["ok"], sound.stdout + sound.stderr[-2000:]
    fresh = tmp_path / "fresh"
    built = cli("index", *lib.roots, "--index", fresh, "--model", tiny_model, "--device", "cpu", "--workers", "0")
    assert built.returncode == 0, built.stderr[-3000:]
    mine, theirs = exact_answers(ix), exact_answers(fresh)
    assert set(mine) == set(theirs) == {str(p) for root in lib.roots for p in lib.files(root)}
    assert max(abs(mine[p] - theirs[p]) for p in mine) < 2e-3

    # What a killed write left is removed by the next run once it is old enough to be no write at work.
    left = temporaries(ix)
    print("temporaries left before the next run:", [str(p.relative_to(ix)) for p in left],
          "unlisted segments:", unlisted_vector_files(ix))
    for path in left:
        os.utime(path, (time.time() - 3600, time.time() - 3600))
    again = cli("index", *index_args_of(ix))
    assert again.returncode == 0, again.stderr[-3000:]
    # but a killed re-encode's segment, which the next `index --reindex` with that model resumes (kept by design)
    pending = index_state(ix).reindex
    assert temporaries(ix) == [] and set(unlisted_vector_files(ix)) <= ({f"{pending.segment}.f16"} if pending else set())


def errors_in(log: str) -> list[str]:
    """The server log's lines about errors, with the tracebacks that follow them (the log is at debug level)."""
    lines = log.splitlines()
    marks = [i for i, line in enumerate(lines) if "internal error" in line or "Traceback" in line or " 500" in line]
    return [line for i in marks[:3] for line in lines[i : i + 40]]


def index_args_of(ix: Path) -> list:
    return ["--index", ix, "--device", "cpu", "--workers", "0"]


# -- what the soak found, reduced ------------------------------------------------------------------------------

INTERRUPTED_CLOSE = r"""
import os, signal, sys
from sqlalchemy.engine import default

real = default.DefaultDialect.do_close

def do_close(self, connection):
    # Ctrl-C as a connection closes (the watch reads the roots every tick: a Ctrl-C often lands here)
    default.DefaultDialect.do_close = real
    os.kill(os.getpid(), signal.SIGINT)
    real(self, connection)

default.DefaultDialect.do_close = do_close
from alignsearch.surfaces.cli import main
main(sys.argv[1:], prog_name="alignsearch")
"""


@pytest.mark.slow
def test_ctrl_c_while_a_connection_closes_prints_no_traceback(indexed_images):
    """Found by the soak: Ctrl-C of `index --watch` while SQLAlchemy closed a connection printed the pool's
    "Exception closing connection" with a KeyboardInterrupt traceback before "watch stopped"."""
    _, ix = indexed_images(3)
    proc = subprocess.run([sys.executable, "-c", INTERRUPTED_CLOSE, "index", "--index", ix, "--device", "cpu",
                           "--workers", "0", "--watch"], capture_output=True, text=True, timeout=120, env=ENV)
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert "watch stopped" in proc.stderr
    assert "Traceback" not in proc.stderr and "Exception closing connection" not in proc.stderr, proc.stderr


@pytest.mark.slow
def test_a_file_forgotten_while_a_search_reads_its_rows_is_left_out_not_a_crash(indexed_images, monkeypatch):
    """Found by the soak (the server answered 500 "internal error", KeyError): a search reads the candidates'
    addresses, then their rows, each read seeing what is committed then; a writer that removed a file in
    between (here `forget` of its root) left a ranked id without a row. The hit is left out, as the next search
    would leave it out."""
    import alignsearch
    from alignsearch.storage import catalog

    root, ix = indexed_images(4)
    real = catalog.get_files
    forgotten = []

    def get_files(conn, ids):
        if not forgotten:
            forgotten.append(subprocess.run([sys.executable, "-m", "alignsearch", "forget", str(root), "--index",
                                             str(ix)], capture_output=True, text=True, env=ENV, timeout=120))
        return real(conn, ids)

    with alignsearch.open(ix) as engine:
        query = np.random.default_rng(7).standard_normal(engine.store.dim).astype(np.float32)
        monkeypatch.setattr(catalog, "get_files", get_files)
        hits = engine.search_vector(query / np.linalg.norm(query), k=4)
    assert forgotten and forgotten[0].returncode == 0, forgotten[0].stderr
    assert hits == []


REINDEX_WITHOUT_FOLD = r"""
import sys
import indexer.reindex

indexer.reindex.fold = lambda db, store: None  # the fold is run by the test, once a reader holds the switch's snapshot
from alignsearch.surfaces.cli import main
main(sys.argv[1:], prog_name="alignsearch")
"""


@pytest.mark.slow
def test_a_fold_after_a_reindex_while_a_search_holds_its_snapshot_is_searched_again_not_a_crash(indexed_images):
    """Found by the soak (a filtered query answered 500, KeyError: 1): `index --reindex` switches to a new
    generation in segment 1, then folds that small segment into vectors.f16 (segment 1 deleted, every address
    moved). A reader that took the switch's snapshot and its filter columns (addresses in segment 1) met the moved
    addresses, reloaded its store for them (no segment 1), and then read its columns' segment-1 addresses from
    that store. A fold moves addresses as a compaction does: the reader searches the fold's generation."""
    import alignsearch
    from alignsearch.storage import catalog, vectors
    from alignsearch.storage.paths import DB_FILE
    from indexer import writer

    _, ix = indexed_images(4)
    switched = subprocess.run([sys.executable, "-c", REINDEX_WITHOUT_FOLD, "index", "--reindex", "--no-compact",
                               *index_args_of(ix)], capture_output=True, text=True, timeout=240, env=ENV)
    assert switched.returncode == 0, switched.stderr[-3000:]
    with alignsearch.open(ix) as engine:
        assert sorted(engine.store.segments) == [1]  # the re-encoded generation, not yet folded
        query = np.random.default_rng(7).standard_normal(engine.store.dim).astype(np.float32)
        query /= np.linalg.norm(query)
        fmt = engine.search_vector(query, k=1)[0].format
        before = engine.search_vector(query, k=4, format=fmt)  # the snapshot's filter columns: segment 1's addresses
        db = catalog.connect(ix / DB_FILE)
        try:
            with db.connect() as conn:
                store = vectors.load(conn, ix, engine.store.dim)
            assert writer.fold_small_segments(db, store) == 4
        finally:
            db.dispose()
        engine.search_vector(query, k=4)  # reads the moved addresses: a store of the fold's rows
        after = engine.search_vector(query, k=4, format=fmt)
    assert before and [(h.id, round(h.score, 4)) for h in after] == [(h.id, round(h.score, 4)) for h in before]


@pytest.mark.slow
def test_a_reindex_between_a_searchs_generation_check_and_its_store_reload_is_a_moved_snapshot(indexed_images,
                                                                                             monkeypatch):
    """A search whose snapshot's store lacks rows an `index` run appended since reloads the store (same generation).
    A re-encode's switch between the generation check and that reload gave it the next generation's store (no row
    of vectors.f16: IndexError, a 500). The store is checked to be of the snapshot's generation after it is read."""
    import alignsearch
    from alignsearch.search.engine import SnapshotMoved
    from alignsearch.storage import vectors

    root, ix = indexed_images(4)
    with alignsearch.open(ix) as engine:
        snap = engine.snapshot()
        rng = random.Random(3)
        for i in range(2):
            paint(root / f"added-{i}.png", rng)
        added = subprocess.run([sys.executable, "-m", "alignsearch", "index", str(root), *index_args_of(ix)],
                               capture_output=True, text=True, timeout=240, env=ENV)
        assert added.returncode == 0, added.stderr[-3000:]
        real, switched = vectors.holding, []

        def holding(conn, store, addresses, index_dir):
            if not switched:
                switched.append(subprocess.run([sys.executable, "-c", REINDEX_WITHOUT_FOLD, "index", "--reindex",
                                                "--no-compact", *index_args_of(ix)], capture_output=True, text=True,
                                               timeout=240, env=ENV))
            return real(conn, store, addresses, index_dir)

        monkeypatch.setattr(vectors, "holding", holding)
        query = np.random.default_rng(7).standard_normal(snap.store.dim).astype(np.float32)
        # the filter columns are read now: they hold the appended rows' addresses, the snapshot's store does not
        with pytest.raises(SnapshotMoved):
            engine.search_vector(query / np.linalg.norm(query), k=6, format="png", snapshot=snap)
        assert switched and switched[0].returncode == 0, switched[0].stderr[-3000:]
        monkeypatch.setattr(vectors, "holding", real)
        assert len(engine.search_vector(query / np.linalg.norm(query), k=6, format="png")) >= 2
