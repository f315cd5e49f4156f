"""What others can write or read, trusted no further than it should be (issue 23, items 7-8 and 10-14): an
ancestor index or an export cache that another user owns or can write, the proxy the CLI must not use for
the loopback server, OpenVINO's telemetry, a broken pipe that is not stdout's, control characters in names
printed to a terminal, and `serve` on an index it may not write (with its Host check, HEAD and /docs).

The attacker's half runs as another user (files chowned to 65534, nobody) or with root's permission
bypass dropped (helpers.alignsearch(..., unprivileged=True))."""

import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import make_images, run
from helpers import alignsearch, call, can_drop_dac, start_serve, stop, vector_index

from alignsearch import errors

NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")


def chown_tree(path: Path, uid: int) -> None:
    for folder, dirs, files in os.walk(path):
        os.chown(folder, uid, uid)
        for name in files:
            os.chown(os.path.join(folder, name), uid, uid)


# -- 7: index discovery does not walk into another user's index ----------------------------------------
@pytest.fixture
def shared(tmp_path) -> Path:
    """A world-writable folder with the sticky bit (as /tmp or /srv/shared) holding an index, and a subfolder of it.
    Without the sticky bit the index in it is refused whoever owns it: test_an_index_in_a_folder_others_can_write."""
    shared = tmp_path / "shared"
    vector_index(shared / ".alignsearch", 5, 8)
    (shared / "work").mkdir()
    os.chmod(shared, 0o1777)
    return shared


def _env_without_index() -> dict:
    return {k: v for k, v in os.environ.items() if k != "ALIGNSEARCH_INDEX"}


@pytest.mark.slow
@needs_root
def test_discovery_ignores_an_ancestor_index_of_another_user(shared):
    chown_tree(shared / ".alignsearch", NOBODY)
    proc = alignsearch("info", "--json", cwd=shared / "work", env=_env_without_index())
    assert proc.returncode == 3, proc.stdout  # no index found: nobody's is not this user's
    notes = [line for line in proc.stderr.splitlines() if line.startswith("note: ignoring the index")]
    assert len(notes) == 1 and str(shared / ".alignsearch") in notes[0] and "another user" in notes[0], proc.stderr
    # An explicit choice stays one: --index and ALIGNSEARCH_INDEX
    explicit = alignsearch("info", "--json", "--index", shared / ".alignsearch", cwd=shared / "work")
    assert explicit.returncode == 0 and json.loads(explicit.stdout)["images"] == 5, explicit.stderr
    by_env = alignsearch("info", "--json", cwd=shared / "work",
                         env={"ALIGNSEARCH_INDEX": str(shared / ".alignsearch")})
    assert by_env.returncode == 0 and "ignoring" not in by_env.stderr, by_env.stderr


@pytest.mark.slow
def test_discovery_ignores_an_index_others_can_write_and_finds_its_own(shared):
    own = alignsearch("info", "--json", cwd=shared / "work", env=_env_without_index())
    assert own.returncode == 0 and json.loads(own.stdout)["images"] == 5, own.stderr  # this user's: found
    os.chmod(shared / ".alignsearch", 0o777)
    proc = alignsearch("info", "--json", cwd=shared / "work", env=_env_without_index())
    assert proc.returncode == 3 and "writable by every user" in proc.stderr, proc.stderr
    os.chmod(shared / ".alignsearch", 0o755)
    os.chmod(shared / ".alignsearch" / "catalog.db", 0o666)  # the catalog alone is enough to rewrite it
    proc = alignsearch("info", "--json", cwd=shared / "work", env=_env_without_index())
    assert proc.returncode == 3 and "catalog.db is writable by every user" in proc.stderr, proc.stderr


# -- 8: an export cache others can write is not used --------------------------------------------------
@pytest.fixture
def exported(tmp_path, monkeypatch, tiny_model):
    """The tiny model's towers exported into a cache of this test's own; returns (cache root, model info)."""
    from alignsearch.encoders.model import Encoder

    monkeypatch.setenv("ALIGNSEARCH_CACHE", str(tmp_path / "cache"))
    enc = Encoder(str(tiny_model), device="cpu")
    enc.encode_text(["a dog"])
    assert enc.plan.backend == "onnx", enc.plan
    return tmp_path / "cache", enc.describe()


def _model_folder(cache: Path) -> Path:
    (folder,) = (cache / "onnx").iterdir()
    return folder


def _cache_is_refused(info, tiny_model, why: str) -> None:
    from alignsearch.encoders import cached
    from alignsearch.encoders.backend import EncoderOptions
    from alignsearch.search.engine import onnx_cache_status
    from alignsearch.encoders.model import Encoder

    assert cached.text_encoder(info) is None  # a cold text query does not run the cached tower
    assert cached.find(str(tiny_model), info, EncoderOptions(device="cpu")) is None
    assert onnx_cache_status(info)["path"] is None and why in onnx_cache_status(info)["note"]
    enc = Encoder(str(tiny_model), device="cpu")
    enc.encode_text(["a dog"])
    assert enc.plan.backend == "torch" and "not private" in enc.plan.why and why in enc.plan.why, enc.plan


@pytest.mark.slow
def test_a_cache_folder_others_can_write_is_refused_and_torch_runs(exported, tiny_model):
    from alignsearch.encoders import cached

    cache, info = exported
    assert cached.text_encoder(info) is not None  # private: used
    folder = _model_folder(cache)
    os.chmod(folder, 0o777)
    _cache_is_refused(info, tiny_model, "writable by every user")
    assert not any(folder.glob(".*.tmp"))  # and nothing was written into it
    os.chmod(folder, 0o700)
    os.chmod(cache, 0o770)  # the root, writable by a group that is not this user's own
    os.chown(cache, os.geteuid(), 12345)
    _cache_is_refused(info, tiny_model, "writable by its group")


@pytest.mark.slow
@needs_root
def test_a_cache_of_another_user_is_refused(exported, tiny_model):
    cache, info = exported
    chown_tree(_model_folder(cache), NOBODY)
    _cache_is_refused(info, tiny_model, "belongs to another user")


