"""Keyword search in Thai and Korean (alignsearch/storage/keywords.py).

Thai is written without spaces between words, and unicode61 took its vowel and tone marks (combining, Mn) for
separators: a Thai run was cut at every mark, so `กรุงเทพ` (Bangkok) found nothing inside `ตลาดกรุงเทพมหานคร`,
and the marks were dropped, so `ข้าว` (rice) found `ข่าว` (news). Korean is written with spaces, but a particle joins
the noun it follows: `서울` (Seoul) found neither `서울에서` (in Seoul) nor `서울의` (Seoul's). The combining marks of every
other script were separators too (a Hindi word cut at its vowel signs), and Arabic harakat and Hebrew points kept a
vocalised word from its bare spelling."""

from __future__ import annotations

import sqlite3
import unicodedata

import pytest

from alignsearch.storage import catalog, keywords, migrate, state


def _library(db_path, files):
    """A catalog of files named as the keys of `files`, each with its caption (None: the name alone); their ids."""
    db = catalog.connect(db_path)
    ids = {}
    with db.begin() as conn:
        for name, caption in files.items():
            fid = ids[name] = catalog.upsert_file(conn, {"root": "/r", "relpath": name, "size": 1, "mtime": 0.0,
                                                         "status": catalog.INDEXED})
            catalog.set_photo(conn, fid, name, {"caption": caption})
    db.dispose()
    return ids


def _found(db_path, ids, text, partial_last=False, **kwargs):
    """The names of the files the keyword query `text` finds, sorted."""
    db = catalog.connect(db_path, **kwargs)
    with db.connect() as conn:
        found = {i for i, _ in keywords.search(conn, keywords.parse(text, partial_last=partial_last), 10)}
    db.dispose()
    return sorted(name for name, fid in ids.items() if fid in found)


def _version(db_path):
    """The catalog's schema version, read by a reader (which never upgrades it)."""
    reader = catalog.connect(db_path, readonly=True)
    try:
        with reader.connect() as conn:
            return state.read(conn).schema_version
    finally:
        reader.dispose()


def _schema_8_library(db_path, files, trigram, bodies=None):
    """_library's catalog as schema 8 wrote it, widths as they are: each file's keyword text unnarrowed (or the
    body `bodies` gives it), its trigram row the text `trigram` gives it (none for a file it leaves out)."""
    ids = _library(db_path, files)
    db = catalog.connect(db_path)
    with db.begin() as conn:
        for name, caption in files.items():
            text = (bodies or {}).get(name) or catalog.keyword_text(name, caption)
            conn.exec_driver_sql(f"UPDATE {catalog.KEYWORDS} SET body = ? WHERE rowid = ?", (text, ids[name]))
            conn.exec_driver_sql(f"DELETE FROM {catalog.KEYWORDS_TRIGRAM} WHERE rowid = ?", (ids[name],))
            if name in trigram:
                conn.exec_driver_sql(f"INSERT INTO {catalog.KEYWORDS_TRIGRAM}(rowid, body) VALUES (?, ?)",
                                     (ids[name], trigram[name]))
        state.write(conn, schema_version=8)
    db.dispose()
    return ids


def test_a_thai_word_is_found_inside_the_longer_thai_run_it_is_written_in(tmp_path):
    db = tmp_path / "catalog.db"
    ids = _library(db, {"ตลาดกรุงเทพมหานคร.jpg": None, "rice.jpg": "ข้าวผัดกุ้ง ที่ร้านริมถนน",
                        "news.jpg": "ข่าวเช้าวันนี้", "plain.jpg": "a white wall"})

    for partial_last in (False, True):  # keyword mode, and the default mode's keyword half
        def kw(text):
            return _found(db, ids, text, partial_last)

        assert kw("กรุงเทพ") == kw("ตลาด") == kw("มหานคร") == ["ตลาดกรุงเทพมหานคร.jpg"]
        assert kw("กุ้ง") == kw("ร้าน") == ["rice.jpg"]
        # the tone mark tells rice from news: dropped with the other marks, each found the other
        assert kw("ข้าว") == ["rice.jpg"] and kw("ข่าว") == ["news.jpg"]
        assert kw("กรุงเทพ -ตลาด") == [] and kw("ข้าว OR ข่าว") == ["news.jpg", "rice.jpg"]
    # the marks of a cluster typed in another order (tone before vowel) are the same cluster (NFC orders them)
    assert _found(db, ids, "ก\u0e49\u0e38ง") == ["rice.jpg"]
    assert keywords.parse("กรุงเทพ").words == ["กรุงเทพ"]  # --explain shows the word as typed
    assert keywords.evidence(keywords.parse("ข้าว"), "ข้าวผัดกุ้ง") and keywords.evidence(keywords.parse("ผัด"), "ข้าวผัดกุ้ง")
    assert not keywords.evidence(keywords.parse("ข้าว"), "ข่าวเช้าวันนี้")
    assert keywords.evidence(keywords.parse("ทำ"), "ทำอาหาร") and keywords.evidence(keywords.parse("น้ำ"), "น้ำตก")  # ำ, decomposed by the evidence's fold, agrees


def test_a_korean_noun_is_found_with_the_particle_written_onto_it(tmp_path):
    db = tmp_path / "catalog.db"
    ids = _library(db, {"서울에서.jpg": None, "night.jpg": "서울의 밤 풍경", "busan.jpg": "부산 바다",
                        "seoul.jpg": "Seoul tower"})

    for partial_last in (False, True):
        def kw(text):
            return _found(db, ids, text, partial_last)

        assert kw("서울") == ["night.jpg", "서울에서.jpg"]
        assert kw("서울 -풍경") == ["서울에서.jpg"] and kw("부산") == ["busan.jpg"] and kw("바다") == ["busan.jpg"]
        assert kw('"서울"') == []  # quoted: the word alone, as typed
        assert kw('"서울의"') == ["night.jpg"]
    assert keywords.evidence(keywords.parse("서울"), "서울의 밤 풍경")
    assert not keywords.evidence(keywords.parse("서울"), "부산 바다")
    # Hangul only: a Latin word is whole as before (`seo` finds no `seoul` but in the default mode, as it is typed)
    assert _found(db, ids, "seo") == [] and _found(db, ids, "seo", partial_last=True) == ["seoul.jpg"]
    assert [a.prefix for a in keywords.parse("서울 seoul").positive()] == [True, False]


def test_a_schema_6_keyword_index_finds_thai_words_once_its_next_writer_upgrades_it(tmp_path):
    """An index of schema 6 holds Thai runs cut at their marks (its tokenizer took them for separators); a reader
    reads it as it stands (the whole run still found), and the next writer makes the keyword index again."""
    db_path = tmp_path / "catalog.db"
    ids = _library(db_path, {"ตลาดกรุงเทพมหานคร.jpg": None, "rice.jpg": "ข้าวผัด"})
    db = catalog.connect(db_path)
    with db.begin() as conn:  # as schema 6 made and wrote it: its tokenizer, the text as it is
        conn.exec_driver_sql(f"DROP TABLE {catalog.KEYWORDS}")
        conn.exec_driver_sql(f"CREATE VIRTUAL TABLE {catalog.KEYWORDS} USING "
                             "fts5(body, tokenize = 'unicode61 remove_diacritics 2')")
        for name, caption in (("ตลาดกรุงเทพมหานคร.jpg", None), ("rice.jpg", "ข้าวผัด")):
            conn.exec_driver_sql(f"INSERT INTO {catalog.KEYWORDS}(rowid, body) VALUES (?, ?)",
                                 (ids[name], unicodedata.normalize("NFC", catalog.keyword_text(name, caption))))
        state.write(conn, schema_version=6)
    db.dispose()

    _found_inside_once_upgraded(db_path, ids, "กรุงเทพ", "ตลาดกรุงเทพมหานคร")
    assert _found(db_path, ids, "ผัด", readonly=True) == ["rice.jpg"]


def _found_inside_once_upgraded(db_path, ids, word, run):
    """An older index (its runs cut at their marks) read as it stands finds `word` nowhere and the file named `run`
    by the whole run; after a writer's connect (which upgrades it to LATEST) `word` finds it inside the run too."""
    name = run + ".jpg"
    assert _found(db_path, ids, word, readonly=True) == []  # as it stands: a reader writes nothing
    assert _found(db_path, ids, run, readonly=True) == [name]  # whole, as before
    catalog.connect(db_path).dispose()  # a writer
    assert _found(db_path, ids, word, readonly=True) == _found(db_path, ids, run, readonly=True) == [name]
    assert _version(db_path) == migrate.LATEST


def test_sara_am_written_as_nikhahit_and_sara_aa_is_the_same_vowel(tmp_path):
    """ำ (SARA AM) written as ํ and า (its NFKC form; some keyboards and OCR write it so) reads the same: the index
    held the clusters ทํ า against ท ำ, so `ทำ` never found such text, and the default mode's match check, whose
    fold made ำ of them, dropped what the keyword index found for `ทํา`."""
    db_path = tmp_path / "catalog.db"
    ids = _library(db_path, {"cook.jpg": "ทำอาหาร", "falls.jpg": unicodedata.normalize("NFKC", "น้ำตก ทำอาหาร"),
                             "other.jpg": "ข้าวผัด"})
    assert "\u0e4d\u0e32" in unicodedata.normalize("NFKC", "ทำ")  # no composition undoes it
    db = catalog.connect(db_path)
    with db.connect() as conn:
        for typed in ("ทำ", "ท\u0e4d\u0e32"):
            keyword = {i for i, _ in keywords.search(conn, keywords.parse(typed), 10)}
            auto = {i for i, _ in keywords.search(conn, keywords.parse(typed, partial_last=True), 10,
                                                  evidence_only=True)}
            assert keyword == auto == {ids["cook.jpg"], ids["falls.jpg"]}, ascii(typed)
        for typed in ("น้ำ", "น\u0e49\u0e4d\u0e32", "น\u0e4d\u0e49\u0e32"):  # a tone mark before or after the ํ
            assert [i for i, _ in keywords.search(conn, keywords.parse(typed), 10)] == [ids["falls.jpg"]], ascii(typed)
    db.dispose()


