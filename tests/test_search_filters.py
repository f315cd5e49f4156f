"""Issue 15: metadata stored at index time, filters that never starve, cutoff and sort, keyword and hybrid."""

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

import alignsearch
from alignsearch.storage import catalog
from alignsearch.search import engine as engine_module
from conftest import index_json, make_images, run
from helpers import list_root


def photo(path, colour, when=None, offset=None, make=None, model=None, gps=None):
    exif = Image.Exif()
    if make:
        exif[0x010F] = make
    if model:
        exif[0x0110] = model
    sub = exif.get_ifd(0x8769)
    if when:
        sub[0x9003] = when
    if offset:
        sub[0x9011] = offset
    if gps:
        g = exif.get_ifd(0x8825)
        (g[1], g[2]), (g[3], g[4]) = gps
    rng = np.random.default_rng(sum(colour))
    pixels = (rng.random((60, 80, 3)) * 60 + np.array(colour) * 0.7).clip(0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, "JPEG", exif=exif)
    return path


@pytest.fixture
def library(prebuilt, tiny_model):
    def build(base):
        root = base / "photos"
        (root / "Trips" / "Lisbon").mkdir(parents=True)
        (root / "home").mkdir()
        lisbon = (("N", (38.0, 43.0, 20.0)), ("W", (9.0, 8.0, 21.0)))
        sydney = (("S", (33.0, 52.0, 4.0)), ("E", (151.0, 12.0, 26.0)))
        photo(root / "Trips" / "Lisbon" / "tram.jpg", (220, 200, 40), "2019:07:14 10:30:00", "+01:00", "Canon", "Canon EOS 5D", lisbon)
        photo(root / "Trips" / "Lisbon" / "river.jpg", (30, 60, 200), "2019:07:15 18:00:00", None, "Canon", "Canon EOS 5D", lisbon)
        photo(root / "Trips" / "opera.jpg", (200, 200, 200), "2020:02:01 09:00:00", "+11:00", "NIKON", "D750", sydney)
        photo(root / "home" / "cat.jpg", (120, 90, 60), "2021:05:05 05:05:05", None, "Apple", "iPhone 12")
        photo(root / "home" / "plain.jpg", (10, 200, 10))  # no EXIF: taken is the file's mtime
        (root / "home" / "cat.txt").write_text("Zanzibar the tabby asleep on the sofa\n")
        ix = base / "ix"
        index_json(ix, root, "--model", tiny_model, "--device", "cpu")
        return root, ix

    return prebuilt.folder("search-filters-library", build)[1]


def query_json(ix, *args, code=0):
    k = () if "-k" in args else ("-k", "10")
    out = run("query", *args, "--index", ix, "--json", *k, code=code).output
    return json.loads(out)["results"] if code == 0 else out


def names(results):
    return sorted(r["path"].rsplit("/", 1)[1] for r in results)


def test_exif_fields_and_captions_are_stored_and_returned(library):
    root, ix = library
    results = {r["path"].rsplit("/", 1)[1]: r for r in query_json(ix, "photo")}
    tram = results["tram.jpg"]
    assert tram["taken"] == "2019-07-14T09:30:00Z" and tram["camera"] == "Canon EOS 5D"
    assert tram["lat"] == pytest.approx(38.7222, abs=1e-3) and tram["lon"] == pytest.approx(-9.1392, abs=1e-3)
    assert results["opera.jpg"]["lat"] < 0 and results["opera.jpg"]["camera"] == "NIKON D750"
    assert results["cat.jpg"]["caption"] == "Zanzibar the tabby asleep on the sofa"
    assert results["plain.jpg"]["camera"] is None and results["plain.jpg"]["taken"] is not None