@needs_root
def test_a_cache_under_a_folder_another_user_owns_is_refused(tmp_path, monkeypatch):
    """A folder above the cache that another user owns (or that every user can write, without the sticky
    bit) lets them rename the cache away and put theirs in its place."""
    from alignsearch.encoders.backend import cache_untrusted

    parent = tmp_path / "theirs"
    parent.mkdir()
    monkeypatch.setenv("ALIGNSEARCH_CACHE", str(parent / "cache"))
    assert cache_untrusted() is None
    os.chown(parent, NOBODY, NOBODY)
    assert "belongs to another user" in cache_untrusted()
    os.chown(parent, 0, 0)
    os.chmod(parent, 0o777)
    assert "writable by every user" in cache_untrusted()
    os.chmod(parent, 0o1777)  # sticky, as /tmp: others cannot move what is ours
    assert cache_untrusted() is None


def test_new_cache_folders_are_private_whatever_the_umask(tmp_path, monkeypatch):
    from alignsearch.encoders.backend import cache_untrusted, make_cache_dir

    monkeypatch.setenv("ALIGNSEARCH_CACHE", str(tmp_path / "a" / "cache"))
    old = os.umask(0o002)
    try:
        make_cache_dir(tmp_path / "a" / "cache" / "onnx" / "model")
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "a" / "cache" / "onnx" / "model").st_mode & 0o777 == 0o700
    assert cache_untrusted(tmp_path / "a" / "cache" / "onnx" / "model") is None


# -- 10: the CLI never sends the token to a proxy --------------------------------------------------------
class Recorder:
    """A TCP listener that records what each connection sent and answers `answer` (an HTTP response)."""

    def __init__(self, answer: bytes):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.received: list[bytes] = []
        self.answer = answer
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                data = b""
                try:
                    while b"\r\n\r\n" not in data and (chunk := conn.recv(65536)):
                        data += chunk
                    self.received.append(data)
                    conn.sendall(self.answer)
                except OSError:
                    pass

    def close(self):
        self.sock.close()


