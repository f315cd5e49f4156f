"""`alignsearch export`: every indexed image's metadata and embedding, in formats other tools read.

- parquet: one file, one row per indexed image (id, path, root, relpath, width, height, format, size,
  mtime, taken, caption, tags, embedding as a fixed-size list of float32), written in row groups of
  `batch` rows, so memory stays bounded whatever the library's size.
- clip-retrieval: the layout clip-retrieval writes and autofaiss / embedding-reader read:
  `img_emb/img_emb_{i}.npy` (float16, n x dim, unit rows) and `metadata/metadata_{i}.parquet` (image_path,
  caption, and our columns), row i of one matching row i of the other, `shard_rows` rows per pair.

`taken` (EXIF capture time, else null) and `caption` come from the catalog's photo fields
(alignsearch/photometa.py), `tags` from `alignsearch tag`. Filters: `where` (the --where language of
alignsearch/filters.py), `path` (a glob on the relative path, as `query --path`) and `roots` (root names).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from alignsearch import catalog, filters

log = logging.getLogger(__name__)

FORMATS = ("parquet", "clip-retrieval")
BATCH = 65_536  # rows per parquet row group and per read: ~170 MB of float32 at 640-d
SHARD_ROWS = 1_000_000  # rows per img_emb_{i}.npy, as clip-retrieval's default write batch


def _schema(dim: int) -> pa.Schema:
    return pa.schema([
        ("id", pa.int64()), ("path", pa.string()), ("root", pa.string()), ("relpath", pa.string()),
        ("width", pa.int32()), ("height", pa.int32()), ("format", pa.string()), ("size", pa.int64()),
        ("mtime", pa.float64()), ("taken", pa.timestamp("s")), ("caption", pa.string()),
        ("tags", pa.list_(pa.string())), ("embedding", pa.list_(pa.float32(), dim)),
    ])


def _allowed(snap, db, where: str | None, path: str | None) -> np.ndarray | None:
    """Sorted ids the filters admit (alignsearch/filters.py, evaluated on the snapshot's columns); None: all."""
    node = filters.build(filters.FilterOptions(where=where, path=path))
    if node is None:
        return None
    cols = snap.columns(db)
    return np.sort(cols.ids[filters.evaluate(node, cols.column, cols.tagged)])


def batches(engine, batch: int = BATCH, roots: list[str] | None = None, where: str | None = None,
            path: str | None = None) -> Iterator[tuple[list, np.ndarray, dict]]:
    """(catalog rows, their float32 vectors, {id: {"taken", "caption", "tags"}}) of the indexed files the
    filters admit, in id order, at most `batch` at a time."""
    snap = engine.snap
    allowed = _allowed(snap, engine.db, where, path)
    after = 0
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
            ids = [r.id for r in rows]
            photo, labels = catalog.photos_of(conn, ids), catalog.labels_of(conn, ids)
        if engine.snap.generation != snap.generation:
            raise RuntimeError("the index switched to a new generation during the export: run it again")
        extra = {i: {"taken": photo.get(i, {}).get("taken"), "caption": photo.get(i, {}).get("caption"),
                     "tags": labels.get(i, [])} for i in ids}
        if rows:
            yield rows, snap.store.get(np.array([r.vec_row for r in rows], dtype=np.int64)), extra


def _table(rows: list, vecs: np.ndarray, tags: dict, schema: pa.Schema) -> pa.Table:
    dim = vecs.shape[1]
    embedding = pa.FixedSizeListArray.from_arrays(pa.array(vecs.astype(np.float32, copy=False).reshape(-1)), dim)
    columns = {
        "id": [r.id for r in rows], "path": [r.path for r in rows], "root": [r.root for r in rows],
        "relpath": [r.relpath for r in rows], "width": [r.width for r in rows], "height": [r.height for r in rows],
        "format": [r.format for r in rows], "size": [r.size for r in rows], "mtime": [r.mtime for r in rows],
        "taken": [None if tags[r.id]["taken"] is None else int(tags[r.id]["taken"]) for r in rows],
        "caption": [tags[r.id]["caption"] for r in rows], "tags": [tags[r.id]["tags"] for r in rows],
    }
    arrays = [pa.array(columns[f.name], type=f.type) for f in schema if f.name != "embedding"] + [embedding]
    return pa.Table.from_arrays(arrays, schema=schema)


def export_parquet(engine, out: Path, batch: int = BATCH, **filters) -> dict:
    """Write one parquet file; returns {"rows", "path", "row_groups"}."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    schema = _schema(int(engine.snap.store.dim))
    tmp = out.with_name(out.name + ".tmp")
    n = groups = 0
    with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
        for rows, vecs, tags in batches(engine, batch, **filters):
            writer.write_table(_table(rows, vecs, tags, schema), row_group_size=batch)
            n, groups = n + len(rows), groups + 1
            log.info("exported %d rows", n)
    tmp.replace(out)
    return {"format": "parquet", "rows": n, "path": str(out), "row_groups": groups}


def export_clip_retrieval(engine, out: Path, batch: int = BATCH, shard_rows: int = SHARD_ROWS, **filters) -> dict:
    """Write OUT/img_emb/img_emb_{i}.npy and OUT/metadata/metadata_{i}.parquet; returns {"rows", "shards"}."""
    out = Path(out)
    (out / "img_emb").mkdir(parents=True, exist_ok=True)
    (out / "metadata").mkdir(parents=True, exist_ok=True)
    dim = int(engine.snap.store.dim)
    meta_schema = pa.schema([("image_path", pa.string()), ("caption", pa.string())]
                            + [f for f in _schema(dim) if f.name not in ("path", "caption", "embedding")])
    state = {"shard": -1, "filled": 0, "raw": None, "writer": None}
    n = 0

    def close_shard() -> None:
        if state["writer"] is None:
            return
        state["writer"].close()
        state["raw"].close()
        _write_npy(out / "img_emb" / f"img_emb_{state['shard']}.npy", Path(state["raw"].name), state["filled"], dim)
        state.update(writer=None, raw=None, filled=0)

    for rows, vecs, tags in batches(engine, batch, **filters):
        while rows:
            if state["writer"] is None:
                state["shard"] += 1
                state["writer"] = pq.ParquetWriter(out / "metadata" / f"metadata_{state['shard']}.parquet", meta_schema)
                state["raw"] = open(out / "img_emb" / f"img_emb_{state['shard']}.npy.rows", "wb")  # noqa: SIM115
            take = min(len(rows), shard_rows - state["filled"])
            part, rows, v, vecs = rows[:take], rows[take:], vecs[:take], vecs[take:]
            table = _table(part, v, tags, _schema(dim))
            meta = table.rename_columns(["image_path" if c == "path" else c for c in table.column_names])
            state["writer"].write_table(meta.select([f.name for f in meta_schema]).cast(meta_schema))
            state["raw"].write(np.ascontiguousarray(v, dtype="<f2").tobytes())  # the stored precision: nothing lost
            state["filled"] += take
            n += take
            if state["filled"] == shard_rows:
                close_shard()
    close_shard()
    return {"format": "clip-retrieval", "rows": n, "path": str(out), "shards": state["shard"] + 1}


def _write_npy(path: Path, raw: Path, rows: int, dim: int) -> None:
    """An .npy file of (rows, dim) float16 from the raw rows in `raw`, copied in blocks (bounded memory)."""
    with open(path, "wb") as f, open(raw, "rb") as src:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f2", "fortran_order": False, "shape": (rows, dim)})
        for block in iter(lambda: src.read(1 << 24), b""):
            f.write(block)
    raw.unlink()


def export(engine, out: Path, fmt: str = "parquet", roots: list[str] | None = None, where: str | None = None,
           path: str | None = None, batch: int = BATCH, shard_rows: int = SHARD_ROWS) -> dict:
    """Export the indexed images the filters admit (all by default) to `out` in `fmt`."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}")
    chosen = {"roots": roots or None, "where": where, "path": path}
    if fmt == "parquet":
        return export_parquet(engine, out, batch, **chosen)
    return export_clip_retrieval(engine, out, batch, shard_rows, **chosen)
