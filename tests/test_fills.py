"""The files a fill step (indexer/ocrfill.py, indexer/phashfill.py) could not read are remembered
(catalog.fill_failures, schema 4): a file that killed its decode worker twice cost those deaths again on every
later `index` run, and nothing told the user. Now it is skipped until it changes, counted by `index` and `info`,
and checked by `verify`."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest

from alignsearch.storage import catalog, metaseal, migrate, state
from conftest import index_json, make_images, run
from helpers import (DEATHS_ENV, FIXTURES, KILLED_IN_PHASH_FILL, catalog_rows, deaths, killed_at, noting_deaths,
                     render_sign, seal, verify_problems, with_dying_fills, without_digests)
from indexer import phashfill, workers
from indexer.workers import DIED

needs_ocr = pytest.mark.skipif(importlib.util.find_spec("rapidocr") is None, reason="pip install '.[ocr]'")
LAST_V3 = "be67b8a"  # the last alignsearch that wrote (and read) schema 3


def _sql(ix: Path, sql: str, *args, sealed: bool = False) -> None:
    """Run sql on the catalog; sealed: and digest the rows as a writer would (helpers.seal)."""
    conn = sqlite3.connect(ix / "catalog.db")
    with conn:
        conn.execute(sql, args)
        if sealed:
            seal(conn)
    conn.close()


ID_OF = "SELECT id FROM files WHERE relpath = '{}'"
FAILURES = "SELECT f.relpath, x.step, x.reason FROM fill_failures x JOIN files f ON f.id = x.file_id ORDER BY 1, 2"


def _dying_on_die(monkeypatch, noted: Path) -> None:
    """A fill's workers die on a file named die*, each death a line in `noted` (helpers.noting_deaths)."""
    real = workers.map_rows
    monkeypatch.setenv(DEATHS_ENV, str(noted))
    monkeypatch.setattr(workers, "map_rows", lambda fn, *args, **kwargs: real(partial(noting_deaths, fn), *args,
                                                                             **kwargs))


@pytest.mark.slow
@needs_ocr
def test_a_file_that_kills_its_ocr_worker_is_tried_once_per_change_not_once_per_run(tmp_path, tiny_model,
                                                                                   monkeypatch):
    root, ix, noted = tmp_path / "signs", tmp_path / "ix", tmp_path / "deaths"
    for i, words in enumerate(["Zanzibar Spice", "Kilimanjaro Express"]):
        render_sign(root / f"sign{i}.png", [words])
    render_sign(root / "die-sign.png", ["Okavango Delta"])
    index_json(ix, root, "--model", tiny_model, "--device", "cpu")  # no text read yet
    _dying_on_die(monkeypatch, noted)
    ocr = ("--ocr", "--workers", "2", "--device", "cpu")

    first = index_json(ix, *ocr)
    died = deaths(noted)
    # the pool's death, the same files again in a fresh pool, then the file alone, twice (indexer/workers.py)
    assert 2 <= died <= 4, died
    # another image to read (its text forgotten): the code before read die-sign.png in the workers again
    _sql(ix, f"UPDATE photos SET ocr = NULL WHERE file_id = ({ID_OF.format('sign1.png')})", sealed=True)
    second = index_json(ix, *ocr)
    assert deaths(noted) == died  # not tried again: it killed as many workers on every run before
    assert first["times"]["extra"]["ocr_filled"] == 2 and first["fill_failures"] == {"ocr": 1, "phash": 0}, first
    assert catalog_rows(ix, FAILURES) == [("die-sign.png", "ocr", DIED)]
    assert second["times"]["extra"]["ocr_filled"] == 1 and second["fill_failures"] == {"ocr": 1, "phash": 0}
    said = run("index", "--index", ix, *ocr).output
    assert "files that could not be read again: 1 for text (skipped until they change" in said, said
    info = json.loads(run("info", "--index", ix, "--json").output)
    assert info["fill_failures"] == {"ocr": 1, "phash": 0} and "fill_failed_files" not in info
    listed = json.loads(run("info", "--index", ix, "--failed", "--json").output)["fill_failed_files"]
    assert [(Path(f["path"]).name, f["step"], f["reason"]) for f in listed] == [("die-sign.png", "ocr", DIED)]
    assert f"unread:  {root / 'die-sign.png'}: text: {DIED}" in run("info", "--index", ix, "--failed").output
    assert verify_problems(ix) == []

    # touched: new rows (their text not read, --no-ocr), and the old row's record goes with the old row
    for name in ("die-sign.png", "sign0.png"):
        stat = (root / name).stat()
        os.utime(root / name, (stat.st_atime, stat.st_mtime + 10))
    touched = index_json(ix, "--no-ocr", "--device", "cpu")
    assert touched["updated"] == 2 and touched["fill_failures"] == {"ocr": 0, "phash": 0}, touched
    assert catalog_rows(ix, "SELECT count(*) FROM fill_failures") == [(0,)] and deaths(noted) == died
    again = index_json(ix, *ocr)
    assert deaths(noted) == 2 * died  # tried again, as it changed
    assert again["times"]["extra"]["ocr_filled"] == 1 and again["fill_failures"] == {"ocr": 1, "phash": 0}
    assert catalog_rows(ix, FAILURES) == [("die-sign.png", "ocr", DIED)]


