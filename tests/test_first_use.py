"""Issue 24, "First use": what a new user met (Ctrl-C, an interrupted first run, the index folder as a root,
export's roots, the server against the CLI, stale server records, small lies, waits, colour in near
duplicates, decode memory, a writer holding the catalog)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import run
from helpers import smooth_photos

CHILD_ENV = {"HF_HUB_OFFLINE": "1", "ALIGNSEARCH_PROGRESS_SECONDS": "0"}


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


# -- item 1: Ctrl-C during `index` with decode workers -------------------------------------------------------


@pytest.mark.slow
def test_ctrl_c_to_the_process_group_ends_quietly_with_130(tmp_path, tiny_model):
    """What a terminal does on Ctrl-C: SIGINT to every process of the group, the decode workers included,
    while they decode. One line, exit 130, no worker traceback, no worker left behind."""
    photos = tmp_path / "photos"
    smooth_photos(photos, 48, size=(1200, 900))
    proc = subprocess.Popen(
        [sys.executable, "-m", "alignsearch", "index", str(photos), "--index", str(tmp_path / "ix"), "--model",
         str(tiny_model), "--device", "cpu", "--workers", "2", "--batch-size", "4"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, **CHILD_ENV})
    lines = []
    for line in proc.stderr:  # the first committed batch: workers are up and decoding the next ones
        lines.append(line)
        if line.startswith("indexing:"):
            break
    workers = _children(proc.pid)
    assert proc.poll() is None and workers, "".join(lines)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    err = "".join(lines) + err
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "SpawnPoolWorker" not in err and "KeyboardInterrupt" not in err, err
    assert [x for x in err.splitlines() if not x.startswith("indexing:")] == ["error: interrupted"], err
    time.sleep(0.5)
    assert not [p for p in workers if Path(f"/proc/{p}").exists() and "Z" not in Path(f"/proc/{p}/stat").read_text()]
