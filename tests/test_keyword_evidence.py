"""The default mode's keyword list (keywords.search with evidence_only): only matches whose caption, text read in the
image or tags hold the query, best first, checked in rank order until the limit is filled."""

from __future__ import annotations

from helpers import keyword_library

from alignsearch.storage import catalog, keywords


def test_evidence_is_checked_in_rank_order_until_the_limit_is_filled_with_the_same_results(tmp_path, monkeypatch):
    """SQLite ran the evidence check on every keyword match before it sorted and cut them (a 64-word query over
    20,000 matching file names: seconds). Matches that fail the check ranked before those that pass, and files with
    no caption: the first `limit` that pass are the same as checking all, and far fewer are checked."""
    failing = {f"red_red_red_{n}.jpg": "a grey wall" for n in range(6)}  # name only: bm25 ranks them first
    bare = {f"red_red_{n}.jpg": None for n in range(6)}  # no caption: nothing to check
    passing = {f"img_{n:02d}.jpg": f"a red car parked by the long road {'and more words ' * (n % 4)}"
               for n in range(30)}
    texts = {**failing, **bare, **passing}
    ids = keyword_library(tmp_path / "catalog.db", texts)
    caption = {ids[name]: text for name, text in texts.items()}
    query = keywords.parse("red", partial_last=True)
    checked = []
    evidence, holds = keywords.evidence, getattr(keywords, "_holds", None)

    def counted(check):
        def call(q, text):
            checked.append(text)
            return check(q, text)
        return call

    # the check as search makes it (absent before the lazy check: there it was evidence, per row)
    monkeypatch.setattr(keywords, "evidence", counted(evidence))
    if holds is not None:
        monkeypatch.setattr(keywords, "_holds", counted(holds))
    monkeypatch.setattr(keywords, "EVIDENCE_BATCH", 2, raising=False)
    db = catalog.connect(tmp_path / "catalog.db", readonly=True)
    with db.connect() as conn:
        every = keywords.search(conn, query, 1000)
        assert len(every) == len(texts)
        first_passing = min(n for n, (i, _) in enumerate(every) if caption[i] in passing.values())
        assert {caption[i] for i, _ in every[:first_passing]} >= {"a grey wall", None}  # failing ones rank first
        for limit in (1, 2, 3, 7, 29, 30, 31, 100):
            expected = [(i, s) for i, s in every if caption[i] and keywords.evidence(query, caption[i])][:limit]
            checked.clear()
            found = keywords.search(conn, query, limit, evidence_only=True)
            assert found == expected, limit
            assert all(t.strip(keywords.BREAK) for t in checked)  # an uncaptioned match is not checked
            if limit <= 7:
                assert len(checked) < len(failing) + len(passing) // 2, (limit, len(checked))  # was all 36
    db.dispose()
