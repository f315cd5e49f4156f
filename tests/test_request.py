"""One search request (alignsearch/search/request.py): built and checked once, carried whole to the engine and,
from the CLI, to a warm server (every query form it can answer, image queries included); GET and POST
/api/search take the same parameters, from one model. Also: auto mode's keyword evidence is decided in the
SQL, before its limit."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import alignsearch
from alignsearch.errors import UsageError
from alignsearch.search import request as search_request
from alignsearch.storage import catalog, keywords
from alignsearch.storage.paths import ANN_FILE, DB_FILE, SERVER_FILE
from conftest import index_json, make_images
from helpers import call, fake_server_record, served_with_local_copy, stop, vector_index


# -- the request: one check ------------------------------------------------------------------------------------------


def test_build_parses_where_once_and_checks_every_option():
    req = search_request.build(text="red car", where="camera ~ canon", after="2019-01-01", media="photo", k=5)
    assert req.node is not None and req.filters.where == "camera ~ canon" and req.k == 5
    with pytest.raises(UsageError):
        search_request.build(text="x", where="camera ~")
    with pytest.raises(UsageError):
        search_request.build(text="x", sort="size")
    with pytest.raises(UsageError):
        search_request.build(text="x", compose="median")
    with pytest.raises(UsageError):  # an option out of its range: exit 2, as click's ranges say
        search_request.build(text="x", k=5000)
    with pytest.raises(UsageError):
        search_request.build()  # nothing to search for: asked wrongly (exit 2), as the CLI always said


def test_similar_takes_no_text_negative_or_image():
    """similar=ID searches by a stored vector alone (the CLI's `similar` takes no text): a text given with it
    was ignored and echoed back as if searched; now refused, saying which, as a negative or an image is."""
    assert search_request.build(similar=3, tag="car", path="a/**").similar == 3
    for extra, word in (({"text": "red"}, "text"), ({"negative": "blue"}, "negative"), ({"image": b"x"}, "image")):
        with pytest.raises(UsageError, match=f"takes no {word}"):  # BadInputError before: exit 6, not 2
            search_request.build(similar=3, **extra)


def test_the_request_travels_whole_as_parameters():
    req = search_request.build(text="red car", negative="blue", k=7, nprobe=3, where="width > 10", near="1.0,2.0,3.0",
                               min_score=0.1, sort="-taken", mode="vector", collapse=True, explain=True,
                               compose="product", media="photo", per_video=2, text_weight=3.0, tag="car")
    params = search_request.to_params(req)
    again = search_request.build(text=params.pop("q"), **{k: _typed(k, v) for k, v in params.items()})
    assert again == req  # nothing lost on the way (the image travels as the form's file)


def _typed(name, value):
    if name in ("k", "nprobe", "per_video", "similar"):
        return int(value)
    if name in ("min_score", "text_weight", "image_weight", "negative_weight"):
        return float(value)
    if name in ("collapse", "explain"):
        return value == "true"
    return value


def test_get_and_post_take_exactly_the_same_parameters():
    """Both routes' parameters come from one model (the URL for GET; the URL or the form for POST), as the
    OpenAPI schema publishes them."""
    from unittest import mock

    from alignsearch.surfaces import server

    with mock.patch.object(server, "Library", lambda engine, config: mock.Mock()), \
            mock.patch.object(server, "EncoderQueue", lambda size: mock.Mock()):
        schema = server.create_app(mock.Mock(), server.ServerConfig(), "t").app.openapi()
    get = {p["name"] for p in schema["paths"]["/api/search"]["get"]["parameters"]}
    post = schema["paths"]["/api/search"]["post"]
    in_url = {p["name"] for p in post["parameters"]}
    body = post["requestBody"]["content"]["multipart/form-data"]["schema"]
    if "$ref" in body:
        body = schema["components"]["schemas"][body["$ref"].rsplit("/", 1)[1]]
    in_form = set(body["properties"]) - {"image"}
    assert get == in_url == in_form == set(server.SearchParams.model_fields)
    # every field of the request has its parameter (q: its text; the image: POST's file)
    named = {"q" if f == "text" else f for f in search_request.SearchRequest.__dataclass_fields__} - {"image", "node",
                                                                                                   "filters"}
    assert named | set(search_request.FILTER_NAMES) == get


# -- through the server ----------------------------------------------------------------------------------------------


def cli(ix, *args):
    env = {**os.environ, "ALIGNSEARCH_INDEX": str(ix)}
    return subprocess.run([sys.executable, "-m", "alignsearch", "query", *args], capture_output=True, text=True,
                          env=env, timeout=300)


@pytest.fixture(scope="module")
def served_index(tmp_path_factory, tiny_model):
    served = served_with_local_copy(tmp_path_factory.mktemp("request"), tiny_model, 12, "--verbose")
    yield served  # alone: the same index with no server record, searched locally
    stop(served["proc"])


@pytest.mark.slow
@pytest.mark.parametrize("args", [
    ["red car", "--where", "width >= 1", "-k", "4"],  # a filter
    ["red car", "--min-score", "-1", "--sort", "path", "--mode", "vector", "--nprobe", "1", "-k", "3"],
    ["red car", "--collapse", "--compose", "sum", "-k", "3"],
    ["--image", "IMAGE", "-k", "4"],  # an image: its bytes uploaded
    ["red car", "--image", "IMAGE", "--compose", "product", "-k", "3"],
    ["red car", "--explain", "-k", "3"],
])
def test_every_query_form_goes_through_the_server_with_the_local_answer(served_index, args):
    args = [str(served_index["corpus"] / "img004.jpg") if a == "IMAGE" else a for a in args]
    assert (served_index["ix"] / SERVER_FILE).exists()
    before = _searches(served_index)
    warm = cli(served_index["ix"], *args, "--json")
    assert warm.returncode == 0, warm.stderr
    assert "notice" not in warm.stderr, warm.stderr
    assert _searches(served_index) == before + 1  # the server answered it
    local = cli(served_index["alone"], *args, "--json")
    assert local.returncode == 0, local.stderr
    warm_out, local_out = json.loads(warm.stdout), json.loads(local.stdout)
    warm_plan, local_plan = warm_out.pop("plan", None), local_out.pop("plan", None)
    # the same hits (scores to float32 rounding: the server decodes an uploaded image from its bytes)
    assert [h["id"] for h in warm_out["results"]] == [h["id"] for h in local_out["results"]]
    assert np.allclose([h["score"] for h in warm_out["results"]], [h["score"] for h in local_out["results"]],
                       atol=1e-5)
    strip = [{k: v for k, v in h.items() if k not in ("score", "similarity", "parts", "path", "root")}
             for h in warm_out["results"]]
    assert strip == [{k: v for k, v in h.items() if k not in ("score", "similarity", "parts", "path", "root")}
                     for h in local_out["results"]]
    assert warm_out["query"] == local_out["query"]  # the CLI's echo, whoever answered
    if "--explain" in args:
        assert warm_plan["via"] == "server" and local_plan["via"] == "local"
        assert {k: v for k, v in warm_plan.items() if k not in ("via", "why_local", "encoder")} == \
            {k: v for k, v in local_plan.items() if k not in ("via", "why_local", "encoder")}


def _searches(served, path: str = "/api/search") -> int:
    """How many requests of path the server has logged (--verbose: uvicorn's access log on stderr)."""
    import fcntl
    import select

    stream = served["proc"].stderr
    seen = served.setdefault("log", [])
    fd = stream.fileno()
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
    try:
        import time

        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.2)
            if not ready:
                break
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            seen.append(chunk.decode(errors="replace"))
    finally:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags)
    return sum(line.count(path) for line in "".join(seen).splitlines() if '" 200' in line)


