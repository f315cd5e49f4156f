"""Issue 26 step 4: the index's state as typed records (storage/state.py), its catalog's upgrade ladder
(storage/migrate.py), and one way to open a catalog read-only; against an index an older alignsearch wrote
(tests/fixtures/index-v3, built by 590b6d4: tests/fixtures/build_index_v3.py)."""

from __future__ import annotations

import json
import shutil
import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy import URL, create_engine

from conftest import run
from alignsearch.errors import IndexDamagedError
from alignsearch.storage import catalog, metaseal, migrate, state

from helpers import FIXTURES, V3_EXPECTED as EXPECTED, answers_as_recorded, dump, hashes


@pytest.fixture
def v3(tmp_path) -> Path:
    """A copy of the fixture: index, model and photos."""
    return Path(shutil.copytree(FIXTURES / "index-v3", tmp_path / "v3"))


@pytest.mark.slow
def test_an_index_written_by_590b6d4_is_read_as_it_is_and_answers_the_same(v3):
    before = hashes(v3)
    answers_as_recorded(v3)
    after = hashes(v3)
    # a reader writes nothing: every file keeps its bytes (SQLite's WAL reader may add its two empty companions)
    assert {k: after[k] for k in before} == before
    assert set(after) - set(before) <= {".alignsearch/catalog.db-wal", ".alignsearch/catalog.db-shm"}
    db = catalog.connect(v3 / ".alignsearch" / "catalog.db", readonly=True)
    with db.connect() as conn:
        assert state.read(conn).schema_version == 3 and migrate.schema_of(conn) == migrate.Schema(3, fill_failures=False,
                                                                                                 digests=False,
                                                                                                 vec_seals=False,
                                                                                                 photo_keys=False,
                                                                                                 field_seals=False,
                                                                                                 file_seals=False)
    db.dispose()


@pytest.mark.slow
def test_index_upgrades_the_index_in_place_and_it_answers_the_same(v3):
    ix = v3 / ".alignsearch"
    vectors = hashes(ix)["vectors.f16"]
    out = run("index", "--index", ix, "--model", v3 / "model", *EXPECTED["options"], "--json", code=None)
    assert out.exit_code == 0, out.output
    db = catalog.connect(ix / "catalog.db", readonly=True)
    with db.connect() as conn:
        assert state.read(conn).schema_version == migrate.LATEST
    db.dispose()
    assert hashes(ix)["vectors.f16"] == vectors  # nothing encoded again
    answers_as_recorded(v3, model_moved=True)


def test_state_reads_every_key_590b6d4_wrote_and_writes_them_back_the_same(v3, tmp_path):
    db = catalog.connect(v3 / ".alignsearch" / "catalog.db", readonly=True)
    with db.connect() as conn:
        read = state.read(conn)
        rows = dict(conn.exec_driver_sql("SELECT key, value FROM meta").all())
    db.dispose()
    assert read.model.dim == 32 and read.model.name == EXPECTED["info"]["model"]
    assert read.roots.roots == tuple(EXPECTED["info"]["roots"]) and read.videos and read.index_run is None
    assert read.ann.tuning["target"] == 0.95 and read.vectors.rows == 8 and read.generation == 0
    assert set(rows) <= {key for keys in state.KEYS.values() for key in keys}  # no key unknown to state.py
    fresh = catalog.connect(tmp_path / "fresh.db")
    with fresh.begin() as conn:
        state.write(conn, **{f: getattr(read, f) for f in state.KEYS if f != "schema_version"})
        written = dict(conn.exec_driver_sql("SELECT key, value FROM meta").all())
        assert state.read(conn) == replace(read, schema_version=migrate.LATEST)  # the fresh catalog's own version
    fresh.dispose()
    # the same JSON under the same keys (index_id too: written over the fresh catalog's own), the model record
    # with its digest added (schema 15: metaseal)
    rows.pop("schema_version")
    again = {k: json.loads(v) for k, v in written.items() if k in rows}
    assert again["model"] == metaseal.sealed(json.loads(rows["model"])) and metaseal.KEY in again["model"]
    again["model"].pop(metaseal.KEY)
    assert again == {k: json.loads(v) for k, v in rows.items()}


