"""How an index's catalog got its shape: numbered upgrade steps that writers apply and readers know.

The version lives in the meta table's `schema_version` (alignsearch/storage/state.py), not in PRAGMA
user_version: every alignsearch since the first reads that key and refuses, in one line, a version it does not
know. A version kept in user_version would be invisible to them: an older alignsearch would misread a catalog
a newer one upgraded instead of saying "upgrade alignsearch".

A writer (catalog.connect) runs every step its catalog lacks in one transaction that it opens itself
(BEGIN IMMEDIATE: SQLite's DDL is transactional, but Python's sqlite3 begins a transaction only before DML,
so a step's CREATE or ALTER would otherwise commit on its own), so a crash mid-way leaves the old version
whole, and a second writer waits for the first and then finds nothing to do. A reader never writes: it
accepts every version from 1 to LATEST as it stands, and learns what an older one lacks once per connection
(reader_schema), never per search. A version above LATEST is refused.

Adding a step: a function that brings version N-1 to N in the caller's transaction, appended to STEPS as
Step(N, ...); if readers of older versions must do without something it adds, a field of Schema says so.
"""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass
from typing import Callable

from alignsearch.errors import IndexDamagedError
from alignsearch.storage import metaseal, state

log = logging.getLogger(__name__)

# The files table's columns before video moments (schema 1-2). A version 1 catalog written before 6df5cc1 (the first
# alignsearch, aa1526b) lacks relpath_raw: step 2 adds it, a reader sees it NULL (UTF-8 names only then).
V2_COLUMNS = ("id", "root", "relpath", "relpath_raw", "size", "mtime", "sha256", "width", "height", "format", "status",
              "reason", "indexed_at", "vec_row")


@dataclass(frozen=True)
class Step:
    version: int  # the version this step brings a catalog to, from the one before
    what: str
    apply: Callable  # (SQLAlchemy Connection) -> None, in the caller's transaction


def _segments(conn) -> None:
    """files.vec_row became a (segment, row) address (alignsearch/storage/vectors.py): the addresses of a
    version 1 catalog are segment 0's, which read the same, and vectors.f16 is read as it is. A version 1
    catalog from before non-UTF-8 names (aa1526b until 6df5cc1) gains files.relpath_raw, NULL for every row
    (only UTF-8 names were stored then); step 3 then rebuilds the table with its columns in their order."""
    if "relpath_raw" not in _columns(conn.connection.dbapi_connection, "files"):
        conn.exec_driver_sql("ALTER TABLE files ADD COLUMN relpath_raw BLOB")


def _moments_and_text(conn) -> None:
    """Videos as moments and the text in images: the files table gains moment, t, t_end with (root, relpath,
    moment) unique (rebuilt: SQLite cannot change a unique constraint in place; ids and the autoincrement
    counter kept), photos gains ocr (NULL: not read), and the keyword index is built again with folded accents
    and its trigram twin from what the catalog holds (nothing is read from the images).

    First the tables that arrived in version 2 without a version bump (photos, phashes, the keyword index,
    and the other tables of catalog.metadata): a version 2 catalog written before them lacks them, so from
    version 3 on every table is there and readers need not look."""
    from alignsearch.storage import catalog

    have = _tables(conn.connection.dbapi_connection)
    catalog.metadata.create_all(conn, tables=[t for t in catalog.metadata.sorted_tables if t.name != catalog.files.name])
    _rebuild_files(conn)
    if catalog.photos.name in have:
        columns = {row[1] for row in conn.exec_driver_sql(f"PRAGMA table_info({catalog.photos.name})")}
        if "ocr" not in columns:
            conn.exec_driver_sql(f"ALTER TABLE {catalog.photos.name} ADD COLUMN ocr TEXT")
    _keywords_again(conn)


_DEFERRED = "alignsearch.migrate.keywords_again"  # conn.info: inside upgrade(), is a rebuild of the keywords due?


def _keywords_again(conn) -> None:
    """The keyword index and its trigram twin built again from what the catalog holds (nothing is read from the
    images). Inside upgrade() it is built once, after its last step: steps 3, 5-9, 11, 12, 16, 18 and 20 each ask for it, and a
    catalog from schema 1 was rebuilt five times in one transaction (~2.5 s each at 20,000 files); no step between
    reads the keyword tables."""
    if _DEFERRED in conn.info:
        conn.info[_DEFERRED] = True
        return
    _build_keywords(conn)


def _build_keywords(conn) -> None:
    from alignsearch.storage import catalog

    conn.exec_driver_sql(f"DROP TABLE IF EXISTS {catalog.KEYWORDS}")
    conn.exec_driver_sql(f"DROP TABLE IF EXISTS {catalog.KEYWORDS_TRIGRAM}")
    catalog.create_keywords(conn)
    catalog.refresh_keywords(conn)