def test_the_client_never_uses_a_proxy_for_the_local_server(tmp_path):
    body = json.dumps({"index_id": "x", "index_dir": str(tmp_path)}).encode()
    server = Recorder(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                      + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
    proxy = Recorder(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    ix = tmp_path / "ix"
    ix.mkdir()
    (ix / "server.json").write_text(json.dumps({
        "pid": os.getpid(), "hostname": socket.gethostname(), "url": f"http://127.0.0.1:{server.port}",
        "token": "secret-token", "index_id": "x", "index_dir": str(ix)}))
    env = {k: v for k, v in os.environ.items() if k.lower() != "no_proxy"}
    proxy_url = f"http://127.0.0.1:{proxy.port}"
    env.update(http_proxy=proxy_url, HTTP_PROXY=proxy_url, all_proxy=proxy_url)
    try:
        code = "import sys; from pathlib import Path; from alignsearch.surfaces.client import verified_server; " \
               "verified_server(Path(sys.argv[1]))"
        proc = subprocess.run([sys.executable, "-c", code, str(ix)], env=env, capture_output=True, text=True,
                              timeout=60, check=False)
    finally:
        server.close()
        proxy.close()
    assert proc.returncode == 0, proc.stderr
    assert proxy.received == [], proxy.received  # the token and the query never went to the proxy
    assert len(server.received) == 1 and b"Bearer secret-token" in server.received[0]


# -- 11: OpenVINO does not phone home ------------------------------------------------------------------
def test_openvino_telemetry_is_off(tmp_path):
    pytest.importorskip("openvino")
    home = tmp_path / "home"
    home.mkdir()
    code = ("import sys; from alignsearch.encoders import backend; assert backend.openvino_installed(); "
            "import openvino; openvino.Core(); "
            "assert sys.modules.get('openvino_telemetry') is None, 'telemetry loaded'; "
            "assert not any(m.startswith('openvino_telemetry.') for m in sys.modules), 'telemetry loaded'")
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "HOME": str(home)}, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert not (home / "intel").exists(), list(home.rglob("*"))


@pytest.mark.slow
def test_an_openvino_command_writes_nothing_in_home(tmp_path, tiny_model):
    pytest.importorskip("openvino")
    home = tmp_path / "home"
    home.mkdir()
    make_images(tmp_path / "corpus", 2)
    proc = alignsearch("index", tmp_path / "corpus", "--index", tmp_path / "ix", "--model", tiny_model, "--json",
                       "--backend", "openvino", "--device", "cpu",
                       env={"HOME": str(home), "ALIGNSEARCH_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["encoder"]["backend"] == "openvino"
    assert not (home / "intel").exists(), list(home.rglob("*"))


# -- 12: only a broken stdout means "the reader went away" ----------------------------------------------
RAISE_EPIPE = """
import sys
import alignsearch.search.engine

def broken(*args, **kwargs):
    raise BrokenPipeError(32, "Broken pipe")  # as from a worker's pipe or multiprocessing's resource tracker

alignsearch.search.engine.open = broken
from alignsearch.surfaces.cli import main
main(sys.argv[1:], prog_name="alignsearch")
"""


@pytest.mark.slow
def test_a_broken_pipe_that_is_not_stdout_is_an_error(tmp_path):
    argv = [sys.executable, "-c", RAISE_EPIPE, "info", "--index", str(tmp_path)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 1 and proc.stderr.startswith("error: unexpected BrokenPipeError"), proc
    debug = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False,
                           env={**os.environ, "ALIGNSEARCH_DEBUG": "1"})
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "BrokenPipeError" in debug.stderr, debug


MANY_TAGS = """
import sys
import alignsearch.surfaces.cli

alignsearch.surfaces.cli._tag_counts = lambda *a, **k: [(f"label{i}", i) for i in range(200000)]
alignsearch.surfaces.cli.main(sys.argv[1:], prog_name="alignsearch")
"""


@pytest.mark.slow
def test_a_reader_that_goes_away_still_ends_quietly(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", MANY_TAGS, "tags"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline()
    proc.stdout.close()  # as `| head -1` does
    assert proc.wait(timeout=60) == 0
    assert proc.stderr.read() == b""


# -- 13: names and labels cannot drive the terminal -----------------------------------------------------
def test_shown_escapes_control_characters():
    from alignsearch.surfaces.cli import _shown

    assert _shown("a\nb.jpg") == "a\\nb.jpg"
    assert _shown("\x1b[2J\x1b]0;owned\x07.png") == "\\x1b[2J\\x1b]0;owned\\x07.png"
    assert _shown("evil\u202egpj.exe") == "evil\\u202egpj.exe"
    assert _shown(os.fsdecode(b"bad\xff.jpg")) == "bad\\xff.jpg"
    assert _shown("Ünïcödé 東京 🙂 tab-free") == "Ünïcödé 東京 🙂 tab-free"


EVIL = "\x1b[31mred\x1b[0m\nsecond line"  # a file name
LABEL = "\x1b[31mred\x1b[0m label"  # a tag label (one line of a labels file)


@pytest.fixture(scope="module")
def evil_index(tmp_path_factory, tiny_model):
    """An index whose file names (an indexed image, its exact copy, a broken file) and tag label hold ANSI
    escape sequences, and the names a newline."""
    base = tmp_path_factory.mktemp("evil")
    corpus = base / "corpus"
    first = make_images(corpus, 4)[0]
    shutil.copy(first, corpus / f"{EVIL}.png")
    (corpus / f"broken{EVIL}.jpg").write_bytes(b"not an image")
    ix = base / "ix"
    run("index", corpus, "--index", ix, "--model", tiny_model, "--device", "cpu")
    labels = base / "labels.txt"
    labels.write_text(f"{LABEL}\n", encoding="utf-8")
    run("tag", "--labels-file", labels, "--threshold", "0", "--index", ix, "--device", "cpu")
    return ix


def _strings(obj):
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


@pytest.mark.slow
@pytest.mark.parametrize("args, raw", [(("query", "x", "-k", "10"), EVIL), (("dupes", "--tier", "exact"), EVIL),
                                       (("info", "--failed"), EVIL), (("tags",), LABEL)])
def test_text_output_escapes_names_and_labels(evil_index, args, raw):
    out = run(*args, "--index", evil_index).stdout
    assert "\x1b" not in out, out
    assert raw.encode("unicode_escape").decode() in out, out  # shown as \x1b[31m...\n...
    assert not any(line.startswith("second line") for line in out.splitlines()), out  # no line starts in a name
    if args[0] == "query":
        assert len(out.splitlines()) == 5, out  # one line per result
    as_json = json.loads(run(*args, "--json", "--index", evil_index).stdout)
    assert any(raw in s for s in _strings(as_json)), as_json  # JSON keeps the exact string


# -- 14: serve: loopback, Host, /docs, HEAD, a read-only or foreign index --------------------------------
def test_loopback_is_an_address_not_a_name_prefix():
    from alignsearch.surfaces.server import is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("127.1.2.3") and is_loopback("::1") and is_loopback("[::1]")
    assert is_loopback("localhost") and is_loopback("LOCALHOST.")
    assert not is_loopback("127.example.com") and not is_loopback("127.0.0.1.evil.example")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")


@pytest.mark.slow
def test_no_token_is_refused_for_a_name_that_looks_like_loopback(tmp_path):
    proc = alignsearch("serve", "--no-token", "--host", "127.example.com", "--index", tmp_path)
    assert proc.returncode == 2 and "--no-token is for loopback only" in proc.stderr, proc.stderr


def test_host_header_with_a_name_after_the_colon_is_not_ours():
    from alignsearch.surfaces.server import ServerConfig, allowed_hosts, host_name

    hosts = allowed_hosts(ServerConfig())
    for header in ("localhost:evil.com", "127.0.0.1:80x", "[::1]evil", "[::1", "localhost:8765:1"):
        assert host_name(header) not in hosts, header
    for header in ("localhost:8765", "127.0.0.1", "[::1]:80", "LOCALHOST.:1"):
        assert host_name(header) in hosts, header


@pytest.fixture(scope="module")
def served(evil_index):
    proc, url = start_serve(evil_index, "--token", "s3cret")
    yield url
    stop(proc)


@pytest.mark.slow
def test_server_refuses_a_port_that_is_a_name_and_answers_head(served):
    status, _, body = call(served, "/api/info", headers={"Host": "localhost:evil.com"})
    assert status == 400 and b"does not answer" in body
    assert call(served, "/docs", token=None)[0] == 404  # swagger-ui would come from a CDN
    assert call(served, "/openapi.json", token=None)[0] == 200
    for path in ("/api/info", "/healthz", "/"):
        got, got_headers, _ = call(served, path)
        status, headers, body = call(served, path, method="HEAD")
        assert (status, body) == (got, b""), path
        assert headers["content-type"] == got_headers["content-type"], path
    assert call(served, "/api/info", token=None, method="HEAD")[0] == 401  # HEAD is no way around the token


def _serve_read_only(ix: Path, unprivileged: bool):
    """`serve` on ix as a child (without root's permission bypass when unprivileged); (process, url)."""
    from helpers import _drop_dac_capabilities, free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "alignsearch", "serve", "--index", str(ix), "--port", str(port),
                             "--device", "cpu", "--token", "t"], stderr=subprocess.PIPE, text=True,
                            preexec_fn=_drop_dac_capabilities if unprivileged else None)  # noqa: PLW1509
    return proc, f"http://127.0.0.1:{port}"


def _wait_answer(proc, url) -> int | None:
    import time

    for _ in range(600):
        if proc.poll() is not None:
            return None
        try:
            return call(url, "/api/info", token="t")[0]
        except OSError:
            time.sleep(0.1)
    return None


def _check_served_read_only(ix: Path, unprivileged: bool) -> None:
    from alignsearch.surfaces.client import verified_server

    before = [p.name for p in ix.iterdir()]
    proc, url = _serve_read_only(ix, unprivileged)
    try:
        assert _wait_answer(proc, url) == 200, proc.stderr.read() if proc.poll() is not None else "no answer"
        assert call(url, "/api/image/1?size=64", token="t")[0] == 200  # a thumbnail, not kept
        # Nothing written into the index but the shared-memory files SQLite's readers need beside a WAL catalog
        # (which SQLite, run as root, gives to the catalog's owner)
        new = {p.name for p in ix.iterdir()} - set(before)
        assert new <= {"catalog.db-shm", "catalog.db-wal"}, new
        assert all((ix / name).stat().st_uid == (ix / "catalog.db").stat().st_uid for name in new)
        # where the record went (imported here: the previous code failed above: a traceback, or its record
        # written into the index)
        from alignsearch.storage.paths import private_record

        record = verified_server(ix, notice=pytest.fail)  # what `query` finds: the private record
        assert record is not None and record["url"] == url
        assert private_record(ix).exists() and oct(private_record(ix).stat().st_mode & 0o777) == "0o600"
    finally:
        stop(proc)
    err = proc.stderr.read()
    assert "Traceback" not in err and "serving" in err and "read-only" in err, err
    assert not private_record(ix).exists()  # removed on the way out


@pytest.mark.slow
@pytest.mark.skipif(not can_drop_dac(), reason="needs to drop root's permission bypass")
def test_serve_on_a_read_only_index_serves_it_and_keeps_its_record_elsewhere(evil_index, tmp_path):
    ix = tmp_path / "ro"
    shutil.copytree(evil_index, ix, ignore=shutil.ignore_patterns("server.json", "thumbs"))
    for folder, _, files in os.walk(ix):
        for name in files:
            os.chmod(os.path.join(folder, name), 0o444)
    os.chmod(ix, 0o555)
    try:
        _check_served_read_only(ix, unprivileged=True)
    finally:
        os.chmod(ix, 0o755)


@pytest.mark.slow
@needs_root
def test_serve_on_another_users_index_writes_nothing_into_it(evil_index, tmp_path):
    ix = tmp_path / "theirs"
    shutil.copytree(evil_index, ix, ignore=shutil.ignore_patterns("server.json", "thumbs"))
    chown_tree(ix, NOBODY)
    _check_served_read_only(ix, unprivileged=False)


# -- the client's server record: read as only this user could have written it ----------------------------
def _fake_server(ix: Path, index_id: str | None = None, named: str | None = None) -> Recorder:
    """A server that impersonates ix's: its /api/info claims ix's index id and folder, its /api/search
    names the index `named` (default: that id) and finds nothing. Whatever asks gets this one answer."""
    index_id = index_id or _index_id(ix)
    body = json.dumps({"index_id": index_id, "index_dir": str(ix.resolve()), "search_params": _PARAMS,
                       "query": {}, "results": []}).encode()
    return Recorder(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                    + str(len(body)).encode() + b"\r\nX-Alignsearch-Index: " + (named or index_id).encode()
                    + b"\r\nConnection: close\r\n\r\n" + body)


_PARAMS = ["q", "k", "negative", "text_weight", "image_weight", "negative_weight", "sort", "mode", "collapse",
           "compose", "per_video", "nprobe", "explain", "similar", "min_score"]


def _index_id(ix: Path) -> str:
    from alignsearch.surfaces.client import local_index_id

    return local_index_id(ix)


def _server_record(ix: Path, server: Recorder, **extra) -> bytes:
    """A record as `serve` writes it, naming the fake server."""
    return json.dumps({"pid": os.getpid(), "hostname": socket.gethostname(), "host": "127.0.0.1",
                       "port": server.port, "url": f"http://127.0.0.1:{server.port}", "token": "t",
                       "index_id": _index_id(ix), "index_dir": str(ix.resolve()), "search_params": _PARAMS,
                       **extra}).encode()


@pytest.fixture
def record_ix(tmp_path):
    """An index (its folder this user's, 0755), a fake server for it, and its record kept elsewhere."""
    ix = tmp_path / "ix"
    vector_index(ix, 3, 8)
    os.chmod(ix, 0o755)
    server = _fake_server(ix)
    theirs = tmp_path / "elsewhere" / "record.json"
    theirs.parent.mkdir()
    theirs.write_bytes(_server_record(ix, server))
    yield ix, server, theirs
    server.close()


def _routed(ix: Path):
    """search_via_server for a text query: (answer, the notices said)."""
    from alignsearch.search.request import build
    from alignsearch.surfaces.client import search_via_server

    notes: list[str] = []
    return search_via_server(ix, build(text="a dog", k=3), notice=notes.append).answer, notes


def _place(record: bytes, path: Path) -> None:
    path.write_bytes(record)
    os.chmod(path, 0o600)


def _refused(ix: Path, server: Recorder, why: str) -> None:
    answer, notes = _routed(ix)
    assert answer is None and server.received == [], server.received  # not a byte sent to it
    assert len(notes) == 1 and why in notes[0] and "searching locally" in notes[0], notes


def test_a_record_of_this_users_own_is_used_without_asking_api_info_first(record_ix):
    ix, server, theirs = record_ix
    _place(theirs.read_bytes(), ix / "server.json")
    answer, notes = _routed(ix)
    assert answer == {"index_id": _index_id(ix), "index_dir": str(ix.resolve()), "search_params": _PARAMS,
                      "query": {}, "results": []} and notes == []
    # one round trip: the query itself (the previous code asked GET /api/info before every query)
    assert len(server.received) == 1 and server.received[0].startswith(b"GET /api/search?"), server.received


def test_an_answer_that_names_another_index_is_not_taken(record_ix):
    ix, _, _ = record_ix
    other = _fake_server(ix, named="another-index-id")
    try:
        _place(_server_record(ix, other), ix / "server.json")
        answer, notes = _routed(ix)
        assert answer is None and len(other.received) == 1
        assert len(notes) == 1 and "searched another index (another-index-id)" in notes[0], notes
    finally:
        other.close()


def test_a_symlinked_server_record_is_not_followed(record_ix):
    """server.json a symlink to another server's record (any user who can write the target, or who placed
    the link): the client must not send the token and queries there."""
    ix, server, theirs = record_ix
    (ix / "server.json").symlink_to(theirs)
    _refused(ix, server, "symbolic link")
    (ix / "server.json").unlink()
    (ix / "server.json").symlink_to(theirs.parent)  # a symlinked folder is no record either
    _refused(ix, server, "symbolic link")


def test_a_record_in_a_folder_every_user_can_write_is_not_used(record_ix):
    ix, server, theirs = record_ix
    _place(theirs.read_bytes(), ix / "server.json")
    os.chmod(ix, 0o777)  # any user could have put it there (or renamed theirs over it)
    _refused(ix, server, "writable by every user")
    os.chmod(ix, 0o755)
    os.chmod(ix / "server.json", 0o622)  # any user could have rewritten it
    _refused(ix, server, "server.json is writable by every user")


def test_a_folder_renamed_in_after_the_record_was_opened_does_not_vouch_for_it(record_ix, monkeypatch):
    """Whoever may write the index's parent folder puts a folder of theirs (others may write it) in the index's
    place holding a record of their server, and renames the real index back the moment the record is open. The
    record's bytes are theirs: they must be judged by the folder they were opened in, not by the path's folder
    a moment later (the previous check by path passed, and the query went to their server)."""
    from alignsearch import safeopen

    ix, server, theirs = record_ix
    own = _fake_server(ix)  # the user's own server, recorded in the real index: the checks by path pass
    _place(_server_record(ix, own), ix / "server.json")
    genuine = ix.with_name("ix.genuine")
    ix.rename(genuine)
    ix.mkdir()
    os.chmod(ix, 0o777)
    _place(theirs.read_bytes(), ix / "server.json")
    real_open = safeopen._open_leaf

    def swapped_after_open(name, *args, **kwargs):
        fd = real_open(name, *args, **kwargs)
        if str(name).endswith("server.json") and genuine.exists():
            ix.rename(ix.with_name("ix.theirs"))
            genuine.rename(ix)
        return fd

    monkeypatch.setattr(safeopen, "_open_leaf", swapped_after_open)
    try:
        _refused(ix, server, "writable by every user")
    finally:
        own.close()
    assert not genuine.exists()  # the swap did happen: the real index is in place when the checks run


@needs_root
def test_a_record_another_user_could_write_is_not_used(record_ix):
    ix, server, theirs = record_ix
    _place(theirs.read_bytes(), ix / "server.json")
    os.chown(ix, os.geteuid(), 12345)  # the folder writable by a group that is not this user's own
    os.chmod(ix, 0o775)
    _refused(ix, server, "writable by its group (gid 12345)")
    os.chmod(ix, 0o755)
    os.chown(ix / "server.json", NOBODY, NOBODY)  # the record another user's
    _refused(ix, server, "belongs to another user")
    os.chown(ix / "server.json", os.geteuid(), os.getegid())
    os.chown(ix, NOBODY, NOBODY)  # the folder another user's: they can replace the record at will
    _refused(ix, server, "belongs to another user")


def test_the_private_record_is_checked_alike(record_ix, tmp_path, monkeypatch):
    from alignsearch.storage.paths import private_record

    ix, server, theirs = record_ix
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    private = private_record(ix)
    private.parent.mkdir(mode=0o700)
    private.symlink_to(theirs)
    _refused(ix, server, "symbolic link")
    private.unlink()
    _place(theirs.read_bytes(), private)
    os.chmod(private.parent, 0o777)
    _refused(ix, server, "writable by every user")
    os.chmod(private.parent, 0o700)
    assert _routed(ix)[0] is not None and len(server.received) == 1  # private again: used


@pytest.mark.parametrize("content, why", [
    (b"\0\1garbage", "unreadable"), (b"[1, 2]", "unreadable"), (b"", "unreadable"),
    (None, "larger than 65536 bytes"),  # a valid record, padded past any record's size
])
def test_a_garbage_or_oversized_record_is_not_used(record_ix, content, why):
    ix, server, theirs = record_ix
    _place(content if content is not None else _server_record(ix, server, pad="x" * 70_000), ix / "server.json")
    _refused(ix, server, why)


def test_a_fifo_record_does_not_hang_the_client(record_ix):
    ix, server, _ = record_ix
    os.mkfifo(ix / "server.json", 0o600)
    code = ("import sys; from pathlib import Path; from alignsearch.search.request import build; "
            "from alignsearch.surfaces.client import search_via_server; "
            "assert search_via_server(Path(sys.argv[1]), build(text='a dog')).answer is None")
    proc = subprocess.run([sys.executable, "-c", code, str(ix)], capture_output=True, text=True, timeout=60,
                          check=False)  # the previous code blocked in read_text() until a writer came
    assert proc.returncode == 0 and "fifo" in proc.stderr and server.received == [], proc.stderr


# -- the export cache's records: not through a symlink, never another export's ----------------------------
def _model(version: int) -> dict:
    return {"fingerprint": "f" * 32, "content_digest": "c" * 32, "spec": {"size": 289}, "export_version": version,
            "model": "tiny", "dim": 8, "max_length": 16, "temperature": 1.0}


def _entry(version: int, key: str) -> dict:
    return {"size": 10 + version, "mtime_ns": version, "sha256": f"{version}-{key}"}


def test_a_symlinked_cache_record_is_taken_for_missing(tmp_path):
    from alignsearch.encoders import records

    folder = tmp_path / "onnx" / "model"
    folder.mkdir(parents=True)
    writer = records.Writer(folder, _model(7))
    writer.file("text-fp32", _entry(7, "text-fp32"), {})
    writer.file("vision-fp32", _entry(7, "vision-fp32"), {})
    assert set(records.read(folder)["files"]) == {"text-fp32", "vision-fp32"}
    crafted = tmp_path / "crafted"
    crafted.mkdir()
    (crafted / "vision.json").write_text(json.dumps({"entry": {"size": 1, "mtime_ns": 1, "sha256": "evil"}}))
    (folder / "records" / "file-vision-fp32.json").unlink()
    (folder / "records" / "file-vision-fp32.json").symlink_to(crafted / "vision.json")
    manifest = records.read(folder)
    assert set(manifest["files"]) == {"text-fp32"}, manifest["files"]  # the tower is exported again
    (crafted / "model.json").write_text(json.dumps({**_model(7), "fingerprint": "e" * 32}))
    (folder / "records" / "model.json").unlink()
    (folder / "records" / "model.json").symlink_to(crafted / "model.json")
    assert records.read(folder) is None  # no manifest: everything exported again
    # and the next write replaces the links, never writing through them
    records.Writer(folder, _model(7)).file("text-fp32", _entry(7, "text-fp32"), {})
    assert not (folder / "records" / "model.json").is_symlink()
    assert json.loads((crafted / "model.json").read_text())["fingerprint"] == "e" * 32
    (folder / "records" / "file-big.json").write_text(json.dumps({"entry": {"pad": "x" * (5 << 20)}}))
    assert "big" not in records.read(folder)["files"]  # larger than any record: not read whole


@pytest.mark.slow
def test_a_symlinked_tower_record_is_exported_again(exported, tiny_model, tmp_path):
    from alignsearch.encoders import cached
    from alignsearch.encoders.model import Encoder

    cache, info = exported
    record = _model_folder(cache) / "records" / "file-text-fp32.json"
    shutil.copy(record, tmp_path / "copy.json")  # the very record, but reached through a link
    record.unlink()
    record.symlink_to(tmp_path / "copy.json")
    assert cached.text_encoder(info) is None  # a cold text query does not run the tower it describes
    enc = Encoder(str(tiny_model), device="cpu")
    enc.encode_text(["a dog"])
    assert enc.plan.backend == "onnx" and not record.is_symlink()  # exported and recorded again
    assert cached.text_encoder(info) is not None


def _write_version(folder, version: int, barrier, first: bool) -> None:
    """One process's export: its records under model.json, the file records after the other has begun."""
    from alignsearch.encoders import records

    writer = records.Writer(folder, _model(version))
    if first:
        writer.speed("machine", {"onnx": 1.0})  # model.json of this version
        barrier.wait()
        barrier.wait()  # meanwhile the other version cleared these records and wrote its model.json
        for key in ("text-fp32", "vision-fp32", "tokenizer"):
            writer.file(key, _entry(version, key), {})
    else:
        barrier.wait()
        writer.file("tokenizer", _entry(version, "tokenizer"), {})
        barrier.wait()
        writer.file("vision-fp32", _entry(version, "vision-fp32"), {})
    for round_ in range(30):  # then both at once, each round its own export run
        writer = records.Writer(folder, _model(version))
        for key in ("text-fp32", "vision-fp32", "tokenizer"):
            writer.file(key, _entry(version, key), {})


def _consistent(manifest: dict | None) -> None:
    if manifest is None:
        return  # no manifest: exported again
    version = manifest["export_version"]
    assert all(entry == _entry(version, key) for key, entry in manifest["files"].items()), manifest


@pytest.mark.slow
def test_two_export_versions_writing_at_once_never_leave_a_mix_that_is_trusted(tmp_path):
    import multiprocessing

    from alignsearch.encoders import records

    folder = tmp_path / "onnx" / "model"
    folder.mkdir(parents=True)
    # spawn, not fork: forked from this many-threaded process (servers, pools of earlier tests), a child can
    # inherit a lock held by another thread and never run (seen: the whole suite hung here)
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2, timeout=60)
    first = ctx.Process(target=_write_version, args=(folder, 1, barrier, True))
    second = ctx.Process(target=_write_version, args=(folder, 2, barrier, False))
    first.start()
    second.start()
    seen, deadline = 0, time.monotonic() + 180
    while first.is_alive() or second.is_alive():  # read while they write, as a query would
        _consistent(records.read(folder))
        seen += 1
        if time.monotonic() > deadline:
            first.kill(), second.kill()
            pytest.fail("the two writers did not finish in 180 s")
    first.join()
    second.join()
    assert (first.exitcode, second.exitcode) == (0, 0) and seen > 0
    _consistent(records.read(folder))


def test_a_server_leaving_does_not_wait_on_or_follow_what_replaced_its_record(tmp_path):
    """A FIFO put where the record was would block a plain read forever (the server's exit hangs); a symlink
    would be followed to another file. remove_record reads as the client does and leaves both alone."""
    from alignsearch.surfaces.server import remove_record

    fifo = tmp_path / "server.json"
    os.mkfifo(fifo, 0o600)
    done = threading.Event()
    worker = threading.Thread(target=lambda: (remove_record(fifo, os.getpid()), done.set()), daemon=True)
    worker.start()
    assert done.wait(5), "remove_record blocked on a FIFO"
    assert fifo.exists()

    target = tmp_path / "elsewhere.json"
    target.write_text(json.dumps({"pid": os.getpid()}))
    link = tmp_path / "linked" / "server.json"
    link.parent.mkdir(mode=0o700)
    link.symlink_to(target)
    remove_record(link, os.getpid())
    assert link.is_symlink() and target.exists()

    own = tmp_path / "own" / "server.json"
    own.parent.mkdir(mode=0o700)
    own.write_text(json.dumps({"pid": os.getpid()}))
    own.chmod(0o600)
    remove_record(own, os.getpid() + 1)  # a later server's record: kept
    assert own.exists()
    remove_record(own, os.getpid())
    assert not own.exists()


def _replaced_mid_removal(record: Path, remove, monkeypatch) -> dict | None:
    """Run remove() (a removal of the server record at `record`) while, just after it has read the record, a later
    `serve` writes its own there (server.write_record, on another thread): what the record holds after both, None
    if there is none. The later writer is let go on, and the removal resumes once that writer has either replaced
    the record or been refused a lock it needs (flock, without waiting): which one happens first is not left to
    the scheduler."""
    import fcntl

    from alignsearch.surfaces import client, server

    settled = threading.Condition()
    refused: list[int] = []
    written: list[Path] = []
    ended: list[bool] = []

    def write():
        try:
            written.append(server.write_record(record, {"pid": 2**22 + 1}))
        finally:
            with settled:
                ended.append(True)
                settled.notify_all()

    later = threading.Thread(target=write)
    real_flock, real_read = fcntl.flock, client.read_record

    def flock(fd, how):
        try:
            return real_flock(fd, how)
        except BlockingIOError:
            if threading.current_thread() is later:
                with settled:
                    refused.append(fd)
                    settled.notify_all()
            raise

    def read(path):
        got = real_read(path)
        if path == record and later.ident is None:
            with settled:
                later.start()
                settled.wait_for(lambda: refused or ended)
        return got

    monkeypatch.setattr(fcntl, "flock", flock)
    for module in (client, server):  # the removal reads through one of them
        monkeypatch.setattr(module, "read_record", read, raising=False)
    remove()
    later.join()
    assert written == [record]
    return json.loads(record.read_text()) if record.exists() else None


def test_a_server_leaving_never_removes_the_record_a_later_server_wrote(tmp_path, monkeypatch):
    """remove_record read its own record, then unlinked whatever was at the name: a second `serve` of the index
    that wrote its record in between (write-then-replace) lost it to the first's exit, and its clients searched
    locally. The record is read and removed in one turn that its writers take too (client.record_turn)."""
    from alignsearch.surfaces.server import remove_record, write_record

    record = tmp_path / "index" / "server.json"
    record.parent.mkdir(mode=0o700)
    write_record(record, {"pid": os.getpid()})
    assert _replaced_mid_removal(record, lambda: remove_record(record, os.getpid()), monkeypatch) == {"pid": 2**22 + 1}


def _stale_record(tmp_path: Path) -> tuple[Path, dict]:
    """A record (tmp_path/index/server.json, in a 0700 folder) naming a process that is gone: (its path, it)."""
    from alignsearch.surfaces.server import write_record

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    dead = {"pid": int(gone.stdout)}
    record = tmp_path / "index" / "server.json"
    record.parent.mkdir(mode=0o700)
    write_record(record, dead)
    return record, dead


def test_a_query_removing_a_stale_record_never_removes_the_one_a_server_just_wrote(tmp_path, monkeypatch):
    """The same read-then-unlink in the client: a query that found the record of a server killed with -9 removed
    it as stale, and with it the record a new `serve` wrote in between."""
    from alignsearch.surfaces import client
    from alignsearch.surfaces.server import write_record

    record, dead = _stale_record(tmp_path)
    assert client._signalled(dead["pid"]) == client.GONE
    after = _replaced_mid_removal(record, lambda: client._remove_stale(record, dead), monkeypatch)
    assert after == {"pid": 2**22 + 1}
    # and with no server starting meanwhile, the stale record is still removed, the later one kept
    assert not client._remove_stale(record, dead) and record.exists()
    write_record(record, dead)
    assert client._remove_stale(record, dead) and not record.exists()


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 404 Not Found\r\nContent-Type: text/html\r\nContent-Length: 9\r\nConnection: close\r\n\r\n<h1>x</h1>",
    b'HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: 22\r\nConnection: close\r\n\r\n'
    b'{"error": "not yours"}',
])
def test_another_programs_refusal_on_the_recorded_port_is_not_taken(record_ix, answer):
    """The recorded server killed, its port taken by another program: that program's 4xx is the first word
    the query hears from the port. It names no index, so the query searches locally with a notice (an HTML
    page raised JSONDecodeError, a JSON one became this query's error)."""
    ix, _, theirs = record_ix
    other = Recorder(answer)
    try:
        record = json.loads(theirs.read_bytes())
        _place(_server_record(ix, other, pid=record["pid"]), ix / "server.json")
        answer_, notes = _routed(ix)
    finally:
        other.close()
    assert answer_ is None and len(other.received) == 1
    assert len(notes) == 1 and "did not answer" in notes[0] and "searching locally" in notes[0], notes


