"""The CLI's side of the warm server: send a query to `alignsearch serve` when it runs for this index.

The server record (.alignsearch/server.json, mode 0600) names the process, the host it was written on,
the address, the token and the index id. A record is used only when it was written on this host, its
process is alive, and the server it names proves on contact (GET /api/info with the token) that it
serves this very index: the same index id, in the same directory. Otherwise the caller searches
locally, after one `notice:` line saying why (a copied index, a server killed with -9, a record from
another machine...).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.error import HTTPError, URLError
from urllib.parse import urlencode
from urllib.request import ProxyHandler, Request, build_opener

from alignsearch.errors import BadInputError
from alignsearch.search.request import SearchRequest, to_params
from alignsearch.storage.paths import DB_FILE, SERVER_FILE, private_record

CONTACT_TIMEOUT = 2.0
# The server is on this machine: never through a proxy. urlopen honours http_proxy even for 127.0.0.1
# (no_proxy is rarely set), and the proxy would receive the token and the query.
_OPENER = build_opener(ProxyHandler({}))


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def local_index_id(index_dir: Path) -> str | None:
    """This index's id (catalog.index_id), read without writing to the catalog; with the standard library's
    sqlite3 (state.peek), not SQLAlchemy: a query answered by the server should not pay for importing it."""
    from alignsearch.storage import state

    found = state.peek(Path(index_dir) / DB_FILE, "index_id")
    return None if found is None else found.index_id


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _remove_stale(path: Path, record: dict) -> bool:
    """Remove the record of a server whose process is gone (killed with -9, a crash), so the notice is said
    once, not on every query. Only while the file still holds that very record (a server started since wrote
    its own) and its process is still gone; an index this user cannot write keeps it. True when removed."""
    try:
        if json.loads(path.read_text()) != record or _alive(int(record["pid"])):
            return False
        path.unlink()
        return True
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _same_dir(a: str, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _request(record: dict, path: str, data: bytes | None = None, headers: dict | None = None, timeout: float = 30.0):
    headers = dict(headers or {})
    if record.get("token"):
        headers["Authorization"] = f"Bearer {record['token']}"
    request = Request(f"{record['url']}{path}", data=data, headers=headers, method="POST" if data is not None else "GET")
    with _OPENER.open(request, timeout=timeout) as response:
        return json.loads(response.read())


def verified_server(index_dir: Path, notice: Callable[[str], None] = _stderr) -> dict | None:
    """The record of a server that proves it serves index_dir, or None (with a notice when a record was
    there but could not be used). The index's own record first, then this user's private one (written by
    `serve` for an index it may not write: read-only, or another user's)."""
    for path in (index_dir / SERVER_FILE, private_record(index_dir)):
        record = _verified(index_dir, path, notice)
        if record is not None:
            return record
    return None


def _verified(index_dir: Path, path: Path, notice: Callable[[str], None]) -> dict | None:
    try:
        record = json.loads(path.read_text())
        pid, url = int(record["pid"]), str(record["url"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        notice(f"notice: ignoring the unreadable server record {path}; searching locally")
        return None
    if record.get("hostname") != socket.gethostname():
        notice(f"notice: the server record {path} was written on another host ({record.get('hostname')}); "
               "searching locally")
        return None
    if not _alive(pid):
        removed = _remove_stale(path, record)
        notice(f"notice: the server recorded in {path} is not running (process {pid} is gone); searching locally"
               + ("; the stale record was removed" if removed else ""))
        return None
    try:
        info = _request(record, "/api/info", timeout=CONTACT_TIMEOUT)
    except (HTTPError, URLError, OSError, ValueError) as exc:
        notice(f"notice: the server at {url} did not answer ({getattr(exc, 'code', None) or exc}); searching locally")
        return None
    if info.get("index_id") != local_index_id(index_dir) or not _same_dir(str(info.get("index_dir")), index_dir):
        notice(f"notice: the server at {url} serves another index ({info.get('index_dir')}), not {index_dir} "
               "(a copy?); searching locally")
        return None
    record = {**record, "search_params": info.get("search_params")}  # what its /api/search takes
    return record


# What GET /api/search took before servers listed their parameters in /api/info.
OLDEST_PARAMS = ("q", "similar", "k", "negative", "text_weight", "image_weight", "negative_weight", "tag", "where",
                 "after", "before", "camera", "near", "path", "format", "min_score", "sort", "mode", "collapse",
                 "compose", "media", "per_video")


@dataclass(frozen=True)
class Routed:
    """A query sent to the warm server: its JSON answer, or None and why the caller searches locally."""

    answer: dict | None
    why_local: str | None = None


def search_via_server(index_dir: Path, request: SearchRequest, timeout: float = 30.0,
                      notice: Callable[[str], None] = _stderr) -> Routed:
    """The request, whole, to a verified server for this index: GET /api/search with its parameters, or with
    an image POST /api/search with the image's bytes as the form's file and the parameters in the URL. No
    answer (Routed.answer None) when no verified server runs or it cannot take the request; the caller then
    loads the engine itself. A query the server rejects raises BadInputError with its message."""
    record = verified_server(index_dir, notice)
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
    try:
        if request.image is None:
            return Routed(_request(record, f"/api/search?{urlencode(params)}", timeout=timeout))
        image = request.image if isinstance(request.image, (bytes, bytearray)) else Path(request.image).read_bytes()
        boundary = uuid.uuid4().hex
        body = (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="query"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n").encode() + bytes(image) + f"\r\n--{boundary}--\r\n".encode()
        return Routed(_request(record, f"/api/search?{urlencode(params)}", body,
                               {"Content-Type": f"multipart/form-data; boundary={boundary}"}, timeout))
    except HTTPError as exc:
        if 400 <= exc.code < 500 and exc.code not in (401, 408, 429):
            raise BadInputError(json.loads(exc.read() or b"{}").get("error", str(exc))) from None
        notice(f"notice: the server at {record['url']} answered {exc.code}; searching locally")
        return Routed(None, f"the server answered {exc.code}")
    except (URLError, OSError, ValueError) as exc:
        notice(f"notice: the server at {record['url']} failed ({exc}); searching locally")
        return Routed(None, f"the server failed ({exc})")
