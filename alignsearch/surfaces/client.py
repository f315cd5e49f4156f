"""The CLI's side of the warm server: send a query to `alignsearch serve` when it runs for this index.

The server record (.alignsearch/server.json, mode 0600) names the process, the host it was written on,
the address, the token, the index id and folder, and what /api/search takes. A record is read only as this
user alone could have written it: not through a symlink, not owned by another user, in a folder no other
user can write (paths.untrusted, the rule of index discovery and of the model cache), and of a record's
size. It is used only when it was written on this host, its process is alive, this user's (kill does not
answer EPERM) and holds the socket listening at its port (_holds_port: not a number reused after a reboot):
the rule not_serving, and the server it names
serves this very index: the same index id, in the same directory. A query proves that with its own
answer, which names the index it was searched in (INDEX_HEADER): no round trip before it (GET /api/info
is asked only of a server whose record predates the header, and by verified_server). Otherwise the caller
searches locally, after one `notice:` line saying why (a copied index, a server killed with -9, a record
from another machine, a record another user could have written...).
"""

from __future__ import annotations

import base64
import binascii
import errno
import fcntl
import ipaddress
import json
import math
import os
import socket
import struct
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from typing import Callable
from urllib.error import HTTPError, URLError
from urllib.parse import urlencode, urlsplit
from urllib.request import ProxyHandler, Request, build_opener

from alignsearch import notices, safeopen
from alignsearch.errors import BadImageError, BadInputError
from alignsearch.media import sources
from alignsearch.search import querycheck
from alignsearch.search.request import SearchRequest, to_params
from alignsearch.surfaces.boundary import raised_again
from alignsearch.storage.paths import DB_FILE, SERVER_FILE, private_record, untrusted_index, untrusted_stat

CONTACT_TIMEOUT = 2.0
# How long a query waits for its answer before it asks whether the server is alive (GET /healthz); the
# server's own answer takes milliseconds (RESULTS.md: p50 21.7 ms at 100k vectors).
PROBE_EVERY = 2.0
MAX_RECORD_BYTES = 64 * 1024  # a record is a few hundred bytes; more is not one `serve` wrote
# How long a `serve` waits for its turn at its record (record_turn) to write or remove it: another holds the turn
# for one small write or unlink, so only a process stopped while holding it makes one wait this long.
RECORD_WAIT = 10.0
# The most of an answer read. A search's answer is at most k (1000) hits of a few paths each, and collapse's
# duplicate ids: a few MB. More is not a search's answer (another program on the port, a broken server): read
# whole, a stream of gigabytes took gigabytes of memory before it was refused as not JSON.
MAX_ANSWER_BYTES = 64 * 1024 * 1024
# The longest query string sent: the server's HTTP parser (h11) refuses a request head that is over 16 KiB
# while it is still incomplete, so a longer URL passed or failed (400) as the kernel happened to split it.
MAX_QUERY_STRING = 15 * 1024
# The response header in which /api/search names the index it searched (its index id): the answer to a
# query proves which server gave it, so no GET /api/info is needed before it.
INDEX_HEADER = "X-Alignsearch-Index"
# The server is on this machine: never through a proxy. urlopen honours http_proxy even for 127.0.0.1
# (no_proxy is rarely set), and the proxy would receive the token and the query.
_OPENER = build_opener(ProxyHandler({}))


def _stderr(message: str) -> None:
    notices.write_line(sys.stderr, message)


def local_index_id(index_dir: Path) -> str | None:
    """This index's id (catalog.index_id), read without writing to the catalog; with the standard library's
    sqlite3 (state.peek), not SQLAlchemy: a query answered by the server should not pay for importing it."""
    from alignsearch.storage import state

    found = state.peek(Path(index_dir) / DB_FILE, "index_id")
    return None if found is None else found.index_id


# What kill(pid, 0) says of a recorded server's process (_signalled), and what else keeps it from being asked
# (not_serving's answers).
RUNNING, GONE, OTHERS, STOPPED, NOT_LISTENING = "running", "gone", "another user's", "stopped", "not listening"
STALE = (GONE, OTHERS)  # the server that wrote the record is gone: the record may be removed


