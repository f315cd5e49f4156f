"""Attacks on video moments and on the text read in images, as a demanding user makes them: files changed while
`index` reads them, damaged and disguised videos, absurd timestamps, hostile OCR text and keyword syntax."""

import hashlib
import os
import shutil
import sqlite3

import pytest
from conftest import run
from helpers import make_video
from PIL import Image

from alignsearch.media.images import ImageSpec

SPEC = ImageSpec((64, 64), Image.BICUBIC, None, 1 / 255, False, None, None, None)


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


@pytest.mark.slow
def test_a_damaged_stretch_mid_video_costs_its_own_moments_not_the_rest(tmp_path):
    """2,000 bytes overwritten halfway through a 12 s video of four scenes (a bad sector, a hole a broken download
    left): decoding stopped at the first packet the decoder refused ("decoding stopped at 5.8 s") and the scenes
    after it were lost, as if the file ended there. The damaged packets are passed over; the moments after them are
    kept, and the video's note says what was skipped."""
    from alignsearch.media.video import VideoInfo, frame_at, moments

    data = bytearray(make_video(tmp_path / "whole.mp4", [(1, 3), (2, 3), (3, 3), (4, 3)]).read_bytes())
    data[len(data) // 2:len(data) // 2 + 2000] = b"\xff" * 2000
    (tmp_path / "damaged.mp4").write_bytes(bytes(data))
    info = VideoInfo()
    found = list(moments(str(tmp_path / "damaged.mp4"), SPEC, info))
    # the moments run to the end, a new one after the damage (where the cut at 6 s was lost): [(0, 3), (3, 5.8)] before
    assert len(found) >= 3 and found[-1].t > 6 and found[-1].t_end > 11.5, [(m.t, m.t_end) for m in found]
    assert info.duration > 11.5, info.duration
    assert info.truncated is None and "damaged" in (info.damaged or ""), (info.truncated, info.damaged)
    # and the web page's picture of each (frame_at) is there too: the one after the damage answered 404
    for m in found:
        assert frame_at(str(tmp_path / "damaged.mp4"), m.t, m.t_end).size == (160, 90)
