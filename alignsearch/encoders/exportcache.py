"""The export cache's size, and removing what a re-export superseded.

Each model's towers live in their own folder (backend.onnx_dir: fingerprint and content digest), ~1 GB for
align-base with its int8 text tower and OpenVINO's compiled graphs. A checkpoint re-saved at the same place
(fine-tuned, or updated) gets a new folder, and the old one was kept for ever; an export version bump
re-exports into the same folder, where a tower not exported again stayed beside the new ones. Once a new
export is complete, what it superseded is removed, and only that:

- a folder beside it whose manifest names the same model (its place or hub id) with other weights, and no
  other place known to hold those weights (_places), whose name is the one this tool gives that manifest's
  model (a marker: folders this tool did not write are never touched), owned by this user, writable by
  nobody else, not a symlink (none is followed);
- never one a running process has loaded a tower from: loaders hold a shared lock on its IN_USE file
  (backend.lock_in_use) for as long as they run; the remover takes it exclusively, without waiting, and leaves a
  folder it cannot lock for a later export to remove;
- the folder is renamed away first (one atomic step: no process finds it by its name afterwards), then
  deleted; one left half-deleted by a killed process is deleted by the next removal, or by the next process
  that opens the cache for a model (onnxexport.Exporter): no process uses a renamed-away folder, and up to a
  gigabyte should not wait for the next re-export.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import uuid
from pathlib import Path

from alignsearch.encoders.backend import lock_in_use
from alignsearch.encoders.onnxrun import FILES, OPENVINO_CACHE, read_manifest
from alignsearch.storage.paths import cache_root, untrusted

log = logging.getLogger(__name__)
TRASH = ".superseded-"  # a superseded folder renamed away, being deleted


def tree_bytes(folder: Path) -> int:
    """The bytes of the regular files under folder, symlinks neither followed nor counted."""
    total = 0
    for top, dirs, names in os.walk(folder, followlinks=False):
        for name in names:
            try:
                st = os.lstat(os.path.join(top, name))
            except OSError:
                continue
            total += st.st_size if stat.S_ISREG(st.st_mode) else 0
    return total


def usage() -> dict:
    """{"path": the export cache, "bytes": its size (every model's folder), "models": how many folders}."""
    base = cache_root() / "onnx"
    try:
        folders = [e for e in os.scandir(base) if e.is_dir(follow_symlinks=False) and not e.name.startswith(".")]
    except OSError:
        folders = []
    return {"path": str(base), "bytes": tree_bytes(base) if folders else 0, "models": len(folders)}


def _ours(folder: Path) -> bool:
    """A real folder (no symlink) of this user that nobody else may write."""
    try:
        st = os.lstat(folder)
        return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and untrusted(folder) is None
    except OSError:
        return False


def superseded(folder: Path, manifest: dict) -> bool:
    """Does `folder` hold an export this tool wrote of the same model as `manifest` with other weights?"""
    if not _ours(folder) or os.path.islink(folder / "manifest.json") or os.path.islink(folder / "records"):
        return False
    other = read_manifest(folder)
    if not isinstance(other, dict):
        return False
    fingerprint, content = other.get("fingerprint"), other.get("content_digest")
    if not (isinstance(fingerprint, str) and isinstance(content, str) and fingerprint.isalnum() and content.isalnum()):
        return False
    if folder.name != f"{fingerprint}-{content[:16]}":  # not a folder this tool named for this manifest
        return False
    if (fingerprint, content) == (manifest.get("fingerprint"), manifest.get("content_digest")):
        return False
    return _places(other) <= {manifest.get("model")}


def _places(manifest: dict) -> set:
    """Where the weights of an export were loaded from: its model (a checkpoint folder or a hub id) and the
    folders of the checkpoint stamps it recorded. Two folders holding the same weights share one export: it
    is superseded only when every place known to hold its weights holds others now."""
    stamps = manifest.get("checkpoints")
    paths = {s.get("path") for s in stamps if isinstance(s, dict)} if isinstance(stamps, list) else {None}
    return {manifest.get("model")} | paths


def _delete(trash: Path) -> None:
    shutil.rmtree(trash, ignore_errors=True)  # never follows a symlink (fd-based on Linux)


def _entries(parent: Path) -> list[os.DirEntry]:
    try:
        return sorted(os.scandir(parent), key=lambda e: e.name)
    except OSError:
        return []


def remove_leftovers(parent: Path) -> list[str]:
    """Delete what removals killed midway left in `parent` (TRASH folders of this user that nobody else may
    write; a symlink or another user's folder of that name is left alone): the names deleted."""
    gone = []
    for entry in _entries(parent):
        if entry.name.startswith(TRASH) and _ours(Path(entry.path)):
            _delete(Path(entry.path))
            gone.append(entry.name)
    return gone


def remove_superseded(folder: Path, manifest: dict) -> list[tuple[str, int]]:
    """Delete the folders beside `folder` that its complete export superseded (see the module's docstring):
    [(name, bytes)] of those deleted. Failures leave them for a later export."""
    parent = folder.parent
    removed = []
    remove_leftovers(parent)
    for entry in _entries(parent):
        path = Path(entry.path)
        if entry.name == folder.name or entry.name.startswith(".") or not superseded(path, manifest):
            continue
        lock = lock_in_use(path, exclusive=True)
        if lock is None:
            log.info("not removing the superseded export %s: a running process uses it", path)
            continue
        try:
            size = tree_bytes(path)
            trash = parent / f"{TRASH}{entry.name}-{uuid.uuid4().hex[:8]}"
            os.rename(path, trash)
            _delete(trash)
        except OSError as exc:
            log.info("could not remove the superseded export %s: %s", path, exc.strerror or exc)
            continue
        finally:
            lock.close()
        removed.append((entry.name, size))
    return removed


def remove_stale_files(folder: Path, manifest: dict, before_ns: int) -> list[str]:
    """Tower files in `folder` its manifest no longer lists, left by an export of an older export version
    (and their compiled graphs), when last written before `before_ns` (the moment the old manifest was read:
    a tower another process writes now is newer). No lock is held (there is no manifest lock: records.py locks
    only a first write's check of model.json): that mtime rule is what spares another process's newer tower."""
    removed = []
    for key, name in FILES.items():
        path = folder / name
        if key in manifest.get("files", {}):
            continue
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and st.st_mtime_ns < before_ns:
            try:
                path.unlink()
            except OSError:
                continue
            removed.append(name)
            graphs = folder / OPENVINO_CACHE / path.stem
            if graphs.is_dir() and not graphs.is_symlink():
                _delete(graphs)
    return removed
