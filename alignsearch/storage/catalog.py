"""The catalog: one SQLite row per file, plus the index's metadata, through SQLAlchemy.

WAL mode lets queries read while an indexing run writes; a file's row and its vector row are
committed in one transaction together with the vector store's committed length.
"""

from __future__ import annotations

import base64
import errno
import itertools
import json
import operator
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

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
    and_,
    bindparam,
    case,
    create_engine,
    delete,
    event,
    func,
    insert,
    literal,
    or_,
    select,
    union,
    update,
)
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.exc import DBAPIError, DisconnectionError
from sqlalchemy.pool import QueuePool
from sqlalchemy.sql import CompoundSelect

from alignsearch import atomic
from alignsearch.media import sources
from alignsearch.storage import migrate, rowdigest, state
from alignsearch.storage.paths import (ANN_FILE, DB_FILE, VECTORS_FILE, own_entry, readonly_uri, same_entry,
                                      side_file_problems, untrusted_index)
from alignsearch.errors import AlignSearchError, BadInputError, CatalogBusyError, DiskFullError, IndexDamagedError, \
    IndexNotFoundError, IndexUntrustedError

if TYPE_CHECKING:
    import numpy as np

SCHEMA_VERSION = migrate.LATEST  # how each version came about: alignsearch/storage/migrate.py
V2_COLUMNS = migrate.V2_COLUMNS
INDEXED, FAILED = "indexed", "failed"

metadata = MetaData()

files = Table(
    "files",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("root", Text, nullable=False),
    Column("relpath", Text, nullable=False),  # the key, lossless (sources.catalog_key): \xNN, backslashes doubled
    Column("relpath_raw", LargeBinary),  # the name's bytes, only where relpath is not the name
    Column("size", Integer, nullable=False),
    Column("mtime", Float, nullable=False),
    Column("sha256", String(64)),
    Column("width", Integer),
    Column("height", Integer),
    Column("format", String(16)),
    Column("status", String(8), nullable=False),
    Column("reason", Text),
    Column("indexed_at", Float, nullable=False),
    Column("vec_row", Integer),  # address in the vector store (alignsearch/storage/vectors.py); NULL for failed files
    # A video's moments: 0, 1, 2... in time order, each with its own vector; t/t_end in seconds (NULL for photos,
    # which are moment 0). Moment 0 stands for the file where a file is counted once.
    Column("moment", Integer, nullable=False, server_default="0"),
    Column("t", Float),
    Column("t_end", Float),
    # rowdigest.digest of the shown fields (rowdigest.FILE_FIELDS), written in the statement that writes them (schema 14)
    Column("digest", String(16)),
    # rowdigest.seal of vec_row, which compaction moves outside the digest; readers that score by it check it (schema 17)
    Column("vec_seal", Integer),
    # rowdigest.field_seal of id, width, height, size, mtime (FILE_SEALED, under FILE_SEED; schema 24): the filter
    # columns read those of every indexed file, and check every row's in numpy (a digest a row was too slow there)
    Column("field_seal", Integer),
    UniqueConstraint("root", "relpath", "moment"),
    # (sha256, moment): a search reads the other rows holding each hit's content (onefile.py); on sha256 alone a hit
    # of a video walked every moment of that video in the index to find its own (migrate step 10)
    Index("files_sha256", "sha256", "moment"),
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
# segment: "" for vectors.f16, else the segment's name (alignsearch/storage/vectors.py).
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
# vec_seal: rowdigest.seal(vec_row), written with it (schema 19), over file_id too from schema 22
# (rowdigest.pending_seal), and checked at the switch, which moves it with the address into files.vec_seal, the file
# id's term taken off: sealed there anew, a flipped byte went live already sealed (another file's vector).
pending_vectors = Table(
    "pending_vectors",
    metadata,
    Column("file_id", Integer, primary_key=True),
    Column("vec_row", Integer, nullable=False),
    Column("vec_seal", Integer),
)

# A perceptual hash (imagehash.phash, 64 bits as 16 hex digits, then "-" and a colour grid: dupes.py) per indexed file, for `alignsearch dupes
# --tier near` and collapsed results (alignsearch/search/dupes.py). Its own table: indexes written before it existed
# have none (readers treat that as empty) and the next `index` run fills it without re-encoding.
phashes = Table("phashes", metadata, Column("file_id", Integer, primary_key=True), Column("phash", String(16), nullable=False))

# What a photo says about itself (alignsearch/media/photometa.py), one row per indexed file: filled at index time,
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
    Column("ocr", Text),  # the text read in the image (alignsearch/media/ocr.py): NULL not read, "" none found
    # rowdigest.digest of the fields above (rowdigest.PHOTO_FIELDS), from schema 14; with file_id from 21
    Column("digest", String(16)),
    # rowdigest.field_seal of file_id, taken, lat, lon (schema 23): the filter columns check every row's in numpy
    Column("field_seal", Integer),
)
# The indexed files a fill step (indexer/ocrfill.py, indexer/phashfill.py) could not read: its worker died
# twice over the file, or the file's pixels or text could not be made out. With the size and mtime the file had:
# the step skips it while its row still has them (a changed file gets a new row, and these rows go with the
# old one: forget_extras). A file that could not be opened (permissions, a disk away) is not recorded: the next
# run tries it again. From schema 4 (alignsearch/storage/migrate.py).
fill_failures = Table(
    "fill_failures",
    metadata,
    Column("file_id", Integer, primary_key=True),
    Column("step", String(16), primary_key=True),  # FILL_STEPS
    Column("size", Integer, nullable=False),
    Column("mtime", Float, nullable=False),
    Column("reason", Text, nullable=False),
    Column("failed_at", Float, nullable=False),
)
FILL_OCR, FILL_PHASH = "ocr", "phash"
FILL_STEPS = (FILL_OCR, FILL_PHASH)

# The rows whose name was a symbolic link when a folder listing indexed it, with the link's target as readlink gave
# it (schema 13). The listing stats through a link, so a link replaced by a copy of its target (the same size and
# time), a file replaced by a link to its copy, or a link pointed at another copy looked unchanged: no row changed,
# and a running server's recent listing (keyed on the rows' count and highest id) kept leaving the copy out, or
# listed a link as a file of its own. Recorded, each is a change of the name (indexer/scan.py diff): the row is
# indexed again and takes a new id. Only writers read it: a reader of an older catalog never asks.
links = Table(
    "links",
    metadata,
    Column("file_id", Integer, primary_key=True),
    Column("target", LargeBinary, nullable=False),
)

KEYWORDS = "keywords"  # SQLite FTS5 over captions, text in images, file and folder names and tags; rowid = file id
# FTS5's trigram tokenizer over the chunks of that text that hold a digit, so `4711` finds `INV4711A`
# (alignsearch/storage/keywords.py); substrings of 3+ characters, case-insensitive.
KEYWORDS_TRIGRAM = "keywords_trigram"

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
    moment: int = 0
    t: float | None = None  # a video moment's start and end, in seconds; None for photos
    t_end: float | None = None
    # rowdigest.digest of the shown fields as written (None from a catalog older than schema 14); check_rows compares
    digest: str | None = field(default=None, compare=False, repr=False)
    vec_seal: int | None = field(default=None, compare=False, repr=False)  # rowdigest.seal(vec_row) from schema 17
    field_seal: int | None = field(default=None, compare=False, repr=False)  # of FILE_SEALED, from schema 24

    @property
    def path(self) -> str:
        """The path or URL to show (sources.location); non-UTF-8 names come back as os.fsdecode gives them."""
        return sources.location(self.root, self.relpath, self.relpath_raw)

    @property
    def file(self) -> str:
        """The row's name, the same whatever root names it: its path, a list's `file://` entry as the local path
        it names. The file a row stands for where no other row shares its content (onefile.file_key, which
        resolves links where another row does)."""
        path = self.path
        if sources.kind(self.root) != sources.LIST:
            return path
        try:
            local = sources.file_path(path) if sources.is_url(path) else path
        except BadInputError:  # another host's: never indexed (refused when listed), a name of its own
            return path
        if not local:
            return path
        local = os.path.normpath(local)
        # normpath keeps two leading slashes (POSIX leaves `//` to the system; Linux reads it as `/`, as realpath
        # and dupes' key do): a list naming `//tmp/a.jpg` showed that file beside `/tmp/a.jpg` in a search
        return "/" + local.lstrip("/") if local.startswith("//") else local

    @property
    def shown_relpath(self) -> str:
        """The relative path to show: bytes that are not UTF-8 as \\xNN (the key also doubles backslashes)."""
        return sources.shown_name(self.relpath, self.relpath_raw)

    def read(self) -> bytes:
        """The bytes of the file this row describes: a local file whose size or mtime differ from the row's
        (replaced since the scan) is refused (safeopen.Changed), judged on the opened descriptor, so what
        is read from it is never stored under this row."""
        return sources.read_bytes(self.root, self.relpath, self.relpath_raw, expect=(self.size, self.mtime))


def shown_path(path: str) -> tuple[str, str | None]:
    """A path as JSON and parquet text can hold it: a name that is not UTF-8 (os.fsdecode's surrogates) with
    its bytes as \\xNN, and then those bytes whole in base64 (else None), as Hit.to_dict gives `path_b64`."""
    raw = os.fsencode(path)
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("utf-8", "backslashreplace"), base64.b64encode(raw).decode("ascii")
    return path, None


def refuse_untrusted(index_dir: Path, *, writing: bool) -> None:
    """IndexUntrustedError where another user could have put the index's files there (paths.untrusted_index): asked
    before the catalog opens (connect), and by a reader open for long each time it looks for a newer snapshot
    (Engine.refresh: a folder made writable by others after `serve` opened it)."""
    why = untrusted_index(index_dir, writing=writing)
    if why is not None:  # never read, whatever they hold
        # the remedy names no "it": the folder judged may be the index's parent (paths.untrusted_parent), not the index
        raise IndexUntrustedError(f"refusing the index {index_dir}: {why} (another user may have written what "
                                  "it holds: keep the index in a folder only you can write (--index DIR), or "
                                  "`chmod go-w` what is named)")


BUSY_TIMEOUT_MS = 30_000  # how long a statement waits for another process's lock before giving up


def connect(db_path: Path, readonly: bool = False) -> Engine:
    """The catalog's engine. A writer creates it, or upgrades it to this version in one transaction
    (alignsearch/storage/migrate.py); a reader (readonly: open_readonly) writes nothing, so an index on a
    read-only mount or owned by another user can be queried. A file that is not a readable SQLite database
    raises IndexDamagedError (one line, exit 7) rather than a driver traceback, as does a catalog written by
    a newer alignsearch."""
    refuse_untrusted(Path(db_path).parent, writing=not readonly)
    # judged by name before SQLite opens it and again once it did (below): SQLite follows a link (readers read and
    # writers wrote the file it named) and blocks for ever in the open of a FIFO
    judged = own_entry(db_path)
    if readonly:
        engine = open_readonly(db_path)
    else:
        side = side_file_problems(db_path)
        if side:  # a writer's first write failed on them later, said as "damaged: restore it from a backup"
            raise IndexDamagedError(side[0])
        if _emptied(db_path) and _no_tables(db_path):  # asked read-only first: a writer's open writes at once
            # an emptied catalog beside the vectors it addressed: a writer (`roots`, `tag`) created its tables in
            # it, and every command then said "no indexed images yet" (exit 3) of a damaged index
            raise IndexDamagedError(f"{Path(db_path).name} is empty, but the vectors or the ANN index it describes "
                                    "are beside it: it is damaged (run `alignsearch verify`)")
        # URL.create, not an f-string: a '?', '#' or '%20' in the folder's path is part of the file name, not a
        # query string (an f-string URL wrote the catalog to the path cut at '?' and reported success). The folder's
        # real path, as readers open it (readonly_uri): SQLAlchemy makes the path absolute by its letters, so in
        # `a/link/../ix` it dropped 'link/..' and opened a/ix/catalog.db, not the catalog judged and locked here
        real = Path(db_path).parent.resolve() / Path(db_path).name
        engine = create_engine(URL.create("sqlite", database=str(real)))

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            # Deleted rows' bytes are zeroed, not left in free pages: text that must leave the index (a caption a
            # planted link brought in, a forgotten folder's captions and OCR text) leaves the file too. Debian's
            # SQLite turns this on at build time; Python's own builds and macOS's do not.
            cur.execute("PRAGMA secure_delete=ON")
            cur.close()

    try:
        if readonly:
            _refuse_if_locked(Path(db_path))
            with engine.connect() as conn:
                if conn.exec_driver_sql("SELECT count(*) FROM sqlite_master").scalar() == 0 and not _emptied(db_path):
                    # a catalog with no table yet and nothing beside it: a first run creates its tables in one
                    # transaction, before any vector, and one creating them now, or killed before, has committed
                    # nothing; no damage ("no such table: meta"). With vectors beside it, an emptied catalog is.
                    raise IndexNotFoundError(f"{Path(db_path).parent} holds no indexed images yet: its first "
                                             "`alignsearch index` run has committed nothing (is one under way?)")
                migrate.check(state.read(conn, "schema_version").schema_version)
            same_entry(judged, db_path)
            return engine
        with engine.begin() as conn:
            migrate.upgrade(conn)
            upgrade_keys_lossless(conn)
            same_entry(judged, db_path)  # before this transaction commits anything
            if state.read(conn, "index_id").index_id is None:  # names this index (a copy keeps it: see server records)
                state.write(conn, index_id=uuid.uuid4().hex)
    except DBAPIError as exc:
        engine.dispose()
        raise damaged(db_path, exc) from None
    except BaseException:  # an unknown version (AlignSearchError), an interrupt: the engine goes with it
        engine.dispose()
        raise
    return engine


