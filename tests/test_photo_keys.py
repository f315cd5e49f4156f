"""A photos row's key (file_id, its rowid) is digested with its fields (rowdigest.PHOTO_KEYED_FIELDS, schema 21).

A rowid table has no second copy of its key and a page no checksum: the lowest bit of a photos row's key flipped
(12 -> 13, or 1 -> 0, the page's keys still in order, so SQLite's check passes) moved the row to an id no file has.
`query` and `similar` then showed the photo's date as none, exit 0, and `verify` said ok with a note of one leftover
row. A row of no file whose digest fails with its own key is that damage (exit 7); one whose digest holds is an old
version's leftover, as before (a note).
"""

import json
import sqlite3
from pathlib import Path

import pytest

from conftest import index_json, make_images, run
from helpers import as_schema, catalog_rows, flip_a_photo_key
from alignsearch.storage import catalog, migrate, rowdigest
from alignsearch.storage.paths import DB_FILE

ROW = {"taken": 1.5e9, "taken_source": "exif:DateTime", "camera": "X", "lens": None, "lat": 1.25, "lon": -2.5,
       "caption": "a cat", "ocr": ""}


def _one_line_damage(result) -> None:
    out = result.output.strip()
    assert out.splitlines() == [out], out  # one line, no traceback
    assert "catalog.db is damaged" in out and "alignsearch verify --repair" in out, out


def _taken(ix: Path) -> dict[str, float | None]:
    """{file name: the date a search shows}: every file a hit."""
    hits = json.loads(run("query", "red circle", "--index", ix, "-k", 12, "--json").stdout)["results"]
    return {h["path"].rsplit("/", 1)[-1]: h["taken"] for h in hits}


# -- the digest itself (pure) -----------------------------------------------------------------------------------

def test_the_photo_digest_covers_its_key():
    keyed = rowdigest.PHOTO_KEYED_FIELDS
    d = rowdigest.digest(keyed, {"file_id": 12, **ROW})
    assert rowdigest.holds(keyed, {"file_id": 12, **ROW}, d)
    for other in (13, 0, 12 + 256, None, "12"):  # a flipped bit, another byte, no key, the key as text
        assert not rowdigest.holds(keyed, {"file_id": other, **ROW}, d), other
    # a row digested without its key (schemas 14 to 20) never holds with it: step 21 digests it anew
    assert not rowdigest.holds(keyed, {"file_id": 12, **ROW}, rowdigest.digest(rowdigest.PHOTO_FIELDS, ROW))
    assert rowdigest.photo_fields(True) is keyed and rowdigest.photo_fields(False) is rowdigest.PHOTO_FIELDS
    # the key's field first, then the fields in their order: the reader's tuple (holds_shown) gives the same digest
    assert rowdigest.digest_of(keyed, [12, *(ROW[n] for n, _ in rowdigest.PHOTO_FIELDS)]) == d


def test_the_keyed_photo_digest_is_pinned():
    """The bytes of a keyed digest: the key encoded as an integer field before the others (catalogs at schema 21
    hold these; a change here makes every photo row damage)."""
    assert rowdigest.digest(rowdigest.PHOTO_KEYED_FIELDS, {"file_id": 12}) == "99f3c166e228692d"
    assert rowdigest.stored(rowdigest.PHOTO_KEYED_FIELDS, {"file_id": 12.0, "taken": 7}) == {"file_id": 12, "taken": 7.0}


# -- readers and verify -----------------------------------------------------------------------------------------

@pytest.mark.slow  # three commands on a copy of an index
def test_a_photo_row_whose_key_flipped_to_no_file_is_damage(indexed_images):
    photos, ix = indexed_images(12)
    written, read = flip_a_photo_key(ix / DB_FILE)
    assert catalog_rows(ix, f"SELECT count(*) FROM photos WHERE file_id = {read}") == [(1,)]
    # before: exit 0, the file's "taken" none; verify ok with a note of 1 leftover row
    _one_line_damage(run("query", "red circle", "--index", ix, "-k", 12, "--json", code=7))
    _one_line_damage(run("similar", photos / "img001.jpg", "--index", ix, "-k", 12, "--json", code=7))
    out = run("verify", "--skip-model", "--index", ix, code=7).output
    assert "1 photo rows name no file, their key not the one written" in out, out
    assert "rows name no file of the catalog" not in out, out  # damage, not a leftover's note


