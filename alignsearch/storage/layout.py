"""The ANN index's layouts on disk, one object each, with one small interface.

| layout (kind) | files it owns                                   | a reader opens                                  |
|---------------|-------------------------------------------------|-------------------------------------------------|
| single        | index.faiss (index.faiss.next until published)  | the bytes with the checksum the catalog recorded |
| sharded       | shards.json and the shard-<ns>-<s>.faiss it names | the manifest's shards, memory-mapped (shards.py)  |
| ondisk        | index.faiss and its lists-<ns>.ivfdata           | index.faiss, its lists memory-mapped            |

The implementations are alignsearch/storage/layouts/{single,sharded,ondisk}.py; layouts/__init__.py picks the
layout of an index (pick) and the one a build makes (target_kind).

A writer's round is the same for every layout (indexer/build.py):
1. build: an indexer-side builder fills the index and writes the layout's new files under fresh names (shards,
   lists: never over a file a reader has open). Building needs indexer code (training, merging on-disk lists),
   which storage may not import, so the objects here never build: they name the files a build writes and
   take what it wrote (Sharded.stage, OnDisk.new_lists).
2. write(index): the file a reader starts from, written as a `.next` file beside it after tuning and before
   the commit (single and ondisk: index.faiss.next; sharded: shards.json.next, naming the shard files).
3. commit(conn, record): the checksums of its files, with the build's settings, in the caller's transaction.
4. publish(): the `.next` file is renamed into place (RENAMED), so its files go live, and the other layouts'
   files are removed (a reader that has them open keeps its mapping).
A writer killed between 3 and 4 left a `.next` file with the checksum the catalog committed: that is not
damage (check), and the next writer renames it first (finish_publish); one without it was never committed
and is deleted. Every layout follows this one rule (committed_next), whichever layout committed.
A reader (the engine, verify) picks the layout from the catalog's record and the folder, then open()s it
through layouts.open_current, the one place an open that met a writer's publish is retried (open() is one
attempt); check() names the files whose bytes differ from the recorded checksums; files() lists what it owns.

The ANN index's part of the index state (state.AnnState) is read by read_record and written by write_record only.
"""

from __future__ import annotations

import hashlib
import os
import re
from abc import ABC, abstractmethod
from dataclasses import replace
from pathlib import Path
from typing import ClassVar

import faiss

from alignsearch import atomic
from alignsearch.errors import IndexDamagedError
from alignsearch.storage import ann, shards, state
from alignsearch.storage.paths import ANN_FILE, LISTS_SUFFIX, SEGMENTS_DIR, THUMBS_DIR, VECTORS_FILE

# The files a layout publishes by renaming the `.next` file it wrote before its commit (step 4 above).
RENAMED = (ANN_FILE, shards.MANIFEST)


def read_record(conn) -> state.AnnState:
    return state.read(conn, "ann").ann


def recorded(db) -> state.AnnState:
    """The catalog's record read in a transaction of its own (db: a SQLAlchemy Engine): what a reader
    retrying an open reads again (layouts.open_current's reread)."""
    with db.connect() as conn:
        return read_record(conn)


def write_record(conn, record: state.AnnState) -> None:
    state.write(conn, ann=record)


def recorded_checksums(record: state.AnnState) -> dict[str, str]:
    """The checksum the catalog recorded for each file, whichever layout committed: the sharded or on-disk
    layout's files, else the single layout's index.faiss (its digest)."""
    if record.files:
        return dict(record.files)
    return {ANN_FILE: record.digest} if record.digest else {}


def damaged_message(name: str) -> str:
    return f"{name} is damaged (its checksum differs from the one the catalog recorded)"


def bytes_digest(data: bytes) -> str:
    """The digest ann.file_digest gives a file holding `data`."""
    return hashlib.sha256(data).hexdigest()


class Layout(ABC):
    """One layout of the ANN index in `folder`, as `record` (the catalog's) describes it. A writer makes a fresh
    one (record empty), builds into it, then write / commit / publish; a reader gets one from layouts.pick."""

    kind: ClassVar[str]

    def __init__(self, folder: Path, record: state.AnnState | None = None):
        self.folder = Path(folder)
        self.record = record or state.AnnState()

    @abstractmethod
    def files(self) -> list[Path]:
        """The files it owns: those a writer staged, else those published."""

    @abstractmethod
    def exists(self) -> bool:
        """Whether the file a reader starts from is there (an index was published)."""

    @abstractmethod
    def open(self) -> faiss.Index:
        """The index a query searches (a reader's snapshot)."""

    def write(self, index: faiss.Index) -> None:
        """Write what the build left in memory, before the commit (nothing, unless the layout says so)."""

    @abstractmethod
    def checksums(self) -> tuple[str | None, dict[str, str]]:
        """What a commit records of its files: (ann_digest, ann_files)."""

    def commit(self, conn, record: state.AnnState) -> state.AnnState:
        """Record, in the caller's transaction, `record` (the build's settings) with this layout's checksums."""
        digest, files = self.checksums()
        self.record = replace(record, digest=digest, files=files)
        write_record(conn, self.record)
        return self.record

    @abstractmethod
    def publish(self) -> None:
        """Make the committed files live; remove the files of the other layouts (and its own older ones)."""

    def expected(self) -> dict[str, str]:
        """The checksum each file must have, as recorded: check() compares them."""
        return dict(self.record.files)

    def check(self) -> list[str]:
        """One line per file whose bytes are missing or differ from the recorded checksum, unless it is
        published by a rename (RENAMED) and its `.next` file carries that checksum (committed_next): readers
        serve the layout before it or those bytes, and the next writer publishes it (finish_publish)."""
        found = []
        for name, want in self.expected().items():
            trouble = not_own(self.folder / name)
            if trouble is not None:  # not the file a writer renamed there: rebuilt by --repair, whatever it holds
                found.append(trouble)
            elif not holds(self.folder / name, want) and not self.pending(name, want):
                found.append(damaged_message(name))
        return found

    def pending(self, name: str, want: str | None) -> bool:
        """Is `name` published by a rename and does its `.next` file carry `want`, the committed checksum?"""
        return name in RENAMED and committed_next(self.folder / name, want)

    def finish_publish(self) -> None:
        """The publish a writer killed between its commit and its publish did not do, on the layout the record
        describes (layouts.finish_publish picks it by the record: the folder may still hold the layout
        before, which pick would find): when a `.next` file carries the checksum the catalog committed, this
        layout is published as that writer would have (the rename, and the layout before removed). A `.next`
        file without it (written, never committed) is deleted."""
        recorded = recorded_checksums(self.record)
        committed = [name for name in RENAMED if self.pending(name, recorded.get(name))]
        for name in set(RENAMED) - set(committed):
            ann.next_path(self.folder / name).unlink(missing_ok=True)
        if committed:
            self.publish()


