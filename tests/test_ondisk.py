"""Indexes larger than RAM: the merged on-disk index and the IndexShards layout answer like the
in-memory index, the engine serves them memory-mapped, and shards update in place."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

import alignsearch
from alignsearch.storage import ann, shards
from alignsearch.surfaces.cli import main
from alignsearch.storage.vectors import VectorStore
from conftest import index_json
from indexer.verify import verify
from indexer.ondisk import build_ondisk, train_empty
from helpers import clustered
from helpers import add_synthetic

pytestmark = [pytest.mark.slow]


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


def test_index_shards_search_like_one_file_and_update_in_place(tmp_path, corpus, tiny_model):
    ix = tmp_path / "ix"
    index_json(ix, corpus, "--model", tiny_model)
    dim = alignsearch.open(ix).store.dim
    add_synthetic(ix, 12_000, dim, seed=3)
    queries = clustered(20, dim, seed=11)

    single = index_json(ix, "--rebuild")
    assert single["index"]["layout"] == "memory"
    with alignsearch.open(ix) as engine:
        expected = [[h.id for h in engine.search_vector(q, k=10, nprobe=16)] for q in queries]

    built = index_json(ix, "--index-shards", "3")
    assert built["index"]["action"] == "built 3 shard files" and built["index"]["layout"] == "sharded (3 files)"
    assert not (ix / "index.faiss").exists() and len(list(ix.glob("shard-*.faiss"))) == 3
    with alignsearch.open(ix) as engine:
        assert engine.info()["index"]["layout"] == "sharded (3 files)"
        got = [[h.id for h in engine.search_vector(q, k=10, nprobe=16)] for q in queries]
        assert got == expected  # same training, same ids: the shards answer as the single file did
        hit = engine.search(image=corpus / "img004.jpg", k=1)[0]
        assert hit.relpath == "img004.jpg"
        gone_id, before = hit.id, shards.files(ix)

        (corpus / "img004.jpg").unlink()  # one file gone: only its shard is rewritten
        updated = index_json(ix)
        assert updated["index"]["action"] == "updated 1 of 3 shards (+0 -1)"
        after = shards.files(ix)
        assert len(set(before) & set(after)) == 2
        assert set(ix.glob("shard-*.faiss")) == set(before) | set(after)  # the old file outlives one round
        assert engine.refresh()  # a served engine picks up the new generation
        assert gone_id not in [h.id for h in engine.search(image=corpus / "img001.jpg", k=50)]
    assert verify(ix).problems == []

    back = index_json(ix, "--index-shards", "0")
    assert back["index"]["layout"] == "memory" and not list(ix.glob("shard-*.faiss"))
    assert not (ix / "shards.json").exists()


def test_both_layouts_at_once_is_an_error(tmp_path, corpus, tiny_model):
    from conftest import run

    out = run("index", corpus, "--index", tmp_path / "ix", "--ondisk-shards", "2", "--index-shards", "2", code=2)
    assert "choose one layout" in out.output


_KILLED_IN_ADD_SHARDS = '''
import multiprocessing, os, sys, threading, time
from pathlib import Path


class SleepyStore:  # a store whose vectors never come: each worker is busy in its shard when the run is killed
    dim = 4

    def get(self, rows):
        time.sleep(600)


def kill_me_when_busy():
    while len(multiprocessing.active_children()) < 2:
        time.sleep(0.05)
    time.sleep(3)  # the workers have started their shards
    print(" ".join(str(p.pid) for p in multiprocessing.active_children()), flush=True)
    os.kill(os.getpid(), 9)


if __name__ == "__main__":
    import faiss
    import numpy as np
    from indexer import ondisk

    threading.Thread(target=kill_me_when_busy, daemon=True).start()
    out = Path(sys.argv[1])
    part = (np.arange(2, dtype=np.int64), np.arange(2))
    ondisk.add_shards(faiss.IndexFlatL2(4), SleepyStore(), [part, part], [out / "a.index", out / "b.index"], workers=2)
'''


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


def test_the_shard_workers_end_with_the_run_killed_9(tmp_path):
    """`index --ondisk-shards` killed -9 while its workers add their shards: they never learned it and lived on
    for good, holding its output pipes (whoever waited for its output waited forever) and their memory. Now
    each ends with the process that started it (alignsearch.workerpool.spawn_executor)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "killed.py"
    script.write_text(_KILLED_IN_ADD_SHARDS)
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path)], stdout=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    pids = [int(p) for p in proc.stdout.readline().split()]
    try:
        assert proc.wait(timeout=60) == -9 and len(pids) == 2
        deadline = time.monotonic() + 10
        while any(map(_alive, pids)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(map(_alive, pids)), "the shard workers outlived the run killed -9"
    finally:
        if any(map(_alive, pids)):
            os.killpg(proc.pid, signal.SIGKILL)  # the workers share its process group
        proc.stdout.close()