@pytest.mark.slow  # a repair and an index run
def test_verify_repair_drops_the_row_and_the_next_run_reads_the_fields_again(indexed_images, tiny_model):
    photos, ix = indexed_images(12)
    want = _taken(ix)
    written, _ = flip_a_photo_key(ix / DB_FILE)
    out = run("verify", "--repair", "--skip-model", "--index", ix).output
    assert "dropped 1 photo rows whose key was not the one written" in out, out
    assert run("verify", "--skip-model", "--index", ix).output.startswith("ok: ")
    index_json(ix, photos, "--model", tiny_model, "--device", "cpu")  # its photo fields filled (indexer/photos.py)
    assert catalog_rows(ix, f"SELECT count(*) FROM photos WHERE file_id = {written}") == [(1,)]
    assert _taken(ix) == want and None not in want.values()


@pytest.mark.slow  # three commands on a copy of an index
def test_a_leftover_photo_row_of_no_file_is_still_a_note(indexed_images):
    """A photos row an old version left behind a file it removed holds its digest, its key included: searches
    answer (exit 0) though a hit lacks its photo row, and verify notes the leftover, as before."""
    photos, ix = indexed_images(12)
    db = catalog.connect(ix / DB_FILE)
    with db.begin() as conn:
        catalog.set_photo(conn, 999, "gone.jpg", ROW)  # as a writer wrote it, then its file removed without it
        hidden = conn.exec_driver_sql("SELECT max(file_id) FROM photos WHERE file_id < 999").scalar()
        conn.exec_driver_sql("DELETE FROM photos WHERE file_id = ?", (hidden,))  # a hit with no row: the rare path
        assert catalog.photo_keys_off(conn) == []
    db.dispose()
    assert None in _taken(ix).values()  # exit 0: not yet filled, as a run killed before its fill leaves it
    run("similar", photos / "img001.jpg", "--index", ix, "-k", 12, "--json")
    out = run("verify", "--skip-model", "--index", ix).output
    assert "\nok: " in out and "rows name no file of the catalog (photos: 1," in out, out  # exit 0, a note


@pytest.mark.slow  # an index run and two commands
def test_a_photo_row_whose_key_flipped_onto_a_failed_files_id_is_damage(tmp_path, tiny_model):
    """A failed file (not an image) has a files row and no photos row: a key flipped onto its id names a file, so
    the look at the rows of no file (photo_keys_off) missed it, and a search showed the photo's date as none, exit 0
    (verify found it, a row off its digest). Readers show indexed files only: the rows of the others are read too."""
    lib, ix = tmp_path / "lib", tmp_path / "ix"
    make_images(lib, 6)
    (lib / "img000b.jpg").write_bytes(b"this is not an image")  # listed between img000 and img001: an id between
    index_json(ix, lib, "--model", tiny_model, "--device", "cpu")
    (failed,), = catalog_rows(ix, "SELECT id FROM files WHERE status = 'failed'")
    (victim,), = catalog_rows(ix, f"SELECT min(file_id) FROM photos WHERE file_id > {failed}")
    assert catalog_rows(ix, f"SELECT count(*) FROM photos WHERE file_id = {failed}") == [(0,)]
    with sqlite3.connect(ix / DB_FILE) as conn:  # as a flipped key byte moves it: the keys stay in order
        conn.execute("UPDATE photos SET file_id = ? WHERE file_id = ?", (failed, victim))
        assert conn.execute("PRAGMA integrity_check(photos)").fetchone()[0] == "ok"
    conn.close()
    # before: exit 0, the victim's "taken" none
    _one_line_damage(run("query", "red circle", "--index", ix, "-k", 12, "--json", code=7))
    run("verify", "--skip-model", "--index", ix, code=7)


# -- the upgrade from schema 20 ---------------------------------------------------------------------------------

def _as_version_20(ix: Path) -> None:
    """The catalog as alignsearch wrote it at schema 20: each photos row digested without its key."""
    with sqlite3.connect(ix / DB_FILE) as conn:
        as_schema(conn, 20)
    conn.close()


@pytest.mark.slow  # an upgrade, a flip and a query on a copy of an index
def test_the_upgrade_to_21_digests_each_photo_row_with_its_key(indexed_images):
    photos, ix = indexed_images(12)
    _as_version_20(ix)
    with sqlite3.connect(ix / DB_FILE) as conn:  # one row already off its digest (a flipped byte of its caption)
        off = conn.execute("SELECT min(file_id) FROM photos").fetchone()[0]
        conn.execute("UPDATE photos SET caption = 'x' || coalesce(caption, '') WHERE file_id = ?", (off,))
    conn.close()
    run("query", "red circle", "--index", ix, "-k", 12, "--json", code=7)  # read at 20: the keyless digest, off
    db = catalog.connect(ix / DB_FILE)  # a writer upgrades it
    db.dispose()
    assert catalog_rows(ix, "SELECT value FROM meta WHERE key = 'schema_version'") == [(str(migrate.LATEST),)]
    names = [name for name, _ in rowdigest.PHOTO_KEYED_FIELDS]
    for row in catalog_rows(ix, f"SELECT digest, {', '.join(names)} FROM photos"):
        keyed = rowdigest.holds_shown(rowdigest.PHOTO_KEYED_FIELDS, row[1:], row[0])
        assert keyed == (row[1] != off), row  # each re-digested with its key; the damaged row never blessed
    assert "the rows of 1 files are not as written" in run("verify", "--skip-model", "--index", ix, code=7).output
    with sqlite3.connect(ix / DB_FILE) as conn:  # the damaged row put right as a writer writes it
        conn.execute("DELETE FROM photos WHERE file_id = ?", (off,))
    conn.close()
    assert run("verify", "--skip-model", "--index", ix).output.startswith("ok: ")
    flip_a_photo_key(ix / DB_FILE)  # and from then on a flipped key is caught
    _one_line_damage(run("query", "red circle", "--index", ix, "-k", 12, "--json", code=7))