def test_a_long_thai_or_cjk_run_is_a_phrase_of_bounded_length_that_still_finds_its_text(tmp_path):
    """A 1000-character Thai or CJK run was one atom of a token per cluster or character, 1000 FTS5 lookups of lists
    as long as the library (`า` x 1000: 0.9 s on 20,000 Thai captions, 0.05 s at 64): MAX_ATOMS bounded the atoms,
    not their tokens. Its first MAX_PHRASE tokens are looked for, which every text holding the whole run holds."""
    thai = ("ข้าวผัดกุ้งที่ร้านริมถนน" * 40)[:900]
    cjk = ("東京駅前の観光案内所" * 100)[:900]
    db_path = tmp_path / "catalog.db"
    ids = _library(db_path, {"thai.jpg": thai + " ตลาด", "cjk.jpg": "案内 " + cjk, "plain.jpg": "ข้าว 東京"})
    for run, name in ((thai, "thai.jpg"), (cjk, "cjk.jpg")):
        for partial_last in (False, True):
            query = keywords.parse(run, partial_last=partial_last)
            assert len(query.positive()) == 1 and len(query.positive()[0].tokens) < len(run) // 4  # was a token each
            assert [len(a.tokens) for a in query.positive()] == [keywords.MAX_PHRASE]
            assert _found(db_path, ids, run, partial_last) == [name]
    db = catalog.connect(db_path)
    with db.connect() as conn:  # the default mode's match check agrees
        found = keywords.search(conn, keywords.parse(thai, partial_last=True), 10, evidence_only=True)
    db.dispose()
    assert [i for i, _ in found] == [ids["thai.jpg"]]


def test_a_korean_word_of_one_syllable_is_a_word(tmp_path):
    """Words under two characters are dropped from a query (a stray `a`), and so was a Hangul syllable, which is a
    word: `밤` (night) searched for nothing and `서울 AND 밤` found Seoul by day. It is kept, whole."""
    db = tmp_path / "catalog.db"
    ids = _library(db, {"night.jpg": "서울의 밤 풍경", "day.jpg": "서울 낮", "walk.jpg": "산책 길", "hill.jpg": "산 위"})
    for partial_last in (False, True):
        assert _found(db, ids, "밤", partial_last) == ["night.jpg"]
        assert _found(db, ids, "서울 AND 밤", partial_last) == ["night.jpg"]
    assert _found(db, ids, "산") == ["hill.jpg"]  # whole: no word start, 산책 is another word
    assert [a.tokens for a in keywords.parse("밤").positive()] == [("밤",)]
    assert keywords.parse("a").positive() == []  # a lone Latin letter is still no query
    assert keywords.evidence(keywords.parse("밤"), "서울의 밤 풍경")


def test_a_chinese_or_japanese_word_of_one_or_two_ideographs_is_found_in_the_text_holding_it(tmp_path):
    """A lone Han ideograph is a word (海 sea, 駅 station, 桜 cherry blossom), but it was dropped as a lone letter
    is: `海` searched for nothing and `海 AND 青` was `青` alone. It is kept; a lone kana (mostly a particle, の は)
    stays no query unless quoted."""
    db = tmp_path / "catalog.db"
    ids = _library(db, {"sea.jpg": "青い海と空", "station.jpg": "東京駅前の桜", "mountain.jpg": "富士山",
                        "cat.jpg": "ねこ と 犬", "sea2.jpg": "海"})
    for partial_last in (False, True):
        assert _found(db, ids, "海", partial_last) == ["sea.jpg", "sea2.jpg"]
        assert _found(db, ids, "駅", partial_last) == ["station.jpg"]
        assert _found(db, ids, "桜", partial_last) == ["station.jpg"]
        assert _found(db, ids, "海 AND 青", partial_last) == ["sea.jpg"]
        assert _found(db, ids, "東京", partial_last) == ["station.jpg"]
        assert _found(db, ids, "士山", partial_last) == ["mountain.jpg"]
        assert _found(db, ids, "ね", partial_last) == []  # a lone kana: no query
    assert _found(db, ids, '"ね"') == ["cat.jpg"]  # quoted, it is looked for
    with catalog.connect(db).connect() as conn:  # the caption that is the word alone ranks first (bm25)
        assert keywords.search(conn, keywords.parse("海"), 10)[0][0] == ids["sea2.jpg"]
    assert keywords.evidence(keywords.parse("海", partial_last=True), "青い海と空")  # the default mode keeps it
    assert keywords.parse("ね").positive() == [] and keywords.parse("a").positive() == []


def test_a_lone_ideograph_beyond_the_bmp_is_a_word_too(tmp_path):
    """An ideograph of Extension B on (𩸽 hokke, 𠮷 of 𠮷野家) typed alone was dropped as a lone letter is, though
    quoted, or with a `*`, it was found: the lone-ideograph rule knew the BMP's blocks only."""
    db = tmp_path / "catalog.db"
    ids = _library(db, {"hokke.jpg": "\U00029e3d\u5b9a\u98df", "yoshi.jpg": "\U00020bb7\u91ce\u5bb6\u306e\u725b\u4e3c"})
    for partial_last in (False, True):
        assert _found(db, ids, "\U00029e3d", partial_last) == _found(db, ids, '"\U00029e3d"') == ["hokke.jpg"]
        assert _found(db, ids, "\U00020bb7", partial_last) == ["yoshi.jpg"]
    assert keywords.parse("\U00020bb7").positive() != []
    # the default mode's evidence check (the caption holds the word) agrees with the index
    assert keywords.evidence(keywords.parse("\U00029e3d", partial_last=True), "\U00029e3d\u5b9a\u98df")
    assert not keywords.evidence(keywords.parse("\U00029e3d", partial_last=True), "\u9bad\u5b9a\u98df")


def test_a_latin_or_digit_word_with_a_korean_particle_written_onto_it_is_found_by_the_word(tmp_path):
    """Korean writes a particle onto the word before it, a Latin or digit one too (`BTS의 공연`, BTS's concert;
    `2024년`, the year 2024): unicode61 kept `bts의` one token, so `BTS` found neither file in keyword mode (and in
    the default mode only as the last word typed, a word start). Hangul is parted from the word there."""
    db = tmp_path / "catalog.db"
    ids = _library(db, {"BTS의 공연.jpg": None, "song.jpg": "BTS가 노래한다", "year.jpg": "2024년 여름",
                        "iphone.jpg": "iPhone으로 찍은 사진", "other.jpg": "BTSX 공연", "서울에서.jpg": None})
    for partial_last in (False, True):
        def kw(text):
            return _found(db, ids, text, partial_last)

        # not the last word (the default mode takes that as a start, `BTS` finding `BTSX` too): a whole word
        assert kw("BTS concert") == kw("bts concert") == ["BTS의 공연.jpg", "song.jpg"]
        assert kw("BTS AND 공연") == ["BTS의 공연.jpg"]
        assert kw("BTS의") == kw('"BTS의"') == ["BTS의 공연.jpg"]  # as typed, found where it was
        assert kw("iphone") == ["iphone.jpg"] and kw("2024") == kw("2024년") == ["year.jpg"]
        assert kw("서울") == ["서울에서.jpg"]  # a Hangul word with its particle: a word start (schema 7)
    assert _found(db, ids, "BTS") == ["BTS의 공연.jpg", "song.jpg"]  # keyword mode
    assert keywords.evidence(keywords.parse("bts concert"), "BTS가 노래한다")
    assert not keywords.evidence(keywords.parse("bts"), "BTSX 공연")
    db_ = catalog.connect(db, readonly=True)
    with db_.connect() as conn:  # the default mode's keyword list: caption evidence only
        auto = keywords.search(conn, keywords.parse("BTS concert", partial_last=True), 10, evidence_only=True)
    db_.dispose()
    assert [i for i, _ in auto] == [ids["song.jpg"]]


def test_a_schema_7_keyword_index_finds_a_latin_word_with_a_korean_particle_once_its_next_writer_upgrades_it(tmp_path):
    """An index of schema 7 holds `BTS의` as one token; a reader reads it as it stands, the next writer writes the
    keyword index again (migrate._hangul_edge_keywords)."""
    db_path = tmp_path / "catalog.db"
    ids = _library(db_path, {"BTS의 공연.jpg": None, "song.jpg": "BTS가 노래한다"})
    db = catalog.connect(db_path)
    with db.begin() as conn:  # as schema 7 wrote it: Hangul and Latin in one token
        for name, caption in (("BTS의 공연.jpg", None), ("song.jpg", "BTS가 노래한다")):
            conn.exec_driver_sql(f"UPDATE {catalog.KEYWORDS} SET body = ? WHERE rowid = ?",
                                 (catalog.keyword_text(name, caption), ids[name]))
        state.write(conn, schema_version=7)
    db.dispose()

    assert _found(db_path, ids, "BTS", readonly=True) == []  # as it stands: a reader writes nothing
    assert _found(db_path, ids, "공연", readonly=True) == ["BTS의 공연.jpg"]
    catalog.connect(db_path).dispose()  # a writer
    assert _found(db_path, ids, "BTS", readonly=True) == ["BTS의 공연.jpg", "song.jpg"]
    assert _found(db_path, ids, "BTS의", readonly=True) == ["BTS의 공연.jpg"]
    assert _version(db_path) == migrate.LATEST


