"""Auto mode's fusion of similarity and keyword evidence, rrf by default (query.AUTO_FUSION), and the fusions
bench_auto.py measures against it, belief and the gate (alignsearch/search/query.py: keyword_fusion, fuse_candidates,
fuse_hits, gate): pure functions, tested without a model; and through the engine on synthetic vectors."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

import alignsearch
from alignsearch.search.request import build as build_request
from alignsearch.search import engine as engine_module
from alignsearch.search.query import GATE_Z, KEYWORD_SHARE, NULL_SD_FLOOR, RRF_K, belief, fuse_hits, gate, \
    gated_fusion, keyword_fusion, near_equal, null_prompts, null_z, settle_ties, shared_ranks, Scorer
from alignsearch.storage import catalog
from alignsearch.storage.paths import ANN_FILE, DB_FILE
from helpers import vector_index


def confident(n=48, relevant=4, seed=0):
    """Similarities of a model that singles out `relevant` images (ids 0..relevant-1) well above the rest."""
    rng = np.random.default_rng(seed)
    sims = rng.normal(0.0, 0.1, n)
    sims[:relevant] = 0.6 + rng.normal(0.0, 0.02, relevant)
    return {i: float(s) for i, s in enumerate(sims)}


def flat(n=48, low=8):
    """Similarities of a model that singles out nothing for the query: most images tie (its belief is spread
    over them), the last `low` lie below."""
    return {i: 0.2 if i < n - low else 0.1 for i in range(n)}


def test_belief_ranks_a_wrong_caption_behind_what_the_model_singles_out_where_rrf_the_default_ranks_it_first():
    sims = confident()
    wrong = min(sims, key=sims.get)  # the model's last image carries the query's word
    ranked = [i for i, _ in fuse_hits(sims, [wrong], method="belief")]
    assert ranked[0] in {0, 1, 2, 3} and ranked[1] in {0, 1, 2, 3}
    # nudged up from the bottom to among the model's choice (whose belief four images share), not above it
    assert wrong in ranked[2:5] and set(ranked[:5]) == {0, 1, 2, 3, wrong}
    # reciprocal rank fusion (auto's and hybrid's) puts it first; without a method fuse_hits fuses as auto does
    assert [i for i, _ in fuse_hits(sims, [wrong], method="rrf")][0] == wrong
    assert fuse_hits(sims, [wrong]) == fuse_hits(sims, [wrong], method=engine_module.AUTO_FUSION)
    assert engine_module.AUTO_FUSION == "rrf"


def test_belief_ranks_a_keyword_match_first_where_the_model_has_no_signal():
    sims = flat()
    for caption in (47, 17, 0):
        ranked = fuse_hits(sims, [caption], method="belief")
        assert ranked[0][0] == caption
        rest = [i for i, _ in ranked[1:]]
        assert rest == sorted(rest, key=lambda i: (-sims[i], i))  # the others keep the model's order


def test_belief_lifts_the_model_choice_a_true_caption_agrees_with():
    sims = confident()
    second = sorted(sims, key=lambda i: -sims[i])[1]
    ranked = fuse_hits(sims, [second], method="belief")
    assert ranked[0][0] == second


def test_belief_scores_give_the_order_and_are_the_belief_plus_the_keyword_share():
    sims = confident(seed=3)
    keyword = [40, 2, 41]
    ranked = fuse_hits(sims, keyword, method="belief")
    scores = [s for _, s in ranked]
    assert scores == sorted(scores, reverse=True)
    ids = list(sims)
    beliefs = dict(zip(ids, belief(np.array([sims[i] for i in ids]))))
    for i, s in ranked:
        share = KEYWORD_SHARE * (RRF_K + 1) / (RRF_K + keyword.index(i) + 1) if i in keyword else 0.0
        assert s == pytest.approx(beliefs[i] + share)
    assert len(ranked) == len(sims) and {i for i, _ in ranked} == set(sims)


def test_belief_ignores_the_similarities_scale_and_offset_and_leaves_the_rest_to_none():
    s = np.array([0.1, 0.3, 0.25, -0.2, 0.31])
    b = belief(s)
    assert 0 < b.sum() < 1 and int(np.argmax(b)) == 4
    assert belief(3 * s - 0.5) == pytest.approx(b)  # a model with other cosine ranges believes the same
    equal = belief(np.full(6, 0.4))  # nothing to choose between: nothing believed
    assert np.all(equal == equal[0]) and equal.sum() < 1e-4
    assert belief(np.array([0.9, 0.1, 0.1, 0.1])).max() <= 0.5  # 4 candidates: the best is at most half believed
    assert belief(np.zeros(0)).shape == (0,)


def test_keyword_fusion_refuses_an_unknown_method():
    s = np.array([0.1, 0.3, 0.25, -0.2, 0.31])
    with pytest.raises(ValueError, match="fusion must be one of"):
        keyword_fusion(s, np.arange(1, 6), np.zeros(5, np.int64), method="mean")


def test_belief_does_not_let_a_handful_of_candidates_outweigh_a_keyword_match():
    """Five images, a random model: its similarities are spread, but five of them say nothing, and belief too
    ranks the caption match first (as rrf does in the search filters' library, tests/test_search_filters.py)."""
    sims = dict(enumerate([0.3105, 0.1002, -0.0382, -0.1608, -0.3682]))
    assert fuse_hits(sims, [4], method="belief")[0][0] == 4


def test_without_keyword_matches_the_order_is_the_similarity_order():
    sims = confident(seed=5)
    for method in ("belief", "rrf"):
        assert [i for i, _ in fuse_hits(sims, [], method=method)] == sorted(sims, key=lambda i: (-sims[i], i))


N_WRONG = 40


def _wrong_caption_index(tmp_path):
    """N_WRONG synthetic vectors with no ANN index (the engine scores the committed vectors exactly); the query
    is the first stored vector, and the caption "cat mug" is on the vector least like it. (query, ids by
    vector row, that row, N_WRONG)."""
    store = vector_index(tmp_path, N_WRONG, 64, seed=1)
    (tmp_path / ANN_FILE).unlink()
    x = store.get(np.arange(N_WRONG)).astype(np.float32)
    query = x[0] / np.linalg.norm(x[0])
    worst = int(np.argmin(x @ query))
    db = catalog.connect(tmp_path / DB_FILE)
    with db.begin() as conn:
        ids = {r.vec_row: r.id for r in catalog.get_files(conn, range(1, N_WRONG + 1)).values()}
        catalog.set_photo(conn, ids[worst], f"{worst:07d}.jpg", {"caption": "cat mug"})
    db.dispose()
    return query, ids, worst, N_WRONG


def test_the_engine_in_auto_ranks_a_wrong_caption_first_with_rrf_and_behind_the_models_choice_with_belief(
        tmp_path, monkeypatch):
    """Synthetic vectors: the query is one stored vector (what the model singles out); the caption holding
    the query's word is on the vector least like it. Auto with the belief fusion (AUTO_FUSION set, as
    bench_auto.py does) keeps the model's choice first; auto's default (RRF, as hybrid) ranks the caption
    first, and explain says it ranks by RRF."""
    query, ids, worst, n = _wrong_caption_index(tmp_path)
    engine = alignsearch.open(tmp_path)
    monkeypatch.setattr(engine_module, "AUTO_FUSION", "belief")
    hits = engine.search_vector(query, k=10, text="cat", mode="auto")
    assert hits[0].id == ids[0] and hits[1].id == ids[worst]  # nudged up from the bottom, behind the model's choice
    assert hits[1].parts["keyword_rank"] == 1 and hits[1].parts["keyword_share"] == pytest.approx(KEYWORD_SHARE)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert all(h.score == pytest.approx(h.parts["belief"] + h.parts["keyword_share"], abs=2e-6) for h in hits)
    assert engine.search_vector(query, k=10, text="cat", mode="hybrid")[0].id == ids[worst]  # hybrid is RRF
    monkeypatch.undo()  # the default: reciprocal rank fusion
    assert engine_module.AUTO_FUSION == "rrf"
    hits = engine.search_vector(query, k=10, text="cat", mode="auto")
    assert hits[0].id == ids[worst] and hits[0].parts == {"similarity_rank": n, "keyword_rank": 1}
    plan = engine.explain(build_request(text="cat", k=10))
    assert plan["mode"] == "auto" and plan["caption_or_tag_matches"] == 1
    assert plan["ranking"] == "hybrid (RRF)" and plan["score"] == "1/(60 + similarity rank) + 1/(60 + keyword rank)"
    assert engine.explain(build_request(text="cat", k=10, mode="hybrid"))["ranking"] == "hybrid (RRF)"
    engine.close()


def test_null_z_measures_the_best_cosine_in_null_sds_with_a_floor():
    nulls = np.array([0.40, 0.44, 0.42, 0.46, 0.38])
    assert null_z(0.42, nulls) == pytest.approx(0.0)
    assert null_z(0.42 + 3 * nulls.std(), nulls) == pytest.approx(3.0)
    same = np.full(8, 0.5)  # every null query encoded alike (all unknown to the tokenizer): the floor scales
    assert null_z(0.5 + 2 * NULL_SD_FLOOR, same) == pytest.approx(2.0)
    assert null_z(0.3, nulls) < 0


def test_null_prompts_are_fixed_meaningless_strings():
    prompts = null_prompts()
    assert prompts == null_prompts() and prompts[0] == "" and len(set(prompts)) == len(prompts)
    assert all(p.isalpha() and p.islower() and 3 <= len(p) <= 10 for p in prompts[1:])


def test_the_gate_lets_keyword_evidence_lead_only_where_the_model_does_not_recognise_the_query():
    sims = confident()
    ids = list(sims)
    s = np.array([sims[i] for i in ids])
    vector_rank = np.empty(len(ids), np.int64)
    vector_rank[np.argsort(-s, kind="stable")] = np.arange(1, len(ids) + 1)
    wrong = int(np.argmin(s))
    keyword_rank = np.where(np.arange(len(ids)) == wrong, 1, 0)
    unknown = gated_fusion(GATE_Z - 0.5, s, vector_rank, keyword_rank)
    known = gated_fusion(GATE_Z + 0.5, s, vector_rank, keyword_rank)
    assert int(np.argmax(unknown)) == wrong  # as reciprocal rank fusion: the caption leads
    assert int(np.argmax(known)) in {0, 1, 2, 3}  # the model's confident choice leads, the caption is nudged
    assert unknown == pytest.approx(keyword_fusion(s, vector_rank, keyword_rank, "rrf"))
    assert known == pytest.approx(keyword_fusion(s, vector_rank, keyword_rank, "belief"))
    assert gate(GATE_Z) == "belief" and gate(GATE_Z - 1e-9) == "rrf" and gate(0.0, threshold=-1.0) == "belief"
    assert [i for i, _ in fuse_hits(sims, [wrong], method="gate", z=0.0)][0] == wrong


@pytest.mark.parametrize("z", [-5.0, 0.0, GATE_Z, 50.0])
def test_the_gate_keeps_the_similarity_order_without_keyword_matches(z):
    sims = confident(seed=7)
    assert [i for i, _ in fuse_hits(sims, [], method="gate", z=z)] == sorted(sims, key=lambda i: (-sims[i], i))


@pytest.mark.slow  # 3.5 s: an index built and null queries encoded
def test_the_engine_with_the_gate_fusion_gates_on_the_query_best_cosine_against_the_null_queries(tmp_path, monkeypatch):
    """The engine's wiring of the gate (AUTO_FUSION set to it, as bench_auto.py does): z is the best candidate's similarity against the null queries' best cosines
    (set here, as a model would give them), and picks the fusion. A wrong caption on the vector least like the
    query: first where the query stands no higher than the nulls (rrf), behind the model's choice where it
    stands far above them (belief)."""
    query, ids, worst, n = _wrong_caption_index(tmp_path)
    monkeypatch.setattr(engine_module, "AUTO_FUSION", "gate")
    engine = alignsearch.open(tmp_path)
    best = 1.0  # the query is a stored vector
    for nulls, leads in ((np.array([0.99, 1.0, 1.01]), ids[worst]), (np.array([0.2, 0.3, 0.25]), ids[0])):
        engine._nulls = (engine.snap, nulls)  # the snapshot's cached null calibration
        hits = engine.search_vector(query, k=10, text="cat", mode="auto")
        assert hits[0].id == leads
        assert all(h.parts["model_z"] == pytest.approx(null_z(best, nulls), abs=1e-3) for h in hits)
    assert ("belief" in hits[0].parts) and engine.search_vector(query, k=10, text="dog", mode="auto")[0].id == ids[0]
    engine._nulls = None  # no calibration yet, and no model to calibrate with (a synthetic index): keyword evidence leads
    hits = engine.search_vector(query, k=10, text="cat", mode="auto")
    assert hits[0].id == ids[worst] and "model_z" not in hits[0].parts and engine._nulls[1] is None
    engine.close()


N_TIED = 36


def _tied_index(tmp_path):
    """N_TIED synthetic vectors, each of 12 stored three times (equal vectors: equal similarities, the ties),
    with the query's word in the captions of some, two of them one vector's copies. (query, ids by vector row)."""
    rng = np.random.default_rng(2)
    base = rng.standard_normal((N_TIED // 3, 32))
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    vector_index(tmp_path, N_TIED, 32, rows=np.repeat(base, 3, axis=0))
    (tmp_path / ANN_FILE).unlink()
    query = base[0] + 0.8 * base[5] + 0.3 * rng.standard_normal(32)
    db = catalog.connect(tmp_path / DB_FILE)
    with db.begin() as conn:
        ids = {r.vec_row: r.id for r in catalog.get_files(conn, range(1, N_TIED + 1)).values()}
        for row, caption in ((4, "cat"), (5, "cat"), (16, "a cat on a mat"), (17, "cat mug"), (30, "our cat at home"),
                             (33, "cat"), (35, "black cat, white cat")):
            catalog.set_photo(conn, ids[row], f"{row:07d}.jpg", {"caption": caption})
    db.dispose()
    return (query / np.linalg.norm(query)).astype(np.float32), ids


@pytest.mark.parametrize("mode,fusion,nulls", [("auto", "rrf", None), ("auto", "belief", None),
                                               ("auto", "gate", "far below"), ("auto", "gate", "level"),
                                               ("auto", "gate", "none"), ("hybrid", "belief", None)])
def test_the_engine_orders_fused_candidates_as_fuse_hits_does_ties_included(tmp_path, monkeypatch, mode, fusion,
                                                                             nulls):
    """The engine's auto mode and fuse_hits on the same candidates (every stored vector, k = all of them): the
    same order and scores for each fusion, the gate on both sides of GATE_Z and with no null scale (rrf), with
    equal similarities (copies of one vector) and, in belief, equal scores among them; hybrid keeps rrf whatever
    AUTO_FUSION says. Equal similarities share one similarity rank (shared_ranks; they took ranks in the engine's
    candidate order, the higher id first), and hits equal in score and similarity are listed by name (settle_ties)."""
    query, ids = _tied_index(tmp_path)
    monkeypatch.setattr(engine_module, "AUTO_FUSION", fusion)
    engine = alignsearch.open(tmp_path)
    best = float(np.max(engine.snap.store.get(np.arange(N_TIED)).astype(np.float32) @ query))
    null_best = {"far below": best - np.array([0.3, 0.35, 0.4]), "level": best + np.array([-0.01, 0.0, 0.01])}.get(nulls)
    engine._nulls = (engine.snap, null_best)  # the null calibration as a model would give it (none: no model)
    hits = engine.search_vector(query, k=N_TIED, text="cat", mode=mode)
    assert len(hits) == N_TIED
    sims = {h.id: h.similarity for h in sorted(hits, key=lambda h: h.parts["similarity_rank"])}
    keyword = [h.id for h in sorted(hits, key=lambda h: h.parts["keyword_rank"] or N_TIED + 1)][:7]
    assert all(h.parts["keyword_rank"] for h in hits if h.id in keyword) and len(set(sims.values())) == N_TIED // 3
    z = None if null_best is None else null_z(max(sims.values()), null_best)
    if nulls in ("far below", "level"):
        assert gate(z) == ("belief" if nulls == "far below" else "rrf") and abs(z - GATE_Z) > 0.5
    # the keyword ranks the engine gave (equal bm25: one rank, query.keyword_ranks), as fuse_hits takes bm25 scores
    bm25 = [next(h.parts["keyword_rank"] for h in hits if h.id == i) for i in keyword]
    expected = fuse_hits(sims, keyword, method=fusion if mode == "auto" else "rrf", z=z, bm25=bm25)
    paths = {h.id: h.path for h in hits}  # candidates equal in score and similarity come by name
    keys = (np.array([s for _, s in expected]), np.array([sims[i] for i, _ in expected]))
    expected = [expected[n] for n in settle_ties(range(len(expected)), keys, lambda n: paths[expected[n][0]])]
    assert [h.id for h in hits] == [i for i, _ in expected]
    assert [h.score for h in hits] == pytest.approx([s for _, s in expected], rel=1e-12, abs=0)
    tied = [(a.id, b.id) for a, b in zip(hits, hits[1:]) if (a.score, a.similarity) == (b.score, b.similarity)]
    row_of = {i: row for row, i in ids.items()}  # rows 3m, 3m+1, 3m+2 hold one vector
    # copies with no keyword match tie on both, in every fusion: they share one similarity rank (shared_ranks); so do
    # copies with one caption (rows 4 and 5, "cat": equal in bm25, one keyword rank, query.keyword_ranks)
    assert tied and all(row_of[a] // 3 == row_of[b] // 3 for a, b in tied)
    groups = Counter((row_of[h.id] // 3, h.parts["keyword_rank"]) for h in hits)
    cat = next(h.parts["keyword_rank"] for h in hits if row_of[h.id] == 4)
    assert groups[(1, cat)] == 2 and len(tied) == sum(n - 1 for n in groups.values())
    engine.close()


def test_settle_ties_orders_only_runs_equal_in_every_key_by_name():
    """Candidates 1 and 3 tie in score, similarity and tiebreak: by name. 0 and 2 tie in score alone (a product's
    zeros, told apart by the tiebreak): as ranked, as are 4 and 5 (equal score, similarity apart)."""
    scores = np.array([0.0, 0.5, 0.0, 0.5, 0.2, 0.2], np.float32)
    similarity = np.array([0.1, 0.5, 0.1, 0.5, 0.3, 0.2], np.float32)
    tiebreak = np.array([0.4, 0.5, 0.1, 0.5, 0.3, 0.2], np.float32)
    names = {0: "a", 1: "z", 2: "b", 3: "m", 4: "y", 5: "c"}
    assert settle_ties([1, 3, 4, 5, 0, 2], (scores, similarity, tiebreak), names.get) == [3, 1, 4, 5, 0, 2]
    assert settle_ties([], (scores,), names.get) == []


def test_equal_stored_vectors_score_exactly_alike_wherever_they_stand():
    """A float32 product gave a row and its copy at the end of a small matrix cosines a last bit apart (in about half
    of such matrices): the copies' order was that bit's. parts(exact=True) sums the near-equal ones in float64, for
    each probe of a late fusion too; a row merely near another keeps its own cosine."""
    rng = np.random.default_rng(0)
    unequal = 0
    for n in list(range(2, 12)) * 8:
        stored = rng.standard_normal((n, 640)).astype(np.float16).astype(np.float32)
        stored /= np.linalg.norm(stored, axis=1, keepdims=True)
        stored[-1] = stored[0]
        probes = [p / np.linalg.norm(p) for p in rng.standard_normal((2, 640)).astype(np.float32)]
        # and probes close to the copied row (cosines ~0.9 and ~0.99, an image query's copies), where the float32
        # steps are larger: copies 4 steps apart were past an absolute NEAR alone
        close = [stored[0] + s * p for s in (0.5, 0.15) for p in probes[:1]]
        probes += [(c / np.linalg.norm(c)).astype(np.float32) for c in close]
        for scorer in (Scorer(probes[:1]), Scorer(probes[:2], method="product"), Scorer(probes[2:3]),
                       Scorer(probes[3:4]), Scorer(probes[2:], method="product")):
            fast, exact = scorer.parts(stored), scorer.parts(stored, exact=True)
            unequal += int((fast[0] != fast[-1]).any())
            assert (exact[0] == exact[-1]).all() and exact.dtype == np.float32
            assert np.abs(exact - fast).max() < 1e-6
    assert unequal > 0  # the float32 product does differ here: the test can fail


def test_near_equal_marks_the_values_within_near_of_another():
    """0 and 2 a float32 step apart, 3 equal to 0: all three. 1 and 4 1e-6 apart (not a product's last bits):
    neither. NaN: never."""
    values = np.array([0.5, 0.1, 0.5 + 5e-8, 0.5, 0.1 + 1e-6, np.nan], np.float32)
    assert near_equal(values).tolist() == [True, False, True, True, False, False]
    high = np.array([0.9, 0.9 + 2.4e-7, 0.8, 0.8 + 2e-6], np.float32)  # 4 float32 steps apart near 0.9: near
    assert near_equal(high).tolist() == [True, True, False, False]
    assert near_equal(values[:1]).tolist() == [False] and near_equal(values[:0]).tolist() == []


def test_shared_ranks_give_candidates_equal_in_both_keys_one_rank():
    """Candidates 1 and 3 are equal in similarity and tiebreak: one rank (2, the best of their run), the next 4.
    0 and 4 are equal in similarity alone: the tiebreak ranks them. Before, 1 and 3 took 2 and 3 in the candidates'
    order, so a copy's fused score depended on which copy the ANN listed first."""
    similarity = np.array([0.5, 0.7, 0.9, 0.7, 0.5], np.float32)
    tiebreak = np.array([0.1, 0.7, 0.9, 0.7, 0.2], np.float32)
    assert shared_ranks(similarity, tiebreak).tolist() == [5, 2, 1, 2, 4]
    assert shared_ranks(np.zeros(0), np.zeros(0)).tolist() == []
    fused = fuse_hits({10: 0.7, 11: 0.9, 12: 0.7}, keyword=[], method="rrf")
    assert fused[0] == (11, 1 / 61) and fused[1][1] == fused[2][1] == 1 / 62


def test_tied_runs_are_the_runs_equal_in_every_key():
    from alignsearch.search.query import tied_runs

    scores = np.array([0.5, 0.9, 0.5, 0.5, 0.1], np.float32)
    similarity = np.array([0.3, 0.9, 0.3, 0.4, 0.1], np.float32)
    order = np.array([1, 3, 0, 2, 4])
    assert tied_runs(order, (scores, similarity)) == [(2, 4)]  # 0 and 2; 3 differs in similarity
    assert tied_runs(order[:1], (scores,)) == [] and tied_runs(order, (scores,)) == [(1, 4)]


def test_keyword_matches_equal_in_bm25_share_the_best_rank_of_their_run():
    """Matches best first by bm25 (lower is better): equal scores (copies with one caption) share one rank (2, then
    the next 4). Before, they took 2 and 3 in the keyword index's order (their ids'), so the copy indexed first
    fused higher. The list's order is kept: only ranks are given."""
    from alignsearch.search.query import keyword_ranks

    assert keyword_ranks([-3.5, -2.0, -2.0, -1.0, 0.0, 0.0]).tolist() == [1, 2, 2, 4, 5, 5]
    assert keyword_ranks([-1.0, -1.0, -1.0]).tolist() == [1, 1, 1]
    assert keyword_ranks([]).tolist() == [] and keyword_ranks([-2.0]).tolist() == [1]
    # fuse_hits with bm25: the two copies (equal similarity, equal bm25) fuse to one score
    fused = dict(fuse_hits({1: 0.5, 2: 0.5, 3: 0.9}, [2, 1], method="rrf", bm25=[-2.0, -2.0]))
    assert fused[1] == fused[2]
    apart = dict(fuse_hits({1: 0.5, 2: 0.5, 3: 0.9}, [2, 1], method="rrf"))  # no bm25: a rank each, in list order
    assert apart[2] == fused[2] > apart[1]


def test_the_keyword_list_is_cut_after_the_matches_tied_with_the_last_one_kept():
    """The first `limit` matches, and those after equal in bm25 to the last of them (copies with one caption): the
    keyword index cut them in the order of their ids."""
    from alignsearch.search.query import through_ties

    assert through_ties([-3.0, -2.0, -2.0, -2.0, -1.0], 2) == 4
    assert through_ties([-3.0, -2.0, -1.0], 2) == 2 and through_ties([-3.0, -2.0], 5) == 2
    assert through_ties([], 3) == 0 and through_ties([-1.0, -1.0], 0) == 0


def test_a_cut_keeps_the_scores_that_may_tie_with_the_last_one_kept():
    """A flat index's candidates past k (query.TIE_MARGIN): those within near_equal's gap of the k-th (a copy, a few
    float32 steps off at most) are kept for the re-rank, the others are not."""
    from alignsearch.search.query import tied_at_cut

    step = float(np.spacing(np.float32(0.8)))
    scores = np.array([0.9, 0.8, 0.8 - 3 * step, 0.8 - 3 * step, 0.7, 0.6], np.float32)
    assert tied_at_cut(scores, 2) == 4 and tied_at_cut(scores, 1) == 1 and tied_at_cut(scores, 5) == 5
    assert tied_at_cut(scores, 9) == 6 and tied_at_cut(scores, 0) == 0 and tied_at_cut(np.zeros(0), 3) == 0


def test_a_cut_by_score_and_tiebreak_keeps_a_copy_and_not_a_products_other_zeros():
    """A late-fused query's cut (engine._best_of): past the k-th, a product's zeros tie in the score alone and are
    cut; a copy ties in the tie-break too and is kept."""
    from alignsearch.search.query import tied_at_cut

    scores = np.array([0.5, 0.0, 0.0, 0.0, 0.0], np.float32)
    tiebreak = np.array([0.7, 0.2, 0.2, 0.1, 0.2], np.float32)
    assert tied_at_cut(scores, 2, tiebreak) == 3  # the copy at 3, not the zeros after it (nor the one past them)
    assert tied_at_cut(scores, 2) == 5
