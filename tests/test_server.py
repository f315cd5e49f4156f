"""`alignsearch serve` over a real socket: API, images by id, thumbnails, bad requests, token, concurrency."""

import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.error import HTTPError

import pytest
from click.testing import CliRunner
from PIL import Image

from alignsearch.cli import main
from alignsearch.server import SERVER_FILE, ApiError, ServerConfig, search_params, thumb_size


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model):
    """A real `alignsearch serve` process on a free port, with a token."""
    from conftest import make_images

    base = tmp_path_factory.mktemp("served")
    corpus = base / "corpus"
    make_images(corpus, 12)
    (corpus / "broken.jpg").write_bytes(b"nope")
    ix = base / "ix"
    result = CliRunner().invoke(main, ["index", str(corpus), "--index", str(ix), "--model", str(tiny_model), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "alignsearch", "serve", "--index", str(ix), "--port", str(port),
                             "--token", "s3cret", "--device", "cpu"], stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            urllib.request.urlopen(url + "/healthz", timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail("server did not start: " + proc.stderr.read())
    yield {"url": url, "ix": ix, "corpus": corpus, "proc": proc}
    proc.terminate()
    proc.wait(timeout=10)


def call(url, path, token="s3cret", data=None, headers=None, method=None):
    headers = dict(headers or {})
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url + path, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, r.headers, r.read()
    except HTTPError as exc:
        return exc.code, exc.headers, exc.read()


def multipart(fields: dict, image: bytes | None):
    boundary = uuid.uuid4().hex
    body = b""
    for k, v in fields.items():
        body += f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
    if image is not None:
        body += (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="q.png"\r\n'
                 "Content-Type: image/png\r\n\r\n").encode() + image + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def test_search_info_health_and_json_shape(served):
    status, _, body = call(served["url"], "/api/search?q=red+car&k=5")
    assert status == 200
    out = json.loads(body)
    assert out["query"]["q"] == "red car" and len(out["results"]) == 5
    assert {"id", "path", "score", "width", "height"} <= set(out["results"][0])
    info = json.loads(call(served["url"], "/api/info")[2])
    assert info["images"] == 12 and info["failed"] == 1
    assert json.loads(call(served["url"], "/healthz", token=None)[2]) == {"ok": True}


def test_image_and_compound_queries_by_upload(served):
    target = served["corpus"] / "img004.jpg"
    body, headers = multipart({"k": 3}, target.read_bytes())
    status, _, raw = call(served["url"], "/api/search", data=body, headers=headers)
    assert status == 200
    assert json.loads(raw)["results"][0]["path"] == str(target)
    body, headers = multipart({"k": 3, "q": "at night", "text_weight": 0.5}, target.read_bytes())
    assert len(json.loads(call(served["url"], "/api/search", data=body, headers=headers)[2])["results"]) == 3


def test_similar_by_id(served):
    first = json.loads(call(served["url"], "/api/search?q=dog&k=1")[2])["results"][0]
    similar = json.loads(call(served["url"], f"/api/search?similar={first['id']}&k=2")[2])["results"]
    assert similar[0]["id"] == first["id"]


def test_images_by_id_and_cached_thumbnails(served):
    hit = json.loads(call(served["url"], "/api/search?q=dog&k=1")[2])["results"][0]
    status, headers, data = call(served["url"], f"/api/image/{hit['id']}")
    assert status == 200 and data == Path(hit["path"]).read_bytes()
    assert headers["Content-Type"] in ("image/jpeg", "image/png")
    status, headers, data = call(served["url"], f"/api/image/{hit['id']}?size=100")
    assert status == 200 and headers["Content-Type"] == "image/jpeg"
    thumb = Image.open(io.BytesIO(data))
    assert max(thumb.size) <= 128
    assert (served["ix"] / "thumbs" / f"{hit['id']}-128.jpg").exists()


@pytest.mark.parametrize("path,code", [
    ("/api/search", 400),  # no query
    ("/api/search?q=x&k=abc", 400),
    ("/api/search?q=x&k=-1", 400),
    ("/api/search?q=x&k=100000", 400),
    ("/api/search?q=x&text_weight=nan", 400),
    ("/api/search?similar=999999", 404),
    ("/api/image/999999", 404),
    ("/api/image/../../etc/passwd", 404),
    ("/api/image/%2e%2e%2fcatalog.db", 404),
    ("/static/../catalog.db", 404),
    ("/static/%2e%2e/server.py", 404),
    ("/api/image/1?size=0", 400),
    ("/nothing/here", 404),
])
def test_bad_requests_get_4xx_json(served, path, code):
    status, headers, body = call(served["url"], path)
    assert status == code, body
    assert headers["Content-Type"] == "application/json" and "error" in json.loads(body)


def test_bad_uploads(served):
    body, headers = multipart({"k": 3}, b"not an image at all")
    status, _, raw = call(served["url"], "/api/search", data=body, headers=headers)
    assert status == 400 and "unreadable image" in json.loads(raw)["error"]
    status, _, _ = call(served["url"], "/api/search", data=b"plain", headers={"Content-Type": "text/plain"})
    assert status == 415
    # an oversized upload is refused from its Content-Length, before the body is read
    import http.client

    conn = http.client.HTTPConnection(served["url"].removeprefix("http://"), timeout=10)
    conn.putrequest("POST", "/api/search")
    for k, v in {"Authorization": "Bearer s3cret", "Content-Type": "multipart/form-data; boundary=x",
                 "Content-Length": str(21 * 1024 * 1024)}.items():
        conn.putheader(k, v)
    conn.endheaders()
    conn.send(b"--x\r\n" + b"x" * 1024)
    response = conn.getresponse()
    assert response.status == 413 and "exceeds the limit" in json.loads(response.read())["error"]
    conn.close()
    from test_bad_files import png_bomb

    body, headers = multipart({}, png_bomb(40_000, 40_000))
    status, _, raw = call(served["url"], "/api/search", data=body, headers=headers)
    assert status == 400 and "too large" in json.loads(raw)["error"]
    assert call(served["url"], "/api/search", method="DELETE")[0] == 405


def test_token_is_required(served):
    assert call(served["url"], "/api/search?q=x", token=None)[0] == 401
    assert call(served["url"], "/api/search?q=x", token="wrong")[0] == 401
    assert call(served["url"], "/api/search?q=x&token=s3cret", token=None)[0] == 200
    assert call(served["url"], "/", token=None)[0] == 200  # the page itself loads, then asks with the token


def test_concurrent_clients_get_correct_answers(served):
    paths = sorted(p for p in served["corpus"].glob("*.jpg") if p.name != "broken.jpg")

    def one(path):
        body, headers = multipart({"k": 1}, path.read_bytes())
        answer = json.loads(call(served["url"], "/api/search", data=body, headers=headers)[2])
        assert "results" in answer, answer
        return answer["results"][0]["path"]

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, paths * 3))
    assert answers == [str(p) for p in paths * 3]