def open_readonly(db_path: Path, *, busy_ms: int = BUSY_TIMEOUT_MS, prepare: bool = True) -> Engine:
    """The one way to open a catalog read-only: an engine whose connections never create or write anything,
    even the WAL's shared-memory file when the folder is not writable (then SQLite reads the database as it
    stands on disk). prepare: learn what the catalog holds when each connection opens (migrate.reader_schema,
    which reads it, so a lock probe, which must not wait out the busy timeout, goes without). No check of
    the version or of a lock: connect(readonly=True) does both."""
    path = Path(db_path).resolve()
    # A queue of connections, each used by one thread at a time: a pool of five thread-bound connections
    # closes connections other threads still use past five threads (SQLite then crashes the process).
    engine = create_engine(readonly_url(path), poolclass=QueuePool, pool_size=8, max_overflow=-1)

    @event.listens_for(engine, "do_connect")
    def _url_now(dialect, _record, cargs, cparams):
        # SQLite opens its side files by name: a FIFO at catalog.db-journal hung every command in that open, one at
        # -wal was read as an empty log (exit 0 where writers and verify said exit 7). Judged before each
        # connection (three lstats), a pooled one a server makes later too; a link or a folder at -wal or -shm fails
        # SQLite's own open, said by _side_files below (a catalog that never opens its -wal is read beside one)
        side = side_file_problems(path, reading=True)
        if side:
            raise IndexDamagedError(side[0])
        # decided per connection: a writer may have made the folder's WAL files since the engine was made
        args, params = dialect.create_connect_args(readonly_url(path))
        cargs[:] = args
        cparams.update(params)

    @event.listens_for(engine, "connect")
    def _prepare(dbapi_conn, record):
        dbapi_conn.execute(f"PRAGMA busy_timeout={int(busy_ms)}")
        if prepare:
            record.info["schema"] = migrate.reader_schema(dbapi_conn)

    @event.listens_for(engine, "checkout")
    def _still_current(dbapi_conn, record, _proxy):
        # A connection prepared for a catalog older than version 17 shows it through temporary objects that shadow
        # its tables (reader_schema: a files view with NULL seals, and digests before 14; before version 3 without moments either); once a
        # writer upgraded the catalog in place they hid what it wrote (its tags, checksums, relpath_raw, moments,
        # digests, seals) from a reader open for long (`serve`): such a connection is made anew. So is one prepared
        # for a catalog older than 21, which checks photos rows without their key: after the upgrade every photo read
        # as damaged (exit 7). And one prepared for a catalog older than 24 (a files view adding a NULL field_seal,
        # which over the upgraded table names the column twice, the table's first): it checked no files row's seal
        # the upgrade wrote. One query per checkout, of such connections only.
        schema = record.info.get("schema")
        if schema is not None and not schema.file_seals and migrate.upgraded(dbapi_conn, schema):
            raise DisconnectionError("the catalog was upgraded since this connection opened")

    @event.listens_for(engine, "handle_error")
    def _side_files(context):
        # A reader open for long (`serve`) makes a new pooled connection at any time: one that fails because a link
        # or folder now stands at catalog.db-wal or -shm surfaced as SQLite's "unable to open database file", which
        # the boundary could only call a damaged catalog ("restore it from a backup") of a sound one. Said as
        # catalog.connect says it at the open; a busy catalog or a full disk stays what it is.
        # only a failure to open or map a file (SQLITE_CANTOPEN, SQLITE_IOERR: -shm's are IOERR_SHMOPEN/SHMMAP):
        # a query's own error (no such column, a bug) beside such a link stays what it is
        code = getattr(context.original_exception, "sqlite_errorcode", None)
        if code is not None and code & 0xFF in (SQLITE_CANTOPEN, SQLITE_IOERR):
            side = side_file_problems(path)
            if side:
                return IndexDamagedError(side[0])
        return None

    return engine


def readonly_url(path: Path) -> URL:
    """paths.readonly_uri as a SQLAlchemy URL (uri=true: pysqlite passes the database as a SQLite URI)."""
    return URL.create("sqlite", database=readonly_uri(path), query={"uri": "true"})


def create_keywords(conn: Connection) -> None:
    from alignsearch.storage.keywords import RADICALS, TOKEN_CATEGORIES

    # remove_diacritics 2: "cafe" finds "Café" and the other way round (SQLite 3.27+). categories: every script's
    # combining marks are part of their word (schema 16), not the separators unicode61 takes them for (Mn, Mc); Thai
    # (schema 7) and Lao (schema 12) marks were token characters before, named one by one (tokenchars). tokenchars: the
    # CJK radicals with no ideograph (So, keywords.RADICALS), a word each (schema 20).
    conn.exec_driver_sql(f"CREATE VIRTUAL TABLE IF NOT EXISTS {KEYWORDS} USING "
                         f"fts5(body, tokenize = \"unicode61 remove_diacritics 2 categories '{TOKEN_CATEGORIES}' "
                         f"tokenchars '{RADICALS}'\")")
    conn.exec_driver_sql(f"CREATE VIRTUAL TABLE IF NOT EXISTS {KEYWORDS_TRIGRAM} USING fts5(body, tokenize = 'trigram')")


def upgrade_keys_lossless(conn: Connection) -> None:
    """Rewrite the keys written before keys were lossless, in the caller's transaction; once per catalog
    (state.keys_lossless), no schema change, so readers of either form read both.

    A key was the name with bytes that are not UTF-8 as \\xNN, so such a name and a file literally named
    like that escape shared one key (one was never searchable). Now backslashes are doubled too
    (sources.catalog_key), which changes only the keys holding a backslash: those rows get the new key and
    keep their ids and vectors; the name's bytes go to relpath_raw. Old keys are unique, so the new ones
    are; each changed row goes through a temporary key first, as one row's new key may be another's old."""
    if state.read(conn, "keys_lossless").keys_lossless:
        return
    rows = conn.exec_driver_sql("SELECT id, relpath, relpath_raw FROM files WHERE instr(relpath, '\\') > 0").all()
    changed = []
    for file_id, relpath, raw in rows:
        key, new_raw = sources.catalog_key(os.fsdecode(sources.name_bytes(relpath, raw)))
        if (key, new_raw) != (relpath, raw):
            changed.append((file_id, key, new_raw))
    for file_id, _, _ in changed:  # NUL never occurs in a file name: no key can be one of these
        conn.execute(update(files).where(files.c.id == file_id).values(relpath=f"\0{file_id}"))
    for file_id, key, new_raw in changed:
        conn.execute(update(files).where(files.c.id == file_id).values(relpath=key, relpath_raw=new_raw))
    state.write(conn, keys_lossless=True)


def _emptied(db_path) -> bool:
    """Whether what a first run writes only after its catalog's tables (vectors, an ANN index) lies beside
    db_path: then a catalog without tables was emptied (damage), not one whose first run committed nothing yet."""
    return any((Path(db_path).parent / name).exists() for name in (VECTORS_FILE, ANN_FILE, "vectors"))


def _no_tables(db_path) -> bool:
    """Whether the catalog at db_path exists and holds no table (an emptied file), read without writing. Asked
    only of a file of one page at most (SQLite's largest is 64 KiB): a catalog with tables has more, so a sound
    one costs a stat, and one another process keeps locked is not waited for here."""
    try:
        if os.stat(db_path).st_size > 65536:
            return False
    except FileNotFoundError:
        return False
    engine = open_readonly(db_path, busy_ms=0, prepare=False)
    try:
        with engine.connect() as conn:
            return conn.exec_driver_sql("SELECT count(*) FROM sqlite_master").scalar() == 0
    except DBAPIError:
        return False  # not a database at all: the open below says so
    finally:
        engine.dispose()


def damaged(db_path, exc: Exception) -> AlignSearchError:
    """What a failed catalog operation means: a full disk or a lock held too long are said as such (the
    index is fine and a re-run recovers); anything else is reported as possible damage."""
    trouble = not_damage(exc)
    if trouble is not None:
        return trouble
    side = side_file_problems(db_path)
    if side:  # SQLite's own reason ("unable to open database file") names none of them
        return IndexDamagedError(side[0])
    reason = str(getattr(exc, "orig", exc)).splitlines()[0]
    return IndexDamagedError(f"{Path(db_path).name} cannot be read ({reason}): run `alignsearch verify`")


# SQLite's primary result codes (the low byte of an extended code)
SQLITE_BUSY, SQLITE_LOCKED, SQLITE_IOERR, SQLITE_FULL, SQLITE_CANTOPEN = 5, 6, 10, 13, 14
SQLITE_IOERR_SHMSIZE = SQLITE_IOERR | (19 << 8)  # the -shm file could not be grown to its 32 KiB
SQLITE_IOERR_SHMMAP = SQLITE_IOERR | (21 << 8)  # the -shm file could not be mapped into memory (mmap failed)


def not_damage(exc: BaseException) -> AlignSearchError | None:
    """A SQLite (or OS) error that says nothing about the index's health, as the error to report; else None.
    A full disk and a catalog locked past BUSY_TIMEOUT_MS were reported as a damaged index ("restore it
    from a backup"), though nothing was lost and a re-run recovers fully."""
    cause = getattr(exc, "orig", None) or exc
    code = getattr(cause, "sqlite_errorcode", None)
    primary = None if code is None else code & 0xFF
    text = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
    if isinstance(cause, OSError) and cause.errno == errno.ENOSPC and cause.filename:
        # a file of its own (an export's OUT, a model export): the disk named by the file, not the index's
        return DiskFullError(f"{cause.strerror or 'No space left on device'} (free some space and run the command "
                             f"again; the index is not damaged): {cause.filename}")
    if primary == SQLITE_FULL or (isinstance(cause, OSError) and cause.errno == errno.ENOSPC):
        return DiskFullError(f"the disk holding the index is full ({text}): free some space and run the command "
                             "again; the index is not damaged (what was committed before stays)")
    if code == SQLITE_IOERR_SHMSIZE:
        # every open of a catalog whose -shm is gone (a clean exit removes it) makes it anew: on a full disk (or
        # past `ulimit -f`) that fails, and every command, verify too, called the index damaged; --repair said
        # "damaged beyond repair: move it aside and rebuild". The catalog itself is not touched.
        return DiskFullError(f"the index's {DB_FILE}-shm cannot be made ({text}): the disk holding the index is full "
                             "(or a file size limit, `ulimit -f`, is in the way): free some space and run the "
                             "command again; the index is not damaged")
    if code == SQLITE_IOERR_SHMMAP:
        # every reader and writer of a WAL catalog maps its -shm (the WAL's index): where mmap fails (a filesystem
        # that cannot map a shared file, some network ones; a process out of address space, `ulimit -v`) nothing
        # can be read, and every command, verify too, called the index damaged. The catalog itself is not touched.
        return AlignSearchError(f"the index's {DB_FILE}-shm cannot be mapped into memory ({text}): the filesystem "
                                "holding the index does not support shared memory maps (some network filesystems "
                                "do not), or the process is out of address space (a `ulimit -v` limit): move the "
                                "index to a local disk, or raise the limit, and run the command again; the index "
                                "is not damaged")
    if primary in (SQLITE_BUSY, SQLITE_LOCKED):
        return CatalogBusyError(f"the index catalog stayed locked by another process for {BUSY_TIMEOUT_MS // 1000} s "
                                f"({text}): try again when that process (an `alignsearch index` run?) is done; "
                                "the index is not damaged")
    return None


LOCK_WAIT_SECONDS = 2.0  # a checkpoint or a commit holds the catalog for milliseconds; a writer in EXCLUSIVE mode for its run


