"""`verify` after an `index` run stopped part way (kill -9, Ctrl-C): a normal state the next run finishes, not
damage (exit 0 with a note, and --repair leaves it to `index`); the same gap after a finished run is still damage."""

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import index_json, make_images, run
from helpers import add_synthetic, clustered, ctrl_c_at, index_dim, killed_at, write_vectors

# after the new files' batches are committed, before their ANN entries are built
BEFORE_ANN = "indexer.build:sync_index"


def stopped_run(stop, code: int, ix: Path, where: str = BEFORE_ANN) -> None:
    proc = stop(where, "before", "index", "--index", ix, "--device", "cpu", "--workers", "0", "--batch-size", "2")
    assert proc.returncode == code, proc.stderr[-3000:]  # stopped there, not finished nor failed
    assert json.loads(run("info", "--index", ix, "--json").stdout)["last_run"] == "interrupted"


def ann_files(ix: Path) -> dict:
    return {p.name: p.read_bytes() for p in ix.iterdir() if p.is_file() and ".faiss" in p.name}


def finished_and_clean(ix: Path, images: int) -> None:
    index_json(ix, "--device", "cpu")
    assert json.loads(run("info", "--index", ix, "--json").stdout)["last_run"] == "finished"
    report = json.loads(run("verify", "--index", ix, "--skip-model", "--json").stdout)
    assert report["ok"] and report["notes"] == [] and report["problems"] == [], report
    assert report["checked"]["index_vectors"] == images and report["checked"]["last_run"] == "finished"


@pytest.mark.slow
@pytest.mark.parametrize("stop, code", [(killed_at, -9), (ctrl_c_at, 130)], ids=["kill-9", "ctrl-c"])
def test_verify_after_a_run_stopped_before_its_ann_index_says_so_and_exits_0(indexed_images, stop, code):
    root, ix = indexed_images(6)
    make_images(root / "more", 4, seed=5)
    stopped_run(stop, code, ix)
    result = run("verify", "--index", ix, "--skip-model")  # on bcea196: exit 7, "index is inconsistent"
    assert "problem" not in result.output and "inconsistent" not in result.output, result.output
    assert "the last index run was interrupted" in result.output, result.output
    assert "4 files committed since the ANN index was built are searched exactly" in result.output, result.output
    report = json.loads(run("verify", "--index", ix, "--skip-model", "--json").stdout)
    assert report["ok"] and report["problems"] == [] and report["checked"]["last_run"] == "interrupted", report
    assert len(report["notes"]) == 2 and report["checked"]["images"] == 10, report

    before = ann_files(ix)
    repaired = json.loads(run("verify", "--index", ix, "--skip-model", "--repair", "--json").stdout)
    assert repaired["repaired"] == [] and repaired["notes"] == report["notes"], repaired  # left to `index`
    assert ann_files(ix) == before
    assert json.loads(run("info", "--index", ix, "--json").stdout)["last_run"] == "interrupted"
    finished_and_clean(ix, 10)


@pytest.mark.slow
def test_verify_after_a_first_run_killed_before_its_ann_index_exits_0(tmp_path, tiny_model):
    photos, ix = make_images(tmp_path / "photos", 4)[0].parent, tmp_path / "ix"
    proc = killed_at(BEFORE_ANN, "before", "index", photos, "--index", ix, "--model", tiny_model, "--device", "cpu",
                     "--workers", "0")
    assert proc.returncode == -9, proc.stderr[-3000:]
    report = json.loads(run("verify", "--index", ix, "--skip-model", "--json").stdout)
    assert report["ok"] and report["checked"]["last_run"] == "interrupted", report
    assert any("index.faiss was not built yet" in n for n in report["notes"]), report
    finished_and_clean(ix, 4)


def test_files_missing_from_the_ann_index_after_a_finished_run_are_still_damage(indexed_images):
    """Rows the real writer committed outside any index run: no run is unfinished, so the gap is damage (exit 7);
    recorded as an unfinished run's, the same gap is a note."""
    import time

    from alignsearch.storage import state

    root, ix = indexed_images(6)
    db, _ = add_synthetic(ix, 3, index_dim(ix))
    result = run("verify", "--index", ix, "--skip-model", code=7)
    assert "3 indexed files are missing from the ANN index" in result.output, result.output
    assert "interrupted" not in result.output and "note" not in result.output, result.output

    with db.begin() as conn:
        state.write(conn, index_run=state.IndexRun(started=time.time(), pid=2**22 + 1))
    db.dispose()
    report = json.loads(run("verify", "--index", ix, "--skip-model", "--json").stdout)
    assert report["ok"] and report["checked"]["last_run"] == "interrupted", report
    assert report["notes"][1].startswith("3 files committed since the ANN index was built"), report


