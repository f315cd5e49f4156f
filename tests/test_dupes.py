"""Issue 16: perceptual hashes, `dupes` (exact / near / similar), collapsed results, `similar`."""

import json
import shutil
import sqlite3

import numpy as np
import pytest
from conftest import index_json, make_images, run
from helpers import near_copies, smooth_photos

from alignsearch.errors import UsageError
from alignsearch.search import request as search_request
from alignsearch.storage import catalog
from alignsearch.search import dupes
from alignsearch.media import phash
from alignsearch.search.engine import Hit


@pytest.fixture
def library(prebuilt, tiny_model):
    """6 distinct photos; photo0000 has three near copies and one exact copy; indexed."""

    def build(base):
        root = base / "lib"
        photos = smooth_photos(root, 6)
        near_copies(photos[0], root / "copies")
        shutil.copyfile(photos[1], root / "copies" / "same-bytes.jpg")
        ix = base / "ix"
        index_json(ix, root, "--model", tiny_model)
        return root, ix

    return prebuilt.folder("dupes-library", build)[1]


def groups_of(ix, *args):
    return json.loads(run("dupes", "--index", ix, "--json", *args).stdout)


def names(group):
    return sorted(item["path"].rsplit("/", 1)[1] for item in group["items"])


def test_phash_is_stored_at_index_time(library):
    root, ix = library
    db = sqlite3.connect(ix / "catalog.db")
    count = db.execute("select count(*) from phashes join files on files.id = file_id").fetchone()[0]
    assert count == 10
    h = db.execute("select phash from phashes limit 1").fetchone()[0]
    phash, colour = h.split("-")  # the 64-bit phash, then the colour grid (issue 24)
    assert len(phash) == 16 and int(phash, 16) >= 0 and len(colour) == 64


def test_exact_tier_groups_identical_bytes(library):
    root, ix = library
    found = groups_of(ix, "--tier", "exact")
    assert [names(g) for g in found] == [["photo0001.jpg", "same-bytes.jpg"]]
    assert found[0]["tier"] == "exact" and all(i["score"] == 1.0 for i in found[0]["items"])


def test_near_tier_groups_resaved_resized_and_cropped_copies(library):
    root, ix = library
    found = groups_of(ix, "--tier", "near")
    assert names(found[0]) == ["photo0000-cropped.jpg", "photo0000-half.png", "photo0000-resaved.jpg", "photo0000.jpg"]
    assert [names(g) for g in found[1:]] == [["photo0001.jpg", "same-bytes.jpg"]]  # identical bytes: identical hash
    first = found[0]["items"][0]
    assert first["keep"] and first["path"].endswith("photo0000.jpg")  # largest resolution, then oldest
    assert sum(i["keep"] for i in found[0]["items"]) == 1
    assert all(0.8 < i["score"] <= 1 for i in found[0]["items"])
    text = run("dupes", "--index", ix).output
    assert "keep" in text and "photo0000-half.png" in text


def test_similar_tier_uses_embedding_cosine(library):
    root, ix = library
    found = groups_of(ix, "--tier", "similar", "--threshold", "0.9999")
    assert ["photo0001.jpg", "same-bytes.jpg"] in [names(g) for g in found]  # one vector, cosine 1
    everything = groups_of(ix, "--tier", "similar", "--threshold", "-1")
    assert len(everything) == 1 and len(everything[0]["items"]) == 10
    scores = [i["score"] for i in everything[0]["items"]]
    assert scores[0] == 1.0 and all(-1 <= s <= 1 for s in scores)


def test_dupes_rejects_bad_thresholds(library):
    root, ix = library
    run("dupes", "--index", ix, "--threshold", "70", code=2)  # bad usage (issue 24: was 6)
    run("dupes", "--index", ix, "--tier", "similar", "--threshold", "2", code=2)


@pytest.mark.slow
def test_an_index_from_before_phashes_is_filled_without_reencoding(library):
    root, ix = library
    db = sqlite3.connect(ix / "catalog.db")
    db.execute("drop table phashes")
    # phashes arrived in schema 2 without a version bump: every version 3 catalog has the table
    db.execute("update meta set value = '2' where key = 'schema_version'")
    db.commit()
    db.close()
    assert groups_of(ix, "--tier", "near") == []  # read-only readers treat the missing table as empty
    summary = index_json(ix)
    assert summary["added"] == 0 and summary["times"]["items"] == 0  # nothing encoded again
    assert summary["times"]["extra"]["phashes_filled"] == 10
    assert len(groups_of(ix, "--tier", "near")[0]["items"]) == 4
    assert index_json(ix)["times"]["extra"]["phashes_filled"] == 0


