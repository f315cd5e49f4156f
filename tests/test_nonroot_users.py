"""Two real local users: alice, whose index and server these are, and mallory, another user of the same machine who
tries to take them over (README, "What others can write"). Each side runs as that user (helpers.as_user), without
root's power to read any file or signal any process: what the other user may do is what the system lets them.

Guarantees tried: the index's lock files (write.lock) and the server record's turn (client.record_turn) cannot be
held by another user, who held them for ever (every `index` of alice's refused, her `serve` 10 s late to start and to
stop, its record never removed), not even one opened while an earlier release left it 0644 (replaced); a lock on a
killed write's leftover (a `.tmp`, a swap's `.new` copy) or on a `.old` folder cannot keep it or silence its
warning; the model cache's lock files (records/write.lock, .inuse) cannot be opened by another user at all; a query
never trusts a server record another user wrote, nor sends to a process of another user's, nor to a
port held by another user for a process of its own."""

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from helpers import (as_user, can_hide_pids, ipv6_loopback, local_user, needs_local_users, shown_to_users,
                     started_as_user, stopped_user, users_folder)

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _local_users():
    """Skipped where no local user can be made or run as (not root, no runuser): failed instead where CI asks
    (ALIGNSEARCH_REQUIRE_USERS), so these guarantees never go untried unseen."""
    needs_local_users()

# Holds an exclusive flock on each path given (a folder where it ends with /) for as long as its stdin is open,
# where the user may open it: prints "ready" and, per path, "held" or why not.
HOLD = """
import fcntl, json, os, sys
said = []
for path in sys.argv[1:]:
    try:
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.endswith("/") else os.O_NONBLOCK))
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        said.append("held")
    except OSError as exc:
        said.append(exc.strerror)
print("ready", json.dumps(said), flush=True)
sys.stdin.read()
"""

# An index run's lock, as alice: what `index` says when it cannot have it.
WRITER = """
import sys
from pathlib import Path
from alignsearch.errors import BadInputError
from indexer.lock import writer_lock
try:
    with writer_lock(Path(sys.argv[1])):
        print("locked")
except BadInputError as exc:
    print("refused:", exc)
"""

# A stand-in HTTP server (another user's program at a port): answers every request as a search that names the index id
# argv[1], and prints each request it is sent. Prints "ready PID PORT".
STANDIN = """
import http.server, json, os, sys, threading
class Answer(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        print("asked", self.command, self.path, self.headers.get("Authorization"), flush=True)
        body = json.dumps({"results": [{"path": "/planted.jpg", "score": 1.0}], "plan": {}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-Alignsearch-Index", sys.argv[1])
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    do_POST = do_GET
    def log_message(self, *args):
        pass
family, host = (http.server.socket.AF_INET6, "::1") if sys.argv[2] == "6" else (http.server.socket.AF_INET, "127.0.0.1")
http.server.ThreadingHTTPServer.address_family = family
server = http.server.ThreadingHTTPServer((host, int(sys.argv[3])), Answer)
print("ready", os.getpid(), server.server_address[1], flush=True)
threading.Thread(target=server.serve_forever, daemon=True).start()
sys.stdin.read()
"""

# Writes a server record, as the user running it: argv: path, pid, port, token, mode[, index id].
RECORD = """
import json, os, socket, sys
path, pid, port, token, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5], 8)
record = {"pid": pid, "hostname": socket.gethostname(), "host": "127.0.0.1", "port": port,
          "url": f"http://127.0.0.1:{port}", "token": token, "index_id": (sys.argv[6:] or ["the-index"])[0],
          "index_dir": os.path.dirname(path), "search_params": ["q", "k"]}
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
os.write(fd, json.dumps(record).encode())
os.close(fd)
"""

# A query routed as `alignsearch query` routes it, as alice: whether it got an answer from a server, and the notices.
QUERY = """
import json, sys
from pathlib import Path
from alignsearch.search.request import SearchRequest
from alignsearch.surfaces import client
notices = []
routed = client.search_via_server(Path(sys.argv[1]), SearchRequest(text="dog"), notice=notices.append, timeout=10)
print(json.dumps({"answer": routed.answer, "notices": notices}))
"""


