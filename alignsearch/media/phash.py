"""Perceptual hashes of decoded pictures: the 64-bit DCT phash (imagehash) plus a coarse chroma grid, and how
two hashes compare. Taken at index time by the decode workers (indexer/decode.py) and compared by the duplicate
search (alignsearch/search/dupes.py). Imports neither torch nor faiss.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

NEAR_THRESHOLD = 12  # bits of 64; benchmarks/bench_dupes.py measured recall and false positives (README)
PHASH_BITS = 64
PHASH_SIDE = 256  # images are box-reduced to about this before hashing: same hash, far less work on big photos
# The phash is luminance only: a yellow circle and a red one of the same brightness hash alike. Each hash also
# carries the image's chroma (YCbCr's Cb and Cr) averaged over a COLOUR_GRID x COLOUR_GRID grid, stored after
# the 16 hex digits ("<phash>-<64 hex digits>"); a near pair is confirmed only when no cell's chroma differs by
# more than COLOUR_THRESHOLD (of 255, the mean of Cb and Cr). Hashes stored before have no colour part and are
# compared by luminance alone. Measured on 60 of the tests' smooth photos: their re-saved, half-size and
# 4%-cropped copies differ by at most 18.5 (mean 4.5); one shape recoloured at equal brightness (red to yellow,
# green, blue to purple) by 34 to 56.
COLOUR_GRID = 4
COLOUR_THRESHOLD = 24



def phash_of(image) -> str | None:
    """The 64-bit perceptual hash (16 hex digits) of a decoded RGB PIL image; None when it has no pixels."""
    if image is None or min(image.size) < 1:
        return None
    import imagehash

    factor = min(image.size) // PHASH_SIDE
    if factor >= 2:
        image = image.reduce(factor)
    return f"{imagehash.phash(image)}-{colour_of(image)}"


def colour_of(image) -> str:
    """The chroma (Cb, Cr) of a COLOUR_GRID x COLOUR_GRID grid of the image, as hex."""
    from PIL import Image

    small = image.convert("RGB").convert("YCbCr").resize((COLOUR_GRID, COLOUR_GRID), Image.BOX)
    return np.asarray(small, dtype=np.uint8)[:, :, 1:].tobytes().hex()


def colour_close(a: str, b: str, threshold: float = COLOUR_THRESHOLD) -> bool:
    """Whether two stored hashes agree in colour too (True when either has no colour part: hashed before)."""
    ca, cb = a[17:], b[17:]
    if not ca or not cb or len(ca) != len(cb):
        return True
    x = np.frombuffer(bytes.fromhex(ca), dtype=np.uint8).astype(np.int16).reshape(-1, 2)
    y = np.frombuffer(bytes.fromhex(cb), dtype=np.uint8).astype(np.int16).reshape(-1, 2)
    return float(np.abs(x - y).mean(axis=1).max()) <= threshold


def hashes_to_bytes(hexes: Sequence[str]) -> np.ndarray:
    """(n, 8) uint8 codes of 16-hex-digit hashes, in the bit order faiss's binary indexes compare."""
    if not len(hexes):
        return np.zeros((0, PHASH_BITS // 8), dtype=np.uint8)
    joined = "".join(h[:16] for h in hexes)  # the phash; a colour part follows after "-"
    return np.frombuffer(bytes.fromhex(joined), dtype=np.uint8).reshape(len(hexes), PHASH_BITS // 8)


def hamming(a: str, b: str) -> int:
    return (int(a[:16], 16) ^ int(b[:16], 16)).bit_count()