def test_a_reader_open_across_the_upgrade_to_21_checks_photo_rows_as_the_writer_digested_them(tmp_path):
    """A reader's connection learns the catalog's schema when it opens (migrate.reader_schema) and checks photos rows
    as that version digested them (no key before 21). A reader open for long (`serve`) across a writer's upgrade from
    20 read every photos row, now digested with its key, against the keyless digest: each photo refused as damaged
    (exit 7, a 500) until it restarted. A connection prepared for an older version is made anew once upgraded."""
    from sqlalchemy import select

    from helpers import vector_index

    vector_index(tmp_path, 3, 4)
    db_path = tmp_path / DB_FILE
    db = catalog.connect(db_path)
    with db.begin() as conn:
        ids = [i for (i,) in conn.execute(select(catalog.files.c.id))]
        for i in ids:
            catalog.set_photo(conn, i, f"{i}.jpg", ROW)
    db.dispose()
    with sqlite3.connect(db_path) as conn:
        as_schema(conn, 20)
    conn.close()
    reader = catalog.connect(db_path, readonly=True)
    try:
        with reader.connect() as conn:
            assert not migrate.schema_of(conn).photo_keys
            assert set(catalog.photos_of(conn, ids)) == set(ids)
        catalog.connect(db_path).dispose()  # a writer: upgraded, each photos row digested with its key
        with reader.connect() as conn:
            assert set(catalog.photos_of(conn, ids)) == set(ids) and catalog.off_digest(conn) == []
            assert migrate.schema_of(conn).photo_keys
    finally:
        reader.dispose()


# -- filters read the photos columns of every file, not the hits' rows ------------------------------------------

@pytest.mark.slow  # a flip and two queries on a copy of an index
def test_a_date_filter_over_a_photo_row_whose_key_flipped_is_damage(indexed_images):
    """A date filter reads each file's photo fields from the snapshot's columns (search/columns.py): the
    file whose row moved to an id of no file had no date there, so it was left out, and no hit
    lacked its row, so the check of the rows of no file (photos_of's rare path) never ran: fewer hits, exit 0."""
    photos, ix = indexed_images(12)
    args = ["--after", "1970-01-02"]  # every file's date
    assert len(json.loads(run("query", "red circle", "--index", ix, "-k", 12, "--json", *args).stdout)["results"]) == 12
    flip_a_photo_key(ix / DB_FILE)
    # before: 11 hits, exit 0 (the file whose row moved left out)
    _one_line_damage(run("query", "red circle", "--index", ix, "-k", 12, "--json", *args, code=7))


@pytest.mark.slow  # a copy of an index, two loads and a write
def test_the_columns_read_the_rows_of_no_indexed_file_only_where_some_lie(indexed_images, monkeypatch):
    """The filter columns load looked at the photos rows of no indexed file on every load (44 of 399 ms at 100k
    files): where every photos row is an indexed file's (the count of rows equals the count joined), none are there
    to read. An old version's leftover row (its digest holds: a note, not damage) is one: read, and no error."""
    from alignsearch.search.columns import Columns, all_joined

    assert all_joined(3, 3) and not all_joined(3, 4)
    _, ix = indexed_images(12)
    calls = []
    real = catalog.photo_keys_off
    monkeypatch.setattr(catalog, "photo_keys_off", lambda conn, **kw: calls.append(kw) or real(conn, **kw))
    db = catalog.connect(ix / DB_FILE)
    try:
        with db.connect() as conn:
            assert catalog.count_photos_scanned(conn)[0] > 0
        assert len(Columns(db)) == 12 and calls == []
        with db.begin() as conn:  # a row of no file, digested as a writer digests it: a leftover
            catalog.set_photo(conn, 10_000, "gone.jpg", ROW)
        assert len(Columns(db)) == 12 and calls == [{"unindexed": True}]
    finally:
        db.dispose()