def test_cli_query_goes_through_the_warm_server(served):
    record = json.loads((served["ix"] / SERVER_FILE).read_text())
    assert record["pid"] == served["proc"].pid
    assert oct(os.stat(served["ix"] / SERVER_FILE).st_mode & 0o777) == "0o600"
    env = {**os.environ, "ALIGNSEARCH_INDEX": str(served["ix"])}
    warm = subprocess.run([sys.executable, "-m", "alignsearch", "query", "red car", "-k", "4", "--json"],
                          capture_output=True, text=True, env=env)
    assert warm.returncode == 0, warm.stderr
    assert "torch" not in subprocess.run(  # answering through the server never imports the model
        [sys.executable, "-X", "importtime", "-m", "alignsearch", "query", "red car", "-k", "1"],
        capture_output=True, text=True, env=env).stderr.split("alignsearch.cli")[-1]
    local = CliRunner().invoke(main, ["query", "red car", "-k", "4", "--json", "--index", str(served["ix"]), "--nprobe", "1"])
    assert json.loads(warm.stdout) == json.loads(local.output)  # same output, whichever answered


def test_server_picks_up_a_rebuilt_index(served, tiny_model):
    from conftest import make_images

    make_images(served["corpus"] / "more", 3, seed=8)
    result = CliRunner().invoke(main, ["index", "--index", str(served["ix"])])
    assert result.exit_code == 0, result.output
    out = json.loads(call(served["url"], "/api/search?q=x&k=1000")[2])
    assert len(out["results"]) == 15


def test_params_and_sizes_are_pure_functions():
    assert search_params({"k": "5"}, 10)["k"] == 5
    with pytest.raises(ApiError, match="between 1 and 10"):
        search_params({"k": "11"}, 10)
    assert [thumb_size(n) for n in (1, 64, 65, 300, 5000)] == [64, 64, 128, 512, 1024]
    assert ServerConfig().host == "127.0.0.1"  # loopback unless asked
