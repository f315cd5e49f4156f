"""Indexed files are read and served only through alignsearch/safeopen.py: no symlinked folder on the way,
nothing but a regular file, never blocking on a FIFO; file:// entries of a list get the same checks; and
a server whose vectors.f16 is cut short under it answers 5xx instead of dying of SIGBUS."""

import json
import os
import shutil
import subprocess
import tempfile
import threading
import tracemalloc
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.error import HTTPError

import pytest
from conftest import make_images, run
from helpers import alignsearch, call, start_serve, stop, summary
from PIL import Image

from alignsearch import safeopen
from alignsearch.media import sources
from alignsearch.errors import BadImageError

NOBODY = 65534


def _as_nobody(script: str, *args) -> None:
    """The attacker's half: a local user without root's powers (uid/gid 65534) runs a shell script (the
    test's interpreter may live where that user cannot reach it)."""
    def drop():
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)

    subprocess.run(["/bin/sh", "-c", script, "sh", *map(str, args)], preexec_fn=drop, check=True, timeout=60)


def _write_list(path: Path, entries) -> Path:
    path.write_text("path\n" + "".join(f"{e}\n" for e in entries))
    return path


def _ids(url, token="t") -> dict[str, int]:
    results = json.loads(call(url, "/api/recent?limit=100", token=token)[2])["results"]
    return {r["path"]: r["id"] for r in results}


