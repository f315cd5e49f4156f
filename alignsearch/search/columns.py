"""A snapshot's metadata as arrays: what filters are evaluated on, in numpy, in milliseconds at 1M rows.

Loaded from the catalog once per snapshot and on first use (numbers at once, each text column when a
filter first reads it), so a filtered query costs array comparisons, not a SQL scan per query. Rows
committed after the snapshot are not seen until the engine takes the next one, like the ANN index.
"""

from __future__ import annotations

import threading

import numpy as np
from sqlalchemy import or_, select

from alignsearch.media import sources
from alignsearch.storage import catalog, migrate, rowdigest
from alignsearch.search.filters import TextColumn

MOMENT = ("t", "t_end")  # loaded on first use: most indexes hold no video
NUMERIC = ("taken", "lat", "lon", "width", "height", "size", "mtime")
TEXT = {"camera": catalog.photos.c.camera, "lens": catalog.photos.c.lens, "format": catalog.files.c.format,
        "caption": catalog.photos.c.caption, "path": catalog.files.c.relpath, "root": catalog.files.c.root}


def all_joined(joined: int, photo_rows: int) -> bool:
    """Whether every photos row is an indexed file's: `joined` of the indexed files have one (file_id is the photos
    rowid: a row per file at most), of `photo_rows` rows in all. Then no row lies off an indexed file for
    catalog.photo_keys_off(unindexed=True) to read; a leftover of an old version, or a failed file's row, sends the
    load there."""
    return joined == photo_rows


def moment_query(name: str):
    """The rows Columns._load_moment reads for the moment column `name` (t or t_end): id, that column, the digest and
    the digested fields of every indexed moment's row."""
    f = catalog.files.c
    # every row of a moment, its t or t_end or its number set: a single flipped byte that made one of them NULL (or a
    # photo's t a time) leaves another to select the row by. Each row's digest is checked, not a seal (a t flipped in
    # sign left its moment out of `--media video`, exit 0): about half of this load, 236 of 491 ms at 100,000 moments
    # (RESULTS.md, bench_moment_load.py), once a snapshot; a seal checked in numpy would need a schema step
    return select(f.id, f[name], f.digest, *(f[field] for field, _ in catalog.FILE_DIGESTED)).where(
        f.status == catalog.INDEXED, or_(f.t.is_not(None), f.t_end.is_not(None), f.moment != 0))


