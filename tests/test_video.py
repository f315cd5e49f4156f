"""Videos as moments (alignsearch/media/video.py, indexer/videos.py): scene cuts and the interval found at the right
times, results with t/t_end, per-video caps, the media filter, incremental runs, failures and the schema upgrade.
Every video is generated here with PyAV."""

import io
import itertools
import json
import math
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import index_json, make_images, run
from helpers import (
    alignsearch_peak_rss,
    call,
    frame_number,
    make_numbered_video,
    make_video,
    scene_frame,
    start_serve,
    stop,
    summary,
)
from PIL import Image

import alignsearch
from alignsearch.storage import catalog, migrate
from alignsearch.media.images import ImageSpec
from alignsearch.media import video as video_module
from alignsearch.media.video import VideoError, VideoInfo, frame_at, moments

SPEC = ImageSpec((64, 64), Image.BICUBIC, None, 1 / 255, False, None, None, None)
SCENES = [(1, 3), (2, 4.5), (3, 25), (4, 2)]  # cuts at 3, 7.5 and 32.5 s; 34.5 s long
SAMPLE = 0.3  # a cut is found at the first examined frame after it (every 0.25 s; a skipped frame or two more)


def starts(found):
    return [m.t for m in found]


@pytest.mark.slow
def test_moments_at_cuts_and_every_interval(tmp_path):
    video = make_video(tmp_path / "a.mp4", SCENES)
    info = VideoInfo()
    found = list(moments(str(video), SPEC, info))
    # cuts at 3 and 7.5, the 25 s scene split every 10 s (17.5, 27.5), the cut at 32.5
    assert np.allclose(starts(found), [0, 3, 7.5, 17.5, 27.5, 32.5], atol=SAMPLE), starts(found)
    assert [m.t_end for m in found[:-1]] == starts(found)[1:]
    assert found[-1].t_end == pytest.approx(34.5, abs=0.15)
    assert (info.width, info.height) == (160, 90) and info.duration == pytest.approx(34.5, abs=0.15)
    assert all(m.crop.shape == (64, 64, 3) and m.crop.dtype == np.uint8 for m in found)
    shorter = list(moments(str(video), SPEC, interval=7))
    assert np.allclose(starts(shorter), [0, 3, 7.5, 14.5, 21.5, 28.5, 32.5], atol=SAMPLE), \
        starts(shorter)


def test_static_video_gets_a_moment_every_interval(tmp_path):
    video = make_video(tmp_path / "still.mkv", [(5, 25)], drift=False)
    found = list(moments(str(video), SPEC))
    assert np.allclose(starts(found), [0, 10, 20], atol=SAMPLE) and found[-1].t_end == pytest.approx(25, abs=0.15)


def _photo_frame(name: str, size=(640, 360), gain: float = 1.0, shift: int = 0):
    """scikit-image's photo `name` as a decoded video frame would be (RGB, `size`), lit by `gain`, panned `shift`
    pixels."""
    import av

    data = pytest.importorskip("skimage.data")
    img = np.asarray(Image.fromarray(getattr(data, name)()).convert("RGB").resize((size[0] + 32, size[1])), np.float32)
    img = np.clip(img[:, shift : shift + size[0]] * gain, 0, 255).astype(np.uint8)
    return av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")


def test_a_cut_between_photos_of_like_colour_and_brightness_is_a_cut():
    # The README walkthrough's video: scikit-image's cat, then its rocket. The rule before measured a histogram
    # change of 0.19 and a pixel change of 0.240 (both under its thresholds) and saw no cut.
    sig = video_module._signature
    cat, rocket = sig(_photo_frame("cat")), sig(_photo_frame("rocket"))
    assert video_module._is_cut(cat, rocket) and video_module._is_cut(rocket, cat)
    # one scene: the cat a little panned, or faded to 45%, is no cut (a flash frame still scores as one: Cuts
    # passes it over when the frame after it is of the scene before; the tests below)
    for other in (_photo_frame("cat", shift=12), _photo_frame("cat", gain=0.45)):
        assert not video_module._is_cut(cat, sig(other))


def test_a_flat_frame_one_grey_level_across_a_bins_edge_is_no_cut():
    """A flat frame (a sky, a title card) going from grey 127 to 128 filled another bin of the joint histogram and
    scored a whole cut (1.055: review); a second grid offset by half a bin keeps it in one bin there. Two flat frames
    far apart in colour are still a cut."""
    def flat(rgb):
        return video_module.signature_of(np.full((18, 32, 3), rgb, np.uint8))

    for a, b in ((127, 128), (63, 64), (191, 192), (95, 96)):
        assert not video_module._is_cut(flat(a), flat(b)), (a, b)
    assert video_module._is_cut(flat(30), flat(220))
    assert video_module._is_cut(flat((200, 40, 40)), flat((40, 40, 200)))


def _cut_times(letters: str, step: float = 0.25, **kwargs) -> list[float]:
    """video.cut_times over frames every `step` s whose signatures are letters, a cut between any two unlike."""
    frames = [(i * step, c) for i, c in enumerate(letters)]
    return video_module.cut_times(frames, is_cut=lambda a, b: a != b, **kwargs)


def test_a_flash_frame_between_two_of_one_scene_is_no_cut():
    assert _cut_times("AAAAAAFAAAAA") == [0]  # A F A: F was a flash
    assert _cut_times("AAAAAAFGAAAA") == [0, 1.5]  # two frames unlike A: the first of them starts a moment
    assert _cut_times("AAAAAABBBBBB") == [0, 1.5]  # A B B: a cut, at B's time


def test_a_cut_is_decided_one_sample_late_holding_only_its_frame():
    cuts = video_module.Cuts(is_cut=lambda a, b: a != b)
    steps = [cuts.feed(i * 0.25, c) for i, c in enumerate("AAAAAABBB")]
    assert steps[0].start and not any(s.start for s in steps[1:])
    assert [s.hold for s in steps] == [False] * 6 + [True, False, False]  # B at 1.5 held...
    assert [s.confirmed for s in steps] == [None] * 7 + [1.5, None]  # ...and confirmed by the next frame


def test_a_flash_or_a_cut_at_the_last_examined_frame_is_no_cut():
    # nothing after it tells them apart; the scene it would start lasts under one sample
    assert _cut_times("AAAAAAAAF") == [0]
    assert _cut_times("AAAAAAAABB") == [0, 2.0]


def test_min_gap_and_the_interval_hold_with_the_flash_check():
    assert _cut_times("AABBBBBCCC") == [0, 1.75]  # B at 0.5 is a cut within MIN_GAP: no moment; C at 1.75 is
    assert _cut_times("ABBBBBCCC", min_gap=0.0) == [0, 0.25, 1.5]
    # a flash within MIN_GAP is passed over too: the frame after it (at 1 s, MIN_GAP in) is no cut
    assert _cut_times("AAAFAAAAA") == [0]
    assert _cut_times("A" * 90) == [0, 10, 20]  # at least one every interval
    assert _cut_times("A" * 40 + "F" + "A" * 10, interval=10) == [0, 10]  # a flash at the interval: that moment
    assert _cut_times("ABCDEFGHIJ", step=1.0) == [0, 1, 2, 3, 4, 5, 6, 7, 8]  # frames 1 s apart, each a cut


def test_the_representative_frame_is_never_a_flash():
    cuts = video_module.Cuts(is_cut=lambda a, b: a != b)
    reps = [cuts.feed(i * 0.25, c).representative for i, c in enumerate("AAFAAA")]
    assert reps == [False, False, False, True, False, False]  # 0.5 s in is the flash: the frame after it
    cuts = video_module.Cuts(is_cut=lambda a, b: a != b)
    reps = [cuts.feed(i * 0.25, c).representative for i, c in enumerate("AAAAAABBBBB")]
    assert reps == [False, False, True] + [False] * 5 + [True, False, False]  # B's moment from 1.5: its frame at 2.0


