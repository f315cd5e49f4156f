"""Each photos row's date and place are sealed with its key (photos.field_seal, rowdigest.field_seal, schema 23).

The snapshot's filter columns (search/columns.py) read every indexed file's taken, lat and lon, not only a hit's row,
and checked none of them against the row's BLAKE2 digest (too slow for every row at each load): a byte flipped in
place in a date or a latitude left its file out of --after or --near, exit 0. The seal is numpy arithmetic the load
checks for every row; verify reports a row off it, and --repair seals again a row whose fields hold their digest.
"""

import math
import sqlite3
import struct
from pathlib import Path

import numpy as np
import pytest

from conftest import run
from helpers import as_schema, catalog_rows, filter_columns, flip_a_photo_key, one_line_damage, query_hits, seal_found_and_resealed
from alignsearch.errors import IndexDamagedError
from alignsearch.storage import catalog, migrate, rowdigest
from alignsearch.storage.paths import DB_FILE

ROW = {"taken": 1.5e9, "taken_source": "exif:DateTime", "camera": "X", "lens": None, "lat": 1.25, "lon": -2.5,
       "caption": "a cat", "ocr": ""}


def _flipped(value: float, byte: int = 7) -> float:
    """The float whose one byte (little-endian place) has its lowest bit flipped: as a flipped bit of the page makes it."""
    data = bytearray(struct.pack("<d", value))
    data[byte] ^= 1
    return struct.unpack("<d", bytes(data))[0]


# -- the seal itself (pure) -------------------------------------------------------------------------------------

def test_a_batch_of_seals_is_each_rows_writer_seal():
    rows = [(12, ROW), (13, ROW), (7, {"taken": None, "lat": -0.0, "lon": 0.0}), (2**40, {"taken": -1.5})]
    batch = rowdigest.field_seals([k for k, _ in rows], *([r.get(n) for _, r in rows] for n in rowdigest.PHOTO_SEALED))
    assert batch.dtype == np.int64
    assert batch.tolist() == [rowdigest.field_seal(k, r) for k, r in rows]
    assert len(set(batch.tolist())) == len(rows)


def test_the_seal_is_of_what_a_reader_reads_back():
    """-0.0 reads back 0.0 (SQLite keeps a REAL with no fraction as an integer); NULL reads back None, NaN as NULL."""
    at = {"taken": 1.5e9, "lat": 0.0, "lon": 0.0}
    assert rowdigest.field_seal(3, {**at, "lat": -0.0, "lon": -0.0}) == rowdigest.field_seal(3, at)
    assert rowdigest.field_seal(3, {"taken": None}) == rowdigest.field_seal(3, {"taken": math.nan}) \
        == rowdigest.field_seal(3, {})
    assert rowdigest.field_seal(3, {"taken": None}) != rowdigest.field_seal(3, {"taken": 0.0})
    assert rowdigest.field_seal(3, {"taken": 7}) == rowdigest.field_seal(3, {"taken": 7.0})  # a REAL column's int


def test_every_one_bit_change_of_a_value_or_the_key_changes_the_seal():
    written = rowdigest.field_seal(12, ROW)
    for name in rowdigest.PHOTO_SEALED:
        for byte in range(8):
            assert rowdigest.field_seal(12, {**ROW, name: _flipped(ROW[name], byte)}) != written, (name, byte)
        assert rowdigest.field_seal(12, {**ROW, name: None}) != written, name
    for key in (13, 0, 12 + 256, -12):
        assert rowdigest.field_seal(key, ROW) != written, key
    swapped = {**ROW, "lat": ROW["lon"], "lon": ROW["lat"]}  # the fields in their order
    assert rowdigest.field_seal(12, swapped) != written


def test_the_seal_is_pinned():
    """Catalogs at schema 23 hold these: a change of the formula makes every photos row damage."""
    assert rowdigest.field_seal(12, ROW) == 6088619521596536392
    assert rowdigest.field_seal(1, {}) == 692649748498781848


# -- the filter columns -----------------------------------------------------------------------------------------

def _photo_index(tmp_path: Path) -> list[int]:
    """A synthetic index of 6 files, each with ROW's photo fields written by set_photo; their ids."""
    from sqlalchemy import select

    from helpers import vector_index

    vector_index(tmp_path, 6, 4)
    db = catalog.connect(tmp_path / DB_FILE)
    with db.begin() as conn:
        ids = [i for (i,) in conn.execute(select(catalog.files.c.id))]
        for i in ids:
            catalog.set_photo(conn, i, f"{i}.jpg", ROW)
    db.dispose()
    return ids


