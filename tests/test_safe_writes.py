"""Issue 23, writing files: every output is written beside its target under a fresh (mkstemp/mkdtemp) name
and swapped in (alignsearch/atomic.py); `export` and `finetune` refuse targets they did not write, and
`finetune --resume` never unpickles objects."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import run
from helpers import alignsearch, killed_at, smooth_photos, vector_index

from alignsearch import atomic

NOBODY = 65534


def tree(folder: Path) -> dict:
    """Every entry under folder (links not followed) -> its bytes' digest, link target or 'dir'."""
    out = {}
    for where, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = Path(where) / name
            rel = str(p.relative_to(folder))
            if p.is_symlink():
                out[rel] = "-> " + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _as_nobody() -> None:
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)


@pytest.fixture
def shared():
    """A folder every user can write (not sticky, so the kernel's protected_symlinks does not apply), the
    attacker's way in; reachable by nobody (pytest's own tmp folders are root's, 0700)."""
    if os.geteuid() != 0:
        pytest.skip("planting as another user needs root to start that user's process")
    base = Path(tempfile.mkdtemp(prefix="alignsearch-shared-"))
    base.chmod(0o755)
    (base / "shared").mkdir(mode=0o777)
    (base / "shared").chmod(0o777)
    yield base / "shared"
    shutil.rmtree(base)


def plant_link(at: Path, target: Path) -> None:
    """The attacker's half, run as nobody: a symlink (and the folders to it) left where root will write."""
    subprocess.run(["sh", "-c", 'mkdir -p "$(dirname "$1")" && ln -s "$2" "$1"', "plant", str(at), str(target)],
                   check=True, preexec_fn=_as_nobody)
    assert at.is_symlink() and at.lstat().st_uid == NOBODY


# -- the primitives ---------------------------------------------------------------------------------------

def test_write_bytes_never_writes_through_a_planted_link_and_leaves_nothing_on_failure(tmp_path, shared):
    victim = tmp_path / "victim"
    victim.write_bytes(b"root's file")
    out = shared / "out.json"
    for name in ("out.json.tmp", ".out.json.tmp", "out.json.part"):
        plant_link(shared / name, victim)
    atomic.write_bytes(out, b"new")
    assert out.read_bytes() == b"new" and not out.is_symlink()
    assert victim.read_bytes() == b"root's file"

    before = tree(shared)
    with pytest.raises(RuntimeError), atomic.writing(out) as f:
        f.write(b"half of it")
        raise RuntimeError("disk gone")
    assert tree(shared) == before  # the old file whole, no temporary file left
    with pytest.raises(IsADirectoryError):
        atomic.write_bytes(shared, b"x")  # refused before anything is written
    assert tree(shared) == before


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "rename-aside"])
def test_replacing_dir_keeps_the_users_files_and_never_touches_siblings(tmp_path, shared, monkeypatch, exchange):
    if not exchange:  # a kernel or filesystem without RENAME_EXCHANGE
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    victim = tmp_path / "victim"  # root's, where the attacker points
    victim.mkdir()
    (victim / "keep.txt").write_text("another folder of root's")
    out = shared / "model"
    (shared / "model.old").mkdir()
    (shared / "model.old" / "photo.jpg").write_bytes(b"the user's")
    plant_link(shared / "model.tmp", victim)
    siblings = {name: tree(shared)[name] for name in ("model.old", "model.old/photo.jpg", "model.tmp")}

    with atomic.replacing_dir(out, superseded=lambda old: ["stale.bin"]) as tmp:  # a new folder
        (tmp / "weights.bin").write_bytes(b"v1")
        (tmp / "stale.bin").write_bytes(b"v1 layout")
    assert sorted(p.name for p in out.iterdir()) == ["stale.bin", "weights.bin"]
    (out / "NOTES.md").write_text("the user's notes")
    (out / "checkpoint").mkdir()
    (out / "checkpoint" / "state").write_text("written by another call")
    mode = out.stat().st_mode

    with atomic.replacing_dir(out, superseded=lambda old: ["stale.bin"]) as tmp:
        (tmp / "weights.bin").write_bytes(b"v2")
    assert (out / "weights.bin").read_bytes() == b"v2"
    assert not (out / "stale.bin").exists()  # superseded: the earlier write's, gone with it
    assert (out / "NOTES.md").read_text() == "the user's notes"
    assert (out / "checkpoint" / "state").read_text() == "written by another call"
    assert out.stat().st_mode == mode
    assert {name: tree(shared)[name] for name in siblings} == siblings
    assert tree(victim) == {"keep.txt": hashlib.sha256(b"another folder of root's").hexdigest()}
    assert sorted(p.name for p in shared.iterdir()) == ["model", "model.old", "model.tmp"]

    empty = shared / "empty"
    empty.mkdir()
    inode = empty.stat().st_ino
    with atomic.replacing_dir(empty) as tmp:
        (tmp / "a").write_text("new")
    assert empty.stat().st_ino == inode and (empty / "a").read_text() == "new"  # filled in place (a mount point, a cwd)
    assert sorted(p.name for p in shared.iterdir()) == ["empty", "model", "model.old", "model.tmp"]

    before = tree(shared)
    with pytest.raises(RuntimeError), atomic.replacing_dir(out) as tmp:
        (tmp / "weights.bin").write_bytes(b"v3, half")
        raise RuntimeError("killed")
    assert tree(shared) == before


# -- export -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ix(tmp_path_factory):
    """A small index (catalog rows and stored vectors, no model needed)."""
    folder = tmp_path_factory.mktemp("safe") / "ix"
    vector_index(folder, 40, 16)
    return folder


def export(ix, out, *args, code=0):
    return run("export", out, "--index", ix, *args, code=code)


def test_export_never_writes_through_a_link_planted_at_its_temporary_names(ix, tmp_path, shared):
    """`export OUT` wrote OUT.tmp, a fixed name: root's export overwrote the file another user pointed a
    symlink planted there at."""
    victim = tmp_path / "victim.conf"
    victim.write_text("root's configuration")
    plant_link(shared / "out.parquet.tmp", victim)
    export(ix, shared / "out.parquet")
    assert victim.read_text() == "root's configuration"
    assert pq.read_table(shared / "out.parquet").num_rows == 40
    assert sorted(p.name for p in shared.iterdir()) == ["out.parquet", "out.parquet.tmp"]  # the link left alone

    # clip-retrieval wrote OUT/img_emb/img_emb_0.npy.part: a folder with anything else in it is refused
    plant_link(shared / "clip" / "img_emb" / "img_emb_0.npy.part", victim)
    result = export(ix, shared / "clip", "--format", "clip-retrieval", code=2)
    assert result.output.startswith("error:") and len(result.output.strip().splitlines()) == 1
    assert victim.read_text() == "root's configuration"


