"""The one resolver (alignsearch/encoders/resolve.py) and the cache's per-artefact manifest (records.py)."""

import json
import logging
import os

import numpy as np
import pytest

from alignsearch.encoders import backend, onnxrun, records, resolve
from alignsearch.encoders.backend import EncoderOptions, Plan
from alignsearch.encoders.onnxrun import OnnxUnusable
from alignsearch.errors import BadInputError, ModelMismatchError


# -- decisions, without a model --------------------------------------------------------------------------
def test_options_and_the_torch_free_text_gate():
    assert backend.encoder_options(text_bf16=True).precision == "bf16"
    assert backend.encoder_options(text_bf16=True, precision="fp32").precision == "fp32"  # explicit wins
    gate = backend.torch_free_text
    assert gate(EncoderOptions(), None) and gate(EncoderOptions(precision="int8"), None)
    assert gate(EncoderOptions(device="cpu", backend="onnx"), None)
    for opts, model in [(EncoderOptions(), "m"), (EncoderOptions(device="cuda"), None),
                        (EncoderOptions(backend="torch"), None)]:
        assert not gate(opts, model), (opts, model)


def _installed(monkeypatch, ort=True, ov=True):
    monkeypatch.setattr(resolve, "onnxruntime_installed", lambda: ort)
    monkeypatch.setattr(resolve, "openvino_installed", lambda: ov)
    monkeypatch.setattr(resolve, "installed_engines", lambda: tuple(e for e, ok in (("onnx", ort), ("openvino", ov))
                                                                     if ok) + ("torch",))
    monkeypatch.setattr(resolve, "openvino_bf16", lambda: False)


def test_plan_for_and_the_cached_plan_decide_from_what_is_installed(monkeypatch):
    _installed(monkeypatch, ort=False, ov=True)
    assert resolve.plan_for(EncoderOptions(), "cpu").backend == "openvino"
    assert resolve.plan_for(EncoderOptions(), "cuda") == Plan("torch", "bf16", "bf16")
    _installed(monkeypatch)
    auto = EncoderOptions(device="cpu")
    assert resolve.cached_plan(auto, {"onnx": 1.0, "torch": 2.0}) is None  # openvino not measured here
    assert resolve.cached_plan(auto, {"onnx": 1.0, "openvino": 1.0, "torch": 2.0}) is None  # torch fastest
    p = resolve.cached_plan(auto, {"onnx": 1.0, "openvino": 3.0, "torch": 2.0})
    assert (p.backend, p.images_on) == ("onnx", "openvino") and "measured fastest" in p.why
    assert resolve.cached_plan(EncoderOptions(device="cpu", backend="torch"), {}) is None


class FakeExports(resolve.Exported):
    """A checkpoint's exports without a checkpoint: each tower is a name, or the failure it is given."""

    def __init__(self, fail: dict | None = None, speed: dict | None = None):
        super().__init__(enc=None)
        self.fail, self.speed, self.calls = fail or {}, speed or {}, []

    def _tower(self, key):
        self.calls.append(key)
        if key in self.fail:
            raise OnnxUnusable(self.fail[key])
        return key

    def text(self, precision, engine):
        return self._tower(f"text-{precision}-{engine}")

    def vision(self, engine, precision):
        return self._tower(f"vision-{precision}-{engine}")

    def vision_speed(self, engines):
        return {e: self.speed[e] for e in engines}


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.name == resolve.__name__ and r.levelno >= logging.WARNING]


def test_towers_follow_the_plan_and_fall_back_to_torch_once(caplog):
    caplog.set_level(logging.INFO)
    towers = resolve.Towers(Plan("onnx", "fp32", "fp32"), EncoderOptions(device="cpu", backend="onnx"),
                            FakeExports(fail={"vision-fp32-onnx": "cosine 0.5 to torch"}))
    assert towers.get("text") == "text-fp32-onnx"
    assert towers.get("image") is None and towers.get("text") is None and towers.get("image") is None
    assert towers.plan == Plan("torch", "fp32", "fp32", "cosine 0.5 to torch") and towers.built == {}
    assert _warnings(caplog) == ["running the model on torch: cosine 0.5 to torch"]  # one line, once
    assert towers.source.calls == ["text-fp32-onnx", "vision-fp32-onnx"]  # nothing tried again