def _signalled(pid: int) -> str:
    """What kill(pid, 0) says of pid: RUNNING (a process this user may signal), GONE, or OTHERS (EPERM). A zombie
    (dead, not yet reaped by its parent: a `serve &` killed in a shell that has not waited for it) answers kill as
    a live process does; /proc says it is dead, and it was taken as a server that refused connections, its record
    kept, every query saying "did not answer" until the shell reaped it."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return GONE
    except PermissionError:
        return OTHERS
    return GONE if _state(pid) in ("Z", "X") else RUNNING


def _state(pid: int) -> str:
    """The process's state letter in /proc/PID/stat (R, S, T, Z...); "" where /proc cannot tell."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat[stat.rfind(")") + 2 :][:1]  # the state follows the name, which may hold spaces


def not_serving(signalled: str, stopped: bool, holds_port: bool | None) -> str | None:
    """Why the process a server record names is not the server to ask (GONE, OTHERS, STOPPED, NOT_LISTENING), or
    None where it is: the one rule on a recorded pid (its facts: _signalled, _stopped, _holds_port). A record is
    read only as this user alone could have written it (read_record), so the `serve` that wrote it ran as this
    user: a process kill answers EPERM for is another user's, its number reused (after a reboot), whatever
    listens at the port. It was taken as alive, and where /proc could not say which sockets it holds (another
    user's /proc/PID hidden by a hidepid mount) the check was skipped: the query and the token went to
    whatever listened at the recorded port. Where /proc cannot tell of this user's own process (no /proc:
    holds_port None) it is taken at its record."""
    if signalled in STALE:
        return signalled
    if stopped:
        return STOPPED
    if holds_port is False:
        return NOT_LISTENING
    return None


def _judged(record: dict) -> str | None:
    """not_serving of the process the record names, on the facts gathered now."""
    pid = int(record["pid"])
    url = str(record["url"])
    return not_serving(_signalled(pid), _stopped(pid), _holds_port(pid, _port_of(url), _host_of(url)))


def _stopped(pid: int) -> bool:
    """A process held stopped (SIGSTOP, Ctrl-Z, a debugger): its socket still accepts connections in the
    kernel, so a query sent there would wait out the whole search timeout for an answer that never comes.
    Linux's /proc says so at once; elsewhere (no /proc) it is taken as running."""
    return _state(pid) in ("T", "t")


def _listening_inodes(pid: int, port: int, host: str | None = None) -> set[str] | None:
    """The inodes of the TCP sockets listening at port in pid's network namespace (/proc/PID/net/tcp, tcp6:
    local address ADDR:PORT in hex, state 0A) that a connection to host:port reaches (reaches; any address where
    host is a name, which this process does not resolve), or None where /proc cannot tell (another system)."""
    found, read = set(), False
    target = _ip(host)
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        read = True
        for line in lines:
            fields = line.split()
            if len(fields) <= 9 or fields[3] != "0A":
                continue
            address, _, hex_port = fields[1].rpartition(":")
            if hex_port == f"{port:04X}" and (target is None or reaches(_proc_address(address), target)):
                found.add(fields[9])
    return found if read else None


