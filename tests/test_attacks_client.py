"""Attacks on the CLI's side of the warm server (surfaces/client.py): whatever answers at a recorded server's
address (a broken server, another program on the port) is searched around in one notice, never read into
memory without bound, and never ends `query` in an unexpected error."""

from __future__ import annotations

import http.server
import json
import threading

import pytest
from helpers import fake_server_record, vector_index

from alignsearch.search import request as search_request
from alignsearch.surfaces import client


def _answering(body: bytes, status: int = 200, index_id: str | None = None):
    """A stand-in server: /healthz answers, every other GET gets body with status (and INDEX_HEADER index_id)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            ok = self.path.startswith("/healthz")
            data = b'{"ok": true}' if ok else body
            self.send_response(200 if ok else status)
            if index_id is not None:
                self.send_header(client.INDEX_HEADER, index_id)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            try:
                self.wfile.write(data)
            except OSError:  # the client stopped reading: what it was sent is over its limit
                pass

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()  # shutdown waits a poll
    return server


def _routed(ix, server):
    notes: list[str] = []
    fake_server_record(ix, server.server_address[1])
    try:
        routed = client.search_via_server(ix, search_request.build(text="a dog", k=3), timeout=10.0,
                                          notice=notes.append)
    finally:
        server.shutdown()
        server.server_close()
    return routed, notes


@pytest.mark.parametrize("status", [200, 400])
def test_json_nested_deeper_than_the_parser_recurses_is_searched_around(tmp_path, status):
    """json.loads raises RecursionError (no ValueError) on a text of 100,000 `[`: it came out of
    search_via_server, and `query` ended in `unexpected RecursionError` (exit 1) instead of searching here."""
    ix = tmp_path / "ix"
    vector_index(ix, 3, 8)
    routed, notes = _routed(ix, _answering(b"[" * 100_000, status))
    assert routed.answer is None and len(notes) == 1 and "did not answer" in notes[0], (routed, notes)


def test_an_answer_over_the_limit_is_not_read_whole(tmp_path, monkeypatch):
    """An answer longer than any search's is refused once MAX_ANSWER_BYTES are read: a stream of 1.5 GB of
    spaces took the process to 4 GB of memory before it was found not to be JSON."""
    monkeypatch.setattr(client, "MAX_ANSWER_BYTES", 1 << 20)
    ix = tmp_path / "ix"
    vector_index(ix, 3, 8)
    hits = [{"path": "x" * 1000, "score": 0.5}] * 2000  # a valid answer, over the (lowered) limit
    server = _answering(json.dumps({"results": hits}).encode(), index_id=client.local_index_id(ix))
    routed, notes = _routed(ix, server)
    assert routed.answer is None and len(notes) == 1 and f"over {1 << 20} bytes" in notes[0], (routed, notes)


@pytest.mark.parametrize("body", [b"[1, 2]", b"NaN", b'{"hits": []}', b'{"results": [{"path": "a.jpg"}]}',
                                  b'{"results": [{"path": "a.jpg", "score": "high"}]}',
                                  b'{"results": [], "plan": [1]}', b'{"results": [{"path": "a", "score": 1, "t": "x"}]}',
                                  b'{"results": [{"path": "a", "score": 1, "t": Infinity}]}',
                                  b'{"results": [{"path": "a", "score": NaN}]}',
                                  b'{"results": [{"path": "a", "score": 1, "similarity": "x"}]}',
                                  b'{"results": [{"path": "a", "score": 1, "parts": [1]}]}',
                                  b'{"results": [{"path": "a", "score": 1, "path_b64": "abc"}]}',
                                  b'{"results": [{"path": "a", "score": 1, "path_b64": "YQBi"}]}'],
                         ids=["list", "number", "no-results", "no-score", "text-score", "plan-list", "text-t",
                              "infinite-t", "nan-score", "text-similarity", "parts-list", "path-b64-not-base64",
                              "path-b64-with-nul"])
def test_an_answer_naming_this_index_that_is_no_search_answer_is_searched_around(tmp_path, body):
    """JSON that names this index (INDEX_HEADER) but is not /api/search's shape was returned as the answer, and
    `query` ended on it in `unexpected TypeError` or `KeyError` (answer["results"], h["score"]:.4f). A path_b64 that
    is not base64 ended `query --paths` in binascii.Error (Incorrect padding); one whose bytes hold a NUL (no file's
    name can) split `query --paths -0`'s list where no path ends."""
    ix = tmp_path / "ix"
    vector_index(ix, 3, 8)
    routed, notes = _routed(ix, _answering(body, index_id=client.local_index_id(ix)))
    assert routed.answer is None and len(notes) == 1 and "not a search's results" in notes[0], (routed, notes)


