"""`alignsearch serve`: one warm engine behind a JSON API and a web page, on FastAPI and uvicorn.

Closed by default: only requests whose Host header names the bound address (or a name given with
--allow-host) are answered, which defeats DNS rebinding, and every API call needs the per-start token,
sent as `Authorization: Bearer TOKEN` or as the HttpOnly SameSite=Strict cookie the page gets when it
is opened from the URL `serve` prints. Request bodies are capped while they stream (the framework's
body limit counts chunked bodies too) and multipart forms are capped in fields, files and field size.
Query arguments are checked by alignsearch.querycheck, the rules the CLI and Engine.search use.

Encoding runs on one worker thread fed by a bounded queue (full: 503), so a burst of text or image
queries waits in line without holding a thread each; searches by stored vector, images and
thumbnails run on the framework's thread pool and never wait for the encoder. Files are served only
while the catalog row still describes them: a regular file, opened without following a symlink,
whose size and mtime equal the catalog's.
"""

import asyncio
import atexit
import dataclasses
import errno
import hmac
import io
import json
import logging
import os
import queue
import secrets
import socket
import stat
import threading
import typing
from collections import OrderedDict
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Literal
from urllib.parse import urlencode

from fastapi import Depends, FastAPI, File, Form, Path as PathParam, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from fastapi.security import APIKeyCookie, HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, create_model
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

import alignsearch
from alignsearch import catalog, filters, querycheck, sources
from alignsearch import engine as engine_module
from alignsearch.atomic import write_bytes
from alignsearch.engine import Engine
from alignsearch.errors import AlignSearchError, BadImageError, BadInputError
from alignsearch.images import open_rgb
from alignsearch.paths import SERVER_FILE

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


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers


def is_loopback(host: str) -> bool:
    return host.strip("[]").lower() in LOOPBACK or host.startswith("127.")


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
    if is_loopback(config.host) or config.host in WILDCARD:
        names |= LOOPBACK
    return frozenset(names - WILDCARD)


def host_name(header: str) -> str:
    """The name in a Host header, without port or IPv6 brackets: `[::1]:80` -> `::1`, `Example.:80` -> `example`."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return (header.rsplit(":", 1)[0] if header.count(":") == 1 else header).rstrip(".")


def thumb_size(requested: int) -> int:
    """The cached size to serve: the smallest standard size at least as large as asked."""
    return next((s for s in THUMB_SIZES if s >= requested), THUMB_SIZES[-1])


def cookie_name(port: int) -> str:
    """One cookie per port: cookies ignore ports, and two servers on one machine must not share one."""
    return f"alignsearch-token-{port}"


class HostCheck:
    """ASGI middleware: a request whose Host header is not one of ours gets 400 (DNS rebinding), and every
    response gets a few security headers. TrustedHostMiddleware's rule, with IPv6 literals understood."""

    def __init__(self, app, hosts: frozenset[str], too_large: str = "the request body is too large"):
        self.app, self.hosts = app, hosts
        self.too_large = json.dumps({"error": too_large}).encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        host = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), "")
        if host_name(host) not in self.hosts:
            body = json.dumps({"error": f"this server does not answer for Host {host!r}: start it with "
                                        "--allow-host NAME to reach it by another name"}).encode()
            await send({"type": "http.response.start", "status": 400,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                    (b"connection", b"close"), *SECURITY_HEADERS]})
            return await send({"type": "http.response.body", "body": body})

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
                message = {**message, "body": self.too_large, "more_body": False}
            await send(message)

        return await self.app(scope, receive, secured)


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


def _changed(what: str) -> ApiError:
    return ApiError(409, f"the file {what} since it was indexed: re-run alignsearch index")


