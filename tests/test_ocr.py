"""Issue 28: text in images (`index --ocr`) and keyword search the way people type it."""

import hashlib
import importlib.util
import json
import os
import sqlite3

import pytest
from conftest import index_json, run
from helpers import alignsearch as alignsearch_cli
from helpers import call, render_sign, scene_frame, start_serve, stop
from PIL import Image, ImageDraw, ImageFont

import alignsearch
from alignsearch.storage import keywords, migrate
from alignsearch.errors import BadInputError

# the [ocr] extra (the test extra installs it); keyword search needs no engine
needs_ocr = pytest.mark.skipif(importlib.util.find_spec("rapidocr") is None, reason="pip install '.[ocr]'")


def query(ix, text, *args):
    out = run("query", "--index", ix, "--json", "-k", "10", *args, "--", text).output  # `--`: a text may start with -
    return json.loads(out)["results"]


def names(results):
    return [r["relpath"] for r in results]


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def signs(tmp_path):
    root = tmp_path / "photos"
    render_sign(root / "invoice.png", ["INVOICE INV-4711-A", "Zanzibar Spice Co."])
    render_sign(root / "station.png", ["Platform 9", "Kilimanjaro Express"])
    Image.new("RGB", (320, 240), (40, 120, 60)).save(root / "lawn.jpg")  # no text
    return root


@pytest.mark.slow
@needs_ocr
def test_index_ocr_makes_the_words_on_signs_findable(signs, tmp_path, tiny_model):
    ix = tmp_path / "ix"
    s = index_json(ix, signs, "--model", tiny_model, "--device", "cpu", "--ocr")
    assert s["added"] == 3 and s["ocr"] == {"enabled": True, "read": 3, "with_text": 2}
    assert s["times"]["ocr"] > 0  # the workers' OCR seconds
    found = query(ix, "zanzibar", "--mode", "keyword")
    assert names(found) == ["invoice.png"] and "Zanzibar Spice Co." in found[0]["ocr"]
    assert names(query(ix, "kilimanjaro express", "--mode", "keyword")) == ["station.png"]
    assert names(query(ix, "zanzi*", "--mode", "keyword")) == ["invoice.png"]  # a word's start
    assert names(query(ix, "4711", "--mode", "keyword")) == ["invoice.png"]  # a number inside a code
    # default (auto) and hybrid: the sign ranks first although the tiny random model cannot read it
    assert names(query(ix, "kilimanjaro"))[0] == "station.png"
    assert names(query(ix, "kiliman"))[0] == "station.png"  # the partial last word, as typed
    assert names(query(ix, "spice", "--mode", "hybrid"))[0] == "invoice.png"
    lawn = next(r for r in query(ix, "x", "--mode", "vector") if r["relpath"] == "lawn.jpg")
    assert lawn["ocr"] is None  # read, no text
    hit = alignsearch.open(ix, device="cpu").search(text="platform", mode="keyword")[0]
    assert hit.relpath == "station.png" and "Platform 9" in hit.ocr and "Platform 9" in hit.to_dict()["ocr"]
    proc, url = start_serve(ix, "--token", "t0k")
    try:
        status, _, body = call(url, "/api/search?q=zanzi&k=3", token="t0k")  # the server's default mode: auto
        top = json.loads(body)["results"][0]
        assert status == 200 and top["relpath"] == "invoice.png" and "INV-4711-A" in top["ocr"]
    finally:
        stop(proc)