@pytest.fixture
def shared():
    """A folder every user may enter, for alice's and mallory's own folders (pytest's tmp_path is root's alone)."""
    base = shown_to_users(Path(tempfile.mkdtemp(prefix="alignsearch-users-", dir="/tmp")))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _index_folder(shared: Path, name: str) -> Path:
    """An index folder of user `name` (0755, as `index` makes one), in their own folder."""
    user = local_user(name)
    ix = users_folder(shared, name) / "ix"
    ix.mkdir()
    os.chown(ix, user.pw_uid, user.pw_gid)
    return ix


def _holding(name: str, *paths):
    """HOLD run as `name` on paths: (the process, what it could hold of each)."""
    proc, line = started_as_user(name, HOLD, *map(str, paths))
    return proc, json.loads(line.split(" ", 1)[1])


@pytest.mark.parametrize("left", [None, 0o644], ids=["new", "left-by-older-release"])
def test_another_user_cannot_hold_the_writer_lock(shared, left):
    """mallory could open alice's write.lock (0644) and flock it: every writer of alice's index was refused as
    "another alignsearch process is writing" for as long as mallory liked. Now the lock file is 0600, and one an
    older release left 0644 is made 0600 by alice's next writer."""
    ix = _index_folder(shared, "alice")
    if left is not None:
        (ix / "write.lock").touch()
        os.chown(ix / "write.lock", local_user("alice").pw_uid, local_user("alice").pw_gid)
        (ix / "write.lock").chmod(left)
    first = as_user("alice", WRITER, ix)
    assert first.stdout.strip() == "locked", first.stderr
    holder, held = _holding("mallory", ix / "write.lock")
    try:
        assert held == ["Permission denied"]
        after = as_user("alice", WRITER, ix)
        assert after.stdout.strip() == "locked", after.stdout + after.stderr
    finally:
        stopped_user(holder)
    assert (ix / "write.lock").stat().st_mode & 0o777 == 0o600


def test_another_users_lock_file_is_no_writer_at_work(shared):
    """mallory, reading alice's index, cannot open her 0600 write.lock to ask whether she writes it: taken as not
    (verify, info), not an error."""
    ix = _index_folder(shared, "alice")
    assert as_user("alice", WRITER, ix).stdout.strip() == "locked"
    probe = as_user("mallory", "import sys; from pathlib import Path; from alignsearch.storage.paths import "
                               "writer_running; print(writer_running(Path(sys.argv[1])))", ix)
    assert probe.stdout.strip() == "False", probe.stderr


TURN = """
import json, sys
from pathlib import Path
from alignsearch.surfaces import client
path = Path(sys.argv[1])
with client.record_turn(path, 0) as turn:
    had = turn
removed = client.remove_record_if(path, lambda record: True, 0)
print(json.dumps({"turn": had, "removed": removed, "left": path.exists()}))
"""


def test_another_user_cannot_hold_the_record_turn(shared):
    """The turn at a server record was an flock on the index folder, which every user who may list it could take and
    keep: alice's `serve` then waited 10 s to write its record and 10 s (three times) to remove it at its exit, and
    left it, and a query could not remove a stale one. Now the turn is a 0600 lock file of alice's (server.lock)."""
    ix = _index_folder(shared, "alice")
    record = ix / "server.json"
    assert as_user("alice", RECORD, record, 999_999_999, 1, "t", "600").returncode == 0
    first = as_user("alice", TURN, record)  # makes the lock file, and removes the record
    assert json.loads(first.stdout)["removed"], first.stderr
    assert as_user("alice", RECORD, record, 999_999_999, 1, "t", "600").returncode == 0
    holder, held = _holding("mallory", f"{ix}/", ix / "server.lock")
    try:
        assert held[1] == "Permission denied"
        turned = as_user("alice", TURN, record)
        assert json.loads(turned.stdout) == {"turn": True, "removed": True, "left": False}, turned.stderr
    finally:
        stopped_user(holder)
    assert (ix / "server.lock").stat().st_mode & 0o777 == 0o600