@pytest.mark.slow
def test_a_query_through_the_server_is_one_round_trip(served_index):
    """The query's own answer names the index it searched: no GET /api/info before each query."""
    before = _searches(served_index), _searches(served_index, "/api/info")
    for args in (["red car", "-k", "2"], ["--image", str(served_index["corpus"] / "img004.jpg"), "-k", "2"]):
        out = cli(served_index["ix"], *args, "--json")
        assert out.returncode == 0 and "notice" not in out.stderr, out.stderr
    assert (_searches(served_index), _searches(served_index, "/api/info")) == (before[0] + 2, before[1])
    status, headers, _ = call(served_index["url"], "/api/search?q=red+car&k=1")
    record = json.loads((served_index["ix"] / SERVER_FILE).read_text())
    assert status == 200 and headers["X-Alignsearch-Index"] == record["index_id"]
    assert record["search_params"] == json.loads(call(served_index["url"], "/api/info")[2])["search_params"]


@pytest.mark.slow
def test_a_model_given_searches_locally_and_the_plan_says_why(served_index, tiny_model):
    out = cli(served_index["ix"], "red car", "--explain", "--json", "--model", str(tiny_model), "--device", "cpu")
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)["plan"]
    assert plan["via"] == "local" and "--model" in plan["why_local"]


