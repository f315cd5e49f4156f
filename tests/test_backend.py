"""The ONNX Runtime backend: decisions, parity with torch, the cache, its damage, and every fallback."""

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from alignsearch.encoders import backend
from alignsearch.encoders.backend import EncoderOptions, Plan, plan
from alignsearch.errors import BadInputError, UsageError
from alignsearch.encoders.model import Encoder
from conftest import index_json, make_images, run
from helpers import NOBODY, alignsearch, can_drop_dac, resave_with_other_weights
from tiny_align import build_tiny_align

TEXTS = ["red car on beach", "a dog", "Ünïcödé façade 東京 🙂", " ".join(["a photo of a big dog on the road"] * 20)]


# -- decisions (no model) ------------------------------------------------------------------------------
@pytest.mark.parametrize("opts, device, ort, want", [
    (EncoderOptions(), "cpu", True, Plan("onnx", "fp32", "fp32")),
    (EncoderOptions(), "cuda", True, Plan("torch", "bf16", "bf16")),
    (EncoderOptions(precision="fp32"), "cuda", True, Plan("torch", "fp32", "fp32")),
    (EncoderOptions(backend="torch"), "cpu", True, Plan("torch", "fp32", "fp32")),
    (EncoderOptions(backend="torch", precision="bf16"), "cpu", True, Plan("torch", "bf16", "bf16")),
    (EncoderOptions(precision="int8"), "cpu", True, Plan("onnx", "int8", "fp32")),
])
def test_plan(opts, device, ort, want):
    assert plan(opts, device, ort) == want


# (options, OpenVINO installed, it has bf16 here) -> plan: bf16 goes to OpenVINO where it can run it.
@pytest.mark.parametrize("opts, ov, ov_bf16, want", [
    (EncoderOptions(), True, True, Plan("onnx", "fp32", "fp32")),  # images: measured later (Encoder)
    (EncoderOptions(precision="bf16"), True, True, Plan("openvino", "bf16", "bf16")),
    (EncoderOptions(backend="openvino"), True, False, Plan("openvino", "fp32", "fp32")),
    (EncoderOptions(backend="openvino", precision="bf16"), True, True, Plan("openvino", "bf16", "bf16")),
    (EncoderOptions(backend="torch", precision="bf16"), True, True, Plan("torch", "bf16", "bf16")),
])
def test_plan_with_openvino(opts, ov, ov_bf16, want):
    assert plan(opts, "cpu", True, ov, ov_bf16) == want


def test_plan_bf16_without_openvino_runs_torch_and_says_why():
    p = plan(EncoderOptions(precision="bf16"), "cpu", True, False, False)
    assert (p.backend, p.image) == ("torch", "bf16") and "openvino is not installed" in p.why
    p = plan(EncoderOptions(precision="bf16"), "cpu", True, True, False)
    assert p.backend == "torch" and "no BF16 instructions" in p.why
    p = plan(EncoderOptions(), "cpu", False, True, False)  # no onnxruntime: OpenVINO runs both towers
    assert p.backend == "openvino" and "onnxruntime is not installed" in p.why


def test_plan_without_onnxruntime_says_why_and_refuses_what_needs_it():
    p = plan(EncoderOptions(), "cpu", False)
    assert p.backend == "torch" and "onnxruntime is not installed" in p.why
    for opts in (EncoderOptions(backend="onnx"), EncoderOptions(precision="int8")):
        with pytest.raises(BadInputError, match="pip install onnxruntime"):
            plan(opts, "cpu", False)


@pytest.mark.parametrize("opts, device", [
    (EncoderOptions(backend="onnx"), "cuda"), (EncoderOptions(precision="int8"), "cuda"),
    (EncoderOptions(backend="torch", precision="int8"), "cpu"), (EncoderOptions(backend="onnx", precision="bf16"), "cpu"),
    (EncoderOptions(backend="openvino"), "cuda"), (EncoderOptions(backend="openvino", precision="int8"), "cpu"),
])
def test_plan_refuses_combinations_that_cannot_run(opts, device):
    with pytest.raises(UsageError):  # options that cannot go together: bad usage (exit 2), not unusable input
        plan(opts, device, True, True, True)


def test_plan_refuses_openvino_where_it_cannot_run():
    with pytest.raises(BadInputError, match="pip install openvino"):
        plan(EncoderOptions(backend="openvino"), "cpu", True, False, False)
    with pytest.raises(BadInputError, match="no bf16 on this CPU"):
        plan(EncoderOptions(backend="openvino", precision="bf16"), "cpu", True, True, False)


def test_unknown_names_are_refused():
    with pytest.raises(UsageError, match="unknown backend"):  # as click's Choice says it: exit 2
        EncoderOptions(backend="tensorrt")
    with pytest.raises(UsageError, match="unknown precision"):
        EncoderOptions(precision="fp8")