def _flash_video(path, flashes, fps: int = 10) -> list:
    """Scene 11 for 5 s, then scene 2 for 3 s (helpers.scene_frame, drifting), with the frames numbered in
    `flashes` blended 70% towards white; no B-frames, so every frame is decoded. Scene 11 and 2 are ones whose
    flash scores as a cut (cut_score 1.05 and 1.02 before encoding)."""
    import av

    frames = [np.roll(scene_frame(seed), i % 8, axis=1) for seed, n in ((11, 5 * fps), (2, 3 * fps)) for i in range(n)]
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream("libx264", rate=fps, options={"bf": "0"})
        stream.width, stream.height, stream.pix_fmt = 160, 90, "yuv420p"
        for i, frame in enumerate(frames):
            frame = (frame * 0.3 + 255 * 0.7).astype(np.uint8) if i in flashes else frame
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def test_a_flash_frame_on_an_examined_frame_makes_no_moment(tmp_path, monkeypatch):
    # a flash at 2.0 s and one at the last examined frame (7.8 s); the cut at 5 s. The rule before started a
    # moment at each flash: [0, 2.0, 5.0, 7.8]
    video = _flash_video(tmp_path / "flash.mp4", flashes={20, 78})
    examined, signature = [], video_module._signature
    monkeypatch.setattr(video_module, "_signature", lambda f: examined.append(round(f.time, 3)) or signature(f))
    found = list(moments(str(video), SPEC))
    assert {2.0, 7.8} <= set(examined) and max(examined) == 7.8  # the flashes were examined (and scored)
    assert starts(found) == pytest.approx([0, 5.0]), starts(found)
    assert found[-1].t_end == pytest.approx(8.0, abs=0.15)
    # the moments' pictures are no flash: each is its scene's frame REPRESENTATIVE_AFTER in
    assert all(float(np.asarray(m.image).mean()) < 200 for m in found)


@pytest.mark.slow
def test_the_walkthrough_video_gets_a_moment_at_its_cut(tmp_path):
    import av

    path = tmp_path / "cat-rocket.mp4"
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 320, 180, "yuv420p"
        for i in range(160):  # the cat for 8 s, then the rocket for 8 s
            for packet in stream.encode(_photo_frame("cat" if i < 80 else "rocket", size=(320, 180))):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    assert np.allclose(starts(list(moments(str(path), SPEC))), [0, 8], atol=SAMPLE)


def test_at_most_one_moment_per_second(tmp_path):
    video = make_video(tmp_path / "flicker.webm", [(i % 2 + 7, 0.5) for i in range(8)], codec="libvpx-vp9")
    found = starts(list(moments(str(video), SPEC)))
    assert len(found) >= 3 and all(b - a >= 1.0 for a, b in itertools.pairwise(found)), found


@pytest.mark.parametrize("name,codec", [("x264.avi", "libx264"), ("xvid.avi", "mpeg4"), ("x264.mp4", "libx264"),
                                        ("x264.mkv", "libx264")])
def test_each_moment_is_at_the_time_of_the_frame_it_shows_with_b_frames(tmp_path, name, codec):
    # An AVI has no presentation times: with B-frames FFmpeg's made-up ones came out of order (0.12, 0.20,
    # 0.16...), forced forward, and a moment's time was up to 2 frames past the frame it showed
    fps = 25
    video = make_numbered_video(tmp_path / name, 100, fps=fps, codec=codec, b_frames=3)
    info = VideoInfo()
    found = list(moments(str(video), SPEC, info, interval=0.01, min_gap=0))  # every frame examined a moment
    assert len(found) >= 15
    assert [(m.index, round(m.t * fps, 2)) for m in found] == [(i, frame_number(m.image)) for i, m in enumerate(found)]
    assert found[-1].t_end == info.duration == pytest.approx(100 / fps)


@pytest.mark.parametrize("name,codec", [("x264.avi", "libx264"), ("x264.mp4", "libx264")])
def test_a_moments_picture_is_the_frame_at_its_time_with_b_frames(tmp_path, name, codec):
    # the web page's picture of a moment in an AVI with B-frames was 1-3 frames early (FFmpeg's made-up pts)
    fps = 25
    video = make_numbered_video(tmp_path / name, 30 * fps, fps=fps, codec=codec, b_frames=3, gop=100)
    for t in (0.0, 1.0, 7.3, 22.04):
        want = math.ceil(round((t + video_module.REPRESENTATIVE_AFTER) * fps, 6))  # the first frame at or after
        assert frame_number(frame_at(str(video), t, t + 5)) == want, t


@pytest.fixture(scope="module")
def one_keyframe_video(tmp_path_factory):
    """Ten minutes at 25 fps with a single keyframe (a screen recording's), each frame showing its number."""
    return make_numbered_video(tmp_path_factory.mktemp("long") / "one-keyframe.mkv", 600 * 25, fps=25, b_frames=3,
                               gop=600 * 25)


@pytest.mark.slow
def test_a_moment_ten_minutes_past_the_only_keyframe_is_drawn_quickly(one_keyframe_video, monkeypatch):
    # the frame at that time, reached however long the run-up (its time is a benchmark's: bench_video_thumb; a
    # loaded CI machine would reach an earlier frame within the default THUMB_RUNUP_SECONDS)
    monkeypatch.setattr(video_module, "THUMB_RUNUP_SECONDS", 300.0)
    picture = frame_at(str(one_keyframe_video), 599.0, 600.0)
    assert frame_number(picture) == math.ceil(599.5 * 25)
    assert "reached" not in picture.info


@pytest.mark.slow
def test_decoding_up_to_a_moment_far_from_a_keyframe_is_bounded(one_keyframe_video, monkeypatch):
    # a 720p screen recording's moment at 9:59 decoded ten minutes of frames for its picture (~50 s on 2 cores):
    # after THUMB_RUNUP_SECONDS, here 0.05 s, the frame reached is shown, and says so
    monkeypatch.setattr(video_module, "THUMB_RUNUP_SECONDS", 0.05, raising=False)
    picture = frame_at(str(one_keyframe_video), 599.0, 600.0)
    assert frame_number(picture) < 599 * 25 and picture.info["reached"] == pytest.approx(frame_number(picture) / 25)


@pytest.mark.slow
def test_the_server_shows_a_far_moment_quickly_and_keeps_only_the_right_frame(one_keyframe_video, tmp_path,
                                                                               tiny_model, monkeypatch):
    # the frame reached when the run-up's time is up is served (200, at once) but not kept as the moment's
    # thumbnail; once the moment's own frame is reached, it is served and kept
    from alignsearch.surfaces.server import ServerConfig, start_in_thread

    lib, ix = tmp_path / "lib", tmp_path / "ix"
    lib.mkdir()
    shutil.copy(one_keyframe_video, lib / "screen.mkv")
    index_json(ix, lib, "--model", tiny_model, "--device", "cpu", "--video-interval", "60")
    conn = sqlite3.connect(ix / "catalog.db")
    moment, t, t_end = conn.execute("SELECT id, t, t_end FROM files WHERE t IS NOT NULL ORDER BY t DESC LIMIT 1").fetchone()
    conn.close()
    assert t >= 540
    monkeypatch.setattr(video_module, "THUMB_RUNUP_SECONDS", 0.05, raising=False)
    with alignsearch.open(ix, device="cpu") as engine:
        server = start_in_thread(engine, ServerConfig(port=0, token="s3cret"))
        try:
            def shown():
                start = time.perf_counter()
                status, _, body = call(server.url, f"/api/image/{moment}?size=128")
                assert status == 200 and time.perf_counter() - start < 30
                return frame_number(Image.open(io.BytesIO(body)))

            assert shown() < t * 25 and not (ix / "thumbs" / f"{moment}-128.jpg").exists()
            monkeypatch.setattr(video_module, "THUMB_RUNUP_SECONDS", 300.0)
            assert shown() == math.ceil((t + min(video_module.REPRESENTATIVE_AFTER, (t_end - t) / 2)) * 25)
            assert (ix / "thumbs" / f"{moment}-128.jpg").exists()
        finally:
            server.shutdown()


