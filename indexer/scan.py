"""Walk corpus roots and say which files are new, changed or gone compared with the catalog."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".heic", ".heif", ".avif"}
)
JUNK_NAMES = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})


@dataclass(frozen=True)
class Found:
    root: str
    relpath: str  # printable: bytes that are not UTF-8 appear as \xNN
    size: int
    mtime: float
    error: str | None = None  # set when the entry cannot even be stat'ed (broken link, loop)
    relpath_raw: bytes | None = None  # the real bytes, only for names that are not UTF-8

    @property
    def path(self) -> str:
        return os.path.join(self.root, os.fsdecode(self.relpath_raw) if self.relpath_raw else self.relpath)


def printable(relpath: str) -> tuple[str, bytes | None]:
    """(text SQLite can store, raw bytes when the name is not UTF-8)."""
    try:
        relpath.encode("utf-8")
        return relpath, None
    except UnicodeEncodeError:
        raw = os.fsencode(relpath)
        return raw.decode("utf-8", "backslashreplace"), raw


def _hidden(name: str) -> bool:
    return name.startswith(".")


def scan(root: str | os.PathLike, include_hidden: bool = False) -> Iterator[Found]:
    """Image files under root, by extension, sorted. Directory symlinks are not followed (no loops);
    file symlinks are, and a broken one is reported with an error."""
    root = str(Path(root).resolve())
    for folder, dirs, names in os.walk(root, onerror=None, followlinks=False):
        dirs[:] = sorted(d for d in dirs if include_hidden or not _hidden(d))
        for name in sorted(names):
            if name in JUNK_NAMES or name.startswith("._") or (_hidden(name) and not include_hidden):
                continue
            if os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            path = os.path.join(folder, name)
            relpath, raw = printable(os.path.relpath(path, root))
            try:
                st = os.stat(path)
            except OSError as exc:
                reason = "broken symlink" if os.path.islink(path) and exc.errno == 2 else f"cannot stat: {exc.strerror or exc}"
                yield Found(root, relpath, 0, 0.0, reason, raw)
                continue
            if not os.path.isfile(path):
                continue
            yield Found(root, relpath, st.st_size, st.st_mtime, None, raw)


@dataclass
class Diff:
    todo: list[Found] = field(default_factory=list)  # new or changed: to decode and encode
    changed_ids: list[int] = field(default_factory=list)  # catalog ids replaced by re-encoding
    removed: list = field(default_factory=list)  # catalog rows whose file is gone
    unchanged: int = 0


def diff(found: list[Found], known: dict) -> Diff:
    """Compare one root's scan with its catalog rows (relpath -> FileRow) by size and mtime."""
    out = Diff()
    seen = set()
    for f in found:
        seen.add(f.relpath)
        row = known.get(f.relpath)
        if row is None:
            out.todo.append(f)
        elif row.size != f.size or row.mtime != f.mtime:
            out.todo.append(f)
            out.changed_ids.append(row.id)
        else:
            out.unchanged += 1
    out.removed = [row for rel, row in known.items() if rel not in seen]
    return out
