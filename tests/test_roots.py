"""Roots behave: no second copy of a nested folder, `roots` lists them, `forget` drops one, options stick."""

import json
import os
import shutil

import pytest

from conftest import index_json, make_images, run
from helpers import alignsearch, summary


def _paths(ix):
    hits = json.loads(run("query", "x", "-k", "100", "--json", "--index", ix).stdout)["results"]
    return sorted(h["path"] for h in hits)


@pytest.mark.slow
def test_a_folder_inside_a_known_root_is_not_indexed_twice(tmp_path, tiny_model):
    root, ix = tmp_path / "photos", tmp_path / "ix"
    make_images(root, 2)
    make_images(root / "trip", 2, seed=1)
    index_json(ix, root, "--model", tiny_model, "--device", "cpu")
    make_images(root / "trip" / "day2", 1, seed=2)
    s = index_json(ix, root / "trip")
    assert s["added"] == 1 and s["unchanged"] == 4
    paths = _paths(ix)
    assert len(paths) == len(set(paths)) == 5
    info = json.loads(run("info", "--json", "--index", ix).stdout)
    assert info["roots"] == [str(root)] and info["images"] == 5


@pytest.mark.slow
def test_a_folder_that_contains_a_known_root_takes_its_files_over(tmp_path, tiny_model):
    parent, ix = tmp_path / "all", tmp_path / "ix"
    make_images(parent / "photos", 3)
    index_json(ix, parent / "photos", "--model", tiny_model, "--device", "cpu")
    make_images(parent / "other", 2, seed=1)
    s = index_json(ix, parent)
    assert (s["added"], s["unchanged"], s["removed"]) == (2, 3, 0)
    paths = _paths(ix)
    assert len(paths) == len(set(paths)) == 5
    info = json.loads(run("info", "--json", "--index", ix).stdout)
    assert info["roots"] == [str(parent)] and info["index"]["vectors"] == 5


@pytest.mark.slow
def test_a_folder_is_refused_where_taking_over_a_root_would_drop_its_hidden_files(tmp_path, tiny_model):
    """A known root inside a hidden folder (~/.archive/trip) taken over by `index ~`: the same run said "its files
    now belong to ~", then listed ~ without hidden folders and removed every one of them, vectors and tags too.
    Refused now (exit 6), nothing written; with --include-hidden the files are taken over whole."""
    parent, ix = tmp_path / "home", tmp_path / "ix"
    inner = parent / ".archive" / "trip"
    make_images(inner, 3)
    make_images(parent / "photos", 2, seed=1)
    index_json(ix, inner, "--model", tiny_model, "--device", "cpu")
    labels = tmp_path / "labels.txt"
    labels.write_text("a photo\n")
    run("tag", "--labels-file", labels, "--threshold", "0", "--index", ix)
    before = _paths(ix)
    result = alignsearch("index", parent, "--index", ix)
    assert result.returncode == 6 and result.stderr.startswith(f"error: cannot index {parent}: it holds the indexed "
                                                               f"root {inner}, and 3 indexed file(s)"), result.stderr
    assert len(result.stderr.splitlines()) == 1
    info = json.loads(run("info", "--json", "--index", ix).stdout)
    assert info["roots"] == [str(inner)] and _paths(ix) == before and len(before) == 3
    assert json.loads(run("tags", "--json", "--index", ix).stdout)[0]["images"] == 3
    s = index_json(ix, parent, "--include-hidden")
    assert (s["added"], s["unchanged"], s["removed"]) == (2, 3, 0)
    assert json.loads(run("tags", "--json", "--index", ix).stdout)[0]["images"] == 5


@pytest.mark.slow
def test_a_hidden_takeover_refused_for_one_folder_writes_nothing_for_the_others_given(tmp_path, tiny_model):
    """`index A B` where A takes over a known root and B's takeover is refused (hidden files): exit 6 said nothing
    was written, yet A's takeover was already committed (A remembered, A/x's rows moved under it)."""
    a_inner, b_inner, ix = tmp_path / "a" / "x", tmp_path / "b" / ".h" / "y", tmp_path / "ix"
    make_images(a_inner, 2)
    make_images(b_inner, 2, seed=1)
    index_json(ix, a_inner, b_inner, "--model", tiny_model, "--device", "cpu")
    before = json.loads(run("info", "--json", "--index", ix).stdout)["roots"]
    result = alignsearch("index", tmp_path / "a", tmp_path / "b", "--index", ix)
    assert result.returncode == 6 and f"cannot index {tmp_path / 'b'}: it holds the indexed root {b_inner}" in \
        result.stderr, result.stderr
    assert json.loads(run("info", "--json", "--index", ix).stdout)["roots"] == before == [str(a_inner), str(b_inner)]