@pytest.mark.slow
def test_each_filter(library):
    root, ix = library
    assert names(query_json(ix, "x", "--after", "2019-07-15", "--before", "2020-12-31")) == ["opera.jpg", "river.jpg"]
    assert names(query_json(ix, "x", "--camera", "canon")) == ["river.jpg", "tram.jpg"]
    assert names(query_json(ix, "x", "--near", "38.72,-9.14,5")) == ["river.jpg", "tram.jpg"]
    assert names(query_json(ix, "x", "--near", "-33.86,151.21,10")) == ["opera.jpg"]
    assert names(query_json(ix, "x", "--path", "Trips/**")) == ["opera.jpg", "river.jpg", "tram.jpg"]
    assert names(query_json(ix, "x", "--path", "Trips/*.jpg")) == ["opera.jpg"]
    assert names(query_json(ix, "x", "--format", "jpeg", "--camera", "iphone")) == ["cat.jpg"]
    assert names(query_json(ix, "x", "--where", "camera ~ canon and not (taken < 2019-07-15)")) == ["river.jpg"]
    assert names(query_json(ix, "x", "--where", "caption ~ zanzibar or lat < 0")) == ["cat.jpg", "opera.jpg"]
    assert query_json(ix, "x", "--camera", "leica") == []


def test_the_ranking_by_mode_and_keyword_match():
    """engine._ranking, shared by _search and explain: fused only in hybrid and auto with a keyword match left."""
    from alignsearch.search.engine import FUSED, _ranking

    assert [_ranking(m, True) for m in ("keyword", "hybrid", "auto", "vector")] == ["keyword", FUSED, FUSED, "vector"]
    assert [_ranking(m, False) for m in ("keyword", "hybrid", "auto", "vector")] == ["keyword", "vector", "vector",
                                                                                    "vector"]


def test_explain_names_the_plan(library):
    root, ix = library
    out = json.loads(run("query", "zanzibar", "--camera", "canon", "--explain", "--json", "--index", ix).stdout)
    plan = out["plan"]
    assert plan["matching"] == 2 and plan["path"].startswith("exact") and plan["keyword_matches"] == 1
    assert len(out["results"]) == 2


@pytest.mark.slow  # an IVF-PQ index of 12,000 vectors copied, four searches
@pytest.mark.parametrize("where", [None, 'path glob "*"'])
def test_explain_says_the_candidates_faiss_is_asked_for(ivfpq, monkeypatch, where):
    """`--explain` said candidates=want on the filtered ANN path (nothing on the unfiltered one) while FAISS is asked
    for want + query.TIE_MARGIN, those past want re-ranked where they tie with the want-th: it now says both, as the
    search asks (ann.search recorded)."""
    from alignsearch.search.engine import EXACT_BELOW, build_request
    from alignsearch.search.query import TIE_MARGIN
    from alignsearch.storage import ann

    asked, search = [], ann.search
    monkeypatch.setattr(ann, "search", lambda index, q, k, *a, **kw: asked.append(k) or search(index, q, k, *a, **kw))
    with alignsearch.open(ivfpq) as engine:
        assert engine.snap.plan.kind == "ivfpq"
        request = build_request(text="red circle", k=5, mode="vector", where=where)
        plan = engine.explain(request)
        assert plan.get("matching", EXACT_BELOW + 1) > EXACT_BELOW and plan["path"] != "exact", plan
        engine.run(request)
    assert asked == [plan["candidates_asked"]] == [plan["candidates"] + TIE_MARGIN], (asked, plan)
    assert plan["candidates"] == ann.candidate_count(5, engine.snap.plan)


def test_malformed_filters_are_usage_errors(library):
    root, ix = library
    for args in (("--where", "camera <"), ("--where", "colour = red"), ("--after", "last week"),
                 ("--near", "1,2"), ("--sort", "size"), ("--mode", "fuzzy")):
        out = query_json(ix, "x", *args, code=2)
        assert "Traceback" not in out and "error" in out.strip().splitlines()[-1].lower(), (args, out)


def test_min_score_and_sort(library):
    root, ix = library
    everything = query_json(ix, "x")
    cut = sorted(r["score"] for r in everything)[2]
    kept = query_json(ix, "x", "--min-score", str(cut))
    assert len(kept) == 3 and all(r["score"] >= cut for r in kept)
    by_date = query_json(ix, "x", "-k", "3", "--sort", "taken")
    best3 = {r["id"] for r in everything[:3]}
    assert {r["id"] for r in by_date} == best3  # the same result set, ordered by date
    assert [r["taken"] for r in by_date] == sorted(r["taken"] for r in by_date)
    newest = query_json(ix, "x", "--sort", "-taken")
    assert [r["taken"] for r in newest] == sorted((r["taken"] for r in newest), reverse=True)
    assert [r["path"] for r in query_json(ix, "x", "--sort", "path")] == sorted(r["path"] for r in everything)


