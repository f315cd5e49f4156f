"""The Python API, and the IVF-PQ path end to end (fed synthetic vectors to cross the exact threshold)."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import alignsearch
from alignsearch.storage import catalog
from alignsearch.search import engine as engine_module
from alignsearch.search.engine import ANN_FILE
from alignsearch.errors import BadInputError, IndexNotFoundError, ModelMismatchError, UsageError
from indexer import build
from indexer.job import index_folders
from helpers import clustered
from helpers import add_synthetic
from helpers import copies_index


@pytest.fixture
def corpus(indexed_corpus):
    """Here the corpus is the indexed one."""
    return indexed_corpus[0]


@pytest.fixture
def index_dir(indexed_corpus):
    return indexed_corpus[1]


def test_index_folders_is_the_index_command(tmp_path, corpus, tiny_model):
    """The Python entry point writes the index `alignsearch index` does (the other tests use the command's)."""
    out = tmp_path / "ix"
    summary = index_folders([corpus], out, model=str(tiny_model), device="cpu", workers=0)
    assert (summary.added, summary.failed) == (18, 1)
    with alignsearch.open(out) as engine:
        target = corpus / "img007.jpg"
        assert engine.search(image=target, k=1)[0].path == str(target)
        assert engine.info()["images"] == 18


def test_open_discovers_the_index_like_git(index_dir, monkeypatch):
    base = index_dir.parent  # the index is base/.alignsearch
    deep = base / "a" / "b"
    deep.mkdir(parents=True)
    monkeypatch.delenv("ALIGNSEARCH_INDEX", raising=False)
    monkeypatch.chdir(deep)
    engine = alignsearch.open()
    assert engine.info()["images"] == 18
    monkeypatch.chdir("/")
    with pytest.raises(IndexNotFoundError):
        alignsearch.open()
    monkeypatch.setenv("ALIGNSEARCH_INDEX", str(index_dir))
    assert alignsearch.open().info()["images"] == 18


def test_search_by_text_image_and_both(index_dir, corpus):
    engine = alignsearch.open(index_dir, device="cpu")
    target = corpus / "img007.jpg"
    for image in (str(target), target.read_bytes(), Image.open(target)):
        hits = engine.search(image=image, k=3)
        assert hits[0].path == str(target) and hits[0].score == pytest.approx(1.0, abs=2e-3)
    hits = engine.search(text="red car", image=target, k=10, text_weight=2.0)
    assert len(hits) == 10 and all(isinstance(h, alignsearch.Hit) for h in hits)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    # the compound vector is the paper's: normalised parts, weighted, summed, renormalised
    t = engine.encoder.encode_text(["red car"])[0]
    i = engine.encoder.encode_images([target])[0]
    expected = (2 * t + i) / np.linalg.norm(2 * t + i)
    assert np.allclose(engine.embed(text="red car", image=target), expected, atol=1e-5)
    with pytest.raises(UsageError):  # nothing to search for: exit 2, as the CLI and the server say
        engine.search()
    with pytest.raises(UsageError):  # an option out of its range: exit 2, as `query -k 0` says
        engine.search(text="x", k=0)


def test_model_mismatch_is_an_error(index_dir, other_model):
    engine = alignsearch.open(index_dir, model=str(other_model), device="cpu")
    with pytest.raises(ModelMismatchError, match="built with"):
        engine.search(text="dog")


@pytest.mark.slow
def test_ivfpq_path_end_to_end(index_dir, corpus):
    dim = alignsearch.open(index_dir).store.dim
    db, store = add_synthetic(index_dir, 12_000, dim)
    built = build.sync_index(db, store, index_dir / ANN_FILE)
    assert built["plan"]["kind"] == "ivfpq" and built["vectors"] == 12_018

    engine = alignsearch.open(index_dir, device="cpu")
    info = engine.info()["index"]
    assert info["type"] == "ivfpq" and info["nlist"] >= 16 and info["nprobe"] >= 1

    # a real image still finds itself through IVF-PQ candidates and exact re-ranking
    target = corpus / "img010.jpg"
    hit = engine.search(image=target, k=1)[0]
    assert hit.path == str(target) and hit.score == pytest.approx(1.0, abs=2e-3)

    # recall@10 against exact search over the stored vectors, for queries that are not database vectors
    with db.connect() as conn:
        ids, rows = catalog.live_pairs(conn).T
    allv = store.get(rows)
    queries = clustered(100, dim, seed=42)
    found = 0
    for q in queries:
        truth = set(ids[np.argsort(-(allv @ q))[:10]])
        found += len(truth & {h.id for h in engine.search_vector(q, 10)})
    assert found / 1000 >= 0.9

    # an update adds and removes without retraining
    with db.begin() as conn:
        catalog.delete_files(conn, ids[:5].tolist())
    updated = build.sync_index(db, store, index_dir / ANN_FILE)
    assert updated["action"].startswith("updated") and updated["vectors"] == 12_013
    assert engine.refresh()
    assert engine.index.ntotal == 12_013


def test_python_api_inputs_are_checked_with_one_clear_error(index_dir, corpus):
    """Issue 24 #20: numpy integers work; bad vectors, an empty image and wrong types are one BadInputError
    (or UsageError for a bad option value), never a raw Python, FAISS or assertion error."""
    from datetime import date, datetime, timezone

    from alignsearch.errors import AlignSearchError

    engine = alignsearch.open(index_dir, device="cpu")
    assert len(engine.search(text="red car", k=np.int64(5))) == 5
    assert len(engine.search(text="red car", k=np.int32(3), nprobe=np.int64(4))) == 3
    v = engine.vector_of(engine.search(text="red car", k=1)[0].id)
    assert len(engine.search_vector(v, k=np.int64(4))) == 4
    assert len(engine.search_vector(v.astype(np.float64)[None, :], k=2)) == 2
    dim = v.shape[0]
    bad_vectors = [np.zeros(dim), np.full(dim, np.nan), v * 3, np.ones(dim + 1) / np.sqrt(dim + 1), "abc",
                   np.ones((2, dim)) / np.sqrt(dim)]
    for bad in bad_vectors:
        with pytest.raises(BadInputError, match="query vector"):
            engine.search_vector(bad, k=3)
    with pytest.raises(BadInputError, match="0x0"):
        engine.search(image=Image.new("RGB", (0, 0)))
    with pytest.raises(BadInputError, match="nothing to search"):
        engine.embed(image=Image.new("RGB", (5, 0)))
    with pytest.raises(BadInputError, match="query image must be"):
        engine.search(image=12345)
    for kwargs in ({"where": 123}, {"camera": 5}, {"near": (1, 2)}, {"near": 7}, {"near": ("a", "b", "c")},
                   {"path": ["a"]}, {"min_score": "high"}, {"negative": 3}, {"text_weight": "x"}):
        with pytest.raises(AlignSearchError) as exc:
            engine.search(text="red car", **kwargs)
        # an option of the wrong type is bad usage (2), as click says it; the negative is a text of the query (6)
        assert exc.value.exit_code == (6 if "negative" in kwargs else 2), kwargs
    # dates as date/datetime objects are what the ISO strings say
    some = engine.search(text="red car", k=20, after="2000-01-01")
    assert engine.search(text="red car", k=20, after=date(2000, 1, 1)) == some
    assert engine.search(text="red car", k=20, after=datetime(2000, 1, 1, tzinfo=timezone.utc)) == some
    assert engine.search(text="red car", k=20, before=datetime(2000, 1, 1)) == []
    assert engine.search(text="red car", k=20, near=(np.float64(0), 0, 10)) == []


def test_search_vector_exclude_of_the_wrong_type_is_a_usage_error(index_dir):
    """exclude=5 (one id where a collection belongs) was a raw TypeError, "'int' object is not iterable", where
    every other option of the wrong type is a UsageError (README, "Arguments are checked on entry"); a string was
    taken for its characters. A collection of ids, a numpy array's too, is what it was."""
    engine = alignsearch.open(index_dir, device="cpu")
    first, second = (h.id for h in engine.search(text="red car", k=2))
    v = engine.vector_of(first)
    for bad in (first, str(first), None, np.int64(first), np.array(first)):
        with pytest.raises(UsageError, match="exclude must be a collection of image ids"):
            engine.search_vector(v, k=3, exclude=bad)
    with pytest.raises(UsageError, match="an image id must be"):
        engine.search_vector(v, k=3, exclude=[0])
    for ids in ([first], (first,), {first}, np.array([first])):
        hits = [h.id for h in engine.search_vector(v, k=3, exclude=ids)]
        assert first not in hits and second in hits and len(hits) == 3


def test_a_snapshot_is_read_again_when_its_index_run_begins_ends_or_stops():
    """The pure rule refresh asks (engine.run_stopped_since): files of a stopped run are read once it is seen gone,
    a run at work is not read again on every query, a run begun or ended since is a new state."""
    import os
    import time

    from alignsearch.search.engine import run_at_work, run_stopped_since
    from alignsearch.storage.state import IndexRun

    here, gone = IndexRun(started=time.time(), pid=os.getpid()), IndexRun(started=2.0, pid=2**22 + 1)  # above pid_max's default
    assert run_at_work(here) and not run_at_work(gone)
    assert not run_stopped_since(None, False, None)
    assert run_stopped_since(None, False, here)  # a run began
    assert run_stopped_since(here, False, None)  # it ended
    assert not run_stopped_since(here, False, here)  # still at work: nothing to read again
    assert run_stopped_since(gone, False, gone)  # read while at work, gone now: its files are read
    assert not run_stopped_since(gone, True, gone)  # read since it stopped: nothing more


def test_a_recorded_run_whose_pid_another_process_took_is_not_at_work(monkeypatch):
    """A run stopped by a reboot or a crash leaves its pid in the state; a process that started after the run began
    holds that number now (a daemon after a reboot, any later program). kill 0 answered for it, so the run was
    taken as at work and the files it committed were in no answer until the next run ended, while verify (no
    writer lock held) said they were searched. A process that began after the run did is not the run, nor is a
    zombie (a killed run its parent has not reaped: kill 0 answers for it too)."""
    import errno
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    from alignsearch.search.engine import run_at_work
    from alignsearch.storage.state import IndexRun

    if not Path(f"/proc/{os.getpid()}/stat").exists():
        pytest.skip("no /proc: a process's start is unknown, a live pid is taken as the run's")
    assert run_at_work(IndexRun(started=time.time(), pid=os.getpid()))  # this process began before: the run
    assert not run_at_work(IndexRun(started=1.0, pid=os.getpid()))  # began after the run (1970): a pid reused
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        stat = Path(f"/proc/{child.pid}/stat")
        for _ in range(500):  # exited, not yet reaped
            if stat.read_text().rsplit(")", 1)[1].split()[0] == "Z":
                break
            time.sleep(0.01)
        assert not run_at_work(IndexRun(started=time.time(), pid=child.pid))
    finally:
        child.wait()
    real_kill = os.kill

    def kill(pid, sig):  # another user's process (a reader of a shared index, or a daemon since a reboot): EPERM
        if pid == os.getpid():
            raise PermissionError(errno.EPERM, "Operation not permitted")
        return real_kill(pid, sig)

    monkeypatch.setattr(os, "kill", kill)
    assert run_at_work(IndexRun(started=time.time(), pid=os.getpid()))  # the run, another user's
    assert not run_at_work(IndexRun(started=1.0, pid=os.getpid()))  # its number, another user's process's since


@pytest.mark.slow  # two index runs
@pytest.mark.parametrize("first,later", [("zebra.jpg", "apple.jpg"), ("apple.jpg", "zebra.jpg")])
def test_copies_tied_in_score_are_listed_by_path_whatever_the_order_of_their_ids(tmp_path, corpus, tiny_model, first,
                                                                                 later):
    """Two copies of one photo score exactly alike; they were listed in the order of their ids (the ANN's), which is
    the order they were indexed in: a Ray run and a local run of one folder listed them in opposite orders. Here the
    copy indexed first holds the lower id, named last alphabetically or first. Hybrid fuses a keyword ranking (the
    third photo's caption) with similarity ranks, which the copies took one after the other: now one, shared."""
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / first).write_bytes((corpus / "img002.jpg").read_bytes())
    (folder / "other.jpg").write_bytes((corpus / "img007.jpg").read_bytes())
    (folder / "other.txt").write_text("a red kite")  # a keyword match, so hybrid fuses two rankings
    ix = tmp_path / "ix"
    index_folders([folder], ix, model=str(tiny_model), device="cpu", workers=0)
    (folder / later).write_bytes((corpus / "img002.jpg").read_bytes())
    index_folders([folder], ix, model=str(tiny_model), device="cpu", workers=0)
    with alignsearch.open(ix) as engine:
        ids = {h.relpath: h.id for h in engine.search(text="red", k=10)}
        assert ids[first] < ids[later]
        for query in ({"text": "red"}, {"image": corpus / "img002.jpg"}, {"text": "red", "mode": "hybrid"},
                      {"text": "red", "compose": "weicom", "image": corpus / "img005.jpg"}):
            names = [h.relpath for h in engine.search(**query, k=10) if h.relpath != "other.jpg"]
            assert names == ["apple.jpg", "zebra.jpg"], query


