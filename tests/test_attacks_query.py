"""Attacks on the query layer: the answers a search gives (the ids, their order, their scores, how many), the
same through the Python API, the CLI and the HTTP API. Each test is an attack that once succeeded."""

import os

import numpy as np
import pytest
import requests
from PIL import Image

import alignsearch
from alignsearch.search.engine import Hit, sort_hits
from conftest import index_json, run
from helpers import make_video, scene_frame, smooth_photos


@pytest.fixture
def library(prebuilt, tiny_model):
    """6 photos (photo0000 with 7 re-saved copies, photo0001 the oldest of all), a 30-second video of one drifting
    scene (a moment a second, all alike) and a short one of two scenes; indexed, a moment at least every second."""

    def build(base):
        root = base / "lib"
        photos = smooth_photos(root / "photos", 6)
        picture = Image.open(photos[0])
        (root / "copies").mkdir()
        for i, quality in enumerate((95, 90, 85, 80, 75, 70, 65)):
            picture.save(root / "copies" / f"copy{i}.jpg", quality=quality)
        when = 1.5e9
        for path in sorted(root.rglob("*.jpg")):  # taken = mtime (no EXIF): photo0001 first, the rest later
            os.utime(path, (when, when if path != photos[1] else 1.0e9))
            when += 86400
        make_video(root / "video" / "long.mp4", [(11, 30)])
        make_video(root / "video" / "short.mp4", [(12, 3), (13, 3)])
        Image.fromarray(scene_frame(11)).save(base / "scene.png")
        ix = base / "ix"
        index_json(ix, root, "--model", tiny_model, "--device", "cpu", "--video-interval", "1")
        return root, ix, base / "scene.png"

    return prebuilt.folder("attacks-query-library", build)[1]


@pytest.mark.slow
def test_collapse_with_a_sort_keeps_the_best_k_and_folds_into_the_best(library):
    """--collapse folded the 3k candidates in the order --sort asked for and cut that at k: `--sort -taken
    --collapse -k 2` listed the two newest pictures of the 6 best, not the 2 best pictures newest first (the best
    match, an old photo, was missing), and a copy was kept in place of the better original."""
    root, ix, _ = library
    query = str(root / "photos" / "photo0001.jpg")
    with alignsearch.open(ix, device="cpu") as engine:
        best = engine.search(image=query, k=2, collapse=True)
        for sort in ("-taken", "taken", "path"):
            sorted_ = engine.search(image=query, k=2, collapse=True, sort=sort)
            assert {h.id for h in sorted_} == {h.id for h in best}, sort
            assert {h.id: h.duplicates for h in sorted_} == {h.id: h.duplicates for h in best}, sort
            assert sorted_ == sort_hits(best, sort)


def test_collapse_returns_k_pictures_when_one_has_more_copies_than_the_over_fetch(library):
    """--collapse looked at 3k candidates only: a picture with 7 copies took all 6 of `-k 2` and one result came
    back, though the library holds other pictures."""
    root, ix, _ = library
    with alignsearch.open(ix, device="cpu") as engine:
        hits = engine.search(image=str(root / "photos" / "photo0000.jpg"), k=2, collapse=True, media="photo")
        assert len(hits) == 2, [(h.path, h.duplicates) for h in hits]
        assert len(hits[0].duplicates) == 7 and hits[1].duplicates == []
        every = engine.search(image=str(root / "photos" / "photo0000.jpg"), k=1000, collapse=True, media="photo")
        assert len(every) == 6  # the six pictures, every copy folded


def test_collapse_looks_no_deeper_than_its_bound(library, monkeypatch):
    """The deeper looks of --collapse grew 4x until k pictures or the whole library: where the best matches are
    copies of fewer than k pictures, a million-image library was scored and folded whole (~20 s). Bounded now."""
    from alignsearch.search import engine as engine_module

    root, ix, _ = library
    monkeypatch.setattr(engine_module, "COLLAPSE_MAX_DEPTH", 8)
    depths = []
    with alignsearch.open(ix, device="cpu") as engine:
        search = engine._search
        monkeypatch.setattr(engine, "_search", lambda snap, query, opts: depths.append(opts.k) or search(snap, query, opts))
        hits = engine.search(image=str(root / "photos" / "photo0000.jpg"), k=2, collapse=True, media="photo")
    assert depths == [6, 8] and len(hits) == 1 and len(hits[0].duplicates) == 7, depths


def test_per_video_never_starves_the_results(library):
    """The per-video cap looked at 4k candidates: a video with 30 alike moments filled them all, so `--per-video
    1 -k 5` gave 1 result (the other video and every photo lost), `--media video` 1 of 2 videos."""
    _, ix, scene = library
    with alignsearch.open(ix, device="cpu") as engine:
        videos = engine.search(image=str(scene), k=5, per_video=1, media="video")
        assert sorted(h.relpath for h in videos) == ["video/long.mp4", "video/short.mp4"]
        hits = engine.search(image=str(scene), k=5, per_video=1)
        assert len(hits) == 5 and hits[0].relpath == "video/long.mp4"
        assert sum(h.relpath == "video/long.mp4" for h in hits) == 1
        hits = engine.search(image=str(scene), k=1000, per_video=2)
        assert len(hits) == 6 + 7 + 2 + 2  # photos, copies, two moments of each video


