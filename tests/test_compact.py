"""Compaction of the vector store (indexer/compact.py): the rows of deleted, changed and forgotten files are
reclaimed by a new generation of the store, with the same answers, a reader open across it, and kill -9 at
each step leaving an index that answers as before and verifies clean."""

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

import alignsearch
from alignsearch.errors import IndexDamagedError
from alignsearch.storage import catalog, state
from alignsearch.storage.paths import DB_FILE, VECTORS_FILE
from conftest import index_json
from helpers import alignsearch as alignsearch_cli
from helpers import compact_now, fixed_answers, index_state, killed_at, unlisted_vector_files, vector_files, verify_problems
from indexer import compact


def test_due_needs_many_dead_rows_and_half_the_store():
    assert not compact.due(live_rows=10, stored_rows=10)
    assert not compact.due(live_rows=10, stored_rows=10_000)  # mostly dead, but too few rows to be worth it
    dead = compact.MIN_DEAD_ROWS
    assert compact.due(live_rows=dead, stored_rows=2 * dead)  # half the store, and enough rows
    assert not compact.due(live_rows=dead + 1, stored_rows=2 * dead + 1)  # less than half
    assert not compact.due(live_rows=10 * dead, stored_rows=11 * dead)  # many rows, a small share
    assert compact.due(live_rows=10, stored_rows=11, force=True) and not compact.due(10, 10, force=True)


def test_force_is_only_ever_named():
    """A call written when compact took the vector width third (`compact(db, out, store.dim)`) is refused, not
    read as force=640: a compaction of any index with one dead row."""
    with pytest.raises(TypeError):
        compact.compact(None, Path("ix"), 640)


def _churn(photos):
    """Five photos deleted, two rewritten (new content: new rows), one copied (its content shared: no row)."""
    from PIL import Image

    names = sorted(p.name for p in photos.iterdir())
    for name in names[:5]:
        (photos / name).unlink()
    for name in names[5:7]:
        with Image.open(photos / name) as img:
            img.convert("RGB").rotate(90, expand=True).save(photos / name, format=img.format or "PNG")
    shutil.copy(photos / names[7], photos / f"copy-of-{names[7]}")
    return names


def _files(ix):
    """(vectors.f16 size, {segment file name: size}) as they lie on disk."""
    return (ix / VECTORS_FILE).stat().st_size, {name: (ix / "vectors" / name).stat().st_size
                                                for name in vector_files(ix)}


def _live(ix):
    db = catalog.connect(ix / DB_FILE, readonly=True)
    with db.connect() as conn:
        pairs = [tuple(p) for p in catalog.live_pairs(conn).tolist()]
        generation = state.read(conn).generation
    db.dispose()
    return pairs, generation


@pytest.mark.slow
def test_compaction_keeps_every_answer_and_frees_the_dead_rows(indexed_images, tmp_path, tiny_model):
    photos, ix = indexed_images(12)
    _churn(photos)
    kept = tmp_path / "kept"  # the same run without compaction: the answers to match
    shutil.copytree(ix, kept)
    index_json(kept, photos, "--device", "cpu", "--no-compact")
    reader = alignsearch.open(ix)  # a reader of the old generation, open across the compaction
    before = fixed_answers(ix)
    summary = index_json(ix, photos, "--device", "cpu", "--compact")

    pairs, generation = _live(ix)
    rows = len({row for _, row in pairs})
    assert len(pairs) == 8 and rows == 7  # 7 photos left, one copy sharing its original's row
    done = summary["compacted"]
    assert done["rows_before"] == 12 + 2 and done["rows_after"] == rows, done
    row_bytes = reader.store.row_bytes
    assert done["bytes_freed"] == (12 + 2 - rows) * row_bytes
    main, segments = _files(ix)
    assert main == 0 and list(segments.values()) == [rows * row_bytes], (main, segments)  # nothing else left
    assert _live(kept)[1] + 1 == generation  # a new generation: readers swap their snapshot whole

    assert fixed_answers(ix) == fixed_answers(kept) and before != fixed_answers(ix)
    with alignsearch.open(kept) as uncompacted, alignsearch.open(ix) as compacted:  # what `info` reports
        assert uncompacted.info()["vector_store"] == {"rows": 14, "live_rows": 7, "dead_bytes": 7 * row_bytes}
        assert compacted.info()["vector_store"] == {"rows": 7, "live_rows": 7, "dead_bytes": 0}
    query = np.random.default_rng(3).standard_normal(reader.store.dim).astype(np.float32)
    query /= np.linalg.norm(query)
    with alignsearch.open(kept) as expected:
        want = [(h.path, round(h.score, 5)) for h in expected.search_vector(query, k=20)]
    got = [(h.path, round(h.score, 5)) for h in reader.search_vector(query, k=20)]  # the old reader, refreshed
    reader.close()
    assert got == want
    assert verify_problems(ix) == []

    again = index_json(ix, photos, "--device", "cpu")  # nothing dead now: nothing to do, by default or forced
    assert again["compacted"] is None and index_json(ix, photos, "--device", "cpu", "--compact")["compacted"] is None
    assert _files(ix) == (main, segments)


