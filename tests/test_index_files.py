"""The files of an index folder are opened as the index keeps them, never through what someone else put at their
names: a symbolic link at a lock file or at an ANN file, an emptied catalog beside its vectors, and an index folder
(or its files) that another user can write or made."""

import json
import os

import pytest

from conftest import run
from helpers import alignsearch as as_child


def verify_json(ix, *args, code):
    return json.loads(run("verify", "--index", ix, "--json", "--skip-model", *args, code=code).stdout)


@pytest.mark.slow
def test_a_symlink_at_the_watch_lock_is_never_followed(indexed_images, tmp_path):
    """watch.lock was opened with O_CREAT and without O_NOFOLLOW: a link planted at it (by anyone who can write the
    folder) made `index --watch` create the file the link names (or lock another program's file). It is refused now
    as write.lock is: one line, exit 7, the target not made."""
    root, ix = indexed_images(4)
    planted = tmp_path / "planted"
    (ix / "watch.lock").symlink_to(planted)
    proc = as_child("index", "--index", ix, "--device", "cpu", "--workers", "0", "--watch", timeout=120)
    assert proc.returncode == 7, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert "watch.lock is a symbolic link" in lines[-1] and "Traceback" not in proc.stderr, proc.stderr
    assert not os.path.lexists(planted)


def test_an_emptied_catalog_beside_its_vectors_is_damage_and_stays_as_it_is(tmp_path):
    """catalog.db cut to 0 bytes beside the vectors and ANN index it described: a writer (`roots`, `tag --clear`)
    created fresh tables in it, and from then on every command said "holds no indexed images yet" (exit 3) of a
    damaged index. Now every command says it is damaged (exit 7) and none writes into it."""
    from helpers import layout_index

    ix = tmp_path / "ix"
    layout_index(ix, 300)[0].dispose()
    (ix / "catalog.db").write_bytes(b"")
    for args in (("roots",), ("tag", "--clear"), ("tune",), ("similar", "5"), ("info",)):
        out = run(*args, "--index", ix, code=7).output
        assert "Traceback" not in out and len(out.strip().splitlines()) == 1, (args, out)
        assert (ix / "catalog.db").stat().st_size == 0, args
    verify_json(ix, code=7)
