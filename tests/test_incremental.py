"""Add / delete / rename / modify cycles, kill -9 at random points, and a reader querying during updates."""

import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import alignsearch
from alignsearch.storage import catalog, migrate, state
from alignsearch.errors import AlignSearchError
from conftest import index_json, make_images, run
from helpers import seal


def vector_rows(ix) -> int:
    """Committed vector rows, read-only (safe while an indexer creates or writes the catalog)."""
    try:
        conn = sqlite3.connect(f"file:{ix / 'catalog.db'}?mode=ro", uri=True)
        try:
            row = conn.execute("SELECT value FROM meta WHERE key = 'vector_rows'").fetchone()
        finally:
            conn.close()
    except sqlite3.Error:
        return 0
    return json.loads(row[0]) if row else 0


@pytest.mark.slow
def test_rename_move_duplicate_touch_reuse_vectors(tmp_path, tiny_model):
    root, ix = tmp_path / "photos", tmp_path / "ix"
    paths = make_images(root, 8)
    first = index_json(ix, root, "--model", tiny_model, "--device", "cpu")
    assert first["added"] == 8 and vector_rows(ix) == 8

    (root / "sub").mkdir()
    paths[1].rename(root / "sub" / "moved.jpg")  # move
    paths[2].rename(root / "renamed.jpg")  # rename
    shutil.copy(paths[4], root / "copy.jpg")  # duplicate
    os.utime(paths[5], (time.time() + 100, time.time() + 100))  # touched, same bytes
    s = index_json(ix)
    assert (s["moved"], s["added"], s["removed"], s["updated"], s["reused"]) == (2, 1, 0, 1, 4)
    assert vector_rows(ix) == 8  # nothing was encoded again
    engine = alignsearch.open(ix)
    assert engine.info()["images"] == 9
    hit = engine.search(image=root / "sub" / "moved.jpg", k=1)[0]
    assert hit.relpath == os.path.join("sub", "moved.jpg") and hit.score == pytest.approx(1, abs=2e-3)
    top2 = {h.relpath for h in engine.search(image=root / "copy.jpg", k=2)}
    assert top2 == {"copy.jpg", paths[4].name}

    paths[6].unlink()
    make_images(tmp_path / "new", 10, seed=3)[9].replace(paths[7])  # modified in place
    s = index_json(ix)
    assert (s["removed"], s["updated"], s["moved"]) == (1, 1, 0)
    assert vector_rows(ix) == 9
    info = json.loads(run("info", "--json", "--index", ix).stdout)
    assert info["images"] == 8 and info["index"]["vectors"] == 8


@pytest.mark.slow
def test_reindex_switches_the_model(indexed_images, other_model):
    root, ix = indexed_images(4)
    assert run("index", "--index", ix, "--model", other_model, code=5)
    s = index_json(ix, "--model", other_model, "--reindex")
    assert s["reencoded"] == 4 and s["added"] == 0 and vector_rows(ix) == 4  # a new generation, folded
    engine = alignsearch.open(ix)
    assert engine.model_info["model"] == str(other_model)
    assert engine.search(image=root / "img001.jpg", k=1)[0].score == pytest.approx(1, abs=2e-3)


@pytest.mark.slow
def test_a_run_marks_itself_under_way_once_a_reindex_too(indexed_images, other_model, monkeypatch):
    """`index --reindex` wrote the run-under-way mark twice, once as its re-encode began (_reindex) and again as
    the ordinary run after it began (_index), each a transaction of its own, the second moving the recorded start
    to after the re-encode. One run, one mark, cleared at its end, as an ordinary run's."""
    root, ix = indexed_images(4)
    written = []
    real_write = state.write

    def noting(conn, **fields):
        if "index_run" in fields:
            written.append(fields["index_run"])
        return real_write(conn, **fields)

    monkeypatch.setattr(state, "write", noting)
    make_images(root / "more", 1, seed=5)  # the ordinary run after the re-encode has a file to add
    assert index_json(ix, root, "--model", other_model, "--reindex")["reencoded"] == 4
    assert len([m for m in written if m is not None]) == 1 and written[-1] is None, written
    written.clear()
    index_json(ix, root)  # an ordinary run, for comparison: the same one mark
    assert len([m for m in written if m is not None]) == 1 and written[-1] is None, written