def _spaced_keywords(conn) -> None:
    """The keyword index written again as keywords.spaced holds text (a Chinese or Japanese character a token, Greek
    without its accents): an index written before kept `東京駅前` one token and `Αθήνα` accented, so `東京` and
    `αθηνα` found them only in files whose keywords a later run happened to write again. Also an older alignsearch
    now says "upgrade alignsearch" where it would have found none of the spaced words (its query `東京`, one token,
    is in no text written so). Also drops the rows of files no longer in the catalog (catalog.leftover_rows): the
    hashes of removed files were left behind by every alignsearch before this step."""
    from alignsearch.storage import catalog

    _keywords_again(conn)
    catalog.forget_leftover_rows(conn, keywords=False)


def _broken_keywords(conn) -> None:
    """The keyword index written again with keywords.BREAK between a file's caption, text in the image, name and
    tags: an index written before joined them with a space, so the phrase "red car" matched a caption ending in
    red and text read in the image starting with car, until the file's keywords happened to be written again."""
    _keywords_again(conn)


def _thai_keywords(conn) -> None:
    """The keyword index made again with Thai vowel and tone marks as token characters and written as keywords.spaced
    holds text now (a Thai letter with its marks a token): an index written before cut a Thai run at every mark and
    dropped the marks, so `กรุงเทพ` found nothing inside `ตลาดกรุงเทพมหานคร` and `ข้าว` (rice) found `ข่าว` (news).
    The tokenizer is part of the table, so it is dropped and made again (_keywords_again), not only written again."""
    _keywords_again(conn)


def _hangul_edge_keywords(conn) -> None:
    """The keyword index written again with Hangul parted from a Latin or digit word it is written onto
    (keywords._HANGUL_EDGE): an index written before held `BTS의 공연` as the token `bts의`, so `BTS` did not find it
    (until the file's keywords happened to be written again). The tokenizer is unchanged; made again as the steps
    before did (_keywords_again)."""
    _keywords_again(conn)


def _width_keywords(conn) -> None:
    """The keyword index and its trigram twin written again with full-width ASCII as ASCII, the ideographic space a
    space and half-width katakana full-width (keywords.narrow): an index written before held `ＢＴＳのライブ` as the
    token `ｂｔｓ`, so `BTS` (and `2024`, `AB123`) did not find it (until the file's keywords happened to be written
    again). The tokenizer is unchanged; made again as the steps before did (_keywords_again)."""
    _keywords_again(conn)


def _digit_keywords(conn) -> None:
    """The keyword index and its trigram twin written again with every script's decimal digits as ASCII digits
    (keywords.narrow): an index written before held `ปี๒๕๖๗` as `ปี ๒๕๖๗`, so `2567` (and `2024` in `٢٠٢٤`) did not
    find it. Made again as the steps before did (_keywords_again)."""
    _keywords_again(conn)


def _lao_keywords(conn) -> None:
    """The keyword index made again with Lao vowel and tone marks as token characters and a Lao letter with its marks
    a token (keywords.LAO_MARKS), as step 7 made Thai: an index written before cut a Lao run at every mark and dropped
    the marks, so `ຫຼວງພະບາງ` found nothing (its ຼ parted `ຫ` from the rest) and no Lao word was found inside a
    longer run. The tokenizer is part of the table, so it is dropped and made again (_keywords_again)."""
    _keywords_again(conn)


def _mark_keywords(conn) -> None:
    """The keyword index made again with every script's combining marks (Mn, Mc) as token characters
    (keywords.TOKEN_CATEGORIES) and written without Arabic harakat, Hebrew points and the tatweel (keywords._POINTING):
    an index written before cut a Hindi word at its vowel signs and virama (`हिन्दी`: `ह` `न` `द`) and a vocalised
    Arabic or pointed Hebrew word into letters, so `كتب` found no `كَتَبَ` and `שלום` no `שָׁלוֹם`. The tokenizer is
    part of the table, so it is dropped and made again (_keywords_again)."""
    _keywords_again(conn)


def _nukta_keywords(conn) -> None:
    """The keyword index written again without the Indic nukta (keywords._POINTING: `बाज़ार` held as `बाजार`): an index
    written before kept it, so `बाजार`, as Hindi is mostly typed, found no `बाज़ार`, and `बाज़ार` no `बाजार`. The
    tokenizer is unchanged; made again as step 16 did (_keywords_again)."""
    _keywords_again(conn)