@pytest.mark.slow
@needs_ocr
def test_the_choice_is_remembered_and_text_follows_the_files(signs, tmp_path, tiny_model):
    ix = tmp_path / "ix"
    index_json(ix, signs, "--model", tiny_model, "--device", "cpu", "--ocr")
    render_sign(signs / "menu.png", ["Mango Lassi 450"])
    s = index_json(ix, "--device", "cpu")  # no flag: the index reads new images as it was told to
    assert s["added"] == 1 and s["ocr"]["enabled"] and s["ocr"]["read"] == 1
    assert names(query(ix, "lassi", "--mode", "keyword")) == ["menu.png"]
    render_sign(signs / "invoice.png", ["RECEIPT 2024", "Serengeti Safari"])  # changed: read again
    os.utime(signs / "invoice.png", (1, 1))
    (signs / "station.png").unlink()  # removed: its text goes with it
    (signs / "menu.png").rename(signs / "drinks.png")  # moved: keeps its text as it keeps its vector, not read again
    s = index_json(ix, "--device", "cpu")
    assert s["updated"] == 1 and s["removed"] == 1 and s["moved"] == 1 and s["ocr"]["read"] == 1
    assert names(query(ix, "lassi", "--mode", "keyword")) == ["drinks.png"]
    assert names(query(ix, "serengeti", "--mode", "keyword")) == ["invoice.png"]
    assert query(ix, "zanzibar", "--mode", "keyword") == [] and query(ix, "kilimanjaro", "--mode", "keyword") == []
    # --no-ocr: new images are not read; the text already read stays searchable
    render_sign(signs / "poster.png", ["Okavango Delta"])
    s = index_json(ix, "--device", "cpu", "--no-ocr")
    assert s["added"] == 1 and s["ocr"] == {"enabled": False, "read": 0, "with_text": 2}
    assert query(ix, "okavango", "--mode", "keyword") == []
    assert names(query(ix, "serengeti", "--mode", "keyword")) == ["invoice.png"]
    s = index_json(ix, "--device", "cpu")  # off is remembered too
    assert not s["ocr"]["enabled"] and query(ix, "okavango", "--mode", "keyword") == []
    s = index_json(ix, "--device", "cpu", "--ocr")  # on again: only the unread image is read
    assert s["ocr"]["read"] == 1 and names(query(ix, "okavango", "--mode", "keyword")) == ["poster.png"]


@pytest.mark.slow
@needs_ocr
def test_an_existing_index_gains_text_without_re_encoding(signs, tmp_path, tiny_model):
    ix = tmp_path / "ix"
    index_json(ix, signs, "--model", tiny_model, "--device", "cpu")
    assert query(ix, "zanzibar", "--mode", "keyword") == []
    before = {p.name: digest(p) for p in ix.iterdir() if p.suffix in (".f16", ".faiss")}
    s = index_json(ix, "--device", "cpu", "--ocr")
    assert s["added"] == s["updated"] == 0 and s["unchanged"] == 3 and s["reused"] == 0
    assert s["times"]["extra"]["ocr_filled"] == 3 and s["times"]["items"] == 0  # nothing went to the encoder
    assert {p.name: digest(p) for p in ix.iterdir() if p.suffix in (".f16", ".faiss")} == before
    assert names(query(ix, "zanzibar", "--mode", "keyword")) == ["invoice.png"]
    assert names(query(ix, "4711", "--mode", "keyword")) == ["invoice.png"]
    assert index_json(ix, "--device", "cpu")["ocr"]["read"] == 0  # nothing is read twice


@pytest.mark.slow
def test_a_missing_engine_is_one_line_naming_the_extra(signs, tmp_path, tiny_model):
    shim = tmp_path / "shim" / "rapidocr"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('rapidocr was removed for this test')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(shim.parent), os.environ.get("PYTHONPATH", "")])}
    proc = alignsearch_cli("index", signs, "--index", tmp_path / "ix", "--model", tiny_model, "--device", "cpu", "--ocr",
                           env=env)
    assert proc.returncode == BadInputError.exit_code
    assert proc.stderr.strip().splitlines() == [("error: text in images needs the OCR engine: pip install "
                                                 "'alignsearch[ocr]'")]
    assert not (tmp_path / "ix" / "vectors.f16").exists()  # refused before anything was encoded


# -- keyword search the way people type it (captions and names, no OCR needed) --------------------------------

@pytest.fixture
def captioned(prebuilt, tiny_model):
    def build(base):
        root = base / "photos"
        root.mkdir()
        captions = {"cat": "Zanzibar the tabby asleep on the sofa", "cafe": "Breakfast at the Café Lisboa",
                    "receipt": "receipt INV4711A paid", "tram": "the yellow tram in Lisbon", "river": "river at dusk, Lisbon"}
        for i, (name, caption) in enumerate(captions.items()):
            Image.new("RGB", (64, 48), (40 * i, 200 - 30 * i, 90)).save(root / f"{name}.jpg")
            (root / f"{name}.txt").write_text(caption)
        ix = base / "ix"
        index_json(ix, root, "--model", tiny_model, "--device", "cpu")
        return ix

    return prebuilt.folder("ocr-captioned", build)[1]


