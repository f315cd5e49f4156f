"""The default mode's fusion of similarity and keyword evidence (alignsearch/search/query.py: keyword_fusion,
fuse_hits): pure functions, tested without a model; and once through the engine on synthetic vectors."""

from __future__ import annotations

import numpy as np
import pytest

import alignsearch
from alignsearch.search.request import build as build_request
from alignsearch.search.query import KEYWORD_SHARE, RRF_K, belief, fuse_hits, keyword_fusion
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


def test_a_wrong_caption_does_not_outrank_what_the_model_singles_out():
    sims = confident()
    wrong = min(sims, key=sims.get)  # the model's last image carries the query's word
    ranked = [i for i, _ in fuse_hits(sims, [wrong])]
    assert ranked[0] in {0, 1, 2, 3} and ranked[1] in {0, 1, 2, 3}
    # nudged up from the bottom to among the model's choice (whose belief four images share), not above it
    assert wrong in ranked[2:5] and set(ranked[:5]) == {0, 1, 2, 3, wrong}
    # reciprocal rank fusion (auto before, hybrid now) put it first
    assert [i for i, _ in fuse_hits(sims, [wrong], method="rrf")][0] == wrong


def test_a_keyword_match_goes_first_where_the_model_has_no_signal():
    sims = flat()
    for caption in (47, 17, 0):
        ranked = fuse_hits(sims, [caption])
        assert ranked[0][0] == caption
        rest = [i for i, _ in ranked[1:]]
        assert rest == sorted(rest, key=lambda i: (-sims[i], i))  # the others keep the model's order


def test_a_true_caption_lifts_the_model_choice_it_agrees_with():
    sims = confident()
    second = sorted(sims, key=lambda i: -sims[i])[1]
    ranked = fuse_hits(sims, [second])
    assert ranked[0][0] == second


def test_the_printed_score_is_the_order_and_is_made_of_belief_and_share():
    sims = confident(seed=3)
    keyword = [40, 2, 41]
    ranked = fuse_hits(sims, keyword)
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
    with pytest.raises(ValueError, match="fusion must be one of"):
        keyword_fusion(s, np.arange(1, 6), np.zeros(5, np.int64), method="mean")


def test_a_handful_of_candidates_does_not_outweigh_a_keyword_match():
    """Five images, a random model: its similarities are spread, but five of them say nothing (the search
    filters' library, tests/test_search_filters.py, where the caption match leads)."""
    sims = dict(enumerate([0.3105, 0.1002, -0.0382, -0.1608, -0.3682]))
    assert fuse_hits(sims, [4])[0][0] == 4


def test_without_keyword_matches_the_order_is_the_similarity_order():
    sims = confident(seed=5)
    assert [i for i, _ in fuse_hits(sims, [])] == sorted(sims, key=lambda i: (-sims[i], i))


def test_auto_keeps_the_models_choice_over_a_wrong_caption_in_the_engine(tmp_path):
    """Synthetic vectors: the query is one stored vector (what the model singles out); the caption holding
    the query's word is on the vector least like it. Auto ranked it first before (RRF)."""
    dim, n = 64, 40
    store = vector_index(tmp_path, n, dim, seed=1)
    (tmp_path / ANN_FILE).unlink()  # no ANN index: the engine scores the committed vectors exactly
    x = store.get(np.arange(n)).astype(np.float32)
    query = x[0] / np.linalg.norm(x[0])
    worst = int(np.argmin(x @ query))
    db = catalog.connect(tmp_path / DB_FILE)
    with db.begin() as conn:
        ids = {r.vec_row: r.id for r in catalog.get_files(conn, range(1, n + 1)).values()}
        catalog.set_photo(conn, ids[worst], f"{worst:07d}.jpg", {"caption": "cat mug"})
    db.dispose()
    engine = alignsearch.open(tmp_path)
    hits = engine.search_vector(query, k=10, text="cat", mode="auto")
    assert hits[0].id == ids[0] and hits[1].id == ids[worst]  # nudged up from the bottom, behind the model's choice
    assert hits[1].parts["keyword_rank"] == 1 and hits[1].parts["keyword_share"] == pytest.approx(KEYWORD_SHARE)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert all(h.score == pytest.approx(h.parts["belief"] + h.parts["keyword_share"], abs=2e-6) for h in hits)
    assert engine.search_vector(query, k=10, text="cat", mode="hybrid")[0].id == ids[worst]  # hybrid is RRF
    plan = engine.explain(build_request(text="cat", k=10))
    assert plan["mode"] == "auto" and plan["caption_or_tag_matches"] == 1
    assert plan["ranking"] == "hybrid (model belief + keyword share)" and "belief" in plan["score"]
    assert engine.explain(build_request(text="cat", k=10, mode="hybrid"))["ranking"] == "hybrid (RRF)"
    engine.close()