def test_state_fields_round_trip_and_unknown_names_are_refused(tmp_path):
    db = catalog.connect(tmp_path / "c.db")
    model = state.ModelIdentity(name="m", fingerprint="f", dim=4, content_digest="c", record={"model": "m", "x": 1})
    full = state.IndexState(
        schema_version=migrate.LATEST, index_id="abc", model=model, generation=3,
        vectors=state.VectorState(rows=5, segments=((1, "next/a", 2),)),
        ann=state.AnnState(digest=None, files={"a": "b"}, trained_n=7, tuning={"nprobe": 2}, index_shards=2),
        roots=state.RootsState(roots=("/a", "/b"), options={"/a": {"include_hidden": True}}, list_columns={"/b": "url"},
                               listing_errors={"/a": [{"folder": "x", "reason": "y"}]}),
        videos=True, ocr=True, keys_lossless=True, encoder={"backend": "torch"}, tagging={"runs": []},
        index_run=state.IndexRun(started=1.5, pid=9), reindex=state.Reindex(model=model, segment="next/b", rows=1, done=1))
    with db.begin() as conn:
        state.write(conn, **{f: getattr(full, f) for f in state.KEYS})
        assert state.read(conn) == full and state.read(conn).model.record["x"] == 1
        state.write(conn, index_run=None, reindex=None, tagging=None)  # None removes: the default again
        assert state.read(conn) == replace(full, index_run=None, reindex=None, tagging=None)
        with pytest.raises(TypeError):
            state.write(conn, generaton=4)
        assert state.read(conn).generation == 3
        assert state.read(conn, "generation", "roots") == state.IndexState(generation=3, roots=full.roots)
        with pytest.raises(TypeError):
            state.read(conn, "generaton")
    db.dispose()


# The object values as each older alignsearch wrote them (git log -S on each key's writer): none is damage.
OLDER_OBJECTS = [
    ("tagging", {"labels": ["dog", "cat"], "templates": ["{}"], "threshold": 0.5, "top": 3}),  # b3b421a: one run
    ("tagging", {"runs": [{"labels": ["dog"], "templates": ["a photo of {}"], "threshold": 0.0, "top": 1}],
                 "background": ["a photo", "an image"]}),  # 5aa3eab on
    ("tagging", {"runs": []}),
    ("tuning", {"nprobe": 0, "rerank_factor": 1, "recall": 1.0, "target": 0.95}),  # 44e7783: flat, without n
    ("tuning", {"nprobe": 16, "rerank_factor": 4, "recall": 0.9612, "target": 0.95, "n": 5000}),
    ("root_options", {"/r": {"include_hidden": True}}),  # c60043d
    ("root_options", {"/r": {"video_interval": 1.0, "caption_column": "text"}, "/s": {"video_interval": 5}}),
    ("root_options", {"/r": {"include_hidden": True, "device": 2049}, "/s": {"device": 64768}}),  # and now
    ("listing_errors", {"/r": [{"folder": "/r/sub", "reason": "Permission denied"}], "/s": []}),
    ("list_columns", {"/l.csv": "url"}),  # bb6c113
    ("ann_files", {"index.faiss.lists": "ab12", "shard-0.faiss": "cd34"}),
    ("encoder", {"backend": "torch", "text_precision": "fp32", "image_precision": "fp32"}),  # e58ddd6
]
OBJECT_FIELDS = {"tagging": lambda s: s.tagging, "tuning": lambda s: s.ann.tuning, "root_options": lambda s: s.roots.options,
                 "listing_errors": lambda s: s.roots.listing_errors, "list_columns": lambda s: s.roots.list_columns,
                 "ann_files": lambda s: s.ann.files, "encoder": lambda s: s.encoder}


@pytest.mark.parametrize("key,value", OLDER_OBJECTS)
def test_object_values_older_versions_wrote_are_read_as_written(key, value):
    assert OBJECT_FIELDS[key](state.decode([(key, json.dumps(value))])) == value
    assert OBJECT_FIELDS[key](state.decode([(key, "null")])) == OBJECT_FIELDS[key](state.IndexState())


# -- the ladder, step by step, on tiny catalogs ----------------------------------------------------------------

V2_FILES = """CREATE TABLE files (id INTEGER PRIMARY KEY AUTOINCREMENT, root TEXT NOT NULL, relpath TEXT NOT NULL,
    relpath_raw BLOB, size INTEGER NOT NULL, mtime FLOAT NOT NULL, sha256 VARCHAR(64), width INTEGER, height INTEGER,
    format VARCHAR(16), status VARCHAR(8) NOT NULL, reason TEXT, indexed_at FLOAT NOT NULL, vec_row INTEGER,
    UNIQUE (root, relpath))"""


