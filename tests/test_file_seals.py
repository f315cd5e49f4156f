"""Each files row's width, height, size and mtime are sealed with its id (files.field_seal, rowdigest.FILE_SEALED under
FILE_SEED, schema 24).

The snapshot's filter columns (search/columns.py) read every indexed file's width, height, size and mtime, not only
a hit's row, and checked none of them against the row's BLAKE2 digest: a byte flipped in place in a width left its
file out of `--where "width >= 1"`, exit 0. The seal is numpy arithmetic the load checks for every row, as the photos
rows' (schema 23, tests/test_field_seals.py); verify reports a row off it, and --repair seals again a row whose
fields hold their digest.
"""

import sqlite3
import struct
from pathlib import Path

import pytest
from sqlalchemy import select

from conftest import run
from helpers import as_schema, catalog_rows, filter_columns, one_line_damage, query_hits, seal_found_and_resealed, vector_index
from alignsearch.errors import IndexDamagedError
from alignsearch.storage import catalog, migrate, rowdigest
from alignsearch.storage.paths import DB_FILE

ROW = {"width": 640, "height": 480, "size": 123_456, "mtime": 1.6e9}
FILE_SEAL = {"names": rowdigest.FILE_SEALED, "seed": rowdigest.FILE_SEED}
# a filter every file of the index matches, by field
MATCH_ALL = {"width": "width >= 1", "height": "height >= 1", "size": "size >= 1", "mtime": "mtime >= 1970-01-02"}


def _sign_flipped(value):
    """The value with its sign bit flipped as SQLite stores it: a REAL's top bit, or an integer's in the fewest bytes
    SQLite keeps it in (1, 2, 3, 4, 6 or 8): a flipped bit of the page makes a width of 64 read as -64."""
    if isinstance(value, float):
        data = bytearray(struct.pack("<d", value))
        data[7] ^= 0x80
        return struct.unpack("<d", bytes(data))[0]
    bits = next(8 * n for n in (1, 2, 3, 4, 6, 8) if -(1 << (8 * n - 1)) <= value < 1 << (8 * n - 1))
    return value - (1 << (bits - 1)) if value >= 0 else value + (1 << (bits - 1))


def _flip_in_place(db_path: Path, name: str, file_id: int | None = None) -> None:
    """A file's `name` with its sign bit flipped in place, its digest and seal left as written (the smallest id's
    row where none is given)."""
    with sqlite3.connect(db_path) as conn:
        if file_id is None:
            (file_id,) = conn.execute("SELECT min(id) FROM files").fetchone()
        (value,) = conn.execute(f"SELECT {name} FROM files WHERE id = ?", (file_id,)).fetchone()
        conn.execute(f"UPDATE files SET {name} = ? WHERE id = ?", (_sign_flipped(value), file_id))
    conn.close()


# -- the seal itself (pure) -------------------------------------------------------------------------------------

def test_a_files_seal_is_not_a_photos_seal_of_the_same_key_and_values():
    values = [1.0, 2.0, 3.0, 4.0]
    as_files = rowdigest.field_seals([7], *([v] for v in values), seed=rowdigest.FILE_SEED)
    as_photos = rowdigest.field_seals([7], *([v] for v in values))
    assert as_files.tolist() != as_photos.tolist()
    assert rowdigest.FILE_SEED != rowdigest.PHOTO_SEED


def test_a_writers_seal_of_one_row_is_the_readers_seal_of_it_in_numpy():
    """field_seal (Python integers, a writer's row) and field_seals (numpy, every row a reader loads) agree, on the
    values a reader reads back: NULL and NaN one, -0.0 as 0.0, an int as its float, negative and large keys."""
    rows = [(12, ROW), (1, {}), (-5, {"width": None, "height": -0.0, "size": 2**53 + 1, "mtime": float("nan")}),
            (2**62, {"width": -64, "height": 0, "size": 0, "mtime": -1.5e-300}), (7, {"mtime": 0.0})]
    for names, seed in ((rowdigest.FILE_SEALED, rowdigest.FILE_SEED), (rowdigest.PHOTO_SEALED, rowdigest.PHOTO_SEED)):
        keyed = [(k, {n: r.get(n) for n in names} if names is rowdigest.FILE_SEALED else
                  {p: r.get(n) for p, n in zip(names, rowdigest.FILE_SEALED)}) for k, r in rows]
        batch = rowdigest.field_seals([k for k, _ in keyed], *([r.get(n) for _, r in keyed] for n in names), seed=seed)
        assert batch.tolist() == [rowdigest.field_seal(k, r, names=names, seed=seed) for k, r in keyed]
    assert rowdigest.field_seal(7, {"mtime": 0.0}, **FILE_SEAL) == rowdigest.field_seal(7, {"mtime": -0.0}, **FILE_SEAL)
    assert rowdigest.field_seal(7, {"width": 3}, **FILE_SEAL) == rowdigest.field_seal(7, {"width": 3.0}, **FILE_SEAL)


