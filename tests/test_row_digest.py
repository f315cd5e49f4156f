"""A flipped byte in a row's shown fields is damage a reader reports, never a value it shows (rowdigest.py, schema 14).

SQLite pages carry no checksum: a bit flipped inside a caption (`a harbour at dusk` read `a iarbour at dusk`), a
camera, a width or a date was shown as it stood with exit 0, and `verify` said ok, for no index holds a second
copy of such a value. Each files and photos row now carries a digest of its shown fields, written with them.
"""

import math
import sqlite3
import struct
from pathlib import Path

import pytest
from PIL import Image

from conftest import index_json, make_images, run
from helpers import catalog_rows, flip_in_table_page, killed_at
from alignsearch.errors import IndexDamagedError
from alignsearch.media import photometa
from alignsearch.storage import catalog, migrate, rowdigest
from alignsearch.storage.paths import DB_FILE

CAPTION, CAMERA, LENS, OCR = "a harbour at dusk", "Canon EOS R5", "RF24-70mm F2.8", "INVOICE 4711"


def _build(base: Path, tiny_model) -> None:
    photos = base / "photos"
    make_images(photos, 6)
    (photos / "img001.txt").write_text(CAPTION)  # a sidecar caption
    exif = Image.Exif()
    exif[photometa.MAKE], exif[photometa.MODEL] = "Canon", "EOS R5"
    sub = exif.get_ifd(photometa.EXIF_IFD)
    sub[photometa.DATETIME_ORIGINAL], sub[photometa.LENS_MODEL] = "2021:05:06 07:08:09", LENS
    gps = exif.get_ifd(photometa.GPS_IFD)
    gps[1], gps[2], gps[3], gps[4] = "N", (38.0, 42.0, 17.5), "W", (9.0, 8.0, 3.25)
    Image.new("RGB", (100, 90), (30, 160, 40)).save(photos / "img002.jpg", "JPEG", exif=exif)  # 1-byte width, height
    index_json(base / "ix", photos, "--model", tiny_model, "--device", "cpu")
    db = catalog.connect(base / "ix" / DB_FILE)  # text read in an image, stored as the OCR fill stores it
    with db.begin() as conn:
        catalog.set_ocr(conn, [(catalog.file_at(conn, str(photos), "img003.png").id, OCR)])
    db.dispose()


@pytest.fixture
def digested(prebuilt, tiny_model):
    """(photos, index): six images, one with a sidecar caption, one with a camera, lens, date and place, one with
    text read in it; a fresh copy per test."""
    base, _ = prebuilt.folder("row-digest", lambda b: _build(b, tiny_model))
    return base / "photos", base / "ix"


def _value(ix: Path, sql: str):
    return catalog_rows(ix, sql)[0][0]


def _files_of(name: str) -> str:
    return f"SELECT {{}} FROM files WHERE relpath = '{name}'"


def _photo_of(name: str) -> str:
    return f"SELECT {{}} FROM photos JOIN files ON files.id = photos.file_id WHERE relpath = '{name}'"


def _real(ix: Path, sql: str) -> bytes:
    """The bytes SQLite keeps a REAL in: 8 bytes, or those of an integer where it has no fraction."""
    value = _value(ix, sql)
    return struct.pack(">i", int(value)) if float(value).is_integer() else struct.pack(">d", value)


# (field, table, what to find in its page, given the index, the byte of it to flip): each field a hit shows
FLIPS = {
    "caption": ("photos", lambda ix: CAPTION.encode(), 2),
    "camera": ("photos", lambda ix: CAMERA.encode(), 0),
    "lens": ("photos", lambda ix: LENS.encode(), 3),
    "ocr": ("photos", lambda ix: OCR.encode(), 8),
    "taken_source": ("photos", lambda ix: b"exif:DateTimeOriginal", 6),
    # its own last byte: the byte before it is the record header's last serial type, photos.field_seal's from schema
    # 23 (a seal read as a REAL: no value shown changes; the filter columns and verify refuse it)
    "taken": ("photos", lambda ix: _real(ix, _photo_of("img002.jpg").format("taken")), None),
    "lat": ("photos", lambda ix: _real(ix, _photo_of("img002.jpg").format("lat")), -1),
    "format": ("files", lambda ix: b"JPEG", 1),
    # width and height follow the content hash in the record (catalog.files' column order), a byte each under 128
    "width": ("files", lambda ix: _value(ix, _files_of("img002.jpg").format("sha256")).encode(), 64),
    "height": ("files", lambda ix: _value(ix, _files_of("img002.jpg").format("sha256")).encode(), 65),
    "size": ("files", lambda ix: _real(ix, _files_of("img002.jpg").format("mtime")), -1),  # the byte before mtime
    "mtime": ("files", lambda ix: _real(ix, _files_of("img002.jpg").format("mtime")), None),
}  # None: the value's own last byte