@pytest.mark.slow
def test_prefixes_codes_accents_and_operators(captioned):
    ix = captioned

    def kw(text):
        return sorted(names(query(ix, text, "--mode", "keyword")))

    assert kw("zanzi*") == ["cat.jpg"]
    assert kw("zanzi") == []  # keyword mode takes words as typed...
    assert names(query(ix, "zanzi"))[0] == "cat.jpg"  # ...the default mode takes the last as a start
    plan = json.loads(run("query", "zanzi ", "--index", ix, "--json", "--explain").stdout)["plan"]
    assert plan["words"] == ["zanzi"] and plan["ranking"] == "vector"  # a trailing space: the word is complete
    assert kw("4711") == ["receipt.jpg"] and kw("inv4711") == ["receipt.jpg"]  # inside a token
    assert kw("cafe") == ["cafe.jpg"] and kw("CAFÉ") == ["cafe.jpg"]  # accents and case folded
    assert kw("tram lisbon") == ["river.jpg", "tram.jpg"]  # any of the words
    assert kw("tram AND lisbon") == ["tram.jpg"]
    assert kw("tram OR dusk") == ["river.jpg", "tram.jpg"]
    assert kw("lisbon -tram") == ["river.jpg"]
    assert kw('"yellow tram"') == ["tram.jpg"] and kw('"tram yellow"') == []
    assert kw("-tram") == []  # nothing to look for
    many = " ".join(f"w{i}x AND tram" for i in range(70))  # 1000 characters of atoms, codes among them
    assert query(ix, many, "--mode", "keyword") == []
    plan = json.loads(run("query", "yellow tr", "--index", ix, "--json", "--explain").stdout)["plan"]
    assert plan["words"] == ["yellow", "tr"]  # too short to be taken as a start


def test_parse_rules():
    q = keywords.parse('red AND "old car" OR zanzi* -rust the', partial_last=True)
    assert [[a.text() for a in g] for g in q.groups] == [["red", "old car"], ["zanzi*"]]
    assert [a.text() for a in q.excluded] == ["rust"]
    assert keywords.parse("INV-4711-A").groups[0][0].code == "INV-4711-A"
    assert keywords.parse("kiliman", partial_last=True).words == ["kiliman*"]
    assert keywords.parse("kiliman ", partial_last=True).words == ["kiliman"]
    assert keywords.parse('x" OR ( )"') is not None  # never FTS5 syntax, never an error
    assert len(keywords.parse(" ".join(f"-w{i}x" for i in range(150)) + " tram").excluded) == keywords.MAX_ATOMS
    assert keywords.coded_chunks("INVOICE INV-4711-A, paid 2024.") == "INV-4711-A 2024"


def test_a_version_2_catalog_is_upgraded_in_place(captioned):
    """A catalog written before OCR (schema 2: no photos.ocr, keywords without folded accents, no trigram
    table) is read as it is and upgraded by the next writer, nothing encoded again."""
    ix = captioned
    conn = sqlite3.connect(ix / "catalog.db")
    with conn:
        conn.execute("ALTER TABLE photos DROP COLUMN ocr")
        conn.execute("DROP TABLE keywords")
        conn.execute("DROP TABLE keywords_trigram")
        conn.execute("CREATE VIRTUAL TABLE keywords USING fts5(body)")
        conn.execute("INSERT INTO keywords(rowid, body) SELECT file_id, caption FROM photos")
        conn.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    conn.close()
    # a reader writes nothing: it reads version 2 as it stands
    assert names(query(ix, "lisboa", "--mode", "keyword")) == ["cafe.jpg"] and query(ix, "x")[0]["ocr"] is None
    conn = sqlite3.connect(ix / "catalog.db")
    assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == "2"
    conn.close()
    vectors = digest(ix / "vectors.f16")
    s = index_json(ix, "--device", "cpu")
    assert s["added"] == 0 and digest(ix / "vectors.f16") == vectors
    assert names(query(ix, "cafe", "--mode", "keyword")) == ["cafe.jpg"]  # folded now
    assert names(query(ix, "4711", "--mode", "keyword")) == ["receipt.jpg"]
    conn = sqlite3.connect(ix / "catalog.db")
    assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == str(migrate.LATEST)
    conn.close()


