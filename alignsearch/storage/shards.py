"""An IVF-PQ index kept as several shard files searched together with faiss.IndexShards: the files and the
manifest of the sharded layout (its object is alignsearch/storage/layouts/sharded.py).

The alternative to one merged on-disk index (indexer/ondisk.py): the shards share one trained
quantizer, catalog id i lives in shard i % N, and each file is memory-mapped when served
(IO_FLAG_MMAP_IFC), so the index need not fit in RAM. Unlike merged on-disk lists, shards are updated
in place: a run rewrites only the shards whose ids changed. A manifest names the current files and is
replaced atomically: a reader sees one generation or the next, never a mix.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import faiss
import numpy as np

from alignsearch.errors import IndexDamagedError
from alignsearch.storage import ann
from alignsearch.storage.ann import next_path, publish_next
from alignsearch.storage.paths import ANN_FILE

MANIFEST = "shards.json"


def shard_of(ids: np.ndarray, count: int) -> np.ndarray:
    return np.asarray(ids, dtype=np.int64) % count


def files(folder: Path) -> list[Path] | None:
    """The current shard files, or None when the index is a single file."""
    manifest = Path(folder) / MANIFEST
    if not manifest.exists():
        return None
    try:
        with os.fdopen(ann.open_own(manifest), "rb") as f:  # a link there is damage, as at every ANN file
            names = json.loads(f.read())["files"]
        if not isinstance(names, list) or not all(isinstance(n, str) and Path(n).name == n for n in names):
            raise TypeError("not a list of file names")
    except (ValueError, KeyError, TypeError) as exc:  # every command died on JSONDecodeError (exit 1), verify too
        raise IndexDamagedError(f"{MANIFEST} is damaged ({type(exc).__name__}): run `alignsearch verify --repair`")
    return [Path(folder) / name for name in names]


def new_name(folder: Path, shard: int) -> Path:
    return Path(folder) / f"shard-{time.time_ns()}-{shard:03d}.faiss"


def manifest_bytes(paths: list[Path]) -> bytes:
    """The manifest naming `paths` as the shards, as a writer writes it to shards.json.next (its checksum is
    committed before publish renames it into place)."""
    return json.dumps({"files": [Path(p).name for p in paths]}).encode()


def publish(folder: Path, paths: list[Path]) -> None:
    """Make `paths` the current shards: shards.json.next, the manifest naming them, renamed over shards.json
    (atomically). Files of the generation before stay one more round, so a reader that read the old manifest
    a moment ago can still open them; older ones are deleted."""
    folder = Path(folder)
    try:
        previous = {p.name for p in files(folder) or []}
    except IndexDamagedError:  # the manifest verify --repair replaces names nothing to keep (its rebuild died here)
        previous = set()
    publish_next(folder / MANIFEST)
    keep = {p.name for p in paths} | previous
    for old in folder.glob("shard-*.faiss"):  # open readers keep their mapping of an unlinked file
        if old.name not in keep:
            old.unlink()
    (folder / ANN_FILE).unlink(missing_ok=True)


def unpublish(folder: Path) -> None:
    """Back to index.faiss (single or on-disk layout): drop the manifest, then the shard files (after ANN_FILE was
    written)."""
    (Path(folder) / MANIFEST).unlink(missing_ok=True)
    next_path(Path(folder) / MANIFEST).unlink(missing_ok=True)  # a killed writer's: another layout committed since
    for old in Path(folder).glob("shard-*.faiss"):
        old.unlink()


def open_shards(paths: list[Path], mmap: bool = True) -> faiss.IndexShards:
    """One index over the shard files, searched in parallel threads; ids are the catalog's own."""
    flags = faiss.IO_FLAG_MMAP_IFC if mmap else 0
    first = faiss.read_index(ann.own(paths[0]), flags)
    index = faiss.IndexShards(first.d, True, False)  # threaded, ids kept as stored
    index.add_shard(first)
    for path in paths[1:]:
        index.add_shard(faiss.read_index(ann.own(path), flags))
    return index