def _get(url, path, token="t", timeout=10.0):
    """(status, body) of a GET, or (None, reason) when no answer came within timeout."""
    request = urllib.request.Request(url + path, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, r.read()
    except HTTPError as exc:
        return exc.code, exc.read()
    except OSError as exc:
        return None, str(exc)


def _refused(status, headers, body, secret: bytes | None = None) -> str:
    assert status in (403, 404, 409), (status, body[:200])
    assert headers["Content-Type"] == "application/json"
    if secret is not None:
        assert secret not in body
    return json.loads(body)["error"]


# -- the primitive -------------------------------------------------------------------------------------


def test_open_under_refuses_a_symlinked_folder_on_the_way(tmp_path):
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    (root / "a" / "b").mkdir(parents=True)
    elsewhere.mkdir()
    (root / "a" / "b" / "x.jpg").write_bytes(b"mine")
    (elsewhere / "x.jpg").write_bytes(b"gold")
    fd = safeopen.open_under(root, "a/b/x.jpg")
    assert safeopen.read_fd(fd, 100) == b"mine"
    (root / "a" / "b").rename(root / "a" / "old")
    (root / "a" / "b").symlink_to(elsewhere)
    with open(root / "a" / "b" / "x.jpg", "rb", opener=lambda p, f: os.open(p, f | os.O_NOFOLLOW)) as f:
        assert f.read() == b"gold"  # what O_NOFOLLOW alone lets through
    with pytest.raises(safeopen.Refused, match="a folder on its path is a symbolic link: b"):
        safeopen.open_under(root, "a/b/x.jpg")
    with pytest.raises(safeopen.Refused, match="a folder on its path is a symbolic link"):
        safeopen.open_under(root, "a/b/x.jpg", follow_last=True)  # only the file itself may be a link
    for bad in ("../elsewhere/x.jpg", "a/../../elsewhere/x.jpg", "/etc/passwd", "a//old/x.jpg"):
        with pytest.raises(safeopen.Refused, match="not a path under its root"):
            safeopen.open_under(root, bad)


def test_open_under_checks_the_file_itself(tmp_path):
    (tmp_path / "real.jpg").write_bytes(b"12345")
    (tmp_path / "link.jpg").symlink_to(tmp_path / "real.jpg")
    (tmp_path / "zero.jpg").symlink_to("/dev/zero")
    os.mkfifo(tmp_path / "pipe.jpg")
    with pytest.raises(safeopen.Refused, match="is a symbolic link"):
        safeopen.open_under(tmp_path, "link.jpg")
    assert safeopen.read_fd(safeopen.open_under(tmp_path, "link.jpg", follow_last=True), 100) == b"12345"
    with pytest.raises(safeopen.Refused, match="not a regular file: character device"):
        safeopen.open_under(tmp_path, "zero.jpg", follow_last=True)
    with pytest.raises(safeopen.Refused, match="not a regular file: fifo"):
        safeopen.open_under(tmp_path, "pipe.jpg")
    st = (tmp_path / "real.jpg").stat()
    os.close(safeopen.open_under(tmp_path, "real.jpg", expect=(st.st_size, st.st_mtime)))
    with pytest.raises(safeopen.Changed):
        safeopen.open_under(tmp_path, "real.jpg", expect=(st.st_size + 1, st.st_mtime))
    with pytest.raises(FileNotFoundError):
        safeopen.open_under(tmp_path, "gone/real.jpg")


def test_file_dev_zero_in_a_list_is_refused_without_being_read(tmp_path):
    from indexer.scan import scan_list

    listed = _write_list(tmp_path / "list.csv", ["file:///dev/zero"])
    [found] = list(scan_list(str(listed)))
    assert found.error == "not a regular file: character device"
    tracemalloc.start()
    try:
        with pytest.raises(BadImageError, match="not a regular file: character device"):
            sources.read_bytes(str(listed), "file:///dev/zero")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20, f"{peak:,} bytes allocated: /dev/zero was read"


def test_a_fifo_behind_a_file_url_is_refused_at_once(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    listed = _write_list(tmp_path / "list.csv", [fifo.as_uri()])
    outcome = []

    def read():
        try:
            sources.read_bytes(str(listed), fifo.as_uri())
        except BaseException as exc:  # noqa: BLE001 - looked at below
            outcome.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(10)
    if reader.is_alive():  # blocked opening the FIFO: let it go before failing
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("reading a FIFO behind a file:// entry blocked")
    assert isinstance(outcome[0], BadImageError) and "fifo" in str(outcome[0])


# -- the server ----------------------------------------------------------------------------------------


def _bmp(path: Path, colour) -> Path:
    Image.new("RGB", (40, 30), colour).save(path, "BMP")  # same size and mode: same number of bytes
    return path


@pytest.mark.slow
def test_a_parent_folder_swapped_for_a_symlink_is_not_followed_by_the_server(tmp_path, tiny_model):
    """Another user who can write the indexed folder replaces a subfolder by a symlink to a folder holding a
    file of the same name, size and mtime: O_NOFOLLOW on the last component alone served it."""
    shared = Path(tempfile.mkdtemp(prefix="alignsearch-shared-"))  # reachable by uid 65534, unlike tmp_path
    try:
        shared.chmod(0o755)
        corpus, album = shared / "corpus", shared / "corpus" / "album"
        make_images(corpus, 3)
        album.mkdir()
        mine = _bmp(album / "a.bmp", (200, 30, 30))
        for path in (corpus, album, mine):
            os.chown(path, NOBODY, NOBODY)
        secret = _bmp(tmp_path / "secret.bmp", (30, 30, 200))
        (tmp_path / "vault").mkdir()
        secret = secret.rename(tmp_path / "vault" / "a.bmp")
        st = mine.stat()
        os.utime(secret, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert secret.stat().st_size == st.st_size and secret.read_bytes() != mine.read_bytes()
        ix = tmp_path / "ix"
        run("index", corpus, "--index", ix, "--model", tiny_model, "--device", "cpu")
        proc, url = start_serve(ix, "--token", "t")
        try:
            file_id = _ids(url)[str(mine)]
            assert call(url, f"/api/image/{file_id}", token="t")[2] == mine.read_bytes()  # served before the swap
            _as_nobody('mv "$1" "$1.old" && ln -s "$2" "$1"', album, secret.parent)
            assert album.is_symlink() and (album / "a.bmp").read_bytes() == secret.read_bytes()
            for query in ("", "?size=64"):
                message = _refused(*call(url, f"/api/image/{file_id}{query}", token="t"), secret=secret.read_bytes())
                assert "symbolic link" in message, message
        finally:
            stop(proc)
    finally:
        shutil.rmtree(shared)


@pytest.mark.slow
def test_a_file_url_entry_swapped_for_a_symlink_is_neither_served_nor_indexed(tmp_path, tiny_model):
    photos = make_images(tmp_path / "photos", 4)
    listed = _write_list(tmp_path / "list.csv", [p.as_uri() for p in photos])
    ix = tmp_path / "ix"
    run("index", listed, "--index", ix, "--model", tiny_model, "--device", "cpu")
    target = photos[1]
    proc, url = start_serve(ix, "--token", "t")
    try:
        file_id = _ids(url)[target.as_uri()]
        assert call(url, f"/api/image/{file_id}", token="t")[0] == 200
        target.unlink()
        target.symlink_to("/etc/passwd")
        for query in ("", "?size=64"):
            message = _refused(*call(url, f"/api/image/{file_id}{query}", token="t"), secret=b"root:")
            assert "symbolic link" in message, message
        assert call(url, f"/api/image/{_ids(url)[photos[2].as_uri()]}", token="t")[0] == 200  # the others are served
    finally:
        stop(proc)
    run("index", "--index", ix, "--device", "cpu")
    failed = json.loads(run("info", "--failed", "--json", "--index", ix).stdout)["failed_files"]
    assert [f["path"] for f in failed] == [target.as_uri()]


@pytest.mark.slow
def test_fifos_and_devices_behind_file_urls_do_not_hang_index(tmp_path, tiny_model):
    photos = make_images(tmp_path / "photos", 3)
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    listed = _write_list(tmp_path / "list.csv", [*(p.as_uri() for p in photos), fifo.as_uri(), "file:///dev/zero"])
    ix = tmp_path / "ix"
    try:
        proc = alignsearch("index", listed, "--index", ix, "--model", tiny_model, "--device", "cpu", "--json",
                           timeout=120)
    except subprocess.TimeoutExpired:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # let the stuck reader go
        pytest.fail("index blocked on a FIFO behind a file:// entry")
    s = summary(proc)
    assert (s["added"], s["failed"]) == (3, 2)
    failed = json.loads(run("info", "--failed", "--json", "--index", ix).stdout)["failed_files"]
    assert {f["path"]: f["reason"] for f in failed} == {fifo.as_uri(): "not a regular file: fifo",
                                                        "file:///dev/zero": "not a regular file: character device"}


@pytest.mark.slow
def test_requests_for_a_fifo_behind_a_file_url_do_not_wedge_the_server(tmp_path, tiny_model):
    photos = make_images(tmp_path / "photos", 3)
    listed = _write_list(tmp_path / "list.csv", [p.as_uri() for p in photos])
    ix = tmp_path / "ix"
    run("index", listed, "--index", ix, "--model", tiny_model, "--device", "cpu")
    proc, url = start_serve(ix, "--token", "t")
    fifo = photos[1]
    try:
        file_id = _ids(url)[fifo.as_uri()]
        fifo.unlink()
        os.mkfifo(fifo)
        paths = [f"/api/image/{file_id}" + ("?size=64" if i % 2 else "") for i in range(64)]
        with ThreadPoolExecutor(64) as pool:
            answers = list(pool.map(lambda p: _get(url, p), paths))
        assert all(status == 409 and b"fifo" in body for status, body in answers), answers[:3]
        status, body = _get(url, "/api/info")
        assert status == 200, body
    finally:
        for _ in range(64):  # on failure: release readers blocked on the FIFO so the server can stop
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                break
        stop(proc)


@pytest.mark.slow
def test_vectors_cut_short_under_the_server_answer_5xx_not_sigbus(tmp_path, tiny_model):
    corpus, ix = tmp_path / "corpus", tmp_path / "ix"
    make_images(corpus, 6)
    run("index", corpus, "--index", ix, "--model", tiny_model, "--device", "cpu")
    proc, url = start_serve(ix, "--token", "t")
    try:
        ids = sorted(_ids(url).values())
        assert call(url, f"/api/search?similar={ids[0]}&k=3", token="t")[0] == 200  # the vectors are mapped now
        os.truncate(ix / "vectors.f16", 0)
        for file_id in ids[:3]:
            status, headers, body = call(url, f"/api/search?similar={file_id}&k=3", token="t")
            assert 500 <= status < 600 and headers["Content-Type"] == "application/json", (status, body[:300])
            assert "verify --repair" in json.loads(body)["error"]
        assert proc.poll() is None, "the server died"
        assert call(url, "/api/info", token="t")[0] == 200
    finally:
        stop(proc)
    out = run("query", "anything", "--index", ix, "--device", "cpu", code=7).output
    assert "verify --repair" in out and "Traceback" not in out


# -- symbolic links another user planted -------------------------------------------------------------------------

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="only root can make links owned by another user")
ATTACKER = 4242


def _shared(tmp_path: Path) -> tuple[Path, Path]:
    """(a folder another user may write, as a shared photo folder is; this user's private file)."""
    shared, private = tmp_path / "shared", tmp_path / "private"
    shared.mkdir()
    private.mkdir()
    os.chown(shared, 3000, 3000)
    shared.chmod(0o2775)
    secret = private / "credentials"
    secret.write_bytes(b"SECRET")
    return shared, secret


@pytest.fixture(params=["o_path", "no_o_path"])
def link_walk(request, monkeypatch):
    """Links judged as on Linux (each on an O_PATH descriptor of the very inode followed) and as where the system
    has no O_PATH (macOS, the BSDs: the link's lstat, compared by inode after its target is read), played here by
    taking O_PATH away from safeopen."""
    if request.param == "no_o_path":
        monkeypatch.setattr(safeopen, "_PATH", 0)
        monkeypatch.setattr(safeopen, "_DIR", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    return request.param


def _plant(link: Path, target) -> Path:
    link.symlink_to(target)
    os.lchown(link, ATTACKER, ATTACKER)
    return link


@needs_root
def test_a_chain_of_links_is_judged_link_by_link(tmp_path, link_walk):
    """The user's own library link ~/lib/a.txt -> /shared/a.txt, and another user replaced /shared/a.txt with a
    link to the user's credentials: only the first link was judged (the user's own), the second followed."""
    shared, secret = _shared(tmp_path)
    _plant(shared / "a.txt", secret)
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "a.txt").symlink_to(shared / "a.txt")
    (lib / "b.txt").symlink_to("../shared/b.txt")  # relative, to another user's honest file: read
    (shared / "b.txt").write_bytes(b"caption")
    os.chown(shared / "b.txt", ATTACKER, ATTACKER)
    open_fds = len(os.listdir("/proc/self/fd"))
    for open_it in (lambda: safeopen.open_under(lib, "a.txt", follow_last=True),
                    lambda: safeopen.open_regular(lib / "a.txt")):
        with pytest.raises(safeopen.Refused, match="another user"):
            open_it()
    with pytest.raises(safeopen.Refused, match="another user"):
        safeopen.stat_through(lib, "a.txt")
    assert safeopen.read_fd(safeopen.open_under(lib, "b.txt", follow_last=True), 100) == b"caption"
    assert safeopen.stat_through(lib, "b.txt").st_size == 7
    loop = lib / "loop.txt"
    loop.symlink_to("loop.txt")
    with pytest.raises(safeopen.Refused, match="symbolic links"):
        safeopen.open_regular(loop)
    assert len(os.listdir("/proc/self/fd")) == open_fds  # every folder and link walked through closed


@needs_root
def test_a_link_is_refused_only_where_another_user_could_have_planted_it(tmp_path, link_walk):
    """A link another user made is refused in a folder others may write, and followed in one only its owner
    writes (a drive from another machine, a folder root made): no one else could have put it there."""
    shared, secret = _shared(tmp_path)
    _plant(shared / "x.txt", secret)
    with pytest.raises(safeopen.Refused, match=r"another user \(uid 4242\) in a folder others may write"):
        safeopen.open_under(shared, "x.txt", follow_last=True)
    shared.chmod(0o755)
    assert safeopen.read_fd(safeopen.open_under(shared, "x.txt", follow_last=True), 100) == b"SECRET"
    shared.chmod(0o1777)  # a sticky world-writable folder: /tmp
    with pytest.raises(safeopen.Refused):
        safeopen.open_regular(shared / "x.txt")
    os.chown(shared, ATTACKER, ATTACKER)  # the folder's owner made it (protected_symlinks)
    assert safeopen.read_fd(safeopen.open_regular(shared / "x.txt"), 100) == b"SECRET"


@needs_root
def test_a_link_in_a_folder_another_user_made_in_a_shared_one_is_refused(tmp_path, link_walk):
    """Where the share lets another user write, they can make a folder of their own in it, and a link there is
    one its folder's owner made: followed by the folder-owner rule alone. A folder is judged as a link is, from /
    down, the root the user chose included."""
    shared, secret = _shared(tmp_path)
    album = shared / "album"
    album.mkdir()
    os.chown(album, ATTACKER, ATTACKER)
    _plant(album / "x.txt", secret)
    for open_it in (lambda: safeopen.open_under(shared, "album/x.txt", follow_last=True),
                    lambda: safeopen.open_under(album, "x.txt", follow_last=True),
                    lambda: safeopen.open_regular(album / "x.txt"),
                    lambda: safeopen.stat_through(shared, "album/x.txt")):
        with pytest.raises(safeopen.Refused, match="in a folder another user made where others may write"):
            open_it()
    shared.chmod(0o755)  # no one but its owner may write the share: the folder is its owner's doing
    assert safeopen.read_fd(safeopen.open_under(shared, "album/x.txt", follow_last=True), 100) == b"SECRET"


@pytest.mark.slow
@needs_root
def test_a_planted_link_swapped_in_while_a_file_is_opened_is_never_followed(tmp_path, link_walk):
    """The owner was judged on one lookup of the name and the file opened on another: another user exchanging a
    regular file and a planted link under one name (renameat2 RENAME_EXCHANGE in a loop) got the user's
    credentials read for them in a few percent of opens."""
    import ctypes

    if not hasattr(ctypes.CDLL(None), "renameat2"):
        pytest.skip("no renameat2 in this C library")
    shared, secret = _shared(tmp_path)
    (shared / "x.txt").write_bytes(b"harmless")
    _plant(shared / "x.alt", secret)
    swapper = subprocess.Popen([os.sys.executable, "-c", (
        "import ctypes, sys, time\n"
        "libc = ctypes.CDLL(None)\n"
        "a, b, end = sys.argv[1].encode(), sys.argv[2].encode(), time.time() + 30\n"
        "print('go', flush=True)\n"
        "while time.time() < end:\n"
        "    libc.renameat2(-100, a, -100, b, 2)\n"), str(shared / "x.txt"), str(shared / "x.alt")],
        stdout=subprocess.PIPE)
    try:
        assert swapper.stdout.readline() == b"go\n"
        seen = {"secret": 0, "harmless": 0, "refused": 0}
        for _ in range(20000):
            try:
                data = safeopen.read_fd(safeopen.open_under(shared, "x.txt", follow_last=True), 100)
                seen["secret" if data == b"SECRET" else "harmless"] += 1
            except (safeopen.Refused, FileNotFoundError):
                seen["refused"] += 1
    finally:
        swapper.kill()
        swapper.wait()
    assert seen["secret"] == 0, seen
    assert seen["harmless"] and seen["refused"], seen  # the swap did race the opens


def test_pread_chunks_reads_from_an_offset_and_leaves_the_descriptors_own(tmp_path):
    """The one pread loop (the server's file_sha256 and pread_exactly): a size caps it, the file's end stops it,
    and the descriptor's offset stays where it was."""
    path = tmp_path / "f.bin"
    data = os.urandom(safeopen.PREAD_CHUNK * 2 + 5)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.lseek(fd, 3, os.SEEK_SET)
        assert b"".join(safeopen.pread_chunks(fd)) == data
        chunks = list(safeopen.pread_chunks(fd, offset=7, size=safeopen.PREAD_CHUNK + 1))
        assert [len(c) for c in chunks] == [safeopen.PREAD_CHUNK, 1] and b"".join(chunks) == data[7:safeopen.PREAD_CHUNK + 8]
        assert b"".join(safeopen.pread_chunks(fd, offset=len(data) - 2, size=10)) == data[-2:]  # cut short
        assert list(safeopen.pread_chunks(fd, offset=len(data), size=10)) == [] == list(safeopen.pread_chunks(fd, size=0))
        assert os.lseek(fd, 0, os.SEEK_CUR) == 3
    finally:
        os.close(fd)