@pytest.mark.slow
def test_roots_lists_counts_and_state_and_forget_removes_a_root(tmp_path, tiny_model):
    a, b, ix = tmp_path / "a", tmp_path / "b", tmp_path / "ix"
    make_images(a, 3)
    (a / "broken.jpg").write_bytes(b"nope")
    make_images(b, 2, seed=1)
    index_json(ix, a, b, "--model", tiny_model, "--device", "cpu")
    roots = json.loads(run("roots", "--json", "--index", ix).stdout)
    assert roots == [{"root": str(a), "indexed": 3, "failed": 1, "state": "ok", "options": {}, "listing_errors": []},
                     {"root": str(b), "indexed": 2, "failed": 0, "state": "ok", "options": {}, "listing_errors": []}]
    text = run("roots", "--index", ix).output
    assert str(a) in text and "3 indexed" in text

    shutil.rmtree(b)  # a root whose folder is gone: listed as missing, and can be forgotten
    assert json.loads(run("roots", "--json", "--index", ix).stdout)[1]["state"] == "missing"
    out = run("forget", b, "--index", ix).output
    assert "2 files" in out
    assert [r["root"] for r in json.loads(run("roots", "--json", "--index", ix).stdout)] == [str(a)]
    info = json.loads(run("info", "--json", "--index", ix).stdout)
    assert info["images"] == 3 and info["index"]["vectors"] == 3 and info["roots"] == [str(a)]
    assert all(p.startswith(str(a)) for p in _paths(ix))
    assert "not a root of this index" in run("forget", tmp_path / "nowhere", "--index", ix, code=6).output
    assert index_json(ix)["removed"] == 0  # a later run does not bring it back


