"""What an index holds, as typed records: the one reader and the one writer of the catalog's `meta` table.

The table holds one JSON value per key, the format every alignsearch has written (an index written by an
older one reads the same); the keys are named here only. Everyone else reads an IndexState (`read`) and
writes fields of it by name (`write`), so a key cannot be misspelt, read with the wrong default, or written
half by one module and half by another.

Values that other modules own and interpret whole (the ANN tuning, the tagging runs, the last run's encoder
plan) stay JSON objects here. Reading copies them: a caller may change what it was given.

No SQLAlchemy import: `conn` is a SQLAlchemy Connection (its exec_driver_sql), and `peek` reads with the
sqlite3 module alone, for callers that run before SQLAlchemy is imported (through the same read-only URI as
catalog.open_readonly: paths.readonly_uri).
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from alignsearch.errors import IndexDamagedError
from alignsearch.storage.paths import LISTS_SUFFIX, readonly_uri


@dataclass(frozen=True)
class ModelIdentity:
    """The model that encoded the index's vectors (`model`): what finds and checks it at query time."""

    name: str  # a hub id, or the folder it was loaded from (absolute: --model gives its new place)
    fingerprint: str
    dim: int
    content_digest: str | None = None  # every weight and the tokenizer: the ONNX cache's key
    # the whole record as encoders.encoding.describe_model wrote it (preprocessing, token limit): what the
    # encoders read; the fields above are the ones the index itself relies on
    record: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> ModelIdentity:
        return cls(name=record["model"], fingerprint=record["fingerprint"], dim=int(record["dim"]),
                   content_digest=record.get("content_digest"), record=dict(record))

    def to_record(self) -> dict:
        out = {**self.record, "model": self.name, "fingerprint": self.fingerprint, "dim": self.dim}
        if self.content_digest is not None or "content_digest" in self.record:
            out["content_digest"] = self.content_digest
        return out


@dataclass(frozen=True)
class VectorState:
    """The vector store as last committed (alignsearch/storage/vectors.py)."""

    rows: int = 0  # committed rows of vectors.f16
    segments: tuple[tuple[int, str, int], ...] = ()  # (number, name, committed rows) of the other segments


@dataclass(frozen=True)
class AnnState:
    """The ANN index as last published (indexer/build.py)."""

    digest: str | None = None  # SHA-256 of index.faiss (readers accept only these bytes); None: other layouts
    files: Mapping[str, str] = field(default_factory=dict)  # digest of each file of the sharded or on-disk layouts
    trained_n: int = 0  # vectors when its quantizer was trained
    tuning: Mapping[str, Any] = field(default_factory=dict)  # nprobe, rerank_factor, recall, target, n (tune.py)
    ondisk_shards: int = 0  # the layouts chosen (remembered)
    index_shards: int = 0

    @property
    def lists_name(self) -> str | None:
        """The on-disk layout's lists file among `files`, if any (its presence is what marks that layout)."""
        return next((name for name in self.files if name.endswith(LISTS_SUFFIX)), None)


@dataclass(frozen=True)
class RootsState:
    """The index's roots and what each run remembers of them (indexer/roots.py)."""

    roots: tuple[str, ...] = ()
    options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # include_hidden, caption_column...
    list_columns: Mapping[str, str] = field(default_factory=dict)  # a list root's column of paths
    listing_errors: Mapping[str, list] = field(default_factory=dict)  # root: [{"folder", "reason"}] of the last run


@dataclass(frozen=True)
class IndexRun:
    """An `index` run in progress, or one that was stopped (removed when a run ends)."""

    started: float
    pid: int


@dataclass(frozen=True)
class Reindex:
    """A re-encode in progress (indexer/reindex.py): the new model, the segment its vectors go to."""

    model: ModelIdentity
    segment: str
    rows: int = 0  # committed rows of that segment
    done: int = 0  # files re-encoded


