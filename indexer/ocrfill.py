"""Read the text in images indexed before `--ocr` was chosen (or by Ray, whose actors do not read text).

Each such file is read and decoded again and its text stored (catalog.set_ocr); its vector is not touched, and
nothing is encoded. One transaction per batch, so a run killed meanwhile resumes where it stopped.
"""

from __future__ import annotations

import logging
import multiprocessing
import time
from typing import Iterable

from alignsearch.storage import catalog

log = logging.getLogger(__name__)
BATCH = 64


def _read(row: catalog.FileRow) -> tuple[int, str | None, float]:
    from alignsearch.media.images import open_rgb
    from indexer.decode import read_text

    try:
        image, _ = open_rgb(row.read())
    except Exception as exc:  # noqa: BLE001 - changed or gone since indexing: the next run reconciles it
        log.info("no text read from %s: %s", row.path, exc)
        return row.id, None, 0.0
    text, seconds = read_text(image, row.path)
    return row.id, text, seconds


def fill(db, workers: int = 0, on_batch=lambda n: None, *, without_ids: Iterable[int] = ()) -> tuple[int, float]:
    """Read every indexed file that has not been read for text, but for without_ids (files gone from disk, whose
    rows this run deletes); returns (files read, OCR seconds summed over the workers). Files that cannot be
    read now stay unread (NULL) for a later run."""
    done, after, seconds, pool, without_ids = 0, 0, 0.0, None, list(without_ids)
    try:
        while True:
            with db.connect() as conn:
                rows = catalog.files_without_ocr(conn, after, BATCH, without_ids=without_ids)
            if not rows:
                return done, seconds
            after = rows[-1].id
            if pool is None and workers > 0 and len(rows) > 1:  # decode and read in processes, as the pipeline does
                pool = multiprocessing.get_context("spawn").Pool(workers)
            t0 = time.perf_counter()
            found = pool.map(_read, rows, chunksize=1) if pool is not None else [_read(r) for r in rows]
            seconds += sum(s for _, _, s in found)
            texts = [(i, t) for i, t, _ in found if t is not None]
            with db.begin() as conn:
                catalog.set_ocr(conn, texts)
            done += len(texts)
            log.debug("read text in %d files in %.2f s", len(rows), time.perf_counter() - t0)
            on_batch(len(rows))
    finally:
        if pool is not None:
            pool.close()
            pool.join()
