"""Attacks on video moments and on the text read in images, as a demanding user makes them: files changed while
`index` reads them, damaged and disguised videos, absurd timestamps, hostile OCR text and keyword syntax."""

import hashlib
import os
import shutil
import sqlite3

import pytest
from conftest import run
from helpers import make_video, same_size_other_content
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


@pytest.mark.slow
def test_a_library_of_broken_and_disguised_videos_indexes_and_answers_without_a_traceback(tmp_path, tiny_model):
    """A zero-byte .mp4, one holding audio alone, a video named .jpg, a photo named .mp4, a video of one frame,
    one whose timestamps start negative and jump by a million seconds, one truncated to its first 200 bytes: the
    run ends (exit 0), the photo and the good video keep their rows, each bad file is failed with a one-line
    reason and counted once by `info`; searches and the removal of a video answer without a traceback."""
    import json

    from helpers import make_audio_only, make_stamped_video, scene_frame

    lib, ix = tmp_path / "lib", tmp_path / "ix"
    good = make_video(lib / "good.mp4", [(1, 3), (2, 3)])
    Image.fromarray(scene_frame(9)).save(lib / "photo.jpg")
    (lib / "zero.mp4").write_bytes(b"")
    (lib / "head.mp4").write_bytes(good.read_bytes()[:200])
    make_audio_only(lib / "audio.mp4")
    shutil.copy(good, lib / "video.jpg")
    Image.fromarray(scene_frame(10)).save(lib / "photo.mp4", format="JPEG")
    make_video(lib / "one.mp4", [(3, 0.1)])
    make_stamped_video(lib / "stamps.mkv", [-50, -40, 1, 10**7, 10**7 + 1, 3 * 10**7])
    s = json.loads(run("index", lib, "--index", ix, "--model", tiny_model, "--device", "cpu", "--json").stdout)
    assert (s["added"], s["failed"]) == (5, 4), s
    failed = run("info", "--failed", "--index", ix).output
    for name, why in [("zero.mp4", "cannot read video"), ("head.mp4", "cannot read video"),
                      ("audio.mp4", "not a video: no video stream"), ("video.jpg", "not an image alignsearch reads")]:
        line = next(x for x in failed.splitlines() if f"/{name}:" in x)
        assert why in line, failed
    info = json.loads(run("info", "--json", "--index", ix).stdout)
    assert (info["images"], info["failed"]) == (5, 4), info
    with sqlite3.connect(ix / "catalog.db") as conn:
        stamps = [t for (t,) in conn.execute("SELECT t FROM files WHERE relpath = 'stamps.mkv' ORDER BY moment")]
    assert stamps[0] == 0 and stamps == sorted(stamps) and len(stamps) >= 2, stamps  # time never runs backwards
    for args in (["--media", "video"], ["--mode", "keyword"], ["--mode", "hybrid"], ["--where", "t >= 3600"]):
        hits = json.loads(run("query", "--index", ix, "--json", "-k", "20", *args, "--", "stamps OR good").stdout)
        assert all(h["t"] is None or h["t"] >= 0 for h in hits["results"]), hits
    (lib / "good.mp4").unlink()  # gone between index and query: still listed, never a traceback
    out = run("query", "--index", ix, "-k", "20", "--media", "video", "good").output
    assert "good.mp4 @ 0:0" in out and "Traceback" not in out, out


