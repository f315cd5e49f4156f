"""The sharded layout (--index-shards N): shard-<ns>-<s>.faiss files named by shards.json, searched together
as one faiss.IndexShards, each memory-mapped (alignsearch/storage/shards.py holds the file format).

A build writes new shard files under fresh names (only the shards whose ids changed) and the manifest naming
them as shards.json.next; the commit records the checksums of every shard and of that manifest, then publish
renames it over shards.json (atomically: a reader sees one generation or the next), as the single and on-disk
layouts rename index.faiss.next. Readers find the layout by the manifest itself.

Why the manifest goes through `.next` although writing shards.json at publish would be as atomic: between
the commit and the publish, the catalog records a manifest no file holds. The `.next` file is what tells
that state apart from a lost manifest (verify: Layout.check) and what lets the next writer finish the
publish (Layout.finish_publish) and update the committed shards in place, instead of building them anew from
the layout before it still finds.
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
    _written: str | None = None  # the checksum of shards.json.next, once write() wrote it

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
        files = {p.name: ann.own_digest(p) for p in self.shard_files()}
        files[self.manifest.name] = self._written
        return None, files

    def write(self, index: faiss.Index) -> None:
        data = shards.manifest_bytes(self.shard_files())
        write_bytes(ann.next_path(self.manifest), data)
        self._written = bytes_digest(data)

    def publish(self) -> None:
        # the shard files staged by this build, else (finish_publish) those the record committed
        staged = self.staged or [self.folder / name for name in self.record.files if name != self.manifest.name]
        if not staged:
            raise ValueError("no shard files were staged to publish")
        shards.publish(self.folder, staged)  # also removes index.faiss
        drop_lists(self.folder)