def _variant_keywords(conn) -> None:
    """The keyword index made again with Arabic and Persian letter variants as one letter (keywords._ARABIC_VARIANTS:
    `أسد` held as `اسد`, Persian `کتاب` as `كتاب`), Kangxi radicals as their ideographs (keywords._RADICALS), and 〇, the
    other CJK radicals (token characters now: keywords.RADICALS) and the supplementary planes' ideographs a character a
    token: an index written before held them as written, dropped a radical, and kept `𩸽𠮷` one token, so `اسد` found
    no `أسد`, `山` no `⼭` and `𩸽` no `𩸽𠮷`. The tokenizer is part of the table, so it is dropped and made again
    (_keywords_again)."""
    _keywords_again(conn)


def _content_index(conn) -> None:
    """files_sha256 on (sha256, moment) instead of sha256 alone: a search reads the rows holding each hit's content
    (search/onefile.py, catalog.rows_holding), and every moment of a video holds the video's hash, so each video
    among the hits walked all its moments in the index (bench_onefile_video.py). The name is kept: it serves the
    reads by hash alone as before (its first column)."""
    conn.exec_driver_sql("DROP INDEX IF EXISTS files_sha256")
    conn.exec_driver_sql("CREATE INDEX files_sha256 ON files (sha256, moment)")


def _rebuild_files(conn) -> None:
    from alignsearch.storage import catalog

    names = [row[1] for row in conn.exec_driver_sql("PRAGMA main.table_info(files)")]
    if not names or "moment" in names:
        return
    seq = conn.exec_driver_sql("SELECT seq FROM sqlite_sequence WHERE name = 'files'").scalar() or 0
    conn.exec_driver_sql("DROP INDEX IF EXISTS files_sha256")  # the name goes to the new table's index
    conn.exec_driver_sql("ALTER TABLE files RENAME TO files_before_moments")
    catalog.files.create(conn)
    cols = ", ".join(V2_COLUMNS)
    conn.exec_driver_sql(f"INSERT INTO files ({cols}) SELECT {cols} FROM files_before_moments")
    conn.exec_driver_sql("DROP TABLE files_before_moments")
    conn.exec_driver_sql("DELETE FROM sqlite_sequence WHERE name = 'files_before_moments'")
    conn.exec_driver_sql("UPDATE sqlite_sequence SET seq = max(seq, ?) WHERE name = 'files'", (int(seq),))
    if not conn.exec_driver_sql("SELECT 1 FROM sqlite_sequence WHERE name = 'files'").first() and seq:
        conn.exec_driver_sql("INSERT INTO sqlite_sequence (name, seq) VALUES ('files', ?)", (int(seq),))


def _fill_failures(conn) -> None:
    """The files a fill step (indexer/ocrfill.py, indexer/phashfill.py) could not read, remembered with the size
    and mtime they had, so the next runs skip them until they change (one that killed its decode worker twice
    cost two more deaths every run). A new table: readers of version 3 do without it (Schema.fill_failures)."""
    from alignsearch.storage import catalog

    catalog.fill_failures.create(conn, checkfirst=True)


def _links(conn) -> None:
    """The rows whose name is a symbolic link, with its target (catalog.links): a link replaced by a copy of its
    target looked unchanged to `index` (it stats through links), so no row changed. Made empty: a catalog's rows
    of links are not known until the next listing, which finds each link a change once and indexes it again (its
    vector reused: the content is known). Readers never read it, so one of an older catalog does without it."""
    from alignsearch.storage import catalog

    catalog.links.create(conn, checkfirst=True)


def _digests(conn) -> None:
    """A digest of each files and photos row's shown fields (alignsearch/storage/rowdigest.py), which readers compare
    with what they read: a flipped byte in a caption, a camera or a width was shown as it stood, exit 0, and verify
    said ok. Computed here from the values as they are, so an upgraded catalog is trusted as far as it was before
    (its rows had nothing to be checked against), and from now on every row is checked: a NULL digest is never
    taken for "unchecked", so a reader need not tell old rows from damaged ones. The columns may be there already:
    step 3 creates the tables it rebuilds or adds with catalog.metadata's columns."""
    dbapi = conn.connection.dbapi_connection
    for table in ("files", "photos"):
        if "digest" not in _columns(dbapi, table):
            conn.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN digest VARCHAR(16)")
    digest_rows(dbapi, keyed=False)  # as schema 14 wrote them: step 21 digests each photos row's key with them