@pytest.mark.slow
def test_any_text_is_a_valid_keyword_query(tmp_path):
    """Whatever people type (quotes, stars, dashes, FTS5 operators, control and non-Latin characters) is a
    query, never an FTS5 syntax error."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from alignsearch.storage import catalog

    db = catalog.connect(tmp_path / "catalog.db")
    with db.begin() as conn:
        file_id = catalog.upsert_file(conn, {"root": "/r", "relpath": "a.jpg", "size": 1, "mtime": 0.0,
                                             "status": catalog.INDEXED})
        catalog.set_photo(conn, file_id, "a.jpg", {"caption": "Zanzibar INV-4711-A \"quoted\" NEAR(a b) *star*",
                                                   "ocr": "Café AND OR NOT"})
    alphabet = st.sampled_from(list('abc zanzibar 4711 -*"()^:+.,AND OR NOT NEAR é ß 漢 \t\n\x00'))

    @settings(max_examples=300, deadline=None)
    @given(st.lists(alphabet, max_size=40).map("".join), st.booleans())
    def check(text, partial):
        with db.connect() as conn:
            found = keywords.search(conn, keywords.parse(text, partial_last=partial), 10)
        assert all(i == file_id for i, _ in found)

    check()
    with db.connect() as conn:
        assert keywords.search(conn, keywords.parse('"near(a" AND 4711 -nothing'), 10)[0][0] == file_id
    db.dispose()


@pytest.mark.slow
@needs_ocr
def test_decode_workers_read_text_and_take_known_text_from_the_initializer(tmp_path):
    """The worker path (more files than a batch): each spawned worker reads text itself, and content whose text
    is known (a moved file) comes with the text it had, without OCR."""
    from alignsearch.media.images import ImageSpec
    from indexer.pipeline import read_items
    from indexer.scan import Found

    signs = [render_sign(tmp_path / f"s{i}.png", [f"Gate B{i}7 Departures"]) for i in range(2)]
    found = [Found(str(tmp_path), p.name, p.stat().st_size, p.stat().st_mtime) for p in signs]
    spec = ImageSpec((32, 32), Image.BICUBIC, None, 1 / 255, False, None, None, None)
    moved = hashlib.sha256(signs[1].read_bytes()).hexdigest()
    items = list(read_items(found, spec, workers=1, ocr=True, ocr_known={moved: "carried over"}))
    assert "Departures" in items[0].ocr and items[0].ocr_seconds > 0
    assert (items[1].ocr, items[1].ocr_seconds) == ("carried over", 0.0)


@needs_ocr
@pytest.mark.slow
def test_ocr_reads_photos_and_leaves_video_moments_alone(tmp_path, tiny_model):
    """Video moments are rows of the catalog too: `--ocr` (and the fill step for an existing index) reads the
    photos only, never a moment's .mp4 as an image, and the videos stay indexed."""
    from helpers import make_video

    lib, ix = tmp_path / "lib", tmp_path / "ix"
    render_sign(lib / "sign.png", ["ZANZIBAR SPICE"])
    make_video(lib / "clip.mp4", [(71, 3), (72, 3)])
    first = index_json(ix, lib, "--model", tiny_model, "--device", "cpu")  # no OCR yet: the fill step reads later
    assert first["failed"] == 0 and first["times"]["extra"]["moments"] == 2, first
    s = index_json(ix, lib, "--ocr", "--model", tiny_model, "--device", "cpu")
    assert s["failed"] == 0 and s["ocr"]["read"] == 1 and s["ocr"]["with_text"] == 1, s
    again = index_json(ix, lib, "--model", tiny_model, "--device", "cpu")
    assert again["ocr"]["read"] == 0 and again["failed"] == 0, again
    hits = json.loads(run("query", "zanzibar", "--index", ix, "--mode", "keyword", "--json").stdout)["results"]
    assert [h["relpath"] for h in hits] == ["sign.png"]


def test_auto_mode_evidence_follows_the_keyword_rules():
    """What counts as keyword evidence in auto mode (a caption, the text read in an image, a tag) is matched
    as the keyword index matches: word starts, folded accents, phrases in order, codes inside tokens."""
    assert keywords.evidence(keywords.parse("zanzi", partial_last=True), "ZANZIBAR SPICE CO.")
    assert not keywords.evidence(keywords.parse("zanzi"), "ZANZIBAR SPICE CO.")  # a whole word, unless typed last
    assert keywords.evidence(keywords.parse("cafe"), "Café du Monde")
    assert keywords.evidence(keywords.parse('"spice co"'), "Zanzibar Spice Co.")
    assert not keywords.evidence(keywords.parse('"co spice"'), "Zanzibar Spice Co.")
    assert keywords.evidence(keywords.parse("4711"), "INVOICE INV-4711-A")
    assert not keywords.evidence(keywords.parse("red car on beach"), "a blue truck\nsunset")
    assert not keywords.evidence(keywords.parse("-red"), "red")  # nothing positive asked


