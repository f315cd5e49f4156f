"""Guarantees attacked with real processes, real SQLite and real FAISS: two writers upgrading one catalog at
the same moment, the export cache's in-use lock across processes, the leftovers of a removal cut short, and
kill -9 at moments of an `index` run the other kill tests do not reach (the ANN layout switch, the removal
of deleted files)."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import sqlite3
import subprocess
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

import pytest

from helpers import FIXTURES, KILL_HOOK, answers_as_recorded, fixed_answers, killed_at, resave_with_other_weights, \
    verify_problems
from alignsearch.storage import catalog, migrate, state

# spawn, not fork: forked from this many-threaded process (servers and pools of earlier tests), a child can
# inherit a lock another thread held and never run (a forked writer hung the whole suite in another test)
SPAWN = multiprocessing.get_context("spawn")


# -- 1. two writers upgrade one catalog at the same moment ---------------------------------------------------------

def _upgrade_after_barrier(db_path: str, barrier, steps_log: str, hold: float, results) -> None:
    """A writer opening the catalog (catalog.connect runs the upgrade ladder) once every writer is ready;
    each step it applies is noted in steps_log (pid, version) and then holds the write lock `hold` seconds,
    so the other writer meets it mid-upgrade. Puts (pid, "ok" | "refused" | "traceback", text) in results."""
    from alignsearch.errors import AlignSearchError

    def noted(step: migrate.Step) -> migrate.Step:
        def apply(conn):
            step.apply(conn)
            with open(steps_log, "a") as f:
                f.write(f"{os.getpid()} {step.version}\n")
            time.sleep(hold)

        return replace(step, apply=apply)

    migrate.STEPS = tuple(noted(s) for s in migrate.STEPS)
    try:
        barrier.wait(timeout=60)
        catalog.connect(Path(db_path)).dispose()
        results.put((os.getpid(), "ok", ""))
    except AlignSearchError as exc:  # what the CLI prints as one line
        results.put((os.getpid(), "refused", str(exc)))
    except BaseException:  # noqa: BLE001 - any other failure is the finding
        results.put((os.getpid(), "traceback", traceback.format_exc()))


@pytest.mark.slow
def test_two_writers_upgrading_an_old_catalog_at_once_apply_each_step_once(tmp_path):
    """The index an older alignsearch wrote (tests/fixtures/index-v3), its catalog's version set back to the
    first so every step of the ladder is due, opened by two writers released by one barrier: each step is
    applied once, the catalog ends at the current version, neither writer fails with a traceback, and the
    index answers every recorded query as before."""
    copy = Path(shutil.copytree(FIXTURES / "index-v3", tmp_path / "v3"))
    db_path = copy / ".alignsearch" / "catalog.db"
    conn = sqlite3.connect(db_path)
    with conn:
        conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (json.dumps(migrate.OLDEST),))
    conn.close()
    steps_log = tmp_path / "steps.log"
    barrier, results = SPAWN.Barrier(2), SPAWN.Queue()
    writers = [SPAWN.Process(target=_upgrade_after_barrier, args=(str(db_path), barrier, str(steps_log), 1.0, results))
               for _ in range(2)]
    for w in writers:
        w.start()
    got = [results.get(timeout=120) for _ in writers]
    for w in writers:
        w.join(timeout=60)
        assert w.exitcode == 0
    assert not [r for r in got if r[1] == "traceback"], got
    assert all(r[1] == "ok" or (r[1] == "refused" and "\n" not in r[2]) for r in got), got
    applied = [line.split() for line in steps_log.read_text().splitlines()]
    assert sorted(int(v) for _, v in applied) == [s.version for s in migrate.STEPS]  # each step once
    assert len({pid for pid, _ in applied}) == 1  # all by the writer that got the lock first
    db = catalog.connect(db_path, readonly=True)
    with db.connect() as conn:
        assert state.read(conn).schema_version == migrate.LATEST
    db.dispose()
    answers_as_recorded(copy)


# -- 2. the export cache's in-use lock, across processes ------------------------------------------------------------

TOWER_USER = r"""
import json, sys
import numpy as np
from alignsearch.encoders.backend import onnx_dir
from alignsearch.encoders.model import Encoder

