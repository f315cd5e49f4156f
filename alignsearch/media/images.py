"""Decode an image and crop it exactly as the checkpoint's image processor does, as uint8.

Scaling to floats happens later on the encoder's device, so workers ship 4x fewer bytes and the
pixels stay bit-identical to transformers' PIL backend (resize with PIL, then a centre crop) for images up to
DECODE_MARGIN times the model's input; larger ones are decoded reduced first (decode).
This module imports no torch: decode workers import it alone.
"""

from __future__ import annotations

import functools
import io
import warnings
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageOps

from alignsearch.errors import BadImageError, ImageTooLarge

# Enough for a 200-megapixel camera; a larger header is treated as a decompression bomb.
DEFAULT_MAX_PIXELS = 200_000_000
# Pillow's own guard warns above 89.5 MP and refuses above twice that, which would refuse real photos
# under our cap: open_rgb checks the header against max_pixels itself, so Pillow's limit is raised to
# the cap (its error then only fires far beyond it) and its warning is ignored.
if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < DEFAULT_MAX_PIXELS:
    Image.MAX_IMAGE_PIXELS = DEFAULT_MAX_PIXELS


# The formats the indexer lists (indexer/scan.py), by Pillow's names; MPO is a camera JPEG read by the JPEG
# plugin. Pillow's other readers are never asked: some decode whole at open, before the size is known (ICO/CUR
# decode an embedded PNG of any size, past every pixel cap), EPS runs Ghostscript, and none is a photo format.
READ_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "AVIF", "HEIF")
READ_NAMES = "JPEG, PNG, WebP, BMP, GIF, TIFF, HEIC/HEIF, AVIF"


def is_jpeg(fmt: str | None) -> bool:
    """Whether Pillow's format name is a JPEG (its draft decodes at a reduced DCT scale): MPO, a camera's JPEG
    holding a second picture, is named apart and decoded by the same plugin."""
    return fmt in ("JPEG", "MPO")


def open_image(data: bytes) -> Image.Image:
    """Pillow's lazy image of these bytes (header read, pixels not yet), in one of READ_FORMATS only.
    Raises what Image.open raises (UnidentifiedImageError for any other format)."""
    return Image.open(io.BytesIO(data), formats=_read_formats())


@functools.cache
def _read_formats() -> tuple[str, ...]:
    """READ_FORMATS that this Pillow has a plugin for, found once (open_image runs for every file read)."""
    Image.init()  # every plugin registered: Pillow fails on a format name it lacks
    return tuple(f for f in READ_FORMATS if f in Image.OPEN)


@dataclass(frozen=True)
class ImageSpec:
    """What the checkpoint's image processor does, read from its saved config."""

    resize: tuple[int, int]  # (height, width), squashed, aspect ratio ignored
    resample: int  # PIL resampling filter
    crop: tuple[int, int] | None  # (height, width) centre crop after the resize
    rescale_factor: float
    rescale_offset: bool  # x * factor - 1
    mean: tuple[float, float, float] | None
    std: tuple[float, float, float] | None
    include_top_std: tuple[float, float, float] | None  # EfficientNet's extra division by std

    @property
    def output_size(self) -> tuple[int, int]:
        return self.crop or self.resize


@dataclass(frozen=True)
class Decoded:
    crop: np.ndarray  # (H, W, 3) uint8, what the encoder takes
    width: int  # as displayed, after EXIF rotation
    height: int
    format: str
    image: Image.Image | None = field(default=None, repr=False, compare=False)  # the decoded RGB image
    # the image before it was reduced (decode's keep_whole): the text reader reads it whole
    whole: Image.Image | None = field(default=None, repr=False, compare=False)


