"""Issue 16: `alignsearch export` to parquet and to clip-retrieval's layout."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import index_json, run
from helpers import alignsearch_vmhwm, smooth_photos, summary, vector_index

from alignsearch.storage import vectors
from alignsearch.errors import IndexDamagedError


@pytest.fixture
def indexed(prebuilt, tiny_model):
    def build(base):
        root = base / "lib"
        smooth_photos(root / "big", 5, size=(320, 240))
        smooth_photos(root / "small", 4, seed=1, size=(160, 120))
        (root / "big" / "photo0000.txt").write_text("a red circle at dusk")  # a sidecar caption
        ix = base / "ix"
        index_json(ix, root, "--model", tiny_model)
        return root, ix

    return prebuilt.folder("export-indexed", build)[1]


@pytest.mark.slow
def test_parquet_round_trip_holds_every_image_and_its_embedding(indexed, tmp_path):
    root, ix = indexed
    out = tmp_path / "out.parquet"
    summary = json.loads(run("export", out, "--index", ix, "--json").stdout)
    assert summary["rows"] == 9
    table = pq.read_table(out)
    assert table.num_rows == 9
    assert table.schema.field("embedding").type.list_size > 0
    assert str(table.schema.field("embedding").type.value_type) == "float"
    for name in ("id", "path", "root", "relpath", "width", "height", "format", "size", "taken", "caption", "tags"):
        assert name in table.column_names
    rows = table.to_pylist()
    captioned = next(r for r in rows if r["relpath"] == "big/photo0000.jpg")
    assert captioned["caption"] == "a red circle at dusk" and captioned["width"] == 320

    from alignsearch.search.engine import open as open_index

    encoder = open_index(ix).encoder
    exported = np.array([r["embedding"] for r in rows], dtype=np.float32)
    fresh = encoder.encode_images([r["path"] for r in rows])
    assert np.allclose(exported, fresh, atol=2e-3)  # stored as fp16

    import duckdb
    import pandas as pd

    frame = pd.read_parquet(out)
    assert len(frame) == 9 and len(frame["embedding"][0]) == exported.shape[1]
    assert duckdb.sql(f"select count(*), min(width) from read_parquet('{out}')").fetchall() == [(9, 160)]


def test_export_filters_by_path_where_and_root(indexed, tmp_path):
    root, ix = indexed
    run("export", tmp_path / "small.parquet", "--path", "small/*", "--index", ix)
    assert sorted(pq.read_table(tmp_path / "small.parquet")["relpath"].to_pylist()) == [
        f"small/photo{i:04d}.jpg" for i in range(4)]
    run("export", tmp_path / "wide.parquet", "--where", "width >= 300", "--index", ix)
    assert pq.read_table(tmp_path / "wide.parquet").num_rows == 5
    run("export", tmp_path / "none.parquet", "--root", "/nowhere", "--index", ix, code=6)  # issue 24: refused
    assert not (tmp_path / "none.parquet").exists()


def test_clip_retrieval_layout(indexed, tmp_path):
    root, ix = indexed
    out = tmp_path / "clip"
    summary = json.loads(run("export", out, "--format", "clip-retrieval", "--shard-rows", "4", "--index", ix,
                             "--json").stdout)
    assert summary == {"format": "clip-retrieval", "rows": 9, "path": str(out), "shards": 3, "same_file": 0, "moments": 0}
    assert sorted(p.name for p in (out / "img_emb").iterdir()) == ["img_emb_0.npy", "img_emb_1.npy", "img_emb_2.npy"]
    assert sorted(p.name for p in (out / "metadata").iterdir()) == [f"metadata_{i}.parquet" for i in range(3)]
    embs = [np.load(out / "img_emb" / f"img_emb_{i}.npy") for i in range(3)]
    metas = [pq.read_table(out / "metadata" / f"metadata_{i}.parquet") for i in range(3)]
    assert [len(e) for e in embs] == [4, 4, 1] and [m.num_rows for m in metas] == [4, 4, 1]
    assert embs[0].dtype == np.float16 and np.allclose(np.linalg.norm(embs[0].astype(np.float32), axis=1), 1, atol=2e-3)
    assert "image_path" in metas[0].column_names and "caption" in metas[0].column_names
    parquet = tmp_path / "all.parquet"
    run("export", parquet, "--index", ix)
    by_path = {r["path"]: r["embedding"] for r in pq.read_table(parquet).to_pylist()}
    for emb, meta in zip(embs, metas):
        for vec, path in zip(emb, meta["image_path"].to_pylist()):
            assert np.allclose(vec.astype(np.float32), by_path[path], atol=1e-6)


def test_read_into_gives_the_stored_rows_in_any_order(tmp_path):
    """vectors.read_into (export's plain reads) returns what the memory map holds, for rows out of order,
    repeated, and in two segments; rows past the committed ones or cut from the file are errors."""
    store = vectors.VectorStore(tmp_path / "vectors.f16", 8, 0)
    rng = np.random.default_rng(0)
    store.append(rng.standard_normal((50, 8)).astype(np.float32))
    store.folder.mkdir()
    (store.folder / "actor-1.f16").write_bytes(rng.standard_normal((30, 8)).astype(vectors.DTYPE).tobytes())
    segment = store.commit("actor-1", 30)
    buffer = np.empty((64, 8), dtype=vectors.DTYPE)
    for addresses in (np.arange(10, 40), rng.permutation(np.r_[np.arange(0, 50, 3), [7, 7, 8, 9],
                                                                 vectors.address(segment, np.arange(5, 25))])):
        got = vectors.read_into(store, addresses, buffer)
        assert got.shape == (len(addresses), 8) and np.shares_memory(got, buffer)
        assert np.array_equal(got.astype(np.float32), store.get(addresses))
    with pytest.raises(IndexDamagedError):
        vectors.read_into(store, np.array([49, 50]), buffer)
    with open(store.path, "r+b") as f:
        f.truncate(40 * store.row_bytes)
    with pytest.raises(IndexDamagedError, match="shorter"):
        vectors.read_into(store, np.array([45]), buffer)


@pytest.mark.slow
def test_export_memory_does_not_grow_with_the_library(tmp_path):
    """Peak resident memory (VmHWM: pages of every kind, the mapped vector file's included) of `alignsearch
    export` on 5,000 and on 60,000 stored 640-d vectors, in row groups of 4,096 rows so that both exports
    span several: the 55,000 more vectors (67 MB as fp16, twice that as float32) must cost the command
    far less than their size. Export used to read the vectors through the store's memory map, whose pages
    stayed resident: 55,000 rows more held 70 MB more of them alone."""
    small, large = vector_index(tmp_path / "small", 5_000, 640), vector_index(tmp_path / "large", 60_000, 640, seed=1)
    more = (large.rows - small.rows) * large.row_bytes
    for fmt in ("parquet", "clip-retrieval"):
        growth = {}
        for name, store in (("small", small), ("large", large)):
            proc, memory = alignsearch_vmhwm("export", tmp_path / f"{name}-{fmt}", "--format", fmt, "--index",
                                             store.path.parent, "--json", setup="import alignsearch.search.export as e; e.BATCH = 4096")
            assert summary(proc)["rows"] == store.rows
            growth[name] = memory["growth"]
        assert growth["large"] - growth["small"] < more / 4, (fmt, growth, more)
    table = pq.read_table(tmp_path / "large-parquet")
    assert pq.ParquetFile(tmp_path / "large-parquet").metadata.num_row_groups == 15
    stored = large.get(np.arange(large.rows))
    assert np.array_equal(np.array(table["embedding"].combine_chunks().values).reshape(-1, 640), stored)
    clip = np.load(tmp_path / "large-clip-retrieval" / "img_emb" / "img_emb_0.npy")
    assert clip.dtype == np.float16 and np.array_equal(clip.astype(np.float32), stored)


@pytest.mark.slow
def test_a_name_that_is_not_utf8_exports_and_lists(tmp_path, tiny_model):
    """Issue 24 #18: a non-UTF-8 file name failed both export formats (leaving temp files) and made
    /api/recent answer 500. Its path is shown with \\xNN and comes whole in path_b64."""
    import base64
    import os
    import shutil
    import urllib.request

    import alignsearch
    from alignsearch.surfaces.server import ServerConfig, start_in_thread

    root = tmp_path / "lib"
    _, second = smooth_photos(root, 2)
    odd = os.path.join(os.fsencode(root), b"caf\xe9.jpg")
    shutil.move(os.fsencode(second), odd)
    ix = tmp_path / "ix"
    index_json(ix, root, "--model", tiny_model)

    out = tmp_path / "out.parquet"
    assert json.loads(run("export", out, "--index", ix, "--json").stdout)["rows"] == 2
    rows = {r["relpath"]: r for r in pq.read_table(out).to_pylist()}
    assert rows["caf\\xe9.jpg"]["path"].endswith("caf\\xe9.jpg")
    assert base64.b64decode(rows["caf\\xe9.jpg"]["path_b64"]) == odd
    assert rows["photo0000.jpg"]["path_b64"] is None
    clip = tmp_path / "clip"
    run("export", clip, "--format", "clip-retrieval", "--index", ix, "--json")
    meta = pq.read_table(clip / "metadata" / "metadata_0.parquet").to_pylist()
    assert sorted(base64.b64decode(m["path_b64"]) for m in meta if m["path_b64"]) == [odd]
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith((".tmp", ".part"))]

    engine = alignsearch.open(ix)
    server = start_in_thread(engine, ServerConfig(port=0, no_token=True))
    try:
        with urllib.request.urlopen(server.url + "/api/recent", timeout=30) as r:
            assert r.status == 200
            listed = {x["relpath"]: x for x in json.loads(r.read())["results"]}
    finally:
        server.shutdown()
        engine.close()
    assert base64.b64decode(listed["caf\\xe9.jpg"]["path_b64"]) == odd
    assert "path_b64" not in listed["photo0000.jpg"]


@pytest.mark.slow
def test_an_export_while_an_index_run_adds_files_exports_them_too(indexed_images):
    """Rows an `index` run commits while an export pages through the catalog (the same generation) lie past
    the export's snapshot of the store: they are read from the store as now, not called damage."""
    import alignsearch
    from alignsearch.search.export import batches
    from conftest import make_images

    photos, ix = indexed_images(12)
    with alignsearch.open(ix) as engine:
        pages = batches(engine, batch=4)
        first, _, _ = next(pages)
        make_images(photos / "more", 3, seed=11)
        assert index_json(ix, photos, "--device", "cpu")["added"] == 3
        rest = [(rows, vecs.copy()) for rows, vecs, _ in pages]
        exported = len(first) + sum(len(rows) for rows, _ in rest)
        stored = engine.snapshot().store
        for rows, vecs in rest:
            assert np.array_equal(vecs, stored.get(np.array([r.vec_row for r in rows])).astype("<f2"))
    assert exported == 15


def test_shard_rows_without_clip_retrieval_is_bad_usage(indexed, tmp_path):
    """`export lib.parquet --shard-rows 5` wrote one parquet file and said nothing: the option only shapes
    clip-retrieval's pairs. It is refused (exit 2) before anything is written, as `dupes --tier exact --threshold` is."""
    root, ix = indexed
    out = run("export", tmp_path / "lib.parquet", "--shard-rows", "5", "--index", ix, code=2)
    assert "--shard-rows is for --format clip-retrieval" in out.output
    assert not (tmp_path / "lib.parquet").exists()
    run("export", tmp_path / "lib.parquet", "--index", ix)  # the default, not given: still a plain export


def test_the_summary_counts_video_moments_apart_from_images(tmp_path):
    """A video's moments are a row each: `export` said "15 images exported" of 11 photos and two videos' 4 moments,
    where `info` says 13 images."""
    from helpers import video_moments_index

    ix = video_moments_index(tmp_path / "ix", videos=2, moments=3)
    out = run("export", tmp_path / "lib.parquet", "--index", ix).output
    assert out.startswith("6 video moments exported to "), out
    assert json.loads(run("export", tmp_path / "lib2.parquet", "--index", ix, "--json").output)["moments"] == 6


def _swap_parent_at_check(monkeypatch, shared, aside, target):
    """Swap `shared` for a link to `target` right after export's check of OUT (export runs atomic.remove_stale
    next), the moment a user who may write shared/'s parent would race for."""
    from alignsearch import atomic

    remove_stale = atomic.remove_stale

    def swapped(*args, **kwargs):
        shared.rename(aside)
        shared.symlink_to(target)
        return remove_stale(*args, **kwargs)

    monkeypatch.setattr(atomic, "remove_stale", swapped)


def test_an_export_s_folder_swapped_for_a_link_to_the_index_is_not_written_through(indexed, tmp_path, monkeypatch):
    """`export shared/catalog.db`: shared/ is checked (not inside an index folder), then a user who may write its
    parent swaps shared/ for a link to the index folder before the export writes: the rename replaced the index's
    own catalog.db with the parquet file (data loss). The folder checked is the one written: opened once, its
    identity compared, the temporary made and renamed within it; a swap is one line (exit 2) and nothing is written
    through the link."""
    import shutil

    ix = tmp_path / "ix"
    shutil.copytree(indexed[1], ix)
    def held():  # what the index folder holds (SQLite's -wal and -shm come and go with a reader)
        return {p.name: p.read_bytes() for p in ix.iterdir() if p.is_file() and not p.name.endswith(("-wal", "-shm"))}

    before = held()
    shared = tmp_path / "base" / "shared"
    shared.mkdir(parents=True)
    _swap_parent_at_check(monkeypatch, shared, tmp_path / "base" / "moved", ix)
    out = run("export", shared / "catalog.db", "--index", ix, code=2).output
    assert out.startswith("error:") and "replaced" in out and len(out.strip().splitlines()) == 1, out
    assert held() == before  # the index as it was: its catalog not replaced, nothing left there
    assert list((tmp_path / "base" / "moved").iterdir()) == []


@pytest.mark.parametrize("name", ["emb", "catalog.db"])
def test_a_clip_retrieval_export_s_folder_swapped_for_a_link_to_the_index_is_not_written_through(
        indexed, tmp_path, monkeypatch, name):
    """The clip-retrieval layout's form of the parquet attack above: `export shared/NAME --format clip-retrieval`,
    shared/ checked, then swapped for a link to the index folder before the export writes. The folder was
    resolved again by its name when written: the new layout went into the index folder itself (exit 0), which
    export refuses to write in; OUT named as an index file ended in an OSError. Now one line, exit 2, and the
    index folder holds what it held."""
    import shutil

    ix = tmp_path / "ix"
    shutil.copytree(indexed[1], ix)

    def held():  # names and bytes of everything under the index folder (SQLite's -wal and -shm come and go)
        return {str(p.relative_to(ix)): p.read_bytes() if p.is_file() else None for p in ix.rglob("*")
                if not p.name.endswith(("-wal", "-shm"))}

    before = held()
    shared = tmp_path / "base" / "shared"
    shared.mkdir(parents=True)
    _swap_parent_at_check(monkeypatch, shared, tmp_path / "base" / "moved", ix)
    out = run("export", shared / name, "--format", "clip-retrieval", "--index", ix, code=2).output
    assert out.startswith("error:") and "replaced" in out and len(out.strip().splitlines()) == 1, out
    assert held() == before
    assert list((tmp_path / "base" / "moved").iterdir()) == []
