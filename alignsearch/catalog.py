"""The catalog: one SQLite row per file, plus the index's metadata, through SQLAlchemy.

WAL mode lets queries read while an indexing run writes; a file's row and its vector row are
committed in one transaction together with the vector store's committed length.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
import uuid
from urllib.parse import quote
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from sqlalchemy import (
    Column,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    delete,
    event,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import QueuePool

from alignsearch import sources
from alignsearch.errors import BadInputError, IndexDamagedError

# 2: files.vec_row is a (segment, row) address (alignsearch/vectors.py). A version 1 index holds
# segment 0 addresses only, which read the same, so it is upgraded in place.
SCHEMA_VERSION = 2
INDEXED, FAILED = "indexed", "failed"

metadata = MetaData()

files = Table(
    "files",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("root", Text, nullable=False),
    Column("relpath", Text, nullable=False),  # for display; non-UTF-8 bytes shown as \xNN
    Column("relpath_raw", LargeBinary),  # the name's bytes, only when they are not UTF-8
    Column("size", Integer, nullable=False),
    Column("mtime", Float, nullable=False),
    Column("sha256", String(64)),
    Column("width", Integer),
    Column("height", Integer),
    Column("format", String(16)),
    Column("status", String(8), nullable=False),
    Column("reason", Text),
    Column("indexed_at", Float, nullable=False),
    Column("vec_row", Integer),  # address in the vector store (alignsearch/vectors.py); NULL for failed files
    UniqueConstraint("root", "relpath"),
    Index("files_sha256", "sha256"),
    sqlite_autoincrement=True,  # ids are never reused, so a stale FAISS id never names a new file
)

tags = Table(
    "tags",
    metadata,
    Column("file_id", Integer, primary_key=True),
    Column("label", Text, primary_key=True),
    Column("probability", Float, nullable=False),
    Index("tags_label", "label"),
)

# A checksum of every committed batch of vector rows: `alignsearch verify` (and each `index` run before it
# appends) re-hashes them, so a truncated, zero-filled or overwritten vector file is found, never served.
# segment: "" for vectors.f16, else the segment's name (alignsearch/vectors.py).
vector_chunks = Table(
    "vector_chunks",
    metadata,
    Column("segment", Text, primary_key=True),
    Column("start", Integer, primary_key=True),
    Column("rows", Integer, nullable=False),
    Column("digest", String(64), nullable=False),
)

# The re-encode in progress (`index --reindex`): the new generation's vector address of each file,
# committed batch by batch beside the live one, made live in one transaction when every file has one.
pending_vectors = Table(
    "pending_vectors",
    metadata,
    Column("file_id", Integer, primary_key=True),
    Column("vec_row", Integer, nullable=False),
)

# A perceptual hash (imagehash.phash, 64 bits as 16 hex digits, then "-" and a colour grid: dupes.py) per indexed file, for `alignsearch dupes
# --tier near` and collapsed results (alignsearch/dupes.py). Its own table: indexes written before it existed
# have none (readers treat that as empty) and the next `index` run fills it without re-encoding.
phashes = Table("phashes", metadata, Column("file_id", Integer, primary_key=True), Column("phash", String(16), nullable=False))

# What a photo says about itself (alignsearch/photometa.py), one row per indexed file: filled at index time,
# and for files indexed before it existed by the next run (headers only, nothing re-encoded).
photos = Table(
    "photos",
    metadata,
    Column("file_id", Integer, primary_key=True),
    Column("taken", Float),  # UTC epoch seconds
    Column("taken_source", String(32)),  # exif:DateTimeOriginal, exif:DateTimeDigitized, exif:DateTime, mtime
    Column("camera", Text),
    Column("lens", Text),
    Column("lat", Float),
    Column("lon", Float),
    Column("caption", Text),
)
KEYWORDS = "keywords"  # SQLite FTS5 over captions, file and folder names and tags; rowid = file id

meta = Table("meta", metadata, Column("key", String(64), primary_key=True), Column("value", Text, nullable=False))


@dataclass(frozen=True)
class FileRow:
    id: int
    root: str
    relpath: str
    relpath_raw: bytes | None
    size: int
    mtime: float
    sha256: str | None
    width: int | None
    height: int | None
    format: str | None
    status: str
    reason: str | None
    indexed_at: float
    vec_row: int | None

    @property
    def path(self) -> str:
        """The path or URL to show (sources.location); non-UTF-8 names come back as os.fsdecode gives them."""
        return sources.location(self.root, self.relpath, self.relpath_raw)

    def read(self) -> bytes:
        return sources.read_bytes(self.root, self.relpath, self.relpath_raw)


def connect(db_path: Path, readonly: bool = False) -> Engine:
    """The catalog's engine. A writer creates and upgrades it; a reader (readonly) writes nothing, so an
    index on a read-only mount or owned by another user can be queried. A file that is not a readable
    SQLite database raises IndexDamagedError (one line, exit 7) rather than a driver traceback."""
    if readonly:
        # A queue of connections, each used by one thread at a time: the default for a creator, a pool of
        # five thread-bound connections, closes connections other threads still use past five threads
        # (SQLite then crashes the process).
        engine = create_engine("sqlite://", creator=lambda: _open_readonly(Path(db_path)), poolclass=QueuePool,
                               pool_size=8, max_overflow=-1)
    else:
        # URL.create, not an f-string: a '?', '#' or '%20' in the folder's path is part of the file name, not a
        # query string (an f-string URL wrote the catalog to the path cut at '?' and reported success)
        engine = create_engine(URL.create("sqlite", database=str(db_path)))

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

    try:
        if readonly:
            _refuse_if_locked(Path(db_path))
            with engine.connect() as conn:
                _check_version(get_meta(conn, "schema_version"))
            return engine
        metadata.create_all(engine)
        with engine.begin() as conn:
            version = get_meta(conn, "schema_version")
            _check_version(version)
            if version != SCHEMA_VERSION:  # new, or version 1 (upgraded in place)
                set_meta(conn, "schema_version", SCHEMA_VERSION)
            conn.exec_driver_sql(f"CREATE VIRTUAL TABLE IF NOT EXISTS {KEYWORDS} USING fts5(body)")
            if get_meta(conn, "index_id") is None:  # names this index (a copy keeps it: see server records)
                set_meta(conn, "index_id", uuid.uuid4().hex)
    except DBAPIError as exc:
        engine.dispose()
        raise damaged(db_path, exc) from None
    return engine


def damaged(db_path, exc: Exception) -> IndexDamagedError:
    reason = str(getattr(exc, "orig", exc)).splitlines()[0]
    return IndexDamagedError(f"{Path(db_path).name} cannot be read ({reason}): run `alignsearch verify`")


def _check_version(version) -> None:
    if version not in (None, 1, SCHEMA_VERSION):
        raise IndexDamagedError(f"index schema version {version} is not supported by this alignsearch (it reads "
                                f"{SCHEMA_VERSION}): upgrade alignsearch")


def _open_readonly(db_path: Path):
    """A read-only connection that never creates or writes anything, even the WAL's shared-memory file
    when the folder is not writable (then SQLite reads the database as it stands on disk)."""
    uri = f"file:{quote(str(db_path.resolve()))}?mode=ro"
    if not os.access(db_path.parent, os.W_OK) and not (db_path.parent / (db_path.name + "-shm")).exists():
        uri += "&immutable=1"
    conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


LOCK_WAIT_SECONDS = 2.0  # a checkpoint or a commit holds the catalog for milliseconds; a writer in EXCLUSIVE mode for its run


def _refuse_if_locked(db_path: Path) -> None:
    """A reader in WAL mode never waits for a writer, unless one holds the catalog in SQLite's EXCLUSIVE
    locking mode: then it would wait out the 30 s busy timeout and blame damage. Waits LOCK_WAIT_SECONDS, then
    says who holds it (an alignsearch run holding the index's write.lock, or another program): BadInputError."""
    if not db_path.exists():
        return
    try:
        probe = _open_readonly(db_path)
    except sqlite3.Error:
        return  # reported by the caller's own read
    try:
        probe.execute(f"PRAGMA busy_timeout={int(LOCK_WAIT_SECONDS * 1000)}")
        probe.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.OperationalError as exc:
        if "locked" not in str(exc) and "busy" not in str(exc):
            return
        try:
            from indexer.lock import writer_running  # the write path's lock, probed read-only

            indexing = writer_running(db_path.parent)
        except (ImportError, OSError):
            indexing = False
        who = ("an alignsearch run writing this index (index, tag, tune or verify --repair) holds it" if indexing else
               "another program holds it locked (a sqlite3 shell or tool in EXCLUSIVE locking mode?)")
        raise BadInputError(f"{db_path.name} is locked: {who}; the index is not damaged: try again when it has "
                            "finished") from None
    except sqlite3.Error:
        return
    finally:
        probe.close()


def index_id(conn: Connection) -> str | None:
    """A random id given to the index when its catalog was created; servers prove it to clients."""
    return get_meta(conn, "index_id")


def get_meta(conn: Connection, key: str, default: Any = None) -> Any:
    value = conn.execute(select(meta.c.value).where(meta.c.key == key)).scalar()
    return default if value is None else json.loads(value)


def set_meta(conn: Connection, key: str, value: Any) -> None:
    text = json.dumps(value)
    if conn.execute(update(meta).where(meta.c.key == key).values(value=text)).rowcount == 0:
        conn.execute(insert(meta).values(key=key, value=text))


def _rows(result) -> list[FileRow]:
    return [FileRow(**row._mapping) for row in result]


def files_under(conn: Connection, root: str) -> dict[str, FileRow]:
    """Every catalogued file of one root, by relative path."""
    return {r.relpath: r for r in _rows(conn.execute(select(files).where(files.c.root == root)))}


def get_files(conn: Connection, ids: Iterable[int]) -> dict[int, FileRow]:
    ids = list(ids)
    out: dict[int, FileRow] = {}
    for start in range(0, len(ids), 500):  # SQLite caps bound parameters
        chunk = ids[start : start + 500]
        out.update({r.id: r for r in _rows(conn.execute(select(files).where(files.c.id.in_(chunk))))})
    return out


def failed_files(conn: Connection) -> list[FileRow]:
    return _rows(conn.execute(select(files).where(files.c.status == FAILED).order_by(files.c.root, files.c.relpath)))


def live_vectors(conn: Connection) -> Iterator[tuple[int, int]]:
    """(file id, vector row) of every indexed file, in id order."""
    query = select(files.c.id, files.c.vec_row).where(files.c.status == INDEXED).order_by(files.c.id)
    for file_id, vec_row in conn.execute(query):
        yield file_id, vec_row


def vectors_by_hash(conn: Connection, hashes: Iterable[str]) -> dict[str, int]:
    """Vector rows of already indexed content, by SHA-256: moved, renamed and duplicated files reuse them."""
    hashes = list(set(hashes))
    out: dict[str, int] = {}
    for start in range(0, len(hashes), 500):
        query = select(files.c.sha256, files.c.vec_row).where(
            files.c.sha256.in_(hashes[start : start + 500]), files.c.status == INDEXED
        )
        out.update({sha: row for sha, row in conn.execute(query)})
    return out


def counts(conn: Connection) -> dict[str, int]:
    found = {status: n for status, n in conn.execute(select(files.c.status, func.count()).group_by(files.c.status))}
    return {INDEXED: found.get(INDEXED, 0), FAILED: found.get(FAILED, 0)}


def upsert_file(conn: Connection, values: dict[str, Any]) -> int:
    """Insert or replace the row of (root, relpath). A replaced file gets a new id, so the ANN
    index never confuses its old vector with its new one."""
    where = (files.c.root == values["root"], files.c.relpath == values["relpath"])
    forget_extras(conn, [i for (i,) in conn.execute(select(files.c.id).where(*where))])
    conn.execute(delete(files).where(*where))
    values = {"indexed_at": time.time(), **values}
    return int(conn.execute(insert(files).values(**values)).inserted_primary_key[0])


def replace_tags(conn: Connection, rows: list[dict], labels: Iterable[str] | None = None) -> None:
    """Forget the tags of `labels` (case-insensitively; every tag when None) and store these ({file_id, label,
    probability}); one transaction with the caller's."""
    if labels is None:
        conn.execute(delete(tags))
    else:
        lowered = sorted({label.lower() for label in labels})
        for start in range(0, len(lowered), 500):
            conn.execute(delete(tags).where(func.lower(tags.c.label).in_(lowered[start : start + 500])))
    for start in range(0, len(rows), 10_000):
        conn.execute(insert(tags), rows[start : start + 10_000])


def ids_with_tag(conn: Connection, label: str) -> list[int]:
    query = select(tags.c.file_id).join(files, files.c.id == tags.c.file_id).where(
        func.lower(tags.c.label) == label.lower(), files.c.status == INDEXED
    )
    return [i for (i,) in conn.execute(query)]


def tags_of(conn: Connection, file_id: int) -> list[tuple[str, float]]:
    query = select(tags.c.label, tags.c.probability).where(tags.c.file_id == file_id).order_by(tags.c.probability.desc())
    return [(label, p) for label, p in conn.execute(query)]


def delete_meta(conn: Connection, key: str) -> None:
    conn.execute(delete(meta).where(meta.c.key == key))


def delete_all_files(conn: Connection) -> None:
    conn.execute(delete(files))


def delete_files(conn: Connection, ids: Iterable[int]) -> None:
    ids = list(ids)
    forget_extras(conn, ids)
    for start in range(0, len(ids), 500):
        conn.execute(delete(files).where(files.c.id.in_(ids[start : start + 500])))


def readdress(conn: Connection, low: int, high: int, shift: int) -> None:
    """Add `shift` to every vector address in [low, high): a segment's rows moved elsewhere."""
    conn.execute(update(files).where(files.c.vec_row >= low, files.c.vec_row < high).values(vec_row=files.c.vec_row + shift))


def indexed_files(conn: Connection) -> list[FileRow]:
    """Every indexed file's row, in id order."""
    return _rows(conn.execute(select(files).where(files.c.status == INDEXED).order_by(files.c.id)))



def integrity_problems(db_path: Path) -> list[str]:
    """SQLite's own integrity check of the catalog (every page and index), read-only; [] when sound."""
    try:
        db = connect(db_path, readonly=True)
    except IndexDamagedError as exc:
        return [str(exc).split(": run")[0]]
    try:
        with db.connect() as conn:
            found = [row[0] for row in conn.exec_driver_sql("PRAGMA integrity_check(20)")]
    except DBAPIError as exc:
        found = [str(exc.orig).splitlines()[0]]
    finally:
        db.dispose()
    return [] if found == ["ok"] else [f"{Path(db_path).name} is damaged: {'; '.join(found[:3])}"]


# -- perceptual hashes (alignsearch/dupes.py) ---------------------------------------------------------------

def has_phashes(conn: Connection) -> bool:
    """Whether the catalog has the phashes table (an index written before it existed has none)."""
    from sqlalchemy import inspect

    return inspect(conn).has_table(phashes.name)


def set_phashes(conn: Connection, rows: Iterable[tuple[int, str]]) -> None:
    """Store (file id, phash hex) pairs, replacing what those files had."""
    rows = [{"file_id": int(i), "phash": h} for i, h in rows]
    for start in range(0, len(rows), 500):
        chunk = rows[start : start + 500]
        conn.execute(delete(phashes).where(phashes.c.file_id.in_([r["file_id"] for r in chunk])))
        conn.execute(insert(phashes), chunk)


def phashes_of(conn: Connection, ids: Iterable[int] | None = None) -> dict[int, str]:
    """phash hex by file id, of indexed files (all of them when ids is None); {} when the table is absent."""
    if not has_phashes(conn):
        return {}
    query = select(phashes.c.file_id, phashes.c.phash).join(files, files.c.id == phashes.c.file_id).where(
        files.c.status == INDEXED)
    if ids is None:
        return {i: h for i, h in conn.execute(query)}
    ids = list(ids)
    out: dict[int, str] = {}
    for start in range(0, len(ids), 500):
        out.update({i: h for i, h in conn.execute(query.where(phashes.c.file_id.in_(ids[start : start + 500])))})
    return out


def files_without_phash(conn: Connection, after: int = 0, limit: int = 256) -> list[FileRow]:
    """Indexed files with no phash yet, id > after, in id order (at most limit)."""
    query = select(files).outerjoin(phashes, phashes.c.file_id == files.c.id).where(
        files.c.status == INDEXED, phashes.c.file_id.is_(None), files.c.id > after).order_by(files.c.id).limit(limit)
    return _rows(conn.execute(query))


def forget_stale_phashes(conn: Connection) -> int:
    """Drop the phashes of files no longer in the catalog (replaced files get new ids)."""
    gone = select(files.c.id).where(files.c.id == phashes.c.file_id).exists()
    return conn.execute(delete(phashes).where(~gone)).rowcount


def indexed_after(conn: Connection, after: int, limit: int) -> list[FileRow]:
    """Indexed files with id > after, in id order (at most limit): a scan in bounded pages."""
    query = select(files).where(files.c.status == INDEXED, files.c.id > after).order_by(files.c.id).limit(limit)
    return _rows(conn.execute(query))


def duplicate_hashes(conn: Connection) -> list[list[int]]:
    """Ids of indexed files sharing one SHA-256, one list per content held more than once."""
    shared = select(files.c.sha256).where(files.c.status == INDEXED, files.c.sha256.is_not(None)).group_by(
        files.c.sha256).having(func.count() > 1).subquery()
    query = select(files.c.sha256, files.c.id).where(files.c.status == INDEXED,
                                                    files.c.sha256.in_(select(shared.c.sha256))).order_by(
        files.c.sha256, files.c.id)
    groups: dict[str, list[int]] = {}
    for sha, i in conn.execute(query):
        groups.setdefault(sha, []).append(i)
    return list(groups.values())


def forget_extras(conn: Connection, ids: list[int]) -> None:
    """Drop what hangs off files that leave the catalog (their photo fields and keywords)."""
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        conn.execute(delete(photos).where(photos.c.file_id.in_(chunk)))
        if has_keywords(conn):
            conn.exec_driver_sql(f"DELETE FROM {KEYWORDS} WHERE rowid IN ({','.join(str(int(i)) for i in chunk)})")


def has_keywords(conn: Connection) -> bool:
    return _has_table(conn, KEYWORDS)


def has_photos(conn: Connection) -> bool:
    return _has_table(conn, photos.name)


def _has_table(conn: Connection, name: str) -> bool:
    # sqlite_master directly: SQLAlchemy's inspector costs a millisecond per call, once per query
    return conn.exec_driver_sql("SELECT 1 FROM sqlite_master WHERE name = ?", (name,)).first() is not None


def keyword_text(relpath: str, caption: str | None, labels: Iterable[str] = ()) -> str:
    """What the keyword index holds for a file: its caption, the words of its folders and name, its tags."""
    words = relpath.replace("\\", "/").rsplit(".", 1)[0]
    for sep in "/_-.":
        words = words.replace(sep, " ")
    return " ".join(p for p in (caption, words, " ".join(labels)) if p)


def set_photo(conn: Connection, file_id: int, relpath: str, fields: dict, labels: Iterable[str] = ()) -> None:
    """Store a file's photo fields and its keyword text (one transaction with the caller's)."""
    conn.execute(delete(photos).where(photos.c.file_id == file_id))
    conn.execute(insert(photos).values(file_id=file_id, **{k: fields.get(k) for k in PHOTO_FIELDS}))
    conn.exec_driver_sql(f"DELETE FROM {KEYWORDS} WHERE rowid = ?", (int(file_id),))
    conn.exec_driver_sql(f"INSERT INTO {KEYWORDS}(rowid, body) VALUES (?, ?)",
                         (int(file_id), keyword_text(relpath, fields.get("caption"), labels)))


PHOTO_FIELDS = ("taken", "taken_source", "camera", "lens", "lat", "lon", "caption")


def files_without_photo(conn: Connection, after: int = 0, limit: int = 256) -> list[FileRow]:
    """Indexed files with no photo fields yet (indexed before they existed), id > after, in id order."""
    query = select(files).outerjoin(photos, photos.c.file_id == files.c.id).where(
        files.c.status == INDEXED, photos.c.file_id.is_(None), files.c.id > after).order_by(files.c.id).limit(limit)
    return _rows(conn.execute(query))


def refresh_keywords(conn: Connection, ids: Iterable[int] | None = None) -> None:
    """Re-write the keyword text of files (all when ids is None) from their caption, path and tags."""
    query = select(files.c.id, files.c.relpath, photos.c.caption).join(photos, photos.c.file_id == files.c.id).where(
        files.c.status == INDEXED)
    if ids is not None:
        query = query.where(files.c.id.in_(list(ids)))
    labels: dict[int, list[str]] = {}
    for file_id, label in conn.execute(select(tags.c.file_id, tags.c.label)):
        labels.setdefault(file_id, []).append(label)
    rows = conn.execute(query).all()
    for file_id, relpath, caption in rows:
        conn.exec_driver_sql(f"DELETE FROM {KEYWORDS} WHERE rowid = ?", (int(file_id),))
        conn.exec_driver_sql(f"INSERT INTO {KEYWORDS}(rowid, body) VALUES (?, ?)",
                             (int(file_id), keyword_text(relpath, caption, labels.get(file_id, ()))))


def keyword_search(conn: Connection, words: list[str], limit: int) -> list[tuple[int, float]]:
    """(file id, bm25 score: lower is better) of indexed files whose keyword text holds any of the words,
    best first. Each word is quoted for FTS5, so user text is never query syntax."""
    if not words or not has_keywords(conn):
        return []
    match = " OR ".join('"' + w.replace('"', '""') + '"' for w in words)
    sql = (f"SELECT k.rowid, bm25({KEYWORDS}) AS score FROM {KEYWORDS} k JOIN files f ON f.id = k.rowid "
           f"WHERE {KEYWORDS} MATCH ? AND f.status = 'indexed' ORDER BY score LIMIT ?")
    return [(int(i), float(s)) for i, s in conn.exec_driver_sql(sql, (match, int(limit)))]


def file_at(conn: Connection, root: str, relpath: str) -> FileRow | None:
    """The indexed file at (root, relpath), or None."""
    found = _rows(conn.execute(select(files).where(files.c.root == root, files.c.relpath == relpath,
                                                   files.c.status == INDEXED)))
    return found[0] if found else None


def photos_of(conn: Connection, ids: Iterable[int]) -> dict[int, dict]:
    """{file id: its photo fields} ({} for an index written before they existed)."""
    if not has_photos(conn):
        return {}
    ids, out = list(ids), {}
    for start in range(0, len(ids), 500):
        query = select(photos).where(photos.c.file_id.in_(ids[start : start + 500]))
        out.update({row.file_id: dict(row._mapping) for row in conn.execute(query)})
    return out


def labels_of(conn: Connection, ids: Iterable[int]) -> dict[int, list[str]]:
    """{file id: its tag labels, most probable first}."""
    ids, out = list(ids), {}
    for start in range(0, len(ids), 500):
        query = select(tags.c.file_id, tags.c.label).where(tags.c.file_id.in_(ids[start : start + 500])).order_by(
            tags.c.probability.desc())
        for file_id, label in conn.execute(query):
            out.setdefault(file_id, []).append(label)
    return out


def addresses_of(conn: Connection, ids: Iterable[int]) -> dict[int, int]:
    """{file id: vector address} of the indexed files among ids (what ranking needs, without whole rows).
    Plain SQL with bound integers: on the query path SQLAlchemy's compilation of an IN list costs more
    than the query itself."""
    ids, out = [int(i) for i in ids], {}
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        sql = (f"SELECT id, vec_row FROM files WHERE status = '{INDEXED}' AND vec_row IS NOT NULL "
               f"AND id IN ({','.join('?' * len(chunk))})")
        out.update(dict(conn.exec_driver_sql(sql, tuple(chunk)).all()))
    return out


def tag_counts(conn: Connection) -> list[tuple[str, int]]:
    """[(label, indexed images tagged with it)], most used first."""
    n = func.count(tags.c.file_id)
    query = (select(tags.c.label, n).join(files, files.c.id == tags.c.file_id).where(files.c.status == INDEXED)
             .group_by(tags.c.label).order_by(n.desc(), tags.c.label))
    return [(label, int(count)) for label, count in conn.execute(query)]