def test_a_korean_particle_being_typed_onto_a_latin_word_is_a_word_start_as_the_whole_word_was(tmp_path):
    """Parted from `BTS` (schema 8), the particle `에` of `BTS에` is one syllable, counted alone against the rules on
    word starts: `BTS에*` was the phrase `bts 에` (a start needs 2 characters), and the default mode's `BTS에`, typed
    on the way to `BTS에서`, no start (3 characters): both found nothing, where `bts에*` found `BTS에서` before.
    The word as typed counts, particle and all."""
    db = tmp_path / "catalog.db"
    ids = _library(db, {"letter.jpg": "BTS에서 온 편지", "photo.jpg": "iPhone으로 찍은 사진", "show.jpg": "BTS의 공연"})
    for typed in ("BTS에*", "iPhone으*"):  # a start asked for, in both modes
        name = "letter.jpg" if typed.startswith("BTS") else "photo.jpg"
        assert _found(db, ids, typed) == _found(db, ids, typed, partial_last=True) == [name], typed
    assert _found(db, ids, "BTS에", partial_last=True) == ["letter.jpg"]  # as it is typed
    assert _found(db, ids, "iPhone으", partial_last=True) == ["photo.jpg"]
    assert _found(db, ids, "BTS에") == _found(db, ids, "BTS에 ", partial_last=True) == []  # ended: the word alone
    assert [a.prefix for a in keywords.parse("BTS에 공연", partial_last=True).positive()] == [False, True]
    assert keywords.parse("밤*").positive()[0].prefix is False  # a syllable alone is still too short a start
    db_ = catalog.connect(db, readonly=True)
    with db_.connect() as conn:  # the default mode's keyword list: the caption holds the start
        auto = keywords.search(conn, keywords.parse("BTS에", partial_last=True), 10, evidence_only=True)
    db_.dispose()
    assert [i for i, _ in auto] == [ids["letter.jpg"]]


def test_full_width_latin_letters_and_digits_are_their_ascii_ones_both_ways(tmp_path):
    """Chinese and Japanese text writes Latin letters and digits full-width (`ＢＴＳ`, `２０２４年`; U+FF01-U+FF5E):
    unicode61 folds no width, so `BTS` found no `ＢＴＳのライブ` in keyword mode (nor in the default mode, whose match
    check, NFKD, folded them: the keyword index offered nothing to check), and `ＢＴＳ` typed found no `BTS`. Half-width
    katakana (`ｶﾞｲﾄﾞ`) is katakana, its voiced mark composed."""
    db = tmp_path / "catalog.db"
    ids = _library(db, {"live.jpg": "ＢＴＳのライブ", "summer.jpg": "２０２４年の夏", "ascii.jpg": "BTS live 2024",
                        "case.jpg": "ｉＰｈｏｎｅ\u3000ケース", "invoice.jpg": "invoice AB123", "long.jpg": "INVAB123X",
                        "wide.jpg": "伝票 ＩＮＶＣＤ４５６Ｚ", "guide.jpg": "ｶﾞｲﾄﾞﾌﾞｯｸ", "book.jpg": "ガイド本",
                        "plain.jpg": "a white wall"})
    for partial_last in (False, True):  # keyword mode, and the default mode's keyword half
        def kw(text):
            return _found(db, ids, text, partial_last)

        assert kw("BTS") == kw("ＢＴＳ") == kw("ｂｔｓ") == ["ascii.jpg", "live.jpg"]
        assert kw("2024") == kw("２０２４") == ["ascii.jpg", "summer.jpg"]
        assert kw("iphone") == kw("ｉＰｈｏｎｅ") == kw('"iphone ケース"') == ["case.jpg"]
        # a code typed full-width finds it written in ASCII, as a word and inside a longer token, and the other way
        assert kw("ＡＢ１２３") == kw("AB123") == ["invoice.jpg", "long.jpg"]
        assert kw("CD456") == kw("ＣＤ４５６") == ["wide.jpg"]
        assert kw("ガイド") == kw("ｶﾞｲﾄﾞ") == ["book.jpg", "guide.jpg"]
        # a full-width `＊` is `*`: a word start, as `AB12*` is (kept, its code `AB12*` wanted a literal `*`)
        assert kw("ＡＢ１２＊") == kw("AB12*") == kw("ＡＢ１２*") == ["invoice.jpg", "long.jpg"]
        assert kw('"ＡＢ１２＊"') == kw('"AB12*"') == []  # quoted, as typed: no word start either way
        # the operators typed full-width too (a Japanese or Chinese keyboard's `－`, `＂`, `ＡＮＤ`): `－ascii` found the
        # files with `ascii` instead of leaving them out, `＂invoice ab123＂` was two words, `ＡＮＤ` a stop word (OR)
        assert kw("bts －ascii") == kw("bts -ascii") == ["live.jpg"]
        assert kw("－＂bts live＂ bts") == kw('-"bts live" bts') == ["live.jpg"]
        assert kw("＂ab123 invoice＂") == kw('"ab123 invoice"') == []
        assert kw("bts ＡＮＤ 2024") == kw("bts AND 2024") == ["ascii.jpg"]
        assert kw("bts ＯＲ 2024") == kw("bts OR 2024") == ["ascii.jpg", "live.jpg", "summer.jpg"]
    conn_db = catalog.connect(db, readonly=True)
    with conn_db.connect() as conn:  # the default mode's keyword list: caption evidence, across widths too
        for typed, names in (("BTS", ["ascii.jpg", "live.jpg"]), ("ＡＢ１２３", ["invoice.jpg", "long.jpg"]),
                             ("CD456", ["wide.jpg"]), ("ｶﾞｲﾄﾞ", ["book.jpg", "guide.jpg"])):
            auto = keywords.search(conn, keywords.parse(typed, partial_last=True), 10, evidence_only=True)
            assert sorted(n for n, i in ids.items() if i in {f for f, _ in auto}) == names, typed
    conn_db.dispose()
    assert keywords.evidence(keywords.parse("CD456"), "ＩＮＶＣＤ４５６Ｚ")  # a code inside a full-width token
    assert [(a.tokens, a.prefix, a.code) for a in keywords.parse("ＡＢ１２＊").positive()] == [(("ab12",), True, "AB12")]
    assert not keywords.evidence(keywords.parse("BTS"), "ＢＴＳＸ")
    # one character for one: what NFKC of the whole text would change stays (Thai ำ, Hangul compatibility jamo)
    assert keywords.narrow("ทำ ㄱㄴ ＡＢ\u3000１") == "ทำ ㄱㄴ AB 1"


def test_a_schema_8_keyword_index_finds_full_width_text_by_ascii_once_its_next_writer_upgrades_it(tmp_path):
    """An index of schema 8 holds `ＢＴＳのライブ` full-width (and its trigram twin `ＩＮＶＣＤ４５６Ｚ`); a reader reads it as
    it stands, the next writer writes both keyword tables again (migrate._width_keywords)."""
    db_path = tmp_path / "catalog.db"
    files = {"live.jpg": "ＢＴＳのライブ", "wide.jpg": "伝票 ＩＮＶＣＤ４５６Ｚ"}
    ids = _schema_8_library(db_path, files, {"wide.jpg": "ＩＮＶＣＤ４５６Ｚ"})

    assert _found(db_path, ids, "BTS", readonly=True) == []  # as it stands: a reader writes nothing
    assert _found(db_path, ids, "CD456", readonly=True) == []
    catalog.connect(db_path).dispose()  # a writer
    assert _found(db_path, ids, "BTS", readonly=True) == _found(db_path, ids, "ＢＴＳ", readonly=True) == ["live.jpg"]
    assert _found(db_path, ids, "CD456", readonly=True) == ["wide.jpg"]
    assert _version(db_path) == migrate.LATEST


def test_a_code_typed_full_width_still_finds_a_schema_8_trigram_index_inside_longer_tokens(tmp_path):
    """The query's code is narrowed (`ＣＤ４５６`: `CD456`), but a reader never upgrades: until the next writer, a schema
    8 trigram index holds `ＩＮＶＣＤ４５６Ｚ` as written, and `ＣＤ４５６` typed there found it before 246a290 and nothing
    after (the word index holds the token `ｉｎｖｃｄ４５６ｚ` whole). The code is also looked for as typed, as the
    word index's tokens are (Atom.whole); after the upgrade the narrowed one finds it."""
    db_path = tmp_path / "catalog.db"
    files = {"wide.jpg": "伝票 ＩＮＶＣＤ４５６Ｚ", "other.jpg": "伝票 ＩＮＶＣＤ７８９Ｚ"}
    ids = _schema_8_library(db_path, files, {name: caption.split()[1] for name, caption in files.items()})

    for partial_last in (False, True):
        assert _found(db_path, ids, "ＣＤ４５６", partial_last, readonly=True) == ["wide.jpg"]  # as it stands
    catalog.connect(db_path).dispose()  # a writer upgrades it
    for text in ("ＣＤ４５６", "CD456"):
        assert _found(db_path, ids, text, readonly=True) == ["wide.jpg"]