@pytest.mark.slow  # two index runs
@pytest.mark.parametrize("first,later", [("zebra.jpg", "apple.jpg"), ("apple.jpg", "zebra.jpg")])
def test_the_copy_a_cut_at_k_keeps_of_tied_copies_is_the_one_listed_first_by_path(tmp_path, corpus, tiny_model, first,
                                                                                   later):
    """Copies tied in every key are listed by path (settle_ties), but the cut at k came before: the copy
    kept was the first in the ANN's order (the order they were indexed in), so a Ray run and a local run of one
    folder answered with different files. Now the cut keeps the copy that path order lists first. Fused rankings look
    FUSION_DEPTH deep; a vector search on a flat index asked FAISS for k alone, which cut between the copies before
    the engine saw them (the one indexed first kept): it asks for a margin past k now (query.TIE_MARGIN)."""
    ix = copies_index(tmp_path, corpus, tiny_model, first, later)
    with alignsearch.open(ix) as engine:
        assert engine.info()["index"]["type"] == "flat"
        for query in ({"text": "red", "mode": "hybrid"}, {"text": "kite"}, {"text": "red", "mode": "vector"},
                      {"image": corpus / "img002.jpg"}, {"text": "blue sky"}):
            every = [h.relpath for h in engine.search(**query, k=10)]
            copies = [n for n in every if n in ("apple.jpg", "zebra.jpg")]
            k = every.index(copies[0]) + 1  # the cut falls between the two copies
            assert [h.relpath for h in engine.search(**query, k=k)][-1] == "apple.jpg", query