def digest_rows(dbapi_conn: sqlite3.Connection, *, keyed: bool = True) -> None:
    """Write every files and photos row's digest from its values as they stand, in the caller's transaction, each
    photos row's with its key (rowdigest.photo_fields; keyed=False: as schemas 14 to 20 wrote them). Only the upgrade
    to schema 14 does (its rows had none); a writer digests what it writes (catalog.insert_file, set_photo), and
    verify --repair reads a file again rather than digest a damaged row anew."""
    from alignsearch.storage import rowdigest

    for table, fields, key in (("files", rowdigest.FILE_FIELDS, "id"),
                               ("photos", rowdigest.photo_fields(keyed), "file_id")):
        names = [name for name, _ in fields]
        rows = dbapi_conn.execute(f"SELECT {key}, {', '.join(names)} FROM {table}").fetchall()
        dbapi_conn.executemany(f"UPDATE {table} SET digest = ? WHERE {key} = ?",
                               [(rowdigest.digest(fields, dict(zip(names, row[1:]))), row[0]) for row in rows])


def _photo_keys(conn) -> None:
    """Each photos row's digest written again with its key (file_id, its rowid: rowdigest.PHOTO_KEYED_FIELDS): a
    flipped bit of the key moved the row to an id no file has, where every reader missed it (the photo's date shown
    as none, exit 0) and verify called it a harmless leftover. Only the rows whose digest holds as schema 14 wrote
    it: a row already off its digest stays off (readers and verify keep finding it), never blessed here."""
    rekey_photo_digests(conn.connection.dbapi_connection)


def rekey_photo_digests(dbapi_conn: sqlite3.Connection) -> int:
    """Step 21's work, in the caller's transaction: every photos row whose digest holds without its key digested
    again with it; how many were. One read of the table and one UPDATE per row re-digested."""
    from alignsearch.storage import rowdigest

    fields, keyed = rowdigest.PHOTO_FIELDS, rowdigest.PHOTO_KEYED_FIELDS
    names = ", ".join(name for name, _ in fields)
    rows = dbapi_conn.execute(f"SELECT file_id, digest, {names} FROM photos").fetchall()
    params = [(rowdigest.digest_of(keyed, row[:1] + row[2:]), row[0]) for row in rows
              if rowdigest.holds_shown(fields, row[2:], row[1])]
    dbapi_conn.executemany("UPDATE photos SET digest = ? WHERE file_id = ?", params)
    return len(params)


def _sealed_model(conn) -> None:
    """The model record's digest (alignsearch/storage/metaseal.py), which readers check from now on: a flipped byte
    of its fingerprint read as another model's (exit 5, "built with another model"), and verify said ok. Written from
    the record as it stands (read at the old version, which asks no digest of it), so an upgraded index is trusted
    as far as it was before; state.write seals every model record it stores."""
    got = state.read(conn, "model", "reindex")
    if got.model is not None:
        state.write(conn, model=got.model)
    if got.reindex is not None:
        state.write(conn, reindex=got.reindex)


def _vec_seals(conn) -> None:
    """A seal of each files row's vector address (rowdigest.seal), which readers that score by it check: a flipped
    byte of one scored another file's vector under its name (`similar` ranked the file itself #7), exit 0, and only
    verify noticed. Computed in SQL from the addresses as they stand, so an upgraded catalog is trusted as far as
    it was before. The column may be there already: step 3 creates the tables with catalog.metadata's columns."""
    _add_seals(conn, "files")


def _pending_seals(conn) -> None:
    """A seal of each address of a re-encode in progress (pending_vectors.vec_seal, rowdigest.seal), which its switch
    checks and moves with the address into files.vec_seal: it sealed each address anew as it read it, so a flipped
    byte in one went live already sealed (another file's vector under this name, exit 0). Computed in SQL from the
    addresses as they stand, as step 17 sealed the files' (a re-encode stopped at schema 18 resumes trusted as far
    as it was before). The column may be there already: step 3 creates the tables with catalog.metadata's columns."""
    _add_seals(conn, "pending_vectors")


def _pending_key_seals(conn) -> None:
    """Each pending address's seal made to cover its file id too (rowdigest.key_term, added to the seal as it stands):
    a re-encode's file id flipped into a gap of the ids, keys kept in order, was read as another file's and that
    file's old vector went live under it, exit 0. A seal off its address before stays off (the term is added, not
    the seal computed anew); a NULL stays NULL. A re-encode stopped at schema 21 resumes trusted as far as it was."""
    key_pending_seals(conn.connection.dbapi_connection)


def key_pending_seals(dbapi_conn: sqlite3.Connection) -> None:
    """Add each pending row's key term to its seal (schema 22), in the caller's transaction: the upgrade's step, and
    seal_rows' for pending rows a test writes by hand."""
    from alignsearch.storage import rowdigest

    dbapi_conn.execute(f"UPDATE pending_vectors SET vec_seal = (vec_seal + {rowdigest.key_term_sql('file_id')}) "
                       f"% {rowdigest.SEAL_PRIME}")


