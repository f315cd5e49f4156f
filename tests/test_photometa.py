"""Issue 15: what a photo says about itself, from real-world EXIF layouts written with Pillow."""

import io

import pytest
from PIL import Image

from alignsearch.media import photometa
from alignsearch.search.filters import parse_date


def jpeg(exif: Image.Exif | None = None, size=(64, 48)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(out, "JPEG", **({"exif": exif} if exif is not None else {}))
    return out.getvalue()


def exif_with(datetime_original=None, offset=None, make=None, model=None, lens=None, gps=None, orientation=None,
              datetime_only=None):
    exif = Image.Exif()
    if make:
        exif[photometa.MAKE] = make
    if model:
        exif[photometa.MODEL] = model
    if orientation:
        exif[0x0112] = orientation
    if datetime_only:
        exif[photometa.DATETIME] = datetime_only
    sub = exif.get_ifd(photometa.EXIF_IFD)
    if datetime_original:
        sub[photometa.DATETIME_ORIGINAL] = datetime_original
    if offset:
        sub[photometa.OFFSET_ORIGINAL] = offset
    if lens:
        sub[photometa.LENS_MODEL] = lens
    if gps:
        g = exif.get_ifd(photometa.GPS_IFD)
        (lat_ref, lat), (lon_ref, lon) = gps
        g[1], g[2], g[3], g[4] = lat_ref, lat, lon_ref, lon
    return exif


def test_date_with_timezone_offset_camera_and_lens():
    data = jpeg(exif_with("2019:07:14 10:30:00", "+02:00", "Canon", "Canon EOS 5D Mark IV", "EF24-70mm f/2.8L II USM"))
    meta = photometa.read(data, mtime=5.0)
    assert meta["taken"] == parse_date("2019-07-14T08:30:00Z") and meta["taken_source"] == "exif:DateTimeOriginal"
    assert meta["camera"] == "Canon EOS 5D Mark IV" and meta["lens"] == "EF24-70mm f/2.8L II USM"
    assert photometa.iso(meta["taken"]) == "2019-07-14T08:30:00Z"


def test_negative_offset_and_make_not_repeated_in_the_model():
    meta = photometa.read(jpeg(exif_with("2021:12:31 23:00:00", "-05:00", "NIKON CORPORATION", "D750")), mtime=0)
    assert meta["taken"] == parse_date("2022-01-01T04:00:00Z")
    assert meta["camera"] == "NIKON CORPORATION D750"


def test_gps_in_the_southern_and_western_hemispheres():
    sydney = (("S", (33.0, 52.0, 4.0)), ("E", (151.0, 12.0, 26.0)))
    rio = (("S", (22.0, 54.0, 30.0)), ("W", (43.0, 11.0, 47.0)))
    lisbon = (("N", (38.0, 43.0, 20.0)), ("W", (9.0, 8.0, 21.0)))
    for gps, lat, lon in ((sydney, -33.8678, 151.2072), (rio, -22.9083, -43.1964), (lisbon, 38.7222, -9.1392)):
        meta = photometa.read(jpeg(exif_with(gps=gps)), mtime=0)
        assert meta["lat"] == pytest.approx(lat, abs=1e-3) and meta["lon"] == pytest.approx(lon, abs=1e-3)


def test_missing_exif_falls_back_to_mtime_and_rotated_photos_keep_their_fields():
    meta = photometa.read(jpeg(), mtime=1234.5)
    assert meta["taken"] == 1234.5 and meta["taken_source"] == "mtime" and meta["camera"] is None
    assert meta["lat"] is None and meta["lon"] is None
    rotated = photometa.read(jpeg(exif_with("2018:01:02 03:04:05", model="Pixel 7", orientation=6)), mtime=0)
    assert rotated["taken"] == parse_date("2018-01-02T03:04:05Z") and rotated["camera"] == "Pixel 7"


def test_datetime_alone_and_unknown_dates():
    meta = photometa.read(jpeg(exif_with(datetime_only="2015:05:05 05:05:05")), mtime=0)
    assert meta["taken_source"] == "exif:DateTime" and meta["taken"] == parse_date("2015-05-05T05:05:05Z")
    meta = photometa.read(jpeg(exif_with("0000:00:00 00:00:00")), mtime=99.0)
    assert meta["taken"] == 99.0 and meta["taken_source"] == "mtime"


def test_not_an_image_and_png_without_exif():
    assert photometa.read(b"not an image", mtime=7.0)["taken"] == 7.0
    out = io.BytesIO()
    Image.new("RGB", (8, 8)).save(out, "PNG")
    assert photometa.read(out.getvalue(), mtime=8.0, caption="  a  red\\n car ")["caption"] == "a red\\n car"


def test_webdataset_caption_members():
    assert photometa.caption_from_member("x.txt", b"a dog on a beach\n") == "a dog on a beach"
    assert photometa.caption_from_member("x.json", b'{"caption": "Zanzibar at dusk"}') == "Zanzibar at dusk"
    assert photometa.caption_from_member("x.json", b"[1, 2]") is None


@pytest.mark.parametrize("when,offset", [("9999:12:31 23:30:00", "-05:00"), ("0001:01:01 00:10:00", "+02:00")])
def test_a_date_at_the_calendars_edge_keeps_the_rest_of_the_exif(when, offset):
    """Issue 24 #23: a date its offset moves past the calendar raised OverflowError, which dropped the photo's
    whole EXIF (camera, lens, GPS too)."""
    gps = (("S", (33.0, 52.0, 4.0)), ("E", (151.0, 12.0, 26.0)))
    meta = photometa.read(jpeg(exif_with(when, offset, "Canon", "Canon EOS R5", "RF50mm", gps)), mtime=7.0)
    assert meta["camera"] == "Canon EOS R5" and meta["lens"] == "RF50mm" and meta["lat"] < 0 < meta["lon"]
    assert meta["taken"] == 7.0 and meta["taken_source"] == "mtime"


def test_a_long_caption_is_cut_not_dropped(tmp_path):
    """Issue 24 #23: a sidecar or WebDataset caption over 64 KB was dropped whole."""
    import tarfile

    from indexer.decode import sidecar_caption
    from indexer.scan import Found, scan_tar

    (tmp_path / "a.jpg").write_bytes(jpeg())
    (tmp_path / "a.txt").write_text("a long walk " * 10_000)  # 120 KB
    caption = photometa.clean_caption(sidecar_caption(Found(str(tmp_path), "a.jpg", 1, 0.0)))
    assert caption.startswith("a long walk") and len(caption) == photometa.CAPTION_MAX
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        tar.add(tmp_path / "a.jpg", "s/0001.jpg")
        tar.add(tmp_path / "a.txt", "s/0001.txt")
    (found,) = scan_tar(str(tmp_path / "s.tar"))
    assert found.caption.startswith("a long walk") and len(found.caption) == photometa.CAPTION_MAX


@pytest.mark.parametrize("where", ["before the pixels", "after the pixels"])
def test_a_pngs_exif_is_read_without_decoding_its_pixels(monkeypatch, where):
    """Issue 24 #17: Pillow decodes a whole PNG to look for an eXIf chunk after the pixels: every PNG was
    decoded twice in a decode worker, the second time outside its pixel budget (a 100 MP PNG: 10 s, 400 MB)."""
    import struct

    from PIL import PngImagePlugin

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (1, 2, 3)).save(buf, "PNG", exif=exif_with("2020:01:02 03:04:05", make="Canon",
                                                                          model="EOS R5"))
    data = buf.getvalue()
    if where == "after the pixels":  # where some writers put it: Pillow finds it only by decoding
        at = data.find(b"eXIf") - 4
        chunk = data[at : at + 12 + struct.unpack(">I", data[at : at + 4])[0]]
        data = data.replace(chunk, b"")
        end = data.find(b"IEND") - 4
        data = data[:end] + chunk + data[end:]
        assert data.find(b"eXIf") > data.find(b"IDAT")

    def no_decoding(self):
        raise AssertionError("the pixels were decoded")

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", no_decoding)
    got = photometa.read(data, 0.0)
    assert (got["camera"], got["taken_source"]) == ("Canon EOS R5", "exif:DateTimeOriginal"), got
