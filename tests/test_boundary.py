"""Issue 26 step 6: logging configured once for every command (-v, -vv, ALIGNSEARCH_LOG), and one error
boundary: each error class's exit code for the CLI and HTTP status for the server, a JSON error body, and
never a traceback outside the debug log."""

import json
import logging
import shutil
import sqlite3

import pytest
from click.testing import CliRunner
from conftest import make_images, run
from helpers import alignsearch, call, start_serve, stop

from alignsearch import errors
from alignsearch.surfaces.cli import main


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, tiny_model):
    base = tmp_path_factory.mktemp("boundary")
    make_images(base / "photos", 6)
    run("index", base / "photos", "--index", base / "ix", "--model", tiny_model, "--device", "cpu")
    return base / "ix"


def damage_table(db, table: str) -> None:
    """Overwrite the root page of one catalog table: the catalog opens, reading that table fails."""
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        page = conn.execute("PRAGMA page_size").fetchone()[0]
        root = conn.execute("SELECT rootpage FROM sqlite_master WHERE type='table' AND name=?", (table,)).fetchone()[0]
    conn.close()
    with open(db, "r+b") as f:
        f.seek((root - 1) * page)
        f.write(b"\xa5" * page)


def test_level_for_flags_and_environment():
    from alignsearch import logs

    assert logs.level_for(0, None) == (logging.WARNING, None)
    assert logs.level_for(1, None) == (logging.INFO, None)
    assert logs.level_for(3, "") == (logging.DEBUG, None)
    assert logs.level_for(0, " Debug ") == (logging.DEBUG, None)
    assert logs.level_for(2, "error") == (logging.DEBUG, None)  # the more verbose wins
    assert logs.level_for(0, "error") == (logging.ERROR, None)
    level, problem = logs.level_for(1, "loud")
    assert level == logging.INFO and "ALIGNSEARCH_LOG='loud'" in problem


def test_every_error_class_carries_an_exit_code_and_an_http_status():
    expected = {errors.AlignSearchError: (1, 500), errors.IndexNotFoundError: (3, 404), errors.UsageError: (2, 400),
                errors.ModelLoadError: (4, 500), errors.ModelMismatchError: (5, 500), errors.BadInputError: (6, 400),
                errors.IndexDamagedError: (7, 500), errors.CatalogBusyError: (6, 503), errors.DiskFullError: (1, 507)}
    assert {cls: (cls.exit_code, cls.http_status) for cls in expected} == expected


@pytest.mark.slow
def test_cli_verbose_logs_on_stderr_only(indexed, tmp_path):
    out = tmp_path / "rows.parquet"
    quiet = alignsearch("export", out, "--index", indexed, "--json")
    assert quiet.returncode == 0, quiet.stderr
    assert "exported" not in quiet.stderr and "INFO" not in quiet.stderr
    for args, env in ((["-v"], {}), (["-vv"], {}), ([], {"ALIGNSEARCH_LOG": "debug"}), ([], {"ALIGNSEARCH_LOG": "INFO"})):
        loud = alignsearch(*args, "export", out, "--index", indexed, "--json", env=env)
        assert loud.returncode == 0, loud.stderr
        assert loud.stdout == quiet.stdout, (args, env)  # the output is the same: logs never go to stdout
        assert "INFO alignsearch.search.export: exported 6 rows" in loud.stderr.splitlines(), (args, env, loud.stderr)
        assert ("DEBUG " in loud.stderr) == (args == ["-vv"] or env.get("ALIGNSEARCH_LOG") == "debug"), loud.stderr


