"""The default mode's keyword list (keywords.search with evidence_only): only matches whose caption, text read in the
image or tags hold the query, best first, checked in rank order until the limit is filled."""

from __future__ import annotations

import pytest
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


# -- the lazy check against the check it replaced (keywords.evidence run by SQLite on every match, e429b06) ---------

def _old_atom_in(atom, words, raw):
    """keywords._atom_in as it was at e429b06 (every atom scanned the part's words), on today's fold."""
    tokens = keywords._folded(atom.tokens)
    n = len(tokens)
    for i in range(len(words) - n + 1):
        head, last = words[i:i + n - 1], words[i + n - 1]
        if tokens[:-1] == head and (last.startswith(tokens[-1]) if atom.prefix else last == tokens[-1]):
            return True
    return atom.code is not None and atom.code.lower() in raw


def _old_evidence(query, text):
    """keywords.evidence as it was at e429b06."""
    for part in text.split(keywords.BREAK):
        words, raw = keywords._fold(part), part.lower()
        if any(_old_atom_in(a, words, raw) for a in query.positive()):
            return True
    return False


# words of every script and kind the check treats apart: repeated words, a phrase's first word repeated, codes found
# inside longer chunks, Thai and CJK runs, Hangul with and without a particle or a Latin word before it, Greek accents
# and final sigma, ligatures and full-width letters NFKD folds, a kana with its mark apart, blanks and BREAK
_WORDS = ["red", "red", "car", "cars", "Café", "cafe", "INV-4711", "4711", "inv4711a", "東京", "東京駅", "駅", "กรุงเทพ",
          "ข้าว", "ข่าว", "ทํา", "ทำ", "서울", "서울에서", "의", "BTS의", "BTS", "2024년", "x2024년", "ＢＴＳ의", "ㅋㅋlol",
          "A1의", "韓國의", "Αθήνα", "αθηνα", "ΟΔΟΣ", "οδός", "the", "a", "ab", "abc", "ß", "ss", "ﬁne", "fine", "パン",
          "ハ\u309aン", "BTS에서는", "INV-47110", "golden_retriever", "retriever", "1", "123", " ", "", "\t", "-", "*", keywords.BREAK]
_QUERY_WORDS = [*_WORDS, '"', "AND", "OR", '"red car"', '"red red car"', '"car red"', "-red", '-"red car"', "red*", "re*",
                "서*", '"서울"', "BT", "BTS", "ca", '"INV-4711"', "INV-471", "BTS에서"]