@pytest.mark.slow
def test_verify_after_a_run_killed_between_its_vectors_and_their_commit_exits_0(indexed_images):
    """The vectors appended (fsync'ed), their rows not committed: the tail is the next run's to cut."""
    root, ix = indexed_images(6)
    make_images(root / "more", 4, seed=5)
    stopped_run(killed_at, -9, ix, where="alignsearch.storage.vectors:record_chunk")
    report = json.loads(run("verify", "--index", ix, "--skip-model", "--json").stdout)
    assert report["ok"] and report["checked"]["last_run"] == "interrupted", report
    assert any("uncommitted bytes past row 6" in n for n in report["notes"]), report
    finished_and_clean(ix, 10)


@pytest.mark.slow
@pytest.mark.parametrize("where, when, option, deleted", [
    ("indexer.compact:_switch", "after", "--compact", 5),
    ("alignsearch.storage.vectors:drop_generation", "before", "--reindex", 0),
], ids=["compaction", "re-encode"])
def test_verify_after_a_run_killed_in_its_compaction_or_re_encode_exits_0(indexed_images, where, when, option,
                                                                          deleted):
    """`index` compacts after its listing and ANN build (when due, or --compact) and re-encodes (--reindex) before
    them, but a run was recorded as under way only in between: killed after a compaction's or re-encode's switch,
    before it removed the old generation's files, it was "finished", and verify called what it left (vectors.f16's
    old rows past its committed row 0) damage, exit 7."""
    root, ix = indexed_images(12)
    for photo in sorted(root.iterdir())[:deleted]:  # dead rows to compact
        photo.unlink()
    proc = killed_at(where, when, "index", "--index", ix, "--device", "cpu", option)
    assert proc.returncode == -9, proc.stderr[-3000:]
    report = json.loads(run("verify", "--index", ix, "--skip-model", "--json").stdout)
    assert report["ok"] and report["problems"] == [] and report["checked"]["last_run"] == "interrupted", report
    assert any("uncommitted bytes past row 0" in note for note in report["notes"]), report
    assert json.loads(run("info", "--index", ix, "--json").stdout)["last_run"] == "interrupted"
    finished_and_clean(ix, 12 - deleted)


@pytest.mark.slow
def test_a_run_killed_while_it_lists_its_roots_is_interrupted_and_a_refused_one_is_not(indexed_images, tmp_path):
    """The mark of a run under way is put back when the run is refused while it lists (nothing written), and kept
    when it is killed there (it was under way)."""
    root, ix = indexed_images(4)
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    run("index", empty, "--index", ix, "--device", "cpu", code=6)
    assert json.loads(run("info", "--index", ix, "--json").stdout)["last_run"] == "finished"
    proc = killed_at("indexer.roots:scan_all", "before", "index", "--index", ix, "--device", "cpu")
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert json.loads(run("info", "--index", ix, "--json").stdout)["last_run"] == "interrupted"
    run("index", empty, "--index", ix, "--device", "cpu", code=6)  # refused: the killed run's mark stays
    assert json.loads(run("info", "--index", ix, "--json").stdout)["last_run"] == "interrupted"
    finished_and_clean(ix, 4)


def test_verify_while_a_run_commits_between_its_reads_finds_no_damage(indexed_images, tmp_path, monkeypatch):
    """`verify` while `index` writes: it read the store's committed rows, then (statements later) the checksums and
    live rows a commit made since, and called the healthy index damaged ("vectors.f16 is truncated: 4 committed
    vector rows are missing", "indexed files point past the stored vectors"). Its reads are one snapshot now.
    Here the other run commits exactly between verify's first read and the next."""
    from alignsearch.storage import vectors
    from indexer.job import index_folders
    from indexer.verify import _check

    root, ix = indexed_images(4)
    more = make_images(tmp_path / "more", 3, seed=41)[0].parent
    real, ran = vectors.load, []

    def load_after_another_run(*args, **kwargs):
        if not ran:
            ran.append(True)
            index_folders([more], index_dir=ix, device="cpu", workers=0)  # another process's run, committed now
        return real(*args, **kwargs)

    monkeypatch.setattr(vectors, "load", load_after_another_run)
    report = _check(Path(ix), check_model=False)
    assert ran and report.problems == [], report.problems
    monkeypatch.setattr(vectors, "load", real)
    after = _check(Path(ix), check_model=False)
    assert after.problems == [] and after.checked["images"] == 7


