"""The CLI's side of the warm server: send a query to `alignsearch serve` when it runs for this index."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.parse import urlencode
from urllib.request import Request, urlopen

from alignsearch.errors import BadInputError
from alignsearch.paths import SERVER_FILE


def _running(index_dir: Path) -> dict | None:
    try:
        record = json.loads((index_dir / SERVER_FILE).read_text())
        os.kill(record["pid"], 0)  # is that process alive?
        return record
    except (OSError, ValueError, KeyError):
        return None


def search_via_server(index_dir: Path, fields: dict, image: str | None, timeout: float = 30.0) -> dict | None:
    """The server's JSON answer, or None when no server runs for this index (the caller then loads
    the engine itself). A query the server rejects raises BadInputError with its message."""
    record = _running(index_dir)
    if record is None:
        return None
    fields = {k: str(v) for k, v in fields.items() if v is not None}
    headers = {"Authorization": f"Bearer {record['token']}"} if record.get("token") else {}
    if image is None:
        request = Request(f"{record['url']}/api/search?{urlencode(fields)}", headers=headers)
    else:
        boundary = uuid.uuid4().hex
        parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields.items()]
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="query"\r\n'
                     "Content-Type: application/octet-stream\r\n\r\n".encode() + Path(image).read_bytes() + b"\r\n")
        body = b"".join(parts) + f"--{boundary}--\r\n".encode()
        headers["Content-Type"] = f"multipart/form-data; boundary={boundary}"
        request = Request(f"{record['url']}/api/search", data=body, headers=headers, method="POST")
    try:
        with urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except HTTPError as exc:
        if 400 <= exc.code < 500:
            raise BadInputError(json.loads(exc.read() or b"{}").get("error", str(exc))) from None
        return None
    except (URLError, OSError, ValueError):
        return None
