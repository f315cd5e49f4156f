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