@pytest.mark.slow
def test_a_file_that_kills_its_phash_worker_is_skipped_while_its_record_matches_its_row(tmp_path, tiny_model,
                                                                                       monkeypatch):
    lib, ix, noted = tmp_path / "lib", tmp_path / "ix", tmp_path / "deaths"
    make_images(lib, 6)
    (lib / "img002.jpg").rename(lib / "die.jpg")
    index_json(ix, lib, "--model", tiny_model, "--device", "cpu")
    _sql(ix, "DELETE FROM phashes")  # as an index written before phashes existed
    _dying_on_die(monkeypatch, noted)
    db = catalog.connect(ix / "catalog.db")
    try:
        assert phashfill.fill_phashes(db, workers=2, batch=2) == 5  # batches of 2: in worker processes
        died = deaths(noted)
        assert 2 <= died <= 4, died
        # with another file to hash
        _sql(ix, f"DELETE FROM phashes WHERE file_id = ({ID_OF.format('img000.png')})")
        assert phashfill.fill_phashes(db, workers=2, batch=2) == 1 and deaths(noted) == died
        assert catalog_rows(ix, FAILURES) == [("die.jpg", "phash", DIED)]
        # a record made for another size or mtime than the row has now holds nothing back
        _sql(ix, "UPDATE fill_failures SET mtime = mtime - 1")
        _sql(ix, f"DELETE FROM phashes WHERE file_id = ({ID_OF.format('img001.jpg')})")
        assert phashfill.fill_phashes(db, workers=2, batch=2) == 1 and deaths(noted) == 2 * died
        with db.connect() as conn:
            assert catalog.fill_failure_counts(conn) == {"ocr": 0, "phash": 1}
    finally:
        db.dispose()


def _index_with_dying_fills(ix: Path, noted: Path, *args) -> dict:
    """`alignsearch index` in a child whose fill steps die on die* files; it must end normally (exit 0: files a
    fill could not read are counted, not an error), its summary parsed."""
    proc = with_dying_fills(noted, "index", "--index", ix, "--device", "cpu", "--workers", "2", "--json", *args)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-3000:])
    return json.loads(proc.stdout)


@pytest.mark.slow
def test_one_file_to_hash_that_crashes_the_decoder_fails_alone_not_the_run(tmp_path, tiny_model):
    """A phash fill of fewer files than its batch (the usual case: a run adding a few files) decoded them in the
    `index` process: a file that crashed the decoder ended the run (here exit 9), every run, nothing recorded.
    Now one worker decodes them: it dies, the file is recorded, the run ends normally and the next skips it."""
    lib, ix, noted = tmp_path / "lib", tmp_path / "ix", tmp_path / "deaths"
    make_images(lib, 3)
    (lib / "img002.jpg").rename(lib / "die.jpg")
    index_json(ix, lib, "--model", tiny_model, "--device", "cpu")
    _sql(ix, f"DELETE FROM phashes WHERE file_id = ({ID_OF.format('die.jpg')})")  # the one file for the fill

    first = _index_with_dying_fills(ix, noted)
    died = deaths(noted)
    assert 2 <= died <= 4, died
    assert first["times"]["extra"]["phashes_filled"] == 0 and first["fill_failures"] == {"ocr": 0, "phash": 1}
    assert catalog_rows(ix, FAILURES) == [("die.jpg", "phash", DIED)]
    again = _index_with_dying_fills(ix, noted)
    assert deaths(noted) == died and again["fill_failures"] == {"ocr": 0, "phash": 1}, again