def test_near_pairs_finds_every_pair_within_the_threshold():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, 300, dtype=np.int64).astype(np.uint64)
    flips = [np.uint64(sum(1 << int(b) for b in rng.choice(64, d, replace=False))) for d in rng.integers(0, 16, 300)]
    codes = np.concatenate([base, base ^ np.array(flips, dtype=np.uint64)])
    hexes = [f"{int(c):016x}" for c in codes]
    ids = np.arange(len(codes)) + 1
    found = dupes.near_pairs(ids, hexes, 10)
    brute = {(a + 1, b + 1) for a in range(len(hexes)) for b in range(a + 1, len(hexes))
             if dupes.hamming(hexes[a], hexes[b]) <= 10}
    assert {(int(a), int(b)) for a, b, _ in found} == brute
    assert all(dupes.hamming(hexes[a - 1], hexes[b - 1]) == d for a, b, d in found)


def _hit(i, score):
    return Hit(i, f"/p/{i}.jpg", score, "/p", f"{i}.jpg", 10, 10, "JPEG", 1, 0.0)


def test_collapse_folds_near_duplicates_into_the_better_hit():
    hits = [_hit(1, 0.9), _hit(2, 0.8), _hit(3, 0.7), _hit(4, 0.6), _hit(5, 0.5)]
    phashes = {1: "ffff0000ffff0000", 2: "ffff0000ffff0001", 3: "0000ffff0000ffff", 4: "ffff0000ffff0003"}
    out = dupes.collapse(hits, phashes, 4)
    assert [h.id for h in out] == [1, 3, 5]
    assert out[0].duplicates == [2, 4] and out[1].duplicates == [] and out[2].duplicates == []
    assert [h.score for h in out] == [0.9, 0.7, 0.5]


def test_query_collapse_gives_k_different_pictures(library):
    root, ix = library
    from alignsearch.search.engine import open as open_index

    engine = open_index(ix)
    plain = engine.search(image=str(root / "photo0000.jpg"), k=10)
    assert plain[0].duplicates == []
    folded = engine.search(image=str(root / "photo0000.jpg"), k=5, collapse=True)
    assert len(folded) == 5
    top = next(h for h in folded if h.path.endswith("photo0000.jpg") or "photo0000-" in h.path)
    assert len(top.duplicates) == 3
    shown = {h.id for h in folded} | {d for h in folded for d in h.duplicates}
    assert len(shown) == 5 + sum(len(h.duplicates) for h in folded)  # nothing shown twice
    out = json.loads(run("query", "--image", root / "photo0000.jpg", "--collapse", "-k", "5", "--index", ix,
                         "--json").stdout)
    assert len(out["results"]) == 5 and sum(len(r["duplicates"]) for r in out["results"]) >= 3
    assert out["query"]["collapse"] is True


def test_similar_by_id_and_by_path(library):
    root, ix = library
    path = root / "photo0002.jpg"
    by_path = json.loads(run("similar", path, "-k", "3", "--index", ix, "--json").stdout)
    me = by_path["query"]["similar"]
    assert len(by_path["results"]) == 3 and me not in [r["id"] for r in by_path["results"]]
    by_id = json.loads(run("similar", str(me), "-k", "3", "--index", ix, "--json").stdout)
    assert by_id["results"] == by_path["results"]
    scores = [r["score"] for r in by_id["results"]]
    assert scores == sorted(scores, reverse=True)
    run("similar", "999999", "--index", ix, code=6)
    run("similar", root / "nope.jpg", "--index", ix, code=6)


def test_similar_by_an_id_that_can_never_be_one_is_a_usage_error(library):
    """`similar 0` was exit 6, "not an indexed image", as 999999 (in range, not indexed) is: an id out of
    querycheck's range is a UsageError (exit 2) as the Python API's similar= is, and HTTP's 422 (README)."""
    _, ix = library
    for ref in ("0", "-1", "+0", "9223372036854775808"):
        out = run("similar", "--index", ix, "--", ref, code=2).output
        assert "an image id must be an integer from 1 to" in out
    with pytest.raises(UsageError):
        search_request.build(similar=0, by_vector=True)
    run("similar", "--index", ix, "--", "999999", code=6)  # a possible id that is not indexed stays unusable input


