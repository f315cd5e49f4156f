"""A file whose content changed though its size and mtime did not is read again (scan.status_changed).

`cp -p` or `rsync -a` of another file of the same size over a photo or video, or `exiftool -P` rewriting a tag in
place, keep both; the listing compared only those, so the old content's vectors and SHA-256 stayed for good. The
file's status change time (st_ctime), which no tool sets, is now compared with when the listing its row was made
from began. A chmod, chown or rename changes it too: such a file is hashed again, once, and keeps its vectors.
"""

import hashlib
import os
import sqlite3

import pytest
from PIL import Image

from conftest import index_json
from helpers import make_video, same_size_other_content
from indexer.scan import Found


def _sha(ix, name):
    with sqlite3.connect(ix / "catalog.db") as db:
        return {sha for (sha,) in db.execute("SELECT sha256 FROM files WHERE relpath = ?", (name,))}


def _ids(ix):
    with sqlite3.connect(ix / "catalog.db") as db:
        return db.execute("SELECT id, relpath, moment FROM files ORDER BY id").fetchall()


def _vector_rows(ix):
    with sqlite3.connect(ix / "catalog.db") as db:
        return db.execute("SELECT COUNT(DISTINCT vec_row) FROM files WHERE vec_row IS NOT NULL").fetchone()[0]