@pytest.mark.slow
def test_moment_pictures_decode_in_the_image_decode_slots(tmp_path, tiny_model, monkeypatch):
    # a moment's picture (frame_at: up to THUMB_RUNUP_SECONDS of decoding from the keyframe before it) was
    # decoded outside the server's DECODE_SLOTS: 8 requests for moments of a one-keyframe video decoded 8 at once
    # (CPU and each decoder's reference frames unbounded); now moments and image thumbnails share the slots
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from alignsearch.surfaces import server as server_module
    from alignsearch.surfaces.server import ServerConfig, start_in_thread

    lib, ix = tmp_path / "lib", tmp_path / "ix"
    make_images(lib, 2)
    make_numbered_video(lib / "screen.mkv", 90 * 10, fps=10, b_frames=0, gop=90 * 10)
    index_json(ix, lib, "--model", tiny_model, "--device", "cpu", "--video-interval", "10")
    conn = sqlite3.connect(ix / "catalog.db")
    moments_ = [r[0] for r in conn.execute("SELECT id FROM files WHERE t IS NOT NULL ORDER BY t")]
    images = [r[0] for r in conn.execute("SELECT id FROM files WHERE t IS NULL AND relpath != 'screen.mkv'")]
    conn.close()
    assert len(moments_) >= 8 and len(images) == 2, (moments_, images)
    lock, running, most = threading.Lock(), [0], [0]

    def counted(real):
        def decode(*args, **kwargs):
            with lock:
                running[0] += 1
                most[0] = max(most[0], running[0])
            try:
                time.sleep(0.2)  # a decode long enough for the requests to meet
                return real(*args, **kwargs)
            finally:
                with lock:
                    running[0] -= 1
        return decode

    monkeypatch.setattr(video_module, "frame_at", counted(video_module.frame_at))
    monkeypatch.setattr(server_module, "open_rgb", counted(server_module.open_rgb))
    with alignsearch.open(ix, device="cpu") as engine:
        server = start_in_thread(engine, ServerConfig(port=0, token="s3cret"))
        try:
            paths = [f"/api/image/{i}?size=128" for i in moments_[:8] + images]
            with ThreadPoolExecutor(len(paths)) as pool:
                answers = list(pool.map(lambda p: call(server.url, p), paths))
        finally:
            server.shutdown()
    assert [status for status, _, _ in answers] == [200] * len(paths), [a[2][:200] for a in answers]
    assert most[0] == server_module.DECODE_SLOTS == 2, most


def test_unreadable_video_raises_with_a_reason(tmp_path):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video at all" * 50)
    with pytest.raises(VideoError, match="cannot read video"):
        list(moments(str(junk), SPEC))


def test_truncated_video_keeps_what_was_readable(tmp_path):
    whole = make_video(tmp_path / "whole.mkv", [(61, 3), (62, 3), (63, 3)]).read_bytes()
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(whole[: int(len(whole) * 0.6)])
    found = list(moments(str(cut), SPEC))
    assert np.allclose(starts(found)[:2], [0, 3], atol=SAMPLE) and 3 < found[-1].t_end < 9, starts(found)


def test_a_header_claiming_hours_does_not_stretch_the_last_moment(tmp_path):
    """A 2 s AVI whose header (strh dwLength) claims 360,000 frames, ten hours: the length is what the file's
    packets hold, frames skipped undecoded included, not what its header says (its last moment ended at 10:00:00)."""
    import struct

    data = bytearray(make_video(tmp_path / "short.avi", [(5, 1.2), (6, 0.8)]).read_bytes())
    at = data.find(b"strh") + 40  # the video stream header's length in frames (AVIStreamHeader.dwLength)
    assert struct.unpack("<I", data[at:at + 4]) == (20,)
    data[at:at + 4] = struct.pack("<I", 360000)
    (tmp_path / "long.avi").write_bytes(data)
    info = VideoInfo()
    found = list(moments(str(tmp_path / "long.avi"), SPEC, info))
    assert found[-1].t_end == pytest.approx(2, abs=0.15) and info.duration == pytest.approx(2, abs=0.15)
    # the frames NONREF leaves undecoded still count: a video's end is its last packet's, not its last decoded frame's
    whole = list(moments(str(make_video(tmp_path / "b.mkv", [(7, 3.3)])), SPEC))
    assert whole[-1].t_end == pytest.approx(3.3, abs=0.01), whole[-1].t_end