def test_towers_run_int8_text_at_fp32_when_it_fails_its_check(caplog):
    towers = resolve.Towers(Plan("onnx", "int8", "fp32"), EncoderOptions(device="cpu", precision="int8"),
                            FakeExports(fail={"text-int8-onnx": "cosine 0.9"}))
    assert towers.get("text") == "text-fp32-onnx"
    assert towers.plan == Plan("onnx", "fp32", "fp32", "cosine 0.9")
    assert _warnings(caplog) == ["text at fp32: cosine 0.9"]


def test_towers_put_the_vision_tower_on_the_engine_measured_fastest_under_auto():
    speed = {"onnx": 1.0, "openvino": 3.0, "torch": 2.0}
    towers = resolve.Towers(Plan("onnx", "fp32", "fp32"), EncoderOptions(device="cpu"), FakeExports(speed=speed))
    assert towers.get("image") == "vision-fp32-openvino" and towers.plan.images_on == "openvino"
    slow = resolve.Towers(Plan("onnx", "fp32", "fp32"), EncoderOptions(device="cpu"),
                          FakeExports(speed={**speed, "torch": 9.0}))
    assert slow.get("image") is None and slow.plan.images_on == "torch" and slow.get("text") == "text-fp32-onnx"
    # an engine named by the user is not measured
    named = resolve.Towers(Plan("onnx", "fp32", "fp32"), EncoderOptions(device="cpu", backend="onnx"), FakeExports())
    assert named.get("image") == "vision-fp32-onnx"


def test_each_change_of_the_plan_is_said_once_and_keeps_the_reasons_before_it(caplog):
    """int8 text refused, then the vision tower measured onto OpenVINO: the plan says both (the note lost the
    int8 refusal, so text at fp32 where int8 was asked for had no reason given)."""
    caplog.set_level(logging.INFO)
    towers = resolve.Towers(Plan("onnx", "int8", "fp32"), EncoderOptions(device="cpu", precision="int8"),
                            FakeExports(fail={"text-int8-onnx": "cosine 0.9"},
                                        speed={"onnx": 1.0, "openvino": 3.0, "torch": 2.0}))
    assert towers.get("text") == "text-fp32-onnx" and towers.get("image") == "vision-fp32-openvino"
    assert towers.get("text") == "text-fp32-onnx" and towers.get("image") == "vision-fp32-openvino"  # built once
    p = towers.plan
    assert (p.backend, p.text, p.images_on, p.image) == ("onnx", "fp32", "openvino", "fp32")
    assert "cosine 0.9" in p.why and "measured fastest" in p.why, p.why
    said = [r.getMessage() for r in caplog.records if r.name == resolve.__name__]
    assert said[0] == "text at fp32: cosine 0.9" and len(said) == 2 and said[1].startswith("OpenVINO runs the vision")
    assert towers.source.calls == ["text-int8-onnx", "text-fp32-onnx", "vision-fp32-openvino"]


