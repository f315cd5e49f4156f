"""`alignsearch serve`: one warm engine behind a JSON API and a web page, on FastAPI and uvicorn.

Closed by default: only requests whose Host header names the bound address (or a name given with
--allow-host) are answered, which defeats DNS rebinding, and every API call needs the per-start token,
sent as `Authorization: Bearer TOKEN` or as the HttpOnly SameSite=Strict cookie the page gets when it
is opened from the URL `serve` prints. A request a browser sends from another site's page (Sec-Fetch-Site,
Origin) is refused, but for a GET navigation. Request bodies are capped while they stream (the framework's
body limit counts chunked bodies too) and multipart forms are capped in fields, files and field size; a body
framed twice (Content-Length and Transfer-Encoding) is refused, and a request's line and headers must arrive
within ServerConfig.head_seconds and its body within body_seconds more (slowloris).
Query arguments are checked by alignsearch.search.querycheck, the rules the CLI and Engine.search use.

Encoding runs on one worker thread fed by a bounded queue (full: 503), so a burst of text or image
queries waits in line without holding a thread each; searches by stored vector, images and
thumbnails run on the framework's thread pool and never wait for the encoder. Files are served only
while the catalog row still describes them: a regular file, opened under its root without following a symlink
(alignsearch/safeopen.py), whose size and mtime equal the catalog's. A vector file cut short under the
server is a 500 answer, not a crash.
"""

import asyncio
import atexit
import dataclasses
import errno
import hashlib
import hmac
import io
import ipaddress
import json
import logging
import os
import queue
import re
import secrets
import socket
import threading
import time
import typing
from collections import OrderedDict
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable
from urllib.parse import quote, unquote_to_bytes, urlencode

from fastapi import Depends, FastAPI, File, Form, Path as PathParam, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from fastapi.security import APIKeyCookie, HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, create_model
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

import alignsearch
from alignsearch.storage import catalog
from alignsearch.search import onefile, querycheck
from alignsearch import safeopen
from alignsearch.media import sources
from alignsearch.search import engine as engine_module
from alignsearch.search import request as search_request
from alignsearch.search.request import SearchRequest
from alignsearch.atomic import write_bytes
from alignsearch.search.engine import Engine, SnapshotMoved
from alignsearch.surfaces.client import INDEX_HEADER, RECORD_WAIT, record_turn, remove_record_if
from alignsearch.errors import AlignSearchError, BadImageError, BadInputError, ImageTooLarge, UsageError
from alignsearch.media.images import DEFAULT_MAX_PIXELS, ImageSpec, decode, open_rgb
from alignsearch.storage.paths import SERVER_FILE, THUMBS_DIR
from alignsearch.surfaces.boundary import INTERNAL_STATUS, answer_of, kind_of_status, library_error
from alignsearch.surfaces.utf8form import CHARSET_FIELD, RefusedForm, label_refusal, utf8_form_route

log = logging.getLogger(__name__)

WEB_DIR = Path(__file__).parent / "web"
TAR_SHARDS_KEPT = 64  # member lists the server keeps, most recently used
THUMB_SIZES = (64, 128, 256, 512, 1024)
BROWSER_FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "GIF": "image/gif", "WEBP": "image/webp", "BMP": "image/bmp"}
LOOPBACK = {"127.0.0.1", "::1", "localhost"}
WILDCARD = {"0.0.0.0", "::", ""}
FORM_FIELD_BYTES = 16 * 1024  # one text field of a multipart form (a text is at most MAX_TEXT_CHARS characters)
FORM_FIELDS = 12
BODY_BYTES = querycheck.MAX_IMAGE_BYTES + FORM_FIELDS * FORM_FIELD_BYTES  # one image and its fields
BACKLOG = 2048
# Uploaded images decoding at once. Each may hold ~5 bytes per pixel of its up to 50 MP while it decodes;
# run_in_threadpool alone let 40 decode together (five uploads took the server to 5.7 GB) before any met
# the encoder's queue. The others wait, holding only their bytes (20 MB at most each). Thumbnails of indexed
# images and video moments' pictures share another DECODE_SLOTS. Both wait in the event loop (in_slot), not on
# a worker thread: 60 thumbnails waiting on a threading semaphore filled the thread pool (anyio's 40) and a
# search waited until their decodes were done.
DECODE_SLOTS = 2
# How long a thumbnail waits for a decode slot before it is answered 503 (Retry-After: THUMB_RETRY_SECONDS, not
# cached), so a pile of them (other tabs and clients, a script) is turned away instead of queuing without end.
# A browser asks a server for 6 things at once: 2 decoding and 4 waiting, which wait at most two rounds of the
# slowest decode (a video moment's run-up, THUMB_RUNUP_SECONDS = 2 s; a 24 MP JPEG draws in 0.06 s), so one
# page's own thumbnails are not refused.
THUMB_WAIT_SECONDS = 4.0
THUMB_RETRY_SECONDS = 1
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),  # the page's first URL carries the token
    (b"x-frame-options", b"DENY"),
]


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8765
    token: str | None = None  # None: a random token per start, unless no_token
    no_token: bool = False  # loopback only
    allow_hosts: tuple[str, ...] = ()  # Host header names served besides the bound address
    queue_size: int = 32  # encoding requests waiting; one more gets 503
    max_upload_bytes: int = BODY_BYTES
    max_upload_pixels: int = querycheck.MAX_IMAGE_PIXELS
    head_seconds: float = 10.0  # a request's line and headers arrive within this (head_deadline)
    body_seconds: float = 60.0  # and its body within this more (20 MB at 350 kB/s)


