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


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, tiny_model):
    """A first `index` run stopped as a terminal's Ctrl-C stops it: SIGINT to every process of the group, the
    decode workers included, while they decode (after the first committed batch).
    Returns (process, stderr, index folder, photos, the worker pids)."""
    tmp = tmp_path_factory.mktemp("interrupted")
    photos = tmp / "photos"
    smooth_photos(photos, 48, size=(1200, 900))
    proc = subprocess.Popen(
        [sys.executable, "-m", "alignsearch", "index", str(photos), "--index", str(tmp / "ix"), "--model",
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
    _, err = proc.communicate(timeout=60)
    return proc, "".join(lines) + err, tmp / "ix", photos, workers


@pytest.mark.slow
def test_ctrl_c_to_the_process_group_ends_quietly_with_130(interrupted):
    """One line, exit 130, no worker traceback, no worker left behind."""
    proc, err, _, _, workers = interrupted
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "SpawnPoolWorker" not in err and "KeyboardInterrupt" not in err, err
    assert [x for x in err.splitlines() if not x.startswith("indexing:")] == ["error: interrupted"], err
    time.sleep(0.5)
    assert not [p for p in workers if Path(f"/proc/{p}").exists() and "Z" not in Path(f"/proc/{p}/stat").read_text()]


# -- item 2: an interrupted first run is searchable ------------------------------------------------------------


@pytest.mark.slow
def test_interrupted_first_run_is_searchable_and_info_says_so(interrupted):
    """No ANN index was built: exact search over the committed vectors; `info` says the run was interrupted,
    and the next run finishes it."""
    import json

    import alignsearch

    proc, _, ix, photos, _ = interrupted
    info = json.loads(run("info", "--index", ix, "--json").output)
    assert info["last_run"] == "interrupted"
    assert 4 <= info["images"] < 48 and info["index"]["vectors"] == info["images"]
    assert "interrupted" in run("info", "--index", ix).output
    with alignsearch.open(ix) as engine:
        first = engine.file(1)
        hits = engine.search(image=first.path, k=3)
        assert hits[0].path == first.path and hits[0].score > 0.999
        assert len(engine.search(text="a photo", k=100)) == info["images"]
    out = run("query", "--image", first.path, "--index", ix, "-k", "2").output
    assert first.path in out.splitlines()[0]
    assert run("similar", "1", "--index", ix, "-k", "2").output.count("\n") == 2
    run("index", "--index", ix)
    info = json.loads(run("info", "--index", ix, "--json").output)
    assert info["last_run"] == "finished" and info["images"] == 48 and info["index"]["layout"] == "memory"


# -- item 3: the index folder is never a root, never listed -----------------------------------------------------


def test_the_index_folder_is_refused_as_a_root_and_never_listed(tmp_path, tiny_model):
    import json
    import shutil

    from conftest import make_images

    photos = tmp_path / "photos"
    make_images(photos, 3)
    ix = photos / "library-index"  # an index kept inside the library, not hidden
    run("index", photos, "--index", ix, "--model", tiny_model, "--device", "cpu", "--include-hidden")
    (ix / "thumbs").mkdir(exist_ok=True)  # what the server caches there
    shutil.copy(photos / "img001.jpg", ix / "thumbs" / "1.jpg")
    again = json.loads(run("index", "--index", ix, "--json").output)
    assert again["added"] == 0 and again["unchanged"] == 3
    for inside in (ix, ix / "thumbs"):
        out = run("index", inside, "--index", ix, code=6).output
        assert "index folder" in out and out.count("\n") == 1, out
    default = tmp_path / "lib"  # the default .alignsearch/, indexed from the folder that holds it
    make_images(default, 2)
    run("index", default, "--index", default / ".alignsearch", "--include-hidden", "--model", tiny_model,
        "--device", "cpu")
    (default / ".alignsearch" / "thumbs").mkdir(exist_ok=True)
    shutil.copy(default / "img001.jpg", default / ".alignsearch" / "thumbs" / "1.jpg")
    assert json.loads(run("index", "--index", default / ".alignsearch", "--json").output)["added"] == 0
    run("index", default / ".alignsearch", "--index", default / ".alignsearch", code=6)


# -- item 4: export --root resolves roots as forget does ----------------------------------------------------------


def test_export_root_is_resolved_like_forget_and_an_unknown_one_refused(tmp_path, tiny_model, monkeypatch):
    import json

    import pyarrow.parquet as pq

    from conftest import make_images

    make_images(tmp_path / "photos", 3)
    make_images(tmp_path / "other", 2, seed=1)
    ix = tmp_path / "ix"
    run("index", tmp_path / "photos", tmp_path / "other", "--index", ix, "--model", tiny_model, "--device", "cpu")
    monkeypatch.chdir(tmp_path)
    for given in ("./photos", "photos/", str(tmp_path / "photos")):
        done = json.loads(run("export", f"out-{len(given)}.parquet", "--root", given, "--index", ix, "--json").output)
        assert done["rows"] == 3, given
        assert pq.read_table(done["path"]).num_rows == 3
    out = run("export", "none.parquet", "--root", "./elsewhere", "--index", ix, code=6).output
    assert "not a root of this index" in out and not (tmp_path / "none.parquet").exists()
    out = run("export", "-", "--index", ix, code=2).output
    assert "standard output" in out and not (tmp_path / "-").exists()