def _query(ix: Path, hidepid: bool = False) -> dict:
    routed = as_user("alice", QUERY, ix, hidepid=hidepid)
    assert routed.returncode == 0, routed.stderr
    return json.loads(routed.stdout)


def _asked(ix: Path, writer: str, mode: str, pid=None, port=0, index_id: str = "the-index",
           hidepid: bool = False) -> tuple[dict, str]:
    """mallory's stand-in server started at 127.0.0.1:port (0: any), a record by `writer` (file mode `mode`) in ix
    naming pid (None: the stand-in's) and the stand-in's port, and alice's query of ix (hidepid: where /proc hides
    mallory's processes from her): (what it routed, what the stand-in was asked)."""
    standin, line = started_as_user("mallory", STANDIN, index_id, "4", port)
    try:
        _, standin_pid, port = line.split()
        assert as_user(writer, RECORD, ix / "server.json", pid or standin_pid, port, "secret-token", mode,
                       index_id).returncode == 0
        routed = _query(ix, hidepid)
    finally:
        asked = stopped_user(standin)
    return routed, asked


def test_a_record_another_user_wrote_is_never_used(shared):
    """mallory's own index holds a record she wrote, readable by all, naming her own server (alive, listening where
    it says, answering for any index): alice's query of that index sends nothing to it and searches locally."""
    routed, asked = _asked(_index_folder(shared, "mallory"), "mallory", "644")
    assert routed["answer"] is None
    assert any("belongs to another user" in notice for notice in routed["notices"]), routed["notices"]
    assert asked == ""


HIDEPID = [False, pytest.param(True, marks=pytest.mark.skipif(not can_hide_pids(), reason="needs a hidepid=2 /proc"))]


@pytest.mark.parametrize("hidepid", HIDEPID, ids=["proc", "hidepid"])
def test_a_recorded_process_of_another_user_is_not_asked(shared, hidepid):
    """alice's record (her server killed -9 or lost in a reboot) names a pid that is now mallory's server at the
    recorded port: kill answers EPERM, so it is another user's process and not asked; the stale record is removed.
    Also where /proc hides mallory's processes from alice (hidepid=2), where /proc cannot say which sockets it holds."""
    ix = _index_folder(shared, "alice")
    routed, asked = _asked(ix, "alice", "600", hidepid=hidepid)
    assert routed["answer"] is None
    assert any("another user's" in notice and "stale record was removed" in notice for notice in routed["notices"]), \
        routed["notices"]
    assert asked == "" and not (ix / "server.json").exists()


@pytest.mark.parametrize("hidepid", HIDEPID, ids=["proc", "hidepid"])
def test_a_port_another_user_holds_is_not_asked(shared, hidepid):
    """alice's record names a process of hers that is alive (its number reused by another program of hers) and a port
    mallory's server now holds: the process holds no socket at that port, so the query and the token stay here.
    Also where /proc hides mallory's processes (hidepid=2): alice's own are seen, and mallory's socket in the table."""
    hers, mine = started_as_user("alice", "import os, sys; print('ready', os.getpid(), flush=True); sys.stdin.read()")
    try:
        routed, asked = _asked(_index_folder(shared, "alice"), "alice", "600", pid=mine.split()[1], hidepid=hidepid)
    finally:
        stopped_user(hers)
    assert routed["answer"] is None
    assert any("does not listen at" in notice for notice in routed["notices"]), routed["notices"]
    assert asked == ""


def _users_index(indexed_images, shared: Path, name: str) -> Path:
    """A real index (the tiny model's, of two images) of user `name`, in their own folder."""
    user = local_user(name)
    ix = users_folder(shared, name) / "ix"
    shutil.copytree(indexed_images(2)[1], ix)
    for path in (ix, *ix.rglob("*")):
        os.chown(path, user.pw_uid, user.pw_gid, follow_symlinks=False)
    return ix