@pytest.mark.slow
def test_new_files_after_a_compaction_go_to_vectors_f16(indexed_images, tmp_path):
    from conftest import make_images

    photos, ix = indexed_images(12)
    _churn(photos)
    index_json(ix, photos, "--device", "cpu", "--compact")
    make_images(photos / "more", 3, seed=9)
    summary = index_json(ix, photos, "--device", "cpu")
    assert summary["added"] == 3 and summary["compacted"] is None
    main, segments = _files(ix)
    with alignsearch.open(ix) as engine:
        assert main == 3 * engine.store.row_bytes and len(segments) == 1
    assert len(fixed_answers(ix)) == 8 + 3 and verify_problems(ix) == []


@pytest.mark.slow
def test_a_damaged_row_is_not_copied_into_a_fresh_checksum(indexed_images):
    photos, ix = indexed_images(12)
    _churn(photos)
    index_json(ix, photos, "--device", "cpu", "--no-compact")
    pairs, generation = _live(ix)
    with open(ix / VECTORS_FILE, "r+b") as f:  # one live row's bytes swapped for another unit vector's
        row_bytes = (ix / VECTORS_FILE).stat().st_size // 14
        f.seek(pairs[0][1] * row_bytes)
        rolled = np.roll(np.frombuffer(f.read(row_bytes), dtype="<f2"), 1).tobytes()
        f.seek(pairs[0][1] * row_bytes)
        f.write(rolled)
    # compaction itself (a writer's run checks the store when it starts: damage after that, or in a row only
    # compaction reads, meets this check)
    with pytest.raises(IndexDamagedError, match="verify --repair"):
        compact_now(ix)
    assert _files(ix) == (14 * row_bytes, {}) and _live(ix) == (pairs, generation)  # nothing switched, no file left
    proc = alignsearch_cli("index", photos, "--index", ix, "--device", "cpu", "--compact")  # and from the CLI
    assert proc.returncode != 0 and "verify --repair" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


MOMENTS = {
    "the new segment written, not committed": ("indexer.compact:_copy", "after"),
    "committed, the old files not yet removed": ("indexer.compact:_switch", "after"),
}


@pytest.mark.slow
@pytest.mark.parametrize("moment", list(MOMENTS))
def test_kill_9_during_compaction_leaves_an_index_that_answers_as_before(indexed_images, tmp_path, moment):
    photos, ix = indexed_images(12)
    _churn(photos)
    expected = tmp_path / "expected"
    shutil.copytree(ix, expected)
    index_json(expected, photos, "--device", "cpu", "--no-compact")
    want = fixed_answers(expected)
    where, when = MOMENTS[moment]
    proc = killed_at(where, when, "index", photos, "--index", ix, "--device", "cpu", "--compact", "--workers", "0")
    assert proc.returncode == -9, proc.stderr[-3000:]  # killed there, not finished nor failed
    assert fixed_answers(ix) == want, moment  # a reader right after the kill
    # killed after the commit: vectors.f16's old rows are past its committed row 0 until the next writer cuts
    # them, as after any run killed between writing rows and committing them; nothing else
    assert [p for p in verify_problems(ix) if "uncommitted bytes past row 0" not in p] == [], moment
    summary = index_json(ix, photos, "--device", "cpu")  # the next writer tidies what the kill left
    assert summary["added"] + summary["removed"] == 0, summary
    assert fixed_answers(ix) == want and verify_problems(ix) == []
    main, segments = _files(ix)
    with alignsearch.open(ix) as engine:
        row_bytes = engine.store.row_bytes
    if moment.startswith("committed"):
        assert main == 0 and list(segments.values()) == [7 * row_bytes], (main, segments)
    else:
        assert main == 14 * row_bytes and segments == {}, (main, segments)