def _refuse_if_locked(db_path: Path) -> None:
    """A reader in WAL mode never waits for a writer, unless one holds the catalog in SQLite's EXCLUSIVE
    locking mode: then it would wait out the 30 s busy timeout and blame damage. Waits LOCK_WAIT_SECONDS, then
    says who holds it (an alignsearch run holding the index's write.lock, or another program): BadInputError."""
    if not db_path.exists():
        return
    probe = open_readonly(db_path, busy_ms=int(LOCK_WAIT_SECONDS * 1000), prepare=False)
    try:
        with probe.connect() as conn:
            conn.exec_driver_sql("SELECT count(*) FROM sqlite_master").fetchone()
    except DBAPIError as exc:
        if "locked" not in str(exc.orig) and "busy" not in str(exc.orig):
            return  # reported by the caller's own read
        try:
            from alignsearch.storage.paths import writer_running  # the write path's lock, probed read-only

            indexing = writer_running(db_path.parent)
        except (ImportError, OSError):
            indexing = False
        who = ("an alignsearch run writing this index (index, tag, tune or verify --repair) holds it" if indexing else
               "another program holds it locked (a sqlite3 shell or tool in EXCLUSIVE locking mode?)")
        raise BadInputError(f"{db_path.name} is locked: {who}; the index is not damaged: try again when it has "
                            "finished") from None
    finally:
        probe.dispose()


def index_id(conn: Connection) -> str | None:
    """A random id given to the index when its catalog was created; servers prove it to clients."""
    return state.read(conn, "index_id").index_id


def _rows(result) -> list[FileRow]:
    return [FileRow(**row._mapping) for row in result]


def files_under(conn: Connection, root: str, folders: tuple[str, ...] | None = None) -> dict[str, FileRow]:
    """Every catalogued file of one root, by relative path; with folders (catalog keys relative to the root, ""
    the root), only those under them, each a range of the (root, relpath) index, not a read of the root."""
    if folders is None or "" in folders:
        return {r.relpath: r for r in _rows(conn.execute(select(files).where(files.c.root == root)))}
    return {r.relpath: r for key in folders
            for r in _rows(conn.execute(select(files).where(files.c.root == root, *under_folder(key))))}


def under_folder(key: str) -> tuple:
    """Conditions on relpath for the rows under the folder `key` (a catalog key), one range of the (root,
    relpath) index: from "key/" up to "key0" ("0" follows "/")."""
    return files.c.relpath >= key + "/", files.c.relpath < key + "0"


def get_files(conn: Connection, ids: Iterable[int]) -> dict[int, FileRow]:
    """The rows of these ids, each checked before it is shown: its numbers (check_rows) and its name (check_names)."""
    ids = list(ids)
    out: dict[int, FileRow] = {}
    for start in range(0, len(ids), 500):  # SQLite caps bound parameters
        chunk = ids[start : start + 500]
        out.update({r.id: r for r in check_names(conn.execute(select(files, _key_owner()).where(files.c.id.in_(chunk))))})
    return check_rows(conn, out)  # hits: a few rows, each checked before its numbers are shown


# The name of a row a reader shows has a second copy: the unique index on (root, relpath, moment) holds the key as it
# was written, beside the row's id. SQLite pages carry no checksum, so a flipped byte in a row's text is read as
# it stands (`query` showed /photos/hmg001.jpg for img001.jpg, exit 0) and only verify's integrity check, a read of
# the whole catalog, found it. Each row shown is looked up in that index by its own key, in the statement that reads
# it (one snapshot: a writer's change between two statements is no damage): a seek of the index per row, not a
# read of the catalog. The subquery names the row's key columns with equalities only, so SQLite seeks the unique
# index (a covering seek: the id is in it); tests/test_catalog_names.py flips the bytes to prove it.
_NAMED = files.alias("named")
KEY_OWNER = "key_owner"


def _key_owner():
    """The id the unique index gives the row's key (NULL: the key is in no index entry), a column of the row's select."""
    return _KEY_OWNER


# built once: a search reads rows twice, and building the subquery anew took ~80 us each time
_KEY_OWNER = (select(_NAMED.c.id).where(_NAMED.c.root == files.c.root, _NAMED.c.relpath == files.c.relpath,
                                        _NAMED.c.moment == files.c.moment).limit(1).scalar_subquery().label(KEY_OWNER))


def check_names(result) -> list[FileRow]:
    """The rows of a select of files and _key_owner, once each one's name is the one its index entry holds
    (name_as_written); else IndexDamagedError, one line (exit 7)."""
    rows = []
    for got in result:
        fields = dict(got._mapping)
        owner = fields.pop(KEY_OWNER)
        row = FileRow(**fields)
        if not name_as_written(row, owner):
            raise IndexDamagedError(f"{DB_FILE} is damaged: the name in the row of file {row.id} is not the one its "
                                    "index holds: run `alignsearch verify --repair`")
        rows.append(row)
    return rows


def name_as_written(row: FileRow, owner: int | None) -> bool:
    """Whether a row's name is the one written: its key is its own entry of the unique index (owner: the id that
    entry names), and its kept bytes are the name the key spells (sources.key_holds)."""
    return owner == row.id and sources.key_holds(row.relpath, row.relpath_raw)


def check_rows(conn: Connection, rows):
    """The rows (a list or a dict of them), once their numbers are of the types a writer stores (else the one-line
    error of refuse_malformed) and their shown fields are those their digest was written for (else
    refuse_off_digest)."""
    listed = list(rows.values() if isinstance(rows, dict) else rows)
    if not all(map(_sound, listed)):
        refuse_malformed(conn)
    schema = migrate.schema_of(conn)
    if schema.digests and not all(rowdigest.holds_shown(FILE_DIGESTED, _shown(r), r.digest) for r in listed):
        refuse_off_digest()
    if schema.vec_seals and not all(rowdigest.seal(r.vec_row) == r.vec_seal for r in listed if r.status == INDEXED):
        refuse_off_digest()  # a flipped byte of the vector address scored another file's vector, exit 0
    return rows


# what writers digest: a photos row's key with its fields (schema 21); a reader of an older catalog checks its photos
# rows as they were written (rowdigest.photo_fields(schema.photo_keys))
FILE_DIGESTED, PHOTO_DIGESTED = rowdigest.FILE_FIELDS, rowdigest.PHOTO_KEYED_FIELDS
# a FileRow's digested fields as a tuple in their digest's order, read in one call (rowdigest.holds_shown): the check
# of each row a search shows looked each field up in vars(r) (benchmarks/bench_catalog_names.py: check_rows)
_shown = operator.attrgetter(*(name for name, _ in FILE_DIGESTED))


def refuse_off_digest() -> None:
    """The one-line error for a row whose shown fields are not those its digest was written for (a flipped byte)."""
    raise IndexDamagedError(f"{DB_FILE} is damaged: a row's shown fields are not those written (their checksum "
                            "differs): run `alignsearch verify --repair`")


def refuse_photo_keys_off() -> None:
    """The one-line error for a photos row whose key fails its digest (photo_keys_off: moved off its file)."""
    raise IndexDamagedError(f"{DB_FILE} is damaged: a photo row's key is not the one written (its checksum differs), "
                            "so its file shows no photo fields: run `alignsearch verify --repair`")


def _sound(row: FileRow) -> bool:
    """Whether a row's numbers and text are of the types a writer stores (see malformed_values). A flipped bit of a
    record's header turns text into bytes of the same length (serial types 2N+13 and 2N+12): a format read as
    b'PNG' failed deep in `query --json` ("unexpected TypeError", exit 1)."""
    number, maybe, text = (int, float), (int, float, type(None)), (str, type(None))
    return (isinstance(row.vec_row, int if row.status == INDEXED else (int, type(None))) and isinstance(row.moment, int) and isinstance(row.size, int)
            and isinstance(row.mtime, number) and isinstance(row.t, maybe) and isinstance(row.t_end, maybe)
            and isinstance(row.width, (int, type(None))) and isinstance(row.height, (int, type(None)))
            and isinstance(row.root, str) and isinstance(row.relpath, str) and status_known(row.status)
            and isinstance(row.relpath_raw, (bytes, type(None))) and isinstance(row.sha256, text)
            and isinstance(row.format, text) and isinstance(row.reason, text))


def driver_rows(conn: Connection, query) -> list[tuple]:
    """A select's rows as the driver's tuples, read on the connection's own DBAPI connection (so in its transaction),
    no SQLAlchemy Row made for each: none of these tables' column types converts a value SQLite gives (Integer, Float,
    String and Text have no result processor on SQLite), so each value is the one conn.execute(query).all() reads.
    For a load of every files row (search/columns.py). An error of SQLite's is read again through SQLAlchemy, so
    that it comes as every other query's does (connect's handle_error: a link at -wal or -shm said as such, not as a
    damaged catalog)."""
    import sqlite3

    compiled = query.compile(dialect=conn.dialect)
    params = tuple(compiled.params[name] for name in compiled.positiontup or ())
    try:
        return conn.connection.dbapi_connection.execute(str(compiled), params).fetchall()
    except sqlite3.Error:
        return [tuple(row) for row in conn.execute(query).all()]


def status_known(status) -> bool:
    """Whether a row's status is one a writer stores (INDEXED or FAILED): any other is damage, not a state."""
    return status == INDEXED or status == FAILED


_KNOWN = frozenset((INDEXED, FAILED))


def statuses_known(statuses: Iterable) -> bool:
    """Whether every status is one a writer stores (status_known), as one set test: 0.65 ms over 100,000 statuses
    against 4.19 a call a row (RESULTS.md, the reading under bench_photo_keys --file-seals --base b68b653; a few ms of
    a ~470 ms columns load). Equal to status_known's answer: each value is what SQLite gives (str, bytes, int, float,
    None: hashable), equal to INDEXED or FAILED only as that str."""
    return set(statuses) <= _KNOWN


def failed_files(conn: Connection) -> list[FileRow]:
    """The failed files' rows, in path order, each checked (check_rows): `info --failed` shows their reasons, a
    digested field (a flipped byte of one was shown as it stood, exit 0)."""
    query = select(files).where(files.c.status == FAILED).order_by(files.c.root, files.c.relpath)
    return check_rows(conn, _rows(conn.execute(query)))


def live_pairs(conn: Connection, *, without_ids: Iterable[int] = (), without_root: str | Iterable[str] | None = None,
               below: int | None = None, check_seals: bool = True) -> np.ndarray:
    """(file id, vector row) of every indexed file, in id order, as an (n, 2) int64 array: what the ANN index
    holds. without_ids: less these files and their videos' other moments (files whose deletion commits with the
    ANN index); without_root: less that root's files, or those roots' (roots being forgotten); below: only ids
    below it (those committed before next_id said it). Each address is checked against its seal (schema 17; else the
    one-line error of refuse_off_digest); check_seals=False only for `verify`, which finds addresses off their seals
    itself (off_digest) to report and forget them rather than refuse."""
    import numpy as np

    # the address's seal read beside it (schema 17): rebuild, compact, verify and forget put into the ANN index the
    # vector each address names, so a flipped byte of one filed another file's vector under this id, exit 0
    sealed = check_seals and migrate.schema_of(conn).vec_seals
    columns = (files.c.id, files.c.vec_row, files.c.vec_seal) if sealed else (files.c.id, files.c.vec_row)
    query = select(*columns).where(files.c.status == INDEXED, *_leaving_out(without_ids))
    if below is not None:
        query = query.where(files.c.id < below)
    if without_root is not None:
        query = query.where(files.c.root.not_in([without_root] if isinstance(without_root, str) else list(without_root)))
    query = query.order_by(files.c.id)
    # flattened straight into the array: np.array over a list of Row objects took 25-45 us a row (13 s at 480k)
    flat = itertools.chain.from_iterable(conn.execute(query))
    try:
        read = np.fromiter(flat, dtype=np.int64).reshape(-1, len(columns))
    except (TypeError, ValueError, OverflowError):  # NULL, text or a REAL past int64 where a writer stores integers
        _refuse_unread_pairs(conn, query)
    if not sealed:
        return read
    # the same numpy check as a snapshot's columns (search/columns.py): one pass of arithmetic, no row in Python
    if not rowdigest.sealed(read[:, 1], read[:, 2]):
        refuse_off_digest()
    return np.ascontiguousarray(read[:, :2])


def _refuse_unread_pairs(conn: Connection, query) -> None:
    """The one-line error for live pairs that could not be read as integers (damage only: read again, row by row):
    an address that is not an integer is not a vector address (refuse_malformed, as addresses_of says it); a seal
    that is not one (NULL, text, a REAL past int64) is an address off its seal, as search/columns.py and verify
    find it (verify --repair seals it anew)."""
    rows = conn.execute(query).all()
    if not all(type(row[1]) is int for row in rows):
        refuse_malformed(conn)
    refuse_off_digest()


