"""Issue 25: composition methods (sum, slerp, product, weicom, auto) and one coherent ranking."""

import fnmatch
import json

import numpy as np
import pytest

import alignsearch
from alignsearch.errors import UsageError
from alignsearch.search import engine as engine_module
from alignsearch.search.query import DEFAULT_COMPOSE, Parts, compose, scorer, slerp, unit
from conftest import index_json, make_images, run
from helpers import with_synthetic

METHODS = ("sum", "slerp", "product", "weicom")


def unit_rows(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


@pytest.fixture
def flat(prebuilt, tiny_model):
    """A flat index: 4 images and 2,000 clustered synthetic vectors (built once a session, a copy per test)."""
    return prebuilt.folder("compose-flat", lambda base: with_synthetic(base, tiny_model, 4, 2000, 3, "flat"))[1]


def every_vector(engine):
    snap = engine.snap
    cols = snap.columns(engine.db)
    rows = engine._stored(snap, cols.vec_rows)
    # the engine scores the stored fp16 rows made unit length again (an exact copy scores 1.0): so does the truth
    return cols.ids, rows / np.linalg.norm(rows, axis=1, keepdims=True)


def query_parts(dim, seed, negative=False):
    """An image half near a cluster of the data, a text half that shares part of its direction (a real
    compound query: the text asks for a change, not for something unrelated)."""
    rng = np.random.default_rng(seed)
    image = unit(rng.normal(size=dim))
    text = unit(0.5 * image + rng.normal(size=dim))
    return Parts(text=text, image=image, negative=unit(rng.normal(size=dim)) if negative else None)


def brute_force(engine, parts, method, k, keep=None):
    ids, x = every_vector(engine)
    if keep is not None:
        ids, x = ids[keep(ids)], x[keep(ids)]
    sc = scorer(parts, method)
    if sc.late and method == "weicom":
        sc.calibrate(every_vector(engine)[1])  # fewer vectors than the sample: all of them
    scores = sc.score(x)
    order = np.lexsort((-sc.tiebreak(sc.parts(x)), -scores))[:k]  # ties (a product's zeros) by the mean cosine
    return ids[order].tolist(), scores[order]


def test_slerp_is_the_great_circle_and_sum_is_unchanged():
    i, t = np.eye(4, dtype=np.float32)[0], np.eye(4, dtype=np.float32)[1]
    assert np.allclose(slerp(i, t, 0.5), unit_rows(i + t))
    assert np.allclose(slerp(i, t, 0.0), i, atol=1e-6) and np.allclose(slerp(i, t, 1.0), t, atol=1e-6)
    mid = slerp(i, t, 1 / 3)  # 30 degrees from the image along the circle
    assert np.isclose(mid @ i, np.cos(np.pi / 6), atol=1e-6)
    parts = Parts(text=t, image=i, negative=np.eye(4, dtype=np.float32)[2])
    assert np.allclose(scorer(parts, "sum").vector, compose(t, i, parts.negative))
    # auto with a weight that is not positive is the sum (the others need shares, and refuse it)
    zero = Parts(text=t, image=i, text_weight=0.0)
    assert np.allclose(scorer(zero, "auto").vector, i)
    with pytest.raises(ValueError):
        scorer(zero, "weicom")
    # one half alone is its own vector, whatever the method
    for method in METHODS:
        assert np.allclose(scorer(Parts(text=t), method).vector, t)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["product", "weicom", "slerp", "sum"])
def test_each_method_equals_brute_force_on_a_flat_index(flat, method):
    engine = alignsearch.open(flat)
    dim = engine.store.dim
    for seed in range(5):
        parts = query_parts(dim, seed, negative=seed % 2 == 1)
        hits = engine.search_vector(parts, k=10, compose=method)
        want_ids, want_scores = brute_force(engine, parts, method, 10)
        assert [h.id for h in hits] == want_ids
        assert np.allclose([h.score for h in hits], want_scores, atol=1e-5)
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
        if method in ("product", "weicom"):  # deep: the product's zeros too, ordered by the mean cosine
            deep = engine.search_vector(parts, k=600, compose=method)
            assert [h.id for h in deep] == brute_force(engine, parts, method, 600)[0]
        if method == "product":
            for h in hits:
                assert h.score == pytest.approx(max(h.parts["image"], 0) * max(h.parts["text"], 0), abs=1e-5)
                assert 0 <= h.score <= 1


