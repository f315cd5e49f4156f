"""Filling the perceptual hashes of files indexed before phashes existed (the `index` run's step): decoding
them again, never encoding them, in committed batches so a killed run keeps what it did."""

from __future__ import annotations

import logging
from typing import Callable, Iterable

from alignsearch.media.phash import phash_of

log = logging.getLogger(__name__)

FILL_BATCH = 256  # files hashed per transaction when an older index is filled


def _hash_file(row) -> tuple[int, str | None]:
    from alignsearch.media.images import open_rgb

    try:
        image, _ = open_rgb(row.read())
        return row.id, phash_of(image)
    except Exception as exc:  # noqa: BLE001 - a file that changed or vanished since indexing: no hash
        log.info("no phash for %s: %s", row.path, exc)
        return row.id, None


def fill_phashes(db, workers: int = 0, batch: int = FILL_BATCH, on_batch: Callable[[int], None] = lambda n: None, *,
                 without_ids: Iterable[int] = ()) -> int:
    """Hash every indexed file that has no phash yet (indexed before phashes existed), decoding it again but
    never encoding it; in batches of `batch` files, each committed in its own transaction, so a killed run
    keeps what it did. Returns the files hashed. Files that can no longer be read are left without one;
    without_ids (files gone from disk, whose rows this run deletes) are not tried."""
    from alignsearch.storage import catalog

    without_ids = list(without_ids)
    with db.begin() as conn:
        stale = catalog.forget_stale_phashes(conn)
    if stale:
        log.info("dropped %d phashes of files no longer indexed", stale)
    done, after = 0, 0
    pool = None
    try:
        while True:
            with db.connect() as conn:
                rows = catalog.files_without_phash(conn, after, batch, without_ids=without_ids)
            if not rows:
                return done
            after = rows[-1].id
            if pool is None and workers > 0 and len(rows) == batch:  # many to do: decode in processes
                from alignsearch.workerpool import spawn_pool

                pool = spawn_pool(workers)
            found = pool.map(_hash_file, rows, chunksize=8) if pool is not None else [_hash_file(r) for r in rows]
            found = [(i, h) for i, h in found if h]
            with db.begin() as conn:
                catalog.set_phashes(conn, found)
            done += len(found)
            on_batch(len(rows))
    except BaseException:  # Ctrl-C: stop the workers now rather than let them finish the queued files
        if pool is not None:
            pool.terminate()
            pool = None
        raise
    finally:
        if pool is not None:
            pool.close()
            pool.join()


def fill_index(db, workers: int = 0, *, without_ids: Iterable[int] = ()) -> int:
    """The `index` run's step (indexer/job.py): hash files indexed before phashes existed, but for without_ids
    (files gone in this run)."""
    done = fill_phashes(db, workers, without_ids=without_ids)
    if done:
        log.info("perceptual hashes filled for %d files indexed before they existed", done)
    return done