def test_full_width_text_typed_still_finds_a_schema_8_word_index_before_its_writer_upgrades_it(tmp_path):
    """Schema 8 spaced text without narrowing it: `２０２４年の夏` is held as the tokens `２０２４ 年 の 夏`, `ｶﾞｲﾄﾞ` as
    `ｶ ﾞ ｲ ﾄ ﾞ`. A reader never upgrades, and the same text typed there found it before 246a290; after, the query
    was the narrowed phrase (`2024 年`) or the run as typed, one token (`２０２４年`: how an index before schema 5
    holds it), neither in a schema-8 index. It is also looked for spaced as schema 8 spaced it."""
    db_path = tmp_path / "catalog.db"
    files = {"summer.jpg": "２０２４年の夏", "guide.jpg": "ｶﾞｲﾄﾞ", "other.jpg": "冬"}
    # the tokens schema 8 wrote (spaced, widths as they are), no trigram rows (a code is found in them too)
    ids = _schema_8_library(db_path, files, {}, {"summer.jpg": "２０２４ 年  の  夏", "guide.jpg": "ｶ ﾞ ｲ ﾄ ﾞ"})

    for partial_last in (False, True):
        assert _found(db_path, ids, "２０２４年", partial_last, readonly=True) == ["summer.jpg"]
        assert _found(db_path, ids, "ｶﾞｲﾄﾞ", partial_last, readonly=True) == ["guide.jpg"]
    catalog.connect(db_path).dispose()  # a writer upgrades it
    for text, name in (("２０２４年", "summer.jpg"), ("2024年", "summer.jpg"), ("ｶﾞｲﾄﾞ", "guide.jpg"), ("ガイド", "guide.jpg")):
        assert _found(db_path, ids, text, readonly=True) == [name], text


def test_every_scripts_decimal_digits_are_ascii_digits_both_ways(tmp_path):
    """Thai (`๒๕๖๗`, the Buddhist year 2567), Arabic-Indic (`٢٠٢٤`) and Devanagari (`२०२४`) digits: a number is typed
    in either, and neither unicode61 nor the match check's NFKD folds them, so `2567` found no `ปี๒๕๖๗` and `๒๕๖๗`
    typed found no `2567`. Now they are ASCII digits on both sides (keywords.narrow)."""
    db = tmp_path / "catalog.db"
    ids = _library(db, {"thai.jpg": "งานวัด ปี๒๕๖๗", "ascii.jpg": "fair 2567", "arabic.jpg": "معرض ٢٠٢٤",
                        "hindi.jpg": "मेला २०२४", "plain.jpg": "a white wall"})
    for partial_last in (False, True):  # keyword mode, and the default mode's keyword half
        def kw(text):
            return _found(db, ids, text, partial_last)

        assert kw("2567") == kw("๒๕๖๗") == ["ascii.jpg", "thai.jpg"]
        assert kw("2024") == kw("٢٠٢٤") == kw("२०२४") == ["arabic.jpg", "hindi.jpg"]
    conn_db = catalog.connect(db, readonly=True)
    with conn_db.connect() as conn:  # the default mode's keyword list: caption evidence
        auto = keywords.search(conn, keywords.parse("2567", partial_last=True), 10, evidence_only=True)
        assert sorted(n for n, i in ids.items() if i in {f for f, _ in auto}) == ["ascii.jpg", "thai.jpg"]
    conn_db.dispose()
    assert keywords.narrow("ปี๒๕๖๗ ٢٠٢٤ ทำ") == "ปี2567 2024 ทำ"  # Thai letters and marks stay


def test_a_schema_10_index_finds_native_digits_as_typed_and_by_ascii_once_upgraded(tmp_path):
    """A schema-10 index holds `๒๕๖๗` as written: a reader (which never upgrades) still finds it typed so (the query
    also looks for its words unnarrowed, Atom.wide); the next writer writes the keyword tables again
    (migrate._digit_keywords) and `2567` finds it."""
    db_path = tmp_path / "catalog.db"
    files = {"thai.jpg": "งานวัด ปี๒๕๖๗", "other.jpg": "งานวัด"}
    # the text as schema 10 wrote it: spaced (a Thai letter with its marks a token), digits as they are
    ids = _schema_8_library(db_path, files, {}, {n: keywords._spaced_wide(catalog.keyword_text(n, c)) for n, c in files.items()})
    with sqlite3.connect(db_path) as conn:  # schema 10 wrote digits as they are (no writer's connect: it upgrades)
        conn.execute("UPDATE meta SET value = '10' WHERE key = 'schema_version'")
    conn.close()
    assert _found(db_path, ids, "๒๕๖๗", readonly=True) == ["thai.jpg"]  # as it stands, typed as written
    assert _found(db_path, ids, "2567", readonly=True) == []
    catalog.connect(db_path).dispose()  # a writer upgrades it
    assert _found(db_path, ids, "2567", readonly=True) == _found(db_path, ids, "๒๕๖๗", readonly=True) == ["thai.jpg"]
    assert _version(db_path) == migrate.LATEST


def test_a_lao_word_is_found_inside_the_longer_lao_run_it_is_written_in(tmp_path):
    """Lao (U+0E80-U+0EFF) is written as Thai is, without spaces, with vowel and tone marks (Mn): unicode61 and \\w cut
    a Lao run at every mark and dropped it, so `ຫຼວງພະບາງ` (Luang Prabang) found nothing (its ຼ parted `ຫ` from the
    rest) and `ໄກ` (far) found `ໄກ່` (chicken). Now a Lao letter with its marks is a token, as a Thai one is."""
    db = tmp_path / "catalog.db"
    ids = _library(db, {"ຕະຫຼາດຫຼວງພະບາງ.jpg": None, "chicken.jpg": "ປີ້ງໄກ່ ຢູ່ຕະຫຼາດ", "far.jpg": "ທາງໄກ",
                        "fruit.jpg": "ໝາກໄມ້", "plain.jpg": "a white wall"})
    for partial_last in (False, True):  # keyword mode, and the default mode's keyword half
        def kw(text):
            return _found(db, ids, text, partial_last)

        assert kw("ຫຼວງພະບາງ") == ["ຕະຫຼາດຫຼວງພະບາງ.jpg"]
        assert kw("ຕະຫຼາດ") == ["chicken.jpg", "ຕະຫຼາດຫຼວງພະບາງ.jpg"]
        # the tone mark tells chicken from far
        assert kw("ໄກ່") == ["chicken.jpg"] and kw("ໄກ") == ["far.jpg"]
        assert kw("ໝາກ") == kw("ຫມາກ") == ["fruit.jpg"]  # ໝ, and the two letters it is (NFKC), typed either way
        assert kw("ຫຼວງພະບາງ -ຕະຫຼາດ") == []
    reader = catalog.connect(db, readonly=True)
    with reader.connect() as conn:  # the default mode's keyword list: the caption's evidence, as the index found it
        for typed, names in (("ໄກ່", ["chicken.jpg"]), ("ໄກ", ["far.jpg"]), ("ຫມາກ", ["fruit.jpg"]),
                             ("ຕະຫຼາດ", ["chicken.jpg"])):
            auto = keywords.search(conn, keywords.parse(typed, partial_last=True), 10, evidence_only=True)
            assert sorted(n for n, i in ids.items() if i in {f for f, _ in auto}) == names, typed
    reader.dispose()
    # ຳ written as ໍ and າ (its NFKC form) is the same vowel, in the index and in the match check
    assert keywords.spaced("ກຳ") == keywords.spaced("ກ\u0ecd\u0eb2")
    assert keywords.evidence(keywords.parse("ກ\u0ecd\u0eb2"), "ກຳລັງ") and keywords.evidence(keywords.parse("ກຳ"), "ກຳລັງ")
    assert not keywords.evidence(keywords.parse("ໄກ"), "ປີ້ງໄກ່")


def _older_library(db_path, files, version, marks):
    """_library's catalog as schema `version` made and wrote its keyword index: a tokenizer with `marks` alone for token
    characters, each file's text as it is (composed); its ids."""
    ids = _library(db_path, files)
    with sqlite3.connect(db_path) as conn:
        conn.execute(f"DROP TABLE {catalog.KEYWORDS}")
        conn.execute(f"CREATE VIRTUAL TABLE {catalog.KEYWORDS} USING "
                     f"fts5(body, tokenize = \"unicode61 remove_diacritics 2 tokenchars '{marks}'\")")
        for name, caption in files.items():
            conn.execute(f"INSERT INTO {catalog.KEYWORDS}(rowid, body) VALUES (?, ?)",
                         (ids[name], unicodedata.normalize("NFC", catalog.keyword_text(name, caption))))
        conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(version),))
    conn.close()
    return ids


def test_a_schema_11_keyword_index_finds_lao_words_once_its_next_writer_upgrades_it(tmp_path):
    """A schema-11 index holds Lao runs cut at their marks (its tokenizer took them for separators); a reader reads it
    as it stands (the whole run still found), and the next writer makes the keyword index again (step 12)."""
    db_path = tmp_path / "catalog.db"
    files = {"ຕະຫຼາດຫຼວງພະບາງ.jpg": None, "chicken.jpg": "ປີ້ງໄກ່"}
    ids = _older_library(db_path, files, 11, keywords.THAI_MARKS)  # Thai marks only, a Lao run as it is
    _found_inside_once_upgraded(db_path, ids, "ຫຼວງພະບາງ", "ຕະຫຼາດຫຼວງພະບາງ")
    assert _found(db_path, ids, "ໄກ່", readonly=True) == ["chicken.jpg"]