def open_rgb(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, draft: tuple[int, int] | None = None) -> tuple[Image.Image, str]:
    """Decode the first frame of an image, EXIF-oriented, as 8-bit RGB; also its format name.

    draft (width, height): let a JPEG decode at 1/2, 1/4 or 1/8 scale, no smaller than this — much
    faster for camera photos, but the pixels differ slightly from a full decode (opt-in: --fast-decode).
    Raises BadImageError with a reason a person can read; ImageTooLarge where the header declares more than
    max_pixels (or more than Pillow's own guard takes).
    """
    if not data:
        raise BadImageError("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own check below decides
            img = open_image(data)
            width, height = img.size
            if width * height > max_pixels:
                raise ImageTooLarge(
                    f"image too large: {width}x{height} pixels exceeds the limit of {max_pixels:,} (decompression bomb guard)"
                )
            img.seek(0)
            if draft is not None and is_jpeg(img.format):
                img.draft("RGB", draft)
            img.load()
            fmt = img.format or "unknown"
            ImageOps.exif_transpose(img, in_place=True)  # not in place, it copied every unrotated image whole
            if img.mode in WIDE_GREY:  # the wide pixels freed before the RGB copy is made
                img = grey8(img)
            return to_rgb(img), fmt
    except BadImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLarge(f"image too large (decompression bomb guard): {exc}") from None
    except Image.UnidentifiedImageError:
        if _is_heif(data) and _register_heif():
            return open_rgb(data, max_pixels)
        if _is_heif(data):
            raise BadImageError(
                "HEIC/HEIF/AVIF image, but no decoder is installed: pip install 'alignsearch[heif]'"
            ) from None
        raise BadImageError(f"not an image alignsearch reads (it reads {READ_NAMES})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise BadImageError(f"cannot decode image: {exc}") from None


HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1", b"avif", b"avis")


def _is_heif(data: bytes) -> bool:
    return data[4:8] == b"ftyp" and data[8:12] in HEIF_BRANDS


def _register_heif() -> bool:
    """Teach PIL HEIF/AVIF through the optional pillow-heif; False when it is not installed
    or already registered (so a file it cannot open is not retried forever)."""
    try:
        import pillow_heif
    except ImportError:
        return False
    if "HEIF" in Image.OPEN:  # PIL's own plugin registry
        return False
    pillow_heif.register_heif_opener()
    if hasattr(pillow_heif, "register_avif_opener"):
        pillow_heif.register_avif_opener()
    return True


BAND_PIXELS = 1 << 20  # pixels per band when a 16/32-bit image is scaled to 8 bits (4 MB of float32)


WIDE_GREY = ("I;16", "I;16B", "I;16L", "I", "F")  # greys of more than 8 bits


def grey8(img: Image.Image) -> Image.Image:
    """A 16/32-bit grey image as 8-bit grey, scaled rather than clipped. A band of rows at a time in float32,
    read from the image band by band: the whole image as float64 (and its temporaries) took 1.2 GB for a
    49 MP 16-bit PNG of 95 KB; now the 8-bit result and one band."""
    width, height = img.size
    peak = 65535.0 if img.mode.startswith("I;16") or img.getextrema()[1] > 255 else 255.0
    scale = np.float32(255.0 / peak)
    grey = np.empty((height, width), dtype=np.uint8)
    band = max(1, BAND_PIXELS // max(1, width))
    for top in range(0, height, band):
        part = np.asarray(img.crop((0, top, width, min(height, top + band)))).astype(np.float32)
        part *= scale
        np.clip(part, 0, 255, out=part)
        grey[top : top + band] = part
    return Image.fromarray(grey, "L")


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB; transparency composited on white, 16/32-bit greys scaled rather than clipped."""
    if img.mode == "RGB":
        return img
    if img.mode in WIDE_GREY:
        return grey8(img).convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img).convert("RGB")
    return img.convert("RGB")


def crop_uint8(img: Image.Image, spec: ImageSpec) -> np.ndarray:
    """Resize and centre-crop an RGB image; returns an (H, W, 3) uint8 array."""
    height, width = spec.resize
    if img.size != (width, height):
        img = img.resize((width, height), resample=spec.resample)
    arr = np.asarray(img, dtype=np.uint8)
    if spec.crop is not None:
        crop_h, crop_w = spec.crop
        top, left = (height - crop_h) // 2, (width - crop_w) // 2
        arr = arr[top : top + crop_h, left : left + crop_w]
    return np.ascontiguousarray(arr)


# A large image is decoded (JPEG: at a reduced DCT scale, Pillow's draft) or box-reduced to no less than this many
# times the model's input before anything else: a 108-megapixel JPEG peaked at ~1 GB in a decode worker (the
# full decode, then copies); drafted it needs ~10 MB. Twice the input keeps the final resize's own filter in
# charge of the last step: embeddings drift by cosine < 1e-4 (benchmarks/RESULTS.md: reduced decode drift).
DECODE_MARGIN = 2


def _draft(spec: ImageSpec, fast: bool) -> tuple[int, int]:
    """The smallest size a JPEG is decoded at (Pillow's draft): DECODE_MARGIN times the resize target, or the
    target itself when fast."""
    height, width = spec.resize
    side = DECODE_MARGIN * max(height, width)
    return (width, height) if fast else (side, side)


def decode_pixels(data: bytes, spec: ImageSpec, fast: bool = False) -> int:
    """The pixels decode() holds at full size for these bytes, from the header alone: a JPEG's at the DCT scale
    it is decoded at, any other image's all of them (decoding costs ~4-5 bytes a pixel: 389 MB for a 100 MP
    PNG, 236 MB for a 49 MP 16-bit one). 0 for bytes that are not an image (decode says why)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = open_image(data)
            if is_jpeg(img.format):
                img.draft("RGB", _draft(spec, fast))
            return img.size[0] * img.size[1]
    except Exception:  # noqa: BLE001 - Pillow raises many types for bytes it cannot read; decode reports them
        return 0


def decode(data: bytes, spec: ImageSpec, max_pixels: int = DEFAULT_MAX_PIXELS, fast: bool = False, *,
           keep_whole: bool = False) -> Decoded:
    """Bytes to the uint8 crop the encoder takes, with the image's (stored) size and format.
    Large images are decoded or reduced to DECODE_MARGIN times the resize target first (bounded memory);
    fast: JPEG draft decoding at no less than the resize target itself (see open_rgb). keep_whole: an image
    decoded whole then reduced (not a JPEG, which decodes reduced) is kept whole too, as Decoded.whole."""
    side = DECODE_MARGIN * max(spec.resize)
    img, fmt = open_rgb(data, max_pixels, _draft(spec, fast))
    size = img.size
    if is_jpeg(fmt):  # report the stored size, not the reduced decode's
        header = open_image(data)
        size = header.size[::-1] if header.getexif().get(0x0112) in (5, 6, 7, 8) else header.size
    factor = min(img.size) // side
    whole = None
    if factor >= 2 and not fast and not is_jpeg(fmt):  # other formats: box-reduced before the resize's copies
        whole = img if keep_whole else None
        img = img.reduce(factor)
    return Decoded(crop_uint8(img, spec), size[0], size[1], fmt, img, whole)
