"""`alignsearch export`: every indexed image's metadata and embedding, in formats other tools read.

- parquet: one file, one row per indexed image or video moment (id, path, root, relpath, width, height, format,
  size, mtime, taken, caption, tags, t and t_end: a moment's seconds, null for photos; embedding as a fixed-size
  list of float32), written in row groups of
  `batch` rows, so memory stays bounded whatever the library's size.
- clip-retrieval: the layout clip-retrieval writes and autofaiss / embedding-reader read:
  `img_emb/img_emb_{i}.npy` (float16, n x dim, unit rows) and `metadata/metadata_{i}.parquet` (image_path,
  caption, and our columns), row i of one matching row i of the other, `shard_rows` rows per pair, and
  `alignsearch-export.json` (MARKER) listing them: a later export of OUT replaces only what it lists, unchanged
  (clip_refusal).

Memory: the catalog is read in pages of PAGE rows by id, each page's vectors with plain reads into one
reused buffer (vectors.read_into: the store's memory map would leave every page read resident, 1.28 GB at
1M x 640-d), and a parquet row group is written as soon as its `batch` rows are in, from one reused float32
buffer (168 MB at 640-d, the largest part; the embedding column without a dictionary, which the writer
would otherwise try for each row group). clip-retrieval writes each page's vectors as they are read.

`taken` (EXIF capture time, else the file's mtime: photometa.read) and `caption` come from the catalog's photo fields
(alignsearch/media/photometa.py), `tags` from `alignsearch tag`. Filters: `where` (the --where language of
alignsearch/search/filters.py), `path` (a glob on the relative path, as `query --path`) and `roots` (root names).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from alignsearch import atomic
from alignsearch.storage import catalog, state, vectors
from alignsearch.search import filters, onefile
from alignsearch.errors import CatalogBusyError, UsageError
from alignsearch.storage.paths import DB_FILE, INDEX_DIRNAME

log = logging.getLogger(__name__)

FORMATS = ("parquet", "clip-retrieval")
BATCH = 65_536  # rows per parquet row group: 168 MB of float32 at 640-d, the largest thing export holds
PAGE = 8_192  # rows per catalog page and per vector read
SHARD_ROWS = 1_000_000  # rows per img_emb_{i}.npy, as clip-retrieval's default write batch
CLIP_FOLDERS = {"img_emb": re.compile(r"img_emb_(\d+)\.npy"), "metadata": re.compile(r"metadata_(\d+)\.parquet")}
# what a clip-retrieval export wrote (names, sizes, sha256), written with it: a later export replaces only these
MARKER = "alignsearch-export.json"
# The most of a MARKER read: MARKER_MAX, and MARKER_PER_FILE more for each file there is to check against it (an
# entry is ~135 bytes). A fixed 16 MiB (~60k shards) refused the next export of OUT after one of 620k rows with
# --shard-rows 10: its own list was "too large". Larger is not one an export wrote (nor read whole into memory).
MARKER_MAX = 1 << 24
MARKER_PER_FILE = 1024
REFUSED = "export replaces only files it wrote: give another OUT, or remove them yourself"


def _schema(dim: int) -> pa.Schema:
    return pa.schema([
        ("id", pa.int64()), ("path", pa.string()), ("root", pa.string()), ("relpath", pa.string()),
        ("width", pa.int32()), ("height", pa.int32()), ("format", pa.string()), ("size", pa.int64()),
        ("mtime", pa.float64()), ("taken", pa.timestamp("s")), ("caption", pa.string()),
        ("tags", pa.list_(pa.string())), ("t", pa.float64()), ("t_end", pa.float64()),  # a video moment's seconds
        ("path_b64", pa.string()),  # the path's bytes (base64) when it is not UTF-8
        ("embedding", pa.list_(pa.float32(), dim)),
    ])


def _allowed(snap, db, where: str | None, path: str | None) -> np.ndarray | None:
    """Sorted ids the filters admit (alignsearch/search/filters.py, evaluated on the snapshot's columns); None: all."""
    node = filters.build(filters.FilterOptions(where=where, path=path))
    if node is None:
        return None
    cols = snap.columns(db)
    return np.sort(cols.ids[filters.evaluate(node, cols.column, cols.tagged)])


def _holds(allowed: np.ndarray | None, file_id: int) -> bool:
    """Whether the sorted ids `allowed` (None: all) hold file_id."""
    if allowed is None:
        return True
    at = int(np.searchsorted(allowed, file_id))
    return at < len(allowed) and int(allowed[at]) == file_id


def batches(engine, batch: int = PAGE, roots: list[str] | None = None, where: str | None = None,
            path: str | None = None, tally: dict | None = None) -> Iterator[tuple[list, np.ndarray, dict]]:
    """(catalog rows, their fp16 vectors, {id: {"taken", "caption", "tags"}}) of the indexed files the
    filters admit, in id order, at most `batch` at a time. A file several admitted rows name (two roots, a
    file:// URL, a symlink beside its target) is one row, the one search shows (onefile.py): an export wrote it
    once per name. tally["same_file"]: how many admitted rows were left out so; tally["moments"]: how many rows
    yielded are video moments (the rest are images).

    Memory stays bounded: the catalog is read in pages of `batch` rows by id, and the vectors with plain
    reads (vectors.read_into) into one buffer that each page overwrites, so the caller must use (or copy)
    a page's vectors before asking for the next. Not through the store's memory map: every row is read
    once, and mapped pages would stay in the process's resident memory (1.28 GB at 1M rows of 640-d)."""
    snap = engine.snapshot()  # refreshed: an engine opened before a switch holds the old generation
    allowed = _allowed(snap, engine.db, where, path)
    with engine.db.connect() as conn:  # rows of shared content only: a library without copies reads nothing more
        shared = catalog.rows_of_contents(conn)
        same = onefile.others(shared, lambda r: (not roots or r.root in roots) and _holds(allowed, r.id))
        reals: dict = {}
        lent = onefile.captions_by_entry(conn, [r for r in shared if r.id in same], reals)
    if tally is not None:  # every id others gives is an admitted row's, left out of the pages below
        tally["same_file"] = len(same)
    shared_ids = {r.id for r in shared} if lent else set()
    buffer = np.empty((batch, snap.store.dim), dtype=vectors.DTYPE)
    store, after = snap.store, 0
    while True:
        with engine.db.connect() as conn:
            rows = catalog.indexed_after(conn, after, batch)
            if not rows:
                return
            after = rows[-1].id
            if roots:
                rows = [r for r in rows if r.root in roots]
            if allowed is not None:
                ids = np.array([r.id for r in rows], dtype=np.int64)
                rows = [r for r, ok in zip(rows, np.isin(ids, allowed)) if ok]
            if same:
                rows = [r for r in rows if r.id not in same]
            ids = [r.id for r in rows]
            # checked as a search's hits are: a row a damaged page hides was written with no date or caption, exit 0
            photo, labels = engine.photos_of(conn, ids, snap), catalog.labels_of(conn, ids)
            # read after the rows: rows holding a new generation's addresses (a re-encode's or a compaction's
            # switch) are never read from this snapshot's files
            moved = state.read(conn, "generation").generation != snap.generation
            try:
                addresses = np.array([r.vec_row for r in rows], dtype=np.int64)
            except (TypeError, ValueError):  # an indexed row with no vector address: one line, exit 7
                catalog.refuse_malformed(conn)
            if not moved:  # rows an `index` run committed since the snapshot, in the same generation
                store = vectors.holding(conn, store, addresses, engine.dir)
        if moved:
            raise CatalogBusyError("the index switched to a new generation (a re-encode or a compaction of its "
                                   "vectors) during the export: run it again")
        extra = {i: {"taken": photo.get(i, {}).get("taken"), "caption": photo.get(i, {}).get("caption"),
                     "tags": labels.get(i, [])} for i in ids}
        for r in rows:  # a file with no caption of its own: that of a name of it left out (captions_by_entry)
            if r.id in shared_ids and not extra[r.id]["caption"]:
                extra[r.id]["caption"] = lent.get(onefile.named(r, reals)[0])
        if rows:
            if tally is not None:  # a video's moments are rows of their own: said apart from images
                tally["moments"] = tally.get("moments", 0) + sum(r.t is not None for r in rows)
            yield rows, vectors.read_into(store, addresses, buffer), extra


def _columns(rows: list, tags: dict, schema: pa.Schema) -> list[pa.Array]:
    """The schema's columns but the embedding, for these rows."""
    shown = [catalog.shown_path(r.path) for r in rows]  # a name that is not UTF-8: \xNN text, bytes in path_b64
    columns = {
        "id": [r.id for r in rows], "path": [p for p, _ in shown], "path_b64": [b for _, b in shown],
        "root": [catalog.shown_path(r.root)[0] for r in rows],
        "relpath": [r.shown_relpath for r in rows], "width": [r.width for r in rows], "height": [r.height for r in rows],
        "format": [r.format for r in rows], "size": [r.size for r in rows], "mtime": [r.mtime for r in rows],
        "taken": [None if tags[r.id]["taken"] is None else int(tags[r.id]["taken"]) for r in rows],
        "caption": [tags[r.id]["caption"] for r in rows], "tags": [tags[r.id]["tags"] for r in rows],
        "t": [r.t for r in rows], "t_end": [r.t_end for r in rows],
    }
    return [pa.array(columns[f.name], type=f.type) for f in schema if f.name != "embedding"]


def _record_batch(rows: list, embeddings: np.ndarray, tags: dict, schema: pa.Schema) -> pa.RecordBatch:
    """One parquet record batch; `embeddings` (float32, contiguous) is referenced, not copied."""
    dim = embeddings.shape[1]
    embedding = pa.FixedSizeListArray.from_arrays(pa.array(embeddings.reshape(-1)), dim)
    return pa.RecordBatch.from_arrays(_columns(rows, tags, schema) + [embedding], schema=schema)


class _Groups:
    """Record batches gathered into row groups of `size` rows, each written as soon as it is full (one
    write_table per row group: the writer encodes it column by column, one record batch at a time)."""

    def __init__(self, writer: pq.ParquetWriter, schema: pa.Schema, size: int):
        self.writer, self.schema, self.size = writer, schema, size
        self.pending: list[pa.RecordBatch] = []
        self.filled = self.written = 0

    def room(self) -> int:
        return self.size - self.filled

    def add(self, part: pa.RecordBatch) -> None:
        self.pending.append(part)
        self.filled += part.num_rows
        if self.filled >= self.size:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.writer.write_table(pa.Table.from_batches(self.pending, self.schema), row_group_size=self.size)
            self.written += 1
        self.pending, self.filled = [], 0


def export_mode(index_mode: int) -> int:
    """The mode of an export file of an index whose folder has index_mode: 0644 less the read bits the index folder
    denies. An export holds what the index does (paths, captions, OCR text, places); `index` narrows the folder of an
    index of photos others cannot open (privacy: 0700), but its export was written 0644 (less the umask), so
    `export /tmp/lib.parquet` of the index of a 0700 folder of photos was read by every user."""
    return 0o600 | (0o044 & index_mode)


def export_parquet(engine, out: Path, batch: int | None = None, folder: tuple[int, int] | None = None,
                   **filters) -> dict:
    """Write one parquet file in row groups of `batch` rows; returns {"rows", "path", "row_groups"}. folder: OUT's
    folder as check_out found it, the one written (atomic.writing's folder).

    Holds at most one row group's float32 embeddings (one buffer, reused), one catalog page and its fp16
    vectors, and what the parquet writer needs to encode one record batch."""
    out, batch = Path(out), batch or BATCH
    out.parent.mkdir(parents=True, exist_ok=True)
    dim = int(engine.snap.store.dim)
    schema = _schema(dim)
    group = np.empty((batch, dim), dtype=np.float32)  # the row group's embeddings, filled page by page
    n, tally = 0, {}
    # no dictionary for the embedding: distinct floats never fit one, and the writer would buffer the
    # column's pages (and a hash table) until it gave up, ~80 MB more per row group at 640-d
    plain = [f.name for f in schema if f.name != "embedding"]
    # written through the descriptor of a fresh temporary file beside `out`, renamed over it when complete
    mode = export_mode(os.stat(engine.dir).st_mode)
    with atomic.writing(out, mode=mode, folder=folder) as f, pq.ParquetWriter(f, schema, compression="zstd", use_dictionary=plain) as writer:
        groups = _Groups(writer, schema, batch)
        for rows, vecs, tags in batches(engine, min(PAGE, batch), **filters, tally=tally):
            while rows:
                take = min(len(rows), groups.room())
                emb = group[groups.filled : groups.filled + take]
                emb[:] = vecs[:take]  # fp16 -> float32
                groups.add(_record_batch(rows[:take], emb, tags, schema))  # written (and emb free) when full
                rows, vecs, n = rows[take:], vecs[take:], n + take
            log.info("exported %d rows", n)
        groups.flush()
    return {"format": "parquet", "rows": n, "path": str(out), "row_groups": groups.written,
            "same_file": tally.get("same_file", 0), "moments": tally.get("moments", 0)}


NOT_TAKEN = object()  # export_clip_retrieval's `seen` when its caller took no fingerprint of OUT


def export_clip_retrieval(engine, out: Path, batch: int | None = None, shard_rows: int = SHARD_ROWS,
                          seen: dict | None | object = NOT_TAKEN, folder: tuple[int, int] | None = None,
                          **filters) -> dict:
    """Write OUT/img_emb/img_emb_{i}.npy and OUT/metadata/metadata_{i}.parquet; returns {"rows", "shards"}.

    The vectors go to disk as each page is read (fp16, as stored); metadata row groups hold `batch` rows.
    The layout is written in a fresh folder beside OUT that then replaces it whole: an earlier export's
    shards beyond the new count go with it, and a failed export leaves OUT as it was. `seen`: OUT's
    _fingerprint when check_out accepted it (export takes it before the check; None: there was no OUT); OUT
    must still be so at the swap. Not given (a direct call, not export's), it is taken here and OUT checked as
    export checks it: the default None refused every OUT that existed ("changed during the export"). folder: OUT's
    folder as check_out found it, the one written (atomic.replacing_dir's folder)."""
    if seen is NOT_TAKEN:
        seen = _fingerprint(Path(out))
        folder = check_out(Path(out), "clip-retrieval")
    allowed = 0o700 | (0o055 & os.stat(engine.dir).st_mode)  # as private as the index folder: export_mode
    with atomic.replacing_dir(out, superseded=lambda old: [*CLIP_FOLDERS, MARKER], allowed=allowed,
                              folder=folder) as tmp:
        result = _write_clip_retrieval(engine, tmp, batch, shard_rows, **filters)
        _write_marker(tmp)
        # the swap deletes what OUT's img_emb/ and metadata/ hold: anything put there since the check (an
        # export can take minutes) was never looked at, so the export is refused and OUT left as it is now
        if _fingerprint(Path(out)) != seen:
            raise UsageError(f"{out} changed during the export; nothing was replaced: run it again")
    return {**result, "path": str(out)}


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _write_marker(folder: Path) -> None:
    """folder/MARKER: every file the export wrote in folder, with its size and sha256 (read back once: the .npy
    header is rewritten after its rows, so no digest can be taken as the bytes go out)."""
    files = {f"{sub}/{name}": {"size": (folder / sub / name).stat().st_size, "sha256": _sha256(folder / sub / name)}
             for sub in CLIP_FOLDERS for name in sorted(os.listdir(folder / sub))}
    (folder / MARKER).write_text(json.dumps({"written_by": "alignsearch export", "format": "clip-retrieval",
                                             "files": files}, indent=1) + "\n")


def _fingerprint(out: Path) -> dict | None:
    """(size, mtime, inode, mode) of OUT's top entries and of those in its img_emb/ and metadata/; None: no OUT."""
    try:
        top = list(os.scandir(out))
    except (FileNotFoundError, NotADirectoryError):
        return None
    seen = {}
    for entry in top:
        st = entry.stat(follow_symlinks=False)
        seen[entry.name] = (st.st_size, st.st_mtime_ns, st.st_ino, st.st_mode)
        if entry.name in CLIP_FOLDERS and stat.S_ISDIR(st.st_mode):
            for inner in os.scandir(entry.path):
                st = inner.stat(follow_symlinks=False)
                seen[f"{entry.name}/{inner.name}"] = (st.st_size, st.st_mtime_ns, st.st_ino, st.st_mode)
    return seen


def _write_clip_retrieval(engine, out: Path, batch: int | None, shard_rows: int, **filters) -> dict:
    batch = batch or BATCH
    (out / "img_emb").mkdir()
    (out / "metadata").mkdir()
    dim = int(engine.snap.store.dim)
    full = _schema(dim)
    meta_schema = pa.schema([("image_path", pa.string()), ("caption", pa.string())]
                            + [full.field(n) for n in _metadata_names(full.names)[2:]])
    order = [f.name for f in full if f.name != "embedding"]
    pick = [order.index("path" if f.name == "image_path" else f.name) for f in meta_schema]
    state = {"shard": -1, "filled": 0, "raw": None, "groups": None}

    def close_shard() -> None:
        if state["groups"] is None:
            return
        state["groups"].flush()
        state["groups"].writer.close()
        _finish_npy(state["raw"], out / "img_emb" / f"img_emb_{state['shard']}.npy", state["filled"], dim,
                    len(_npy_header(shard_rows, dim)))
        state.update(groups=None, raw=None, filled=0)

    n, tally = 0, {}
    try:
        for rows, vecs, tags in batches(engine, min(PAGE, batch), **filters, tally=tally):
            while rows:
                if state["groups"] is None:
                    state["shard"] += 1
                    writer = pq.ParquetWriter(out / "metadata" / f"metadata_{state['shard']}.parquet", meta_schema)
                    state["groups"] = _Groups(writer, meta_schema, batch)
                    state["raw"] = open(out / "img_emb" / f"img_emb_{state['shard']}.npy.part", "w+b")  # noqa: SIM115
                    state["raw"].write(_npy_header(shard_rows, dim))  # rewritten with the rows held when it closes
                take = min(len(rows), shard_rows - state["filled"], state["groups"].room())
                columns = _columns(rows[:take], tags, full)
                state["groups"].add(pa.RecordBatch.from_arrays([columns[i] for i in pick], schema=meta_schema))
                state["raw"].write(np.ascontiguousarray(vecs[:take], dtype="<f2").data)  # the stored precision: nothing lost
                rows, vecs = rows[take:], vecs[take:]
                state["filled"] += take
                n += take
                if state["filled"] == shard_rows:
                    close_shard()
        close_shard()
    except BaseException:  # the folder is deleted: let go of its open files first
        if state["raw"] is not None:
            state["raw"].close()
        if state["groups"] is not None:
            try:
                state["groups"].writer.close()
            except Exception as exc:  # noqa: BLE001 - the first error is the one to report
                log.debug("closing the metadata writer after an error: %s", exc)
        raise
    return {"format": "clip-retrieval", "rows": n, "path": str(out), "shards": state["shard"] + 1,
            "same_file": tally.get("same_file", 0), "moments": tally.get("moments", 0)}


def _npy_header(rows: int, dim: int) -> bytes:
    """The header np.save writes for a (rows, dim) float16 array (padded to 64 bytes: 128 for any shape
    an export makes)."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f2", "fortran_order": False, "shape": (rows, dim)})
    return buf.getvalue()


def _finish_npy(part, path: Path, rows: int, dim: int, written: int) -> None:
    """Close `part` (an open file: a header of `written` bytes, then the rows) as the .npy file `path`
    of (rows, dim) float16: its header rewritten in place, or, where the new one differs in length (not
    for any shape an export makes), the rows copied after it in blocks."""
    header = _npy_header(rows, dim)
    if len(header) == written:
        part.seek(0)
        part.write(header)
        part.close()
        os.replace(part.name, path)
        return
    part.seek(written)
    with open(path, "wb") as f:
        f.write(header)
        shutil.copyfileobj(part, f, 1 << 22)
    part.close()
    os.unlink(part.name)


def export(engine, out: Path, fmt: str = "parquet", roots: list[str] | None = None, where: str | None = None,
           path: str | None = None, batch: int | None = None, shard_rows: int = SHARD_ROWS) -> dict:
    """Export the indexed images the filters admit (all by default) to `out` in `fmt`, in row groups of
    `batch` rows (BATCH, read when called)."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}")
    seen = _fingerprint(Path(out)) if fmt == "clip-retrieval" else None  # taken first: a change after is seen
    folder = check_out(Path(out), fmt)
    atomic.remove_stale(out, writer="an export")  # an earlier export of OUT killed mid-way left its copy beside it
    chosen = {"roots": roots or None, "where": where, "path": path}
    try:
        if fmt == "parquet":
            return export_parquet(engine, out, batch, folder, **chosen)
        return export_clip_retrieval(engine, out, batch, shard_rows, seen, folder, **chosen)
    except atomic.FolderChanged:
        raise UsageError(f"the folder of {out} was replaced (by a link?) during the export: nothing was written "
                         "there; export again") from None
    except OSError as exc:  # a full disk: name OUT, not the temporary file already deleted (or no file at all)
        if exc.strerror and (exc.filename is None or atomic.temp_prefix(Path(out)) in str(exc.filename)):
            raise OSError(exc.errno, exc.strerror, str(out)) from exc
        raise