@pytest.mark.skipif(not ipv6_loopback(), reason="needs IPv6's loopback")
def test_the_port_at_another_address_is_not_the_recorded_one(shared, indexed_images):
    """alice's record names 127.0.0.1:PORT and a live process of hers that listens at PORT on [::1] only (a program
    of hers that took the dead server's number, or another server of hers): mallory's server at 127.0.0.1:PORT is
    what the query would reach. The process was taken as the recorded server, as it held a socket at that port on
    any address, and the query and the token went to mallory, whose answer named the index id (anyone may read it
    in the catalog) and was taken."""
    from alignsearch.surfaces.client import local_index_id

    ix = _users_index(indexed_images, shared, "alice")
    index_id = local_index_id(ix)
    hers, line6 = started_as_user("alice", STANDIN, index_id, "6", 0)
    try:
        _, pid, port = line6.split()
        routed, asked = _asked(ix, "alice", "600", pid=pid, port=port, index_id=index_id)
    finally:
        stopped_user(hers)
    assert routed["answer"] is None, routed
    assert any("does not listen at" in notice for notice in routed["notices"]), routed["notices"]
    assert asked == ""


# A write of alice's killed mid-way (atomic.writing): its temporary is left beside the file.
KILLED_WRITE = """
import os, sys
from alignsearch import atomic
with atomic.writing(sys.argv[1]) as f:
    f.write(b"half a file")
    f.flush()
    os.kill(os.getpid(), 9)
"""

SWEEP = "import sys; from alignsearch import atomic; print(atomic.remove_stale(sys.argv[1], min_age=0))"


def test_another_user_cannot_keep_a_killed_writes_temporary(shared):
    """A write's temporary was made 0644 (the final file's mode) as soon as it was made: once its writer was killed,
    mallory could open it and hold its flock, and alice's remove_stale took it for a write at work and never removed
    it (an ANN index or an export of gigabytes, for as long as mallory liked). It stays 0600 until it is put in place."""
    folder = users_folder(shared, "alice")
    _killed_and_swept(folder / "out.bin", KILLED_WRITE, ".tmp")
    assert not (folder / "out.bin").exists()


def _killed_and_swept(out: Path, killed_write: str, suffix: str) -> None:
    """alice's write of out run and killed (killed_write), leaving one `suffix` temporary beside it; mallory cannot
    open it to hold its lock, and alice's next sweep removes it."""
    killed = as_user("alice", killed_write, out)
    assert killed.returncode in (-9, 128 + 9), killed.stderr  # runuser says a killed child so
    (left,) = [p for p in out.parent.iterdir() if p.name.endswith(suffix)]
    holder, held = _holding("mallory", f"{left}/" if left.is_dir() else left)
    try:
        assert held == ["Permission denied"]
        swept = as_user("alice", SWEEP, out)
        assert swept.stdout.strip() == "1", swept.stdout + swept.stderr
    finally:
        stopped_user(holder)
    assert not left.exists()


def test_a_write_put_in_place_has_its_mode(shared):
    """The mode a write asks for (less the umask) is the file's once it is in place, as before it stayed 0600 meanwhile."""
    folder = users_folder(shared, "alice")
    done = as_user("alice", "import sys; from alignsearch import atomic; atomic.write_bytes(sys.argv[1], b'x'); "
                            "atomic.write_bytes(sys.argv[2], b'x', mode=0o600)", folder / "a", folder / "b")
    assert done.returncode == 0, done.stderr
    assert [(folder / n).stat().st_mode & 0o777 for n in "ab"] == [0o644, 0o600]


# The server's open of an indexed file (server.open_indexed), as alice: what it answers.
SERVED = """
import os, sys
from alignsearch.surfaces.server import ApiError, open_indexed
try:
    fd = open_indexed(sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))
    print("served", os.read(fd, 100).decode())
except ApiError as exc:
    print("refused", exc.status, exc)
"""

MADE = "import os, sys; os.makedirs(os.path.dirname(sys.argv[1]), exist_ok=True); open(sys.argv[1], 'w').write(sys.argv[2])"