@pytest.mark.slow  # two index runs
@pytest.mark.parametrize("first,later", [("zebra.jpg", "apple.jpg"), ("apple.jpg", "zebra.jpg")])
def test_copies_with_one_caption_share_a_keyword_rank_and_are_listed_by_path(tmp_path, corpus, tiny_model, first,
                                                                              later, monkeypatch):
    """Two copies of one photo with the same caption are equal in bm25, but took keyword ranks 1 and 2 in the keyword
    index's order (their ids', the order they were indexed in): their fused scores differed by it, and the copy
    indexed first came first. Now matches equal in bm25 share the best rank of their run (query.keyword_ranks). And
    the keyword list's limit (KEYWORD_DEPTH) cut between them in that order: matches tied with the last one are kept
    (query.through_ties)."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in (first, "img007.jpg"):
        (folder / name).write_bytes((corpus / ("img002.jpg" if name == first else name)).read_bytes())
    (folder / Path(first).with_suffix(".txt")).write_text("a red kite")
    (folder / "img007.txt").write_text("a kite over the red sea shore")  # another match, ranked below by bm25
    ix = tmp_path / "ix"
    index_folders([folder], ix, model=str(tiny_model), device="cpu", workers=0)
    (folder / later).write_bytes((corpus / "img002.jpg").read_bytes())
    (folder / Path(later).with_suffix(".txt")).write_text("a red kite")
    index_folders([folder], ix, model=str(tiny_model), device="cpu", workers=0)
    with alignsearch.open(ix) as engine:
        for query in ({"text": "kite"}, {"text": "red kite", "mode": "hybrid"}, {"text": "kite", "mode": "keyword"}):
            hits = engine.search(**query, k=10)
            copies = [h for h in hits if h.relpath in ("apple.jpg", "zebra.jpg")]
            assert [h.relpath for h in copies] == ["apple.jpg", "zebra.jpg"], query
            assert copies[0].parts["keyword_rank"] == copies[1].parts["keyword_rank"] == 1, query
            assert copies[0].score == copies[1].score, query
            other = next(h for h in hits if h.relpath == "img007.jpg")
            assert other.parts["keyword_rank"] == 3, query  # 1, 1, 3: the next match keeps its place
        monkeypatch.setattr(engine_module, "KEYWORD_DEPTH", 1)  # the limit falls between the copies at k=1
        for query in ({"text": "kite", "mode": "keyword"}, {"text": "kite"}):
            hits = engine.search(**query, k=1)
            assert [(h.relpath, h.parts["keyword_rank"]) for h in hits] == [("apple.jpg", 1)], query
