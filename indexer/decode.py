"""The reader stage, run in worker processes: file bytes to a uint8 crop, or a reason it failed."""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass

import numpy as np

from alignsearch import photometa, sources
from alignsearch.dupes import phash_of
from alignsearch.errors import BadImageError
from alignsearch.images import DEFAULT_MAX_PIXELS, ImageSpec, decode
from indexer.scan import Found


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
    phash: str | None = None  # perceptual hash of the decoded image (alignsearch/dupes.py)
    photo: dict | None = None  # taken, camera, lens, GPS, caption (alignsearch/photometa.py)


def read_item(found: Found, spec: ImageSpec, max_pixels: int = DEFAULT_MAX_PIXELS, fast: bool = False) -> Item:
    start = time.perf_counter()
    if found.error:
        return Item(found, None, reason=found.error)
    try:
        data = found.read()  # bounded: a FIFO, device or oversized file is refused before any read
    except BadImageError as exc:
        return Item(found, None, reason=str(exc), seconds=time.perf_counter() - start)
    except FileNotFoundError:
        return Item(found, None, reason="cannot read: file not found", seconds=time.perf_counter() - start)
    except Exception as exc:  # noqa: BLE001 - a remote filesystem's own errors too: one file never stops a run
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        return Item(found, None, reason=f"cannot read: {reason}", seconds=time.perf_counter() - start)
    sha = hashlib.sha256(data).hexdigest()
    try:
        img = decode(data, spec, max_pixels, fast)
    except BadImageError as exc:
        return Item(found, None, sha, reason=str(exc), seconds=time.perf_counter() - start)
    photo = photometa.read(data, found.mtime, found.caption or sidecar_caption(found))
    return Item(found, img.crop, sha, img.width, img.height, img.format, seconds=time.perf_counter() - start,
                phash=phash_of(img.image), photo=photo)


def sidecar_caption(found: Found) -> str | None:
    """The caption in `photo.txt` beside a local `photo.jpg` (the convention `finetune` reads too)."""
    if sources.kind(found.root) != sources.FOLDER:
        return None
    path = os.path.splitext(found.path)[0] + ".txt"
    try:
        if sources.unusable(os.stat(path), max_bytes=2**62):  # a FIFO, a device: not opened
            return None
        # the first CAPTION_BYTES only: a longer caption is cut (clean_caption keeps CAPTION_MAX characters
        # anyway), where a sidecar over the limit was refused and its caption lost
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        with os.fdopen(fd, "rb") as f:
            if sources.unusable(os.fstat(fd), max_bytes=2**62):
                return None
            return f.read(photometa.CAPTION_BYTES).decode("utf-8", "replace")
    except OSError:
        return None
