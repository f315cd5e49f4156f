"""What a writer killed mid-write leaves in the index folder goes at the next writer's start
(layout.remove_killed_writes, called where the writer lock is taken).

A kill -9 while index.faiss (or vectors.f16, a shard, a lock file's fresh copy) was being written left its
temporary, `.index.faiss.next.XXXXXXXX.tmp`, as large as the file, for good: no run removed it and `verify` said
"ok" beside it. Only names the index writes are taken: an index folder may sit in one of the user's folders.
"""

import fcntl
import os
import time

import pytest

from conftest import make_images, run
from helpers import killed_at_call

HOURS_AGO = time.time() - 7200


def _plant(path, data=b"half"):
    """A leftover written an hour ago: a younger one may be a write at work in another process."""
    path.write_bytes(data)
    os.utime(path, (HOURS_AGO, HOURS_AGO))


def _temporaries(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith((".tmp", ".new")))


@pytest.mark.slow
def test_a_kill_while_the_ann_index_is_written_leaves_nothing_after_the_next_run(tmp_path, tiny_model):
    photos = make_images(tmp_path / "photos", 4)[0].parent
    ix = tmp_path / "ix"
    # killed when faiss has written the whole temporary, before atomic.replacing renames it into place
    proc = killed_at_call("alignsearch.storage.ann:faiss.write_index", 1, {},
                          "index", photos, "--index", ix, "--model", tiny_model, "--device", "cpu")
    assert proc.returncode == -9, proc.stdout + proc.stderr
    left = [p for p in ix.iterdir() if p.name.startswith(".index.faiss") and p.name.endswith(".tmp")]
    assert len(left) == 1 and left[0].stat().st_size > 0, _temporaries(ix)
    os.utime(left[0], (HOURS_AGO, HOURS_AGO))  # an hour later: a younger one may be a write at work elsewhere
    run("index", photos, "--index", ix, "--model", tiny_model, "--device", "cpu")
    assert _temporaries(ix) == []
    assert run("verify", "--skip-model", "--index", ix).output.startswith("ok: ")


def test_the_next_writer_removes_only_the_index_own_leftovers(indexed_images):
    photos, ix = indexed_images(3)
    (ix / "vectors").mkdir(exist_ok=True)
    (ix / "thumbs").mkdir(exist_ok=True)
    ours = ["index.faiss", "index.faiss.next", "shards.json.next", "vectors.f16", "shard-1733-002.faiss",
            "lists-1733.ivfdata", "write.lock", "watch.lock"]
    for name in ours:
        _plant(ix / f".{name}.a1b2_c3d.tmp")
    for sub in ("vectors/.9.f16.a1b2_c3d.tmp", "thumbs/.7-256.jpg.a1b2_c3d.tmp"):
        _plant(ix / sub)
    users = [".notes.txt.a1b2c3d4.tmp", ".catalog.db.a1b2c3d4.tmp", ".index.faiss.backup.tmp"]  # not ours to take
    for name in users:
        _plant(ix / name, b"theirs")
    young = ix / ".index.faiss.zzzzzzzz.tmp"  # a write at work in another process may be this young
    young.write_bytes(b"young")
    held = ix / ".vectors.f16.hhhhhhhh.tmp"  # and one a write holds (its flock) is at work, whatever its age
    _plant(held)
    with open(held, "rb") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        run("index", photos, "--index", ix)
    assert _temporaries(ix) == sorted([*users, young.name, held.name])
    assert os.listdir(ix / "vectors") == [] and os.listdir(ix / "thumbs") == []
    assert run("verify", "--skip-model", "--index", ix).output.startswith("ok: ")


def test_the_user_own_temporaries_in_folders_named_vectors_or_thumbs_are_kept(indexed_images):
    """An index made in a folder of the user's (`--index ~/project`) whose own `vectors/` or `thumbs/` (an ML
    project's embeddings, a gallery's thumbnails) holds `.NAME.XXXXXXXX.tmp` of another tool's: that folder was swept
    whole, and the user's file deleted. Only the names the index writes there are its leftovers."""
    photos, ix = indexed_images(3)
    (ix / "vectors").mkdir(exist_ok=True)
    (ix / "thumbs").mkdir(exist_ok=True)
    users = ["vectors/.embeddings.npy.a1b2c3d4.tmp", "thumbs/.holiday.png.a1b2c3d4.tmp", "vectors/.notes.a1b2c3d4.new"]
    for name in users[:2]:
        _plant(ix / name, b"theirs")
    (ix / users[2]).mkdir()
    os.utime(ix / users[2], (HOURS_AGO, HOURS_AGO))
    ours = ["vectors/.9.f16.a1b2_c3d.tmp", "vectors/..run.a1b2_c3d.tmp", "thumbs/.7-256.jpg.a1b2_c3d.tmp"]
    for name in ours:
        _plant(ix / name)
    run("index", photos, "--index", ix)
    assert sorted(str(p.relative_to(ix)) for p in [*(ix / "vectors").iterdir(), *(ix / "thumbs").iterdir()]
                  if p.name.endswith((".tmp", ".new"))) == sorted(users)