def reaches(bound: ipaddress.IPv4Address | ipaddress.IPv6Address | None,
            target: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Does a connection to target reach a socket listening at address `bound` (same port)? Its own address, or its
    family's wildcard (0.0.0.0, ::), or an IPv4 address as IPv6 writes it (::ffff:a.b.c.d). Not another address at
    the same port: a record of 127.0.0.1:PORT whose process listened at [::1]:PORT only was taken as held by it, and
    the query and the token went to whatever held 127.0.0.1:PORT (another user's program, as the system lets anyone
    bind an address at a port another user holds at another address). Not the IPv6 wildcard for an IPv4 address
    either: whether that socket takes IPv4 (IPV6_V6ONLY) /proc does not say, and `serve` binds 0.0.0.0 with its own
    socket. bound None: an address /proc wrote that could not be read, reaching nothing."""
    if bound is None:
        return False
    if isinstance(bound, ipaddress.IPv6Address) and bound.ipv4_mapped is not None:
        bound = bound.ipv4_mapped
    return bound.version == target.version and (bound == target or bound.is_unspecified)


def _ip(host: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """host as an IP address, None where it is a name (or none)."""
    try:
        return None if host is None else ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None


def _proc_address(hex_address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An address as /proc/net/tcp and tcp6 write it: the 32-bit words of the address in hex, each in this machine's
    byte order."""
    try:
        words = [int(hex_address[i:i + 8], 16) for i in range(0, len(hex_address), 8)]
        packed = struct.pack(f"={len(words)}I", *words)
        return ipaddress.ip_address(packed) if len(packed) in (4, 16) else None
    except (ValueError, struct.error):
        return None


def _port_of(url: str) -> int | None:
    """The port a request to url goes to (None: not one that can be told)."""
    try:
        parts = urlsplit(url)
        return parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    except ValueError:
        return None


def _host_of(url: str) -> str | None:
    """The host a request to url goes to, as the URL names it (an address, or a name)."""
    try:
        return urlsplit(url).hostname
    except ValueError:
        return None


def _holds_port(pid: int, port: int | None, host: str | None = None) -> bool | None:
    """Does process pid hold the socket listening at port (at host, where the URL names an address: reaches), a
    socket a request to the record's URL reaches: is it the server its record names? A record outlives
    its server when the machine lost power or rebooted (no exit to remove it), and its pid is then soon some
    other process, alive: the query and the token went to whatever listened at the recorded port by then,
    another user's program too, which could answer for this index (its id is in the catalog anyone may read).
    True or False from Linux's /proc (False also where pid's descriptors cannot be read: not this user's
    process, so not the `serve` that wrote this user's record); None where /proc cannot tell."""
    listening = None if port is None else _listening_inodes(pid, port, host)
    if listening is None:
        return None
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except (FileNotFoundError, PermissionError):
        return False  # gone since it was found alive; or not this user's
    except OSError:
        return None
    for fd in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:  # closed since it was listed (the listing's own descriptor, when pid is this process)
            continue
        if link.startswith("socket:[") and link[8:-1] in listening:
            return True
    return False


class RecordRefused(Exception):
    """A server record that is not used: why, in words."""


def read_record(path: Path) -> dict:
    """The server record at path, read only as this user alone could have written it: the file itself, not
    a symlink's target, a regular file (safeopen), neither it nor its folder writable by another user
    (paths.untrusted), at most MAX_RECORD_BYTES of a JSON object. Both are judged on what was opened (the
    folder's and the file's descriptors), not on what their paths name a moment later. Raises FileNotFoundError where
    there is none, RecordRefused otherwise."""
    try:
        fd, folder = safeopen.open_pinned(path)
    except safeopen.Refused as exc:
        raise RecordRefused(str(exc)) from None
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise RecordRefused(f"unreadable ({exc.strerror or exc})") from None
    # judged on the descriptors, not the path: a folder or file renamed into place after the open (by whoever
    # may write the index's parent) does not lend its owner to the bytes read
    why = untrusted_stat(folder, path.parent) or untrusted_stat(os.fstat(fd), path)
    if why:
        os.close(fd)
        raise RecordRefused(why)
    data = safeopen.read_fd(fd, MAX_RECORD_BYTES)
    if len(data) > MAX_RECORD_BYTES:
        raise RecordRefused(f"larger than {MAX_RECORD_BYTES} bytes")
    try:
        record = json.loads(data)
    except ValueError:
        raise RecordRefused("unreadable (not JSON)") from None
    if not isinstance(record, dict):
        raise RecordRefused("unreadable (not a JSON object)")
    return record


# The lock file of the turn at a server record, beside it (record_turn).
RECORD_LOCK = "server.lock"


@contextmanager
def record_turn(path: Path, wait: float) -> Iterator[bool]:
    """The turn at the server record `path`: an flock on RECORD_LOCK beside it, held for the block. Every write of a
    record (server.write_record) and every removal (remove_record_if) takes it, so what a removal read is what it
    unlinks: a removal read one record and unlinked the next `serve`'s, written between the two (write-then-replace),
    and that server's clients searched locally. No check of the file unlinked can stand in for it: an inode compared
    before the unlink is one the next rename may replace before the unlink, and renaming the record aside to look
    at it leaves none at its name meanwhile. A lock file of this user's, 0600, not the folder: flock needs only
    read access, and every user who may list the index folder (0755) could flock it and keep it, so this user's
    `serve` waited RECORD_WAIT to start and three times that to stop, left its record, and no query could remove
    it. Only a process that may write the folder takes the turn (to write or unlink the record there), so only it
    needs to create the file; it is opened as the index's lock files are (indexer/lock.open_lock_file: never through
    a symbolic link, a FIFO at once), and the record is never opened through it. Yields whether the turn is had,
    waiting up to `wait` seconds (0: one try) for another's: False while another holds it for longer (a process
    stopped while holding it). Where it cannot be locked (a folder this user cannot write, a filesystem without
    flock) nobody else can hold it either: True, and the caller goes on unlocked (its unlink fails in a folder it
    cannot write). The turn had, the earlier releases' turn is taken too (_old_turn)."""
    try:
        fd = os.open(path.parent / RECORD_LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     0o600)
    except OSError:
        yield True
        return
    try:
        turn = _take_turn(fd, wait)
        if not turn:
            yield False
            return
        with _old_turn(path.parent):
            yield True
    finally:
        os.close(fd)  # the lock with it


# How long record_turn waits for an earlier release's turn (an flock on the index folder, _old_turn): that
# release held it for one small write or unlink of the record; held longer, it is another user's hold.
OLD_TURN_WAIT = 2.0


@contextmanager
def _old_turn(folder: Path) -> Iterator[None]:
    """The turn at the record as releases before server.lock took it: an flock on the record's folder. A `serve`
    started before an upgrade keeps running that release's code, and removes its record at its exit in that turn:
    without it, its removal read its own record, a new `serve` wrote its record, and the old one unlinked that (the
    race record_turn closes), as a query removing a stale record unlinked one an old release's `serve` just wrote.
    A shared lock, which the old release's exclusive one excludes and two new processes (already one at a time by
    server.lock) do not contend for. Any user who may list the folder can hold its lock too (why server.lock was
    made): waited for OLD_TURN_WAIT at most, then gone on without it, as its holder is then no record's writer."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        yield
        return
    try:
        _take_turn(fd, OLD_TURN_WAIT, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


def _take_turn(fd: int, wait: float, how: int = fcntl.LOCK_EX) -> bool:
    """record_turn's flock on fd (`how`), tried until `wait` seconds have passed; True too where it cannot be had
    at all."""
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, how | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        except OSError as exc:  # no flock here (EBADF: NFS locks only what is open for writing)
            if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF):
                return True
            raise


def remove_record_if(path: Path, superseded: Callable[[dict], bool], wait: float) -> bool:
    """Remove the server record at `path` if `superseded(record)` says the one there now may go, reading and
    removing it in one turn (record_turn, waiting up to `wait` seconds for it; a turn not had leaves the record).
    Read as the client reads it (read_record): a FIFO or symlink put in its place is neither waited on nor
    followed, only left. True when removed; a record that cannot be read or removed (an error of superseded's
    too: a record without a pid) is left."""
    with record_turn(path, wait) as turn:
        if not turn:
            return False
        try:
            if not superseded(read_record(path)):
                return False
            path.unlink()
            return True
        except (OSError, RecordRefused, ValueError, KeyError, TypeError):
            return False


def _remove_stale(path: Path, record: dict) -> bool:
    """Remove the record of a server whose process is gone (killed with -9, a crash), so the notice is said
    once, not on every query. Only while the file still holds that very record (a server started since wrote
    its own) and its process is still gone (or another user's: not_serving); an index this user cannot write
    keeps it. True when removed. A query does not wait for the record's turn: one held means a server is
    writing or removing it now (only an earlier release's turn, the folder's lock, is waited for: _old_turn)."""
    # not_serving answers GONE or OTHERS on kill's answer alone: /proc is not read again
    return remove_record_if(path, lambda now: now == record and _signalled(int(record["pid"])) in STALE, wait=0)


def _same_dir(a: str, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _exchange(record: dict, path: str, data: bytes | None = None, headers: dict | None = None,
              timeout: float = 30.0) -> tuple[dict, str | None]:
    """The JSON answer to one request, and the index it names (INDEX_HEADER; None from an older server)."""
    headers = dict(headers or {})
    if record.get("token"):
        headers["Authorization"] = f"Bearer {record['token']}"
    request = Request(f"{record['url']}{path}", data=data, headers=headers, method="POST" if data is not None else "GET")
    with _OPENER.open(request, timeout=timeout) as response:
        return _json_answer(response), response.headers.get(INDEX_HEADER)


def _json_answer(response) -> object:
    """The JSON a response carries, read up to MAX_ANSWER_BYTES. ValueError where it is not a whole JSON text
    of that size: JSON nested deeper than the parser recurses (json raises RecursionError, which was no
    ValueError and ended the command as `unexpected RecursionError` instead of a search here)."""
    data = response.read(MAX_ANSWER_BYTES + 1)
    if len(data) > MAX_ANSWER_BYTES:
        raise ValueError(f"an answer over {MAX_ANSWER_BYTES} bytes")
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("an answer nested too deep to be a search's") from None


def _request(record: dict, path: str, data: bytes | None = None, headers: dict | None = None, timeout: float = 30.0):
    return _exchange(record, path, data, headers, timeout)[0]


class Hung(OSError):
    """The server let a query wait and did not answer /healthz either: alive (and not stopped) but hung."""


def _watched(record: dict, path: str, data: bytes | None, headers: dict | None, timeout: float,
             probe_every: float) -> tuple[dict, str | None]:
    """_exchange, with the server watched while it has not answered. A hung server (a stuck event loop, a
    process frozen in a way /proc does not show) still accepts connections in the kernel, and silence cannot
    be told from a long search: the query waits in a thread, and each probe_every seconds without its answer
    GET /healthz (answered by the event loop itself, without a search slot) is asked. A server that answers
    it is searching: the query waits on, up to timeout. One that does not within CONTACT_TIMEOUT is hung:
    Hung is raised, and the caller searches locally seconds in, not after the whole timeout. The thread is
    a daemon: an abandoned query does not keep the process alive."""
    done, box = threading.Event(), {}

    def query() -> None:
        try:
            box["answer"] = _exchange(record, path, data, headers, timeout)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread, raised there
            box["error"] = exc
        finally:
            done.set()

    threading.Thread(target=query, name="alignsearch-query", daemon=True).start()
    # the socket's timeout bounds each read, not the answer: a body sent a byte at a time never meets it
    deadline = time.monotonic() + timeout
    while not done.wait(max(0.0, min(probe_every, deadline - time.monotonic()))):
        if time.monotonic() >= deadline:
            raise TimeoutError(f"no whole answer within {timeout:g} s")
        try:
            _request(record, "/healthz", timeout=CONTACT_TIMEOUT)
        except HTTPError:
            pass  # an answer all the same (an older server without /healthz): it is alive
        except (URLError, OSError, ValueError) as exc:
            if not done.is_set():
                raise Hung(f"a query waited {probe_every:g} s and /healthz did not answer either ({exc})") from None
    if "error" in box:
        raise box["error"]
    return box["answer"]


def verified_server(index_dir: Path, notice: Callable[[str], None] = _stderr) -> dict | None:
    """The record of a server that proves it serves index_dir, or None (with a notice when a record was
    there but could not be used). The index's own record first, then this user's private one (written by
    `serve` for an index it may not write: read-only, or another user's). Asks the server (GET /api/info):
    for `serve`, which must know whether one answers there now."""
    return _found(index_dir, notice, contact=True)


def _found(index_dir: Path, notice: Callable[[str], None], contact: bool) -> dict | None:
    for path in (index_dir / SERVER_FILE, private_record(index_dir)):
        record = _verified(index_dir, path, notice, contact)
        if record is not None:
            return record
    return None


def serves(claimed_id: object, claimed_dir: object, index_dir: Path) -> bool:
    """Does a server that claims this index id and folder (its record, its /api/info) serve index_dir?"""
    return claimed_id == local_index_id(index_dir) and _same_dir(str(claimed_dir), index_dir)


def _verified(index_dir: Path, path: Path, notice: Callable[[str], None], contact: bool) -> dict | None:
    """The record at path when it names a live server of index_dir on this host, else None (a notice when
    there was one). contact: the server proves it on GET /api/info; else (a query, whose answer proves it)
    the record's own index id and folder are taken, unless the record predates `search_params` (an older
    server, whose answers name no index: asked as before)."""
    try:
        record = read_record(path)
        pid, url = int(record["pid"]), str(record["url"])
    except FileNotFoundError:
        return None
    except RecordRefused as exc:
        notice(f"notice: ignoring the server record {path}: {exc}; searching locally")
        return None
    except (ValueError, KeyError, TypeError):
        notice(f"notice: ignoring the unreadable server record {path}; searching locally")
        return None
    if record.get("hostname") != socket.gethostname():
        notice(f"notice: the server record {path} was written on another host ({record.get('hostname')}); "
               "searching locally")
        return None
    verdict = _judged(record)
    if verdict in STALE:
        removed = _remove_stale(path, record)
        notice(f"notice: the server recorded in {path} is not running (process {pid} is "
               + ("gone" if verdict == GONE else "another user's: its number was reused") + "); searching locally"
               + ("; the stale record was removed" if removed else ""))
        return None
    if verdict == STOPPED:
        notice(f"notice: the server recorded in {path} is stopped (process {pid}); searching locally")
        return None
    if verdict == NOT_LISTENING:
        notice(f"notice: the server recorded in {path} is not running (process {pid} does not listen at {url}: "
               "another process has its number); searching locally")
        return None
    try:
        why = untrusted_index(index_dir, writing=False)
    except OSError:  # not readable: the local open says so in its own words
        why = None
    if why is not None:  # its catalog is not read (state.peek would not): the local open refuses the index
        notice(f"notice: not asking the server recorded in {path}: {why}; searching locally")
        return None
    if not contact and isinstance(record.get("search_params"), list):
        claimed = record
    else:
        try:
            claimed = _request(record, "/api/info", timeout=CONTACT_TIMEOUT)
        except (HTTPError, URLError, OSError, ValueError) as exc:
            notice(_silent(url, exc))
            return None
    if not serves(claimed.get("index_id"), claimed.get("index_dir"), index_dir):
        if local_index_id(index_dir) is None and _same_dir(str(claimed.get("index_dir")), index_dir):
            # this index's catalog cannot be read here (a link at catalog.db-wal, damage): the local open says why
            # in its own words; "serves another index (X), not X (a copy?)" named one folder twice
            return None
        notice(f"notice: the server at {url} serves another index ({claimed.get('index_dir')}), not {index_dir} "
               "(a copy?); searching locally")
        return None
    # what its /api/search takes; contacted: it answered /api/info, else its answer must name this index
    return {**record, "search_params": claimed.get("search_params"), "contacted": claimed is not record}


def _error_body(exc: HTTPError) -> dict:
    """A server's error answer: its JSON ({"error", and from this version "kind"}), else {} (not the JSON it sends)."""
    try:
        body = _json_answer(exc) if exc.fp is not None else {}
    except (ValueError, OSError, HTTPException):
        return {}
    return body if isinstance(body, dict) else {}


def _error_text(exc: HTTPError, body: dict) -> str:
    """The error a server's answer gives, or the status line where its body is not the JSON it sends."""
    text = body.get("error")
    return text if isinstance(text, str) else str(exc)


def _as_here(said: str, request: SearchRequest) -> str:
    """A server's line about the query image it was sent (bytes) as a search here says it of the file named."""
    if said.startswith(querycheck.UNREADABLE_IMAGE) and isinstance(request.image, (str, os.PathLike)):
        return f"cannot use image {request.image}: {said.removeprefix(querycheck.UNREADABLE_IMAGE)}"
    return said


def _silent(url: str, exc: Exception) -> str:
    return f"notice: the server at {url} did not answer ({getattr(exc, 'code', None) or exc}); searching locally"


# What GET /api/search took before servers listed their parameters in /api/info.
OLDEST_PARAMS = ("q", "similar", "k", "negative", "text_weight", "image_weight", "negative_weight", "tag", "where",
                 "after", "before", "camera", "near", "path", "format", "min_score", "sort", "mode", "collapse",
                 "compose", "media", "per_video")


def _query_string(params: dict[str, str]) -> tuple[str | None, str | None]:
    """The parameters as a URL's query string, or None and why they cannot be sent in one."""
    try:
        query_string = urlencode(params)
    except UnicodeEncodeError:  # a glob or name holding bytes that are not UTF-8: a URL carries UTF-8 only
        return None, "a filter holds bytes that are not UTF-8, which a URL cannot carry"
    if len(query_string) > MAX_QUERY_STRING:
        return None, f"the query is {len(query_string)} bytes long in a URL, over the {MAX_QUERY_STRING} sent to a server"
    return query_string, None


@dataclass(frozen=True)
class Routed:
    """A query sent to the warm server: its JSON answer, or None and why the caller searches locally."""

    answer: dict | None
    why_local: str | None = None


def _query_image(path) -> bytes:
    """A query image's bytes, read as a search here reads them (encoders/encoding.py: sources.read_local), so a
    server running changes no answer: a FIFO or device, a file over the cap, a link another user planted (safeopen)
    are refused alike (BadInputError), before the server is asked."""
    try:
        return sources.read_local(path)
    except (OSError, BadImageError) as exc:
        raise BadInputError(f"cannot use image {path}: {getattr(exc, 'strerror', None) or exc}") from None


def search_via_server(index_dir: Path, request: SearchRequest, timeout: float = 30.0,
                      notice: Callable[[str], None] = _stderr, probe_every: float = PROBE_EVERY) -> Routed:
    """The request, whole, to a verified server for this index: GET /api/search with its parameters, or with
    an image POST /api/search with the image's bytes as the form's file and the parameters in the URL. No
    answer (Routed.answer None) when no verified server runs or it cannot take the request; the caller then
    loads the engine itself. An error the server names that a search here would meet too (a query refused,
    this index refused or damaged: boundary.raised_again) is raised as that search raises it; from an older server,
    which names none, a query it rejects raises BadInputError with its message."""
    record = _found(index_dir, notice, contact=False)
    if record is None:
        return Routed(None, "no server runs for this index")
    params = to_params(request)
    # A server from before the parameters were listed took these on GET, and on POST most of them only in the
    # form: what it does not take would be ignored, not refused, so such a query searches here.
    accepted = record["search_params"] or (OLDEST_PARAMS if request.image is None else ())
    unknown = sorted(set(params) - set(accepted)) or (["an image's parameters"] if not accepted else [])
    if unknown:
        why = f"the server at {record['url']} does not take {', '.join(unknown)} (an older version)"
        notice(f"notice: {why}; searching locally")
        return Routed(None, why)
    query_string, why = _query_string(params)
    if query_string is None:
        notice(f"notice: {why}; searching locally")
        return Routed(None, why)
    asked = not record["contacted"]  # this answer is the first word from it: it must name this index
    image = request.image if request.image is None or isinstance(request.image, (bytes, bytearray)) else \
        _query_image(request.image)
    try:
        if image is None:
            answer, named = _watched(record, f"/api/search?{query_string}", None, None, timeout, probe_every)
        else:
            boundary = uuid.uuid4().hex
            body = (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="query"\r\n'
                    "Content-Type: application/octet-stream\r\n\r\n").encode() + bytes(image) + f"\r\n--{boundary}--\r\n".encode()
            answer, named = _watched(record, f"/api/search?{query_string}", body,
                                     {"Content-Type": f"multipart/form-data; boundary={boundary}"}, timeout,
                                     probe_every)
    except HTTPError as exc:
        said = _error_body(exc)
        theirs = not asked or exc.headers.get(INDEX_HEADER) == record.get("index_id")
        if not theirs and 400 <= exc.code < 500:
            # the first word from whatever listens there, and not the server of this index (its errors name
            # it): another program on a reused port, the recorded server killed, is not taken at its word
            notice(_silent(record["url"], exc))
            return Routed(None, f"the server did not answer ({exc.code})")
        # An error the server names (its kind: boundary.raised_again) that a search here meets the same way (a query
        # refused by the rules every surface shares, querycheck; this index's folder refused or damaged) is
        # raised as it: the same exit code and line as without a server. Its own trouble (its model, a catalog
        # busy now) is not: searched here, below.
        known = raised_again(said) if theirs else None
        if known is not None:
            raise type(known)(_as_here(str(known), request)) from None
        # A server from before kinds: a query refused is refused by the rules every surface shares; 413 is a limit
        # of the server's own (an upload's pixels), which a local search does not have
        if "kind" not in said and 400 <= exc.code < 500 and exc.code not in (401, 408, 413, 429):
            raise BadInputError(_as_here(_error_text(exc, said), request)) from None
        if exc.code == 413:
            why = f"the server at {record['url']} cannot take this query ({_error_text(exc, said)})"
            notice(f"notice: {why}; searching locally")
            return Routed(None, why)
        notice(f"notice: the server at {record['url']} answered {exc.code}; searching locally")
        return Routed(None, f"the server answered {exc.code}")
    except Hung as exc:
        why = f"the server at {record['url']} is not answering: {exc}"
        notice(f"notice: {why}; searching locally")
        return Routed(None, why)
    except (URLError, OSError, ValueError, HTTPException) as exc:  # HTTPException: an answer cut short
        if asked:
            notice(_silent(record["url"], exc))
            return Routed(None, f"the server did not answer ({exc})")
        notice(f"notice: the server at {record['url']} failed ({exc}); searching locally")
        return Routed(None, f"the server failed ({exc})")
    if asked and (named or None) != record.get("index_id"):
        why = f"the server at {record['url']} searched another index ({named}), not {index_dir}"
        notice(f"notice: {why}; searching locally")
        return Routed(None, why)
    if not _search_answer(answer):
        why = f"the server at {record['url']} answered with JSON that is not a search's results"
        notice(f"notice: {why}; searching locally")
        return Routed(None, why)
    return Routed(answer)


def _number(value: object) -> bool:
    """A finite number: json reads Infinity and NaN, and a moment at t = Infinity ended `query` in `unexpected
    OverflowError` (its timestamp)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _search_answer(answer: object) -> bool:
    """Is answer shaped as /api/search answers, as far as the CLI reads it: {"results": [hit...], "plan": {...}},
    each hit with a path and a score, and its moment (t), similarity, parts (what --explain prints), duplicates and
    path_b64 of their kinds where given? A list, a number or a hit without a path ended `query` in `unexpected
    TypeError` instead of a search here."""
    if not isinstance(answer, dict) or not isinstance(answer.get("results"), list) \
            or not isinstance(answer.get("plan", {}), dict):
        return False
    return all(isinstance(hit, dict) and isinstance(hit.get("path"), str) and _number(hit.get("score"))
               and all(hit.get(key) is None or _number(hit[key]) for key in ("t", "similarity"))
               and isinstance(hit.get("parts") or {}, dict)
               and isinstance(hit.get("duplicates") or [], list) and _path_bytes(hit.get("path_b64"))
               for hit in answer["results"])


def _path_bytes(value: object) -> bool:
    """Is a hit's path_b64 absent or base64 of a path's bytes (no NUL: no file's name holds one)? `query --paths`
    decodes it: one that was not base64 ended it in binascii.Error, and a NUL split `--paths -0`'s list."""
    if not value:
        return True
    try:
        return isinstance(value, str) and b"\0" not in base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):  # ValueError: a str with non-ASCII characters
        return False