def check_out(out: Path, fmt: str) -> tuple[int, int] | None:
    """Refuse (UsageError) an OUT that export would write over something it did not make: a place inside an
    index folder (`export .alignsearch/catalog.db` replaced the catalog), a folder or a link where a file
    goes, an existing file that is not an earlier parquet export, a folder holding anything besides an
    earlier clip-retrieval export (clip_refusal). Returns the (st_dev, st_ino) of OUT's folder as checked (None:
    none yet), which the export writes in and nowhere else (both layouts)."""
    where = Path(os.path.realpath(out.parent)) / out.name
    try:
        st = os.stat(where.parent)
        checked = (st.st_dev, st.st_ino)
    except OSError:
        checked = None
    for folder in (where, *where.parents):
        # os.path.exists: a folder that cannot be searched (chmod 000) holds no catalog export could reach; Path.exists
        # raised there, and the command ended in "Permission denied: OUT/catalog.db", a path nobody named
        if folder.name == INDEX_DIRNAME or os.path.exists(folder / DB_FILE):
            raise UsageError(f"{out} is inside the index folder {folder}: export writes outside it")
    if fmt == "clip-retrieval":
        try:  # pyarrow opens a path only as UTF-8: it ended in "unexpected UnicodeEncodeError", exit 1
            str(out).encode("utf-8")
        except UnicodeEncodeError:
            raise UsageError(f"{out} has a name that is not UTF-8, which pyarrow cannot write the clip-retrieval "
                             "metadata to: give another folder") from None
    try:
        st = os.lstat(out)
    except FileNotFoundError:
        return checked
    if stat.S_ISLNK(st.st_mode):
        raise UsageError(f"{out} is a symbolic link: export replaces only what it wrote; give the path it points to")
    if fmt == "parquet":
        if stat.S_ISDIR(st.st_mode):
            raise UsageError(f"{out} is a folder: the parquet export is one file (--format clip-retrieval writes a folder)")
        if not stat.S_ISREG(st.st_mode) or (st.st_size and not _is_parquet_export(out)):
            raise UsageError(f"{out} exists and is not an earlier parquet export: choose a new name")
        return checked
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{out} is a file: the clip-retrieval export is a folder")
    refusal = clip_refusal(out)
    if refusal:
        raise UsageError(f"{out} {refusal}")
    return checked