def test_chinese_and_japanese_words_are_found_inside_the_text_they_are_written_in(tmp_path):
    """Chinese and Japanese are written without spaces: the text read on a sign, `東京駅 中央口`, was one token a
    run, so `東京` (Tokyo) found neither the station's sign nor `東京タワー`. A character is a token now; text
    written before (one token a run) is still found whole, and the evidence the default mode fuses agrees."""
    from alignsearch.storage import catalog

    db = catalog.connect(tmp_path / "catalog.db")
    texts = {"station.jpg": "東京駅 中央口", "tower.jpg": "東京タワー", "kyoto.jpg": "京都駅", "cafe.jpg": "Café 東"}
    ids = {}
    with db.begin() as conn:
        for name, text in texts.items():
            ids[catalog.upsert_file(conn, {"root": "/r", "relpath": name, "size": 1, "mtime": 0.0,
                                           "status": catalog.INDEXED})] = name
            catalog.set_photo(conn, next(reversed(ids)), name, {"ocr": text})
        old = catalog.upsert_file(conn, {"root": "/r", "relpath": "old.jpg", "size": 1, "mtime": 0.0,
                                         "status": catalog.INDEXED})
        ids[old] = "old.jpg"
        # as an index written before held it: the run whole (unicode61's token)
        conn.exec_driver_sql(f"INSERT INTO {catalog.KEYWORDS}(rowid, body) VALUES (?, ?)", (old, "大阪城公園"))

    def kw(text):
        with db.connect() as conn:
            return sorted(ids[i] for i, _ in keywords.search(conn, keywords.parse(text, partial_last=True), 10))

    assert kw("東京") == ["station.jpg", "tower.jpg"]
    assert kw("タワー") == ["tower.jpg"] and kw("中央口") == ["station.jpg"] and kw("東京駅") == ["station.jpg"]
    assert kw("駅") == ["kyoto.jpg", "station.jpg"]  # one ideograph is a word (one Latin letter is no query)
    assert kw("京駅") == ["station.jpg"]  # characters next to each other: 京都駅 (Kyoto station) holds no 京駅
    assert kw("東京 -タワー") == ["station.jpg"] and kw("東京 AND 中央") == ["station.jpg"]
    assert kw("大阪城公園") == ["old.jpg"]  # an older index's text, found as it was
    assert keywords.parse("東京").words == ["東京"]  # --explain shows the words as typed
    assert keywords.evidence(keywords.parse("東京"), "東京駅 中央口")
    assert not keywords.evidence(keywords.parse("京東"), "東京駅 中央口")
    db.dispose()


def test_greek_accents_do_not_matter_as_latin_ones_do(tmp_path):
    """`cafe` finds `Café`, but `αθηνα` did not find `Αθήνα` (unicode61 folds Latin accents only); text an older
    index holds with its accents is still found as typed."""
    from alignsearch.storage import catalog

    db = catalog.connect(tmp_path / "catalog.db")
    with db.begin() as conn:
        sign = catalog.upsert_file(conn, {"root": "/r", "relpath": "a.jpg", "size": 1, "mtime": 0.0,
                                          "status": catalog.INDEXED})
        catalog.set_photo(conn, sign, "a.jpg", {"ocr": "ΟΔΟΣ Αθηνάς\nἈκρόπολις"})
        old = catalog.upsert_file(conn, {"root": "/r", "relpath": "b.jpg", "size": 1, "mtime": 0.0,
                                         "status": catalog.INDEXED})
        conn.exec_driver_sql(f"INSERT INTO {catalog.KEYWORDS}(rowid, body) VALUES (?, ?)", (old, "Πλάκα"))

    def kw(text):
        with db.connect() as conn:
            return sorted(i for i, _ in keywords.search(conn, keywords.parse(text), 10))

    assert kw("αθηνας") == kw("Αθηνάς") == kw("ακροπολις") == kw("οδός") == [sign]
    assert kw("πλάκα") == [old]  # an older index's text, as it was written
    assert keywords.evidence(keywords.parse("ακροπολις"), "Ἀκρόπολις")
    db.dispose()


@pytest.mark.slow
@needs_ocr
def test_index_ocr_reads_the_whole_image_as_the_fill_step_does(tmp_path):
    """`index --ocr` read the text in the decode made for the encoder, reduced to twice its input (here a
    1600x1200 JPEG read at 200x150), where `--ocr` given to an existing index (the fill step) reads the whole
    image: the small words on a camera-size photo were found one way and lost the other."""
    from alignsearch.media.images import ImageSpec, open_rgb
    from alignsearch.media.ocr import read_text
    from indexer.decode import read_item
    from indexer.scan import Found

    photo = Image.fromarray(scene_frame(5, (1600, 1200)))
    draw = ImageDraw.Draw(photo)
    draw.rectangle([100, 100, 560, 170], fill="white")
    draw.text((115, 118), "ZANZIBAR SPICE 4711", fill="black", font=ImageFont.load_default(size=28))
    photo.save(tmp_path / "street.jpg", quality=92)
    found = Found(str(tmp_path), "street.jpg", (tmp_path / "street.jpg").stat().st_size,
                  (tmp_path / "street.jpg").stat().st_mtime)
    spec = ImageSpec((64, 64), Image.BICUBIC, None, 1 / 255, False, None, None, None)
    item = read_item(found, spec, ocr=True)
    filled = read_text(open_rgb((tmp_path / "street.jpg").read_bytes())[0])  # what indexer/ocrfill.py reads
    assert "ZANZIBAR" in filled and item.ocr == filled, (item.ocr, filled)
    assert (item.width, item.height) == (1600, 1200) and item.crop.shape == (64, 64, 3)  # the encoder's as before


