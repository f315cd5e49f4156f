"""What a photo says about itself: when it was taken, with what camera and lens, where, and its caption.

Read from the file's EXIF (headers only: no pixels are decoded) and from captions next to it. Pure
functions over bytes and text, so they are tested on hand-made EXIF layouts without a model.
"""

from __future__ import annotations

import json
import re
import warnings
from datetime import datetime, timedelta, timezone

from PIL import Image

from alignsearch.media.images import open_image

EXIF_IFD, GPS_IFD = 0x8769, 0x8825
MAKE, MODEL, DATETIME = 0x010F, 0x0110, 0x0132
DATETIME_ORIGINAL, DATETIME_DIGITIZED = 0x9003, 0x9004
OFFSET_TIME, OFFSET_ORIGINAL, OFFSET_DIGITIZED = 0x9010, 0x9011, 0x9012
LENS_MAKE, LENS_MODEL = 0xA433, 0xA434
CAPTION_COLUMNS = ("caption", "text", "alt", "description")
CAPTION_MAX = 4000  # characters kept: a caption, not a document
CAPTION_BYTES = 64 * 1024  # read of a .txt caption (the rest is cut, never the whole caption dropped)
CAPTION_JSON_BYTES = 1 << 20  # a .json sample record is parsed whole, so it may be this long
# characters kept of an EXIF text field (camera, lens): a name, not the megabytes an EXIF field can hold, which
# were stored whole and sent with every search result that showed the photo
TEXT_MAX = 256

FIELDS = ("taken", "taken_source", "camera", "lens", "lat", "lon", "caption")


def read(data: bytes, mtime: float, caption: str | None = None) -> dict:
    """The photo's fields (FIELDS): taken from EXIF DateTimeOriginal, else DateTimeDigitized, else DateTime
    (with its EXIF offset when present; a time without one is taken as UTC), else the file's mtime;
    taken_source says which. Unreadable EXIF is no EXIF."""
    out = dict.fromkeys(FIELDS)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out.update(exif_fields(_exif(open_image(data), data)))
    except Exception:  # noqa: BLE001 - EXIF is a courtesy; the image itself is judged by the decoder
        pass
    if out["taken"] is None:
        out["taken"], out["taken_source"] = float(mtime), "mtime"
    out["caption"] = clean_caption(caption)
    return out


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _exif(img: Image.Image, data: bytes) -> Image.Exif:
    """The image's EXIF, its pixels never decoded. Pillow's PNG reader decodes the whole image to look for an
    eXIf chunk after the pixels (a 100 MP PNG: 10 s and 400 MB, a second decode beside the indexer's, outside
    its pixel budget); here the chunks are walked instead, skipping the pixel data."""
    if img.format != "PNG" or "exif" in img.info:
        return Image.Image.getexif(img)  # what the header gave (the PNG override would load the pixels)
    exif = Image.Exif()
    raw = _png_chunk(data, b"eXIf")
    if raw is not None:
        exif.load(raw)
    return exif


def _png_chunk(data: bytes, kind: bytes) -> bytes | None:
    """The data of a PNG's first chunk of this type, found by chunk lengths alone; None when there is none."""
    import struct

    pos = len(PNG_SIGNATURE) if data.startswith(PNG_SIGNATURE) else len(data)
    while pos + 8 <= len(data):
        length, found = struct.unpack(">I4s", data[pos : pos + 8])
        if found == kind:
            return data[pos + 8 : pos + 8 + length]
        if found == b"IEND":
            break
        pos += 12 + length  # length, type, data, CRC
    return None


def exif_fields(exif: Image.Exif) -> dict:
    out: dict = {}
    sub = exif.get_ifd(EXIF_IFD) or {}
    for tag, offset_tag, source, ifd in ((DATETIME_ORIGINAL, OFFSET_ORIGINAL, "exif:DateTimeOriginal", sub),
                                         (DATETIME_DIGITIZED, OFFSET_DIGITIZED, "exif:DateTimeDigitized", sub),
                                         (DATETIME, OFFSET_TIME, "exif:DateTime", exif)):
        moment = exif_time(ifd.get(tag), sub.get(offset_tag))
        if moment is not None:
            out["taken"], out["taken_source"] = moment, source
            break
    make, model = _text(exif.get(MAKE)), _text(exif.get(MODEL))
    if make and model and model.lower().startswith(make.split()[0].lower()):
        make = None  # "Canon" + "Canon EOS 5D": the model already names the maker
    out["camera"] = " ".join(p for p in (make, model) if p) or None
    lens_make, lens = _text(sub.get(LENS_MAKE)), _text(sub.get(LENS_MODEL))
    out["lens"] = lens or lens_make
    gps = exif.get_ifd(GPS_IFD) or {}
    out["lat"], out["lon"] = gps_degrees(gps.get(2), gps.get(1), 90), gps_degrees(gps.get(4), gps.get(3), 180)
    if out["lat"] is None or out["lon"] is None:
        out["lat"] = out["lon"] = None
    return out


def exif_time(value, offset=None) -> float | None:
    """"2019:07:14 10:30:00" (+ "+02:00") to UTC epoch seconds; None when absent or malformed."""
    text = _text(value)
    if not text:
        return None
    m = re.match(r"(\d{4})[:\-](\d{2})[:\-](\d{2})[ T](\d{2}):(\d{2}):(\d{2})", text)
    if not m:
        return None
    try:
        moment = datetime(*map(int, m.groups()), tzinfo=timezone.utc)
        tz = re.fullmatch(r"([+-])(\d{2}):?(\d{2})", _text(offset) or "")
        if tz:
            delta = timedelta(hours=int(tz.group(2)), minutes=int(tz.group(3)))
            moment -= delta if tz.group(1) == "+" else -delta
        return moment.timestamp()
    # ValueError: "0000:00:00 00:00:00", which cameras write when they do not know; OverflowError: a date
    # at the calendar's edge moved past it by its offset, which took the photo's whole EXIF with it
    except (ValueError, OverflowError):
        return None


def gps_degrees(dms, ref, limit: float) -> float | None:
    """(degrees, minutes, seconds) rationals and an N/S/E/W reference to signed decimal degrees."""
    try:
        d, m, s = (float(x) for x in dms)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    value = d + m / 60 + s / 3600
    if (_text(ref) or "").upper() in ("S", "W"):
        value = -value
    return value if abs(value) <= limit and value == value else None


def _text(value) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if value is None:
        return None
    value = str(value).strip("\x00 \t\r\n")[:TEXT_MAX].rstrip("\x00 \t\r\n")
    return value or None


def clean_caption(text: str | None) -> str | None:
    if text is None:
        return None
    text = " ".join(str(text).split())[:CAPTION_MAX]
    return text or None


def caption_from_member(name: str, data: bytes) -> str | None:
    """The caption in a WebDataset sample's `.txt` or `.json` member (its caption/text field)."""
    text = data.decode("utf-8", "replace")
    if name.lower().endswith(".json"):
        try:
            record = json.loads(text)
        except ValueError:
            return None
        if not isinstance(record, dict):
            return None
        text = next((record[c] for c in CAPTION_COLUMNS if isinstance(record.get(c), str)), None)
    return clean_caption(text)


def iso(epoch: float | None) -> str | None:
    """UTC ISO 8601 for JSON output."""
    if epoch is None or epoch != epoch:
        return None
    try:
        return datetime.fromtimestamp(epoch, timezone.utc).isoformat().replace("+00:00", "Z")
    except (ValueError, OverflowError, OSError):  # past the calendar (an index that stored one): no date to show
        return None