def test_export_refuses_to_write_inside_an_index(ix, tmp_path):
    """`export .alignsearch/catalog.db` replaced the index's own catalog, for good."""
    before = tree(ix)
    for out, fmt in ((ix / "catalog.db", "parquet"), (ix / "vectors.f16", "parquet"), (ix / "new.parquet", "parquet"),
                     (ix / "sub" / "x.parquet", "parquet"), (ix, "clip-retrieval"), (ix / "clip", "clip-retrieval")):
        result = export(ix, out, "--format", fmt, code=2)
        assert "inside the index folder" in result.output and len(result.output.strip().splitlines()) == 1, out
    link = tmp_path / "elsewhere"
    link.symlink_to(ix)
    assert "inside the index folder" in export(ix, link / "catalog.db", code=2).output  # through a linked parent too
    named = tmp_path / "project" / ".alignsearch"
    named.mkdir(parents=True)
    assert "inside the index folder" in export(ix, named / "out.parquet", code=2).output
    assert tree(ix) == before


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_outputs_follow_the_umask_and_never_open_a_file_its_owner_closed(ix, tmp_path):
    """Every atomic write made its file 0644 whatever the umask: under umask 077 `export lib.parquet` (the paths,
    captions, tags and embeddings of the library) and index.faiss beside a 0600 catalog were readable by every
    user, and a re-export turned an export its owner had made 0640 into 0644."""
    old = os.umask(0o077)
    try:
        export(ix, tmp_path / "lib.parquet")
        vector_index(tmp_path / "private", 5, 8)
    finally:
        os.umask(old)
    assert _mode(tmp_path / "lib.parquet") == 0o600
    assert _mode(tmp_path / "private" / "index.faiss") == _mode(tmp_path / "private" / "catalog.db") == 0o600
    old = os.umask(0o022)
    try:
        (tmp_path / "lib.parquet").chmod(0o640)
        export(ix, tmp_path / "lib.parquet")
        export(ix, tmp_path / "new.parquet")
    finally:
        os.umask(old)
    assert pq.read_table(tmp_path / "lib.parquet").num_rows == 40  # written anew, with the modes it had
    assert _mode(tmp_path / "lib.parquet") == 0o640
    assert _mode(tmp_path / "new.parquet") == 0o644


def test_export_refuses_an_existing_file_it_did_not_write(ix, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("a week of work")
    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"a": [1, 2]}), other)
    user_dir = tmp_path / "photos"
    user_dir.mkdir()
    (user_dir / "a.jpg").write_bytes(b"jpeg")
    before = tree(tmp_path)
    for out, fmt, why in ((notes, "parquet", "not an earlier parquet export"),
                          (other, "parquet", "not an earlier parquet export"),
                          (user_dir, "parquet", "is a folder"),
                          (user_dir, "clip-retrieval", "holds a.jpg"),
                          (notes, "clip-retrieval", "is a file")):
        result = export(ix, out, "--format", fmt, code=2)
        assert why in result.output and len(result.output.strip().splitlines()) == 1, (out, fmt, result.output)
    assert tree(tmp_path) == before  # nothing replaced, no .tmp/.part left

    # what export wrote itself it replaces: an earlier parquet export, an earlier layout (its extra shards go)
    export(ix, tmp_path / "out.parquet", "--where", "width >= 1")
    export(ix, tmp_path / "out.parquet", "--path", "000000*")
    assert pq.read_table(tmp_path / "out.parquet").num_rows == 10
    clip = tmp_path / "clip"
    export(ix, clip, "--format", "clip-retrieval", "--shard-rows", "10")
    assert len(list((clip / "img_emb").iterdir())) == 4
    export(ix, clip, "--format", "clip-retrieval", "--shard-rows", "30")
    assert sorted(p.name for p in (clip / "img_emb").iterdir()) == ["img_emb_0.npy", "img_emb_1.npy"]
    assert sorted(p.name for p in (clip / "metadata").iterdir()) == ["metadata_0.parquet", "metadata_1.parquet"]
    assert sum(len(np.load(p)) for p in (clip / "img_emb").iterdir()) == 40
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".") or p.suffix in (".tmp", ".part")]
    assert leftovers == []



def _refused(ix, out, *why):
    """`export OUT --format clip-retrieval` refused in one line (exit 2, as every refusal) naming each of `why`."""
    result = export(ix, out, "--format", "clip-retrieval", code=2)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert all(w in lines[0] for w in why) and "give another OUT, or remove them yourself" in lines[0], lines[0]


def test_clip_export_replaces_only_files_an_export_wrote(ix, tmp_path):
    """Anything named like a shard in OUT/img_emb/ or OUT/metadata/ was taken for an earlier export's and
    deleted, whatever it held: `echo notes > o/img_emb/img_emb_9.npy` went, and so would the output of
    clip-retrieval itself. The repro, then clip-retrieval's layout written by numpy and pyarrow (not by us)."""
    notes = tmp_path / "notes"
    (notes / "img_emb").mkdir(parents=True)
    (notes / "metadata").mkdir()
    (notes / "img_emb" / "img_emb_9.npy").write_text("notes\n")
    (notes / "metadata" / "metadata_9.parquet").write_text("t\n")
    theirs = tmp_path / "theirs"  # clip-retrieval's output: float16 rows, metadata of its own columns
    (theirs / "img_emb").mkdir(parents=True)
    (theirs / "metadata").mkdir()
    np.save(theirs / "img_emb" / "img_emb_0.npy", np.ones((3, 16), dtype=np.float16))
    pq.write_table(pa.table({"image_path": ["a.jpg", "b.jpg", "c.jpg"], "caption": ["x", "y", "z"],
                             "url": ["u1", "u2", "u3"]}), theirs / "metadata" / "metadata_0.parquet")
    half = tmp_path / "half"  # an export's embeddings without their metadata
    (half / "img_emb").mkdir(parents=True)
    np.save(half / "img_emb" / "img_emb_0.npy", np.ones((3, 16), dtype=np.float16))
    before = tree(tmp_path)
    _refused(ix, notes, "img_emb/img_emb_9.npy", "did not write")
    _refused(ix, theirs, "did not write")
    _refused(ix, half, "img_emb/img_emb_0.npy", "did not write")
    assert tree(tmp_path) == before