class ApiError(Exception):
    """A refusal of the server's own (no library error), answered with status; kind: the class of errors.py its
    answer names, by default the status's (boundary.kind_of_status)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None, kind: str | None = None):
        super().__init__(message)
        self.status, self.headers, self.kind = status, headers, kind or kind_of_status(status)


def is_wildcard(host: str) -> bool:
    """Every interface: 0.0.0.0, ::, or :: as URLs write it ([::]: it was taken as IPv6's alone, and no Host
    header was allowed)."""
    return host.strip().strip("[]") in WILDCARD


def is_loopback(host: str) -> bool:
    """localhost, or an address literal in 127.0.0.0/8 or ::1; never a name (127.example.com is anyone's)."""
    host = host.strip().strip("[]").lower().rstrip(".")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve_token(config: ServerConfig) -> str | None:
    """The token this start requires: the configured one, none (--no-token, loopback only), or a fresh random one."""
    if config.no_token:
        if config.token:
            raise ValueError("give either a token or no_token, not both")
        if not is_loopback(config.host):
            raise ValueError(f"serving {config.host} without a token is refused: --no-token is for loopback only")
        return None
    return config.token or secrets.token_urlsafe(32)


def allowed_hosts(config: ServerConfig) -> frozenset[str]:
    """Host header names (without port) this server answers: the bound address, the loopback names
    when bound to loopback or to every interface, and the names given with --allow-host."""
    names = {config.host.strip("[]").lower(), *(h.strip("[]").lower().rstrip(".") for h in config.allow_hosts)}
    if is_loopback(config.host) or is_wildcard(config.host):
        names |= LOOPBACK
    return frozenset(names - WILDCARD)


def allow_host_problem(value: str) -> str | None:
    """Why value cannot be an --allow-host NAME, or None. A request names the server as `NAME[:PORT]` in its Host
    header and only NAME is compared, so a port, scheme or path given with it (`photos.lan:8765`,
    `http://photos.lan`) matched no request: every one was refused, telling the user to pass --allow-host NAME,
    and the URL printed for other machines was `http://[photos.lan:8765]:8765/`."""
    name = value.strip()
    if not name:  # an unset variable: no name a client could use
        return "needs a name clients use for this machine, e.g. --allow-host photos.lan"
    if any(c.isspace() or c in "/@?#" for c in name) or host_name(name) != name.strip("[]").lower().rstrip("."):
        return (f"takes a name or address alone, without port or scheme (photos.lan, 192.168.1.5), got {value!r}: "
                "clients may use any port --port gives")
    return None


def host_name(header: str) -> str | None:
    """The name in a Host header, without port or IPv6 brackets: `[::1]:80` -> `::1`, `Example.:80` -> `example`;
    None unless what follows the name is nothing or `:` and digits (`localhost:evil.com` is no name of ours)."""
    header = header.strip().lower()
    if header.startswith("["):
        name, bracket, rest = header[1:].partition("]")
        if not bracket:
            return None
    elif header.count(":") > 1:  # a bare IPv6 address (not valid in a Host header, but unambiguous)
        name, rest = header, ""
    else:
        name, colon, rest = header.partition(":")
        rest = colon + rest
    if not re.fullmatch(r"(:[0-9]*)?", rest):
        return None
    return name.rstrip(".")


def thumb_size(requested: int) -> int:
    """The cached size to serve: the smallest standard size at least as large as asked."""
    return next((s for s in THUMB_SIZES if s >= requested), THUMB_SIZES[-1])


def cookie_name(port: int) -> str:
    """One cookie per port: cookies ignore ports, and two servers on one machine must not share one."""
    return f"alignsearch-token-{port}"


def cross_site(method: str, headers: list[tuple[bytes, bytes]], hosts: frozenset[str]) -> str | None:
    """Why a request a browser sent from another site's page is refused, or None. Browsers say where a request
    comes from: Sec-Fetch-Site (set by the browser, not the page), else, in older ones, Origin on POST and
    scripted requests, which must name this server (the Host asked, or a name of ours: a proxy in front may
    rewrite Host). A page of another site (or of another port on this host) could otherwise load a served
    image or run a search, with the cookie or with --no-token. Only a GET navigation (a link followed, the
    printed URL opened) may come from elsewhere: its answer is shown to the user, never to the linking page."""
    got = {k: v.decode("latin-1").strip().lower() for k, v in headers
           if k in (b"sec-fetch-site", b"sec-fetch-mode", b"origin", b"host")}
    site = got.get(b"sec-fetch-site")
    if site in ("same-origin", "none") or (got.get(b"sec-fetch-mode") == "navigate" and method in ("GET", "HEAD")):
        return None
    if site is not None:
        return f"requests from another site's page are refused (Sec-Fetch-Site: {site})"
    origin = got.get(b"origin")
    if origin is not None:
        scheme, sep, netloc = origin.partition("://")
        name = host_name(netloc)
        # a name of ours that a proxy in front may answer for (--allow-host), whatever its port; but a loopback name
        # on another port is another server of this machine (ports are one site to the cookie, never one origin):
        # its page searched with --no-token where the browser sent no Sec-Fetch-Site
        ours = netloc == got.get(b"host", "") or (name in hosts and not is_loopback(name))
        if not sep or scheme not in ("http", "https") or not ours:
            return f"requests from another site's page are refused (Origin: {origin})"
    return None


def head_deadline(seconds: float, body_seconds: float) -> type:
    """uvicorn's h11 protocol, closing a connection whose request line and headers have not all arrived within
    `seconds` of its opening or of the previous answer, or whose body has not within body_seconds more.
    uvicorn has no such limit: a client sending its headers, or its body, a byte at a time (slowloris, and
    its twin for bodies, read before the token is checked) held its connection for ever, and a thousand of
    them took every file descriptor (the server accepted no one else). Answering is not timed."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeadDeadline(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self):
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc):
            if self._head_timer is not None:
                self._head_timer.cancel()
            super().connection_lost(exc)

        def _arm(self, after: float = seconds, check=None):
            if self._head_timer is not None:
                self._head_timer.cancel()
            self._head_timer = self.loop.call_later(after, check or self._late)

        def _late(self):
            if self.transport.is_closing():
                return
            if self.cycle is None or self.cycle.response_complete:  # the next request's head is not in
                self.transport.close()
            elif self.conn.their_state is h11.SEND_BODY:  # its body is still coming
                self._arm(body_seconds, self._body_late)

        def _body_late(self):
            if self.conn.their_state is h11.SEND_BODY and not self.transport.is_closing():
                self.transport.close()

    return HeadDeadline


class HostCheck:
    """ASGI middleware: a request whose Host header is not one of ours gets 400 (DNS rebinding), and every
    response gets a few security headers. TrustedHostMiddleware's rule, with IPv6 literals understood.
    HEAD is answered as GET without the body (FastAPI's routes answer GET only: 405 otherwise)."""

    def __init__(self, app, hosts: frozenset[str], too_large: str = "the request body is too large"):
        self.app, self.hosts = app, hosts
        self.too_large = json.dumps({"error": too_large, "kind": kind_of_status(413)}).encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        host = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), "")
        if host_name(host) not in self.hosts:
            return await refuse(send, 400, f"this server does not answer for Host {host!r}: start it with "
                                           "--allow-host NAME to reach it by another name",
                                kind=AlignSearchError.__name__)  # how the server was started, not the request
        names = [k for k, _ in scope["headers"]]
        if b"transfer-encoding" in names and b"content-length" in names:
            # two framings of one body: a proxy in front may read the other one, and take what follows for a
            # second request (request smuggling); RFC 9112 6.1: answer, then close the connection
            return await refuse(send, 400, "a request with both Content-Length and Transfer-Encoding is refused")
        why = cross_site(scope["method"], scope["headers"], self.hosts)
        if why:
            return await refuse(send, 403, why)

        head = scope["method"] == "HEAD"
        if head:
            scope = {**scope, "method": "GET"}
        rewritten = []

        async def secured(message):
            if message["type"] == "http.response.start":
                headers = message.get("headers", [])
                if message["status"] == 413 and dict(headers).get(b"content-type", b"").startswith(b"text/plain"):
                    # the framework's body limit answers plain text: give the documented {"error": ...}
                    rewritten.append(True)
                    headers = [(k, v) for k, v in headers if k not in (b"content-type", b"content-length")] + [
                        (b"content-type", b"application/json"), (b"content-length", str(len(self.too_large)).encode())]
                message = {**message, "headers": [*headers, *SECURITY_HEADERS]}
            elif message["type"] == "http.response.body" and rewritten:
                if rewritten[0] is False:
                    return
                rewritten[0] = False
                message = {**message, "body": b"" if head else self.too_large, "more_body": False}
            elif head and message["type"] == "http.response.body":
                message = {**message, "body": b""}  # the headers (Content-Length included) stay GET's
            await send(message)

        return await self.app(scope, receive, secured)


async def refuse(send, status: int, message: str, kind: str | None = None) -> None:
    """Answer {"error": message, "kind": ...} and close the connection (what follows on it is not read as a request)."""
    body = json.dumps({"error": message, "kind": kind or kind_of_status(status)}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), *SECURITY_HEADERS]})
    await send({"type": "http.response.body", "body": body})


class Boundary:
    """ASGI middleware around the routes: an exception no handler took is answered by `answer` (a JSON
    error) and ends here. Without it the framework's last handler answers, then raises the exception on to
    the server, which prints its traceback. An exception after the answer began only ends the connection."""

    def __init__(self, app, answer: Callable[[Request, Exception], Response]):
        self.app, self.answer = app, answer

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = []

        async def watched(message):
            if message["type"] == "http.response.start":
                started.append(True)
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception as exc:  # noqa: BLE001 - the server's last line of defence: a JSON answer, no traceback
            response = self.answer(Request(scope), exc)
            if not started:
                await response(scope, receive, send)


class EncoderQueue:
    """One worker thread runs the encoding jobs in order; submit() refuses (503) when `size` wait already."""

    def __init__(self, size: int):
        self._jobs: queue.Queue = queue.Queue(maxsize=size)
        self._thread = threading.Thread(target=self._run, name="alignsearch-encoder", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable, *args, **kwargs) -> Future:
        future: Future = Future()
        try:
            self._jobs.put_nowait((fn, args, kwargs, future))
        except queue.Full:
            raise ApiError(503, f"the encoder is busy ({self._jobs.maxsize} queries waiting): try again shortly",
                           {"Retry-After": "1"}) from None
        return future

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, args, kwargs, future = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as exc:  # noqa: BLE001 - handed to the request that asked
                future.set_exception(exc)

    def close(self) -> None:
        try:
            self._jobs.put(None, timeout=1)
        except queue.Full:
            pass


def _no_such_id(file_id: int) -> ApiError:
    # 404, of the kind the CLI's `similar ID` raises for an id that is no indexed image (BadInputError, exit 6)
    return ApiError(404, f"no indexed image with id {file_id}", kind=BadInputError.__name__)


def _changed(what: str) -> ApiError:
    return ApiError(409, f"the file {what} since it was indexed: re-run alignsearch index")


def open_indexed(root: str, relpath: str | bytes, size: int, mtime: float) -> int:
    """A descriptor of the file at relpath under root while it is still the file the catalog describes:
    opened by safeopen.open_under (no symlink on the way, the file itself included; a FIFO never blocks),
    a regular file of that size and mtime; else the ApiError a client reads."""
    try:
        return safeopen.open_under(root, relpath, expect=(size, mtime))
    except FileNotFoundError:
        raise ApiError(404, "the file is gone from its source: re-run alignsearch index") from None
    except safeopen.Refused as exc:
        raise ApiError(409, f"the file is no longer the one indexed ({exc}): re-run alignsearch index") from None
    except OSError as exc:
        raise ApiError(404, f"cannot open the file: {exc.strerror or exc}") from None


MAX_THUMBNAIL_BYTES = 16 << 20  # a cached thumbnail is a small JPEG; more is not one this server wrote


def read_cached(path: Path) -> bytes | None:
    """A cached thumbnail's bytes: a regular file, never read through a link (nor a FIFO), that is a whole JPEG;
    None when there is none to use (the caller draws it again and writes it over whatever is there)."""
    try:
        fd = safeopen.open_regular(path, follow=False)
    except (OSError, safeopen.Refused):
        return None
    data = safeopen.read_fd(fd, MAX_THUMBNAIL_BYTES)
    return data if len(data) <= MAX_THUMBNAIL_BYTES and whole_jpeg(data) else None


def whole_jpeg(data: bytes) -> bool:
    """Whether data starts and ends as a JPEG does (SOI, EOI): a cached thumbnail cut short (a writer killed on a
    filesystem without atomic rename, disk damage) or overwritten by another tool was served as it was. The two
    markers, not a decode: a cached thumbnail is served without decoding it, and a whole one this server wrote
    always has both."""
    return data[:2] == b"\xff\xd8" and data[-2:] == b"\xff\xd9"


CONTENT_VERDICTS_KEPT = 1024  # files' verdicts kept: a page of thumbnails and the videos being played, many times over


def file_sha256(fd: int) -> str:
    """The SHA-256 of an open file's bytes, read with pread (safeopen.pread_chunks): its offset is left where it was.
    Not hashlib.file_digest, which reads from the offset and moves it (and is Python 3.11's)."""
    digest = hashlib.sha256()
    for chunk in safeopen.pread_chunks(fd):
        digest.update(chunk)
    return digest.hexdigest()


