"""The vector store: every embedding, fp16, in append-only files of fixed-width rows.

Segment 0 is vectors.f16, appended to by the process that commits the catalog. The encoder actors
of a distributed run (indexer/ray_pipeline.py) each append to a segment of their own under
vectors/ and send back only where they wrote, so no vector passes through the driver. The catalog
addresses a vector as (segment << 40) | row: segment 0's addresses are plain row numbers, as in
indexes written before segments existed.

The catalog records how many rows of each segment are committed; bytes past that (a run killed
between writing vectors and committing their catalog rows) are cut off by the next writer, and a
segment the catalog never heard of (an actor killed before its first commit) is deleted. Rows an
actor wrote for a batch that was then retried elsewhere stay in the middle of its segment, unused.
Readers memory-map the committed rows, so exact re-ranking touches only the rows it needs.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from sqlalchemy.engine import Connection

from alignsearch import catalog
from alignsearch.paths import VECTORS_FILE

DTYPE = np.dtype("<f2")
SEGMENT_BITS = 40  # 1.1e12 rows per segment, 8.4e6 segments in an int64 address
ROW_MASK = (1 << SEGMENT_BITS) - 1
SEGMENTS_DIR = "vectors"


def address(segment: int, row: int) -> int:
    return (segment << SEGMENT_BITS) | row


class VectorStore:
    """Segment 0 at `path`; `segments` maps the number of each other segment to (name, committed rows)."""

    def __init__(self, path: Path, dim: int, rows: int, segments: dict[int, tuple[str, int]] | None = None):
        self.path = Path(path)
        self.dim = dim
        self.rows = rows  # committed rows of segment 0
        self.segments = {int(k): (str(name), int(n)) for k, (name, n) in (segments or {}).items()}
        self._maps: dict[int, np.memmap] = {}

    def __getstate__(self) -> dict:  # sent to worker processes without its maps
        return {**self.__dict__, "_maps": {}}

    @property
    def row_bytes(self) -> int:
        return self.dim * DTYPE.itemsize

    @property
    def folder(self) -> Path:
        return self.path.parent / SEGMENTS_DIR

    def numbers(self) -> list[int]:
        return [0, *sorted(self.segments)]

    def segment_path(self, segment: int) -> Path:
        return self.path if segment == 0 else self.folder / f"{self.segments[segment][0]}.f16"

    def committed(self, segment: int) -> int:
        return self.rows if segment == 0 else self.segments[segment][1]

    def valid(self, addresses: np.ndarray) -> np.ndarray:
        """Which addresses name a committed row of this store (a reader's store may predate a commit)."""
        addresses = np.asarray(addresses, dtype=np.int64)
        segment_of, rows = addresses >> SEGMENT_BITS, addresses & ROW_MASK
        counts = np.zeros(max(self.numbers()) + 1, dtype=np.int64)  # 0 rows for numbers not in use
        counts[self.numbers()] = [self.committed(s) for s in self.numbers()]
        ok = (addresses >= 0) & (segment_of < len(counts))
        ok[ok] = rows[ok] < counts[segment_of[ok]]
        return ok

    def holds(self, addresses: np.ndarray) -> bool:
        return bool(self.valid(addresses).all())

    def unknown_files(self) -> list[Path]:
        """Segment files the store does not list: left by actors killed before their first commit."""
        listed = {f"{name}.f16" for name, _ in self.segments.values()}
        return sorted(p for p in self.folder.glob("*.f16") if p.name not in listed) if self.folder.exists() else []

    def truncate_uncommitted(self) -> None:
        """Drop what killed runs wrote past the committed rows, and unknown segment files. Only the holder
        of the index's writer lock (indexer/lock.py) may call this, with no actors of its own running.
        A file shorter than its committed rows is left for `alignsearch verify` to report."""
        self.path.touch(exist_ok=True)
        for segment in self.numbers():
            path, keep = self.segment_path(segment), self.committed(segment) * self.row_bytes
            if path.exists() and path.stat().st_size > keep:
                with open(path, "r+b") as f:
                    f.truncate(keep)
                    os.fsync(f.fileno())
        for path in self.unknown_files():
            path.unlink()
        self._maps.clear()

    def append(self, vectors: np.ndarray) -> int:
        """Write rows after segment 0's committed ones and fsync; returns the first new row (its address).

        The caller commits the catalog rows that point at them (and the new row count) afterwards.
        """
        vectors = np.ascontiguousarray(vectors, dtype=DTYPE)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"expected (n, {self.dim}) vectors, got {vectors.shape}")
        start, created = self.rows, not self.path.exists()
        with open(self.path, "w+b" if created else "r+b") as f:
            f.seek(start * self.row_bytes)
            f.write(vectors.tobytes())
            f.flush()
            os.fsync(f.fileno())
        if created:  # the file's name must survive a power cut as surely as its rows
            fsync_dir(self.path.parent)
        self.rows += len(vectors)
        self._maps.pop(0, None)
        return start

    def commit(self, name: str, rows: int) -> int:
        """Record that segment `name` holds at least `rows` durable rows; returns its number.

        Its writer fsync'ed them; the caller saves the store (save()) with the catalog rows that use them."""
        for number, (known, n) in self.segments.items():
            if known == name:
                if rows > n:
                    self.segments[number] = (name, rows)
                    self._maps.pop(number, None)
                return number
        number = max(self.numbers()) + 1
        self.segments[number] = (name, rows)
        return number

    def forget(self, segment: int) -> None:
        """Drop a segment whose rows now live elsewhere (the caller re-addressed the catalog)."""
        del self.segments[segment]
        self._maps.pop(segment, None)

    def _mapped(self, segment: int) -> np.ndarray:
        rows = self.committed(segment)
        if rows == 0:
            return np.zeros((0, self.dim), dtype=DTYPE)
        if segment not in self._maps or len(self._maps[segment]) != rows:
            self._maps[segment] = np.memmap(self.segment_path(segment), dtype=DTYPE, mode="r", shape=(rows, self.dim))
        return self._maps[segment]

    def get(self, addresses: np.ndarray) -> np.ndarray:
        """float32 copies of the vectors at the given addresses, in the given order."""
        addresses = np.asarray(addresses, dtype=np.int64)
        out = np.empty((len(addresses), self.dim), dtype=np.float32)
        segment_of = addresses >> SEGMENT_BITS
        for segment in np.unique(segment_of).tolist():
            where = np.flatnonzero(segment_of == segment)
            rows = addresses[where] & ROW_MASK
            order = np.argsort(rows)  # sorted reads are kinder to the page cache
            out[where[order]] = self._mapped(segment)[rows[order]]
        return out


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load(conn: Connection, index_dir: Path, dim: int) -> VectorStore:
    """The store of the index at index_dir as the catalog last committed it."""
    listed = catalog.get_meta(conn, "vector_segments", [])
    return VectorStore(Path(index_dir) / VECTORS_FILE, dim, catalog.get_meta(conn, "vector_rows", 0),
                       {number: (name, rows) for number, name, rows in listed})


def save(conn: Connection, store: VectorStore) -> None:
    """Commit the store's row counts, in the transaction that commits the catalog rows using them."""
    catalog.set_meta(conn, "vector_rows", store.rows)
    catalog.set_meta(conn, "vector_segments", [[n, *store.segments[n]] for n in sorted(store.segments)])
