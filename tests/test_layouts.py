"""Each ANN layout as one object (alignsearch/storage/layout.py): built by the real writer, picked from the
catalog's record, opened, listing the files it owns, and checking them: a byte changed in any of them, or
one of them gone, is reported by check() and by verify. Switching layouts leaves only the new one's files."""

import shutil

import numpy as np
import pytest

import alignsearch
from alignsearch.storage import ann, catalog, layouts
from alignsearch.storage.layout import damaged_message
from alignsearch.storage.layouts import AnnRecord, OnDisk, Sharded, Single
from alignsearch.storage.paths import ANN_FILE, DB_FILE
from helpers import layout_index
from indexer.build import sync_index
from indexer.verify import verify

N = 10_000  # the smallest IVF-PQ index (ann.FLAT_BELOW): the sharded and on-disk layouts need one

LAYOUTS = {"single": {}, "sharded": {"index_shards": 2}, "ondisk": {"ondisk_shards": 2}}
CLASSES = {"single": Single, "sharded": Sharded, "ondisk": OnDisk}
SERVED_AS = {"single": "memory", "sharded": "sharded (2 files)", "ondisk": "ondisk"}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One index per layout, built once; the tests that damage files work on a copy."""
    out = {}
    for kind, options in LAYOUTS.items():
        folder = tmp_path_factory.mktemp(kind)
        db, _, report = layout_index(folder, N, **options)
        db.dispose()
        out[kind] = (folder, report)
    return out


def record_of(folder):
    db = catalog.connect(folder / DB_FILE, readonly=True)
    try:
        with db.connect() as conn:
            return layouts.read_record(conn), np.sort(np.array(list(catalog.live_vectors(conn)))[:, 0])
    finally:
        db.dispose()


def ann_files(folder) -> set[str]:
    """The files in an index folder that belong to no part but the ANN index."""
    return {p.name for p in folder.iterdir() if not p.name.startswith(("catalog.db", "vectors"))}


@pytest.mark.slow
@pytest.mark.parametrize("kind", LAYOUTS)
def test_each_layout_is_picked_opened_and_owns_its_files(built, kind):
    folder, report = built[kind]
    record, ids = record_of(folder)
    layout = layouts.pick(folder, record)
    assert type(layout) is CLASSES[kind] and layout.kind == kind
    names = {p.name for p in layout.files()}
    assert names == ann_files(folder)  # it owns every ANN file there, and nothing of another layout is left
    if kind == "single":
        assert names == {ANN_FILE} and record.files == {} and record.digest == ann.file_digest(folder / ANN_FILE)
    else:
        assert set(record.files) == names and record.digest is None
    if kind == "sharded":
        assert sorted(n.split("-")[-1] for n in names - {"shards.json"}) == ["000.faiss", "001.faiss"]
    if kind == "ondisk":
        assert ANN_FILE in names and len([n for n in names if n.startswith("lists-")]) == 1
    index = layout.open()
    assert np.array_equal(np.sort(ann.stored_ids(index)), ids) and index.ntotal == N
    assert ann.layout(index) == report["layout"] == SERVED_AS[kind]
    assert layout.check() == []
    with alignsearch.open(folder) as engine:  # the engine opens it through the same picker
        assert ann.layout(engine.index) == SERVED_AS[kind] and engine.index.ntotal == N
    assert verify(folder, check_model=False).problems == []


@pytest.mark.slow
@pytest.mark.parametrize("kind", LAYOUTS)
def test_a_changed_byte_in_any_file_a_layout_owns_is_found(built, kind, tmp_path):
    folder = tmp_path / "ix"
    shutil.copytree(built[kind][0], folder)
    record, _ = record_of(folder)
    for path in layouts.pick(folder, record).files():
        original = path.read_bytes()
        damaged = bytearray(original)
        damaged[len(damaged) // 2] ^= 0xFF
        path.write_bytes(bytes(damaged))
        assert layouts.pick(folder, record).check() == [damaged_message(path.name)], path.name
        assert damaged_message(path.name) in verify(folder, check_model=False).problems, path.name
        path.unlink()
        assert layouts.pick(folder, record).check() == [damaged_message(path.name)], path.name
        path.write_bytes(original)
        assert layouts.pick(folder, record).check() == []


def test_the_layout_of_an_index_and_of_a_build(tmp_path):
    sharded = AnnRecord(files={"shard-1-000.faiss": "a", "shards.json": "b"})
    ondisk = AnnRecord(files={ANN_FILE: "a", "lists-1.ivfdata": "b"})
    assert layouts.kind_of(True, AnnRecord(digest="x")) == "sharded"  # a published manifest is what readers follow
    assert layouts.kind_of(False, sharded) == "single"  # its manifest gone: index.faiss, checked against the record
    assert layouts.kind_of(False, ondisk) == "ondisk"
    assert layouts.kind_of(False, AnnRecord(digest="x")) == layouts.kind_of(False, AnnRecord()) == "single"
    assert layouts.pick(tmp_path, sharded).expected() == sharded.files  # what is checked is what was recorded
    assert layouts.pick(tmp_path, AnnRecord(digest="x")).expected() == {ANN_FILE: "x"}
    assert layouts.pick(tmp_path, AnnRecord()).expected() == {}  # written before checksums: nothing to compare
    for plan in ("flat", "ivfpq"):
        assert layouts.target_kind(plan, ondisk_shards=0, index_shards=0) == "single"
    assert layouts.target_kind("flat", ondisk_shards=2, index_shards=0) == "single"
    assert layouts.target_kind("flat", ondisk_shards=0, index_shards=2) == "single"
    assert layouts.target_kind("ivfpq", ondisk_shards=2, index_shards=0) == "ondisk"
    assert layouts.target_kind("ivfpq", ondisk_shards=0, index_shards=2) == "sharded"


@pytest.mark.slow
def test_switching_layouts_serves_the_new_one_and_leaves_only_its_files(built, tmp_path):
    """shards -> on-disk lists -> one file. Before the layout objects, the first switch left the manifest and
    readers kept serving the old shards; the second updated the on-disk index in place, wrote it as
    index.faiss and deleted its lists file, so the index could no longer be read."""
    folder = tmp_path / "ix"
    shutil.copytree(built["sharded"][0], folder)  # shard files are named relative to the folder: a copy works
    db = catalog.connect(folder / DB_FILE)
    with alignsearch.open(folder) as engine:
        store = engine.store
    try:
        for options, action, served in (({"index_shards": 0, "ondisk_shards": 2}, "built on disk from 2 shards", "ondisk"),
                                        ({"ondisk_shards": 0}, "built", "memory")):
            report = sync_index(db, store, folder / ANN_FILE, **options)
            assert (report["action"], report["layout"]) == (action, served)
            record, _ = record_of(folder)
            assert {p.name for p in layouts.pick(folder, record).files()} == ann_files(folder)
            with alignsearch.open(folder) as engine:
                assert ann.layout(engine.index) == served and engine.index.ntotal == N
            assert verify(folder, check_model=False).problems == []
    finally:
        db.dispose()


def test_a_single_file_rename_cut_short_is_finished_or_dropped(tmp_path):
    """index.faiss.next is published when the catalog recorded its checksum (the crash came after the commit),
    else deleted (written, never committed)."""
    index = ann.create(ann.plan_index(0, 8), 8)
    ann.add(index, np.eye(8, dtype=np.float32), np.arange(8))
    digest = ann.write_next(index, tmp_path / ANN_FILE)
    Single(tmp_path, AnnRecord(digest="an older one")).finish_publish()
    assert not ann.next_path(tmp_path / ANN_FILE).exists() and not (tmp_path / ANN_FILE).exists()
    assert ann.write_next(index, tmp_path / ANN_FILE) == digest
    Single(tmp_path, AnnRecord(digest=digest)).finish_publish()
    assert not ann.next_path(tmp_path / ANN_FILE).exists()
    assert Single(tmp_path, AnnRecord(digest=digest)).open().ntotal == 8