def test_a_search_answer_naming_this_index_is_taken(tmp_path):
    """The shape check passes what a server answers (so the tests above do not pass by refusing everything)."""
    ix = tmp_path / "ix"
    vector_index(ix, 3, 8)
    answer = {"results": [{"path": "/p/a.jpg", "score": 0.25, "t": None, "duplicates": [3], "similarity": 0.3,
                           "parts": {"keyword_rank": 2}},
                          {"path": "/p/v.mp4", "score": 1, "t": 12.5, "path_b64": "L3Av"}], "plan": {"ann": "flat"}}
    routed, notes = _routed(ix, _answering(json.dumps(answer).encode(), index_id=client.local_index_id(ix)))
    assert routed.answer == answer and notes == [], (routed, notes)


def _asked_in_place_of(ix, pid: int):
    """A query of a new index ix whose record names pid and the port of a stand-in server answering for ix with a
    planted hit: (Routed, notices, the paths the stand-in was asked)."""
    vector_index(ix, 3, 8)
    server = _answering(json.dumps({"results": [{"path": "/planted.jpg", "score": 0.99}]}).encode(),
                        index_id=client.local_index_id(ix))
    sent: list[str] = []
    server.RequestHandlerClass.log_request = lambda handler, *args: sent.append(handler.path)
    notes: list[str] = []
    try:
        fake_server_record(ix, server.server_address[1], pid=pid)
        routed = client.search_via_server(ix, search_request.build(text="a dog", k=3), notice=notes.append)
    finally:
        server.shutdown()
        server.server_close()
    return routed, notes, sent


def test_a_record_whose_process_number_now_names_another_process_sends_it_nothing(tmp_path):
    """A record outlives its server when the machine loses power (no exit removes it); after the reboot its
    pid names another live process, and another program (another user's) may listen at the recorded port. The
    query text and the token were sent there, and an answer naming this index (its id is in the catalog,
    which others may read) was printed as this index's hits. Now the process must hold the socket listening
    at the recorded address: here it does not, so nothing is sent and the search is local."""
    import subprocess
    import sys

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # the number reused
    try:
        routed, notes, sent = _asked_in_place_of(tmp_path / "ix", other.pid)
    finally:
        other.kill()
        other.wait()
    assert routed.answer is None and sent == [], (routed, sent)
    assert len(notes) == 1 and f"process {other.pid} does not listen" in notes[0], notes


def test_a_record_whose_process_is_another_users_sends_it_nothing(tmp_path, monkeypatch):
    """A record's pid that kill(pid, 0) answers EPERM for is another user's process: not the `serve` this user
    started (a record another user wrote is never read), so its number was reused. It was taken as alive, and
    where /proc could not tell which sockets it holds (another user's /proc/PID hidden by a hidepid mount; no
    /proc) the check was skipped: the query and the token went to whatever listened at the recorded port.
    Simulated: a pid /proc does not show (a process gone, as hidepid shows another user's), which kill answers
    EPERM for."""
    import errno
    import os
    import subprocess
    import sys

    hidden = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                                text=True, check=True).stdout)
    real_kill = os.kill

    def kill(pid, sig):
        if pid == hidden:
            raise PermissionError(errno.EPERM, "Operation not permitted")
        return real_kill(pid, sig)

    monkeypatch.setattr(os, "kill", kill)
    routed, notes, sent = _asked_in_place_of(tmp_path / "ix", hidden)
    assert routed.answer is None and sent == [], (routed, sent)
    assert len(notes) == 1 and f"process {hidden} is another user's" in notes[0], notes
    assert not (tmp_path / "ix" / "server.json").exists()  # its server is gone: the notice comes once


