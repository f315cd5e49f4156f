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
        assert list(json.loads(body)) == ["error"] and "--where" in json.loads(body)["error"]
        for path in ("/api/search?q=red&k=3", "/api/recent"):
            status, headers, body = call(url, path, token="t")
            assert 500 <= status < 600 and headers["Content-Type"] == "application/json", (status, body[:300])
            answer = json.loads(body)
            assert list(answer) == ["error"], answer
            assert "damaged" in answer["error"] and "malformed" in answer["error"], answer
        assert call(url, "/api/info", token="t")[0] == 200  # still serving
    finally:
        stop(proc)
    stderr = proc.stderr.read()
    assert "Traceback" not in stderr, stderr[-3000:]
    assert "malformed" in stderr  # the 5xx answers are logged, one line each
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
    assert list(answer) == ["error"] and answer["error"].startswith(says), answer
    # the traceback goes to the debug log only, never to the error log (nor the server's own)
    assert not [r for r in caplog.records if r.exc_info and r.levelno > logging.DEBUG], caplog.text
    if status >= 500:
        assert [r for r in caplog.records if r.levelno == logging.ERROR and "/api/search" in r.getMessage()]