@dataclass(frozen=True)
class IndexState:
    """Everything the meta table says about an index; a field's default is what an index without it means."""

    schema_version: int | None = None  # None: a new catalog (alignsearch/storage/migrate.py)
    index_id: str | None = None  # random, given at creation; servers prove it to clients
    model: ModelIdentity | None = None  # None: nothing encoded yet
    generation: int = 0  # raised by each re-encode's switch: readers re-open their snapshot
    vectors: VectorState = VectorState()
    ann: AnnState = AnnState()
    roots: RootsState = RootsState()
    videos: bool = False  # a video was indexed once: readers cap the moments of one video
    ocr: bool = False  # `index --ocr`, remembered
    keys_lossless: bool = False  # every files.relpath is sources.catalog_key of its name (catalog.upgrade_keys_lossless)
    encoder: Mapping[str, Any] | None = None  # the plan the last finished run encoded with (`info`)
    tagging: Mapping[str, Any] | None = None  # the tagging runs to repeat on new images (indexer/tag.py)
    index_run: IndexRun | None = None
    reindex: Reindex | None = None


# IndexState's field: the meta keys it is stored under. A key never listed here is kept as it is.
KEYS = {
    "schema_version": ("schema_version",),
    "index_id": ("index_id",),
    "model": ("model",),
    "generation": ("generation",),
    "vectors": ("vector_rows", "vector_segments"),
    "ann": ("ann_digest", "ann_files", "index_trained_n", "tuning", "ondisk_shards", "index_shards"),
    "roots": ("roots", "root_options", "list_columns", "listing_errors"),
    "videos": ("videos",),
    "ocr": ("ocr",),
    "keys_lossless": ("keys_lossless",),
    "encoder": ("encoder",),
    "tagging": ("tagging",),
    "index_run": ("index_run",),
    "reindex": ("reindex",),
}


class MetaDamagedError(IndexDamagedError, ValueError):
    """A meta value no alignsearch wrote (not JSON, or not what its key holds): a damaged catalog, said in one
    line with exit 7, where it was an "unexpected ValueError" (or TypeError, OverflowError) of every command.
    A ValueError too: the callers that read an unreadable catalog as none (peek, migrate.reader_schema) still do."""

    def __init__(self, key: str | None, exc: Exception):
        where = f"the value of {key!r}" if key else "a value"
        super().__init__(f"catalog.db is damaged: {where} in its meta table is not what alignsearch writes "
                         f"({type(exc).__name__}: {exc}); restore the index from a backup, or index the folders "
                         "again into a new index")


def decode(rows: Iterable[tuple[str, str]]) -> IndexState:
    """The state the meta rows (key, JSON text) describe; absent keys read as IndexState's defaults. A value
    that is not what its key holds raises MetaDamagedError."""
    raw = {}
    for key, text in rows:
        try:
            raw[key] = json.loads(text)
        except (ValueError, TypeError) as exc:
            raise MetaDamagedError(key, exc) from None
    try:
        return _decode(raw)
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as exc:
        raise MetaDamagedError(None, exc) from None


def _decode(raw: dict[str, Any]) -> IndexState:
    def got(key: str, default: Any = None) -> Any:
        value = raw.get(key)
        return default if value is None else value

    model = got("model")
    run = got("index_run")
    reindex = got("reindex")
    version = got("schema_version")
    return IndexState(
        schema_version=None if version is None else int(version),
        index_id=got("index_id"),
        model=None if model is None else ModelIdentity.from_record(model),
        generation=int(got("generation", 0)),
        vectors=VectorState(rows=int(got("vector_rows", 0)),
                            segments=tuple((int(n), str(name), int(r)) for n, name, r in got("vector_segments", []))),
        ann=AnnState(digest=got("ann_digest"), files=got("ann_files", {}), trained_n=int(got("index_trained_n", 0)),
                     tuning=got("tuning", {}), ondisk_shards=int(got("ondisk_shards", 0)),
                     index_shards=int(got("index_shards", 0))),
        roots=RootsState(roots=tuple(_listed(got("roots", []))), options=got("root_options", {}),
                         list_columns=got("list_columns", {}), listing_errors=got("listing_errors", {})),
        videos=bool(got("videos", False)),
        ocr=bool(got("ocr", False)),
        keys_lossless=bool(got("keys_lossless", False)),
        encoder=got("encoder"),
        tagging=got("tagging"),
        index_run=None if run is None else IndexRun(started=float(run["started"]), pid=int(run["pid"])),
        reindex=None if reindex is None else Reindex(model=ModelIdentity.from_record(reindex["model"]),
                                                     segment=reindex["segment"], rows=int(reindex["rows"]),
                                                     done=int(reindex["done"])),
    )


