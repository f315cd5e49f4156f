"""The reader stage, run in worker processes: file bytes to a uint8 crop, or a reason it failed."""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace

import numpy as np

from alignsearch.media import photometa, sources
from alignsearch import safeopen
from alignsearch.media.phash import phash_of
from alignsearch.errors import BadImageError
from alignsearch.media.images import DEFAULT_MAX_PIXELS, Decoded, ImageSpec, decode, decode_pixels, open_rgb
from indexer.scan import Found

log = logging.getLogger(__name__)


@dataclass
class Item:
    found: Found
    crop: np.ndarray | None
    sha256: str | None = None
    width: int | None = None
    height: int | None = None
    format: str | None = None
    reason: str | None = None
    seconds: float = 0.0  # time this worker spent reading and decoding
    vec_row: int | None = None  # address of its vector when already stored (identical content indexed before)
    phash: str | None = None  # perceptual hash of the decoded image (alignsearch/media/phash.py)
    photo: dict | None = None  # taken, camera, lens, GPS, caption (alignsearch/media/photometa.py)
    ocr: str | None = None  # the text read in the image (`index --ocr`; None: not read)
    ocr_seconds: float = 0.0  # time this worker spent reading it (not in `seconds`)


def read_item(found: Found, spec: ImageSpec, max_pixels: int = DEFAULT_MAX_PIXELS, fast: bool = False,
              ocr: bool = False) -> Item:
    start = time.perf_counter()
    data = read_data(found, start)
    if isinstance(data, Item):
        return data
    sha = hashlib.sha256(data).hexdigest()
    known = _known_text.get(sha) if ocr else None
    text = None
    try:
        # the header is read for the budget only where a pool shares one (decode reads it again anyway)
        with _budget.decoding(decode_pixels(data, spec, fast) if _budget.path is not None else 0):
            # A PNG (any image but a JPEG) the encoder reduces was decoded whole again for its text: 0.3-0.6 s of
            # a 12 MP photo PNG's 2-4 s (benchmarks/RESULTS.md, bench_ocr_png). Kept whole instead, and read
            # while the turn that decoded it is held.
            img = decode(data, spec, max_pixels, fast, keep_whole=ocr and known is None)
            if img.whole is not None:
                whole, img = img.whole, replace(img, whole=None)
                text = read_text(whole, found.path)
                del whole  # not held past the turn
    except BadImageError as exc:
        return Item(found, None, sha, reason=str(exc), seconds=time.perf_counter() - start)
    photo = photometa.read(data, found.mtime, found.caption or sidecar_caption(found))
    item = Item(found, img.crop, sha, img.width, img.height, img.format, phash=phash_of(img.image), photo=photo,
                seconds=time.perf_counter() - start - (text[1] if text is not None else 0.0))  # OCR's apart
    if ocr:
        item.ocr, item.ocr_seconds = (known, 0.0) if known is not None else \
            text if text is not None else _read_text_whole(data, img, max_pixels, found.path)
    return item


def _read_text_whole(data: bytes, img: Decoded, max_pixels: int, where: str) -> tuple[str | None, float]:
    """read_text in the whole image, as the fill step reads it (indexer/ocrfill.py). The encoder's decode is
    reduced to twice its input: in a 4000x3000 JPEG (read at 1000x750) text 20 px high came back as nothing
    where the whole image gave "ZANZIBAR SICE 4711", so one photo got one text from `index --ocr` and another
    from `--ocr` given to an index built without it. The pool's pixel budget is held while the text is read,
    not only while the image is decoded: the whole image, and the engine's copies of it, live until then."""
    if img.image is None or max(img.image.size) >= max(img.width, img.height):
        return read_text(img.image, where)
    with _budget.decoding(img.width * img.height if _budget.path is not None else 0):
        try:
            whole = open_rgb(data, max_pixels)[0]
        except BadImageError:
            whole = img.image
        return read_text(whole, where)


def read_data(found: Found, start: float) -> bytes | Item:
    """The file's bytes, or the failed Item that says why they cannot be read (timed from start). The GPU
    decode stage (indexer/gpudecode.py) reads through this too."""
    if found.error:
        return Item(found, None, reason=found.error)
    try:
        return found.read()  # bounded: a FIFO, device or oversized file is refused before any read
    except BadImageError as exc:
        return Item(found, None, reason=str(exc), seconds=time.perf_counter() - start)
    except FileNotFoundError:
        return Item(found, None, reason="cannot read: file not found", seconds=time.perf_counter() - start)
    except Exception as exc:  # noqa: BLE001 - a remote filesystem's own errors too: one file never stops a run
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        return Item(found, None, reason=f"cannot read: {reason}", seconds=time.perf_counter() - start)



