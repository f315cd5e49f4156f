"""Attacks on the Ray path (`alignsearch index --ray`, indexer/ray_pipeline.py): a folder of bad files, a decode that
raises in a task, one that kills its actor every time, and the driver stopped part way by Ctrl-C, SIGTERM or an
error. Each must end as the local path does: the same catalog and answers, one line for a failure, the index as its
last commit left it, and the run always ends.

A local Ray costs seconds to start on two cores: the in-process tests share one (module-scoped); the tests of a
stopped driver run the command as a user does, with a Ray instance of its own."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

import alignsearch
from conftest import make_images, run

ray = pytest.importorskip("ray")

pytestmark = [pytest.mark.ray, pytest.mark.slow]

TESTS = Path(__file__).resolve().parent
POISON, KILLER = "poison.jpg", "killer.jpg"  # the actor's decode raises on the one, dies on the other


@pytest.fixture(scope="module")
def local_ray():
    """One local 2-CPU Ray for the in-process tests; its workers import this module (the decode that raises)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {
        "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent)])}})
    yield
    ray.shutdown()


@pytest.fixture
def sigint_kept():
    """An in-process run stopped by Ctrl-C ignores SIGINT from then on (surfaces/cli.py): pytest's is put back."""
    before = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, before)


def mixed_folder(root: Path) -> Path:
    """Good JPEGs and PNGs, a truncated JPEG, an empty file, a FIFO, text named .png, a copy and a link."""
    paths = make_images(root, 9)
    data = paths[1].read_bytes()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "empty.jpg").write_bytes(b"")
    os.mkfifo(root / "fifo.jpg")
    (root / "text.png").write_bytes(b"not an image at all")
    (root / "copy.jpg").write_bytes(paths[2].read_bytes())
    (root / "sub").mkdir()
    os.symlink(paths[3], root / "sub" / "link.png")
    return root


def ray_run(ix, root, tiny_model, code=0):
    result = run("index", root, "--index", ix, "--model", tiny_model, "--device", "cpu", "--batch-size", "4",
                 "--ray", "--json", code=code)
    return result


def summary_of(result) -> dict:
    out = result.stdout
    return json.loads(out[out.index('{\n  "index_dir"'):])  # Ray's raylet may report a worker's death on stdout too


def answers(ix) -> tuple[list, list]:
    with alignsearch.open(ix) as engine:
        failed = sorted((r.relpath, r.reason) for r in engine.failed())
        hits = [(h.relpath, round(h.score, 3), h.format, h.width, h.height) for h in engine.search(text="red", k=50)]
    assert [h[1] for h in hits] == sorted((h[1] for h in hits), reverse=True)
    # compared to 3 places: a copy's bytes encoded in another batch (a Ray actor's, the local run's) may store a
    # vector a last fp16 bit apart, so two copies equal to 3 places may come in either order; equal vectors come
    # by name (settle_ties), checked in test_engine
    return failed, sorted(hits, key=lambda h: (-h[1], h[0]))


def problems(ix) -> list[str]:
    from indexer.verify import verify

    return verify(ix, check_model=False).problems


def test_a_mixed_folder_indexes_as_the_local_path_does(local_ray, tmp_path, tiny_model):
    root = mixed_folder(tmp_path / "photos")
    on_ray = summary_of(ray_run(tmp_path / "ray", root, tiny_model))
    local = json.loads(run("index", root, "--index", tmp_path / "local", "--model", tiny_model, "--device", "cpu",
                           "--batch-size", "4", "--json").stdout)
    for key in ("added", "failed", "removed", "updated", "moved"):
        assert on_ray[key] == local[key], (key, on_ray, local)
    assert (on_ray["added"], on_ray["failed"]) == (11, 4)
    ray_failed, ray_hits = answers(tmp_path / "ray")
    assert [name for name, _ in ray_failed] == ["empty.jpg", "fifo.jpg", "text.png", "truncated.jpg"]
    assert (ray_failed, ray_hits) == answers(tmp_path / "local")
    assert problems(tmp_path / "ray") == []