@pytest.mark.slow
def test_a_device_given_searches_locally_like_a_model(served_index):
    """--device says where the model runs: it was sent to the server, which ignores it, so `--device cuda` on a
    machine without a GPU exited 0 with a server running and 6 without one."""
    out = cli(served_index["ix"], "red car", "--explain", "--json", "--device", "cpu")
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)["plan"]
    assert plan["via"] == "local" and "--device" in plan["why_local"], plan
    out = cli(served_index["ix"], "red car", "--explain", "--json", "--device", "auto")  # auto: any place will do
    assert out.returncode == 0 and json.loads(out.stdout)["plan"]["via"] == "server", out.stderr


@pytest.mark.slow
def test_the_answer_echoes_what_it_did_and_a_plan_only_when_asked(served_index):
    status, _, body = call(served_index["url"], "/api/search?q=red+car&k=2")
    assert status == 200, body
    out = json.loads(body)
    assert out["query"] == {"text": "red car", "similar": None, "k": 2, "text_weight": 2.0, "image_weight": 1.0,
                            "negative_weight": 1.0, "negative": None, "tag": None, "min_score": None, "sort": "score",
                            "mode": "auto", "collapse": False, "compose": "auto"}  # as before the one model
    assert "plan" not in out
    status, _, body = call(served_index["url"], "/api/search?q=red+car&k=2&explain=true&nprobe=2")
    out = json.loads(body)
    assert status == 200 and out["query"]["explain"] is True and out["query"]["nprobe"] == 2
    assert out["plan"]["mode"] == "auto" and "encoder" in out["plan"]
    image = (served_index["corpus"] / "img004.jpg").read_bytes()
    boundary = "b0undary"
    form = (f'--{boundary}\r\nContent-Disposition: form-data; name="k"\r\n\r\n3\r\n--{boundary}\r\n'
            'Content-Disposition: form-data; name="image"; filename="q.jpg"\r\nContent-Type: image/jpeg\r\n\r\n'
            ).encode() + image + f"\r\n--{boundary}--\r\n".encode()
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    status, _, body = call(served_index["url"], "/api/search?where=width%3E%3D1", data=form, headers=headers)
    out = json.loads(body)
    assert status == 200 and out["query"]["image"] is True and out["query"]["where"] == "width>=1", body
    assert len(out["results"]) == 3
    status, _, body = call(served_index["url"], "/api/search?k=4", data=form, headers=headers)
    assert status == 400 and "k is 3 in the form and 4 in the URL" in json.loads(body)["error"]