def _flip(ix: Path, field: str) -> None:
    table, needle, at = FLIPS[field]
    found = needle(ix)
    flip_in_table_page(ix / DB_FILE, table, found, len(found) - 1 if at is None else at)


def _one_line_damage(result) -> None:
    out = result.output.strip()
    assert out.splitlines() == [out], out  # one line, no traceback
    assert "catalog.db is damaged" in out and "alignsearch verify --repair" in out, out


def test_an_intact_index_shows_what_was_written(digested):
    photos, ix = digested
    hits = {h["path"].rsplit("/", 1)[-1]: h for h in index_json_query(ix)}
    assert hits["img001.jpg"]["caption"] == CAPTION and hits["img002.jpg"]["camera"] == CAMERA
    assert hits["img002.jpg"]["width"] == 100 and hits["img003.png"]["ocr"] == OCR
    assert run("verify", "--skip-model", "--index", ix).output.startswith("ok: ")


def index_json_query(ix: Path) -> list[dict]:
    import json

    return json.loads(run("query", "a photo", "--index", ix, "-k", 12, "--json").stdout)["results"]


@pytest.mark.parametrize("field", sorted(FLIPS))
@pytest.mark.slow
def test_a_flipped_byte_in_a_shown_field_is_damage_not_a_value(digested, field):
    photos, ix = digested
    _flip(ix, field)
    # before: exit 0, e.g. "caption": "a iarbour at dusk", "width": 101
    _one_line_damage(run("query", "a photo", "--index", ix, "-k", 12, "--json", code=7))
    _one_line_damage(run("similar", photos / "img000.png", "--index", ix, "-k", 12, code=7))
    assert "the rows of 1 files are not as written" in run("verify", "--skip-model", "--index", ix, code=7).output


@pytest.mark.slow  # an index run of its own (~5 s)
@pytest.mark.parametrize("field", ["caption", "width"])
def test_verify_repair_reads_the_file_again(digested, field):
    photos, ix = digested
    _flip(ix, field)
    result = run("verify", "--repair", "--skip-model", "--index", ix)
    assert "forgot 1 files whose rows failed their checksum" in result.output and "re-encoded 1 files" in result.output
    assert run("verify", "--skip-model", "--index", ix).output.startswith("ok: ")
    hits = {h["path"].rsplit("/", 1)[-1]: h for h in index_json_query(ix)}
    assert hits["img001.jpg"]["caption"] == CAPTION and hits["img002.jpg"]["width"] == 100  # read again, not blessed


def _as_version_13(ix: Path) -> None:
    """The catalog as alignsearch wrote it at schema 13: no digest columns."""
    conn = sqlite3.connect(ix / DB_FILE)
    try:
        for table in ("files", "photos"):
            conn.execute(f"ALTER TABLE {table} DROP COLUMN digest")
        conn.execute("UPDATE meta SET value = '13' WHERE key = 'schema_version'")
        conn.commit()
        conn.execute("VACUUM")  # no stale copy of a row left in free space, where flip_in_table_page would find it
    finally:
        conn.close()


def test_a_schema_13_catalog_is_read_as_it_stands_and_upgraded_by_a_writer(digested):
    photos, ix = digested
    _as_version_13(ix)
    assert index_json_query(ix)  # a reader reads it (a files view with NULL digests) and writes nothing
    assert catalog_rows(ix, "SELECT value FROM meta WHERE key = 'schema_version'") == [("13",)]
    engine = catalog.connect(ix / DB_FILE)  # a writer upgrades it: each row digested as it stands
    engine.dispose()
    assert catalog_rows(ix, "SELECT value FROM meta WHERE key = 'schema_version'") == [(str(migrate.LATEST),)]
    assert catalog_rows(ix, "SELECT count(*) FROM files WHERE digest IS NULL") == [(0,)]
    assert catalog_rows(ix, "SELECT count(*) FROM photos WHERE digest IS NULL") == [(0,)]
    assert run("verify", "--skip-model", "--index", ix).output.startswith("ok: ")
    conn = sqlite3.connect(ix / DB_FILE)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the upgrade's pages into catalog.db, where the flip lands
    conn.close()
    _flip(ix, "caption")  # and from then on checked
    run("query", "a photo", "--index", ix, "-k", 12, "--json", code=7)


