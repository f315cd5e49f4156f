"""A run of copies longer than query.TIE_MARGIN straddling a cut (the ANN index's, the exact path's, the keyword
index's limit): each cut kept the margin's copies in the order they were indexed, so the copy listed first by path
was left out where it was indexed last. The engine now asks again wider while the margin is spent
(query.margin_spent)."""

import numpy as np
import pytest

import alignsearch
from alignsearch.search import query


def test_a_cut_is_asked_again_only_where_every_candidate_asked_for_tied_and_more_may_lie_past():
    assert query.margin_spent(41, 41, True)
    assert not query.margin_spent(41, 41, False)  # nothing past what was asked: the run ends there
    assert not query.margin_spent(40, 41, True)  # the last asked for did not tie: the run ended before it


def test_the_margin_widens_while_spent_and_stops_past_settle_max():
    """engine._until_settled, the one loop of the ANN and exact paths: asked with TIE_MARGIN, then WIDER_MARGIN times
    wider while `within` says the margin was spent, at most SETTLE_MAX + 1; the answer is the last one asked."""
    from alignsearch.search import engine

    asked = []

    def always_spent(margin):
        asked.append(margin)
        return [margin], True

    assert engine._until_settled(always_spent) == [asked[-1]]
    assert asked[0] == query.TIE_MARGIN and asked[-1] == engine.SETTLE_MAX + 1
    assert all(b == min(a * query.WIDER_MARGIN, engine.SETTLE_MAX + 1) for a, b in zip(asked, asked[1:]))
    asked.clear()
    assert engine._until_settled(lambda m: (asked.append(m) or [m], m < 4 * query.TIE_MARGIN)) == [
        query.TIE_MARGIN * query.WIDER_MARGIN]  # spent once, then not: asked twice
    assert asked == [query.TIE_MARGIN, query.TIE_MARGIN * query.WIDER_MARGIN]


@pytest.mark.slow  # 170 vectors written, the ANN index rebuilt, eight searches
@pytest.mark.parametrize("backwards", [False, True])
def test_a_run_of_copies_longer_than_the_margin_keeps_the_copies_first_by_path(indexed_corpus, backwards):
    """170 copies (past TIE_MARGIN and its first widening), written in path order or backwards: the first k by path
    are the answer, by the ANN (flat) path and by the exact one (a filter), whatever id each copy was given."""
    from alignsearch.search.engine import ANN_FILE
    from helpers import write_vectors
    from indexer import build

    index_dir = indexed_corpus[1]
    with alignsearch.open(index_dir) as engine:
        dim = engine.info()["dim"]
    copy = query.unit(np.random.default_rng(4).standard_normal(dim)).astype(np.float32)
    names = [f"c{j:03d}.jpg" for j in range(1 + query.TIE_MARGIN * (1 + query.WIDER_MARGIN) + 9)]
    db, store = write_vectors(index_dir, np.stack([copy] * len(names)), names[::-1] if backwards else names)
    build.sync_index(db, store, index_dir / ANN_FILE)
    db.dispose()
    with alignsearch.open(index_dir) as engine:
        assert engine.info()["index"]["type"] == "flat" and engine.searched_exactly() == 0
        for path in (None, "*.jpg"):  # the flat index's search, and the exact path (_best_of)
            for k in (1, 3):
                assert [h.relpath for h in engine.search_vector(copy, k=k, path=path)] == names[:k], (path, k)


@pytest.mark.slow  # two index runs of 45 photos
def test_a_run_of_copies_with_one_caption_longer_than_the_margin_keeps_the_copy_first_by_path(tmp_path, corpus,
                                                                                              tiny_model, monkeypatch):
    """45 copies with one caption (one bm25), the one first by path indexed last: the keyword index's limit (1 here)
    with its margin of 40 kept the 41 indexed first, so c000 was no match at all."""
    from alignsearch.search import engine as engine_module
    from indexer.job import index_folders

    folder, ix = tmp_path / "photos", tmp_path / "ix"
    folder.mkdir()
    names = [f"c{j:03d}" for j in range(query.TIE_MARGIN + 5)]
    photo = (corpus / "img002.jpg").read_bytes()
    for name in names[1:] + names[:1]:  # c000 in the second run: the highest id
        (folder / f"{name}.jpg").write_bytes(photo)
        (folder / f"{name}.txt").write_text("a red kite")
        if name == names[-1]:
            index_folders([folder], ix, model=str(tiny_model), device="cpu", workers=0)
    index_folders([folder], ix, model=str(tiny_model), device="cpu", workers=0)
    monkeypatch.setattr(engine_module, "KEYWORD_DEPTH", 1)  # the limit falls in the run at k=1
    with alignsearch.open(ix) as engine:
        for path in (None, "*.jpg"):
            assert [h.relpath for h in engine.search(text="kite", mode="keyword", k=1, path=path)] == ["c000.jpg"], path


