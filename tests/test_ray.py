"""The Ray Data path: a local Ray instance gives the same catalog and results as the single-process path."""

import json

import numpy as np
import pytest

import alignsearch
from conftest import run

ray = pytest.importorskip("ray")

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def ray_index(ix, corpus, tiny_model, runtime_env=None) -> dict:
    """`alignsearch index --ray` on a local 2-CPU Ray instance; the summary."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env=runtime_env)
    try:
        out = run("index", corpus, "--index", ix, "--model", tiny_model, "--device", "cpu", "--batch-size", "4",
                  "--ray", "--json").stdout
    finally:
        ray.shutdown()
    return json.loads(out[out.index('{\n  "index_dir"'):])  # Ray's raylet may report a worker's death on stdout too


def assert_same_results(a, b, corpus):
    assert a.info()["images"] == b.info()["images"] == 18
    assert {(r.relpath, r.reason) for r in a.failed()} == {(r.relpath, r.reason) for r in b.failed()}
    for text in ("red car", "a dog at night", "beach"):
        hits_a, hits_b = a.search(text=text, k=18), b.search(text=text, k=18)
        assert [h.relpath for h in hits_a] == [h.relpath for h in hits_b]
        assert np.allclose([h.score for h in hits_a], [h.score for h in hits_b], atol=1e-3)


def segment_files(ix) -> set[str]:
    return {p.name for p in (ix / "vectors").glob("*.f16")}


def test_ray_path_matches_the_single_process_path(tmp_path, corpus, tiny_model):
    from indexer.verify import verify

    ray_summary = ray_index(tmp_path / "ray", corpus, tiny_model)
    local_summary = json.loads(run("index", corpus, "--index", tmp_path / "local", "--model", tiny_model, "--device", "cpu",
                                   "--batch-size", "4", "--json").stdout)
    for key in ("added", "failed", "removed"):
        assert ray_summary[key] == local_summary[key], (ray_summary, local_summary)
    # one runner (indexer/pipeline.py's drive) reads, encodes and writes for both: the same stage times
    assert ray_summary["times"].keys() == local_summary["times"].keys()
    for times in (ray_summary["times"], local_summary["times"]):
        assert (times["items"], times["failed"], times["reused"]) == (19, 1, 0), times
        assert all(times[stage] > 0 for stage in ("read_wait", "decode_worker", "encode", "write", "wall")), times
    # the encoder actor wrote every vector to its own segment: none went through the driver; a segment
    # that small is then folded into vectors.f16, so small runs do not pile up files
    extra = ray_summary["times"]["extra"]
    assert extra["vectors_in_actor_segments"] == 18 and extra["vectors_sent_to_driver"] == 0
    # the plan the actors ran comes back from them (not the driver's guess)
    enc, local_enc = ray_summary["encoder"], local_summary["encoder"]
    assert enc["note"].startswith("what every Ray encoder actor ran") and "actor_plans" not in extra
    assert (enc["backend"], enc.get("image_backend")) == (local_enc["backend"], local_enc.get("image_backend"))
    assert extra["vectors_folded"] == 18
    a, b = alignsearch.open(tmp_path / "ray"), alignsearch.open(tmp_path / "local")
    assert a.store.rows == 18 and a.store.segments == {} and segment_files(tmp_path / "ray") == set()
    assert verify(tmp_path / "ray", check_model=False).ok
    assert_same_results(a, b, corpus)
    hit = a.search(image=corpus / "img004.jpg", k=1)[0]
    assert hit.relpath == "img004.jpg" and hit.score == pytest.approx(1, abs=2e-3)


class DyingOnce:
    """An encoder actor whose worker process dies on its second batch, after writing its vectors and
    before returning them: Ray must restart it and retry; the rows it wrote must not count."""

    def __init__(self, encoder, segments, token, **decode):
        from indexer.ray_pipeline import EncoderActor

        self.inner = EncoderActor(encoder, segments, token, **decode)
        self.batches = 0

    def __call__(self, batch):
        import os
        from pathlib import Path

        out = self.inner(batch)
        self.batches += 1
        marker = Path(os.environ["ALIGNSEARCH_TEST_KILL_MARKER"])
        if self.batches == 2 and not marker.exists():
            marker.write_text(json.dumps([self.inner.segment.path.stem, self.inner.segment.rows]))
            os._exit(1)
        return out


class Elsewhere:
    """An encoder actor on a machine where the index folder is not the driver's: it must send its vectors."""

    def __init__(self, encoder, segments, token, **decode):
        from indexer.ray_pipeline import EncoderActor

        self.inner = EncoderActor(encoder, segments, token="another machine's folder", **decode)

    def __call__(self, batch):
        return self.inner(batch)


def test_a_ray_run_reports_what_its_actors_ran():
    from indexer.job import ray_plan

    torch_plan = {"backend": "torch", "text_precision": "fp32", "image_precision": "fp32", "note": "could not export"}
    onnx_plan = {"backend": "onnx", "text_precision": "fp32", "image_precision": "fp32"}
    one = ray_plan([torch_plan], onnx_plan)
    assert one["backend"] == "torch" and "could not export" in one["note"] and "actor" in one["note"]
    two = ray_plan([onnx_plan, torch_plan], onnx_plan)
    assert two["actors"] == [onnx_plan, torch_plan] and "different plans" in two["note"]
    assert "reported no plan" in ray_plan([], onnx_plan)["note"]