def test_clip_export_replaces_its_own_export_unless_changed_since(ix, tmp_path):
    """An export lists what it wrote (alignsearch-export.json: names, sizes, sha256); a later export replaces
    those files as they were written, and refuses a folder where one was edited or another file added."""
    out = tmp_path / "clip"
    export(ix, out, "--format", "clip-retrieval", "--shard-rows", "10")
    listed = json.loads((out / "alignsearch-export.json").read_text())["files"]
    assert sorted(listed) == sorted(f"{sub}/{p.name}" for sub in ("img_emb", "metadata") for p in (out / sub).iterdir())
    export(ix, out, "--format", "clip-retrieval", "--shard-rows", "30")  # our own: replaced, extra shards gone
    assert sorted(p.name for p in (out / "img_emb").iterdir()) == ["img_emb_0.npy", "img_emb_1.npy"]

    shard = out / "img_emb" / "img_emb_1.npy"
    edited = bytearray(shard.read_bytes())
    edited[-1] ^= 1  # one bit of one vector: same name, same size
    shard.write_bytes(bytes(edited))
    before = tree(tmp_path)
    _refused(ix, out, "img_emb/img_emb_1.npy", "changed since")
    assert tree(tmp_path) == before
    shard.write_bytes(bytes(edited[:-1]) + bytes([edited[-1] ^ 1]))  # put back as written
    shutil.copy(out / "metadata" / "metadata_0.parquet", out / "metadata" / "metadata_5.parquet")
    before = tree(tmp_path)
    _refused(ix, out, "metadata/metadata_5.parquet", "does not list")
    assert tree(tmp_path) == before
    (out / "metadata" / "metadata_5.parquet").unlink()
    export(ix, out, "--format", "clip-retrieval")
    assert sum(len(np.load(p)) for p in (out / "img_emb").iterdir()) == 40


def test_clip_export_refuses_a_list_nested_deeper_than_json_recurses_in_one_line(ix, tmp_path):
    """An alignsearch-export.json of arrays nested 100,000 deep (not one an export wrote): json raised
    RecursionError, no ValueError, and `export` ended in `unexpected RecursionError` instead of its refusal."""
    out = tmp_path / "clip"
    export(ix, out, "--format", "clip-retrieval")
    (out / "alignsearch-export.json").write_text("[" * 100_000 + "]" * 100_000)
    before = tree(tmp_path)
    _refused(ix, out, "alignsearch-export.json", "is not one alignsearch's export wrote")
    assert tree(tmp_path) == before