@pytest.mark.slow  # a load of a copy of an index
def test_the_columns_of_a_catalog_with_no_indexed_file_are_empty_not_damage(indexed_images):
    """Every file failed (or none indexed yet): no rows to load. numpy cannot shape no rows to a width of -1, and the
    ValueError was read as a malformed value: "catalog.db is damaged", exit 7."""
    from alignsearch.search.columns import Columns

    _, ix = indexed_images(12)
    with sqlite3.connect(ix / DB_FILE) as conn:
        conn.execute("UPDATE files SET status = 'failed'")
    db = catalog.connect(ix / DB_FILE)
    try:
        cols = Columns(db)
        assert len(cols) == 0 and len(cols.column("taken")) == 0 and len(cols.column("lat")) == 0
    finally:
        db.dispose()


@pytest.mark.slow  # a flip and a load on a copy of an index
def test_the_columns_count_the_photos_rows_in_the_read_that_joined_them(indexed_images, monkeypatch):
    """The load compares the photos rows joined to indexed files with the count of all rows (all_joined), two
    statements: a writer forgetting a file between them (its row gone from the count, still in the join) made the
    numbers equal beside a row whose key flipped to no file, and the load skipped it (dates shown as none, exit 0).
    One read transaction: the count is of the rows the join read."""
    from alignsearch.errors import IndexDamagedError
    from alignsearch.search.columns import Columns

    _, ix = indexed_images(12)
    written, _ = flip_a_photo_key(ix / DB_FILE)
    real = catalog.count_photos_scanned

    def count_after_a_writer(conn):
        other = sqlite3.connect(ix / DB_FILE)  # a writer forgets another file, photos row and all
        try:
            with other:
                gone = other.execute("SELECT file_id FROM photos WHERE file_id != ? LIMIT 1",
                                     (written ^ 1,)).fetchone()[0]
                other.execute("DELETE FROM photos WHERE file_id = ?", (gone,))
                other.execute("DELETE FROM files WHERE id = ?", (gone,))
        finally:
            other.close()
        return real(conn)

    monkeypatch.setattr(catalog, "count_photos_scanned", count_after_a_writer)
    db = catalog.connect(ix / DB_FILE)
    try:
        with pytest.raises(IndexDamagedError, match="damaged"):
            Columns(db)
    finally:
        db.dispose()


@pytest.mark.slow  # a copy of an index, a load and three counts
def test_the_columns_count_the_photos_table_in_one_scan(indexed_images):
    """The load counted the photos rows twice, each a pass over the table: every row (all_joined), then the rows of
    indexed files in a scan (a key flipped onto another indexed file's id). One statement gives both: every row, a
    leftover of no file and a failed file's row too, and of them the rows of indexed files."""
    from sqlalchemy import event

    from alignsearch.search.columns import Columns

    _, ix = indexed_images(12)
    db = catalog.connect(ix / DB_FILE)
    counts = []
    event.listen(db, "before_cursor_execute",
                 lambda conn, cursor, statement, *args: counts.append(statement) if "count(" in statement else None)
    try:
        assert len(Columns(db)) == 12 and len(counts) == 1, counts
        with db.begin() as conn:
            catalog.set_photo(conn, 10_000, "gone.jpg", ROW)  # a leftover: a row of no file
            assert catalog.count_photos_scanned(conn) == (13, 12)
            failed = conn.exec_driver_sql("SELECT min(file_id) FROM photos").scalar_one()
            conn.exec_driver_sql("UPDATE files SET status = 'failed' WHERE id = ?", (failed,))
            assert catalog.count_photos_scanned(conn) == (13, 11)
    finally:
        db.dispose()


@pytest.mark.slow  # an update and two queries on a copy of an index
def test_a_date_filter_over_a_photo_row_off_its_digest_is_damage(indexed_images):
    """A photos row's date damaged in place (its digest no longer holds): a hit's row is checked (photos_of), but
    a date filter reads every file's date from the snapshot's columns, which read it unchecked, so the file was left
    out: 11 hits of 12, exit 0, where a search that shows it exits 7. The columns check each row's field seal
    (schema 23)."""
    photos, ix = indexed_images(12)
    args = ["--after", "1970-01-02"]  # every file's date
    with sqlite3.connect(ix / DB_FILE) as conn:  # as a flipped byte of the REAL makes it: the digest left as written
        conn.execute("UPDATE photos SET taken = 1.0 WHERE file_id = (SELECT min(file_id) FROM photos)")
    conn.close()
    _one_line_damage(run("query", "red circle", "--index", ix, "-k", 12, "--json", *args, code=7))