@pytest.mark.slow
def test_a_query_opened_while_a_first_run_commits_searches_one_commit(tmp_path, tiny_model, monkeypatch):
    """A query while the first `index` run commits (no ANN index yet: the committed vectors are searched exactly)
    read the store's rows, then the live files a later commit had added, and failed with IndexError (index 28 is
    out of bounds for axis 0 with size 28) on rows past the store it had read. Here the run commits exactly between
    the two reads; the query's reads are one snapshot now."""
    from alignsearch.storage import catalog
    import alignsearch

    photos, ix = make_images(tmp_path / "photos", 4)[0].parent, tmp_path / "ix"
    first = killed_at(BEFORE_ANN, "before", "index", photos, "--index", ix, "--model", tiny_model, "--device", "cpu",
                      "--workers", "0")
    assert first.returncode == -9, first.stderr[-3000:]
    make_images(photos / "more", 3, seed=42)
    real, ran = catalog.live_pairs, []

    def after_another_commit(*args, **kwargs):
        if not ran:
            ran.append(killed_at(BEFORE_ANN, "before", "index", "--index", ix, "--device", "cpu", "--workers", "0"))
        return real(*args, **kwargs)

    monkeypatch.setattr(catalog, "live_pairs", after_another_commit)
    with alignsearch.open(ix, device="cpu") as engine:
        opened = engine.snap.index.ntotal  # the commit it opened on
        hits = engine.search_vector(np.eye(engine.store.dim, dtype=np.float32)[0], k=10)
    assert ran and ran[0].returncode == -9, ran and ran[0].stderr[-3000:]
    assert opened == 4 and len(hits) == 7  # the query itself refreshes to the later commit


def test_a_catalog_with_no_table_yet_holds_nothing_yet_and_an_emptied_one_beside_vectors_is_damage(tmp_path,
                                                                                                 indexed_images):
    """A query, `info` or `verify` while the first `index` run creates the catalog (the file is made before the
    transaction that makes its tables commits), or after that run was killed then: "catalog.db cannot be read (no
    such table: meta)", exit 7, an index called damaged that holds nothing yet. A catalog emptied beside vectors
    that exist is still damage."""
    import sqlite3

    ix = tmp_path / "ix"
    ix.mkdir()
    sqlite3.connect(ix / "catalog.db").execute("PRAGMA journal_mode=WAL").close()  # a file, no table yet
    for args in (["query", "a cat"], ["info"], ["verify"]):
        out = run(*args, "--index", ix, code=3).output
        assert "holds no indexed images yet" in out and "damaged" not in out and "verify" not in out, out
    _, built = indexed_images(3)
    (built / "catalog.db").write_bytes(b"")  # emptied beside its vectors and ANN index
    for name in ("catalog.db-wal", "catalog.db-shm"):
        (built / name).unlink(missing_ok=True)
    assert "cannot be read" in run("info", "--index", built, code=7).output


@pytest.mark.slow
@pytest.mark.parametrize("where, when", [
    ("indexer.compact:_switch", "after"),
    ("alignsearch.storage.vectors:drop_generation", "before"),
], ids=["after-switch", "before-drop"])
def test_verify_after_a_forget_killed_in_its_compaction_exits_0(indexed_images, tmp_path, where, when):
    """`forget` compacts the vector store when due, like `index`, but did not record a run as under way: killed
    after its compaction's switch, before it removed the old generation's files, verify called what it left
    (vectors.f16's old rows past its committed row 0, the old segments) damage, exit 7."""
    import subprocess
    import sys

    from helpers import KILL_HOOK

    photos, ix = indexed_images(12)
    other = make_images(tmp_path / "other", 4, seed=5)[0].parent
    index_json(ix, other, "--device", "cpu")
    due_now = "import indexer.compact\nindexer.compact.MIN_DEAD_ROWS = 1\n"  # as at scale: 12 dead rows of 16
    script = KILL_HOOK + due_now + "from alignsearch.surfaces.cli import main\nmain(sys.argv[3:], prog_name='a')\n"
    proc = subprocess.run([sys.executable, "-c", script, where, when, "forget", photos, "--index", ix],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-3000:]
    result = run("verify", "--index", ix, "--skip-model", "--json")
    report = json.loads(result.stdout)
    assert report["ok"] and report["problems"] == [] and report["checked"]["last_run"] == "interrupted", report
    assert any("uncommitted bytes past row 0" in note for note in report["notes"]), report
    assert json.loads(run("info", "--index", ix, "--json").stdout)["last_run"] == "interrupted"
    finished_and_clean(ix, 4)