def clip_refusal(out: Path) -> str | None:
    """Why export may not replace the folder OUT's contents (None: it may). It may where OUT holds only what an
    export wrote: img_emb/ and metadata/ holding exactly the files its MARKER lists, unchanged (size and
    sha256); or, with no MARKER (exports before it was written), only pairs img_emb_{i}.npy / metadata_{i}.parquet
    read as an export's: a float16 (rows, dim) array and a parquet file of the same rows with the metadata
    columns some alignsearch version wrote. clip-retrieval's own output (image_path, caption, ...) is not."""
    entries = {e.name: e for e in os.scandir(out)}
    for name, entry in entries.items():
        if not (name in CLIP_FOLDERS and entry.is_dir(follow_symlinks=False)
                or name == MARKER and entry.is_file(follow_symlinks=False)):
            return f"holds {name}, which is not part of a clip-retrieval export alignsearch wrote: {REFUSED}"
    files = {}
    for sub in CLIP_FOLDERS:
        if sub in entries:
            for e in os.scandir(entries[sub].path):
                if not e.is_file(follow_symlinks=False):
                    return f"holds {sub}/{e.name}, which is not a file alignsearch's export wrote: {REFUSED}"
                files[f"{sub}/{e.name}"] = Path(e.path)
    if MARKER in entries:
        return _unlisted(files, Path(entries[MARKER].path))
    return _not_earlier_export(files)


