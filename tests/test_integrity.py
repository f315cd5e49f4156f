"""Issue 13: no command, fault or file on disk destroys an index or makes it answer wrongly in silence.

Each test reproduces a fault found on an earlier main (re-encoding wiped the index, a moved model
folder made the index unusable, damaged files were served) and checks the guarantee that replaced it.
"""

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest

import alignsearch
from alignsearch import catalog
from conftest import index_json, make_images, run


def meta(ix, key):
    conn = sqlite3.connect(f"file:{ix / 'catalog.db'}?mode=ro", uri=True)
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    finally:
        conn.close()
    return None if row is None else json.loads(row[0])


def top_paths(ix, text="red", k=5, **kw):
    with alignsearch.open(ix, **kw) as engine:
        return [h.path for h in engine.search(text=text, k=k)]


# -- 1. re-encoding is a new generation, never a wipe ------------------------------------------------


def test_reindex_without_model_keeps_the_recorded_model(tmp_path, tiny_model):
    root, ix = tmp_path / "photos", tmp_path / "ix"
    make_images(root, 5)
    index_json(ix, root, "--model", tiny_model, "--device", "cpu")
    fingerprint = meta(ix, "model")["fingerprint"]
    s = index_json(ix, "--reindex", "--device", "cpu")  # on main: fell back to the hub default and failed
    assert s["reencoded"] == 5
    assert meta(ix, "model")["fingerprint"] == fingerprint
    assert len(top_paths(ix)) == 5


def test_reindex_with_a_model_that_cannot_load_touches_nothing(tmp_path, tiny_model):
    root, ix = tmp_path / "photos", tmp_path / "ix"
    make_images(root, 5)
    index_json(ix, root, "--model", tiny_model, "--device", "cpu")
    before = top_paths(ix)
    files = {p.name: p.read_bytes() for p in ix.iterdir() if p.is_file() and p.suffix in (".f16", ".faiss")}
    result = run("index", "--index", ix, "--reindex", "--model", tmp_path / "no-such-model", code=4)
    assert "Traceback" not in result.output
    assert top_paths(ix) == before
    assert {p: (ix / p).read_bytes() for p in files} == files
    assert meta(ix, "model")["model"] == str(tiny_model)


def test_queries_answer_from_the_old_generation_until_the_new_one_is_complete(tmp_path, tiny_model, other_model):
    root, ix = tmp_path / "photos", tmp_path / "ix"
    make_images(root, 60)
    index_json(ix, root, "--model", tiny_model, "--device", "cpu")
    old_fp = meta(ix, "model")["fingerprint"]
    before = top_paths(ix, k=10)
    cmd = [sys.executable, "-m", "alignsearch", "index", "--index", str(ix), "--model", str(other_model), "--reindex",
           "--device", "cpu", "--batch-size", "2", "--workers", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while proc.poll() is None and (meta(ix, "reindex") or {}).get("done", 0) < 6 and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the re-encode finished before it could be killed: make the corpus bigger"
    # mid-run, the old generation still answers, with the old model
    assert top_paths(ix, k=10) == before
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert top_paths(ix, k=10) == before and meta(ix, "model")["fingerprint"] == old_fp
    # the killed re-encode resumes: only what it had not committed is encoded
    s = index_json(ix, "--model", other_model, "--reindex", "--device", "cpu")
    assert 0 < s["reencoded"] <= 54
    assert meta(ix, "model")["fingerprint"] != old_fp and meta(ix, "reindex") is None
    with alignsearch.open(ix) as engine:
        assert engine.search(image=root / "img007.jpg", k=1)[0].path == str(root / "img007.jpg")
        assert engine.search(image=root / "img007.jpg", k=1)[0].score == pytest.approx(1, abs=2e-3)
    assert run("verify", "--index", ix).exit_code == 0


def test_reindex_is_not_mixed_with_an_ordinary_run(tmp_path, tiny_model, other_model, monkeypatch):
    """An `index` run (new files) between a failed re-encode and its resumption encodes the new files
    with the index's current model; the resumed re-encode then covers them too."""
    from alignsearch.model import Encoder

    root, ix = tmp_path / "photos", tmp_path / "ix"
    make_images(root, 6)
    index_json(ix, root, "--model", tiny_model, "--device", "cpu")
    real, calls = Encoder.encode_crops, []

    def failing(self, crops):
        calls.append(len(crops))
        if len(calls) > 1:
            raise RuntimeError("out of memory")
        return real(self, crops)

    monkeypatch.setattr(Encoder, "encode_crops", failing)
    with pytest.raises(RuntimeError):
        run("index", "--index", ix, "--model", other_model, "--reindex", "--device", "cpu", "--batch-size", "2",
            "--workers", "0")
    monkeypatch.setattr(Encoder, "encode_crops", real)
    assert meta(ix, "reindex")["done"] == 2
    make_images(root / "more", 3, seed=4)
    s = index_json(ix, "--device", "cpu")
    assert s["added"] == 3 and meta(ix, "model")["model"] == str(tiny_model)
    s = index_json(ix, "--model", other_model, "--reindex", "--device", "cpu")
    assert s["reencoded"] == 7
    with alignsearch.open(ix) as engine:
        hit = engine.search(image=root / "more" / "img001.jpg", k=1)[0]
    assert hit.path == str(root / "more" / "img001.jpg") and hit.score == pytest.approx(1, abs=2e-3)


# -- 2. the model's identity does not depend on where its folder lies --------------------------------


def test_a_moved_model_folder_keeps_the_index_usable(tmp_path, tiny_model):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    root, ix = tmp_path / "photos", tmp_path / "ix"
    make_images(root, 4)
    index_json(ix, root, "--model", model, "--device", "cpu")
    before = top_paths(ix)
    moved = tmp_path / "elsewhere" / "model-copy"
    moved.parent.mkdir()
    shutil.move(model, moved)
    # the recorded folder is gone: the error says what to do, in one line
    result = run("query", "red", "--index", ix, code=4)
    assert "--model" in result.output and str(model) in result.output and "Traceback" not in result.output
    # the same weights at their new place answer as before
    assert top_paths(ix, model=str(moved)) == before
    out = run("query", "red", "--index", ix, "--model", moved, "--json").output
    assert [r["path"] for r in json.loads(out)["results"]] == before
    # an index run with --model NEW remembers the new place
    index_json(ix, "--model", moved, "--device", "cpu")
    assert meta(ix, "model")["model"] == str(moved)
    assert top_paths(ix) == before


def test_fingerprint_ignores_where_the_config_was_read():
    from alignsearch.model import config_identity

    a = {"_name_or_path": "/a/b", "transformers_version": "4.57", "projection_dim": 8,
         "text_config": {"_name_or_path": "", "hidden_size": 16}}
    b = {"_name_or_path": "/c", "transformers_version": "5.0", "projection_dim": 8,
         "text_config": {"_name_or_path": "/x", "hidden_size": 16}}
    assert config_identity(a) == config_identity(b)
    assert config_identity(a) != config_identity({**b, "projection_dim": 9})