def test_a_folder_another_user_swaps_for_a_link_is_not_served_through(shared):
    """alice indexed mallory's folder `m` in a shared photo folder (sticky, world-writable); mallory then renames it and
    puts a link to alice's private folder at its name, holding a file of the same name, size and mtime: alice's server
    (serving her results to whoever has her token, or to anyone with --no-token) does not read through the link."""
    common = shared / "common"
    common.mkdir()
    common.chmod(0o1777)
    private = users_folder(shared, "alice", 0o700) / "private"
    assert as_user("mallory", MADE, common / "m" / "x.txt", "public").returncode == 0
    assert as_user("alice", MADE, private / "x.txt", "secret").returncode == 0
    indexed = (common / "m" / "x.txt").stat()
    os.utime(private / "x.txt", ns=(indexed.st_atime_ns, indexed.st_mtime_ns))
    args = (common, "m/x.txt", indexed.st_size, indexed.st_mtime)
    assert as_user("alice", SERVED, *args).stdout.strip() == "served public"
    swap = "import os, sys; os.rename(sys.argv[1], sys.argv[1] + '.old'); os.symlink(sys.argv[2], sys.argv[1])"
    assert as_user("mallory", swap, common / "m", private).returncode == 0
    served = as_user("alice", SERVED, *args)
    assert served.stdout.startswith("refused 409"), served.stdout + served.stderr



# What judges a folder above an index and above the model cache say of them, as alice.
ABOVE = """
import json, os, sys
from pathlib import Path
from alignsearch.encoders import backend
from alignsearch.storage import paths
print(json.dumps([paths.untrusted_parent(Path(sys.argv[1]), owners=(os.getuid(), 0)), backend.cache_untrusted()]))
"""


def test_a_sticky_folder_like_tmp_passes_above_a_users_index_and_cache(shared):
    """/tmp is 1777: writable by root's group too. The sticky bit passed its write by every user, not its group's, so
    to every user but root (whose group it is) an index in /tmp was refused, exit 6 ("its parent folder /tmp is
    writable by its group (gid 0)"), and a model cache under it was not used; the tests ran as root. A folder its
    group may write without the sticky bit is still refused."""
    sticky, plain = shared / "sticky", shared / "group-writable"
    for folder, mode in ((sticky, 0o1777), (plain, 0o775)):
        folder.mkdir()
        folder.chmod(mode)
        ix = folder / "ix"
        ix.mkdir()
        os.chown(ix, local_user("alice").pw_uid, local_user("alice").pw_gid)
    judged = as_user("alice", ABOVE, sticky / "ix", extra_env={"ALIGNSEARCH_CACHE": str(sticky / "cache")})
    assert json.loads(judged.stdout) == [None, None], judged.stdout + judged.stderr
    judged = as_user("alice", ABOVE, plain / "ix", extra_env={"ALIGNSEARCH_CACHE": str(plain / "cache")})
    assert [why and "writable by its group (gid 0)" in why for why in json.loads(judged.stdout)] == [True, True]

RECORD_PATH = """
import sys
from pathlib import Path
from alignsearch.errors import AlignSearchError
from alignsearch.surfaces.server import record_path
try:
    print("kept in", record_path(Path(sys.argv[1])))
except AlignSearchError as exc:
    print("refused:", exc)
"""


@pytest.mark.parametrize("variable", ["XDG_RUNTIME_DIR", "ALIGNSEARCH_CACHE"])
def test_a_private_record_is_not_kept_in_a_folder_another_user_may_rename(shared, variable):
    """alice serves mallory's index (read-only to her): the record, with its token, goes to alice's private folder
    ($XDG_RUNTIME_DIR/alignsearch, else the cache's servers/). With that variable naming a folder of mallory's that
    everyone may write, only the private folder itself was judged (made 0700, alice's: passed), so mallory could
    rename it away or put a link to another folder of alice's in its place; the folders above it are now judged as
    the model cache's are, and `serve` refuses in one line before it makes anything there."""
    ix = _index_folder(shared, "mallory")
    theirs = users_folder(shared, "mallory", 0o777) / "runtime"
    assert as_user("mallory", "import os, sys; os.mkdir(sys.argv[1], 0o777); os.chmod(sys.argv[1], 0o777)",
                   theirs).returncode == 0
    kept = as_user("alice", RECORD_PATH, ix, extra_env={variable: str(theirs)})
    assert kept.stdout.startswith("refused: cannot keep the server record"), kept.stdout + kept.stderr
    assert "belongs to another user" in kept.stdout and os.listdir(theirs) == []
    mine = as_user("alice", RECORD_PATH, ix, extra_env={variable: str(users_folder(shared, "alice", 0o700))})
    assert mine.stdout.startswith("kept in"), mine.stdout + mine.stderr