# kill -9 once the keyword check's private copy holds the keyword tables (state.peek is its next step)
KILLED_IN_KEYWORD_CHECK = """
import os, signal, sys
from alignsearch.storage import state
real = state.peek
def peek(*args, **kwargs):
    if any("alignsearch-keywords" in name for name in os.listdir(os.environ["TMPDIR"])):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)
state.peek = peek
from alignsearch.surfaces.cli import main
main(sys.argv[1:], prog_name="alignsearch")
"""


@pytest.mark.slow
@pytest.mark.parametrize("repair", [False, True])
def test_the_keyword_copy_of_a_killed_verify_is_removed_by_the_next(tmp_path, repair):
    """verify checks the keyword tables on a private copy in the temporary folder: killed there (-9), a
    TemporaryDirectory kept that copy of every caption, text read and path for good. The next verify
    removes it, once its maker is dead (its lock gone), and leaves another verify's at work."""
    import os
    import subprocess
    import sys

    from helpers import alignsearch, vector_index

    ix, tmp = tmp_path / "ix", tmp_path / "tmp"
    vector_index(ix, 10, 8)
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp), "HF_HUB_OFFLINE": "1"}
    args = ["verify", "--index", str(ix), "--skip-model", *(["--repair"] if repair else [])]
    child = subprocess.run([sys.executable, "-c", KILLED_IN_KEYWORD_CHECK, *args], env=env, capture_output=True)
    assert child.returncode == -9, child.stderr[-2000:]
    left = [p for p in tmp.iterdir() if "alignsearch-keywords" in p.name]
    assert len(left) == 1 and (left[0] / "keywords.db").exists()
    assert left[0].stat().st_mode & 0o077 == 0  # private meanwhile
    past = left[0].stat().st_mtime - 120
    os.utime(left[0], (past, past))  # as a minute later: a younger one may be a verify just starting
    proc = alignsearch(*args[:-1] if repair else args, env={"TMPDIR": str(tmp)})
    assert proc.returncode in (0, 7) and "Traceback" not in proc.stderr, proc.stderr[-2000:]  # 7: this index's
    assert [p.name for p in tmp.iterdir() if "keywords" in p.name] == []  # ANN index is empty (vector_index)


@pytest.mark.slow
def test_files_a_stopped_run_committed_after_the_ann_index_are_searched_exactly(indexed_images):
    """A run killed after it committed new files, before their ANN entries (an earlier run built the ANN index):
    queries searched the last complete ANN index only, so the 4 new files were in no answer until `index` finished
    the run, while verify's note had said they were searched. The engine now scores the live files the ANN index
    lacks exactly and merges them into every search's candidates: each answer here is the exact ranking over all 10
    files (plain, text, filtered, late-fused, `similar`'s exclude, hybrid), and verify's note says they are searched
    exactly. A finished index reads no such files (Snapshot.pending is None)."""
    import alignsearch
    from alignsearch.search.query import Parts, scorer

    root, ix = indexed_images(6)
    make_images(root / "more", 4, seed=5)
    stopped_run(killed_at, -9, ix)
    with alignsearch.open(ix, device="cpu") as engine:
        ids = engine.snap.columns(engine.db).ids
        stored = np.stack([engine.vector_of(int(i)) for i in ids])
        more = {int(i) for i in ids if Path(engine.file(int(i)).path).parent.name == "more"}

        def exact(q, k, among=None):
            sims = stored @ q
            order = [int(ids[j]) for j in np.argsort(-sims, kind="stable") if among is None or int(ids[j]) in among]
            return order[:k]

        rng = np.random.default_rng(7)
        for _ in range(5):
            q = rng.standard_normal(engine.store.dim).astype(np.float32)
            q /= np.linalg.norm(q)
            for k in (3, 10):
                assert [h.id for h in engine.search_vector(q, k=k)] == exact(q, k)
            assert [h.id for h in engine.search_vector(q, k=10, path="more/*")] == exact(q, 10, more)
            half = rng.standard_normal(engine.store.dim).astype(np.float32)
            parts = Parts(text=half / np.linalg.norm(half), image=q)
            fused = scorer(parts, "product").fused(scorer(parts, "product").parts(stored))  # ties at 0: by tiebreak
            got = [h.score for h in engine.search_vector(parts, k=5, compose="product")]
            assert np.allclose(got, np.sort(fused)[::-1][:5], atol=1e-5)
        for i in more:  # `similar`: the file's own vector, the file left out
            got = [h.id for h in engine.search_vector(engine.vector_of(i), k=3, exclude=[i])]
            assert got == [j for j in exact(engine.vector_of(i), 4) if j != i][:3]
        text = engine.embed("red")
        assert [h.id for h in engine.search("red", k=10, mode="vector")] == exact(text, 10)
        assert {h.id for h in engine.search("red", k=10, mode="hybrid")} == set(ids.tolist())
        assert engine.index.ntotal == 6 and set(engine.snap.pending[:, 0].tolist()) == more  # the ANN index lacks them
    note = json.loads(run("verify", "--index", ix, "--skip-model", "--json").stdout)["notes"][1]
    assert note == "4 files committed since the ANN index was built are searched exactly until `alignsearch index` " \
                   "finishes the run", note
    with alignsearch.open(ix, device="cpu") as engine:  # open meanwhile (`serve`): another stopped run commits 2 more
        make_images(root / "later", 2, seed=9)
        stopped_run(killed_at, -9, ix)
        hits = engine.search_vector(np.ones(engine.store.dim, np.float32) / np.sqrt(engine.store.dim), k=100)
        assert len(hits) == 12 and sum(Path(h.path).parent.name == "later" for h in hits) == 2
    index_json(ix, "--device", "cpu")
    with alignsearch.open(ix, device="cpu") as engine:
        assert engine.snap.pending is None and engine.index.ntotal == 12