def test_a_cache_runs_int8_text_at_fp32_only_where_int8_was_measured_and_refused(caplog, tmp_path):
    """A refusal recorded at export is final (fp32 from the cache); an int8 tower merely missing or damaged
    is not a measurement: the checkpoint loads and quantizes it (the fallback), as before the cache ran text."""
    loads = []

    def load_full():
        loads.append(1)
        return Full("f")

    def towers(manifest):
        return resolve.Towers(Plan("onnx", "int8", "fp32"), EncoderOptions(device="cpu", precision="int8"),
                              resolve.Cached(tmp_path, manifest, None, load_full))

    why = "cosine 0.98 (needs 0.99)"  # measured on another CPU, and on this one and its ONNX Runtime
    here = {"text-int8": [{"why": "elsewhere", "on": {"machine": "another CPU"}}, {"why": why, "on": onnxrun.measured_on("onnx")}]}
    refused = towers({**MANIFEST, "rejected": {"text-int8": why}, "refusals": here})
    assert refused.get("text") is None and loads == [1]  # no tower files here at all: fp32 fails too
    assert _warnings(caplog) == ["text at fp32: cosine 0.98 (needs 0.99)",
                                 f"loading the checkpoint: no exported tokenizer in {tmp_path}"]
    caplog.clear()
    unmeasured = towers(MANIFEST)
    assert unmeasured.get("text") is None and loads == [1, 1] and unmeasured.plan.why == "exported again"
    assert _warnings(caplog) == [f"loading the checkpoint: no exported tokenizer in {tmp_path}"]  # no fp32 step
    damaged = towers({**MANIFEST, "rejected": ["not", "a", "mapping"]})
    assert damaged.get("text") is None and loads == [1, 1, 1]  # damage is a tower that cannot be used
    caplog.clear()
    unplaced = towers({**MANIFEST, "rejected": {"text-int8": "cosine 0.98 (needs 0.99)"}})  # written before "on"
    assert unplaced.get("text") is None and loads == [1, 1, 1, 1]  # measured again by the checkpoint, once
    assert _warnings(caplog) == [f"loading the checkpoint: no exported tokenizer in {tmp_path}"]


def test_text_runs_torch_free_where_the_plan_puts_it_on_an_exported_engine(monkeypatch):
    _installed(monkeypatch, ort=True, ov=True)
    assert resolve.text_plan(EncoderOptions(), None) == Plan("onnx", "fp32", "fp32")
    assert resolve.text_plan(EncoderOptions(precision="int8"), None).text == "int8"
    assert resolve.text_plan(EncoderOptions(backend="openvino"), None).backend == "openvino"
    for opts, model in [(EncoderOptions(), "m"), (EncoderOptions(device="cuda"), None),
                        (EncoderOptions(backend="torch"), None), (EncoderOptions(precision="bf16"), None)]:
        assert resolve.text_plan(opts, model) is None, opts  # bf16: torch here (no BF16 for OpenVINO)
    _installed(monkeypatch, ort=False, ov=False)
    assert resolve.text_plan(EncoderOptions(), None) is None  # torch runs text: the full encoder
    with pytest.raises(BadInputError):  # refused as the full encoder refuses it
        resolve.text_plan(EncoderOptions(precision="int8"), None)


class Full:
    def __init__(self, fingerprint):
        self.fingerprint, self.name, self.plan = fingerprint, "/m", Plan("onnx", "fp32", "fp32", "exported again")


MANIFEST = {"fingerprint": "f", "tokenizer": {"pad_id": 0, "pad_token": "<pad>"}, "max_length": 16, "files": {}}


def test_a_cache_whose_tower_fails_loads_the_checkpoint_once(caplog, tmp_path):
    loads = []

    def load_full():
        loads.append(1)
        return Full("f")

    towers = resolve.Towers(Plan("onnx", "fp32", "fp32"), EncoderOptions(device="cpu", backend="onnx"),
                            resolve.Cached(tmp_path, MANIFEST, (4, 4), load_full))
    assert towers.get("text") is None and towers.get("image") is None  # no tower files: the checkpoint runs
    assert loads == [1] and towers.full is not None and towers.plan.why == "exported again"
    assert _warnings(caplog) == [f"loading the checkpoint: no exported tokenizer in {tmp_path}"]
    other = resolve.Towers(Plan("onnx", "fp32", "fp32"), EncoderOptions(device="cpu", backend="onnx"),
                           resolve.Cached(tmp_path, MANIFEST, (4, 4), lambda: Full("g")))
    with pytest.raises(ModelMismatchError):
        other.get("text")


# -- the cache's manifest: one record per artefact -------------------------------------------------------
MODEL = {"fingerprint": "f", "content_digest": "c", "spec": {"resize": [4, 4]}, "export_version": 2, "model": "/m",
         "dim": 8, "max_length": 16, "temperature": 0.5}