def test_clip_export_replaces_its_own_export_of_more_shards_than_the_fixed_list_limit(ix, tmp_path, monkeypatch):
    """The list was refused past a fixed 16 MiB (~60k shards: 620k rows at --shard-rows 10): the next export of OUT
    said its own list was not one an export wrote. The limit grows with the files there are to check (here the fixed
    part is made smaller than this export's list of 80 files, as 16 MiB is than one of 120k files)."""
    from alignsearch.search import export as exporting

    out = tmp_path / "clip"
    export(ix, out, "--format", "clip-retrieval", "--shard-rows", "1")
    monkeypatch.setattr(exporting, "MARKER_MAX", (out / "alignsearch-export.json").stat().st_size // 2)
    export(ix, out, "--format", "clip-retrieval")
    assert sorted(p.name for p in (out / "img_emb").iterdir()) == ["img_emb_0.npy"]


@pytest.mark.parametrize("dropped", [(), ("t", "t_end"), ("path_b64",), ("t", "t_end", "path_b64")])
def test_clip_export_replaces_an_export_of_earlier_versions(ix, tmp_path, dropped):
    """Exports before the list was written have none: their pairs are known by content (a float16 array, and
    metadata of the same rows with the columns an alignsearch version wrote: t/t_end and path_b64 came later),
    so their users can still export over them."""
    out = tmp_path / "clip"
    export(ix, out, "--format", "clip-retrieval", "--shard-rows", "30")
    (out / "alignsearch-export.json").unlink()
    for p in (out / "metadata").iterdir():
        pq.write_table(pq.read_table(p).drop_columns(list(dropped)), p)
    export(ix, out, "--format", "clip-retrieval")
    assert sorted(p.name for p in (out / "img_emb").iterdir()) == ["img_emb_0.npy"]
    assert (out / "alignsearch-export.json").exists()


def test_clip_export_replaces_nothing_put_in_out_during_it(ix, tmp_path, monkeypatch):
    """The folder is checked before the export, which can take minutes; a file put in OUT/img_emb/ meanwhile
    was never looked at, and the swap would delete it: the export is refused and the file stays."""
    from alignsearch.search import export as exporting

    out = tmp_path / "clip"
    export(ix, out, "--format", "clip-retrieval")
    write = exporting._write_clip_retrieval

    def meanwhile(*args, **kwargs):
        (out / "img_emb" / "img_emb_7.npy").write_text("the user's, written during the export")
        return write(*args, **kwargs)

    monkeypatch.setattr(exporting, "_write_clip_retrieval", meanwhile)
    result = export(ix, out, "--format", "clip-retrieval", code=2)
    assert "changed during the export" in result.output and len(result.output.strip().splitlines()) == 1
    assert (out / "img_emb" / "img_emb_7.npy").read_text() == "the user's, written during the export"
    assert [p.name for p in tmp_path.iterdir()] == ["clip"]  # the new copy removed

FULL_DISK = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
resource.setrlimit(resource.RLIMIT_FSIZE, (65536, resource.RLIM_INFINITY))  # above SQLite's 32 KiB -shm
from alignsearch.surfaces.cli import main
main(sys.argv[1:], prog_name="alignsearch")
"""


@pytest.fixture(params=["tmpfs", "rlimit"])
def full_disk(request, tmp_path):
    """A folder whose writes fail past 64 KiB: a real 64 KiB tmpfs (ENOSPC; needs root's mount, else
    skipped), or RLIMIT_FSIZE in the exporting process (EFBIG). Neither is a monkeypatch: the kernel fails
    the write. Yields (folder, how to run the command there)."""
    folder = tmp_path / "disk"
    folder.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    if request.param == "tmpfs":
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)], check=False,
                                 capture_output=True)
        if mounted.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
        command = [sys.executable, "-m", "alignsearch"]
    else:
        command = [sys.executable, "-c", FULL_DISK]
    yield folder, lambda *args: subprocess.run([*command, *map(str, args)], check=False, capture_output=True,
                                               text=True, env=env, timeout=300)
    if request.param == "tmpfs":
        subprocess.run(["umount", str(folder)], check=True)


@pytest.mark.slow
def test_a_failed_export_leaves_the_old_output_and_no_temporary_files(tmp_path, full_disk):
    folder, alignsearch = full_disk
    ix = tmp_path / "ix"
    vector_index(ix, 4000, 16)  # 128 KiB of fp16 vectors: more than the disk holds in either layout
    earlier = folder / "out.parquet"
    earlier.write_bytes(b"")  # an empty file: nothing to lose, so export may replace it
    for out, fmt in ((earlier, "parquet"), (folder / "clip", "clip-retrieval")):
        proc = alignsearch("export", out, "--format", fmt, "--index", ix)
        assert proc.returncode == 1, proc.stderr
        assert sorted(p.name for p in folder.iterdir()) == ["out.parquet"], fmt  # no .tmp, .part or half folder
        assert earlier.read_bytes() == b""
        assert proc.stderr.startswith("error:") and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert "No space left" in proc.stderr or "too large" in proc.stderr, proc.stderr
        assert proc.stderr.strip().endswith(f": {out}"), proc.stderr  # OUT named, not a temporary file


# -- finetune ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    from shapes_data import all_specs, write_set

    folder = tmp_path_factory.mktemp("pairs") / "train"
    write_set(folder, all_specs(held_out=False)[:4], 2, seed=1)
    return folder


def finetune(pairs, model, out, *args, code=0, epochs=1):
    # epochs apart: an option given twice is refused (exit 2), so args cannot override the one here
    return run("finetune", pairs, "--model", model, "--out", out, "--epochs", epochs, "--batch-size", "4",
               "--device", "cpu", "--val-fraction", "0", *args, code=code)


def test_finetune_refuses_an_out_that_holds_other_files(pairs, tiny_model, tmp_path):
    """With --out set to the training folder, finetune deleted all of it."""
    before = tree(pairs)
    result = finetune(pairs, tiny_model, pairs, code=2)
    assert "not an earlier finetune output" in result.output and len(result.output.strip().splitlines()) == 1
    assert tree(pairs) == before
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("chapter 1")
    finetune(pairs, tiny_model, mine, code=2)
    assert (mine / "thesis.tex").read_text() == "chapter 1" and len(list(mine.iterdir())) == 1


@pytest.mark.slow
def test_finetune_swaps_its_output_and_never_touches_siblings(pairs, tiny_model, tmp_path, shared):
    """finetune removed DIR.old and DIR.tmp beside --out DIR, and wrote the model through a symlink
    planted at DIR.tmp."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "config.json").write_text('{"root": "configuration"}')
    out = shared / "tuned"
    (shared / "tuned.old").mkdir()
    (shared / "tuned.old" / "weights.bin").write_bytes(b"the user's older model")
    plant_link(shared / "tuned.tmp", victim)
    siblings, victim_before = {k: v for k, v in tree(shared).items() if k.startswith("tuned.")}, tree(victim)

    finetune(pairs, tiny_model, out)
    assert (out / "config.json").exists() and (out / "checkpoint" / "trainer_state.pt").exists()
    assert tree(victim) == victim_before  # nothing written through the link
    assert {k: v for k, v in tree(shared).items() if k.startswith("tuned.")} == siblings
    (out / "NOTES.md").write_text("lr 1e-4 was worse")
    finetune(pairs, tiny_model, out)  # again, into its own earlier output: replaced, the user's notes kept
    assert (out / "NOTES.md").read_text() == "lr 1e-4 was worse"
    assert (out / "config.json").exists() and (out / "checkpoint" / "config.json").exists()
    assert {k: v for k, v in tree(shared).items() if k.startswith("tuned.")} == siblings
    assert tree(victim) == victim_before
    assert sorted(p.name for p in shared.iterdir()) == ["tuned", "tuned.old", "tuned.tmp"]  # no temporary left


@pytest.mark.slow
def test_finetunes_model_file_follows_the_umask_like_its_other_files(pairs, tiny_model, tmp_path):
    """model.safetensors was 0600 (safetensors makes it so) while the rest of the output followed the umask:
    a model fine-tuned for a team (umask 027) could not be read by the team."""
    old = os.umask(0o027)
    try:
        finetune(pairs, tiny_model, tmp_path / "tuned")
    finally:
        os.umask(old)
    modes = {str(p.relative_to(tmp_path)): _mode(p) for p in (tmp_path / "tuned").rglob("*") if p.is_file()}
    assert "tuned/model.safetensors" in modes and "tuned/checkpoint/model.safetensors" in modes
    assert set(modes.values()) == {0o640}, modes


class Payload:
    """What an attacker pickles: unpickling it runs os.mkdir(flag)."""

    def __init__(self, flag: Path):
        self.flag = flag

    def __reduce__(self):
        return os.mkdir, (str(self.flag),)


@pytest.mark.slow
def test_resume_does_not_run_a_planted_pickle(pairs, tiny_model, tmp_path):
    """finetune --resume unpickled checkpoint/trainer_state.pt with weights_only=False: a planted file ran
    its payload."""
    import torch

    out = tmp_path / "tuned"
    finetune(pairs, tiny_model, out)
    saved = out / "checkpoint" / "trainer_state.pt"
    written = saved.read_bytes()
    flag = tmp_path / "payload-ran"
    torch.save({"optimizer": Payload(flag), "scheduler": {}, "epoch": 1, "rng": None}, saved)
    result = finetune(pairs, tiny_model, out, "--resume", epochs=2, code=None)
    assert not flag.exists()
    error = result.output.strip().splitlines()[-1]
    assert result.exit_code == 4 and error.startswith("error: cannot resume"), result.output
    assert "besides tensors and plain values" in error
    assert "weights_only" not in result.output  # torch's advice to load it unsafely is not passed on

    saved.write_bytes(written)  # what finetune itself wrote: tensors and plain values, and resumable
    state = torch.load(saved, weights_only=True)
    assert state["epoch"] == 1 and state["rng"]["bit_generator"] == "PCG64"
    assert "resumed" in finetune(pairs, tiny_model, out, "--resume", epochs=2).output


def _aged(path: Path, seconds: float = 120.0) -> Path:
    past = os.stat(path, follow_symlinks=False).st_mtime - seconds
    os.utime(path, (past, past), follow_symlinks=False)
    return path


def test_remove_stale_deletes_only_what_a_killed_write_left(tmp_path):
    """A killed write's temporary file and folder go; a write at work (its lock held, here or in another
    process), a young one, a link named like one, `.old` (a user's previous folder mid-swap) and other names
    stay."""
    out = tmp_path / "OUT"
    dead_file = _aged(Path(tempfile.mkstemp(prefix=".OUT.", suffix=".tmp", dir=tmp_path)[1]))
    dead_dir = Path(tempfile.mkdtemp(prefix=".OUT.", suffix=".new", dir=tmp_path))
    (dead_dir / "img_emb").mkdir()
    (dead_dir / "img_emb" / "img_emb_0.npy").write_bytes(b"x" * 100)
    _aged(dead_dir)
    young = Path(tempfile.mkstemp(prefix=".OUT.", suffix=".tmp", dir=tmp_path)[1])
    swapped = _aged(Path(tempfile.mkdtemp(prefix=".OUT.", suffix=".old", dir=tmp_path)))
    other = _aged(Path(tempfile.mkstemp(prefix=".OTHER.", suffix=".tmp", dir=tmp_path)[1]))
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("the user's")
    link = tmp_path / ".OUT.planted8.new"  # shaped as mkstemp names (8 characters): a link is never swept
    link.symlink_to(victim, target_is_directory=True)
    _aged(link)
    with atomic.writing(out) as f:  # a write at work: its temporary file locked, here made old
        f.write(b"partial")
        at_work = _aged(next(p for p in tmp_path.glob(".OUT.*.tmp") if p not in (dead_file, young)))
        assert atomic.remove_stale(out) == 2
        assert at_work.exists()
    assert out.read_bytes() == b"partial" and not dead_file.exists() and not dead_dir.exists()
    assert young.exists() and swapped.exists() and other.exists() and link.is_symlink()
    assert (victim / "keep").read_text() == "the user's"

    # a write at work in another process: its lock is seen there too
    lone = _aged(Path(tempfile.mkstemp(prefix=".OUT.", suffix=".tmp", dir=tmp_path)[1]))
    child = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); "
                              "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)", str(lone)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        assert atomic.remove_stale(out) == 0 and lone.exists()
    finally:
        child.kill()
        child.wait()
    assert atomic.remove_stale(out) == 1 and not lone.exists()  # its writer gone: stale


