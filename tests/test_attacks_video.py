"""Attacks on video moments and on the text read in images, as a demanding user makes them: files changed while
`index` reads them, damaged and disguised videos, absurd timestamps, hostile OCR text and keyword syntax."""

import hashlib
import os
import shutil
import sqlite3

import pytest
from conftest import run
from helpers import make_video


def _rows(ix, relpath):
    with sqlite3.connect(ix / "catalog.db") as conn:
        return conn.execute("SELECT status, sha256, moment, t, reason FROM files WHERE relpath = ? ORDER BY moment",
                            (relpath,)).fetchall()


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_a_video_replaced_between_its_hash_and_its_decode_never_lends_its_moments_to_the_old_content(
        tmp_path, tiny_model, monkeypatch):
    """The video pass hashes a file, then opens it again to decode it. A video replaced in between (an editor's
    export, a sync) was recorded with the old content's SHA-256 and the new content's moments; a copy of the old
    content indexed later took those moments by hash, and kept them after the replaced file was read again."""
    from indexer import videos

    lib, ix = tmp_path / "lib", tmp_path / "ix"
    old = make_video(tmp_path / "old.mp4", [(1, 3), (2, 3)])  # two moments: 0 and 3 s
    new = make_video(tmp_path / "new.mp4", [(5, 2), (6, 2), (7, 2)])  # three: 0, 2 and 4 s
    lib.mkdir()
    shutil.copy(old, lib / "a.mp4")
    real = videos._sha256

    def hash_then_replace(found):
        digest = real(found)
        if found.relpath == "a.mp4":
            shutil.copy(new, lib / "a.part")
            os.replace(lib / "a.part", lib / "a.mp4")  # as an export or a sync puts a new version in place
        return digest

    monkeypatch.setattr(videos, "_sha256", hash_then_replace)
    run("index", lib, "--index", ix, "--model", tiny_model, "--device", "cpu", "--workers", "0")
    monkeypatch.setattr(videos, "_sha256", real)
    rows = _rows(ix, "a.mp4")
    # never the old content's hash over the new content's moments: the video is left for the next run
    assert not any(r[1] == _sha(old) and r[0] == "indexed" for r in rows), rows
    assert [r[0] for r in rows] == ["failed"] and "changed while it was read" in rows[0][4], rows

    # a copy of the old content is read for what it is (two moments), not given the other video's three
    shutil.copy(old, lib / "c.mp4")
    run("index", lib, "--index", ix, "--model", tiny_model, "--device", "cpu", "--workers", "0")
    assert [(r[0], r[1], r[2]) for r in _rows(ix, "c.mp4")] == [("indexed", _sha(old), 0), ("indexed", _sha(old), 1)]
    assert [(r[0], r[1]) for r in _rows(ix, "a.mp4")] == [("indexed", _sha(new))] * 3