# Reads the first bytes of each path given, printing per path "read" or why not.
PEEK = """
import json, sys
said = []
for path in sys.argv[1:]:
    try:
        with open(path, "rb") as f:
            f.read(16)
        said.append("read")
    except OSError as exc:
        said.append(exc.strerror)
print(json.dumps(said))
"""


def test_another_user_reads_no_index_of_photos_they_cannot_read(tiny_model):
    """alice's photos in her 0700 folder, indexed into a folder every user may enter: the index was 0755 and
    mallory read its catalog (paths, captions, places, OCR text). Now it is 0700 (indexer/privacy.py), while an index
    of photos every user may read stays readable by mallory."""
    from conftest import run
    from helpers import smooth_photos

    base = Path(tempfile.mkdtemp(prefix="alignsearch-home-"))  # in /tmp: every user may enter (pytest's are 0700)
    try:
        _peek_both(base, tiny_model, run, smooth_photos)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _peek_both(base: Path, tiny_model, run, smooth_photos) -> None:
    shown_to_users(base).chmod(0o755)
    hidden = users_folder(base, "alice", 0o700) / "photos"
    smooth_photos(hidden, 2)
    shown = base / "open"
    smooth_photos(shown, 2)
    shown.chmod(0o755)
    kept_ix, open_ix = base / "kept-ix", base / "open-ix"
    run("index", "--index", kept_ix, "--model", tiny_model, hidden)
    run("index", "--index", open_ix, "--model", tiny_model, shown)
    peeked = as_user("mallory", PEEK, kept_ix / "catalog.db", open_ix / "catalog.db")
    assert json.loads(peeked.stdout) == ["Permission denied", "read"], peeked.stderr


def test_a_shared_folder_under_a_private_one_is_reached(tmp_path):
    """A folder the tests share with the users may lie under one the users cannot enter: pytest's tmp_path (0700, in
    root's 0700 /tmp/pytest-of-root), or any folder in a clone inside a 0700 `mktemp -d` folder, where every test here
    was skipped. No folder the tests did not make is chmod'ed: the users' children reach the shared one at its own
    path (helpers.users_view) and see nothing else of the private folders above it."""
    (tmp_path / "root-only").write_text("root's")
    folder = users_folder(tmp_path / "shared", "alice")
    wrote = as_user("alice", "import sys; open(sys.argv[1], 'w').write('hers')", folder / "x")
    assert wrote.returncode == 0, wrote.stderr
    assert (folder / "x").read_text() == "hers"
    seen = as_user("mallory", PEEK, folder / "x", tmp_path / "root-only")
    assert json.loads(seen.stdout) == ["read", "No such file or directory"], seen.stderr
    assert tmp_path.stat().st_mode & 0o777 == 0o700


# alice's sweep beside OUT (as every write of OUT runs it): the warnings it logs go to stderr.
SWEEP_SAID = "import sys; from alignsearch import atomic; atomic.remove_stale(sys.argv[1], min_age=0)"