@pytest.mark.parametrize("method", METHODS)
def test_filters_cutoff_sort_collapse_and_negatives_hold_for_every_method(flat, method):
    engine = alignsearch.open(flat)
    parts = query_parts(engine.store.dim, 7, negative=True)
    # 5% of the index: relpaths 100.jpg .. 199.jpg
    hits = engine.search_vector(parts, k=10, compose=method, path="1??.jpg")
    assert len(hits) == 10 and all(fnmatch.fnmatch(h.relpath, "1??.jpg") for h in hits)
    want, _ = brute_force(engine, parts, method, 10, keep=lambda ids: np.array(
        [fnmatch.fnmatch(r, "1??.jpg") for r in relpaths(engine, ids)]))
    assert [h.id for h in hits] == want
    assert len(engine.search_vector(parts, k=50, compose=method, path="19?.jpg")) == 10  # all there are
    everything = engine.search_vector(parts, k=30, compose=method)
    cut = everything[9].similarity
    kept = engine.search_vector(parts, k=30, compose=method, min_score=cut)
    assert len(kept) >= 10 and all(h.similarity >= cut for h in kept)
    by_path = engine.search_vector(parts, k=10, compose=method, sort="path")
    assert {h.id for h in by_path} == {h.id for h in everything[:10]}
    assert [h.path for h in by_path] == sorted(h.path for h in by_path)
    assert [h.id for h in engine.search_vector(parts, k=10, compose=method, collapse=True)] == \
        [h.id for h in everything[:10]]  # synthetic rows have no near duplicates
    # the negative counts (brute_force above scored it too)
    plain = Parts(text=parts.text, image=parts.image)
    assert [h.id for h in engine.search_vector(plain, k=10, compose=method)] != [h.id for h in everything[:10]]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["product", "weicom"])
def test_late_fusion_recall_on_an_ivfpq_index_with_a_filter(ivfpq, monkeypatch, method):
    """12,000 clustered vectors (IVF-PQ), filters of 1% and 10% and none: recall@10 against the exact fused
    score >= 0.95, through the ANN index with a selector (the exact path for few matches switched off)."""
    engine = alignsearch.open(ivfpq)
    dim = engine.store.dim
    ids, x = every_vector(engine)
    names = np.array(relpaths(engine, ids))
    rng = np.random.default_rng(1)
    monkeypatch.setattr(engine_module, "EXACT_BELOW", 0)
    for glob in ("1??.jpg", "*0.jpg", None):
        keep = np.array([glob is None or fnmatch.fnmatch(r, glob) for r in names])
        recalls = []
        for _ in range(20):
            a, b = x[rng.integers(len(x))], x[rng.integers(len(x))]  # two points of the data, maybe two clusters
            parts = Parts(image=unit(a + 0.3 * unit(rng.normal(size=dim))), text=unit(b + a))
            hits = engine.search_vector(parts, k=10, compose=method, path=glob)
            assert len(hits) == 10 and all(glob is None or fnmatch.fnmatch(h.relpath, glob) for h in hits)
            sc = scorer(parts, method)
            if method == "weicom":
                sc.calibrate(engine._calibration_sample(engine.snap))
            scores = sc.score(x[keep])
            truth = set(ids[keep][np.argsort(-scores)[:10]].tolist())
            recalls.append(len(truth & {h.id for h in hits}) / 10)
        assert np.mean(recalls) >= 0.95, (glob, recalls)


def relpaths(engine, ids):
    from alignsearch.storage import catalog

    with engine.db.connect() as conn:
        rows = catalog.get_files(conn, ids.tolist())
    return [rows[int(i)].relpath for i in ids]


def query_json(ix, *args):
    return json.loads(run("query", *args, "--index", ix, "--json").stdout)


@pytest.mark.slow
def test_auto_mode_lets_no_file_name_override_the_model(tmp_path, tiny_model):
    """`query "red car on beach"` must not put red_circle.png first because "red" is in its name: in auto mode
    only captions and tags are keyword evidence; the hits come in the order of the score they print."""
    root, ix = tmp_path / "photos", tmp_path / "ix"
    images = make_images(root, 9)
    images[4].rename(root / "red_circle.png")
    index_json(ix, root, "--model", tiny_model, "--device", "cpu")
    for text in ("red car on beach", "a red sunset", "red shoes", "red roses in a vase"):
        vector = query_json(ix, text, "--mode", "vector", "-k", "9")["results"]
        if not vector[0]["path"].endswith("red_circle.png"):
            break
    else:
        pytest.skip("the tiny model ranks red_circle.png first for every probe text")
    auto = query_json(ix, text, "-k", "9")["results"]
    assert [h["path"] for h in auto] == [h["path"] for h in vector]
    assert [h["score"] for h in auto] == sorted((h["score"] for h in auto), reverse=True)
    plan = query_json(ix, text, "--explain")["plan"]
    assert plan["keyword_matches"] >= 1 and plan["caption_or_tag_matches"] == 0 and plan["ranking"] == "vector"
    # asked for, file names are keywords
    hybrid = query_json(ix, text, "--mode", "hybrid", "-k", "9")["results"]
    assert hybrid[0]["path"].endswith("red_circle.png") and hybrid[0]["parts"]["keyword_rank"] == 1


