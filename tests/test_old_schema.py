"""An index written by the first alignsearch, aa1526b (catalog schema 1, tests/fixtures/index-v1, built by
tests/fixtures/build_index_v1.py): its files table has no relpath_raw and its catalog none of the tables that
came later (vector_chunks, tags...). migrate.OLDEST is 1, yet every reader called it damaged ("no such table:
vector_chunks", "no such column: relpath_raw", exit 7, "restore it from a backup") and every `index` run
failed its upgrade ("run `alignsearch verify`", which said the same). Readers read it as it stands; the first
writer upgrades it in place, in one transaction, keeping vectors.f16 as it is."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import run
from alignsearch.errors import ModelMismatchError
from alignsearch.storage import catalog, migrate, state

from helpers import FIXTURES, dump, hashes

EXPECTED = json.loads((FIXTURES / "index-v1.json").read_text())
OPTIONS = ["--device", "cpu", "--backend", "torch"]


@pytest.fixture
def v1(tmp_path) -> Path:
    """A copy of the fixture (index and photos) with the model it was built with beside it."""
    copy = Path(shutil.copytree(FIXTURES / "index-v1", tmp_path / "v1"))
    shutil.copytree(FIXTURES / "index-v3" / "model", copy / "model")
    return copy


def known_model(copy: Path) -> None:
    """aa1526b's fingerprint hashed the model's folder and the transformers version it ran under
    (encoders/model.py _legacy_fingerprint): the model is known to it only at the place and under the
    transformers it was built with. The copy records the fingerprint the model has now (every other byte
    stays), so the tests below exercise the catalog and vectors of that era, not the fingerprint's."""
    from alignsearch.encoders.model import Encoder

    fingerprint = Encoder(str(copy / "model"), "cpu").fingerprint
    conn = sqlite3.connect(copy / ".alignsearch" / "catalog.db")
    with conn:
        record = json.loads(conn.execute("SELECT value FROM meta WHERE key = 'model'").fetchone()[0])
        conn.execute("UPDATE meta SET value = ? WHERE key = 'model'", (json.dumps({**record, "fingerprint": fingerprint}),))
    conn.close()


def answers(copy: Path) -> list[list[tuple[int, str, float]]]:
    got = []
    for recorded in EXPECTED["answers"]:
        args = [str(copy / "photos" / Path(a).relative_to(Path(EXPECTED["build_root"]) / "photos"))
                if a.startswith(EXPECTED["build_root"]) else a for a in recorded["args"]]
        out = run(*args, "--index", copy / ".alignsearch", "--model", copy / "model", *OPTIONS, "--json")
        got.append([(h["id"], h["path"], h["score"]) for h in json.loads(out.output)["results"]])
    return got


def assert_answers_as_recorded(got, added: str | None = None) -> None:
    """The same files in the same order, scores within 5e-4, fp16's precision (that alignsearch scored an
    image query against its own file's stored fp16 row, this one against the query's exact vector; it
    normalised the query in float32). added: a folder indexed since, whose files are left out (the answers
    of the old files are then a prefix of those recorded)."""
    for mine, recorded in zip(got, EXPECTED["answers"]):
        mine = [h for h in mine if added is None or not h[1].startswith(added)]
        theirs = recorded["results"][: len(mine)] if added else recorded["results"]
        assert [(i, p) for i, p, _ in mine] == [(h["id"], h["path"]) for h in theirs], recorded["args"]
        assert [s for _, _, s in mine] == pytest.approx([h["score"] for h in theirs], abs=5e-4)


def test_info_and_verify_read_an_aa1526b_index_as_it_stands_and_write_nothing(v1):
    ix = v1 / ".alignsearch"
    before = hashes(ix)
    info = json.loads(run("info", "--index", ix, "--failed", "--json").output)
    old = EXPECTED["info"]
    assert (info["images"], info["failed"], info["roots"], info["dim"]) == (old["images"], old["failed"], old["roots"],
                                                                           old["dim"])
    assert [f["path"] for f in info["failed_files"]] == [f["path"] for f in old["failed_files"]]
    out = run("verify", "--index", ix, "--skip-model", code=None)
    assert "cannot be read" not in out.output and "damaged" not in out.output, out.output
    assert "written before checksums were recorded" in out.output  # what `index` or `verify --repair` adds
    db = catalog.connect(ix / "catalog.db", readonly=True)
    with db.connect() as conn:
        assert state.read(conn).schema_version == 1 and migrate.schema_of(conn).version == 1
        rows = catalog.indexed_files(conn)
        assert [(r.relpath_raw, r.moment, r.t) for r in rows] == [(None, 0, None)] * 6
        assert {r.path for r in rows} == {h["path"] for a in EXPECTED["answers"] for h in a["results"]}
    db.dispose()
    after = hashes(ix)
    assert {k: after[k] for k in before} == before
    assert set(after) - set(before) <= {"catalog.db-wal", "catalog.db-shm"}