def test_kana_with_voiced_marks_are_found_however_written_and_count_as_evidence(tmp_path):
    """`spaced` cut a kana written with its voiced mark apart (NFD, as macOS names files: パ as ハ + U+309A)
    from its mark, so `パン` (bread) never found the file `パン屋.jpg` named so; and the default mode's evidence
    compared the text folded (voiced marks and accents gone) with the query as typed, so `ガイド` (guide) in
    `観光ガイド`, and `café` in `Café`, found by the keyword index, were no evidence."""
    import unicodedata

    from alignsearch.storage import catalog

    db = catalog.connect(tmp_path / "catalog.db")
    ids = {}
    with db.begin() as conn:
        for name, text in {unicodedata.normalize("NFD", "パン屋.jpg"): None, "guide.jpg": "観光ガイド"}.items():
            fid = catalog.upsert_file(conn, {"root": "/r", "relpath": name, "size": 1, "mtime": 0.0,
                                             "status": catalog.INDEXED})
            ids[fid] = unicodedata.normalize("NFC", name)
            catalog.set_photo(conn, fid, name, {"ocr": text})

    def kw(text):
        with db.connect() as conn:
            return sorted(ids[i] for i, _ in keywords.search(conn, keywords.parse(text), 10))

    assert kw("パン") == ["パン屋.jpg"] and kw("ガイド") == ["guide.jpg"]
    assert keywords.evidence(keywords.parse("ガイド"), "観光ガイド")
    assert keywords.evidence(keywords.parse("café"), "Café au lait")
    db.dispose()


def test_a_keyword_index_written_before_cjk_and_greek_were_spaced_is_written_again_by_the_next_writer(tmp_path):
    """An index written before `spaced` held `東京駅前` one token and `Αθήνα` with its accents: `東京` and `αθηνα`
    found them only in files whose keywords a later run happened to write again (never, for a library that does not
    change). Its first writer writes the keyword index again (schema 5), from what the catalog holds."""
    from alignsearch.storage import catalog, state

    db = catalog.connect(tmp_path / "catalog.db")
    with db.begin() as conn:
        ids = {}
        for name, text in {"station.jpg": "東京駅前", "athens.jpg": "Αθήνα"}.items():
            fid = ids[name] = catalog.upsert_file(conn, {"root": "/r", "relpath": name, "size": 1, "mtime": 0.0,
                                                         "status": catalog.INDEXED})
            catalog.set_photo(conn, fid, name, {"ocr": text})
            # as the version before wrote it: the text as it is
            conn.exec_driver_sql(f"UPDATE {catalog.KEYWORDS} SET body = ? WHERE rowid = ?", (f"{name}\n{text}", fid))
        state.write(conn, schema_version=4)
    db.dispose()

    def kw(text, **kwargs):
        reader = catalog.connect(tmp_path / "catalog.db", **kwargs)
        with reader.connect() as conn:
            found = sorted(i for i, _ in keywords.search(conn, keywords.parse(text), 10))
        reader.dispose()
        return found

    assert kw("東京駅前", readonly=True) == [ids["station.jpg"]] and kw("東京", readonly=True) == []  # as it stands
    catalog.connect(tmp_path / "catalog.db").dispose()  # a writer
    assert kw("東京", readonly=True) == [ids["station.jpg"]] and kw("αθηνα", readonly=True) == [ids["athens.jpg"]]
    assert kw("東京駅前", readonly=True) == [ids["station.jpg"]] and kw("station") == [ids["station.jpg"]]