@pytest.mark.slow
def test_a_refusal_from_the_server_of_this_index_is_still_the_querys_error(tmp_path, tiny_model):
    """The server's own 4xx names its index: the query fails with its message, as a local search would."""
    ix = tmp_path / "ix"
    make_images(tmp_path / "corpus", 3)
    run("index", str(tmp_path / "corpus"), "--index", str(ix), "--model", str(tiny_model), "--device", "cpu")
    proc, url = start_serve(ix)
    try:
        status, headers, _ = call(url, "/api/search?q=a&k=0", token=None)
        assert status == 401 and "X-Alignsearch-Index" not in headers  # no token: the index is not named
        out = subprocess.run([sys.executable, "-m", "alignsearch", "query", "a dog", "-k", "0", "--index", str(ix)],
                             capture_output=True, text=True, timeout=300)
    finally:
        stop(proc)
    assert out.returncode != 0 and "notice" not in out.stderr and "k" in out.stderr, out.stderr


def test_serve_keeps_its_record_private_where_the_index_folder_others_may_write(tmp_path):
    """A record in a folder others may write is refused by every query (client.read_record) and was never
    removed: `serve` now sends it to the private record by the same rule."""
    from alignsearch.surfaces.server import read_only

    ix = tmp_path / "ix"
    ix.mkdir()
    os.chmod(ix, 0o777)
    assert "writable by every user" in (read_only(ix) or "")
    os.chmod(ix, 0o755)
    assert read_only(ix) is None


