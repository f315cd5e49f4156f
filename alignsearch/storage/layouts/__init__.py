"""The ANN layouts (the interface is alignsearch/storage/layout.py): which one an index has, which one a build
makes, and opening the one a reader finds."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from typing import Callable

import faiss

from alignsearch.errors import IndexDamagedError, IndexNotFoundError
from alignsearch.storage import ann, shards
from alignsearch.storage.layout import Layout, read_record, recorded, write_record
from alignsearch.storage.layouts.ondisk import OnDisk
from alignsearch.storage.layouts.sharded import Sharded
from alignsearch.storage.layouts.single import Single
from alignsearch.storage.paths import ANN_FILE
from alignsearch.storage.state import AnnState

__all__ = ["Layout", "OnDisk", "Retry", "Sharded", "Single", "finish_publish", "kind_of", "missing", "new",
           "next_wait", "open_current", "pick", "published", "read_record", "recorded", "stamp", "target_kind",
           "write_record"]

log = logging.getLogger(__name__)

LAYOUTS: dict[str, type[Layout]] = {cls.kind: cls for cls in (Single, Sharded, OnDisk)}


def kind_of(manifest: bool, record: AnnState) -> str:
    """The layout of an index: sharded while a manifest is there (it is published before the files of the
    layout before it go, so it is what readers must follow), on-disk when the record names a lists file,
    else single."""
    if manifest:
        return Sharded.kind
    if record.lists_name is not None:
        return OnDisk.kind
    return Single.kind


def pick(folder: Path, record: AnnState) -> Layout:
    """The layout of the index in `folder`, with the catalog's `record` of it."""
    return LAYOUTS[kind_of((Path(folder) / shards.MANIFEST).exists(), record)](folder, record)


def finish_publish(folder: Path, record: AnnState) -> None:
    """What a writer runs first: the publish a writer killed after its commit did not do (Layout.finish_publish),
    on the layout the catalog's `record` committed, picked by the record alone (the folder may still hold
    the layout before)."""
    LAYOUTS[kind_of(shards.MANIFEST in record.files, record)](folder, record).finish_publish()


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


@dataclass(frozen=True)
class Retry:
    """How long open_current keeps trying. What it waits out is a writer's publish: the rename or two between
    its commit and the last of the old layout's files going (milliseconds), or the commit itself."""

    tries: int = 6
    first_wait_s: float = 0.02  # doubled after each failed attempt: 0.02, 0.04 ... 0.32
    budget_s: float = 1.0  # no attempt starts later than this after the first began


RETRY = Retry()


def next_wait(retry: Retry, attempt: int, elapsed_s: float, published: bool) -> float | None:
    """The pause before trying again after attempt number `attempt` (from 1) failed, `elapsed_s` after the
    first began; None: give up (the tries or the time are spent, or nothing is published at all, so no
    switch is under way to wait out)."""
    if not published or attempt >= retry.tries:
        return None
    wait = retry.first_wait_s * 2 ** (attempt - 1)
    return wait if elapsed_s + wait <= retry.budget_s else None


# The file a reader starts from, of any layout (ann.NEXT_SUFFIX: a first build between its commit and rename).
PUBLISHED = (shards.MANIFEST, ANN_FILE, ANN_FILE + ann.NEXT_SUFFIX)


def published(folder: Path) -> bool:
    """Whether any layout's index is in `folder` (complete or not)."""
    return any((Path(folder) / name).exists() for name in PUBLISHED)


def missing(folder: Path) -> IndexNotFoundError:
    return IndexNotFoundError(f"{Path(folder) / ANN_FILE} is missing: run `alignsearch index` to build it")


# What a publish can make an open meet: a file of the layout before gone (faiss reports a missing file as a
# RuntimeError), or index.faiss republished under a checksum the record read before it does not know.
INTERRUPTED = (FileNotFoundError, RuntimeError, IndexDamagedError)


def open_current(folder: Path, record: AnnState, *, reread: Callable[[], AnnState] | None = None,
                 retry: Retry = RETRY) -> faiss.Index:
    """What a query searches, in whichever layout `folder` holds now: the one place an open is retried. A
    writer may publish (switch layouts, or republish index.faiss) while a reader opens, so a failed open is
    tried again with the layout picked anew and the catalog's record read again (reread(), when given), as
    `retry` bounds it. Gives up at once when no index is there: IndexNotFoundError, as when the tries run
    out on a missing file; any other last error is raised as it is (IndexDamagedError: the recorded bytes
    are not there)."""
    start = time.monotonic()
    for attempt in count(1):
        try:
            return pick(folder, record).open()
        except INTERRUPTED as exc:
            there = published(folder)
            wait = next_wait(retry, attempt, time.monotonic() - start, there)
            if wait is None:
                log.debug("opening the ANN index in %s failed %d times in %.2f s", folder, attempt,
                          time.monotonic() - start)
                if not there or isinstance(exc, FileNotFoundError):
                    raise missing(folder) from exc
                if isinstance(exc, RuntimeError):  # faiss could not read the published files (a shard file cut
                    # short or gone: shards are not hashed on open): "unexpected RuntimeError", exit 1, before
                    raise IndexDamagedError(f"the ANN index cannot be read ({str(exc).splitlines()[0][-160:]}): "
                                            "run `alignsearch verify --repair`") from exc
                raise
            log.debug("opening the ANN index in %s again after %r", folder, exc)
        time.sleep(wait)
        if reread is not None:
            record = reread()
    raise AssertionError("unreachable")


def stamp(folder: Path) -> int:
    """Changes whenever a new index is published (the engine re-opens on a change); 0 when none is."""
    for path in (Path(folder) / shards.MANIFEST, Path(folder) / ANN_FILE):
        try:
            return path.stat().st_mtime_ns
        except FileNotFoundError:
            continue
    return 0