@pytest.mark.slow
def test_a_photo_and_a_video_replaced_with_the_same_size_and_mtime_are_read_again(tmp_path, tiny_model, monkeypatch):
    from indexer import scan

    real = scan.content_sha256
    lib, ix = tmp_path / "lib", tmp_path / "ix"
    lib.mkdir()
    for name, colour in (("a.bmp", (255, 0, 0)), ("c.bmp", (0, 255, 0))):
        Image.new("RGB", (64, 64), colour).save(lib / name)
    make_video(lib / "v.mp4", [(1, 3), (2, 3)])
    first = index_json(ix, lib, "--model", tiny_model, "--device", "cpu", "--workers", "0")
    assert first["added"] == 3
    blue = tmp_path / "blue.bmp"
    Image.new("RGB", (64, 64), (0, 0, 255)).save(blue)
    before = (lib / "a.bmp").stat()
    (lib / "a.bmp").write_bytes(blue.read_bytes())  # in place, as exiftool -P writes: same size, mtime put back
    os.utime(lib / "a.bmp", ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (lib / "a.bmp").stat().st_size == before.st_size
    same_size_other_content(lib / "v.mp4", lib / "v.mp4")  # renamed over it, as a sync does
    second = index_json(ix, "--workers", "0")
    assert second["updated"] == 2, second
    for name in ("a.bmp", "v.mp4"):
        assert _sha(ix, name) == {hashlib.sha256((lib / name).read_bytes()).hexdigest()}, name
    assert index_json(ix, "--workers", "0")["updated"] == 0  # read once, not at every run
    rows, ids = _vector_rows(ix), _ids(ix)
    hashed = []
    monkeypatch.setattr(scan, "content_sha256", lambda f: hashed.append(f.relpath) or real(f))
    os.chmod(lib / "c.bmp", 0o600)  # the status alone: hashed again; the same content keeps its row as it was
    third = index_json(ix, "--workers", "0")
    assert (third["updated"], third["added"], third["unchanged"]) == (0, 0, 3), third
    assert hashed == ["c.bmp"] and _vector_rows(ix) == rows and _ids(ix) == ids  # its photo fields, tags: kept
    index_json(ix, "--workers", "0")
    assert hashed == ["c.bmp"]  # its row moved to that listing: not hashed at every run


def test_a_status_change_counts_only_after_the_rows_listing_and_not_from_the_future():
    from indexer.scan import CHANGED_SLACK_S, status_changed

    f = Found("/r", "a.jpg", 10, 100.0, ctime=500.0, listed_at=600.0)
    assert status_changed(f, indexed_at=400.0, now=1000.0)
    assert not status_changed(f, indexed_at=500.0, now=1000.0)  # the listing the row was made from saw it
    assert not status_changed(f, indexed_at=400.0, now=500.0 - CHANGED_SLACK_S - 1)  # a clock ahead of this one's
    assert not status_changed(Found("/r", "a.jpg", 10, 100.0), indexed_at=0.0, now=1000.0)  # a URL, a tar member


def test_rows_relisted_after_a_chmod_of_a_library_are_found_a_batch_at_a_time(tmp_path):
    """catalog.relisted after a `chmod -R` of a library: every row confirmed by its hash. It looked each (root,
    relpath) up in a statement of its own (1M files: a million SELECTs, as long again as the hashing) and took the
    rows of them all in memory at once (_change: about 2 KB a row). Each row moves to its own listing's time, its
    digest with it, a video's moments alike."""
    from sqlalchemy import event

    from alignsearch.storage import catalog

    ix = tmp_path / "ix"
    ix.mkdir(mode=0o700)
    db = catalog.connect(ix / "catalog.db")
    n = 1200
    with db.begin() as conn:
        for root in ("/a", "/b"):
            for i in range(n // 2):
                catalog.insert_file(conn, {"root": root, "relpath": f"{i}.jpg", "size": 10, "mtime": 1.0,
                                           "sha256": "ab" * 32, "status": "indexed", "vec_row": i, "indexed_at": 5.0})
        for moment in range(3):
            catalog.insert_file(conn, {"root": "/a", "relpath": "v.mp4", "size": 10, "mtime": 1.0, "sha256": "cd" * 32,
                                       "status": "indexed", "vec_row": 9000 + moment, "moment": moment, "t": moment,
                                       "indexed_at": 5.0})
    confirmed = [(root, f"{i}.jpg", 100.0 + i) for root in ("/a", "/b") for i in range(n // 2) if i % 3 == 0]
    confirmed += [("/a", "v.mp4", 77.0), ("/a", "gone.jpg", 1.0)]
    statements = []
    event.listen(db, "before_cursor_execute", lambda *a: statements.append(a[2]))
    with db.begin() as conn:
        catalog.relisted(conn, confirmed)
    assert len(statements) < 30, len(statements)  # a batch of rows a statement, not a row
    with db.connect() as conn:
        times = {(r.root, r.relpath, r.moment): r.indexed_at for r in conn.execute(catalog.files.select())}
        assert catalog.off_digest(conn) == []
    want = {(root, rel, 0): when for root, rel, when in confirmed[:-2]}
    assert {k: v for k, v in times.items() if v != 5.0 and not k[1].endswith(".mp4")} == want
    assert [times[("/a", "v.mp4", m)] for m in range(3)] == [77.0] * 3
    assert sum(v == 5.0 for v in times.values()) == n - len(want)


def test_a_file_the_listing_refuses_is_not_hashed_when_its_status_changes():
    """A row failed "file too large" (an image over 256 MB is never read) or "not a regular file": a chmod -R made it a
    suspect, and scan.confirm read the whole file (gigabytes) to learn what the listing already said, only for the
    pipeline to refuse it again. Its size and mtime unchanged, the listing's refusal stands: nothing to read."""
    from types import SimpleNamespace

    from alignsearch.media import sources
    from indexer.scan import diff

    too_large = sources.too_large(300 * 2**20)
    f = Found("/r", "pano.jpg", 300 * 2**20, 100.0, too_large, ctime=500.0, listed_at=600.0)
    row = SimpleNamespace(id=1, relpath="pano.jpg", size=f.size, mtime=f.mtime, status="failed", reason=too_large,
                          indexed_at=400.0, sha256=None)
    d = diff([f], {"pano.jpg": row})
    assert (d.suspects, d.todo, d.unchanged) == ([], [], 1)


def test_a_suspect_that_cannot_be_read_now_is_neither_same_nor_changed(tmp_path):
    """A file made unreadable (chmod 000, a share gone) changes its ctime: read as changed, its good row was replaced
    by a failed one ("cannot read"). It stays as it is, hashed again by the next run."""
    from types import SimpleNamespace

    from indexer.scan import confirm

    (tmp_path / "here.jpg").write_bytes(b"same")
    rows = SimpleNamespace(sha256=hashlib.sha256(b"same").hexdigest()), SimpleNamespace(sha256="0" * 64)
    here, gone = Found(str(tmp_path), "here.jpg", 4, 1.0), Found(str(tmp_path), "gone.jpg", 4, 1.0)
    assert confirm([(here, rows[0]), (gone, rows[1])]) == ([here], [])
    assert confirm([(here, rows[1])]) == ([], [here])
