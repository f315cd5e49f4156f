"""The single layout: the whole index in index.faiss, read in memory.

Written to index.faiss.next, its checksum committed (meta ann_digest), then renamed over index.faiss; a
reader accepts only bytes with the recorded checksum, from either name (ann.read_verified).
"""

from __future__ import annotations

from pathlib import Path

from alignsearch.storage import ann, shards
from alignsearch.storage.layout import OneFile, drop_lists, recorded_checksums


class Single(OneFile):
    kind = "single"

    def files(self) -> list[Path]:
        return [self.path]

    def checksums(self) -> tuple[str | None, dict[str, str]]:
        return self._written, {}

    def publish(self) -> None:
        ann.publish_next(self.path)
        shards.unpublish(self.folder)
        drop_lists(self.folder)

    def expected(self) -> dict[str, str]:
        # its checksum is the record's digest; a sharded layout whose manifest is not there (lost, or committed
        # and not yet renamed into place: readers read index.faiss, the layout before) is checked here too
        return recorded_checksums(self.record)