@pytest.fixture
def captioned(prebuilt, tiny_model):
    """5 images, one with a caption holding a rare word, and 300 synthetic vectors (so the captioned one can
    lie beyond the similarity list's fusion depth)."""

    def build(base):
        from helpers import add_synthetic
        from indexer.build import sync_index

        root, ix = base / "photos", base / "ix"
        images = make_images(root, 5)
        images[2].with_suffix(".txt").write_text("Zanzibar the tabby asleep on the sofa\n")
        index_json(ix, root, "--model", tiny_model, "--device", "cpu")
        db, store = add_synthetic(ix, 300, alignsearch.open(ix).store.dim, seed=2)
        sync_index(db, store, ix / "index.faiss")
        db.dispose()
        return ix, images[2].name

    return prebuilt.folder("compose-captioned", build)[1]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["hybrid", "auto"])
def test_explain_names_the_ranking_the_hits_were_scored_by(captioned, mode):
    """`query beach --format png --explain` said `ranking=hybrid (RRF), score=1/(60 + similarity rank) + ...`
    while every hit printed its cosine: the filter left out the only caption match, so the search ranked by
    similarity. The plan must name the ranking the hits carry: the keyword matches among the filter's images."""
    from alignsearch.search.request import build as build_request

    ix, cat = captioned
    engine = alignsearch.open(ix)
    fused = build_request(text="zanzibar sunset", k=5, mode=mode, explain=True)
    assert engine.explain(fused)["ranking"] == "hybrid (RRF)"
    assert engine.run(fused)[0].parts["keyword_rank"] == 1
    others = build_request(text="zanzibar sunset", k=5, mode=mode, explain=True, where=f'not path glob "{cat}"')
    hits = engine.run(others)
    assert hits and all(h.parts is None and h.score == h.similarity for h in hits)  # ranked by similarity
    plan = engine.explain(others)
    assert plan["ranking"] == "vector" and plan["score"] == "similarity"
    engine.close()


@pytest.mark.parametrize("mode", ["hybrid", "auto"])
def test_hybrid_prints_the_fused_score_best_first(captioned, mode):
    ix, cat = captioned
    engine = alignsearch.open(ix)
    hits = engine.search(text="zanzibar sunset", k=20, mode=mode)
    assert hits[0].relpath == cat and hits[0].parts["keyword_rank"] == 1
    assert hits[0].score > hits[1].score  # a unique caption match cannot tie the best vector-only hit
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    best_vector_only = max((h for h in hits if h.parts["keyword_rank"] is None), key=lambda h: h.similarity)
    assert best_vector_only.score == pytest.approx(1 / 61)
    # the similarity stays available and is what --min-score cuts on
    vector = {h.id: h.similarity for h in engine.search(text="zanzibar sunset", k=400, mode="vector")}
    assert all(h.similarity == pytest.approx(vector[h.id], abs=1e-6) for h in hits)
    cut = sorted(h.similarity for h in hits)[10]
    kept = engine.search(text="zanzibar sunset", k=20, mode=mode, min_score=cut)
    assert kept and all(h.similarity >= cut for h in kept)
    assert [h.score for h in kept] == sorted((h.score for h in kept), reverse=True)


def test_keyword_mode_prints_its_rank_score(captioned):
    ix, cat = captioned
    hits = alignsearch.open(ix).search(text="zanzibar", k=5, mode="keyword")
    assert [h.relpath for h in hits] == [cat] and hits[0].score == pytest.approx(1 / 61)
    assert hits[0].similarity is not None and -1 <= hits[0].similarity <= 1


@pytest.mark.slow
def test_one_ideograph_typed_finds_the_caption_holding_it_in_keyword_and_auto_mode(prebuilt, tiny_model):
    """A Japanese user typing `海` (sea) got no keyword hit: the query parser dropped a lone ideograph as it drops a
    lone Latin letter. Through the engine and the CLI, as indexed from a sidecar caption."""

    def build(base):
        root, ix = base / "photos", base / "ix"
        images = make_images(root, 3)
        images[1].with_suffix(".txt").write_text("青い海と白い砂浜\n")
        images[2].with_suffix(".txt").write_text("東京駅の桜\n")
        index_json(ix, root, "--model", tiny_model, "--device", "cpu")
        return ix, images[1].name, images[2].name

    ix, sea, station = prebuilt.folder("compose-ideograph", build)[1]
    engine = alignsearch.open(ix)
    assert [h.relpath for h in engine.search(text="海", k=5, mode="keyword")] == [sea]
    assert [h.relpath for h in engine.search(text="駅", k=5, mode="keyword")] == [station]
    assert sea in [h.relpath for h in engine.search(text="海", k=3, mode="auto") if h.parts["keyword_rank"] is not None]
    assert [h["relpath"] for h in query_json(ix, "桜", "--mode", "keyword")["results"]] == [station]