@pytest.mark.parametrize("how", ["writing", "replacing"])
def test_a_write_holds_its_lock_until_its_file_is_in_place(tmp_path, monkeypatch, how):
    """writing() closed its temporary file, and the lock on it, before the rename: a sweep between the two (the
    next `export` of OUT, in another process: flock locks of two opens exclude each other in one process too)
    found the temporary unlocked, its last write older than STALE_AFTER (a slow fsync of a large export), and
    deleted it; the rename then failed and the write was lost. The lock is now held until the rename is done."""
    out = tmp_path / "OUT"
    out.write_bytes(b"old")
    swept, real = [], atomic._commit

    def commit(tmp, path, *rest):  # between the written file's close and its rename
        _aged(Path(tmp))
        swept.append(atomic.remove_stale(path))
        real(tmp, path, *rest)

    monkeypatch.setattr(atomic, "_commit", commit)
    if how == "writing":
        with atomic.writing(out) as f:
            f.write(b"new")
    else:
        with atomic.replacing(out) as tmp:
            tmp.write_bytes(b"new")
    assert swept == [0] and out.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["OUT"]


def test_remove_stale_leaves_another_users_leftovers(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("chown to another user needs root")
    out = tmp_path / "OUT"
    theirs = _aged(Path(tempfile.mkstemp(prefix=".OUT.", suffix=".tmp", dir=tmp_path)[1]))
    os.chown(theirs, NOBODY, NOBODY)
    _aged(theirs)
    assert atomic.remove_stale(out) == 0 and theirs.exists()


def test_remove_stale_in_sweeps_the_leftovers_of_every_files_writes_in_a_folder(tmp_path):
    """For a folder only this tool writes (the ONNX cache): a killed write of any file there goes, by the
    same rule as remove_stale (a write at work, a young one, `.old` and the files themselves stay)."""
    dead = [_aged(Path(tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=tmp_path)[1]))
            for name in ("vision-fp32.onnx", "file-text-fp32.json")]
    young = Path(tempfile.mkstemp(prefix=".text-fp32.onnx.", suffix=".tmp", dir=tmp_path)[1])
    swapped = _aged(Path(tempfile.mkdtemp(prefix=".out.", suffix=".old", dir=tmp_path)))
    kept = tmp_path / "model.json.tmp"
    kept.write_text("not a temporary name of atomic's")
    _aged(kept)
    with atomic.writing(tmp_path / "model.json") as f:
        f.write(b"{}")
        at_work = _aged(next(p for p in tmp_path.glob(".model.json.*.tmp")))
        assert atomic.remove_stale_in(tmp_path) == 2
        assert at_work.exists()
    assert not any(p.exists() for p in dead) and young.exists() and swapped.exists() and kept.exists()
    assert (tmp_path / "model.json").read_bytes() == b"{}"


@pytest.mark.parametrize("fmt,at", [("parquet", "pyarrow.parquet:ParquetWriter.write_table"),
                                    ("clip-retrieval", "alignsearch.search.export:_finish_npy")])
@pytest.mark.slow
def test_the_next_export_says_it_removed_what_a_killed_export_left(tmp_path, fmt, at):
    """An export killed mid-way leaves its copy beside OUT (as large as the export): the next export of OUT
    removes it and says so (-v), naming it for an export's, not the export itself failing or not."""
    ix, out = tmp_path / "ix", tmp_path / "out"
    vector_index(ix, 50, 16)
    assert killed_at(at, "before", "export", out, "--format", fmt, "--index", ix).returncode == -9
    left = [_aged(p) for p in tmp_path.glob(".out.*") if p.name.endswith((".tmp", ".new"))]
    assert len(left) == 1 and not out.exists()
    proc = alignsearch("-v", "export", out, "--format", fmt, "--index", ix)
    assert proc.returncode == 0, proc.stderr
    assert f"removed {left[0].name}, left by an export of out killed mid-way" in proc.stderr, proc.stderr
    assert not left[0].exists() and out.exists()


# -- names near the filesystem's limit --------------------------------------------------------------------

LONG_NAMES = ["a" * 245 + ".parquet", "图" * 80 + ".parquet", "b" * 255]  # 253, 248 and 255 bytes: all valid


@pytest.mark.parametrize("name", LONG_NAMES[:2])
def test_export_writes_a_file_whose_name_is_near_the_limit(ix, tmp_path, name):
    """The temporary was `.NAME.XXXXXXXX.tmp`, 14 bytes longer than NAME: `export "a"*245.parquet` failed
    "File name too long" though the name is valid."""
    export(ix, tmp_path / name)
    assert pq.read_table(tmp_path / name).num_rows == 40
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