@pytest.mark.slow
def test_include_hidden_is_remembered_per_root(tmp_path, tiny_model):
    a, b, ix = tmp_path / "a", tmp_path / "b", tmp_path / "ix"
    make_images(a, 1)
    make_images(a / ".hidden", 1, seed=1)
    make_images(b, 1, seed=2)
    make_images(b / ".hidden", 1, seed=3)
    index_json(ix, b, "--model", tiny_model, "--device", "cpu")
    s = index_json(ix, a, "--include-hidden")
    assert s["added"] == 2
    s = index_json(ix)  # no flag: a keeps its hidden files, b still leaves them out
    assert (s["removed"], s["added"]) == (0, 0)
    assert sum(".hidden" in p for p in _paths(ix)) == 1
    roots = {r["root"]: r["options"] for r in json.loads(run("roots", "--json", "--index", ix).stdout)}
    assert roots == {str(b): {}, str(a): {"include_hidden": True}}
    s = index_json(ix, a, "--exclude-hidden")
    assert s["removed"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("swapped", ["root", "parent"])
def test_a_root_swapped_for_a_symlink_is_a_listing_error(tmp_path, tiny_model, swapped):
    """A folder root (or a folder above it) replaced by a link to another folder: its rows are kept, nothing is
    indexed under the link's target (a root the index does not know), and the run and `roots` say why."""
    library, ix = tmp_path / "library", tmp_path / "ix"
    root = library / "photos"
    make_images(root, 3)
    other = tmp_path / "elsewhere"
    make_images(other / "photos", 2, seed=5)
    summary(alignsearch("index", root, "--model", tiny_model, "--device", "cpu", "--index", ix, "--json"))
    before = _paths(ix)
    moved = tmp_path / "moved"
    if swapped == "root":
        root.rename(moved)
        root.symlink_to(other / "photos")
    else:
        library.rename(moved)
        library.symlink_to(other)

    s = summary(alignsearch("index", "--index", ix, "--json"))  # exit 0, as for other listing errors
    assert (s["added"], s["removed"], s["kept"]) == (0, 0, 3)
    assert [(e["root"], e["folder"]) for e in s["listing_errors"]] == [(str(root), str(root))]
    reason = s["listing_errors"][0]["reason"]
    assert str(other / "photos") in reason and "symbolic link" in reason and "forget" in reason
    assert _paths(ix) == before  # no row under the target
    listed = json.loads(run("roots", "--json", "--index", ix).stdout)
    assert [(r["root"], r["state"], r["indexed"]) for r in listed] == [(str(root), "listing errors", 3)]
    assert listed[0]["listing_errors"] == [{"folder": str(root), "reason": reason}]

    (library if swapped == "parent" else root).unlink()  # put back: the next run lists it again
    moved.rename(library if swapped == "parent" else root)
    s = summary(alignsearch("index", "--index", ix, "--json"))
    assert s["listing_errors"] == [] and s["unchanged"] == 3 and _paths(ix) == before


@pytest.mark.slow
def test_a_root_given_as_a_symlink_is_recorded_as_its_target(tmp_path, tiny_model):
    """How a root is recorded at first indexing (resolved): a link given then is no swap on the next run."""
    real, link, ix = tmp_path / "real", tmp_path / "link", tmp_path / "ix"
    make_images(real, 2)
    link.symlink_to(real)
    summary(alignsearch("index", link, "--model", tiny_model, "--device", "cpu", "--index", ix, "--json"))
    assert json.loads(run("info", "--json", "--index", ix).stdout)["roots"] == [str(real)]
    s = summary(alignsearch("index", "--index", ix, "--json"))
    assert s["listing_errors"] == [] and s["unchanged"] == 2


# -- a folder root that is now the empty mount point an unplugged drive leaves ---------------------------------


def _set_root_option(ix, root, name, value):
    """Write the root option `name` the index records for `root` (None: no record, as an index from before it)."""
    from dataclasses import replace

    from alignsearch.storage import catalog, state
    from alignsearch.storage.paths import DB_FILE

    db = catalog.connect(ix / DB_FILE)
    try:
        with db.begin() as conn:
            recorded = state.read(conn).roots
            options = {r: dict(o) for r, o in recorded.options.items()}
            mine = options.setdefault(str(root), {})
            mine.pop(name, None)
            if value is not None:
                mine[name] = value
            state.write(conn, roots=replace(recorded, options={r: o for r, o in options.items() if o}))
    finally:
        db.dispose()


def _set_recorded_device(ix, root, device):
    """Write `device` as the st_dev the index records for `root` (None: no record, as an index from before it)."""
    _set_root_option(ix, root, "device", device)


def _recorded_device(ix, root):
    from helpers import index_state

    return index_state(ix).roots.options.get(str(root), {}).get("device")


def _unplug(root, away):
    """What an unmount leaves of a mount point's folder, as far as a listing sees: an empty folder in its place."""
    root.rename(away)
    root.mkdir()


def _plug_back(root, away):
    root.rmdir()
    away.rename(root)


@pytest.mark.slow
def test_an_unplugged_drive_keeps_its_files_until_it_is_back(tmp_path, tiny_model):
    """`mv photos photos.away; mkdir photos; alignsearch index` removed every file of the root ("6 removed ... no
    images found"), vectors and tags with them, where a missing root keeps its files. Simulated, as nothing is
    mounted in a test: the index's record of the root's device is set to a number other than its folder's (as a
    drive's is, against the file system that holds its mount point), then the folder is emptied as an unmount leaves
    it. The run keeps its files (a listing error, exit 0 as for a missing root), `roots` says why, `--reindex` is
    refused, and the drive back, a run finds every file unchanged and records the device it is on. `forget` drops
    an unplugged root as a missing one."""
    root, away, ix = tmp_path / "photos", tmp_path / "photos.away", tmp_path / "ix"
    make_images(root, 6)
    index_json(ix, root, "--model", tiny_model, "--device", "cpu")
    labels = tmp_path / "labels.txt"
    labels.write_text("a photo\n")
    run("tag", "--labels-file", labels, "--threshold", "0", "--index", ix)
    before = _paths(ix)
    drive = os.stat(root).st_dev + 1  # not the device of the folder left behind
    _set_recorded_device(ix, root, drive)
    _unplug(root, away)

    s = index_json(ix)
    assert (s["added"], s["removed"], s["kept"]) == (0, 0, 6) and s["no_images"] == []
    assert [(e["root"], e["folder"]) for e in s["listing_errors"]] == [(str(root), str(root))]
    reason = s["listing_errors"][0]["reason"]
    assert "an empty folder on another device than when indexed" in reason and "kept until it is back" in reason
    text = run("index", "--index", ix, "--compact").output  # exit 0; said in the summary
    assert "nothing changed" in text and "another device" in text and "no images found" not in text
    assert _paths(ix) == before and json.loads(run("tags", "--json", "--index", ix).stdout)[0]["images"] == 6
    listed = json.loads(run("roots", "--json", "--index", ix).stdout)
    assert [(r["root"], r["state"], r["indexed"], r["options"]) for r in listed] == [(str(root), "missing", 6, {})]
    assert listed[0]["listing_errors"] == [{"folder": str(root), "reason": reason}]
    assert "[missing]" in run("roots", "--index", ix).output
    assert "cannot re-encode" in run("index", "--reindex", "--index", ix, code=6).output
    assert _recorded_device(ix, root) == drive  # never recorded from the empty mount point

    _plug_back(root, away)  # here on the folder's own device, which the next run records
    listed = json.loads(run("roots", "--json", "--index", ix).stdout)
    assert [(r["state"], r["listing_errors"]) for r in listed] == [("ok", [])]
    s = index_json(ix)
    assert (s["added"], s["removed"], s["unchanged"], s["listing_errors"]) == (0, 0, 6, [])
    assert _paths(ix) == before and json.loads(run("tags", "--json", "--index", ix).stdout)[0]["images"] == 6
    assert _recorded_device(ix, root) == os.stat(root).st_dev

    _set_recorded_device(ix, root, drive)  # unplugged again, and forgotten: its files and its record go
    _unplug(root, away)
    assert "6 files removed" in run("forget", root, "--index", ix).output
    assert json.loads(run("roots", "--json", "--index", ix).stdout) == [] and _recorded_device(ix, root) is None


@pytest.mark.slow
def test_a_root_emptied_on_its_own_device_loses_its_files(tmp_path, tiny_model):
    """Emptied by the user (the same device as recorded): the run removes its files, as it always did."""
    root, ix = tmp_path / "photos", tmp_path / "ix"
    make_images(root, 3)
    index_json(ix, root, "--model", tiny_model, "--device", "cpu")
    assert _recorded_device(ix, root) == os.stat(root).st_dev
    shutil.rmtree(root)
    root.mkdir()
    s = index_json(ix)
    assert (s["removed"], s["listing_errors"], s["no_images"]) == (3, [], [str(root)])
    assert json.loads(run("roots", "--json", "--index", ix).stdout)[0]["state"] == "ok"


@pytest.mark.slow
def test_an_index_without_the_device_record_behaves_as_before_until_a_listing_records_it(tmp_path, tiny_model):
    """An index from before the record: an empty root loses its files as it did (nothing tells a drive's mount
    point from a folder emptied by the user), the empty folder's device is not recorded, and the next listing of
    the root with files in it records it."""
    root, away, ix = tmp_path / "photos", tmp_path / "photos.away", tmp_path / "ix"
    make_images(root, 3)
    index_json(ix, root, "--model", tiny_model, "--device", "cpu")
    _set_recorded_device(ix, root, None)
    _unplug(root, away)
    s = index_json(ix)
    assert (s["removed"], s["listing_errors"]) == (3, [])
    assert _recorded_device(ix, root) is None
    _plug_back(root, away)
    s = index_json(ix)
    assert s["added"] == 3 and _recorded_device(ix, root) == os.stat(root).st_dev


# -- a drive mounted inside a root (a NAS share under ~/Pictures), then unplugged ---------------------------------


def _set_recorded_mounts(ix, root, mounts):
    """Write `mounts` ({relative folder: st_dev}) as the record of the folders inside `root` on another device."""
    _set_root_option(ix, root, "mounts", mounts)


def _recorded_mounts(ix, root):
    from helpers import index_state

    return index_state(ix).roots.options.get(str(root), {}).get("mounts")


def test_which_recorded_mount_folders_look_unplugged(tmp_path):
    from indexer.roots import _kept_mounts, unplugged_mounts

    root = tmp_path / "photos"
    for rel in ("nas", "usb", "gone-parent", "full"):
        (root / rel).mkdir(parents=True)
    (root / "full" / "a.jpg").write_bytes(b"x")
    here = os.stat(root).st_dev
    recorded = {"nas": here + 1, "usb": here, "full": here + 1, "missing": here + 1}
    # empty on another device: unplugged; with files: a drive renumbered (NFS) is no unmount; gone: deleted by the
    # user; empty on the recorded device but no mount point (the folder above on it too): another drive remounted
    # above got that number (emptied by the user, the drive there: the next test)
    assert unplugged_mounts(str(root), recorded) == ["nas", "usb"]
    assert unplugged_mounts(str(root), recorded, within=("nas/2019",)) == ["nas"]  # listed below it
    assert unplugged_mounts(str(root), recorded, within=("full",)) == []
    found = {"full": here}
    assert _kept_mounts({**recorded, "nas/inner": 9}, found, ["nas"], None) == \
        {"nas": here + 1, "nas/inner": 9, "full": here}  # gone, or emptied on its own device: no longer recorded
    assert _kept_mounts(recorded, {}, [], ("full",)) == {"nas": here + 1, "usb": here, "missing": here + 1}


def test_a_drive_emptied_by_the_user_is_no_unplugged_one_and_a_reused_device_number_is_no_drive(tmp_path):
    """A drive at photos/nas/inner, inside one at photos/nas: both unplugged, photos/nas plugged back got the
    device number photos/nas/inner had (numbers are reused: another mount took photos/nas's), so photos/nas/inner, an
    empty folder on "its own" device, was taken for emptied by the user and its files removed (seen with real tmpfs
    mounts: 2 removed). A mount point on its recorded device is the drive only where it is a mount point."""
    from helpers import mount_tmpfs, unmount
    from indexer.roots import unplugged_mounts

    root = tmp_path / "photos"
    if not mount_tmpfs(root / "nas"):
        pytest.skip("cannot mount a tmpfs here")
    try:
        nas = os.stat(root / "nas").st_dev
        assert unplugged_mounts(str(root), {"nas": nas}) == []  # the drive there, emptied by the user
        (root / "nas" / "inner").mkdir()  # its empty folder, where the inner drive had that number
        assert unplugged_mounts(str(root), {"nas": nas, "nas/inner": nas}) == ["nas/inner"]
    finally:
        unmount(root / "nas")


@pytest.mark.slow
def test_a_drive_unplugged_from_a_folder_inside_a_root_keeps_its_files(tmp_path, tiny_model):
    """A drive mounted at photos/nas, then unplugged: `alignsearch index` (cron) found photos/nas an empty folder and
    removed every file indexed there, vectors and tags ("3 removed"), though only a mount point's own rule kept a
    root's. Simulated as nothing is mounted in this test (see the next test for a real mount): the record of the
    folder's device is set to a number other than its folder's, then the folder emptied as an unmount leaves it."""
    root, ix = tmp_path / "photos", tmp_path / "ix"
    make_images(root, 2)
    make_images(root / "nas", 3, seed=3)
    index_json(ix, root, "--model", tiny_model, "--device", "cpu")
    assert _recorded_mounts(ix, root) is None  # one device here: no folder inside is a mount
    labels = tmp_path / "labels.txt"
    labels.write_text("a photo\n")
    run("tag", "--labels-file", labels, "--threshold", "0", "--index", ix)
    before = _paths(ix)
    drive = os.stat(root).st_dev + 1
    _set_recorded_mounts(ix, root, {"nas": drive})
    (root / "nas").rename(tmp_path / "away")
    (root / "nas").mkdir()

    s = index_json(ix)
    assert (s["added"], s["removed"], s["kept"], s["unchanged"]) == (0, 0, 3, 2), s
    assert [(e["root"], e["folder"]) for e in s["listing_errors"]] == [(str(root), str(root / "nas"))]
    assert "another device than when indexed" in s["listing_errors"][0]["reason"]
    assert _paths(ix) == before and json.loads(run("tags", "--json", "--index", ix).stdout)[0]["images"] == 5
    assert _recorded_mounts(ix, root) == {"nas": drive}  # still known as a mount point
    assert json.loads(run("roots", "--json", "--index", ix).stdout)[0]["options"] == {}
    result = run("index", "--reindex", "--index", ix, code=6)
    assert f"cannot re-encode: {root / 'nas'} is a folder where a drive was mounted, now empty" in result.output

    (root / "nas").rmdir()  # back: found unchanged, and the folder is no mount on this device
    (tmp_path / "away").rename(root / "nas")
    s = index_json(ix)
    assert (s["added"], s["removed"], s["unchanged"], s["listing_errors"]) == (0, 0, 5, [])
    assert _recorded_mounts(ix, root) is None

    _set_recorded_mounts(ix, root, {"nas": drive})  # unplugged, then the mount point deleted by the user
    shutil.rmtree(root / "nas")
    s = index_json(ix)
    assert (s["removed"], s["listing_errors"]) == (3, []) and _recorded_mounts(ix, root) is None


@pytest.mark.slow
def test_a_real_mount_inside_a_root_is_recorded_and_its_unmount_keeps_the_files(tmp_path, tiny_model):
    """The same with a tmpfs really mounted at photos/nas (where the test may mount: as root with the right)."""
    import subprocess

    from helpers import mount_tmpfs

    root, ix, saved = tmp_path / "photos", tmp_path / "ix", tmp_path / "saved"
    make_images(root, 2)
    if not mount_tmpfs(root / "nas"):
        pytest.skip("cannot mount a tmpfs here")
    try:
        make_images(saved, 3, seed=3)
        for photo in saved.iterdir():
            shutil.copy2(photo, root / "nas" / photo.name)
        index_json(ix, root, "--model", tiny_model, "--device", "cpu")
        assert _recorded_mounts(ix, root) == {"nas": os.stat(root / "nas").st_dev}
        before = _paths(ix)
        subprocess.run(["umount", str(root / "nas")], check=True)
        s = index_json(ix)
        assert (s["removed"], s["kept"]) == (0, 3) and _paths(ix) == before
        assert mount_tmpfs(root / "nas")  # plugged back (a new tmpfs: another device number, the same files)
        for photo in saved.iterdir():
            shutil.copy2(photo, root / "nas" / photo.name)
        s = index_json(ix)
        assert (s["added"], s["removed"], s["unchanged"], s["listing_errors"]) == (0, 0, 5, [])
        assert _recorded_mounts(ix, root) == {"nas": os.stat(root / "nas").st_dev}
    finally:
        subprocess.run(["umount", str(root / "nas")], capture_output=True)


@pytest.mark.slow
@pytest.mark.parametrize("inner", ["nas", "nas/2019"])
def test_a_root_that_takes_over_an_unplugged_drive_root_inside_it_keeps_its_files(tmp_path, tiny_model, inner):
    """photos/nas indexed as a root of its own on its drive, then, while the drive is unplugged, photos: the
    drive's record moves with its files (a listing with the drive in place records it itself), so the empty
    mount point keeps them as it did while it was a root. photos/nas/2019, a folder on the drive mounted at
    photos/nas, gone with the drive: its files were removed (the record was carried only for an inner root that is
    there; seen with a real tmpfs), now the nearest folder there, the mount point, carries it."""
    root, ix = tmp_path / "photos", tmp_path / "ix"
    make_images(root / inner, 3, seed=3)
    index_json(ix, root / inner, "--model", tiny_model, "--device", "cpu")
    drive = os.stat(root).st_dev + 1
    _set_recorded_device(ix, root / inner, drive)
    (root / "nas").rename(tmp_path / "away")
    (root / "nas").mkdir()
    make_images(root, 2)
    s = index_json(ix, root)
    assert (s["added"], s["removed"], s["kept"]) == (2, 0, 3), s
    assert _recorded_mounts(ix, root) == {"nas": drive}
    (root / "nas").rmdir()
    (tmp_path / "away").rename(root / "nas")
    s = index_json(ix)
    assert (s["added"], s["removed"], s["unchanged"], s["listing_errors"]) == (0, 0, 5, [])


@pytest.mark.slow
def test_a_drive_inside_a_root_that_could_not_be_listed_then_unplugged_keeps_its_files(tmp_path, tiny_model):
    """A run that could not list photos/nas (a share refusing access, an I/O error: a listing error, its files kept)
    dropped the folder's record as a mount point, so once the drive was unplugged the next run found an empty folder
    like any other and removed its 3 files. Simulated mount (the record set, the folder emptied, as above); the
    unreadable folder is a chmod 000 read by a run without root's permission bypass."""
    from helpers import can_drop_dac

    if not can_drop_dac():
        pytest.skip("cannot drop root's permission bypass here")
    root, ix = tmp_path / "photos", tmp_path / "ix"
    make_images(root, 2)
    make_images(root / "nas", 3, seed=3)
    index_json(ix, root, "--model", tiny_model, "--device", "cpu")
    drive = os.stat(root).st_dev + 1
    _set_recorded_mounts(ix, root, {"nas": drive})
    os.chmod(root / "nas", 0)
    try:
        s = summary(alignsearch("index", "--index", ix, "--json", unprivileged=True))
    finally:
        os.chmod(root / "nas", 0o755)
    assert (s["removed"], s["kept"]) == (0, 3) and "Permission denied" in s["listing_errors"][0]["reason"]
    assert _recorded_mounts(ix, root) == {"nas": drive}  # still known as a mount point
    (root / "nas").rename(tmp_path / "away")  # unplugged
    (root / "nas").mkdir()
    s = index_json(ix)
    assert (s["removed"], s["kept"]) == (0, 3), s
    assert "another device than when indexed" in s["listing_errors"][0]["reason"]


@pytest.mark.slow
def test_a_mount_point_holding_a_hidden_marker_on_the_disk_below_is_an_unplugged_drive(tmp_path, tiny_model):
    """A mount point holding a hidden file on the disk below (`touch /mnt/x/.not-mounted`, a file manager's
    .DS_Store), the drive unplugged: the folder was not empty, so the next run removed the drive's files, at a mount
    inside a root (seen with a real tmpfs: 3 removed) and at a root's own mount point alike. Hidden entries count as
    none unless the root includes hidden files; simulated mounts, as above."""
    root, ix = tmp_path / "photos", tmp_path / "ix"
    make_images(root, 2)
    make_images(root / "nas", 3, seed=3)
    make_images(tmp_path / "usb", 2, seed=5)
    index_json(ix, root, tmp_path / "usb", "--model", tiny_model, "--device", "cpu")
    drive = os.stat(root).st_dev + 1
    _set_recorded_mounts(ix, root, {"nas": drive})
    _set_recorded_device(ix, tmp_path / "usb", drive + 1)
    for folder in (root / "nas", tmp_path / "usb"):
        _unplug(folder, tmp_path / f"{folder.name}.away")
        (folder / ".not-mounted").touch()
    s = index_json(ix)
    assert (s["removed"], s["kept"]) == (0, 5), s
    assert sorted(e["folder"] for e in s["listing_errors"]) == [str(root / "nas"), str(tmp_path / "usb")]
    assert run("index", "--reindex", "--index", ix, code=6)
    assert [r["state"] for r in json.loads(run("roots", "--json", "--index", ix).stdout)] == ["listing errors", "missing"]


def test_a_folder_holding_only_hidden_entries_is_empty_unless_the_root_includes_hidden_files(tmp_path):
    from indexer import scan

    (tmp_path / "marker").mkdir()
    (tmp_path / "marker" / ".not-mounted").touch()
    (tmp_path / "marker" / ".Trash-1000").mkdir()
    assert scan.empty_folder(str(tmp_path / "marker"))
    assert not scan.empty_folder(str(tmp_path / "marker"), include_hidden=True)  # its hidden photos are listed
    (tmp_path / "marker" / "a.jpg").touch()
    assert not scan.empty_folder(str(tmp_path / "marker"))
    assert not scan.empty_folder(str(tmp_path / "gone"))


@pytest.mark.slow
def test_a_photo_saved_into_an_unplugged_drive_s_mount_point_leaves_the_drive_s_files(tmp_path, tiny_model):
    """The drive at photos/nas unplugged, a photo saved into its mount point (an import, a download to the folder
    on the disk below): the folder was not empty, so the next run removed the drive's 3 files, vectors and tags
    (seen with a real tmpfs), and the drive back, they came back as new files, untagged. A mount folder on another
    device than recorded that holds none of the files indexed there is unplugged too: they are kept, and the new
    photo is not indexed (indexed, it was a file indexed there, and the next run removed the drive's files; the
    drive back hides it). One holding some of them (a drive renumbered, as NFS after a reboot) is listed: what the
    user deleted there goes. Simulated mounts, as above."""
    root, ix = tmp_path / "photos", tmp_path / "ix"
    make_images(root, 2)
    photos = make_images(root / "nas", 4, seed=3)
    index_json(ix, root, "--model", tiny_model, "--device", "cpu")
    drive = os.stat(root).st_dev + 1
    _set_recorded_mounts(ix, root, {"nas": drive})
    photos[0].unlink()  # the drive renumbered, one of its photos deleted
    s = index_json(ix)
    assert (s["removed"], s["kept"], s["listing_errors"]) == (1, 0, []), s
    labels = tmp_path / "labels.txt"
    labels.write_text("a photo\n")
    run("tag", "--labels-file", labels, "--threshold", "0", "--index", ix)
    _set_recorded_mounts(ix, root, {"nas": drive})
    _unplug(root / "nas", tmp_path / "away")
    make_images(root / "nas", 1, seed=9)

    s = index_json(ix)
    assert (s["added"], s["removed"], s["kept"]) == (0, 0, 3), s
    assert [e["folder"] for e in s["listing_errors"]] == [str(root / "nas")]
    assert "holding none of the files indexed there" in s["listing_errors"][0]["reason"]
    assert json.loads(run("tags", "--json", "--index", ix).stdout)[0]["images"] == 5
    assert index_json(ix)["kept"] == 3  # and the next run alike
    result = run("index", "--reindex", "--index", ix, code=6)
    assert f"{root / 'nas'} is a folder where a drive was mounted" in result.output
    (root / "nas").rename(tmp_path / "below")  # plugged back: the photo saved below is hidden by the drive
    (tmp_path / "away").rename(root / "nas")
    s = index_json(ix)
    assert (s["added"], s["removed"], s["unchanged"], s["listing_errors"]) == (0, 0, 5, []), s
    assert json.loads(run("tags", "--json", "--index", ix).stdout)[0]["images"] == 5


def test_a_listing_recording_mounts_and_captions_looks_at_each_folder_once(tmp_path, monkeypatch):
    """A listing that records the drives mounted inside its root (mounts=) and reads edited captions again
    (captions_since=) asked each folder's lstat twice, once for its device and once for its times: one lstat now
    serves both (benchmarks/bench_mounts.py)."""
    import time
    from collections import Counter

    from indexer import scan

    root = tmp_path / "photos"
    for i in range(6):
        (root / f"y{i // 3}" / f"a{i % 3}").mkdir(parents=True)
        (root / f"y{i // 3}" / f"a{i % 3}" / "img.jpg").write_bytes(b"\xff\xd8")
    folders = {str(root), *(str(p) for p in root.rglob("*") if p.is_dir())}
    asked: Counter = Counter()
    lstat = os.lstat

    def counted(path, *args, **kwargs):
        asked[os.fsdecode(path)] += 1
        return lstat(path, *args, **kwargs)

    list(scan.scan_folder(str(root), errors=[]))  # what the listing asks anyway (the root resolved)
    monkeypatch.setattr(os, "lstat", counted)
    list(scan.scan_folder(str(root), errors=[]))
    anyway = Counter(asked)
    asked.clear()
    found = list(scan.scan_folder(str(root), errors=[], mounts={}, captions_since=time.time()))
    assert len(found) == 6
    assert {f: asked[f] - anyway[f] for f in folders if asked[f] - anyway[f] > 1} == {}


@pytest.mark.slow
def test_a_photo_saved_into_an_unplugged_drive_s_mount_point_under_a_name_on_the_drive_leaves_its_files(
        tmp_path, tiny_model):
    """The drive at photos/nas (a real tmpfs) unplugged, a photo saved into its empty mount point under the name of
    one of the drive's photos (img000.jpg: cameras number alike): the folder held "one of the files indexed there",
    so the next run listed it and removed the drive's other 2 files, vectors and tags, and took the new photo for the
    drive's img000 changed. A file counts as one indexed there when it has the size indexed too."""
    from helpers import mount_tmpfs, unmount

    root, ix, saved = tmp_path / "photos", tmp_path / "ix", tmp_path / "saved"
    make_images(root, 2)
    if not mount_tmpfs(root / "nas"):
        pytest.skip("cannot mount a tmpfs here")
    try:
        on_drive = make_images(saved, 3, seed=3)
        for photo in on_drive:
            shutil.copy2(photo, root / "nas" / photo.name)
        index_json(ix, root, "--model", tiny_model, "--device", "cpu")
        labels = tmp_path / "labels.txt"
        labels.write_text("a photo\n")
        run("tag", "--labels-file", labels, "--threshold", "0", "--index", ix)
        before = _paths(ix)
        unmount(root / "nas")
        other = make_images(tmp_path / "camera", 1, seed=9)[0]
        assert other.stat().st_size != on_drive[0].stat().st_size
        shutil.copy(other, root / "nas" / on_drive[0].name)  # the disk below, the drive's name
        s = index_json(ix)
        assert (s["added"], s["updated"], s["removed"], s["kept"]) == (0, 0, 0, 3), s
        assert "holding none of the files indexed there" in s["listing_errors"][0]["reason"]
        assert _paths(ix) == before and json.loads(run("tags", "--json", "--index", ix).stdout)[0]["images"] == 5
        assert mount_tmpfs(root / "nas")  # plugged back: the photo saved below is hidden by the drive
        for photo in on_drive:
            shutil.copy2(photo, root / "nas" / photo.name)
        s = index_json(ix)
        assert (s["added"], s["updated"], s["removed"], s["unchanged"], s["listing_errors"]) == (0, 0, 0, 5, []), s
        assert json.loads(run("tags", "--json", "--index", ix).stdout)[0]["images"] == 5
    finally:
        unmount(root / "nas")


def _ranked(ix, *args) -> list[str]:
    """The files of a query's hits, best first (a file:// hit as the local path it names)."""
    hits = json.loads(run("query", "x", *args, "--json", "--index", ix).stdout)["results"]
    return [h["path"].removeprefix("file://") for h in hits]


@pytest.mark.slow
def test_a_file_two_roots_name_is_one_hit_and_forgetting_either_root_keeps_it(tmp_path, tiny_model):
    """A folder root and CSV lists naming some of its photos hold each of those files under one catalog row per
    root: `query` listed the path twice in its top k (`index ./photos`, `index files.csv`, then `query -k 10`:
    photo0000.jpg at 1. and 2., both 0.2710; a list's file:// entry showed the URL beside the path), and `similar`
    answered the photo itself. Each file is one hit, the k hits stay k, the list keeps its own files (a filter on
    its root), and `forget` of either root leaves the file found through the other."""
    lib, ix = tmp_path / "photos", tmp_path / "ix"
    make_images(lib, 5)
    photos = sorted(lib.iterdir())
    favourites, more = tmp_path / "files.csv", tmp_path / "more.csv"
    favourites.write_text(f"path\n{photos[0]}\n{photos[3]}\n")
    more.write_text(f"path\nfile://{photos[3]}\n")  # a file:// URL is the local path it names
    index_json(ix, lib, "--model", tiny_model, "--device", "cpu")
    index_json(ix, favourites)
    index_json(ix, more)
    everything = _ranked(ix, "-k", "100")
    assert sorted(everything) == [str(p) for p in photos], everything
    for k in range(1, 6):  # k hits, each file once, the same ranking cut at k
        assert _ranked(ix, "-k", str(k)) == everything[:k], k
    listed = json.loads(run("query", "x", "-k", "100", "--where", f"root = {favourites}", "--json", "--index", ix).stdout)
    assert sorted(h["path"] for h in listed["results"]) == [str(photos[0]), str(photos[3])]
    assert {h["root"] for h in listed["results"]} == {str(favourites)}
    alike = run("similar", photos[3], "-k", "4", "--json", "--index", ix).stdout
    assert sorted(h["path"] for h in json.loads(alike)["results"]) == [str(p) for p in photos if p != photos[3]]

    run("forget", more, "--index", ix)
    run("forget", lib, "--index", ix)
    assert sorted(_ranked(ix, "-k", "100")) == [str(photos[0]), str(photos[3])]
    index_json(ix, lib)
    run("forget", favourites, "--index", ix)
    assert sorted(_ranked(ix, "-k", "100")) == [str(p) for p in photos]


@pytest.mark.slow
def test_forget_counts_a_video_once_as_roots_does(tmp_path, tiny_model):
    """`alignsearch forget photos2` said "14 files removed" of a folder of 12 files that `roots` listed as "11
    indexed, 1 failed": each moment of a video was counted as a file. A video is one file, as roots counts it."""
    from helpers import make_video

    root, ix = tmp_path / "photos", tmp_path / "ix"
    make_images(root, 2)
    make_video(root / "clip.mp4", [(1, 2), (2, 2), (3, 2)])
    (root / "broken.jpg").write_bytes(b"not a jpeg")
    s = index_json(ix, root, "--model", tiny_model, "--device", "cpu")
    assert (s["added"], s["failed"]) == (3, 1), s
    (listed,) = json.loads(run("roots", "--json", "--index", ix).stdout)
    assert (listed["indexed"], listed["failed"]) == (3, 1)
    moments = run("query", "x", "--media", "video", "-k", "10", "--json", "--index", ix).stdout
    assert len(json.loads(moments)["results"]) >= 2  # the video holds several moments: several rows
    assert f"forgot {root}: 4 files removed from the index" in run("forget", root, "--index", ix).output