def test_a_chinese_or_japanese_word_start_keeps_its_star_and_evidence_agrees(tmp_path):
    """`東京*` lost its `*` (its last token, one character, was under MIN_PREFIX): --explain showed `東京`, and an
    index written before `spaced` (東京駅前 one token, read as it stands) found nothing for it, where `tok*` finds
    `tokyo`. It means 東京 followed by anything: the phrase of its characters, or a whole run starting so."""
    from alignsearch.storage import catalog

    db = catalog.connect(tmp_path / "catalog.db")
    ids = {}
    with db.begin() as conn:
        for name, text in {"station.jpg": "東京駅前", "kyoto.jpg": "京都駅", "old.jpg": None}.items():
            fid = ids[name] = catalog.upsert_file(conn, {"root": "/r", "relpath": name, "size": 1, "mtime": 0.0,
                                                         "status": catalog.INDEXED})
            catalog.set_photo(conn, fid, name, {"ocr": text})
        # as an index written before `spaced` held it: the run whole (unicode61's token)
        conn.exec_driver_sql(f"UPDATE {catalog.KEYWORDS} SET body = ? WHERE rowid = ?", ("東京タワー", ids["old.jpg"]))

    def kw(text):
        with db.connect() as conn:
            return sorted(name for name, fid in ids.items()
                          if fid in {i for i, _ in keywords.search(conn, keywords.parse(text), 10)})

    assert keywords.parse("東京*").words == ["東京*"] and keywords.parse("京*").words == ["京*"]
    assert kw("東京*") == ["old.jpg", "station.jpg"] and kw("東京") == ["station.jpg"]
    assert kw("京都*") == ["kyoto.jpg"]
    assert keywords.evidence(keywords.parse("東京*"), "東京駅前") and keywords.evidence(keywords.parse("東京*"), "東京")
    assert not keywords.evidence(keywords.parse("東京*"), "京都駅") and not keywords.evidence(keywords.parse("京都*"), "東京")
    db.dispose()


def test_greek_final_sigma_is_sigma_in_the_evidence_as_in_the_keyword_index():
    """unicode61 folds ς to σ, so `οδοσ` (typed without the final form) finds `ΟΔΟΣ` and `οδός`; the default mode's
    evidence lower-cased `ΟΔΟΣ` to `οδος` (Python writes a word-final Σ as ς) and found no `οδοσ` in it."""
    import sqlite3

    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE VIRTUAL TABLE k USING fts5(body, tokenize = 'unicode61 remove_diacritics 2')")
    for query in ("οδοσ", "οδος", "ΟΔΟΣ", "οδός", "ερμου*"):
        for n, text in enumerate(("ΟΔΟΣ ΕΡΜΟΥ", "οδός Ερμού", "Οδοσ ερμούσ")):
            conn.execute("DELETE FROM k")
            conn.execute("INSERT INTO k(rowid, body) VALUES (1, ?)", (keywords.spaced(text),))
            parsed = keywords.parse(query)
            matched = bool(conn.execute("SELECT 1 FROM k WHERE k MATCH ?", (parsed.positive()[0].fts(),)).fetchall())
            assert matched and keywords.evidence(parsed, text), (query, text, matched)
    assert not keywords.evidence(keywords.parse("οδοσ"), "οδόστρωμα")  # a whole word, as the index matches it


def _captioned_and_read(db_path, parts):
    """A catalog of files named `name` with the caption, text read in the image and tags of parts[name]; their ids."""
    from alignsearch.storage import catalog

    db = catalog.connect(db_path)
    ids = {}
    with db.begin() as conn:
        for name, (caption, ocr, labels) in parts.items():
            fid = ids[name] = catalog.upsert_file(conn, {"root": "/r", "relpath": name, "size": 1, "mtime": 0.0,
                                                         "status": catalog.INDEXED})
            for label in labels:
                conn.exec_driver_sql("INSERT INTO tags (file_id, label, probability) VALUES (?, ?, 1.0)", (fid, label))
            catalog.set_photo(conn, fid, name, {"caption": caption, "ocr": ocr}, labels)
    db.dispose()
    return ids


def test_a_phrase_is_found_within_a_caption_text_name_or_tag_never_across_two(tmp_path):
    """The keyword index held a file's caption, text read in the image, name and tags joined by a space: the phrase
    "red car" matched a caption ending in `red` whose image's text starts with `car` (and two tags, `red` and
    `car`), and the default mode's evidence (caption, text and tags joined by a newline) agreed."""
    from alignsearch.storage import catalog

    ids = _captioned_and_read(tmp_path / "catalog.db", {
        "join.jpg": ("a big red", "car park", ["bus"]), "tags.jpg": (None, None, ["red", "car"]),
        "both.jpg": ("a red car", None, []), "name_red.jpg": ("car wash", None, [])})
    db = catalog.connect(tmp_path / "catalog.db", readonly=True)

    def kw(text, evidence_only=False):
        names = {fid: name for name, fid in ids.items()}
        with db.connect() as conn:
            return sorted(names[i] for i, _ in keywords.search(conn, keywords.parse(text), 10,
                                                               evidence_only=evidence_only))

    assert kw('"red car"') == kw('"red car"', evidence_only=True) == ["both.jpg"]
    assert kw('"big red"') == ["join.jpg"] and kw('"car park"') == ["join.jpg"]  # a phrase within a part
    assert kw("red AND car") == ["both.jpg", "join.jpg", "name_red.jpg", "tags.jpg"]  # words: in any part
    assert kw('"name red"') == ["name_red.jpg"]  # the name's words, as before
    assert not keywords.evidence(keywords.parse('"red car"'), f"a big red{keywords.BREAK}car park")
    db.dispose()