def test_every_one_bit_change_of_a_sealed_field_or_the_id_changes_the_seal():
    written = rowdigest.field_seal(12, ROW, **FILE_SEAL)
    for name in rowdigest.FILE_SEALED:
        assert rowdigest.field_seal(12, {**ROW, name: _sign_flipped(ROW[name])}, **FILE_SEAL) != written, name
        assert rowdigest.field_seal(12, {**ROW, name: ROW[name] ^ 1 if isinstance(ROW[name], int) else
                                         ROW[name] + 1}, **FILE_SEAL) != written, name
        assert rowdigest.field_seal(12, {**ROW, name: None}, **FILE_SEAL) != written, name
    for key in (13, 0, 12 + 256, -12):
        assert rowdigest.field_seal(key, ROW, **FILE_SEAL) != written, key
    swapped = {**ROW, "width": ROW["height"], "height": ROW["width"]}  # the fields in their order
    assert rowdigest.field_seal(12, swapped, **FILE_SEAL) != written


def test_the_files_seal_is_pinned():
    """Catalogs at schema 24 hold these: a change of the formula or the seed makes every files row damage."""
    assert rowdigest.field_seal(12, ROW, **FILE_SEAL) == -923929629976280874
    assert rowdigest.field_seal(1, {}, **FILE_SEAL) == 6829372760085113375


# -- the writer -------------------------------------------------------------------------------------------------

def test_insert_file_seals_the_row_it_writes(tmp_path):
    db = catalog.connect(tmp_path / DB_FILE)
    try:
        with db.begin() as conn:
            file_id = catalog.upsert_file(conn, {"root": "/r", "relpath": "a.jpg", "size": 10, "mtime": 1.5,
                                                 "width": 3, "height": None, "format": "JPEG",
                                                 "status": catalog.INDEXED, "vec_row": 0})
            (seal,) = conn.execute(select(catalog.files.c.field_seal).where(catalog.files.c.id == file_id)).one()
            assert seal == rowdigest.field_seal(file_id, {"size": 10, "mtime": 1.5, "width": 3}, **FILE_SEAL)
            assert catalog.file_seals_off(conn) == []
    finally:
        db.dispose()


def test_a_batchs_seals_are_written_together_before_it_commits(tmp_path):
    """The indexer's writer collects its batch's seals (insert_file's seals=) and writes them in one executemany
    (seal_files) in the same transaction: each row then holds its own seal, as one written alone does."""
    db = catalog.connect(tmp_path / DB_FILE)
    try:
        with db.begin() as conn:
            seals: list = []
            ids = [catalog.upsert_file(conn, {"root": "/r", "relpath": f"{i}.jpg", "size": 10 + i, "mtime": 1.5 * i,
                                              "width": 3 + i, "height": None, "format": "JPEG",
                                              "status": catalog.INDEXED, "vec_row": i}, seals=seals)
                   for i in range(3)]
            assert [file_id for _, file_id in seals] == ids
            assert conn.execute(select(catalog.files.c.field_seal)).scalars().all() == [None] * 3  # not yet written
            catalog.seal_files(conn, seals)
            assert catalog.file_seals_off(conn) == []
        with db.connect() as conn:
            assert sorted(conn.execute(select(catalog.files.c.field_seal, catalog.files.c.id)).all()) == sorted(seals)
    finally:
        db.dispose()


def test_no_writer_changes_a_sealed_files_field_without_its_seal(tmp_path):
    vector_index(tmp_path, 3, 4)
    db = catalog.connect(tmp_path / DB_FILE)
    try:
        (file_id,) = catalog_rows(tmp_path, "SELECT min(id) FROM files")[0]
        for name in rowdigest.FILE_SEALED:
            with db.begin() as conn, pytest.raises(ValueError, match="insert_file"):
                catalog._change(conn, catalog.files, [(file_id, {name: 1})])
        with db.begin() as conn:
            catalog.mark_failed(conn, [file_id], "unreadable")  # status and reason are not sealed: the seal holds
            assert catalog.file_seals_off(conn) == []
    finally:
        db.dispose()