def test_similar_by_an_id_of_more_digits_than_python_converts_is_a_usage_error(library):
    """`similar 999...` of 5000 digits: int() refuses a string past 4300 digits with ValueError, which find_indexed
    let out as "unexpected ValueError: Exceeds the limit (4300 digits)" (exit 1); it was exit 6 before ids were
    checked. Far past 2^63-1, it is the usage error every id out of range is (exit 2, one line)."""
    _, ix = library
    out = run("similar", "--index", ix, "--", "9" * 5000, code=2).output
    assert "an image id must be an integer from 1 to" in out and len(out.strip().splitlines()) == 1


def test_similar_over_fetch_does_not_count_against_k(library):
    """Issue 24 #21: `similar ID -k 1000` was refused ("got 1001"), `-k 334 --collapse` too ("got 1003"):
    the image itself and the collapse's over-fetch are the search's business, not the user's k."""
    root, ix = library
    me = json.loads(run("similar", root / "photo0002.jpg", "-k", "1", "--index", ix, "--json").stdout)["query"]["similar"]
    every = json.loads(run("similar", str(me), "-k", "1000", "--index", ix, "--json").stdout)["results"]
    assert len(every) == 9 and me not in [r["id"] for r in every]
    folded = json.loads(run("similar", str(me), "-k", "334", "--collapse", "--index", ix, "--json").stdout)["results"]
    assert me not in [r["id"] for r in folded]
    assert sum(1 + len(r["duplicates"]) for r in folded) == 9 and len(folded) < 9  # the copies fold
    # the same through the Python API: exclude leaves ids out and still returns k
    import alignsearch

    engine = alignsearch.open(ix)
    hits = engine.search_vector(engine.vector_of(me), k=3, exclude=[me], sort="path")
    assert len(hits) == 3 and me not in [h.id for h in hits]


def test_phash_survives_the_copies_it_should_and_separates_distinct_images(tmp_path):
    from PIL import Image

    photos = smooth_photos(tmp_path / "p", 20, seed=3)
    for p in photos[:5]:
        original = phash.phash_of(Image.open(p).convert("RGB"))
        for c in near_copies(p, tmp_path / "c"):
            assert dupes.hamming(original, phash.phash_of(Image.open(c).convert("RGB"))) <= dupes.NEAR_THRESHOLD
    hashes = [phash.phash_of(Image.open(p).convert("RGB")) for p in photos]
    assert min(dupes.hamming(a, b) for i, a in enumerate(hashes) for b in hashes[i + 1 :]) > dupes.NEAR_THRESHOLD


@pytest.mark.slow
def test_noisy_generated_images_get_hashes_too(tmp_path, tiny_model):
    make_images(tmp_path / "imgs", 4)
    index_json(tmp_path / "ix", tmp_path / "imgs", "--model", tiny_model)
    with catalog.connect(tmp_path / "ix" / "catalog.db", readonly=True).connect() as conn:
        assert len(catalog.phashes_of(conn)) == 4


def _planted_index(tmp_path, n=12_000, dim=64, copies=300, seed=3):
    """An IVF-PQ index (as `alignsearch index` plans it for n) over clustered unit vectors whose last rows are
    near copies (cosine 0.93-0.995) of others, moved partly along the data so that some land in other lists."""
    from alignsearch.storage import ann, vectors
    from helpers import clustered

    rng = np.random.default_rng(seed)
    x = clustered(n, dim, seed=seed)
    src = rng.choice(n - copies, copies, replace=False)
    along = clustered(copies, dim, seed=seed + 1) + rng.standard_normal((copies, dim)).astype(np.float32) / np.sqrt(dim)
    along -= np.einsum("ij,ij->i", along, x[src])[:, None] * x[src]
    along /= np.linalg.norm(along, axis=1, keepdims=True)
    c = rng.uniform(0.93, 0.995, copies).astype(np.float32)[:, None]
    x[n - copies :] = c * x[src] + np.sqrt(1 - c**2) * along
    store = vectors.VectorStore(tmp_path / "vectors.f16", dim, 0)
    store.append(x)
    store.rows = n
    stored = store.get(np.arange(n))
    plan = ann.plan_index(n, dim)
    assert plan.kind == "ivfpq"
    index = ann.train_and_fill(ann.create(plan, dim), stored, [(stored, np.arange(n, dtype=np.int64) + 1)])
    live = np.stack([np.arange(n) + 1, np.arange(n)], axis=1)  # file id = row + 1
    unit = stored / np.linalg.norm(stored, axis=1, keepdims=True)
    return index, store, live, unit


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return _planted_index(tmp_path_factory.mktemp("planted"))