def test_keyword_and_hybrid_put_the_captioned_image_first(library):
    """The tiny random model cannot see a cat; the caption names it."""
    root, ix = library
    assert query_json(ix, "zanzibar", "--mode", "keyword")[0]["path"].endswith("cat.jpg")
    assert query_json(ix, "zanzibar", "--mode", "hybrid")[0]["path"].endswith("cat.jpg")
    assert query_json(ix, "zanzibar")[0]["path"].endswith("cat.jpg")  # auto: the word is in the index
    # folder names are keywords too
    assert names(query_json(ix, "lisbon", "--mode", "keyword")) == ["river.jpg", "tram.jpg"]


def test_auto_equals_vector_when_no_word_matches(library):
    root, ix = library
    vector = query_json(ix, "red car on beach", "--mode", "vector")
    assert query_json(ix, "red car on beach") == vector


def test_only_fusion_pays_for_fusion_depth(library, monkeypatch):
    """A text whose words match no keyword re-ranks k x rerank candidates, as a vector query does; the fusion
    depth (100 per list) is for texts whose words do match (at 100k vectors: 29 -> 4 ms a query)."""
    root, ix = library
    asked = []
    real = engine_module.ann.search
    monkeypatch.setattr(engine_module.ann, "search", lambda index, q, want, *a, **kw: (asked.append(want),
                                                                                      real(index, q, want, *a, **kw))[1])
    eng = alignsearch.open(ix, device="cpu")
    vector = eng.search(text="red car on beach", k=3, mode="vector")
    auto = eng.search(text="red car on beach", k=3)
    eng.search(text="zanzibar", k=3)
    assert asked[0] == asked[1] < engine_module.FUSION_DEPTH <= asked[2]
    assert [h.id for h in auto] == [h.id for h in vector]


def test_existing_indexes_are_filled_without_re_encoding(library):
    root, ix = library
    import sqlite3

    conn = sqlite3.connect(ix / "catalog.db")
    with conn:
        conn.execute("DELETE FROM photos")
        conn.execute("DELETE FROM keywords")
    conn.close()
    s = index_json(ix, "--device", "cpu")
    assert s["added"] == 0 and s["times"]["extra"]["photo_fields_filled"] == 5
    assert query_json(ix, "x", "--camera", "canon", "--near", "38.72,-9.14,5")
    assert query_json(ix, "zanzibar", "--mode", "keyword")[0]["path"].endswith("cat.jpg")


