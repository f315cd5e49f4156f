"""`alignsearch serve`: one warm engine behind a small JSON API and a web page.

Standard library HTTP (ThreadingHTTPServer): searches from many clients run concurrently, the encoder
is serialised by the engine, FAISS and SQLite are read concurrently. Files are served only by catalog
id, uploads are size-capped and decoded with the indexer's bomb guards, and the only thing written to
disk is the thumbnail cache.
"""

from __future__ import annotations

import email.parser
import email.policy
import hmac
import io
import json
import mimetypes
import os
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from alignsearch import sources
from alignsearch.engine import Engine
from alignsearch.paths import SERVER_FILE
from alignsearch.errors import AlignSearchError, BadImageError, BadInputError
from alignsearch.images import open_rgb

WEB_DIR = Path(__file__).parent / "web"
TAR_SHARDS_KEPT = 64  # member lists the server keeps, most recently used
THUMB_SIZES = (64, 128, 256, 512, 1024)
BROWSER_FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "GIF": "image/gif", "WEBP": "image/webp", "BMP": "image/bmp"}
LOOPBACK = {"127.0.0.1", "::1", "localhost"}
ROUTES = {
    ("GET", "/"): "page",
    ("GET", "/healthz"): "healthz",
    ("GET", "/api/info"): "info",
    ("GET", "/api/search"): "search_get",
    ("POST", "/api/search"): "search_post",
}
PREFIX_ROUTES = {"/api/image/": "image", "/static/": "static"}


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8765
    token: str | None = None
    max_k: int = 1000
    max_upload_bytes: int = 20 * 1024 * 1024
    max_upload_pixels: int = 50_000_000


class ApiError(Exception):
    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


def _number(params: dict, name: str, kind, default, low=None, high=None):
    raw = params.get(name)
    if raw in (None, ""):
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"{name} must be a {kind.__name__}, got {raw!r}") from None
    if (low is not None and value < low) or (high is not None and value > high) or value != value:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"{name} must be between {low} and {high}, got {raw!r}")
    return value


def search_params(params: dict, max_k: int) -> dict[str, Any]:
    """Validated search arguments from query-string or form fields (a pure function, unit-tested)."""
    return {
        "k": _number(params, "k", int, 20, 1, max_k),
        "text_weight": _number(params, "text_weight", float, 2.0, -100, 100),
        "image_weight": _number(params, "image_weight", float, 1.0, -100, 100),
        "negative_weight": _number(params, "negative_weight", float, 1.0, -100, 100),
        "negative": params.get("negative") or None,
        "tag": params.get("tag") or None,
    }


def thumb_size(requested: int) -> int:
    """The cached size to serve: the smallest standard size at least as large as asked."""
    return next((s for s in THUMB_SIZES if s >= requested), THUMB_SIZES[-1])


