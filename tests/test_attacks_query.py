"""Attacks on the query layer: the answers a search gives (the ids, their order, their scores, how many), the
same through the Python API, the CLI and the HTTP API. Each test is an attack that once succeeded."""

import os

import pytest
from PIL import Image

import alignsearch
from alignsearch.search.engine import sort_hits
from conftest import index_json
from helpers import make_video, scene_frame, smooth_photos


@pytest.fixture
def library(prebuilt, tiny_model):
    """6 photos (photo0000 with 7 re-saved copies, photo0001 the oldest of all), a 30-second video of one drifting
    scene (a moment a second, all alike) and a short one of two scenes; indexed, a moment at least every second."""

    def build(base):
        root = base / "lib"
        photos = smooth_photos(root / "photos", 6)
        picture = Image.open(photos[0])
        for i, quality in enumerate((95, 90, 85, 80, 75, 70, 65)):
            picture.save(root / "copies" / f"copy{i}.jpg" if (root / "copies").is_dir()
                         else _mkdir(root / "copies") / f"copy{i}.jpg", quality=quality)
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


def _mkdir(path):
    path.mkdir(parents=True, exist_ok=True)
    return path


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