@pytest.mark.slow
def test_captions_from_a_list_and_from_webdataset_members(tmp_path, tiny_model):
    images = make_images(tmp_path / "imgs", 3)
    (tmp_path / "list.csv").write_text("path,caption\n" + "".join(f"{p},caption number {i} kilimanjaro{i}\n"
                                                                  for i, p in enumerate(images)))
    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tar:
        for i, p in enumerate(images):
            tar.add(p, arcname=f"sample{i}.jpg")
            data = json.dumps({"caption": f"serengeti{i} at dawn"}).encode() if i % 2 else f"okavango{i}".encode()
            info = tarfile.TarInfo(f"sample{i}.{'json' if i % 2 else 'txt'}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    ix = tmp_path / "ix"
    index_json(ix, tmp_path / "list.csv", shard, "--model", tiny_model, "--device", "cpu")
    top = query_json(ix, "kilimanjaro1", "--mode", "keyword")[0]
    assert top["caption"] == "caption number 1 kilimanjaro1" and top["path"] == str(images[1])
    assert query_json(ix, "serengeti1", "--mode", "keyword")[0]["relpath"] == "sample1.jpg"
    assert query_json(ix, "okavango2", "--mode", "keyword")[0]["relpath"] == "sample2.jpg"


@pytest.mark.slow
def test_filtered_search_never_starves_on_an_ivfpq_index(indexed_images, monkeypatch):
    """12,000 synthetic vectors (IVF-PQ), 1% of them from one camera: exactly k hits, all from that camera,
    the same as an exact search over those images, through the ANN index with a selector and through
    the exact path alike."""
    from indexer.build import sync_index
    from indexer.decode import Item
    from indexer.scan import Found
    from indexer.writer import catalog_writer

    root, ix = indexed_images(3)
    engine = alignsearch.open(ix)
    dim, n = engine.store.dim, 12_000
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(40, dim))
    x = centres[rng.integers(0, 40, n)] + 0.3 * rng.normal(size=(n, dim))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    rare = rng.random(n) < 0.01
    db = catalog.connect(ix / "catalog.db")
    list_root(db)
    write = catalog_writer(db, engine.store)
    for start in range(0, n, 2000):
        items = [Item(Found("/synthetic", f"{j}.jpg", 1, 0.0), crop=np.zeros(1), format="JPEG",
                      photo={"camera": "Leica M6" if rare[j] else "Canon", "taken": float(j)})
                 for j in range(start, min(n, start + 2000))]
        write(items, x[start : start + 2000])
    built = sync_index(db, engine.store, ix / "index.faiss")
    db.dispose()
    assert built["plan"]["kind"] == "ivfpq"
    engine = alignsearch.open(ix)
    leica = np.flatnonzero(rare)
    for exact_below in (0, engine_module.EXACT_BELOW):  # the ANN path with a selector, and the exact path
        monkeypatch.setattr(engine_module, "EXACT_BELOW", exact_below)
        recalls = []
        for q in rng.normal(size=(20, dim)):
            q = (q / np.linalg.norm(q)).astype(np.float32)
            hits = engine.search_vector(q, k=10, where="camera ~ leica")
            assert len(hits) == 10 and all(h.camera == "Leica M6" for h in hits)
            truth = {f"{j}.jpg" for j in leica[np.argsort(-(x[leica] @ q))[:10]]}
            recalls.append(len(truth & {h.relpath for h in hits}) / 10)
        assert np.mean(recalls) >= 0.95, (exact_below, recalls)
    # fewer matches than k: all of them
    assert len(engine.search_vector(x[0], k=1000, where="camera ~ leica")) == len(leica)


@pytest.mark.slow
def test_http_takes_the_same_names(library):
    """/api/search: the filter, cutoff, sort and mode parameters carry the CLI's names and answers."""
    from helpers import call, start_serve, stop

    root, ix = library
    proc, url = start_serve(ix, "--token", "t0k")
    try:
        def search(params):
            status, _, body = call(url, "/api/search?" + params, token="t0k")
            return status, json.loads(body)

        status, out = search("q=x&k=10&camera=canon&after=2019-07-15")
        assert status == 200 and names(out["results"]) == ["river.jpg"]
        assert out["query"]["camera"] == "canon"
        status, out = search("q=zanzibar&mode=keyword&k=3")
        assert out["results"][0]["caption"].startswith("Zanzibar")
        status, out = search("q=x&k=10&near=-33.86,151.21,10&sort=-taken")
        assert names(out["results"]) == ["opera.jpg"] and out["results"][0]["taken"] == "2020-01-31T22:00:00Z"
        status, out = search("q=x&k=10&path=home/**&sort=path")
        assert [r["relpath"] for r in out["results"]] == ["home/cat.jpg", "home/plain.jpg"]
        status, out = search("q=x&where=colour%20%3D%20red")
        assert status == 400 and "--where" in out["error"]
        status, out = search("q=x&sort=size")
        assert status == 400 and "sort must be one of" in out["error"]  # request.build's, as --sort's exit 2
        assert query_json(ix, "x", "--camera", "canon", "--after", "2019-07-15") == \
            search("q=x&k=10&camera=canon&after=2019-07-15")[1]["results"]
    finally:
        stop(proc)


def _synthetic(ix, relpaths, seed=0):
    """Add files with random unit vectors under a synthetic root (keywords from their names), then sync."""
    from indexer.build import sync_index
    from indexer.decode import Item
    from indexer.scan import Found
    from indexer.writer import catalog_writer

    engine = alignsearch.open(ix)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(len(relpaths), engine.store.dim))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    db = catalog.connect(ix / "catalog.db")
    list_root(db)
    write = catalog_writer(db, engine.store)
    write([Item(Found("/synthetic", rel, 1, 0.0), crop=np.zeros(1), format="JPEG", photo={"taken": 1.0})
           for rel in relpaths], x)
    sync_index(db, engine.store, ix / "index.faiss")
    db.dispose()
    engine.close()
    return x