def consistent(ix, expected_paths):
    """Every image exactly once in catalog and index; vectors agree with the images."""
    engine = alignsearch.open(ix)
    with engine.db.connect() as conn:
        live = catalog.live_pairs(conn).tolist()
        rows = catalog.get_files(conn, [i for i, _ in live])
    assert sorted(r.path for r in rows.values()) == sorted(map(str, expected_paths))
    from alignsearch.storage.ann import stored_ids

    ids = stored_ids(engine.index)
    assert len(ids) == len(set(ids)) == len(live)
    assert set(ids.tolist()) == {i for i, _ in live}
    assert engine.store.path.stat().st_size == engine.store.rows * engine.store.row_bytes
    # each stored vector is its own image's: an image query finds itself first
    for path in random.Random(0).sample(list(expected_paths), 5):
        assert engine.search(image=path, k=1)[0].path == str(path)


@pytest.mark.slow
def test_kill_9_at_random_points_then_resume(tmp_path, tiny_model):
    root, ix = tmp_path / "photos", tmp_path / "ix"
    paths = make_images(root, 240)
    cmd = [sys.executable, "-m", "alignsearch", "index", str(root), "--index", str(ix), "--model", str(tiny_model),
           "--device", "cpu", "--batch-size", "4", "--workers", "1"]
    rng = random.Random(1)
    kills = 0
    for _ in range(4):
        before = vector_rows(ix)
        target = before + rng.randint(4, 40)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        # kill -9 mid-run: once it has committed a random number of new vectors
        while proc.poll() is None and vector_rows(ix) < target:
            time.sleep(rng.uniform(0.0, 0.03))
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills == 4, "the indexer finished before a kill: make the corpus bigger"
    done = subprocess.run(cmd + ["--json"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["failed"] == 0
    consistent(ix, paths)
    assert vector_rows(ix) == 240  # no vector written twice for a committed file


@pytest.mark.slow
def test_reader_queries_in_a_loop_while_the_writer_updates(indexed_images):
    root, ix = indexed_images(10)
    engine = alignsearch.open(ix)
    query = engine.embed(text="red car")
    errors, counts, stop = [], [], threading.Event()

    def reader():
        while not stop.is_set():
            try:
                engine.refresh()
                counts.append(len(engine.search_vector(query, k=1000)))
            except Exception as exc:  # noqa: BLE001 - any failure is the finding
                errors.append(repr(exc))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for round_ in range(3):
            make_images(root / f"batch{round_}", 15, seed=10 + round_)
            proc = subprocess.run([sys.executable, "-m", "alignsearch", "index", "--index", str(ix), "--batch-size", "4"],
                                  capture_output=True, text=True)
            assert proc.returncode == 0, proc.stderr
    finally:
        stop.set()
        thread.join()
    assert not errors, errors[:3]
    assert counts and min(counts) >= 10
    assert all(b >= a for a, b in zip(counts, counts[1:]))  # never a half-updated view
    # The reader's last look may have begun before the last run committed (its refresh, then the commit and
    # the run's exit, then its search and the stop: CI saw 40 last): a refresh after the writer is done sees
    # everything.
    engine.refresh()
    assert len(engine.search_vector(query, k=1000)) == 55


@pytest.mark.slow
def test_a_reader_opening_across_a_publish_picks_up_the_run_on_its_next_refresh(indexed_images, monkeypatch):
    # CI once ended the loop above at 40 of 55. Suspected first: a reader whose catalog read came before a run's
    # commit and whose look at the published file came after it would hold the older catalog with the newer
    # index's stamp, and refresh() would see nothing to pick up until the next run published. It does not (this
    # passes on the code of that CI run: the store and the rows are read at search time); kept as the guarantee.
    from alignsearch.storage import vectors

    root, ix = indexed_images(10)
    engine = alignsearch.open(ix)
    query = engine.embed(text="red car")
    make_images(root / "more", 15, seed=40)
    load, ran = vectors.load, []

    def load_then_a_run_commits(*args, **kwargs):  # inside the reader's catalog transaction
        if not ran:
            ran.append(subprocess.run([sys.executable, "-m", "alignsearch", "index", "--index", str(ix)],
                                      capture_output=True, text=True))
        return load(*args, **kwargs)

    monkeypatch.setattr(vectors, "load", load_then_a_run_commits)
    before = (ix / "index.faiss").read_bytes()  # the next run republishes it
    os.utime(ix / "index.faiss")  # a stamp unlike the last open's
    engine.refresh()
    assert ran and ran[0].returncode == 0, ran and ran[0].stderr
    assert (ix / "index.faiss").read_bytes() != before
    monkeypatch.setattr(vectors, "load", load)
    engine.refresh()
    assert len(engine.search_vector(query, k=1000)) == 25


@pytest.mark.slow
def test_verify_finds_and_repairs_damage(indexed_images):
    from alignsearch.storage.ann import read, remove, write_atomic

    root, ix = indexed_images(6)
    assert json.loads(run("verify", "--index", ix, "--json").stdout)["ok"]

    with open(ix / "vectors.f16", "ab") as f:  # a killed writer's uncommitted tail
        f.write(b"\0" * 100)
    faiss_index = read(ix / "index.faiss")
    remove(faiss_index, [1, 2])  # two files missing from the ANN index
    write_atomic(faiss_index, ix / "index.faiss")
    out = run("verify", "--index", ix, code=7).output
    # an ANN file rewritten behind the catalog's back fails its checksum before its ids are even read
    assert "uncommitted bytes" in out and "index.faiss is damaged" in out

    report = json.loads(run("verify", "--index", ix, "--repair", "--json").stdout)
    assert report["ok"] and report["repaired"]
    assert json.loads(run("info", "--json", "--index", ix).stdout)["index"]["vectors"] == 6


def test_one_writer_at_a_time_and_verify_tells_in_flight_writes_from_damage(indexed_images):
    from indexer.lock import writer_lock
    from indexer.verify import verify

    root, ix = indexed_images(3)
    with open(ix / "vectors.f16", "ab") as f:
        f.write(b"\0" * 64)  # rows a writer has not committed yet
    (ix / "vectors").mkdir()
    (ix / "vectors" / "in-flight.f16").write_bytes(b"\0" * 64)  # an encoder actor's first batch
    with writer_lock(ix):  # as a running `alignsearch index` holds it
        result = run("index", root, "--index", ix, "--device", "cpu", code=6)
        assert "another alignsearch process is writing" in result.output
        busy = verify(ix, check_model=False)
        assert busy.ok and busy.checked["writer_running"], busy.problems
    idle = verify(ix, check_model=False)  # the same bytes with no writer: left by a killed run
    assert "vectors.f16 has 64 uncommitted bytes past row 3" in idle.problems
    assert any("1 vector segment files the catalog does not know" in p for p in idle.problems)
    assert verify(ix, repair=True, check_model=False).ok
    assert not (ix / "vectors" / "in-flight.f16").exists()
    assert (ix / "vectors.f16").stat().st_size == 3 * alignsearch.open(ix).store.row_bytes


@pytest.mark.slow
def test_a_reader_finds_vectors_committed_after_it_loaded_the_store(indexed_images):
    root, ix = indexed_images(3)
    engine = alignsearch.open(ix)
    make_images(root / "more", 2, seed=5)
    index_json(ix, root, "--device", "cpu")  # the engine is not refreshed: its store predates these rows
    with engine.db.connect() as conn:
        new_ids = [r.id for r in catalog.files_under(conn, str(root.resolve())).values() if r.relpath.startswith("more/")]
    assert len(new_ids) == 2
    fresh = alignsearch.open(ix)
    for file_id in new_ids:
        assert np.allclose(engine.vector_of(file_id), fresh.vector_of(file_id))


@pytest.mark.slow
def test_a_version_1_catalog_is_upgraded_and_a_newer_one_refused(indexed_images):
    root, ix = indexed_images(2)

    def set_version(v):
        conn = sqlite3.connect(ix / "catalog.db")
        with conn:
            conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (json.dumps(v),))
        conn.close()

    set_version(1)  # written before vector segments: its rows are segment 0 addresses
    assert len(alignsearch.open(ix).search(text="x", k=5)) == 2  # read as it is: a reader writes nothing
    index_json(ix, "--device", "cpu")  # the next writer upgrades it
    with alignsearch.open(ix).db.connect() as conn:
        assert state.read(conn).schema_version == migrate.LATEST
    set_version(migrate.LATEST + 1)  # written by a newer alignsearch
    with pytest.raises(AlignSearchError, match="upgrade alignsearch"):
        alignsearch.open(ix)


def test_one_runner_times_a_local_and_a_pre_encoded_reader_alike():
    """indexer/pipeline.py's drive runs both paths: batches it encodes itself (local), and batches whose
    vectors came from upstream (Ray's encoder actors) or were stored there (actor_rows)."""
    from indexer.decode import Item
    from indexer.pipeline import Batch, drive
    from indexer.scan import Found

    def items(n, seconds=0.01):
        return [Item(Found("/r", f"{i}.jpg", 1, 0.0), np.full((2, 2, 3), i, np.uint8), f"h{i}", seconds=seconds)
                for i in range(n)] + [Item(Found("/r", "bad.jpg", 1, 0.0), None, reason="broken", seconds=seconds)]

    class Encoder:
        def encode_crops(self, crops):
            time.sleep(0.01)
            return crops.reshape(len(crops), -1)[:, :2].astype(np.float32)

    written = []

    def write(batch, new_vectors, actor_rows):
        written.append(([it.vec_row for it in batch], new_vectors.tolist(), list(actor_rows)))

    local = drive([Batch(items(3))], Encoder(), write, known=lambda hashes: {"h1": 7})
    assert written.pop() == ([None, 7, None, None], [[0, 0], [2, 2]], [])  # h1 reuses row 7, unencoded
    upstream = items(3)
    upstream[0].vec_row = 1 << 40  # stored by an actor in its segment
    shipped = np.array([[1, 1], [2, 2]], np.float32)
    ray = drive([Batch(upstream, shipped, [1 << 40], encode_seconds=0.5)], None, write)
    assert written.pop() == ([1 << 40, None, None, None], [[1, 1], [2, 2]], [1 << 40])
    assert local.to_dict().keys() == ray.to_dict().keys()
    for times in (local, ray):
        assert (times.items, times.failed) == (4, 1) and times.decode_worker == pytest.approx(0.04)
    assert (local.reused, ray.reused) == (1, 0)
    assert local.encode >= 0.01 and ray.encode >= 0.5  # the actors' own encode seconds count as the stage's


@pytest.mark.slow
def test_the_writer_logs_what_it_cuts_from_a_killed_run(indexed_images, caplog):
    """Diagnostics of the write path go to logging (a logger per module), not print: here the bytes a
    killed run appended without committing, and a segment file no commit knows."""
    import logging

    root, ix = indexed_images(3)
    engine = alignsearch.open(ix)
    with open(engine.store.path, "ab") as f:
        f.write(b"\1" * engine.store.row_bytes * 2)
    (ix / "vectors").mkdir(exist_ok=True)
    (ix / "vectors" / "orphan.f16").write_bytes(b"\1" * engine.store.row_bytes)
    make_images(root / "more", 1, seed=5)
    with caplog.at_level(logging.INFO, logger="alignsearch.storage.vectors"):
        s = index_json(ix, root, "--device", "cpu")
    assert s["added"] == 1 and vector_rows(ix) == 4
    cut = [r for r in caplog.records if r.name == "alignsearch.storage.vectors"]
    assert any(f"cutting {engine.store.row_bytes * 2} uncommitted bytes after its 3 committed rows" in r.getMessage()
               for r in cut), [r.getMessage() for r in cut]
    assert any("orphan.f16: deleting a segment no commit knows" in r.getMessage() for r in cut)
    assert not (ix / "vectors" / "orphan.f16").exists()


def test_fill_steps_leave_alone_the_files_deleted_since_the_last_run(indexed_images, monkeypatch):
    """The files deleted from disk leave the catalog with the ANN index, after the fill steps (perceptual hashes,
    photo fields, the text of an index gaining --ocr): those steps never try to read them, and the text-reading
    bar counts only what there is to read."""
    from alignsearch.media import ocr
    from indexer import progress

    root, ix = indexed_images(4)
    with sqlite3.connect(ix / "catalog.db") as conn:  # as an index from before hashes and photo fields
        conn.execute("DELETE FROM phashes")
        conn.execute("DELETE FROM photos")
    conn.close()
    gone = root / "img001.jpg"
    gone.unlink()
    opened, bars = [], {}
    read = catalog.FileRow.read
    monkeypatch.setattr(catalog.FileRow, "read", lambda row: opened.append(row.path) or read(row))
    monkeypatch.setattr(ocr, "check_available", lambda: None)  # the engine's answers do not matter here
    monkeypatch.setattr(ocr, "read_text", lambda image: "")
    bar = progress.bar
    monkeypatch.setattr(progress, "bar", lambda total=None, desc="", enabled=True: bars.setdefault(
        desc, bar(total, desc, enabled)))
    s = index_json(ix, "--device", "cpu", "--workers", "0", "--ocr")
    assert s["removed"] == 1 and s["times"]["items"] == 0, s
    assert str(gone) not in opened
    assert sorted(set(opened)) == sorted(str(p) for p in root.iterdir())  # the fill steps did run, on the others
    extra = s["times"]["extra"]
    assert (extra["phashes_filled"], extra["photo_fields_filled"], extra["ocr_filled"]) == (3, 3, 3), extra
    assert bars["reading text"].total == 3


@pytest.mark.slow
def test_fill_steps_skip_a_file_replaced_since_the_scan(indexed_images, tiny_model, monkeypatch):
    """The phash, OCR and photo-field fills re-read files indexed before: one replaced between the scan and
    the fill had the other picture's hash, text and camera stored under the old row. It is left unfilled
    (its size and mtime, checked on the opened file, are not the row's), and the next run indexes it anew."""
    from PIL import Image
    from sqlalchemy import delete, select, update

    import indexer.decode
    from indexer import ocrfill, phashfill, photos

    root, ix = indexed_images(3)
    db = catalog.connect(ix / "catalog.db")
    with db.connect() as conn:
        ids = {r[0]: r[1] for r in conn.execute(select(catalog.files.c.relpath, catalog.files.c.id))}
    victim = sorted(ids)[0]
    with db.begin() as conn:  # as an index written before these existed, or without --ocr
        conn.execute(delete(catalog.phashes))
        conn.execute(update(catalog.photos).values(ocr=None))
        seal(conn)
    before = os.stat(root / victim)
    exif = Image.Exif()
    exif[0x0110] = "Replaced"  # the camera model the other picture would have lent the old row
    Image.new("RGB", (300, 200), (250, 10, 10)).save(root / "new.tmp", "JPEG", exif=exif)
    os.utime(root / "new.tmp", ns=(before.st_atime_ns, before.st_mtime_ns + 5_000_000_000))
    os.replace(root / "new.tmp", root / victim)

    monkeypatch.setattr(indexer.decode, "read_text", lambda image, path: ("WORDS READ", 0.0))
    assert phashfill.fill_phashes(db) == 2
    assert ocrfill.fill(db)[0] == 2
    with db.begin() as conn:
        assert ids[victim] not in catalog.phashes_of(conn, list(ids.values()))
        assert set(catalog.ocr_of(conn, list(ids.values()))) == set(ids.values()) - {ids[victim]}
        conn.execute(delete(catalog.photos))
    assert photos.fill(db) == 2
    with db.connect() as conn:
        filled = {r[0]: r[1] for r in conn.execute(select(catalog.photos.c.file_id, catalog.photos.c.camera))}
    assert set(filled) == set(ids.values()) - {ids[victim]} and "Replaced" not in str(filled.values())
    db.dispose()

    again = index_json(ix, root, "--model", tiny_model, "--device", "cpu")  # the next run: a changed file
    assert again["updated"] == 1, again
    db = catalog.connect(ix / "catalog.db")
    with db.connect() as conn:
        new_id = conn.execute(select(catalog.files.c.id).where(catalog.files.c.relpath == victim)).scalar()
        assert new_id in catalog.phashes_of(conn, [new_id])
        assert conn.execute(select(catalog.photos.c.camera).where(catalog.photos.c.file_id == new_id)).scalar() \
            == "Replaced"
    db.dispose()


# `index` with the caption slack off (scan.CHANGED_SLACK_S: a caption edited a minute before a run started is read
# again whatever the records say), so that only the records (root options listed, unread, mounts) decide
_NO_SLACK = ("import sys; from indexer import scan; scan.CHANGED_SLACK_S = 0; sys.argv[0] = 'alignsearch'; "
             "from alignsearch.__main__ import run; run()")

# _NO_SLACK's run, which stops itself (SIGSTOP) where STOP_AT says, for the test to kill it there: "begin:N" as its
# N-th transaction begins (a catalog read or write; what the run did before is done), "write:N" once its N-th batch is
# committed; and says so, or at its end how many of each it ran, on the pipe STOP_FD. A kill at a point of the run's
# own progress, not at a time: under load a kill timed by an earlier run's duration came after the run had ended.
_STOPPING = """
import atexit, os, signal, sys
from sqlalchemy import event
from sqlalchemy.engine import Engine
from indexer import scan, writer
scan.CHANGED_SLACK_S = 0
fd = int(os.environ["STOP_FD"])
os.set_inheritable(fd, False)
kind, _, at = os.environ.get("STOP_AT", ":0").partition(":")
seen = {"begin": 0, "write": 0}

def reached(what):
    seen[what] += 1
    if what == kind and seen[what] == int(at):
        os.write(fd, b"stopped\\n")
        os.kill(os.getpid(), signal.SIGSTOP)

event.listen(Engine, "begin", lambda conn: reached("begin"))
made = writer.catalog_writer

def catalog_writer(*args, **kwargs):
    write = made(*args, **kwargs)

    def counted(*args, **kwargs):
        write(*args, **kwargs)
        reached("write")
    return counted

writer.catalog_writer = catalog_writer
atexit.register(lambda: os.write(fd, ("ran %d %d\\n" % (seen["begin"], seen["write"])).encode()))
sys.argv[0] = "alignsearch"
from alignsearch.__main__ import run
run()
"""


def _run_stopping(cmd: list, stop_at: str) -> tuple[bool, str]:
    """cmd (a _STOPPING run) with STOP_AT=stop_at, killed with -9 (its process group) where it stopped itself;
    (whether it was, what it said on the pipe)."""
    read, write = os.pipe()
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                                pass_fds=(write,), env={**os.environ, "STOP_FD": str(write), "STOP_AT": stop_at})
    finally:
        os.close(write)
    said = b""
    with os.fdopen(read, "rb") as pipe:
        while b"\n" not in said:  # a line, or the end of the pipe: the run ended
            chunk = pipe.read1(256)
            if not chunk:
                break
            said += chunk
    stopped = said.startswith(b"stopped")
    if stopped:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return stopped, said.decode()