def test_each_artefact_has_its_own_record_and_two_writers_keep_both(tmp_path):
    a, b = records.Writer(tmp_path, MODEL), records.Writer(tmp_path, MODEL)
    a.file("vision-fp32", {"size": 1}, {"probes": {"image": [[1.0]]}})
    b.file("text-fp32", {"size": 2}, {"probes": {"texts": ["x"], "text": [[2.0]]}})
    b.file("tokenizer", {"size": 3}, {"tokenizer": {"pad_id": 0, "pad_token": "<pad>"}})
    a.speed("cpu x2", {"onnx": 1.0})
    b.rejected("text-int8", "drifts", {"machine": "cpu", "engine": "onnx", "version": "1"})
    for i in range(records.MAX_CHECKPOINTS + 2):
        a.checkpoint({"path": f"/m{i}", "files": {}})
    m = records.read(tmp_path)
    assert {k: m[k] for k in MODEL} == MODEL
    assert m["files"] == {"vision-fp32": {"size": 1}, "text-fp32": {"size": 2}, "tokenizer": {"size": 3}}
    assert m["probes"] == {"image": [[1.0]], "texts": ["x"], "text": [[2.0]]}
    assert m["tokenizer"] == {"pad_id": 0, "pad_token": "<pad>"} and m["rejected"] == {"text-int8": "drifts"}
    assert m["vision_speed"] == {"cpu x2": {"onnx": 1.0}}
    assert [c["path"] for c in m["checkpoints"]] == [f"/m{i}" for i in range(2, records.MAX_CHECKPOINTS + 2)]
    assert not (tmp_path / "manifest.json").exists() and not list(tmp_path.glob("records/.*"))  # no leftovers


def test_a_refusal_is_kept_per_place_and_replaces_one_written_before_refusals_said_where(tmp_path):
    w = records.Writer(tmp_path, MODEL)
    w._prepare()
    w._put("rejected-text-int8.json", {"why": "old"})  # as an older version wrote it
    assert records.read(tmp_path)["refusals"] == {"text-int8": [{"why": "old", "on": None}]}
    places = [{"machine": f"cpu {i}", "engine": "onnx", "version": "1"} for i in range(records.MAX_PLACES + 2)]
    for i, on in enumerate(places):
        w.rejected("text-int8", f"drifts {i}", on)
    w.rejected("text-int8", "drifts again", places[-1])  # the same place measured again: its record replaced
    m = records.read(tmp_path)
    assert [r["on"] for r in m["refusals"]["text-int8"]] == places[2:]  # the latest places, and no "old"
    assert m["refusals"]["text-int8"][-1]["why"] == m["rejected"]["text-int8"] == "drifts again"
    assert len(list(tmp_path.glob("records/rejected-*"))) == records.MAX_PLACES


def test_a_record_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    w = records.Writer(tmp_path, MODEL)
    w.speed("cpu", {"onnx": 1.0})

    def crash(src, dst):
        raise OSError("power cut")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        w.speed("cpu", {"onnx": 2.0})
    monkeypatch.undo()
    assert records.read(tmp_path)["vision_speed"] == {"cpu": {"onnx": 1.0}}
    assert not list(tmp_path.glob("records/.*"))  # the half-written one removed