def _gone(ids: Iterable[int]) -> CompoundSelect:
    """The ids, plus the ids of the other moments of the videos among them, as one query. The ids travel as one
    JSON array bound as a single parameter: any count, under SQLite's cap on bound parameters."""
    listed = func.json_each(json.dumps(sorted({int(i) for i in ids}))).table_valued("value")
    given, other = files.alias("given"), files.alias("other")
    moments = select(other.c.id).join(given, and_(given.c.root == other.c.root, given.c.relpath == other.c.relpath)).where(
        given.c.id.in_(select(listed.c.value)), or_(given.c.t.is_not(None), other.c.t.is_not(None)))
    return union(select(listed.c.value), moments)


def _leaving_out(ids: Iterable[int]) -> list:
    """The WHERE clauses that leave out these files and their videos' other moments (none when ids is empty)."""
    ids = list(ids)
    return [files.c.id.not_in(_gone(ids))] if ids else []


def first_moments(conn: Connection) -> dict[int, int]:
    """{id of a later moment of an indexed video: the id of its moment 0}: where a video counts once, its
    moments' rows stand for that one file (a row per moment otherwise counts it as several images)."""
    first, later = files.alias("first"), files.alias("later")
    query = select(later.c.id, first.c.id).join(
        first, and_(first.c.root == later.c.root, first.c.relpath == later.c.relpath, first.c.moment == 0)
    ).where(later.c.moment > 0, later.c.status == INDEXED)
    return {int(a): int(b) for a, b in conn.execute(query)}


def vectors_by_hash(conn: Connection, hashes: Iterable[str]) -> dict[str, int]:
    """Vector rows of already indexed content, by SHA-256: moved, renamed and duplicated files reuse them."""
    hashes = list(set(hashes))
    out: dict[str, int] = {}
    for start in range(0, len(hashes), 500):
        query = select(files.c.sha256, files.c.vec_row, files.c.vec_seal).where(
            files.c.sha256.in_(hashes[start : start + 500]), files.c.status == INDEXED
        )
        # an address off its seal is not reused: a new row would seal the damaged address anew (its content is encoded
        # again instead; verify names the damaged row)
        out.update({sha: row for sha, row, seal in conn.execute(query) if rowdigest.seal(row) == seal})
    return out


def next_id(conn: Connection) -> int:
    """The id the next file row will get, or one above it: ids are never reused (sqlite_autoincrement), so every
    row committed from now on has an id at least this."""
    return int(conn.exec_driver_sql("SELECT seq FROM sqlite_sequence WHERE name = 'files'").scalar() or 0) + 1


def counts(conn: Connection) -> dict[str, int]:
    query = select(files.c.status, func.count()).where(files.c.moment == 0).group_by(files.c.status)  # a video once
    found = {status: n for status, n in conn.execute(query)}
    return {INDEXED: found.get(INDEXED, 0), FAILED: found.get(FAILED, 0)}


def upsert_file(conn: Connection, values: dict[str, Any], *, seals: list | None = None) -> int:
    """Insert or replace the row of (root, relpath). A replaced file gets a new id, so the ANN
    index never confuses its old vector with its new one. values["link"] (scan.Found.link): the name's link
    target to record (b"" or None: none; a list's entry or a tar member is never looked at). seals: as
    insert_file's."""
    values = dict(values)
    link = values.pop("link", None)
    where = (files.c.root == values["root"], files.c.relpath == values["relpath"])
    forget_extras(conn, [i for (i,) in conn.execute(select(files.c.id).where(*where))])
    conn.execute(delete(files).where(*where))
    file_id = insert_file(conn, values, seals=seals)
    set_link(conn, file_id, link)
    return file_id


def insert_file(conn: Connection, values: dict[str, Any], *, seals: list | None = None) -> int:
    """Insert a row of files (no link: upsert_file records it) with its digest in the same statement; its id.
    seals: a list to append the row's (field seal, id) to, for seal_files to write with the other rows of a writer's
    batch, in the same transaction, before it commits; None: written here."""
    values = {"indexed_at": time.time(), "moment": 0, **values}  # moment: the column's default, digested as read
    values.update(rowdigest.stored(FILE_DIGESTED, values))  # stored as read back, so the digest is of what is read
    values["digest"] = rowdigest.digest(FILE_DIGESTED, values)
    values["vec_seal"] = rowdigest.seal(values.get("vec_row"))
    file_id = int(conn.execute(insert(files).values(**values)).inserted_primary_key[0])
    # the field seal covers the id, which SQLite picks at the INSERT: written by primary key in the same transaction,
    # so no reader sees the row unsealed. In the driver's SQL: an update() construct a row cost insert_file more than
    # this in a throwaway measure (not recorded); with it insert_file writes 2,869 rows/s against 3,155 without the
    # UPDATE (RESULTS.md, bench_photo_keys --file-seals, medians of 7). A writer's batch (indexer/writer.py) collects
    # them for one executemany: 2,736, 2,318 and 3,395 rows/s against 2,554, 2,218 and 3,209 with an UPDATE a row,
    # batches of 32 (three runs, --base main; RESULTS.md, reading "perf24")
    if seals is None:
        seal_files(conn, [(file_seal(file_id, values), file_id)])
    else:
        seals.append((file_seal(file_id, values), file_id))
    return file_id


def seal_files(conn: Connection, seals: list[tuple[int, int]]) -> None:
    """Write the rows' field seals ((seal, id) pairs, insert_file's), in one statement run for each (executemany): a
    writer's batch calls it in the transaction that inserted them, so no reader sees a row unsealed."""
    if seals:  # one row's as one statement (executemany's set-up is not paid for insert_file's own UPDATE)
        conn.exec_driver_sql("UPDATE files SET field_seal = ? WHERE id = ?", seals if len(seals) > 1 else seals[0])


def file_seal(file_id: int, values: dict[str, Any]) -> int:
    """The field seal of a files row (rowdigest.field_seal of its id and FILE_SEALED values as stored)."""
    return rowdigest.field_seal(file_id, values, names=rowdigest.FILE_SEALED, seed=rowdigest.FILE_SEED)


def set_link(conn: Connection, file_id: int, target: bytes | None) -> None:
    """Record a new row's name as a symbolic link to `target` (nothing for None or b"": not a link)."""
    if target:
        conn.execute(insert(links).values(file_id=file_id, target=target))


def links_of(conn: Connection) -> dict[int, bytes]:
    """{file id: link target} of every row recorded as a symbolic link: one read of a table as small as the
    library's links (joined to a root's rows, SQLite walked every row of the root to probe it)."""
    return dict(conn.execute(select(links.c.file_id, links.c.target)).all())


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


def delete_all_files(conn: Connection) -> None:
    conn.execute(delete(links))
    conn.execute(delete(files))


def delete_files(conn: Connection, ids: Iterable[int]) -> None:
    """Delete these rows, and every other moment of a video one of them belongs to: a video is indexed, or
    forgotten, whole (a lone missing moment would never be read again, its file being unchanged)."""
    ids = with_moments(conn, ids)
    forget_extras(conn, ids)
    for start in range(0, len(ids), 500):
        conn.execute(delete(files).where(files.c.id.in_(ids[start : start + 500])))


def incomplete_videos(conn: Connection) -> list[int]:
    """The ids of every moment of the indexed videos whose moments are not 0, 1, 2... without a gap (a row lost
    to damage): such a video is never read again, its file being unchanged, so the lost moment stayed
    unsearchable for good and verify --repair called the index sound. verify reports them; --repair forgets each
    such video whole and encodes it again."""
    f = files.c
    whole = (select(f.root, f.relpath).where(f.status == INDEXED, f.t.is_not(None)).group_by(f.root, f.relpath)
             .having(or_(func.min(f.moment) != 0, func.max(f.moment) + 1 != func.count())).subquery())
    query = select(f.id).join(whole, and_(whole.c.root == f.root, whole.c.relpath == f.relpath))
    return [int(i) for (i,) in conn.execute(query.order_by(f.id))]


def with_moments(conn: Connection, ids: Iterable[int]) -> list[int]:
    """ids, plus the ids of the other moments of the videos among them."""
    ids = list(ids)
    return sorted(int(i) for (i,) in conn.execute(_gone(ids))) if ids else []


def video_keys(conn: Connection, ids: Iterable[int]) -> dict[int, tuple[str, str]]:
    """{id: (root, relpath)} of the video moments among ids (photos are left out)."""
    ids, out = [int(i) for i in ids], {}
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        sql = f"SELECT id, root, relpath FROM files WHERE t IS NOT NULL AND id IN ({','.join('?' * len(chunk))})"
        out.update({i: (root, rel) for i, root, rel in conn.exec_driver_sql(sql, tuple(chunk))})
    return out


def rows_at(conn: Connection, root: str, relpath: str) -> list[FileRow]:
    """Every row of one file: a photo's one, or a video's moments in time order."""
    return _rows(conn.execute(select(files).where(files.c.root == root, files.c.relpath == relpath)
                              .order_by(files.c.moment)))


def rows_under(conn: Connection, root: str) -> list[FileRow]:
    """Every row of one root, each moment of a video included (files_under keeps one row per path)."""
    return _rows(conn.execute(select(files).where(files.c.root == root)))


def moments_by_hash(conn: Connection, sha256: str) -> list[FileRow]:
    """The indexed moments of a video with this content (one copy's, in time order): a renamed, moved or
    copied video reuses their vectors."""
    first = conn.execute(select(files.c.root, files.c.relpath).where(
        files.c.sha256 == sha256, files.c.status == INDEXED, files.c.t.is_not(None)).limit(1)).first()
    return [] if first is None else [r for r in rows_at(conn, first.root, first.relpath) if r.status == INDEXED]


def readdress(conn: Connection, low: int, high: int, shift: int) -> None:
    """Add `shift` to every vector address in [low, high): a segment's rows moved elsewhere. Each seal moves with its
    address in the same statement (rowdigest.seal_shift), not sealed anew from the address read: a damaged one stays
    found."""
    moved = (files.c.vec_seal + rowdigest.seal_shift(shift)) % rowdigest.SEAL_PRIME
    conn.execute(update(files).where(files.c.vec_row >= low, files.c.vec_row < high)
                 .values(vec_row=files.c.vec_row + shift, vec_seal=moved))


def indexed_files(conn: Connection) -> list[FileRow]:
    """Every indexed file's row, in id order."""
    return _rows(conn.execute(select(files).where(files.c.status == INDEXED).order_by(files.c.id)))



def integrity_problems(db_path: Path, table: str | None = None) -> list[str]:
    """SQLite's own integrity check of the catalog (every page and index), read-only; [] when sound. table: of that
    table and its indexes alone (SQLite 3.33+), a fraction of the whole's time for a reader that suspects one table."""
    try:
        db = connect(db_path, readonly=True)
    except IndexDamagedError as exc:
        return [str(exc).split(": run")[0]]
    try:
        with db.connect() as conn:
            check = "PRAGMA integrity_check(20)" if table is None else f"PRAGMA integrity_check({table})"
            found = [row[0] for row in conn.exec_driver_sql(check)]
            # every page sound; and every table there, which readers rely on from version 3 (migrate.py)
            version = migrate.schema_of(conn).version
            if found == ["ok"] and table is None and migrate.every_table(version):
                have = {name for (name,) in conn.exec_driver_sql("SELECT name FROM main.sqlite_master WHERE type = 'table'")}
                lacking = [t.name for t in metadata.sorted_tables if t.name not in have and migrate.holds(version, t.name)]
                found = [f"it lacks the table{'s' * (len(lacking) > 1)} {', '.join(lacking)}"] if lacking else found
    except DBAPIError as exc:
        if (trouble := not_damage(exc)) is not None:  # a full disk is no damage: said as such (verify's one line)
            raise trouble from None
        found = [str(exc.orig).splitlines()[0]]
    finally:
        db.dispose()
    return [] if found == ["ok"] else [f"{Path(db_path).name} is damaged: {'; '.join(found[:3])}"]


def keyword_problems(db_path: Path) -> list[str]:
    """FTS5's own check of the keyword tables (PRAGMA integrity_check reads FTS5 only from SQLite 3.44: flipped
    bytes in their data left every keyword query answering nothing, and verify called the index sound); [] when
    sound. The check is an INSERT, so it runs on a private temporary copy of those tables: the catalog, read
    through a read-only URI, is never written (verify reads indexes it may not write). BadInputError where the
    temporary folder is one other users may rename entries in (atomic.scratch)."""
    try:
        return _keyword_problems(db_path)
    except atomic.SharedTempError as exc:
        raise BadInputError(f"cannot check the keyword index: the temporary folder {exc.filename}: {exc.strerror}") from None