@pytest.mark.slow
@needs_ocr
def test_one_image_to_read_that_crashes_the_text_reader_fails_alone_not_the_run(tmp_path, tiny_model):
    """An OCR fill of one image read it in the `index` process: a crash there ended the run, every run."""
    root, ix, noted = tmp_path / "signs", tmp_path / "ix", tmp_path / "deaths"
    render_sign(root / "sign0.png", ["Zanzibar Spice"])
    index_json(ix, root, "--model", tiny_model, "--ocr", "--device", "cpu")
    render_sign(root / "die-sign.png", ["Okavango Delta"])
    assert index_json(ix, "--no-ocr", "--device", "cpu")["added"] == 1  # its text not read: the fill's one image

    first = _index_with_dying_fills(ix, noted, "--ocr")
    died = deaths(noted)
    assert 2 <= died <= 4, died
    assert first["times"]["extra"]["ocr_filled"] == 0 and first["fill_failures"] == {"ocr": 1, "phash": 0}, first
    assert catalog_rows(ix, FAILURES) == [("die-sign.png", "ocr", DIED)]
    again = _index_with_dying_fills(ix, noted, "--ocr")
    assert deaths(noted) == died and again["fill_failures"] == {"ocr": 1, "phash": 0}, again


def test_a_small_fill_is_decoded_by_one_worker_and_nothing_to_fill_starts_none(monkeypatch):
    """Fewer rows than min_rows: one worker (its start costs about half a second, measured), never this process;
    --workers 0 still decodes here, as the user asked; nothing to do starts no worker at all."""
    started = []
    monkeypatch.setattr(workers, "decode_in_processes",
                        lambda fn, rows, n, failed: started.append(n) or map(fn, rows))
    fail = partial(pytest.fail, "decoded in this process")
    assert list(workers.map_rows(str.upper, iter([]), 2, None)) == [] and started == []
    assert list(workers.map_rows(str.upper, iter([["a"]]), 3, None)) == ["A"] and started == [1]
    assert list(workers.map_rows(str.upper, iter([["a", "b"], ["c"]]), 3, None)) == ["A", "B", "C"]
    assert started == [1, 3]
    monkeypatch.setattr(workers, "decode_in_processes", lambda *args: fail())
    assert list(workers.map_rows(str.upper, iter([["a"]]), 0, None)) == ["A"]


def test_an_undecodable_file_is_recorded_and_one_gone_is_not(indexed_images):
    """Bytes that no longer decode (same size and mtime) fail every time: recorded. A file that cannot be
    opened now (gone, unreadable, changed) may be read next run: not recorded."""
    root, ix = indexed_images(4)
    files = sorted(root.iterdir())
    stat = files[0].stat()
    files[0].write_bytes(b"\0" * stat.st_size)
    os.utime(files[0], ns=(stat.st_atime_ns, stat.st_mtime_ns))
    files[1].unlink()
    _sql(ix, "DELETE FROM phashes")
    db = catalog.connect(ix / "catalog.db")
    try:
        assert phashfill.fill_phashes(db) == 2  # in this process (no workers)
        recorded = catalog_rows(ix, FAILURES)
        assert [r[:2] for r in recorded] == [(files[0].name, "phash")] and recorded[0][2].startswith("cannot decode")
        with db.connect() as conn:
            assert [r.relpath for r in catalog.files_without_phash(conn)] == [files[1].name]  # tried next run
    finally:
        db.dispose()