@pytest.mark.parametrize("signalled,stopped,holds_port,verdict", [
    ("running", False, True, None),
    ("running", False, None, None),  # /proc cannot tell (no /proc): this user's process is taken at its record
    ("gone", False, None, "gone"),
    ("another user's", False, None, "another user's"),  # hidepid hides its /proc: kill tells
    ("another user's", False, True, "another user's"),
    ("running", True, True, "stopped"),
    ("running", False, False, "not listening"),
])
def test_which_recorded_process_is_asked(signalled, stopped, holds_port, verdict):
    assert client.not_serving(signalled, stopped, holds_port) == verdict


@pytest.mark.parametrize("bound, target, reached", [
    ("127.0.0.1", "127.0.0.1", True), ("0.0.0.0", "127.0.0.1", True), ("::1", "::1", True), ("::", "::1", True),
    ("::ffff:127.0.0.1", "127.0.0.1", True),
    ("::1", "127.0.0.1", False), ("127.0.0.1", "::1", False), ("127.0.0.2", "127.0.0.1", False),
    ("192.168.1.5", "127.0.0.1", False), ("0.0.0.0", "::1", False),
    ("::", "127.0.0.1", False),  # whether [::] takes IPv4 (IPV6_V6ONLY) /proc does not say; serve binds 0.0.0.0 itself
])
def test_a_socket_at_the_recorded_port_is_the_servers_only_at_the_recorded_address(bound, target, reached):
    """client.reaches: a process listening at the recorded port on another address is not the recorded server (a
    connection to the record's address reaches whatever holds that address: tests/test_nonroot_users.py)."""
    import ipaddress

    assert client.reaches(ipaddress.ip_address(bound), ipaddress.ip_address(target)) is reached


def test_proc_net_tcp_addresses_are_read_in_this_machines_byte_order():
    """The addresses of /proc/net/tcp and tcp6, read from a socket of this process's listening at each."""
    import ipaddress
    import os
    import socket
    from pathlib import Path

    for family, host, table in ((socket.AF_INET, "127.0.0.1", "tcp"), (socket.AF_INET6, "::1", "tcp6")):
        try:
            sock = socket.socket(family)
            sock.bind((host, 0))
        except OSError:
            continue  # no IPv6 here
        with sock:
            sock.listen()
            port = sock.getsockname()[1]
            rows = [line.split()[1] for line in Path(f"/proc/self/net/{table}").read_text().splitlines()[1:]]
            address = next(row.rpartition(":")[0] for row in rows if row.endswith(f":{port:04X}"))
            assert client._proc_address(address) == ipaddress.ip_address(host)
            assert client._holds_port(os.getpid(), port, host) is True
            assert client._holds_port(os.getpid(), port, "127.0.0.2" if table == "tcp" else "127.0.0.1") is False


def test_a_dead_server_its_parent_has_not_reaped_is_gone():
    """`serve &` killed with -9 in a shell that has not waited for it is a zombie: kill(pid, 0) answers as for a live
    process, and its record was kept, each query saying "did not answer (Connection refused)" until it was reaped."""
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    from alignsearch.surfaces import client

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        for _ in range(500):  # exited, not reaped: no poll() or wait() until the check
            if Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                break
            time.sleep(0.01)
        assert client._signalled(proc.pid) == client.GONE
    finally:
        proc.wait()
    assert client._signalled(os.getpid()) == client.RUNNING