@pytest.mark.slow  # a child process and an index run (~6 s)
def test_kill_9_during_the_upgrade_to_14_leaves_the_old_catalog_then_a_run_upgrades(digested):
    photos, ix = digested
    _as_version_13(ix)
    killed = killed_at("alignsearch.storage.migrate:digest_rows", "after", "index", photos, "--index", ix,
                       "--device", "cpu")
    assert killed.returncode == -9, killed.stderr
    assert catalog_rows(ix, "SELECT value FROM meta WHERE key = 'schema_version'") == [("13",)]
    assert "digest" not in [row[1] for row in catalog_rows(ix, "PRAGMA table_info(files)")]
    assert index_json_query(ix)  # read as it was
    index_json(ix, photos, "--device", "cpu")
    assert catalog_rows(ix, "SELECT value FROM meta WHERE key = 'schema_version'") == [(str(migrate.LATEST),)]
    assert run("verify", "--skip-model", "--index", ix).output.startswith("ok: ")


# -- the digest itself (pure) -----------------------------------------------------------------------------------

def test_the_digest_tells_every_field_and_type_apart():
    row = {"taken": 1.5e9, "taken_source": "exif:DateTime", "camera": "X", "lens": None, "lat": 1.25, "lon": -2.5,
           "caption": "a cat", "ocr": ""}
    d = rowdigest.digest(rowdigest.PHOTO_FIELDS, row)
    assert len(d) == 16 and d == rowdigest.digest(rowdigest.PHOTO_FIELDS, dict(row))
    for name, other in [("caption", "a cas"), ("caption", b"a cat"), ("ocr", None), ("lens", ""), ("lat", 1.2500001),
                        ("taken", int(1.5e9)), ("camera", "x")]:
        assert rowdigest.digest(rowdigest.PHOTO_FIELDS, {**row, name: other}) != d, name
    # fields run together never give the same bytes ("ab" + "c" vs "a" + "bc")
    assert rowdigest.digest(rowdigest.PHOTO_FIELDS, {**row, "camera": "ab", "lens": "c"}) != \
        rowdigest.digest(rowdigest.PHOTO_FIELDS, {**row, "camera": "a", "lens": "bc"})
    # a files row's digest never stands for a photos row's
    assert rowdigest.digest(rowdigest.FILE_FIELDS, {}) != rowdigest.digest(rowdigest.PHOTO_FIELDS, {})


def test_stored_gives_what_sqlite_reads_back():
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE t (i INTEGER, r FLOAT, s TEXT)")
    fields = (("i", rowdigest.INT), ("r", rowdigest.REAL), ("s", rowdigest.TEXT))
    for values in [{"i": 3.0, "r": 2, "s": 7}, {"i": True, "r": math.nan, "s": 1.5}, {"i": None, "r": 1e300, "s": "é"},
                   {"i": -0.0, "r": -0.0, "s": None}]:  # -0.0 in a REAL reads back 0.0
        conn.execute("DELETE FROM t")
        conn.execute("INSERT INTO t VALUES (?, ?, ?)", (values["i"], values["r"], values["s"]))
        read = dict(zip("irs", conn.execute("SELECT i, r, s FROM t").fetchone()))
        assert rowdigest.stored(fields, values) == read
        assert rowdigest.digest(fields, rowdigest.stored(fields, values)) == rowdigest.digest(fields, read)


def test_a_write_to_a_damaged_row_never_blesses_it():
    fields = rowdigest.PHOTO_FIELDS
    written = {"caption": "a harbour", "ocr": None}
    good = rowdigest.digest(fields, written)
    after = {**written, "ocr": "text"}
    assert rowdigest.next_digest(fields, written, good, after) == rowdigest.digest(fields, after)
    damaged = {**written, "caption": "a iarbour"}
    kept = rowdigest.next_digest(fields, damaged, good, {**damaged, "ocr": "text"})
    assert kept == good and not rowdigest.holds(fields, {**damaged, "ocr": "text"}, kept)  # still found
    assert not rowdigest.holds(fields, written, None)  # NULL is never "unchecked"
    assert rowdigest.mismatched(fields, [(1, written, good), (2, damaged, good)]) == [2]