def read_regular(path: str, size: int, mtime: float, read: bool = True) -> bytes | None:
    """The bytes of path when it is still the file the catalog describes: opened without following a
    symlink (O_NOFOLLOW) nor blocking on a FIFO, then checked on the open descriptor: a regular file of
    that size and mtime. read=False checks only (for a cached thumbnail)."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise ApiError(404, "the file is gone from its source: re-run alignsearch index") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _changed("became a symbolic link") from None
        raise ApiError(404, f"cannot open the file: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _changed("is no longer a regular file")
        if st.st_size != size or st.st_mtime != mtime:
            raise _changed("changed")
        return f.read() if read else None


class Library:
    """The engine and the files behind it, as the endpoints use them (blocking: called on worker threads)."""

    def __init__(self, engine: Engine, config: ServerConfig):
        self.engine, self.config = engine, config
        self.thumb_dir = engine.dir / "thumbs"
        with engine.db.connect() as conn:
            self.index_id = catalog.index_id(conn)
        self._refresh_lock = threading.Lock()
        self._tar_members: OrderedDict[str, dict[str, tuple[int, int]]] = OrderedDict()
        self._members_lock = threading.Lock()

    def fresh(self) -> Engine:
        """The engine, after picking up an index rebuilt since the last request."""
        with self._refresh_lock:
            self.engine.refresh()
        return self.engine

    def info(self) -> dict[str, Any]:
        return {**self.fresh().info(), "index_id": self.index_id}

    def search_vector(self, vector, args: dict, narrowing: dict | None = None, leave_out: int | None = None) -> list[dict]:
        """leave_out: an indexed image's id, left out of its own results (similar=), before near duplicates are
        folded, as the CLI's `similar` does."""
        narrowing = dict(narrowing or {})
        if leave_out is None:
            hits = self.fresh().search_vector(vector, args["k"], tag=args["tag"], text=args.get("text"), **narrowing)
            return [h.to_dict() for h in hits]
        collapse, k = narrowing.pop("collapse", False), args["k"]
        wanted = min((k * 3 if collapse else k) + 1, querycheck.MAX_K)
        engine = self.fresh()
        hits = [h for h in engine.search_vector(vector, wanted, tag=args["tag"], text=args.get("text"), **narrowing)
                if h.id != leave_out]
        if collapse:
            from alignsearch.dupes import collapse_hits

            hits = collapse_hits(engine.db, hits, k)
        while len(hits) > k:  # the image was not among them (filtered out): drop the least similar, not the last
            hits.remove(min(hits, key=lambda h: h.score))
        return [h.to_dict() for h in hits]

    def vector_of(self, file_id: int):
        vector = self.fresh().vector_of(file_id)
        if vector is None:
            raise ApiError(404, f"no indexed image with id {file_id}")
        return vector

    def row(self, file_id: int) -> catalog.FileRow:
        row = self.engine.file(file_id)
        if row is None:
            raise ApiError(404, f"no indexed image with id {file_id}")
        return row

    def recent(self, offset: int, limit: int) -> dict[str, Any]:
        """Indexed images, newest (highest id) first, for the landing page."""
        from sqlalchemy import func, select

        files = catalog.files
        with self.engine.db.connect() as conn:
            total = conn.execute(select(func.count()).select_from(files).where(files.c.status == catalog.INDEXED)).scalar()
            query = (select(files).where(files.c.status == catalog.INDEXED).order_by(files.c.id.desc())
                     .offset(offset).limit(limit))
            rows = [catalog.FileRow(**r._mapping) for r in conn.execute(query)]
            ids = [r.id for r in rows]
            photos, labels = catalog.photos_of(conn, ids), catalog.labels_of(conn, ids)
        return {"total": int(total or 0), "offset": offset,
                "results": [_listed(r, photos.get(r.id), labels.get(r.id, [])) for r in rows]}

    def _local_path(self, row: catalog.FileRow) -> str | None:
        """The file on this machine behind a row, when there is one (a folder's file, a list's local entry)."""
        k = sources.kind(row.root)
        if k == sources.FOLDER or (k == sources.LIST and not sources.is_url(row.relpath)):
            return row.path
        return None

    def read(self, row: catalog.FileRow, check_only: bool = False) -> bytes | None:
        """An indexed image's bytes, when the source still matches its catalog row (else 404/409). A tar
        member is read at its offset, from its shard's member list read once and kept for the last
        TAR_SHARDS_KEPT shards (the catalog stores names, not offsets)."""
        path = self._local_path(row)
        if path is not None:
            return read_regular(path, row.size, row.mtime, read=not check_only)
        if sources.kind(row.root) != sources.TAR:
            return None if check_only else row.read()
        if not sources.is_url(row.root):
            try:
                if not stat.S_ISREG(os.stat(row.root).st_mode):
                    raise _changed("shard is no longer a regular file")
            except FileNotFoundError:
                raise ApiError(404, "the shard is gone: re-run alignsearch index") from None
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
        return sources.read_bytes(row.root, row.relpath, row.relpath_raw, offset, size)

    def original(self, file_id: int) -> tuple[bytes, str]:
        row = self.row(file_id)
        if row.format not in BROWSER_FORMATS:
            return self.thumbnail(file_id, THUMB_SIZES[-1]), "image/jpeg"
        try:
            return self.read(row), BROWSER_FORMATS[row.format]
        except (OSError, BadInputError) as exc:
            raise ApiError(404, f"the file is gone from its source: {exc}") from None

    def thumbnail(self, file_id: int, size: int) -> bytes:
        row = self.row(file_id)
        path = self.thumb_dir / f"{row.id}-{size}.jpg"
        try:
            if path.exists():
                self.read(row, check_only=True)  # a cached thumbnail of a file since replaced is not served
                return path.read_bytes()
            img, _ = open_rgb(self.read(row), self.config.max_upload_pixels)
        except (OSError, BadImageError, BadInputError) as exc:
            raise ApiError(404, f"cannot read the image: {exc}") from None
        img.thumbnail((size, size))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=85)
        self.thumb_dir.mkdir(exist_ok=True)
        write_bytes(path, buf.getvalue(), durable=False)  # a cache: losing it to a power cut costs a redraw
        return buf.getvalue()