@pytest.mark.parametrize("name", ["lat", "lon", "taken"])
def test_the_columns_refuse_a_flipped_place_or_date(tmp_path, name):
    """Before: the file's latitude read as it stood (--near left it out, exit 0)."""
    ids = _photo_index(tmp_path)
    assert filter_columns(tmp_path / DB_FILE).column("lat").tolist() == [1.25] * 6
    with sqlite3.connect(tmp_path / DB_FILE) as conn:  # digest and seal left as written
        conn.execute(f"UPDATE photos SET {name} = ? WHERE file_id = ?", (_flipped(ROW[name]), ids[2]))
    conn.close()
    for readonly in (False, True):
        with pytest.raises(IndexDamagedError, match="damaged"):
            filter_columns(tmp_path / DB_FILE, readonly=readonly)


def test_the_columns_refuse_a_photo_row_moved_onto_another_indexed_files_id(tmp_path):
    """A photos row whose key moved to an indexed file without a row of its own joins that file: the seal covers the
    key."""
    ids = _photo_index(tmp_path)
    with sqlite3.connect(tmp_path / DB_FILE) as conn:
        conn.execute("DELETE FROM photos WHERE file_id = ?", (ids[3],))
        conn.execute("UPDATE photos SET file_id = ? WHERE file_id = ?", (ids[3], ids[2]))
    conn.close()
    with pytest.raises(IndexDamagedError, match="damaged"):
        filter_columns(tmp_path / DB_FILE)


def test_a_reader_of_schema_22_loads_the_columns_unsealed(tmp_path):
    """An older catalog has no photos.field_seal: a reader (it never upgrades) loads without it."""
    _photo_index(tmp_path)
    with sqlite3.connect(tmp_path / DB_FILE) as conn:
        as_schema(conn, 22)
    conn.close()
    cols = filter_columns(tmp_path / DB_FILE, readonly=True)
    assert cols.column("taken").tolist() == [1.5e9] * 6


def test_no_writer_changes_a_sealed_field_without_its_seal(tmp_path):
    ids = _photo_index(tmp_path)
    db = catalog.connect(tmp_path / DB_FILE)
    try:
        with db.begin() as conn, pytest.raises(ValueError, match="set_photo"):
            catalog._change(conn, catalog.photos, [(ids[0], {"lat": 3.0})])
        with db.begin() as conn:
            catalog.set_captions(conn, [(ids[0], "a dog")])  # a caption is not sealed: the seal still holds
            assert catalog.photo_seals_off(conn) == []
    finally:
        db.dispose()


# -- the commands -----------------------------------------------------------------------------------------------

def _placed(ix: Path) -> list[int]:
    """Every file of the index given ROW's date and place (set_photo, as an index run writes them); their ids."""
    from sqlalchemy import select

    db = catalog.connect(ix / DB_FILE)
    with db.begin() as conn:
        rows = conn.execute(select(catalog.files.c.id, catalog.files.c.relpath)).all()
        for i, relpath in rows:
            catalog.set_photo(conn, i, relpath, ROW)
    db.dispose()
    return [i for i, _ in rows]


@pytest.mark.slow  # a write and two queries on a copy of an index
def test_a_near_filter_over_a_flipped_latitude_is_damage(indexed_images):
    """Before: 11 hits of 12, exit 0 (the file whose latitude flipped left out)."""
    _, ix = indexed_images(12)
    ids = _placed(ix)
    near = ["--near", "1.25,-2.5,10"]
    assert query_hits(ix, *near) == 12
    with sqlite3.connect(ix / DB_FILE) as conn:
        # 1.25 read as 1.9e-05 (a bit of the exponent flipped): 139 km off, out of the filter (a flip that kept
        # it near left the file a hit, whose row photos_of checks)
        conn.execute("UPDATE photos SET lat = ? WHERE file_id = ?", (_flipped(1.25), ids[4]))
    conn.close()
    one_line_damage(query_hits(ix, *near, code=7))