def _unlisted(files: dict[str, Path], marker: Path) -> str | None:
    """Why `files` are not all as the export that wrote `marker` left them (None: they are)."""
    try:
        if marker.stat().st_size > MARKER_MAX + MARKER_PER_FILE * len(files):
            raise ValueError("too large")
        listed = json.loads(marker.read_bytes())["files"]
        if not isinstance(listed, dict):
            raise TypeError("no file list")
    # RecursionError: JSON nested deeper than the parser recurses (no ValueError to json), one an export never wrote
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
        return f"holds a {MARKER} that is not one alignsearch's export wrote ({exc}): {REFUSED}"
    for rel, path in sorted(files.items()):
        want = listed.get(rel)
        if not isinstance(want, dict):
            return f"holds {rel}, which its {MARKER} does not list (alignsearch's export did not write it): {REFUSED}"
        if path.stat().st_size != want.get("size") or _sha256(path) != want.get("sha256"):
            return f"holds {rel}, changed since alignsearch's export wrote it: {REFUSED}"
    return None


def _not_earlier_export(files: dict[str, Path]) -> str | None:
    """Why `files` (no MARKER beside them) are not an earlier export's pairs (None: they are)."""
    shards: dict[str, dict[str, Path]] = {}
    shard_of: dict[str, str] = {}  # rel: its shard number, matched once
    for rel, path in files.items():
        sub, name = rel.split("/")
        match = CLIP_FOLDERS[sub].fullmatch(name)
        if not match:
            return f"holds {rel}, which is not part of a clip-retrieval export alignsearch wrote: {REFUSED}"
        shard_of[rel] = match.group(1)
        shards.setdefault(match.group(1), {})[sub] = path
    sound: dict[str, bool] = {}  # shard number: its pair read as ours, each pair's two files read once
    for rel in sorted(files):
        number = shard_of[rel]
        if number not in sound:
            pair = shards[number]
            rows = None if len(pair) != 2 else (_npy_rows(pair["img_emb"]), _metadata_rows(pair["metadata"]))
            sound[number] = rows is not None and rows[0] is not None and rows[0] == rows[1]
        if not sound[number]:
            return (f"holds {rel}, which alignsearch's export did not write (no {MARKER}, and not a pair of float16 "
                    f"embeddings and metadata of the columns alignsearch writes): {REFUSED}")
    return None