@pytest.mark.slow
def test_a_query_through_the_server_imports_no_engine(served_index):
    """The CLI's way to a running server loads no model, index or catalog library (a cold query in a few
    tenths of a second instead of seconds): what -X importtime lists."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "alignsearch", "query", "red car", "--where",
                          "width >= 1", "--explain", "--index", str(served_index["ix"])],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "via=server" in out.stderr
    imported = {line.split("|")[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
    assert not {"numpy", "torch", "faiss", "sqlalchemy", "transformers", "onnxruntime", "PIL"} & imported


# -- auto mode's keyword evidence: in the SQL, before the limit -------------------------------------------------------


def _named_and_captioned(folder, named: int):
    """A synthetic index of named + 21 files: `named` whose file names say zanzibar (twice), one (the last)
    whose long caption says it once, so the names rank before it by bm25."""
    dim = 16
    vector_index(folder, named + 21, dim)
    (folder / ANN_FILE).unlink()  # no ANN index: the engine searches the committed vectors exactly
    db = catalog.connect(folder / DB_FILE)
    with db.begin() as conn:
        for i in range(1, named + 1):
            catalog.set_photo(conn, i, f"zanzibar/zanzibar_{i}.jpg", {})
        caption = "a long walk along the old harbour of stone town in the evening light, zanzibar " + "more " * 30
        catalog.set_photo(conn, named + 21, "p.jpg", {"caption": caption})
    return db, named + 21, dim


def test_keyword_evidence_is_filtered_before_the_limit(tmp_path):
    db, captioned, dim = _named_and_captioned(tmp_path / "ix", 150)
    query = keywords.parse("zanzibar", partial_last=True)
    with db.connect() as conn:
        ranked = [i for i, _ in keywords.search(conn, query, 100)]
        assert captioned not in ranked  # a hundred names first: the caption is past the limit
        assert [i for i, _ in keywords.search(conn, query, 100, evidence_only=True)] == [captioned]
    db.dispose()


def test_auto_mode_fuses_a_caption_ranked_behind_a_hundred_file_names(tmp_path):
    db, captioned, dim = _named_and_captioned(tmp_path / "ix", 150)
    db.dispose()
    engine = alignsearch.open(tmp_path / "ix")
    vector = np.ones(dim, np.float32) / np.sqrt(dim)
    hits = engine.search_vector(vector, k=5, text="zanzibar", mode="auto")
    assert hits[0].id == captioned and hits[0].parts["keyword_rank"] == 1  # evidence found, fused
    engine.close()


@pytest.mark.slow
def test_a_stopped_server_is_not_waited_for(served_index):
    """A server held stopped (Ctrl-Z, SIGSTOP) still accepts connections in the kernel: without a look at its
    state a query waited out the 30 s search timeout. It searches locally at once and says why."""
    proc = served_index["proc"]
    proc.send_signal(signal.SIGSTOP)
    try:
        start = time.monotonic()
        out = cli(served_index["ix"], "red car", "-k", "2", "--json")
        took = time.monotonic() - start
    finally:
        proc.send_signal(signal.SIGCONT)
    assert out.returncode == 0 and "is stopped" in out.stderr and "searching locally" in out.stderr, out.stderr
    assert len(json.loads(out.stdout)["results"]) == 2
    assert took < 25, took  # a local search of a tiny index; the search timeout is 30 s
    assert cli(served_index["ix"], "red car", "-k", "2", "--json").stderr.count("notice") == 0  # served again


@pytest.mark.slow
def test_a_hung_server_is_given_up_on_within_seconds(tmp_path):
    """A server alive and not stopped, but hung (its event loop stuck): the kernel still completes every
    connection, so silence is all a query hears. The query asks /healthz once it has waited PROBE_EVERY; no
    answer there either, and it searches locally within seconds (the previous client waited the whole 30 s
    search timeout)."""
    import socket

    from alignsearch.surfaces import client

    ix = tmp_path / "ix"
    vector_index(ix, 3, 8)
    hung = socket.socket()  # listens, never accepts: connections complete, nothing is ever read or answered
    hung.bind(("127.0.0.1", 0))
    hung.listen(8)
    port = hung.getsockname()[1]
    fake_server_record(ix, port)
    notes: list[str] = []
    start = time.monotonic()
    try:
        routed = client.search_via_server(ix, search_request.build(text="a dog", k=3), notice=notes.append)
    finally:
        hung.close()
    took = time.monotonic() - start
    assert routed.answer is None and "not answering" in routed.why_local, routed
    assert len(notes) == 1 and "/healthz did not answer" in notes[0] and "searching locally" in notes[0], notes
    limit = client.PROBE_EVERY + client.CONTACT_TIMEOUT + 3
    assert took < limit, took


@pytest.mark.slow
def test_a_slow_search_on_a_live_server_is_waited_for(prebuilt, tiny_model):
    """The other side of the probe: a server that is searching (its answer slower than PROBE_EVERY) answers
    /healthz meanwhile, and the query takes its answer rather than searching again locally."""
    from alignsearch.surfaces import client
    from alignsearch.surfaces.server import ServerConfig, start_in_thread

    def build(base):
        index_json(base / "ix", make_images(base / "photos", 4)[0].parent, "--model", tiny_model, "--device", "cpu")

    base, _ = prebuilt.folder("indexed-images-4", build)
    ix = base / "ix"
    engine = alignsearch.open(ix, device="cpu")
    real_parts = engine.parts_of

    def slow_parts(*args, **kwargs):  # the query's encoding, on the server's encoder thread
        time.sleep(1.5)
        return real_parts(*args, **kwargs)

    engine.parts_of = slow_parts
    server = start_in_thread(engine, ServerConfig(port=0))
    notes: list[str] = []
    try:
        start = time.monotonic()
        routed = client.search_via_server(ix, search_request.build(text="red car", k=2), notice=notes.append,
                                          probe_every=0.3)
        took = time.monotonic() - start
    finally:
        server.shutdown()
        engine.close()
    assert notes == [] and routed.answer is not None and len(routed.answer["results"]) == 2, (notes, routed)
    assert took >= 1.5, took  # it did wait through several probes


def test_a_flag_or_a_score_of_the_wrong_type_is_refused():
    """Engine.search(collapse="no") folded duplicates (any non-empty string is true) and min_score=True cut at
    1.0, where k=True and nprobe=True are refused: an option of the wrong type is a UsageError (README)."""
    for bad in ({"collapse": "no"}, {"collapse": "false"}, {"explain": "no"}, {"collapse": None},
                {"min_score": True}, {"min_score": False}):
        with pytest.raises(UsageError):
            search_request.build(text="x", **bad)
    assert search_request.build(text="x", collapse=np.bool_(True), explain=False, min_score=np.float32(0.5)).collapse