@pytest.mark.slow
def test_keyword_search_with_a_filter_never_starves_and_honours_k(indexed_images):
    """150 files named for a word under A/ and 6 under B/: --path 'B/**' in keyword mode finds the 6 (the
    global top 100 was taken, then filtered: none); -k above 100 returns every match."""
    root, ix = indexed_images(3)
    relpaths = [f"A/zebra_{j:03d}.jpg" for j in range(150)] + [f"B/zebra crossing {j}.jpg" for j in range(6)]
    x = _synthetic(ix, relpaths)
    engine = alignsearch.open(ix)
    for mode in ("keyword", "hybrid"):
        hits = engine.search_vector(x[0], k=10, text="zebra", mode=mode, path="B/**")
        assert sorted(h.relpath for h in hits) == sorted(relpaths[150:]), mode
    assert len(engine.search_vector(x[0], k=1000, text="zebra", mode="keyword")) == 156
    assert len(engine.search_vector(x[0], k=120, text="zebra", mode="keyword", path="A/**")) == 120
    out = query_json(ix, "zebra", "--mode", "keyword", "--path", "B/**")
    assert sorted(r["relpath"] for r in out) == sorted(relpaths[150:])


@pytest.mark.slow
def test_path_glob_matches_either_unicode_normalisation(indexed_images):
    """macOS writes names decomposed (NFD: e + U+0301); a glob typed composed (NFC: U+00E9) or decomposed
    finds both spellings, on the Python API, the CLI (query and export) and HTTP, as keyword search does."""
    import pyarrow.parquet as pq

    from helpers import call, start_serve, stop

    root, ix = indexed_images(3)
    relpaths = ["caf\u00e9/nfc.jpg", "cafe\u0301/nfd.jpg", "cafe/plain.jpg"]
    x = _synthetic(ix, relpaths)
    engine = alignsearch.open(ix)
    both = ["nfc.jpg", "nfd.jpg"]
    for glob in ("caf\u00e9/*", "cafe\u0301/*", "CAF\u00c9/*.JPG", "caf?/n*"):
        assert sorted(h.relpath.rsplit("/", 1)[1] for h in engine.search_vector(x[0], k=10, path=glob)) == both, glob
    engine.close()
    assert names(query_json(ix, "x", "--path", "caf\u00e9*/*")) == both
    assert names(query_json(ix, "x", "--where", "path glob 'cafe\u0301/*'")) == both
    run("export", ix.parent / "out.parquet", "--path", "caf\u00e9/**", "--index", ix)
    assert sorted(p.rsplit("/", 1)[1] for p in pq.read_table(ix.parent / "out.parquet")["path"].to_pylist()) == both
    proc, url = start_serve(ix, "--token", "t0k")
    try:
        status, _, body = call(url, "/api/search?q=x&k=10&path=caf%C3%A9/*", token="t0k")
        assert status == 200 and names(json.loads(body)["results"]) == both
    finally:
        stop(proc)


@pytest.mark.slow  # an IVF-PQ index of 12,000 vectors copied, four searches
@pytest.mark.parametrize("where", [None, 'path glob "*"'])
def test_explain_says_the_candidates_of_a_fused_search(ivfpq, monkeypatch, where):
    """A text whose words match a keyword (here a file name, hybrid mode) is fused: the search asks FAISS for
    FUSION_DEPTH's candidates, while `--explain` said k's (candidate_count(5) and the margin): its figures were not
    what the search asked for."""
    from alignsearch.search.engine import EXACT_BELOW, FUSION_DEPTH, build_request
    from alignsearch.storage import ann

    asked, search = [], ann.search
    monkeypatch.setattr(ann, "search", lambda index, q, k, *a, **kw: asked.append(k) or search(index, q, k, *a, **kw))
    with alignsearch.open(ivfpq) as engine:
        request = build_request(text="img000", k=5, mode="hybrid", where=where)
        plan = engine.explain(request)
        assert plan["ranking"] == "hybrid (RRF)" and plan.get("matching", EXACT_BELOW + 1) > EXACT_BELOW, plan
        engine.run(request)
    assert asked == [plan["candidates_asked"]], (asked, plan)
    assert plan["candidates"] == ann.candidate_count(FUSION_DEPTH, engine.snap.plan,
                                                     engine.snap.tuning.get("rerank_factor", 10))
