"""Fill the photo fields (taken, camera, lens, GPS, caption) of files indexed before they were recorded.

Reads each such file's bytes for its EXIF (no pixels decoded, nothing encoded), its sidecar caption,
and the caption column of a list or the caption members of a tar shard; one transaction per batch, so
a run killed meanwhile resumes where it stopped.
"""

from __future__ import annotations

import logging
from typing import Iterable

from alignsearch.storage import catalog
from alignsearch.media import photometa, sources
from alignsearch.errors import AlignSearchError, BadImageError
from indexer import scan
from indexer.decode import sidecar_caption
from indexer.workers import catalog_pages

log = logging.getLogger(__name__)
BATCH = 256


def fill(db, caption_columns: dict | None = None, list_columns: dict | None = None, *,
         without_ids: Iterable[int] = ()) -> int:
    """Record the photo fields of every indexed file that has none, but for without_ids (files gone from disk,
    whose rows this run deletes); returns how many were filled."""
    done, captions = 0, {}
    for rows in catalog_pages(db, catalog.files_without_photo, BATCH, list(without_ids)):
        fields = [(row, _fields(row, captions, caption_columns or {}, list_columns or {})) for row in rows]
        fields = [(row, photo) for row, photo in fields if photo is not None]
        with db.begin() as conn:
            for row, photo in fields:
                catalog.set_photo(conn, row.id, row.relpath, photo)
        done += len(fields)
    return done


def _fields(row: catalog.FileRow, captions: dict, caption_columns: dict, list_columns: dict) -> dict | None:
    """The file's photo fields; None when it cannot be read now (its fields wait for a later run: stored from no
    bytes, its EXIF date, camera and place were lost for good, the mtime standing in for the date)."""
    found = scan.Found(row.root, row.relpath, row.size, row.mtime, None, row.relpath_raw)
    try:
        data = row.read()
    except (OSError, BadImageError) as exc:  # unreadable for now (permissions, a disk away), or changed
        log.info("no photo fields for %s yet: %s", row.path, exc)
        return None
    caption = sidecar_caption(found) or _source_captions(row.root, captions, caption_columns, list_columns).get(row.relpath)
    return photometa.read(data, row.mtime, caption)


def _source_captions(root: str, cache: dict, caption_columns: dict, list_columns: dict) -> dict:
    """{relpath: caption} of a list or a tar shard, read once per root."""
    if root not in cache:
        cache[root] = {}
        try:
            if sources.kind(root) in (sources.LIST, sources.TAR):
                found = scan.scan(root, list_column=list_columns.get(root), caption_column=caption_columns.get(root))
                cache[root] = {f.relpath: f.caption for f in found if f.caption}
        except (AlignSearchError, OSError) as exc:
            log.info("no captions from %s: %s", root, exc)
    return cache[root]


_UNREAD = object()  # a caption there that recaption could not read now


def recaption(db, rows: Iterable[catalog.FileRow], unread: set | None = None) -> int:
    """Read again the sidecar caption of unchanged photos whose photo.txt is a symbolic link, or was made, edited or
    removed since the last listing (scan.scan_folder's captions_since), and store it where it differs: a caption
    changes neither the photo's size nor its time, so a link's new target (or a link another user planted, now
    refused, whose text an index built before links were judged had stored) went unnoticed for good. Only such
    photos are read, their stored captions asked BATCH at a time; returns how many captions changed (their keyword
    text too). A caption there that cannot be read now keeps its stored text and its root goes into `unread`."""
    changed = []
    by_root: dict[str, dict[str, catalog.FileRow]] = {}
    for row in rows:
        by_root.setdefault(row.root, {})[row.relpath] = row
    with db.connect() as conn:
        for root, mine in by_root.items():
            relpaths = list(mine)
            for start in range(0, len(relpaths), BATCH):
                now: dict[str, object] = {}
                for relpath, file_id, stored in catalog.stored_captions(conn, root, relpaths[start:start + BATCH]):
                    if relpath not in now:  # a video's moments share one caption
                        row = mine[relpath]
                        found = scan.Found(row.root, row.relpath, row.size, row.mtime, None, row.relpath_raw)
                        try:
                            now[relpath] = photometa.clean_caption(sidecar_caption(found, strict=True))
                        except OSError as exc:  # there but unreadable now (EIO): kept, not taken for removed
                            log.info("caption of %s not read again: %s", row.path, exc)
                            now[relpath] = _UNREAD
                            if unread is not None:
                                unread.add(root)
                    if now[relpath] is not _UNREAD and stored != now[relpath]:
                        changed.append((file_id, now[relpath]))
    if changed:
        with db.begin() as conn:
            catalog.set_captions(conn, changed)
    return len({i for i, _ in changed})
