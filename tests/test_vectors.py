"""The vector store's segments: addresses, commits, and what a writer cuts off."""

import pickle

import numpy as np

from alignsearch.storage.vectors import VectorStore, address


def rows(n, dim=4, seed=0):
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float16)


def test_addresses_span_segments_and_come_back_in_the_order_asked(tmp_path):
    store = VectorStore(tmp_path / "vectors.f16", 4, 0)
    base = rows(3)
    assert store.append(base) == 0 and store.append(base[:1]) == 3  # segment 0: addresses are row numbers
    actor = VectorStore(store.folder / "a1.f16", 4, 0)  # what an encoder actor writes
    store.folder.mkdir()
    mine = rows(5, seed=1)
    actor.append(mine)
    assert store.commit("a1", 2) == 1 and store.commit("a1", 5) == 1 and store.commit("a1", 4) == 1
    assert store.committed(1) == 5  # commits only ever extend a segment
    want = [address(1, 4), 2, address(1, 0), 3]
    got = store.get(np.array(want))
    assert np.array_equal(got, np.stack([mine[4], base[2], mine[0], base[0]]).astype(np.float32))
    assert store.get(np.array([], dtype=np.int64)).shape == (0, 4)
    clone = pickle.loads(pickle.dumps(store))  # as sent to build workers: no open maps travel
    assert np.array_equal(clone.get(np.array(want)), got)


def test_a_writer_cuts_uncommitted_rows_and_unknown_segments(tmp_path):
    store = VectorStore(tmp_path / "vectors.f16", 4, 0)
    store.append(rows(2))
    store.folder.mkdir()
    VectorStore(store.folder / "kept.f16", 4, 0).append(rows(6))
    VectorStore(store.folder / "orphan.f16", 4, 0).append(rows(3))  # an actor killed before its first commit
    store.commit("kept", 4)  # two rows past this were written for a batch that never came back
    with open(store.path, "ab") as f:
        f.write(b"\0" * 8)  # half a row of a killed single-process run
    store.truncate_uncommitted()
    assert store.path.stat().st_size == 2 * store.row_bytes
    assert (store.folder / "kept.f16").stat().st_size == 4 * store.row_bytes
    assert not (store.folder / "orphan.f16").exists()


def test_small_segments_fold_into_segment_0_and_the_catalog_follows(tmp_path):
    from alignsearch.storage import catalog, vectors
    from indexer.writer import fold_small_segments

    db = catalog.connect(tmp_path / "catalog.db")
    store = VectorStore(tmp_path / "vectors.f16", 4, 0)
    store.append(rows(2))
    store.folder.mkdir()
    small, big = rows(3, seed=1), rows(5, seed=2)
    VectorStore(store.folder / "small.f16", 4, 0).append(small)
    VectorStore(store.folder / "big.f16", 4, 0).append(big)
    assert store.commit("small", 3) == 1 and store.commit("big", 5) == 2
    pointers = [1, address(1, 2), address(1, 0), address(2, 4), address(1, 2)]  # the last: duplicate content
    with db.begin() as conn:
        for i, vec_row in enumerate(pointers):
            catalog.upsert_file(conn, dict(root="/r", relpath=f"f{i}.jpg", relpath_raw=None, size=1, mtime=0.0,
                                           sha256=str(i), width=1, height=1, format="JPEG", status=catalog.INDEXED,
                                           reason=None, vec_row=vec_row))
        vectors.save(conn, store)
    before = store.get(np.array(pointers))
    assert fold_small_segments(db, store, below=4) == 3
    assert store.rows == 5 and store.segments == {2: ("big", 5)}
    assert not (store.folder / "small.f16").exists() and (store.folder / "big.f16").exists()
    with db.connect() as conn:
        reloaded = vectors.load(conn, tmp_path, 4)
        after = catalog.live_pairs(conn)[:, 1].tolist()
    assert after == [1, 4, 2, address(2, 4), 4]
    assert np.array_equal(reloaded.get(np.array(after)), before)
    assert reloaded.commit("next", 1) == 3  # numbers in use are never reassigned
    db.dispose()


def test_adopting_rows_written_before_checksums_refuses_any_row_that_is_not_unit_length(tmp_path):
    """A zeroed row, a scaled one and one whose bytes became NaN (0xFFFF) are counted damaged and nothing is
    recorded; unit rows are adopted. The NaN row was adopted (0 counted: NaN >= tolerance is False)."""
    from alignsearch.storage import catalog, vectors

    good = rows(6)
    good = (good.astype(np.float32) / np.linalg.norm(good.astype(np.float32), axis=1, keepdims=True))
    db = catalog.connect(tmp_path / "catalog.db")
    for broken, expected in [(None, 0), (np.zeros(4), 1), (2 * good[0], 1), (np.full(4, np.nan), 1)]:
        store = VectorStore(tmp_path / "vectors.f16", 4, 0)
        store.path.unlink(missing_ok=True)
        stored = good.copy()
        if broken is not None:
            stored[3] = broken
        store.append(stored)
        with db.begin() as conn:
            vectors.forget_chunks(conn, "")
            assert vectors.adopt_segment(conn, store, 0) == expected, broken
            recorded = conn.execute(catalog.vector_chunks.select()).all()
        assert len(recorded) == (expected == 0), broken
    db.dispose()