def _keyword_problems(db_path: Path) -> list[str]:
    import sqlite3

    with atomic.scratch("alignsearch-keywords") as tmp:  # a killed verify's copy goes at the next verify
        copy = os.path.join(tmp, "keywords.db")
        conn = sqlite3.connect(copy, uri=True)  # uri: the catalog is attached by its read-only URI
        try:
            conn.execute("ATTACH DATABASE ? AS cat", (readonly_uri(db_path),))
            made = dict(conn.execute("SELECT name, sql FROM cat.sqlite_master WHERE type = 'table' AND name IN (?, ?)",
                                     (KEYWORDS, KEYWORDS_TRIGRAM)))
            for name, sql in made.items():
                conn.execute(sql)  # the same tokenizer and options, in the copy
                for (shadow,) in conn.execute("SELECT name FROM cat.sqlite_master WHERE type = 'table' AND name IN "
                                              "(?, ?, ?, ?, ?)", [f"{name}_{s}" for s in FTS5_SHADOWS]).fetchall():
                    conn.execute(f"DELETE FROM main.{shadow}")
                    conn.execute(f"INSERT INTO main.{shadow} SELECT * FROM cat.{shadow}")
            conn.commit()
        finally:
            conn.close()
        version = state.peek(db_path, "schema_version")  # from version 3 on every query reads them
        problems = [f"{Path(db_path).name} is damaged: its keyword index {name} is missing"
                    for name in (KEYWORDS, KEYWORDS_TRIGRAM) if name not in made and version is not None and
                    migrate.every_table(version.schema_version)]
        conn = sqlite3.connect(copy)  # opened again: FTS5 reads the copied structure, not the empty one it cached
        try:
            for name in made:
                try:
                    conn.execute(f"INSERT INTO {name}({name}) VALUES ('integrity-check')")
                except sqlite3.DatabaseError as exc:
                    problems.append(f"{Path(db_path).name} is damaged: its keyword index {name}: {exc}")
        finally:
            conn.close()
    # The copy's shadow tables are made afresh and filled by position, so a flipped byte of a column's name in
    # the catalog's own (keywords_idx's pgno read as pgoo) checked sound, while every keyword query of the catalog
    # failed ("SQL logic error", exit 7). A search as readers make one, on the catalog itself, read-only.
    conn = sqlite3.connect(readonly_uri(db_path), uri=True)
    try:
        for name in made:
            try:
                conn.execute(f"SELECT rowid FROM {name} WHERE {name} MATCH ? LIMIT 1", ('"abc"',)).fetchall()
            except sqlite3.DatabaseError as exc:
                problems.append(f"{Path(db_path).name} is damaged: its keyword index {name} cannot be searched: {exc}")
    finally:
        conn.close()
    return problems


def rebuild_keywords(conn: Connection) -> None:
    """Drop the keyword tables and write them again from what they are made of (captions, text read in images,
    paths, tags), in the caller's transaction: how `verify --repair` mends a damaged keyword index (dropped,
    not emptied: a DELETE would read the damaged index)."""
    for table in (KEYWORDS, KEYWORDS_TRIGRAM):
        conn.exec_driver_sql(f"DROP TABLE IF EXISTS {table}")
    create_keywords(conn)
    refresh_keywords(conn)


FTS5_SHADOWS = ("data", "idx", "content", "docsize", "config")  # the tables an FTS5 table keeps its index in


# -- perceptual hashes (alignsearch/search/dupes.py) ---------------------------------------------------------------

def has_phashes(conn: Connection) -> bool:
    """Whether the catalog has the phashes table (a version 2 index written before it existed has none)."""
    return migrate.schema_of(conn).phashes


def set_phashes(conn: Connection, rows: Iterable[tuple[int, str]]) -> None:
    """Store (file id, phash hex) pairs, replacing what those files had."""
    rows = [{"file_id": int(i), "phash": h} for i, h in rows]
    for start in range(0, len(rows), 500):
        chunk = rows[start : start + 500]
        conn.execute(delete(phashes).where(phashes.c.file_id.in_([r["file_id"] for r in chunk])))
        conn.execute(insert(phashes), chunk)


def phashes_of(conn: Connection, ids: Iterable[int] | None = None) -> dict[int, str]:
    """phash hex by file id, of indexed files (all of them when ids is None); {} when the table is absent. A hash
    not in the form a writer stores is refused in one line (dupes and --collapse parsed it: ValueError, exit 1)."""
    if not has_phashes(conn):
        return {}
    query = select(phashes.c.file_id, phashes.c.phash).join(files, files.c.id == phashes.c.file_id).where(
        files.c.status == INDEXED)
    if ids is None:
        out = {i: h for i, h in conn.execute(query)}
    else:
        ids = list(ids)
        out = {}
        for start in range(0, len(ids), 500):
            out.update({i: h for i, h in conn.execute(query.where(phashes.c.file_id.in_(ids[start : start + 500])))})
    if any(not _phash_form(h) for h in out.values()):
        raise IndexDamagedError(f"{DB_FILE} is damaged: perceptual hashes that alignsearch never writes: run "
                                "`alignsearch verify --repair` (the next `index` run takes them again)")
    return out


# A stored hash: 16 hex digits, then (from the colour grid on) "-" and whole bytes of hex (media/phash.py)
PHASH_FORM = re.compile(r"[0-9a-f]{16}(?:-(?:[0-9a-f]{2})+)?")


def _phash_form(value) -> bool:
    return isinstance(value, str) and PHASH_FORM.fullmatch(value) is not None


def malformed_phashes(conn: Connection) -> list[int]:
    """The file ids whose stored perceptual hash is not in the form a writer stores (verify; --repair drops them
    and the next `index` run's hash fill takes them again)."""
    if not has_phashes(conn):
        return []
    return [i for i, h in conn.execute(select(phashes.c.file_id, phashes.c.phash)) if not _phash_form(h)]


def forget_phashes(conn: Connection, ids: Iterable[int]) -> None:
    ids = list(ids)
    for start in range(0, len(ids), 500):
        conn.execute(delete(phashes).where(phashes.c.file_id.in_(ids[start : start + 500])))


# The SQLite types a writer stores in the columns readers compute with. SQLite keeps whatever a record says, so a
# damaged record header or another program can leave text or NULL where a number was: queries, dupes, export and
# verify then died on TypeError or ValueError (exit 1) and verify said nothing. verify counts such values
# (malformed_values) and readers refuse them in one line (refuse_malformed).
_NUMBER, _OR_NULL = ("integer", "real"), ("integer", "real", "null")


def _typed_columns(conn: Connection) -> list[tuple[str, Any, tuple[str, ...], tuple]]:
    """(what, column, the typeof() values a writer stores, the rows it applies to)."""
    f = files.c
    out = [("vector addresses of indexed files", f.vec_row, ("integer",), (f.status == INDEXED,)),
           ("file sizes", f.size, ("integer",), ()), ("modification times", f.mtime, _NUMBER, ()),
           ("widths", f.width, ("integer", "null"), ()), ("heights", f.height, ("integer", "null"), ()),
           ("video moment numbers", f.moment, ("integer",), ()), ("video moment start times", f.t, _OR_NULL, ()),
           ("video moment end times", f.t_end, _OR_NULL, ()), ("roots", f.root, _TEXT, ()), ("names", f.relpath, _TEXT, ()),
           ("statuses", f.status, _TEXT, ()), ("content hashes", f.sha256, _TEXT_OR_NULL, ()),
           ("image formats", f.format, _TEXT_OR_NULL, ()), ("failure reasons", f.reason, _TEXT_OR_NULL, ()),
           ("kept name bytes", f.relpath_raw, ("blob", "null"), ())]
    if has_photos(conn):
        p = photos.c
        out += [("photo dates", p.taken, _OR_NULL, ()), ("latitudes", p.lat, _OR_NULL, ()),
                ("longitudes", p.lon, _OR_NULL, ())]
        out += [(what, getattr(p, name), _TEXT_OR_NULL, ()) for what, name in _PHOTO_TEXT
                if name != "ocr" or migrate.schema_of(conn).photo_ocr]
    return out


_TEXT, _TEXT_OR_NULL = ("text",), ("text", "null")
# the photo fields a hit shows as text (Hit.to_dict, the web page), with what verify calls them
_PHOTO_TEXT = (("photo date sources", "taken_source"), ("cameras", "camera"), ("lenses", "lens"), ("captions", "caption"),
               ("texts read in images", "ocr"))


def malformed_values(conn: Connection) -> list[str]:
    """What of the catalog's numbers and shown text is of a type no writer stores, one line per column; [] when none. One scan
    per table (the columns are counted together)."""
    by_table: dict[Any, list] = {}
    for what, column, allowed, where in _typed_columns(conn):
        bad = and_(func.typeof(column).not_in(allowed), *where)
        kind = "text" if "text" in allowed else "bytes" if "blob" in allowed else "numbers"
        by_table.setdefault(column.table, []).append((what, kind, func.sum(case((bad, 1), else_=0))))
    # a status of the type a writer stores but no value it writes: readers refuse it (status_known), so verify says it
    known = and_(func.typeof(files.c.status) == "text", files.c.status.not_in([INDEXED, FAILED]))
    by_table.setdefault(files, []).append(("statuses", f"'{INDEXED}' or '{FAILED}'", func.sum(case((known, 1), else_=0))))
    found = []
    for table, counts in by_table.items():
        row = conn.execute(select(*[c for _, _, c in counts]).select_from(table)).one()
        found += [f"{DB_FILE} is damaged: {n} {what} are not {kind} as alignsearch writes them"
                  for (what, kind, _), n in zip(counts, row) if n]
    return found


def unreadable_tables(conn: Connection) -> list[str]:
    """The catalog's tables that do not read as readers read them (every column alignsearch selects), one line
    each; [] when all do. A flipped byte of a column's name in its CREATE statement (sqlite_schema's page) makes
    every reader refuse the catalog ("no such column: files.indexed_at", exit 7), yet SQLite's integrity check
    passes and verify, which selects only some of the columns, said ok. Each statement is prepared, not run (LIMIT
    0). Only the current schema: a reader of an older catalog reads some tables through views and lacks others."""
    if migrate.schema_of(conn).version != SCHEMA_VERSION:
        return []
    found = []
    for table in metadata.sorted_tables:
        try:
            conn.execute(select(*table.c).limit(0)).all()
        except DBAPIError as exc:
            reason = str(exc.orig).splitlines()[0][:160] if exc.orig is not None else type(exc).__name__
            found.append(f"{DB_FILE} is damaged: its table {table.name} does not read as alignsearch writes it ({reason})")
    return found


def misspelled_names(conn: Connection) -> list[str]:
    """The rows whose kept name bytes are not the name their key spells (sources.key_holds), as one line; [] when
    none. What readers refuse row by row (check_names), for `verify`: SQLite's integrity check compares each key with
    its index entry, but no index copies the bytes. A read of the rows that keep bytes (names that are not UTF-8 or
    hold a backslash), not of the catalog."""
    rows = conn.execute(select(files.c.relpath, files.c.relpath_raw).where(files.c.relpath_raw.is_not(None))).all()
    bad = sum(not sources.key_holds(relpath, raw) for relpath, raw in rows)
    return [f"{DB_FILE} is damaged: {bad} rows keep name bytes that are not the name their key spells"] if bad else []


def off_digest(conn: Connection) -> list[int]:
    """The ids of the files whose row, or photo fields, are not those their digest was written for (rowdigest.py),
    in id order: what readers refuse row by row (check_rows, photos_of), for `verify` (SQLite's integrity check
    cannot see a flipped byte in a value no index copies), and those whose vector address is off its seal (schema 17).
    One read of each table; [] before schema 14."""
    schema = migrate.schema_of(conn)
    if not schema.digests:
        return []
    found = set()
    # photo fields of no file are leftover_rows' (a note, dropped by --repair) or photo_keys_off's, not a row shown
    photo_fields = rowdigest.photo_fields(schema.photo_keys)
    for table, fields, key, where in ((files, FILE_DIGESTED, files.c.id, ()),
                                      (photos, photo_fields, photos.c.file_id, (photos.c.file_id.in_(select(files.c.id)),))):
        columns = [table.c[name] for name, _ in fields]
        rows = conn.execute(select(key, table.c.digest, *columns).where(*where)).all()
        found.update(r[0] for r in rows if not rowdigest.holds_shown(fields, r[2:], r[1]))  # fields' order: columns'
    if schema.vec_seals:  # vector addresses off their seals (schema 17), computed in SQL
        found.update(i for (i,) in conn.execute(select(files.c.id).where(_off_seal())))
    return sorted(int(i) for i in found)


def _off_seal():
    """SQL: a files row whose vector address is off its seal (schema 17; a seal no writer stores too). NULL beside NULL
    (a failed file's) is sealed."""
    return files.c.vec_seal.is_distinct_from(rowdigest.seal_of(files.c.vec_row))