@pytest.mark.slow
def test_queries_on_an_aa1526b_index_answer_what_it_answered(v1):
    known_model(v1)
    before = hashes(v1 / ".alignsearch")
    assert_answers_as_recorded(answers(v1))
    after = hashes(v1 / ".alignsearch")
    assert {k: after[k] for k in before} == before


def test_a_moved_model_of_that_era_is_refused_in_one_line_not_called_damage(v1):
    out = run("query", "red", "--index", v1 / ".alignsearch", "--model", v1 / "model", *OPTIONS,
              code=ModelMismatchError.exit_code)
    assert len(out.output.strip().splitlines()) == 1 and "--reindex" in out.output, out.output


@pytest.mark.slow
def test_index_upgrades_an_aa1526b_index_in_place_keeping_its_vectors(v1, tmp_path):
    known_model(v1)
    ix = v1 / ".alignsearch"
    vectors = (ix / "vectors.f16").read_bytes()
    new = tmp_path / "new"
    new.mkdir()
    shutil.copy(v1 / "photos" / "red.png", new / "red-copy.png")  # its vector is found by content: none encoded
    shutil.copy(v1 / "photos" / "dog.png", new / "dog-copy.png")
    summary = json.loads(run("index", new, "--index", ix, "--model", v1 / "model", *OPTIONS, "--workers", "0",
                             "--json").stdout)
    assert summary["added"] == 2 and summary["failed"] == 0
    assert (ix / "vectors.f16").read_bytes() == vectors
    db = catalog.connect(ix / "catalog.db", readonly=True)
    with db.connect() as conn:
        assert state.read(conn).schema_version == migrate.LATEST and migrate.schema_of(conn) == migrate.CURRENT
        assert len(catalog.indexed_files(conn)) == 8
    db.dispose()
    conn = sqlite3.connect(ix / "catalog.db")
    assert [r[1] for r in conn.execute("PRAGMA table_info(files)")][:4] == ["id", "root", "relpath", "relpath_raw"]
    conn.close()
    out = run("verify", "--index", ix)
    assert out.output.startswith("ok:"), out.output
    got = answers(v1)  # the old files answer as before; each copy sits beside its original
    assert_answers_as_recorded(got, added=str(new))
    assert {Path(p).name for a in got for _, p, _ in a} >= {"red-copy.png", "dog-copy.png"}


def test_an_upgrade_of_an_aa1526b_catalog_that_fails_leaves_it_as_it_was(v1, monkeypatch):
    path = v1 / ".alignsearch" / "catalog.db"
    before = dump(path)
    last = migrate.STEPS[-1]

    def fails(conn):
        last.apply(conn)
        raise OSError("disk full")

    monkeypatch.setattr(migrate, "STEPS", (*migrate.STEPS[:-1], replace(last, apply=fails)))
    with pytest.raises(OSError):
        catalog.connect(path)
    assert dump(path) == before
    monkeypatch.undo()
    catalog.connect(path).dispose()
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == str(migrate.LATEST)
    assert [r[0] for r in conn.execute("SELECT id FROM files ORDER BY id")] == list(range(1, 8))
    conn.close()


def test_a_reader_open_across_the_upgrade_sees_what_the_writer_wrote(tmp_path):
    """A reader of a catalog older than version 3 shows it through temporary objects, per connection (the files view,
    empty tables for vector_chunks, pending_vectors, tags), which shadow the tables of the same name. A reader open
    for long (`alignsearch serve`, whose engine keeps its pooled connections) went on seeing them after an `index`
    upgraded the catalog in place: the tags, checksums and relpath_raw the writer wrote were hidden from it until it
    restarted. A connection prepared for an older version is made anew once the catalog is upgraded."""
    from sqlalchemy import func, insert, select, update

    db = Path(shutil.copytree(FIXTURES / "index-v1" / ".alignsearch", tmp_path / "ix")) / "catalog.db"
    reader = catalog.connect(db, readonly=True)
    try:
        with reader.connect() as conn:
            file_id = conn.execute(select(func.min(catalog.files.c.id))).scalar()
            assert catalog.tags_of(conn, file_id) == []
        writer = catalog.connect(db)  # upgrades it
        try:
            with writer.begin() as conn:
                conn.execute(insert(catalog.tags).values(file_id=file_id, label="dog", probability=0.9))
                conn.execute(update(catalog.files).where(catalog.files.c.id == file_id).values(relpath_raw=b"raw"))
        finally:
            writer.dispose()
        with reader.connect() as conn:
            assert catalog.tags_of(conn, file_id) == [("dog", 0.9)]
            assert conn.execute(select(catalog.files.c.relpath_raw).where(catalog.files.c.id == file_id)).scalar() \
                == b"raw"
            assert migrate.schema_of(conn) == migrate.CURRENT
    finally:
        reader.dispose()