def test_a_query_meeting_damaged_rows_counts_each_nan_among_them(tmp_path):
    """Rows no checksum covers (an index of an older alignsearch) are checked for unit length when a query
    scores them: a NaN row counts as damaged (it said "0 stored vectors are damaged"), and the engine's
    tolerance (0.02) is its own, tighter than the write path's."""
    import pytest

    import alignsearch
    from alignsearch.errors import IndexDamagedError
    from alignsearch.storage import catalog
    from alignsearch.storage.paths import ANN_FILE, DB_FILE
    from alignsearch.storage.vectors import UNIT_TOLERANCE, not_unit_length
    from helpers import vector_index
    from indexer.build import sync_index

    x = rows(20, dim=16).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x[3] = np.nan
    x[5] *= 0.97  # damaged at the engine's 0.02, not at UNIT_TOLERANCE
    ix = tmp_path / "ix"
    store = vector_index(ix, 20, 16, rows=x)
    db = catalog.connect(ix / DB_FILE)
    sync_index(db, store, ix / ANN_FILE)
    db.dispose()
    with alignsearch.open(ix) as engine:  # a filter: every allowed row scored exactly, the NaN one too
        with pytest.raises(IndexDamagedError, match="^2 stored vectors are damaged"):
            engine.search_vector(x[0], k=20, format="JPEG")
    assert not_unit_length(x) == 1 and not_unit_length(x, tolerance=0.02) == 2 and UNIT_TOLERANCE > 0.03


def test_a_segment_is_never_read_through_a_link(tmp_path):
    """A segment under vectors/ swapped for a symbolic link (to a copy of itself, to a FIFO): readers mapped or read the
    file it named, and a FIFO hung them for ever. Now the map (made once per segment, not per query) and the bulk
    reader refuse it as writers do: IndexDamagedError (exit 7), before a byte is read."""
    import os

    import pytest

    from alignsearch.errors import IndexDamagedError
    from alignsearch.storage.vectors import read_into

    store = VectorStore(tmp_path / "vectors.f16", 4, 0)
    store.append(rows(2))
    store.folder.mkdir()
    VectorStore(store.folder / "a1.f16", 4, 0).append(rows(3, seed=1))
    store.commit("a1", 3)
    segment = store.folder / "a1.f16"
    os.rename(segment, tmp_path / "copy.f16")
    os.mkfifo(tmp_path / "fifo")
    for target in (tmp_path / "copy.f16", tmp_path / "fifo"):
        segment.unlink(missing_ok=True)
        segment.symlink_to(target)
        fresh = VectorStore(store.path, 4, store.rows, dict(store.segments))
        with pytest.raises(IndexDamagedError, match="a1.f16 is a symbolic link"):
            fresh.get(np.array([address(1, 0)]))
        with pytest.raises(IndexDamagedError, match="a1.f16 is a symbolic link"):
            read_into(fresh, np.array([address(1, 0)]), np.empty((1, 4), np.float16))


def test_a_segment_row_damaged_before_the_fold_is_refused_and_nothing_moves(tmp_path):
    """A Ray run's segments carry checksums (writer.record_runs); the fold copied their rows into vectors.f16
    unchecked and recorded a fresh checksum over what it read, so a byte flipped on disk between the segment's
    write and the fold went live as sound and verify said ok. The fold reads them first: ChunkChanged, and the
    store, the catalog and the files are as they were."""
    import pytest

    from alignsearch.storage import catalog, vectors
    from indexer.writer import fold_small_segments, record_runs

    db = catalog.connect(tmp_path / "catalog.db")
    store = VectorStore(tmp_path / "vectors.f16", 4, 0)
    store.append(rows(2))
    store.folder.mkdir()
    VectorStore(store.folder / "a.f16", 4, 0).append(rows(3, seed=1))
    VectorStore(store.folder / "b.f16", 4, 0).append(rows(2, seed=2))
    assert store.commit("a", 3) == 1 and store.commit("b", 2) == 2
    pointers = [0, 1, address(1, 0), address(1, 1), address(1, 2), address(2, 0), address(2, 1)]
    with db.begin() as conn:
        for i, vec_row in enumerate(pointers):
            catalog.upsert_file(conn, dict(root="/r", relpath=f"f{i}.jpg", relpath_raw=None, size=1, mtime=0.0,
                                           sha256=str(i), width=1, height=1, format="JPEG", status=catalog.INDEXED,
                                           reason=None, vec_row=vec_row))
        vectors.record_chunk(conn, store, 0, 0, 2)
        record_runs(conn, store, np.array(pointers[2:]))
        vectors.save(conn, store)
        chunks_before = conn.execute(catalog.vector_chunks.select().order_by("segment", "start")).all()
    damaged = store.folder / "b.f16"
    data = bytearray(damaged.read_bytes())
    data[store.row_bytes] ^= 0x40  # the low byte of row 1's first component
    damaged.write_bytes(bytes(data))
    files_before = {p.name: p.read_bytes() for p in [store.path, *store.folder.iterdir()]}

    with pytest.raises(vectors.ChunkChanged, match=r"b\.f16: vector rows 0 to 1 changed .* verify --repair"):
        fold_small_segments(db, store, below=4)
    assert store.rows == 2 and store.segments == {1: ("a", 3), 2: ("b", 2)}
    assert {p.name: p.read_bytes() for p in [store.path, *store.folder.iterdir()]} == files_before
    with db.connect() as conn:
        assert catalog.live_pairs(conn)[:, 1].tolist() == pointers
        assert conn.execute(catalog.vector_chunks.select().order_by("segment", "start")).all() == chunks_before
        reloaded = vectors.load(conn, tmp_path, 4)
    assert reloaded.rows == 2 and reloaded.segments == store.segments