@needs_root
def test_a_query_neither_peeks_at_nor_routes_from_an_index_others_can_write(record_ix, tmp_path, monkeypatch):
    """`query` asked a running server only after state.peek read the index's catalog (its index id, to check the
    server serves it) with sqlite3 alone, without the judgement catalog.connect makes: in a folder every user can
    write, the query went to the server this user's private record named, and a catalog another user planted was
    read (its index id taken for this index's). Now neither: the query searches locally, whose open refuses it."""
    from alignsearch.storage import state
    from alignsearch.storage.paths import DB_FILE, private_record
    from helpers import plant_as_nobody

    ix, server, theirs = record_ix
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    private = private_record(ix)
    private.parent.mkdir(mode=0o700)
    _place(theirs.read_bytes(), private)
    os.chmod(ix, 0o777)
    _refused(ix, server, f"{ix} is writable by every user")
    planted = tmp_path / "planted.db"
    shutil.copy(ix / DB_FILE, planted)
    conn = sqlite3.connect(planted)
    with conn:
        conn.execute("UPDATE meta SET value = '\"planted\"' WHERE key = 'index_id'")
    conn.close()  # its WAL folded into the file copied
    plant_as_nobody(ix, planted, DB_FILE)
    assert state.peek(ix / DB_FILE, "index_id") is None
    lines = run("query", "a dog", "--index", ix, code=6).output.strip().splitlines()
    assert server.received == [] and "searching locally" in lines[0], lines
    assert lines[1:] == [f"error: refusing the index {ix}: {ix} is writable by every user (another user may have "
                         "written what it holds: keep the index in a folder only you can write (--index DIR), or "
                         "`chmod go-w` what is named)"]
    os.chmod(ix, 0o755)  # closed again, the catalog is still another user's: not read either
    assert state.peek(ix / DB_FILE, "index_id") is None


