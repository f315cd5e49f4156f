"""Read the text in images indexed before `--ocr` was chosen (or by Ray, whose actors do not read text).

Each such file is read and decoded again and its text stored (catalog.set_ocr); its vector is not touched, and
nothing is encoded. One transaction per batch, so a run killed meanwhile resumes where it stopped.
"""

from __future__ import annotations

import logging
import time
from itertools import islice
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
    read now (or that kill the worker reading them twice) stay unread (NULL) for a later run."""
    from indexer.workers import catalog_pages, map_rows

    done, seconds = 0, 0.0
    pages = catalog_pages(db, catalog.files_without_ocr, BATCH, list(without_ids))
    found = map_rows(_read, pages, workers, lambda row, _reason: (row.id, None, 0.0))  # decoded as the pipeline does
    try:
        while batch := list(islice(found, BATCH)):
            t0 = time.perf_counter()
            seconds += sum(s for _, _, s in batch)
            texts = [(i, t) for i, t, _ in batch if t is not None]
            with db.begin() as conn:
                catalog.set_ocr(conn, texts)
            done += len(texts)
            log.debug("stored text of %d files in %.2f s", len(batch), time.perf_counter() - t0)
            on_batch(len(batch))
    finally:
        found.close()  # Ctrl-C or an error: the worker processes are terminated with it
    return done, seconds