enc = Encoder(sys.argv[1], device="cpu", backend="onnx")
crops = np.random.default_rng(1).integers(0, 256, (2, *enc.spec.output_size, 3), dtype=np.uint8)

def vectors():
    return np.concatenate([enc.encode_text(["a dog", "red car"]), enc.encode_crops(crops)])

first = vectors()
print(json.dumps({"backend": enc.plan.backend, "folder": str(onnx_dir(enc.fingerprint, enc.content_digest))}),
      flush=True)
sys.stdin.readline()  # another process re-exports meanwhile
print(json.dumps({"backend": enc.plan.backend, "change": float(np.abs(vectors() - first).max())}), flush=True)
"""

REEXPORT = r"""
import json, sys
import numpy as np
from alignsearch.encoders.backend import onnx_dir
from alignsearch.encoders.model import Encoder

enc = Encoder(sys.argv[1], device="cpu", backend="onnx")
enc.encode_text(["a dog"])
enc.encode_crops(np.zeros((1, *enc.spec.output_size, 3), dtype=np.uint8))
print(json.dumps({"backend": enc.plan.backend, "folder": str(onnx_dir(enc.fingerprint, enc.content_digest))}))
"""


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_a_tower_loaded_by_one_process_survives_another_process_superseding_its_export(tiny_model, tmp_path,
                                                                                       monkeypatch):
    """Process A exports a checkpoint's towers and keeps them loaded; the checkpoint is re-saved with other
    weights and process B exports those, which supersedes A's folder: B leaves it (A holds it), A's towers
    answer as before from files that are byte for byte as they were. Once A has exited, the next removal
    takes the folder."""
    from alignsearch.encoders import exportcache
    from alignsearch.encoders.onnxrun import read_manifest

    monkeypatch.setenv("ALIGNSEARCH_CACHE", str(tmp_path / "cache"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    ckpt = Path(shutil.copytree(tiny_model, tmp_path / "ckpt"))
    a = subprocess.Popen([sys.executable, "-c", TOWER_USER, str(ckpt)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
    try:
        loaded = json.loads(a.stdout.readline() or "null") or pytest.fail(a.stderr.read()[-3000:])
        held = Path(loaded["folder"])
        assert loaded["backend"] == "onnx" and held.is_dir()
        before = _files(held)
        resave_with_other_weights(tiny_model, ckpt, seed=0)
        b = subprocess.run([sys.executable, "-c", REEXPORT, str(ckpt)], capture_output=True, text=True, env=env,
                           timeout=300)
        assert b.returncode == 0 and "Traceback" not in b.stderr, b.stderr[-3000:]
        newer = Path(json.loads(b.stdout)["folder"])
        assert json.loads(b.stdout)["backend"] == "onnx" and newer != held
        assert exportcache.superseded(held, read_manifest(newer))  # B would have removed it, but for A
        assert _files(held) == before
        out, err = a.communicate("go\n", timeout=120)
    finally:
        if a.poll() is None:
            a.kill()
            a.wait()
    assert a.returncode == 0 and "Traceback" not in err, err[-3000:]
    after = json.loads(out)
    assert after["backend"] == "onnx" and after["change"] < 1e-6, after
    assert _files(held) == before
    # A's lock went with it: the next removal takes the folder, and only that one
    assert [name for name, _ in exportcache.remove_superseded(newer, read_manifest(newer))] == [held.name]
    assert not held.exists() and newer.is_dir()


TEXT_TOWER_USER = r"""
import json, os, sys
from pathlib import Path
from alignsearch.encoders.onnxrun import OnnxUnusable, TextEncoder, read_manifest

folder = Path(sys.argv[1])
manifest = read_manifest(folder)
try:
    enc = TextEncoder(folder, manifest, "fp32")
except OnnxUnusable as why:
    print(json.dumps({"loaded": False, "why": str(why)}), flush=True)
    sys.exit(0)