def test_discovery_sends_no_one_to_an_index_option_that_refuses_too(tmp_path, monkeypatch, caplog):
    """An index every user may write was skipped by discovery with "pass --index DIR to use it anyway", and
    `--index DIR` then refused it (exit 6): the note now says what does help."""
    from alignsearch.storage import catalog, paths

    vector_index(tmp_path / ".alignsearch", 3, 8)
    (tmp_path / "work").mkdir()
    os.chmod(tmp_path / ".alignsearch", 0o777)
    monkeypatch.chdir(tmp_path / "work")
    with caplog.at_level("WARNING"):
        assert paths.find_index_dir() is None
    note = " ".join(r.getMessage() for r in caplog.records)
    assert "writable by every user" in note and "use it anyway" not in note and "chmod go-w" in note, note
    with pytest.raises(errors.IndexUntrustedError):
        catalog.refuse_untrusted(tmp_path / ".alignsearch", writing=False)


def test_an_index_option_naming_the_folder_above_the_index_says_which_to_name(tmp_path):
    """`--index PROJECT` (the folder holding .alignsearch/) said "PROJECT is not an alignsearch index: run
    `alignsearch index ROOT --index PROJECT` first", advice that makes a second index beside the first."""
    from alignsearch.storage import paths

    vector_index(tmp_path / ".alignsearch", 3, 8)
    with pytest.raises(errors.IndexNotFoundError) as raised:
        paths.resolve_index_dir(tmp_path)
    assert str(tmp_path / ".alignsearch") in str(raised.value) and "run `alignsearch index" not in str(raised.value)


