"""Each ANN layout as one object (alignsearch/storage/layout.py): built by the real writer, picked from the
catalog's record, opened, listing the files it owns, and checking them: a byte changed in any of them, or
one of them gone, is reported by check() and by verify. Switching layouts leaves only the new one's files."""

import shutil
import threading
import time

import numpy as np
import pytest

import alignsearch
from alignsearch.errors import IndexDamagedError, IndexNotFoundError
from alignsearch.storage import ann, catalog, layouts, shards, vectors
from alignsearch.storage.state import AnnState
from alignsearch.storage.layout import bytes_digest, damaged_message
from alignsearch.storage.layouts import OnDisk, Sharded, Single
from alignsearch.storage.paths import ANN_FILE, DB_FILE
from helpers import layout_index
from indexer.build import sync_index
from indexer.verify import verify

N = 10_000  # the smallest IVF-PQ index (ann.FLAT_BELOW): the sharded and on-disk layouts need one
DIM = 16  # layout_index's default

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
            return layouts.read_record(conn), np.sort(catalog.live_pairs(conn)[:, 0])
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
    sharded = AnnState(files={"shard-1-000.faiss": "a", "shards.json": "b"})
    ondisk = AnnState(files={ANN_FILE: "a", "lists-1.ivfdata": "b"})
    assert layouts.kind_of(True, AnnState(digest="x")) == "sharded"  # a published manifest is what readers follow
    assert layouts.kind_of(False, sharded) == "single"  # its manifest gone: index.faiss, checked against the record
    assert layouts.kind_of(False, ondisk) == "ondisk"
    assert layouts.kind_of(False, AnnState(digest="x")) == layouts.kind_of(False, AnnState()) == "single"
    assert layouts.pick(tmp_path, sharded).expected() == sharded.files  # what is checked is what was recorded
    assert layouts.pick(tmp_path, AnnState(digest="x")).expected() == {ANN_FILE: "x"}
    assert layouts.pick(tmp_path, AnnState()).expected() == {}  # written before checksums: nothing to compare
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
    layouts.finish_publish(tmp_path, AnnState(digest="an older one"))
    assert not ann.next_path(tmp_path / ANN_FILE).exists() and not (tmp_path / ANN_FILE).exists()
    assert ann.write_next(index, tmp_path / ANN_FILE) == digest
    layouts.finish_publish(tmp_path, AnnState(digest=digest))
    assert not ann.next_path(tmp_path / ANN_FILE).exists()
    assert Single(tmp_path, AnnState(digest=digest)).open().ntotal == 8
    # the on-disk layout records index.faiss's checksum among its files (digest None): committed, renamed too
    (tmp_path / ANN_FILE).unlink()
    assert ann.write_next(index, tmp_path / ANN_FILE) == digest
    (tmp_path / "lists-1.ivfdata").write_bytes(b"x")
    layouts.finish_publish(tmp_path, AnnState(files={ANN_FILE: digest, "lists-1.ivfdata": "x"}))
    assert not ann.next_path(tmp_path / ANN_FILE).exists() and ann.file_digest(tmp_path / ANN_FILE) == digest
    assert (tmp_path / "lists-1.ivfdata").exists()  # the on-disk layout's publish keeps its lists


def live_of(folder):
    db = catalog.connect(folder / DB_FILE, readonly=True)
    try:
        with db.connect() as conn:
            return catalog.live_pairs(conn)
    finally:
        db.dispose()


def read_while_switching(folder, switches, served):
    """Open the current index (as the engine does: the catalog's record, then open_current) over and over
    while a writer thread publishes each of `switches` (sync_index's keywords) in turn. Every open must give
    an index that searches, of a layout in `served` ({ann.layout: its sizes}). Returns the opens that
    succeeded (at least one after the writer finished is asked for: a reader that always fails ends the loop
    once the writer is done, and the failures fail the test)."""
    db = catalog.connect(folder / DB_FILE)
    reader = catalog.connect(folder / DB_FILE, readonly=True)
    with db.connect() as conn:
        store = vectors.load(conn, folder, DIM)
    failures, opens = [], 0
    done = threading.Event()

    def write():
        try:
            for options in switches:
                sync_index(db, store, folder / ANN_FILE, **options)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            failures.append(("writer", repr(exc)))
        finally:
            done.set()

    writer = threading.Thread(target=write)
    writer.start()
    query = np.ones((1, DIM), dtype=np.float32) / np.sqrt(DIM)
    try:
        while not done.is_set() or (opens == 0 and not failures):
            with reader.connect() as conn:
                record = layouts.read_record(conn)
            try:
                index = layouts.open_current(folder, record, reread=lambda: layouts.recorded(reader))
            except Exception as exc:  # noqa: BLE001 - every failure is reported
                failures.append(("reader", repr(exc)))
                continue
            opens += 1
            kind = ann.layout(index)
            _, ids = index.search(query, 5)
            if kind not in served or index.ntotal not in served[kind] or (ids < 0).any():
                failures.append(("reader", f"served {kind} with {index.ntotal} vectors, ids {ids}"))
    finally:
        writer.join()
        db.dispose()
        reader.dispose()
    assert failures == [], failures[:5]
    return opens