def _read_catalog(ix, sql: str, *args) -> list:
    conn = sqlite3.connect(f"file:{ix / 'catalog.db'}?mode=ro", uri=True)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


@pytest.mark.slow
def test_kill_9_of_runs_keeps_an_unplugged_drive_s_files_and_reads_the_captions_edited_meanwhile(tmp_path, tiny_model):
    """The records a run keeps of a root (mounts: the drives mounted inside it, photos/nas a real tmpfs; listed and
    unread: up to when its captions were read) under runs killed with -9 at random moments, between which a caption
    of an unchanged photo is edited, photos are added (work to be killed in) and the drive is unplugged or plugged
    back: no run removes the drive's files, and the run that ends at last has read the last caption."""
    from helpers import mount_tmpfs, unmount

    root, ix, drive = tmp_path / "photos", tmp_path / "ix", tmp_path / "drive"
    captioned = make_images(root / "a", 2, seed=11)[0]
    on_drive = make_images(drive, 3, seed=12)
    if not mount_tmpfs(root / "nas"):
        pytest.skip("cannot mount a tmpfs here")
    try:
        for photo in on_drive:
            shutil.copy2(photo, root / "nas" / photo.name)
        cmd = [sys.executable, "-c", _NO_SLACK, "index", str(root), "--index", str(ix), "--model", str(tiny_model),
               "--device", "cpu", "--batch-size", "2", "--workers", "0"]
        assert subprocess.run(cmd, capture_output=True).returncode == 0
        make_images(root / "b", 12, seed=99)
        stopping = [sys.executable, "-c", _STOPPING, *cmd[3:]]
        stopped, said = _run_stopping(stopping, "")  # a run of the changes each step makes: its transactions counted
        assert not stopped and said.startswith("ran "), said
        transactions = int(said.split()[1])
        r = str(root.resolve())

        def drive_rows() -> int:
            return _read_catalog(ix, "SELECT count(*) FROM files WHERE root = ? AND relpath LIKE 'nas/%'", r)[0][0]

        rng, plugged, kills, text = random.Random(3), True, 0, None
        for i in range(8):
            time.sleep(0.05)  # every change below is older than the next run's start, as in life
            text = f"caption {i}"
            captioned.with_suffix(".txt").write_text(text)
            make_images(root / "b", 12, seed=100 + i)  # overwritten: the same names, new photos
            # the drive plugged for the last: a listing error (the drive away) holds the record of the captions back
            if (i < 7 and rng.random() < 0.5) or (i == 7 and not plugged):
                if plugged:
                    unmount(root / "nas")
                else:
                    assert mount_tmpfs(root / "nas")
                    for photo in on_drive:
                        shutil.copy2(photo, root / "nas" / photo.name)
                plugged = not plugged
            time.sleep(0.05)
            before = vector_rows(ix)
            # killed as it encodes, its listing recorded (the last run too: its caption is checked): once its first
            # batch is committed; else at any moment: as one of its transactions begins, all it did before done
            at = "write:1" if i % 2 or i == 7 else f"begin:{rng.randint(1, transactions)}"
            stopped, said = _run_stopping(stopping, at)
            kills += stopped
            assert stopped or at.startswith("begin"), (i, said)  # every run commits its batches
            assert not at.startswith("write") or vector_rows(ix) > before, i
            assert drive_rows() == 3, (i, plugged)
        assert kills >= 6, f"{kills} kills: the runs ended before the kill"
        done = subprocess.run(cmd + ["--json"], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert drive_rows() == 3
        stored = _read_catalog(ix, "SELECT p.caption FROM files f JOIN photos p ON p.file_id = f.id "
                                   "WHERE f.root = ? AND f.relpath = ?", r, f"a/{captioned.name}")
        assert stored == [(text,)], stored
        unmount(root / "nas")  # and unplugged once more, under a run that ends
        assert subprocess.run(cmd, capture_output=True).returncode == 0 and drive_rows() == 3
    finally:
        unmount(root / "nas")


@pytest.mark.slow
def test_copies_met_in_one_run_share_one_vector_row(tmp_path, tiny_model):
    """Three copies of one photo indexed in the same first run stored three vector rows (README: one row per
    content, copies share one); only a copy met in a later run reused the stored row."""
    root, ix = tmp_path / "photos", tmp_path / "ix"
    paths = make_images(root, 2)
    for name in ("copy1.jpg", "copy2.jpg"):
        shutil.copy(paths[0], root / name)
    s = index_json(ix, root, "--model", tiny_model, "--device", "cpu")
    assert s["added"] == 4 and vector_rows(ix) == 2, s
    engine = alignsearch.open(ix)
    hits = engine.search(image=paths[0], k=4)
    assert sorted(h.relpath for h in hits[:3]) == sorted(["copy1.jpg", "copy2.jpg", paths[0].name])
    assert all(h.score == pytest.approx(1, abs=2e-3) for h in hits[:3])
    assert json.loads(run("verify", "--json", "--index", ix).stdout)["ok"]


@pytest.mark.slow
def test_a_reindex_stores_one_row_for_copies_of_one_content(tmp_path, tiny_model, other_model):
    """`index --reindex` stored a row per file: three copies of one photo took three rows of the new generation
    (`vectors: 3 rows stored, 3 in use`), where an index run stores them in one (README: copies share one)."""
    root, ix = tmp_path / "photos", tmp_path / "ix"
    paths = make_images(root, 2)
    for name in ("copy1.jpg", "copy2.jpg"):
        shutil.copy(paths[0], root / name)
    index_json(ix, root, "--model", tiny_model, "--device", "cpu")
    s = index_json(ix, "--reindex", "--model", other_model, "--device", "cpu")
    assert s["reencoded"] == 4 and vector_rows(ix) == 2, s
    hits = alignsearch.open(ix).search(image=paths[0], k=3)
    assert sorted(h.relpath for h in hits) == sorted(["copy1.jpg", "copy2.jpg", paths[0].name])
    assert all(h.score == pytest.approx(1, abs=2e-3) for h in hits)
    assert json.loads(run("verify", "--json", "--index", ix).stdout)["ok"]