def test_another_user_cannot_silence_the_warning_of_a_swap_left_folder(shared):
    """A folder swap killed mid-way leaves `.OUT.XXXX.old` (the folder replaced, with files of the user's own, or the
    new copy), named in a warning unless locked, as a swap at work keeps its copy. Such a folder has the mode of the
    folder swapped (0755): mallory opened it and held its lock, and alice was never told of it. A lock on a folder
    others may open is no word of alice's now; one only alice may open (0700) still keeps it unsaid."""
    folder = users_folder(shared, "alice")
    left, private = folder / ".out.abcd1234.old", folder / ".out.efgh5678.old"
    made = "import os, sys; os.mkdir(sys.argv[1], 0o755); os.mkdir(sys.argv[2], 0o700)"
    assert as_user("alice", made, left, private).returncode == 0
    holder, held = _holding("mallory", f"{left}/", f"{private}/")
    try:
        assert held == ["held", "Permission denied"]
        said = as_user("alice", SWEEP_SAID, folder / "out").stderr
    finally:
        stopped_user(holder)
    assert f"{left} was left by a write of out killed mid-swap" in said, said
    assert f"{private} was left" in said  # not locked by anyone: said, as before
    at_work = "import fcntl, os, subprocess, sys; fd = os.open(sys.argv[2], os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX); " \
              "print(subprocess.run([sys.executable, '-c', sys.argv[3], sys.argv[1]], capture_output=True, text=True).stderr)"
    kept = as_user("alice", at_work, folder / "out", private, SWEEP_SAID).stdout
    assert f"{private} was left" not in kept and f"{left} was left" in kept, kept


# HOLD's lock taken by a process that then ends, a child it made keeping the file open (so /proc/locks names a
# process that is gone): prints "ready" once the first is gone.
HOLD_AND_LEAVE = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_NONBLOCK)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
parent = os.getpid()
if os.fork():
    os._exit(0)
while os.getppid() == parent:
    time.sleep(0.01)
print("ready", flush=True)
sys.stdin.read()
"""

# The watch lock of `index --watch`, as alice: taken, or why not.
WATCHER = """
import sys
from pathlib import Path
from alignsearch.errors import BadInputError
from indexer.watch import _watch_lock
try:
    _watch_lock(Path(sys.argv[1]))
    print("locked")
except BadInputError as exc:
    print("refused:", exc)
"""


def _left_0644(ix: Path, name: str = "write.lock") -> Path:
    """A lock file of alice's as every release before 0600 ones left it: 0644."""
    lock = ix / name
    lock.touch()
    os.chown(lock, local_user("alice").pw_uid, local_user("alice").pw_gid)
    lock.chmod(0o644)
    return lock


@pytest.mark.parametrize("how", ["holding", "left-a-child-holding"])
def test_another_users_hold_on_an_old_lock_file_is_replaced(shared, how):
    """mallory opened alice's write.lock while it was 0644 (an earlier release's) and held its flock before alice's
    next writer made it 0600: the open stayed hers, and every writer of alice's was refused for ever, as was every
    `index --watch` for watch.lock. A lock held only by another user's processes (the one that took it gone, a child
    keeping it, too) is now replaced by a fresh 0600 file; mallory keeps a lock on a file no longer at the name."""
    ix = _index_folder(shared, "alice")
    locks = [_left_0644(ix), _left_0644(ix, "watch.lock")]
    before = [lock.stat().st_ino for lock in locks]
    if how == "holding":
        holder, held = _holding("mallory", *locks)
        assert held == ["held", "held"]
    else:
        holder, _ = started_as_user("mallory", HOLD_AND_LEAVE, locks[0])
    try:
        first = as_user("alice", WRITER, ix)
        assert first.stdout.strip() == "locked", first.stdout + first.stderr
        assert "was held by process" in first.stderr and "of another user" in first.stderr
        assert as_user("alice", WRITER, ix).stdout.strip() == "locked"  # the fresh one: no more replacing
        if how == "holding":
            watched = as_user("alice", WATCHER, ix)
            assert watched.stdout.strip() == "locked", watched.stdout + watched.stderr
    finally:
        stopped_user(holder)
    for lock, ino in zip(locks if how == "holding" else locks[:1], before):  # watch.lock taken where held
        assert lock.stat().st_ino != ino and lock.stat().st_mode & 0o777 == 0o600
        assert lock.stat().st_uid == local_user("alice").pw_uid


