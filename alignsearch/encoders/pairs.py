"""Image-caption pairs for fine-tuning: a folder with sidecar .txt captions, or a CSV / JSONL / parquet table."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

from alignsearch import safeopen
from alignsearch.errors import BadImageError, BadInputError
from alignsearch.media.photometa import CAPTION_BYTES

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


@dataclass(frozen=True)
class Pair:
    image: Path
    caption: str


@dataclass
class Pairs:
    pairs: list[Pair] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (what, why)


def _check(image: Path, caption, out: Pairs) -> None:
    caption = (caption or "").strip() if isinstance(caption, str) or caption is None else str(caption).strip()
    if not caption:
        out.skipped.append((str(image), "empty caption"))
    elif not image.is_file():
        out.skipped.append((str(image), "image file missing"))
    else:
        out.pairs.append(Pair(image, caption))


def _read_caption(sidecar: Path) -> str:
    """A sidecar caption read as the indexer reads one (indexer/decode.py): a FIFO or device is refused, never
    opened (read_text waited on a FIFO for ever), and only its first CAPTION_BYTES are read."""
    return safeopen.read_fd(safeopen.open_regular(sidecar), CAPTION_BYTES)[:CAPTION_BYTES].decode("utf-8", "replace")


def _table(data: Path, suffix: str, image_column: str, caption_column: str) -> list:
    """The rows of a pairs table (ValueError or csv.Error when it is not one: "unexpected JSONDecodeError" was all
    a stray line said)."""
    if suffix == ".csv":
        with open(data, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(data, columns=[image_column, caption_column]).to_pylist()
    rows = []
    for n, line in enumerate(data.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"line {n}: {exc}") from None
            if not isinstance(row, dict):  # a string's `"image" in row` was a substring test, then row["image"] failed
                raise ValueError(f"line {n}: expected an object of columns, found {type(row).__name__} {line.strip()[:60]}")
            rows.append(row)
    return rows


def load_pairs(data: str | Path, image_column: str = "image", caption_column: str = "caption") -> Pairs:
    """Read pairs; bad ones (missing image, empty caption) are listed in .skipped, never fatal.
    Relative image paths in a table are relative to the table's folder."""
    data = Path(data)
    out = Pairs()
    if data.is_dir():
        for image in sorted(p for p in data.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
            sidecar = image.with_suffix(".txt")
            if not sidecar.exists():
                out.skipped.append((str(image), "no caption file " + sidecar.name))
                continue
            try:
                caption = _read_caption(sidecar)
            except (OSError, BadImageError) as exc:  # BadImageError: a FIFO or device (safeopen.Refused)
                out.skipped.append((str(image), f"caption file {sidecar.name}: {getattr(exc, 'strerror', None) or exc}"))
                continue
            _check(image, caption, out)
        return out
    if not data.is_file():
        raise BadInputError(f"{data} is neither a folder of images with .txt captions nor a CSV/JSONL/parquet file")
    suffix = data.suffix.lower()
    if suffix not in (".csv", ".jsonl", ".json", ".parquet"):
        raise BadInputError(f"unsupported pairs file {data.name}: use .csv, .jsonl or .parquet")
    try:
        rows = _table(data, suffix, image_column, caption_column)
    except (ValueError, csv.Error) as exc:  # not UTF-8, a line that is not JSON, a parquet file without the columns
        raise BadInputError(f"{data.name} cannot be read as a {suffix[1:]} file of pairs: "
                            f"{' '.join(str(exc).split())[:300]}") from None
    for i, row in enumerate(rows):
        if image_column not in row or caption_column not in row:
            raise BadInputError(f"row {i + 1} of {data.name} lacks the columns {image_column!r} and {caption_column!r} "
                                "(name them with --image-column / --caption-column)")
        _check(data.parent / str(row[image_column]), row[caption_column], out)
    return out
