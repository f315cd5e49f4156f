"""Indexing from the cached exports alone (alignsearch/encoders/cached.py): found, used, refused when it must be."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from alignsearch.encoders import cached
from alignsearch.encoders.backend import EncoderOptions
from alignsearch.encoders.model import Encoder
from conftest import make_images

# Index in a fresh process and say which heavy modules it imported, and what the encoder was.
INDEX = """
import json, sys
from indexer.job import index_folders
s = index_folders([sys.argv[1]], sys.argv[2], model=sys.argv[3], device="cpu", backend=sys.argv[4])
loaded = sorted(m for m in ("torch", "transformers") if m in sys.modules)
print(json.dumps({"loaded": loaded, "added": s.added, "encoder": s.encoder}))
"""


def index_fresh(corpus, ix, model, cache, backend="auto") -> dict:
    env = {**os.environ, "ALIGNSEARCH_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", INDEX, str(corpus), str(ix), str(model), backend], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def vectors_by_path(ix, dim) -> dict:
    import sqlite3

    con = sqlite3.connect(ix / "catalog.db")
    rows = con.execute("select relpath, vec_row from files").fetchall()
    con.close()
    vecs = np.fromfile(ix / "vectors.f16", dtype=np.float16).reshape(-1, dim).astype(np.float32)
    return {path: vecs[row] for path, row in rows}


@pytest.fixture()
def model(tiny_model, tmp_path):
    """A private copy of the tiny checkpoint: these tests touch and replace its files."""
    return shutil.copytree(tiny_model, tmp_path / "model")


@pytest.fixture()
def cache(tmp_path):
    return tmp_path / "cache"


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["auto", "openvino"])
def test_a_second_index_run_loads_neither_torch_nor_transformers(model, cache, tmp_path, backend):
    corpus = tmp_path / "corpus"
    make_images(corpus, 5)
    first = index_fresh(corpus, tmp_path / "a", model, cache, backend)
    assert first["loaded"] == ["torch", "transformers"] and first["added"] == 5  # exports, records the folder
    second = index_fresh(corpus, tmp_path / "b", model, cache, backend)  # a new index of the same model
    make_images(tmp_path / "more", 3, seed=9)
    shutil.copytree(tmp_path / "more", corpus / "more")
    third = index_fresh(corpus, tmp_path / "a", model, cache, backend)  # the first index, updated
    if second["encoder"].get("image_backend", second["encoder"]["backend"]) == "torch":
        assert second["loaded"] == ["torch", "transformers"]  # torch measured fastest here: it must load
        return
    assert second["loaded"] == [] and third["loaded"] == []
    assert second["added"] == 5 and third["added"] == 3 and second["encoder"] == first["encoder"]
    ref = Encoder(str(model), device="cpu", backend="torch")
    for ix in (tmp_path / "a", tmp_path / "b"):
        got = vectors_by_path(ix, ref.dim)
        paths = sorted(got)
        want = ref.encode_images([corpus / p for p in paths])
        assert (np.stack([got[p] for p in paths]) * want).sum(axis=1).min() >= 0.999  # fp16 storage


@pytest.mark.slow
def test_a_changed_checkpoint_folder_is_loaded_again(model, cache, tmp_path, other_model):
    corpus = tmp_path / "corpus"
    make_images(corpus, 3)
    index_fresh(corpus, tmp_path / "a", model, cache, "openvino")
    os.utime(model / "config.json")  # touched: the stamp no longer matches, the checkpoint loads (and is stamped)
    assert index_fresh(corpus, tmp_path / "b", model, cache, "openvino")["loaded"] == ["torch", "transformers"]
    assert index_fresh(corpus, tmp_path / "c", model, cache, "openvino")["loaded"] == []
    # other weights under the same names: never taken for the recorded model
    for name in os.listdir(other_model):
        shutil.copy(other_model / name, model / name)
    env = {**os.environ, "ALIGNSEARCH_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "alignsearch", "index", str(corpus), "--index", str(tmp_path / "a"),
                           "--backend", "openvino", "--device", "cpu"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and "this index was built with" in proc.stderr, proc.stderr


def damage_silently(blob, tower, crops) -> bool:
    """Flip exponent bits in one tenth of a compiled graph after another until OpenVINO loads it without
    noticing (it checks parts of its blobs and recompiles those itself) and computes garbage; leaves the
    blob so damaged and says whether one was found."""
    from alignsearch.encoders.onnxrun import _openvino, cosines

    want = _openvino(tower, "fp32").infer({"crops": crops})[0].copy()
    os.chmod(blob, 0o600)
    orig = blob.read_bytes()
    for tenth in range(1, 9):
        data = bytearray(orig)
        for i in range(len(data) * tenth // 10 // 4 * 4 + 3, len(data) * (tenth + 1) // 10, 4):
            data[i] ^= 0x40  # a float32's exponent: x -> x * 2^(+-64)
        blob.write_bytes(bytes(data))
        before = blob.stat().st_mtime_ns
        got = _openvino(tower, "fp32").infer({"crops": crops})[0]
        if blob.stat().st_mtime_ns == before and not cosines(got, want).min() >= 0.99:  # NaN too; raw outputs ~1e-13
            return True
        blob.write_bytes(orig)
    return False


@pytest.mark.slow
def test_damaged_compiled_graphs_are_cleared_and_compiled_again(model, cache, tmp_path, monkeypatch):
    from alignsearch.encoders import records
    from alignsearch.encoders.onnxrun import probe_crops

    corpus = tmp_path / "corpus"
    make_images(corpus, 3)
    first = index_fresh(corpus, tmp_path / "a", model, cache, "openvino")
    monkeypatch.setenv("ALIGNSEARCH_CACHE", str(cache))
    (folder,) = cache.glob("onnx/*")
    tower = folder / "vision-fp32.onnx"
    blobs = list((folder / "openvino" / "vision-fp32").glob("*"))
    assert blobs, "OpenVINO kept no compiled graph"
    size = cached.spec_from(records.read(folder)["spec"]).output_size
    if not any(damage_silently(blob, tower, probe_crops(size)) for blob in blobs):
        pytest.skip("OpenVINO noticed every damage tried and compiled again itself (it caches in memory too)")
    second = index_fresh(corpus, tmp_path / "b", model, cache, "openvino")
    assert second["loaded"] == [] and second["added"] == 3  # still without torch: the ONNX file was intact
    dim = json.loads((model / "config.json").read_text())["projection_dim"]
    a, b = vectors_by_path(tmp_path / "a", dim), vectors_by_path(tmp_path / "b", dim)
    assert first["added"] == 3 and all(float(a[p] @ b[p]) >= 0.999 for p in a)


@pytest.mark.slow
def test_find_declines_what_it_cannot_run_without_the_checkpoint(tiny_model, monkeypatch, tmp_path):
    monkeypatch.setenv("ALIGNSEARCH_CACHE", str(tmp_path / "cache"))
    assert cached.find(str(tiny_model), None, EncoderOptions(device="cpu")) is None  # nothing exported yet
    Encoder(str(tiny_model), device="cpu").encode_images([make_images(tmp_path / "c", 1)[0]])
    Encoder(str(tiny_model), device="cpu").prepare_text()
    found = cached.find(str(tiny_model), None, EncoderOptions(device="cpu", backend="openvino"))
    assert found is not None and found.plan.images_on == "openvino"
    for opts in (EncoderOptions(device="cuda"), EncoderOptions(backend="torch"), EncoderOptions(precision="int8")):
        assert cached.find(str(tiny_model), None, opts) is None
    monkeypatch.setattr(cached, "gpu_possible", lambda: True)
    assert cached.find(str(tiny_model), None, EncoderOptions()) is None  # auto may mean a GPU: torch decides
    assert cached.find(str(tiny_model), None, EncoderOptions(device="cpu", backend="openvino")) is not None
    assert cached.find("kakaobrain/align-base", None, EncoderOptions(device="cpu")) is None  # hub ids: transformers
    other = {"model": str(tiny_model), "fingerprint": "0" * 16, "content_digest": "0" * 64}
    assert cached.find(None, other, EncoderOptions(device="cpu", backend="openvino")) is None  # not the recorded model


@pytest.mark.slow
def test_the_cached_encoder_gives_the_full_encoders_vectors_and_description(tiny_model, monkeypatch, tmp_path):
    monkeypatch.setenv("ALIGNSEARCH_CACHE", str(tmp_path / "cache"))
    full = Encoder(str(tiny_model), device="cpu", backend="openvino")
    images = make_images(tmp_path / "c", 5)
    want_images, want_text = full.encode_images(images), full.encode_text(["a red car", "x"])
    enc = cached.find(str(tiny_model), None, EncoderOptions(device="cpu", backend="openvino"))
    assert enc is not None and enc.describe() == full.describe() and enc.identifies(full.fingerprint)
    assert np.allclose(enc.encode_images(images), want_images, atol=1e-5)
    assert np.allclose(enc.encode_text(["a red car", "x"]), want_text, atol=1e-5)
    assert enc.classify(images[:2], ["cat", "dog"])[0][0]["label"] == "cat"


@pytest.mark.slow
def test_a_tower_that_fails_its_check_on_openvino_is_compiled_again_without_the_cache(tiny_model, monkeypatch, tmp_path):
    from alignsearch.encoders import onnxrun

    monkeypatch.setenv("ALIGNSEARCH_CACHE", str(tmp_path / "cache"))
    Encoder(str(tiny_model), device="cpu", backend="openvino").encode_crops(
        onnxrun.probe_crops(Encoder(str(tiny_model), device="cpu").spec.output_size))
    (folder,) = (tmp_path / "cache").glob("onnx/*")
    blobs = onnxrun.openvino_cache(folder / "vision-fp32.onnx")
    assert any(blobs.glob("*"))
    manifest = onnxrun.read_manifest(folder)
    size = cached.spec_from(manifest["spec"]).output_size
    real, calls = onnxrun.Tower.check, []

    def fails_once(self, got, want):  # as a damaged compiled graph does (cosine -0.02 seen)
        calls.append(sorted(p.name for p in blobs.glob("*")))
        if len(calls) == 1:
            raise onnxrun.OnnxUnusable("cosine -0.02")
        return real(self, got, want)

    monkeypatch.setattr(onnxrun.Tower, "check", fails_once)
    monkeypatch.setattr(onnxrun, "_COMPILED_HERE", set(), raising=False)  # compiled by an earlier run (this one's are not damaged)
    before = {p: p.stat().st_mtime_ns for p in blobs.glob("*")}
    tower = onnxrun.load_vision(folder, manifest, size, "openvino")
    assert len(calls) == 2 and tower.engine == "openvino"
    after = {p: p.stat().st_mtime_ns for p in blobs.glob("*")}
    assert after and all(after.get(p) != t for p, t in before.items())  # cleared, then compiled and kept again
    with pytest.raises(onnxrun.OnnxUnusable):  # ONNX Runtime has no compiled graphs to clear: the failure stands
        calls.clear()
        onnxrun.load_vision(folder, manifest, size, "onnx")


COLD_IMAGE = """
import json, sys
from alignsearch.surfaces.cli import main
try:
    main(["query", "--image", sys.argv[2], "--index", sys.argv[1], "--json", "-k", "3"])