@pytest.mark.parametrize("how", ["holding", "left-a-child-holding"])
def test_alices_own_hold_on_an_old_lock_file_is_a_writer_at_work(shared, how):
    """The same 0644 lock file held by a process of alice's (an earlier release's `index` started before the upgrade,
    or a child of one still holding it): a writer at work, never replaced; the writer is refused as before."""
    ix = _index_folder(shared, "alice")
    lock = _left_0644(ix)
    ino = lock.stat().st_ino
    if how == "holding":
        holder, held = _holding("alice", lock)
        assert held == ["held"]
    else:
        holder, _ = started_as_user("alice", HOLD_AND_LEAVE, lock)
    try:
        refused = as_user("alice", WRITER, ix)
        assert refused.stdout.startswith("refused: another alignsearch process is writing"), \
            refused.stdout + refused.stderr
    finally:
        stopped_user(holder)
    assert lock.stat().st_ino == ino
    assert as_user("alice", WRITER, ix).stdout.strip() == "locked"


# A folder replacement of alice's (atomic.replacing_dir) killed once its new copy is filled, before the swap.
KILLED_SWAP = """
import os, sys
from alignsearch import atomic
os.mkdir(sys.argv[1])
atomic._fsync_tree = lambda folder: os.kill(os.getpid(), 9)
with atomic.replacing_dir(sys.argv[1]) as new:
    (new / "part").write_bytes(b"a killed export's copy")
"""


def test_another_user_cannot_keep_a_killed_folder_swaps_copy(shared):
    """A folder swap gave its new copy (`.OUT.XXXX.new`) the replaced folder's mode (0755) before the swap: killed
    then, mallory could open the copy and hold its lock, and alice's remove_stale took it for a write at work and
    never removed it (an export's copy, as large as the export). It stays 0700 until it is in place."""
    folder = users_folder(shared, "alice")
    _killed_and_swept(folder / "out", KILLED_SWAP, ".new")
    done = as_user("alice", "import sys; from alignsearch import atomic\nwith atomic.replacing_dir(sys.argv[1]) as new:\n"
                            "    (new / 'x').write_bytes(b'x')", folder / "out")
    assert done.returncode == 0 and (folder / "out").stat().st_mode & 0o777 == 0o755, done.stderr


# As alice: the model cache's two lock files made as an export and a loader make them (records/write.lock by a first
# record, .inuse by a loader's shared hold), in the model folder argv[1]; prints what the cache's trust check says.
CACHE_LOCKS = """
import json, sys
from pathlib import Path
from alignsearch.encoders import backend, records
folder = Path(sys.argv[1])
model = {key: "x" for key in records.MODEL_KEYS}
records.Writer(folder, model).speed("this cpu", {"onnx": 1.0})
held = backend.lock_in_use(folder)
print(json.dumps({"untrusted": backend.cache_untrusted(folder), "held": held is not None}))
"""


def test_another_user_cannot_hold_the_model_caches_locks(shared):
    """The model cache's lock files: records/write.lock (a first record's check of model.json: held by another user,
    every export and measurement of alice's waited 60 s and recorded nothing) and .inuse (held exclusive, every load
    waited 120 s; held shared, no superseded export was ever removed). Not open to mallory, even in the most open
    layout the cache's trust check accepts: a cache root alice made 0755 (ALIGNSEARCH_CACHE), its onnx/ and model
    folders 0755 as releases before the cache was made 0700 left them. Both files are made 0600 (no release made them
    otherwise) and records/ 0700: mallory's open is refused, so the rule of the index's lock files (a held one
    replaced, indexer/lock.py) has nothing to replace here."""
    alice = local_user("alice")
    cache = users_folder(shared, "alice") / "cache"
    folder = cache / "onnx" / "abc-def"
    folder.mkdir(parents=True)
    for made in (cache, cache / "onnx", folder):
        os.chown(made, alice.pw_uid, alice.pw_gid)
        made.chmod(0o755)
    made = as_user("alice", CACHE_LOCKS, folder, extra_env={"ALIGNSEARCH_CACHE": str(cache)})
    assert json.loads(made.stdout) == {"untrusted": None, "held": True}, made.stdout + made.stderr
    lock, in_use = folder / "records" / "write.lock", folder / ".inuse"
    assert [p.stat().st_mode & 0o777 for p in (folder / "records", lock, in_use)] == [0o700, 0o600, 0o600]
    holder, held = _holding("mallory", lock, in_use)
    try:
        assert held == ["Permission denied", "Permission denied"]
    finally:
        stopped_user(holder)
