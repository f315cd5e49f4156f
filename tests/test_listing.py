"""A folder that cannot be listed deletes nothing: its rows stay, the run says so, the next listing reconciles."""

import errno
import json
import os
import shutil

import pytest

from conftest import index_json, make_images, run
from helpers import alignsearch, can_drop_dac, summary


def _fail_listing(monkeypatch, folder, error):
    real = os.scandir

    def scandir(path="."):
        if os.fspath(path) == str(folder):
            raise error
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)


def _relpaths(ix):
    return {h["relpath"] for h in json.loads(run("query", "x", "-k", "100", "--json", "--index", ix).stdout)["results"]}


@pytest.mark.parametrize("error", [PermissionError(errno.EACCES, "Permission denied"),
                                   OSError(errno.EIO, "Input/output error")], ids=["permission", "io"])
@pytest.mark.slow
def test_a_subfolder_that_cannot_be_listed_keeps_its_rows(tmp_path, tiny_model, monkeypatch, error):
    root, ix = tmp_path / "photos", tmp_path / "ix"
    make_images(root, 3)
    make_images(root / "sub", 2, seed=1)
    first = index_json(ix, root, "--model", tiny_model, "--device", "cpu", "--workers", "0")
    assert first["added"] == 5
    (root / "img000.png").unlink()  # a real removal elsewhere still counts

    _fail_listing(monkeypatch, root / "sub", error)
    s = index_json(ix, "--workers", "0")
    assert s["removed"] == 1 and s["added"] == 0
    assert [(e["folder"], e["root"]) for e in s["listing_errors"]] == [(str(root / "sub"), str(root))]
    assert error.strerror in s["listing_errors"][0]["reason"]
    assert {"sub/img000.png", "sub/img001.jpg"} <= _relpaths(ix)
    info = json.loads(run("info", "--failed", "--json", "--index", ix).stdout)
    assert info["listing_errors"] == s["listing_errors"]
    assert str(root / "sub") in run("info", "--failed", "--index", ix).output
    assert json.loads(run("roots", "--json", "--index", ix).stdout)[0]["state"] == "listing errors"

    monkeypatch.undo()  # the folder lists again: its changes are reconciled
    (root / "sub" / "img001.jpg").unlink()
    s = index_json(ix, "--workers", "0")
    assert s["removed"] == 1 and s["listing_errors"] == []
    assert json.loads(run("info", "--failed", "--json", "--index", ix).stdout)["listing_errors"] == []
    assert _relpaths(ix) == {"img001.jpg", "img002.jpg", "sub/img000.png"}


def test_a_root_that_is_missing_for_a_while_keeps_its_rows(tmp_path, tiny_model):
    root, ix = tmp_path / "photos", tmp_path / "ix"
    make_images(root, 3)
    index_json(ix, root, "--model", tiny_model, "--device", "cpu", "--workers", "0")
    root.rename(tmp_path / "away")  # an unmounted disk
    s = index_json(ix, "--workers", "0")
    assert (s["removed"], s["added"]) == (0, 0)
    assert s["listing_errors"][0]["root"] == str(root) and "missing" in s["listing_errors"][0]["reason"]
    assert s["kept"] == 3
    assert json.loads(run("roots", "--json", "--index", ix).stdout)[0]["state"] == "missing"
    assert len(_relpaths(ix)) == 3
    (tmp_path / "away").rename(root)
    s = index_json(ix, "--workers", "0")
    assert s["listing_errors"] == [] and s["unchanged"] == 3


@pytest.mark.skipif(not can_drop_dac(), reason="cannot start a process without root's permission bypass")
@pytest.mark.slow
def test_a_really_unreadable_folder_as_a_non_root_process(tmp_path, tiny_model):
    """End to end with the kernel saying no: chmod 000 and a process without CAP_DAC_OVERRIDE/READ_SEARCH."""
    root, ix = tmp_path / "photos", tmp_path / "ix"
    make_images(root, 2)
    make_images(root / "locked", 2, seed=1)
    first = summary(alignsearch("index", root, "--index", ix, "--model", tiny_model, "--device", "cpu", "--json",
                                unprivileged=True))
    assert first["added"] == 4
    os.chmod(root / "locked", 0)
    try:
        proc = alignsearch("index", "--index", ix, "--json", unprivileged=True)
        s = summary(proc)
        assert s["removed"] == 0 and s["listing_errors"][0]["folder"] == str(root / "locked")
        assert "Permission denied" in s["listing_errors"][0]["reason"]
        assert "could not be listed" in alignsearch("index", "--index", ix, unprivileged=True).stdout
    finally:
        os.chmod(root / "locked", 0o755)
    assert len(_relpaths(ix)) == 4
    shutil.rmtree(root / "locked")
    assert summary(alignsearch("index", "--index", ix, "--json", unprivileged=True))["removed"] == 2


@pytest.mark.skipif(not can_drop_dac(), reason="cannot start a process without root's permission bypass")
@pytest.mark.slow
def test_a_photo_made_readable_again_is_read_on_the_next_run(tmp_path, tiny_model):
    """A photo the indexer could not open (chmod 000) is a failure; while it stays unreadable the next runs
    leave it be, and once it is readable (a chmod changes neither size nor mtime) the next run indexes it.
    Before, it stayed failed until the file itself changed."""
    root, ix = tmp_path / "photos", tmp_path / "ix"
    photos = make_images(root, 3)
    os.chmod(photos[1], 0)
    try:
        first = summary(alignsearch("index", root, "--index", ix, "--model", tiny_model, "--device", "cpu", "--json",
                                    unprivileged=True))
        assert first["added"] + first["failed"] == 3 and first["failed"] == 1, first
        again = summary(alignsearch("index", "--index", ix, "--json", unprivileged=True))
        assert again["failed"] == 0 and again["updated"] == 0 and again["unchanged"] == 3, again  # not tried again
    finally:
        os.chmod(photos[1], 0o644)
    readable = summary(alignsearch("index", "--index", ix, "--json", unprivileged=True))
    assert readable["updated"] == 1 and readable["failed"] == 0, readable
    assert len(_relpaths(ix)) == 3 and run("info", "--index", ix, "--failed").output.count(photos[1].name) == 0
