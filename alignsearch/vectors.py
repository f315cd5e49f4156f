"""The vector store: every embedding, fp16, in one append-only file of fixed-width rows.

The catalog records how many rows are committed; bytes past that (a run killed between writing
vectors and committing their catalog rows) are cut off by the next writer. Readers memory-map
the committed rows, so exact re-ranking touches only the rows it needs.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

DTYPE = np.dtype("<f2")


class VectorStore:
    def __init__(self, path: Path, dim: int, rows: int):
        self.path = Path(path)
        self.dim = dim
        self.rows = rows  # committed rows
        self._map: np.memmap | None = None

    @property
    def row_bytes(self) -> int:
        return self.dim * DTYPE.itemsize

    def truncate_uncommitted(self) -> None:
        """Drop bytes a killed run wrote past the committed rows. Only a writer may call this."""
        self.path.touch(exist_ok=True)
        if self.path.stat().st_size != self.rows * self.row_bytes:
            with open(self.path, "r+b") as f:
                f.truncate(self.rows * self.row_bytes)
                os.fsync(f.fileno())

    def append(self, vectors: np.ndarray) -> int:
        """Write rows after the committed ones and fsync; returns the first new row.

        The caller commits the catalog rows that point at them (and the new row count) afterwards.
        """
        vectors = np.ascontiguousarray(vectors, dtype=DTYPE)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"expected (n, {self.dim}) vectors, got {vectors.shape}")
        start = self.rows
        with open(self.path, "r+b" if self.path.exists() else "w+b") as f:
            f.seek(start * self.row_bytes)
            f.write(vectors.tobytes())
            f.flush()
            os.fsync(f.fileno())
        self.rows += len(vectors)
        self._map = None
        return start

    def _mapped(self) -> np.ndarray:
        if self.rows == 0:
            return np.zeros((0, self.dim), dtype=DTYPE)
        if self._map is None or len(self._map) != self.rows:
            self._map = np.memmap(self.path, dtype=DTYPE, mode="r", shape=(self.rows, self.dim))
        return self._map

    def get(self, rows: np.ndarray) -> np.ndarray:
        """float32 copies of the given rows, in the given order."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        order = np.argsort(rows)  # sorted reads are kinder to the page cache
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        out[order] = self._mapped()[rows[order]]
        return out