print(json.dumps({"loaded": True, "locked": enc.tower.in_use is not None, "folder": os.path.isdir(folder)}), flush=True)
"""


def _opened_by(pid: int, path: Path) -> bool:
    try:
        return any(os.readlink(f"/proc/{pid}/fd/{fd}") == str(path) for fd in os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return False


@pytest.mark.slow
def test_a_tower_loaded_while_its_folder_is_being_removed_is_not_used_from_the_removed_folder(exported_cache):
    """The remover holds a superseded folder's IN_USE lock exclusively while it renames the folder away and
    deletes it; a process loading a tower from that folder at that moment got no shared lock, went on
    loading, and ran from a folder deleted under it (held by nobody, so a later export's removal could take
    the next one too). A loader waits for the remover, then either holds the folder at that name or finds it
    gone (OnnxUnusable: the caller exports again)."""
    import gc
    import uuid

    from alignsearch.encoders import exportcache
    from alignsearch.encoders.backend import IN_USE, lock_in_use

    (folder,) = (exported_cache / "onnx").iterdir()
    gc.collect()  # the fixture's encoder, which exported the towers and held them
    remover = lock_in_use(folder, exclusive=True)  # remove_superseded's first step
    assert remover is not None
    loader = subprocess.Popen([sys.executable, "-c", TEXT_TOWER_USER, str(folder)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.time() + 120
        while not _opened_by(loader.pid, folder / IN_USE) and loader.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        trash = folder.parent / f"{exportcache.TRASH}{folder.name}-{uuid.uuid4().hex[:8]}"  # then as it does
        os.rename(folder, trash)
        shutil.rmtree(trash)
        remover.close()
        out, err = loader.communicate(timeout=120)
    finally:
        remover.close()
        if loader.poll() is None:
            loader.kill()
            loader.wait()
    assert loader.returncode == 0 and "Traceback" not in err, err[-3000:]
    got = json.loads(out)
    assert not got["loaded"] or (got["locked"] and got["folder"]), got


# -- 3. what a removal cut short leaves: `.superseded-*` ------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("by", ["the next removal", "the next run that uses the model"])
def test_a_removal_cut_short_is_finished_by_the_next_and_nothing_else_is_touched(exported_cache, tmp_path, tiny_model, by):
    """A process killed between renaming a superseded export away and deleting it leaves `.superseded-NAME-XXXX`
    (exportcache.TRASH), half deleted; the next removal deletes it. It never deletes the live export, nor a
    `.superseded-*` entry that is a symlink (to a folder holding a canary), one owned by another user or one
    others may write, nor anything a symlink inside a leftover points at."""
    from alignsearch.encoders import exportcache
    from alignsearch.encoders.onnxrun import read_manifest

    (live,) = (exported_cache / "onnx").iterdir()
    live_files = _files(live)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "canary").write_text("must survive")
    (outside / "sub").mkdir()
    (outside / "sub" / "canary").write_text("must survive too")

    parent = live.parent
    # what a killed removal leaves: the old export renamed away, part of it deleted already
    leftover = parent / f"{exportcache.TRASH}{'0' * 32}-{'1' * 16}-1a2b3c4d"
    shutil.copytree(live, leftover)
    (leftover / "vision-fp32.onnx").unlink()
    leftover.with_name(leftover.name + "-second").mkdir()  # two removals killed
    (leftover / "escape").symlink_to(outside, target_is_directory=True)
    (leftover / "records" / "escape").symlink_to(outside / "sub", target_is_directory=True)
    decoy = parent / f"{exportcache.TRASH}decoy-5e6f7a8b"
    decoy.symlink_to(outside, target_is_directory=True)
    shared = parent / f"{exportcache.TRASH}shared-9c0d1e2f"
    shared.mkdir()
    (shared / "theirs").write_text("a file in a folder every user may write")
    shared.chmod(0o777)
    kept = [decoy, shared]
    if os.geteuid() == 0:  # only root can give a folder to another user
        other = parent / f"{exportcache.TRASH}other-3a4b5c6d"
        other.mkdir()
        (other / "theirs").write_text("another user's")
        os.chown(other, 4242, 4242)
        kept.append(other)

    if by == "the next removal":
        assert exportcache.remove_superseded(live, read_manifest(live)) == []  # nothing superseded: only leftovers go
    else:  # an ordinary run: the model's towers taken from the cache, nothing exported or superseded
        from alignsearch.encoders.model import Encoder

        Encoder(str(tiny_model), device="cpu").encode_text(["a dog"])
    assert not os.path.lexists(leftover) and not os.path.lexists(leftover.with_name(leftover.name + "-second"))
    assert all(os.path.lexists(p) for p in kept)
    assert decoy.is_symlink() and os.readlink(decoy) == str(outside)
    assert (outside / "canary").read_text() == "must survive"
    assert (outside / "sub" / "canary").read_text() == "must survive too"
    assert (shared / "theirs").exists() and _files(live) == live_files


# -- 4. kill -9 at moments of an `index` run the random kills do not reach ------------------------------------------

MOMENTS = {
    "new files written, gone ones not yet deleted": ("indexer.phashfill:fill_index", "before"),
    "gone files deleted, not committed": ("alignsearch.storage.catalog:delete_files", "after"),
    "ANN index committed, not renamed into place": ("alignsearch.storage.layouts.single:Single.publish", "before"),
}


@pytest.mark.slow
def test_kill_9_while_an_incremental_run_removes_deleted_files(indexed_images, tmp_path):
    """An `index` run after three photos were deleted, killed -9 before it deletes their rows, while it deletes
    them (not committed), and between the ANN index's commit and its rename: each time the index opens, verify
    finds nothing wrong and queries answer as before the run or as after it, k of them (the catalog's deletion
    committed before the ANN index followed: the top hits named deleted files, and k=3 answered one); the
    next run finishes the job."""
    from conftest import index_json

    root, ix = indexed_images(12)
    before = fixed_answers(ix)
    for gone in sorted(root.iterdir())[:3]:
        gone.unlink()
    after_ix = Path(shutil.copytree(ix, tmp_path / "uninterrupted"))
    index_json(after_ix, "--device", "cpu")
    after = fixed_answers(after_ix)
    assert len(after) == len(before) - 3
    problems = {}
    for moment, (where, when) in MOMENTS.items():
        copy = Path(shutil.copytree(ix, tmp_path / where.replace(":", "-")))
        proc = killed_at(where, when, "index", "--index", copy, "--device", "cpu", "--workers", "0")
        assert proc.returncode == -9, (moment, proc.stderr[-3000:])  # killed there, not finished nor failed
        assert fixed_answers(copy) in (before, after), moment
        assert fixed_answers(copy, k=3) in (before[:3], after[:3]), moment  # no slot taken by a deleted file
        problems[moment] = verify_problems(copy)
        assert index_json(copy, "--device", "cpu")["removed"] in (0, 3)
        assert fixed_answers(copy) == after and verify_problems(copy) == [], moment
    assert problems == {m: [] for m in MOMENTS}, problems


SMALL_IVF = 1000  # vectors from which the layouts' IVF-PQ index is made in these tests (ann.FLAT_BELOW: 10,000)

SWITCHED = KILL_HOOK + """
import json
from pathlib import Path

