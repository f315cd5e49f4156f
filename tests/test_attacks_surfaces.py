"""Attacks on the surfaces: the CLI, the HTTP server over a real socket, the client that sends CLI queries to
it, and the one query check. Each test is an attack that once succeeded (or a guarantee it probes)."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

import alignsearch
from alignsearch.storage.paths import SERVER_FILE
from alignsearch.surfaces.cli import main
from alignsearch.surfaces.server import ServerConfig, start_in_thread
from helpers import call, indexed_corpus


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model):
    """An index of 6 images and its server, in this process on a real socket (token s3cret): its record is
    in the index, so `alignsearch query` in a child process sends its queries there."""
    base = tmp_path_factory.mktemp("surfaces")
    ix = indexed_corpus(base, tiny_model, 6)
    engine = alignsearch.open(ix, device="cpu")
    server = start_in_thread(engine, ServerConfig(port=0, token="s3cret"))
    alone = base / "alone"  # the same index without the record: searched locally
    shutil.copytree(ix, alone, ignore=shutil.ignore_patterns(SERVER_FILE, "thumbs"))
    yield {"url": server.url, "port": server.port, "ix": ix, "alone": alone, "corpus": base / "corpus"}
    server.shutdown()
    engine.close()


def query(ix, *args, env=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([os.fsencode(sys.executable), b"-m", b"alignsearch", b"query",
                           *(a if isinstance(a, bytes) else str(a).encode() for a in args), b"--index", os.fsencode(ix)],
                          capture_output=True, env=env, timeout=120)


def exchange(port: int, data: bytes, wait: float = 3.0) -> tuple[bytes, bool]:
    """Send data on one connection; (everything answered, whether the server closed the connection)."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        s.sendall(data)
        out, closed = b"", False
        try:
            while block := s.recv(65536):
                out += block
            closed = True
        except TimeoutError:
            pass
        except ConnectionResetError:
            closed = True
    return out, closed


def statuses(answer: bytes) -> list[int]:
    return [int(line.split()[1]) for line in answer.split(b"\r\n") if line.startswith(b"HTTP/1.")]


# -- the CLI through the server answers as the CLI alone ------------------------------------------------------


@pytest.mark.slow
def test_per_video_over_a_thousand_is_answered_alike_through_the_server(served):
    """The server capped per_video at 1000 (422) where request.build, the CLI and Engine.search take any whole
    number from 1: `query --per-video 5000` searched alone, but failed with exit 6 once a server ran."""
    status, _, body = call(served["url"], "/api/search?q=red&k=3&per_video=5000")
    assert status == 200, body
    assert json.loads(body)["query"]["per_video"] == 5000
    warm, alone = (query(ix, "red", "-k", "3", "--per-video", "5000", "--json") for ix in (served["ix"], served["alone"]))
    assert warm.returncode == alone.returncode == 0, warm.stderr
    assert b"notice" not in warm.stderr
    assert json.loads(warm.stdout) == json.loads(alone.stdout)


@pytest.mark.slow
def test_a_query_image_over_the_servers_pixel_cap_is_searched_locally(served, tmp_path):
    """The server decodes uploads up to 50 MP (its memory guard), the CLI a query image up to the indexer's
    200 MP: a 63 MP photo searched alone, but through a server failed with exit 6 (`unreadable image`)."""
    from PIL import Image

    photo = tmp_path / "big.jpg"
    Image.new("RGB", (9000, 7000), (200, 30, 30)).save(photo, quality=80)
    warm, alone = (query(ix, "--image", photo, "-k", "2", "--json") for ix in (served["ix"], served["alone"]))
    assert warm.returncode == alone.returncode == 0, warm.stderr
    assert json.loads(warm.stdout) == json.loads(alone.stdout)
    assert b"cannot take this query" in warm.stderr and b"too large" in warm.stderr, warm.stderr