def photo_seals_off(conn: Connection) -> list[int]:
    """The ids of the files whose photos row is off its field seal (rowdigest.field_seal: a date or place the filter
    columns refuse), in order; [] before schema 23. One read of the rows of files, checked in numpy."""
    if not (migrate.schema_of(conn).field_seals and has_photos(conn)):
        return []
    p = photos.c
    rows = conn.execute(select(p.file_id, p.field_seal, *(p[name] for name in rowdigest.PHOTO_SEALED))
                        .where(p.file_id.in_(select(files.c.id))).order_by(p.file_id)).all()
    return _seals_off(rows, seed=rowdigest.PHOTO_SEED)


def file_seals_off(conn: Connection) -> list[int]:
    """The ids of the files whose row is off its field seal (rowdigest.FILE_SEALED: a width, height, size or mtime the
    filter columns refuse), in order; [] before schema 24. One read of files, checked in numpy."""
    if not migrate.schema_of(conn).file_seals:
        return []
    f = files.c
    rows = conn.execute(select(f.id, f.field_seal, *(f[name] for name in rowdigest.FILE_SEALED)).order_by(f.id)).all()
    return _seals_off(rows, seed=rowdigest.FILE_SEED)


def _seals_off(rows, *, seed: int) -> list[int]:
    """The keys of the rows (key, field seal, the sealed fields) off their field seal."""
    import numpy as np

    if not rows:
        return []
    by_column = list(zip(*rows))
    keys = np.array(by_column[0], dtype=np.int64)
    return keys[~rows_sealed(keys, np.array(by_column[2:], dtype=np.float64), by_column[1], seed=seed)].tolist()


def rows_sealed(keys, fields, read, *, seed: int = rowdigest.PHOTO_SEED) -> np.ndarray:
    """Which rows hold their field seal (pure): keys, their sealed fields as float64 columns (NaN for NULL), the seals
    as read (seal_column: one a writer stores, equal to rowdigest.field_seals of the key and fields under `seed`):
    photos rows' (PHOTO_SEALED, PHOTO_SEED) or files rows' (FILE_SEALED, FILE_SEED). What verify (photo_seals_off,
    file_seals_off) and the filter columns (search/columns.py) both check."""
    seals, stored = seal_column(read)
    return stored & rowdigest.fields_sealed(keys, fields, seals, seed=seed)


def seal_column(read) -> tuple[np.ndarray, np.ndarray]:
    """Seals as read (a sequence: numpy int64, 0 for none) and which were ones a writer stores (an int: NULL, text or
    a REAL is none). In numpy where every value is an int or NULL (a file without a photos row), as writers leave
    them: a test of each value in Python weighed on the filter columns' load at 100k files (not recorded in
    RESULTS.md)."""
    import numpy as np

    if set(map(type, read)) <= {int, type(None)}:
        values = np.array(read, dtype=object)
        sealed = ~np.equal(values, None)
        values[~sealed] = 0
        return values.astype(np.int64), sealed.astype(bool)
    sealed = np.array([type(s) is int for s in read], dtype=bool)
    return np.array([s if type(s) is int else 0 for s in read], dtype=np.int64), sealed


def count_photos_scanned(conn: Connection) -> tuple[int, int]:
    """The photos rows, every one (a file's, or a row of no file), and of them those whose key is an indexed file's id,
    counted in one scan of the table (+file_id: no look-up by rowid). A row whose key flipped to the id of another file
    with a row of its own puts two rows of one key out of the page's order: a look-up (the filter columns' join) of the
    row's own id misses it, a scan still counts it. The LEFT JOIN keeps photos the scanned side, each row's file looked
    up by its id, the plan of the CROSS JOIN before it (an IN list of the indexed ids took three times as long at 1M
    files: its ephemeral index was built first). One scan for both counts: a count of every row and then a scanned
    count read a table of 2 KB captions twice (170 against 114 ms at 100k rows; 23 against 27 ms with short ones:
    benchmarks/bench_photo_counts.py)."""
    total, indexed = conn.exec_driver_sql(f"SELECT count(*), count(f.id) FROM {photos.name} p LEFT JOIN {files.name} f "
                                          "ON f.id = +p.file_id AND f.status = ?", (INDEXED,)).one()
    return int(total), int(indexed)


def count_off_seals(conn: Connection) -> int:
    """How many indexed files' vector addresses are off their seals (0 before schema 17): for `info`, which shows
    counts rather than reading each address (live_pairs refuses them), so says the damage beside them."""
    if not migrate.schema_of(conn).vec_seals:
        return 0
    return int(conn.execute(select(func.count()).select_from(files).where(files.c.status == INDEXED, _off_seal()))
               .scalar())


def photo_keys_off(conn: Connection, *, unindexed: bool = False) -> list[int]:
    """The keys (file_id) of the photos rows that name no file and fail their digest, in order: a flipped bit of a
    row's key (its rowid, which no index copies) moved it there, off its file, so readers missed the photo's fields
    (its date shown as none, exit 0). A row of no file that holds its digest is an old version's leftover
    (leftover_rows: a note). One read of the rows of no file; [] before schema 21 (their digests leave the key out:
    such a row cannot be told from a leftover). unindexed: the rows of files not indexed too (a failed file's id,
    which has no photo row of its own: readers, which show indexed files only, missed a row moved there as well;
    verify finds it as a row off its digest, off_digest)."""
    schema = migrate.schema_of(conn)
    if not (schema.digests and schema.photo_keys and has_photos(conn)):
        return []
    fields = rowdigest.PHOTO_KEYED_FIELDS
    named = select(files.c.id).where(files.c.status == INDEXED) if unindexed else select(files.c.id)
    query = select(photos.c.digest, *(photos.c[name] for name, _ in fields)).where(
        photos.c.file_id.not_in(named)).order_by(photos.c.file_id)
    return [int(r[1]) for r in conn.execute(query) if not rowdigest.holds_shown(fields, r[1:], r[0])]


def mendable_names(conn: Connection) -> dict[int, bytes | None] | None:
    """For the rows whose kept name bytes are not the name their key spells (misspelled_names): the bytes each
    key spells (sources.key_name), by file id; None when some row's cannot be rebuilt: keys written before keys
    were lossless (state.keys_lossless) left backslashes single, so their names are not in them. The key has a second
    copy in the unique index (SQLite's integrity check compares them), the bytes none: the key is the one to trust."""
    rows = conn.execute(select(files.c.id, files.c.relpath, files.c.relpath_raw)
                        .where(files.c.relpath_raw.is_not(None))).all()
    bad = [(file_id, relpath) for file_id, relpath, raw in rows if not sources.key_holds(relpath, raw)]
    if not bad:
        return {}
    if not state.read(conn, "keys_lossless").keys_lossless:
        return None
    names = {file_id: sources.key_name(relpath) for file_id, relpath in bad}
    return None if None in names.values() else {file_id: name[1] for file_id, name in names.items()}


def mend_names(conn: Connection, names: dict[int, bytes | None]) -> int:
    """Write these rows' name bytes (mendable_names) again, in the caller's transaction (verify --repair); how many."""
    for file_id, raw in names.items():
        conn.execute(update(files).where(files.c.id == file_id).values(relpath_raw=raw))
    return len(names)


def refuse_malformed(conn: Connection) -> None:
    """Raise the one-line error for values no writer stores (called where reading them failed)."""
    found = malformed_values(conn)
    raise IndexDamagedError((found[0] if found else f"{DB_FILE} is damaged: a value that alignsearch never writes")
                            + ": restore the index from a backup, or index the folders into a new --index DIR")


def files_without_phash(conn: Connection, after: int = 0, limit: int = 256, *,
                        without_ids: Iterable[int] = ()) -> list[FileRow]:
    """Indexed images (not video moments: theirs are hashed from their frames as they are indexed, and the fill
    read the whole video for each) with no phash yet, id > after, in id order (at most limit); less without_ids
    (files gone in this run), and files the fill could not read as they are now."""
    query = select(files).outerjoin(phashes, phashes.c.file_id == files.c.id).where(
        files.c.status == INDEXED, files.c.t.is_(None), phashes.c.file_id.is_(None), files.c.id > after,
        ~_fill_failed(FILL_PHASH), *_leaving_out(without_ids)).order_by(files.c.id).limit(limit)
    return _rows(conn.execute(query))


def forget_stale_phashes(conn: Connection) -> int:
    """Drop the phashes of files no longer in the catalog (replaced files get new ids)."""
    gone = select(files.c.id).where(files.c.id == phashes.c.file_id).exists()
    return conn.execute(delete(phashes).where(~gone)).rowcount


def indexed_after(conn: Connection, after: int, limit: int) -> list[FileRow]:
    """Indexed files with id > after, in id order (at most limit): a scan in bounded pages."""
    query = select(files).where(files.c.status == INDEXED, files.c.id > after).order_by(files.c.id).limit(limit)
    return check_rows(conn, _rows(conn.execute(query)))  # export writes them out: text failed deep in pyarrow


def shared_contents(conn: Connection, hashes: Iterable[str]) -> set[tuple[str, int]]:
    """The (sha256, moment) pairs among these hashes that more than one indexed row holds: only such rows can name
    one file between them (the same file has the same bytes), so only they need their links resolved (onefile.py)."""
    hashes, out = sorted(set(h for h in hashes if h)), set()
    for start in range(0, len(hashes), 500):
        query = _shared().where(files.c.sha256.in_(hashes[start : start + 500]))
        out.update((sha, int(moment)) for sha, moment in conn.execute(query))
    return out


def _shared():
    """The (sha256, moment) pairs that more than one indexed row holds, as a grouped query."""
    return (select(files.c.sha256, files.c.moment).where(files.c.status == INDEXED, files.c.sha256.is_not(None))
            .group_by(files.c.sha256, files.c.moment).having(func.count() > 1))


def rows_holding(conn: Connection, contents: Iterable[tuple[str, int]]) -> list[FileRow]:
    """Indexed rows holding these contents ((sha256, moment)). By moment, not by hash alone: every moment of a video
    holds the video's hash, and a search whose hits held moments of ten two-hour videos read all 36,000 of their
    rows (a FileRow each, ~0.7 s) to find the few rows naming those moments (benchmarks/bench_onefile_video.py).
    The pairs are joined as one JSON list (json_each), so each is a seek on files_sha256 (sha256, moment): as
    `(sha256, moment) IN (...)` SQLite used the index's first column alone and walked each video's moments."""
    pairs = sorted(set((h, int(m)) for h, m in contents if h))
    if not pairs:
        return []
    wanted = func.json_each(json.dumps(pairs)).table_valued("value").alias("wanted")
    query = select(files, _key_owner()).join(wanted, and_(files.c.sha256 == func.json_extract(wanted.c.value, "$[0]"),
                                                          files.c.moment == func.json_extract(wanted.c.value, "$[1]"))
                                             ).where(files.c.status == INDEXED)
    return check_rows(conn, check_names(conn.execute(query)))  # a hit may be shown by one of them (onefile.py)


def rows_of_contents(conn: Connection) -> list[FileRow]:
    """Indexed rows whose (sha256, moment) another indexed row shares, in id order, of the whole catalog (one grouped
    scan: export and the recent listing drop the rows naming a file another row stands for)."""
    shared = _shared().subquery()
    query = select(files).join(shared, and_(files.c.sha256 == shared.c.sha256, files.c.moment == shared.c.moment)
                               ).where(files.c.status == INDEXED)
    return check_rows(conn, sorted(_rows(conn.execute(query)), key=lambda r: r.id))


def duplicate_hashes(conn: Connection) -> list[list[int]]:
    """Ids of indexed files sharing one SHA-256, one list per content held more than once."""
    # moment 0 stands for a video: its moments share its hash without being copies of each other
    shared = select(files.c.sha256).where(files.c.status == INDEXED, files.c.sha256.is_not(None),
                                          files.c.moment == 0).group_by(files.c.sha256).having(func.count() > 1).subquery()
    query = select(files.c.sha256, files.c.id).where(files.c.status == INDEXED, files.c.moment == 0,
                                                    files.c.sha256.in_(select(shared.c.sha256))).order_by(
        files.c.sha256, files.c.id)
    groups: dict[str, list[int]] = {}
    for sha, i in conn.execute(query):
        groups.setdefault(sha, []).append(i)
    return list(groups.values())


def forget_extras(conn: Connection, ids: list[int]) -> None:
    """Drop what hangs off files that leave the catalog (their photo fields, keywords, fill failures, perceptual
    hashes and tags: the hash fill dropped a removed file's hash only on the next run, and verify counts what is
    left behind as damage)."""
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        conn.execute(delete(photos).where(photos.c.file_id.in_(chunk)))
        conn.execute(delete(tags).where(tags.c.file_id.in_(chunk)))
        if has_phashes(conn):
            conn.execute(delete(phashes).where(phashes.c.file_id.in_(chunk)))
        conn.execute(delete(fill_failures).where(fill_failures.c.file_id.in_(chunk)))
        conn.execute(delete(links).where(links.c.file_id.in_(chunk)))
        _drop_keywords(conn, chunk)


