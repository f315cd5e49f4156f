"""A run with fewer files to decode than a batch (the usual incremental run, every `index --watch` run) decoded
them in the `index` process: a file that crashes its decoder (a segfault or an abort in a C codec) ended the run,
every run, and the other new files were never indexed. With workers allowed, one worker decodes them now: the
file kills it, is tried again alone, is recorded as failed, and the run goes on (indexer/workers.py)."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time

import pytest

from conftest import index_json, make_images, run
from helpers import deaths, with_dying_decode
from indexer.workers import DIED, workers_for


def test_a_small_run_decodes_in_one_worker_and_nothing_to_decode_starts_none():
    assert workers_for(4, 3, batch_size=32) == 1  # a small run: one worker, never this process
    assert workers_for(4, 33, batch_size=32) == 4
    assert workers_for(4, 0, batch_size=32) == 0  # nothing to decode: no worker to start
    assert workers_for(0, 3, batch_size=32) == 0  # --workers 0: this process, as the user asked
    assert workers_for(0, 100, batch_size=32) == 0


def _index_dying(ix, noted, *args) -> dict:
    proc = with_dying_decode(noted, "index", *args, "--index", ix, "--device", "cpu", "--workers", "2", "--json")
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-3000:])
    return json.loads(proc.stdout)


@pytest.mark.slow
def test_a_small_run_with_a_file_that_crashes_the_decoder_indexes_the_rest(tmp_path, tiny_model):
    lib, ix, noted = tmp_path / "lib", tmp_path / "ix", tmp_path / "deaths"
    make_images(lib, 3)
    index_json(ix, lib, "--model", tiny_model, "--device", "cpu")
    make_images(tmp_path / "new", 2, seed=1)
    (tmp_path / "new" / "img000.png").rename(lib / "new.png")
    (tmp_path / "new" / "img001.jpg").rename(lib / "die.jpg")

    first = _index_dying(ix, noted)  # exit 9 before: the index process itself decoded die.jpg
    died = deaths(noted)
    assert 2 <= died <= 4, died
    assert (first["added"], first["failed"]) == (1, 1), first
    listed = json.loads(run("info", "--failed", "--json", "--index", ix).stdout)["failed_files"]
    assert [(f["path"].rsplit("/", 1)[-1], f["reason"]) for f in listed] == [("die.jpg", DIED)]
    hits = json.loads(run("query", "anything", "-k", "100", "--json", "--index", ix).stdout)["results"]
    assert sorted(h["path"].rsplit("/", 1)[-1] for h in hits) == ["img000.png", "img001.jpg", "img002.jpg",
                                                                  "new.png"]
    again = _index_dying(ix, noted)
    assert (again["added"], again["updated"], again["failed"]) == (0, 0, 0) and deaths(noted) == died, again


@pytest.mark.slow
def test_a_watch_run_with_a_file_that_crashes_the_decoder_goes_on_watching(tmp_path, tiny_model):
    """Every `index --watch` run is small: the watch process itself decoded, and the crash ended the watch."""
    lib, ix, noted = tmp_path / "lib", tmp_path / "ix", tmp_path / "deaths"
    make_images(lib, 2)
    index_json(ix, lib, "--model", tiny_model, "--device", "cpu")
    proc = with_dying_decode(noted, "index", "--index", ix, "--device", "cpu", "--workers", "2", "--watch", "--json",
                             popen=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    runs, errors = [], []
    readers = [threading.Thread(target=lambda: runs.extend(json.loads(line) for line in proc.stdout)),
               threading.Thread(target=lambda: errors.extend(proc.stderr))]
    for t in readers:
        t.start()

    def until(ready, what):
        end = time.monotonic() + 120
        while not ready():
            assert proc.poll() is None, f"the watch ended ({proc.returncode}): {errors[-20:]}"
            assert time.monotonic() < end, f"no {what}: runs {runs}, stderr {errors[-20:]}"
            time.sleep(0.05)

    try:
        until(lambda: any("Ctrl-C stops" in e for e in errors), "watch")
        make_images(tmp_path / "new", 2, seed=1)
        (tmp_path / "new" / "img001.jpg").rename(lib / "die.jpg")
        (tmp_path / "new" / "img000.png").rename(lib / "new.png")
        until(lambda: sum(r.get("added", 0) for r in runs) == 1 and sum(r.get("failed", 0) for r in runs) == 1,
              "run that indexed new.png and recorded die.jpg")
        died = deaths(noted)
        assert 2 <= died <= 4, died
        make_images(tmp_path / "more", 1, seed=2)
        (tmp_path / "more" / "img000.png").rename(lib / "more.png")  # the watch goes on, die.jpg not tried again
        until(lambda: sum(r.get("added", 0) for r in runs) == 2, "run that indexed more.png")
        assert deaths(noted) == died and sum(r.get("failed", 0) for r in runs) == 1, runs
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
            for t in readers:
                t.join(10)
    listed = json.loads(run("info", "--failed", "--json", "--index", ix).stdout)["failed_files"]
    assert [(f["path"].rsplit("/", 1)[-1], f["reason"]) for f in listed] == [("die.jpg", DIED)]
