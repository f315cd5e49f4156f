"""The on-disk layout (--ondisk-shards N): index.faiss holds the quantizer and PQ tables, its inverted lists
live in one lists-<ns>.ivfdata file memory-mapped when served, so only the small part stays in RAM.

Lists on disk cannot drop ids: every build writes a new lists file (merged by indexer/ondisk.py), then
index.faiss naming it (written atomically before the commit, as readers take index.faiss without a
checksum in this layout); the commit records the checksums of both, publish removes the other files.
"""

from __future__ import annotations

import time
from pathlib import Path

import faiss

from alignsearch.storage import ann, shards
from alignsearch.storage.layout import Layout, drop_lists
from alignsearch.storage.paths import ANN_FILE, LISTS_SUFFIX


class OnDisk(Layout):
    kind = "ondisk"

    staged: Path | None = None  # the lists file a build is writing

    @property
    def path(self) -> Path:
        return self.folder / ANN_FILE

    def new_lists(self) -> Path:
        """A fresh name for the build's lists file (a reader of the older index keeps its own)."""
        self.staged = self.folder / f"lists-{time.time_ns()}{LISTS_SUFFIX}"
        return self.staged

    def lists(self) -> Path | None:
        if self.staged is not None:
            return self.staged
        name = self.record.lists_name
        if name is not None:
            return self.folder / name
        found = sorted(self.folder.glob(f"lists-*{LISTS_SUFFIX}"))  # an index older than its record
        return found[-1] if found else None

    def files(self) -> list[Path]:
        lists = self.lists()
        return [self.path] + ([lists] if lists is not None else [])

    def exists(self) -> bool:
        return self.path.exists()

    def open(self) -> faiss.Index:
        return ann.read_verified(self.path, self.record.digest)

    def write(self, index: faiss.Index) -> None:
        ann.write_atomic(index, self.path)

    def checksums(self) -> tuple[str | None, dict[str, str]]:
        return None, {p.name: ann.file_digest(p) for p in self.files()}

    def publish(self) -> None:
        shards.unpublish(self.folder)  # a sharded layout before this one: its manifest would still be served
        drop_lists(self.folder, keep=self.lists())