def test_a_stopped_runs_files_stay_found_while_the_next_run_is_at_work(indexed_images):
    """A stopped run's files (searched exactly beside the ANN index) vanished from every answer as soon as the next
    `index` began (a resumed run at work: its files join the ANN index when it ends, so Snapshot.pending was not
    read), until that run ended: an open `serve` lost results it had just given. The snapshot a run at work is read
    in keeps the pending files of the one before it (no catalog scan); those the run replaces are gone from
    answers, and once the run at work is itself stopped, all its files are found."""
    import subprocess
    import sys
    import time

    import alignsearch
    from alignsearch.storage import state

    root, ix = indexed_images(6)
    db, _ = add_synthetic(ix, 3, index_dim(ix))
    with db.begin() as conn:
        state.write(conn, index_run=state.IndexRun(started=time.time(), pid=2**22 + 1))  # above pid_max's default
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # the next run's process
    try:
        with alignsearch.open(ix, device="cpu") as engine:
            q = np.ones(engine.store.dim, np.float32) / np.sqrt(engine.store.dim)
            synthetic = {h.path for h in engine.search_vector(q, k=100) if h.path.startswith("/synthetic/")}
            assert len(synthetic) == 3 and len(engine.search_vector(q, k=100)) == 9
            with db.begin() as conn:
                state.write(conn, index_run=state.IndexRun(started=time.time(), pid=child.pid))  # at work
            assert {h.path for h in engine.search_vector(q, k=100) if h.path.startswith("/synthetic/")} == synthetic
            add_synthetic(ix, 2, index_dim(ix), seed=1)  # it replaces 0.jpg and 1.jpg (new ids) and goes on
            hits = engine.search_vector(q, k=100)
            assert "/synthetic/2.jpg" in {h.path for h in hits} and len({h.id for h in hits}) == len(hits)
            child.kill()
            child.wait()  # stopped: every file it committed is read
            hits = engine.search_vector(q, k=100)
            assert len(hits) == 9 and {h.path for h in hits if h.path.startswith("/synthetic/")} == synthetic
    finally:
        child.kill()
        child.wait()


def _stopped_then_resumed(ix: Path, x: np.ndarray):
    """x's rows committed by a run stopped before its ANN build, then the next run begun (this process: at work)."""
    import time

    from alignsearch.storage import state
    from indexer.job import _run_begins

    db, _ = write_vectors(ix, x)
    with db.begin() as conn:
        state.write(conn, index_run=state.IndexRun(started=time.time(), pid=2**22 + 1))  # above pid_max's default
    return db, lambda: _run_begins(db)