@pytest.mark.slow
def test_a_filter_that_is_not_utf8_is_searched_locally_with_the_true_reason(served):
    """A --path glob of a file name's raw bytes cannot go in a URL: the client said the server `did not
    answer`, which sent the user looking for a dead server."""
    warm, alone = (query(ix, "red", "--path", b"caf\xe9*", "--json") for ix in (served["ix"], served["alone"]))
    assert warm.returncode == alone.returncode == 0, warm.stderr
    assert json.loads(warm.stdout) == json.loads(alone.stdout)
    assert b"did not answer" not in warm.stderr and b"not UTF-8" in warm.stderr, warm.stderr


@pytest.mark.slow
def test_a_query_too_long_for_a_url_is_searched_locally_every_time(served):
    """The server's HTTP parser refuses a request head over 16 KiB while it is incomplete: a --where of 30 KB
    was answered by the server or refused (400, `did not answer`) as the kernel split the URL."""
    where = " and ".join(["width > 1"] * 2000)
    warm, alone = (query(ix, "red", "-k", "2", "--where", where, "--json") for ix in (served["ix"], served["alone"]))
    assert warm.returncode == alone.returncode == 0, warm.stderr
    assert json.loads(warm.stdout) == json.loads(alone.stdout)
    assert b"bytes long in a URL" in warm.stderr and b"did not answer" not in warm.stderr, warm.stderr


@pytest.mark.slow
@pytest.mark.parametrize("option", [None, "--negative", "--tag"])
def test_a_query_text_that_is_not_utf8_is_one_line_and_exit_6(served, option):
    """Bytes that are not UTF-8 (a Latin-1 terminal's é) reached the tokenizer: `unexpected TypeError`, exit 1,
    after a notice that the server `did not answer` (the URL could not be encoded); a tag failed in SQLite."""
    args = [b"caf\xe9"] if option is None else [b"red", option.encode(), b"caf\xe9"]
    for ix in (served["ix"], served["alone"]):
        out = query(ix, *args, env={"LC_ALL": "C"})
        lines = out.stderr.decode().splitlines()
        assert out.returncode == 6 and len(lines) == 1, out.stderr
        assert lines[0].startswith("error: the ") and "not valid UTF-8" in lines[0], lines
        assert out.stdout == b""


# -- standard streams --------------------------------------------------------------------------------------


def close_fds(*fds):
    def preexec():
        for fd in fds:
            os.close(fd)
    return preexec


