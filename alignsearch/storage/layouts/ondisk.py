"""The on-disk layout (--ondisk-shards N): index.faiss holds the quantizer and PQ tables, its inverted lists
live in one lists-<ns>.ivfdata file memory-mapped when served, so only the small part stays in RAM.

Lists on disk cannot drop ids: every build writes a new lists file (merged by indexer/ondisk.py), then
index.faiss naming it, as index.faiss.next; the commit records the checksums of both, publish renames
index.faiss.next into place and removes the other files. (Written over index.faiss before the commit, a
writer killed between the two left a single-file index whose bytes no longer had the recorded checksum:
queries refused it until the next run.) A writer killed between the commit and the publish leaves the
index.faiss before, read as it is, with its lists (kept until a publish): Layout.check and finish_publish.
"""

from __future__ import annotations

import time
from pathlib import Path

from alignsearch.storage import ann, shards
from alignsearch.storage.layout import OneFile, drop_lists
from alignsearch.storage.paths import LISTS_SUFFIX


class OnDisk(OneFile):
    kind = "ondisk"

    staged: Path | None = None  # the lists file a build is writing

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

    def open(self):
        if self.record.digest is not None:  # the layout records its checksums among its files: not one of its own
            return super().open()
        return ann.read_ondisk(self.path)

    def files(self) -> list[Path]:
        lists = self.lists()
        return [self.path] + ([lists] if lists is not None else [])

    def checksums(self) -> tuple[str | None, dict[str, str]]:
        return None, {p.name: self._written if p == self.path else ann.own_digest(p) for p in self.files()}

    def publish(self) -> None:
        ann.publish_next(self.path)
        shards.unpublish(self.folder)  # a sharded layout before this one: its manifest would still be served
        drop_lists(self.folder, keep=self.lists())