@pytest.mark.slow
def test_the_lazy_check_holds_where_the_check_it_replaced_held():
    """keywords.evidence (whole words by a set lookup, phrases skipped when the text lacks their first word) says
    what the scan of every atom over every word said, on texts and queries drawn from every script and kind of atom,
    as typed in keyword mode and in the default mode (the last word a start)."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    texts = st.lists(st.sampled_from(_WORDS), max_size=12).map(" ".join)
    queries = st.lists(st.sampled_from(_QUERY_WORDS), min_size=1, max_size=6).map(" ".join)

    @settings(max_examples=400, deadline=None, database=None)
    @given(st.lists(texts, max_size=4).map(keywords.BREAK.join), queries, st.booleans(), st.booleans())
    def check(text, typed, partial, spaced_end):
        query = keywords.parse(typed + (" " if spaced_end else ""), partial_last=partial)
        assert keywords.evidence(query, text) == _old_evidence(query, text), (typed, text)

    check()


@pytest.mark.slow
def test_the_default_modes_keyword_list_is_what_checking_every_match_then_cutting_gave(tmp_path, monkeypatch):
    """keywords.search with evidence_only against the old semantics (every match in rank order, kept when its tags,
    caption and text read in the image hold the query, then cut to the limit): ties in bm25 (files of the same
    text), matches found only by the trigram index (no bm25 score, ranked last), files of another status, files with
    tags but no photo row, filters (among, empty too), limits 0, 1, a few and huge, batches of 1 and 3 matches."""
    import random

    rng = random.Random(8)
    words = [w for w in _WORDS if w.strip() and w != keywords.BREAK] + ["xx4711yy", "INV4711A"]

    def text():
        return " ".join(rng.choice(words) for _ in range(rng.randint(1, 5)))

    db = catalog.connect(tmp_path / "catalog.db")
    same = text()
    with db.begin() as conn:
        ids = []
        for n in range(80):
            name = f"{rng.choice(['red', 'car', 'img', '4711', 'ab'])}_{n}.jpg"
            ids.append(fid := catalog.upsert_file(conn, {"root": "/r", "relpath": name, "size": 1, "mtime": 0.0,
                                                         "status": rng.choice([catalog.INDEXED] * 9 + ["failed"])}))
            if rng.random() < .8:  # else: no photo row
                caption = same if rng.random() < .25 else rng.choice([text(), None])
                catalog.set_photo(conn, fid, name, {"caption": caption, "ocr": text() if rng.random() < .3 else None})
        tagged = [{"file_id": i, "label": text(), "probability": .5} for i in ids if rng.random() < .3]
        catalog.replace_tags(conn, tagged)
        catalog.refresh_keywords(conn, [t["file_id"] for t in tagged])
    db.dispose()

    def old_search(conn, query, limit, among):
        kept = []
        for i, score in keywords.search(conn, query, 10**9, among):
            labels = [label for (label,) in conn.exec_driver_sql("SELECT label FROM tags WHERE file_id = ?", (i,))]
            photo = conn.exec_driver_sql("SELECT caption, ocr FROM photos WHERE file_id = ?", (i,)).first() or ("", "")
            if _old_evidence(query, keywords.BREAK.join([keywords.BREAK.join(labels), photo[0] or "", photo[1] or ""])):
                kept.append((i, score))
        return kept[:limit]

    reader = catalog.connect(tmp_path / "catalog.db", readonly=True)
    seen = {"scoreless": 0, "mixed": 0}
    with reader.connect() as conn:
        for n in range(120):
            typed = " ".join(rng.choice(_QUERY_WORDS) for _ in range(rng.randint(1, 4)))
            if n % 4:  # a word of the files' names too: matches that fail the check among those that pass
                typed = rng.choice(["red", "car", "4711", "ab"]) + " " + typed
            query = keywords.parse(typed, partial_last=n % 2 == 0)
            among = None if n % 3 else rng.sample(ids, rng.randint(0, 40))
            monkeypatch.setattr(keywords, "EVIDENCE_BATCH", rng.choice([1, 3, 128]))
            for limit in (0, 1, 2, 5, 10**9):
                expected = old_search(conn, query, limit, among)
                assert keywords.search(conn, query, limit, among, evidence_only=True) == expected, (typed, limit)
            every = keywords.search(conn, query, 10**9, among)
            seen["scoreless"] += any(s == 0.0 for _, s in every)
            seen["mixed"] += len(every) > len(expected) > 0
    reader.dispose()
    assert seen["scoreless"] > 5 and seen["mixed"] > 30, seen  # the draw reached what it is meant to


def test_an_underscore_parts_words_in_the_default_modes_check_as_it_does_in_the_keyword_index(tmp_path):
    """unicode61 takes `_` for a separator (punctuation), Python's \\w for a letter: the keyword index found
    `retriever` in a tag `golden_retriever` (a label as ImageNet writes it) and in text read as `sale_2024`, but the
    default mode's check folded them into one word each and dropped those files; `golden_retriever` typed (the
    phrase `golden retriever` to the index) dropped the caption `a golden retriever`."""
    ids = keyword_library(tmp_path / "catalog.db", {"a.jpg": "a dog on the grass", "b.jpg": "a golden retriever",
                                                    "c.jpg": "a shop window sale_2024", "d.jpg": "a grey wall"})
    db = catalog.connect(tmp_path / "catalog.db")
    with db.begin() as conn:
        catalog.replace_tags(conn, [{"file_id": ids["a.jpg"], "label": "golden_retriever", "probability": .9}])
        catalog.refresh_keywords(conn, [ids["a.jpg"]])
    db.dispose()
    reader = catalog.connect(tmp_path / "catalog.db", readonly=True)
    with reader.connect() as conn:
        def found(typed, auto):
            hits = keywords.search(conn, keywords.parse(typed, partial_last=auto), 10, evidence_only=auto)
            return sorted(name for name, i in ids.items() if i in {h for h, _ in hits})

        for typed, names in (("retriever", ["a.jpg", "b.jpg"]), ("golden_retriever", ["a.jpg", "b.jpg"]),
                             ('"golden retriever"', ["a.jpg", "b.jpg"]), ("sale", ["c.jpg"])):
            assert found(typed, auto=False) == names, typed  # the keyword index
            assert found(typed, auto=True) == names, typed  # the default mode: each file's caption or tag holds it
    reader.dispose()
    assert keywords.evidence(keywords.parse("retriever"), "golden_retriever")
    assert not keywords.evidence(keywords.parse("golden_retriever"), "a retriever, golden")


def test_a_kana_voiced_mark_after_a_latin_letter_parts_words_in_the_default_modes_check_as_in_the_index(tmp_path):
    """A half-width voiced mark (ﾞ, U+FF9E) composes with no Latin letter: spaced makes it a space (unicode61 took it
    for one), so the keyword index holds `aﾞbc` as `a bc`. The default mode's check dropped the mark with the
    accents and read `abc`: the keyword index found the file for `aﾞbc` (and `bc`) and the check refused it."""
    ids = keyword_library(tmp_path / "catalog.db", {"mark.jpg": "label xﾞbc zz", "kana.jpg": "ｶﾞｲﾄﾞ",
                                                    "plain.jpg": "a grey wall"})
    reader = catalog.connect(tmp_path / "catalog.db", readonly=True)
    with reader.connect() as conn:
        def found(typed, auto):
            hits = keywords.search(conn, keywords.parse(typed, partial_last=auto), 10, evidence_only=auto)
            return sorted(name for name, i in ids.items() if i in {h for h, _ in hits})

        for typed, names in (("xﾞbc", ["mark.jpg"]), ("bc", ["mark.jpg"]), ('"label x\u3099bc"', ["mark.jpg"]),
                             ("xbc", []), ("ガイド", ["kana.jpg"])):
            assert found(typed, auto=False) == names, typed  # the keyword index
            assert found(typed, auto=True) == names, typed  # the default mode's check agrees with it
    reader.dispose()
    assert keywords.evidence(keywords.parse("bc"), "xﾞbc") and not keywords.evidence(keywords.parse("xbc"), "xﾞbc")