def test_a_schema_5_keyword_index_gains_its_breaks_from_its_next_writer(tmp_path):
    """An index of schema 5 held a file's parts joined by a space; a reader finds "red car" across them as it
    stands, and the next writer writes the keyword index again (schema 6) so that it does not."""
    from alignsearch.storage import catalog, migrate, state

    ids = _captioned_and_read(tmp_path / "catalog.db", {"join.jpg": ("a big red", "car park", [])})
    db = catalog.connect(tmp_path / "catalog.db")
    with db.begin() as conn:  # as schema 5 wrote it
        conn.exec_driver_sql(f"UPDATE {catalog.KEYWORDS} SET body = ? WHERE rowid = ?",
                             ("a big red car park join", ids["join.jpg"]))
        state.write(conn, schema_version=5)
    db.dispose()

    def kw(text):
        reader = catalog.connect(tmp_path / "catalog.db", readonly=True)
        with reader.connect() as conn:
            found = [i for i, _ in keywords.search(conn, keywords.parse(text), 10)]
            version = state.read(conn).schema_version
        reader.dispose()
        return found, version

    assert kw('"red car"') == ([ids["join.jpg"]], 5)  # read as it stands: a reader writes nothing
    catalog.connect(tmp_path / "catalog.db").dispose()  # a writer
    assert kw('"red car"') == ([], migrate.LATEST)
    assert kw('"big red"') == kw('"car park"') == kw("join") == ([ids["join.jpg"]], migrate.LATEST)


def test_the_evidence_folds_each_part_of_a_files_text_once_whatever_the_number_of_words(monkeypatch):
    """evidence() folded each part of the text again for each of the query's words (78ea7a9): on the hits that hold
    no evidence (most, in bench_keyword_break) a 4-word query folded every part 4 times, and the default mode's
    keyword list took twice as long (median 7.2 -> 14.2 ms)."""
    query = keywords.parse("grass running field park")
    text = keywords.BREAK.join(["a black dog jumps for a red toy", "speeds down a dirt", "play", "courtyard"])
    assert not keywords.evidence(query, text)  # the query's own words are folded (and cached) here
    folded = []
    fold = keywords._fold
    monkeypatch.setattr(keywords, "_fold", lambda part: folded.append(part) or fold(part))
    assert not keywords.evidence(query, text)
    assert sorted(folded) == sorted(text.split(keywords.BREAK))  # each part once
    assert keywords.evidence(keywords.parse("field toy"), text)  # found in a part as before


def test_a_remembered_ocr_without_its_engine_says_how_to_stop_asking(tmp_path, monkeypatch):
    """An index that reads text since an earlier `index --ocr`, run where the OCR extra is missing, said only
    "pip install 'alignsearch[ocr]'": `index --no-ocr`, the other way out, was not named. Asked now with --ocr, the
    line stays as it was."""
    from alignsearch.media import ocr
    from alignsearch.storage import catalog, state
    from indexer.job import _ocr_choice

    def missing():
        raise BadInputError(ocr.MISSING)

    monkeypatch.setattr(ocr, "check_available", missing)
    db = catalog.connect(tmp_path / "catalog.db")
    try:
        with db.begin() as conn:
            state.write(conn, ocr=True)
        with pytest.raises(BadInputError) as remembered:
            _ocr_choice(db, None)
        assert str(remembered.value).startswith(ocr.MISSING) and "`alignsearch index --no-ocr`" in str(remembered.value)
        with pytest.raises(BadInputError) as asked:
            _ocr_choice(db, True)
        assert str(asked.value) == ocr.MISSING
        assert _ocr_choice(db, False) is False  # --no-ocr needs no engine, and is remembered
        with db.connect() as conn:
            assert state.read(conn).ocr is False
    finally:
        db.dispose()
