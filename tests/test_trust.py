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
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import make_images, run
from helpers import alignsearch, call, can_drop_dac, start_serve, stop, vector_index

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
    """A world-writable folder (as /srv/shared or a sticky-less tmp) holding an index, and a subfolder of it."""
    shared = tmp_path / "shared"
    vector_index(shared / ".alignsearch", 5, 8)
    (shared / "work").mkdir()
    os.chmod(shared, 0o777)
    return shared


def _env_without_index() -> dict:
    return {k: v for k, v in os.environ.items() if k != "ALIGNSEARCH_INDEX"}


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
    from alignsearch.encoders import cached, onnxrun
    from alignsearch.encoders.backend import EncoderOptions
    from alignsearch.search.engine import onnx_cache_status
    from alignsearch.encoders.model import Encoder

    assert onnxrun.text_encoder(info) is None  # a cold text query does not run the cached tower
    assert cached.find(str(tiny_model), info, EncoderOptions(device="cpu")) is None
    assert onnx_cache_status(info)["path"] is None and why in onnx_cache_status(info)["note"]
    enc = Encoder(str(tiny_model), device="cpu")
    enc.encode_text(["a dog"])
    assert enc.plan.backend == "torch" and "not private" in enc.plan.why and why in enc.plan.why, enc.plan


@pytest.mark.slow
def test_a_cache_folder_others_can_write_is_refused_and_torch_runs(exported, tiny_model):
    from alignsearch.encoders import onnxrun

    cache, info = exported
    assert onnxrun.text_encoder(info) is not None  # private: used
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
