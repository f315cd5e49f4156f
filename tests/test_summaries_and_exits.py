"""Honest `index` summaries and clean exits: failures counted apart, nothing-changed and no-images said,
a closed pipe is quiet, a damaged catalog is one line with its exit code."""

import subprocess
import sys

import pytest

from conftest import index_json, make_images, run
from helpers import alignsearch


def test_failed_files_are_not_counted_as_added(tmp_path, tiny_model):
    root, ix = tmp_path / "photos", tmp_path / "ix"
    make_images(root, 3)
    (root / "broken.jpg").write_bytes(b"not an image")
    s = index_json(ix, root, "--model", tiny_model, "--device", "cpu", "--workers", "0")
    assert (s["added"], s["failed"], s["updated"]) == (3, 1, 0)
    (root / "img001.jpg").write_bytes(b"now broken too")  # a changed file that fails: failed, not updated
    s = index_json(ix, "--workers", "0")
    assert (s["added"], s["updated"], s["failed"], s["removed"]) == (0, 0, 1, 0)


def test_a_run_that_changed_nothing_says_so(indexed_images):
    root, ix = indexed_images(2)
    out = run("index", "--index", ix).output
    assert "nothing changed" in out and "2 unchanged" in out


def test_an_empty_folder_says_no_images_found(tmp_path, tiny_model):
    empty, ix = tmp_path / "empty", tmp_path / "ix"
    empty.mkdir()
    (empty / "notes.txt").write_text("no pictures here")
    out = run("index", empty, "--index", ix, "--model", tiny_model, "--device", "cpu").output
    assert "no images found" in out
    s = index_json(ix)
    assert s["added"] == 0 and s["no_images"] == [str(empty)]


@pytest.mark.slow
def test_query_into_a_closed_pipe_exits_quietly(indexed_images):
    root, ix = indexed_images(30)
    cmd = f"{sys.executable} -m alignsearch query x -k 30 --index {ix} | head -1; exit ${{PIPESTATUS[0]}}"
    proc = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stderr == "" and proc.stdout.startswith("  1.")
    # the reader gone before the first line: still no traceback
    child = subprocess.Popen([sys.executable, "-m", "alignsearch", "query", "x", "-k", "30", "--index", str(ix)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    child.stdout.close()
    err = child.stderr.read().decode()
    assert child.wait(timeout=300) == 0 and err == "", err


@pytest.mark.slow
def test_a_damaged_catalog_is_one_line_and_exit_7(tmp_path, tiny_model):
    ix = tmp_path / "ix"
    ix.mkdir()
    (ix / "catalog.db").write_bytes(b"this is not a database at all" * 100)
    for args in (["info"], ["query", "x"], ["index", tmp_path]):
        proc = alignsearch(*args, "--index", ix)
        assert proc.returncode == 7, proc.stderr
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr and "not a database" in proc.stderr
    # the refused `index` left the folder as it was: it was narrowed (indexer/privacy.py) before the catalog was read,
    # and a notice line came before the error
    assert ix.stat().st_mode & 0o777 == 0o755