def _field_seals(conn) -> None:
    """A seal of each photos row's date and place with its key (photos.field_seal, rowdigest.field_seal), which the
    snapshot's filter columns check for every file in numpy: they read those fields unchecked (a digest a row was too
    slow there), so a byte flipped in a date left its file out of --after, exit 0. Only the rows whose digest holds
    are sealed: a row already off its digest stays off, and now off its seal too (readers and verify keep finding it).
    The column may be there already: step 3 creates the tables with catalog.metadata's columns."""
    dbapi = conn.connection.dbapi_connection
    if "field_seal" not in _columns(dbapi, "photos"):
        conn.exec_driver_sql("ALTER TABLE photos ADD COLUMN field_seal INTEGER")
    seal_photo_fields(dbapi)


def _file_seals(conn) -> None:
    """A seal of each files row's width, height, size and mtime with its id (files.field_seal, rowdigest.FILE_SEALED),
    which the snapshot's filter columns check for every indexed file in numpy: they read those fields unchecked, so a
    byte flipped in a width left its file out of `--where "width >= 640"`, exit 0. Only the rows whose digest holds
    are sealed, as step 23 sealed the photos rows. The column may be there already: step 3 creates the tables with
    catalog.metadata's columns."""
    dbapi = conn.connection.dbapi_connection
    if "field_seal" not in _columns(dbapi, "files"):
        conn.exec_driver_sql("ALTER TABLE files ADD COLUMN field_seal INTEGER")
    seal_file_fields(dbapi)


_SEALABLE = (int, float, type(None))  # what SQLite reads back from a REAL column a writer filled


def seal_photo_fields(dbapi_conn: sqlite3.Connection) -> int:
    """Step 23's work, and verify --repair's, in the caller's transaction: each photos row whose digest (with its key)
    holds and whose field seal does not sealed from its fields as they stand; how many were. One read of the table
    (a BLAKE2 digest a row checked: 1.1 s in all at 100k rows, RESULTS.md) and one UPDATE per row sealed."""
    from alignsearch.storage import rowdigest

    # a date or place no writer stores (text, bytes: a value damaged before step 14 digested it as it stood) is left
    # unsealed, which malformed_values reports (exit 7, one line): numpy could not read it as a float, and the upgrade
    # failed on it (ValueError, exit 1) for every command that opens the catalog to write
    return _seal_fields(dbapi_conn, table="photos", key="file_id", fields=rowdigest.PHOTO_KEYED_FIELDS,
                        sealed=rowdigest.PHOTO_SEALED, seed=rowdigest.PHOTO_SEED)


def seal_file_fields(dbapi_conn: sqlite3.Connection) -> int:
    """Step 24's work, and verify --repair's, in the caller's transaction: each files row whose digest holds and whose
    field seal does not sealed from its id and FILE_SEALED fields as they stand; how many were. A row whose digest
    fails (verify --repair indexes its file again) or that holds a value no writer stores (malformed_values reports
    it) is left unsealed: never blessed. The files digest does not cover the id: a row moved to another id is sealed
    there; a rowid flipped in the file is found by SQLite's integrity check (verify), not by the filter columns."""
    from alignsearch.storage import rowdigest

    return _seal_fields(dbapi_conn, table="files", key="id", fields=rowdigest.FILE_FIELDS,
                        sealed=rowdigest.FILE_SEALED, seed=rowdigest.FILE_SEED)


def _seal_fields(dbapi_conn: sqlite3.Connection, *, table: str, key: str, fields: tuple, sealed: tuple,
                 seed: int) -> int:
    """Each row of `table` whose digest (of `fields`) holds, whose `sealed` fields are numbers or NULL, and whose
    field_seal is not theirs (with its key, under `seed`) sealed; how many were. One read of the table and one UPDATE
    per row sealed."""
    from alignsearch.storage import rowdigest

    names = [name for name, _ in fields]
    at = [3 + names.index(name) for name in sealed]
    rows = dbapi_conn.execute(f"SELECT {key}, digest, field_seal, {', '.join(names)} FROM {table}").fetchall()
    held = [row for row in rows if all(type(row[i]) in _SEALABLE for i in at)
            and rowdigest.holds_shown(fields, row[3:], row[1])]
    seals = rowdigest.field_seals([row[0] for row in held], *([row[i] for row in held] for i in at), seed=seed).tolist()
    params = [(seal, row[0]) for seal, row in zip(seals, held) if seal != row[2]]
    dbapi_conn.executemany(f"UPDATE {table} SET field_seal = ? WHERE {key} = ?", params)
    return len(params)


