"""Attacks on settling copies tied at k by name (query.TIE_MARGIN, query.tied_at_cut) and on keyword matches equal in
bm25 sharing a rank (query.keyword_ranks, query.through_ties): the same query over the same files answers the same
whatever order the files were indexed in."""

from pathlib import Path

import numpy as np
import pytest

import alignsearch
from helpers import copies_index
from indexer.job import index_folders


@pytest.fixture
def corpus(indexed_corpus):
    return indexed_corpus[0]


@pytest.mark.slow  # two index runs
@pytest.mark.parametrize("first,later", [("zebra.jpg", "apple.jpg"), ("apple.jpg", "zebra.jpg")])
def test_a_filtered_or_compound_search_on_a_flat_index_keeps_the_copy_listed_first_by_path(tmp_path, corpus,
                                                                                            tiny_model, first, later):
    """Filters on a flat index score every allowed vector (_exact) and cut at k there: copies tied at place k were
    cut in the order of the allowed ids (the order they were indexed in), not by path."""
    ix = copies_index(tmp_path, corpus, tiny_model, first, later)
    with alignsearch.open(ix) as engine:
        assert engine.info()["index"]["type"] == "flat"
        other = next(h.id for h in engine.search(image=corpus / "img005.jpg", k=1))
        like = engine.vector_of(other)
        searches = [lambda k, q=q: engine.search(**q, k=k) for q in (
            {"text": "blue sky", "path": "*.jpg"}, {"text": "blue sky", "format": "jpeg"},
            {"image": corpus / "img002.jpg", "path": "*"}, {"text": "red", "mode": "vector", "path": "*.jpg"},
            {"text": "blue sky", "negative": "red"}, {"text": "blue sky", "image": corpus / "img005.jpg"},
            {"text": "blue sky", "image": corpus / "img005.jpg", "compose": "product"})]
        searches += [lambda k: engine.search_vector(like, k=k, exclude=[other]),  # `similar`
                     lambda k: engine.search_vector(like, k=k, exclude=[other], path="*.jpg")]
        for n, search in enumerate(searches):
            every = [h.relpath for h in search(10)]
            copies = [name for name in every if name in ("apple.jpg", "zebra.jpg")]
            assert copies == ["apple.jpg", "zebra.jpg"], n
            k = every.index(copies[0]) + 1  # the cut falls between the two copies
            assert [h.relpath for h in search(k)][-1] == "apple.jpg", n


@pytest.mark.slow  # two index runs
@pytest.mark.parametrize("first,later", [(("zebra.jpg", "mango.jpg"), ("apple.jpg",)),
                                         (("apple.jpg",), ("zebra.jpg", "mango.jpg"))])