def _listed(row: catalog.FileRow, photo: dict | None = None, labels: list[str] = ()) -> dict[str, Any]:
    """A listed image: a hit's fields (taken, camera, lens, GPS, caption, tags included) without a score."""
    out = engine_module._hit(row, 0.0, photo, labels).to_dict()
    out.pop("score")
    return out


def decode_upload(data: bytes, max_pixels: int):
    querycheck.check_image(data)
    try:
        return open_rgb(data, max_pixels)[0]
    except BadImageError as exc:
        raise ApiError(400, f"unreadable image: {exc}") from None


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


class SearchAnswer(BaseModel):
    query: dict[str, Any]
    results: list[Hit]

class RecentAnswer(BaseModel):
    total: int
    offset: int
    results: list[Listed]

class Error(BaseModel):
    model_config = ConfigDict(extra="allow")
    error: str


def create_app(engine: Engine, config: ServerConfig, token: str | None, lifespan=None):
    """The ASGI application: the API, the page and its assets, behind the Host check."""
    library = Library(engine, config)
    encoder = EncoderQueue(config.queue_size)
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
        description="Cross-modal image search over an indexed library. Every /api call needs the server's token: "
                    "`Authorization: Bearer TOKEN` or the cookie set by opening the URL `alignsearch serve` prints.",
        max_body_size=config.max_upload_bytes,
        form_limits={"max_fields": FORM_FIELDS, "max_files": 1, "max_part_size": FORM_FIELD_BYTES},
    )

    def error(status: int, message: str, headers: dict | None = None, **extra) -> JSONResponse:
        return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return error(exc.status, str(exc), exc.headers)

    @app.exception_handler(AlignSearchError)
    async def _bad_input(request, exc: AlignSearchError):
        return error(400, str(exc))

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

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return error(500, "internal error")

    errors = {code: {"model": Error} for code in (400, 401, 404, 409, 413, 415, 422, 503)}
    k_param = Query(ge=1, le=querycheck.MAX_K, description="number of results")
    weight = dict(ge=-querycheck.MAX_WEIGHT, le=querycheck.MAX_WEIGHT, allow_inf_nan=False)
    id_param = dict(ge=1, le=querycheck.MAX_ID)
    text_doc = f"at most {querycheck.MAX_TEXT_CHARS} characters"
    api = dict(dependencies=[Depends(authorise)], responses=errors)

    async def encode_and_search(args: dict, image=None, narrowing: dict | None = None) -> list[dict]:
        future = encoder.submit(library.engine.embed, args["text"], image, args["negative"], args["text_weight"],
                                args["image_weight"], args["negative_weight"])
        vector = await asyncio.wrap_future(future)
        return await run_in_threadpool(library.search_vector, vector, args, narrowing)

    def narrowing_of(where, after, before, camera, near, path, format, min_score, sort, mode, collapse) -> dict:  # noqa: A002
        """The filter, cutoff, sort, mode and collapse parameters (the names `query` and Engine.search use),
        checked here so a malformed one is a 400 before any encoding."""
        given = {"where": where, "after": after, "before": before, "camera": camera, "near": near, "path": path,
                 "format": format}
        filters.build(filters.FilterOptions(**given))
        return {**{n: v for n, v in given.items() if v is not None}, "min_score": min_score, "sort": sort,
                "mode": mode, "collapse": collapse}

    @app.get("/healthz", tags=["server"])
    async def healthz() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/api/info", tags=["server"], **api)
    async def info() -> dict[str, Any]:
        """What `alignsearch info --json` says, plus the index id (clients check it against their own)."""
        return await run_in_threadpool(library.info)

    @app.get("/api/search", response_model=SearchAnswer, tags=["search"], **api)
    async def search_get(
        q: Annotated[str | None, Query(description=text_doc)] = None,
        similar: Annotated[int | None, Query(description="an indexed image's id: images like it", **id_param)] = None,
        k: Annotated[int, k_param] = querycheck.DEFAULT_K,
        negative: Annotated[str | None, Query(description="text whose concept is subtracted")] = None,
        text_weight: Annotated[float, Query(**weight)] = 2.0,
        image_weight: Annotated[float, Query(**weight)] = 1.0,
        negative_weight: Annotated[float, Query(**weight)] = 1.0,
        tag: Annotated[str | None, Query(description="only images with this tag")] = None,
        where: Annotated[str | None, Query(description="a filter expression (README: the --where language)")] = None,
        after: Annotated[str | None, Query(description="taken on or after this ISO 8601 date")] = None,
        before: Annotated[str | None, Query(description="taken before this ISO 8601 date")] = None,
        camera: Annotated[str | None, Query(description="camera make or model contains this")] = None,
        near: Annotated[str | None, Query(description="LAT,LON,KM: taken within KM km")] = None,
        path: Annotated[str | None, Query(description="glob on the path under its root")] = None,
        format: Annotated[str | None, Query(description="image format")] = None,  # noqa: A002
        min_score: Annotated[float | None, Query(ge=-1, le=1)] = None,
        sort: Annotated[Literal["score", "taken", "-taken", "path"], Query()] = "score",
        mode: Annotated[Literal["auto", "vector", "keyword", "hybrid"], Query()] = "auto",
        collapse: Annotated[bool, Query(description="fold near duplicates into the better hit")] = False,
    ):
        """Search by text (q), by an indexed image (similar), with an optional negative text and tag, metadata
        filters, a cutoff, a sort and a mode (the names of `alignsearch query`'s options)."""
        args = querycheck.validate(text=q, k=k, negative=negative, text_weight=text_weight, image_weight=image_weight,
                                   negative_weight=negative_weight, tag=tag, by_vector=similar is not None)
        narrowing = narrowing_of(where, after, before, camera, near, path, format, min_score, sort, mode, collapse)
        if similar is not None:  # the image itself left out, as the CLI's `similar` does
            vector = await run_in_threadpool(library.vector_of, similar)
            results = await run_in_threadpool(library.search_vector, vector, {**args, "text": None},
                                              {**narrowing, "mode": "vector"}, similar)
        else:
            results = await encode_and_search(args, narrowing=narrowing)
        query = {"text": args["text"], "similar": similar, **{n: args[n] for n in ("k", "text_weight", "image_weight",
                                                                     "negative_weight", "negative", "tag")},
                 **narrowing}
        return {"query": query, "results": results}

    @app.post("/api/search", response_model=SearchAnswer, tags=["search"], **api)
    async def search_post(
        request: Request,
        image: Annotated[UploadFile | None, File(description="query image (20 MB at most)")] = None,
        q: Annotated[str | None, Form(description=text_doc)] = None,
        k: Annotated[int | None, Form(ge=1, le=querycheck.MAX_K)] = None,
        negative: Annotated[str | None, Form()] = None,
        text_weight: Annotated[float, Form(**weight)] = 2.0,
        image_weight: Annotated[float, Form(**weight)] = 1.0,
        negative_weight: Annotated[float, Form(**weight)] = 1.0,
        tag: Annotated[str | None, Form()] = None,
        where: Annotated[str | None, Query(description="a filter expression (README: the --where language)")] = None,
        after: Annotated[str | None, Query(description="taken on or after this ISO 8601 date")] = None,
        before: Annotated[str | None, Query(description="taken before this ISO 8601 date")] = None,
        camera: Annotated[str | None, Query(description="camera make or model contains this")] = None,
        near: Annotated[str | None, Query(description="LAT,LON,KM: taken within KM km")] = None,
        path: Annotated[str | None, Query(description="glob on the path under its root")] = None,
        format: Annotated[str | None, Query(description="image format")] = None,  # noqa: A002
        min_score: Annotated[float | None, Query(ge=-1, le=1)] = None,
        sort: Annotated[Literal["score", "taken", "-taken", "path"], Query()] = "score",
        mode: Annotated[Literal["auto", "vector", "keyword", "hybrid"], Query()] = "auto",
        collapse: Annotated[bool, Query(description="fold near duplicates into the better hit")] = False,
        k_in_url: Annotated[int | None, Query(alias="k", ge=1, le=querycheck.MAX_K,
                                              description="number of results, when the form has no k")] = None,
    ):
        """Search by an uploaded image, alone or with a text (multipart/form-data); filters, cutoff, sort, mode and
        collapse as query parameters of the URL, as for GET; k as a form field or in the URL."""
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise ApiError(415, "POST multipart/form-data with an 'image' file field (and q, k... fields)")
        if k is not None and k_in_url is not None and k != k_in_url:
            raise ApiError(400, f"k is {k} in the form and {k_in_url} in the URL: give one")
        k = next((v for v in (k, k_in_url) if v is not None), querycheck.DEFAULT_K)
        data = await image.read() if image is not None else None
        args = querycheck.validate(text=q or None, image=data, k=k, negative=negative, text_weight=text_weight,
                                   image_weight=image_weight, negative_weight=negative_weight, tag=tag)
        narrowing = narrowing_of(where, after, before, camera, near, path, format, min_score, sort, mode, collapse)
        pil = None if data is None else await run_in_threadpool(decode_upload, data, config.max_upload_pixels)
        results = await encode_and_search(args, pil, narrowing)
        query = {"text": args["text"], "image": data is not None, **{n: args[n] for n in (
            "k", "text_weight", "image_weight", "negative_weight", "negative", "tag")}, **narrowing}
        return {"query": query, "results": results}

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
        return Response(data, media_type=ctype, headers={"Cache-Control": "private, max-age=3600"})

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
        return f"{self.url}/?token={self.token}" if self.token else f"{self.url}/"

    def shutdown(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.stopped.wait(timeout)


def _listen(host: str, port: int) -> socket.socket:
    info = socket.getaddrinfo(None if host in WILDCARD else host, port, type=socket.SOCK_STREAM,
                              flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(info[0], socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(info[4])
        sock.listen(BACKLOG)  # now: a client that reads the server record may connect before the loop runs
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def write_record(index_dir: Path, record: dict) -> Path:
    path = index_dir / SERVER_FILE
    write_bytes(path, json.dumps(record).encode(), mode=0o600)  # 0600 from the start: it holds the token
    return path


def remove_record(path: Path, pid: int) -> None:
    """Remove the record if it is still this process's (a later server may have replaced it)."""
    try:
        if json.loads(path.read_text()).get("pid") == pid:
            path.unlink()
    except (OSError, ValueError, AttributeError):
        pass


def serve(engine: Engine, config: ServerConfig, ready: Callable[[RunningServer], None] | None = None,
          verbose: bool = False) -> None:
    """Serve until interrupted (SIGINT, SIGTERM) or shut down through the RunningServer handed to ready().
    Writes SERVER_FILE into the index (mode 0600: pid, host, port, token, index id) so `alignsearch query`
    finds and checks the warm server, and removes it on the way out."""
    import uvicorn

    token = resolve_token(config)
    sock = _listen(config.host, config.port)  # first: a busy port is said at once, not after loading the model
    _ = engine.encoder  # load the model now, not on the first request
    port = sock.getsockname()[1]
    shown = "127.0.0.1" if config.host in WILDCARD else config.host
    url = f"http://{f'[{shown}]' if ':' in shown else shown}:{port}"
    config = ServerConfig(**{**config.__dict__, "port": port})
    record_path, pid = engine.dir / SERVER_FILE, os.getpid()
    handle: RunningServer | None = None

    @asynccontextmanager
    async def lifespan(app):
        with engine.db.connect() as conn:
            index_id = catalog.index_id(conn)
        write_record(engine.dir, {"pid": pid, "hostname": socket.gethostname(), "host": shown, "port": port,
                                  "url": url, "token": token, "index_id": index_id,
                                  "index_dir": str(engine.dir.resolve())})
        log.info("serving %s on %s", engine.dir, url)
        if ready:
            ready(handle)
        try:
            yield
        finally:
            remove_record(record_path, pid)  # before uvicorn re-raises SIGTERM, which ends the process

    app = create_app(engine, config, token, lifespan)
    server = uvicorn.Server(uvicorn.Config(
        app, lifespan="on", http="h11", ws="none", log_level="info" if verbose else "warning", access_log=verbose,
        server_header=False, timeout_keep_alive=5, backlog=BACKLOG, log_config=None,
    ))
    handle = RunningServer(url, port, token, server)
    atexit.register(remove_record, record_path, pid)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        remove_record(record_path, pid)
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