def test_an_ocr_fill_over_a_damaged_row_leaves_it_damaged(digested):
    """catalog.set_ocr (the OCR fill) writes the digest of the row it changes only where the row read as written."""
    photos, ix = digested
    _flip(ix, "caption")
    db = catalog.connect(ix / DB_FILE)
    with db.begin() as conn:
        catalog.set_ocr(conn, [(catalog.file_at(conn, str(photos), "img001.jpg").id, "NEW TEXT")])
    db.dispose()
    run("query", "a photo", "--index", ix, "-k", 12, code=7)
    assert "the rows of 1 files are not as written" in run("verify", "--skip-model", "--index", ix, code=7).output


def test_a_file_a_reindex_could_not_read_keeps_a_digest_that_holds(digested):
    """`index --reindex` makes the files it could not read again failed rows (catalog.mark_failed): a bulk UPDATE of
    status and reason left their digests behind, and verify called each such row damaged."""
    photos, ix = digested
    db = catalog.connect(ix / DB_FILE)
    with db.begin() as conn:
        file_id = catalog.file_at(conn, str(photos), "img004.jpg").id
        catalog.mark_failed(conn, [file_id], "cannot read: the file could not be read again to re-encode it")
        assert catalog.off_digest(conn) == []
    db.dispose()
    assert catalog_rows(ix, f"SELECT status FROM files WHERE id = {file_id}") == [(catalog.FAILED,)]


@pytest.mark.parametrize("field", ["caption", "width"])
def test_export_refuses_a_row_that_fails_its_digest(digested, field, tmp_path):
    """Export reads every row (catalog.indexed_after, photos_of): it wrote the flipped value out, exit 0."""
    _, ix = digested
    _flip(ix, field)
    _one_line_damage(run("export", tmp_path / "out", "--index", ix, code=7))


@pytest.mark.slow  # an index run of its own (~5 s)
def test_a_photo_at_zero_degrees_west_is_no_damage(tmp_path, tiny_model):
    """A place on the prime meridian or the equator with a W or S reference (a camera's zeroes with its default
    references, Greenwich) reads -0.0 degrees (photometa.gps_degrees); SQLite keeps a REAL's integral value as an
    integer, so the row reads back 0.0, and its digest (of -0.0) called the healthy row damaged: exit 7."""
    photos = tmp_path / "photos"
    make_images(photos, 2)
    exif = Image.Exif()
    gps = exif.get_ifd(photometa.GPS_IFD)
    gps[1], gps[2], gps[3], gps[4] = "S", (0.0, 0.0, 0.0), "W", (0.0, 0.0, 0.0)
    Image.new("RGB", (100, 90), (30, 160, 40)).save(photos / "greenwich.jpg", "JPEG", exif=exif)
    ix = tmp_path / "ix"
    index_json(ix, photos, "--model", tiny_model, "--device", "cpu")
    hits = {h["path"].rsplit("/", 1)[-1]: h for h in index_json_query(ix)}
    assert hits["greenwich.jpg"]["lat"] == 0 and hits["greenwich.jpg"]["lon"] == 0
    assert run("verify", "--skip-model", "--index", ix).output.startswith("ok: ")


@pytest.mark.slow  # an index run of its own (~5 s)
def test_info_failed_refuses_a_reason_that_fails_its_digest(tmp_path, tiny_model):
    """`info --failed` shows each failed file's reason, a digested field: it read the rows unchecked
    (catalog.failed_files) and showed a flipped byte of the reason as it stood, exit 0."""
    photos = tmp_path / "photos"
    make_images(photos, 2)
    (photos / "broken.jpg").write_bytes(b"not a jpeg at all" * 10)
    ix = tmp_path / "ix"
    index_json(ix, photos, "--model", tiny_model, "--device", "cpu")
    reason = _value(ix, _files_of("broken.jpg").format("reason"))
    assert reason and reason in run("info", "--failed", "--index", ix).output  # a healthy index shows it
    flip_in_table_page(ix / DB_FILE, "files", reason.encode(), 1)
    _one_line_damage(run("info", "--failed", "--index", ix, code=7))