# -- the filter columns -----------------------------------------------------------------------------------------

def _photos_for_all(db_path: Path) -> None:
    db = catalog.connect(db_path)
    with db.begin() as conn:
        for (i,) in conn.execute(select(catalog.files.c.id)).all():
            catalog.set_photo(conn, i, f"{i}.jpg", {"taken": 1.5e9, "lat": 1.0, "lon": 2.0})
    db.dispose()


@pytest.mark.parametrize("photos", [False, True], ids=["no-photos", "photos"])
@pytest.mark.parametrize("name", rowdigest.FILE_SEALED)
def test_the_columns_refuse_a_flipped_width_height_size_or_mtime(tmp_path, name, photos):
    """Before: the file's value read as it stood (a filter on it left the file out, exit 0)."""
    vector_index(tmp_path, 6, 4)
    if photos:  # the files' fields then follow the photos' in the columns read
        _photos_for_all(tmp_path / DB_FILE)
    assert filter_columns(tmp_path / DB_FILE).column("width").tolist() == [640.0] * 6
    _flip_in_place(tmp_path / DB_FILE, name)
    for readonly in (False, True):
        with pytest.raises(IndexDamagedError, match="damaged"):
            filter_columns(tmp_path / DB_FILE, readonly=readonly)


def test_the_columns_refuse_a_files_row_whose_seal_alone_flipped(tmp_path):
    vector_index(tmp_path, 4, 4)
    with sqlite3.connect(tmp_path / DB_FILE) as conn:
        conn.execute("UPDATE files SET field_seal = (field_seal | 1) - (field_seal & 1) WHERE id = (SELECT max(id) FROM files)")
    conn.close()
    with pytest.raises(IndexDamagedError, match="damaged"):
        filter_columns(tmp_path / DB_FILE)


def test_a_reader_of_schema_23_loads_the_columns_unsealed(tmp_path):
    """An older catalog has no files.field_seal: a reader (it never upgrades) shows it NULL through its files view
    (select(files) names every column) and loads the columns without it."""
    vector_index(tmp_path, 6, 4)
    with sqlite3.connect(tmp_path / DB_FILE) as conn:
        as_schema(conn, 23)
    conn.close()
    assert filter_columns(tmp_path / DB_FILE, readonly=True).column("width").tolist() == [640.0] * 6
    db = catalog.connect(tmp_path / DB_FILE, readonly=True)
    try:
        with db.connect() as conn:
            assert not migrate.schema_of(conn).file_seals
            rows = catalog.get_files(conn, [i for (i,) in conn.execute(select(catalog.files.c.id))])
            assert len(rows) == 6 and {r.field_seal for r in rows.values()} == {None}
            assert catalog.file_seals_off(conn) == []
    finally:
        db.dispose()


def test_a_reader_opened_at_23_reads_on_once_a_writer_upgraded_the_catalog(tmp_path):
    """A reader open for long (`serve`) prepared its connection at 23 (a files view adding a NULL field_seal); a
    writer upgrades the catalog to 24 under it. The connection is made anew at its next checkout: it reads the rows
    and checks the new seals (a flip after the upgrade refused), where one kept at 23 checked none."""
    vector_index(tmp_path, 6, 4)
    with sqlite3.connect(tmp_path / DB_FILE) as conn:
        as_schema(conn, 23)
    conn.close()
    from alignsearch.search.columns import Columns

    reader = catalog.connect(tmp_path / DB_FILE, readonly=True)
    try:
        assert len(Columns(reader)) == 6
        catalog.connect(tmp_path / DB_FILE).dispose()  # a writer upgrades it
        assert catalog_rows(tmp_path, "SELECT count(*) FROM files WHERE field_seal IS NULL") == [(0,)]
        with reader.connect() as conn:
            assert migrate.schema_of(conn).file_seals
            ids = [i for (i,) in conn.execute(select(catalog.files.c.id))]
            assert len(catalog.get_files(conn, ids)) == 6
        assert Columns(reader).column("width").tolist() == [640.0] * 6
        _flip_in_place(tmp_path / DB_FILE, "width", ids[3])
        with pytest.raises(IndexDamagedError, match="damaged"):
            Columns(reader)
    finally:
        reader.dispose()


# -- the upgrade from schema 23 ---------------------------------------------------------------------------------