# -- parity and the cache ---------------------------------------------------------------------------------
@pytest.fixture()
def cache(tmp_path, monkeypatch):
    """A cache folder of the test's own, so each test sees exports happen (or not)."""
    monkeypatch.setenv("ALIGNSEARCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def crops(encoder, n=5, seed=1):
    return np.random.default_rng(seed).integers(0, 256, (n, *encoder.spec.output_size, 3), dtype=np.uint8)


def onnx_manifest(folder) -> dict:
    """A cache folder's manifest, its per-artefact records assembled."""
    from alignsearch.encoders import onnxrun

    return onnxrun.read_manifest(folder)


def record_speed(folder, machine: str, speed: dict) -> None:
    """Record vision rates for a machine, as a measurement does."""
    from alignsearch.encoders import records

    records.Writer(folder, onnx_manifest(folder)).speed(machine, speed)


@pytest.mark.slow
def test_onnx_is_the_cpu_default_and_matches_torch(tiny_model, cache):
    ort = Encoder(str(tiny_model), device="cpu", backend="onnx")
    ref = Encoder(str(tiny_model), device="cpu", backend="torch")
    assert ort.plan == Plan("onnx", "fp32", "fp32") == Encoder(str(tiny_model), device="cpu").plan
    assert (ort.encode_text(TEXTS) * ref.encode_text(TEXTS)).sum(axis=1).min() >= 0.9999
    c = crops(ort, 9)  # more than one micro-batch
    assert (ort.encode_crops(c) * ref.encode_crops(c)).sum(axis=1).min() >= 0.9999
    assert ort.plan == Plan("onnx", "fp32", "fp32")  # no fallback happened on the way
    manifest = onnx_manifest(next(cache.glob("onnx/*")))
    assert manifest["fingerprint"] == ort.fingerprint and manifest["content_digest"] == ort.content_digest
    assert set(manifest["files"]) == {"text-fp32", "vision-fp32", "tokenizer"}


@pytest.mark.slow
def test_auto_runs_images_on_whichever_engine_was_measured_faster_here(tiny_model, cache):
    auto = Encoder(str(tiny_model), device="cpu")
    ref = Encoder(str(tiny_model), device="cpu", backend="torch")
    c = crops(auto, 6)
    assert (auto.encode_crops(c) * ref.encode_crops(c)).sum(axis=1).min() >= 0.9999
    manifest = onnx_manifest(next(cache.glob("onnx/*")))
    (speed,) = manifest["vision_speed"].values()  # one machine: this one
    assert set(speed) == {"onnx", "openvino", "torch"} and min(speed.values()) > 0  # every engine loaded and ran
    assert auto.plan.images_on == backend.faster_for_images(speed) and auto.plan.backend == "onnx"
    # a recorded measurement is used as it is: torch recorded faster -> torch, and the plan says why
    folder = next(cache.glob("onnx/*"))
    machine = next(iter(manifest["vision_speed"]))
    record_speed(folder, machine, {"onnx": 1.0, "openvino": 1.0, "torch": 2.0})
    slow = Encoder(str(tiny_model), device="cpu")
    assert np.array_equal(slow.encode_crops(c), ref.encode_crops(c))
    assert slow.plan.images_on == "torch" and "measured fastest here" in slow.plan.why
    assert slow.plan.to_dict()["image_backend"] == "torch"
    # OpenVINO recorded fastest -> it runs the images, at parity with torch
    record_speed(folder, machine, {"onnx": 1.0, "openvino": 3.0, "torch": 2.0})
    ov = Encoder(str(tiny_model), device="cpu")
    assert (ov.encode_crops(c) * ref.encode_crops(c)).sum(axis=1).min() >= 0.9999
    assert ov.plan.images_on == "openvino" and ov._towers["image"].engine == "openvino"
    assert "OpenVINO runs the vision tower" in ov.plan.why and ov.plan.backend == "onnx"
    # a newly installed engine (not in the record) makes it measure again
    record_speed(folder, machine, {"onnx": 1.0, "torch": 2.0})
    Encoder(str(tiny_model), device="cpu").encode_crops(c[:1])
    again = onnx_manifest(folder)["vision_speed"][machine]
    assert set(again) == {"onnx", "openvino", "torch"} and again != {"onnx": 1.0, "torch": 2.0}


@pytest.mark.slow
def test_openvino_runs_both_towers_at_parity_and_bf16_within_its_floor(tiny_model, cache):
    ref = Encoder(str(tiny_model), device="cpu", backend="torch")
    ov = Encoder(str(tiny_model), device="cpu", backend="openvino")
    assert ov.plan == Plan("openvino", "fp32", "fp32")
    c = crops(ov, 9)
    assert (ov.encode_crops(c) * ref.encode_crops(c)).sum(axis=1).min() >= 0.9999
    assert (ov.encode_text(TEXTS) * ref.encode_text(TEXTS)).sum(axis=1).min() >= 0.9999
    assert {t.engine for t in ov._towers.values()} == {"openvino"} and ov.plan == Plan("openvino", "fp32", "fp32")
    if not backend.openvino_bf16():
        pytest.skip("this CPU has no BF16 for OpenVINO")
    bf = Encoder(str(tiny_model), device="cpu", precision="bf16")
    assert bf.plan == Plan("openvino", "bf16", "bf16")
    cos = (bf.encode_crops(c) * ref.encode_crops(c)).sum(axis=1)
    assert cos.min() >= 0.99 and bf.plan == Plan("openvino", "bf16", "bf16")  # no fallback on the way
    assert bf._towers["image"].precision == "bf16"


def test_faster_for_images_picks_the_fastest_and_keeps_torch_only_when_clearly_faster():
    assert backend.faster_for_images({"onnx": 3.0, "torch": 3.1}) == "onnx"
    assert backend.faster_for_images({"onnx": 3.0, "torch": 3.5}) == "torch"
    assert backend.faster_for_images({"onnx": 9.3, "torch": 4.2}) == "onnx"
    # the 2-core Xeon of RESULTS.md: OpenVINO 7.3, torch 3.7, ORT 2.9
    assert backend.faster_for_images({"onnx": 2.9, "openvino": 7.3, "torch": 3.7}) == "openvino"
    assert backend.faster_for_images({"onnx": 3.0, "openvino": 3.0, "torch": 3.0}) == "onnx"
    assert backend.faster_for_images({"onnx": 0.0, "openvino": 3.0, "torch": 3.1}) == "openvino"  # 0: failed to load


@pytest.mark.slow
def test_a_later_run_uses_the_cache_without_exporting(tiny_model, cache, monkeypatch):
    first = Encoder(str(tiny_model), device="cpu")
    first.encode_text(["a dog"])
    first.encode_crops(crops(first))
    import torch

    def refuse(*a, **k):
        raise AssertionError("exported again")

    monkeypatch.setattr(torch.onnx, "export", refuse)
    enc = Encoder(str(tiny_model), device="cpu")
    enc.encode_text(["a dog"])
    enc.encode_crops(crops(enc))
    assert enc.plan.backend == "onnx"


@pytest.mark.slow
def test_a_failing_export_falls_back_to_torch_and_says_why(tiny_model, cache, monkeypatch):
    import torch

    def broken(*a, **k):
        raise RuntimeError("unsupported operator aten::frobnicate")

    monkeypatch.setattr(torch.onnx, "export", broken)
    enc = Encoder(str(tiny_model), device="cpu")
    ref = Encoder(str(tiny_model), device="cpu", backend="torch")
    assert np.array_equal(enc.encode_text(TEXTS), ref.encode_text(TEXTS))
    assert enc.plan.backend == "torch" and "could not export" in enc.plan.why and "frobnicate" in enc.plan.why


@pytest.mark.slow
@pytest.mark.parametrize("missing, runs", [(("onnxruntime", "openvino"), "torch"), (("onnxruntime",), "openvino")])
def test_without_onnxruntime_the_index_runs_on_what_is_left(tiny_model, tmp_path, missing, runs):
    """onnxruntime missing (an import that fails, as in an environment without it): OpenVINO runs the model
    where installed, else torch, said in --json."""
    shim = tmp_path / "shim"
    for name in missing:
        (shim / name).mkdir(parents=True)
        (shim / name / "__init__.py").write_text(f"raise ImportError('{name} was removed for this test')\n")
    corpus = tmp_path / "corpus"
    make_images(corpus, 4)
    env = {"PYTHONPATH": os.pathsep.join([str(shim), os.environ.get("PYTHONPATH", "")]),
           "ALIGNSEARCH_CACHE": str(tmp_path / "cache")}
    proc = alignsearch("index", corpus, "--index", tmp_path / "ix", "--model", tiny_model, "--json", "--device", "cpu",
                       env=env)  # on a GPU torch is chosen anyway (seen on an H200)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["added"] == 4 and out["encoder"]["backend"] == runs and "onnxruntime" in out["encoder"]["note"]
    proc = alignsearch("index", corpus, "--index", tmp_path / "ix", "--backend", "onnx", "--device", "cpu", env=env)
    assert proc.returncode == BadInputError.exit_code and "pip install onnxruntime" in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncate", "flip", "manifest"])
def test_a_damaged_cache_is_exported_again(tiny_model, exported_cache, damage):
    first = Encoder(str(tiny_model), device="cpu")
    want = first.encode_text(TEXTS)
    folder = next(exported_cache.glob("onnx/*"))
    tower = folder / "text-fp32.onnx"
    data = bytearray(tower.read_bytes())
    if damage == "truncate":
        tower.write_bytes(data[: len(data) // 2])
    elif damage == "flip":  # same size: only the probes can tell; flip bytes in the weights (the file's tail)
        for i in range(len(data) - 4096, len(data) - 64, 97):
            data[i] ^= 0xFF
        tower.write_bytes(bytes(data))
    else:
        (folder / "records" / "model.json").write_text("{not json")
    again = Encoder(str(tiny_model), device="cpu")
    got = again.encode_text(TEXTS)
    assert again.plan.backend == "onnx" and (got * want).sum(axis=1).min() >= 0.9999
    assert onnx_manifest(folder)["files"]["text-fp32"]["size"] == tower.stat().st_size


def test_a_damaged_text_tower_is_not_used_by_the_torch_free_path(tiny_model, exported_cache):
    from alignsearch.encoders import cached

    enc = Encoder(str(tiny_model), device="cpu")
    enc.encode_text(["a dog"])
    assert cached.text_encoder(enc.describe()) is not None
    for name in ("text-fp32.onnx", "tokenizer.json"):
        path = next(exported_cache.glob(f"onnx/*/{name}"))
        original = path.read_bytes()
        data = bytearray(original)
        data[len(data) // 2] ^= 0x01  # one bit, same size: the hash catches it
        path.write_bytes(bytes(data))
        assert cached.text_encoder(enc.describe()) is None, name  # the caller loads the model instead
        path.write_bytes(original)  # the same bytes again (a new mtime): hashed, and accepted
        assert cached.text_encoder(enc.describe()) is not None, name


@contextmanager
def _unless_hung(seconds: int):
    """Fails the test, instead of hanging it, if the block takes longer (a FIFO opened for reading)."""
    def hung(*_):
        raise AssertionError(f"hung for {seconds} s")

    before = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, before)


def _plant_in_records(records: Path, name: str, kind: str, elsewhere: Path) -> None:
    """Put something other than this user's regular file at records/NAME: a FIFO, a folder, a symlink to a
    copy of the record kept elsewhere, or the record (or a FIFO) owned by another user."""
    path = records / name
    if kind in ("fifo", "fifo-of-nobody", "folder", "link"):
        shutil.copyfile(path, elsewhere)
        path.unlink()
    if kind.startswith("fifo"):
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
    elif kind == "link":
        path.symlink_to(elsewhere)  # a whole, valid record: trusted only if the link were followed
    if kind.endswith("of-nobody"):
        os.chown(path, NOBODY, NOBODY)


@pytest.mark.parametrize("name", ["model.json", "file-text-fp32.json"])
@pytest.mark.parametrize("kind", ["fifo", "folder", "link", "of-nobody", "fifo-of-nobody"])
@pytest.mark.slow
def test_a_record_that_is_not_this_users_regular_file_is_never_trusted_nor_hangs(tiny_model, exported_cache, tmp_path,
                                                                                monkeypatch, name, kind):
    """records/ holds only this user's regular files, each read without following a link and without
    blocking: another kind of file there is taken for a missing record (its tower exported again, the
    record written over it), another user's for a cache not to use (the model runs on torch, and says why)."""
    from alignsearch.encoders import cached, onnxexport

    if kind.endswith("of-nobody") and os.geteuid() != 0:
        pytest.skip("chown to another user needs root")
    records = next(exported_cache.glob("onnx/*")) / "records"
    _plant_in_records(records, name, kind, tmp_path / "copy.json")
    exports = []
    real_export = onnxexport._export
    monkeypatch.setattr(onnxexport, "_export", lambda module, args, path, names, axes:
                        exports.append(names[0]) or real_export(module, args, path, names, axes))
    with _unless_hung(120):
        enc = Encoder(str(tiny_model), device="cpu")
        assert cached.text_encoder(enc.describe()) is None  # the torch-free path: no whole export it trusts
        got = enc.encode_text(TEXTS)
    ref = Encoder(str(tiny_model), device="cpu", backend="torch").encode_text(TEXTS)
    assert (got * ref).sum(axis=1).min() >= 0.9999
    if kind.endswith("of-nobody"):
        assert enc.plan.backend == "torch" and "belongs to another user" in enc.plan.why and exports == []
        assert os.lstat(records / name).st_uid == NOBODY  # another user's file is left as it is
    elif kind == "folder":  # never deleted (it may hold the user's files): the cache is not written, and why
        assert enc.plan.backend == "torch" and f"{records.parent}: records/{name}: " in enc.plan.why
        assert (records / name).is_dir()
    else:
        assert enc.plan.backend == "onnx" and exports == ["input_ids"]
        assert stat.S_ISREG(os.lstat(records / name).st_mode)


@pytest.mark.slow
@pytest.mark.skipif(not can_drop_dac(), reason="needs to drop root's permission bypass")
def test_an_unwritable_cache_falls_back_to_torch(tiny_model, tmp_path):
    locked = tmp_path / "cache"
    locked.mkdir()
    os.chmod(locked, 0o555)
    corpus = tmp_path / "corpus"
    make_images(corpus, 3)
    try:
        proc = alignsearch("index", corpus, "--index", tmp_path / "ix", "--model", tiny_model, "--json",
                           unprivileged=True, env={"ALIGNSEARCH_CACHE": str(locked)})
    finally:
        os.chmod(locked, 0o755)
    assert proc.returncode == 0, proc.stderr
    enc = json.loads(proc.stdout)["encoder"]
    assert enc["backend"] == "torch" and "cannot write the ONNX cache" in enc["note"]


def test_a_cache_path_that_is_a_file_falls_back_to_torch(tiny_model, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("ALIGNSEARCH_CACHE", str(tmp_path / "file"))
    enc = Encoder(str(tiny_model), device="cpu")
    enc.encode_text(["a dog"])
    assert enc.plan.backend == "torch" and "cannot write the ONNX cache" in enc.plan.why
    # the entry named is the one in the way, as it is (not "..", its name relative to the cache's own folder)
    assert f": {tmp_path / 'file'}" in enc.plan.why and "..:" not in enc.plan.why, enc.plan.why
    assert enc.plan.why.endswith("Not a directory"), enc.plan.why


def test_a_cache_error_names_the_entry_in_the_way():
    """Inside the cache's folder, by its name there; elsewhere (the folder itself, a parent), as it is; a
    rename's by its destination (the source is a temporary that no longer says which entry failed)."""
    import errno

    from alignsearch.encoders.onnxexport import _entry

    folder = Path("/cache/onnx/model")
    assert _entry(OSError(errno.EISDIR, "Is a directory", str(folder / "records" / "x")), folder) == "records/x"
    assert _entry(OSError(errno.ENOTDIR, "Not a directory", "/cache/onnx"), folder) == "/cache/onnx"
    assert _entry(OSError(errno.EACCES, "Permission denied", str(folder)), folder) == str(folder)
    renamed = OSError(errno.EISDIR, "Is a directory", str(folder / ".vision.onnx.x1.tmp"), None,
                      str(folder / "vision.onnx"))
    assert _entry(renamed, folder) == "vision.onnx"


# -- precision ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_int8_text_tower_on_a_model_that_quantizes(tmp_path, cache):
    model = build_tiny_align(tmp_path / "m", text_init=0.02, text_hidden=64)  # trained-like weight scale
    exact = Encoder(str(model), device="cpu")
    small = Encoder(str(model), device="cpu", precision="int8")
    cos = (small.encode_text(TEXTS) * exact.encode_text(TEXTS)).sum(axis=1)
    assert small.plan.text == "int8", small.plan
    assert cos.min() >= 0.99 and not np.allclose(cos, 1.0, atol=1e-7)  # quantized: close, not identical
    c = crops(small)
    assert (small.encode_crops(c) * exact.encode_crops(c)).sum(axis=1).min() >= 0.9999  # images stay fp32


@pytest.mark.slow
def test_int8_that_drifts_too_far_is_refused_once_and_text_stays_exact(tiny_model, exported_cache, monkeypatch):
    """The unit-test model's huge random weights (init 1.0) quantize badly: int8 is refused with the measured
    cosine, text runs at fp32 on ONNX, and the refusal is remembered (no quantizing on every start)."""
    enc = Encoder(str(tiny_model), device="cpu", precision="int8")
    ref = Encoder(str(tiny_model), device="cpu", backend="torch")
    assert (enc.encode_text(TEXTS) * ref.encode_text(TEXTS)).sum(axis=1).min() >= 0.9999
    assert enc.plan.backend == "onnx" and enc.plan.text == "fp32" and "text-int8" in enc.plan.why
    import onnxruntime.quantization

    monkeypatch.setattr(onnxruntime.quantization, "quantize_dynamic",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("quantized again")))
    again = Encoder(str(tiny_model), device="cpu", precision="int8")
    again.encode_text(["a dog"])
    assert again.plan.text == "fp32" and "quantized again" not in again.plan.why
    # remembered on disk (a lost rejection sent every cold int8 query through torch): no int8 file listed
    manifest = onnx_manifest(next(exported_cache.glob("onnx/*")))
    assert "text-int8" in manifest["rejected"] and "text-int8" not in manifest["files"]
    from alignsearch.encoders import cached

    info = {"fingerprint": ref.fingerprint, "content_digest": ref.content_digest}  # ref has tokenized by now
    light = cached.text_encoder(info, EncoderOptions(precision="int8"))  # torch-free: exact text, as the full path
    assert light is not None and light.text_only and light.plan.text == "fp32" and "text-int8" in light.plan.why


@pytest.mark.parametrize("quantizes", [False, True])
@pytest.mark.slow
def test_an_int8_refusal_recorded_before_records_said_where_is_measured_again_once(tiny_model, tmp_path, cache,
                                                                                  monkeypatch, quantizes):
    """A rejected-text-int8.json without "on" (written before refusals said where they were measured) held on
    every CPU and ONNX Runtime for ever: int8 was never measured again. It is measured once, and the
    measurement replaces it: a refusal that says where, or (int8 passes now) no refusal."""
    from alignsearch.encoders import onnxrun, records

    model = build_tiny_align(tmp_path / "m", text_init=0.02, text_hidden=64) if quantizes else tiny_model
    Encoder(str(model), device="cpu").encode_text(["a dog"])
    folder = next(cache.glob("onnx/*"))
    identity = json.loads((folder / "records" / "model.json").read_text())
    old = folder / "records" / "rejected-text-int8.json"
    old.write_text(json.dumps({"why": "an old refusal", records.OF: records.of_export(identity)}))
    assert onnxrun.read_manifest(folder)["rejected"] == {"text-int8": "an old refusal"}  # read as it is
    enc = Encoder(str(model), device="cpu", precision="int8")
    enc.encode_text(TEXTS)
    assert enc.plan.text == ("int8" if quantizes else "fp32") and "an old refusal" not in enc.plan.why, enc.plan
    manifest = onnx_manifest(folder)
    assert "an old refusal" not in json.dumps(manifest)
    assert bool(onnxrun.rejected(manifest, "int8", "onnx")) is not quantizes  # the measurement, recorded with where
    import onnxruntime.quantization

    monkeypatch.setattr(onnxruntime.quantization, "quantize_dynamic",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("quantized again")))
    again = Encoder(str(model), device="cpu", precision="int8")
    again.encode_text(["a dog"])
    assert again.plan.text == enc.plan.text and "quantized again" not in again.plan.why  # measured once


@pytest.mark.slow
def test_machines_sharing_a_cache_each_keep_their_own_refusal(tiny_model, exported_cache, monkeypatch):
    """A cache shared by machines of two CPUs (an NFS home): the int8 refusal was one record per key, which each
    machine overwrote with its own, so each measured (quantized) again whenever the other had run in between."""
    from alignsearch.encoders import onnxrun
    import onnxruntime.quantization

    where, quantized = ["Xeon A [amx_bf16 avx512_vnni]"], []
    monkeypatch.setattr(onnxrun, "numerics", lambda: where[0], raising=False)
    monkeypatch.setattr(onnxrun, "machine", lambda: f"{where[0]} x16")  # what the key held before, faked alike
    real = onnxruntime.quantization.quantize_dynamic
    monkeypatch.setattr(onnxruntime.quantization, "quantize_dynamic",
                        lambda *a, **k: quantized.append(where[0]) or real(*a, **k))
    for cpu in ("Xeon A [amx_bf16 avx512_vnni]", "EPYC B [avx2]") * 2:
        where[0] = cpu
        enc = Encoder(str(tiny_model), device="cpu", precision="int8")
        enc.encode_text(["a dog"])
        assert enc.plan.text == "fp32" and "text-int8" in enc.plan.why
    assert quantized == ["Xeon A [amx_bf16 avx512_vnni]", "EPYC B [avx2]"]  # once each, then each reuses its own
    manifest = onnx_manifest(next(exported_cache.glob("onnx/*")))
    assert sorted(r["on"]["machine"] for r in manifest["refusals"]["text-int8"]) == ["EPYC B [avx2]",
                                                                                  "Xeon A [amx_bf16 avx512_vnni]"]


def test_a_refusal_is_keyed_by_the_cpu_model_and_its_numeric_instruction_sets_not_its_core_count(tmp_path, monkeypatch):
    """bf16 and int8 arithmetic depend on the CPU's model and instruction sets (a hypervisor may hide AMX under the
    same model name); its core count changes the vision tower's speed, not the numbers."""
    from alignsearch.encoders import onnxrun

    def cpuinfo(name: str, cores: int, flags: str) -> str:
        (tmp_path / name).write_text("".join(f"processor\t: {i}\nmodel name\t: Xeon X\nflags\t\t: {flags}\n\n"
                                             for i in range(cores)))
        return str(tmp_path / name)

    small = onnxrun.numerics(cpuinfo("small", 2, "fpu sse4_2 avx2 avx512f avx512_bf16 amx_bf16"))
    large = onnxrun.numerics(cpuinfo("large", 64, "fpu sse4_2 avx2 avx512f avx512_bf16 amx_bf16 ht"))
    hidden = onnxrun.numerics(cpuinfo("vm", 2, "fpu sse4_2 avx2 avx512f"))
    assert small == large != hidden and small.startswith("Xeon X")
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    two = onnxrun.measured_on("onnx"), onnxrun.machine()
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert onnxrun.measured_on("onnx") == two[0] and onnxrun.machine() != two[1]  # speed per core count, not parity


@pytest.mark.slow
def test_a_bf16_text_tower_that_drifts_is_refused_once_and_remembered_as_int8s_is(tiny_model, tmp_path, cache,
                                                                                     monkeypatch):
    """`query --precision bf16` on a model whose bf16 text drifts past its floor (the tiny model on a Xeon:
    cosine 0.978, needs 0.999) cleared OpenVINO's graphs three times, recompiled, said "exporting the text
    tower" over an existing export and ran on torch, on every run. Measured once now, and remembered the way
    int8's refusal is: later runs run exact text on OpenVINO at once, in one line. The failure is forced (the
    floor above any cosine), so this does not depend on the CPU's bf16."""
    from alignsearch.encoders import onnxexport, onnxrun, resolve

    if not backend.openvino_installed():
        pytest.skip("openvino is not installed")
    make_images(tmp_path / "photos", 3)
    index_json(tmp_path / "ix", tmp_path / "photos", "--model", tiny_model, "--device", "cpu")
    monkeypatch.setattr(resolve, "openvino_bf16", lambda: True)
    monkeypatch.setitem(onnxrun.FLOOR, "bf16", 2.0)
    compiled, exported = [], []
    real_ov, real_export = onnxrun._openvino, onnxexport._export
    monkeypatch.setattr(onnxrun, "_openvino", lambda path, precision: compiled.append(precision) or real_ov(path, precision))
    monkeypatch.setattr(onnxexport, "_export", lambda *a, **k: exported.append(a[2]) or real_export(*a, **k))
    query = ("query", "dog", "--index", tmp_path / "ix", "--precision", "bf16")
    first = run(*query)
    assert "bf16" in compiled, first.stderr  # measured
    compiled.clear(), exported.clear()
    second = run(*query)
    said = second.stderr.strip().splitlines()
    assert compiled == ["fp32"] and exported == [], (compiled, exported)  # no bf16 compile, no export again
    assert len(said) <= 1 and "exporting" not in second.stderr, said
    assert second.stdout == first.stdout
    manifest = onnx_manifest(next(cache.glob("onnx/*")))
    assert onnxrun.rejected(manifest, "bf16", "openvino") and "text-fp32" in manifest["files"]
    # measured again on another OpenVINO version or CPU (weights and export version: another folder or export)
    key = onnxrun.rejection_key("bf16", "openvino")
    (refusal,) = manifest["refusals"][key]
    for changed in ({"version": "0.0"}, {"machine": "another CPU"}):
        other = {**manifest, "refusals": {key: [{**refusal, "on": {**refusal["on"], **changed}}]}}
        assert onnxrun.rejected(other, "bf16", "openvino") is None
    monkeypatch.setattr(onnxrun, "numerics", lambda: "another CPU")
    compiled.clear()
    run(*query)
    assert "bf16" in compiled


@pytest.mark.slow
def test_a_bf16_vision_tower_that_drifts_is_refused_once_and_remembered_as_texts_is(tiny_model, tmp_path, cache,
                                                                                   monkeypatch):
    """`index --precision bf16` on a model whose bf16 images drift past their floor: the refusal was not
    remembered (text's only), so every run compiled and measured bf16 again, exported the vision tower again and
    ran the whole model on torch. Now the images run at fp32 on OpenVINO, and later runs know it without
    measuring. Forced (the floor above any cosine), so this does not depend on the CPU's bf16."""
    from alignsearch.encoders import onnxexport, onnxrun, resolve

    if not backend.openvino_installed():
        pytest.skip("openvino is not installed")
    monkeypatch.setattr(resolve, "openvino_bf16", lambda: True)
    monkeypatch.setitem(onnxrun.FLOOR, "bf16", 2.0)
    compiled, exported = [], []
    real_ov, real_export = onnxrun._openvino, onnxexport._export
    monkeypatch.setattr(onnxrun, "_openvino",
                        lambda path, precision: compiled.append((path.stem, precision)) or real_ov(path, precision))
    monkeypatch.setattr(onnxexport, "_export", lambda *a, **k: exported.append(Path(a[2]).name) or real_export(*a, **k))
    make_images(tmp_path / "photos", 3)
    make_images(tmp_path / "more", 2, seed=5)
    index = ("--index", tmp_path / "ix", "--model", tiny_model, "--device", "cpu", "--precision", "bf16")
    first = run("index", tmp_path / "photos", *index)
    assert ("vision-fp32", "bf16") in compiled, first.stderr  # measured
    compiled.clear(), exported.clear()
    second = json.loads(run("index", tmp_path / "photos", tmp_path / "more", *index, "--json").stdout)
    assert second["added"] == 2 and ("vision-fp32", "bf16") not in compiled and exported == [], (compiled, exported)
    assert (second["encoder"]["backend"], second["encoder"]["image_precision"]) == ("openvino", "fp32"), second["encoder"]
    manifest = onnx_manifest(next(cache.glob("onnx/*")))
    assert "vision-fp32" in onnxrun.rejected(manifest, "bf16", "openvino", "vision")  # its own record, beside text's
    assert "images at fp32" in first.stderr and "on torch" not in first.stderr, first.stderr


@pytest.mark.slow
@pytest.mark.parametrize("earlier, clears", [((), 0), (("--backend", "openvino"), 1)])
def test_measuring_a_drifting_bf16_text_tower_clears_the_compiled_graphs_once_at_most(tiny_model, tmp_path, exported_cache,
                                                                                      monkeypatch, earlier, clears):
    """The first `query --precision bf16` over an exported cache loads the bf16 text tower four times (the cold
    path's head start and its own try, then the checkpoint's, before and after its fp32 check), and each failed
    check said "clearing OpenVINO's compiled graphs" and compiled again: four warnings for one measurement. Graphs
    this process compiled are not damaged: their failure is the precision's drift. A graph an earlier run compiled
    may be: cleared once, saying why."""
    from alignsearch.encoders import onnxrun, resolve

    if not backend.openvino_installed():
        pytest.skip("openvino is not installed")
    make_images(tmp_path / "photos", 3)
    index_json(tmp_path / "ix", tmp_path / "photos", "--model", tiny_model, "--device", "cpu")
    if earlier:  # an earlier query compiled the text graph (at fp32: OpenVINO keeps one graph for f32 and bf16)
        run("query", "dog", "--index", tmp_path / "ix", *earlier)
    monkeypatch.setattr(onnxrun, "_COMPILED_HERE", set(), raising=False)  # the query below is another run than those
    monkeypatch.setattr(resolve, "openvino_bf16", lambda: True)
    monkeypatch.setitem(onnxrun.FLOOR, "bf16", 2.0)  # drifts on every CPU
    cleared, real_clear = [], onnxrun.clear_folder
    monkeypatch.setattr(onnxrun, "clear_folder", lambda folder: cleared.append(folder.name) or real_clear(folder))
    out = run("query", "dog", "--index", tmp_path / "ix", "--precision", "bf16")
    said = [line for line in out.stderr.splitlines() if "compiled" in line]
    assert len(cleared) == len(said) == clears, (cleared, out.stderr)
    assert all("compiled by an earlier run" in line and "clearing" in line for line in said), said
    assert "text at fp32" in out.stderr and onnxrun.rejected(onnx_manifest(next(exported_cache.glob("onnx/*"))),
                                                             "bf16", "openvino")


def test_index_refuses_int8(tiny_model, tmp_path):
    make_images(tmp_path / "c", 2)
    out = run("index", tmp_path / "c", "--index", tmp_path / "ix", "--model", tiny_model, "--precision", "int8",
              code=UsageError.exit_code).output
    assert "int8 is for the text tower" in out


# -- end to end -----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_index_and_query_on_onnx_match_torch(tiny_model, tmp_path, exported_cache):
    corpus = tmp_path / "corpus"
    make_images(corpus, 12)
    on_onnx = index_json(tmp_path / "a", corpus, "--model", tiny_model)
    on_torch = index_json(tmp_path / "b", corpus, "--model", tiny_model, "--backend", "torch")
    assert on_onnx["encoder"]["backend"] == "onnx" and on_torch["encoder"]["backend"] == "torch"
    a = json.loads(run("query", "red car", "--index", tmp_path / "a", "--json", "-k", "12").stdout)["results"]
    b = json.loads(run("query", "red car", "--index", tmp_path / "b", "--json", "-k", "12", "--backend", "torch").stdout)["results"]
    assert [h["path"] for h in a] == [h["path"] for h in b]
    assert np.allclose([h["score"] for h in a], [h["score"] for h in b], atol=2e-3)  # fp16 storage
    info = json.loads(run("info", "--index", tmp_path / "a", "--json").stdout)["encoder"]
    assert info["last_index_run"]["backend"] == "onnx" and info["onnx_cache"]["torch_free_text"]
    assert run("info", "--index", tmp_path / "a").output.count("onnx") >= 2


COLD = """
import json, sys
from alignsearch.surfaces.cli import main
try:
    main(["query", "red car", "--index", sys.argv[1], "--json", "-k", "5", *sys.argv[2:]])
except SystemExit as exit:
    assert not exit.code, exit.code
loaded = sorted(m for m in ("torch", "transformers") if m in sys.modules)
print(json.dumps({"loaded": loaded}))
"""


@pytest.mark.slow
def test_a_cold_text_query_imports_neither_torch_nor_transformers(tiny_model, tmp_path, exported_cache):
    corpus = tmp_path / "corpus"
    make_images(corpus, 6)
    index_json(tmp_path / "ix", corpus, "--model", tiny_model)
    env = {**os.environ, "ALIGNSEARCH_CACHE": str(exported_cache), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", COLD, str(tmp_path / "ix")], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert json.loads(lines[-1]) == {"loaded": []}
    results = json.loads("\n".join(lines[:-1]))["results"]
    ref = json.loads(run("query", "red car", "--index", tmp_path / "ix", "--json", "-k", "5", "--backend", "torch").stdout)
    assert [h["path"] for h in results] == [h["path"] for h in ref["results"]]
    if backend.openvino_installed():  # the plan puts text on OpenVINO: torch-free there too
        proc = subprocess.run([sys.executable, "-c", COLD, str(tmp_path / "ix"), "--backend", "openvino"],
                              capture_output=True, text=True, env=env, timeout=120)
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.strip().splitlines()
        assert json.loads(lines[-1]) == {"loaded": []}
        assert [h["path"] for h in json.loads("\n".join(lines[:-1]))["results"]] == [h["path"] for h in ref["results"]]
    # without a cache the same query still works: it loads the model (and exports for the next one)
    env["ALIGNSEARCH_CACHE"] = str(tmp_path / "empty-cache")
    proc = subprocess.run([sys.executable, "-c", COLD, str(tmp_path / "ix")], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0 and json.loads(proc.stdout.strip().splitlines()[-1])["loaded"] == ["torch", "transformers"]


def test_the_torch_free_tokenizer_matches_transformers(tiny_model, exported_cache):
    from alignsearch.encoders import cached

    enc = Encoder(str(tiny_model), device="cpu")
    enc.encode_text(["a dog"])
    light = cached.text_encoder(enc.describe()).towers.get("text")  # onnxrun.TextEncoder: tokenizer.json
    texts = TEXTS + ["", "   ", "UPPER case", "tab\tand\nnewline", "x" * 500, "café naïve", "[CLS] [SEP] [PAD]"]
    for t in texts:
        ids, mask = light.tokenize([t])
        want = enc.tokenizer([t], padding=True, truncation=True, max_length=enc.max_length, return_tensors="np")
        assert ids.tolist() == want["input_ids"].tolist() and mask.tolist() == want["attention_mask"].tolist(), t
    assert (light.encode_text(texts) * enc.encode_text(texts)).sum(axis=1).min() >= 0.9999


@pytest.mark.slow
def test_models_that_differ_where_the_fingerprint_does_not_look_never_share_exports(tiny_model, tmp_path, cache):
    """The fingerprint samples weights; the cache is keyed by every weight and the tokenizer too."""
    import shutil

    import torch
    from transformers import AlignModel

    other = tmp_path / "other"
    shutil.copytree(tiny_model, other)
    model = AlignModel.from_pretrained(str(tiny_model))
    emb = model.text_model.embeddings.word_embeddings.weight
    step = max(1, emb.numel() // 256)  # model._weights_digest samples flat[::step]
    cat = Encoder(str(tiny_model), device="cpu", backend="torch").tokenizer.convert_tokens_to_ids("cat")
    unsampled = [j for j in range(emb.shape[1]) if (cat * emb.shape[1] + j) % step]
    assert step > 1 and len(unsampled) > emb.shape[1] // 2
    with torch.no_grad():
        emb[cat, unsampled] *= -1
    model.save_pretrained(str(other))
    a, b = Encoder(str(tiny_model), device="cpu"), Encoder(str(other), device="cpu")
    assert a.fingerprint == b.fingerprint and a.content_digest != b.content_digest
    a.encode_text(["a cat"])  # exports A's text tower first
    got = b.encode_text(["a cat"])
    want = Encoder(str(other), device="cpu", backend="torch").encode_text(["a cat"])
    assert float(got[0] @ want[0]) >= 0.9999 and b.plan.backend == "onnx"
    assert float(got[0] @ a.encode_text(["a cat"])[0]) < 0.9999  # the edit matters
    assert len(list(cache.glob("onnx/*/records/model.json"))) == 2


@pytest.mark.slow
def test_two_exporters_at_once_keep_both_towers_in_the_manifest(tiny_model, cache):
    from alignsearch.encoders import onnxexport

    enc = Encoder(str(tiny_model), device="cpu")
    first, second = onnxexport.Exporter(enc), onnxexport.Exporter(enc)  # both read the (empty) manifest
    first.vision()
    second.text("fp32")
    manifest = onnx_manifest(next(cache.glob("onnx/*")))
    assert {"text-fp32", "vision-fp32", "tokenizer"} <= set(manifest["files"])
    assert {"text", "image"} <= set(manifest["probes"])


@pytest.mark.slow
def test_half_written_exports_of_killed_runs_are_cleaned_up(tiny_model, cache):
    enc = Encoder(str(tiny_model), device="cpu")
    enc.encode_text(["a dog"])
    folder = next(cache.glob("onnx/*"))
    # named as mkstemp names them (8 random characters): a sweep takes no other name (atomic.is_temporary)
    stale, live = folder / ".vision-fp32.onnx.abc12345.tmp", folder / ".vision-fp32.onnx.def45678.tmp"
    stale.write_bytes(b"half an export")
    live.write_bytes(b"another process, still writing")
    os.utime(stale, (1, 1))
    enc.encode_crops(crops(enc))  # exports the vision tower
    assert not stale.exists() and live.exists()


@pytest.mark.slow
def test_an_export_at_work_in_another_process_is_not_swept_by_a_concurrent_one(tiny_model, cache):
    """A slow export's temporary (torch writes the file only at its end, so its time stays the start's) is
    held, by its lock, by the process writing it: a concurrent export's sweep of killed exports' leftovers
    leaves it, however old it looks (deleting it failed that export's rename: it ran on torch)."""
    enc = Encoder(str(tiny_model), device="cpu")
    enc.encode_text(["a dog"])
    folder = next(cache.glob("onnx/*"))
    writer = subprocess.Popen([sys.executable, "-c", "import sys, time; from alignsearch import atomic\n"
                               "with atomic.replacing(sys.argv[1], durable=False) as tmp:\n"
                               "    print(tmp, flush=True); time.sleep(120)", str(folder / "vision-fp32.onnx")],
                              stdout=subprocess.PIPE, text=True)
    try:
        at_work = Path(writer.stdout.readline().strip())
        os.utime(at_work, (1, 1))  # started long ago
        enc.encode_crops(crops(enc))  # exports the vision tower: sweeps the folder first
        assert at_work.exists() and enc.plan.backend == "onnx"
    finally:
        writer.kill()
        writer.wait()


@pytest.mark.slow
def test_coldstart_loads_the_text_tower_early_and_the_engine_takes_it_only_for_its_model(tiny_model, tmp_path, exported_cache):
    import alignsearch
    from alignsearch.encoders import coldstart

    corpus = tmp_path / "corpus"
    make_images(corpus, 3)
    index_json(tmp_path / "ix", corpus, "--model", tiny_model)
    soon = coldstart.text_encoder_soon(tmp_path / "ix", EncoderOptions(device="cpu"))
    assert soon is not None and soon[0]["fingerprint"] == Encoder(str(tiny_model), device="cpu").fingerprint
    early = soon[1].result()
    assert early is not None
    engine = alignsearch.open(tmp_path / "ix", device="cpu", text_soon=soon)
    engine.search(text="red car", k=2)
    assert engine._encoder[1] is early  # the one loaded early, not a second one
    # a hint for another model (the catalog changed between the peek and the open) is not used
    info, future = coldstart.text_encoder_soon(tmp_path / "ix", EncoderOptions(device="cpu"))
    other = alignsearch.open(tmp_path / "ix", device="cpu", text_soon=({**info, "fingerprint": "0" * 16}, future))
    other.search(text="red car", k=2)
    assert other._encoder[1] is not future.result()
    # nothing to peek: no hint, no crash
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "catalog.db").write_bytes(b"not a database" * 100)
    assert coldstart.text_encoder_soon(tmp_path / "junk", EncoderOptions()) is None
    assert coldstart.text_encoder_soon(tmp_path / "nowhere", EncoderOptions()) is None


@pytest.mark.slow
def test_a_failing_early_load_or_a_damaged_manifest_leaves_the_query_answering(tiny_model, tmp_path, exported_cache, monkeypatch):
    import importlib
    from concurrent.futures import Future

    import alignsearch
    from alignsearch.encoders import cached, coldstart

    corpus = tmp_path / "corpus"
    make_images(corpus, 3)
    index_json(tmp_path / "ix", corpus, "--model", tiny_model)
    info = coldstart.peek_model(tmp_path / "ix")
    failed = Future()
    failed.set_exception(OSError("simulated thread failure"))
    engine = alignsearch.open(tmp_path / "ix", device="cpu", text_soon=(info, failed))
    assert len(engine.search(text="red car", k=2)) == 2  # the usual load ran instead
    (folder,) = exported_cache.glob("onnx/*")
    for junk in ("[]", '"x"', "{not json"):
        (folder / "records" / "model.json").write_text(junk)
        assert cached.text_encoder(info) is None and cached.text_encoder(info, EncoderOptions(precision="int8")) is None
    # a broken install that raises something other than ImportError counts as not installed
    real = importlib.import_module
    monkeypatch.setattr(importlib, "import_module",
                        lambda name, *a: (_ for _ in ()).throw(RuntimeError("broken")) if name == "onnxruntime" else real(name, *a))
    assert not backend.onnxruntime_installed()


@pytest.mark.slow
def test_an_index_folder_whose_path_looks_like_a_url_query_holds_its_own_catalog(tiny_model, tmp_path):
    corpus = tmp_path / "corpus"
    make_images(corpus, 3)
    ix = tmp_path / "ix dir ?#%20é" / "x"
    assert index_json(ix, corpus, "--model", tiny_model)["added"] == 3
    assert (ix / "catalog.db").is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "ix dir ?#%20é"]
    assert len(json.loads(run("query", "red car", "--index", ix, "--json", "-k", "2").stdout)["results"]) == 2


def test_the_content_digest_does_not_depend_on_whether_the_tokenizer_has_run(tiny_model):
    fresh = Encoder(str(tiny_model), device="cpu", backend="torch")
    used = Encoder(str(tiny_model), device="cpu", backend="torch")
    used.encode_text(TEXTS)  # padding and truncation set on the fast tokenizer's backend
    assert used.content_digest == fresh.content_digest


# -- issue 24 #8: the export cache's size, and what a re-export supersedes --------------------------------------------
def _export_both(path) -> Encoder:
    enc = Encoder(str(path), device="cpu", backend="onnx")
    enc.encode_text(["a dog"])
    enc.encode_crops(crops(enc, 2))
    assert enc.plan.backend == "onnx"
    return enc


@pytest.mark.slow
def test_a_reexport_removes_the_exports_it_superseded_and_nothing_else(tiny_model, tmp_path, cache):
    """Re-saving a checkpoint in place left its old export (hundreds of MB for align-base) for ever. Once the
    new one is complete the old one is removed, unless a running process has a tower loaded from it; folders
    this tool did not name, other models' exports and symlinked folders are left alone."""
    import gc
    import shutil

    from alignsearch.encoders.onnxrun import read_manifest

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_model, ckpt)
    _export_both(ckpt)
    _export_both(tiny_model)  # the same weights, so the same export: kept while tiny_model holds them
    shared = {p.name for p in cache.glob("onnx/*")}
    resave_with_other_weights(tiny_model, ckpt, seed=0)
    first = _export_both(ckpt)
    old = cache / "onnx" / f"{first.fingerprint}-{first.content_digest[:16]}"
    assert {p.name for p in cache.glob("onnx/*")} == shared | {old.name}
    not_named = cache / "onnx" / "copied-by-hand"  # the same manifest, but not a name this tool gave it
    shutil.copytree(old, not_named)
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(old, elsewhere / old.name)
    (cache / "onnx" / "linked").symlink_to(elsewhere / old.name, target_is_directory=True)

    resave_with_other_weights(tiny_model, ckpt, seed=1)
    second = _export_both(ckpt)  # `first` still holds its towers: its folder stays
    assert old.is_dir() and second.content_digest != first.content_digest
    new = cache / "onnx" / f"{second.fingerprint}-{second.content_digest[:16]}"
    del first
    gc.collect()
    resave_with_other_weights(tiny_model, ckpt, seed=2)
    del second
    gc.collect()
    third = _export_both(ckpt)
    left = {p.name for p in cache.glob("onnx/*")}
    newest = f"{third.fingerprint}-{third.content_digest[:16]}"
    assert left == shared | {newest, "copied-by-hand", "linked"}, left
    assert not new.exists() and not any(p.name.startswith(".superseded") for p in (cache / "onnx").iterdir())
    assert read_manifest(elsewhere / old.name)["files"] and (elsewhere / old.name / "vision-fp32.onnx").exists()
    assert (not_named / "vision-fp32.onnx").exists()


@pytest.mark.slow
def test_an_export_version_bump_removes_the_towers_it_did_not_export_again(tiny_model, cache, monkeypatch):
    from alignsearch.encoders import onnxexport, records
    from alignsearch.encoders.onnxrun import read_manifest

    enc = _export_both(tiny_model)
    folder = next(cache.glob("onnx/*"))
    manifest = read_manifest(folder)
    int8 = folder / "text-int8.onnx"  # a tower of the older version, not exported again by the newer one
    int8.write_bytes(b"an older int8 export")
    graphs = folder / "openvino" / "text-int8"
    graphs.mkdir(parents=True)
    (graphs / "blob").write_bytes(b"compiled")
    records.Writer(folder, manifest).file("text-int8", {"size": 20, "mtime_ns": int8.stat().st_mtime_ns,
                                                        "sha256": "0"}, manifest)
    assert "text-int8" in read_manifest(folder)["files"]
    del enc
    monkeypatch.setattr(onnxexport, "EXPORT_VERSION", onnxexport.EXPORT_VERSION + 1)
    _export_both(tiny_model)
    assert not int8.exists() and not graphs.exists()
    assert (folder / "text-fp32.onnx").exists() and (folder / "vision-fp32.onnx").exists()
    after = read_manifest(folder)
    assert after["export_version"] == onnxexport.EXPORT_VERSION and "text-int8" not in after["files"]


@pytest.mark.slow
def test_info_gives_the_size_of_the_models_export_and_of_the_whole_cache(tiny_model, tmp_path, cache):
    import shutil

    from alignsearch.encoders.exportcache import tree_bytes
    from alignsearch.search.engine import onnx_cache_status

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_model, ckpt)
    resave_with_other_weights(tiny_model, ckpt, seed=0)
    info = _export_both(tiny_model).describe()
    _export_both(ckpt)
    status = onnx_cache_status(info)
    folder = cache / "onnx" / f"{info['fingerprint']}-{info['content_digest'][:16]}"
    on_disk = sum(p.stat().st_size for p in (cache / "onnx").rglob("*") if p.is_file())
    assert status["bytes"] == tree_bytes(folder) > 0 and status["path"] == str(folder)
    assert status["total"] == {"path": str(cache / "onnx"), "bytes": on_disk, "models": 2}
    assert status["total"]["bytes"] > status["bytes"]


@pytest.mark.slow
def test_info_names_the_encoder_a_reindex_ran(tiny_model, tmp_path, exported_cache):
    """`index --reindex` encodes every file again, but `info` went on naming the engine of the run before it ("images
    on torch at fp32 (last index run)" after a re-encode on ONNX Runtime): only a run that encoded new files recorded
    its encoder, and a re-encode's own run finds none new."""
    corpus = tmp_path / "corpus"
    make_images(corpus, 4)
    assert index_json(tmp_path / "ix", corpus, "--model", tiny_model, "--backend", "torch")["encoder"]["backend"] == "torch"
    again = index_json(tmp_path / "ix", "--reindex", "--backend", "onnx")
    assert again["reencoded"] == 4 and again["encoder"]["backend"] == "onnx"
    info = json.loads(run("info", "--index", tmp_path / "ix", "--json").stdout)["encoder"]["last_index_run"]
    assert info == again["encoder"], info


def test_info_names_the_encoder_of_a_reindex_with_ray_that_found_nothing_new(tiny_model, tmp_path, exported_cache,
                                                                            monkeypatch):
    """`index --reindex --ray` re-encodes on the driver, then its pass through Ray finds no new file and starts no
    actor; `info` said "note: encoded by Ray actors, which reported no plan" of the re-encode (review3). No actor ran:
    the encoder is the driver's. (Ray is not needed: run_ray returns before using it when there is nothing to do.)"""
    import types

    monkeypatch.setitem(sys.modules, "ray", types.ModuleType("ray"))
    corpus = tmp_path / "corpus"
    make_images(corpus, 3)
    index_json(tmp_path / "ix", corpus, "--model", tiny_model, "--backend", "torch", "--workers", "0")
    again = index_json(tmp_path / "ix", "--reindex", "--backend", "onnx", "--workers", "0", "--ray")
    assert again["reencoded"] == 3 and again["encoder"]["backend"] == "onnx" and "Ray" not in json.dumps(again["encoder"])
    info = json.loads(run("info", "--index", tmp_path / "ix", "--json").stdout)["encoder"]["last_index_run"]
    assert info == again["encoder"], info


def test_int8_weights_are_7_bit_only_where_the_cpus_int8_products_saturate(tmp_path):
    """x86 with AVX2 or AVX512BW and no VNNI runs ONNX Runtime's u8s8 products through VPMADDUBSW, whose pair sums
    clip: there the int8 text tower is quantized with reduce_range (it measured cosine 0.9876 to torch on an
    AVX2-only EPYC, under the 0.99 floor). VNNI, AMX and ARM keep 8-bit weights, as before."""
    from alignsearch.encoders import onnxrun

    def cpu(flags: str) -> str:
        path = tmp_path / f"cpuinfo-{len(list(tmp_path.iterdir()))}"
        path.write_text(f"processor\t: 0\nmodel name\t: X\nflags\t\t: {flags}\n\n")
        return str(path)

    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd asimddp i8mm\n\n")
    assert onnxrun.int8_saturates(cpu("fpu sse4_2 avx avx2 fma"))
    assert onnxrun.int8_saturates(cpu("avx2 avx512f avx512bw"))
    assert not onnxrun.int8_saturates(cpu("avx2 avx512f avx512bw avx512_vnni"))
    assert not onnxrun.int8_saturates(cpu("avx2 avx_vnni"))
    assert not onnxrun.int8_saturates(cpu("fpu sse4_2"))  # no AVX2: ONNX Runtime's SSE kernels do not clip
    assert not onnxrun.int8_saturates(str(arm))
    assert not onnxrun.int8_saturates(str(tmp_path / "none"))  # no /proc/cpuinfo (macOS): the platform's own


def test_an_8_bit_int8_refusal_made_before_is_measured_again_where_int8_weights_are_now_7_bit(monkeypatch):
    """e83cf74 quantizes the int8 text tower with 7-bit weights where int8 products saturate; a cache where the
    8-bit file was refused on this very CPU and ONNX Runtime kept that refusal (rejected: same machine, same
    version), so the 7-bit file was never made: int8 stayed refused there after the upgrade. The refusal says
    how the int8 weights were made, and one of the 8-bit file is measured again."""
    from alignsearch.encoders import onnxrun

    monkeypatch.setattr(onnxrun, "int8_saturates", lambda *a: False)
    before = onnxrun.measured_on("onnx")  # what a refusal recorded before 7-bit weights holds
    manifest = {"refusals": {"text-int8": [{"why": "cosine 0.9876 (needs 0.99)", "on": before}]}}
    assert onnxrun.rejected(manifest, "int8", "onnx") == "cosine 0.9876 (needs 0.99)"  # where 8-bit it still holds
    monkeypatch.setattr(onnxrun, "int8_saturates", lambda *a: True)
    assert onnxrun.rejected(manifest, "int8", "onnx") is None  # measured again: the file made now is 7-bit
    again = {"refusals": {"text-int8": [{"why": "drift", "on": onnxrun.measured_on("onnx")}]}}
    assert onnxrun.rejected(again, "int8", "onnx") == "drift"  # the 7-bit file's own refusal holds