@pytest.mark.slow
def test_an_upgrade_writes_the_keyword_index_once_for_all_its_steps(v1, monkeypatch):
    """Steps 3 and 5-8 each write the keyword index again (migrate._keywords_again): an upgrade from schema 1 built
    it five times in its one transaction (~2.5 s each at 20,000 files). Now once, after the last step; a step
    applied alone still builds it at once (test_state's step 3 test)."""
    known_model(v1)
    built = []
    real = catalog.refresh_keywords

    def counted(conn, ids=None):
        built.append(ids)
        return real(conn, ids)

    monkeypatch.setattr(catalog, "refresh_keywords", counted)
    catalog.connect(v1 / ".alignsearch" / "catalog.db").dispose()
    assert built == [None]
    monkeypatch.undo()
    assert_answers_as_recorded(answers(v1))  # the keyword index written once answers as before


def test_an_upgraded_aa1526b_catalog_finds_its_files_by_name(v1):
    """Its files have no photos row (the table came later), and the keyword index was written from files joined
    with photos: after the upgrade no old file was in it, and keyword search by name (`harbour`) found nothing
    until each file was indexed again. Written from the path (and tags) where there is no photos row."""
    from alignsearch.storage import keywords

    path = v1 / ".alignsearch" / "catalog.db"
    catalog.connect(path).dispose()  # a writer's connect upgrades it
    db = catalog.connect(path, readonly=True)
    try:
        with db.connect() as conn:
            found = catalog.keyword_search(conn, keywords.parse("harbour"), 10)
            names = {row.relpath for row in catalog.get_files(conn, [i for i, _ in found]).values()}
    finally:
        db.dispose()
    assert names == {"harbour.jpg"}


def _at_its_own_place(copy: Path, exif_photo: str) -> bytes:
    """The copy's catalog names the copy's photos (the fixture's root, BUILD_ROOT, is gone once it was built), each
    photo at the size and mtime its row records, so a re-scan finds every file unchanged; `exif_photo` carries the
    EXIF of a camera that aa1526b (which read no EXIF) would have indexed as it was. Returns its bytes."""
    import hashlib
    import io

    from PIL import Image

    photos = copy / "photos"
    exif = Image.Exif()
    exif[0x010F], exif[0x0110] = "Canon", "Canon EOS 5D"
    exif[0x8769] = {0x9003: "2011:07:04 10:20:30"}  # DateTimeOriginal
    out = io.BytesIO()
    Image.open(photos / exif_photo).convert("RGB").save(out, "JPEG", exif=exif)
    data = out.getvalue()
    (photos / exif_photo).write_bytes(data)
    conn = sqlite3.connect(copy / ".alignsearch" / "catalog.db")
    with conn:
        conn.execute("UPDATE files SET root = ?", (str(photos),))
        conn.execute("UPDATE files SET size = ?, sha256 = ? WHERE relpath = ?",
                     (len(data), hashlib.sha256(data).hexdigest(), exif_photo))
        conn.execute("UPDATE meta SET value = ? WHERE key = 'roots'", (json.dumps([str(photos)]),))
        for relpath, mtime in conn.execute("SELECT relpath, mtime FROM files").fetchall():
            os.utime(photos / relpath, (mtime, mtime))
    conn.close()
    return data


@pytest.mark.slow
def test_an_upgraded_aa1526b_index_gets_its_photo_fields_from_the_next_index_run_killed_9_or_not(v1):
    """Its files have no photos row (the table came later): no date, camera or caption to filter on. The `index` run
    that upgrades it fills them (indexer/photos.py: headers read, nothing encoded), one transaction per batch: a run
    killed -9 in the fill leaves a whole index without them, and the next run fills them."""
    from helpers import catalog_rows, killed_at, verify_problems

    known_model(v1)
    _at_its_own_place(v1, "beach.jpg")
    ix = v1 / ".alignsearch"
    vectors = (ix / "vectors.f16").read_bytes()
    args = ["index", "--index", ix, "--model", v1 / "model", *OPTIONS, "--workers", "0"]
    proc = killed_at("alignsearch.storage.catalog:set_photo", "after", *args)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert catalog_rows(ix, "SELECT count(*) FROM photos") == [(0,)]  # the batch killed in its transaction: none
    assert catalog_rows(ix, "SELECT value FROM meta WHERE key = 'schema_version'") == [(str(migrate.LATEST),)]
    assert verify_problems(ix) == []

    summary = json.loads(run(*args, "--json").stdout)
    assert (summary["added"], summary["updated"], summary["removed"]) == (0, 0, 0), summary
    assert summary["times"]["extra"]["photo_fields_filled"] == 6, summary["times"]
    assert (ix / "vectors.f16").read_bytes() == vectors  # nothing encoded
    rows = dict(catalog_rows(ix, "SELECT f.relpath, p.camera FROM files f JOIN photos p ON p.file_id = f.id"))
    assert rows == {"beach.jpg": "Canon EOS 5D", "dog.png": None, "harbour.jpg": None, "red.png": None,
                    "nested/sky.jpg": None, "nested/tree.png": None}
    hits = json.loads(run("query", "beach", "--index", ix, "--model", v1 / "model", *OPTIONS, "--camera", "canon",
                          "--before", "2012-01-01", "--json").output)["results"]
    assert [Path(h["path"]).name for h in hits] == ["beach.jpg"]
    assert run(*args, "--json").stdout and verify_problems(ix) == []