def old_catalog(path: Path, version: int) -> Path:
    """A catalog as a version 1 or 2 writer left it before photos, phashes and keywords arrived: files without
    moments, tags, meta; three files, the one with id 3 deleted since (its id must never come back)."""
    conn = sqlite3.connect(path)
    with conn:
        conn.execute(V2_FILES)
        conn.execute("CREATE INDEX files_sha256 ON files (sha256)")
        conn.execute("CREATE TABLE tags (file_id INTEGER NOT NULL, label TEXT NOT NULL, probability FLOAT NOT NULL, "
                     "PRIMARY KEY (file_id, label))")
        conn.execute("CREATE TABLE meta (key VARCHAR(64) PRIMARY KEY, value TEXT NOT NULL)")
        for i in (1, 2, 3):
            conn.execute("INSERT INTO files (root, relpath, size, mtime, sha256, status, indexed_at, vec_row) "
                         "VALUES ('/r', ?, 1, 1.0, ?, 'indexed', 0.0, ?)", (f"beach_{i}.jpg", f"{i:064x}", i - 1))
        conn.execute("DELETE FROM files WHERE id = 3")
        conn.execute("INSERT INTO tags VALUES (1, 'sunset', 0.9)")
        conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (json.dumps(version),))
    conn.close()
    return path