def _exact(unit, threshold):
    scores = np.triu(unit @ unit.T, k=1)
    a, b = np.nonzero(scores >= threshold)
    return {(int(i) + 1, int(j) + 1) for i, j in zip(a, b)}


@pytest.mark.slow
def test_similar_pairs_match_exact_all_pairs_on_an_ivf_pq_index(planted):
    index, store, live, unit = planted
    truth = _exact(unit, 0.95)
    assert len(truth) > 100
    found = dupes.similar_pairs(index, store, live, 0.95)  # the default nprobe
    assert {tuple(p) for p in found.tolist()} == truth  # every pair, and only true ones (exact scores)
    assert (found[:, 0] < found[:, 1]).all() and len(np.unique(found, axis=0)) == len(found)
    one_list = {tuple(p) for p in dupes.similar_pairs(index, store, live, 0.95, nprobe=1).tolist()}
    assert one_list < truth  # its own list only: pairs split across lists are missed (none invented)


@pytest.mark.slow
def test_similar_pairs_cover_vectors_the_index_does_not_hold_yet(planted):
    import faiss

    from alignsearch.storage import ann

    index, store, live, unit = planted
    index = faiss.clone_index(index)
    truth = _exact(unit, 0.95)
    ann.remove(index, [b for _, b in sorted(truth)[:20]])  # catalog rows written after the index was
    assert {tuple(p) for p in dupes.similar_pairs(index, store, live, 0.95).tolist()} == truth


@pytest.mark.slow
def test_similar_pairs_keep_k_partners_per_list_at_a_low_threshold(planted):
    index, store, live, unit = planted
    found = dupes.similar_pairs(index, store, live, -1.0, k=3, nprobe=2)
    per_vector = np.bincount(found.ravel())
    assert per_vector.max() < 200  # not the 12,000 partners a threshold of -1 admits
    assert len(dupes.components(found.tolist())) >= 1


@pytest.mark.slow
def test_similar_while_an_index_run_commits_rows_reads_them_too(indexed_images, monkeypatch):
    """An `index` run commits rows after dupes took its snapshot and before it read the live pairs (the same
    generation): they are read from the store as now, not past the end of the snapshot's."""
    import alignsearch

    photos, ix = indexed_images(6)
    real_pairs, added = catalog.live_pairs, []

    def pairs_after_a_run(conn, **kwargs):
        if not added:
            added.append(True)
            more = make_images(photos / "more", 2, seed=13)
            shutil.copy(more[0], more[0].with_name(f"copy{more[0].suffix}"))
            index_json(ix, photos, "--device", "cpu")
        return real_pairs(conn, **kwargs)

    with alignsearch.open(ix) as engine:
        engine.refresh()
        monkeypatch.setattr(catalog, "live_pairs", pairs_after_a_run)
        groups = dupes.find_groups(engine, "similar")
    assert added and any(len(g.items) == 2 and any("/copy." in i["path"] for i in g.items) for g in groups), groups