class _OldRelease:
    """A `serve` of the release before server.lock, in its turn at the record (an exclusive flock on the record's
    folder, as its record_turn took it), with one step left to do (`then`: the unlink of the record it read, or the
    write of its own); finish() does it and leaves the turn."""

    def __init__(self, record: Path, then):
        import fcntl

        self.fd = os.open(record.parent, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self.then, self.done = then, False

    def finish(self) -> None:
        if not self.done:
            self.done = True
            self.then()
            os.close(self.fd)


def _finished_when_waited_on(monkeypatch, old: _OldRelease) -> None:
    """The old release's step done when a new process waits for a turn (client's sleep between tries)."""
    from types import SimpleNamespace

    from alignsearch.surfaces import client

    real = time.sleep
    monkeypatch.setattr(client, "time", SimpleNamespace(monotonic=time.monotonic,
                                                        sleep=lambda s: (old.finish(), real(s))))


def test_a_new_server_s_record_is_not_removed_by_an_old_release_s_server_leaving(tmp_path, monkeypatch):
    """A `serve` started before an upgrade runs the old release's code: at its exit it reads its record and unlinks
    it in the old turn (the folder's flock), which server.lock did not exclude. A new `serve` writing its record in
    between lost it to that unlink, and `query` searched locally while it ran. The new code takes the old turn too."""
    from alignsearch.surfaces.server import write_record

    record = tmp_path / "index" / "server.json"
    record.parent.mkdir(mode=0o700)
    write_record(record, {"pid": 1})  # the old server's, read by its removal in its turn
    old = _OldRelease(record, record.unlink)
    _finished_when_waited_on(monkeypatch, old)
    write_record(record, {"pid": os.getpid()})
    old.finish()  # where the new write did not wait, the old removal unlinks it now
    assert json.loads(record.read_text()) == {"pid": os.getpid()}


def test_a_query_does_not_remove_the_record_an_old_release_s_server_writes(tmp_path, monkeypatch):
    """The other way: an old release's `serve` (a second install, or one restarted by an old service file) writes its
    record over a stale one in the old turn while a query reads the stale one to remove it: the query unlinked the
    new record. It waits for the old turn, then reads what is there."""
    from alignsearch.surfaces import client

    record, dead = _stale_record(tmp_path)
    live = {"pid": os.getpid()}
    old = _OldRelease(record, lambda: record.write_text(json.dumps(live)))
    _finished_when_waited_on(monkeypatch, old)
    real_read = client.read_record

    def read(path):  # the old server's write lands after the query's read where nothing kept it out
        got = real_read(path)
        old.finish()
        return got

    monkeypatch.setattr(client, "read_record", read)
    client._remove_stale(record, dead)
    assert json.loads(record.read_text()) == live