def _add_seals(conn, table: str) -> None:
    """table's vec_seal column (added where step 3's create_all did not make it) filled from its addresses."""
    dbapi = conn.connection.dbapi_connection
    if "vec_seal" not in _columns(dbapi, table):
        conn.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN vec_seal INTEGER")
    seal_addresses(dbapi, table=table)


def seal_addresses(dbapi_conn: sqlite3.Connection, *, table: str = "files") -> None:
    """Seal every vector address of `table` (files, or pending_vectors) as it stands (rowdigest.seal, computed in
    SQL), in the caller's transaction. Only the upgrades to schema 17 (files) and 19 (pending_vectors) do (their rows
    had none); a writer seals what it writes."""
    from alignsearch.storage import rowdigest

    dbapi_conn.execute(f"UPDATE {table} SET vec_seal = {rowdigest.seal_sql('vec_row')}")


def seal_rows(dbapi_conn: sqlite3.Connection) -> None:
    """Digest every files and photos row (digest_rows) and, where the catalog has files.vec_seal (schema 17) and
    pending_vectors.vec_seal (schema 19; with its file id once the catalog is recorded at 22: key_pending_seals),
    seal each vector address (seal_addresses), and where it has photos.field_seal (schema 23) each photos row's date
    and place (seal_photo_fields), and where it has files.field_seal (schema 24) each files row's width, height, size
    and mtime (seal_file_fields), as they stand, in the caller's
    transaction: what a writer would have written, for rows a test or a benchmark writes by hand (never for damage a
    reader is meant to find)."""
    digest_rows(dbapi_conn)
    if "field_seal" in _columns(dbapi_conn, "files"):  # schema 24: each files row's width, height, size and mtime
        seal_file_fields(dbapi_conn)
    if "field_seal" in _columns(dbapi_conn, "photos"):  # schema 23: each photos row's date and place
        seal_photo_fields(dbapi_conn)
    for table in ("files", "pending_vectors"):
        if "vec_seal" in _columns(dbapi_conn, table):
            seal_addresses(dbapi_conn, table=table)
            if table == "pending_vectors" and _stored_version(dbapi_conn) >= PENDING_KEYS:
                key_pending_seals(dbapi_conn)  # and their file ids (schema 22)


def _stored_version(dbapi_conn: sqlite3.Connection) -> int:
    (version,) = dbapi_conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() or (0,)
    return int(version)


STEPS: tuple[Step, ...] = (
    Step(2, "vector addresses are (segment, row)", _segments),
    Step(3, "video moments, photos.ocr, accent-folded and trigram keyword indexes; every table present",
         _moments_and_text),
    Step(4, "the files a fill step could not read (fill_failures)", _fill_failures),
    Step(5, "keyword index: a token per Chinese or Japanese character, Greek without accents; rows of removed "
                "files dropped", _spaced_keywords),
    Step(6, "keyword index: a break between caption, text in the image, name and tags (no phrase across them)",
         _broken_keywords),
    Step(7, "keyword index: Thai vowel and tone marks are token characters, a Thai letter with its marks a token",
         _thai_keywords),
    Step(8, "keyword index: Hangul parted from a Latin or digit word it is written onto (BTS의: bts 의)",
         _hangul_edge_keywords),
    Step(9, "keyword index: full-width ASCII as ASCII, half-width katakana full-width (ＢＴＳ: bts)", _width_keywords),
    Step(10, "files_sha256 indexes (sha256, moment): a video's moment found without walking its others",
         _content_index),
    Step(11, "keyword index: every script's decimal digits as ASCII digits (๒๕๖๗: 2567)", _digit_keywords),
    Step(12, "keyword index: Lao vowel and tone marks are token characters, a Lao letter with its marks a token",
         _lao_keywords),
    Step(13, "the rows whose name is a symbolic link, with its target (links)", _links),
    Step(14, "a digest of each files and photos row's shown fields, which readers check", _digests),
    Step(metaseal.SEALED, "a digest of the model record, which readers check", _sealed_model),
    Step(16, "keyword index: every script's combining marks are part of their word; Arabic harakat and Hebrew points "
                 "dropped (كَتَبَ: كتب)", _mark_keywords),
    Step(17, "a seal of each files row's vector address, which readers that score by it check", _vec_seals),
    Step(18, "keyword index: the Indic nukta dropped (बाज़ार: बाजार)", _nukta_keywords),
    Step(19, "a seal of each address of a re-encode in progress, which its switch checks", _pending_seals),
    Step(20, "keyword index: Arabic and Persian letter variants one letter (أ: ا, ی: ي), Kangxi radicals their "
                 "ideographs; 〇, a radical and a supplementary-plane ideograph a token each (𩸽𠮷: 𩸽 𠮷)", _variant_keywords),
    Step(21, "a photos row's key digested with its fields, which readers check", _photo_keys),
    Step(22, "a re-encode's pending address sealed with its file id too, which its switch checks", _pending_key_seals),
    Step(23, "a seal of each photos row's date and place, which the filter columns check", _field_seals),
    Step(24, "a seal of each files row's width, height, size and mtime, which the filter columns check", _file_seals),
)
OLDEST = 1
LATEST = STEPS[-1].version
EVERY_TABLE = 3  # from this version on a catalog holds every table, and readers rely on it
ADDED = {"fill_failures": 4, "links": 13}  # tables that came after EVERY_TABLE: the version that brought each
DIGESTS = 14  # from this version on every files and photos row has a digest (rowdigest.py)
VEC_SEALS = 17  # from this version on every files row has files.vec_seal (rowdigest.seal)
PHOTO_KEYS = 21  # from this version on every photos row's digest covers its key (rowdigest.PHOTO_KEYED_FIELDS)
PENDING_KEYS = 22  # from this version on a pending address's seal covers its file id (rowdigest.pending_seal)
FIELD_SEALS = 23  # from this version on every photos row has photos.field_seal (rowdigest.field_seal)
FILE_SEALS = 24  # from this version on every files row has files.field_seal (rowdigest.FILE_SEALED)