class Columns:
    """ids (sorted) and vector addresses of the snapshot's indexed files, with their filterable fields."""

    def __init__(self, db):
        self._db = db
        self._lock = threading.Lock()
        self._text: dict[str, np.ndarray] = {}
        f, p = catalog.files.c, catalog.photos.c
        with db.connect() as conn:
            # one read transaction: all_joined compares the join's rows with a count read after it, and a writer
            # forgetting a file between the two made them equal beside a row of no file, which was then not read
            conn.exec_driver_sql("BEGIN")
            photos = catalog.has_photos(conn)
            schema = migrate.schema_of(conn)
            sealed, fields_sealed, files_sealed = schema.vec_seals, photos and schema.field_seals, schema.file_seals
            cols = [f.id, f.vec_row, p.taken if photos else f.mtime, p.lat if photos else None,
                    p.lon if photos else None, f.width, f.height, f.size, f.mtime, p.file_id if photos else None]
            cols = [c for c in cols if c is not None]
            seal_cols = [c for c, wanted in ((f.vec_seal, sealed), (p.field_seal, fields_sealed),
                                             (f.field_seal, files_sealed)) if wanted]
            # every row but a failed file's, its status read last: one whose status byte flipped ('indexee', or NULL)
            # was left out of the indexed ones here, so out of every filtered answer, exit 0 (an unfiltered search
            # refused it at the hit's row); statuses_known refuses it below
            query = select(*cols, *seal_cols, f.status).where(f.status.is_distinct_from(catalog.FAILED)).order_by(f.id)
            if photos:
                query = query.outerjoin(catalog.photos, p.file_id == f.id)
            # the driver's tuples, no SQLAlchemy Row a row (catalog.driver_rows: the values are the same): medians 777,
            # 509 and 648 ms against 759, 568 and 782 at 100k files, three runs at load 2-4 on 2 cores, the first one
            # slower, the least lower in each (RESULTS.md, reading "perf24")
            rows = catalog.driver_rows(conn, query)
            # by column, in one transposition (zip, in C): the rows sliced apart from their seals and each id and
            # address picked in Python were a large part of this load at 100k files (bench_photo_keys.py --seals; the
            # share was not recorded in RESULTS.md)
            by_column = list(zip(*rows)) or [()] * (len(cols) + len(seal_cols) + 1)
            if not catalog.statuses_known(by_column.pop()):  # none failed here: each is INDEXED, or damage
                catalog.refuse_malformed(conn)
            # the seals apart: one no writer stores (NULL, text, a REAL past int64, which raised OverflowError, exit 1)
            # is a value off its seal, as addresses_of and verify find it, not a value to restore from a backup:
            # verify --repair seals it anew
            # as read (seal_column), by table and name: photos and files both have a field_seal
            read_seals = {(c.table.name, c.name): by_column[len(cols) + i] for i, c in enumerate(seal_cols)}
            try:
                # (rows, columns), each column contiguous; as wide as the columns read where there are no rows (a
                # reshape to -1 could not tell, and was read as a malformed value)
                data = np.array(by_column[:len(cols)], dtype=np.float64).T
                self.ids = np.array(by_column[0], dtype=np.int64)
                self.vec_rows = np.array(by_column[1], dtype=np.int64)  # integers: addresses pass 2**53
            except (TypeError, ValueError):  # text or NULL where a writer stores numbers: one line, exit 7
                catalog.refuse_malformed(conn)
            # the photo fields filter and sort every file by, not only a hit's: a row whose key flipped to an id of no
            # file left its file without a date here (dropped by --after, sorted last, exit 0), and no hit then lacks
            # its row, so photos_of's look at the rows of no file never ran (schema 21: one read of those rows). Only
            # where there are such rows: every photos row joined to an indexed file leaves none to read (44 of 399 ms
            # of this load at 100k files, benchmarks/bench_photo_keys.py)
            joined = int(np.count_nonzero(~np.isnan(data[:, -1]))) if photos else 0
            # both counts in one scan of photos (two passes before: bench_photo_counts.py)
            photo_rows, scanned = catalog.count_photos_scanned(conn) if photos else (0, 0)
            if photos and not all_joined(joined, photo_rows) and catalog.photo_keys_off(conn, unindexed=True):
                catalog.refuse_photo_keys_off()
            # and a row whose key flipped to another indexed file's id, which has a row of its own: the join's look-up
            # of its own file missed it (read without a date or place: left out of --after and --near, exit 0)
            if joined != scanned:
                catalog.refuse_photo_keys_off()
        # every address scored is checked here, once per snapshot, in numpy: a flipped byte of one scored another
        # file's vector under its name, exit 0 (a hit's row alone would miss a file pushed out of the results)
        if sealed:
            seals, stored = catalog.seal_column(read_seals["files", "vec_seal"])
            if not (stored.all() and rowdigest.sealed(self.vec_rows, seals)):
                catalog.refuse_off_digest()
        # and every date and place filtered on (schema 23): a byte flipped in one left its file out of --after or
        # --near, exit 0, where a hit's row is refused (photos_of); a BLAKE2 digest a row was too slow here
        if fields_sealed and not self._photos_sealed(data, read_seals["photos", "field_seal"]):
            catalog.refuse_off_digest()
        # and every width, height, size and mtime (schema 24): a byte flipped in one left its file out of
        # `--where "width >= 640"`, exit 0, where a hit's row is refused (check_rows); a digest a row was too slow here
        at = 5 if photos else 3  # after the id, the address, and the date (and place) read first
        if files_sealed and not catalog.rows_sealed(self.ids, data[:, at:at + len(rowdigest.FILE_SEALED)].T,
                                                    read_seals["files", "field_seal"], seed=rowdigest.FILE_SEED).all():
            catalog.refuse_off_digest()
        self.photos = photos
        names = ["taken", "lat", "lon"] if photos else ["taken"]  # (then the photos row's key, when photos)
        names += ["width", "height", "size", "mtime"]
        # contiguous copies: a strided column of the row array compares several times slower
        self._numeric = {name: np.ascontiguousarray(data[:, 2 + i]) if len(rows) else np.zeros(0)
                         for i, name in enumerate(names)}
        for name in ("lat", "lon"):
            self._numeric.setdefault(name, np.full(len(rows), np.nan))

    def _photos_sealed(self, data: np.ndarray, read) -> bool:
        """Whether every indexed file's photos row (its key read beside its fields: the last column) holds the seal
        read beside it (catalog.rows_sealed), of its file's id and its date and place (the columns after the id
        and the address); a file with no photos row has none to hold."""
        row = ~np.isnan(data[:, -1])  # the files with a photos row
        return bool((catalog.rows_sealed(self.ids, data[:, 2:5].T, read) | ~row).all())

    def __len__(self) -> int:
        return len(self.ids)

    def column(self, name: str):
        """A numeric array (NaN where unknown) or a lower-cased, dictionary-encoded TextColumn."""
        if name in self._numeric:
            return self._numeric[name]
        if name in MOMENT:
            with self._lock:
                if name not in self._numeric:
                    self._numeric[name] = self._load_moment(name)
                return self._numeric[name]
        with self._lock:
            if name not in self._text:
                self._text[name] = self._load_text(name)
            return self._text[name]

    def _load_moment(self, name: str) -> np.ndarray:
        """A video moment's t or t_end by row (NaN for photos), read when a filter first asks; every moment's row
        checked against its digest (a one-line refusal, exit 7), as a hit's row is."""
        query = moment_query(name)
        with self._db.connect() as conn:
            rows = catalog.driver_rows(conn, query)  # the driver's tuples, as the files load above reads them
            if not all(type(row[1]) in (int, float, type(None)) for row in rows):  # a time stored as text: said so
                catalog.refuse_malformed(conn)
            if migrate.schema_of(conn).digests and not all(
                    rowdigest.holds_shown(catalog.FILE_DIGESTED, row[3:], row[2]) for row in rows):
                catalog.refuse_off_digest()
            values = {row[0]: row[1] for row in rows if row[1] is not None}
            out = np.full(len(self), np.nan)
            if values:
                found = np.isin(self.ids, np.fromiter(values, dtype=np.int64, count=len(values)))
                try:
                    out[found] = [values[i] for i in self.ids[found].tolist()]
                except (TypeError, ValueError):  # a time stored as text: one line, exit 7
                    catalog.refuse_malformed(conn)
        return out

    def _load_text(self, name: str) -> np.ndarray:
        col = TEXT[name]
        if col.table is catalog.photos and not self.photos:
            return TextColumn(np.zeros(len(self), dtype=np.int32), [None])
        query = select(catalog.files.c.id, col).where(catalog.files.c.status == catalog.INDEXED)
        if col.table is catalog.photos:
            query = query.outerjoin(catalog.photos, catalog.photos.c.file_id == catalog.files.c.id)
        if name == "path":  # matched as shown, not as the key (which doubles backslashes: sources.catalog_key)
            query = query.add_columns(catalog.files.c.relpath_raw)
        with self._db.connect() as conn:
            rows = catalog.driver_rows(conn, query)  # the driver's tuples, as the files load above reads them
        values = {r[0]: sources.shown_name(r[1], r[2]) for r in rows} if name == "path" else dict(rows)
        return TextColumn.of([None if (v := values.get(int(i))) is None else str(v).lower() for i in self.ids.tolist()])

    def tagged(self, label: str) -> np.ndarray:
        """Rows with this tag (case-insensitive)."""
        with self._db.connect() as conn:
            ids = np.array(catalog.ids_with_tag(conn, label), dtype=np.int64)
        return np.isin(self.ids, ids)

    def rows_of(self, ids: np.ndarray) -> np.ndarray:
        """Positions of these ids (all present) in the arrays."""
        return np.searchsorted(self.ids, ids)

    def rows_present(self, ids: np.ndarray) -> np.ndarray:
        """Positions of those of these ids that are in the arrays, in their order; the others (an ANN id whose
        file left the indexed ones after the ANN index was built) dropped, not read as a neighbour's row."""
        ids = np.asarray(ids, dtype=np.int64)
        pos = np.searchsorted(self.ids, ids)
        inside = pos < len(self.ids)
        inside[inside] = self.ids[pos[inside]] == ids[inside]
        return pos[inside]
