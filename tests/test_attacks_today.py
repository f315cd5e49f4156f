"""Attacks on the guarantees added on 5 December: vector store compaction (indexer/compact.py), the sweep of
stale temporaries (atomic.remove_stale), the watch on a hung server (client._watched) and the retry of files
made readable again (scan._readable_again). Each test tries to break one claim from a side its own tests
did not try."""

from __future__ import annotations

import http.server
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from helpers import KILL_HOOK, as_nobody, fake_server_record, vector_index

from alignsearch import atomic
from alignsearch.search import request as search_request


def _aged(path: Path, seconds: float = 120.0) -> Path:
    past = time.time() - seconds
    os.utime(path, (past, past), follow_symlinks=False)
    return path


def _names(folder: Path) -> dict:
    """Every file under folder (relative name -> bytes), links not followed."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- stale temporaries (atomic.remove_stale) --------------------------------------------------------------

SWAP_KILLED = KILL_HOOK + """
from pathlib import Path
from alignsearch import atomic
with atomic.replacing_dir(sys.argv[3]) as new:
    (Path(new) / "weights.bin").write_bytes(b"v2")
"""


def test_a_swap_killed_before_the_users_files_moved_over_keeps_them_from_the_sweep(tmp_path):
    """replacing_dir swaps the new folder in and then moves the user's own files from the previous folder
    into it. Killed between the two (or with another process's sweep running meanwhile), the previous folder
    holds the user's files: remove_stale must not take it for a killed write's leftover. With RENAME_EXCHANGE
    it lay under the new folder's `.NAME.XXXX.new` name, unlocked, and the next export or finetune of OUT
    deleted the user's notes and checkpoint with it."""
    out = tmp_path / "tuned"
    out.mkdir()
    (out / "weights.bin").write_bytes(b"v1")
    (out / "NOTES.md").write_text("the user's notes")
    (out / "checkpoint").mkdir()
    (out / "checkpoint" / "state.pt").write_bytes(b"a checkpoint saved separately")
    proc = subprocess.run([sys.executable, "-c", SWAP_KILLED, "alignsearch.atomic:_swap", "after", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert (out / "weights.bin").read_bytes() == b"v2"  # swapped, the user's files not yet moved over
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".tuned.")]
    assert len(left) == 1, left
    _aged(left[0])  # the user's folder: its own mtime is whenever they last changed it
    atomic.remove_stale(out)  # the next finetune of OUT, its first step
    kept = _names(out) | _names(left[0]) if left[0].exists() else _names(out)
    assert kept.get("NOTES.md") == b"the user's notes", sorted(kept)
    assert kept.get("checkpoint/state.pt") == b"a checkpoint saved separately", sorted(kept)


@pytest.fixture
def shared():
    """A folder every user can write, not sticky (so any user may rename any entry in it)."""
    if os.geteuid() != 0:
        pytest.skip("acting as another user needs root to start that user's process")
    base = Path(tempfile.mkdtemp(prefix="alignsearch-shared-"))
    base.chmod(0o755)
    (base / "shared").mkdir()
    (base / "shared").chmod(0o777)
    yield base / "shared"
    shutil.rmtree(base)


def test_another_user_cannot_have_the_sweep_delete_what_they_renamed_into_a_leftovers_name(shared):
    """In a folder others may write (without the sticky bit) another user can rename any of this user's
    entries, though not delete what is inside them. Renamed to `.OUT.XXXX.new` (or `.tmp`) it is this
    user's, unlocked and old: the sweep would do the deleting for them."""
    precious = shared / "photos-2019"  # root's folder of root's files, beside where root exports
    precious.mkdir()
    (precious / "a.jpg").write_bytes(b"root's photo")
    report = shared / "report.parquet"
    report.write_bytes(b"root's earlier export")
    for path in (precious / "a.jpg", precious, report):
        _aged(path)
    out = shared / "OUT"
    subprocess.run(["sh", "-c", 'mv "$1" "$2" && mv "$3" "$4"', "rename", str(precious), str(shared / ".OUT.x1y2.new"),
                    str(report), str(shared / ".OUT.z3w4.tmp")], check=True, preexec_fn=as_nobody)
    assert atomic.remove_stale(out) == 0
    assert (shared / ".OUT.x1y2.new" / "a.jpg").read_bytes() == b"root's photo"
    assert (shared / ".OUT.z3w4.tmp").read_bytes() == b"root's earlier export"


def test_a_leftover_replaced_by_a_link_between_its_stat_and_its_open_is_not_followed(tmp_path, monkeypatch):
    out = tmp_path / "OUT"
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("the user's")
    left = _aged(Path(tempfile.mkdtemp(prefix=".OUT.", suffix=".new", dir=tmp_path)))
    real_open = os.open

    def swapped_open(path, flags, *args, **kwargs):  # the race, won at the worst moment
        if str(path) == str(left) and not os.path.islink(left):
            os.rmdir(left)
            os.symlink(victim, left)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(atomic.os, "open", swapped_open)
    assert atomic.remove_stale(out) == 0
    monkeypatch.undo()
    assert left.is_symlink() and (victim / "keep").read_text() == "the user's"


SLOW_WRITE = """
import sys, time
from pathlib import Path
from alignsearch import atomic
with atomic.replacing_dir(sys.argv[1]) as new:
    (Path(new) / "img_emb").mkdir()
    (Path(new) / "img_emb" / "img_emb_0.npy").write_bytes(b"x" * 1000)
    print(new, flush=True)
    sys.stdin.readline()  # writing, until the test has swept
"""


def test_a_concurrent_write_of_the_same_out_in_another_process_survives_the_sweep(tmp_path):
    """Another export of OUT at work when this one sweeps: its folder (made old, as a long export's own mtime
    is) is locked, so it stays, and that export finishes whole."""
    out = tmp_path / "OUT"
    child = subprocess.Popen([sys.executable, "-c", SLOW_WRITE, str(out)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        at_work = Path(child.stdout.readline().strip())
        _aged(at_work)
        killed = _aged(Path(tempfile.mkdtemp(prefix=".OUT.", suffix=".new", dir=tmp_path)))
        assert atomic.remove_stale(out) == 1 and not killed.exists() and at_work.exists()
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.wait(timeout=60) == 0
    finally:
        child.kill()
        child.wait()
    assert _names(out) == {"img_emb/img_emb_0.npy": b"x" * 1000}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".OUT.")] == []


# -- a hung server (client._watched) ----------------------------------------------------------------------


class _Silent(http.server.BaseHTTPRequestHandler):
    """Answers /healthz at once; a search gets its status line and headers, then its body a byte at a time,
    never finished (`trickle`), or nothing at all."""

    trickle = True

    def do_GET(self):
        if self.path.startswith("/healthz"):
            body = b'{"ok": true}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        if self.trickle:
            self.send_response(200)
            self.send_header("Content-Length", "1000000")
            self.end_headers()
        try:
            for _ in range(600):
                time.sleep(0.2)
                if self.trickle:
                    self.wfile.write(b" ")
                    self.wfile.flush()
        except OSError:
            pass

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("trickle", [False, True], ids=["silent", "trickling"])
def test_a_server_that_answers_healthz_but_never_the_search_is_given_up_on_at_the_timeout(tmp_path, trickle):
    """The probe finds the server alive each time, so the query waits on, but no longer than its timeout:
    a search that never ends (nothing sent, or a byte now and then: each read then beats the socket's own
    timeout) is given up on and searched locally."""
    from alignsearch.surfaces import client

    ix = tmp_path / "ix"
    vector_index(ix, 3, 8)
    handler = type("Handler", (_Silent,), {"trickle": trickle})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    fake_server_record(ix, port)
    notes: list[str] = []
    start = time.monotonic()
    try:
        routed = client.search_via_server(ix, search_request.build(text="a dog", k=3), timeout=2.0,
                                          notice=notes.append, probe_every=0.3)
    finally:
        server.shutdown()
        server.server_close()
    took = time.monotonic() - start
    assert routed.answer is None and len(notes) == 1 and "searching locally" in notes[0], (routed, notes)
    assert took < 2.0 + client.CONTACT_TIMEOUT + 1.5, took