@pytest.mark.parametrize("name", LONG_NAMES)
def test_a_long_names_temporaries_fit_and_a_killed_ones_are_found(tmp_path, name):
    """A file and a folder of such a name are written, and what a killed write of them left is still
    recognised by remove_stale (the temporary names carry the name cut, on a character boundary)."""
    prefix = atomic.temp_prefix(tmp_path / name)
    cut, digest = prefix[1:-1].rsplit("~", 1)  # the name cut, then a digest of the whole name
    assert len(os.fsencode(prefix)) <= atomic.NAME_BYTES + 2 and name.startswith(cut) and len(digest) == 8
    atomic.write_bytes(tmp_path / name, b"file")
    assert (tmp_path / name).read_bytes() == b"file"
    folder = tmp_path / "d" / name
    for content in (b"one", b"two"):  # the second swaps a folder in place of one (`.old` names too)
        with atomic.replacing_dir(folder) as new:
            (new / "x").write_bytes(content)
    assert (folder / "x").read_bytes() == b"two" and os.listdir(folder.parent) == [name]

    # a writer killed mid-write leaves its temporary file and folder (os._exit: no cleanup runs)
    code = ("import os, sys; from pathlib import Path; from alignsearch import atomic\n"
            "out = Path(sys.argv[1])\n"
            "with atomic.replacing_dir(out.parent / 'd' / out.name) as new:\n"
            "    with atomic.writing(out) as f:\n"
            "        f.write(b'half'); os._exit(9)\n")
    assert subprocess.run([sys.executable, "-c", code, str(tmp_path / name)]).returncode == 9
    left = [_aged(p) for p in (*tmp_path.iterdir(), *(tmp_path / "d").iterdir()) if p.name != name and p.name != "d"]
    assert len(left) == 2
    assert atomic.remove_stale(tmp_path / name) == 1 and atomic.remove_stale(folder) == 1
    assert sorted(os.listdir(tmp_path)) == sorted(["d", name]) and os.listdir(tmp_path / "d") == [name]



def test_remove_stale_keeps_the_users_files_and_other_targets_leftovers(tmp_path, caplog):
    """Every entry starting `.OUT.` and ending .tmp/.new/.old was taken for a temporary of OUT: `export lib` deleted
    the user's own `.lib.backup.tmp` and `.lib.notes.new/` (unchanged for a minute), and swept and named as its own
    the leftovers of `lib.parquet`. Only mkstemp's names (8 random characters) of OUT's own prefix are taken now."""
    out = tmp_path / "OUT"
    (tmp_path / ".OUT.notes.new").mkdir()
    (tmp_path / ".OUT.notes.new" / "draft.txt").write_text("the user's")
    (tmp_path / ".OUT.backup.tmp").write_text("the user's")
    (tmp_path / ".OUT.1.old").mkdir()
    others = [Path(tempfile.mkstemp(prefix=".OUT.parquet.", suffix=".tmp", dir=tmp_path)[1]),
              Path(tempfile.mkdtemp(prefix=".OUT.parquet.", suffix=".old", dir=tmp_path))]
    mine = Path(tempfile.mkstemp(prefix=".OUT.", suffix=".tmp", dir=tmp_path)[1])
    for p in (*tmp_path.iterdir(), tmp_path / ".OUT.notes.new" / "draft.txt"):
        _aged(p)
    with caplog.at_level("WARNING", logger="alignsearch.atomic"):
        assert atomic.remove_stale(out) == 1 and not mine.exists()
    assert not caplog.records  # `.OUT.parquet.XXXXXXXX.old` is OUT.parquet's, `.OUT.1.old` the user's
    assert (tmp_path / ".OUT.notes.new" / "draft.txt").read_text() == (tmp_path / ".OUT.backup.tmp").read_text()
    assert all(p.exists() for p in others)


def test_two_long_names_cut_alike_have_their_own_temporaries(tmp_path, caplog):
    """Two names of over 200 bytes with the same first 200 had the same `.CUT.` temporaries: a sweep for one
    removed what a killed write of the other left and warned of the other's `.old` folder as its own."""
    a, b = tmp_path / ("x" * 200 + "-a.parquet"), tmp_path / ("x" * 200 + "-b.parquet")
    assert atomic.temp_prefix(a) != atomic.temp_prefix(b)
    left = [_aged(Path(tempfile.mkstemp(prefix=atomic.temp_prefix(a), suffix=".tmp", dir=tmp_path)[1])),
            _aged(Path(tempfile.mkdtemp(prefix=atomic.temp_prefix(a), suffix=".old", dir=tmp_path)))]
    with caplog.at_level("WARNING", logger="alignsearch.atomic"):
        assert atomic.remove_stale(b) == 0
    assert not caplog.records and all(p.exists() for p in left)
    with caplog.at_level("WARNING", logger="alignsearch.atomic"):
        assert atomic.remove_stale(a, min_age=0) == 1  # its own: found (min_age: a `.old` ctime cannot be aged)
    assert len(caplog.records) == 1 and str(left[1]) in caplog.records[0].getMessage()


@pytest.mark.parametrize("name", ["é" * 100, "a" + "é" * 100, "é" * 99 + "ab", os.fsdecode(b"\xff" * 201)])
def test_names_of_200_bytes_or_so_are_cut_on_a_character_and_found(tmp_path, name):
    """200 bytes exactly (kept whole), 201 with a 2-byte character across the cut, undecodable bytes
    (surrogateescape): the temporaries fit, and a killed write's leftover is found again."""
    prefix = atomic.temp_prefix(tmp_path / name)
    assert len(os.fsencode(prefix)) <= atomic.NAME_BYTES + 2
    assert (prefix == f".{name}.") == (len(os.fsencode(name)) <= atomic.NAME_BYTES)
    _aged(Path(tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=tmp_path)[1]))
    assert atomic.remove_stale(tmp_path / name) == 1 and not os.listdir(tmp_path)

# -- a folder swap killed mid-way ---------------------------------------------------------------------------

SWAP_KILLED = """
import os, sys
from pathlib import Path
from alignsearch import atomic
# _carry_over: the exchange done, the user's files not yet moved; _exchange: the new copy under its `.old` name
setattr(atomic, sys.argv[2], lambda *args: os._exit(9))
with atomic.replacing_dir(sys.argv[1]) as new:
    (new / "model.bin").write_bytes(b"new")
"""


