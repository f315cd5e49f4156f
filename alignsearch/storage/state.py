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
from typing import Any, Callable, Iterable, Mapping

from alignsearch.errors import IndexDamagedError
from alignsearch.storage import metaseal
from alignsearch.storage.paths import LISTS_SUFFIX, own_entry, readonly_uri, same_entry, side_file_problems, untrusted_index


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
    options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # include_hidden, caption_column, device...
    list_columns: Mapping[str, str] = field(default_factory=dict)  # a list root's column of paths
    listing_errors: Mapping[str, list] = field(default_factory=dict)  # root: [{"folder", "reason"}] of the last run

    def unlisted(self) -> list[dict]:
        """Folders the last run could not list (their rows were kept): [{root, folder, reason}], in root order."""
        return [{"root": root, **e} for root in self.roots for e in self.listing_errors.get(root, [])]


@dataclass(frozen=True)
class IndexRun:
    """An `index` run in progress, or one that was stopped (removed when a run ends)."""

    started: float
    pid: int
    # begun after a stopped run: the first file id it may commit (ids are never reused), so every reader, opened
    # before or after it began, searches the files below it the ANN index lacks (engine Snapshot.pending); None: none
    pending_below: int | None = None


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
    # raised wherever stored vectors change address or files go (a re-encode's switch, a compaction, a fold of
    # small segments): readers re-open their snapshot
    generation: int = 0
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


# what to do about damage of the meta table: nothing else holds a second copy of it to mend it from
RESTORE = "restore the index from a backup, or index the folders again into a new index"


class MetaDamagedError(IndexDamagedError, ValueError):
    """A meta value no alignsearch wrote (not JSON, or not what its key holds): a damaged catalog, said in one
    line with exit 7, where it was an "unexpected ValueError" (or TypeError, OverflowError) of every command.
    A ValueError too: the callers that read an unreadable catalog as none (peek, migrate.reader_schema) still do."""

    def __init__(self, key: str, exc: Exception):
        super().__init__(f"catalog.db is damaged: the value of {key!r} in its meta table is not what alignsearch writes "
                         f"({type(exc).__name__}: {exc}); {RESTORE}")


def decode(rows: Iterable[tuple[str, str]]) -> IndexState:
    """The state the meta rows (key, JSON text) describe; absent keys read as IndexState's defaults. A value
    that is not what its key holds raises MetaDamagedError."""
    raw = {}
    for key, text in rows:
        try:
            raw[key] = json.loads(text)
        except (ValueError, TypeError) as exc:
            raise MetaDamagedError(key, exc) from None
    return _decode(raw)


def _decode(raw: dict[str, Any]) -> IndexState:
    def got(key: str, default: Any = None, convert: Callable[[Any], Any] | None = None) -> Any:
        """The value of `key` as its field holds it (default when absent); MetaDamagedError naming the key when
        it is not what alignsearch writes there."""
        value = raw.get(key)
        if value is None:
            return default
        try:
            return value if convert is None else convert(value)
        except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as exc:
            raise MetaDamagedError(key, exc) from None

    version = got("schema_version", None, int)
    # from schema 15 every model record holds its digest (metaseal); None: no version read, which a catalog at
    # LATEST never lacks (a flipped key there must not excuse a record from its check)
    sealed = version is None or version >= metaseal.SEALED

    def model(value: Any) -> ModelIdentity:
        return ModelIdentity.from_record(metaseal.opened(value, sealed))

    return IndexState(
        schema_version=version,
        index_id=got("index_id"),
        model=got("model", None, model),
        generation=got("generation", 0, int),
        vectors=VectorState(rows=got("vector_rows", 0, int), segments=got("vector_segments", (), _segments)),
        ann=AnnState(digest=got("ann_digest"), files=got("ann_files", {}, _names_to_text),
                     trained_n=got("index_trained_n", 0, int), tuning=got("tuning", {}, _tuning),
                     ondisk_shards=got("ondisk_shards", 0, int), index_shards=got("index_shards", 0, int)),
        roots=RootsState(roots=tuple(got("roots", [], _listed)), options=got("root_options", {}, _root_options),
                         list_columns=got("list_columns", {}, _names_to_text),
                         listing_errors=got("listing_errors", {}, _listing_errors)),
        videos=got("videos", False, bool),
        ocr=got("ocr", False, bool),
        keys_lossless=got("keys_lossless", False, bool),
        encoder=got("encoder", None, _object),
        tagging=got("tagging", None, _tagging),
        index_run=got("index_run", None, _index_run),
        reindex=got("reindex", None, lambda value: _reindex(value, model)),
    )


def _index_run(run) -> IndexRun:
    below = run.get("pending_below")
    return IndexRun(started=float(run["started"]), pid=int(run["pid"]), pending_below=None if below is None else int(below))


# The shapes of the values other modules interpret whole: checked here, so that damage is said once, naming
# its key, rather than failing wherever the value is used (or read as something else: a string's letters).

def _listed(value: Any) -> list:
    """A JSON list as stored; anything else is damage (a string's letters were read as roots, each scanned)."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"expected a list of names, found {type(value).__name__}")
    return value


def _object(value: Any) -> dict:
    if not isinstance(value, dict):
        raise TypeError(f"expected an object, found {type(value).__name__}")
    return value


def _number(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _names_to_text(value: Any) -> dict:
    """{name: text}: the digest of each ANN file, a list root's column of paths."""
    if not all(isinstance(v, str) for v in _object(value).values()):
        raise TypeError("expected an object of texts")
    return value


def _segments(value: Any) -> tuple:
    return tuple((int(n), str(name), int(rows)) for n, name, rows in value)