@pytest.mark.slow
def test_a_video_is_served_with_the_type_its_content_has_never_its_names(tmp_path, tiny_model):
    """`serve` chose a video's Content-Type from its file name: a JPEG named .mp4 (which FFmpeg reads as a video of
    one frame, so it is indexed as one) was sent as video/mp4, a Matroska file named .mp4 as MP4, an MP4 named .mov
    as QuickTime. The type comes from the container's own signature; content that is no video container a browser
    plays is not served as a video at all (its moment's picture still is, at /api/image)."""
    import struct

    from helpers import call, make_fragmented_mp4, scene_frame, start_serve, stop

    lib, ix = tmp_path / "lib", tmp_path / "ix"
    lib.mkdir()
    shutil.copy(make_video(tmp_path / "m.mkv", [(1, 2)]), lib / "matroska.mp4")
    shutil.copy(make_video(tmp_path / "i.mp4", [(2, 2)]), lib / "mp4.mov")
    shutil.copy(make_video(tmp_path / "q.mov", [(3, 2)]), lib / "quicktime.webm")
    Image.fromarray(scene_frame(4)).save(lib / "photo.mp4", format="JPEG")
    # an MP4 behind a 4 KiB uuid box (XMP): its ftyp lies past the first bytes read, and it was refused (404)
    (lib / "xmp.mp4").write_bytes(struct.pack(">I", 4096) + b"uuid" + bytes(4088) +
                                  make_fragmented_mp4(tmp_path / "frag.mp4").read_bytes())
    run("index", lib, "--index", ix, "--model", tiny_model, "--device", "cpu")
    with sqlite3.connect(ix / "catalog.db") as conn:
        ids = dict(conn.execute("SELECT relpath, id FROM files WHERE status = 'indexed' AND moment = 0"))
    assert set(ids) == {"matroska.mp4", "mp4.mov", "quicktime.webm", "photo.mp4", "xmp.mp4"}, ids  # each read by its content
    proc, url = start_serve(ix, "--token", "s3cret")
    try:
        for name, wanted in (("matroska.mp4", "video/x-matroska"), ("mp4.mov", "video/mp4"),
                             ("quicktime.webm", "video/quicktime"), ("xmp.mp4", "video/mp4")):
            status, headers, body = call(url, f"/api/video/{ids[name]}")
            assert (status, headers["Content-Type"]) == (200, wanted), (name, status, headers["Content-Type"])
            assert body == (lib / name).read_bytes() and headers["X-Content-Type-Options"] == "nosniff"
        status, headers, body = call(url, f"/api/video/{ids['photo.mp4']}")
        assert status == 404 and not headers["Content-Type"].startswith(("video/", "image/")), (status, headers)
        assert (lib / "photo.mp4").read_bytes()[:64] not in body and b"not a video" in body, body[:300]
        assert headers["X-Content-Type-Options"] == "nosniff"
        status, headers, _ = call(url, f"/api/image/{ids['photo.mp4']}?size=64")  # the moment's picture: a JPEG drawn
        assert (status, headers["Content-Type"]) == (200, "image/jpeg")
    finally:
        stop(proc)


@pytest.mark.slow
def test_reindex_reads_a_video_with_the_same_identity_check_as_an_index_run(tmp_path, tiny_model, other_model,
                                                                             monkeypatch):
    """`index --reindex` read each video again with no hash and no identity check: a video replaced (same size and
    mtime, as a sync leaves them) between two runs, or while the re-encode read it, had the new content's moments'
    vectors recorded under the old content's SHA-256, and as size and mtime matched, no later run read it again.
    It goes through the index run's check now: hashed (the recorded hash must match), then decoded from the file
    hashed; one that changed gets no vectors (failed, `cannot read`, so read again by the run that follows)."""
    from indexer import videos

    lib, ix = tmp_path / "lib", tmp_path / "ix"
    old = make_video(lib / "a.mp4", [(1, 3), (2, 3)])
    shutil.copy(old, lib / "b.mp4")
    run("index", lib, "--index", ix, "--model", tiny_model, "--device", "cpu", "--workers", "0")
    assert {r[0] for name in ("a.mp4", "b.mp4") for r in _rows(ix, name)} == {"indexed"}
    same_size_other_content(old, lib / "b.mp4")  # between the runs
    real, swapped = videos.decode_moments, []

    def swap_then_decode(found, *args):  # a.mp4 replaced after the re-encode hashed it, before it is decoded
        if found.relpath == "a.mp4" and not swapped:
            swapped.append(found.relpath)
            same_size_other_content(lib / "a.mp4", lib / "a.mp4")
        return real(found, *args)

    monkeypatch.setattr(videos, "decode_moments", swap_then_decode)
    run("index", "--reindex", "--index", ix, "--model", other_model, "--device", "cpu", "--workers", "0")
    assert swapped == ["a.mp4"]
    for name in ("a.mp4", "b.mp4"):
        rows = _rows(ix, name)
        # never the old content's hash over what the file holds now: read again for what it is
        assert rows and all(r[0] == "indexed" and r[1] == _sha(lib / name) for r in rows), (name, rows)
    assert run("verify", "--index", ix).exit_code == 0
