"""The catalog's queries on a real SQLite catalog: live_pairs (what the ANN index holds) and its filters."""

import sqlite3

import numpy as np
import pytest
from sqlalchemy import event

from alignsearch.errors import IndexDamagedError
from alignsearch.storage import catalog


def row(root, relpath, vec_row, status=catalog.INDEXED, moment=0, t=None):
    return {"root": root, "relpath": relpath, "size": 1, "mtime": 0.0, "status": status, "indexed_at": 0.0,
            "vec_row": vec_row if status == catalog.INDEXED else None, "moment": moment, "t": t}


PARAMETER_CAP = 999  # SQLite's default before 3.32, and what some builds still set


@pytest.fixture
def db(tmp_path):
    engine = catalog.connect(tmp_path / "catalog.db")
    if hasattr(sqlite3.Connection, "setlimit"):  # Python 3.11+: every connection gets the low cap
        event.listen(engine, "connect", lambda dbapi_conn, _record: dbapi_conn.setlimit(
            sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, PARAMETER_CAP))
        engine.dispose()  # connections already pooled have the build's cap
    yield engine
    engine.dispose()


def fill(db, rows) -> list[int]:
    """Insert rows in this order; returns their ids."""
    with db.begin() as conn:
        return [catalog.insert_file(conn, r) for r in rows]


def pairs(db, **filters) -> list[list[int]]:
    with db.connect() as conn:
        live = catalog.live_pairs(conn, **filters)
    assert live.dtype == np.int64 and live.shape == (len(live), 2)
    return live.tolist()


def test_live_pairs_are_the_indexed_files_in_id_order(db):
    # roots interleaved and relpaths descending: neither a root nor a name order would give id order
    ids = fill(db, [row("/b", "z.jpg", 30), row("/a", "y.jpg", 10), row("/b", "x.jpg", 0, status=catalog.FAILED),
                    row("/a", "w.jpg", 20)])
    assert pairs(db) == [[ids[0], 30], [ids[1], 10], [ids[3], 20]]  # the failed file has no vector
    with db.begin() as conn:  # a replaced file gets a new id: it comes last
        catalog.upsert_file(conn, row("/b", "z.jpg", 40))
    assert pairs(db) == [[ids[1], 10], [ids[3], 20], [ids[3] + 1, 40]]


def test_an_empty_catalog_has_no_pairs_but_their_shape(db):
    assert pairs(db) == [] and pairs(db, without_ids=[1, 2], without_root="/a") == []
    with db.connect() as conn:
        assert catalog.live_pairs(conn).shape == (0, 2)


def test_without_root_and_without_ids_combine(db):
    ids = fill(db, [row("/a", f"{i}.jpg", i) for i in range(4)] + [row("/b", f"{i}.jpg", 10 + i) for i in range(4)])
    assert [i for i, _ in pairs(db, without_root="/a")] == ids[4:]
    assert [i for i, _ in pairs(db, without_root="/nowhere")] == ids
    assert [i for i, _ in pairs(db, without_ids=[ids[1], ids[6]], without_root="/b")] == [ids[0], ids[2], ids[3]]
    assert [i for i, _ in pairs(db, without_ids=[10_000])] == ids  # an id not in the catalog leaves nothing out


@pytest.mark.slow
def test_thousands_of_left_out_ids_pass_sqlites_parameter_cap(db):
    ids = fill(db, [row("/a", f"{i:05d}.jpg", i) for i in range(6000)])
    gone = ids[::3] + [ids[-1]]  # 2,001 ids: twice the cap on bound parameters
    kept = [[i, v] for i, v in zip(ids, range(6000)) if i not in set(gone)]
    assert pairs(db, without_ids=gone) == kept
    assert pairs(db, without_ids=iter(gone)) == kept  # any iterable, read once
    with db.connect() as conn:
        assert catalog.with_moments(conn, gone) == sorted(gone)


def test_a_gone_moment_takes_its_whole_video_along(db):
    photo, *clip = fill(db, [row("/a", "clip.mp4", 0), *(row("/b", "clip.mp4", 1 + m, moment=m, t=2.0 * m)
                                                          for m in range(3)), ])
    other = fill(db, [row("/b", "other.mp4", 9, moment=0, t=0.0)])[0]
    # one moment of the video is enough; the photo of the same name in another root stays
    assert pairs(db, without_ids=[clip[1]]) == [[photo, 0], [other, 9]]
    assert pairs(db, without_ids=[photo]) == [[clip[0], 1], [clip[1], 2], [clip[2], 3], [other, 9]]
    with db.connect() as conn:
        assert catalog.with_moments(conn, [clip[2], 77]) == sorted([*clip, 77])
        assert catalog.with_moments(conn, []) == []


