"""Issue 24 #16: decode workers that die are noticed within seconds, never waited for."""

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import make_images
from helpers import child_pids, decode_or_die, summary

from indexer.workers import DIED, decode_in_processes


@pytest.mark.slow  # 8 s: spawned pools, started again after each death
def test_a_worker_that_dies_fails_only_its_item_and_the_run_goes_on(tmp_path):
    items = [f"f{i}" for i in range(30)]
    items[7] = "die"  # kills every worker that reads it
    items[20] = f"die-once:{tmp_path / 'marker'}"  # kills one worker, then decodes
    started = time.monotonic()
    out = list(decode_in_processes(decode_or_die, items, 3, lambda item, reason: ("failed", item, reason)))
    assert time.monotonic() - started < 60
    assert out[7] == ("failed", "die", DIED)
    assert out[20] == items[20].upper()
    assert [o for i, o in enumerate(out) if i not in (7, 20)] == [x.upper() for i, x in enumerate(items) if i not in (7, 20)]


@pytest.mark.slow  # 8 s: spawned pools, started again after each death
def test_an_item_that_never_ran_before_a_pool_died_is_not_failed_for_one_death(tmp_path):
    """A pool's death blames no item for sure: here "die" kills the one worker before "die-once" ever ran, so
    die-once's first death happens alone. It fails only after a second death alone (flaky under load before:
    whether it had run in the pool depended on timing)."""
    items = ["die", f"die-once:{tmp_path / 'marker'}", "ok"]
    out = list(decode_in_processes(decode_or_die, items, 1, lambda item, reason: ("failed", item, reason)))
    assert out == [("failed", "die", DIED), items[1].upper(), "OK"]


def test_every_worker_starts_with_ctrl_c_ignored(monkeypatch):
    """A spawn pool starts its workers one submit at a time: those started after the first were started with
    SIGINT at its default, so a Ctrl-C while one imported printed its traceback (seen in a CI run). Every
    worker must start while this process ignores SIGINT."""
    import multiprocessing.context
    import signal

    seen = []
    real_start = multiprocessing.context.SpawnProcess.start

    def start(self):
        seen.append(signal.getsignal(signal.SIGINT))
        return real_start(self)

    monkeypatch.setattr(multiprocessing.context.SpawnProcess, "start", start)
    items = [f"f{i}" for i in range(24)]
    assert list(decode_in_processes(decode_or_die, items, 3, lambda item, reason: None)) == [x.upper() for x in items]
    assert len(seen) == 3 and all(s == signal.SIG_IGN for s in seen), seen


@pytest.mark.slow
def test_index_survives_a_decode_worker_killed_mid_task(tmp_path, tiny_model):
    """SIGKILL a busy decode worker of a real `index` run (what the OOM killer does): Pool.imap waited
    forever for the lost task, holding the writer lock; now the run finishes with every image indexed."""
    from PIL import Image

    root, ix = tmp_path / "photos", tmp_path / "ix"
    make_images(root, 6)
    for i in range(10):  # slow to decode, tiny on disk: each keeps a worker busy for a while
        Image.new("RGB", (7000, 7000), (i * 20, 100, 200)).save(root / f"big{i}.png")
    proc = subprocess.Popen([sys.executable, "-m", "alignsearch", "index", str(root), "--index", str(ix), "--model",
                             str(tiny_model), "--device", "cpu", "--workers", "2", "--batch-size", "2", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    killed, deadline = None, time.monotonic() + 120
    while killed is None and time.monotonic() < deadline and proc.poll() is None:
        for child in child_pids(proc.pid):
            if _cpu_ticks(child) > 50:  # a worker that has been decoding for half a second
                os.kill(child, signal.SIGKILL)
                killed = child
                break
        time.sleep(0.05)
    assert killed is not None, "no busy decode worker was seen"
    try:
        out, err = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("index hung after its decode worker was killed")
    result = summary(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    assert result["added"] == 16 and result["failed"] == 0, result


def _cpu_ticks(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime
    except OSError:
        return 0


def test_workers_that_cannot_start_fail_fast():
    """A worker process that cannot start (here: its interpreter exits at once) is an error within seconds;
    multiprocessing.Pool restarted such workers for minutes."""
    import multiprocessing
    from multiprocessing import spawn

    from indexer.workers import WorkersCannotStart

    ctx, real = multiprocessing.get_context("spawn"), spawn.get_executable()
    ctx.set_executable("/bin/false")
    started = time.monotonic()
    try:
        with pytest.raises(WorkersCannotStart, match="--workers 0"):
            list(decode_in_processes(decode_or_die, ["a", "b"], 2, lambda item, reason: None))
    finally:
        ctx.set_executable(real)
    assert time.monotonic() - started < 30