def parse_multipart(content_type: str, body: bytes) -> dict[str, Any]:
    """Form fields as str, file fields as bytes."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body
    )
    if not message.is_multipart():
        raise ApiError(HTTPStatus.BAD_REQUEST, "expected multipart/form-data with an 'image' field")
    fields: dict[str, Any] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not name:
            continue
        payload = part.get_payload(decode=True) or b""
        fields[name] = payload if part.get_filename() is not None else payload.decode("utf-8", "replace")
    return fields


class Handler(BaseHTTPRequestHandler):
    server: "AlignSearchServer"
    protocol_version = "HTTP/1.1"
    timeout = 60  # a client that stops sending mid-request frees its thread

    def log_message(self, fmt, *args):  # quiet by default; the CLI prints one line per start
        if self.server.verbose:
            super().log_message(fmt, *args)

    # -- plumbing
    def _send(self, status: HTTPStatus, body: bytes, content_type: str, extra: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: HTTPStatus, data: Any) -> None:
        self._send(status, json.dumps(data).encode(), "application/json")

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        params = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        try:
            method = "GET" if self.command == "HEAD" else self.command
            name = ROUTES.get((method, url.path))
            rest = ""
            for prefix, handler in PREFIX_ROUTES.items():
                if name is None and method == "GET" and url.path.startswith(prefix):
                    name, rest = handler, url.path.removeprefix(prefix)
            if name is None:
                if any(path == url.path for _, path in ROUTES):
                    raise ApiError(HTTPStatus.METHOD_NOT_ALLOWED, f"{self.command} is not allowed on {url.path}")
                raise ApiError(HTTPStatus.NOT_FOUND, f"no such endpoint: {url.path}")
            if name not in ("page", "static", "healthz"):  # the page and its assets load before a token is typed
                self._authorise(params)
            getattr(self, name)(params, rest)
        except ApiError as exc:
            self._json(exc.status, {"error": str(exc)})
        except AlignSearchError as exc:
            self._json(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as exc:  # noqa: BLE001 - a bug must not leak a traceback to the client
            self.log_error("internal error: %r", exc)
            self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "internal error"})

    def do_GET(self):  # noqa: N802
        self._dispatch()

    def do_HEAD(self):  # noqa: N802
        self._dispatch()

    def do_POST(self):  # noqa: N802
        self._dispatch()

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_POST  # answered 405 (or 404) with a JSON body

    def _authorise(self, params: dict) -> None:
        token = self.server.config.token
        if token is None:
            return
        given = params.get("token") or ""
        auth = self.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            given = auth.removeprefix("Bearer ")
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise ApiError(HTTPStatus.UNAUTHORIZED, "missing or wrong token: send Authorization: Bearer TOKEN or ?token=")

    def _body(self) -> bytes:
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise ApiError(HTTPStatus.LENGTH_REQUIRED, "Content-Length is required") from None
        if length > self.server.config.max_upload_bytes:
            self.close_connection = True  # the unread body must not be parsed as the next request
            raise ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                           f"upload of {length} bytes exceeds the limit of {self.server.config.max_upload_bytes}")
        return self.rfile.read(length)

    # -- endpoints
    def healthz(self, params, _rest):
        self._json(HTTPStatus.OK, {"ok": True})

    def info(self, params, _rest):
        self._json(HTTPStatus.OK, self.server.engine.info())

    def search_get(self, params, _rest):
        args = search_params(params, self.server.config.max_k)
        text, similar = params.get("q") or None, params.get("similar")
        engine = self.server.fresh_engine()
        if similar:
            file_id = _number(params, "similar", int, None, 1)
            vector = engine.vector_of(file_id)
            if vector is None:
                raise ApiError(HTTPStatus.NOT_FOUND, f"no indexed image with id {file_id}")
            hits = engine.search_vector(vector, args["k"], tag=args["tag"])
        elif text is None:
            raise ApiError(HTTPStatus.BAD_REQUEST, "give q=TEXT (or similar=ID, or POST an image)")
        else:
            hits = engine.search(text=text, **args)
        self._json(HTTPStatus.OK, {"query": {"q": text, "similar": similar, **args}, "results": [h.to_dict() for h in hits]})

    def search_post(self, params, _rest):
        content_type = self.headers.get("Content-Type", "")
        body = self._body()
        if not content_type.startswith("multipart/form-data"):
            raise ApiError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "POST multipart/form-data with an 'image' file field")
        fields = parse_multipart(content_type, body)
        image, text = fields.get("image"), fields.get("q") or None
        if isinstance(image, str) or (image is not None and len(image) == 0):
            raise ApiError(HTTPStatus.BAD_REQUEST, "the 'image' field must be a non-empty file")
        if image is None and text is None:
            raise ApiError(HTTPStatus.BAD_REQUEST, "give an 'image' file, a 'q' text, or both")
        args = search_params({k: v for k, v in fields.items() if isinstance(v, str)}, self.server.config.max_k)
        pil = None
        if image is not None:
            try:
                pil, _ = open_rgb(image, self.server.config.max_upload_pixels)
            except BadImageError as exc:
                raise ApiError(HTTPStatus.BAD_REQUEST, f"unreadable image: {exc}") from None
        hits = self.server.fresh_engine().search(text=text, image=pil, **args)
        self._json(HTTPStatus.OK, {"query": {"q": text, "image": image is not None, **args},
                                   "results": [h.to_dict() for h in hits]})

    def image(self, params, raw_id: str):
        if not raw_id.isdigit():
            raise ApiError(HTTPStatus.NOT_FOUND, "image ids are integers")
        size = _number(params, "size", int, None, 1, 4096)
        row = self.server.engine.file(int(raw_id))
        if row is None:
            raise ApiError(HTTPStatus.NOT_FOUND, f"no indexed image with id {raw_id}")
        cache = {"Cache-Control": "private, max-age=3600"}
        if size is None and row.format in BROWSER_FORMATS:
            try:
                data = self.server.read(row)
            except (OSError, BadInputError):
                raise ApiError(HTTPStatus.NOT_FOUND, "the file is gone from its source: re-run alignsearch index") from None
            self._send(HTTPStatus.OK, data, BROWSER_FORMATS[row.format], cache)
            return
        self._send(HTTPStatus.OK, self.server.thumbnail(row, thumb_size(size or 1024)), "image/jpeg", cache)

    def static(self, params, name: str):
        if name not in self.server.static_files:  # a fixed list: no path from the request reaches the disk
            raise ApiError(HTTPStatus.NOT_FOUND, f"no such file: {name}")
        ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
        self._send(HTTPStatus.OK, (WEB_DIR / name).read_bytes(), ctype)

    def page(self, params, _rest):
        self._send(HTTPStatus.OK, (WEB_DIR / "index.html").read_bytes(), "text/html; charset=utf-8")


class AlignSearchServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, engine: Engine, config: ServerConfig, verbose: bool = False):
        self.engine, self.config, self.verbose = engine, config, verbose
        self.static_files = frozenset(p.name for p in WEB_DIR.iterdir() if p.is_file())
        self.thumb_dir = engine.dir / "thumbs"
        self._refresh_lock = threading.Lock()
        self._tar_members: OrderedDict[str, dict[str, tuple[int, int]]] = OrderedDict()
        self._members_lock = threading.Lock()
        super().__init__((config.host, config.port), Handler)

    def read(self, row) -> bytes:
        """An indexed image's bytes. A tar member is read at its offset, from its shard's member list
        read once and kept for the last TAR_SHARDS_KEPT shards (the catalog stores names, not offsets)."""
        if sources.kind(row.root) != sources.TAR:
            return row.read()
        name = os.fsdecode(row.relpath_raw) if row.relpath_raw else row.relpath
        with self._members_lock:
            members = self._tar_members.pop(row.root, None)
        if members is None or members.get(name, (0, -1))[1] != row.size:  # unknown, or the shard changed
            members = sources.tar_members(row.root)
        with self._members_lock:
            self._tar_members[row.root] = members
            while len(self._tar_members) > TAR_SHARDS_KEPT:
                self._tar_members.popitem(last=False)
        if name not in members:
            raise FileNotFoundError(f"no member {name} in {row.root}")
        offset, size = members[name]
        return sources.read_bytes(row.root, row.relpath, row.relpath_raw, offset, size)

    def fresh_engine(self) -> Engine:
        """The engine, after picking up an index rebuilt since the last request."""
        with self._refresh_lock:
            self.engine.refresh()
        return self.engine

    def thumbnail(self, row, size: int) -> bytes:
        path = self.thumb_dir / f"{row.id}-{size}.jpg"
        if path.exists():
            return path.read_bytes()
        try:
            img, _ = open_rgb(self.read(row))
        except (OSError, BadImageError, BadInputError) as exc:
            raise ApiError(HTTPStatus.NOT_FOUND, f"cannot read the image: {exc}") from None
        img.thumbnail((size, size))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=85)
        self.thumb_dir.mkdir(exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.thumb_dir, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(buf.getvalue())
        os.replace(tmp, path)
        return buf.getvalue()


def serve(engine: Engine, config: ServerConfig, ready=None, verbose: bool = False) -> None:
    """Serve until interrupted. Writes SERVER_FILE into the index so `alignsearch query` finds the
    warm server, and removes it on the way out. ready(server) is called once listening."""
    _ = engine.encoder  # load the model now, not on the first request
    server = AlignSearchServer(engine, config, verbose)
    host = config.host if config.host not in ("0.0.0.0", "::") else "127.0.0.1"
    record = engine.dir / SERVER_FILE
    fd = os.open(record, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it may hold the token
    with os.fdopen(fd, "w") as f:
        json.dump({"url": f"http://{host}:{server.server_address[1]}", "pid": os.getpid(), "token": config.token}, f)
    try:
        if ready:
            ready(server)
        server.serve_forever()
    finally:
        server.server_close()
        record.unlink(missing_ok=True)