# Rows and the digests schema 14 wrote for them, computed with rowdigest.py as it was at 4715f7a (one h.update of
# _encode(value) per field): the catalogs written since hold these digests, so a faster digest must give the same
# (readers would call every row of them damaged, exit 7). Each type a reader gets, and ones it never gets.
FILE_ROW = {"size": 2_345_678, "mtime": 1_700_000_000.125, "sha256": "9f" * 32, "width": 4032, "height": 3024,
            "format": "JPEG", "status": "indexed", "reason": None, "indexed_at": 1_700_000_123.5, "moment": 0,
            "t": None, "t_end": None}
PINNED = [
    (rowdigest.FILE_FIELDS, FILE_ROW, "1f05f7255ad255c1"),
    (rowdigest.FILE_FIELDS, {**FILE_ROW, "format": "MP4", "moment": 3, "t": 12.0, "t_end": 16.5, "width": None,
                             "height": None}, "af70d9db6dcd9291"),  # a video moment
    (rowdigest.FILE_FIELDS, {**FILE_ROW, "status": "failed", "reason": "cannot read: truncated", "sha256": None,
                             "size": -1, "mtime": 0.0}, "059eb2630e938978"),
    (rowdigest.PHOTO_FIELDS, {"taken": 1_620_284_889.0, "taken_source": "exif:DateTimeOriginal",
                              "camera": "Canon EOS R5", "lens": "RF24-70mm F2.8", "lat": 38.704861, "lon": -9.134236,
                              "caption": "a harbour at dusk — café ☕", "ocr": ""}, "4b5f1f5d72d5f8b5"),
    # what a damaged or odd row reads: bytes where text was, a lone surrogate, an int in a REAL column, -0.0, and
    # types no reader gets from SQLite (a bool; an int past 64 bits)
    (rowdigest.PHOTO_FIELDS, {"taken": 7, "taken_source": b"exif:DateTime", "camera": "\udcff", "lens": None,
                              "lat": -0.0, "lon": 0.0, "caption": True, "ocr": -(2**63)}, "de9b60541eab803f"),
    (rowdigest.FILE_FIELDS, {}, "a6e4a68ca62808ae"),
    (rowdigest.PHOTO_FIELDS, {}, "690edbd33217b0a4"),
]


@pytest.mark.parametrize("fields, values, hexdigest", PINNED)
def test_the_digest_of_a_row_is_the_one_schema_14_wrote(fields, values, hexdigest):
    assert rowdigest.digest(fields, values) == hexdigest
    shown = [values.get(name) for name, _ in fields]
    assert rowdigest.digest_of(fields, shown) == hexdigest and rowdigest.holds_shown(fields, tuple(shown), hexdigest)
    assert rowdigest.holds(fields, values, hexdigest)


def test_the_digest_is_of_each_value_tagged_and_length_prefixed():
    """The format spelled out (rowdigest._encode), for a row of each type a reader gets."""
    import hashlib

    values = {"taken": 1.5, "taken_source": "é", "camera": None, "lat": 12}
    spelled = (b"F\0\0\0\x08" + struct.pack(">d", 1.5) + b"S\0\0\0\x02" + "é".encode() + b"N" + b"N" + b"I\0\0\0\x0212"
               + b"N" * 3)
    assert rowdigest.digest(rowdigest.PHOTO_FIELDS, values) == \
        hashlib.blake2b(spelled, digest_size=8, person=b"as-photos").hexdigest()
    long = "x" * 300  # past the lengths whose prefix is made once
    assert rowdigest.digest(rowdigest.FILE_FIELDS, {"sha256": long, "size": 10**300}) == hashlib.blake2b(
        b"I" + struct.pack(">I", 301) + b"1" + b"0" * 300 + b"N" + b"S" + struct.pack(">I", 300) + long.encode()
        + b"N" * 9, digest_size=8, person=b"as-files").hexdigest()


def _flips(value) -> list:
    """Other values a damaged field may read: the same type changed (a bit of text, the last bit of a float, an
    integer off by one), another type of the same look (1 / 1.0 / "1", text / bytes), NULL for a value and back."""
    if value is None:
        return [0, 0.0, "", b""]
    if isinstance(value, float):
        out = [math.nextafter(value, math.inf), -value if value else -0.0, None, str(value)]
        return out + ([int(value)] if value.is_integer() else [])
    if isinstance(value, int):
        return [value + 1, value ^ 1, float(value), str(value), None]
    return [chr(ord(value[0]) ^ 1) + value[1:] if value else "\x01", value.encode(), None]


