"""The decoder reads the formats the indexer lists and no other of Pillow's: some of Pillow's readers decode a whole
picture at open, before any size check (ICO/CUR with an embedded PNG), or run a program (EPS and Ghostscript)."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from alignsearch.errors import BadImageError
from alignsearch.media import images, photometa


def _png_of_zeros(side: int) -> bytes:
    """A valid side x side RGB PNG, written row by row (never held whole): a few hundred KB for 12000²."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    z, parts, row = zlib.compressobj(9), [], b"\x00" * (1 + 3 * side)
    for _ in range(side):
        parts.append(z.compress(row))
    parts.append(z.flush())
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


def _ico_around(png: bytes) -> bytes:
    """An ICO whose one entry says 16x16 and holds `png`."""
    return struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 16, 16, 0, 0, 1, 32, len(png), 22) + png


@pytest.mark.slow
def test_an_ico_is_refused_from_its_header_not_after_decoding_its_picture(tmp_path):
    # measured in a process of its own: Pillow's pixel buffers are not Python allocations
    ico = tmp_path / "big.ico"
    ico.write_bytes(_ico_around(_png_of_zeros(12000)))  # 144 MP: 432 MB as RGB, decoded at open by Pillow's ICO reader
    code = f"""
import resource
from alignsearch.errors import BadImageError
from alignsearch.media import images
data = open({str(ico)!r}, "rb").read()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    images.open_rgb(data, max_pixels=50_000_000)
except BadImageError as exc:
    print("refused:", exc)
print("pixels", images.decode_pixels(data, images.ImageSpec((289, 289), 3, None, 1 / 255, False, None, None, None)))
print("grew_mb", (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    assert "refused: not an image alignsearch reads" in out
    assert "pixels 0" in out
    grew = int(out.rsplit("grew_mb", 1)[1])
    assert grew < 100, out


@pytest.mark.parametrize("fmt", ["EPS", "ICO", "PPM", "TGA", "PCX", "SGI", "DDS"])
def test_formats_outside_the_list_are_not_read(fmt):
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(buf, fmt) if fmt != "EPS" else buf.write(
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\nshowpage\n"
    )
    data = buf.getvalue()
    with pytest.raises(BadImageError, match="not an image alignsearch reads"):
        images.open_rgb(data)
    assert photometa.read(data, 1.0)["camera"] is None  # EXIF is not looked for in them either


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"])
def test_the_listed_formats_still_decode(fmt):
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(buf, fmt)
    img, name = images.open_rgb(buf.getvalue())
    assert (img.size, name) == ((40, 30), fmt)


SPEC = images.ImageSpec(resize=(346, 346), resample=3, crop=(289, 289), rescale_factor=1 / 127.5,
                        rescale_offset=True, mean=None, std=None, include_top_std=None)  # align-base's


def _camera_pictures(size=(4000, 3000)) -> tuple[bytes, bytes]:
    """A camera's MPO (its JPEG, then a second picture) and the same first picture saved as a plain JPEG."""
    ramp = np.linspace(0, 255, size[0], dtype=np.uint8)
    first = Image.fromarray(np.dstack([np.tile(ramp, (size[1], 1))] * 3))
    second = first.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    mpo, jpeg = io.BytesIO(), io.BytesIO()
    first.save(mpo, "MPO", save_all=True, append_images=[second], quality=90)
    first.save(jpeg, "JPEG", quality=90)
    return mpo.getvalue(), jpeg.getvalue()


@pytest.mark.parametrize("fast", [False, True])
def test_a_camera_mpo_decodes_at_a_reduced_scale_as_a_jpeg_does(fast):
    """Pillow names a camera's multi-picture JPEG "MPO": every check for "JPEG" skipped it, so a 12 MP camera
    photo was decoded whole (and box-reduced after), never at the DCT scale its JPEG twin takes. Its format as
    stored stays MPO."""
    mpo, jpeg = _camera_pictures()
    assert Image.open(io.BytesIO(mpo)).format == "MPO"
    from_mpo, from_jpeg = images.decode(mpo, SPEC, fast=fast), images.decode(jpeg, SPEC, fast=fast)
    assert (from_mpo.width, from_mpo.height, from_mpo.format) == (4000, 3000, "MPO")
    assert from_mpo.image.size == from_jpeg.image.size and max(from_mpo.image.size) < 4000
    assert np.array_equal(from_mpo.crop, from_jpeg.crop)
    assert images.decode_pixels(mpo, SPEC, fast) == images.decode_pixels(jpeg, SPEC, fast) < 4000 * 3000