def tables(path: Path) -> set[str]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return {n for (n,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    finally:
        conn.close()


def test_the_ladder_is_numbered_one_step_per_version():
    assert [s.version for s in migrate.STEPS] == list(range(migrate.OLDEST + 1, migrate.LATEST + 1))
    assert [s.version for s in migrate.pending(1)] == list(range(2, migrate.LATEST + 1))
    assert migrate.pending(migrate.LATEST) == [] and migrate.pending(None) == []


def test_step_2_changes_nothing_on_disk(tmp_path):
    path = old_catalog(tmp_path / "c.db", 1)
    before = dump(path)
    db = create_engine(URL.create("sqlite", database=str(path)))
    with db.begin() as conn:
        migrate.STEPS[0].apply(conn)
    db.dispose()
    assert dump(path) == before


def test_step_3_adds_moments_text_and_every_table_keeping_ids(tmp_path):
    path = old_catalog(tmp_path / "c.db", 2)
    db = create_engine(URL.create("sqlite", database=str(path)))
    with db.begin() as conn:
        migrate.STEPS[1].apply(conn)
    db.dispose()
    assert {"photos", "phashes", "keywords", "keywords_trigram", "vector_chunks", "pending_vectors"} <= tables(path)
    conn = sqlite3.connect(path)
    assert [r[0] for r in conn.execute("SELECT id FROM files ORDER BY id")] == [1, 2]
    assert conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'files'").fetchone()[0] == 3
    assert "ocr" in [r[1] for r in conn.execute("PRAGMA table_info(photos)")]
    # then the digest, the address's seal and the field seal, which steps 14, 17 and 24 fill (migrate._digests,
    # _vec_seals, _file_seals): step 3 makes the table with catalog.files' columns
    assert [r[1] for r in conn.execute("PRAGMA table_info(files)")][-6:] == ["moment", "t", "t_end", "digest",
                                                                             "vec_seal", "field_seal"]
    conn.close()


def test_a_writer_upgrades_an_old_catalog_and_a_reader_reads_it_as_it_stands(tmp_path):
    path = old_catalog(tmp_path / "c.db", 2)
    before = dump(path)
    reader = catalog.connect(path, readonly=True)
    with reader.connect() as conn:
        schema = migrate.schema_of(conn)
        assert (schema.version, schema.moments, schema.photos, schema.keywords, schema.phashes) == (2, False, False,
                                                                                                   False, False)
        assert [(r.id, r.moment, r.t) for r in catalog.indexed_files(conn)] == [(1, 0, None), (2, 0, None)]
        assert catalog.photos_of(conn, [1]) == {} and catalog.keyword_search(conn, ["beach"], 5) == []
        assert catalog.phashes_of(conn) == {}
    reader.dispose()
    assert dump(path) == before  # the reader wrote nothing
    writer = catalog.connect(path)
    writer.dispose()
    reader = catalog.connect(path, readonly=True)
    with reader.connect() as conn:
        assert state.read(conn).schema_version == migrate.LATEST and migrate.schema_of(conn) == migrate.CURRENT
        assert state.read(conn).index_id is not None
        assert catalog.has_keywords(conn) and catalog.has_photos(conn) and catalog.has_phashes(conn)
    reader.dispose()


def test_a_newer_catalog_is_refused_by_readers_and_writers_in_one_line(v3):
    db = v3 / ".alignsearch" / "catalog.db"
    conn = sqlite3.connect(db)
    with conn:
        conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (json.dumps(migrate.LATEST + 1),))
    conn.close()
    before = dump(db)
    for args in (["query", "red", "--index", v3 / ".alignsearch", "--model", v3 / "model"],
                 ["index", "--index", v3 / ".alignsearch", "--model", v3 / "model", "--device", "cpu"],
                 ["info", "--index", v3 / ".alignsearch"]):
        out = run(*args, code=IndexDamagedError.exit_code)
        line = [x for x in out.output.splitlines() if "schema version" in x]
        assert len(line) == 1 and f"schema version {migrate.LATEST + 1} is not supported" in line[0] and \
            "upgrade alignsearch" in line[0], out.output
    assert dump(db) == before


def test_an_upgrade_killed_half_way_leaves_the_old_version_whole(tmp_path, monkeypatch):
    path = old_catalog(tmp_path / "c.db", 1)
    before = dump(path)
    real = migrate.STEPS[1]

    def half(conn):
        real.apply(conn)  # every table made, files rebuilt, keywords filled: then the process dies
        raise KeyboardInterrupt

    monkeypatch.setattr(migrate, "STEPS", (migrate.STEPS[0], replace(real, apply=half)))
    with pytest.raises(KeyboardInterrupt):
        catalog.connect(path)
    assert dump(path) == before
    monkeypatch.undo()
    catalog.connect(path).dispose()  # the next writer upgrades it whole
    assert "keywords_trigram" in tables(path)


def test_an_upgrade_to_13_killed_half_way_leaves_version_12_whole(tmp_path, monkeypatch):
    """Step 13 (catalog.links) applied, then the process dies before the version is written: the catalog is the
    schema 12 one it was, and the next writer upgrades it whole."""
    path = old_catalog(tmp_path / "c.db", 1)
    catalog.connect(path).dispose()
    conn = sqlite3.connect(path)
    with conn:  # the catalog as schema 12 left it
        conn.execute("DROP TABLE links")
        conn.execute("UPDATE meta SET value = '12' WHERE key = 'schema_version'")
    conn.close()
    before = dump(path)
    at = [s.version for s in migrate.STEPS].index(13)
    step = migrate.STEPS[at]

    def half(conn):
        step.apply(conn)
        raise KeyboardInterrupt

    monkeypatch.setattr(migrate, "STEPS", (*migrate.STEPS[:at], replace(step, apply=half), *migrate.STEPS[at + 1:]))
    with pytest.raises(KeyboardInterrupt):
        catalog.connect(path)
    assert dump(path) == before and "links" not in tables(path)
    monkeypatch.undo()
    catalog.connect(path).dispose()
    assert "links" in tables(path)
    db = catalog.connect(path, readonly=True)
    with db.connect() as c:
        assert state.read(c).schema_version == migrate.LATEST
    db.dispose()


def test_a_search_never_looks_at_the_schema(v3):
    """What a reader may rely on comes from the version, once per connection: a search runs no
    sqlite_master probe (one per keyword search and per photo-field read before)."""
    import alignsearch

    engine = alignsearch.open(v3 / ".alignsearch", model=str(v3 / "model"), device="cpu", backend="torch")
    statements: list[str] = []
    with engine.db.connect() as conn:  # the pool's connections, traced
        conn.connection.dbapi_connection.set_trace_callback(statements.append)
    engine.search(text="zanzibar harbour", k=5, mode="hybrid")
    engine.search(text="zanzibar", k=5, mode="auto")  # keyword evidence: photos' caption and text, read in SQL
    engine.search(text="sky", k=5, format="png")
    assert any("json_each" in s and "caption" in s for s in statements)  # keywords._evidence_texts ran
    assert not [s for s in statements if "sqlite_master" in s or "table_info" in s]


@pytest.mark.parametrize("name", ["what?", "hash#tag", "per%20cent", "two words"])
def test_a_catalog_in_a_folder_with_url_characters_opens_read_only(v3, tmp_path, name):
    from alignsearch.encoders.coldstart import peek_model
    from alignsearch.surfaces.client import local_index_id

    ix = Path(shutil.copytree(v3 / ".alignsearch", tmp_path / name / ".alignsearch"))
    expected = sqlite3.connect(ix / "catalog.db").execute("SELECT value FROM meta WHERE key = 'index_id'").fetchone()
    assert local_index_id(ix) == json.loads(expected[0])  # None before: an f-string URL cut the path at '?'
    assert peek_model(ix)["fingerprint"] == EXPECTED["info"]["fingerprint"]
    db = catalog.connect(ix / "catalog.db", readonly=True)
    with db.connect() as conn:
        assert catalog.counts(conn)[catalog.INDEXED] == 7
    db.dispose()