class Poisoned:
    """The encoder actor, except that a batch holding POISON fails there as a codec's fault would: by raising
    (a bug), or by killing the actor's process (a crash, the OOM killer)."""

    def __init__(self, encoder, segments, token, **decode):
        from indexer.ray_pipeline import EncoderActor

        self.inner = EncoderActor(encoder, segments, token, **decode)

    def __call__(self, batch):
        names = [str(name) for name in batch["relpath"]]
        if KILLER in names:
            os._exit(1)
        if POISON in names:
            raise RuntimeError("a codec's bug")
        return self.inner(batch)


def poisoned_folder(root: Path, name: str) -> Path:
    make_images(root, 12)
    (root / name).write_bytes((root / "img001.jpg").read_bytes())
    return root


def only_allowed(found: list[str]) -> list[str]:
    """verify's problems other than those of any run stopped part way, local or on Ray: its catalog rows are
    committed, its ANN index is built at the end (`info` says the run was interrupted; the next run builds it)."""
    return [p for p in found if "missing from the ANN index" not in p and "index.faiss is missing" not in p]


def finished_by_a_plain_run(ix, root, total: int) -> None:
    done = json.loads(run("index", root, "--index", ix, "--device", "cpu", "--workers", "0", "--json").stdout)
    assert done["failed"] == 0, done
    assert problems(ix) == []
    with alignsearch.open(ix) as engine:
        assert engine.info()["images"] == total
        hits = engine.search(text="x", k=total)
        assert sorted(h.relpath for h in hits) == sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_a_decode_that_raises_in_a_task_stops_the_run_in_one_line_as_locally(local_ray, tmp_path, tiny_model,
                                                                              monkeypatch):
    """A decode that raises (not a file it cannot read: a bug) stops the local run with its one line; on Ray the
    task's error came back as Ray's whole report (the remote traceback, terminal colour codes) in that line."""
    import indexer.ray_pipeline as ray_pipeline

    root = poisoned_folder(tmp_path / "photos", POISON)
    monkeypatch.setattr(ray_pipeline, "EncoderActor", Poisoned)
    failed = ray_run(tmp_path / "ix", root, tiny_model, code=1)
    said = [line for line in failed.output.splitlines() if line.startswith("error:")]
    assert len(said) == 1 and "RuntimeError: a codec's bug" in said[0], failed.output[-3000:]
    assert "Traceback" not in failed.output and "\\x1b" not in said[0] and len(said[0]) < 400, said
    assert only_allowed(problems(tmp_path / "ix")) == []
    monkeypatch.undo()
    finished_by_a_plain_run(tmp_path / "ix", root, 13)


def test_a_run_stopped_after_its_actors_ran_ahead_leaves_only_what_was_committed(local_ray, tmp_path, tiny_model,
                                                                                 monkeypatch, sigint_kept):
    """Ray Data's actors encode and store batches ahead of the driver's commits: stopped part way (here Ctrl-C once
    the actors have stored every batch and the driver committed one), the rows no commit lists were left in the
    actor's segment, and `verify` called the index inconsistent ("uncommitted bytes") until the next run."""
    import indexer.ray_pipeline as ray_pipeline

    real = ray_pipeline.stream

    def stopped_after_one(ds, store, batch_size, extra):
        batches = real(ds, store, batch_size, extra)
        yield next(batches)  # committed by the driver
        for _ in batches:  # the actors go on: every batch encoded and stored, none committed
            pass
        raise KeyboardInterrupt

    root = tmp_path / "photos"
    make_images(root, 8)
    monkeypatch.setattr(ray_pipeline, "stream", stopped_after_one)
    stopped = ray_run(tmp_path / "ix", root, tiny_model, code=130)
    assert "error: interrupted" in stopped.output
    with alignsearch.open(tmp_path / "ix") as engine:
        assert engine.info()["images"] == 4
        for n in engine.store.numbers():  # each file holds its committed rows, no more
            assert engine.store.segment_path(n).stat().st_size == engine.store.committed(n) * engine.store.row_bytes
        assert not engine.store.unknown_files()
    assert only_allowed(problems(tmp_path / "ix")) == []
    monkeypatch.undo()
    finished_by_a_plain_run(tmp_path / "ix", root, 8)