def _sunset_library(db, marks, code_mark, others):
    """A catalog of the captions `a sun<mark>set over the bay` (mark0.jpg, ...: one for each of marks), the plain one,
    `the sun set early` (apart.jpg), `invoice INV<code_mark>4711` (code.jpg) and others: its files, ids, and the
    names `sunset` is to find."""
    files = {f"mark{n}.jpg": f"a sun{m}set over the bay" for n, m in enumerate(marks)}
    files.update({"plain.jpg": "a sunset over the bay", "apart.jpg": "the sun set early",
                  "code.jpg": f"invoice INV{code_mark}4711", **others})
    return files, _library(db, files), sorted([n for n in files if n.startswith("mark")] + ["plain.jpg"])


def _joined_both_ways(db, ids, marks, partial_last, sunsets):
    """`sunset` finds the files `sunsets` (captions `a sun<mark>set over the bay` and the plain one), and so does the
    word typed with each mark inside it, around it, or in a phrase; `"sun set"` is still two words (apart.jpg)."""
    assert _found(db, ids, "sunset", partial_last) == sunsets
    for m in marks:
        for text in (f"sun{m}set", f'"a sun{m}set"', f"{m}sunset{m}"):
            assert _found(db, ids, text, partial_last) == sunsets, (ascii(m), ascii(text))
    assert _found(db, ids, '"sun set"', partial_last) == ["apart.jpg"]