class OneFile(Layout):
    """A layout whose index is index.faiss (single; on-disk, beside its lists file): written as
    index.faiss.next and published by a rename. Opened through ann.read_verified: the single layout
    records its checksum (record.digest) and only those bytes are read; the on-disk layout records it among
    its files and its small index.faiss is read as it is (digest None), verify checks it."""

    _written: str | None = None  # the digest of index.faiss.next, once write() wrote it

    @property
    def path(self) -> Path:
        return self.folder / ANN_FILE

    def exists(self) -> bool:
        return self.path.exists()

    def open(self) -> faiss.Index:
        return ann.read_verified(self.path, self.record.digest)

    def write(self, index: faiss.Index) -> None:
        self._written = ann.write_next(index, self.path)


def not_own(path: Path) -> str | None:
    """What is at the name of one of the index's ANN files instead of a regular file of its own (ann.open_own), in
    words; None for a regular file or nothing. A folder there raises IsADirectoryError, as a read would."""
    try:
        os.close(ann.open_own(path))
    except IndexDamagedError as exc:
        return str(exc).removesuffix(ann.REPAIR)
    except FileNotFoundError:
        pass
    return None


def holds(path: Path, digest: str) -> bool:
    """Does `path` carry the recorded `digest` (in a regular file of its own)?"""
    try:
        return ann.own_digest(path) == digest
    except (FileNotFoundError, IndexDamagedError):
        return False


def committed_next(path: Path, digest: str | None) -> bool:
    """Does path's `.next` file carry the recorded `digest`: committed, not yet renamed over path (a writer
    killed between the two, whose next run renames it)? Then path's bytes are not damage."""
    return digest is not None and holds(ann.next_path(path), digest)


def drop_lists(folder: Path, keep: Path | None = None) -> None:
    """Remove on-disk lists files other than `keep` (open readers keep their mapping of an unlinked file)."""
    for old in Path(folder).glob(f"lists-*{LISTS_SUFFIX}"):
        if old != keep:
            old.unlink()


# The files of an index folder a writer replaces through a temporary renamed into place (atomic.replacing): each
# layout's (ANN_FILE and shards.MANIFEST as `.next` files too, shards, lists) and the vectors file (a linked one is
# copied into its place by `verify --repair`). A writer killed mid-write leaves `.NAME.XXXXXXXX.tmp` beside it, as
# large as the file (an IVF-PQ index.faiss of 1M images holds 64 MB of codes, a copied vectors.f16 1.3 GB); nothing
# else ever removed one, and verify said "ok" beside it.
_WRITTEN = re.compile("|".join([
    rf"(?:{re.escape(ANN_FILE)}|{re.escape(shards.MANIFEST)})(?:{re.escape(ann.NEXT_SUFFIX)})?",
    re.escape(VECTORS_FILE), r"shard-\d+-\d+\.faiss", rf"lists-\d+{re.escape(LISTS_SUFFIX)}"]))
# vectors/: the segments (vectors.py, `NAME.f16`) and the Ray pipeline's run token (indexer/ray_pipeline.py RUN_TOKEN);
# thumbs/: the server's `ID-SIZE.jpg`
_SEGMENT_WRITTEN, _THUMB_WRITTEN = re.compile(r"[^/]+\.f16|\.run"), re.compile(r"\d+-\d+\.jpg")


def remove_killed_writes(index_dir: Path, names: tuple[str, ...] = ()) -> int:
    """Delete the temporaries that writes killed mid-way left in an index folder (atomic.remove_stale's rules: this
    user's, unchanged for a minute, not held by a write at work), and return how many: those of the files above and
    of `names` (the lock files, whose fresh copies indexer/lock.py renames into place), and those of the vectors/
    segments and the server's thumbnails in their folders. Only those names: an index folder may be made
    inside one of the user's folders, whose own `.notes.txt.a1b2c3d4.tmp` is no leftover of ours. A folder that is
    a link is not followed (the index never makes one)."""
    removed = atomic.remove_stale_of(index_dir, lambda name: name in names or _WRITTEN.fullmatch(name) is not None,
                                     writer="a writer of the index")
    # there too only the names written: an index made in a folder of the user's may find their own `vectors/` or
    # `thumbs/` there (an ML project's embeddings, a gallery's thumbnails), and the whole folder was swept
    for sub, written in ((SEGMENTS_DIR, _SEGMENT_WRITTEN), (THUMBS_DIR, _THUMB_WRITTEN)):
        if os.path.isdir(index_dir / sub) and not os.path.islink(index_dir / sub):
            removed += atomic.remove_stale_of(index_dir / sub, lambda name, w=written: w.fullmatch(name) is not None,
                                              writer="a writer of the index")
    return removed