def test_an_unexpected_error_is_one_line_and_its_traceback_only_in_the_debug_log(monkeypatch):
    import alignsearch.search.engine

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(alignsearch.search.engine, "open", broken)
    try:
        plain = CliRunner().invoke(main, ["info"], catch_exceptions=False)
        assert plain.exit_code == 1
        assert plain.stderr.splitlines() == ["error: unexpected RuntimeError: boom (ALIGNSEARCH_DEBUG=1 shows the traceback)"]
        assert plain.stdout == ""
        debug = CliRunner().invoke(main, ["-vv", "info"], catch_exceptions=False)
        assert debug.exit_code == 1 and debug.stdout == ""
        assert "Traceback" in debug.stderr and 'raise RuntimeError("boom")' in debug.stderr
        assert debug.stderr.splitlines()[-1] == plain.stderr.splitlines()[-1]
    finally:
        logging.getLogger().setLevel(logging.WARNING)  # this process's level as a command without -v leaves it


@pytest.mark.slow
def test_a_damaged_catalog_under_the_server_is_a_5xx_json_error_without_traceback(indexed, tmp_path):
    ix = tmp_path / "ix"
    shutil.copytree(indexed, ix)
    damage_table(ix / "catalog.db", "photos")  # read per answer (the photo fields), not when the server starts
    proc, url = start_serve(ix, "--token", "t")
    try:
        status, headers, body = call(url, "/api/search?q=red&where=((", token="t")
        assert status == 400 and headers["Content-Type"] == "application/json", (status, body)
        assert json.loads(body)["kind"] == "UsageError" and "--where" in json.loads(body)["error"]
        for path in ("/api/search?q=red&k=3", "/api/recent"):
            status, headers, body = call(url, path, token="t")
            assert 500 <= status < 600 and headers["Content-Type"] == "application/json", (status, body[:300])
            answer = json.loads(body)
            assert answer["kind"] == "IndexDamagedError", answer  # the CLI's client raises it (exit 7)
            assert "damaged" in answer["error"] and "malformed" in answer["error"], answer
        assert call(url, "/api/info", token="t")[0] == 200  # still serving
    finally:
        stop(proc)
    stderr = proc.stderr.read()
    assert "Traceback" not in stderr, stderr[-3000:]
    assert "malformed" in stderr  # the 5xx answers are logged
    out = alignsearch("query", "red", "--index", ix, "--device", "cpu")
    assert out.returncode == 7 and "Traceback" not in out.stderr, out.stderr


@pytest.fixture(scope="module")
def in_thread(indexed):
    import alignsearch as api
    from alignsearch.surfaces.server import ServerConfig, start_in_thread

    engine = api.open(indexed, device="cpu")
    server = start_in_thread(engine, ServerConfig(port=0, no_token=True))
    yield engine, server.url
    server.shutdown()
    engine.close()


@pytest.mark.slow
@pytest.mark.parametrize("raised", [errors.IndexDamagedError("recent rows unreadable"),
                                    sqlite3.DatabaseError("database disk image is malformed: recent rows unreadable")])
def test_trouble_only_recent_meets_is_logged_once_while_searches_succeed(in_thread, monkeypatch, caplog, raised):
    """The once-per-state log of a 5xx was cleared only by a search answered: an error only /api/recent met was
    logged again after every search, each time with "searches are answered again" about an error no search met."""
    from alignsearch.surfaces import server as server_module

    _, url = in_thread

    def failing(*args, **kwargs):
        raise raised

    with caplog.at_level(logging.WARNING):
        with monkeypatch.context() as patched:
            patched.setattr(server_module.Library, "recent", failing)
            for _ in range(3):
                assert call(url, "/api/recent", token=None)[0] == 500
                assert call(url, "/api/search?q=red&k=3", token=None)[0] == 200
        assert call(url, "/api/recent", token=None)[0] == 200  # mended: its endpoint answers again
        assert call(url, "/api/recent", token=None)[0] == 200
    said = [(r.levelno, r.getMessage().split(":")[0]) for r in caplog.records if "recent rows" in r.getMessage()]
    assert said == [(logging.ERROR, "GET /api/recent"), (logging.WARNING, "/api/recent is answered again (before")], \
        caplog.text