def _h264(size, frames: int, shade: int = 0) -> bytes:
    """A raw H.264 stream (Annex B) of flat frames, which can be joined to another."""
    import av

    out_bytes = io.BytesIO()
    with av.open(out_bytes, "w", format="h264") as out:
        stream = out.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(frames):
            frame = np.full((size[1], size[0], 3), (shade + 40 * i) % 256, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return out_bytes.getvalue()


def _remux(data: bytes, path, duration: int | None = None):
    """The raw H.264 `data` in a Matroska file, 10 frames a second (each packet `duration` long when given)."""
    import fractions

    import av

    with av.open(io.BytesIO(data), format="h264") as src, av.open(str(path), "w") as dst:
        out = dst.add_stream_from_template(src.streams.video[0])
        for i, packet in enumerate(p for p in src.demux() if p.size):
            packet.stream, packet.pts, packet.dts = out, i, i
            packet.time_base = fractions.Fraction(1, 10)
            if duration is not None:
                packet.duration = duration
            dst.mux(packet)
    return path


def test_a_packet_claiming_hours_does_not_stretch_the_last_moment(tmp_path):
    """Packets of a 3 s video each claiming 20 minutes (a muxer's or an attacker's): its end is its last
    frame's, not 20 minutes past its last packet."""
    video = _remux(_h264((160, 90), 30), tmp_path / "v.mkv", duration=12000)
    info = VideoInfo()
    found = list(moments(str(video), SPEC, info))
    assert found[-1].t_end == pytest.approx(3, abs=0.15) and info.duration == pytest.approx(3, abs=0.15)


def test_frames_larger_than_the_header_said_are_refused_by_the_decoder(tmp_path, monkeypatch):
    """A header of 160x90, then frames over the limit: FFmpeg refuses them before it decodes them (max_pixels;
    each frame thread decoded them first, 538 MB for 8400x8400 frames from an 834 KB file on 2 cores), and the
    moments before them are kept. The limit is lowered here so the test encodes small frames."""
    import alignsearch.media.video as video_module

    monkeypatch.setattr(video_module, "MAX_PIXELS", 320 * 180)
    video = _remux(_h264((160, 90), 30) + _h264((640, 360), 2, shade=128), tmp_path / "bomb.mkv")
    seen = []
    signature = video_module._signature
    monkeypatch.setattr(video_module, "_signature", lambda frame: seen.append(frame.width) or signature(frame))
    found = list(moments(str(video), SPEC, interval=1))
    assert len(found) == 3 and found[-1].t_end == pytest.approx(3.2, abs=0.15), starts(found)
    assert seen and set(seen) == {160}  # no larger frame ever reached this process


def test_a_phone_video_stored_sideways_is_read_upright(tmp_path):
    """A portrait phone video is stored sideways with a display matrix that turns it upright (ffprobe: "rotation
    of -90.00 degrees"; FFmpeg's player turns such frames clockwise). Its moments were encoded, and shown on
    the web page, lying on their side, with the stored size; now as displayed, as a photo's EXIF turn is."""
    import av

    from alignsearch.media.video import frame_at

    upright = scene_frame(9, (90, 160))  # what the phone saw: 90 wide, 160 high
    with av.open(str(tmp_path / "phone.mp4"), "w") as out:
        stream = out.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 160, 90, "yuv420p"
        stream.set_display_rotation(-90)  # a turn clockwise shows it upright
        stored = np.ascontiguousarray(np.rot90(upright, k=1))  # the sensor's rows: the picture turned counter-clockwise
        for _ in range(20):
            for packet in stream.encode(av.VideoFrame.from_ndarray(stored, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    info = VideoInfo()
    found = list(moments(str(tmp_path / "phone.mp4"), SPEC, info))
    assert (info.width, info.height) == (90, 160) and found[0].image.size == (90, 160)
    shown = np.asarray(found[0].image, dtype=np.float32)
    assert np.abs(shown - upright).mean() < 8, np.abs(shown - upright).mean()  # H.264's loss only
    thumb = np.asarray(frame_at(str(tmp_path / "phone.mp4"), found[0].t, found[0].t_end), dtype=np.float32)
    assert thumb.shape == (160, 90, 3) and np.abs(thumb - upright).mean() < 8


def _library(tmp_path):
    lib = tmp_path / "lib"
    make_images(lib / "photos", 4)
    make_video(lib / "clips" / "match.mp4", SCENES)
    (lib / "clips" / "broken.mov").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 200)
    whole = make_video(tmp_path / "whole.mp4", [(8, 4)]).read_bytes()
    (lib / "clips" / "cut.mp4").write_bytes(whole[: len(whole) // 2])  # no index (moov) left
    return lib


def _rows(ix):
    conn = sqlite3.connect(ix / "catalog.db")
    try:
        return conn.execute("SELECT relpath, moment, t, t_end, status, vec_row FROM files ORDER BY relpath, moment").fetchall()
    finally:
        conn.close()


@pytest.mark.slow
def test_photos_and_videos_index_in_one_run(tmp_path, tiny_model):
    lib, ix = _library(tmp_path), tmp_path / "ix"
    s = index_json(ix, lib, "--model", tiny_model, "--device", "cpu")
    assert (s["added"], s["failed"]) == (5, 2), s
    assert s["times"]["extra"]["moments"] == 6
    rows = [r for r in _rows(ix) if r[0] == "clips/match.mp4"]
    assert [r[1] for r in rows] == list(range(6)) and all(r[4] == "indexed" for r in rows)
    assert np.allclose([r[2] for r in rows], [0, 3, 7.5, 17.5, 27.5, 32.5], atol=SAMPLE)
    assert s["index"]["vectors"] == 4 + 6
    failed = run("info", "--failed", "--index", ix).output
    assert "broken.mov: cannot read video" in failed and "cut.mp4: cannot read video" in failed, failed
    info = json.loads(run("info", "--json", "--index", ix).stdout)
    assert (info["images"], info["failed"], info["index"]["vectors"]) == (5, 2, 10)  # a video counts once

    out = json.loads(run("query", "a picture", "-k", "20", "--json", "--per-video", "10", "--index", ix).stdout)
    hits = out["results"]
    videos = [h for h in hits if h["relpath"] == "clips/match.mp4"]
    assert len(videos) == 6 and all(h["t"] is not None and h["t_end"] > h["t"] for h in videos)
    assert all(h["t"] is None and h["t_end"] is None for h in hits if h["relpath"].startswith("photos/"))
    capped = json.loads(run("query", "a picture", "-k", "20", "--json", "--index", ix).stdout)["results"]
    assert sum(h["relpath"] == "clips/match.mp4" for h in capped) == 3  # --per-video defaults to 3
    assert len(capped) == 4 + 3
    only = json.loads(run("query", "a picture", "--media", "video", "--per-video", "2", "--json", "--index", ix).stdout)
    assert [h["relpath"] for h in only["results"]] == ["clips/match.mp4"] * 2
    photos = json.loads(run("query", "a picture", "--media", "photo", "--json", "--index", ix).stdout)["results"]
    assert len(photos) == 4 and all(h["t"] is None for h in photos)
    text = run("query", "a picture", "--media", "video", "--index", ix).output
    assert "match.mp4 @ 0:" in text, text
    assert run("verify", "--index", ix).exit_code == 0
    # verify counted a vector an image (10 here, where info says 5): a video counts once, its moments as vectors
    checked = json.loads(run("verify", "--json", "--index", ix).stdout)["checked"]
    assert checked["images"] == info["images"] == 5, checked
    assert (checked["vectors_indexed"], checked["index_vectors"]) == (10, 10), checked
    run("export", tmp_path / "lib.parquet", "--index", ix)
    table = pq.read_table(tmp_path / "lib.parquet")
    moments_out = sorted(t for rel, t in zip(table["relpath"].to_pylist(), table["t"].to_pylist()) if rel.endswith(".mp4"))
    assert np.allclose(moments_out, [0, 3, 7.5, 17.5, 27.5, 32.5], atol=SAMPLE)
    assert all(t is None for rel, t in zip(table["relpath"].to_pylist(), table["t_end"].to_pylist())
               if rel.startswith("photos/"))


@pytest.mark.slow
def test_dupes_never_lists_a_video_as_a_copy_of_itself(tmp_path, tiny_model):
    """The moments of one video that look alike (a still shot, a scene shown again) are that one file: `dupes`
    listed a still video three times, "keep" on one and the same path as duplicates to be rid of. Real copies
    across files are still grouped: a video encoded again in another container, a frame saved as a photo."""
    lib, ix = tmp_path / "lib", tmp_path / "ix"
    make_images(lib, 2)
    make_video(lib / "still.mp4", [(41, 25)], drift=False)  # three moments of one picture
    make_video(lib / "again.mkv", [(41, 25)], drift=False)  # the same shot, another file
    make_video(lib / "twice.mp4", [(42, 4), (44, 4), (42, 4)], drift=False)  # a scene shown again
    Image.fromarray(scene_frame(44)).save(lib / "frame.png")  # twice.mp4's second scene as a photo
    index_json(ix, lib, "--model", tiny_model, "--device", "cpu")
    for tier in ("near", "similar"):
        groups = json.loads(run("dupes", "--tier", tier, "--json", "--index", ix).stdout)
        listed = [sorted(os.path.basename(i["path"]) for i in g["items"]) for g in groups]
        assert all(len(set(names)) == len(names) for names in listed), (tier, listed)
        assert ["again.mkv", "still.mp4"] in listed and ["frame.png", "twice.mp4"] in listed, (tier, listed)
    text = run("dupes", "--index", ix).output
    assert "2 groups, 2 files besides the ones to keep" in text, text


def _dated_video_indexed(tmp_path, tiny_model):
    """(library, index) of an image and trip.mp4, whose container says it was recorded on 2019-05-01, indexed."""
    import av

    lib, ix = tmp_path / "lib", tmp_path / "ix"
    make_images(lib, 1)
    with av.open(str(lib / "trip.mp4"), "w") as out:
        out.metadata["creation_time"] = "2019-05-01T10:00:00Z"
        stream = out.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 160, 90, "yuv420p"
        for i in range(30):
            for packet in stream.encode(av.VideoFrame.from_ndarray(scene_frame(3 + i // 15), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    index_json(ix, lib, "--model", tiny_model, "--device", "cpu")
    return lib, ix


@pytest.mark.slow
def test_a_renamed_video_keeps_the_date_its_container_gives(tmp_path, tiny_model):
    """A renamed (or copied) video keeps its vectors, found by its SHA-256, and now its date too: it was dated by
    its mtime (the day of the rename) instead of its container's creation_time, and `--after` lost it."""
    lib, ix = _dated_video_indexed(tmp_path, tiny_model)

    def in_2019():
        out = run("query", "x", "--json", "--after", "2019-01-01", "--before", "2019-12-31", "--index", ix).stdout
        return sorted((h["relpath"], h["t"], h["taken"]) for h in json.loads(out)["results"])

    assert in_2019() == [("trip.mp4", 0.0, "2019-05-01T10:00:00Z"), ("trip.mp4", 1.5, "2019-05-01T10:00:00Z")]
    (lib / "trip.mp4").rename(lib / "trip2.mp4")
    shutil.copy(lib / "trip2.mp4", lib / "copy.mp4")
    s = index_json(ix)
    assert (s["moved"], s["added"]) == (1, 1), s  # the copy: found by its hash too
    assert [h[0] for h in in_2019()] == ["copy.mp4", "copy.mp4", "trip2.mp4", "trip2.mp4"]


@pytest.mark.slow
def test_a_renamed_video_whose_photo_row_key_flipped_is_refused_not_dated_by_its_mtime(tmp_path, tiny_model):
    """The renamed video takes its date from the photos row of its first moment (catalog.photos_of): that row's key
    flipped to an id of no file (schema 21: off its digest), the run found no row, dated the video by its mtime and
    wrote that date with a sound digest, exit 0 (verify --repair then dropped the moved row: the date lost for good).
    The rows of no file are read then, and one off its digest is damage: exit 7, nothing written."""
    lib, ix = _dated_video_indexed(tmp_path, tiny_model)
    db = catalog.connect(ix / "catalog.db")
    with db.connect() as conn:
        (sha,), = conn.exec_driver_sql("SELECT DISTINCT sha256 FROM files WHERE relpath = 'trip.mp4'").all()
        first = catalog.moments_by_hash(conn, sha)[0].id
        gone = conn.exec_driver_sql("SELECT max(id) + 1000 FROM files").scalar()
    db.dispose()
    with sqlite3.connect(ix / "catalog.db") as conn:  # the row's key moved as a flipped byte moves it: digest as written
        conn.execute("UPDATE photos SET file_id = ? WHERE file_id = ?", (gone, first))
    conn.close()
    (lib / "trip.mp4").rename(lib / "trip2.mp4")
    out = run("index", "--index", ix, "--json", code=7).output  # before: exit 0, trip2.mp4 dated by its mtime
    assert "photo row's key is not the one written" in out, out
    with sqlite3.connect(ix / "catalog.db") as conn:  # the run moved nothing: the rename is taken once repaired
        assert {r for (r,) in conn.execute("SELECT DISTINCT relpath FROM files WHERE t IS NOT NULL")} == {"trip.mp4"}
    conn.close()


@pytest.mark.slow
def test_an_image_of_a_scene_finds_its_video_at_that_second(tmp_path, tiny_model):
    lib, ix = tmp_path / "lib", tmp_path / "ix"
    make_video(lib / "trip.mp4", [(11, 6), (12, 5), (13, 8), (14, 4)])  # scene 13 from 11 s to 19 s
    make_video(lib / "other.mkv", [(21, 5), (22, 5)])
    index_json(ix, lib, "--model", tiny_model, "--device", "cpu")
    shot = tmp_path / "shot.png"
    Image.fromarray(scene_frame(13)).save(shot)
    with alignsearch.open(ix) as engine:
        best = engine.search(image=str(shot), k=3)[0]
    assert best.relpath == "trip.mp4" and best.t == pytest.approx(11, abs=SAMPLE) and best.t_end == pytest.approx(19, abs=SAMPLE)
    out = json.loads(run("query", "--image", shot, "-k", "1", "--json", "--index", ix).stdout)["results"][0]
    assert out["relpath"] == "trip.mp4" and int(out["t"]) == 11


@pytest.mark.slow
def test_incremental_change_remove_rename_and_interval_remembered(tmp_path, tiny_model):
    lib, ix = tmp_path / "lib", tmp_path / "ix"
    make_images(lib, 2)
    clip = make_video(lib / "clip.mp4", [(31, 4), (32, 4)])
    make_video(lib / "still.mov", [(33, 12)], drift=False)
    s = index_json(ix, lib, "--model", tiny_model, "--device", "cpu", "--video-interval", "5")
    assert s["added"] == 4
    still = [r for r in _rows(ix) if r[0] == "still.mov"]
    assert np.allclose([r[2] for r in still], [0, 5, 10], atol=SAMPLE)  # the interval given
    with alignsearch.open(ix) as engine:  # the unchanged picture's moments fold into one with --collapse
        folded = engine.search(text="x", k=10, collapse=True, per_video=None, path="still.mov")
    assert len(folded) == 1 and len(folded[0].duplicates) == 2
    roots = json.loads(run("roots", "--json", "--index", ix).stdout)
    assert roots[0]["options"].get("video_interval") == 5 and roots[0]["indexed"] == 4  # a video counts once
    assert index_json(ix)["unchanged"] == 4  # nothing re-read

    make_video(lib / "clip.mp4", [(34, 3), (35, 3), (36, 3)])  # changed: re-read, its old moments replaced
    make_video(lib / "later.mov", [(37, 11)], drift=False)  # new, without the flag: the remembered interval
    s = index_json(ix)
    assert (s["updated"], s["added"]) == (1, 1), s
    rows = _rows(ix)
    assert np.allclose([r[2] for r in rows if r[0] == "clip.mp4"], [0, 3, 6], atol=SAMPLE)
    assert np.allclose([r[2] for r in rows if r[0] == "later.mov"], [0, 5, 10], atol=SAMPLE)
    vectors_before = s["index"]["vectors"]

    shutil.move(clip, lib / "renamed.mp4")  # same content: its vectors are kept, nothing encoded
    s = index_json(ix)
    assert (s["moved"], s["removed"], s["added"]) == (1, 0, 0), s
    assert s["times"]["extra"].get("moments") == 3 and s["index"]["vectors"] == vectors_before
    rows = _rows(ix)
    assert not [r for r in rows if r[0] == "clip.mp4"] and len([r for r in rows if r[0] == "renamed.mp4"]) == 3

    (lib / "still.mov").unlink()  # removed: every moment goes
    s = index_json(ix)
    assert s["removed"] == 1 and s["index"]["vectors"] == vectors_before - 3, s
    assert not [r for r in _rows(ix) if r[0] == "still.mov"]
    with alignsearch.open(ix) as engine:
        hits = engine.search(text="anything", k=50, per_video=None)
    assert {h.relpath for h in hits} == {"img000.png", "img001.jpg", "renamed.mp4", "later.mov"}
    assert run("verify", "--index", ix).exit_code == 0


@pytest.mark.slow
def test_schema_2_catalog_is_read_then_upgraded(tmp_path, tiny_model):
    lib, ix = tmp_path / "lib", tmp_path / "ix"
    make_images(lib, 3)
    index_json(ix, lib, "--model", tiny_model, "--device", "cpu")
    conn = sqlite3.connect(ix / "catalog.db")
    with conn:  # back to the version 2 table: no moment columns, unique (root, relpath)
        cols = ", ".join(catalog.V2_COLUMNS)
        conn.execute("DELETE FROM files WHERE relpath = 'img002.jpg'")  # a deleted id: never to be reused
        conn.execute("DROP INDEX files_sha256")
        conn.execute("ALTER TABLE files RENAME TO f3")
        conn.execute("""CREATE TABLE files (id INTEGER PRIMARY KEY AUTOINCREMENT, root TEXT NOT NULL, relpath TEXT NOT
            NULL, relpath_raw BLOB, size INTEGER NOT NULL, mtime FLOAT NOT NULL, sha256 VARCHAR(64), width INTEGER,
            height INTEGER, format VARCHAR(16), status VARCHAR(8) NOT NULL, reason TEXT, indexed_at FLOAT NOT NULL,
            vec_row INTEGER, UNIQUE (root, relpath))""")
        conn.execute(f"INSERT INTO files ({cols}) SELECT {cols} FROM f3")
        conn.execute("DROP TABLE f3")
        conn.execute("UPDATE sqlite_sequence SET seq = 3 WHERE name = 'files'")
        conn.execute("CREATE INDEX files_sha256 ON files (sha256)")
        conn.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    conn.close()
    with alignsearch.open(ix) as engine:  # a reader does not upgrade, and reads it
        hits = engine.search(text="x", k=5)
    assert {h.relpath for h in hits} == {"img000.png", "img001.jpg"} and all(h.t is None for h in hits)
    ids = {h.relpath: h.id for h in hits}
    make_video(lib / "v.mp4", [(41, 2), (42, 2)])
    s = index_json(ix)
    assert s["added"] == 2, s  # img002 (its row was dropped above) and the video
    conn = sqlite3.connect(ix / "catalog.db")
    try:
        assert json.loads(conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0]) == migrate.LATEST
        kept = dict(conn.execute("SELECT relpath, id FROM files WHERE relpath LIKE 'img00%'").fetchall())
        new_ids = [i for (i,) in conn.execute("SELECT id FROM files WHERE relpath IN ('img002.jpg', 'v.mp4')")]
        # the deleted row's photo fields were left, as alignsearch before d819991 left removed files' hashes: the
        # upgrade drops them (verify called them damage, exit 7, until they were a note)
        left = conn.execute("SELECT count(*) FROM photos WHERE file_id NOT IN (SELECT id FROM files)").fetchone()[0]
    finally:
        conn.close()
    assert {k: kept[k] for k in ids} == ids and min(new_ids) > 3  # ids kept; the counter too
    assert left == 0
    assert run("verify", "--index", ix).exit_code == 0


@pytest.mark.slow
def test_reindex_with_another_model_reads_the_videos_again(tmp_path, tiny_model, other_model):
    lib, ix = tmp_path / "lib", tmp_path / "ix"
    make_images(lib, 2)
    make_video(lib / "clip.mp4", [(51, 3), (52, 3), (53, 3)])
    index_json(ix, lib, "--model", tiny_model, "--device", "cpu")
    before = _rows(ix)
    s = index_json(ix, "--reindex", "--model", other_model, "--device", "cpu")
    assert s["reencoded"] == 3 and s["failed"] == 0, s
    after = _rows(ix)
    assert [r[:5] for r in after] == [r[:5] for r in before]  # the same moments, all indexed
    assert len({r[5] for r in after}) == len(after)  # each its own new vector
    assert run("verify", "--index", ix).exit_code == 0
    shot = tmp_path / "shot.png"
    Image.fromarray(scene_frame(52)).save(shot)
    with alignsearch.open(ix) as engine:
        best = engine.search(image=str(shot), k=1)[0]
    assert best.relpath == "clip.mp4" and best.t == pytest.approx(3, abs=SAMPLE)


LONG = [(i % 13 + 100, 7) for i in range(172)]  # 20 minutes 4 seconds, a cut every 7 s


@pytest.mark.slow
def test_memory_does_not_grow_with_the_length_of_a_video(tmp_path, tiny_model):
    short_lib, long_lib = tmp_path / "short", tmp_path / "long"
    make_video(short_lib / "minute.mp4", LONG[:9], fps=5)
    make_video(long_lib / "twenty-minutes.mp4", LONG, fps=5)
    common = ("--model", tiny_model, "--device", "cpu", "--json")
    proc, short_peak = alignsearch_peak_rss("index", short_lib, "--index", tmp_path / "ix1", *common)
    assert summary(proc)["times"]["extra"]["moments"] == 9
    proc, long_peak = alignsearch_peak_rss("index", long_lib, "--index", tmp_path / "ix2", *common)
    assert summary(proc)["times"]["extra"]["moments"] == 172
    assert long_peak < 1 << 30 and long_peak - short_peak < 150 << 20, (short_peak >> 20, long_peak >> 20)


@pytest.mark.slow
def test_killed_mid_video_resumes_and_verifies_clean(tmp_path, tiny_model):
    lib, ix = tmp_path / "lib", tmp_path / "ix"
    make_images(lib, 3)
    make_video(lib / "long.mp4", LONG, fps=5)
    args = (sys.executable, "-m", "alignsearch", "index", lib, "--index", ix, "--model", tiny_model, "--device", "cpu",
            "--json")
    proc = subprocess.Popen([str(a) for a in args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:  # the photos are committed: the video is being read
        if (ix / "catalog.db").exists() and _count(ix, "status = 'indexed'") >= 3:
            break
        time.sleep(0.05)
    time.sleep(1.0)
    killed = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if killed:  # nothing of a video is committed before all of it is
        assert _count(ix, "t IS NOT NULL") in (0, 172)
    s = index_json(ix)
    assert _count(ix, "t IS NOT NULL AND status = 'indexed'") == 172 and s["index"]["vectors"] == 3 + 172, s
    assert run("verify", "--index", ix).exit_code == 0


def _count(ix, where: str) -> int:
    try:
        conn = sqlite3.connect(f"file:{ix / 'catalog.db'}?mode=ro", uri=True)
        try:
            return conn.execute(f"SELECT count(*) FROM files WHERE {where}").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error:
        return 0


@pytest.mark.slow
def test_server_shows_moments_and_plays_the_video_from_t_with_ranges(tmp_path, tiny_model):
    lib, ix = tmp_path / "lib", tmp_path / "ix"
    make_images(lib, 2)
    video = make_video(lib / "clip.mp4", [(71, 3), (72, 3)])
    index_json(ix, lib, "--model", tiny_model, "--device", "cpu")
    data = video.read_bytes()
    proc, url = start_serve(ix, "--token", "s3cret")
    try:
        status, _, body = call(url, "/api/search?q=a+picture&k=10")
        hits = json.loads(body)["results"]
        moments_found = sorted((h["t"], h["t_end"], h["id"]) for h in hits if h["relpath"] == "clip.mp4")
        assert status == 200 and np.allclose([m[:2] for m in moments_found], [(0, 3), (3, 6)], atol=SAMPLE)
        second = moments_found[1][2]
        for query, videos_wanted in (("media=photo", 0), ("media=video&per_video=1", 1)):  # as --media, --per-video
            status, _, body = call(url, f"/api/search?q=a+picture&k=10&{query}")
            found = json.loads(body)["results"]
            assert status == 200 and sum(h["t"] is not None for h in found) == videos_wanted, (query, found)
            assert query.startswith("media=video") or len(found) == 2  # the two photos
        status, headers, body = call(url, f"/api/video/{second}", headers={"Range": "bytes=100-199"})
        assert status == 206 and body == data[100:200], status
        assert headers["Content-Range"] == f"bytes 100-199/{len(data)}" and headers["Content-Type"] == "video/mp4"
        status, headers, body = call(url, f"/api/video/{second}")
        assert status == 200 and body == data and headers["Accept-Ranges"] == "bytes"
        assert call(url, f"/api/video/{second}", headers={"Range": f"bytes={len(data)}-"})[0] == 416
        assert call(url, f"/api/video/{second}", token=None)[0] == 401  # the same token as images
        photo = next(h["id"] for h in hits if h["t"] is None)
        assert call(url, f"/api/video/{photo}")[0] == 404
        status, headers, body = call(url, f"/api/image/{second}?size=64")  # the moment's own frame
        assert status == 200 and headers["Content-Type"] == "image/jpeg"
        thumb = np.asarray(Image.open(io.BytesIO(body)).convert("RGB"), dtype=np.float32)
        scenes = [np.asarray(Image.fromarray(scene_frame(s)).resize(thumb.shape[1::-1]), dtype=np.float32)
                  for s in (71, 72)]
        assert np.abs(thumb - scenes[1]).mean() < np.abs(thumb - scenes[0]).mean()
        video.write_bytes(data + b"\0")  # changed since it was indexed: not served
        assert call(url, f"/api/video/{second}")[0] == 409
    finally:
        stop(proc)


@pytest.mark.slow
def test_videos_are_opened_like_every_indexed_file(tmp_path, tiny_model):
    """Issue 23's guarded open holds for videos too: a FIFO named .mp4 does not hang the index, and a
    video whose parent folder was swapped for a symlink (to a file of the same size and mtime) is not played."""
    lib, ix = tmp_path / "lib", tmp_path / "ix"
    make_images(lib, 2)
    video = make_video(lib / "album" / "clip.mp4", [(71, 3), (72, 3)])
    os.mkfifo(lib / "pipe.mp4")
    summary_ = index_json(ix, lib, "--model", tiny_model, "--device", "cpu")  # would block on the FIFO's open
    assert summary_["failed"] >= 1, summary_
    data = video.read_bytes()
    vault = tmp_path / "vault"
    vault.mkdir()
    secret = vault / "clip.mp4"
    secret.write_bytes(bytes(b ^ 0xFF for b in data))
    st = video.stat()
    os.utime(secret, ns=(st.st_atime_ns, st.st_mtime_ns))
    proc, url = start_serve(ix, "--token", "s3cret")
    try:
        hits = json.loads(call(url, "/api/search?q=a+picture&k=10")[2])["results"]
        moment = next(h["id"] for h in hits if h["relpath"] == "album/clip.mp4")
        assert call(url, f"/api/video/{moment}")[2] == data  # played before the swap
        (lib / "album").rename(lib / "album.old")
        (lib / "album").symlink_to(vault)
        status, _, body = call(url, f"/api/video/{moment}")
        assert status == 409 and secret.read_bytes() not in body, (status, body[:200])
        assert b"symbolic link" in body
        assert call(url, f"/api/image/{moment}?size=64")[0] == 409  # the moment's frame: same check
    finally:
        stop(proc)


@pytest.mark.slow
def test_dupes_never_says_to_keep_a_file_it_lists_to_be_rid_of_elsewhere(tmp_path, tiny_model):
    """A video's scenes are in different groups: one of a larger photo (the photo kept, the video listed besides
    it) and one of a smaller photo (the video kept, the photo listed). A script removing the files besides the
    ones to keep removed the video and the small photo: the second scene was lost."""
    lib, ix = tmp_path / "lib", tmp_path / "ix"
    make_video(lib / "clip.mp4", [(42, 4), (44, 4)], drift=False)
    Image.fromarray(scene_frame(42, (320, 180))).save(lib / "big.png")
    Image.fromarray(scene_frame(44, (120, 68))).save(lib / "small.png")
    index_json(ix, lib, "--model", tiny_model, "--device", "cpu")
    for tier in ("near", "similar"):
        groups = json.loads(run("dupes", "--tier", tier, "--json", "--index", ix).stdout)
        kept = {i["path"] for g in groups for i in g["items"] if i["keep"]}
        rid = {i["path"] for g in groups for i in g["items"] if not i["keep"]}
        assert not kept & rid, (tier, [[(os.path.basename(i["path"]), i["keep"]) for i in g["items"]] for g in groups])
    text = run("dupes", "--index", ix).output  # near: big.png and clip.mp4 kept, small.png alone to be rid of
    assert "2 groups, 1 file besides the ones to keep" in text, text


@pytest.mark.slow
def test_tag_counts_a_video_once_as_info_does(tmp_path, tiny_model):
    """Each moment of a video is tagged, but `tag` said "5 tags on 5 images" for 2 photos and a video of 3 moments
    that `info` calls 3 images: a video is one image of the summary, and one tag of each label it has."""
    lib, ix = tmp_path / "lib", tmp_path / "ix"
    make_images(lib, 2)
    make_video(lib / "clip.mp4", [(41, 4), (42, 4), (43, 4)], drift=False)
    index_json(ix, lib, "--model", tiny_model, "--device", "cpu")
    assert json.loads(run("info", "--index", ix, "--json").stdout)["images"] == 3
    with sqlite3.connect(ix / "catalog.db") as conn:
        assert conn.execute("select count(*) from files where relpath = 'clip.mp4'").fetchone()[0] > 1  # moments
    (tmp_path / "labels.txt").write_text("a thing\n")
    result = json.loads(run("tag", "--labels-file", tmp_path / "labels.txt", "--threshold", "0", "--index", ix,
                            "--device", "cpu", "--json").stdout)
    assert (result["images"], result["tags"], result["per_label"]) == (3, 3, {"a thing": 3}), result
    assert "3 tags on 3 images" in run("tag", "--labels-file", tmp_path / "labels.txt", "--threshold", "0", "--index",
                                       ix, "--device", "cpu").output
    # `tags` and `info` counted the tag rows, one a moment: "5  a thing" after "3 tags on 3 images" (walk3)
    assert json.loads(run("tags", "--index", ix, "--json").stdout) == [{"label": "a thing", "images": 3}]
    assert json.loads(run("info", "--index", ix, "--json").stdout)["tags"] == {"a thing": 3}


def test_a_timestamp_of_any_number_a_server_may_send():
    """video.timestamp prints a moment's start; the CLI prints a server's `t` with it too. Floor division printed
    -5 s as "-1:59:55", and a time that is not finite raised (int(inf))."""
    from alignsearch.media.video import timestamp

    assert [timestamp(t) for t in (None, 0, 42.9, 3600, 5025)] == ["", "0:00", "0:42", "1:00:00", "1:23:45"]
    assert timestamp(-5) == "-0:05" and timestamp(-3725.5) == "-1:02:05"
    assert timestamp(float("inf")) == timestamp(float("-inf")) == timestamp(float("nan")) == ""
    assert timestamp(1e12) == "277777777:46:40"


def test_a_file_without_ftyp_is_quicktime_and_a_leading_uuid_box_is_stepped_over(tmp_path):
    """A file whose first box is `mdat` or `uuid` has no ftyp. With mdat (or moov) first it is QuickTime as it was
    before ftyp (file(1): "Apple QuickTime movie"): no brand in it says MP4, and a movie box holds none, so it stays
    video/quicktime (Chromium plays it under that type; a browser that refuses it gets the moment's picture). A
    leading `uuid` box (a vendor's extension) made a video FFmpeg and Chromium play no video at all (404): it is now
    stepped over by its size, as FFmpeg's probe does, and the box after it decides: an ftyp's brand, else QuickTime."""
    import struct

    from alignsearch.media.video import SNIFF_BYTES, container_type
    from helpers import decoded_frames, make_fragmented_mp4, top_level_boxes

    data = make_video(tmp_path / "src.mp4", [(1, 1)], drift=False).read_bytes()
    boxes = top_level_boxes(data)
    assert [kind for kind, _, _ in boxes] == [b"ftyp", b"free", b"mdat", b"moov"]
    _, at, size = boxes[2]
    # the mdat grown back over the ftyp and free boxes: the chunk offsets (absolute) still point at the frames
    mdat_first = tmp_path / "mdat-first.mp4"
    mdat_first.write_bytes(struct.pack(">I", at + size) + b"mdat" + data[8:])
    uuid_first = tmp_path / "uuid-first.mp4"  # the ftyp box (32 bytes) retyped: a uuid box, then free, mdat, moov
    uuid_first.write_bytes(data[:4] + b"uuid" + data[8:])
    frag = make_fragmented_mp4(tmp_path / "frag.mp4").read_bytes()
    uuid_ftyp = tmp_path / "uuid-ftyp.mp4"  # a 24-byte uuid box before an isom MP4's ftyp
    uuid_ftyp.write_bytes(struct.pack(">I", 24) + b"uuid" + bytes(range(16)) + frag)
    assert [decoded_frames(p) for p in (mdat_first, uuid_first, uuid_ftyp)] == [10, 10, 3]  # FFmpeg plays each
    got = [container_type(p.read_bytes()[:SNIFF_BYTES]) for p in (mdat_first, uuid_first, uuid_ftyp)]
    assert got == ["video/quicktime", "video/quicktime", "video/mp4"]
    uuid = struct.pack(">I", 24) + b"uuid" + b"\0" * 16
    assert container_type(uuid + b"\0\0\0\x18ftypheic\0\0\0\0mif1heic") is None  # an image's brand behind it
    assert container_type(uuid + b"\0\0\0\x08ABCD" + b"\0" * 32) is None  # no box known after it
    assert container_type(b"\0\0\x10\x00uuid" + b"\0" * 56) is None  # the box after it unread: nothing says video
    assert container_type(uuid + b"\0\0\x10\x00moov\0\0\0\x6cmvhd") == "video/quicktime"


def test_a_uuid_box_larger_than_the_first_bytes_is_stepped_over_in_the_file(tmp_path):
    """A vendor's uuid box (XMP metadata, 4 KiB here; one with a 64-bit size too) before an MP4's ftyp: the first
    SNIFF_BYTES reach 56 bytes past its header, so the box after it was never read and the video, which FFmpeg
    plays, was refused (None: 404). sniff steps over it in the file; a box claiming more than the file holds leaves
    nothing to judge."""
    import struct

    from alignsearch.media.video import SNIFF_BYTES, container_type, sniff
    from helpers import decoded_frames, make_fragmented_mp4

    frag = make_fragmented_mp4(tmp_path / "frag.mp4").read_bytes()
    xmp = struct.pack(">I", 4096) + b"uuid" + bytes(range(16)) + b"<x:xmpmeta/>".ljust(4096 - 24, b" ")
    large = struct.pack(">I", 1) + b"uuid" + struct.pack(">Q", 40) + bytes(24)  # largesize: 40 bytes in all
    cases = {"xmp.mp4": xmp + frag, "large.mp4": large + frag, "free-then-xmp.mp4": b"\0\0\0\x08free" + xmp + frag,
             "past-the-end.mp4": struct.pack(">I", 1 << 30) + b"uuid" + bytes(200)}
    types = {}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        fd = os.open(tmp_path / name, os.O_RDONLY)
        try:
            types[name] = sniff(fd)
        finally:
            os.close(fd)
    assert types == {"xmp.mp4": "video/mp4", "large.mp4": "video/mp4", "free-then-xmp.mp4": "video/mp4",
                     "past-the-end.mp4": None}
    assert [decoded_frames(tmp_path / n) for n in ("xmp.mp4", "large.mp4", "free-then-xmp.mp4")] == [3, 3, 3]
    assert container_type((xmp + frag)[:SNIFF_BYTES]) is None  # what the first bytes alone said (the 404)


def test_a_containers_type_is_read_from_its_signature():
    """container_type (what `serve` sends a video as): each container's own signature, whatever the bytes after it;
    a head too short to say, or of anything else (a JPEG, a PNG, text, an MP3), is no video."""
    from alignsearch.media.video import container_type

    ebml = b"\x1a\x45\xdf\xa3\xa3\x42\x86\x81\x01\x42\xf7\x81\x01\x42\xf2\x81\x04\x42\xf3\x81\x08\x42\x82"
    cases = [(b"\0\0\0\x20ftypisom\0\0\2\0", "video/mp4"), (b"\0\0\0\x1cftypmp42", "video/mp4"),
             (b"\0\0\0\x14ftypqt  \0\0\2\0", "video/quicktime"), (b"\0\0\x01\x00moov\0\0\0\x6cmvhd", "video/quicktime"),
             (ebml + b"\x84webm\x42\x87", "video/webm"), (ebml + b"\x88matroska", "video/x-matroska"),
             (ebml + b"\x40\x04webm", "video/webm"),  # the size written on two bytes, as EBML allows
             (b"RIFF\x10\0\0\0AVI LIST", "video/x-msvideo"),
             (b"\0\0\0\x18ftypheic\0\0\0\0mif1heic", None), (b"\0\0\0\x1cftypavif\0\0\0\0avifmif1", None),
             (b"\0\0\0\x18ftypmif1\0\0\0\0", None), (b"\0\0\0\x18ftyp", None),  # a still image's brand; no brand
             (b"RIFF\x10\0\0\0WAVEfmt ", None), (ebml + b"\x88matros", None), (ebml + b"\x84avi1", None),
             (ebml[:4], None), (b"\xff\xd8\xff\xe0\0\x10JFIF", None), (b"\x89PNG\r\n\x1a\n", None),
             (b"ID3\x04\0\0\0\0\0\0", None), (b"ftyp", None), (b"", None), (b"<html>ftypisom", None)]
    assert [(head, container_type(head)) for head, _ in cases] == cases


def test_an_mp4s_type_is_its_brands_behind_a_leading_free_box(tmp_path):
    """A fragmented MP4 (isom) with an 8-byte `free` (or `skip`, `wide`) box before its ftyp: FFmpeg decodes it (its
    fragments' offsets are their own), and container_type called it QuickTime from the box alone, so `serve` sent an
    .mp4 it had sent as video/mp4 as video/quicktime, which Firefox refuses; a HEIC behind one was served as a video.
    A padding box's size steps to the next box; where that lies past the bytes read, QuickTime as before."""
    import struct

    from alignsearch.media.video import SNIFF_BYTES, container_type
    from helpers import decoded_frames, make_fragmented_mp4

    made = make_fragmented_mp4(tmp_path / "frag.mp4")
    for box in (b"free", b"skip", b"wide"):
        padded = tmp_path / f"{box.decode()}.mp4"
        padded.write_bytes(struct.pack(">I", 8) + box + made.read_bytes())
        assert decoded_frames(padded) == 3  # a video FFmpeg plays
        assert container_type(padded.read_bytes()[:SNIFF_BYTES]) == "video/mp4", box
    heic = b"\0\0\0\x18ftypheic\0\0\0\0mif1heic"
    assert container_type(b"\0\0\0\x08free" + heic) is None
    assert container_type(b"\0\0\0\x10free" + b"\0" * 8 + b"\0\0\0\x14ftypqt  \0\0\2\0") == "video/quicktime"
    assert container_type(b"\0\0\0\x08wide\0\0\x10\0mdat") == "video/quicktime"  # QuickTime of before ftyp
    assert container_type(b"\0\0\x10\x00free" + b"\0" * 40) == "video/quicktime"  # the next box unread: as before
    assert container_type(b"\0\0\0\x01free" + b"\0" * 40) == "video/quicktime"  # a 64-bit size: not stepped over


def test_a_leading_box_whose_64_bit_size_runs_past_any_offset_is_no_video(tmp_path):
    """sniff added each leading box's size to where the next one starts: a uuid box whose largesize is 2^63 or more
    put that past what pread takes, and the OverflowError reached the server as a 500 with a
    traceback. A box that runs past the file's end leaves nothing after it to judge (None: 404)."""
    import struct

    from alignsearch.media.video import sniff

    huge = struct.pack(">I", 1) + b"uuid" + struct.pack(">Q", 1 << 63) + bytes(100)
    twice = (struct.pack(">I", 1) + b"uuid" + struct.pack(">Q", 1 << 62)) * 2 + bytes(100)
    widest = struct.pack(">I", 1) + b"uuid" + struct.pack(">Q", (1 << 64) - 1) + bytes(100)
    for name, data in (("huge.mp4", huge), ("twice.mp4", twice), ("widest.mp4", widest)):
        (tmp_path / name).write_bytes(data)
        fd = os.open(tmp_path / name, os.O_RDONLY)
        try:
            assert sniff(fd) is None, name
        finally:
            os.close(fd)
