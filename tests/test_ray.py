"""The Ray Data path: a local Ray instance gives the same catalog and results as the single-process path."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

import alignsearch
from alignsearch.cli import main

ray = pytest.importorskip("ray")


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


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