# Pixels a decode worker decodes at full size without waiting: ~100-120 MB at the 4-5 bytes a pixel decoding
# costs (a 100 MP PNG 389 MB, a 49 MP 16-bit PNG 236 MB; JPEGs decode drafted: a 100 MP one holds 1.6 MP,
# 11 MB). A larger image waits until no other worker decodes one: 3 workers meeting three 100 MP PNGs held
# 2.1-2.6 GB together, now 0.7 GB (one decode, and each worker's own bytes).
PIXEL_BUDGET = 24_000_000


@dataclass(frozen=True)
class PixelBudget:
    """The pool-wide turn for images over `pixels`: an flock on a file the run made (`path`, pipeline.decode_turn;
    None: this process decodes alone, nothing to share). The kernel releases it when a worker dies holding it, so a
    worker killed mid-decode (OOM) never leaves the others waiting."""

    path: str | None = None
    pixels: int = PIXEL_BUDGET

    @contextmanager
    def decoding(self, pixels: int):
        if self.path is None or pixels <= self.pixels:
            yield
            return
        with open(self.path, "rb") as turn:
            fcntl.flock(turn, fcntl.LOCK_EX)
            yield



_budget = PixelBudget()  # this worker's (start_worker)
_known_text: dict[str, str] = {}  # this worker's {sha256: text} of content read before (set_known_text)


def start_worker(texts: dict[str, str] | None, budget: PixelBudget) -> None:
    """In each decode worker, once: the texts already read (set_known_text) and the pool's pixel budget."""
    global _budget
    _budget = budget
    set_known_text(texts)


def set_known_text(texts: dict[str, str] | None) -> None:
    """The texts read before in content this run indexes again (a moved or renamed file): not read twice."""
    global _known_text
    _known_text = dict(texts or {})


def read_text(image, where: str) -> tuple[str | None, float]:
    """(the text in a decoded image, seconds it took); None when the engine failed on it (read again later)."""
    text, seconds, _ = read_text_or_error(image, where)
    return text, seconds


def read_text_or_error(image, where: str) -> tuple[str | None, float, Exception | None]:
    """read_text, with the error that left the text None (alignsearch.media.ocr.EngineUnavailable: the engine
    could not start, which says nothing about this image)."""
    from alignsearch.media.ocr import read_text as ocr_text

    start = time.perf_counter()
    try:
        return ocr_text(image), time.perf_counter() - start, None
    except Exception as exc:  # noqa: BLE001 - one image the engine chokes on never stops a run
        log.info("no text read from %s: %s", where, exc)
        return None, time.perf_counter() - start, exc


def lasting_failure(exc: Exception, engine: str | None = None) -> str | None:
    """Why a fill step (indexer/ocrfill.py, phashfill.py) records a file as failed until it changes, else None
    (tried again next run): a fault of its own bytes (BadImageError, ImageTooLarge too), or, where `engine`
    names the engine that raised it on the file's pixels, that engine's error. Out of memory, an OSError, an
    engine that could not start are this run's trouble, not the file's."""
    from alignsearch.media.ocr import EngineUnavailable

    if isinstance(exc, BadImageError):
        return f"cannot decode it: {exc}"
    if engine is None or isinstance(exc, (MemoryError, OSError, EngineUnavailable)):
        return None
    return f"{engine}: {exc}"


def sidecar_caption(found: Found, *, strict: bool = False) -> str | None:
    """The caption in `photo.txt` beside a local `photo.jpg` (the convention `finetune` reads too). strict: a
    caption there that cannot be read now (EIO, EMFILE) raises OSError rather than reading as none."""
    if sources.kind(found.root) != sources.FOLDER:
        return None
    txt = os.path.splitext(os.fsencode(found.relpath_raw or found.relpath))[0] + b".txt"
    try:
        local = sources.local_file(found.root, "", txt)
        if local is None:
            return None
        # under the root, as the image is read (safeopen): no symlinked folder on the way, a FIFO or device never
        # opened. The first CAPTION_BYTES only: a longer caption is cut (clean_caption keeps CAPTION_MAX
        # characters anyway), where a sidecar over the limit was refused and its caption lost
        with os.fdopen(safeopen.open_under(*local, follow_last=True), "rb") as f:
            # utf-8-sig: a caption saved by Notepad starts with a byte-order mark, which stayed in the caption shown
            return f.read(photometa.CAPTION_BYTES).decode("utf-8-sig", "replace")
    except OSError as exc:
        if strict and not isinstance(exc, (FileNotFoundError, NotADirectoryError)):
            raise
        return None
    except BadImageError:  # refused (a FIFO, a link leading out of the root): no caption
        return None