def identity(st: os.stat_result) -> tuple[int, int, int, int, int]:
    """What a file's content is known by between two looks: any write, and any utime putting an mtime back, moves its
    ctime, which no user can set; a file replaced by another (a rename over it) is another inode."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


class Contents:
    """Whether a suspect file (its ctime later than its row's indexed_at: safeopen.status_changed) still holds the
    content its row was indexed from. Its size and mtime cannot tell: `cp -p`, `rsync -a`, `exiftool -P` keep both, and
    the new picture was served for the old vectors (a hit showing another photo) until the next `index`. Such a file is
    hashed and compared with the row's SHA-256, as `index` does (scan.confirm); the verdict is kept by the file's
    identity (dev, inode, size, mtime, ctime) and the hash expected, in a bounded LRU, so a video's many range requests,
    a thumbnail's cache check and a page's reloads hash it once, not each time (a video of gigabytes read at every
    seek). A chmod, a hard link, a `touch -m` back leave a suspect whose content is the same: hashed once, then served
    as before. A row with no hash (nullable: older catalogs) keeps the size and mtime check alone."""

    def __init__(self, kept: int = CONTENT_VERDICTS_KEPT):
        self.kept = kept
        self._verdicts: OrderedDict[tuple, bool] = OrderedDict()
        self._lock = threading.Lock()
        # keys being read for their hash (pread), each with the event set when its verdict is known: requests arriving
        # meanwhile (a player's next range requests, a page's thumbnails of one video's moments) wait for it rather
        # than each read the same gigabytes in a decode slot of its own
        self._reading: dict[tuple, threading.Event] = {}

    def check(self, fd: int, sha256: str | None, indexed_at: float, data: bytes | None = None,
              before: os.stat_result | None = None) -> None:
        """Nothing when the open file fd may be served for its row (sha256, indexed_at), else the 409 a client reads.
        data: the file's bytes, already read (hashed from them), with before, fd's status taken before they were
        read; else the file is read for its hash (pread)."""
        # the identity a verdict is kept by is the one the bytes hashed were read under: taken after a read of data,
        # a write between the read and here (`cp -p`) had the old bytes' "same" kept for the new content's identity
        st = os.fstat(fd) if before is None else before
        if not sha256 or not safeopen.status_changed(st.st_ctime, indexed_at, time.time()):
            return
        key = (*identity(st), sha256)
        same, mine = self._known(key, reading=data is None)
        if same is None:
            try:
                same = (hashlib.sha256(data).hexdigest() if data is not None else file_sha256(fd)) == sha256
                # kept only when nothing wrote to it while it was read: a verdict on bytes half old, half new is the
                # bytes' (data: served as hashed), not the file's
                if identity(os.fstat(fd)) == key[:-1]:
                    with self._lock:
                        self._verdicts[key] = same
                        while len(self._verdicts) > self.kept:
                            self._verdicts.popitem(last=False)
            except OSError as exc:  # a disk error, a share gone mid-read: as a file that cannot be opened
                raise ApiError(404, f"cannot read the file: {exc.strerror or exc}") from None
            finally:
                if mine is not None:  # those waiting look again: the verdict, or none kept (they read it themselves)
                    with self._lock:
                        del self._reading[key]
                    mine.set()
        if not same:
            raise ApiError(409, "the file is no longer the one indexed (other content, its size and modification time "
                                "the same): re-run alignsearch index")

    def _known(self, key: tuple, reading: bool) -> tuple[bool | None, threading.Event | None]:
        """(key's verdict kept, else None; the event to set once this caller, now its reader, knows it, else None).
        reading: the caller would read the file for its hash; while another request reads it, its verdict is
        waited for."""
        while True:
            with self._lock:
                same = self._verdicts.get(key)
                if same is not None:
                    self._verdicts.move_to_end(key)
                    return same, None
                if not reading:
                    return None, None
                busy = self._reading.get(key)
                if busy is None:
                    mine = self._reading[key] = threading.Event()
                    return None, mine
            busy.wait()


def pread_exactly(fd: int, size: int, offset: int) -> bytes:
    """size bytes of fd from offset (fewer where the file ends first: a shard cut short since its listing)."""
    return b"".join(safeopen.pread_chunks(fd, offset=offset, size=size))


def member_replaced(data: bytes, sha256: str | None, shard_ctime: float, indexed_at: float) -> bool:
    """Whether a tar member's bytes are not the ones its row was indexed from. Its name and size alone were compared:
    a shard renamed over by another (a shared dataset folder another user may write) whose member has the same name
    and size had its picture served for the indexed one's vectors. A shard whose status changed since the listing
    (safeopen.status_changed, as a folder's file is judged: Contents) has the member's bytes hashed and compared with
    the row's SHA-256; one left alone is not hashed. A row with no hash (older catalogs) keeps the size check alone."""
    if not sha256 or not safeopen.status_changed(shard_ctime, indexed_at, time.time()):
        return False
    return hashlib.sha256(data).hexdigest() != sha256


def read_regular(root: str, relpath: str | bytes, size: int, mtime: float, read: bool = True,
                 content: Contents | None = None, sha256: str | None = None, indexed_at: float = 0.0) -> bytes | None:
    """The bytes of the indexed file (open_indexed's checks, and, given content, its content's: Contents.check);
    read=False checks only (a cached thumbnail). A suspect read whole is hashed from the bytes read, never read twice."""
    with os.fdopen(open_indexed(root, relpath, size, mtime), "rb") as f:
        before = os.fstat(f.fileno())  # the status the bytes are read under (Contents.check)
        data = f.read(size + 1) if read else None
        if data is not None and len(data) != size:  # written to since the fstat
            raise _changed("changed")
        if content is not None:
            content.check(f.fileno(), sha256, indexed_at, data, before)
    return data


class Trouble:
    """The server's own trouble that requests meet (a 5xx library error: its index refused or damaged, its model),
    logged once when it begins or changes at an endpoint and once when that endpoint answers again. A folder others
    may write was refused to every request (400) and never logged; as a 5xx each request logged it again, a line per
    search. Kept per endpoint (its route: /api/image/{id}/thumb, not each id): when only a search's success ended
    it, an error only /api/recent or a thumbnail met was logged again after every search, with a "searches are
    answered again" line about an error no search had met."""

    def __init__(self):
        self._lock = threading.Lock()
        self._said: dict[str, tuple[str, str]] = {}  # endpoint -> the kind and line last logged, while it meets it

    def met(self, endpoint: str, where: str, kind: str, line: str) -> None:
        with self._lock:
            if self._said.get(endpoint) == (kind, line):
                return
            self._said[endpoint] = (kind, line)
        log.error("%s: %s (logged once while it lasts)", where, line)

    def gone(self, endpoint: str) -> None:
        """The endpoint answered (below 500): the trouble it logged is over (its next occurrence is logged again)."""
        if not self._said:  # the common case, without the lock
            return
        with self._lock:
            said = self._said.pop(endpoint, None)
        if said is not None:
            log.warning("%s is answered again (before: %s)", endpoint, said[1])


def endpoint_of(scope) -> str:
    """The route a request reached (its path template), else its path."""
    return getattr(scope.get("route"), "path", scope["path"])


class TroubleOver:
    """ASGI middleware: any answer below 500 ends the trouble its endpoint met (Trouble.gone)."""

    def __init__(self, app, trouble: Trouble):
        self.app, self.trouble = app, trouble

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def watched(message):
            if message["type"] == "http.response.start" and message["status"] < 500:
                self.trouble.gone(endpoint_of(scope))  # the route is in the scope once the router matched it
            await send(message)

        await self.app(scope, receive, watched)


@dataclass(frozen=True)
class ThumbPlan:
    """An uncached thumbnail, as Library.thumbnail found it (its row looked up in a judged folder, the cache read): what
    Library.draw needs, handed from the first pass on a worker thread to the draw in a decode slot."""

    row: catalog.FileRow
    size: int
    path: Path | None  # where the drawn thumbnail is kept; None: not kept (no trusted cache folder)


class Library:
    """The engine and the files behind it, as the endpoints use them (blocking: called on worker threads).
    The engine is reached only through `engine` (or fresh and snapshot, which refresh it): each judges the index
    folder first (Engine.judge), so no endpoint reads a catalog row, a vector, a file a row names or a cached
    thumbnail of a folder others could write since the open. Only searches judged it: /api/recent and /api/image
    read the catalog straight from the pooled connection and served a file a planted catalog named. A search
    judges once: its snapshot is taken judged (snapshot), and its steps given that snapshot (parts_of, vector_of,
    search) read through it without judging again; each judged the whole folder (paths.judged_key: a stat of every
    file of the index, 0.56 ms with 200 segments), three times a request on the way to an answer in milliseconds."""

    def __init__(self, engine: Engine, config: ServerConfig):
        self._engine, self.config = engine, config
        # None: an index this server must not write (read-only, another user's): thumbnails are not kept
        self.thumb_dir = None if read_only(engine.dir) else engine.dir / THUMBS_DIR
        with self.engine.db.connect() as conn:  # judged again: serve loaded the model (seconds) since the open
            self.index_id = catalog.index_id(conn)
        self._refresh_lock = threading.Lock()
        self.trouble = Trouble()
        self._tar_members: OrderedDict[str, dict[str, tuple[int, int]]] = OrderedDict()
        self._members_lock = threading.Lock()
        self._same: tuple = ((), frozenset())  # (catalog signature, ids the recent listing leaves out: onefile.py)
        self.contents = Contents()  # suspects' verdicts: a file replaced keeping its size and mtime is refused

    @property
    def engine(self) -> Engine:
        """The engine, while its folder is still one it may read (IndexUntrustedError else: 500, the searches'
        answer); judged again only when the folder changed (Engine.judge), so a thumbnail pays the folders' stats, the
        walk of the folder's path and one stat for each file of the index (paths.judged_key)."""
        self._engine.judge()
        return self._engine

    def fresh(self) -> Engine:
        """The engine, after picking up an index rebuilt since the last request (refresh judges the folder first)."""
        with self._refresh_lock:
            self._engine.refresh()
        return self._engine

    def info(self) -> dict[str, Any]:
        # search_params: what /api/search takes, so a client sends only what this server understands
        return {**self.fresh().info(), "index_id": self.index_id, "search_params": sorted(SearchParams.model_fields)}

    def snapshot(self):
        """The engine's current snapshot: one per request, for its encoding and its search alike. Taken judged
        (Engine.refresh judges the folder first): the request's one judgement, which its later steps rest on."""
        with self._refresh_lock:
            return self._engine.snapshot()  # refreshed, so judged

    def search(self, request: SearchRequest, query, snapshot, leave_out: int | None = None) -> list[dict]:
        """The hits of a request whose query is already encoded (query: its halves, or a stored vector), from the
        request's snapshot (taken judged by snapshot(): not judged again). leave_out: an indexed image's id, left
        out of its own results (similar=) before near duplicates are folded, as the CLI's `similar` does; k still
        counts the hits returned."""
        hits = self._engine.run(request, query=query, snapshot=snapshot,
                                exclude=() if leave_out is None else (leave_out,))
        return [h.to_dict() for h in hits]

    def explain(self, request: SearchRequest, snapshot) -> dict[str, Any]:
        """How the request runs (`query --explain`'s plan), with what encodes queries, told of the snapshot its
        search ran on (taken judged by snapshot()): not judged again, and not a newer index than the results'."""
        return {**self._engine.explain(request, snapshot), "encoder": self._engine.encoder_plan()}

    def parts_of(self, request: SearchRequest, snapshot):
        """The request's query encoded (Engine.parts_of) for the request's snapshot (judged when taken); called off
        the event loop."""
        return self._engine.parts_of(request, snapshot)

    def image_spec(self) -> ImageSpec:
        """The input of the index's model (its recorded preprocessing), which decides how an upload is decoded.
        Not judged: it reads no file of the index, only the snapshot in memory (read when the folder was last
        judged trusted); the search the upload is decoded for takes its snapshot judged before any read."""
        from alignsearch.encoders.cached import spec_from

        return spec_from(self._engine.snap.model_info["preprocessing"])

    def vector_of(self, file_id: int, snapshot):
        """The stored vector of an indexed image from the request's snapshot (judged when taken)."""
        vector = self._engine.vector_of(file_id, snapshot)
        if vector is None:
            raise _no_such_id(file_id)
        return vector

    def row(self, file_id: int) -> catalog.FileRow:
        row = self.engine.file(file_id)
        if row is None:
            raise _no_such_id(file_id)
        return row

    def recent(self, offset: int, limit: int) -> dict[str, Any]:
        """Indexed images, newest (highest id) first, for the landing page: each file once (onefile.py), by the
        row search shows for it; offset and total count files, not rows (the page asks for offset = shown so far).
        A folder root and a list naming one of its photos, or a link beside its target, listed it twice."""
        from sqlalchemy import func, select

        files, engine = catalog.files, self.engine  # judged once for the request
        with engine.db.connect() as conn:
            indexed = files.c.status == catalog.INDEXED
            count, last = conn.execute(select(func.count(), func.max(files.c.id)).where(indexed)).one()
            same = self._same_file(conn, (count, last))
            total = int(count or 0) - len(same)
            ids, skipped = [], 0
            # newest first, rows another row's file stands for skipped: a walk down the id index to offset + limit
            for (file_id,) in conn.execute(select(files.c.id).where(indexed).order_by(files.c.id.desc())):
                if file_id in same:
                    continue
                if skipped < offset:
                    skipped += 1
                    continue
                ids.append(file_id)
                if len(ids) == limit:
                    break
            found = catalog.get_files(conn, ids)  # checked: a time stored as text answered "internal error" (500)
            rows = [found[i] for i in ids if i in found]
            # checked as a search's hits are: a row a damaged page hides was listed with no date or caption
            photos, labels = engine.photos_of(conn, ids), catalog.labels_of(conn, ids)
            # a file with no caption of its own shows the caption another name of it holds, as a search's hit does
            # and export writes: the landing page showed a list's captioned photo without it
            for file_id, caption in onefile.lent_captions(conn, rows, photos).items():
                photos[file_id] = {**photos.get(file_id, {}), "caption": caption}
        return {"total": total, "offset": offset,
                "results": [_listed(r, photos.get(r.id), labels.get(r.id, [])) for r in rows]}

    def _same_file(self, conn, signature: tuple) -> frozenset:
        """Ids of the rows whose file another row stands for (onefile.left_out: a grouped scan of the catalog's
        hashes), kept while the catalog's indexed rows (their count, the highest id) stay the same: every
        insert takes a new id, every removal lowers the count, so a landing page's further pages read none."""
        held = self._same
        if held[0] == signature:
            return held[1]

        same = frozenset(onefile.left_out(conn))
        self._same = (signature, same)
        return same

    def read(self, row: catalog.FileRow, check_only: bool = False) -> bytes | None:
        """An indexed image's bytes, when the source still matches its catalog row (else 404/409). A file on
        this machine (a folder's, a list's local or file:// entry) is opened under its root (safeopen). A
        tar member is read at its offset, from its shard's member list read once and kept for the last
        TAR_SHARDS_KEPT shards (the catalog stores names, not offsets)."""
        local = sources.local_file(row.root, row.relpath, row.relpath_raw)
        if local is not None:
            return read_regular(*local, row.size, row.mtime, read=not check_only, content=self.contents,
                                sha256=row.sha256, indexed_at=row.indexed_at)
        if sources.kind(row.root) != sources.TAR:
            return None if check_only else row.read()
        # a local shard is opened once: its member is read from the file whose ctime is judged (member_replaced), not
        # through its name again, which another user who may write its folder can rename another shard to meanwhile
        shard = None
        if not sources.is_url(row.root):
            try:
                shard = safeopen.open_regular(row.root)  # never a FIFO's blocking read
            except FileNotFoundError:
                raise ApiError(404, "the shard is gone: re-run alignsearch index") from None
            except safeopen.Refused:
                raise _changed("shard is no longer a regular file") from None
        try:
            name = os.fsdecode(row.relpath_raw) if row.relpath_raw else row.relpath
            with self._members_lock:
                members = self._tar_members.pop(row.root, None)
            if members is None or members.get(name, (0, -1))[1] != row.size:  # unknown, or the shard changed
                members = sources.tar_members(row.root)
            with self._members_lock:
                self._tar_members[row.root] = members
                while len(self._tar_members) > TAR_SHARDS_KEPT:
                    self._tar_members.popitem(last=False)
            if members.get(name, (0, -1))[1] != row.size:
                raise ApiError(404, f"no member {name} of {row.size} bytes in {row.root}: re-run alignsearch index")
            if check_only:
                return None
            offset, size = members[name]
            if shard is None:
                return sources.read_bytes(row.root, row.relpath, row.relpath_raw, offset, size)
            data = pread_exactly(shard, size, offset)
            if member_replaced(data, row.sha256, os.fstat(shard).st_ctime, row.indexed_at):
                raise ApiError(409, "the file is no longer the one indexed (its shard was rewritten, the member's "
                                    "name and size the same): re-run alignsearch index")
            return data
        finally:
            if shard is not None:
                os.close(shard)

    def original(self, file_id: int) -> tuple[bytes | ThumbPlan, str]:
        """The image's bytes and type; for one a browser cannot show, its largest thumbnail: cached, else the plan of
        drawing it (draw, in a decode slot)."""
        row = self.row(file_id)
        if row.format not in BROWSER_FORMATS:
            return self.thumbnail(file_id, THUMB_SIZES[-1], row=row), "image/jpeg"
        try:
            return self.read(row), BROWSER_FORMATS[row.format]
        except (OSError, BadInputError) as exc:
            raise ApiError(404, f"the file is gone from its source: {exc}") from None

    def thumbnail(self, file_id: int, size: int, row: catalog.FileRow | None = None) -> bytes | ThumbPlan:
        """The JPEG thumbnail from the cache while its file is unchanged, else the plan of drawing it (draw), which the
        caller runs once it holds a decode slot (waiting in the event loop rather than on a thread). The row is looked
        up and the folder judged here only: the draw took both again, a SQLite read and a judgement a thumbnail more.
        row: already looked up (original)."""
        row = row or self.row(file_id)
        cache = self.thumb_cache()
        path = None if cache is None else cache / f"{row.id}-{size}.jpg"
        try:
            cached = None if path is None else read_cached(path)
            if cached is None:
                return ThumbPlan(row, size, path)
            self.read(row, check_only=True)  # a cached thumbnail of a file since replaced is not served
        except (OSError, BadImageError, BadInputError) as exc:
            raise ApiError(404, f"cannot read the image: {exc}") from None
        return cached

    def draw(self, plan: ThumbPlan) -> bytes:
        """The thumbnail thumbnail() found no cached copy of, decoded from its file (read_regular's checks) and kept."""
        row, path = plan.row, plan.path
        # the index judged again (its stats, no row looked up): the plan was made before the slot's wait (up to
        # THUMB_WAIT_SECONDS), and a folder made writable by others meanwhile is refused as every request then is
        self._engine.judge()
        try:
            if row.t is not None:  # a video moment: its frame, decoded from the file (never read whole)
                img = self.moment_frame(row)
                if "reached" in img.info:  # an earlier frame, its keyframe too far to decode to: not kept
                    path = None
            else:
                # An indexed image is within the indexer's pixel cap (200 MP), not the upload cap (50 MP): those
                # between answered 404. A JPEG decodes at a reduced DCT scale still at least the thumbnail's
                # size, and a few decode at once (the caller holds a decode slot), so a large one costs little memory.
                img, _ = open_rgb(self.read(row), DEFAULT_MAX_PIXELS, draft=(plan.size, plan.size))
        except (OSError, BadImageError, BadInputError) as exc:
            raise ApiError(404, f"cannot read the image: {exc}") from None
        img.thumbnail((plan.size, plan.size))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=85)
        # the cache folder judged again (a link, a mode: two stats): the plan was made before the slot's wait
        if path is not None and self.thumb_cache() is not None:
            path.parent.mkdir(exist_ok=True)
            write_bytes(path, buf.getvalue(), durable=False)  # a cache: losing it to a power cut costs a redraw
        return buf.getvalue()

    def thumb_cache(self) -> Path | None:
        """The thumbnail cache folder while no one else can write it, else None (thumbnails drawn each time):
        from a folder another user owns or may write, a planted `ID-SIZE.jpg` was served as the indexed
        image's, and a planted link handed the client any file this server can read."""
        from alignsearch.storage.paths import untrusted

        if self.thumb_dir is None:
            return None
        try:
            if os.path.islink(self.thumb_dir) or (self.thumb_dir.exists() and untrusted(self.thumb_dir)):
                return None
        except OSError:
            return None
        return self.thumb_dir


    def moment_frame(self, row: catalog.FileRow):
        """A video moment's picture (its thumbnail), from the local file while it matches the catalog."""
        from alignsearch.media.video import VideoError, frame_at

        with self.open_video(row) as f:
            try:
                # called in the image thumbnails' decode slots: up to THUMB_RUNUP_SECONDS of decoding each, holding
                # the decoder's reference frames (a 4K video's are large); outside them 8 requests decoded 8 videos
                # at once. The run-up's clock starts in frame_at, after the wait, so waiting costs no frames
                return frame_at(f, row.t, row.t_end)
            except VideoError as exc:
                raise ApiError(404, str(exc)) from None

    def open_video(self, row: catalog.FileRow):
        """A video's file, opened with the checks read_regular makes (no symlink, no FIFO, a regular file of the
        catalog's size and mtime, its content the row's when its ctime is later: Contents), for ranged reads; only
        local files are served."""
        local = None if row.t is None else sources.local_file(row.root, row.relpath, row.relpath_raw)
        if local is None:
            raise ApiError(404, "not a local video: only the moments of a video on this machine are played")
        f = os.fdopen(open_indexed(*local, row.size, row.mtime), "rb")
        try:
            # a suspect video hashed whole once (its first range request waits for it), then known by its identity
            self.contents.check(f.fileno(), row.sha256, row.indexed_at)
        except BaseException:
            f.close()
            raise
        return f

    def video(self, file_id: int, range_header: str | None):
        """(open file, start, length, total size, media type, partial) of a moment's video for a ranged GET. The type
        is the container's, read from the file opened (container_type), never its name's: content that is no video
        container a browser plays is not served (its moments' pictures are, at /api/image)."""
        from alignsearch.media.video import byte_range, sniff

        row = self.row(file_id)
        f = self.open_video(row)
        try:
            ctype = sniff(f.fileno())
            if ctype is None:
                raise ApiError(404, "not a video a browser plays: its content is no MP4, QuickTime, WebM, Matroska or "
                                    f"AVI container, whatever its name says (its picture: /api/image/{file_id})")
            span = byte_range(range_header, row.size)
        except ValueError as exc:
            f.close()
            raise ApiError(416, f"cannot serve that range: {exc}", {"Content-Range": f"bytes */{row.size}"}) from None
        except OSError as exc:
            f.close()
            raise ApiError(404, f"cannot read the video: {exc.strerror or exc}") from None
        except BaseException:
            f.close()
            raise
        start, length = span or (0, row.size)
        return f, start, length, row.size, ctype, span is not None


def _listed(row: catalog.FileRow, photo: dict | None = None, labels: list[str] = ()) -> dict[str, Any]:
    """A listed image: a hit's fields (taken, camera, lens, GPS, caption, tags, a moment's times included; a
    name that is not UTF-8 as \\xNN with path_b64) without a score."""
    out = engine_module._hit(row, 0.0, photo, labels).to_dict()
    for key in ("score", "similarity", "parts"):
        out.pop(key, None)
    return out


def decode_upload(data: bytes, max_pixels: int, spec: ImageSpec):
    """The uploaded image as a query image given by path is decoded (images.decode, for the model's input `spec`: a
    large one reduced first): decoded whole, the same photo scored otherwise through a server than alone."""
    querycheck.check_image(data)
    try:
        return decode(data, spec, max_pixels).image
    except ImageTooLarge:
        # this server's memory guard, not a rule of every surface: 413, on which the CLI searches locally
        # (it decodes a query image up to the indexer's cap, a 108 MP phone photo too)
        raise ApiError(413, f"the image is too large: this server decodes at most {max_pixels:,} pixels") from None
    except BadImageError as exc:
        # what a search here says of the file (BadInputError, exit 6), not a request malformed in itself (400's default)
        raise ApiError(400, f"{querycheck.UNREADABLE_IMAGE}{exc}", kind=BadInputError.__name__) from None


def _hit_fields(exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """engine.Hit's fields as pydantic field definitions: required unless the dataclass gives a default."""
    hints, out = typing.get_type_hints(engine_module.Hit), {}
    for f in dataclasses.fields(engine_module.Hit):
        if f.name in exclude:
            continue
        if f.default_factory is not dataclasses.MISSING:
            out[f.name] = (hints[f.name], Field(default_factory=f.default_factory))
        else:
            out[f.name] = (hints[f.name], ... if f.default is dataclasses.MISSING else f.default)
    return out


# The JSON of a hit (engine.Hit) and of a listed image (a hit without a score), for the OpenAPI schema.
Hit = create_model("Hit", __config__=ConfigDict(extra="allow"), **_hit_fields())
Listed = create_model("Listed", __config__=ConfigDict(extra="allow"), **_hit_fields(exclude=("score",)))


def _ranged(default, low=None, high=None, **field):
    """A parameter whose range the schema publishes but request.build checks (UsageError: 400, as the CLI's exit 2
    and Engine.search's error): the framework's own check answered 422 where the CLI and the library said 6 or 2."""
    bounds = {key: value for key, value in (("minimum", low), ("maximum", high)) if value is not None}
    return Field(default, json_schema_extra=bounds, **field)


def _one_of(default, names, **field):
    """A parameter of a few names, published as an enum, checked by request.build (400, as above)."""
    return Field(default, json_schema_extra={"enum": list(names)}, **field)


class SearchParams(BaseModel):
    """The parameters of /api/search, one model for GET (the URL) and POST (the URL or the form): the names of
    `alignsearch query`'s options. The framework checks their types (422); their ranges and names are
    request.build's, the one set of rules of every surface (400)."""

    model_config = ConfigDict(extra="ignore")

    q: str | None = Field(None, description=f"the text to search for, at most {querycheck.MAX_TEXT_CHARS} characters")
    similar: int | None = Field(None, ge=1, le=querycheck.MAX_ID, description="an indexed image's id: images like it")
    k: int = _ranged(querycheck.DEFAULT_K, 1, querycheck.MAX_K, description="number of results")
    negative: str | None = Field(None, description="text whose concept is subtracted")
    text_weight: float = _ranged(2.0, -querycheck.MAX_WEIGHT, querycheck.MAX_WEIGHT)
    image_weight: float = _ranged(1.0, -querycheck.MAX_WEIGHT, querycheck.MAX_WEIGHT)
    negative_weight: float = _ranged(1.0, -querycheck.MAX_WEIGHT, querycheck.MAX_WEIGHT)
    tag: str | None = Field(None, description="only images with this tag")
    where: str | None = Field(None, description="a filter expression (README: the --where language)")
    after: str | None = Field(None, description="taken on or after this ISO 8601 date")
    before: str | None = Field(None, description="taken before this ISO 8601 date")
    camera: str | None = Field(None, description="camera make or model contains this")
    near: str | None = Field(None, description="LAT,LON,KM: taken within KM km")
    path: str | None = Field(None, description="glob on the path under its root")
    format: str | None = Field(None, description="image format")
    min_score: float | None = _ranged(None, -1, 1)
    sort: str = _one_of("score", search_request.SORTS)
    mode: str = _one_of("auto", search_request.MODES)
    collapse: bool = Field(False, description="fold near duplicates into the better hit")
    compose: str = _one_of("auto", search_request.COMPOSE_METHODS,
                           description="how a text and an image combine (README: how composition works)")
    media: str | None = _one_of(None, search_request.MEDIA, description="only photos, or only video moments")
    # no upper bound: request.build takes any whole number from 1 (as the CLI and Engine.search do)
    per_video: int = _ranged(search_request.DEFAULT_PER_VIDEO, 1, description="at most this many moments of one video")
    nprobe: int | None = _ranged(None, 1, querycheck.MAX_NPROBE,
                                 description="IVF lists to visit (default: the index's tuned value)")
    explain: bool = Field(False, description="also answer how the search runs (`plan`)")


class SearchForm(SearchParams):
    """POST /api/search's form: the query image and any of the parameters (each given once: in the form or
    in the URL)."""

    image: UploadFile | None = File(None, description="query image (20 MB at most)")


# the form's file fields: parsed as files even when a client sends one without a filename (utf8form.as_file_part)
FORM_FILE_FIELDS = frozenset(name for name, field in SearchForm.model_fields.items()
                             if UploadFile in typing.get_args(field.annotation))


def given_once(items, where: str) -> None:
    """Refuse a search parameter given twice (400), as the CLI refuses an option given twice: the framework kept
    the last silently, so ?q=dog&q=cat searched for cat and a form's k=2, k=50 for 50."""
    names = [name for name, _ in items if name in SearchParams.model_fields]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise UsageError(f"{', '.join(twice)} {'is' if len(twice) == 1 else 'are'} given more than once in the "
                         f"{where}: each takes one value")


def not_utf8(query_string: bytes) -> str | None:
    """The first parameter name of a raw URL query string whose name or value, %-escapes decoded, is not UTF-8
    (None when all are). The framework decodes such bytes with replacement characters, so ?q=%FF%FE searched
    for "\ufffd\ufffd" where the CLI refuses a text that is not UTF-8 (exit 6): the same query, two answers."""
    for pair in query_string.split(b"&"):
        name, _, value = pair.partition(b"=")
        raw_name, raw_value = (unquote_to_bytes(part.replace(b"+", b" ")) for part in (name, value))
        try:
            raw_name.decode("utf-8")
            raw_value.decode("utf-8")
        except UnicodeDecodeError:
            return raw_name.decode("utf-8", "backslashreplace")[:40]
    return None


def utf8_only(request: Request) -> None:
    """Refuse (400, BadInputError: the CLI's exit 6 for a text that is not UTF-8) a URL parameter not UTF-8."""
    name = not_utf8(request.scope.get("query_string", b""))
    if name is not None:
        raise BadInputError(f"{name!r} in the URL is not valid UTF-8: %-escape the UTF-8 bytes of the text")


def url_params(request: Request) -> list[tuple[str, str]]:
    """The URL's parameters less HTML5's _charset_ field, which a browser fills in a GET form that has one (as it
    does in a POST form: utf8form): one naming UTF-8 (or ASCII) is taken and dropped, as it says how the URL is
    written, not what to search; one naming another charset is refused, as in a form, for the server reads UTF-8
    only. It was refused as a parameter /api/search does not take even when it said UTF-8."""
    items = request.query_params.multi_items()
    for name, value in items:
        if name == CHARSET_FIELD:
            refusal = label_refusal(f"the URL (its {CHARSET_FIELD} field)", value)
            if refusal is not None:
                raise BadInputError(refusal)
    return [(name, value) for name, value in items if name != CHARSET_FIELD]


def known_only(items, known, where: str) -> None:
    """Refuse a parameter /api/search does not take (400), as the CLI refuses an unknown option: the framework
    ignored it, so a typo (?q=dog&min-score=0.3, a form's negativ=leash) searched without what it asked for and
    the answer looked like any other. The CLI's client sends only the names a server lists (search_params)."""
    unknown = sorted({name for name, _ in items} - set(known))
    if unknown:
        raise UsageError(f"/api/search does not take {', '.join(repr(n[:40]) for n in unknown[:5])} in the {where}; "
                         f"it takes {', '.join(sorted(known))}")


def merged(in_url: SearchParams, in_form: SearchParams) -> SearchParams:
    """POST's parameters: those of the form and those of the URL together; one given in both must agree."""
    fields = {}
    for name in SearchParams.model_fields:
        url_value, form_value = getattr(in_url, name), getattr(in_form, name)
        if name in in_url.model_fields_set and name in in_form.model_fields_set and url_value != form_value:
            raise ApiError(400, f"{name} is {form_value!r} in the form and {url_value!r} in the URL: give one")
        fields[name] = form_value if name in in_form.model_fields_set else url_value
    return SearchParams.model_construct(_fields_set=in_url.model_fields_set | (in_form.model_fields_set - {"image"}),
                                        **fields)


def request_of(params: SearchParams, image: bytes | None = None, text: str | None = None) -> SearchRequest:
    """The search request of checked parameters (request.build: the rules the CLI and Engine.search apply)."""
    given = {name: getattr(params, name) for name in SearchParams.model_fields if name != "q"}
    return search_request.build(text=text, image=image, **given)


def echo(request: SearchRequest, posted: bool) -> dict[str, Any]:
    """The `query` of an answer: what was asked (GET: the similar= id, POST: whether an image came), with media
    and per_video when not the defaults, nprobe and explain when given."""
    asked = {"text": request.text, **({"image": request.image is not None} if posted else {"similar": request.similar}),
             **{n: getattr(request, n) for n in ("k", "text_weight", "image_weight", "negative_weight", "negative")},
             "tag": request.tag, **request.narrowed(), "min_score": request.min_score, "sort": request.sort,
             "mode": request.mode, "collapse": request.collapse, "compose": request.compose}
    defaults = search_request.SearchRequest()
    for name in ("media", "per_video", "nprobe", "explain"):
        if getattr(request, name) != getattr(defaults, name):
            asked[name] = getattr(request, name)
    return asked


class SearchAnswer(BaseModel):
    query: dict[str, Any]
    results: list[Hit]
    plan: dict[str, Any] | None = Field(None, description="how the search ran (explain=true)")

class RecentAnswer(BaseModel):
    total: int
    offset: int
    results: list[Listed]

class Error(BaseModel):
    model_config = ConfigDict(extra="allow")
    error: str
    # the error's class in alignsearch/errors.py (boundary.KINDS), on every error answer (boundary.kind_of_status for
    # those that are no library error's): the CLI's client raises the same error from it (exit code and line) where a
    # search without the server would meet it too
    kind: str


def create_app(engine: Engine, config: ServerConfig, token: str | None, lifespan=None):
    """The ASGI application: the API, the page and its assets, behind the Host check."""
    library = Library(engine, config)
    encoder = EncoderQueue(config.queue_size)
    decoding = asyncio.Semaphore(DECODE_SLOTS)  # uploads decoding at once (see DECODE_SLOTS)
    drawing = asyncio.Semaphore(DECODE_SLOTS)  # thumbnails and moments' pictures decoding at once: their own, so a
    # page of thumbnails never holds up a search by image
    cookie = cookie_name(config.port)
    bearer, by_cookie = HTTPBearer(auto_error=False), APIKeyCookie(name=cookie, auto_error=False)

    async def authorise(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
                  from_cookie: Annotated[str | None, Depends(by_cookie)]) -> None:
        # async: a plain def would cost every request a hop to the thread pool and back
        if token is None:
            return
        given = credentials.credentials if credentials is not None else from_cookie or ""
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise ApiError(401, "missing or wrong token: open the URL `alignsearch serve` printed, or send "
                                "Authorization: Bearer TOKEN (the token is in .alignsearch/server.json)",
                           {"WWW-Authenticate": "Bearer"})

    @asynccontextmanager
    async def lifespan_with_queue(app):
        try:
            if lifespan is None:
                yield
            else:
                async with lifespan(app):
                    yield
        finally:
            encoder.close()

    app = FastAPI(
        title="alignsearch", version=alignsearch.__version__, lifespan=lifespan_with_queue,
        # No /docs nor /redoc: FastAPI's pages load swagger-ui and redoc from a CDN (blank offline, and a
        # third party's script next to the token). The schema stays at /openapi.json.
        docs_url=None, redoc_url=None,
        description="Cross-modal image search over an indexed library. Every /api call needs the server's token: "
                    "`Authorization: Bearer TOKEN` or the cookie set by opening the URL `alignsearch serve` prints.",
        max_body_size=config.max_upload_bytes,
        form_limits={"max_fields": FORM_FIELDS, "max_files": 1, "max_part_size": FORM_FIELD_BYTES},
    )
    # a form's text that is not UTF-8 is refused as the URL's is (utf8_only), not read as Latin-1 (utf8form.py)
    app.router.route_class = utf8_form_route(file_fields=FORM_FILE_FIELDS)

    def error(status: int, message: str, headers: dict | None = None, **extra) -> JSONResponse:
        # an error names the index too (not to a caller without the token), so the CLI, whose first word
        # from a recorded server this may be, takes a refusal only from the server of its index
        named = {} if status in (401, 403) else {INDEX_HEADER: library.index_id or ""}
        extra.setdefault("kind", kind_of_status(status))  # every error answer names one (boundary.kind_of_status)
        return JSONResponse({"error": message, **extra}, status_code=status, headers={**named, **(headers or {})})

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return error(exc.status, str(exc), exc.headers, kind=exc.kind)

    def library_answer(request, exc: AlignSearchError) -> JSONResponse:
        # the status each error class carries (alignsearch/errors.py) and its kind, which the CLI's client raises
        # again (boundary.py); a 5xx is the server's or the index's fault, not the request's: logged too, once
        # while it lasts (Trouble)
        status, body = answer_of(exc)
        if status >= 500:
            library.trouble.met(endpoint_of(request.scope), f"{request.method} {request.url.path}", body["kind"],
                                body["error"])
        return error(status, body.pop("error"), **body)

    @app.exception_handler(AlignSearchError)
    async def _library_error(request, exc: AlignSearchError):
        return library_answer(request, exc)

    @app.exception_handler(RefusedForm)
    async def _refused_form(request, exc: RefusedForm):
        return library_answer(request, exc.error)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        messages = {404: f"no such endpoint or file: {request.url.path}", 405: f"{request.method} is not allowed here",
                    413: f"the request body exceeds the limit of {config.max_upload_bytes} bytes"}
        return error(exc.status_code, messages.get(exc.status_code, str(exc.detail)), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        details = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", "")} for e in exc.errors()]
        text = "; ".join(f"{'.'.join(str(p) for p in d['loc'][1:]) or d['loc']}: {d['msg']}" for d in details)
        return error(422, text or "invalid request", detail=details)

    def unexpected(request, exc: Exception) -> JSONResponse:
        known = library_error(exc)  # a SQLite error that means a damaged or busy catalog, a full disk
        if known is not None:
            log.debug("%s %s failed", request.method, request.url.path, exc_info=exc)
            return library_answer(request, known)
        log.error("internal error on %s %s: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
        log.debug("internal error on %s %s", request.method, request.url.path, exc_info=exc)
        return error(INTERNAL_STATUS, "internal error")

    app.add_middleware(TroubleOver, trouble=library.trouble)
    app.add_middleware(Boundary, answer=unexpected)

    errors = {code: {"model": Error} for code in (400, 401, 404, 409, 413, 415, 422, 500, 503, 507)}
    id_param = dict(ge=1, le=querycheck.MAX_ID)
    api = dict(dependencies=[Depends(authorise)], responses=errors)

    async def in_slot(slots: asyncio.Semaphore, fn: Callable, *args, wait: float | None = None):
        """fn(*args) on a worker thread once one of slots is free. The wait is in the event loop and holds no
        thread (see DECODE_SLOTS); wait: seconds at most, then 503 with Retry-After."""
        try:
            async with asyncio.timeout(wait):
                await slots.acquire()
        except TimeoutError:
            raise ApiError(503, "the server is busy decoding other images: try again shortly",
                           {"Retry-After": str(THUMB_RETRY_SECONDS), "Cache-Control": "no-store"}) from None
        try:
            # freed once fn returns: nothing here cancels a handler when its client goes (Starlette's Response, no
            # BaseHTTPMiddleware); a cancellation would free the slot while the thread still decodes
            return await run_in_threadpool(fn, *args)
        finally:
            slots.release()

    async def encode_and_search(request: SearchRequest) -> tuple[list[dict], Any]:
        # One snapshot for both steps: during a re-encode's model switch a query encoded with the old model
        # was ranked against the new vectors. If the index moves on in between, encode again.
        for attempt in range(4):
            snap = await run_in_threadpool(library.snapshot)
            future = encoder.submit(library.parts_of, request, snap)  # encoded on the encoder's thread, not the loop
            parts = await asyncio.wrap_future(future)
            try:
                return await run_in_threadpool(library.search, request, parts, snap), snap
            except SnapshotMoved:
                if attempt == 3:
                    raise ApiError(503, "the index is being re-encoded: try again shortly", {"Retry-After": "1"}) from None
        raise AssertionError("unreachable")

    async def similar_search(request: SearchRequest) -> tuple[list[dict], Any]:
        """The stored vector of an indexed image and its search, from one snapshot (as encode_and_search); the
        image itself is left out, as the CLI's `similar` does."""
        request = dataclasses.replace(request, text=None, mode="vector")
        for attempt in range(4):
            snap = await run_in_threadpool(library.snapshot)
            try:
                vector = await run_in_threadpool(library.vector_of, request.similar, snap)
                return await run_in_threadpool(library.search, request, vector, snap, request.similar), snap
            except SnapshotMoved:
                if attempt == 3:
                    raise ApiError(503, "the index is being re-encoded: try again shortly", {"Retry-After": "1"}) from None
        raise AssertionError("unreachable")

    async def answer(request: SearchRequest, posted: bool) -> dict[str, Any]:
        """Search (by the request's text and image, or its similar= id) and say what was asked."""
        if request.similar is not None:
            results, snap = await similar_search(request)
        else:
            if request.image is not None:  # checked bytes: decoded a few at a time (DECODE_SLOTS)
                pil = await in_slot(decoding, lambda: decode_upload(request.image, config.max_upload_pixels,
                                                                    library.image_spec()))
                request = search_request.with_image(request, pil)
            results, snap = await encode_and_search(request)
        out = {"query": echo(request, posted), "results": results}
        if request.explain:  # the plan of the snapshot the results came from
            out["plan"] = await run_in_threadpool(library.explain, request, snap)
        return out

    @app.get("/healthz", tags=["server"])
    async def healthz() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/api/info", tags=["server"], **api)
    async def info() -> dict[str, Any]:
        """What `alignsearch info --json` says, plus the index id (clients check it against their own)."""
        return await run_in_threadpool(library.info)

    @app.get("/api/search", response_model=SearchAnswer, response_model_exclude_unset=True, tags=["search"], **api)
    async def search_get(request: Request, params: Annotated[SearchParams, Query()], response: Response):
        """Search by text (q), by an indexed image (similar), with an optional negative text and tag, metadata
        filters, a cutoff, a sort and a mode (the names of `alignsearch query`'s options)."""
        utf8_only(request)
        known_only(url_params(request), SearchParams.model_fields, "URL")
        given_once(url_params(request), "URL")
        response.headers[INDEX_HEADER] = library.index_id or ""  # the CLI checks the answer is of its index
        return await answer(request_of(params, text=params.q), posted=False)

    @app.post("/api/search", response_model=SearchAnswer, response_model_exclude_unset=True, tags=["search"], **api)
    async def search_post(request: Request, in_url: Annotated[SearchParams, Query()],
                          form: Annotated[SearchForm, Form(media_type="multipart/form-data")], response: Response):
        """Search by an uploaded image, alone or with a text (multipart/form-data). Every parameter of GET is
        taken as a form field or in the URL (once: a value given in both that differs is refused)."""
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise ApiError(415, "POST multipart/form-data with an 'image' file field (and q, k... fields)")
        utf8_only(request)
        known_only(url_params(request), SearchParams.model_fields, "URL")
        known_only((await request.form()).multi_items(), SearchForm.model_fields, "form")
        given_once(url_params(request), "URL")
        given_once((await request.form()).multi_items(), "form")  # the form the framework read, kept by the request
        params = merged(in_url, form)
        response.headers[INDEX_HEADER] = library.index_id or ""
        data = await form.image.read() if form.image is not None else None
        # an empty q in a form is no text (an image alone), as a browser sends an empty text box
        return await answer(request_of(params, data, text=params.q or None), posted=True)

    @app.get("/api/recent", response_model=RecentAnswer, tags=["browse"], **api)
    async def recent(offset: Annotated[int, Query(ge=0, le=querycheck.MAX_ID)] = 0,
                     limit: Annotated[int, Query(ge=1, le=querycheck.MAX_K)] = 60):
        """Indexed images, most recently added first: the landing page's browser."""
        return await run_in_threadpool(library.recent, offset, limit)

    @app.get("/api/image/{file_id}", tags=["images"], response_class=Response, **api,
             openapi_extra={"responses": {"200": {"content": {"image/*": {}}}}})
    async def image_by_id(file_id: Annotated[int, PathParam(**id_param)],
                          size: Annotated[int | None, Query(ge=1, le=4096, description="a JPEG thumbnail this big")] = None):
        """The indexed image (size: a cached JPEG thumbnail), only while its file matches the catalog."""
        if size is None:
            data, ctype = await run_in_threadpool(library.original, file_id)
        else:
            data, ctype = await run_in_threadpool(library.thumbnail, file_id, thumb_size(size)), "image/jpeg"
        if isinstance(data, ThumbPlan):  # not cached: drawn in a decode slot, waiting THUMB_WAIT_SECONDS at most
            data = await in_slot(drawing, library.draw, data, wait=THUMB_WAIT_SECONDS)
        return Response(data, media_type=ctype, headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/api/video/{file_id}", tags=["images"], response_class=Response, **api,
             openapi_extra={"responses": {"206": {"content": {"video/*": {}}}}})
    async def video_by_id(file_id: Annotated[int, PathParam(**id_param)], request: Request):
        """The video file of an indexed moment, with HTTP range requests (a player seeks to the moment's t),
        only while the file matches the catalog."""
        from fastapi.responses import StreamingResponse

        f, start, length, total, ctype, partial = await run_in_threadpool(library.video, file_id,
                                                                          request.headers.get("range"))

        def body():
            with f:
                f.seek(start)
                left = length
                while left > 0:
                    chunk = f.read(min(1 << 20, left))  # a MiB at a time: memory bounded whatever is asked
                    if not chunk:
                        return
                    left -= len(chunk)
                    yield chunk

        headers = {"Accept-Ranges": "bytes", "Content-Length": str(length), "Cache-Control": "private, max-age=3600"}
        if partial:
            headers["Content-Range"] = f"bytes {start}-{start + length - 1}/{total}"
        return StreamingResponse(body(), status_code=206 if partial else 200, media_type=ctype, headers=headers)

    @app.get("/", include_in_schema=False)
    async def page(request: Request):
        given = request.query_params.get("token")
        if given is not None and token is not None:  # the printed URL: trade the token for a cookie
            if not hmac.compare_digest(given.encode(), token.encode()):
                return error(401, "wrong token: open the URL `alignsearch serve` printed")
            rest = urlencode([(k, v) for k, v in request.query_params.multi_items() if k != "token"])
            response = RedirectResponse("/" + (f"?{rest}" if rest else ""), status_code=303)
            response.set_cookie(cookie, token, httponly=True, samesite="strict", path="/")
            return response
        return FileResponse(WEB_DIR / "index.html", media_type="text/html; charset=utf-8",
                            headers={"Cache-Control": "no-store"})

    app.mount("/static", StaticFiles(directory=WEB_DIR, follow_symlink=False), name="static")
    app.state.library = library
    return HostCheck(app, allowed_hosts(config),
                     f"the request body exceeds the limit of {config.max_upload_bytes} bytes")


@dataclass
class RunningServer:
    """A started server: where it listens, its token, and how to stop it (from another thread)."""

    url: str
    port: int
    token: str | None
    server: Any = field(repr=False)
    stopped: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def open_url(self) -> str:
        """The URL to open in a browser: it trades the token for a cookie."""
        # quoted: a --token holding &, # or a space cut the printed URL short, and opening it answered 401
        return f"{self.url}/?token={quote(self.token, safe='')}" if self.token else f"{self.url}/"

    def open_url_as(self, name: str) -> str:
        """open_url addressed as name (an --allow-host name): on every interface the URL says 127.0.0.1,
        which other machines cannot open."""
        name = name.strip("[]").rstrip(".")
        host = f"[{name}]" if ":" in name else name
        return self.open_url.replace(self.url, f"http://{host}:{self.port}", 1)

    def shutdown(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.stopped.wait(timeout)


# A name's addresses of both families: a browser takes `localhost` as loopback whatever /etc/hosts says, trying
# ::1 and 127.0.0.1 (and a client resolving it may get either first); and the wildcard of each family.
LOOPBACK_ADDRESSES = ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1"))
WILDCARD_ADDRESSES = ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::"))
# A bind that fails so is of an address that cannot exist here (no IPv6 in this kernel or on this interface):
# nobody else can listen there either, so serving goes on at the others.
NOT_HERE = (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT)
PORT_TRIES = 8  # --port 0: tries at a free port free in every family


def listen_addresses(host: str, resolved: Callable[[], list]) -> list[tuple[int, str]]:
    """The (family, address) pairs `serve --host host` listens at, all on one port. Every address the host stands
    for, not only the first getaddrinfo gives: bound to 127.0.0.1 alone for `localhost`, ::1 at the same port was
    free to another user's program, which a browser or client taking `localhost` as ::1 reached (a page asking
    for the token, results of its own). `localhost` is the loopback of both families, as browsers take it (not
    what /etc/hosts says, which may lack ::1 or, for --no-token, name another machine); the wildcard is both
    families' (`--host ::` listened on 0.0.0.0 only; `0.0.0.0`, IPv4's, is an address and itself: IPv6 interfaces
    the user did not name, and a firewall may not cover, are not opened for it); another name is every address it resolves to (as
    tornado's bind_sockets does), by resolved() (getaddrinfo's entries); an address, itself."""
    bare = host.strip().strip("[]")
    if is_wildcard(host) and bare != "0.0.0.0":
        return list(WILDCARD_ADDRESSES)
    try:
        address = ipaddress.ip_address(bare)
        return [(socket.AF_INET6 if address.version == 6 else socket.AF_INET, bare)]
    except ValueError:
        pass
    if is_loopback(bare):
        return list(LOOPBACK_ADDRESSES)
    return list(dict.fromkeys((entry[0], entry[4][0]) for entry in resolved()))


def _listen(host: str, port: int) -> list[socket.socket]:
    """Listening sockets at every address of listen_addresses(host), on one port (port 0: one free in all)."""
    pairs = listen_addresses(host, lambda: socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                              flags=socket.AI_PASSIVE))
    tries = 0
    while True:
        try:
            return _bind_all(pairs, port)
        except OSError as exc:
            tries += 1
            # a port free in one family and taken in the other: another, as a single bind to port 0 never fails
            if port or exc.errno != errno.EADDRINUSE or tries == PORT_TRIES:
                raise


def _bind_all(pairs: list[tuple[int, str]], port: int) -> list[socket.socket]:
    """Sockets bound and listening at each pair, the port the first took (port 0) for the others; those of an
    address that cannot exist here (NOT_HERE) left out while one is bound. An address taken by another program
    closes them all: serving at the others would leave that one to it."""
    socks: list[socket.socket] = []
    skipped: OSError | None = None
    try:
        for family, address in pairs:
            try:
                sock = socket.socket(family, socket.SOCK_STREAM)
            except OSError as exc:
                if exc.errno not in NOT_HERE:
                    raise
                skipped = skipped or exc
                continue
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:  # [::] of its own family only: 0.0.0.0 is bound by its own socket
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind((address, socks[0].getsockname()[1] if len(socks) > 1 else port))
                sock.listen(BACKLOG)  # now: a client that reads the server record may connect before the loop runs
            except OSError as exc:
                socks.pop().close()
                if exc.errno in NOT_HERE and (socks or len(pairs) > 1):
                    skipped = skipped or exc
                    continue
                if len(pairs) > 1:  # which of them: the one taken is not the one the user named
                    shown = f"[{address}]" if ":" in address else address
                    raise OSError(exc.errno, f"{exc.strerror} at {shown}") from None
                raise
        if not socks:
            raise skipped or OSError(errno.EADDRNOTAVAIL, "no address to listen at")
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    for sock in socks:
        sock.set_inheritable(True)
    return socks


def address_shown(host: str, bound: list[str]) -> str:
    """The address or name a started server's URL (printed, and recorded for `query`) names, given the addresses
    it is bound at. An address for `localhost`, so a client connects to a socket of this server, not to whatever
    a resolver makes of the name; 127.0.0.1 for every interface; another name itself (its Host header)."""
    if is_wildcard(host):
        return "127.0.0.1" if "0.0.0.0" in bound else "::1"
    bare = host.strip().strip("[]")
    try:
        ipaddress.ip_address(bare)
    except ValueError:
        if is_loopback(bare):
            return bound[0]
    return host


def read_only(index_dir: Path) -> str | None:
    """Why the server must not write into this index (its record, thumbnails), or None: it is read-only to
    this process, or belongs to another user (whose folder could turn a name into a symlink under us)."""
    try:
        st = os.stat(index_dir)
    except OSError as exc:
        return f"it cannot be checked ({exc.strerror or exc})"
    if st.st_uid != os.geteuid():
        return f"it belongs to another user (uid {st.st_uid})"
    if not os.access(index_dir, os.W_OK):
        return "it is read-only"
    # the rule the client reads the record by (client.read_record): a record others could have written
    # there would be refused by every query, and never removed
    from alignsearch.storage.paths import untrusted

    return untrusted(index_dir)


def record_path(index_dir: Path) -> Path:
    """Where this start's server record goes: the index's server.json, or for an index it must not write
    this user's private record (paths.private_record), in a folder made private (0700) and checked like
    the model cache; AlignSearchError when no such place can be had."""
    if not read_only(index_dir):
        return index_dir / SERVER_FILE
    from alignsearch.encoders.backend import make_cache_dir
    from alignsearch.storage.paths import private_record, untrusted

    path = private_record(index_dir)
    try:
        # the folders above it first, as the model cache's are (backend.cache_untrusted; /tmp's sticky bit passes):
        # only the folder was judged, and with $XDG_RUNTIME_DIR or ALIGNSEARCH_CACHE in a folder of another user's,
        # they could rename this user's record folder away or swap a link to another of this user's folders in
        why = next(filter(None, map(_untrusted_above, reversed(path.parent.parents))), None)
        if why is None:
            make_cache_dir(path.parent)
            why = untrusted(path.parent)
    except OSError as exc:
        why = f"{path.parent}: {exc.strerror or exc}"
    if why:
        raise AlignSearchError(f"cannot keep the server record of the read-only index {index_dir} elsewhere: {why}")
    return path


def _untrusted_above(folder: Path) -> str | None:
    """Why another user could rename what folder holds (paths.untrusted, root's and a sticky world-writable folder
    passing), or None; None for one not made yet (made by this user)."""
    from alignsearch.storage.paths import untrusted

    try:
        return untrusted(folder, owners=(0,), sticky_ok=True)
    except FileNotFoundError:
        return None


def write_record(path: Path, record: dict) -> Path:
    """Write the server record in its turn (client.record_turn), so no removal of the one before it (the exit of
    a server this one follows) reads that one and unlinks this. Another holding the turn past RECORD_WAIT (a
    process stopped while holding it) is not waited on longer: serving goes on, as it did before the turn."""
    with record_turn(path, RECORD_WAIT):
        write_bytes(path, json.dumps(record).encode(), mode=0o600)  # 0600 from the start: it holds the token
    return path


def remove_record(path: Path, pid: int) -> None:
    """Remove the record if it is still this process's (a later server may have replaced it), read and removed
    in one turn (client.remove_record_if). A record whose turn is not had within RECORD_WAIT is left: a
    query removes it once this process is gone. None there (removed already: serve's exit, then atexit): no turn
    is waited for, as one held by another user costs client.OLD_TURN_WAIT each time."""
    if os.path.lexists(path):  # a record of this process's is never written again, so none now is none later
        remove_record_if(path, lambda record: record.get("pid") == pid, RECORD_WAIT)


def serve(engine: Engine, config: ServerConfig, ready: Callable[[RunningServer], None] | None = None,
          verbose: bool = False) -> None:
    """Serve until interrupted (SIGINT, SIGTERM) or shut down through the RunningServer handed to ready().
    Writes SERVER_FILE into the index (mode 0600: pid, host, port, token, index id) so `alignsearch query`
    finds and checks the warm server, and removes it on the way out. An index it must not write (read-only,
    or another user's) is served read-only: the record goes to paths.private_record, thumbnails are not kept."""
    import uvicorn

    record_file = record_path(engine.dir)  # before any loading: an index with no place for it is refused at once
    token = resolve_token(config)
    socks = _listen(config.host, config.port)  # first: a busy port is said at once, not after loading the model
    _ = engine.encoder  # load the model now, not on the first request
    port = socks[0].getsockname()[1]
    shown = address_shown(config.host, [sock.getsockname()[0] for sock in socks])
    url = f"http://{f'[{shown}]' if ':' in shown else shown}:{port}"
    config = ServerConfig(**{**config.__dict__, "port": port})
    pid = os.getpid()
    why = read_only(engine.dir)
    if why:
        log.warning("note: serving %s read-only (%s): thumbnails are not kept, the server record is %s",
                    engine.dir, why, record_file)
    handle: RunningServer | None = None

    @asynccontextmanager
    async def lifespan(app):
        index_id = app.state.library.index_id  # read through the library's judgement (Library.engine)
        write_record(record_file, {"pid": pid, "hostname": socket.gethostname(), "host": shown, "port": port,
                                  "url": url, "token": token, "index_id": index_id,
                                  "index_dir": str(engine.dir.resolve()),
                                  # what /api/search takes: `query` asks no /api/info first (client.py)
                                  "search_params": sorted(SearchParams.model_fields)})
        log.info("serving %s on %s", engine.dir, url)
        if ready:
            ready(handle)
        try:
            yield
        finally:
            remove_record(record_file, pid)  # before uvicorn re-raises SIGTERM, which ends the process

    app = create_app(engine, config, token, lifespan)
    server = uvicorn.Server(uvicorn.Config(
        app, lifespan="on", http=head_deadline(config.head_seconds, config.body_seconds), ws="none", log_level="info" if verbose else "warning", access_log=verbose,
        server_header=False, timeout_keep_alive=5, backlog=BACKLOG, log_config=None,
    ))
    handle = RunningServer(url, port, token, server)
    atexit.register(remove_record, record_file, pid)
    try:
        server.run(sockets=socks)
    finally:
        for sock in socks:
            sock.close()
        remove_record(record_file, pid)
        handle.stopped.set()


def start_in_thread(engine: Engine, config: ServerConfig, timeout: float = 60.0) -> RunningServer:
    """serve() on a daemon thread, for tests and benchmarks: returns once it answers."""
    started: list[RunningServer] = []
    ready = threading.Event()
    failed: list[BaseException] = []

    def run():
        try:
            serve(engine, config, lambda s: (started.append(s), ready.set()))
        except BaseException as exc:  # noqa: BLE001 - reported to the caller
            failed.append(exc)
            ready.set()

    threading.Thread(target=run, name="alignsearch-serve", daemon=True).start()
    if not ready.wait(timeout) or failed:
        raise RuntimeError(f"the server did not start: {failed[0] if failed else 'timeout'}")
    return started[0]