@pytest.mark.slow
def test_a_record_goes_with_its_files_row_and_verify_finds_one_left_behind(indexed_images):
    root, ix = indexed_images(3)
    db = catalog.connect(ix / "catalog.db")
    try:
        with db.begin() as conn:
            rows = catalog.indexed_files(conn)
            ids = [r.id for r in rows]
            catalog.record_fill_failures(conn, catalog.FILL_OCR, [(ids[0], "x"), (ids[1], "y")])
            catalog.record_fill_failures(conn, catalog.FILL_PHASH, [(ids[0], "z")])
    finally:
        db.dispose()
    (root / rows[0].relpath).unlink()
    assert index_json(ix, "--device", "cpu")["fill_failures"] == {"ocr": 1, "phash": 0}  # a file gone: its records too
    assert catalog_rows(ix, "SELECT file_id FROM fill_failures") == [(ids[1],)]
    assert verify_problems(ix) == []
    _sql(ix, "INSERT INTO fill_failures VALUES (9999, 'ocr', 1, 1.0, 'gone', 0.0)")  # as a bug or an older build
    assert verify_problems(ix) == ["1 records of files a fill step could not read name no indexed file"]
    out = run("verify", "--index", ix, "--skip-model", "--repair", "--json", code=None)
    repaired = json.loads(out.output)
    assert repaired["ok"], repaired
    assert "dropped 1 records of fill failures of files no longer indexed" in repaired["repaired"]
    assert catalog_rows(ix, "SELECT file_id FROM fill_failures") == [(ids[1],)]


@pytest.fixture
def v3(tmp_path) -> Path:
    """The catalog of an index alignsearch wrote at schema 3 (tests/fixtures/index-v3, built by 590b6d4)."""
    return Path(shutil.copytree(FIXTURES / "index-v3" / ".alignsearch", tmp_path / "v3" / ".alignsearch"))


def _dump(db: Path, *, but: tuple = ()) -> list[str]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return [line for line in conn.iterdump() if not any(word in line for word in but)]
    finally:
        conn.close()


def test_a_version_3_catalog_is_read_as_it_stands_and_upgraded_once_by_a_writer(v3):
    db = v3 / "catalog.db"
    before = _dump(db)
    reader = catalog.connect(db, readonly=True)
    with reader.connect() as conn:  # a reader of version 3: no table, nothing recorded, nothing to verify
        assert not migrate.schema_of(conn).fill_failures
        assert catalog.fill_failure_counts(conn) == {"ocr": 0, "phash": 0} and catalog.fill_failed_files(conn) == []
        assert catalog.count_dangling_fill_failures(conn) == 0
    reader.dispose()
    assert catalog.integrity_problems(db) == []  # the table came after version 3: not "damaged, lacks it"
    assert _dump(db) == before

    catalog.connect(db).dispose()  # a writer
    after = _dump(db)
    assert [x for x in after if "fill_failures" in x] == [
        'CREATE TABLE fill_failures (\n\tfile_id INTEGER NOT NULL, \n\tstep VARCHAR(16) NOT NULL, \n\t'
        'size INTEGER NOT NULL, \n\tmtime FLOAT NOT NULL, \n\treason TEXT NOT NULL, \n\tfailed_at FLOAT NOT NULL, '
        '\n\tPRIMARY KEY (file_id, step)\n);']
    # the rest as it was, but for the version (and the mark any writer leaves on a catalog from before 9b522d7), and
    # the keyword index, written again (version 5: migrate._spaced_keywords; version 6: migrate._broken_keywords;
    # version 7: migrate._thai_keywords; version 8: migrate._hangul_edge_keywords; version 9: migrate._width_keywords),
    # and files_sha256 on (sha256, moment) (version 10: migrate._content_index), and the links table, made empty
    # (version 13: migrate._links), and each files and photos row's digest (version 14: migrate._digests), compared
    # with a copy that drops it, and the model record's digest (version 15: migrate._sealed_model)
    assert "CREATE INDEX files_sha256 ON files (sha256, moment);" in after
    assert any(x.startswith("CREATE TABLE links (") for x in after)
    assert catalog_rows(v3, "SELECT count(*) FROM files WHERE digest IS NULL") == [(0,)]
    assert catalog_rows(v3, "SELECT count(*) FROM photos WHERE digest IS NULL") == [(0,)]
    model = json.loads(catalog_rows(v3, "SELECT value FROM meta WHERE key = 'model'")[0][0])
    assert model == metaseal.sealed(model) and metaseal.KEY in model
    assert [x for x in without_digests(db, v3.parent / "copy") if not any(w in x for w in (
        "fill_failures", "schema_version", "keys_lossless", "keywords", "INDEX files_sha256", "CREATE TABLE links (",
        "VALUES('model'"))] \
        == [x for x in before if not any(w in x for w in ("schema_version", "keywords", "INDEX files_sha256",
                                                             "VALUES('model'"))]
    reader = catalog.connect(db, readonly=True)
    with reader.connect() as conn:
        assert state.read(conn).schema_version == migrate.LATEST and migrate.schema_of(conn) == migrate.CURRENT
    reader.dispose()
    catalog.connect(db).dispose()  # once: a second writer finds nothing to do
    assert _dump(db) == after and catalog.integrity_problems(db) == []