def test_the_upgrade_to_24_seals_healthy_rows_and_never_a_damaged_one(tmp_path):
    vector_index(tmp_path, 6, 4)
    with sqlite3.connect(tmp_path / DB_FILE) as conn:
        as_schema(conn, 23)
        (damaged,) = conn.execute("SELECT min(id) FROM files").fetchone()
        # a width flipped before the upgrade: off its digest, which the seal must not bless
        conn.execute("UPDATE files SET width = 1 WHERE id = ?", (damaged,))
    conn.close()
    assert filter_columns(tmp_path / DB_FILE, readonly=True).column("width").tolist() == [1.0] + [640.0] * 5  # unchecked
    catalog.connect(tmp_path / DB_FILE).dispose()  # a writer upgrades it
    assert catalog_rows(tmp_path, "SELECT value FROM meta WHERE key = 'schema_version'") == [(str(migrate.LATEST),)]
    assert catalog_rows(tmp_path, "SELECT id FROM files WHERE field_seal IS NULL") == [(damaged,)]
    with pytest.raises(IndexDamagedError, match="damaged"):
        filter_columns(tmp_path / DB_FILE)
    db = catalog.connect(tmp_path / DB_FILE)
    try:
        with db.begin() as conn:
            assert catalog.off_digest(conn) == [damaged]  # verify reads it again; --repair's seal leaves it off
            assert migrate.seal_file_fields(conn.connection.dbapi_connection) == 0
    finally:
        db.dispose()


def test_the_upgrade_to_24_leaves_a_width_no_writer_stores_unsealed(tmp_path):
    """A text width whose digest holds (damaged before step 14, which digested the rows as they stood): left unsealed,
    never a ValueError (exit 1) in every writer's upgrade; the columns say it is malformed."""
    vector_index(tmp_path, 4, 4)
    with sqlite3.connect(tmp_path / DB_FILE) as conn:
        as_schema(conn, 23)
        (file_id,) = conn.execute("SELECT min(id) FROM files").fetchone()
        conn.execute("UPDATE files SET width = 'wide' WHERE id = ?", (file_id,))
        migrate.digest_rows(conn)
    conn.close()
    catalog.connect(tmp_path / DB_FILE).dispose()  # a writer upgrades it
    assert catalog_rows(tmp_path, "SELECT id FROM files WHERE field_seal IS NULL") == [(file_id,)]
    with pytest.raises(IndexDamagedError, match="damaged"):
        filter_columns(tmp_path / DB_FILE)


# -- the commands -----------------------------------------------------------------------------------------------

@pytest.mark.slow  # a flip and two queries on a copy of an index
@pytest.mark.parametrize("name", ["width", "size", "mtime"])
def test_a_filter_over_a_flipped_files_field_is_damage(indexed_images, name):
    """Before: 11 hits of 12, exit 0 (the file whose field flipped left out)."""
    _, ix = indexed_images(12)
    where = ["--where", MATCH_ALL[name]]
    assert query_hits(ix, *where) == 12
    _flip_in_place(ix / DB_FILE, name)
    one_line_damage(query_hits(ix, *where, code=7))


@pytest.mark.slow  # verifies, a repair and queries on a copy of an index
def test_verify_reports_a_files_seal_flipped_alone_and_repair_seals_it_again(indexed_images):
    _, ix = indexed_images(12)
    where = ["--where", MATCH_ALL["width"]]
    with sqlite3.connect(ix / DB_FILE) as conn:  # the fields and their digest as written: the seal alone damaged
        conn.execute("UPDATE files SET field_seal = (field_seal | 1) - (field_seal & 1) WHERE id = (SELECT min(id) FROM files)")
    conn.close()
    seal_found_and_resealed(ix, where, found="the rows of 1 files are off the seal filters check",
                            resealed="sealed the rows of 1 files again")


@pytest.mark.slow  # a verify on a copy of an index
def test_verify_reads_a_flipped_width_again_and_does_not_seal_it(indexed_images):
    """A width off its digest is a row to read again (off_digest), not a seal to write anew over it."""
    _, ix = indexed_images(12)
    _flip_in_place(ix / DB_FILE, "width")
    out = run("verify", "--skip-model", "--index", ix, code=7).output
    assert "the rows of 1 files are not as written" in out and "off the seal" not in out, out