def _listed(value: Any) -> list:
    """A JSON list as stored; anything else is damage (a string's letters were read as roots, each scanned)."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"expected a list of names, found {type(value).__name__}")
    return value


def encode(name: str, value: Any) -> dict[str, Any]:
    """{meta key: JSON value, or None to delete the key} that store one IndexState field."""
    if name not in KEYS:
        raise TypeError(f"IndexState has no field {name!r}")
    if name == "model":
        return {"model": None if value is None else value.to_record()}
    if name == "vectors":
        return {"vector_rows": value.rows, "vector_segments": [list(s) for s in value.segments]}
    if name == "ann":
        # a null ann_digest is written, not deleted, as the builder always did
        return {"ann_digest": _Null if value.digest is None else value.digest, "ann_files": dict(value.files),
                "index_trained_n": value.trained_n, "tuning": dict(value.tuning),
                "ondisk_shards": value.ondisk_shards, "index_shards": value.index_shards}
    if name == "roots":
        return {"roots": list(value.roots), "root_options": dict(value.options),
                "list_columns": dict(value.list_columns), "listing_errors": dict(value.listing_errors)}
    if name == "index_run":
        return {"index_run": None if value is None else {"started": value.started, "pid": value.pid}}
    if name == "reindex":
        return {"reindex": None if value is None else {"model": value.model.to_record(), "segment": value.segment,
                                                       "rows": value.rows, "done": value.done}}
    return {KEYS[name][0]: value}


class _Null:
    """A JSON null to store (None deletes the key)."""


SELECT = "SELECT key, value FROM meta"


def read(conn, *fields: str) -> IndexState:
    """The index's state as this connection's transaction sees it (one query). conn: a SQLAlchemy Connection,
    or a sqlite3 one (a read-only connection being prepared: migrate.reader_schema). fields: read only these
    IndexState fields, the others holding their defaults (a search checks the generation: one row, not the
    tagging runs and tuning too)."""
    run = getattr(conn, "exec_driver_sql", None) or conn.execute
    if not fields:
        return decode(run(SELECT))
    unknown = [f for f in fields if f not in KEYS]
    if unknown:
        raise TypeError(f"IndexState has no field {unknown[0]!r}")
    keys = tuple(k for f in fields for k in KEYS[f])
    return decode(run(SELECT + f" WHERE key IN ({', '.join('?' * len(keys))})", keys))


def write(conn, **fields: Any) -> None:
    """Store these IndexState fields (by name, e.g. write(conn, generation=2, model=...)) in the caller's
    transaction; a field set to None is removed (it then reads as its default). A record field (ann, roots,
    vectors) is written whole: read it, dataclasses.replace what changes, write it back."""
    dataclasses.replace(IndexState(), **fields)  # an unknown name is a TypeError before anything is written
    for name, value in fields.items():
        for key, item in encode(name, value).items():
            if item is None:
                conn.exec_driver_sql("DELETE FROM meta WHERE key = ?", (key,))
            else:
                text = json.dumps(None if item is _Null else item)
                conn.exec_driver_sql("INSERT INTO meta (key, value) VALUES (?, ?) "
                                     "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, text))


def peek(db_path: Path, *fields: str) -> IndexState | None:
    """These fields of the state of the catalog at db_path (read(conn, *fields)), read with the sqlite3 module
    alone, for callers that must not wait for SQLAlchemy's import (the cold-start peek at the model, the
    client's check of a server's index id); None when it cannot be read. Opened as catalog.open_readonly
    opens it (paths.readonly_uri: nothing is written)."""
    try:
        db = Path(db_path).resolve()
        if not db.is_file():
            return None
        con = sqlite3.connect(readonly_uri(db), uri=True, timeout=0.5)
        try:
            return read(con, *fields)
        finally:
            con.close()
    except (sqlite3.Error, OSError, ValueError, TypeError, KeyError, AttributeError):
        return None
