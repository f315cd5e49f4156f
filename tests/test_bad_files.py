"""Every kind of odd file a real photo folder holds: nothing stops a run, each failure has a reason."""

import base64
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from alignsearch.errors import BadImageError
from alignsearch.media.images import open_rgb
from indexer.decode import read_item
from indexer.scan import Found
from conftest import run
from helpers import png_bomb


def rgb(w=64, h=48, seed=0):
    return Image.fromarray((np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8))


def build_odd_corpus(root):
    """Returns (names expected indexed, {name: reason fragment} expected failed)."""
    root.mkdir()
    ok, bad = set(), {}

    def save(name, img, **kw):
        img.save(root / name, **kw)
        ok.add(name)

    full = io.BytesIO()
    rgb(300, 200).save(full, "JPEG")
    (root / "truncated.jpg").write_bytes(full.getvalue()[: len(full.getvalue()) // 2])
    bad["truncated.jpg"] = "cannot decode"
    (root / "empty.jpg").write_bytes(b"")
    bad["empty.jpg"] = "empty file"
    (root / "notes.png").write_text("just some text, not a picture")
    bad["notes.png"] = "not an image"
    (root / "bomb.png").write_bytes(png_bomb(50_000, 50_000))
    bad["bomb.png"] = "too large"
    (root / "photo.heic").write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64)
    bad["photo.heic"] = "heif"

    save("wide.png", rgb(4000, 3, 1))
    save("tall.png", rgb(2, 3000, 2))
    save("cmyk.jpg", rgb(seed=3).convert("CMYK"))
    save("grey16.png", Image.fromarray((np.random.default_rng(4).random((40, 50)) * 65535).astype(np.uint16)))
    save("palette.png", rgb(seed=5).convert("P"))
    pal = rgb(seed=6).convert("P")
    pal.info["transparency"] = 0
    save("palette_transparent.png", pal, transparency=0)
    save("la.png", rgb(seed=7).convert("LA"))
    rgba = rgb(seed=8).convert("RGBA")
    rgba.putalpha(128)
    save("rgba.png", rgba)
    frames = [rgb(seed=s) for s in (9, 10)]
    save("anim.gif", frames[0], save_all=True, append_images=frames[1:])
    save("anim.webp", frames[0], save_all=True, append_images=frames[1:])
    save("pages.tiff", frames[0], save_all=True, append_images=frames[1:])
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    save("rotated.jpg", rgb(80, 40, 11), exif=exif)
    save("café 猫.png", rgb(seed=12))
    nonutf8 = os.fsdecode(b"caf\xe9.jpg")
    rgb(seed=13).save(os.path.join(os.fsencode(root), b"caf\xe9.jpg"), "JPEG")
    ok.add("caf\\xe9.jpg")

    os.symlink(root / "missing-target.jpg", root / "dangling.jpg")
    bad["dangling.jpg"] = "broken symlink"
    os.symlink(root / "loop_b.jpg", root / "loop_a.jpg")
    os.symlink(root / "loop_a.jpg", root / "loop_b.jpg")
    bad["loop_a.jpg"] = "symbolic links"
    bad["loop_b.jpg"] = "symbolic links"
    os.symlink(root, root / "dir_loop")  # a directory symlink to itself: never followed

    rgb(seed=14).save(root / "._resource_fork.jpg", "JPEG")
    (root / ".DS_Store").write_bytes(b"\x00\x01junk")
    (root / "album.jpg").mkdir()  # a directory named like an image
    rgb(seed=15).save(root / "album.jpg" / "inside.png")
    ok.add("album.jpg/inside.png")
    (root / ".hidden").mkdir()
    rgb(seed=16).save(root / ".hidden" / "secret.png")
    return ok, bad, nonutf8


@pytest.mark.slow
def test_odd_corpus_indexes_what_it_can_and_records_the_rest(tmp_path, tiny_model, monkeypatch):
    monkeypatch.delenv("ALIGNSEARCH_INDEX", raising=False)
    corpus = tmp_path / "odd"
    ok, bad, nonutf8 = build_odd_corpus(corpus)
    ix = tmp_path / "ix"
    summary = json.loads(run("index", corpus, "--index", ix, "--model", tiny_model, "--device", "cpu", "--json").stdout)
    assert summary["failed"] == len(bad)

    info = json.loads(run("info", "--failed", "--json", "--index", ix).stdout)
    failed = {os.path.relpath(f["path"], corpus): f["reason"] for f in info["failed_files"]}
    assert set(failed) == set(bad)
    for name, fragment in bad.items():
        assert fragment.lower() in failed[name].lower(), (name, failed[name])
    assert info["images"] == len(ok)

    hits = json.loads(run("query", "x", "-k", "100", "--json", "--index", ix).stdout)["results"]
    assert {h["relpath"] for h in hits} == ok
    paths = {h["relpath"]: h for h in hits}
    assert (paths["rotated.jpg"]["width"], paths["rotated.jpg"]["height"]) == (40, 80)  # EXIF applied
    # one representation in JSON for path and relpath (\xNN), and the name's bytes whole in path_b64
    cafe = paths["caf\\xe9.jpg"]
    assert cafe["path"].endswith("caf\\xe9.jpg") and cafe["path"] == os.path.join(str(corpus), cafe["relpath"])
    raw = base64.b64decode(cafe["path_b64"])
    assert os.path.exists(raw) and raw.endswith(b"caf\xe9.jpg") and os.fsdecode(raw).endswith(nonutf8)
    assert "path_b64" not in paths["rotated.jpg"]
    listed = subprocess.run([sys.executable, "-m", "alignsearch", "query", "x", "-k", "100", "--index", str(ix), "--paths",
                             "-0"], capture_output=True, timeout=300)
    assert listed.returncode == 0 and raw + b"\0" in listed.stdout  # the real bytes, for xargs -0
    assert len(listed.stdout.split(b"\0")[:-1]) == len(ok)
    assert "caf\\xe9.jpg" in run("query", "x", "-k", "100", "--index", ix).output

    # hidden folders only on request
    again = json.loads(run("index", "--index", ix, "--include-hidden", "--json").stdout)
    assert again["added"] == 1 and again["failed"] == 0


def test_frames_and_modes_decode_like_their_first_frame():
    frames = [rgb(seed=1), rgb(seed=2)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    first = io.BytesIO()
    frames[0].save(first, "GIF")
    a, _ = open_rgb(buf.getvalue())
    b, _ = open_rgb(first.getvalue())
    assert np.array_equal(np.asarray(a), np.asarray(b))
    transparent = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    buf = io.BytesIO()
    transparent.save(buf, "PNG")
    img, _ = open_rgb(buf.getvalue())
    assert img.getpixel((0, 0)) == (255, 255, 255)  # transparency on white, not black


def test_bomb_is_refused_from_the_header_without_decoding():
    with pytest.raises(BadImageError, match="too large"):
        open_rgb(png_bomb(100_000, 100_000))


def test_file_that_vanishes_before_reading_is_a_failure_not_a_crash(tmp_path, tiny_model):
    from alignsearch.encoders.model import Encoder

    spec = Encoder(str(tiny_model), device="cpu").spec
    item = read_item(Found(str(tmp_path), "gone.jpg", 10, 0.0), spec)
    assert item.crop is None and "cannot read" in item.reason


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file_is_recorded(tmp_path, tiny_model):
    from alignsearch.encoders.model import Encoder

    path = tmp_path / "locked.jpg"
    rgb().save(path)
    path.chmod(0)
    item = read_item(Found(str(tmp_path), "locked.jpg", 10, 0.0), Encoder(str(tiny_model), device="cpu").spec)
    assert "cannot read" in item.reason


def test_fast_decode_is_close_to_the_exact_crop_and_reports_the_stored_size(tiny_model):
    from alignsearch.media.images import ImageSpec, decode

    spec = ImageSpec((346, 346), 2, (289, 289), 1 / 127.5, True, None, None, None)
    big = Image.fromarray((np.random.default_rng(1).random((60, 80, 3)) * 255).astype(np.uint8)).resize((3200, 2400))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    big.save(buf, "JPEG", quality=92, exif=exif)
    exact, fast = decode(buf.getvalue(), spec), decode(buf.getvalue(), spec, fast=True)
    assert (exact.width, exact.height) == (fast.width, fast.height) == (2400, 3200)
    diff = np.abs(exact.crop.astype(int) - fast.crop.astype(int))
    assert diff.mean() < 4 and not np.array_equal(exact.crop, fast.crop)  # close, not identical