@pytest.mark.slow
def test_compose_on_the_cli_with_explain(flat, tmp_path):
    image = make_images(tmp_path / "q", 1, seed=9)[0]
    for method in ("product", "slerp", "sum", "weicom"):
        out = query_json(flat, "a red bus", "--image", image, "--compose", method, "--explain", "-k", "5")
        assert out["plan"]["compose"] == method and out["query"]["compose"] == method
        scores = [h["score"] for h in out["results"]]
        assert len(scores) == 5 and scores == sorted(scores, reverse=True)
        if method == "product":
            assert out["plan"]["path"].startswith("exact")  # a flat index: every vector scored
            for h in out["results"]:
                assert h["score"] == pytest.approx(max(h["parts"]["image"], 0) * max(h["parts"]["text"], 0), abs=1e-5)
    auto = query_json(flat, "a red bus", "--image", image, "--explain", "-k", "5")
    assert auto["plan"]["compose"] == DEFAULT_COMPOSE
    chosen = query_json(flat, "a red bus", "--image", image, "--compose", DEFAULT_COMPOSE, "-k", "5")["results"]
    assert [h["id"] for h in auto["results"]] == [h["id"] for h in chosen]
    assert query_json(flat, "a red bus", "--explain")["plan"]["compose"] is None  # one half: nothing to compose
    text = run("query", "a red bus", "--image", image, "--compose", "product", "--explain", "-k", "2",
               "--index", flat).output
    assert "image " in text and "text " in text and "similarity " in text
    out = run("query", "x", "--image", image, "--compose", "median", "--index", flat, code=2).output
    assert "Traceback" not in out


def test_the_python_api_takes_compose(flat, tmp_path):
    image = make_images(tmp_path / "q", 1, seed=9)[0]
    engine = alignsearch.open(flat, device="cpu")
    parts = engine.embed_parts("a red bus", image)
    for method in METHODS:
        via_search = engine.search(text="a red bus", image=image, k=5, compose=method)
        assert [h.id for h in via_search] == [h.id for h in engine.search_vector(parts, k=5, compose=method)]
    with pytest.raises(alignsearch.AlignSearchError):
        engine.search(text="x", image=image, compose="median")


@pytest.mark.parametrize("method", ["slerp", "product", "weicom"])
def test_a_weight_the_method_cannot_use_is_bad_usage_before_encoding(flat, tmp_path, monkeypatch, method):
    """`query --image I "x" --text-weight 0 --compose product` said exit 6 ("unusable input") after loading the
    model and encoding both halves, where the README's table makes a weight out of its range exit 2 (UsageError,
    HTTP 400): refused on entry, for the CLI and the Python API alike, and for embed_parts' halves."""
    image = make_images(tmp_path / "q", 1, seed=9)[0]
    engine = alignsearch.open(flat, device="cpu")
    parts = engine.embed_parts("a red bus", image, text_weight=0)
    monkeypatch.setattr(engine_module.Engine, "_parts", lambda *a, **kw: pytest.fail("encoded before the check"))
    for weights in ({"text_weight": 0}, {"image_weight": -1}):
        with pytest.raises(UsageError, match="positive"):
            engine.search(text="a red bus", image=image, compose=method, **weights)
    with pytest.raises(UsageError, match="positive"):
        engine.search_vector(parts, k=5, compose=method)
    # auto falls back to the weighted sum, and one half alone needs no share
    assert engine.search_vector(parts, k=3, compose="auto")
    out = run("query", "x", "--image", image, "--text-weight", "0", "--compose", method, "--index", flat,
              code=2).output
    assert "positive" in out and "Traceback" not in out


def test_explain_text_leaves_out_a_part_a_hit_has_none_of(capsys):
    """`query --explain` printed `keyword_rank None` under a hit no keyword matched (Python's None; --json: null)."""
    from alignsearch.surfaces.cli import _print_hits

    hits = [{"path": "/p/a.jpg", "score": 0.03, "similarity": 0.31, "parts": {"vector_rank": 1, "keyword_rank": None}},
            {"path": "/p/b.jpg", "score": 0.02, "similarity": 0.12, "parts": {"vector_rank": 2, "keyword_rank": 1}}]
    _print_hits({"text": "red"}, hits, as_json=False, explain=True)
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["similarity", "0.31,", "vector_rank", "1"]
    assert lines[3].split() == ["similarity", "0.12,", "vector_rank", "2,", "keyword_rank", "1"]