def _locked():
    exc = sqlite3.OperationalError("database is locked")
    exc.sqlite_errorcode = 5  # SQLITE_BUSY, as the driver sets it
    return exc


@pytest.mark.slow
@pytest.mark.parametrize("raised, status, says", [
    (errors.BadInputError("nothing to search for"), 400, "nothing to search for"),
    (errors.UsageError("--where: bad"), 400, "--where: bad"),
    (errors.IndexNotFoundError("no index"), 404, "no index"),
    (errors.ModelLoadError("the model folder is gone"), 500, "the model folder is gone"),
    (errors.ModelMismatchError("another model"), 500, "another model"),
    (errors.IndexDamagedError("vectors.f16 is short"), 500, "the index is damaged: vectors.f16 is short"),
    (errors.CatalogBusyError("locked"), 503, "locked"),
    (errors.DiskFullError("the disk is full"), 507, "the disk is full"),
    (sqlite3.DatabaseError("database disk image is malformed"), 500, "the index is damaged: the index catalog cannot"),
    (_locked(), 503, "the index catalog stayed locked by another process"),
    (RuntimeError("boom"), 500, "internal error"),
])
def test_each_error_answers_its_status_with_the_json_error_body(in_thread, monkeypatch, caplog, raised, status, says):
    engine, url = in_thread

    def failing(*args, **kwargs):
        raise raised

    monkeypatch.setattr(engine, "parts_of", failing)
    with caplog.at_level(logging.DEBUG):
        got, headers, body = call(url, "/api/search?q=red&k=3", token=None)
    assert got == status and headers["Content-Type"] == "application/json", (got, body)
    answer = json.loads(body)
    assert answer["error"].startswith(says), answer
    # its kind (boundary.kind_of), which the CLI's client raises again or not: an unexpected error is the server's own
    kinds = {sqlite3.DatabaseError: "IndexDamagedError", sqlite3.OperationalError: "CatalogBusyError"}
    kind = type(raised).__name__ if isinstance(raised, errors.AlignSearchError) else \
        kinds.get(type(raised), "AlignSearchError")
    assert answer == {"error": answer["error"], "kind": kind}, answer
    # the traceback goes to the debug log only, never to the error log (nor the server's own)
    assert not [r for r in caplog.records if r.exc_info and r.levelno > logging.DEBUG], caplog.text
    if status >= 500:
        assert [r for r in caplog.records if r.levelno == logging.ERROR and "/api/search" in r.getMessage()]


@pytest.mark.slow
def test_an_index_folder_others_can_write_is_the_servers_trouble_logged_once(indexed, tmp_path):
    """`serve` whose index folder others could write (made 0777 while it runs) refused each search with 400, as if
    the query were at fault, and its log said nothing. Now each is a 500 naming the error's kind (what a damaged
    index is answered: the server cannot serve until the folder is mended), logged once, not once per request;
    once the folder is mended the searches are answered again and the log says so."""
    ix = tmp_path / "ix"
    shutil.copytree(indexed, ix)
    proc, url = start_serve(ix, "--token", "t")
    try:
        assert call(url, "/api/search?q=red&k=1", token="t")[0] == 200
        ix.chmod(0o777)
        answers = [call(url, "/api/search?q=red&k=1", token="t") for _ in range(3)]
        ix.chmod(0o755)
        assert call(url, "/api/search?q=red&k=1", token="t")[0] == 200
    finally:
        stop(proc)
    stderr = proc.stderr.read()
    for status, headers, body in answers:
        assert status == 500 and headers["Content-Type"] == "application/json", (status, body)
        answer = json.loads(body)
        assert answer["kind"] == "IndexUntrustedError", answer
        assert answer["error"].startswith(f"refusing the index {ix}: {ix} is writable by every user"), answer
    assert [line.split(":")[0] for line in stderr.splitlines() if "refusing the index" in line] == [
        "GET /api/search", "/api/search is answered again (before"], stderr[-3000:]