@pytest.mark.slow
def test_a_killed_compactions_copy_is_deleted_by_the_next_run_even_one_that_may_not_compact(indexed_images):
    """kill -9 after the copy, before its commit: the copy under vectors/next/ is a file no commit knows. The
    next writer deletes it when it starts, whatever it was told: `index --no-compact` too (it stayed, taking
    the disk of every live row, until a run that may compact or a re-encode)."""
    photos, ix = indexed_images(12)
    _churn(photos)
    index_json(ix, photos, "--device", "cpu", "--no-compact")
    want, before = fixed_answers(ix), _live(ix)
    proc = killed_at("indexer.compact:_copy", "after", "index", photos, "--index", ix, "--device", "cpu",
                     "--compact", "--workers", "0")
    assert proc.returncode == -9, proc.stderr[-3000:]
    left = unlisted_vector_files(ix)
    assert len(left) == 1 and left[0].startswith("next/"), vector_files(ix)  # the copy, killed where it says
    summary = index_json(ix, photos, "--device", "cpu", "--no-compact")
    assert summary["compacted"] is None and summary["added"] + summary["removed"] + summary["updated"] == 0, summary
    assert vector_files(ix) == [], vector_files(ix)
    assert _live(ix) == before and fixed_answers(ix) == want and verify_problems(ix) == []


@pytest.mark.slow
def test_a_compaction_killed_after_its_commit_is_finished_by_a_run_that_may_not_compact(indexed_images):
    """kill -9 right after the switch commits: the new segment under vectors/next/ is the store's, so the
    tidying when `index --no-compact` starts keeps it, and the run finishes the switch (vectors.f16 emptied)."""
    photos, ix = indexed_images(12)
    _churn(photos)
    index_json(ix, photos, "--device", "cpu", "--no-compact")
    want = fixed_answers(ix)
    proc = killed_at("indexer.compact:_switch", "after", "index", photos, "--index", ix, "--device", "cpu",
                     "--compact", "--workers", "0")
    assert proc.returncode == -9, proc.stderr[-3000:]
    [new] = vector_files(ix)
    assert new.startswith("next/") and unlisted_vector_files(ix) == [], vector_files(ix)
    summary = index_json(ix, photos, "--device", "cpu", "--no-compact")
    assert summary["compacted"] is None and summary["added"] + summary["removed"] + summary["updated"] == 0, summary
    with alignsearch.open(ix) as engine:
        row_bytes = engine.store.row_bytes
    assert _files(ix) == (0, {new: 7 * row_bytes}), _files(ix)
    assert fixed_answers(ix) == want and verify_problems(ix) == []