def test_the_fill_queries_leave_out_the_files_gone_in_this_run(db):
    """phashes, photo fields and text are filled for files still there: a gone file (or video) is not read."""
    photos = fill(db, [row("/a", f"{i}.jpg", i) for i in range(4)])
    clip = fill(db, [row("/a", "clip.mp4", 10 + m, moment=m, t=float(m)) for m in range(2)])
    with db.begin() as conn:  # photo fields without text read: what the OCR fill reads
        for i in photos + clip:
            catalog.set_photo(conn, i, "x.jpg", {})
    gone = [photos[1], clip[0]]

    def ids(conn, query, **kw):
        return [r.id for r in query(conn, 0, 100, **kw)]

    with db.connect() as conn:
        assert ids(conn, catalog.files_without_phash) == photos  # video moments are hashed as indexed, not filled
        assert ids(conn, catalog.files_without_phash, without_ids=gone) == [photos[0], *photos[2:]]
        assert ids(conn, catalog.files_without_ocr) == photos  # video moments are not read for text
        assert ids(conn, catalog.files_without_ocr, without_ids=gone) == [photos[0], *photos[2:]]
        assert catalog.count_without_ocr(conn) == 4 and catalog.count_without_ocr(conn, without_ids=gone) == 3
        assert ids(conn, catalog.files_without_photo) == []
    with db.begin() as conn:
        conn.execute(catalog.photos.delete())
    with db.connect() as conn:
        assert ids(conn, catalog.files_without_photo, without_ids=gone) == [photos[0], *photos[2:]]
        assert [r.id for r in catalog.files_without_photo(conn, photos[2], 1, without_ids=gone)] == [photos[3]]


def test_a_file_a_list_names_by_any_spelling_is_the_file_a_folder_root_names():
    """FileRow.file, the key that holds a file once in search results: a list's entry `//tmp/a.jpg` (POSIX's
    normpath keeps two leading slashes) or `/tmp/./b/../a.jpg` was another file than the folder root's /tmp/a.jpg,
    and a search showed it twice, where dupes (by real path) said it had no copy."""
    def row(root, relpath):
        return catalog.FileRow(id=1, root=root, relpath=relpath, relpath_raw=None, size=1, mtime=0.0, sha256=None,
                               width=None, height=None, format=None, status=catalog.INDEXED, reason=None,
                               indexed_at=0.0, vec_row=0)

    folder = row("/tmp", "a.jpg").file
    assert folder == "/tmp/a.jpg"
    for entry in ("//tmp/a.jpg", "///tmp/a.jpg", "/tmp/./b/../a.jpg", "file:///tmp/a.jpg", "file:////tmp/a.jpg"):
        assert row("/nowhere/list.csv", entry).file == folder, entry
    assert row("/nowhere/list.csv", "https://example.com/tmp/a.jpg").file != folder


def _damage(db, sql: str, *params) -> None:
    """A flipped byte, written by hand: the column changed, nothing else (no writer's seal)."""
    with db.begin() as conn:
        conn.exec_driver_sql(sql, params)


@pytest.mark.parametrize("filters", [{}, {"without_ids": [999]}, {"without_root": "/b"}, {"below": 10**6}])
def test_live_pairs_refuse_an_address_off_its_seal(db, filters):
    # rebuild, compact, forget and an index run put in the ANN index the vector each address names: a flipped byte of
    # one filed another file's vector under this id, exit 0
    ids = fill(db, [row("/a", f"{i}.jpg", i) for i in range(5)])
    _damage(db, "UPDATE files SET vec_row = 3 WHERE id = ?", ids[1])  # 1 -> 3: a bit flipped, its seal kept
    with pytest.raises(IndexDamagedError, match="checksum"), db.connect() as conn:
        catalog.live_pairs(conn, **filters)


@pytest.mark.parametrize("seal", [None, "x", 1e30, -1])
def test_live_pairs_refuse_a_seal_no_writer_stores(db, seal):
    # NULL, text, a REAL past int64 (OverflowError, exit 1, where it was read as an integer) or a wrong number: the
    # address is off its seal, as verify and a snapshot's columns call it
    ids = fill(db, [row("/a", f"{i}.jpg", i) for i in range(3)])
    _damage(db, "UPDATE files SET vec_seal = ? WHERE id = ?", seal, ids[2])
    with pytest.raises(IndexDamagedError, match="checksum"), db.connect() as conn:
        catalog.live_pairs(conn)


def test_live_pairs_call_an_address_past_int64_malformed_not_exit_1(db):
    ids = fill(db, [row("/a", f"{i}.jpg", i) for i in range(3)])
    _damage(db, "UPDATE files SET vec_row = 1e30 WHERE id = ?", ids[0])  # OverflowError escaped: exit 1
    with pytest.raises(IndexDamagedError, match="restore the index"), db.connect() as conn:
        catalog.live_pairs(conn)