def has_keywords(conn: Connection) -> bool:
    return migrate.schema_of(conn).keywords


def has_photos(conn: Connection) -> bool:
    return migrate.schema_of(conn).photos


def keyword_text(relpath: str, caption: str | None, labels: Iterable[str] = (), ocr: str | None = None) -> str:
    """What the keyword index holds for a file: its caption, the text in the image, the words of its folders and
    name, each of its tags (one column: the text in an image weighs like a caption), with keywords.BREAK between
    them: joined by a space, the phrase "red car" matched a caption ending in red and the text read in the image
    starting with car."""
    from alignsearch.storage.keywords import BREAK

    words = relpath.replace("\\", "/").rsplit(".", 1)[0]
    for sep in "/_-.":
        words = words.replace(sep, " ")
    return f" {BREAK} ".join(p for p in (caption, ocr, words, *labels) if p)


def _drop_keywords(conn: Connection, ids: Iterable[int]) -> None:
    listed = ",".join(str(int(i)) for i in ids)
    if not listed:
        return
    schema = migrate.schema_of(conn)
    for table, present in ((KEYWORDS, schema.keywords), (KEYWORDS_TRIGRAM, schema.trigram)):
        if present:
            conn.exec_driver_sql(f"DELETE FROM {table} WHERE rowid IN ({listed})")


def _put_keywords(conn: Connection, file_id: int, text: str) -> None:
    """A file's keyword text, in both keyword tables (a writer's connect() has created them)."""
    from alignsearch.storage.keywords import coded_chunks, spaced

    for table in (KEYWORDS, KEYWORDS_TRIGRAM):
        conn.exec_driver_sql(f"DELETE FROM {table} WHERE rowid = ?", (int(file_id),))
    conn.exec_driver_sql(f"INSERT INTO {KEYWORDS}(rowid, body) VALUES (?, ?)", (int(file_id), spaced(text)))
    codes = coded_chunks(text)
    if codes:
        conn.exec_driver_sql(f"INSERT INTO {KEYWORDS_TRIGRAM}(rowid, body) VALUES (?, ?)", (int(file_id), codes))


def set_photo(conn: Connection, file_id: int, relpath: str, fields: dict, labels: Iterable[str] = ()) -> None:
    """Store a file's photo fields (with `ocr`, the text in it, when read) and its keyword text (one
    transaction with the caller's)."""
    conn.execute(delete(photos).where(photos.c.file_id == file_id))
    values = rowdigest.stored(PHOTO_DIGESTED, {"file_id": int(file_id), **{k: fields.get(k) for k in PHOTO_FIELDS}})
    conn.execute(insert(photos).values(digest=rowdigest.digest(PHOTO_DIGESTED, values),
                                       field_seal=rowdigest.field_seal(values["file_id"], values), **values))
    _put_keywords(conn, file_id, keyword_text(relpath, fields.get("caption"), labels, fields.get("ocr")))


PHOTO_FIELDS = ("taken", "taken_source", "camera", "lens", "lat", "lon", "caption", "ocr")


def stored_captions(conn: Connection, root: str, relpaths: list[str]) -> list[tuple[str, int, str | None]]:
    """(relpath, id, caption) of the indexed rows of these files of one root (a video's moments: one each), in one
    query: asked one file at a time, a listing that flagged a large folder's photos spent a query on each."""
    query = select(files.c.relpath, files.c.id, photos.c.caption).join(photos, photos.c.file_id == files.c.id).where(
        files.c.root == root, files.c.relpath.in_(relpaths), files.c.status == INDEXED)
    return [(r, int(i), c) for r, i, c in conn.execute(query)]


def set_captions(conn: Connection, captions: Iterable[tuple[int, str | None]]) -> None:
    """Store files' captions ((file id, caption or None)) and re-write their keyword text."""
    captions = list(captions)
    _change(conn, photos, [(i, {"caption": caption}) for i, caption in captions])
    refresh_keywords(conn, [i for i, _ in captions])


def set_ocr(conn: Connection, texts: Iterable[tuple[int, str]]) -> None:
    """Store the text read in files already indexed ((file id, text), "" for none) and re-write their keyword
    text; the vectors are not touched."""
    texts = list(texts)
    _change(conn, photos, [(i, {"ocr": text}) for i, text in texts])
    refresh_keywords(conn, [i for i, _ in texts])


def mark_failed(conn: Connection, ids: Iterable[int], reason: str) -> None:
    """Make these rows failed files with this reason (their digests written with them: _change)."""
    _change(conn, files, [(i, {"status": FAILED, "reason": reason}) for i in ids])


def relisted(conn: Connection, confirmed: Iterable[tuple[str, str, float]]) -> None:
    """Set the indexed_at of every row of each (root, relpath) to `when` (a listing that found its content the one
    recorded though its status changed: indexer/scan.py confirm), a video's moments alike, each digest with it.
    500 names a statement, each batch changed in turn: after a `chmod -R` of a library every file is confirmed, and
    a SELECT a file (1M: as long again as hashing them) and _change's rows of them all at once (about 2 KB a row)
    were the cost of that."""
    by_root: dict[str, dict[str, float]] = {}
    for root, relpath, when in confirmed:
        by_root.setdefault(root, {})[relpath] = float(when)
    for root, whens in by_root.items():
        names = list(whens)
        for start in range(0, len(names), 500):
            rows = conn.execute(select(files.c.id, files.c.relpath).where(
                files.c.root == root, files.c.relpath.in_(names[start : start + 500]))).all()
            _change(conn, files, [(i, {"indexed_at": whens[relpath]}) for i, relpath in rows])


def _change(conn: Connection, table: Table, changes: list[tuple[int, dict]]) -> None:
    """Change some shown fields of rows of files or photos ((file id, {field: value})), each row's digest in the same
    statement: that of the row as changed where it read as written, else the one it had (rowdigest.next_digest: an OCR
    fill, a caption read again or a re-encode's failure never blesses a damaged row; verify --repair reads its file
    again)."""
    fields, key = (FILE_DIGESTED, files.c.id) if table is files else (PHOTO_DIGESTED, photos.c.file_id)
    if table is photos and any(name in rowdigest.PHOTO_SEALED for _, change in changes for name in change):
        raise ValueError("a photo's date or place is written with its seal: set_photo")  # no caller changes them here
    if table is files and any(name in rowdigest.FILE_SEALED for _, change in changes for name in change):
        # no caller changes them here: a file changed on disk is indexed again (upsert_file: a new row, a new id)
        raise ValueError("a file's width, height, size or mtime is written with its seal: insert_file")
    ids = [int(i) for i, _ in changes]
    before: dict[int, dict] = {}
    for start in range(0, len(ids), 500):
        query = select(table).where(key.in_(ids[start : start + 500]))
        before.update({row._mapping[key]: dict(row._mapping) for row in conn.execute(query)})
    # one executemany per run of changes to the same fields, not a statement per row (an OCR fill's or a caption
    # reread's batch: benchmarks/bench_catalog_names.py), the runs in the order given: a row changed twice ends as
    # the old loop left it, changed last
    for names, run in itertools.groupby(changes, key=lambda c: tuple(c[1])):
        params = []
        for file_id, change in run:
            row = before.get(int(file_id))
            if row is None:
                continue  # no such row: the UPDATE changed nothing either
            after = {**row, **rowdigest.stored(fields, change)}
            written = rowdigest.next_digest(fields, row, row["digest"], after)
            params.append({"row_key": int(file_id), "new_digest": written, **{f"new_{k}": after[k] for k in names}})
        if params:
            conn.execute(update(table).where(key == bindparam("row_key")).values(
                digest=bindparam("new_digest"), **{k: bindparam(f"new_{k}") for k in names}), params)


def ocr_of(conn: Connection, ids: Iterable[int]) -> dict[int, str]:
    """{file id: the text read in it} of those files that were read ("" when none was found)."""
    ids, out = [int(i) for i in ids], {}
    for start in range(0, len(ids), 500):
        query = select(photos.c.file_id, photos.c.ocr).where(photos.c.file_id.in_(ids[start : start + 500]),
                                                             photos.c.ocr.is_not(None))
        out.update({i: t for i, t in conn.execute(query)})
    return out


def count_with_text(conn: Connection) -> int:
    """Indexed files in which text was found."""
    query = select(func.count()).select_from(photos.join(files, files.c.id == photos.c.file_id)).where(
        files.c.status == INDEXED, photos.c.ocr.is_not(None), photos.c.ocr != "")
    return int(conn.execute(query).scalar() or 0)


def count_without_ocr(conn: Connection, *, without_ids: Iterable[int] = ()) -> int:
    """Indexed images (not video moments: their text is not read) whose text has not been read yet and could
    be read before, less without_ids (files gone in this run): what files_without_ocr pages through."""
    query = select(func.count()).select_from(photos.join(files, files.c.id == photos.c.file_id)).where(
        files.c.status == INDEXED, files.c.t.is_(None), photos.c.ocr.is_(None), ~_fill_failed(FILL_OCR),
        *_leaving_out(without_ids))
    return int(conn.execute(query).scalar() or 0)


def files_without_ocr(conn: Connection, after: int = 0, limit: int = 256, *,
                      without_ids: Iterable[int] = ()) -> list[FileRow]:
    """Indexed images (not video moments) whose text has not been read yet, id > after, in id order (at most
    limit); less without_ids (files gone in this run) and the images whose text could not be read as they are now."""
    query = select(files).join(photos, photos.c.file_id == files.c.id).where(
        files.c.status == INDEXED, files.c.t.is_(None), photos.c.ocr.is_(None), files.c.id > after,
        ~_fill_failed(FILL_OCR), *_leaving_out(without_ids)).order_by(files.c.id).limit(limit)
    return _rows(conn.execute(query))


def files_without_photo(conn: Connection, after: int = 0, limit: int = 256, *,
                        without_ids: Iterable[int] = ()) -> list[FileRow]:
    """Indexed files with no photo fields yet (indexed before they existed), id > after, in id order; less
    without_ids and their videos' other moments (files gone in this run)."""
    query = select(files).outerjoin(photos, photos.c.file_id == files.c.id).where(
        files.c.status == INDEXED, photos.c.file_id.is_(None), files.c.id > after,
        *_leaving_out(without_ids)).order_by(files.c.id).limit(limit)
    return _rows(conn.execute(query))


# -- what a fill step could not read (fill_failures) ---------------------------------------------------------------

def _fill_failed(step: str):
    """The clause: the file's failure at `step` is recorded for its size and mtime as they are now."""
    ff = fill_failures
    return select(ff.c.file_id).where(ff.c.file_id == files.c.id, ff.c.step == step, ff.c.size == files.c.size,
                                      ff.c.mtime == files.c.mtime).exists()


def record_fill_failures(conn: Connection, step: str, failed: Iterable[tuple[int, str]]) -> None:
    """Remember that `step` could not read these files ((file id, reason)) as their rows stand now (size, mtime)."""
    now = time.time()
    for file_id, reason in failed:
        conn.execute(delete(fill_failures).where(fill_failures.c.file_id == int(file_id), fill_failures.c.step == step))
        conn.execute(insert(fill_failures).from_select(
            ["file_id", "step", "size", "mtime", "reason", "failed_at"],
            select(files.c.id, literal(step), files.c.size, files.c.mtime, literal(reason), literal(now)).where(
                files.c.id == int(file_id))))


def _fill_failures_now():
    """fill_failures joined to the indexed files whose size and mtime are those recorded."""
    ff = fill_failures
    return ff.join(files, and_(files.c.id == ff.c.file_id, files.c.size == ff.c.size, files.c.mtime == ff.c.mtime,
                               files.c.status == INDEXED, ff.c.step.in_(FILL_STEPS)))


def fill_failure_counts(conn: Connection) -> dict[str, int]:
    """{step: indexed files it could not read and skips until they change}, every step of FILL_STEPS (0 for a
    catalog older than the table, which a reader does not upgrade)."""
    found = dict.fromkeys(FILL_STEPS, 0)
    if migrate.schema_of(conn).fill_failures:
        query = select(fill_failures.c.step, func.count()).select_from(_fill_failures_now()).group_by(
            fill_failures.c.step)
        found.update({step: int(n) for step, n in conn.execute(query)})
    return found