@pytest.mark.slow  # two verifies, a repair and queries on a copy of an index
def test_verify_reports_a_seal_flipped_alone_and_repair_seals_it_again(indexed_images):
    _, ix = indexed_images(12)
    after = ["--after", "1970-01-02"]
    assert query_hits(ix, *after) == 12
    with sqlite3.connect(ix / DB_FILE) as conn:  # the fields and their digest as written: the seal alone damaged
        conn.execute("UPDATE photos SET field_seal = (field_seal | 1) - (field_seal & 1) WHERE file_id = (SELECT min(file_id) FROM photos)")
    conn.close()
    seal_found_and_resealed(ix, after, found="the photo rows of 1 files are off the seal filters check",
                            resealed="sealed the photo rows of 1 files again")


@pytest.mark.slow  # a write, a flip and queries on a copy of an index
def test_a_date_filter_over_a_photo_key_flipped_onto_another_files_is_damage(indexed_images):
    """A photos row's key flipped to the id of another file that has a row of its own: two rows of one key, out of
    the page's order, so the join's look-up of the row's own file misses it. That file was read without a date or
    place and left out of --after and --near: 11 hits of 12, exit 0 (verify's integrity check found it). The load
    counts the rows of indexed files' keys in a scan of the table too, which does not look them up."""
    _, ix = indexed_images(12)
    _placed(ix)
    args = ["--after", "1970-01-02", "--near", "1.25,-2.5,10"]
    assert query_hits(ix, *args) == 12
    flip_a_photo_key(ix / DB_FILE, onto_a_file=True)
    one_line_damage(query_hits(ix, *args, code=7))
    assert "is damaged" in run("verify", "--skip-model", "--index", ix, code=7).output


# -- the upgrade from schema 22 ---------------------------------------------------------------------------------

@pytest.mark.slow  # an upgrade, verifies and queries on copies of an index
def test_the_upgrade_to_23_seals_healthy_rows_and_never_a_damaged_one(indexed_images):
    after = ["--after", "1970-01-02"]
    for damaged in (False, True):
        _, ix = indexed_images(12)
        with sqlite3.connect(ix / DB_FILE) as conn:
            as_schema(conn, 22)
            if damaged:  # a date flipped before the upgrade: off its digest, which the seal must not bless
                conn.execute("UPDATE photos SET taken = 1.0 WHERE file_id = (SELECT min(file_id) FROM photos)")
        conn.close()
        if not damaged:
            assert query_hits(ix, *after) == 12  # read at 22: no seal to check
        catalog.connect(ix / DB_FILE).dispose()  # a writer upgrades it
        assert catalog_rows(ix, "SELECT value FROM meta WHERE key = 'schema_version'") == [(str(migrate.LATEST),)]
        unsealed = catalog_rows(ix, "SELECT count(*) FROM photos WHERE field_seal IS NULL")
        assert unsealed == [(int(damaged),)]
        if damaged:
            one_line_damage(query_hits(ix, *after, code=7))  # before: 11 hits, exit 0
            out = run("verify", "--skip-model", "--index", ix, code=7).output
            assert "the rows of 1 files are not as written" in out and "off the seal" not in out, out
        else:
            assert query_hits(ix, *after) == 12
            assert run("verify", "--skip-model", "--index", ix).output.startswith("ok: ")


def test_the_upgrade_to_23_leaves_a_date_no_writer_stores_unsealed(tmp_path):
    """A text date whose digest holds (damaged before step 14, which digested the rows as they stood): step 23 could
    not read it as a number, and the upgrade raised ValueError (exit 1) in every command that opens the catalog to
    write. It is left unsealed, and the catalog says what is malformed."""
    ids = _photo_index(tmp_path)
    with sqlite3.connect(tmp_path / DB_FILE) as conn:
        as_schema(conn, 22)
        conn.execute("UPDATE photos SET taken = 'about noon' WHERE file_id = ?", (ids[2],))
        migrate.digest_rows(conn)
    conn.close()
    catalog.connect(tmp_path / DB_FILE).dispose()  # a writer upgrades it
    assert catalog_rows(tmp_path, "SELECT value FROM meta WHERE key = 'schema_version'") == [(str(migrate.LATEST),)]
    assert catalog_rows(tmp_path, "SELECT file_id FROM photos WHERE field_seal IS NULL") == [(ids[2],)]
    db = catalog.connect(tmp_path / DB_FILE)
    try:
        with db.begin() as conn:
            assert catalog.malformed_values(conn) == [f"{DB_FILE} is damaged: 1 photo dates are not numbers as "
                                                      "alignsearch writes them"]
    finally:
        db.dispose()
    with pytest.raises(IndexDamagedError, match="photo dates are not numbers"):
        filter_columns(tmp_path / DB_FILE)