@pytest.mark.slow
def test_the_cli_through_the_server_fails_as_a_search_without_it_does(indexed, tmp_path):
    """`query` routed through a running server took every 4xx but a few for unusable input (exit 6), and every 5xx
    for "searching locally": a bad --where (exit 2 without the server) was exit 6, and a damaged catalog printed a
    notice and loaded the model to fail here. Now the server's answer names the error's kind and the CLI raises it:
    the same exit code and line as without a server, and no notice. A folder others could write is refused alike
    (the client does not ask the server then: test_trust)."""
    from alignsearch.storage.paths import SERVER_FILE

    ix, alone = tmp_path / "ix", tmp_path / "alone"
    shutil.copytree(indexed, ix)
    shutil.copytree(indexed, alone, ignore=shutil.ignore_patterns(SERVER_FILE, "thumbs"))
    bad_query = ("query", "red", "--where", "((")
    proc, url = start_serve(ix, "--token", "t")
    try:
        served = {"bad query": alignsearch(*bad_query, "--index", ix)}
        damage_table(ix / "catalog.db", "photos")  # read per answer: the server keeps running
        served["damaged"] = alignsearch("query", "red", "--index", ix)
        ix.chmod(0o777)
        served["refused"] = alignsearch("query", "red", "--index", ix)
        ix.chmod(0o755)
    finally:
        stop(proc)
    assert not (ix / SERVER_FILE).exists()  # from here on the same index is searched without a server
    here = {"bad query": alignsearch(*bad_query, "--index", alone), "damaged": alignsearch("query", "red", "--index", ix)}
    ix.chmod(0o777)
    here["refused"] = alignsearch("query", "red", "--index", ix)
    ix.chmod(0o755)
    assert [here[case].returncode for case in here] == [2, 7, 6], {case: here[case].stderr for case in here}
    for case in ("bad query", "damaged"):  # the error line alone, as without a server: no "searching locally"
        assert (served[case].returncode, served[case].stdout, served[case].stderr) == \
            (here[case].returncode, here[case].stdout, here[case].stderr), (case, served[case].stderr, here[case].stderr)
        assert len(here[case].stderr.splitlines()) == 1, (case, here[case].stderr)
    # the server is not asked of an index others could write: a notice says so (it is not read), then the same line
    assert served["refused"].returncode == 6, served["refused"].stderr
    assert served["refused"].stderr.splitlines()[-1] == here["refused"].stderr.splitlines()[-1], served["refused"].stderr


UNTRUSTED = "refusing the index /x: /x is writable by every user (another user may have written what it holds)"


