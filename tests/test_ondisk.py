"""The sharded on-disk index answers like the in-memory one, and the engine serves it memory-mapped."""

import json

import numpy as np
from click.testing import CliRunner

import alignsearch
from alignsearch import ann
from alignsearch.cli import main
from alignsearch.vectors import VectorStore
from indexer.ondisk import build_ondisk, train_empty
from test_ann import clustered
from test_engine import add_synthetic


def test_merged_on_disk_index_equals_the_in_memory_one(tmp_path):
    dim, n = 32, 12_000
    store = VectorStore(tmp_path / "v.f16", dim, 0)
    store.append(clustered(n, dim, seed=2))
    ids, rows = np.arange(n, dtype=np.int64) * 2 + 5, np.arange(n, dtype=np.int64)
    ondisk = build_ondisk(store, ids, rows, tmp_path / "lists.ivfdata", shards=3, workers=2)
    ann.write_atomic(ondisk, tmp_path / "ondisk.faiss")
    served = ann.read(tmp_path / "ondisk.faiss")
    assert ann.layout(served) == "ondisk"

    memory = train_empty(store, rows)  # the same training, every vector added in one process, lists in RAM
    ann.add(memory, store.get(rows), ids)
    assert ann.layout(memory) == "memory"
    q = clustered(50, dim, seed=9)
    d1, i1 = ann.search(served, q, 20, 16)
    d2, i2 = ann.search(memory, q, 20, 16)
    assert np.array_equal(i1, i2) and np.allclose(d1, d2, atol=1e-5)
    assert sorted(ann.stored_ids(served)) == sorted(ids)


def test_index_with_ondisk_shards_through_the_cli(tmp_path, corpus, tiny_model):
    ix = tmp_path / "ix"
    CliRunner().invoke(main, ["index", str(corpus), "--index", str(ix), "--model", str(tiny_model)], catch_exceptions=False)
    dim = alignsearch.open(ix).store.dim
    add_synthetic(ix, 12_000, dim)
    out = CliRunner().invoke(main, ["index", "--index", str(ix), "--ondisk-shards", "2", "--json"], catch_exceptions=False)
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["index"]["layout"] == "ondisk"
    assert list(ix.glob("lists-*.ivfdata"))
    engine = alignsearch.open(ix)
    hit = engine.search(image=corpus / "img004.jpg", k=1)[0]
    assert hit.relpath == "img004.jpg"
    assert engine.info()["index"]["layout"] == "ondisk"
