"""The writer stage: one transaction per batch for catalog rows, vector rows and the row count."""

from __future__ import annotations

from typing import Callable

import numpy as np
from sqlalchemy.engine import Engine

from alignsearch import catalog, vectors
from alignsearch.vectors import VectorStore
from indexer.decode import Item


def catalog_writer(db: Engine, store: VectorStore) -> Callable[[list[Item], np.ndarray], None]:
    """A write(batch, new_vectors) that appends the new vectors (fsync'ed) and then commits the rows that
    point at them. Killed in between, the next run cuts the uncommitted vectors off. Items whose vector
    is stored already (vec_row set: reused content, or written by an encoder actor) take none of them."""

    def write(batch: list[Item], new_vectors: np.ndarray) -> None:
        encoded = [it for it in batch if it.crop is not None and it.vec_row is None]
        start = store.append(new_vectors) if encoded else store.rows
        rows = iter(range(start, start + len(encoded)))
        with db.begin() as conn:
            for it in batch:
                f = it.found
                ok = it.crop is not None
                if ok:
                    row = it.vec_row if it.vec_row is not None else next(rows)
                catalog.upsert_file(
                    conn,
                    dict(
                        root=f.root,
                        relpath=f.relpath,
                        relpath_raw=f.relpath_raw,
                        size=f.size,
                        mtime=f.mtime,
                        sha256=it.sha256,
                        width=it.width,
                        height=it.height,
                        format=it.format,
                        status=catalog.INDEXED if ok else catalog.FAILED,
                        reason=it.reason,
                        vec_row=row if ok else None,
                    ),
                )
            vectors.save(conn, store)

    return write