@pytest.mark.parametrize("status,body,named,raised", [
    (400, {"error": "--where: the expression is empty", "kind": "UsageError"}, True,
     ("UsageError", "--where: the expression is empty")),
    (500, {"error": "the index is damaged: vectors.f16 fails its checksum", "kind": "IndexDamagedError"}, True,
     ("IndexDamagedError", "vectors.f16 fails its checksum")),
    (500, {"error": UNTRUSTED, "kind": "IndexUntrustedError"}, True, ("IndexUntrustedError", UNTRUSTED)),
    (400, {"error": "the text is empty"}, True, ("BadInputError", "the text is empty")),  # a server before kinds
    (503, {"error": "catalog.db is locked", "kind": "CatalogBusyError"}, True, None),  # busy now: searched here
    (500, {"error": "the model cannot be loaded", "kind": "ModelLoadError"}, True, None),  # the server's own model
    (500, {"error": "the index is damaged: x", "kind": "IndexDamagedError"}, False, None),  # not this index's server
], ids=["usage", "damaged", "untrusted", "no-kind", "busy", "model", "unnamed"])
def test_the_client_raises_the_error_a_server_names_as_a_search_here_would(tmp_path, status, body, named, raised):
    """The CLI's client took every 4xx (but 401, 408, 413, 429) for unusable input (BadInputError, exit 6) and every
    5xx for "searching locally": a --where the server refused (exit 2 here) was exit 6, a damaged index or one
    others may write was searched again here. An answer that names its kind is raised as that error, with its own
    line, where a search here meets it too; the server's own trouble, an answer without a kind (an older server),
    and one from a program that does not name this index, keep the rules they had. A stand-in server over a socket."""
    import http.server
    import threading

    from alignsearch.search import request as search_request
    from alignsearch.surfaces import client
    from helpers import fake_server_record, vector_index

    ix = tmp_path / "ix"
    vector_index(ix, 3, 8)
    index_id = client.local_index_id(ix)

    class Answer(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if named:
                self.send_header(client.INDEX_HEADER, index_id)
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()  # shutdown waits a poll
    fake_server_record(ix, server.server_address[1])
    notes: list[str] = []
    try:
        if raised is None:
            routed = client.search_via_server(ix, search_request.build(text="a dog", k=3), notice=notes.append)
            assert routed.answer is None and len(notes) == 1 and "searching locally" in notes[0], (routed, notes)
        else:
            with pytest.raises(errors.AlignSearchError) as caught:
                client.search_via_server(ix, search_request.build(text="a dog", k=3), notice=notes.append)
            assert (type(caught.value).__name__, str(caught.value)) == raised and not notes, (caught.value, notes)
    finally:
        server.shutdown()
        server.server_close()


def test_faiss_loader_lines_wait_for_debug(capsys):
    """faiss logs at INFO each of its builds it tries to load, with a ModuleNotFoundError for each the CPU lacks:
    at -v those lines, not ours, looked like a failure. They show from -vv."""
    from alignsearch import logs

    try:
        logs.configure(1)
        logging.getLogger("faiss.loader").info("Could not load library with AVX2 support")
        logging.getLogger("alignsearch.x").info("ours")
        err = capsys.readouterr().err
        assert "ours" in err and "AVX2" not in err, err
        logs.configure(2)
        logging.getLogger("faiss.loader").debug("Loading faiss")
        assert "Loading faiss" in capsys.readouterr().err
    finally:
        logs.configure(0)


def test_a_query_on_an_index_it_cannot_read_names_no_other_index(tmp_path):
    """A link at catalog.db-wal beside a running server's record: `query` said "the server at URL serves another
    index (/ix/.alignsearch), not /ix/.alignsearch (a copy?)" (one folder named twice), since the catalog it could
    not read gave no index id to compare. The local open says why in its own words: no notice of a copy."""
    from alignsearch.search import request as search_request
    from alignsearch.surfaces import client
    from helpers import fake_server_record, free_port, vector_index

    ix = tmp_path / "ix"
    vector_index(ix, 3, 8)
    fake_server_record(ix, free_port())
    for name in ("catalog.db-wal", "catalog.db-shm"):
        (ix / name).unlink(missing_ok=True)
    (tmp_path / "elsewhere").write_bytes(b"")
    (ix / "catalog.db-wal").symlink_to(tmp_path / "elsewhere")
    notes: list[str] = []
    routed = client.search_via_server(ix, search_request.build(text="a dog", k=3), notice=notes.append)
    assert routed.answer is None and not any("another index" in n for n in notes), notes


def test_the_errors_readme_names_are_the_packages():
    """README names UsageError and BadInputError as what the Python API raises, but only AlignSearchError could be
    imported from `alignsearch`; every error class of errors.py a caller catches is now."""
    import alignsearch
    from alignsearch import errors

    for name in alignsearch.ERRORS:
        assert getattr(alignsearch, name) is getattr(errors, name) and name in alignsearch.__all__
    assert {n for n, c in vars(errors).items() if isinstance(c, type) and issubclass(c, errors.AlignSearchError)} \
        == set(alignsearch.ERRORS)