@pytest.mark.parametrize("at", ["_carry_over", "_exchange"])
def test_what_a_swap_killed_mid_way_left_is_named_and_kept(tmp_path, caplog, at):
    """Killed between the exchange and the move of the user's files, `.OUT.XXXX.old` held the user's own files
    (finetune --out ft: ft/NOTES.md); killed just before the exchange, a whole new copy: neither was ever
    said. The next remove_stale (every finetune and export runs it) names it in one warning, and keeps it."""
    out = tmp_path / "ft"
    out.mkdir()
    (out / "model.bin").write_bytes(b"old")
    (out / "NOTES.md").write_text("the user's")
    assert subprocess.run([sys.executable, "-c", SWAP_KILLED, str(out), at]).returncode == 9
    left = [p for p in tmp_path.iterdir() if p.name.endswith(".old")]
    assert len(left) == 1
    with caplog.at_level("WARNING", logger="alignsearch.atomic"):
        assert atomic.remove_stale(out) == 0
        assert not caplog.records  # just made (a rename sets its ctime): a swap may be at work
        assert atomic.remove_stale(out, min_age=0) == 0
    assert len(caplog.records) == 1 and str(left[0]) in caplog.records[0].getMessage()
    assert "\n" not in caplog.records[0].getMessage()
    kept = {p.name: p.read_bytes() for p in [*out.iterdir(), *left[0].iterdir()]}
    assert kept["NOTES.md"] == b"the user's" and left[0].is_dir()


@pytest.mark.slow
def test_an_index_made_under_umask_000_is_not_refused_by_itself(tiny_model, tmp_path):
    """`index` made its folder (and a missing parent) with mkdir's 0777 less the umask: under umask 000 the folder
    was writable by every user, and the run refused the index it had just made ("refusing the index ...: is
    writable by every user"), as every query after it. Its folders are never group/other-writable now."""
    smooth_photos(tmp_path / "pics", 3)
    ix = tmp_path / "new" / "ix"
    old = os.umask(0o000)
    try:
        run("index", "--index", ix, "--model", tiny_model, tmp_path / "pics")
        assert "photo" in run("query", "--index", ix, "a photo").output
    finally:
        os.umask(old)
    # ix: 0700, as the photos under pytest's 0700 folder are no other user's to read (indexer/privacy.py)
    assert _mode(ix.parent) == 0o755 and _mode(ix) == 0o700