def every_table(version: int | None) -> bool:
    """Must a catalog at `version` hold every table? (None: no version recorded, as one made at LATEST.)"""
    return (version or LATEST) >= EVERY_TABLE


def holds(version: int | None, table: str) -> bool:
    """Must a catalog at `version` hold this table?"""
    return every_table(version) and (version or LATEST) >= ADDED.get(table, EVERY_TABLE)


def pending(version: int | None) -> list[Step]:
    """The steps a catalog at `version` needs, in order (None: a new catalog, created at LATEST instead)."""
    check(version)
    return [] if version is None else [s for s in STEPS if s.version > version]


def check(version: int | None) -> None:
    """Refuse a version this alignsearch does not know (one written by a newer one)."""
    if version is not None and not OLDEST <= version <= LATEST:
        raise IndexDamagedError(f"index schema version {version} is not supported by this alignsearch (it reads "
                                f"{LATEST}): upgrade alignsearch")


def upgrade(conn) -> int | None:
    """Bring the catalog behind `conn` (a writer's) to LATEST, or create it there, in one transaction that
    this opens; the caller commits it (engine.begin()). Returns the version it had (None: new)."""
    if _version(conn) == LATEST:  # the usual case: no write, no lock (`alignsearch roots` runs beside an index run)
        return LATEST
    if not conn.connection.dbapi_connection.in_transaction:
        # the write lock first, then the version again: another writer may have upgraded it meanwhile
        conn.exec_driver_sql("BEGIN IMMEDIATE")
    before = _version(conn)
    steps = pending(before)
    if before is None:
        _create(conn)
    conn.info[_DEFERRED] = False
    try:
        for step in steps:
            log.info("upgrading the catalog to schema %d: %s", step.version, step.what)
            step.apply(conn)
        if conn.info[_DEFERRED]:  # once for every step that asked (_keywords_again)
            _build_keywords(conn)
    finally:
        del conn.info[_DEFERRED]  # conn.info lives with the pooled connection: a step applied alone builds at once
    if before != LATEST:
        state.write(conn, schema_version=LATEST)
    return before


def _version(conn) -> int | None:
    return state.read(conn, "schema_version").schema_version if "meta" in _tables(conn.connection.dbapi_connection) else None


def _create(conn) -> None:
    from alignsearch.storage import catalog

    catalog.metadata.create_all(conn)
    catalog.create_keywords(conn)


def _tables(dbapi_conn) -> set[str]:
    return {name for (name,) in dbapi_conn.execute("SELECT name FROM main.sqlite_master WHERE type = 'table'")}


def _columns(dbapi_conn, table: str) -> list[str]:
    return [row[1] for row in dbapi_conn.execute(f"PRAGMA main.table_info({table})")]