def test_an_older_manifest_is_read_and_converted_on_the_next_write(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    legacy = {**MODEL, "files": {"text-fp32": {"size": 2}}, "probes": {"texts": ["x"], "text": [[2.0]]},
              "vision_speed": {"cpu": {"onnx": 1.0}}, "checkpoints": [{"path": "/m", "files": {}}]}
    (tmp_path / "manifest.json").write_text(json.dumps(legacy))
    assert records.read(tmp_path) == legacy and records.exists(tmp_path)
    records.Writer(tmp_path, MODEL).file("vision-fp32", {"size": 1}, {"probes": {"image": [[1.0]]}})
    m = records.read(tmp_path)
    assert set(m["files"]) == {"text-fp32", "vision-fp32"} and m["probes"]["text"] == [[2.0]]
    assert m["vision_speed"] == legacy["vision_speed"] and m["checkpoints"] == legacy["checkpoints"]
    assert not (tmp_path / "manifest.json").exists()
    assert sum("converting the ONNX cache manifest" in r.getMessage() for r in caplog.records) == 1
    # another export version's records describe other files: dropped, not mixed in
    records.Writer(tmp_path, {**MODEL, "export_version": 3}).file("text-fp32", {"size": 9}, {})
    assert records.read(tmp_path)["files"] == {"text-fp32": {"size": 9}}
    # damaged older manifests and records are nobody's crash
    for junk in ("[]", '"x"', "{not json"):
        (tmp_path / "records" / "model.json").write_text(junk)
        (tmp_path / "manifest.json").write_text(junk)
        assert records.read(tmp_path) is None


def test_a_conversion_cut_short_is_done_again_whole(tmp_path, monkeypatch):
    """A run killed while converting an older manifest.json leaves it the manifest readers read, and the next
    write converts all of it (model.json was written first, so the rest was ignored and manifest.json deleted)."""
    legacy = {**MODEL, "files": {"text-fp32": {"size": 2}}, "vision_speed": {"cpu": {"onnx": 1.0}},
              "checkpoints": [{"path": "/m", "files": {}}]}
    (tmp_path / "manifest.json").write_text(json.dumps(legacy))
    real, written = records.Writer._put, []

    def cut(self, name, record):
        if len(written) == 1:  # the second record of the conversion: power cut
            raise OSError("power cut")
        written.append(name)
        real(self, name, record)

    monkeypatch.setattr(records.Writer, "_put", cut)
    with pytest.raises(OSError):
        records.Writer(tmp_path, MODEL).file("vision-fp32", {"size": 1}, {})
    monkeypatch.undo()
    assert records.read(tmp_path) == legacy  # still the older manifest, whole
    records.Writer(tmp_path, MODEL).file("vision-fp32", {"size": 1}, {})
    m = records.read(tmp_path)
    assert set(m["files"]) == {"text-fp32", "vision-fp32"} and m["vision_speed"] == legacy["vision_speed"]
    assert m["checkpoints"] == legacy["checkpoints"] and not (tmp_path / "manifest.json").exists()


def test_a_record_others_can_write_makes_the_cache_untrusted(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNSEARCH_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "cache" / "onnx" / "f-c"
    backend.make_cache_dir(folder)
    records.Writer(folder, MODEL).speed("cpu", {"onnx": 1.0})
    assert backend.cache_untrusted(folder) is None
    (record,) = (folder / "records").glob("speed-*.json")
    record.chmod(0o666)  # a replaced record changes which engine runs, or (a file's) what is loaded
    assert "speed-" in backend.cache_untrusted(folder)


# One writer of the records, in a process of its own (only records imported: a fraction of a second). Role "a"
# stops right after its first write has read model.json and waits for "go"; role "b" waits for "start", then
# writes, saying "blocked" if it has to wait for another writer's lock, and "done" when its record is written.
_FIRST_WRITER = """
import fcntl, json, sys
from pathlib import Path
from alignsearch.encoders import records
role, folder, model = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
def say(word):
    print(word, flush=True)
if role == "a":
    load = records._load
    def paused(path):
        got = load(path)
        if path.name == records.MODEL:
            say("read")
            sys.stdin.readline()
        return got
    records._load = paused
else:
    sys.stdin.readline()
    flock = fcntl.flock
    def watched(fd, how):
        try:
            return flock(fd, how | fcntl.LOCK_NB)
        except BlockingIOError:
            say("blocked")
            if how & fcntl.LOCK_NB:
                raise
        return flock(fd, how)
    fcntl.flock = watched
records.Writer(folder, model).speed("cpu " + role, {"onnx": 1.0})
say("done")
"""


def test_two_first_writers_into_an_empty_records_folder_keep_both_records(tmp_path):
    """Two processes (an `index` and a `serve`) each writing their first record: a, having read that there is
    no model.json, is held there until b has written its record or waits for a's lock. Before the lock, a then
    took b's records for another export's, cleared them, and b's measurement was lost."""
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
    a, b = (subprocess.Popen([sys.executable, "-c", _FIRST_WRITER, role, str(tmp_path), json.dumps(MODEL)], env=env,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for role in "ab")
    try:
        assert a.stdout.readline() == "read\n"
        b.stdin.write("start\n"), b.stdin.flush()
        said = b.stdout.readline()  # "done" (no lock: b wrote it all) or "blocked" (a holds the lock)
        assert said in ("done\n", "blocked\n"), said
        a.stdin.write("go\n"), a.stdin.flush()
        outs = [p.communicate(timeout=60)[0] for p in (a, b)]
    finally:
        for p in (a, b):
            p.kill()
    assert (a.returncode, b.returncode) == (0, 0) and outs[0] == "done\n" and (said + outs[1]).endswith("done\n")
    assert records.read(tmp_path)["vision_speed"] == {"cpu a": {"onnx": 1.0}, "cpu b": {"onnx": 1.0}}
    assert (tmp_path / "records" / records.LOCK).stat().st_mode & 0o077 == 0  # passes the folder's trust check


def test_the_records_lock_is_never_taken_through_a_symbolic_link(tmp_path):
    """A link at write.lock (the folder is this user's: cache_untrusted) is refused, never followed to create or
    lock a file elsewhere; callers take the OSError as "not recorded", as any failed write."""
    (tmp_path / "records").mkdir()
    (tmp_path / "records" / records.LOCK).symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OSError):
        records.Writer(tmp_path, MODEL).speed("cpu", {"onnx": 1.0})
    assert not (tmp_path / "elsewhere").exists() and records.read(tmp_path) is None


# -- with a model ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_an_export_that_fails_its_parity_check_runs_on_torch_with_one_line(tiny_model, tmp_path, monkeypatch, caplog):
    from alignsearch.encoders import onnxrun
    from alignsearch.encoders.model import Encoder

    monkeypatch.setenv("ALIGNSEARCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(onnxrun.FLOOR, "fp32", 1.5)  # no cosine reaches it: every check fails
    enc = Encoder(str(tiny_model), device="cpu", backend="onnx")
    ref = Encoder(str(tiny_model), device="cpu", backend="torch")
    caplog.set_level(logging.INFO)
    assert np.array_equal(enc.encode_text(["a dog"]), ref.encode_text(["a dog"]))
    assert enc.plan.backend == "torch" and "needs 1.5" in enc.plan.why
    crops = np.zeros((2, *enc.spec.output_size, 3), np.uint8)
    assert np.array_equal(enc.encode_crops(crops), ref.encode_crops(crops))
    said = _warnings(caplog)
    assert len(said) == 1 and said[0].startswith("running the model on torch: the text-fp32 tower on onnx")


@pytest.mark.slow
def test_a_cache_with_an_older_manifest_is_used_without_exporting_again(tiny_model, tmp_path, monkeypatch):
    import shutil

    import torch

    from alignsearch.encoders import cached, onnxrun
    from alignsearch.encoders.model import Encoder

    monkeypatch.setenv("ALIGNSEARCH_CACHE", str(tmp_path / "cache"))
    enc = Encoder(str(tiny_model), device="cpu", backend="onnx")
    want = enc.encode_text(["a dog"])
    enc.encode_crops(np.zeros((1, *enc.spec.output_size, 3), np.uint8))
    (folder,) = (tmp_path / "cache" / "onnx").iterdir()
    (folder / "manifest.json").write_text(json.dumps(onnxrun.read_manifest(folder)))  # as an older version wrote it
    shutil.rmtree(folder / "records")
    opts = EncoderOptions(device="cpu", backend="onnx")
    assert cached.find(str(tiny_model), None, opts) is not None  # read as it is
    assert cached.text_encoder(enc.describe()) is not None

    def refuse(*a, **k):
        raise AssertionError("exported again")

    monkeypatch.setattr(torch.onnx, "export", refuse)
    again = Encoder(str(tiny_model), device="cpu", backend="onnx")
    got = again.encode_text(["a dog"])
    assert again.plan == Plan("onnx", "fp32", "fp32") and float(got[0] @ want[0]) >= 0.9999


@pytest.mark.slow
def test_the_engine_keeps_one_encoder_and_a_text_only_one_gives_way(tiny_model, tmp_path, monkeypatch):
    import alignsearch
    from alignsearch.encoders.cached import CachedText
    from conftest import index_json, make_images

    monkeypatch.setenv("ALIGNSEARCH_CACHE", str(tmp_path / "cache"))
    images = make_images(tmp_path / "corpus", 3)
    index_json(tmp_path / "ix", tmp_path / "corpus", "--model", tiny_model)
    engine = alignsearch.open(tmp_path / "ix", device="cpu")
    engine.search(text="red car", k=2)
    fingerprint, light, full = engine._encoder
    assert isinstance(light, CachedText) and not full and engine.encoder_plan()["image_precision"] is None
    engine.search(image=str(images[0]), k=2)
    assert engine._encoder[0] == fingerprint and engine._encoder[2] and engine._encoder[1] is not light
    engine.search(text="red car", k=2)  # text now runs on the full encoder: no second one kept
    assert engine._encoder[2] and engine.encoder_plan()["image_precision"] == "fp32"



@pytest.mark.slow
def test_a_text_query_reports_what_its_tower_ran_on(tiny_model, tmp_path, exported_cache):
    """int8 asked, and refused for this model when it was measured: a cold text query runs the cached text
    tower at fp32, and its plan says why, as the full encoder's does (it said only "text only")."""
    import alignsearch
    from alignsearch.encoders.model import Encoder
    from conftest import index_json, make_images

    make_images(tmp_path / "corpus", 3)
    index_json(tmp_path / "ix", tmp_path / "corpus", "--model", tiny_model)
    full = Encoder(str(tiny_model), device="cpu", precision="int8")
    full.encode_text(["a dog"])  # quantized, measured and refused: the tiny model's weights drift at int8
    assert full.plan.text == "fp32" and "text-int8" in full.plan.why
    engine = alignsearch.open(tmp_path / "ix", device="cpu", precision="int8")
    engine.search(text="red car", k=2)
    got = engine.encoder_plan()
    assert not engine._encoder[2] and got["image_precision"] is None  # torch-free: the text tower alone
    assert (got["backend"], got["text_precision"]) == ("onnx", "fp32") and full.plan.why in got["note"], got


@pytest.mark.slow
def test_a_damaged_cached_text_tower_gives_the_full_encoder_through_the_one_fallback(tiny_model, tmp_path,
                                                                                     exported_cache, caplog):
    import alignsearch
    from conftest import index_json, make_images

    images = make_images(tmp_path / "corpus", 3)
    index_json(tmp_path / "ix", tmp_path / "corpus", "--model", tiny_model)
    tower = next(exported_cache.glob("onnx/*/text-fp32.onnx"))
    data = bytearray(tower.read_bytes())
    data[len(data) // 2] ^= 0x01
    tower.write_bytes(bytes(data))
    caplog.set_level(logging.INFO)
    engine = alignsearch.open(tmp_path / "ix", device="cpu")
    engine.search(text="red car", k=2)
    _, enc, full = engine._encoder
    assert full and not enc.text_only and engine.encoder_plan()["image_precision"] == "fp32"
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(said) == 1 and said[0].startswith("loading the checkpoint: ") and "SHA-256" in said[0], said
    engine.search(image=str(images[0]), k=2)
    assert engine._encoder[1] is enc  # the checkpoint loaded once: images use it too


def test_a_writer_leaves_an_identical_model_json_in_place(tmp_path):
    """Every Writer's first record (each process's: a speed, a checkpoint stamp, a refusal) replaced model.json with
    the same content, and a reader opening it meanwhile was refused ("replaced by another file while it was
    opened"): records.read() said no manifest, 4 reads in 4559 beside a looping writer, and that cache's towers
    were exported again. It is replaced only when it changes."""
    records.Writer(tmp_path, MODEL).file("tokenizer", {"size": 1}, {"tokenizer": {"pad_id": 0}})
    model_json = tmp_path / "records" / "model.json"
    before = model_json.stat().st_ino
    records.Writer(tmp_path, MODEL).speed("cpu x2", {"onnx": 1.0})  # another process's first record
    assert model_json.stat().st_ino == before and records.read(tmp_path)["vision_speed"] == {"cpu x2": {"onnx": 1.0}}
    records.Writer(tmp_path, {**MODEL, "temperature": 0.25}).speed("cpu x2", {"onnx": 2.0})  # changed: rewritten
    assert json.loads(model_json.read_text())["temperature"] == 0.25 and "tokenizer" in records.read(tmp_path)["files"]