def fill_failed_files(conn: Connection) -> list[tuple[FileRow, str, str]]:
    """(file, step, reason) of each file a fill step skips until it changes, in path order ([] before schema 4)."""
    if not migrate.schema_of(conn).fill_failures:
        return []
    step, reason = fill_failures.c.step.label("fill_step"), fill_failures.c.reason.label("fill_reason")  # files has a reason
    query = select(files, step, reason).select_from(_fill_failures_now()).order_by(
        files.c.root, files.c.relpath, files.c.moment, step)
    return [(FileRow(**{c.name: row._mapping[c] for c in files.c}), row.fill_step, _as_text(row.fill_reason))
            for row in conn.execute(query)]


def _as_text(value) -> str:
    """A text column's value as text, whatever a damaged row holds there (bytes, a number, NULL): `info --failed
    --json` failed on bytes."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return "" if value is None else str(value)


def _dangling_fill_failures():
    return ~select(files.c.id).where(files.c.id == fill_failures.c.file_id, files.c.status == INDEXED).exists()


def _unknown_fill_step():
    # a step no alignsearch of this schema writes: damage (a new step would come with a new schema version,
    # which this alignsearch refuses)
    return or_(fill_failures.c.step.is_(None), fill_failures.c.step.not_in(FILL_STEPS))


def count_dangling_fill_failures(conn: Connection, *, unknown_step: bool = False) -> int:
    """Fill failure rows that name no indexed file, or with unknown_step those that name no step of FILL_STEPS
    (verify; 0 before schema 4)."""
    if not migrate.schema_of(conn).fill_failures:
        return 0
    where = _unknown_fill_step() if unknown_step else _dangling_fill_failures()
    return int(conn.execute(select(func.count()).select_from(fill_failures).where(where)).scalar())


def forget_dangling_fill_failures(conn: Connection, *, unknown_step: bool = False) -> int:
    """Drop the fill failure rows that name no indexed file, or with unknown_step no step of FILL_STEPS (verify
    --repair); how many."""
    where = _unknown_fill_step() if unknown_step else _dangling_fill_failures()
    return conn.execute(delete(fill_failures).where(where)).rowcount


def _hanging_tables(conn: Connection, keywords: bool) -> list[tuple[str, str]]:
    """(table, the column naming its file) of the tables whose rows hang off a file, those this catalog has."""
    schema = migrate.schema_of(conn)
    return [(table, column) for table, column, present in (
        ("tags", "file_id", True), ("phashes", "file_id", schema.phashes), ("photos", "file_id", schema.photos),
        (KEYWORDS, "rowid", keywords and schema.keywords), (KEYWORDS_TRIGRAM, "rowid", keywords and schema.trigram))
        if present]


def leftover_rows(conn: Connection, *, keywords: bool = True) -> dict[str, int]:
    """How many rows of each table that hangs off a file (tags, perceptual hashes, photo fields, the keyword
    index) name no row of files, for the tables that have any (verify: no reader shows them, but nothing else
    drops them either). keywords=False leaves the keyword index out (a damaged one is written again whole)."""
    found = {}
    for table, column in _hanging_tables(conn, keywords):
        n = conn.exec_driver_sql(f"SELECT count(*) FROM {table} WHERE {column} NOT IN (SELECT id FROM files)").scalar()
        if n:
            found[table] = int(n)
    return found


def forget_leftover_rows(conn: Connection, *, keywords: bool = True) -> int:
    """Drop the rows leftover_rows counts (verify --repair); how many."""
    return sum(conn.exec_driver_sql(f"DELETE FROM {table} WHERE {column} NOT IN (SELECT id FROM files)").rowcount
               for table, column in _hanging_tables(conn, keywords))


def format_split_keywords(conn: Connection) -> list[int]:
    """Ids of the files whose keyword row holds a zero-width or other invisible character (keywords.holds_format):
    written before both sides dropped them, its words are cut there (`sun<U+200B>set` is `sun` `set`), so neither
    `sunset` nor the same text typed finds it. Derived data, a read of every row's text (verify): refresh_keywords
    writes them again. No schema step: a writer's rows are right, only these few are rewritten."""
    from alignsearch.storage.keywords import holds_format

    if not migrate.schema_of(conn).keywords:
        return []
    # indexed files only: refresh_keywords writes no other's row (a leftover row is verify's leftover_rows)
    rows = conn.exec_driver_sql(f"SELECT k.rowid, k.body FROM {KEYWORDS} k JOIN files f ON f.id = k.rowid "
                                "WHERE f.status = ?", (INDEXED,))
    return [int(rowid) for rowid, body in rows if body and holds_format(body)]


def refresh_keywords(conn: Connection, ids: Iterable[int] | None = None) -> None:
    """Re-write the keyword text of files (all when ids is None) from their caption, text, path and tags. A file
    without a photos row (indexed by a schema 1 alignsearch, before photos existed) is written from its path and
    tags: joined, not outer joined, its upgrade left it out of the keyword index and `harbour` found no harbour.jpg."""
    query = select(files.c.id, files.c.relpath, photos.c.caption, photos.c.ocr).outerjoin(
        photos, photos.c.file_id == files.c.id).where(files.c.status == INDEXED)
    labels: dict[int, list[str]] = {}
    if ids is None:
        for file_id, label in conn.execute(select(tags.c.file_id, tags.c.label)):
            labels.setdefault(file_id, []).append(label)
        rows = conn.execute(query).all()
    else:
        ids, rows = list(ids), []
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            rows += conn.execute(query.where(files.c.id.in_(chunk))).all()
            for file_id, label in conn.execute(select(tags.c.file_id, tags.c.label).where(tags.c.file_id.in_(chunk))):
                labels.setdefault(file_id, []).append(label)
    for file_id, relpath, caption, ocr in rows:
        _put_keywords(conn, file_id, keyword_text(relpath, caption, labels.get(file_id, ()), ocr))


def keyword_search(conn: Connection, words, limit: int, among: Iterable[int] | None = None) -> list[tuple[int, float]]:
    """(file id, bm25 score: lower is better) of indexed files that match `words`, best first: a parsed
    keywords.Query (AND, OR, -word, "phrases", prefixes, codes: alignsearch/storage/keywords.py), or a list of words
    (any of them). User text is never FTS5 syntax. among: only these ids (a filter's matches), applied in SQL
    before the limit, so a filter never starves the keyword ranking."""
    from alignsearch.storage import keywords

    if not words or not has_keywords(conn):
        return []
    return keywords.search(conn, keywords.as_query(words), limit, among)


def file_at(conn: Connection, root: str, relpath: str) -> FileRow | None:
    """The indexed file at (root, relpath), or None."""
    found = _rows(conn.execute(select(files).where(files.c.root == root, files.c.relpath == relpath,
                                                   files.c.status == INDEXED)))
    return found[0] if found else None


def name_problem(conn: Connection, root: str, relpath: str) -> str | None:
    """Why file_at found no row of (root, relpath) though the catalog's table holds one, or None. file_at finds a
    row through the unique index of names, which holds each name's second copy: a flipped byte of that entry hid a
    file from `similar FILE` ("is not an indexed image", exit 6, the user's mistake, while SQLite's integrity check
    called the catalog damaged). So a name found in no entry is looked for in the table itself: a scan, asked only
    on that miss (`similar` of a file never indexed, or new since the last run). A row there whose status is no
    status a writer stores (a flipped byte: 'indexod', or the text read as bytes) was the same "not an indexed
    image": that is refuse_malformed's one line."""
    found = conn.exec_driver_sql("SELECT id, status FROM files WHERE root = ? AND relpath = ?", (root, relpath)).all()
    if not all(isinstance(status, str) and status in (INDEXED, FAILED) for _, status in found):
        refuse_malformed(conn)
    entries = {i for i, _ in found}
    rows = {i for (i,) in conn.exec_driver_sql("SELECT id FROM files NOT INDEXED WHERE root = ? AND relpath = ?",
                                               (root, relpath))}
    return None if entries == rows else f"{DB_FILE} is damaged: its index of names does not hold the row of {relpath}"


def unlisted_roots(conn: Connection, listed: Iterable[str]) -> list[str]:
    """The roots the files table names that are not among `listed` (the meta table's roots), sorted: a read of the
    (root, relpath) index, for the error path and verify."""
    listed = set(listed)
    return [root for (root,) in conn.exec_driver_sql("SELECT DISTINCT root FROM files ORDER BY root") if root not in listed]


def unlisted_problem(roots: list[str]) -> str:
    """What rows of roots the meta table does not list mean (a run lists a root before it writes any row of it, and
    `forget` drops both at once): damage of that list."""
    return f"{DB_FILE} is damaged: it holds files of {', '.join(roots[:3])}, which its meta table does not list as roots"


def photos_of(conn: Connection, ids: Iterable[int]) -> dict[int, dict]:
    """{file id: its photo fields} ({} for an index written before they existed)."""
    if not has_photos(conn):
        return {}
    # a reader of a catalog older than photos.ocr (it cannot upgrade it) reads the columns there are
    schema = migrate.schema_of(conn)
    columns = [c for c in photos.c if (c.name != "ocr" or schema.photo_ocr) and (c.name != "digest" or schema.digests)
               and c.name != "field_seal"]  # the filter columns check it (search/columns.py); the digest covers more
    ids, out = list(ids), {}
    for start in range(0, len(ids), 500):
        query = select(*columns).where(photos.c.file_id.in_(ids[start : start + 500]))
        out.update({row.file_id: dict(row._mapping) for row in conn.execute(query)})
    if not all(isinstance(p[k], (int, float, type(None))) for p in out.values() for k in ("taken", "lat", "lon")):
        refuse_malformed(conn)  # shown as dates and places: text there raised deep in a query or export (exit 1)
    if not all(isinstance(p.get(k), (str, type(None))) for p in out.values() for _, k in _PHOTO_TEXT):
        refuse_malformed(conn)  # shown as text: bytes there (a flipped bit of the record's header) failed in JSON
    written = {i: p.pop("digest", None) for i, p in out.items()}  # checked here, never shown
    fields = rowdigest.photo_fields(schema.photo_keys)  # with the key from schema 21: p holds file_id
    if schema.digests and not all(rowdigest.holds(fields, p, written[i]) for i, p in out.items()):
        refuse_off_digest()  # a flipped byte in a caption, a camera, the text read in it
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
    sealed = migrate.schema_of(conn).vec_seals
    seal = "vec_seal" if sealed else "NULL"
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        # every status read, not only 'indexed': a flipped bit of a row's status ('indexed' read as 'hndexed', or
        # as bytes) left the row out as a file removed since, and the search answered one hit short with exit 0
        # (the ANN index still named the id, and SQLite's integrity check, which Engine._check_catalog runs when
        # rows are missing, sees no fault: status is in no index). A failed file is no hit, as before.
        sql = f"SELECT id, vec_row, status, {seal} FROM files WHERE id IN ({','.join('?' * len(chunk))})"
        rows = conn.exec_driver_sql(sql, tuple(chunk)).all()
        if not statuses_known(status for _, _, status, _ in rows):
            refuse_malformed(conn)
        indexed = [(i, vec_row, got) for i, vec_row, status, got in rows if status == INDEXED]  # a failed file: no hit
        # an indexed file always has one: NULL or text there is damage (NULL was left out and the file silently
        # missing from results; text raised ValueError, exit 1). Checked before the seal, whose arithmetic on text
        # raised TypeError (exit 1) and called a NULL one off its checksum rather than not a vector address
        if not all(type(vec_row) is int for _, vec_row, _ in indexed):
            refuse_malformed(conn)
        # the address scored is the one sealed (a flipped byte scored another file's vector under this name, exit 0)
        if sealed and not all(rowdigest.seal(vec_row) == got for _, vec_row, got in indexed):
            refuse_off_digest()
        out.update((i, vec_row) for i, vec_row, _ in indexed)
    return out


def label_counts(conn: Connection, tagging: Any) -> list[tuple[str, int]]:
    """tag_counts, then the labels of the remembered tagging runs (state.tagging) that tag no image yet, with 0
    (later index runs apply them): what `tags` and `info` list."""
    counts = tag_counts(conn)
    seen = {label.lower() for label, _ in counts}
    remembered = [label for run in state.runs_of(tagging) for label in run["labels"]]
    unused = [label for label in dict.fromkeys(remembered) if label.lower() not in seen]
    return counts + [(label, 0) for label in sorted(set(unused), key=str.lower)]


def tag_counts(conn: Connection) -> list[tuple[str, int]]:
    """[(label, indexed images tagged with it)], most used first. A video counts once, as `info` and `tag` count
    it: each of its moments carries its tags, and `tags` said "5  a thing" where `tag` said "3 tags on 3 images"."""
    tagged = (select(tags.c.label, files.c.root, files.c.relpath).join(files, files.c.id == tags.c.file_id)
              .where(files.c.status == INDEXED).distinct().subquery())
    n = func.count()
    query = select(tagged.c.label, n).group_by(tagged.c.label).order_by(n.desc(), tagged.c.label)
    return [(label, int(count)) for label, count in conn.execute(query)]
