"""The Ray Data path: a local Ray instance gives the same catalog and results as the single-process path."""

import json

import numpy as np
import pytest

import alignsearch
from conftest import run

ray = pytest.importorskip("ray")


def test_ray_path_matches_the_single_process_path(tmp_path, corpus, tiny_model):
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        ray_summary = json.loads(run("index", corpus, "--index", tmp_path / "ray", "--model", tiny_model, "--device", "cpu",
                                     "--batch-size", "4", "--ray", "--json").stdout)
    finally:
        ray.shutdown()
    local_summary = json.loads(run("index", corpus, "--index", tmp_path / "local", "--model", tiny_model, "--device", "cpu",
                                   "--batch-size", "4", "--json").stdout)
    for key in ("added", "failed", "removed"):
        assert ray_summary[key] == local_summary[key], (ray_summary, local_summary)
    a, b = alignsearch.open(tmp_path / "ray"), alignsearch.open(tmp_path / "local")
    assert a.info()["images"] == b.info()["images"] == 18
    assert {(r.relpath, r.reason) for r in a.failed()} == {(r.relpath, r.reason) for r in b.failed()}
    for text in ("red car", "a dog at night", "beach"):
        hits_a, hits_b = a.search(text=text, k=18), b.search(text=text, k=18)
        assert [h.relpath for h in hits_a] == [h.relpath for h in hits_b]
        assert np.allclose([h.score for h in hits_a], [h.score for h in hits_b], atol=1e-3)
    hit = a.search(image=corpus / "img004.jpg", k=1)[0]
    assert hit.relpath == "img004.jpg" and hit.score == pytest.approx(1, abs=2e-3)


class DyingOnce:
    """An encoder actor whose worker process dies on its first batch: Ray must restart it and retry."""

    def __init__(self, model, device):
        from indexer.ray_pipeline import EncoderActor

        self.inner = EncoderActor(model, device)

    def __call__(self, batch):
        import os
        from pathlib import Path

        marker = Path(os.environ["ALIGNSEARCH_TEST_KILL_MARKER"])
        if not marker.exists():
            marker.write_text("died once")
            os._exit(1)
        return self.inner(batch)


def test_a_worker_killed_mid_run_is_retried_without_loss_or_duplicates(tmp_path, corpus, tiny_model, monkeypatch):
    from pathlib import Path

    import indexer.ray_pipeline as ray_pipeline

    marker = tmp_path / "killed"
    monkeypatch.setattr(ray_pipeline, "EncoderActor", DyingOnce)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {
        "ALIGNSEARCH_TEST_KILL_MARKER": str(marker), "PYTHONPATH": str(Path(__file__).parent)}})
    try:
        out = run("index", corpus, "--index", tmp_path / "ix", "--model", tiny_model, "--device", "cpu",
                  "--batch-size", "4", "--ray", "--json").stdout
    finally:
        ray.shutdown()
    assert marker.exists()  # a worker did die
    summary = json.loads(out[out.index('{\n  "index_dir"'):])  # Ray's raylet reports the death on stdout too
    assert summary["added"] == 19 and summary["failed"] == 1
    engine = alignsearch.open(tmp_path / "ix")
    hits = engine.search(text="x", k=100)
    assert len(hits) == 18 and len({h.relpath for h in hits}) == 18
    assert engine.store.rows == 18  # every vector written once


def test_existing_cluster_by_address_indexes_tar_shards(tmp_path, corpus, tiny_model, monkeypatch):
    """`--ray=ADDRESS` joins a cluster started apart (`ray start --head`), here fed WebDataset shards.
    Such a cluster authenticates with a token (~/.ray/auth_token): the driver must say so."""
    import shutil
    import socket
    import subprocess
    import sys
    import tempfile
    import time
    from pathlib import Path

    from test_sources import write_shard

    files = sorted(p for p in corpus.rglob("*") if p.is_file())
    for s in range(2):
        write_shard(tmp_path / f"part-{s}.tar", files[s::2], corpus)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ray_cli = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
    head = subprocess.Popen([ray_cli, "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
                             "--include-dashboard=false", "--node-ip-address=127.0.0.1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.5)
        monkeypatch.setenv("RAY_AUTH_MODE", "token")
        out = run("index", tmp_path / "part-{0..1}.tar", "--index", tmp_path / "ix", "--model", tiny_model,
                  "--device", "cpu", "--batch-size", "4", f"--ray=127.0.0.1:{port}", "--json").stdout
    finally:
        head.terminate()
        head.wait(60)
        # `ray start` leaves its address behind: a later plain ray.init() would try the dead cluster
        current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        if current.exists() and current.read_text().strip().endswith(f":{port}"):
            current.unlink()
    summary = json.loads(out[out.index('{\n  "index_dir"'):])
    assert summary["added"] == 19 and summary["failed"] == 1 and summary["times"]["extra"]["ray_encoders"] == 1
    engine = alignsearch.open(tmp_path / "ix")
    query = corpus / "nested" / "img001.jpg"
    hit = engine.search(image=query, k=1)[0]
    assert hit.relpath == "nested/img001.jpg"
    assert hit.path == f"{tmp_path}/part-{files.index(query) % 2}.tar/nested/img001.jpg"