def test_live_pairs_leave_seals_to_verify_when_told(db):
    # verify finds addresses off their seals itself (off_digest) and reports or forgets them: no refusal there
    ids = fill(db, [row("/a", f"{i}.jpg", i) for i in range(3)])
    _damage(db, "UPDATE files SET vec_row = 7 WHERE id = ?", ids[0])
    with db.connect() as conn:
        assert catalog.live_pairs(conn, check_seals=False).tolist() == [[ids[0], 7], [ids[1], 1], [ids[2], 2]]
        assert catalog.off_digest(conn) == [ids[0]]


def test_sealed_live_pairs_are_contiguous_pairs(db):
    # callers slice columns and hand them to FAISS: the (n, 2) array, not a view of the three columns read
    fill(db, [row("/a", f"{i}.jpg", i * 5) for i in range(4)])
    with db.connect() as conn:
        live = catalog.live_pairs(conn)
    assert live.shape == (4, 2) and live.flags.c_contiguous and live[:, 1].tolist() == [0, 5, 10, 15]


def test_driver_rows_reads_as_sqlalchemy_does_and_fails_as_it_does(tmp_path):
    """catalog.driver_rows (the filter columns' load: the driver's tuples, no Row a row) gives the values
    conn.execute(query).all() gives, and an error of SQLite's comes through SQLAlchemy (connect's handle_error, which
    says a link at -wal or -shm as such): it came as the driver's sqlite3.OperationalError, past that hook."""
    from sqlalchemy import literal_column, select
    from sqlalchemy.exc import OperationalError

    engine = catalog.connect(tmp_path / "catalog.db")
    try:
        with engine.begin() as conn:
            catalog.insert_file(conn, {"root": "/r", "relpath": "a.jpg", "status": catalog.INDEXED, "size": 3,
                                       "mtime": 1.5, "width": 2, "height": 1})
        f = catalog.files.c
        query = select(f.id, f.relpath, f.size, f.mtime, f.width, f.field_seal).order_by(f.id)
        with engine.connect() as conn:
            assert catalog.driver_rows(conn, query) == [tuple(row) for row in conn.execute(query).all()] != []
            with pytest.raises(OperationalError, match="no such column"):
                catalog.driver_rows(conn, select(literal_column("no_such_column")).select_from(catalog.files))
    finally:
        engine.dispose()


@pytest.mark.parametrize("readonly", [False, True])
def test_driver_rows_reads_in_the_connections_transaction(tmp_path, readonly):
    """The filter columns' load (Columns: BEGIN, then its statements) reads with catalog.driver_rows on the
    connection's own DBAPI connection: a writer committing between the load's first read and it is not seen, as
    conn.execute does not see it, on a writer's engine and on a reader's pooled one (open_readonly, `serve`'s)."""
    from sqlalchemy import func, select

    writer = catalog.connect(tmp_path / "catalog.db")
    reader = catalog.connect(tmp_path / "catalog.db", readonly=True) if readonly else writer
    f = catalog.files.c
    query = select(f.id, f.relpath_raw, f.mtime, f.field_seal, f.status).where(
        f.status.is_distinct_from(catalog.FAILED)).order_by(f.id)
    try:
        for i in range(2):  # the second on a pooled connection used before
            with writer.begin() as conn:
                catalog.insert_file(conn, {"root": "/r", "relpath": f"{i}.jpg", "relpath_raw": b"\xff%d" % i,
                                           "status": catalog.INDEXED, "size": 3, "mtime": 1.5, "width": 2, "height": 1})
            with reader.connect() as conn:
                conn.exec_driver_sql("BEGIN")
                seen = conn.execute(select(func.count()).select_from(catalog.files)).scalar()
                with writer.begin() as other:
                    catalog.insert_file(other, {"root": "/r", "relpath": f"late{i}.jpg", "status": catalog.INDEXED,
                                                "size": 3, "mtime": 1.5, "width": 2, "height": 1})
                rows = catalog.driver_rows(conn, query)
                assert len(rows) == seen and rows == [tuple(row) for row in conn.execute(query).all()]
    finally:
        reader.dispose()
        writer.dispose()


@pytest.mark.parametrize("statuses", [
    [], ["indexed"], ["indexed", "failed"], ["indexed", "indexee"], ["indexed", None], ["indexed", b"indexed"],
    ["INDEXED"], ["indexed", 1], ["indexed", 0.0], ["failed", "failed "], ["indexed"] * 1000 + ["hndexed"],
])
def test_statuses_known_is_status_known_of_every_one(statuses):
    """catalog.statuses_known (the columns load's and addresses_of's check, one set test) says what status_known says
    of each value: a flipped byte, NULL, the bytes or another type of a status is damage."""
    assert catalog.statuses_known(iter(statuses)) == all(map(catalog.status_known, statuses))