def _sealed_file(values: dict) -> catalog.FileRow:
    row = catalog.FileRow(id=1, root="/photos", relpath="a.jpg", relpath_raw=None, vec_row=0, **values)
    return catalog.FileRow(**{**vars(row), "digest": rowdigest.digest(rowdigest.FILE_FIELDS, values),
                              "vec_seal": rowdigest.seal(row.vec_row)})  # as insert_file writes it (schema 17)


@pytest.mark.parametrize("name", [name for name, _ in rowdigest.FILE_FIELDS])
def test_a_changed_files_field_of_each_kind_fails_check_rows(name, tmp_path):
    """catalog.check_rows reads a FileRow's fields as a tuple (no dict): each field is still in it, and a value
    changed in it, of the same type or another, fails the digest."""
    moment = {**FILE_ROW, "t": 12.0, "t_end": 16.5, "reason": "a note", "moment": 3}  # no NULL: each a value to flip
    db = catalog.connect(tmp_path / DB_FILE)
    with db.connect() as conn:
        for values in (FILE_ROW, moment):
            row = _sealed_file(values)
            assert catalog.check_rows(conn, [row]) == [row]
            for other in _flips(values[name]):
                changed = catalog.FileRow(**{**vars(row), name: other})
                assert not rowdigest.holds_shown(rowdigest.FILE_FIELDS, catalog._shown(changed), row.digest), other
                if catalog._sound(changed):  # a type no writer stores is refused before (refuse_malformed)
                    with pytest.raises(IndexDamagedError, match="checksum differs"):
                        catalog.check_rows(conn, {1: changed})
    db.dispose()


@pytest.mark.parametrize("name", [name for name, _ in rowdigest.PHOTO_FIELDS])
def test_a_changed_photos_field_of_each_kind_fails_its_digest(name):
    """photos_of compares each row as a dict (rowdigest.holds): a value changed in any field fails it."""
    fields = rowdigest.PHOTO_FIELDS
    row = {"taken": 1_620_284_889.0, "taken_source": "exif:DateTimeOriginal", "camera": "Canon EOS R5", "lens": "RF",
           "lat": 38.704861, "lon": -9.25, "caption": "a harbour", "ocr": "INVOICE 4711"}
    written = rowdigest.digest(fields, row)
    for other in _flips(row[name]) + _flips(None):
        if other != row[name] or type(other) is not type(row[name]):
            changed = {**row, name: other}
            assert not rowdigest.holds(fields, changed, written), other
            assert not rowdigest.holds_shown(fields, [changed[n] for n, _ in fields], written), other


def test_a_change_of_many_rows_writes_each_its_digest(tmp_path):
    """catalog._change writes every row's change and digest in one executemany per run of changed fields: each row
    as changed holds its digest, a damaged row keeps its own (still found), an id of no row changes nothing, and a
    row changed twice ends as the last change wrote it."""
    db = catalog.connect(tmp_path / DB_FILE)
    with db.begin() as conn:
        ids = [catalog.insert_file(conn, {**FILE_ROW, "root": "/photos", "relpath": f"{i}.jpg", "sha256": f"{i:064x}"})
               for i in range(5)]
        for i in ids:
            catalog.set_photo(conn, i, f"{i}.jpg", {"caption": f"photo {i}", "camera": "Canon"})
        conn.exec_driver_sql("UPDATE photos SET caption = 'damaged' WHERE file_id = ?", (ids[1],))
        catalog.set_ocr(conn, [(ids[0], "one"), (ids[1], "two"), (9999, "none"), (ids[2], "three"), (ids[2], "again")])
        catalog.set_captions(conn, [(ids[3], "a new caption")])
        catalog.mark_failed(conn, ids[3:], "cannot read")
        assert catalog.off_digest(conn) == [ids[1]]
        ocr = dict(conn.exec_driver_sql("SELECT file_id, ocr FROM photos").all())
        assert ocr == {ids[0]: "one", ids[1]: "two", ids[2]: "again", ids[3]: None, ids[4]: None}
        got = conn.exec_driver_sql("SELECT id, status, reason FROM files WHERE id >= ?", (ids[3],)).all()
        assert got == [(ids[3], catalog.FAILED, "cannot read"), (ids[4], catalog.FAILED, "cannot read")]
        assert catalog.photos_of(conn, [ids[3]])[ids[3]]["caption"] == "a new caption"
    db.dispose()
