"""Where an index lives: the file names inside it and how a command finds it. Light to import:
the CLI's route to a warm server needs nothing heavier."""

from __future__ import annotations

import os
from pathlib import Path

from alignsearch.errors import IndexNotFoundError

INDEX_DIRNAME = ".alignsearch"
DB_FILE, VECTORS_FILE, ANN_FILE = "catalog.db", "vectors.f16", "index.faiss"
SERVER_FILE = "server.json"  # written by a running `alignsearch serve`


def find_index_dir(start: str | os.PathLike | None = None) -> Path | None:
    """The nearest `.alignsearch` directory in start (default: cwd) or its parents, like `.git`."""
    here = Path(start or os.getcwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / INDEX_DIRNAME / DB_FILE).exists():
            return folder / INDEX_DIRNAME
    return None


def resolve_index_dir(index_dir: str | os.PathLike | None) -> Path:
    """An explicit directory, else $ALIGNSEARCH_INDEX, else the nearest `.alignsearch` in cwd or above."""
    chosen = index_dir or os.environ.get("ALIGNSEARCH_INDEX")
    if chosen:
        path = Path(chosen)
        if not (path / DB_FILE).exists():
            raise IndexNotFoundError(f"{path} is not an alignsearch index: run `alignsearch index ROOT --index {path}` first")
        return path
    found = find_index_dir()
    if found is None:
        raise IndexNotFoundError(
            f"no {INDEX_DIRNAME}/ index in {os.getcwd()} or its parents: run `alignsearch index FOLDER` "
            "first, or point --index / ALIGNSEARCH_INDEX at one"
        )
    return found