@pytest.mark.slow
def test_commands_with_standard_streams_closed_run_as_into_dev_null(served, tiny_model, tmp_path):
    """`>&-` left sys.stdout None: every command failed at its end with `unexpected AttributeError` (exit 1),
    `index` with `2>&-` before it began; and the closed number went to the next file opened (the index's
    write.lock), where any write to standard output would land."""
    from conftest import make_images

    make_images(tmp_path / "photos", 3)
    ix = tmp_path / "ix"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    index = [sys.executable, "-m", "alignsearch", "index", str(tmp_path / "photos"), "--index", str(ix),
             "--model", str(tiny_model), "--device", "cpu", "--workers", "0"]
    done = subprocess.run(index, preexec_fn=close_fds(1, 2), env=env, timeout=300)
    assert done.returncode == 0
    info = subprocess.run([sys.executable, "-m", "alignsearch", "info", "--json", "--index", str(ix)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert json.loads(info.stdout)["images"] == 3
    for args in (["query", "red", "--index", str(served["alone"])], ["info", "--index", str(ix)]):
        out = subprocess.run([sys.executable, "-m", "alignsearch", *args], preexec_fn=close_fds(1),
                             stderr=subprocess.PIPE, text=True, env=env, timeout=120)
        assert out.returncode == 0 and out.stderr == "", out.stderr


# -- HTTP ---------------------------------------------------------------------------------------------------


def test_a_body_framed_twice_is_refused_and_nothing_after_it_is_read(served):
    """Content-Length and Transfer-Encoding together: the server read the chunked body and answered what
    followed as a second request on the same connection; a proxy reading Content-Length sees one request
    (smuggling). RFC 9112: answer and close."""
    host = f"Host: 127.0.0.1:{served['port']}\r\nAuthorization: Bearer s3cret\r\n".encode()
    data = (b"POST /api/search HTTP/1.1\r\n" + host + b"Content-Type: multipart/form-data; boundary=x\r\n"
            b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            b"GET /api/info HTTP/1.1\r\n" + host + b"\r\n")
    answer, closed = exchange(served["port"], data)
    assert statuses(answer) == [400] and closed, answer[:300]
    assert b"Content-Length and Transfer-Encoding" in answer


@pytest.mark.parametrize("headers", [
    {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors", "Sec-Fetch-Dest": "image"},  # <img> on evil.example
    {"Sec-Fetch-Site": "same-site", "Sec-Fetch-Mode": "cors"},  # a page on another port of this host: cookie sent
    {"Origin": "https://evil.example"},  # a browser without Sec-Fetch-*
    {"Origin": "http://localhost:1"},  # a page on another port of this host, a browser without Sec-Fetch-*
    {"Origin": "http://127.0.0.1:1"},
    {"Origin": "null"},  # a sandboxed frame, a file:// page
])
def test_requests_from_another_sites_page_are_refused(served, headers):
    """Nothing checked where a browser's request came from: with --no-token any web page the user opened could
    load the served images (<img src=http://127.0.0.1:8765/api/image/1>: its size, whether it exists), and a
    page on another local port got the SameSite cookie too (ports are one site)."""
    cookie = {"Cookie": f"alignsearch-token-{served['port']}=s3cret"}
    for path in ("/api/image/1", "/api/search?q=red&k=1", "/api/info"):
        status, _, body = call(served["url"], path, token=None, headers={**cookie, **headers})
        assert status == 403 and "another site" in json.loads(body)["error"], (path, status, body[:200])


def test_the_page_itself_and_links_to_it_are_still_served(served):
    cookie = {"Cookie": f"alignsearch-token-{served['port']}=s3cret"}
    same = {"Sec-Fetch-Site": "same-origin", "Sec-Fetch-Mode": "cors", "Origin": served["url"]}
    assert call(served["url"], "/api/search?q=red&k=1", token=None, headers={**cookie, **same})[0] == 200
    old_browser = {"Origin": served["url"].rstrip("/")}  # no Sec-Fetch-*: its Origin is the Host it asks
    assert call(served["url"], "/api/search?q=red&k=1", token=None, headers={**cookie, **old_browser})[0] == 200
    link = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document"}
    assert call(served["url"], "/?q=red", token=None, headers=link)[0] == 200  # a link from elsewhere opens the page
    status, _, _ = call(served["url"], "/api/search", token=None, method="POST", data=b"q=red",
                        headers={**cookie, **link, "Content-Type": "application/x-www-form-urlencoded"})
    assert status == 403  # a form on another site posting here is no navigation to follow


@pytest.mark.slow
def test_clients_sending_their_headers_slowly_are_cut_off_and_others_served(served):
    """Slowloris: a request head sent a byte at a time held its connection for ever (uvicorn times out only
    idle keep-alive connections), and ~1000 such clients took every descriptor of a `ulimit -n 1024` server:
    no one else was answered. Now a head must arrive whole within ServerConfig.head_seconds (10 s)."""
    port = served["port"]
    slow = []
    for _ in range(30):
        s = socket.create_connection(("127.0.0.1", port), timeout=1)
        s.sendall(f"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n".encode())
        slow.append(s)
    # one that finished a request, then starts the next one slowly on the same connection
    kept = socket.create_connection(("127.0.0.1", port), timeout=5)
    kept.sendall(f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    assert kept.recv(65536).startswith(b"HTTP/1.1 200")
    kept.sendall(b"GET /healthz HTTP/1.1\r\n")
    slow.append(kept)
    deadline = time.monotonic() + 14
    open_ = list(slow)
    while open_ and time.monotonic() < deadline:
        for s in list(open_):
            try:
                s.sendall(b"X-Drip: 1\r\n")  # a header line every half second: never idle
                s.setblocking(False)
                if s.recv(100) == b"":
                    open_.remove(s)
            except BlockingIOError:
                pass
            except OSError:
                open_.remove(s)
            finally:
                s.setblocking(True)
        time.sleep(0.5)
    assert call(served["url"], "/healthz", token=None)[0] == 200
    for s in slow:
        s.close()
    assert not open_, f"{len(open_)} of {len(slow)} slow connections still held after 14 s"


# -- CLI arguments ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ref", ["99999999999999999999999999", "9223372036854775808", "²"])
def test_similar_to_an_id_that_cannot_be_one_is_not_an_indexed_image(served, ref):
    """An id past SQLite's INTEGER was `unexpected OverflowError` (exit 1), a digit int() refuses
    `unexpected ValueError`. An id past SQLite's INTEGER is a usage error (exit 2), as the API's UsageError and
    HTTP's 422 say it (b2385af); a digit int() refuses is no id but a path, which the index does not hold (exit 6)."""
    out = CliRunner().invoke(main, ["similar", ref, "--index", str(served["alone"])])
    if ref.isascii():
        assert out.exit_code == 2 and "an image id must be an integer from 1 to" in out.output, out.output
    else:
        assert out.exit_code == 6 and "is not an indexed image" in out.output, out.output


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["fifo", "device", "latin-1"])
def test_a_labels_file_that_is_no_text_file_is_refused_at_once(served, tmp_path, kind):
    """`tag --labels-file` read whatever it was given: a FIFO waited for a writer for ever, /dev/zero filled
    the memory, a Latin-1 file was `unexpected UnicodeDecodeError`."""
    path = tmp_path / "labels"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "latin-1":
        path.write_bytes(b"caf\xe9\n")
    else:
        path = "/dev/zero"
    ix = tmp_path / "ix"
    shutil.copytree(served["alone"], ix)
    out = subprocess.run([sys.executable, "-m", "alignsearch", "tag", "--labels-file", str(path), "--index", str(ix)],
                         capture_output=True, text=True, timeout=60, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 6, out.stderr
    assert out.stderr.startswith("error: ") and len(out.stderr.splitlines()) == 1, out.stderr


@pytest.mark.slow
def test_a_request_body_sent_slowly_is_cut_off_too(served, tmp_path):
    """The twin of slowloris for bodies: headers sent at once, then a body a byte a second, read before the
    token is checked: held for ever (20 such connections without a token were all still open after 12 s).
    Here with deadlines of 1 s for the head and 2 s more for the body; a slow but whole request passes."""
    shutil.copytree(served["alone"], tmp_path / "ix")  # a server of its own index: its record is its own
    engine = alignsearch.open(tmp_path / "ix", device="cpu")
    server = start_in_thread(engine, ServerConfig(port=0, token="s3cret", head_seconds=1, body_seconds=2))
    try:
        port = server.port
        head = (f"POST /api/search HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: multipart/form-data; "
                "boundary=x\r\nContent-Length: {}\r\n\r\n")
        dribbled = socket.create_connection(("127.0.0.1", port), timeout=5)
        dribbled.sendall(head.format(100_000).encode() + b"--x\r\n")
        body = b'--x\r\nContent-Disposition: form-data; name="q"\r\n\r\nred\r\n--x--\r\n'
        slow = socket.create_connection(("127.0.0.1", port), timeout=5)
        slow.sendall(head.format(len(body)).encode().replace(b"\r\n\r\n", b"\r\nAuthorization: Bearer s3cret\r\n\r\n"))
        cut = None
        started = time.monotonic()
        while time.monotonic() - started < 8 and cut is None:
            try:
                dribbled.sendall(b"a")
                dribbled.setblocking(False)
                if dribbled.recv(100) == b"":
                    cut = time.monotonic() - started
            except BlockingIOError:
                pass
            except OSError:
                cut = time.monotonic() - started
            finally:
                dribbled.setblocking(True)
            if time.monotonic() - started > 1.5 and body:
                slow.sendall(body)  # 1.5 s after its head: within the body's deadline
                body = b""
            time.sleep(0.25)
        assert cut is not None and cut < 5, cut
        assert slow.recv(100).startswith(b"HTTP/1.1 200"), "a slow but whole request must be answered"
        slow.close()
        dribbled.close()
    finally:
        server.shutdown()
        engine.close()


@pytest.mark.slow
def test_serve_with_an_empty_host_is_a_usage_error_not_every_interface(served, tmp_path):
    """--host "" (an unset variable in a script) listened on every interface while it printed 127.0.0.1."""
    shutil.copytree(served["alone"], tmp_path / "ix")
    try:
        out = subprocess.run([sys.executable, "-m", "alignsearch", "serve", "--host", "", "--port", "0", "--index",
                              str(tmp_path / "ix"), "--device", "cpu"], capture_output=True, text=True, timeout=30,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"it served: {exc.stderr}")
    assert out.returncode == 2 and "--host needs an address" in out.stderr, out.stderr


@pytest.mark.slow
def test_names_a_latin1_terminal_cannot_show_are_escaped_not_fatal(served, tiny_model, tmp_path):
    """In a locale such as de_DE.ISO-8859-1 (PYTHONIOENCODING stands in for it), one result named 你好.jpg
    ended the query: `unexpected UnicodeEncodeError`, exit 1, no results."""
    (tmp_path / "photos").mkdir()
    shutil.copy(next(served["corpus"].glob("*.jpg")), tmp_path / "photos" / "你好.jpg")
    ix = tmp_path / "ix"
    assert CliRunner().invoke(main, ["index", str(tmp_path / "photos"), "--index", str(ix), "--model", str(tiny_model),
                                     "--device", "cpu"]).exit_code == 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "latin-1"}
    for args in (["query", "red", "-k", "1"], ["info"], ["roots"]):
        out = subprocess.run([sys.executable, "-m", "alignsearch", *args, "--index", str(ix)], capture_output=True,
                             env=env, timeout=120)
        assert out.returncode == 0, out.stderr
    assert b"\\u4f60\\u597d.jpg" in subprocess.run([sys.executable, "-m", "alignsearch", "query", "red", "--index",
                                                   str(ix)], capture_output=True, env=env, timeout=120).stdout


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="only root can make a link owned by another user")
def test_a_query_image_through_a_planted_link_is_refused_alike_through_the_server(served, tmp_path):
    """A search here reads a query image as every file is read (safeopen): through a link another user planted in
    a folder they may write, it is refused. The client sent a server whatever the path led to (read_bytes
    follows any link), so the same query searched once a server ran: one rule for both paths, the local one."""
    from PIL import Image

    shared, private = tmp_path / "shared", tmp_path / "private"
    shared.mkdir()
    private.mkdir()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(private / "home.jpg")
    os.chown(shared, 3000, 3000)
    shared.chmod(0o2775)
    (shared / "x.jpg").symlink_to(private / "home.jpg")
    os.lchown(shared / "x.jpg", 4242, 4242)
    (tmp_path / "mine.jpg").symlink_to(private / "home.jpg")  # this user's own link: searched both ways
    warm, alone = (query(ix, "--image", shared / "x.jpg", "--json") for ix in (served["ix"], served["alone"]))
    assert warm.returncode == alone.returncode == 6, (warm.stderr, alone.stderr)
    for answer in (warm, alone):
        assert b"symbolic link made by another user (uid 4242)" in answer.stderr, answer.stderr
    warm, alone = (query(ix, "--image", tmp_path / "mine.jpg", "-k", "2", "--json") for ix in (served["ix"], served["alone"]))
    assert warm.returncode == alone.returncode == 0, warm.stderr
    assert b"notice" not in warm.stderr and json.loads(warm.stdout) == json.loads(alone.stdout)