def test_a_reader_opened_while_the_next_run_is_at_work_finds_the_stopped_runs_files_too(indexed_images):
    """A reader open before the next run began kept the stopped run's files (its snapshot's pending list carried),
    while one opened after (a `query`, a restarted `serve`) found none of them until that run ended: the next run
    records where its own commits begin (IndexRun.pending_below), and every reader reads the files below it that
    the ANN index lacks. Those the run replaces meanwhile are gone from both."""
    import alignsearch

    root, ix = indexed_images(6)
    dim = index_dim(ix)
    db, resume = _stopped_then_resumed(ix, clustered(3, dim))
    q = np.ones(dim, np.float32) / np.sqrt(dim)

    def synthetic(engine):
        return sorted(h.path for h in engine.search_vector(q, k=100) if h.path.startswith("/synthetic/"))

    with alignsearch.open(ix, device="cpu") as before:
        assert synthetic(before) == [f"/synthetic/{j}.jpg" for j in range(3)]
        resume()
        with alignsearch.open(ix, device="cpu") as fresh:
            assert synthetic(fresh) == synthetic(before) == [f"/synthetic/{j}.jpg" for j in range(3)]
            write_vectors(ix, clustered(1, dim, seed=1))  # the run replaces 0.jpg
            with alignsearch.open(ix, device="cpu") as later:
                assert synthetic(later) == synthetic(fresh) == synthetic(before) == ["/synthetic/1.jpg", "/synthetic/2.jpg"]


def test_rows_the_resumed_run_replaced_take_no_place_in_the_top_k(indexed_images):
    """The pending files' best `depth` were chosen before the catalog was asked which still live: a row the resumed
    run replaced (best for the query) took the one slot of -k 1, _hits dropped it, and the live pending file just
    behind it was missing from the answer (a photo came first)."""
    import alignsearch

    root, ix = indexed_images(6)
    dim = index_dim(ix)
    e = np.zeros(dim, np.float32)
    e[0] = 1.0
    near = e + 0.05 * np.random.default_rng(0).standard_normal(dim).astype(np.float32)
    db, resume = _stopped_then_resumed(ix, np.stack([e, near / np.linalg.norm(near)]))
    with alignsearch.open(ix, device="cpu") as engine:
        assert [h.path for h in engine.search_vector(e, k=1)] == ["/synthetic/0.jpg"]
        resume()
        write_vectors(ix, -e[None, :])  # the resumed run replaces 0.jpg (its new row waits for the run's ANN build)
        assert [h.path for h in engine.search_vector(e, k=1)] == ["/synthetic/1.jpg"]
        assert [h.path for h in engine.search_vector(e, k=2)][0] == "/synthetic/1.jpg"


def test_info_and_explain_count_the_files_searched_exactly_beside_the_ann_index(indexed_images):
    """`info` and `query --explain` said the ANN index's vectors alone (6) while every search also scored the
    stopped run's 3 files exactly: both say them (searched_exactly), less those the resumed run replaced."""
    root, ix = indexed_images(6)
    db, resume = _stopped_then_resumed(ix, clustered(3, index_dim(ix)))
    info = json.loads(run("info", "--json", "--index", ix).stdout)
    assert info["index"]["vectors"] == 6 and info["index"]["searched_exactly"] == 3, info["index"]
    assert "3 more committed by an unfinished run, not yet in it, searched exactly" in run("info", "--index", ix).output
    plan = json.loads(run("query", "red", "--index", ix, "--explain", "--json", "--device", "cpu").stdout)["plan"]
    assert plan["vectors"] == 6 and plan["searched_exactly"] == 3 and "3 vectors an unfinished" in plan["path"], plan
    resume()
    write_vectors(ix, clustered(1, index_dim(ix), seed=1))  # the resumed run replaces 0.jpg
    assert json.loads(run("info", "--json", "--index", ix).stdout)["index"]["searched_exactly"] == 2


def test_a_run_records_where_its_commits_begin_only_after_a_stopped_run(indexed_images):
    """A run begun on a finished index records no pending_below (readers then scan nothing while it works); one
    begun over a stopped run's mark records the id its own commits start at, above every committed one."""
    from alignsearch.storage import catalog, state
    from indexer.job import _run_begins

    root, ix = indexed_images(6)
    db = catalog.connect(ix / "catalog.db")
    _run_begins(db)
    with db.connect() as conn:
        assert state.read(conn, "index_run").index_run.pending_below is None
    _run_begins(db)  # over the first's mark: it stopped
    with db.connect() as conn:
        below = state.read(conn, "index_run").index_run.pending_below
        assert below > max(i for (i,) in conn.exec_driver_sql("SELECT id FROM files"))
    db.dispose()