def _old_alignsearch(tmp_path: Path) -> Path:
    """The code of LAST_V3 (alignsearch and indexer), from this repository's history; skipped without it."""
    repo = Path(__file__).resolve().parents[1]
    if shutil.which("git") is None or subprocess.run(["git", "-C", repo, "cat-file", "-e", f"{LAST_V3}^{{commit}}"],
                                                     capture_output=True).returncode != 0:
        pytest.skip(f"no git history holding {LAST_V3} here")
    old = tmp_path / "old"
    old.mkdir()
    archive = subprocess.run(["git", "-C", repo, "archive", LAST_V3, "alignsearch", "indexer"], capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", old], input=archive, check=True)
    return old


@pytest.mark.slow
def test_the_alignsearch_before_version_4_refuses_a_version_4_catalog_in_one_line(v3, tmp_path):
    old = _old_alignsearch(tmp_path)
    catalog.connect(v3 / "catalog.db").dispose()  # upgraded to the latest
    before = _dump(v3 / "catalog.db")
    for args in (["info", "--index", v3], ["index", "--index", v3, "--device", "cpu"]):
        proc = subprocess.run([sys.executable, "-m", "alignsearch", *map(str, args)], capture_output=True, text=True,
                              cwd=old, env={**os.environ, "PYTHONPATH": str(old), "HF_HUB_OFFLINE": "1"}, timeout=120)
        assert proc.returncode == 7, proc.stderr[-2000:]
        assert proc.stderr.strip().splitlines() == [
            f"error: index schema version {migrate.LATEST} is not supported by this alignsearch (it reads 3): "
            "upgrade alignsearch"], \
            proc.stderr[-2000:]
    assert _dump(v3 / "catalog.db") == before


@pytest.mark.slow
def test_malformed_fill_failure_rows_are_left_out_said_by_verify_and_repaired(indexed_images):
    """Rows no alignsearch writes (a damaged catalog, another tool): a step no alignsearch has was counted and
    listed as one (a new key in `index --json`'s fill_failures), and a reason held as bytes ended `info --failed
    --json` with "unexpected TypeError". Now those of no known step are left out, verify names them and --repair
    drops them; a reason is shown as text whatever its type; a size or mtime of the wrong type holds nothing back."""
    root, ix = indexed_images(3)
    first, second, third = sorted(p.name for p in root.iterdir())
    row = "INSERT INTO fill_failures SELECT id, {}, {}, {}, {}, 0 FROM files WHERE relpath = '{}'"
    _sql(ix, row.format("'thumbs'", "size", "mtime", "'x'", first))
    _sql(ix, row.format("'phash'", "size", "mtime", "x'6f6b20ff'", second))
    _sql(ix, row.format("'ocr'", "'big'", "'late'", "'y'", third))  # matches no row: tried again, not counted
    info = json.loads(run("info", "--index", ix, "--failed", "--json").output)
    assert info["fill_failures"] == {"ocr": 0, "phash": 1}, info["fill_failures"]
    assert [(Path(f["path"]).name, f["step"], f["reason"]) for f in info["fill_failed_files"]] == [
        (second, "phash", "ok \ufffd")]
    assert verify_problems(ix) == ["1 records of files a fill step could not read name no fill step (ocr, phash)"]
    repaired = json.loads(run("verify", "--index", ix, "--skip-model", "--repair", "--json", code=None).output)
    assert repaired["ok"] and "dropped 1 records of fill failures of no fill step" in repaired["repaired"], repaired
    assert catalog_rows(ix, "SELECT step FROM fill_failures ORDER BY 1") == [("ocr",), ("phash",)]
    assert index_json(ix, "--device", "cpu")["fill_failures"] == {"ocr": 0, "phash": 1}
    assert verify_problems(ix) == []


@pytest.mark.slow
def test_kill_9_during_the_upgrade_to_version_4_leaves_version_3_whole(v3):
    """The upgrade is one transaction: killed after the table is made, before or after the version is written,
    the catalog is version 3 as it was, read as such, and the next writer upgrades it."""
    db = v3 / "catalog.db"
    before = _dump(db)
    for where, when in [("alignsearch.storage.catalog:fill_failures.create", "after"),
                        ("alignsearch.storage.state:write", "before"), ("alignsearch.storage.state:write", "after")]:
        proc = killed_at(where, when, "index", "--index", v3, "--device", "cpu")
        assert proc.returncode == -9, (where, when, proc.returncode, proc.stderr[-2000:])
        assert _dump(db) == before, (where, when)
        assert catalog.integrity_problems(db) == [] and verify_problems(v3) == []
        assert "images:  7 indexed" in run("info", "--index", v3).output
    catalog.connect(db).dispose()
    assert catalog_rows(v3, "SELECT value FROM meta WHERE key = 'schema_version'") == [(str(migrate.LATEST),)]


@pytest.mark.slow
def test_the_decode_workers_of_a_fill_end_with_the_run_killed_9(indexed_images):
    """A run killed -9 while its fill's workers wait for their next task: they never learned it and lived on for
    good, holding the run's output pipes (whoever waits for its output waited forever) and their memory. Now
    each ends when the process that started it ends."""
    _, ix = indexed_images(6)
    _sql(ix, "DELETE FROM phashes")  # as an index written before phashes existed
    proc = subprocess.Popen([sys.executable, "-c", KILLED_IN_PHASH_FILL, "alignsearch.storage.catalog:set_phashes",
                             "after", "index", "--index", str(ix), "--device", "cpu", "--workers", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the workers share its process group
        proc.communicate()
        pytest.fail("the fill's decode workers outlived the run killed -9 (its output pipes still open after 60 s)")
    assert proc.returncode == -9, err[-3000:]
    assert catalog_rows(ix, "SELECT count(*) FROM phashes") == [(0,)]  # killed before its first commit


def _unread_pngs(tmp_path: Path, n: int):
    """A catalog of n indexed PNGs whose text and phash were never read (as an index from before either)."""
    import time

    from PIL import Image
    from sqlalchemy import insert

    root = tmp_path / "lib"
    root.mkdir()
    db = catalog.connect(tmp_path / "catalog.db")
    with db.begin() as conn:
        for i in range(n):
            path = root / f"img{i}.png"
            Image.new("RGB", (64, 64), (i * 40, 0, 0)).save(path)
            st = path.stat()
            fid = conn.execute(insert(catalog.files).values(
                root=str(root), relpath=path.name, size=st.st_size, mtime=st.st_mtime, status=catalog.INDEXED,
                indexed_at=time.time(), vec_row=i)).inserted_primary_key[0]
            conn.execute(insert(catalog.photos).values(file_id=fid))
        seal(conn)
    return db


class _Engine:
    def __call__(self, image):
        return type("Result", (), {"txts": ("HELLO WORLD",), "scores": (0.99,)})()


def test_a_text_reader_that_cannot_start_records_no_file_and_says_so_once(tmp_path, monkeypatch, caplog):
    """An engine that fails to start (models missing, ONNX Runtime out of memory) is no fault of the images: each
    was recorded as failed for good, and no later run read any of them. Now none is recorded, the run says so in
    one line, and the next run with a working engine reads them all."""
    from alignsearch.media import ocr
    from indexer import ocrfill

    db = _unread_pngs(tmp_path, 3)

    def broken():
        raise RuntimeError("onnxruntime: failed to load the detection model")

    monkeypatch.setattr(ocr, "_get_engine", broken)
    with caplog.at_level("WARNING", logger="indexer.ocrfill"):
        assert ocrfill.fill(db, workers=0)[0] == 0
    said = [r.getMessage() for r in caplog.records if r.name == "indexer.ocrfill"]
    assert len(said) == 1 and "cannot start" in said[0] and "detection model" in said[0], said
    with db.connect() as conn:
        assert catalog.fill_failure_counts(conn)[catalog.FILL_OCR] == 0
        assert catalog.count_without_ocr(conn) == 3
    monkeypatch.setattr(ocr, "_get_engine", _Engine)
    assert ocrfill.fill(db, workers=0)[0] == 3
    with db.connect() as conn:
        assert catalog.count_without_ocr(conn) == 0


def test_an_engine_error_on_one_image_is_recorded_once_the_engine_works(tmp_path, monkeypatch):
    from alignsearch.media import ocr
    from indexer import ocrfill

    db = _unread_pngs(tmp_path, 2)

    class Choking(_Engine):
        def __call__(self, image):
            if image.getpixel((0, 0))[0]:  # the second image only
                raise ValueError("bad box")
            return super().__call__(image)

    monkeypatch.setattr(ocr, "_get_engine", Choking)
    assert ocrfill.fill(db, workers=0)[0] == 1
    with db.connect() as conn:
        assert [(f.relpath, why.startswith("the text reader failed on it")) for f, _, why in
                catalog.fill_failed_files(conn)] == [("img1.png", True)]


@pytest.mark.parametrize("error", [MemoryError(), OSError(5, "Input/output error")])
def test_running_out_of_memory_or_an_os_error_while_decoding_is_not_recorded(tmp_path, monkeypatch, error):
    """open_rgb out of memory (a large image while the machine is short) or an OSError says nothing lasting about
    the file: both fills recorded it as undecodable for good. Now it is tried again next run; a file whose bytes
    cannot be decoded still is recorded."""
    from alignsearch.media import images, ocr
    from indexer import ocrfill

    db = _unread_pngs(tmp_path, 2)

    def failing(data, *args, **kwargs):
        raise error

    monkeypatch.setattr(ocr, "_get_engine", _Engine)
    monkeypatch.setattr(images, "open_rgb", failing)
    assert ocrfill.fill(db, workers=0)[0] == 0
    assert phashfill.fill_phashes(db, workers=0) == 0
    with db.connect() as conn:
        assert catalog.fill_failed_files(conn) == []
    monkeypatch.undo()
    monkeypatch.setattr(ocr, "_get_engine", _Engine)
    assert ocrfill.fill(db, workers=0)[0] == 2
    assert phashfill.fill_phashes(db, workers=0) == 2


def test_the_phash_fill_never_reads_a_video_for_its_moments(tmp_path, monkeypatch):
    """A video's moment without a phash (its frame could not be hashed as it was indexed) was picked by the phash
    fill, which read the whole video file for it, once per moment, and recorded each as "cannot decode it". Moments
    are left out, as the text fill leaves them out."""
    from sqlalchemy import insert

    db = _unread_pngs(tmp_path, 1)
    video = tmp_path / "lib" / "clip.mp4"
    video.write_bytes(b"\0\0\0\x18ftypmp42" + bytes(64))
    with db.begin() as conn:
        for moment in range(2):
            conn.execute(insert(catalog.files).values(
                root=str(tmp_path / "lib"), relpath=video.name, moment=moment, t=float(moment), t_end=moment + 1.0,
                size=video.stat().st_size, mtime=video.stat().st_mtime, status=catalog.INDEXED, indexed_at=0.0,
                vec_row=1 + moment))
        seal(conn)
    opened = []
    read = catalog.FileRow.read
    monkeypatch.setattr(catalog.FileRow, "read", lambda row: opened.append(row.relpath) or read(row))
    assert phashfill.fill_phashes(db, workers=0) == 1
    assert opened == ["img0.png"]
    with db.connect() as conn:
        assert catalog.fill_failed_files(conn) == []
