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


def _read(row: catalog.FileRow) -> tuple[int, str | None, float, str | None, str | None]:
    """(file id, its text or None, OCR seconds, why it cannot be read as it is: None when it may be next time,
    why the text reader cannot start in this worker: None when it did)."""
    from alignsearch.media.images import open_rgb
    from alignsearch.media.ocr import EngineUnavailable
    from indexer.decode import lasting_failure, read_text_or_error

    try:
        data = row.read()
    except Exception as exc:  # noqa: BLE001 - gone, unreadable for now, changed since indexing: tried again
        log.info("no text read from %s: %s", row.path, exc)
        return row.id, None, 0.0, None, None
    try:
        image, _ = open_rgb(data)
    except Exception as exc:  # noqa: BLE001 - recorded only where its bytes cannot be decoded (lasting_failure)
        log.info("no text read from %s: %s", row.path, exc)
        return row.id, None, 0.0, lasting_failure(exc), None
    text, seconds, exc = read_text_or_error(image, row.path)
    if isinstance(exc, EngineUnavailable):
        return row.id, None, seconds, None, str(exc)
    return row.id, text, seconds, None if exc is None else lasting_failure(exc, "the text reader failed on it"), None


def fill(db, workers: int = 0, on_batch=lambda n: None, *, without_ids: Iterable[int] = ()) -> tuple[int, float]:
    """Read every indexed file that has not been read for text, but for without_ids (files gone from disk, whose
    rows this run deletes); returns (files read, OCR seconds summed over the workers). Files that cannot be
    opened now stay unread (NULL) for a later run; those that cannot be decoded or read, or that kill the worker
    reading them twice, are recorded (catalog.fill_failures) and skipped by later runs until they change. A text
    reader that cannot start stops the fill with one warning, recording nothing (indexer/decode.lasting_failure)."""
    from indexer.workers import catalog_pages, map_rows

    done, seconds = 0, 0.0
    pages = catalog_pages(db, catalog.files_without_ocr, BATCH, list(without_ids))
    # decoded as the pipeline does; a file that killed its worker twice: recorded with that reason
    found = map_rows(_read, pages, workers, lambda row, reason: (row.id, None, 0.0, reason, None))
    try:
        while batch := list(islice(found, BATCH)):
            t0 = time.perf_counter()
            seconds += sum(s for _, _, s, _, _ in batch)
            texts = [(i, t) for i, t, _, _, _ in batch if t is not None]
            with db.begin() as conn:
                catalog.set_ocr(conn, texts)
                catalog.record_fill_failures(conn, catalog.FILL_OCR, [(i, why) for i, _, _, why, _ in batch if why])
            done += len(texts)
            log.debug("stored text of %d files in %.2f s", len(batch), time.perf_counter() - t0)
            on_batch(len(batch))
            if down := next((d for *_, d in batch if d), None):
                # every file would fail alike: none recorded, the rest left unread for a run whose engine starts
                log.warning("text not read: the text reader cannot start (%s); the files left are read by a "
                            "later run", down)
                break
    finally:
        found.close()  # Ctrl-C or an error: the worker processes are terminated with it
    return done, seconds
