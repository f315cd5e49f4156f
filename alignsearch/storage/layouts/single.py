"""The single layout: the whole index in index.faiss, read in memory.

Written to index.faiss.next, its checksum committed (meta ann_digest), then renamed over index.faiss; a
reader accepts only bytes with the recorded checksum, from either name (ann.read_verified).
"""

from __future__ import annotations

from pathlib import Path

from alignsearch.storage import ann, shards
from alignsearch.storage.layout import OneFile, committed_next, damaged_message, drop_lists
from alignsearch.storage.paths import ANN_FILE


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
        # what was recorded, whichever layout recorded it (a sharded one whose manifest was lost is checked here)
        if self.record.files:
            return dict(self.record.files)
        return {ANN_FILE: self.record.digest} if self.record.digest else {}

    def check(self) -> list[str]:
        # readers take index.faiss.next with the recorded checksum (ann.read_verified) as the next writer does
        if not self.record.files and committed_next(self.path, self.record.digest):
            return []
        manifest = self.folder / shards.MANIFEST
        if committed_next(manifest, self.record.files.get(manifest.name)):
            # shard files committed, their manifest not yet published: readers read index.faiss (the layout before)
            return [line for line in super().check() if line != damaged_message(manifest.name)]
        return super().check()

    def finish_publish(self) -> None:
        """Finish a rename a crash interrupted: index.faiss.next is published if it carries the recorded
        checksum (a single layout's digest, or index.faiss among an on-disk layout's files: whichever layout
        committed), else deleted (written, never committed)."""
        nxt = ann.next_path(self.path)
        expected = self.record.digest or self.record.files.get(ANN_FILE)
        if nxt.exists():
            if expected is not None and ann.file_digest(nxt) == expected:
                ann.publish_next(self.path)
            else:
                nxt.unlink()
