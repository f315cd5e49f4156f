"""The sharded layout (--index-shards N): shard-<ns>-<s>.faiss files named by shards.json, searched together
as one faiss.IndexShards, each memory-mapped (alignsearch/storage/shards.py holds the file format).

A build writes new shard files under fresh names (only the shards whose ids changed), the commit records
the checksums of every shard and of the manifest about to name them, then publish replaces the manifest
atomically: a reader sees one generation or the next. Readers find the layout by the manifest itself.
"""

from __future__ import annotations

from pathlib import Path

import faiss

from alignsearch.atomic import write_bytes
from alignsearch.storage import ann, shards
from alignsearch.storage.layout import Layout, bytes_digest, drop_lists


class Sharded(Layout):
    kind = "sharded"

    staged: list[Path] | None = None  # the shard files a build wrote, in shard order, not yet published

    @property
    def manifest(self) -> Path:
        return self.folder / shards.MANIFEST

    def stage(self, paths: list[Path]) -> None:
        """The shard files of the build (new and unchanged ones), published by publish()."""
        self.staged = list(paths)

    def shard_files(self) -> list[Path]:
        return self.staged if self.staged is not None else shards.files(self.folder) or []

    def files(self) -> list[Path]:
        return [*self.shard_files(), self.manifest]

    def exists(self) -> bool:
        return self.manifest.exists()

    def open(self) -> faiss.Index:
        paths = shards.files(self.folder)
        if not paths:
            raise FileNotFoundError(self.manifest)
        return shards.open_shards(paths)

    def checksums(self) -> tuple[str | None, dict[str, str]]:
        paths = self.shard_files()
        files = {p.name: ann.file_digest(p) for p in paths}
        files[self.manifest.name] = bytes_digest(shards.manifest_bytes(paths))
        return None, files

    def write(self, index: faiss.Index) -> None:
        # the manifest to publish, beside it before the commit: a writer killed between the commit and the
        # publish leaves it, so the recorded manifest reads as pending (Single.check), not lost
        write_bytes(ann.next_path(self.manifest), shards.manifest_bytes(self.shard_files()))

    def publish(self) -> None:
        if self.staged is None:
            raise ValueError("no shard files were staged to publish")
        shards.publish(self.folder, self.staged)  # also removes index.faiss
        ann.next_path(self.manifest).unlink(missing_ok=True)
        drop_lists(self.folder)