def _npy_rows(path: Path) -> int | None:
    """Rows of the .npy file `path` if it is one export writes: a C-order (rows, dim) little-endian float16
    array, its size exactly the header and the rows; else None."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in read:
                return None
            shape, fortran, dtype = read[version](f)
            start = f.tell()
        if dtype != np.dtype("<f2") or fortran or len(shape) != 2:
            return None
        return shape[0] if os.path.getsize(path) == start + shape[0] * shape[1] * 2 else None
    except (OSError, ValueError, SyntaxError, TypeError):
        return None


def _metadata_rows(path: Path) -> int | None:
    """Rows of the parquet file `path` if it has the metadata columns some alignsearch version wrote, else None."""
    try:
        meta = pq.read_metadata(path)
        names = meta.schema.to_arrow_schema().names
    except (OSError, ValueError, pa.ArrowException):
        return None
    return meta.num_rows if tuple(names) in _METADATA_COLUMNS else None


def _metadata_names(full: list[str]) -> tuple[str, ...]:
    """The metadata file's columns for an export of columns `full` (_schema's, of some version)."""
    return ("image_path", "caption", *(n for n in full if n not in ("path", "caption", "embedding")))


# every column list an export's metadata has had: t and t_end came with video moments, path_b64 with names that
# are not UTF-8 (each on its own branch first); a markerless folder of these is an earlier export's
_METADATA_COLUMNS = {_metadata_names([n for n in _schema(1).names if n not in dropped])
                     for dropped in ((), ("t", "t_end"), ("path_b64",), ("t", "t_end", "path_b64"))}


def _is_parquet_export(path: Path) -> bool:
    """A parquet file with the columns export writes (an earlier export, of any embedding width)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
            f.seek(-4, os.SEEK_END)
            if head != b"PAR1" or f.read(4) != b"PAR1":
                return False
        return pq.read_schema(path).names == _schema(1).names
    except (OSError, ValueError, pa.ArrowException):
        return False