except SystemExit as exit:
    assert not exit.code, exit.code
loaded = sorted(m for m in ("torch", "transformers") if m in sys.modules)
print(json.dumps({"loaded": loaded}))
"""


@pytest.mark.slow
def test_a_cold_image_query_runs_on_the_exports(model, cache, tmp_path):
    corpus = tmp_path / "corpus"
    images = make_images(corpus, 4)
    index_fresh(corpus, tmp_path / "ix", model, cache, "auto")
    env = {**os.environ, "ALIGNSEARCH_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", COLD_IMAGE, str(tmp_path / "ix"), str(images[2])], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert json.loads(lines[-1]) == {"loaded": []}
    hits = json.loads("\n".join(lines[:-1]))["results"]
    assert hits[0]["path"].endswith(images[2].name) and hits[0]["score"] == pytest.approx(1, abs=2e-3)


@pytest.mark.slow
def test_other_weights_under_the_same_size_mtime_and_inode_are_not_taken_for_the_stamped_ones(model, cache, tmp_path,
                                                                                              other_model):
    """The reviewer's case: a checkpoint re-extracted with fixed mtimes (tar --mtime) got the same sizes, mtimes
    and reused inodes with other weights. Here: rewritten in place, mtime set back."""
    corpus = tmp_path / "corpus"
    make_images(corpus, 3)
    index_fresh(corpus, tmp_path / "a", model, cache, "openvino")
    weights = model / "model.safetensors"
    st, data = weights.stat(), (other_model / "model.safetensors").read_bytes()
    assert len(data) == st.st_size
    with open(weights, "r+b") as f:  # same inode
        f.write(data)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (weights.stat().st_size, weights.stat().st_mtime_ns, weights.stat().st_ino) == (st.st_size, st.st_mtime_ns,
                                                                                           st.st_ino)
    out = index_fresh(corpus, tmp_path / "b", model, cache, "openvino")
    assert out["loaded"] == ["torch", "transformers"]  # the checkpoint was loaded: its new weights encode
    ref = Encoder(str(other_model), device="cpu", backend="torch")
    got = vectors_by_path(tmp_path / "b", ref.dim)
    assert min(float(got[p] @ ref.encode_images([corpus / p])[0]) for p in got) >= 0.999


@pytest.mark.slow
def test_a_damaged_manifest_anywhere_in_the_cache_is_passed_over(tiny_model, monkeypatch, tmp_path):
    from alignsearch.encoders import onnxrun

    monkeypatch.setenv("ALIGNSEARCH_CACHE", str(tmp_path / "cache"))
    enc = Encoder(str(tiny_model), device="cpu", backend="openvino")
    enc.encode_crops(np.zeros((1, *enc.spec.output_size, 3), np.uint8))
    enc.prepare_text()
    (folder,) = (tmp_path / "cache").glob("onnx/*")
    good = onnxrun.read_manifest(folder)
    opts = EncoderOptions(device="cpu", backend="openvino")
    for i, bad in enumerate([{"export_version": 2, "checkpoints": None}, {"export_version": 2, "checkpoints": "x"},
                             [1, 2], {**good, "dim": None}, {**good, "vision_speed": 3, "files": {"vision-fp32": 1}}]):
        other = tmp_path / "cache" / "onnx" / f"000bad{i}"  # scanned before the good one
        other.mkdir()
        (other / "manifest.json").write_text(json.dumps(bad))  # damaged manifests of the older, single-file kind
        assert cached.find(str(tiny_model), None, opts) is not None  # the good export, not a crash
    record = json.loads((folder / "records" / "model.json").read_text())
    (folder / "records" / "model.json").write_text(json.dumps({**record, "dim": "x"}))
    assert cached.find(str(tiny_model), None, opts) is None  # the only complete-looking one is damaged: full load


@pytest.mark.slow
def test_a_cached_run_leaves_the_text_tower_for_the_next_query(model, cache, tmp_path):
    corpus = tmp_path / "corpus"
    make_images(corpus, 3)
    index_fresh(corpus, tmp_path / "a", model, cache, "openvino")
    (text,) = cache.glob("onnx/*/text-fp32.onnx")
    text.unlink()
    out = index_fresh(corpus, tmp_path / "b", model, cache, "openvino")
    assert out["added"] == 3 and out["loaded"] == ["torch", "transformers"] and text.exists()  # exported again


@pytest.mark.slow
def test_a_re_export_drops_the_graphs_compiled_from_the_file_it_replaces(tiny_model, monkeypatch, tmp_path):
    from alignsearch.encoders import onnxrun

    monkeypatch.setenv("ALIGNSEARCH_CACHE", str(tmp_path / "cache"))
    enc = Encoder(str(tiny_model), device="cpu", backend="openvino")
    enc.encode_crops(np.zeros((1, *enc.spec.output_size, 3), np.uint8))
    (folder,) = (tmp_path / "cache").glob("onnx/*")
    blobs = onnxrun.openvino_cache(folder / "vision-fp32.onnx")
    stale = blobs / "stale.blob"
    stale.write_bytes(b"compiled from an older file")
    tower = folder / "vision-fp32.onnx"
    tower.write_bytes(tower.read_bytes()[:1000])  # truncated: exported again on the next load
    again = Encoder(str(tiny_model), device="cpu", backend="openvino")
    again.encode_crops(np.zeros((1, *enc.spec.output_size, 3), np.uint8))
    assert again.plan.images_on == "openvino" and not stale.exists() and any(blobs.glob("*"))