@dataclass(frozen=True)
class Schema:
    """What a reader may rely on in the catalog it opened (it never upgrades one). Every field is true from
    version 4 on; fill_failures alone is false at version 3; an older catalog is probed once, when a
    connection opens."""

    version: int | None = LATEST
    moments: bool = True  # files has moment, t, t_end (else the connection shows them through a view)
    photos: bool = True
    photo_ocr: bool = True  # photos.ocr
    phashes: bool = True
    keywords: bool = True
    trigram: bool = True  # the keyword index's trigram twin
    fill_failures: bool = True  # from version 4
    digests: bool = True  # files.digest and photos.digest, from version 14 (else the connection shows them NULL)
    vec_seals: bool = True  # files.vec_seal, from version 17 (else the connection shows it NULL)
    photo_keys: bool = True  # photos.digest covers the row's key (file_id), from version 21
    field_seals: bool = True  # photos.field_seal, from version 23 (else readers do without it)
    file_seals: bool = True  # files.field_seal, from version 24 (else the connection shows it NULL)


CURRENT = Schema()


def reader_schema(dbapi_conn: sqlite3.Connection) -> Schema:
    """What a read-only connection's catalog holds; a catalog older than version 3 gets a temporary view
    named `files` with the moment columns (and relpath_raw, NULL, where a version 1 catalog lacks it), and
    an empty temporary table for each other table it lacks that no Schema field covers (vector_chunks: no
    checksums yet, pending_vectors, tags): temp names shadow main ones, and temp objects need no write
    access. It then reads as photos, moment 0 with no times. A file that is not a catalog reads as CURRENT:
    the caller's first query reports it."""
    try:
        version = state.read(dbapi_conn, "schema_version").schema_version
    except (sqlite3.DatabaseError, ValueError):
        return CURRENT
    if version is not None and version >= 3:
        if version < FILE_SEALS:  # a temp view with the columns, NULL (unchecked): select(files) names them
            digest = "NULL AS digest, " if version < DIGESTS else ""
            vec_seal = "NULL AS vec_seal, " if version < VEC_SEALS else ""
            dbapi_conn.execute(f"CREATE TEMP VIEW IF NOT EXISTS files AS SELECT *, {digest}{vec_seal}NULL AS field_seal "
                               "FROM main.files")
        return Schema(version, fill_failures=holds(version, "fill_failures"), digests=version >= DIGESTS,
                      vec_seals=version >= VEC_SEALS, photo_keys=version >= PHOTO_KEYS,
                      field_seals=version >= FIELD_SEALS, file_seals=version >= FILE_SEALS)
    from sqlalchemy.dialects import sqlite as sqlite_dialect
    from sqlalchemy.schema import CreateTable

    from alignsearch.storage import catalog

    have = _tables(dbapi_conn)
    files = _columns(dbapi_conn, "files")
    found = Schema(version, moments=not files or "moment" in files, photos=catalog.photos.name in have,
                   photo_ocr="ocr" in _columns(dbapi_conn, catalog.photos.name), phashes=catalog.phashes.name in have,
                   keywords=catalog.KEYWORDS in have, trigram=catalog.KEYWORDS_TRIGRAM in have,
                   fill_failures=catalog.fill_failures.name in have, digests=False, vec_seals=False, photo_keys=False,
                   field_seals=False, file_seals=False)
    if not found.moments:
        columns = ", ".join(c if c in files else f"NULL AS {c}" for c in V2_COLUMNS)
        dbapi_conn.execute(f"CREATE TEMP VIEW IF NOT EXISTS files AS SELECT {columns}, 0 AS moment, "
                           "NULL AS t, NULL AS t_end, NULL AS digest, NULL AS vec_seal, NULL AS field_seal FROM main.files")
    elif files:
        dbapi_conn.execute("CREATE TEMP VIEW IF NOT EXISTS files AS SELECT *, NULL AS digest, NULL AS vec_seal, "
                           "NULL AS field_seal FROM main.files")
    covered = {catalog.files.name, catalog.photos.name, catalog.phashes.name, catalog.fill_failures.name}
    for table in catalog.metadata.sorted_tables:
        if table.name not in have and table.name not in covered:
            ddl = str(CreateTable(table).compile(dialect=sqlite_dialect.dialect())).strip()
            dbapi_conn.execute(ddl.replace("CREATE TABLE ", "CREATE TEMP TABLE IF NOT EXISTS ", 1))
    return found


def upgraded(dbapi_conn: sqlite3.Connection, schema: Schema) -> bool:
    """Whether the catalog behind a reader's connection is at another version than `schema`, found when the
    connection opened, says (a writer upgraded it meanwhile); False when it cannot be read now."""
    try:
        return state.read(dbapi_conn, "schema_version").schema_version != schema.version
    except (sqlite3.DatabaseError, ValueError):
        return False


def schema_of(conn) -> Schema:
    """The Schema of a SQLAlchemy connection's catalog: a reader's as found when it opened (catalog.open_readonly),
    a writer's CURRENT (catalog.connect upgraded it)."""
    return conn.info.get("schema", CURRENT)