TUNING_NUMBERS = ("nprobe", "rerank_factor", "recall", "target", "n")  # indexer/tune.py, indexer/build.py


def _tuning(value: Any) -> dict:
    tuning = _object(value)
    if not all(_number(tuning.get(key)) for key in TUNING_NUMBERS):
        raise TypeError(f"expected numbers for {', '.join(TUNING_NUMBERS)}")
    return value


# indexer/job.py; "device": a local folder root's st_dev when it last listed with entries, "mounts": {folder: st_dev}
# of the folders inside it on another device, "listed": when its last whole listing started, "unread": {folder: time}
# of the folders that listing could not list (indexer/roots.py)
ROOT_OPTIONS = {"include_hidden": bool, "caption_column": str, "video_interval": (int, float), "device": int,
                "mounts": dict, "listed": (int, float), "unread": dict}


def _root_options(value: Any) -> dict:
    """{root: {option: value}}."""
    for options in map(_object, _object(value).values()):
        for name, kind in ROOT_OPTIONS.items():
            if options.get(name) is not None and not isinstance(options[name], kind):
                raise TypeError(f"expected {name} to be {kind}, found {type(options[name]).__name__}")
        if not all(isinstance(d, int) and not isinstance(d, bool) for d in options.get("mounts", {}).values()):
            raise TypeError("expected mounts to map folders to devices")
    return value


def _listing_errors(value: Any) -> dict:
    """{root: [{"folder", "reason"}]}."""
    for errors in _object(value).values():
        if not isinstance(errors, list):
            raise TypeError(f"expected a list of folders, found {type(errors).__name__}")
        for error in errors:
            _object(error)  # {"folder", "reason"}, spread into what `roots` and `index` print
    return value


def unrecorded_model(st: IndexState, indexed: int, ann_present: bool) -> str | None:
    """Why an index whose meta table records no model is damaged, not new: it holds indexed rows, vector rows or an
    ANN index, which no run writes before it records its model (indexer/job.py records it first). A flipped byte of
    the key `model` read as no model, and every command said "holds no indexed images yet" (exit 3, the user's to
    mend by indexing). None: nothing was encoded, so the index is really new."""
    if st.model is not None:
        return None
    held = [f"{indexed} indexed images"] * (indexed > 0) + [f"{st.vectors.rows} vector rows"] * (st.vectors.rows > 0) \
        + ["an ANN index"] * (ann_present or st.ann.digest is not None)
    if not held:
        return None
    return f"catalog.db is damaged: its meta table records no model, yet the index holds {' and '.join(held)}"



def runs_of(tagging: Mapping[str, Any] | None) -> list[dict]:
    """The remembered tagging runs ({labels, templates, threshold, top}); an index tagged before runs accumulated
    holds one run as the meta itself."""
    if not tagging:
        return []
    return list(tagging["runs"]) if "runs" in tagging else [dict(tagging)]


def _tagging(value: Any) -> dict:
    """{"runs": [run], "background": [prompt]}, or (tagged before runs accumulated) one run itself; a run is
    {"labels": [label], "templates", "threshold", "top"} (indexer/tag.py)."""
    tagging = _object(value)
    runs = tagging["runs"] if "runs" in tagging else [tagging]
    if not isinstance(runs, list):
        raise TypeError(f"expected a list of runs, found {type(runs).__name__}")
    for run in runs:
        labels = _object(run).get("labels")
        if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
            raise TypeError("expected each run's labels to be a list of texts")
        if not (_number(run.get("threshold")) and _number(run.get("top"))):
            raise TypeError("expected each run's threshold and top to be numbers")
    return value


def _reindex(value: Any, model: Callable[[Any], ModelIdentity]) -> Reindex:
    return Reindex(model=model(value["model"]), segment=value["segment"], rows=int(value["rows"]),
                   done=int(value["done"]))


def encode(name: str, value: Any) -> dict[str, Any]:
    """{meta key: JSON value, or None to delete the key} that store one IndexState field."""
    if name not in KEYS:
        raise TypeError(f"IndexState has no field {name!r}")
    if name == "model":
        return {"model": None if value is None else metaseal.sealed(value.to_record())}
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
        if value is None:
            return {"index_run": None}
        below = {} if value.pending_below is None else {"pending_below": value.pending_below}
        return {"index_run": {"started": value.started, "pid": value.pid, **below}}
    if name == "reindex":
        return {"reindex": None if value is None else {"model": metaseal.sealed(value.model.to_record()),
                                                       "segment": value.segment,
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
    if {"model", "reindex"} & set(fields) and "schema_version" not in fields:
        keys += KEYS["schema_version"]  # whether a model record must hold its digest (metaseal.SEALED)
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
    client's check of a server's index id); None when it cannot be read, or when another user could have put it
    there (paths.untrusted_index, which catalog.connect asks too: a planted catalog was read here, its index id
    taken for this index's). Opened as catalog.open_readonly opens it (paths.readonly_uri: nothing is written)."""
    try:
        if untrusted_index(Path(db_path).parent, writing=False) is not None:
            return None
        judged = own_entry(db_path)  # not a link nor a FIFO (catalog.connect judges it so too)
        db = Path(db_path).resolve()
        if not db.is_file() or side_file_problems(db):  # SQLite's open of a FIFO at catalog.db-journal hung
            return None
        con = sqlite3.connect(readonly_uri(db), uri=True, timeout=0.5)
        try:
            got = read(con, *fields)
        finally:
            con.close()
        same_entry(judged, db_path)
        return got
    except (sqlite3.Error, OSError, ValueError, TypeError, KeyError, AttributeError, IndexDamagedError):
        return None