def test_scratch_refuses_a_temporary_folder_others_may_rename_in(ix, tmp_path, monkeypatch):
    """In a TMPDIR writable by everyone without the sticky bit, another user could rename verify's private folder
    away mid-use and put one of this user's own folders under its name: scratch's rmtree then emptied it (and a
    folder of theirs there received the copy of the keyword tables). scratch refuses such a folder; verify says
    so in one line (exit 6)."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    (shared / "work").mkdir()
    (shared / "work" / "thesis.txt").write_text("the user's")
    monkeypatch.setattr(tempfile, "tempdir", str(shared))  # what TMPDIR gives gettempdir
    with pytest.raises(PermissionError):  # atomic.SharedTempError
        with atomic.scratch("alignsearch-keywords") as tmp:
            os.rename(tmp, shared / "taken")  # another user's two renames
            os.rename(shared / "work", tmp)
    assert os.listdir(shared) == ["work"] and (shared / "work" / "thesis.txt").read_text() == "the user's"
    result = run("verify", "--index", ix, code=6)
    assert result.output.strip().splitlines()[-1].startswith("error: cannot check the keyword index: the temporary")
    assert os.listdir(shared) == ["work"]
    shared.chmod(0o1777)  # the sticky bit (/tmp): others may not rename this user's entries
    with atomic.scratch("alignsearch-keywords") as tmp:
        assert tmp.parent == shared and tmp.stat().st_mode & 0o777 == 0o700
    assert os.listdir(shared) == ["work"]


@pytest.mark.slow
def test_a_swap_left_old_folder_is_named_once_a_run(pairs, tiny_model, tmp_path, monkeypatch, caplog):
    """finetune saves its checkpoint each epoch, and each save swept beside it: a `.checkpoint.XXXXXXXX.old` a
    killed save left was named in a warning once per epoch (three in a 3-epoch run), not once a run."""
    import time as real_time
    from types import SimpleNamespace

    out = tmp_path / "tuned"
    with caplog.at_level("WARNING", logger="alignsearch.atomic"):
        finetune(pairs, tiny_model, out, epochs=2)
        finetune(pairs, tiny_model, out, "--resume", epochs=3)
    assert not caplog.records and not [p for p in (*out.iterdir(), *tmp_path.iterdir()) if p.name.startswith(".")]
    left = Path(tempfile.mkdtemp(prefix=".checkpoint.", suffix=".old", dir=out))
    # a minute later (its ctime cannot be set back): the sweep's clock, moved on
    monkeypatch.setattr(atomic, "time", SimpleNamespace(time=lambda: real_time.time() + 120))
    monkeypatch.setattr(atomic, "_REPORTED", set(), raising=False)  # a fresh run (raising: main had none)
    with caplog.at_level("WARNING", logger="alignsearch.atomic"):
        finetune(pairs, tiny_model, out, "--resume", epochs=6)
    said = [r.getMessage() for r in caplog.records if str(left) in r.getMessage()]
    assert len(said) == 1 and left.exists(), said


def test_clip_export_called_directly_guards_out_as_the_command_does(ix, tmp_path):
    """export_clip_retrieval called without export()'s fingerprint (a Python caller): its default `seen` None
    refused every OUT that existed, its own earlier export too ("changed during the export"), and it skipped
    check_out. Now it takes both itself: its own export is replaced, a folder of notes is refused as untouched."""
    from alignsearch.errors import UsageError
    from alignsearch.search.engine import open as open_index
    from alignsearch.search.export import export_clip_retrieval

    engine = open_index(ix)
    out = tmp_path / "clip"
    assert export_clip_retrieval(engine, out, shard_rows=30)["rows"] == 40
    assert export_clip_retrieval(engine, out, shard_rows=10)["shards"] == 4  # its own export, replaced whole
    assert sorted(p.name for p in (out / "img_emb").iterdir()) == [f"img_emb_{i}.npy" for i in range(4)]
    notes = tmp_path / "notes"
    (notes / "img_emb").mkdir(parents=True)
    (notes / "img_emb" / "img_emb_9.npy").write_text("notes\n")
    with pytest.raises(UsageError, match="did not write"):
        export_clip_retrieval(engine, notes)
    assert (notes / "img_emb" / "img_emb_9.npy").read_text() == "notes\n"


@pytest.mark.parametrize("how", ["writing", "replacing"])
def test_a_link_put_at_the_temporary_is_never_chmod_ed_through(tmp_path, how):
    """Another user who may rename entries of the folder written (a group's shared folder, not sticky) swaps the
    temporary for a symbolic link to a 0600 file of this user's while an export or index write is at work: the mode
    given at the commit was a chmod by name, which followed the link and made that file 0644. The file written is
    given its mode by its descriptor (writing), or the one at the name never through a link (replacing: ELOOP)."""
    shared, secret = tmp_path / "shared", tmp_path / "secret"
    shared.mkdir()
    secret.write_text("private\n")
    secret.chmod(0o600)

    def swap():
        (tmp,) = shared.glob(".out*.tmp")
        tmp.rename(shared / "away")
        tmp.symlink_to(secret)

    try:
        if how == "writing":
            with atomic.writing(shared / "out") as f:
                f.write(b"data")
                swap()
        else:
            with atomic.replacing(shared / "out") as tmp:
                tmp.write_bytes(b"data")
                swap()
    except OSError:
        pass  # replacing: the link at the name is refused, the write fails
    assert _mode(secret) == 0o600
    assert secret.read_text() == "private\n"


def _write_in(target: Path, checked: tuple[int, int], layout: str, data: bytes, during=lambda: None) -> None:
    """Write `data` at target with atomic.writing (layout "file") or a folder holding it as `f` with
    atomic.replacing_dir ("folder"), its folder checked as `checked`; `during` runs once the write has begun."""
    if layout == "file":
        with atomic.writing(target, folder=checked) as f:
            f.write(data)
            during()
    else:
        with atomic.replacing_dir(target, folder=checked) as new:
            (new / "f").write_bytes(data)
            during()


@pytest.mark.parametrize("layout", ["file", "folder"])
@pytest.mark.parametrize("when", ["before", "start", "during"])
def test_without_proc_a_write_refuses_a_folder_swapped_for_a_link(tmp_path, monkeypatch, layout, when):
    """atomic.writing / replacing_dir with `folder` where /proc/self/fd is not there (a container or chroot with no
    /proc mounted): the write goes through the folder's name, checked once as it is opened. A swap of the folder for
    a link (to the index folder) right after that check, as the temporary is made, was written through: the
    temporary made in the folder the link named and renamed over its file (folder); a swap during the write ended
    in a FileNotFoundError naming a temporary. Now the folder is looked up again just before the rename: a swap
    before, at the start of or during the write is refused (FolderChanged) and the other folder holds what it held;
    unswapped, the write is still written beside the target and renamed over it (the old content until then)."""
    monkeypatch.setattr(atomic, "FD_FOLDER", str(tmp_path / "no-proc"))  # as where /proc is not mounted
    shared, other = tmp_path / "base" / "shared", tmp_path / "other"
    shared.mkdir(parents=True)
    other.mkdir()
    _write_in(other / "out", None, layout, b"precious")
    before = tree(other)
    st = os.stat(shared)
    checked = (st.st_dev, st.st_ino)

    def held() -> bytes:  # what the write's target in shared/ holds
        return (shared / "out").read_bytes() if layout == "file" else (shared / "out" / "f").read_bytes()

    _write_in(shared / "out", checked, layout, b"old")  # unswapped: written
    seen = []
    _write_in(shared / "out", checked, layout, b"new", during=lambda: seen.append(held()))
    assert seen == [b"old"] and held() == b"new"  # the old one until the rename
    assert sorted(os.listdir(shared)) == ["out"]  # nothing left beside it

    def swap():
        shared.rename(tmp_path / "base" / "moved")
        shared.symlink_to(other)

    if when == "before":
        swap()
    elif when == "start":  # as the temporary is made, after the folder's check
        owner, name = (atomic, "_temp_file") if layout == "file" else (atomic.tempfile, "mkdtemp")
        real = getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda *a, **k: swap() or monkeypatch.setattr(owner, name, real) or real(*a, **k))
    with pytest.raises(atomic.FolderChanged):
        _write_in(shared / "out", checked, layout, b"attack", during=swap if when == "during" else lambda: None)
    assert tree(other) == before  # nothing written through the link


KILLED_MID_WRITE = """
import os, sys, time
from pathlib import Path
from alignsearch import atomic
atomic.FD_FOLDER = sys.argv[2]  # as where /proc is not mounted
target = Path(sys.argv[1])
st = os.stat(target.parent)
if sys.argv[3] == "file":
    with atomic.writing(target, folder=(st.st_dev, st.st_ino)) as f:
        f.write(b"new" * 100000)
        f.flush()
        print("writing", flush=True)
        time.sleep(60)
else:
    with atomic.replacing_dir(target, folder=(st.st_dev, st.st_ino)) as new:
        (new / "f").write_bytes(b"new" * 100000)
        print("writing", flush=True)
        time.sleep(60)
"""


@pytest.mark.parametrize("layout", ["file", "folder"])
def test_without_proc_a_writer_killed_mid_write_leaves_the_old_file(tmp_path, layout):
    """The writes of the test above killed -9 mid-way in a child (no /proc for it either): the old file (folder) is
    whole and as it was, the part written lies only in a temporary beside it, which the next write's sweep removes."""
    folder = tmp_path / "shared"
    folder.mkdir()
    target = folder / "catalog.db"
    _write_in(target, None, layout, b"old" * 1000)

    def content(p: Path) -> bytes:
        return p.read_bytes() if layout == "file" else (p / "f").read_bytes()

    child = subprocess.Popen([sys.executable, "-c", KILLED_MID_WRITE, str(target), str(tmp_path / "no-proc"), layout],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "writing\n"
        os.kill(child.pid, 9)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -9
    assert content(target) == b"old" * 1000
    left = [p for p in folder.iterdir() if p != target]
    assert len(left) == 1 and content(left[0]) == b"new" * 100000, left
    assert atomic.remove_stale(target, min_age=0) == 1
    assert list(folder.iterdir()) == [target]


def test_a_checked_folder_write_whose_carry_over_fails_names_the_folder_not_its_descriptor(tmp_path, monkeypatch):
    """replacing_dir with folder= works through /proc/self/fd/N; when moving the user's other files into the new
    folder fails, the error names where they are kept by the folder's own name: a /proc/self/fd path means nothing
    once the process has exited."""
    out = tmp_path / "emb"
    out.mkdir()
    (out / "NOTES.md").write_text("the user's notes")
    st = os.stat(tmp_path)
    real_rename = os.rename

    def refuse_notes(src, dst, *a, **k):
        if Path(src).name == "NOTES.md":
            raise OSError(errno.EACCES, "Permission denied", str(src))
        return real_rename(src, dst, *a, **k)

    monkeypatch.setattr(os, "rename", refuse_notes)
    with pytest.raises(OSError) as raised, atomic.replacing_dir(out, folder=(st.st_dev, st.st_ino)) as new:
        (new / "embeddings.npy").write_bytes(b"v1")
    said = str(raised.value)
    assert "/proc" not in said and f"what {out} held" in said
    kept = Path(said.rsplit(" is kept in ", 1)[1].split(": '")[0])
    assert kept.parent == tmp_path and (kept / "NOTES.md").read_text() == "the user's notes"