from alignsearch.storage import ann, catalog, vectors
from alignsearch.storage.paths import DB_FILE, ANN_FILE
from indexer.build import sync_index

ann.plan_index.__defaults__ = (int(sys.argv[5]),)
folder = Path(sys.argv[3])
db = catalog.connect(folder / DB_FILE)
with db.connect() as conn:
    store = vectors.load(conn, folder, 16)
sync_index(db, store, folder / ANN_FILE, **json.loads(sys.argv[4]))
"""

SWITCHES = {  # from one file to: (the layout, where the writer is killed)
    "to ondisk, written, not committed": ({"ondisk_shards": 2}, "OnDisk.commit"),
    "to ondisk, committed, not published": ({"ondisk_shards": 2}, "OnDisk.publish"),
    "to sharded, committed, not published": ({"index_shards": 2}, "Sharded.publish"),
}


def _finds_itself(folder: Path, ids: list[int]) -> None:
    import alignsearch

    with alignsearch.open(folder) as engine:
        assert engine.index.ntotal == 2000
        for i in ids:
            hit = engine.search_vector(engine.vector_of(i), k=1)[0]
            assert hit.id == i and hit.score == pytest.approx(1, abs=2e-2), (i, hit)


@pytest.mark.slow
def test_kill_9_while_the_ann_index_switches_layout(tmp_path, monkeypatch):
    """An IVF-PQ index in one file switched to lists on disk or to shard files by a writer killed -9 after it
    wrote the new layout's files and before its commit, or between the commit and the publish: the index
    opens, verify finds nothing wrong, every query finds its own vector, and the next round completes. (The
    on-disk layout wrote index.faiss before its commit: queries then refused the one-file index as damaged;
    shard files committed without their manifest were reported as a lost manifest.)"""
    from alignsearch.storage import ann, layouts
    from alignsearch.storage.paths import ANN_FILE
    from helpers import layout_index
    from indexer.build import sync_index
    from indexer.verify import verify

    monkeypatch.setattr(ann.plan_index, "__defaults__", (SMALL_IVF,))
    db, _, report = layout_index(tmp_path / "single", 2000)
    db.dispose()
    assert report["plan"]["kind"] == "ivfpq" and report["layout"] == "memory"
    problems = {}
    for moment, (to, where) in SWITCHES.items():
        folder = Path(shutil.copytree(tmp_path / "single", tmp_path / moment.replace(" ", "-").replace(",", "")))
        proc = subprocess.run([sys.executable, "-c", SWITCHED, f"alignsearch.storage.layouts:{where}", "before",
                               str(folder), json.dumps(to), str(SMALL_IVF)], capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == -9, (moment, proc.stderr[-3000:])
        problems[moment] = verify(folder, check_model=False).problems
        try:
            _finds_itself(folder, [1, 500, 1999])
        except Exception as exc:  # noqa: BLE001 - one line per moment, all moments reported together
            problems[moment].append(f"queries: {str(exc).splitlines()[0]}")
        db = catalog.connect(folder / "catalog.db")  # the next writer's round
        with db.connect() as conn:
            from alignsearch.storage import vectors

            store = vectors.load(conn, folder, 16)
            record = layouts.read_record(conn)
        layouts.finish_publish(folder, record)
        sync_index(db, store, folder / ANN_FILE, **to)
        db.dispose()
        assert verify(folder, check_model=False).problems == [], moment
        _finds_itself(folder, [1, 500, 1999])
    assert problems == {m: [] for m in SWITCHES}, problems


@pytest.mark.slow
def test_kill_9_while_forget_drops_a_root(indexed_images, tmp_path):
    """`alignsearch forget ROOT` killed -9 after it deleted the root's rows and before the ANN index followed:
    queries answered fewer than k (the top hits named the forgotten files) and verify called the ANN index
    wrong. The rows now leave in the ANN index's commit: the index answers as before or after, k of them."""
    from conftest import index_json, make_images, run

    root, ix = indexed_images(12)
    other = make_images(tmp_path / "other", 6, seed=5)[0].parent
    index_json(ix, other, "--device", "cpu")
    before = fixed_answers(ix)
    after_ix = Path(shutil.copytree(ix, tmp_path / "uninterrupted"))
    run("forget", other, "--index", after_ix)
    after = fixed_answers(after_ix)
    assert len(after) == len(before) - 6
    proc = killed_at("indexer.build:sync_index", "before", "forget", other, "--index", ix)
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert fixed_answers(ix) in (before, after)
    assert fixed_answers(ix, k=3) in (before[:3], after[:3])
    assert verify_problems(ix) == []
    run("forget", other, "--index", ix)
    assert fixed_answers(ix) == after and verify_problems(ix) == []