@pytest.mark.slow
def test_a_re_encode_after_a_compaction_deletes_the_old_generation_under_vectors_next(indexed_images, caplog):
    """The live generation lies under vectors/next/ after a compaction: the re-encode's switch deletes it, as
    it deletes the rest of the old generation, and says so (it stayed, taking the disk of every live row,
    until the next writer deleted it as "a new segment no commit knows (a killed re-encode or compaction)")."""
    photos, ix = indexed_images(12)
    _churn(photos)
    index_json(ix, photos, "--device", "cpu", "--compact")
    [compacted] = vector_files(ix)
    assert compacted.startswith("next/"), compacted
    want = fixed_answers(ix)
    for name in ("alignsearch.storage.vectors", "indexer"):  # the CLI sets the root logger's level
        caplog.set_level(logging.INFO, logger=name)
    summary = index_json(ix, "--device", "cpu", "--reindex", "--no-compact")
    assert summary["reencoded"] == 8 and summary["compacted"] is None, summary  # 7 rows, a copy sharing one
    assert unlisted_vector_files(ix) == [] and compacted not in vector_files(ix), vector_files(ix)
    said = [r.getMessage() for r in caplog.records if ".f16" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith(f"vectors/{compacted}: deleted (the old generation: every file is "
                                                 "re-encoded into vectors/next/"), said
    assert fixed_answers(ix) == want and verify_problems(ix) == []


def _a_pending_re_encode_and_a_killed_compactions_copy(ix) -> tuple[Path, Path]:
    """A re-encode in progress recorded with its segment under vectors/next/, and a copy there no commit knows
    (a compaction killed before its switch): (the re-encode's segment, the copy)."""
    from alignsearch.storage.state import ModelIdentity, Reindex

    pending, copy = ix / "vectors" / "next" / "pending.f16", ix / "vectors" / "next" / "copy.f16"
    pending.parent.mkdir(parents=True)
    pending.write_bytes(bytes(64))
    copy.write_bytes(bytes(64))
    db = catalog.connect(ix / DB_FILE)
    with db.begin() as conn:
        other = ModelIdentity(name="other", fingerprint="other", dim=state.read(conn).model.dim)
        state.write(conn, reindex=Reindex(model=other, segment="next/pending", rows=1, done=1))
    db.dispose()
    return pending, copy


def test_leftovers_are_removed_but_a_re_encode_in_progress_keeps_its_segment(tmp_path):
    from helpers import vector_index

    ix = tmp_path / "ix"
    vector_index(ix, 4, 16)
    pending, copy = _a_pending_re_encode_and_a_killed_compactions_copy(ix)
    db = catalog.connect(ix / DB_FILE)
    try:
        compact.remove_leftovers(db, ix)
    finally:
        db.dispose()
    assert pending.exists() and not copy.exists()


def test_forget_removes_a_killed_compactions_copy_and_keeps_a_pending_re_encodes_segment(indexed_images):
    from indexer.roots import forget_root

    photos, ix = indexed_images(12)
    pending, copy = _a_pending_re_encode_and_a_killed_compactions_copy(ix)
    assert forget_root(ix, str(photos))["files"] == 12
    assert pending.exists() and not copy.exists()


def test_a_refusal_at_a_writers_start_leaves_even_a_killed_compactions_copy(indexed_images, tmp_path, monkeypatch):
    """`forget` of a root the index does not have, and `index --ocr` without the OCR engine, refuse before
    anything is written (as they say): a killed compaction's copy is left for a run that goes on."""
    from alignsearch.errors import BadInputError
    from alignsearch.media import ocr
    from indexer.job import index_folders
    from indexer.roots import forget_root

    photos, ix = indexed_images(12)
    copy = ix / "vectors" / "next" / "copy.f16"
    copy.parent.mkdir(parents=True)
    copy.write_bytes(bytes(64))
    with pytest.raises(BadInputError, match="not a root of this index"):
        forget_root(ix, str(tmp_path / "elsewhere"))
    assert copy.exists()

    def missing():
        raise BadInputError(ocr.MISSING)

    monkeypatch.setattr(ocr, "check_available", missing)
    with pytest.raises(BadInputError, match="OCR|ocr"):
        index_folders([photos], index_dir=ix, device="cpu", ocr=True)
    assert copy.exists()


@pytest.mark.slow
def test_forget_compacts_when_most_rows_are_dead(indexed_images, tmp_path, monkeypatch):
    from conftest import make_images
    from indexer.roots import forget_root

    photos, ix = indexed_images(12)
    other = make_images(tmp_path / "other", 4, seed=5)[0].parent
    index_json(ix, other, "--device", "cpu")
    kept = [p for p in fixed_answers(ix) if p.startswith(str(other))]
    monkeypatch.setattr(compact, "MIN_DEAD_ROWS", 1)  # the rule as at scale: 12 dead rows of 16 are due
    done = forget_root(ix, str(photos))
    assert done["files"] == 12 and done["compacted"]["rows_before"] == 16 and done["compacted"]["rows_after"] == 4
    assert fixed_answers(ix) == kept and verify_problems(ix) == []
    with alignsearch.open(ix) as engine:
        row_bytes = engine.store.row_bytes
    assert _files(ix)[0] == 0 and list(_files(ix)[1].values()) == [4 * row_bytes]
    assert index_state(ix).index_run is None  # the mark its switch recorded is cleared once the old files are gone


@pytest.mark.slow
def test_an_export_across_a_compaction_stops_with_one_line_not_damage(indexed_images):
    """An export reads its rows' addresses page by page: a page read after the switch holds the new
    generation's addresses, which its snapshot's files do not have. It stops saying so (run it again), not
    "damaged: verify --repair" (the check compared the snapshot with itself)."""
    from alignsearch.errors import CatalogBusyError
    from alignsearch.search.export import batches

    photos, ix = indexed_images(12)
    _churn(photos)
    index_json(ix, photos, "--device", "cpu", "--no-compact")
    with alignsearch.open(ix) as engine:
        pages = batches(engine, batch=3)
        first, vectors_, _ = next(pages)
        assert len(first) == 3 and vectors_.shape[0] == 3
        index_json(ix, photos, "--device", "cpu", "--compact")
        with pytest.raises(CatalogBusyError, match="new generation"):
            next(pages)


@pytest.mark.slow
def test_a_query_that_meets_the_switch_mid_read_searches_the_new_generation(indexed_images, monkeypatch):
    """The race the generation check cannot close: the switch commits and empties vectors.f16 after a query
    checked the generation and before its first read of the vectors (a fresh snapshot maps vectors.f16
    lazily). The read then meets an empty file: that is a new generation to search, not "damaged"."""
    photos, ix = indexed_images(12)
    _churn(photos)
    index_json(ix, photos, "--device", "cpu", "--no-compact")
    want = fixed_answers(ix)
    switched = _compact_on_first_read(monkeypatch, ix)
    assert fixed_answers(ix) == want and switched


@pytest.mark.slow
def test_dupes_that_meet_the_switch_mid_scan_scan_the_new_generation(indexed_images, tmp_path, monkeypatch):
    """`dupes --tier similar` reads every live vector: a switch landing during its scan (a store not yet mapped
    meets the emptied vectors.f16) is a new generation to scan, not "damaged"."""
    from alignsearch.search.dupes import find_groups

    photos, ix = indexed_images(12)
    _churn(photos)  # a copy of one photo: one similar group at least
    index_json(ix, photos, "--device", "cpu", "--no-compact")
    with alignsearch.open(ix) as engine:
        want = [g.items for g in find_groups(engine, "similar")]
    assert want
    switched = _compact_on_first_read(monkeypatch, ix)
    with alignsearch.open(ix) as engine:
        assert [g.items for g in find_groups(engine, "similar")] == want and switched


def _compact_on_first_read(monkeypatch, ix) -> list:
    """Make the first read of stored vectors (any store, this process) first compact the index at ix: the
    switch commits and empties vectors.f16 after the reader took its snapshot, before it mapped the file. The
    list returned holds True once that happened."""
    from alignsearch.storage.vectors import VectorStore

    real_get, switched = VectorStore.get, []

    def get_after_a_switch(store, addresses):
        if not switched:
            switched.append(True)
            compact_now(ix)  # commits, then empties vectors.f16
        return real_get(store, addresses)

    monkeypatch.setattr(VectorStore, "get", get_after_a_switch)
    return switched


@pytest.mark.slow
def test_an_index_run_compacts_when_due_unless_told_not_to(indexed_images, tmp_path, monkeypatch):
    """The end of a plain `index` run applies the rule (here at a size a test can reach), and --no-compact
    overrides it."""
    monkeypatch.setattr(compact, "MIN_DEAD_ROWS", 1)  # in this process: index_json runs the CLI in-process
    photos, ix = indexed_images(12)
    _churn(photos)
    kept = tmp_path / "kept"
    shutil.copytree(ix, kept)
    assert index_json(kept, photos, "--device", "cpu", "--no-compact")["compacted"] is None
    with alignsearch.open(kept) as engine:
        assert engine.info()["vector_store"]["dead_bytes"] > 0  # due, and left as told
    done = index_json(ix, photos, "--device", "cpu")["compacted"]
    assert done is not None and done["rows_before"] == 14 and done["rows_after"] == 7, done
    assert fixed_answers(ix) == fixed_answers(kept)