def test_three_copies_at_k_and_collapsed_copies_are_listed_by_path(tmp_path, corpus, tiny_model, first, later):
    """Three copies tied at k (filtered or not): the cut keeps the ones path order lists first; collapsed, the copy
    shown is the one listed first by path."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for other in ("img007", "img005", "img011"):
        (folder / f"{other}.jpg").write_bytes((corpus / f"{other}.jpg").read_bytes())
    ix = tmp_path / "ix"
    for names in (first, later):
        for name in names:
            (folder / name).write_bytes((corpus / "img002.jpg").read_bytes())
        index_folders([folder], ix, model=str(tiny_model), device="cpu", workers=0)
    names = ["apple.jpg", "mango.jpg", "zebra.jpg"]
    with alignsearch.open(ix) as engine:
        for query in ({"text": "blue sky"}, {"text": "blue sky", "path": "*.jpg"}, {"image": corpus / "img002.jpg"},
                      {"text": "red", "mode": "hybrid"}):
            every = [h.relpath for h in engine.search(**query, k=10)]
            assert [n for n in every if n in names] == names, query
            at = every.index("apple.jpg")
            for k in (at + 1, at + 2):
                got = [h.relpath for h in engine.search(**query, k=k)]
                assert [n for n in got if n in names] == names[: k - at], (query, k)
            shown = [h for h in engine.search(**query, k=10, collapse=True) if h.relpath in names]
            assert [h.relpath for h in shown] == ["apple.jpg"], query
            assert [Path(engine.file(i).path).name for i in shown[0].duplicates] == names[1:], query


@pytest.mark.slow  # two index runs
@pytest.mark.parametrize("first,later", [("zebra.jpg", "apple.jpg"), ("apple.jpg", "zebra.jpg")])
def test_copies_with_one_caption_filtered_and_through_the_cli_share_a_keyword_rank(tmp_path, corpus, tiny_model,
                                                                                  first, later, monkeypatch):
    """Copies with one caption, in every mode that ranks keyword matches, filtered or not, and as the CLI's JSON
    lists them: one keyword rank, the copy listed first by path first, the limit cut after both."""
    import json

    from conftest import run

    from alignsearch.search import engine as engine_module
    from alignsearch.search.request import build as build_request

    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / first).write_bytes((corpus / "img002.jpg").read_bytes())
    (folder / Path(first).with_suffix(".txt")).write_text("a red kite")
    (folder / "img007.jpg").write_bytes((corpus / "img007.jpg").read_bytes())
    (folder / "img007.txt").write_text("a kite over the red sea shore")
    ix = tmp_path / "ix"
    index_folders([folder], ix, model=str(tiny_model), device="cpu", workers=0)
    (folder / later).write_bytes((corpus / "img002.jpg").read_bytes())
    (folder / Path(later).with_suffix(".txt")).write_text("a red kite")
    index_folders([folder], ix, model=str(tiny_model), device="cpu", workers=0)
    queries = [{"text": "kite", "mode": m, "path": p} for m in ("keyword", "hybrid", "auto") for p in (None, "*.jpg")]
    with alignsearch.open(ix) as engine:
        for query in queries:
            hits = engine.search(**query, k=10)
            copies = [(h.relpath, h.parts["keyword_rank"]) for h in hits if h.relpath != "img007.jpg"]
            assert copies == [("apple.jpg", 1), ("zebra.jpg", 1)], query
            options = [f"--{key}={value}" for key, value in query.items() if key != "text" and value is not None]
            out = json.loads(run("query", "kite", "--index", ix, "-k", "10", *options, "--json").output)["results"]
            assert [(h["id"], h["parts"].get("keyword_rank")) for h in out] == [(h.id, h.parts["keyword_rank"]) for h in hits], query
        monkeypatch.setattr(engine_module, "KEYWORD_DEPTH", 1)  # the limit falls between the copies at k=1
        for query in queries:
            assert [(h.relpath, h.parts["keyword_rank"]) for h in engine.search(**query, k=1)] == [("apple.jpg", 1)], \
                query
        # explain counts the matches as the search keeps them: the two copies at the limit, and never more caption
        # matches (auto's evidence, a part of the keyword matches) than keyword matches
        plan = engine.explain(build_request(text="kite", k=1, mode="auto"))
        assert plan["caption_or_tag_matches"] == plan["keyword_matches"] == 2, plan
        # k past KEYWORD_DEPTH: the search keeps k matches (the copies and img007's), and explain counts them all
        plan = engine.explain(build_request(text="kite", k=3, mode="auto"))
        assert plan["caption_or_tag_matches"] == plan["keyword_matches"] == 3, plan


@pytest.mark.slow  # an index copied, its ANN index rebuilt
@pytest.mark.parametrize("order", [("c", "a", "b"), ("b", "c", "a"), ("a", "b", "c")])
def test_three_synthetic_copies_tied_at_k_on_a_flat_index_are_listed_by_path(indexed_corpus, order, monkeypatch):
    """Three copies written in any order into a flat index, searched by vector, filtered or not: the cut at k keeps
    the copies path order lists first."""
    from alignsearch.search import engine as engine_module
    from alignsearch.search.engine import ANN_FILE
    from helpers import write_vectors
    from indexer import build

    index_dir = indexed_corpus[1]
    with alignsearch.open(index_dir) as engine:
        dim = engine.info()["dim"]
    rng = np.random.default_rng(0)
    q = rng.standard_normal(dim)
    q /= np.linalg.norm(q)
    noise = rng.standard_normal((3, dim))
    closer = [q + 0.1 * noise[0], q + 0.2 * noise[1]]  # two above the copies
    copy = q + 0.5 * noise[2]
    rows = np.array([v / np.linalg.norm(v) for v in closer + [copy] * 3], np.float32)
    names = ["near1.jpg", "near2.jpg"] + [f"{n}_copy.jpg" for n in order]
    db, store = write_vectors(index_dir, rows, names)

    def check():
        with alignsearch.open(index_dir) as engine:
            for path in (None, "*.jpg", "*copy*"):
                full = [h.relpath for h in engine.search_vector(q.astype(np.float32), k=10, path=path)]
                copies = [n for n in full if n.endswith("_copy.jpg")]
                assert copies == ["a_copy.jpg", "b_copy.jpg", "c_copy.jpg"], (path, full)
                at = full.index("a_copy.jpg")
                for k in (at + 1, at + 2):
                    got = [h.relpath for h in engine.search_vector(q.astype(np.float32), k=k, path=path)]
                    assert [n for n in got if n.endswith("_copy.jpg")] == copies[: k - at], (path, k)

    build.sync_index(db, store, index_dir / ANN_FILE)
    with alignsearch.open(index_dir) as engine:
        assert engine.searched_exactly() == 0 and engine.info()["index"]["type"] == "flat"
    check()
    monkeypatch.setattr(engine_module, "EXACT_CHUNK", 2)  # the best kept chunk by chunk: ties kept across chunks
    check()


@pytest.mark.slow  # two index runs of videos
@pytest.mark.parametrize("first,later", [("zebra.mp4", "apple.mp4"), ("apple.mp4", "zebra.mp4")])
def test_copies_of_a_video_tied_at_k_keep_the_moments_of_the_copy_listed_first_by_path(tmp_path, corpus, tiny_model,
                                                                                     first, later):
    """Two copies of a video (each moment of one equal to the other's): a cut at k between them keeps the moment of
    the copy path order lists first, filtered or not."""
    from helpers import make_video

    folder = tmp_path / "videos"
    folder.mkdir()
    clip = make_video(tmp_path / "clip.mp4", [(1, 3), (2, 3)])
    for other in ("img007", "img005"):
        (folder / f"{other}.jpg").write_bytes((corpus / f"{other}.jpg").read_bytes())
    (folder / first).write_bytes(clip.read_bytes())
    ix = tmp_path / "ix"
    index_folders([folder], ix, model=str(tiny_model), device="cpu", workers=0)
    (folder / later).write_bytes(clip.read_bytes())
    index_folders([folder], ix, model=str(tiny_model), device="cpu", workers=0)
    with alignsearch.open(ix) as engine:
        assert engine.info()["index"]["type"] == "flat"
        for query in ({"text": "blue sky"}, {"text": "blue sky", "media": "video"}, {"text": "red", "path": "*.mp4"}):
            every = [(h.relpath, h.t) for h in engine.search(**query, k=10)]
            videos = [n for n, _ in every if n.endswith(".mp4")]
            assert videos.count("apple.mp4") == videos.count("zebra.mp4") >= 2, (query, every)
            at = [n for n, _ in every].index("zebra.mp4") - 1  # the first moment of apple and its copy in zebra follow one another
            assert every[at][0] == "apple.mp4" and every[at][1] == every[at + 1][1], (query, every)
            got = [(h.relpath, h.t) for h in engine.search(**query, k=at + 1)]
            assert got == every[: at + 1], (query, got, every)


@pytest.mark.slow  # two index runs and a server
def test_the_server_answers_copies_tied_at_k_as_the_python_api_does(tmp_path, corpus, tiny_model):
    """`alignsearch serve` cuts copies tied at k as the engine does: the copy path order lists first, filtered or not
    (zebra.jpg indexed first, the order a cut in the index's order would keep)."""
    import json
    from urllib.parse import urlencode

    from helpers import call, start_serve, stop

    ix = copies_index(tmp_path, corpus, tiny_model, "zebra.jpg", "apple.jpg")
    queries = [{"q": "blue sky"}, {"q": "blue sky", "path": "*.jpg"}, {"q": "red", "mode": "hybrid", "path": "*.jpg"},
               {"q": "kite", "mode": "keyword"}]
    with alignsearch.open(ix) as engine:
        expected = {}
        for query in queries:
            args = {("text" if key == "q" else key): value for key, value in query.items()}
            every = [h.relpath for h in engine.search(**args, k=10)]
            k = every.index("apple.jpg") + 1 if "apple.jpg" in every else 1
            expected[json.dumps(query)] = (k, [h.id for h in engine.search(**args, k=k)])
    proc, url = start_serve(ix, "--token", "s3cret")
    try:
        for query in queries:
            k, ids = expected[json.dumps(query)]
            status, _, body = call(url, "/api/search?" + urlencode({**query, "k": k}))
            assert status == 200, body
            assert [h["id"] for h in json.loads(body)["results"]] == ids, query
    finally:
        stop(proc)


@pytest.mark.slow  # an IVF-PQ index copied, copies added to it
def test_copies_straddling_the_ivfpq_candidate_cut_are_all_re_ranked(ivfpq):
    """On IVF-PQ the engine re-ranks the first candidate_count ANN candidates by approximate score (50 for k=5): copies
    (equal vectors: equal codes in one list, one approximate score) straddling that cut were cut in the order FAISS met
    them (the one indexed first kept), so which copy could reach the answer hung on the order files were indexed in.
    Now FAISS is asked for query.TIE_MARGIN more and each copy tied with the last candidate is re-ranked too."""
    from alignsearch.search.engine import Engine
    from alignsearch.search.query import Scorer, unit
    from alignsearch.storage import ann
    from helpers import write_vectors
    from indexer.build import sync_index

    rng = np.random.default_rng(3)
    with alignsearch.open(ivfpq) as engine:
        snap = engine.snap
        assert snap.plan.kind == "ivfpq"
        q = unit(rng.standard_normal(engine.store.dim)).astype(np.float32)
        want = ann.candidate_count(5, snap.plan)
        scores, ids = ann.search(snap.index, q[None, :], want + 20, snap.nprobe)
        at = want - 1  # the last candidate re-ranked, with a score no other candidate shares (so it is the cut)
        while np.isclose(scores[0][at], scores[0][at - 1]) or np.isclose(scores[0][at], scores[0][at + 1]):
            at -= 1
        assert at >= want - 10
        last = int(ids[0][at])
        copy = engine.vector_of(last)
    db, store = write_vectors(ivfpq, np.stack([copy, copy]), ["copy1.jpg", "copy2.jpg"])
    sync_index(db, store, ivfpq / "index.faiss")
    db.dispose()
    with alignsearch.open(ivfpq) as engine:
        snap = engine.snap
        assert snap.plan.kind == "ivfpq"
        copies = {last, *(h.id for h in engine.search_vector(copy, k=3) if h.relpath.startswith("copy"))}
        assert len(copies) == 3
        found = Engine._ann_ids(snap, Scorer([q]), at + 1, snap.nprobe, None)
        assert copies <= set(found), (copies, found[at - 2:])
        assert len(found) <= at + 1 + 2 + 3  # past the cut: the copies (and a chance tie), not the margin's 40


@pytest.mark.slow  # 302 vectors written, an ANN index rebuilt, three searches
@pytest.mark.parametrize("order", [("a", "z"), ("z", "a")])
def test_copies_tied_at_k_past_the_late_fused_depth_on_a_flat_index_are_listed_by_path(indexed_corpus, order):
    """A late-fused query (compose="product") on a flat index scores every vector exactly and cut them at
    max(k, LATE_DEPTH) with no margin: two copies straddling a k of 100 or more kept the one indexed first."""
    from alignsearch.search.engine import ANN_FILE
    from helpers import write_vectors
    from indexer import build

    corpus, index_dir = indexed_corpus
    with alignsearch.open(index_dir) as engine:
        dim = engine.info()["dim"]
    rng = np.random.default_rng(1)
    rows = rng.standard_normal((300, dim))
    copy = rng.standard_normal(dim)
    rows = np.vstack([rows, copy, copy])  # the copies: one vector twice
    rows = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)
    db, store = write_vectors(index_dir, rows, [f"r{j:03d}.jpg" for j in range(300)] + [f"{n}_copy.jpg" for n in order])
    build.sync_index(db, store, index_dir / ANN_FILE)
    db.dispose()
    query = {"text": "blue sky", "image": corpus / "img005.jpg", "compose": "product"}
    with alignsearch.open(index_dir) as engine:
        assert engine.info()["index"]["type"] == "flat"
        full = [h.relpath for h in engine.search(**query, k=400)]
        at = full.index("a_copy.jpg")
        assert full[at + 1] == "z_copy.jpg" and at + 1 >= 100, at  # the cut falls between them, past LATE_DEPTH
        assert [h.relpath for h in engine.search(**query, k=at + 1)][-1] == "a_copy.jpg"


def _with_copies(ix, copy: np.ndarray, n: int, **layout) -> list[int]:
    """n copies of the vector written as copy{j}.jpg and the ANN index brought up to date (in its layout); their ids."""
    from helpers import write_vectors
    from indexer.build import sync_index

    db, store = write_vectors(ix, np.stack([copy] * n), [f"copy{j:02d}.jpg" for j in range(n)])
    sync_index(db, store, ix / "index.faiss", **layout)
    with db.connect() as conn:
        ids = [int(i) for (i,) in conn.exec_driver_sql("SELECT id FROM files WHERE relpath LIKE 'copy%' ORDER BY id")]
    db.dispose()
    assert len(ids) == n
    return ids


@pytest.mark.slow  # an IVF-PQ index copied, copies added to it
@pytest.mark.parametrize("past", ["margin", "margin+1", "twice wider"])
def test_copies_filling_the_tie_margin_past_the_ivfpq_cut_or_more_are_all_re_ranked(ivfpq, past):
    """The vector at the cut and TIE_MARGIN copies of it (one approximate score): FAISS is asked for exactly
    TIE_MARGIN more, so every one is re-ranked. One copy more than the margin was cut in the order FAISS met them (the
    index's, not by name: the one cut was the vector at the cut itself, indexed first, whose name path order lists
    first); now the spent margin is asked again wider (query.margin_spent), twice where the run passes the first
    widening too. The answer is the same list every time: the candidates before the cut and the whole tied run."""
    from alignsearch.search.engine import Engine
    from alignsearch.search.query import TIE_MARGIN, WIDER_MARGIN, Scorer, unit
    from alignsearch.storage import ann
    from helpers import unique_cut

    n = {"margin": TIE_MARGIN, "margin+1": TIE_MARGIN + 1, "twice wider": TIE_MARGIN * WIDER_MARGIN + 1}[past]
    with alignsearch.open(ivfpq) as engine:
        snap = engine.snap
        assert snap.plan.kind == "ivfpq"
        q = unit(np.random.default_rng(3).standard_normal(engine.store.dim)).astype(np.float32)
        at, last = unique_cut(snap, q, ann.candidate_count(5, snap.plan), snap.nprobe)
        copy = engine.vector_of(last)
    copies = {last, *_with_copies(ivfpq, copy, n)}
    assert len(copies) == n + 1
    answers = []
    for _ in range(2):  # opened anew: the same candidates
        with alignsearch.open(ivfpq) as engine:
            snap = engine.snap
            found = Engine._ann_ids(snap, Scorer([q]), at + 1, snap.nprobe, None)
            answers += [found, Engine._ann_ids(snap, Scorer([q]), at + 1, snap.nprobe, None)]
    assert all(a == answers[0] for a in answers)
    found = answers[0]
    assert copies <= set(found), (len(copies & set(found)), len(copies), found[at - 2:])
    assert len(found) == at + 1 + n  # the candidates before the cut, the tied run past it, nothing else
    assert set(found) - copies == set(found[:at])  # what was before the cut is still there


@pytest.mark.slow  # an IVF-PQ index copied, copies added to it, filtered searches
def test_copies_straddling_the_filtered_ivfpq_candidate_cut_are_all_re_ranked(ivfpq, monkeypatch):
    """A filter admitting more than EXACT_BELOW vectors on IVF-PQ searches the ANN index with the filter's ids as a
    FAISS selector (ann.search's allowed, more lists visited: ann.filtered_nprobe): copies straddling its cut are
    all re-ranked as unfiltered ones are."""
    from alignsearch.search.engine import EXACT_BELOW, Engine
    from alignsearch.search.query import Scorer, unit
    from helpers import unique_cut

    calls = []
    real = Engine._ann_ids

    def spied(snap, query, want, nprobe, allowed):
        calls.append((want, nprobe, allowed))
        return real(snap, query, want, nprobe, allowed)

    monkeypatch.setattr(Engine, "_ann_ids", staticmethod(spied))

    def filtered_call(engine, q):
        calls.clear()
        engine.search_vector(q, k=5, path="*.jpg")
        ((want, nprobe, allowed),) = calls
        assert allowed is not None and len(allowed) > EXACT_BELOW and engine.snap.plan.kind == "ivfpq"
        assert nprobe > engine.snap.nprobe  # the selector path visits more lists than an unfiltered search
        return want, nprobe, allowed

    with alignsearch.open(ivfpq) as engine:
        q = unit(np.random.default_rng(5).standard_normal(engine.store.dim)).astype(np.float32)
        want, nprobe, allowed = filtered_call(engine, q)
        assert len(allowed) < int(engine.snap.index.ntotal)  # the filter leaves some out (the .png photos)
        at, last = unique_cut(engine.snap, q, want, nprobe, allowed)
        copy = engine.vector_of(last)
    copies = {last, *_with_copies(ivfpq, copy, 3)}
    with alignsearch.open(ivfpq) as engine:
        _, nprobe, allowed = filtered_call(engine, q)
        assert copies <= set(allowed.tolist())
        found = real(engine.snap, Scorer([q]), at + 1, nprobe, allowed)
        assert copies <= set(found), (copies, found[at - 2:])
        assert len(found) <= at + 1 + 3 + 2  # past the cut: the copies (and a chance tie), not the margin's 40


@pytest.mark.slow  # an IVF-PQ index copied, made two shards, copies added to it
def test_copies_in_different_shards_straddling_the_ivfpq_candidate_cut_are_all_re_ranked(ivfpq):
    """A sharded index (id i in shard i % 2, faiss.IndexShards merging the shards' lists): copies straddling the cut
    in both shards are all re-ranked, and the same candidates come back every time."""
    import faiss

    from alignsearch.search.engine import Engine
    from alignsearch.search.query import Scorer, unit
    from alignsearch.storage import ann, catalog
    from helpers import unique_cut
    from indexer.build import sync_index

    db = catalog.connect(ivfpq / "catalog.db")
    with alignsearch.open(ivfpq) as engine:
        store = engine.store
    sync_index(db, store, ivfpq / "index.faiss", index_shards=2)
    db.dispose()
    with alignsearch.open(ivfpq) as engine:
        snap = engine.snap
        assert isinstance(snap.index, faiss.IndexShards) and snap.plan.kind == "ivfpq"
        q = unit(np.random.default_rng(3).standard_normal(engine.store.dim)).astype(np.float32)
        at, last = unique_cut(snap, q, ann.candidate_count(5, snap.plan), snap.nprobe)
        copy = engine.vector_of(last)
    copies = {last, *_with_copies(ivfpq, copy, 3, index_shards=2)}
    assert {i % 2 for i in copies} == {0, 1}  # in both shards
    with alignsearch.open(ivfpq) as engine:
        snap = engine.snap
        assert isinstance(snap.index, faiss.IndexShards)
        found = Engine._ann_ids(snap, Scorer([q]), at + 1, snap.nprobe, None)
        assert copies <= set(found), (copies, found[at - 2:])
        assert len(found) <= at + 1 + 3 + 2
        assert Engine._ann_ids(snap, Scorer([q]), at + 1, snap.nprobe, None) == found