@pytest.mark.slow  # 170 vectors written, the ANN index rebuilt, two searches
def test_a_run_of_copies_longer_than_settle_max_is_not_fetched_whole(indexed_corpus, monkeypatch):
    """A run of more copies than engine.SETTLE_MAX is not settled by name (_settled keeps its ANN order), yet the
    widening asked for the whole of it (50,000 equal black frames: every one fetched, read and re-ranked, each
    search), and the flat index's larger top list put the copies indexed last first. The margin now grows to
    SETTLE_MAX + 1 at most (SETTLE_MAX set to 60 here, the run 170 copies long)."""
    from alignsearch.search import engine as engine_module
    from alignsearch.search.engine import ANN_FILE
    from alignsearch.storage import ann
    from helpers import write_vectors
    from indexer import build

    index_dir = indexed_corpus[1]
    with alignsearch.open(index_dir) as engine:
        dim = engine.info()["dim"]
    copy = query.unit(np.random.default_rng(4).standard_normal(dim)).astype(np.float32)
    names = [f"c{j:03d}.jpg" for j in range(170)]
    db, store = write_vectors(index_dir, np.stack([copy] * len(names)), names)
    build.sync_index(db, store, index_dir / ANN_FILE)
    db.dispose()
    monkeypatch.setattr(engine_module, "SETTLE_MAX", 60)
    asked, search = [], ann.search
    monkeypatch.setattr(ann, "search", lambda index, q, k, *a, **kw: asked.append(k) or search(index, q, k, *a, **kw))
    margins, within = [], engine_module.Engine._best_within
    monkeypatch.setattr(engine_module.Engine, "_best_within",
                        lambda self, snap, q, ids, addresses, depth, margin: margins.append(margin - depth) or
                        within(self, snap, q, ids, addresses, depth, margin))
    with alignsearch.open(index_dir) as engine:
        for path in (None, "*.jpg"):  # the flat index's search, and the exact path (_best_of)
            assert len(engine.search_vector(copy, k=3, path=path)) == 3
    assert asked and max(asked) <= 3 + 61 and margins == [query.TIE_MARGIN, 61], (asked, margins)


@pytest.mark.slow  # two index runs of 45 photos
def test_a_folders_word_cut_at_the_keyword_limit_keeps_the_first_by_name_asking_once(tmp_path, corpus, tiny_model,
                                                                                       monkeypatch):
    """A word of a folder matches each of its files with one bm25 where their names are alike: the keyword limit and
    its margin kept those indexed first (SQL ordered them by id), and widening the margin until the run ended cost a
    search over 10,000 such files 2-3.6x (bench_tie_runs --keyword). Ordered by name in SQL (keywords.TIE_ORDER), the
    cut keeps the first by name, FTS asked once; c000, indexed last, is the answer at k=1, filtered or not."""
    from alignsearch.search import engine as engine_module
    from alignsearch.storage import keywords
    from indexer.job import index_folders

    root, ix = tmp_path / "photos", tmp_path / "ix"
    (root / "kites").mkdir(parents=True)
    photo = (corpus / "img002.jpg").read_bytes()
    names = [f"c{j:03d}.jpg" for j in range(query.TIE_MARGIN + 5)]
    for name in names[1:]:
        (root / "kites" / name).write_bytes(photo)
    index_folders([root], ix, model=str(tiny_model), device="cpu", workers=0)
    (root / "kites" / names[0]).write_bytes(photo)  # the first by name, the highest id
    index_folders([root], ix, model=str(tiny_model), device="cpu", workers=0)
    monkeypatch.setattr(engine_module, "KEYWORD_DEPTH", 1)
    asked, search = [], keywords.search
    monkeypatch.setattr(keywords, "search", lambda conn, words, limit, *a, **kw: asked.append(limit) or
                        search(conn, words, limit, *a, **kw))
    with alignsearch.open(ix) as engine:
        for path in (None, "kites/*"):
            asked.clear()
            hits = engine.search(text="kites", mode="keyword", k=1, path=path)
            assert [h.relpath for h in hits] == ["kites/c000.jpg"] and asked == [1 + query.TIE_MARGIN], (hits, asked)
