"""Filling the perceptual hashes of files indexed before phashes existed (the `index` run's step): decoding
them again, never encoding them, in committed batches so a killed run keeps what it did."""

from __future__ import annotations

import logging
from itertools import islice
from typing import Callable, Iterable

from alignsearch.media.phash import phash_of

log = logging.getLogger(__name__)

FILL_BATCH = 256  # files hashed per transaction when an older index is filled


def _hash_file(row) -> tuple[int, str | None, str | None]:
    """(file id, its phash or None, why it cannot be hashed as it is: None when it may be next time)."""
    from alignsearch.media.images import open_rgb
    from indexer.decode import lasting_failure

    try:
        data = row.read()
    except Exception as exc:  # noqa: BLE001 - gone, unreadable for now, changed since indexing: tried again
        log.info("no phash for %s: %s", row.path, exc)
        return row.id, None, None
    try:
        return row.id, phash_of(open_rgb(data)[0]), None
    except Exception as exc:  # noqa: BLE001 - recorded only where its bytes cannot be decoded (lasting_failure)
        log.info("no phash for %s: %s", row.path, exc)
        return row.id, None, lasting_failure(exc)


def fill_phashes(db, workers: int = 0, batch: int = FILL_BATCH, on_batch: Callable[[int], None] = lambda n: None, *,
                 without_ids: Iterable[int] = ()) -> int:
    """Hash every indexed file that has no phash yet (indexed before phashes existed), decoding it again but
    never encoding it; in batches of `batch` files, each committed in its own transaction, so a killed run
    keeps what it did. Returns the files hashed. Files that cannot be opened now are left without one (tried
    again next run); those that cannot be decoded, or that kill the worker reading them twice, are recorded
    (catalog.fill_failures) and skipped until they change; without_ids (files gone from disk, whose rows this run
    deletes) are not tried."""
    from alignsearch.storage import catalog
    from indexer.workers import catalog_pages, map_rows

    with db.begin() as conn:
        stale = catalog.forget_stale_phashes(conn)
    if stale:
        log.info("dropped %d phashes of files no longer indexed", stale)
    done = 0
    pages = catalog_pages(db, catalog.files_without_phash, batch, list(without_ids))
    # many to do (a full first page): decode in processes, which notice a worker that dies
    found = map_rows(_hash_file, pages, workers, lambda row, reason: (row.id, None, reason), min_rows=batch)
    try:
        while rows := list(islice(found, batch)):
            hashed = [(i, h) for i, h, _ in rows if h]
            with db.begin() as conn:
                catalog.set_phashes(conn, hashed)
                catalog.record_fill_failures(conn, catalog.FILL_PHASH, [(i, why) for i, _, why in rows if why])
            done += len(hashed)
            on_batch(len(rows))
    finally:
        found.close()  # Ctrl-C or an error: the worker processes are terminated with it
    return done


def fill_index(db, workers: int = 0, *, without_ids: Iterable[int] = ()) -> int:
    """The `index` run's step (indexer/job.py): hash files indexed before phashes existed, but for without_ids
    (files gone in this run)."""
    done = fill_phashes(db, workers, without_ids=without_ids)
    if done:
        log.info("perceptual hashes filled for %d files indexed before they existed", done)
    return done