def test_a_file_listed_in_two_groups_is_one_file_to_be_rid_of():
    """A video whose two scenes each have a larger photo kept is listed in both groups: "files besides the ones to
    keep" counted it twice (3 for two files)."""
    def item(path, keep):
        return {"id": 0, "path": path, "score": 1.0, "width": 1, "height": 1, "size": 1, "mtime": 0.0, "keep": keep}

    groups = [dupes.Group("near", [item("/a/big1.png", True), item("/a/clip.mp4", False), item("/a/small.png", False)]),
              dupes.Group("near", [item("/a/big2.png", True), item("/a/clip.mp4", False)])]
    assert dupes.to_be_rid_of(groups) == ["/a/clip.mp4", "/a/small.png"]


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["", "file://"])
def test_a_file_two_roots_list_is_not_its_own_duplicate(tmp_path, tiny_model, scheme):
    """A folder root and a CSV list naming one of its photos hold that file under two catalog rows: `dupes` listed it
    as a group of itself, the same path twice and both marked keep ("exact: 2 files ... 1 group, 0 files besides the
    ones to keep"). One file is one member of a group, whatever root lists it; real copies still group. A list
    naming it by a file:// URL too (photo0001.jpg and file:///.../photo0001.jpg were listed as copies)."""
    lib = tmp_path / "lib"
    photos = smooth_photos(lib, 3)
    shutil.copyfile(photos[1], lib / "same-bytes.jpg")
    (tmp_path / "favourites.csv").write_text(f"path\n{scheme}{photos[0]}\n{scheme}{photos[1]}\n")
    ix = tmp_path / "ix"
    index_json(ix, lib, "--model", tiny_model)
    index_json(ix, tmp_path / "favourites.csv")
    for tier in ("exact", "near"):
        found = groups_of(ix, "--tier", tier)
        assert [names(g) for g in found] == [["photo0001.jpg", "same-bytes.jpg"]], (tier, found)
        assert [i["keep"] for i in found[0]["items"]] == [True, False]


def test_nprobe_outside_the_similar_tier_is_bad_usage(library):
    """`dupes --tier near --nprobe 4` (and exact) ran and said nothing of an option those tiers never use: refused,
    exit 2, as `--threshold` for the exact tier is; the similar tier takes it."""
    root, ix = library
    for tier in ("near", "exact"):
        out = run("dupes", "--tier", tier, "--nprobe", "4", "--index", ix, code=2)
        assert "--nprobe is for --tier similar" in out.output, out.output
    run("dupes", "--tier", "similar", "--nprobe", "4", "--index", ix)


@pytest.mark.slow
def test_a_file_reached_by_two_names_is_not_its_own_duplicate(tmp_path, tiny_model):
    """One file named twice: a list's file:// URL of a folder root's photo, and a symlink in the folder to another
    of its photos. `dupes` listed each as a group of itself: "keep lib/photo0000.jpg", then file://.../photo0000.jpg
    among the "files besides the ones to keep"; and "keep a-link.jpg" with photo0002.jpg, the link's target, to be
    rid of (removing it leaves the link dangling: the picture is gone). A file is one member, whatever names it."""
    lib = tmp_path / "lib"
    photos = smooth_photos(lib, 3)
    shutil.copyfile(photos[1], lib / "same-bytes.jpg")
    (lib / "a-link.jpg").symlink_to(photos[2])
    (tmp_path / "fav.csv").write_text(f"path\n{photos[0].as_uri()}\n")
    ix = tmp_path / "ix"
    index_json(ix, lib, "--model", tiny_model)
    assert index_json(ix, tmp_path / "fav.csv")["added"] == 1
    for tier in ("exact", "near"):
        found = groups_of(ix, "--tier", tier)
        assert [names(g) for g in found] == [["photo0001.jpg", "same-bytes.jpg"]], (tier, found)


def test_a_similar_group_holds_only_files_similar_to_the_one_kept():
    """A component is connected through its pairs: a chain a~b~c put c, at cosine 0 to the kept a, among the files
    besides the one to keep. It is split around each kept file (dupes.around_kept)."""
    from alignsearch.search.dupes import around_kept

    angle = np.radians([0, 45, 90, 100])  # a~b 0.71, b~c 0.71, c~d 0.98; a~c 0, a~d -0.17
    vecs = {i: np.array([np.cos(t), np.sin(t)]) for i, t in zip("abcd", angle)}

    def cosines(kept, others):
        return np.array([vecs[kept] @ vecs[o] for o in others])

    assert around_kept(list("dcba"), lambda i: i, cosines, 0.7) == [["a", "b"], ["c", "d"]]
    assert around_kept(list("abcd"), lambda i: i, cosines, -1.0) == [["a", "b", "c", "d"]]
    assert around_kept(list("abcd"), lambda i: i, cosines, 0.99) == [["a"], ["b"], ["c"], ["d"]]


def test_every_similar_member_is_at_the_threshold_to_its_kept_file(library):
    root, ix = library
    for threshold in (0.2, 0.5, 0.8):
        for group in groups_of(ix, "--tier", "similar", "--threshold", str(threshold)):
            assert all(i["score"] >= threshold for i in group["items"]), (threshold, group)