# Zero width space, zero width non-joiner and joiner, word joiner, BOM, soft hyphen: invisible inside a word
ZERO_WIDTH = ("\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "\u00ad")


def test_a_zero_width_character_inside_a_word_cuts_it_neither_in_the_text_nor_in_the_query(tmp_path):
    """unicode61 takes a format character (Cf) for a separator: a caption `sun<U+200B>set` (a web page's or a PDF's
    text pasted in) was the words `sun` `set`, so `sunset` missed it; a query typed with one was the phrase `sun set`
    and missed the plain caption. Both sides drop them now (keywords.narrow): each finds the other, the default
    mode's match check agrees, and a code cut so is found whole (the trigram index's text too)."""
    db = tmp_path / "catalog.db"
    files, ids, sunsets = _sunset_library(db, ZERO_WIDTH, "\u200b", {
        "persian.jpg": "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645",  # a ZWNJ inside a Persian word
        "books.jpg": "\u06a9\u062a\u0627\u0628\u200c\u0647\u0627 \u0631\u0648\u06cc \u0645\u06cc\u0632",
        "german.jpg": "die Auf\u200clage"})  # a ZWNJ that only breaks a ligature
    for partial_last in (False, True):
        def kw(text):
            return _found(db, ids, text, partial_last)

        _joined_both_ways(db, ids, ZERO_WIDTH, partial_last, sunsets)
        assert kw("INV4711") == kw("INV\u20604711") == kw("4711") == ["code.jpg"]
        # a ZWNJ between Arabic-script letters parts a Persian stem from its affixes, as unicode61 and Lucene's
        # Persian analyzer part them: the stem finds the word (کتاب, book: کتاب‌ها, books), and the word typed with
        # its ZWNJ or a space finds it; elsewhere a ZWNJ is dropped (Auf<U+200C>lage is Auflage)
        assert kw("\u06a9\u062a\u0627\u0628") == kw("\u0647\u0627") == ["books.jpg"]
        assert kw("\u06a9\u062a\u0627\u0628\u200c\u0647\u0627") == kw("\u06a9\u062a\u0627\u0628 \u0647\u0627") == ["books.jpg"]
        assert kw("\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645") == kw("\u062e\u0648\u0627\u0647\u0645") == ["persian.jpg"]
        assert kw("Auflage") == kw("Auf\u200clage") == ["german.jpg"]
    # the default mode keeps a keyword match only where the caption holds it (evidence): it must agree
    for text in files.values():
        if "sun" in text and "bay" in text:
            assert keywords.evidence(keywords.parse("sunset", partial_last=True), text), repr(text)
            assert keywords.evidence(keywords.parse("sun\u200bset"), text.replace("\u00ad", "")), repr(text)
    assert not keywords.evidence(keywords.parse("sunset"), "the sun set early")
    assert keywords.spaced("sun\u200bset") == "sunset" == keywords.narrow("\ufeffsun\u2060set")
    # verify names keyword rows an older writer cut at a format character; a Persian ZWNJ is cut there still
    assert keywords.holds_format("sun\u200bset") and not keywords.holds_format("\u06a9\u062a\u0627\u0628\u200c\u0647\u0627")


@pytest.mark.slow
def test_keyword_rows_an_older_writer_cut_at_a_zero_width_character_are_found_by_verify_and_written_again(
        indexed_images):
    """An index written before zero-width characters were dropped holds `sun<U+200B>set` as `sun` `set` (FTS5 keeps
    the text it was given): no schema step rewrites it (derived data: a scan of every row). verify names those rows
    in a note (exit 0: searches answer), and --repair writes only them again, after which `sunset` finds them."""
    import json

    from conftest import run

    _, ix = indexed_images(3)
    caption = "a sun\u200bset over the bay"
    db = catalog.connect(ix / "catalog.db")
    with db.begin() as conn:  # a caption as the previous writer wrote it: its keyword row kept the character
        (fid, relpath), *_ = conn.exec_driver_sql("SELECT id, relpath FROM files ORDER BY id").all()
        catalog.set_photo(conn, fid, relpath, {"caption": caption})
        conn.exec_driver_sql(f"UPDATE {catalog.KEYWORDS} SET body = ? WHERE rowid = ?",
                             (catalog.keyword_text(relpath, caption), fid))
    db.dispose()

    def found(text):
        hits = json.loads(run("query", text, "--mode", "keyword", "--json", "--index", ix).stdout)["results"]
        return [h["relpath"] for h in hits]

    assert found("sunset") == []  # what such an index answers until it is repaired
    report = json.loads(run("verify", "--index", ix, "--json", "--skip-model").stdout)
    assert report["ok"] and any("keyword rows of 1 files hold zero-width" in n for n in report["notes"]), report
    repaired = json.loads(run("verify", "--index", ix, "--json", "--skip-model", "--repair").stdout)
    assert any("keyword rows of 1 files" in line for line in repaired["repaired"]), repaired
    assert found("sunset") == found("sun\u200bset") == [relpath]
    report = json.loads(run("verify", "--index", ix, "--json", "--skip-model").stdout)
    assert report["ok"] and not any("zero-width" in n for n in report["notes"]), report


# Invisible characters of Unicode's Default_Ignorable_Code_Point that are no format character (Cf): variation
# selectors (VS1, VS16, VS17: Mn), the combining grapheme joiner (Mn), a Mongolian free variation selector (Mn), the
# Hangul fillers (Lo)
IGNORABLE = ("\ufe00", "\ufe0f", "\U000e0100", "\u034f", "\u180b", "\u115f", "\u1160", "\u3164", "\uffa0")


def test_an_invisible_mark_or_filler_inside_a_word_cuts_it_neither_in_the_text_nor_in_the_query(tmp_path):
    """unicode61 took a variation selector or the grapheme joiner (Mn) for a separator and a Hangul filler (Lo) for a
    letter: a caption `sun<U+FE0F>set` was `sun` `set`, `sun<U+3164>set` one word no plain query found, and each typed
    so missed the plain caption. Both sides drop them as format characters (keywords.narrow, _DEFAULT_IGNORABLE);
    visible marks (Devanagari and Thai vowel signs, Arabic harakat, accents, Hangul) and emoji stay as they were."""
    db = tmp_path / "catalog.db"
    _, ids, sunsets = _sunset_library(db, IGNORABLE, "\ufe0f", {
        "korean.jpg": "\uc11c\uc6b8\u3164\uc5d0\uc11c", "heart.jpg": "I \u2764\ufe0f Paris",
        "hindi.jpg": "\u0939\u093f\u0928\u094d\u0926\u0940 \u092d\u093e\u0937\u093e",  # हिन्दी भाषा
        "thai.jpg": "\u0e02\u0e49\u0e32\u0e27", "arabic.jpg": "\u0643\u064e\u062a\u064e\u0628\u064e"})
    for partial_last in (False, True):
        def kw(text):
            return _found(db, ids, text, partial_last)

        _joined_both_ways(db, ids, IGNORABLE, partial_last, sunsets)
        assert kw("INV4711") == kw("INV\ufe0f4711") == kw("4711") == ["code.jpg"]
        assert kw("\uc11c\uc6b8\uc5d0\uc11c") == kw("\uc11c\uc6b8") == ["korean.jpg"]  # 서울에서, 서울
        assert kw("Paris") == kw("\u2764\ufe0fParis") == ["heart.jpg"]
        assert kw("\u0939\u093f\u0928\u094d\u0926\u0940") == ["hindi.jpg"]
        assert kw("\u0e02\u0e49\u0e32\u0e27") == ["thai.jpg"] and kw("\u0e02\u0e48\u0e32\u0e27") == []  # ข้าว, ข่าว
        assert kw("\u0643\u064e\u062a\u064e\u0628\u064e") == ["arabic.jpg"]  # harakat typed as written
    assert keywords.evidence(keywords.parse("sunset", partial_last=True), "sun\u3164set")
    assert keywords.evidence(keywords.parse("sun\ufe0fset"), "sunset")
    # visible marks and the emoji's own character are kept; only the invisible ones go
    for text in ("\u0939\u093f\u0928\u094d\u0926\u0940", "\u0e02\u0e49\u0e32\u0e27", "\u0643\u064e\u062a\u064e\u0628\u064e",
                 "Cafe\u0301", "\uc11c\uc6b8", "\u1100\u1161", "\u2800"):
        assert keywords.narrow(text) == text, repr(text)
    assert keywords.narrow("\u2764\ufe0f") == "\u2764" and keywords.narrow("\u845b\U000e0100") == "\u845b"
    # verify names an older writer's rows where such a character sits in or beside a word, not an emoji's selector
    assert keywords.holds_format("sun\ufe0fset") and keywords.holds_format("\uc11c\uc6b8\u3164")
    assert not keywords.holds_format("I \u2764\ufe0f Paris") and not keywords.holds_format("\u3164 \u3164\u3164")


def test_keyword_rows_an_older_writer_wrote_with_an_invisible_mark_are_named_and_written_again(tmp_path):
    """An older writer's row keeps `sun<U+FE0F>set` (`sun` `set`) and `서울<U+3164>` (a word no query finds): no
    schema step, as for format characters: catalog.format_split_keywords names them (verify's note) and
    refresh_keywords (verify --repair) writes them right; a row whose emoji carries VS16 reads the same, not named."""
    db_path = tmp_path / "catalog.db"
    files = {"vs.jpg": "a sun\ufe0fset", "filler.jpg": "\uc11c\uc6b8\u3164", "heart.jpg": "I \u2764\ufe0f Paris"}
    ids = _library(db_path, files)
    db = catalog.connect(db_path)
    with db.begin() as conn:  # the rows as the previous writer wrote them: the characters kept
        for name, caption in files.items():
            conn.exec_driver_sql(f"UPDATE {catalog.KEYWORDS} SET body = ? WHERE rowid = ?",
                                 (catalog.keyword_text(name, caption), ids[name]))
    db.dispose()
    assert _found(db_path, ids, "sunset") == [] and _found(db_path, ids, '"\uc11c\uc6b8"') == []
    db = catalog.connect(db_path)
    with db.begin() as conn:
        split = catalog.format_split_keywords(conn)
        assert sorted(split) == sorted([ids["vs.jpg"], ids["filler.jpg"]])
        catalog.refresh_keywords(conn, split)
        assert catalog.format_split_keywords(conn) == []
    db.dispose()
    assert _found(db_path, ids, "sunset") == ["vs.jpg"] and _found(db_path, ids, '"\uc11c\uc6b8"') == ["filler.jpg"]


# Captions with combining marks: Arabic with harakat (kataba: he wrote the lesson), without (kutub: old books) and with
# the tatweel (maktaba: library); Hebrew pointed (shalom aleichem); Hindi with a conjunct (हिन्दी भाषा, the Hindi
# language); दिल (heart) and दाल (lentils), two words of the same letters and other vowel signs.
MARKED = {"kataba.jpg": "\u0643\u064e\u062a\u064e\u0628\u064e \u0627\u0644\u062f\u0651\u064e\u0631\u0652\u0633\u064e",
          "kutub.jpg": "\u0643\u062a\u0628 \u0642\u062f\u064a\u0645\u0629",
          "maktaba.jpg": "\u0645\u0640\u0643\u0640\u062a\u0640\u0628\u0640\u0629",
          "shalom.jpg": "\u05e9\u05c1\u05b8\u05dc\u05d5\u05b9\u05dd \u05e2\u05b2\u05dc\u05b5\u05d9\u05db\u05b6\u05dd",
          "hindi.jpg": "\u0939\u093f\u0928\u094d\u0926\u0940 \u092d\u093e\u0937\u093e",
          "heart.jpg": "\u0926\u093f\u0932", "lentils.jpg": "\u0926\u093e\u0932"}
KATABA, KUTUB, DARS, MAKTABA = ("\u0643\u064e\u062a\u064e\u0628\u064e", "\u0643\u062a\u0628", "\u0627\u0644\u062f\u0631\u0633",
                                "\u0645\u0643\u062a\u0628\u0629")
SHALOM, SHALOM_POINTED = "\u05e9\u05dc\u05d5\u05dd", "\u05e9\u05c1\u05b8\u05dc\u05d5\u05b9\u05dd"
CHAKMA = "\U0001110c\U0001110b\U00011134\U0001111f\U00011133\U00011126"  # 𑄌𑄋𑄴𑄟𑄳𑄦, Changma (Chakma)
HINDI, DIL, DAL = "\u0939\u093f\u0928\u094d\u0926\u0940", "\u0926\u093f\u0932", "\u0926\u093e\u0932"


def test_a_word_with_combining_marks_is_one_word_and_arabic_and_hebrew_are_found_without_their_points(tmp_path):
    """unicode61 took every combining mark (Mn, Mc) but Thai's and Lao's for a separator: `हिन्दी` was `ह` `न` `द`, so
    the fragment `न्दी` found it and `दिल` (heart) found `दाल` (lentils), and a vocalised Arabic word was its letters
    apart, found by no bare `كتب`. Now a mark is part of its word, and Arabic harakat, Hebrew points and the tatweel are
    dropped on both sides, as accents are (`كتب` finds `كَتَبَ` and the other way round)."""
    db = tmp_path / "catalog.db"
    files = {**MARKED, "braille.jpg": "a sun\u2800set", "stray.jpg": "red \u0301 kite", "plain.jpg": "a white wall",
             "chakma.jpg": CHAKMA}  # marks above U+FFFF (keywords._words_in)
    ids = _library(db, files)
    for partial_last in (False, True):  # keyword mode, and the default mode's keyword half
        def kw(text):
            return _found(db, ids, text, partial_last)

        assert kw(KUTUB) == kw(KATABA) == ["kataba.jpg", "kutub.jpg"]  # was kutub.jpg, and kataba.jpg
        assert kw(DARS) == ["kataba.jpg"] and kw(MAKTABA) == ["maktaba.jpg"]  # shadda and sukun; the tatweel
        assert kw(SHALOM) == kw(SHALOM_POINTED) == ["shalom.jpg"]  # was [], and shalom.jpg
        assert kw(HINDI) == kw(f'"{HINDI} \u092d\u093e\u0937\u093e"') == ["hindi.jpg"]
        assert kw("\u0928\u094d\u0926\u0940") == []  # न्दी, the half of हिन्दी after its virama: was hindi.jpg
        assert kw(DIL) == ["heart.jpg"] and kw(DAL) == ["lentils.jpg"]  # each was both
        assert kw(CHAKMA) == ["chakma.jpg"] and kw(CHAKMA[-3:]) == []  # its end after a virama: was chakma.jpg
        # The braille blank (U+2800) is a blank: it parts words, as a space does, and is not dropped as the invisible
        # characters are (it is no Default_Ignorable_Code_Point: it is drawn, an empty cell as wide as a letter)
        assert kw("sun") == kw('"sun set"') == ["braille.jpg"] and kw("sunset") == []
        # an accent with no letter before it is no word (as a separator, before): the phrase holds across it
        assert kw('"red kite"') == ["stray.jpg"]
    reader = catalog.connect(db, readonly=True)
    with reader.connect() as conn:  # the default mode's keyword list: the caption's evidence, as the index found it
        for typed, names in ((KUTUB, ["kataba.jpg", "kutub.jpg"]), (SHALOM, ["shalom.jpg"]), (DIL, ["heart.jpg"]),
                             (HINDI, ["hindi.jpg"]), (MAKTABA, ["maktaba.jpg"])):
            auto = keywords.search(conn, keywords.parse(typed, partial_last=True), 10, evidence_only=True)
            assert sorted(n for n, i in ids.items() if i in {f for f, _ in auto}) == names, typed
    reader.dispose()
    assert keywords.spaced(MARKED["kataba.jpg"]) == f"{KUTUB} {DARS}" and keywords.spaced(SHALOM_POINTED) == SHALOM
    assert [a.tokens for a in keywords.parse(f"{HINDI} {DIL}").positive()] == [(HINDI,), (DIL,)]


def test_a_schema_15_keyword_index_finds_words_with_marks_once_its_next_writer_upgrades_it(tmp_path):
    """A schema-15 index holds words cut at their marks, the harakat and points kept (its tokenizer took the marks for
    separators); a reader reads it as it stands (a word typed as written still found), and the next writer makes the
    keyword index again (step 16): then `كتب` finds `كَتَبَ` and `दिल` no longer finds `दाल`."""
    db_path = tmp_path / "catalog.db"
    ids = _older_library(db_path, MARKED, 15, keywords.THAI_MARKS + keywords.LAO_MARKS)  # Thai and Lao marks only, the points kept
    assert _version(db_path) == 15
    # as it stands: typed as written, each still finds its caption (its letters apart, as the old index holds them)
    for typed, name in ((KATABA, "kataba.jpg"), (SHALOM_POINTED, "shalom.jpg"), (HINDI, "hindi.jpg")):
        assert name in _found(db_path, ids, typed, readonly=True), typed
    assert _found(db_path, ids, KUTUB, readonly=True) == ["kutub.jpg"]
    catalog.connect(db_path).dispose()  # a writer: upgraded
    assert _version(db_path) == migrate.LATEST
    assert _found(db_path, ids, KUTUB, readonly=True) == ["kataba.jpg", "kutub.jpg"]
    assert _found(db_path, ids, SHALOM, readonly=True) == ["shalom.jpg"]
    assert _found(db_path, ids, DIL, readonly=True) == ["heart.jpg"]
    assert _found(db_path, ids, "\u0928\u094d\u0926\u0940", readonly=True) == []


def test_a_khmer_or_myanmar_word_is_found_inside_the_longer_run_it_is_written_in_and_its_marks_tell_words_apart(
        tmp_path):
    """Khmer and Myanmar are written without spaces between words, with marks after their letters: unicode61 cut a run
    at every mark, so `ទឹក` (water) typed was the phrase `ទ` `ក`, which `ទឹកស្អាត` (held as `ទ` `កស` ...) did not hold,
    and `ទូក` (boat) the same phrase; `ကား` (car) was `က`, a lone letter no query keeps: each found nothing. With marks
    part of a word, a run would be one token found only whole (`ភ្នំពេញ`, Phnom Penh, in `រាជធានីភ្នំពេញ`, the capital
    Phnom Penh, was found before, as a phrase of bare letters); a letter with its marks is a token, as in Thai."""
    db = tmp_path / "catalog.db"
    ids = _library(db, {"capital.jpg": "\u179a\u17b6\u1787\u1792\u17b6\u1793\u17b8\u1797\u17d2\u1793\u17c6\u1796\u17c1\u1789",
                        "water.jpg": "\u1791\u17b9\u1780\u179f\u17d2\u17a2\u17b6\u178f",  # ទឹកស្អាត, clean water
                        "boat.jpg": "\u1791\u17bc\u1780\u178f\u17bc\u1785",  # ទូកតូច, a small boat
                        "car.jpg": "\u1000\u102c\u1038\u1021\u101e\u1005\u103a",  # ကားအသစ်, a new car
                        "nine.jpg": "\u1000\u102d\u102f\u1038\u1014\u102c\u101b\u102e",  # ကိုးနာရီ, nine o'clock
                        "yangon.jpg": "\u101b\u1014\u103a\u1000\u102f\u1014\u103a\u1019\u103c\u102d\u102f\u1037"})
    water = "\u1791\u17b9\u1780"
    for partial_last in (False, True):
        def kw(text):
            return _found(db, ids, text, partial_last)

        assert kw("\u1797\u17d2\u1793\u17c6\u1796\u17c1\u1789") == ["capital.jpg"]  # ភ្នំពេញ
        assert kw(water) == ["water.jpg"] and kw("\u1791\u17bc\u1780") == ["boat.jpg"]  # each was []
        assert kw("\u1000\u102c\u1038") == ["car.jpg"]  # ကား: was []
        assert kw("\u101b\u1014\u103a\u1000\u102f\u1014\u103a") == ["yangon.jpg"]  # ရန်ကုန်, Yangon
    assert keywords.evidence(keywords.parse(water), "\u1791\u17b9\u1780\u179f\u17d2\u17a2\u17b6\u178f")
    assert not keywords.evidence(keywords.parse(water), "\u1791\u17bc\u1780\u178f\u17bc\u1785")


# Hindi words with and without the nukta: बाज़ार (market) as written, बाजार as mostly typed; क़लम (pen) with the
# precomposed क़ (U+0958, a composition exclusion: NFC writes it क and the nukta); ग़ज़ल (ghazal) bare; Bengali ড়াকা
# written ড় U+09DC; Gurmukhi ਜ਼ਮੀਨ (land) with ਜ਼ U+0A5B.
BAZAAR, BAZAAR_BARE = "\u092c\u093e\u091c\u093c\u093e\u0930", "\u092c\u093e\u091c\u093e\u0930"
QALAM, QALAM_BARE = "\u0958\u0932\u092e", "\u0915\u0932\u092e"
GHAZAL, GHAZAL_BARE = "\u0917\u093c\u091c\u093c\u0932", "\u0917\u091c\u0932"
ZAMEEN, ZAMEEN_BARE = "\u0a5b\u0a2e\u0a40\u0a28", "\u0a1c\u0a2e\u0a40\u0a28"
NUKTA = {"bazaar.jpg": f"{BAZAAR} \u092e\u0947\u0902", "pen.jpg": QALAM, "ghazal.jpg": GHAZAL_BARE,
         "land.jpg": ZAMEEN, "other.jpg": "\u0915\u092e\u0932"}  # कमल (lotus): the letters of कलम in another order


def test_the_indic_nukta_is_dropped_from_the_text_and_the_query_alike():
    """The nukta (Devanagari to Kannada) is dropped as the harakat are, precomposed letters with it too (NFC writes
    them apart): it was kept, so `बाजार` was another word than `बाज़ार`."""
    assert keywords.spaced(BAZAAR) == BAZAAR_BARE and keywords.spaced(QALAM) == QALAM_BARE
    assert keywords.spaced("\u0915\u093c\u0932\u092e") == QALAM_BARE  # क़ written as क and the nukta
    assert keywords.spaced(ZAMEEN) == ZAMEEN_BARE and keywords.spaced("\u09dc") == "\u09a1"  # ড় U+09DC: ড
    for sign in ("\u093c", "\u09bc", "\u0a3c", "\u0abc", "\u0b3c", "\u0c3c", "\u0cbc"):
        assert keywords.spaced("\u0915" + sign) == "\u0915", hex(ord(sign))
    assert keywords.spaced("\u0a9c\u0afd") == "\u0a9c\u0afd"  # Gujarati's three-dot nukta tells a letter apart: kept
    # the list is written out (Python 3.10's Unicode 13 lacks U+0C3C); it is every "SIGN NUKTA" a newer Unicode names
    if tuple(map(int, unicodedata.unidata_version.split("."))) >= (14,):
        assert set(keywords.INDIC_NUKTAS) == {c for c in range(0x0900, 0x0D00)
                                              if unicodedata.name(chr(c), "").endswith(" SIGN NUKTA")}
    assert [a.tokens for a in keywords.parse(f"{BAZAAR} {QALAM}").positive()] == [(BAZAAR_BARE,), (QALAM_BARE,)]


def test_a_hindi_word_is_found_typed_with_or_without_its_nukta(tmp_path):
    """`बाजार` typed without the nukta, as Hindi mostly is, found no `बाज़ार`, nor `बाज़ार` a `बाजार`; the precomposed `क़`
    (U+0958) and `क` with the nukta typed apart find each other and the bare word."""
    db = tmp_path / "catalog.db"
    ids = _library(db, NUKTA)
    for partial_last in (False, True):  # keyword mode, and the default mode's keyword half
        def kw(text):
            return _found(db, ids, text, partial_last)

        assert kw(BAZAAR) == kw(BAZAAR_BARE) == ["bazaar.jpg"]  # was bazaar.jpg, and []
        assert kw(QALAM) == kw(QALAM_BARE) == kw("\u0915\u093c\u0932\u092e") == ["pen.jpg"]  # was [], [] and pen.jpg
        assert kw(GHAZAL) == kw(GHAZAL_BARE) == ["ghazal.jpg"]  # was [], and ghazal.jpg
        assert kw(ZAMEEN_BARE) == kw(ZAMEEN) == ["land.jpg"]
        assert kw(f'"{BAZAAR_BARE} \u092e\u0947\u0902"') == ["bazaar.jpg"]
    reader = catalog.connect(db, readonly=True)
    with reader.connect() as conn:  # the default mode's keyword list: the caption's evidence, as the index found it
        for typed, names in ((BAZAAR_BARE, ["bazaar.jpg"]), (QALAM_BARE, ["pen.jpg"]), (GHAZAL, ["ghazal.jpg"])):
            auto = keywords.search(conn, keywords.parse(typed, partial_last=True), 10, evidence_only=True)
            assert sorted(n for n, i in ids.items() if i in {f for f, _ in auto}) == names, typed
    reader.dispose()


def test_a_schema_17_keyword_index_finds_a_word_without_its_nukta_once_its_next_writer_upgrades_it(tmp_path):
    """A schema-17 index holds `बाज़ार` with its nukta; a reader reads it as it stands (typed as written, with the nukta,
    still found: the query also looks for the word as typed), and the next writer writes the keyword index again
    (step 18): then `बाजार` finds it."""
    db_path = tmp_path / "catalog.db"
    ids = _library(db_path, NUKTA)
    with sqlite3.connect(db_path) as conn:  # each row as schema 17 wrote it: composed, the nukta kept
        for name, caption in NUKTA.items():
            conn.execute(f"UPDATE {catalog.KEYWORDS} SET body = ? WHERE rowid = ?",
                         (unicodedata.normalize("NFC", catalog.keyword_text(name, caption)), ids[name]))
        conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", ("17",))
    conn.close()
    assert _version(db_path) == 17
    assert _found(db_path, ids, BAZAAR, readonly=True) == ["bazaar.jpg"]  # as typed, as written
    assert _found(db_path, ids, BAZAAR_BARE, readonly=True) == []  # as it stands: a reader writes nothing
    catalog.connect(db_path).dispose()  # a writer: upgraded
    assert _version(db_path) == migrate.LATEST >= 18
    assert _found(db_path, ids, BAZAAR_BARE, readonly=True) == _found(db_path, ids, BAZAAR, readonly=True) == ["bazaar.jpg"]
    assert _found(db_path, ids, QALAM_BARE, readonly=True) == ["pen.jpg"]


# Arabic and Persian words written with a letter variant, and as typed without it (schema 20): أسد (lion) with the hamza,
# اسد typed; آثار (ruins) with the madda; ٱبن (son) with the wasla; مستشفى (hospital) with alef maqsura, typed with yeh;
# سيارة (car) with teh marbuta, typed with heh; Persian کتاب (book) and ایران with Persian keheh and yeh, typed on an
# Arabic keyboard; خانۀ (house of) with heh-yeh; بحر (sea) has no variant.
VARIANTS = {"lion.jpg": "\u0623\u0633\u062f", "ruins.jpg": "\u0622\u062b\u0627\u0631", "son.jpg": "\u0671\u0628\u0646",
            "hospital.jpg": "\u0645\u0633\u062a\u0634\u0641\u0649", "car.jpg": "\u0633\u064a\u0627\u0631\u0629",
            "book.jpg": "\u06a9\u062a\u0627\u0628", "iran.jpg": "\u0627\u06cc\u0631\u0627\u0646",
            "house.jpg": "\u062e\u0627\u0646\u06c0", "sea.jpg": "\u0628\u062d\u0631"}
TYPED = {"lion.jpg": "\u0627\u0633\u062f", "ruins.jpg": "\u0627\u062b\u0627\u0631", "son.jpg": "\u0627\u0628\u0646",
         "hospital.jpg": "\u0645\u0633\u062a\u0634\u0641\u064a", "car.jpg": "\u0633\u064a\u0627\u0631\u0647",
         "book.jpg": "\u0643\u062a\u0627\u0628", "iran.jpg": "\u0627\u064a\u0631\u0627\u0646",
         "house.jpg": "\u062e\u0627\u0646\u0647", "sea.jpg": "\u0628\u062d\u0631"}


def test_arabic_and_persian_letter_variants_are_one_letter_in_the_text_and_the_query_alike():
    """The alef with a hamza, madda or wasla is the alef; alef maqsura is yeh, teh marbuta heh; Persian yeh, yeh barree,
    keheh, heh-yeh and heh goal the Arabic letters (as Lucene's Arabic and Persian normalizers make them): they were
    kept, so `اسد` was another word than `أسد`."""
    for name, written in VARIANTS.items():
        assert keywords.spaced(written) == TYPED[name], name
    assert keywords.spaced("\u0625\u0628\u0631\u064a\u0642") == "\u0627\u0628\u0631\u064a\u0642"  # إبريق: hamza below
    assert keywords.spaced("\u0627\u0654") == "\u0627"  # ا and a hamza typed apart: NFC makes أ, then ا
    assert keywords.spaced("\u06d2\u06c1") == "\u064a\u0647"  # Urdu yeh barree and heh goal
    assert [a.tokens for a in keywords.parse(VARIANTS["lion.jpg"]).positive()] == [(TYPED["lion.jpg"],)]


def test_an_arabic_or_persian_word_is_found_typed_with_or_without_its_letter_variant(tmp_path):
    """`اسد` typed without the hamza found no `أسد`, nor `أسد` an `اسد`; `كتاب` on an Arabic keyboard no Persian `کتاب`."""
    db = tmp_path / "catalog.db"
    ids = _library(db, VARIANTS)
    for partial_last in (False, True):  # keyword mode, and the default mode's keyword half
        for name in VARIANTS:
            assert _found(db, ids, TYPED[name], partial_last) == _found(db, ids, VARIANTS[name], partial_last) == [name]
    reader = catalog.connect(db, readonly=True)
    with reader.connect() as conn:  # the default mode's keyword list: the caption's evidence, as the index found it
        for name in VARIANTS:  # house.jpg: NFKD writes ۀ as ە (U+06D5) and a hamza, no ه, where NFC makes it ۀ: ه
            for typed in (TYPED[name], VARIANTS[name]):
                auto = keywords.search(conn, keywords.parse(typed, partial_last=True), 10, evidence_only=True)
                assert [n for n, i in ids.items() if i in {f for f, _ in auto}] == [name], typed
    reader.dispose()
    assert keywords.evidence(keywords.parse(TYPED["ruins.jpg"]), VARIANTS["ruins.jpg"])


# Lone CJK characters (schema 20): 〇 (U+3007) in a year; ⼭ (Kangxi radical U+2F2D, as a PDF's text layer writes 山);
# ⺮ (the bamboo radical U+2EAE, no ideograph NFKC makes it); Extension B ideographs next to each other (𩸽 hokke, 𠮷).
LONE = {"year.jpg": "\u4e8c\u3007\u4e8c\u56db\u5e74", "zeros.jpg": "\u3007\u3007", "mountain.jpg": "\u2f2d",
        "bamboo.jpg": "\u2eae", "fish.jpg": "\U00029e3d\U00020bb7", "sea.jpg": "\u6d77"}


def test_a_lone_ideographic_zero_or_radical_is_a_word():
    """〇 and a radical were dropped as lone letters (a radical, So, was no word at all); a Kangxi radical is the
    ideograph NFKC makes it."""
    assert [a.tokens for a in keywords.parse("\u3007 \u2eae").positive()] == [("\u3007",), ("\u2eae",)]
    assert [a.tokens for a in keywords.parse("\u2f2d").positive()] == [("\u5c71",)]  # ⼭ is 山
    assert keywords.spaced("\u3007\u3007").split() == ["\u3007", "\u3007"]


def test_a_lone_ideographic_zero_or_radical_is_found_in_a_caption(tmp_path):
    db = tmp_path / "catalog.db"
    ids = _library(db, LONE)
    for partial_last in (False, True):
        def kw(text):
            return _found(db, ids, text, partial_last)

        assert kw("\u3007") == ["year.jpg", "zeros.jpg"]  # was []: dropped
        assert kw("\u5c71") == kw("\u2f2d") == ["mountain.jpg"]  # was [], []
        assert kw("\u2eae") == ["bamboo.jpg"]  # was []
        assert kw("\u6d77") == ["sea.jpg"]
    assert keywords.evidence(keywords.parse("\u5c71"), LONE["mountain.jpg"])


def test_an_astral_ideograph_is_found_alone_inside_a_run_of_them(tmp_path):
    """Extension B ideographs next to each other were one token (`𩸽𠮷`), so `𩸽` alone found nothing there; spaced as
    the BMP's Han is, each is a token and the run a phrase of them."""
    db = tmp_path / "catalog.db"
    ids = _library(db, {n: LONE[n] for n in ("fish.jpg", "sea.jpg")} | {"yoshinoya.jpg": "\U00020bb7\u91ce\u5bb6"})
    for partial_last in (False, True):
        assert _found(db, ids, "\U00029e3d", partial_last) == ["fish.jpg"]  # was []
        assert _found(db, ids, "\U00020bb7", partial_last) == ["fish.jpg", "yoshinoya.jpg"]  # was yoshinoya.jpg
        assert _found(db, ids, "\U00029e3d\U00020bb7", partial_last) == ["fish.jpg"]
    assert keywords.evidence(keywords.parse("\U00029e3d"), LONE["fish.jpg"])


def test_a_schema_19_keyword_index_finds_letter_variants_and_lone_cjk_characters_once_its_next_writer_upgrades_it(
        tmp_path):
    """A schema-19 index holds `أسد` with its hamza, `𩸽𠮷` one token and no radical (its tokenizer took them for
    separators); a reader reads it as it stands (typed as written, still found), and the next writer makes the keyword
    index again (step 20): then `اسد`, `𩸽` and `⺮` find theirs."""
    db_path = tmp_path / "catalog.db"
    files = {**VARIANTS, **{n: c for n, c in LONE.items() if n in ("fish.jpg", "bamboo.jpg", "mountain.jpg")}}
    ids = _library(db_path, files)
    with sqlite3.connect(db_path) as conn:  # as schema 19 made and wrote it: its tokenizer, each text composed
        conn.execute(f"DROP TABLE {catalog.KEYWORDS}")
        conn.execute(f"CREATE VIRTUAL TABLE {catalog.KEYWORDS} USING "
                     "fts5(body, tokenize = \"unicode61 remove_diacritics 2 categories 'L* N* Co Mn Mc'\")")
        for name, caption in files.items():
            conn.execute(f"INSERT INTO {catalog.KEYWORDS}(rowid, body) VALUES (?, ?)",
                         (ids[name], unicodedata.normalize("NFC", catalog.keyword_text(name, caption))))
        conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", ("19",))
    conn.close()
    assert _version(db_path) == 19
    assert _found(db_path, ids, VARIANTS["lion.jpg"], readonly=True) == ["lion.jpg"]  # as typed, as written
    assert _found(db_path, ids, "\U00029e3d\U00020bb7", readonly=True) == ["fish.jpg"]
    for typed in (TYPED["lion.jpg"], TYPED["book.jpg"], "\U00029e3d", "\u2eae", "\u5c71"):  # a reader writes nothing
        assert _found(db_path, ids, typed, readonly=True) == [], typed
    catalog.connect(db_path).dispose()  # a writer: upgraded
    assert _version(db_path) == migrate.LATEST >= 20
    for name in VARIANTS:
        assert _found(db_path, ids, TYPED[name], readonly=True) == [name]
    assert _found(db_path, ids, "\U00029e3d", readonly=True) == ["fish.jpg"]
    assert _found(db_path, ids, "\u2eae", readonly=True) == ["bamboo.jpg"]
    assert _found(db_path, ids, "\u5c71", readonly=True) == ["mountain.jpg"]