SMALL_IVF = 1000  # vectors from which an IVF-PQ index is made here (ann.FLAT_BELOW: 10,000)


@pytest.mark.slow
@pytest.mark.parametrize("layout", [{}, {"index_shards": 2}])
def test_an_ivfpq_search_returns_k_when_the_lists_visited_hold_fewer(tmp_path, monkeypatch, layout):
    """Unfiltered, an IVF-PQ search returned what its nprobe lists held: `-k 1000` on a small IVF-PQ library
    answered 79 of 336 images, `--nprobe 1 -k 50` 13, where the same query with a filter every image passes
    (searched exactly) answered them all. k results whenever the index holds k."""
    from alignsearch.storage import ann
    from helpers import layout_index

    monkeypatch.setattr(ann.plan_index, "__defaults__", (SMALL_IVF,))
    db, _, _ = layout_index(tmp_path / "ix", 2000, **layout)
    db.dispose()
    rng = np.random.default_rng(1)
    query = rng.standard_normal(16).astype(np.float32)
    query /= np.linalg.norm(query)
    with alignsearch.open(tmp_path / "ix") as engine:
        assert engine.plan.kind == "ivfpq"
        for k, nprobe in ((1000, None), (50, 1), (1000, 1)):
            hits = engine.search_vector(query, k=k, nprobe=nprobe)
            assert len(hits) == k and len({h.id for h in hits}) == k, (k, nprobe, len(hits))
            scores = [h.score for h in hits]
            assert scores == sorted(scores, reverse=True)
        assert len(engine.search_vector(query, k=1000, where="width > 0")) == 1000  # as a filter every image passes


def test_an_uploaded_query_image_is_searched_as_the_same_image_given_by_path(library, tmp_path):
    """The server decoded an upload whole where a query image given by path (the CLI alone, Engine.search) is
    decoded as the indexer decodes, a large one reduced first: the same 320x240 photo scored its own file
    0.99995 through the server and 1.0 alone, every other score differed too, so `alignsearch query --image` gave
    other scores, and could give another order, once a server ran."""
    from alignsearch.surfaces.server import ServerConfig, start_in_thread

    root, ix, _ = library
    png = tmp_path / "photo.png"
    Image.open(root / "photos" / "photo0002.jpg").save(png)
    with alignsearch.open(ix, device="cpu") as engine:
        server = start_in_thread(engine, ServerConfig(port=0, token="s3cret"))
        try:
            for image, text in ((root / "photos" / "photo0002.jpg", None), (png, None), (png, "red car")):
                alone = [(h.id, h.score) for h in engine.search(image=str(image), text=text, k=5)]
                fields = {"k": "5", **({"q": text} if text else {})}
                answer = requests.post(server.url + "/api/search", data=fields, files={"image": image.read_bytes()},
                                       headers={"Authorization": "Bearer s3cret"}, timeout=60)
                assert answer.status_code == 200, answer.text
                assert [(h["id"], h["score"]) for h in answer.json()["results"]] == alone, image.name
        finally:
            server.shutdown()


@pytest.mark.parametrize("option, value, reason", [("-k", "0", "k must be an integer from 1 to 1000, got 0"),
                                                   ("-k", "-3", "k must be an integer from 1 to 1000, got -3"),
                                                   ("-k", "1001", "k must be an integer from 1 to 1000, got 1001"),
                                                   ("--nprobe", "0", "nprobe must be an integer from 1 to 65536, got 0")])
def test_a_k_or_nprobe_out_of_range_is_refused_by_the_cli_as_by_the_api(library, option, value, reason):
    """One set of limits (querycheck): `query -k 0` was click's usage error (exit 2, "0 is not in the range x>=1")
    while `-k 1001` and the Python API's k=0 were refused by querycheck (exit 6, "k must be an integer from 1 to
    1000"). One message now, and exit 2: an option out of its range is bad usage (README, exit codes)."""
    from alignsearch.errors import UsageError

    _, ix, _ = library
    with alignsearch.open(ix, device="cpu") as engine, pytest.raises(UsageError) as refused:
        engine.search(text="red", **{option.lstrip("-"): int(value)})
    assert str(refused.value) == reason and refused.value.exit_code == 2
    out = run("query", "red", option, value, "--index", ix, code=2)
    assert out.output.strip() == f"error: {reason}"
    if option == "-k":  # `similar` too, as search_vector refuses it
        assert run("similar", "1", "-k", value, "--index", ix, code=2).output.strip() == f"error: {reason}"


def test_sort_by_taken_orders_times_within_one_second():
    """--sort taken compared the ISO strings: "…:20Z" sorted after "…:20.500000Z" ('.' < 'Z'), so a photo taken
    half a second later came first (file times without EXIF carry fractions)."""
    from alignsearch.media.photometa import iso

    def hit(i, taken):
        return Hit(i, f"/p/{i}.jpg", 1.0 - i / 10, "/p", f"{i}.jpg", 1, 1, "JPEG", 1, 0.0, taken=iso(taken))

    hits = [hit(1, 1_600_000_000.5), hit(2, 1_600_000_000.0), hit(3, 1_599_999_999.25), hit(4, None)]
    assert [h.id for h in sort_hits(hits, "taken")] == [3, 2, 1, 4]
    assert [h.id for h in sort_hits(hits, "-taken")] == [1, 2, 3, 4]
