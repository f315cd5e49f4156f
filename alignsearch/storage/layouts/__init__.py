"""The ANN layouts (the interface is alignsearch/storage/layout.py): which one an index has, which one a build
makes, and opening the one a reader finds."""

from __future__ import annotations

import time
from pathlib import Path

import faiss

from alignsearch.storage import shards
from alignsearch.storage.layout import AnnRecord, Layout, read_record, write_record
from alignsearch.storage.layouts.ondisk import OnDisk
from alignsearch.storage.layouts.sharded import Sharded
from alignsearch.storage.layouts.single import Single
from alignsearch.storage.paths import ANN_FILE

__all__ = ["AnnRecord", "Layout", "OnDisk", "Sharded", "Single", "kind_of", "new", "open_current", "pick",
           "read_record", "stamp", "target_kind", "write_record"]

LAYOUTS: dict[str, type[Layout]] = {cls.kind: cls for cls in (Single, Sharded, OnDisk)}


def kind_of(manifest: bool, record: AnnRecord) -> str:
    """The layout of an index: sharded while a manifest is there (it is published before the files of the
    layout before it go, so it is what readers must follow), on-disk when the record names a lists file,
    else single."""
    if manifest:
        return Sharded.kind
    if record.lists_name is not None:
        return OnDisk.kind
    return Single.kind


def pick(folder: Path, record: AnnRecord) -> Layout:
    """The layout of the index in `folder`, with the catalog's `record` of it."""
    return LAYOUTS[kind_of((Path(folder) / shards.MANIFEST).exists(), record)](folder, record)


def target_kind(plan_kind: str, *, ondisk_shards: int, index_shards: int) -> str:
    """The layout a build makes: the one asked for, for an IVF-PQ index; a flat one is always a single file."""
    if plan_kind != "ivfpq":
        return Single.kind
    if index_shards:
        return Sharded.kind
    return OnDisk.kind if ondisk_shards else Single.kind


def new(folder: Path, kind: str) -> Layout:
    """An empty layout of this kind for a build to fill."""
    return LAYOUTS[kind](folder)


def open_current(folder: Path, record: AnnRecord, tries: int = 3) -> faiss.Index:
    """What a query searches, in whichever layout `folder` holds now. A layout switch published while
    opening is retried (the files of the layout before vanish only after the switch)."""
    for attempt in range(tries):
        try:
            return pick(folder, record).open()
        except (FileNotFoundError, RuntimeError):  # faiss reports a missing file as RuntimeError
            if attempt == tries - 1:
                raise
            time.sleep(0.05)
    raise AssertionError("unreachable")


def stamp(folder: Path) -> int:
    """Changes whenever a new index is published (the engine re-opens on a change); 0 when none is."""
    for path in (Path(folder) / shards.MANIFEST, Path(folder) / ANN_FILE):
        try:
            return path.stat().st_mtime_ns
        except FileNotFoundError:
            continue
    return 0
