"""Index choice (pure functions) and FAISS build/search with recall against exact search."""

import numpy as np
import pytest

from alignsearch.storage import ann
from helpers import clustered


@pytest.mark.parametrize(
    "n,kind,nlist",
    [(0, "flat", 0), (9_999, "flat", 0), (10_000, "ivfpq", 256), (100_000, "ivfpq", 1024), (1_000_000, "ivfpq", 4096)],
)
def test_plan_index_follows_the_size_rules(n, kind, nlist):
    plan = ann.plan_index(n, 640)
    assert (plan.kind, plan.nlist) == (kind, nlist)
    if kind == "ivfpq":
        assert plan.m == 64 and 640 % plan.m == 0
        assert n >= 39 * plan.nlist  # enough points per list for k-means
        assert 4 * np.sqrt(n) / 2 <= plan.nlist <= 16 * np.sqrt(n)


def test_pq_size_divides_small_dims():
    for dim in (8, 32, 100, 512, 640, 768):
        m = ann.plan_index(50_000, dim).m
        assert dim % m == 0 and dim // m >= 2


def test_nprobe_and_candidates_are_explicit():
    plan = ann.plan_index(100_000, 640)
    assert 1 <= ann.default_nprobe(plan) <= plan.nlist
    assert ann.default_nprobe(ann.IndexPlan("flat")) == 0
    assert ann.candidate_count(10, plan) >= 100
    # a flat index re-ranks k (exact scores); the engine asks query.TIE_MARGIN more of any index, for the copies tied
    # at the cut (tests/test_attacks_ties.py)
    assert ann.candidate_count(10, ann.IndexPlan("flat")) == 10


def test_needs_rebuild():
    ivf = ann.plan_index(20_000, 64)
    assert ann.needs_rebuild(None, 0, 10, 64)
    assert ann.needs_rebuild(ann.IndexPlan("flat"), 5_000, 20_000, 64)  # crossed the threshold
    assert not ann.needs_rebuild(ivf, 20_000, 60_000, 64)
    assert ann.needs_rebuild(ivf, 20_000, 90_000, 64)  # outgrew its training 4x


@pytest.mark.slow
def test_ivfpq_with_rerank_recalls_exact_top10(tmp_path):
    from alignsearch.storage.ann import rerank

    dim, n = 32, 12_000
    x = clustered(n, dim)
    ids = np.arange(n, dtype=np.int64) * 3 + 7  # catalog ids, not positions
    plan = ann.plan_index(n, dim)
    assert plan.kind == "ivfpq"
    index = ann.train_and_fill(ann.create(plan, dim), x[np.random.default_rng(1).choice(n, ann.train_size(n, plan), replace=False)], [(x, ids)])
    path = tmp_path / "ix.faiss"
    ann.write_atomic(index, path)
    index = ann.read(path)
    assert ann.describe(index) == plan
    assert sorted(ann.stored_ids(index)) == sorted(ids)

    # queries off the data: fresh points, not database vectors
    q = clustered(100, dim, seed=5)
    exact = np.argsort(-(q @ x.T), axis=1)[:, :10]
    hits_plain, hits_rerank = 0, 0
    for qi in range(len(q)):
        _, cand = ann.search(index, q[qi : qi + 1], ann.candidate_count(10, plan), ann.default_nprobe(plan))
        cand = cand[0][cand[0] >= 0]
        truth = set(ids[exact[qi]])
        hits_plain += len(truth & set(cand[:10]))
        top, _ = rerank(q[qi], cand, x[(cand - 7) // 3], 10)
        hits_rerank += len(truth & set(top))
    recall_plain, recall_rerank = hits_plain / 1000, hits_rerank / 1000
    assert recall_rerank >= 0.9, recall_rerank
    assert recall_rerank > recall_plain


def test_flat_is_exact_and_remove_ids_works():
    x = clustered(500, 16)
    index = ann.create(ann.plan_index(500, 16), 16)
    ann.add(index, x, np.arange(500) + 1)
    scores, found = ann.search(index, x[:5], 1, 0)
    assert list(found[:, 0]) == [1, 2, 3, 4, 5]
    assert ann.remove(index, [1, 2]) == 2
    _, found = ann.search(index, x[:1], 1000, 0)
    assert found.shape[1] == 498 and 1 not in found[0]


def test_pick_takes_the_cheapest_setting_that_reaches_the_target():
    from indexer.tune import pick

    table = {(1, 5): 0.5, (1, 40): 0.8, (2, 5): 0.9, (2, 10): 0.96, (4, 5): 0.97, (4, 40): 0.99}
    assert pick(table, 0.95) == (2, 10, 0.96)
    assert pick(table, 0.999) == (4, 40, 0.99)  # unreachable: the best there is


@pytest.mark.slow
def test_tuning_reaches_the_target_on_off_distribution_queries(tmp_path):
    from alignsearch.storage.vectors import VectorStore
    from indexer.tune import tune

    dim, n = 32, 12_000
    x = clustered(n, dim, seed=3)
    store = VectorStore(tmp_path / "v.f16", dim, 0)
    store.append(x)
    ids, rows = np.arange(n, dtype=np.int64) + 1, np.arange(n, dtype=np.int64)
    plan = ann.plan_index(n, dim)
    index = ann.train_and_fill(ann.create(plan, dim), store.get(rows[: ann.train_size(n, plan)]), [(store.get(rows), ids)])
    t = tune(index, store, ids, rows, target=0.9, queries=100)
    assert t["recall"] >= 0.9 and 1 <= t["nprobe"] <= plan.nlist
    strict = tune(index, store, ids, rows, target=0.99, queries=100)
    assert (strict["nprobe"], strict["rerank_factor"]) >= (t["nprobe"], t["rerank_factor"])
