"""Bounded memory and no blocking on hostile input: huge sparse files, FIFOs, devices, directories;
and real photos up to the documented pixel cap are accepted."""

import io
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import index_json, make_images, run
from helpers import alignsearch, alignsearch_peak_rss, summary


def _failed(ix):
    info = json.loads(run("info", "--failed", "--json", "--index", ix).stdout)
    return {os.path.basename(f["path"]): f["reason"] for f in info["failed_files"]}


@pytest.mark.slow
def test_a_3gb_sparse_jpg_is_recorded_as_failed_in_bounded_memory(tmp_path, tiny_model):
    root, ix = tmp_path / "photos", tmp_path / "ix"
    make_images(root, 2)
    with open(root / "huge.jpg", "wb") as f:
        f.truncate(3 * 2**30)  # sparse: no disk used, 3 GB of zeros when read
    proc, peak = alignsearch_peak_rss("index", root, "--index", ix, "--model", tiny_model, "--device", "cpu",
                                      "--workers", "1", "--json")
    s = summary(proc)
    assert (s["added"], s["failed"]) == (2, 1)
    assert peak < 2**30, f"peak RSS {peak / 2**20:.0f} MiB"
    assert "too large" in _failed(ix)["huge.jpg"]


@pytest.mark.slow
def test_fifos_and_devices_met_while_scanning_are_recorded_without_blocking(tmp_path, tiny_model):
    root, ix = tmp_path / "photos", tmp_path / "ix"
    make_images(root, 2)
    os.mkfifo(root / "pipe.jpg")
    os.symlink("/dev/zero", root / "zero.jpg")
    start = time.monotonic()
    s = summary(alignsearch("index", root, "--index", ix, "--model", tiny_model, "--device", "cpu", "--json",
                            timeout=120))
    assert time.monotonic() - start < 60
    assert (s["added"], s["failed"]) == (2, 2)
    failed = _failed(ix)
    assert failed["pipe.jpg"] == "not a regular file: fifo"
    assert failed["zero.jpg"] == "not a regular file: character device"


@pytest.mark.parametrize("kind", ["device", "fifo", "directory"])
@pytest.mark.slow
def test_query_image_that_is_not_a_regular_file_fails_fast_with_exit_6(tmp_path, tiny_model, kind):
    root, ix = tmp_path / "photos", tmp_path / "ix"
    make_images(root, 2)
    index_json(ix, root, "--model", tiny_model, "--device", "cpu")
    target = {"device": "/dev/zero", "fifo": tmp_path / "pipe", "directory": root}[kind]
    if kind == "fifo":
        os.mkfifo(target)
    start = time.monotonic()
    proc = alignsearch("query", "--image", target, "--index", ix, timeout=120)
    assert proc.returncode == 6, proc.stderr[-2000:]
    assert "not a regular file" in proc.stderr and proc.stderr.count("\n") == 1
    # in-process (no interpreter start-up): well under a second
    start = time.monotonic()
    result = run("query", "--image", target, "--index", ix, code=6)
    assert time.monotonic() - start < 1.0 and "not a regular file" in result.output


@pytest.mark.slow
def test_a_108_megapixel_photo_is_accepted(tmp_path):
    from alignsearch.media.images import DEFAULT_MAX_PIXELS, ImageSpec, decode

    buf = io.BytesIO()
    Image.new("RGB", (12000, 9000), (40, 120, 200)).save(buf, "JPEG", quality=80)
    assert 12000 * 9000 < DEFAULT_MAX_PIXELS
    spec = ImageSpec((40, 40), 2, (32, 32), 1 / 127.5, True, None, None, None)
    out = decode(buf.getvalue(), spec)
    assert (out.width, out.height) == (12000, 9000)
    assert np.abs(out.crop.astype(int) - (40, 120, 200)).max() <= 3


@pytest.mark.slow
def test_a_16_bit_image_converts_in_bounded_memory():
    """Issue 24 #17: a 16-bit greyscale image was scaled as a whole float64 array and its temporaries (1.2 GB
    for a 49 MP PNG of 95 KB); now in float32 bands: about 3 bytes per pixel, the same 8-bit values."""
    import tracemalloc

    from alignsearch.media import images

    rng = np.random.default_rng(0)
    pixels = (rng.random((3000, 4000)) * 65535).astype(np.uint16)
    img = Image.fromarray(pixels)
    assert img.mode == "I;16"
    tracemalloc.start()
    try:
        out = images.to_rgb(img)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 5 * pixels.size, peak / pixels.size  # float64 whole: 24+ bytes per pixel
    expected = np.clip(pixels.astype(np.float64) * (255 / 65535), 0, 255).astype(np.uint8)
    assert out.mode == "RGB" and np.array_equal(np.asarray(out)[:, :, 0], expected)
    small = (rng.random((30, 40)) * 200).astype(np.int32)  # a 32-bit image within 8 bits is not rescaled
    assert np.array_equal(np.asarray(images.to_rgb(Image.fromarray(small, "I")))[:, :, 1], small.astype(np.uint8))


@pytest.mark.slow
def test_a_root_whose_path_is_not_utf8_is_refused_in_one_line(tmp_path, indexed_images):
    """A folder named b'fotos\\xff' given as a root failed at the catalog's first read of it, "error: unexpected
    UnicodeEncodeError" (the catalog records roots as text): refused before anything is written (exit 6); the files
    of the index stay as they were, and a folder above it (names below a root may be any bytes) is indexed."""
    from indexer.roots import refuse_names_not_utf8

    root, ix = indexed_images(3)
    odd = os.fsdecode(os.fsencode(str(tmp_path)) + b"/fotos\xff")
    os.mkdir(odd)
    make_images(Path(odd), 2)
    before = run("roots", "--json", "--index", ix).stdout
    out = run("index", odd, "--index", ix, code=6)
    assert out.output.startswith("error: cannot index ") and "fotos\\xff" in out.output and "not UTF-8" in out.output
    assert "unexpected" not in out.output and len(out.output.strip().splitlines()) == 1
    assert run("roots", "--json", "--index", ix).stdout == before
    refuse_names_not_utf8([str(root), "https://example.com/a\u00e9"])  # UTF-8 paths and URLs pass
    with pytest.raises(Exception, match="not UTF-8"):
        refuse_names_not_utf8([str(root), odd])