def test_encoder_actors_take_the_encoder_options_as_one_value(tiny_model):
    """What `index --backend/--precision` chose reaches every actor whole (pipeline.EncoderConfig)."""
    from indexer.pipeline import EncoderConfig
    from indexer.ray_pipeline import EncoderActor

    for backend in ("torch", "onnx"):
        actor = EncoderActor(EncoderConfig(str(tiny_model), "cpu", {"backend": backend, "precision": "fp32"}))
        assert (actor.encoder.plan.backend, actor.encoder.plan.image, actor.segment) == (backend, "fp32", None)


def test_a_worker_killed_mid_run_is_retried_without_loss_or_duplicates(tmp_path, corpus, tiny_model, monkeypatch):
    from pathlib import Path

    import indexer.ray_pipeline as ray_pipeline

    from indexer.verify import verify

    import indexer.writer

    marker = tmp_path / "killed"
    monkeypatch.setattr(ray_pipeline, "EncoderActor", DyingOnce)
    monkeypatch.setattr(indexer.writer, "FOLD_BELOW_ROWS", 0)  # keep the segments, to look at them
    summary = ray_index(tmp_path / "ix", corpus, tiny_model, {"env_vars": {
        "ALIGNSEARCH_TEST_KILL_MARKER": str(marker), "PYTHONPATH": str(Path(__file__).parent)}})
    dead_segment, dead_rows = json.loads(marker.read_text())  # a worker did die, after writing dead_rows rows
    assert summary["added"] == 18 and summary["failed"] == 1
    engine = alignsearch.open(tmp_path / "ix")
    hits = engine.search(text="x", k=100)
    assert len(hits) == 18 and len({h.relpath for h in hits}) == 18
    # every vector committed once; what the dead actor wrote for the batch it never returned was cut
    # off (its whole file when none of its batches was committed)
    segments = dict(engine.store.segments.values())
    assert sum(segments.values()) == 18 and segments.get(dead_segment, 0) < dead_rows
    assert segment_files(tmp_path / "ix") == {f"{name}.f16" for name in segments}
    for s in engine.store.segments:
        assert engine.store.segment_path(s).stat().st_size == engine.store.committed(s) * engine.store.row_bytes
    assert verify(tmp_path / "ix", check_model=False).ok
    # a tail written after the last commit is reported, and --repair cuts it without losing a vector
    with open(engine.store.segment_path(min(engine.store.segments)), "ab") as f:
        f.write(b"\1" * engine.store.row_bytes)
    report = verify(tmp_path / "ix", check_model=False)
    assert any("uncommitted bytes" in p for p in report.problems)
    repaired = verify(tmp_path / "ix", repair=True, check_model=False)
    assert repaired.ok and alignsearch.open(tmp_path / "ix").info()["images"] == 18
    # a segment that lost its last row: the files of its last checksummed batch are forgotten and encoded
    # again into segment 0 by the repair itself, nothing else
    path = engine.store.segment_path(min(engine.store.segments))
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - engine.store.row_bytes)
    report = verify(tmp_path / "ix", check_model=False)
    assert any("truncated" in p for p in report.problems), report.problems
    repaired = verify(tmp_path / "ix", repair=True, check_model=False)
    assert repaired.ok, repaired.problems
    lost = int(next(line for line in repaired.repaired if line.startswith("re-encoded")).split()[1])
    assert 1 <= lost <= 4  # one batch at most
    again = json.loads(run("index", "--index", tmp_path / "ix", "--device", "cpu", "--json").stdout)
    assert again["added"] == 0
    engine = alignsearch.open(tmp_path / "ix")
    assert engine.store.rows == lost and engine.info()["images"] == 18
    for hit in engine.search(text="x", k=18):  # every stored vector, whichever segment holds it, is its image's
        assert engine.search(image=corpus / hit.relpath, k=1)[0].relpath == hit.relpath


def test_an_actor_that_does_not_see_the_index_folder_sends_its_vectors(tmp_path, corpus, tiny_model, monkeypatch):
    from pathlib import Path

    import indexer.ray_pipeline as ray_pipeline

    monkeypatch.setattr(ray_pipeline, "EncoderActor", Elsewhere)
    summary = ray_index(tmp_path / "ix", corpus, tiny_model, {"env_vars": {"PYTHONPATH": str(Path(__file__).parent)}})
    extra = summary["times"]["extra"]
    assert extra["vectors_in_actor_segments"] == 0 and extra["vectors_sent_to_driver"] == 18
    engine = alignsearch.open(tmp_path / "ix")
    assert engine.store.rows == 18 and engine.store.segments == {} and segment_files(tmp_path / "ix") == set()
    local = json.loads(run("index", corpus, "--index", tmp_path / "local", "--model", tiny_model, "--device", "cpu",
                           "--json").stdout)
    assert local["added"] == summary["added"]
    assert_same_results(engine, alignsearch.open(tmp_path / "local"), corpus)


