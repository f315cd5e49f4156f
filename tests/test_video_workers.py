"""A video's frames were decoded by FFmpeg in a thread of the `index` process: a video that crashes its codec (a
segfault or an abort in C) ended every run and every `index --watch`, never recorded, and the photos after it were
never committed. With workers allowed, each video is decoded in a worker process (indexer/videos.py,
indexer.workers.stream_in_process): one that dies is tried once more in a fresh worker, then the video is recorded
as failed with the reason a photo that kills its worker gets; --workers 0 still decodes in a thread here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_images, run
from helpers import deaths, index_with_dying_video_decode, make_video, video_decode_pids
from indexer.workers import DIED


@pytest.mark.slow
def test_a_video_that_crashes_its_decoder_is_recorded_and_the_rest_indexed(tmp_path, tiny_model):
    lib, ix, noted = tmp_path / "lib", tmp_path / "ix", tmp_path / "deaths"
    make_images(lib, 1)
    make_video(lib / "good.mp4", [(1, 2), (2, 2)])
    make_video(lib / "die.mp4", [(3, 2)])
    make_video(lib / "good2.mp4", [(4, 2)])

    first = index_with_dying_video_decode(noted, ix, lib, "--model", tiny_model, "--workers", "2")  # exit 9 before
    assert deaths(noted) == 2  # tried once more in a fresh worker
    assert (first["added"], first["failed"]) == (3, 1), first
    listed = json.loads(run("info", "--failed", "--json", "--index", ix).stdout)["failed_files"]
    assert [(f["path"].rsplit("/", 1)[-1], f["reason"]) for f in listed] == [("die.mp4", DIED)]
    hits = json.loads(run("query", "anything", "-k", "100", "--json", "--index", ix).stdout)["results"]
    assert {h["path"].rsplit("/", 1)[-1] for h in hits} == {"img000.png", "good.mp4", "good2.mp4"}
    pids = video_decode_pids(noted)
    (index_pid,) = pids["-"]
    assert pids["good.mp4"] and index_pid not in pids["good.mp4"] + pids["die.mp4"], pids
    assert pids["good.mp4"] == pids["good2.mp4"], pids  # one worker reads the run's videos, one after the other

    again = index_with_dying_video_decode(noted, ix)
    assert (again["added"], again["updated"], again["failed"]) == (0, 0, 0) and deaths(noted) == 2, again
    assert run("verify", "--index", ix).exit_code == 0


@pytest.mark.slow
def test_workers_0_decodes_videos_in_the_index_process(tmp_path, tiny_model):
    lib, ix, noted = tmp_path / "lib", tmp_path / "ix", tmp_path / "deaths"
    make_video(lib / "good.mp4", [(1, 2), (2, 2)])
    s = index_with_dying_video_decode(noted, ix, lib, "--model", tiny_model, "--workers", "0")
    assert (s["added"], s["failed"]) == (1, 0) and s["times"]["extra"]["moments"] == 2, s
    pids = video_decode_pids(noted)
    assert pids["good.mp4"] == pids["-"], pids


STREAM_KILLED_MID_MOMENT = r"""
import os, signal, sys, time
sys.path.insert(0, sys.argv[1])
import helpers
from indexer.workers import StreamWorker, WorkerDied
with StreamWorker(4) as worker:
    stream = worker.stream(helpers.big_moments_then_wait, (8 << 20,))
    next(stream)
    time.sleep(1)  # encoding that moment: the worker is part way through handing over the next ones
    os.kill(worker.process.pid, signal.SIGKILL)  # a crash in its codec, the OOM killer
    try:
        for _ in stream:
            pass
    except WorkerDied as exc:
        print("died:", exc)
"""


@pytest.mark.slow
def test_a_video_worker_killed_while_it_hands_a_moment_over_is_noticed_not_waited_for():
    """A moment larger than a pipe holds (every one of align-base's crops, 250 KB) is written a part at a time,
    while the index process encodes the ones before. A worker that died then left half a moment in the pipe: the
    index process read it and waited for the rest for ever (its own copy of the pipe's write end kept it open),
    holding the writer lock."""
    proc = subprocess.run([sys.executable, "-c", STREAM_KILLED_MID_MOMENT, str(Path(__file__).parent)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "died: the worker ended with exit code -9", (proc.stdout, proc.stderr[-2000:])


def test_a_stream_worker_that_could_not_start_closes_without_an_error(monkeypatch):
    """The process could not be started (no memory for it, a limit on processes): the start's error is raised,
    and close() (a `with` block's end) found a process never started and raised AttributeError over it."""
    import multiprocessing.process

    from indexer.workers import StreamWorker

    def refuse(self):
        raise OSError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", refuse)
    with pytest.raises(OSError, match="temporarily unavailable"):
        with StreamWorker(2) as worker:
            worker.start()
    assert worker.process is None
    worker.close()