@pytest.mark.slow
def test_an_index_republished_while_a_reader_opens_it_is_always_served(tmp_path):
    """index.faiss republished 40 times with a new checksum each time, while a reader opens it in a loop. A
    reader that read the record just before a publish looked for bytes no file has any more: before the
    retry read the record again, it tried the old checksum 20 times and reported index.faiss as damaged."""
    folder = tmp_path / "ix"
    db, _, _ = layout_index(folder, 2_000, DIM)
    db.dispose()
    live = live_of(folder)
    sizes = range(len(live) - 40, len(live) + 1)
    opens = read_while_switching(folder, [{"live": live[: len(live) - 1 - i % 40]} for i in range(40)],
                                    {"memory": sizes})
    assert opens > 0


@pytest.mark.slow
def test_layouts_switched_while_a_reader_opens_the_index_are_always_served(built, tmp_path):
    """Each of the six switches between the layouts once (single -> sharded -> single -> on-disk -> sharded ->
    on-disk -> single) while a reader opens the index in a loop: every open gives the layout before or the one
    after, none raises. The files of the layout before vanish a moment after a reader picked it, and the
    on-disk layout's index.faiss replaces a single one before the commit that records it."""
    folder = tmp_path / "ix"
    shutil.copytree(built["single"][0], folder)
    single, sharded, ondisk = ({"index_shards": 0, "ondisk_shards": 0}, {"index_shards": 2, "ondisk_shards": 0},
                               {"index_shards": 0, "ondisk_shards": 2})
    opens = read_while_switching(folder, [sharded, single, ondisk, sharded, ondisk, single],
                                    {kind: {N} for kind in SERVED_AS.values()})
    assert opens > 0


@pytest.mark.parametrize("record", [AnnState(), AnnState(digest="x"), AnnState(files={"shard-1-000.faiss": "a"}),
                                    AnnState(files={ANN_FILE: "a", "lists-1.ivfdata": "b"})])
def test_opening_a_folder_without_an_index_gives_up_at_once_and_says_why(tmp_path, record):
    """Before, a missing index.faiss took 3 tries (0.1 s) and gave faiss's "could not open" error, or, with a
    checksum recorded, 20 tries (1 s) and said the file was damaged."""
    rereads = []
    start = time.monotonic()
    with pytest.raises(IndexNotFoundError) as raised:
        layouts.open_current(tmp_path, record, reread=lambda: rereads.append(1) or record)
    assert time.monotonic() - start < 0.2 and rereads == []
    assert str(raised.value) == f"{tmp_path / ANN_FILE} is missing: run `alignsearch index` to build it"


@pytest.mark.slow
def test_an_index_that_never_opens_is_given_up_on_within_the_retry_bounds(tmp_path):
    """Bytes the recorded checksum never matches (damage, not a publish): tried `tries` times at most, none
    started past the budget, then reported as damaged in one line."""
    (tmp_path / ANN_FILE).write_bytes(b"not the recorded bytes")
    record, rereads = AnnState(digest="x"), []
    retry = layouts.Retry(tries=4, first_wait_s=0.01, budget_s=0.5)
    start = time.monotonic()
    with pytest.raises(IndexDamagedError) as raised:
        layouts.open_current(tmp_path, record, reread=lambda: rereads.append(1) or record, retry=retry)
    assert len(rereads) == retry.tries - 1 and time.monotonic() - start < retry.budget_s
    assert str(raised.value) == f"{damaged_message(ANN_FILE)}: run `alignsearch verify --repair`"
    start = time.monotonic()
    with pytest.raises(IndexDamagedError):
        layouts.open_current(tmp_path, record)  # the default bounds
    assert time.monotonic() - start < layouts.RETRY.budget_s + 0.5


def test_the_retry_waits_double_and_stop_at_the_tries_the_budget_or_an_empty_folder():
    retry = layouts.Retry(tries=6, first_wait_s=0.02, budget_s=1.0)
    assert [layouts.next_wait(retry, attempt, 0.0, True) for attempt in range(1, 7)] == [0.02, 0.04, 0.08, 0.16,
                                                                                          0.32, None]
    assert layouts.next_wait(retry, 1, 0.99, True) is None  # no attempt starts past the budget
    assert layouts.next_wait(retry, 1, 0.0, False) is None  # nothing published: no switch to wait out