def test_existing_cluster_by_address_indexes_tar_shards(tmp_path, corpus, tiny_model):
    """`--ray=ADDRESS` joins a cluster started apart (`ray start --head`), here fed WebDataset shards.
    Such a cluster authenticates with a token (~/.ray/auth_token): the driver must say so."""
    import os
    import secrets
    import shutil
    import socket
    import subprocess
    import sys
    import tempfile
    import time
    from pathlib import Path

    from helpers import alignsearch as as_child, write_shard

    files = sorted(p for p in corpus.rglob("*") if p.is_file())
    for s in range(2):
        write_shard(tmp_path / f"part-{s}.tar", files[s::2], corpus)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ray_cli = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
    # Token mode and a token of the test's own, named on both sides from their start as a user's shell sets them.
    # Set here in the test's own process (monkeypatch), after `import ray` had read the mode, it reached the driver
    # only when an earlier test's local ray.init() had switched this process to token mode (and made
    # ~/.ray/auth_token); run alone where an earlier Ray had left ~/.ray/auth_token (which puts `ray start` in
    # token mode), the driver sent no token: "cannot join" (exit 6). With no token file, token mode alone fails.
    token_mode = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    head = subprocess.Popen([ray_cli, "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
                             "--include-dashboard=false", "--node-ip-address=127.0.0.1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=token_mode)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.5)
        done = as_child("index", tmp_path / "part-{0..1}.tar", "--index", tmp_path / "ix", "--model", tiny_model,
                        "--device", "cpu", "--batch-size", "4", f"--ray=127.0.0.1:{port}", "--json", env=token_mode)
        assert done.returncode == 0, done.stderr[-3000:]
        out = done.stdout
    finally:
        head.terminate()
        head.wait(60)
        # `ray start` leaves its address behind: a later plain ray.init() would try the dead cluster
        current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        if current.exists() and current.read_text().strip().endswith(f":{port}"):
            current.unlink()
    summary = json.loads(out[out.index('{\n  "index_dir"'):])
    assert summary["added"] == 18 and summary["failed"] == 1 and summary["times"]["extra"]["ray_encoders"] == 1
    engine = alignsearch.open(tmp_path / "ix")
    query = corpus / "nested" / "img001.jpg"
    hit = engine.search(image=query, k=1)[0]
    assert hit.relpath == "nested/img001.jpg"
    assert hit.path == f"{tmp_path}/part-{files.index(query) % 2}.tar/nested/img001.jpg"


def test_a_run_with_a_ray_of_its_own_prints_none_of_rays_info_or_warning_lines(tmp_path, tiny_model):
    """Ray's driver-side lines (its start, its auth note, Ray Data's execution plan, deprecations) surrounded our
    one-line messages on stderr; they stay in Ray's log files."""
    import os
    import re
    import subprocess
    import sys

    from conftest import make_images

    root = make_images(tmp_path / "photos", 6)[0].parent
    proc = subprocess.run([sys.executable, "-m", "alignsearch", "index", root, "--index", tmp_path / "ix", "--model",
                           tiny_model, "--device", "cpu", "--batch-size", "4", "--ray"], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    noise = [line for line in proc.stderr.splitlines() if re.search(r"\t(INFO|WARNING) |DeprecationWarning", line)]
    assert noise == [], proc.stderr[-3000:]
    assert json.loads(run("info", "--index", tmp_path / "ix", "--json").stdout)["images"] == 6


def test_a_segment_damaged_before_the_end_of_run_fold_stops_the_run_in_one_line(tmp_path, corpus, tiny_model,
                                                                                 monkeypatch):
    """The end-of-run fold copied the actors' segments into vectors.f16 and recorded fresh checksums over what it
    read: a byte flipped on disk between an actor's write and the fold went live and verify said ok. The fold reads
    the rows against their checksums: one error line, exit 7, nothing moved, verify finds it and --repair mends it."""
    import indexer.writer

    from helpers import verify_problems

    real = indexer.writer.fold_small_segments

    def damage_then_fold(db, store, below):
        segment = store.segment_path(min(store.segments))
        data = bytearray(segment.read_bytes())
        data[len(data) // 2] ^= 0x40
        segment.write_bytes(bytes(data))
        return real(db, store, below)

    monkeypatch.setattr(indexer.writer, "fold_small_segments", damage_then_fold)
    ix = tmp_path / "ix"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        out = run("index", corpus, "--index", ix, "--model", tiny_model, "--device", "cpu", "--batch-size", "4",
                  "--ray", code=7)
    finally:
        ray.shutdown()
    errors = [line for line in out.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "changed since they were written" in errors[0], out.output
    assert "alignsearch verify --repair" in errors[0] and "Traceback" not in out.output, out.output
    assert segment_files(ix) != {"vectors.f16"}  # nothing folded: the segments are still there
    assert verify_problems(ix)
    run("verify", "--index", ix, "--skip-model", "--repair")
    assert verify_problems(ix) == []