def _rows(ix: Path) -> int:
    try:
        with sqlite3.connect(f"file:{ix / 'catalog.db'}?mode=ro", uri=True) as conn:
            return conn.execute("select count(*) from files").fetchone()[0]
    except sqlite3.Error:  # not made yet, or mid-migration
        return 0


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_the_driver_stopped_mid_run_leaves_the_index_as_committed(tmp_path, tiny_model, how):
    """`alignsearch index --ray` with a Ray of its own, stopped once it committed a batch: by a terminal's Ctrl-C
    (SIGINT to the whole process group) it says so in one line and exits 130; by SIGTERM to the driver it ends
    by the signal, as a local run does (it printed Ray's C++ stack dump and tracebacks from Ray Data's threads,
    and ended aborted, exit -6). Either way no Ray process is left, the index holds what was committed (nothing
    past it), and the next run finishes it."""
    root = tmp_path / "photos"
    make_images(root, 8)
    ix = tmp_path / "ix"
    run("index", root, "--index", ix, "--model", tiny_model, "--device", "cpu", "--workers", "0")
    make_images(root / "more", 72, seed=5)
    proc = subprocess.Popen([sys.executable, "-m", "alignsearch", "index", root, "--index", ix, "--device", "cpu",
                             "--batch-size", "4", "--ray"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, start_new_session=True)
    deadline = time.monotonic() + 300
    while _rows(ix) <= 8 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1][-3000:]  # still running: stopped part way
    if how == "ctrl-c":
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    if how == "ctrl-c":
        assert proc.returncode == 130 and "error: interrupted" in err, (proc.returncode, err[-3000:])
    else:
        assert proc.returncode == -signal.SIGTERM, (proc.returncode, err[-3000:])
        assert "SIGTERM received" not in err, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    for _ in range(100):  # the local Ray's processes end with it
        left = subprocess.run(["pgrep", "-s", str(proc.pid)], capture_output=True, text=True).stdout.split()
        if not left:
            break
        time.sleep(0.1)
    assert not left, subprocess.run(["ps", "-o", "pid,args", "-s", str(proc.pid)], capture_output=True, text=True).stdout
    assert 8 < _rows(ix) < 80
    assert only_allowed(problems(ix)) == []
    finished_by_a_plain_run(ix, root, 80)


def test_a_batch_that_kills_its_actor_every_time_ends_the_run(local_ray, tmp_path, tiny_model, monkeypatch):
    """A file that crashes its decoder (a codec's fault, the OOM killer) kills the actor that holds its batch: Ray
    Data started the actor again and retried the batch forever, so `index --ray` never ended (the local path gives
    the file up after two deaths). Now the batch is given up after a few: one line, exit 1, what was committed
    kept and nothing past it."""
    import indexer.ray_pipeline as ray_pipeline

    root = poisoned_folder(tmp_path / "photos", KILLER)
    monkeypatch.setattr(ray_pipeline, "EncoderActor", Poisoned)
    failed = ray_run(tmp_path / "ix", root, tiny_model, code=1)
    said = [line for line in failed.output.splitlines() if line.startswith("error:")]
    assert len(said) == 1 and "died on the same batch 3 times" in said[0], failed.output[-3000:]
    assert only_allowed(problems(tmp_path / "ix")) == []
    monkeypatch.undo()
    finished_by_a_plain_run(tmp_path / "ix", root, 13)