class Killed(BaseException):
    """A writer stopped where it stands, as kill -9 stops it: nothing after the point runs (tests/test_attacks.py
    kills real processes at these points; in-process, every moment below is seconds, not minutes)."""


def killed_before(*args, **kwargs):
    raise Killed


SMALL_IVF = 1000  # vectors from which an IVF-PQ index is made here (ann.FLAT_BELOW: 10,000)
CRASHES = {  # from one layout to another, the writer killed between its commit and its publish
    "sharded to sharded": ({"index_shards": 2}, {"index_shards": 2, "rebuild": True}),
    "sharded to ondisk": ({"index_shards": 2}, {"index_shards": 0, "ondisk_shards": 2}),
    "single to sharded": ({}, {"index_shards": 2}),
    "ondisk to sharded": ({"ondisk_shards": 2}, {"ondisk_shards": 0, "index_shards": 2}),
    "sharded to single": ({"index_shards": 2}, {"index_shards": 0}),
}


@pytest.mark.slow
@pytest.mark.parametrize("crash", CRASHES)
def test_a_publish_cut_short_is_no_damage_and_the_next_writer_finishes_it(tmp_path, monkeypatch, crash):
    """A writer killed between its commit and its publish left the committed index.faiss or shards.json as a
    `.next` file carrying the recorded checksum: verify finds nothing wrong (before, from a sharded layout it
    called the old manifest, or the missing index.faiss, damaged), and the next writer's finish_publish renames
    it into place, so the committed layout is served and updated in place (before, a committed manifest was
    left aside, the layout before was served and the next run built its shards anew)."""
    before, after = CRASHES[crash]
    monkeypatch.setattr(ann.plan_index, "__defaults__", (SMALL_IVF,))
    folder = tmp_path / "ix"
    db, store, _ = layout_index(folder, 2000, DIM, **before)
    target = layouts.target_kind("ivfpq", ondisk_shards=after.get("ondisk_shards", 0),
                                 index_shards=after.get("index_shards", 0))
    try:
        with monkeypatch.context() as patched:
            patched.setattr(CLASSES[target], "publish", killed_before)
            with pytest.raises(Killed):
                sync_index(db, store, folder / ANN_FILE, **after)
        record, ids = record_of(folder)
        renamed = "shards.json" if target == "sharded" else ANN_FILE
        assert [p.name for p in folder.glob("*.next")] == [renamed + ".next"]
        assert layouts.pick(folder, record).check() == []
        assert verify(folder, check_model=False).problems == []
        layouts.finish_publish(folder, record)  # what the next `index` run does first (indexer/job.py)
        assert not list(folder.glob("*.next"))
        served = layouts.pick(folder, record)
        assert served.kind == target and served.check() == [] and verify(folder, check_model=False).problems == []
        assert np.array_equal(np.sort(ann.stored_ids(served.open())), ids)
        report = sync_index(db, store, folder / ANN_FILE, **{**after, "rebuild": False})
        if target == "sharded":
            assert report["action"] == "updated 0 of 2 shards (+0 -0)"  # the committed shards, not built anew
        record, _ = record_of(folder)
        assert {p.name for p in layouts.pick(folder, record).files()} == ann_files(folder)
        assert verify(folder, check_model=False).problems == []
    finally:
        db.dispose()


def test_a_manifest_publish_cut_short_is_finished_or_dropped(tmp_path):
    """shards.json.next, as index.faiss.next: when the catalog committed its checksum the sharded layout is
    published as the killed writer would have (the manifest renamed into place, the one-file index before it
    removed); when it did not (written, never committed) it is deleted and nothing else is touched."""
    names = [tmp_path / "shard-1-000.faiss", tmp_path / "shard-1-001.faiss"]
    for path in names:
        path.write_bytes(b"a shard")
    (tmp_path / ANN_FILE).write_bytes(b"the index before")
    data = shards.manifest_bytes(names)
    nxt = ann.next_path(tmp_path / "shards.json")
    nxt.write_bytes(data)
    committed = {p.name: ann.file_digest(p) for p in names} | {"shards.json": bytes_digest(data)}
    layouts.finish_publish(tmp_path, AnnState(files={**committed, "shards.json": "another"}))
    assert not nxt.exists() and not (tmp_path / "shards.json").exists() and (tmp_path / ANN_FILE).exists()
    nxt.write_bytes(data)
    record = AnnState(files=committed, index_shards=2)
    assert Single(tmp_path, record).check() == []  # committed, not yet published: not damage
    layouts.finish_publish(tmp_path, record)
    assert (tmp_path / "shards.json").read_bytes() == data and not nxt.exists() and not (tmp_path / ANN_FILE).exists()
    assert shards.files(tmp_path) == names and layouts.pick(tmp_path, record).check() == []