@pytest.mark.slow  # a video indexed, a flip and two searches
def test_a_filter_over_a_flipped_moment_time_is_damage(tmp_path, tiny_model):
    """A video moment's t and t_end are read for every moment by the filter columns (`--media video` is `t >= 0`),
    and were checked by neither a seal nor their digest: a moment whose t flipped sign left `--media video`, exit 0."""
    import alignsearch
    from helpers import make_video
    from indexer.job import index_folders

    folder = tmp_path / "videos"
    folder.mkdir()
    make_video(folder / "clip.mp4", [(1, 3), (2, 3)])
    ix = tmp_path / "ix"
    index_folders([folder], ix, model=str(tiny_model), device="cpu", workers=0)
    with alignsearch.open(ix) as engine:
        moments = len(engine.search(text="blue sky", media="video", k=10))
    assert moments >= 2
    (file_id,) = catalog_rows(ix, "SELECT max(id) FROM files WHERE t > 0")[0]
    _flip_in_place(ix / DB_FILE, "t", file_id)
    with alignsearch.open(ix) as engine, pytest.raises(IndexDamagedError, match="damaged"):
        engine.search(text="blue sky", media="video", k=10)


@pytest.mark.slow  # a flip and two queries on a copy of an index
def test_a_filter_over_a_files_row_whose_status_flipped_is_damage(indexed_images):
    """A byte flipped in the status of a files row ('indexed' read as 'indexee', in the file itself): the filter
    columns read only the rows whose status is 'indexed', so the file left every filtered answer, exit 0 with 11 hits
    of 12 (a search with no filter refused it at the hit's row)."""
    import re

    from helpers import catalog_pages, checkpointed_ids

    _, ix = indexed_images(12)
    where = ["--where", MATCH_ALL["width"]]
    assert query_hits(ix, *where) == 12
    db = ix / DB_FILE
    checkpointed_ids(db, "SELECT id FROM files")  # the WAL copied back: the page flipped is the one read
    data = bytearray(db.read_bytes())
    _, _, _, first, end = catalog_pages(db)["files"][0]
    at = re.compile(rb"indexed(?!-)").search(bytes(data), first, end).start()  # a status, not the folder's name
    data[at + 6] ^= 0x01
    db.write_bytes(bytes(data))
    assert len(catalog_rows(ix, "SELECT id FROM files WHERE status = 'indexee'")) == 1
    result = query_hits(ix, *where, code=7)
    assert result.output.strip().splitlines() == [result.output.strip()] and "damaged" in result.output, result.output


def test_a_file_indexed_twice_in_one_batch_keeps_the_later_rows_seal(tmp_path):
    """Two items of one writer batch at one (root, relpath): upsert_file deletes the first row before seal_files
    runs, so its (seal, id) pair updates no row (ids are never reused: sqlite_autoincrement); the row kept is the
    second's, sealed with its own values."""
    db = catalog.connect(tmp_path / DB_FILE)
    try:
        with db.begin() as conn:
            seals: list = []
            first, second = (catalog.upsert_file(conn, {"root": "/r", "relpath": "a.jpg", "size": size, "mtime": 1.5,
                                                        "width": 3, "height": 4, "status": catalog.INDEXED}, seals=seals)
                             for size in (10, 11))
            catalog.seal_files(conn, seals)
        with db.connect() as conn:
            kept = conn.execute(select(catalog.files.c.id, catalog.files.c.field_seal)).all()
            assert first != second and kept == [(second, seals[1][0])] and catalog.file_seals_off(conn) == []
    finally:
        db.dispose()


@pytest.mark.slow  # two index runs of 6 photos, one killed
@pytest.mark.parametrize("nth", [1, 2])
def test_kill_9_after_a_batchs_seals_leaves_no_row_unsealed(tmp_path, tiny_model, nth):
    """kill -9 once the nth batch's seal_files returned, before that batch commits: the batches before it are there
    sealed, its rows are not there at all (no row committed without its seal), and the next run finishes the job."""
    from conftest import index_json, make_images
    from helpers import killed_at_call, verify_problems

    root, ix = make_images(tmp_path / "photos", 6)[0].parent, tmp_path / "ix"
    proc = killed_at_call("alignsearch.storage.catalog:seal_files", nth, {}, "index", root, "--index", ix,
                          "--model", tiny_model, "--device", "cpu", "--workers", "0", "--batch-size", "2")
    assert proc.returncode == -9, proc.stderr[-3000:]
    db = catalog.connect(ix / DB_FILE, readonly=True)
    try:
        with db.connect() as conn:
            rows = conn.execute(select(catalog.files.c.field_seal)).scalars().all()
            assert len(rows) == 2 * (nth - 1) and None not in rows and catalog.file_seals_off(conn) == []
    finally:
        db.dispose()
    assert verify_problems(ix) == []
    assert index_json(ix, "--device", "cpu")["index"]["vectors"] == 6 and verify_problems(ix) == []
