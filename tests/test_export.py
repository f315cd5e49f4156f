"""Issue 16: `alignsearch export` to parquet and to clip-retrieval's layout."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import index_json, run
from helpers import smooth_photos


@pytest.fixture
def indexed(tmp_path, tiny_model):
    root = tmp_path / "lib"
    smooth_photos(root / "big", 5, size=(320, 240))
    smooth_photos(root / "small", 4, seed=1, size=(160, 120))
    (root / "big" / "photo0000.txt").write_text("a red circle at dusk")  # a sidecar caption
    ix = tmp_path / "ix"
    index_json(ix, root, "--model", tiny_model)
    return root, ix


def test_parquet_round_trip_holds_every_image_and_its_embedding(indexed, tmp_path):
    root, ix = indexed
    out = tmp_path / "out.parquet"
    summary = json.loads(run("export", out, "--index", ix, "--json").output)
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

    from alignsearch.engine import open as open_index

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
    run("export", tmp_path / "none.parquet", "--root", "/nowhere", "--index", ix)
    assert pq.read_table(tmp_path / "none.parquet").num_rows == 0


def test_clip_retrieval_layout(indexed, tmp_path):
    root, ix = indexed
    out = tmp_path / "clip"
    summary = json.loads(run("export", out, "--format", "clip-retrieval", "--shard-rows", "4", "--index", ix,
                             "--json").output)
    assert summary == {"format": "clip-retrieval", "rows": 9, "path": str(out), "shards": 3}
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
