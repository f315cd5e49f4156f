"""`alignsearch index --watch` (indexer/watch.py): its decisions as pure functions, and the real command in a child
process watching real folders with real watchfiles: files added, renamed and deleted are found and gone, a burst
makes few runs, a change during a run makes the next one, other writers work between runs, a root that goes
keeps its files, SIGINT and SIGTERM end it cleanly, and a running `serve` answers with what it indexed."""

import errno
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from alignsearch.errors import BadInputError, CatalogBusyError, DiskFullError, IndexDamagedError, ModelLoadError
from alignsearch.storage.paths import writer_running
from conftest import index_json, make_images
from helpers import _drop_dac_capabilities, alignsearch, call, can_drop_dac, resave_with_other_weights, start_serve, \
    stop, verify_problems, write_labels
from indexer import scan, watch
from indexer.job import EncoderCache, index_folders
from indexer.roots import outermost
from indexer.watch import ADDED, DELETED, MODIFIED

ROOT, SKIP = "/photos", "/photos/.alignsearch"


def matters(change, path, include_hidden=False, is_dir=False, root=ROOT):
    return watch.matters(change, path, root, include_hidden=include_hidden, skip=SKIP, is_dir=is_dir)


# -- the decisions --------------------------------------------------------------------------------------------------


def test_images_and_folders_matter_other_files_do_not():
    assert matters(ADDED, "/photos/a.jpg")
    assert matters(MODIFIED, "/photos/trip/b.HEIC")
    assert matters(DELETED, "/photos/c.mp4", is_dir=None)
    assert not matters(ADDED, "/photos/notes.txt")
    assert not matters(DELETED, "/photos/notes.txt", is_dir=None)
    assert not matters(ADDED, "/photos/Thumbs.db")
    # a folder moved in, out or made may carry images; its own time stamps changing does not matter
    assert matters(ADDED, "/photos/trip", is_dir=True)
    assert matters(DELETED, "/photos/trip", is_dir=None)  # gone, no extension: may have been a folder
    assert not matters(MODIFIED, "/photos/trip", is_dir=True)
    assert matters(DELETED, "/photos", is_dir=None)  # the root itself went


def test_a_gone_dotted_folder_the_catalog_knows_matters_and_changes_through_a_folder_link_are_where_it_leads():
    assert not matters(DELETED, "/photos/2024.trip", is_dir=None)  # a gone file that is no image
    assert watch.matters(DELETED, "/photos/2024.trip", ROOT, include_hidden=False, skip=SKIP, is_dir=None,
                         known_folder=True)  # the catalog holds files under it: a folder moved away
    # through a link to a folder: the change of the folder it leads to, if a root holds it (none here)
    real = {"/photos/link/a.jpg": "/elsewhere/a.jpg", "/photos/fav/b.jpg": "/photos2/2024/b.jpg"}
    assert watch.touched({(ADDED, "/photos/link/a.jpg"), (ADDED, "/photos/fav/b.jpg")}, {ROOT: False, "/photos2": False},
                         SKIP, lambda p: False, linked=lambda root, p: p in real, unlinked=real.get) == \
        {"/photos2": ["2024"]}
    calls = []

    def known(root, path):
        calls.append(path)
        return path == "/photos/2024.trip"

    changes = {(DELETED, "/photos/2024.trip"), (DELETED, "/photos/notes.txt"), (DELETED, "/photos/a.jpg")}
    assert watch.touched(changes, {ROOT: False}, SKIP, lambda p: None, known) == {ROOT: ["", ""]}
    assert sorted(calls) == ["/photos/2024.trip", "/photos/notes.txt"]  # an image path costs no catalog read


def test_a_path_through_a_link_to_a_folder_is_told(tmp_path):
    root, outside = tmp_path / "photos", tmp_path / "outside"
    (root / "real").mkdir(parents=True)
    outside.mkdir()
    (root / "link").symlink_to(outside)
    (root / "photo-link.jpg").symlink_to(outside / "a.jpg")  # a file link: followed by a run, as by the scan
    r = str(root)
    assert watch.through_link(r, f"{r}/link/a.jpg") and watch.through_link(r, f"{r}/link/sub/b.jpg")
    assert not watch.through_link(r, f"{r}/link")  # the link itself: a change of its folder (made, removed)
    assert not watch.through_link(r, f"{r}/real/a.jpg") and not watch.through_link(r, f"{r}/photo-link.jpg")
    assert not watch.through_link(r, f"{r}/gone/deeper/a.jpg")


def test_hidden_temporary_and_the_index_own_files_do_not_matter():
    assert not matters(ADDED, "/photos/.cache/a.jpg")
    assert not matters(ADDED, "/photos/.a.jpg")
    assert matters(ADDED, "/photos/.cache/a.jpg", include_hidden=True)
    assert not matters(ADDED, "/photos/.alignsearch/catalog.db", include_hidden=True)
    assert not matters(ADDED, "/photos/.alignsearch/thumbs/1.jpg", include_hidden=True)
    for name in ("a.jpg.part", "a.jpg.crdownload", "~$a.docx", ".a.jpg.swp", "a.jpg~", "a.jpg.tmp", ".#a.txt", "#a.jpg#"):
        assert not matters(ADDED, f"/photos/{name}", include_hidden=True), name
        assert not matters(DELETED, f"/photos/{name}", include_hidden=True, is_dir=None), name
    for name in ("#1.jpg", "~$a.jpg", ".#a.jpg"):  # named like temporary files, but photos to a listing
        assert matters(ADDED, f"/photos/{name}", include_hidden=True), name
    assert matters(ADDED, "/photos/a.jpg", include_hidden=True)  # the download, renamed when done


def test_a_folder_an_earlier_run_could_not_list_matters_when_modified_and_is_watched_anew_once_listed():
    assert not matters(MODIFIED, "/photos/locked", is_dir=True)
    assert watch.matters(MODIFIED, "/photos/locked", ROOT, include_hidden=False, skip=SKIP, is_dir=True, unlisted=True)
    asked = []

    def unlisted(root, path):
        asked.append(path)
        return path == "/photos/locked"

    changes = {(MODIFIED, "/photos/locked"), (MODIFIED, "/photos/open"), (ADDED, "/photos/made")}
    assert watch.touched(changes, {ROOT: False}, SKIP, lambda p: True, unlisted=unlisted) == {ROOT: ["", ""]}
    assert sorted(asked) == ["/photos/locked", "/photos/open"]  # only of folders modified
    assert watch.listed_again({ROOT: {"locked", "flaky"}, "/b": {"x"}}, {ROOT: {"flaky"}, "/b": {"x"}}) == \
        {ROOT: ["locked"]}
    assert watch.listed_again({ROOT: {"gone"}}, {}) == {ROOT: ["gone"]}


def test_a_text_a_caption_link_leads_to_makes_a_run_of_no_folder_of_its_own():
    targets = {"/photos/.captions/beach.txt"}  # hidden: read through the link all the same
    changes = {(MODIFIED, "/photos/.captions/beach.txt"), (MODIFIED, "/photos/notes.txt")}
    assert watch.touched(changes, {ROOT: False}, SKIP, lambda p: False, caption_target=targets.__contains__) == \
        {ROOT: []}
    assert watch.touched({(MODIFIED, "/photos/notes.txt")}, {ROOT: False}, SKIP, lambda p: False,
                         caption_target=targets.__contains__) == {}


def test_a_link_target_outside_the_roots_makes_a_run_of_its_link_s_root(tmp_path):
    from indexer.roots import LinkFolders

    targets = {"/elsewhere/shared.png": ROOT}
    changes = {(MODIFIED, "/elsewhere/shared.png"), (ADDED, "/elsewhere/other.png")}
    assert watch.touched(changes, {ROOT: False, "/photos2": False}, SKIP, lambda p: False, outside=targets.get) == \
        {ROOT: []}
    root, elsewhere = tmp_path / "photos", tmp_path / "elsewhere"
    (root / "sub").mkdir(parents=True)
    elsewhere.mkdir()
    for name in ("a.png", "a.txt", "in.png"):
        (elsewhere if name != "in.png" else root / "sub").joinpath(name).write_bytes(b"x")
    (root / "sub" / "fav.png").symlink_to(elsewhere / "a.png")
    (root / "sub" / "fav.txt").symlink_to(elsewhere / "a.txt")
    (root / "sub" / "here.png").symlink_to(root / "sub" / "in.png")  # inside a root: watched there
    (root / "sub" / "album").symlink_to(elsewhere, target_is_directory=True)  # never followed by a listing
    links = LinkFolders(folders={str(root): {"sub"}})
    assert links.targets_outside([str(root)]) == {str(elsewhere / "a.png"): str(root),
                                                  str(elsewhere / "a.txt"): str(root)}
    assert links.caption_targets() == {str(elsewhere / "a.txt")}


@pytest.mark.slow
def test_a_link_target_changed_during_the_run_that_found_its_link_is_taken_as_changed(tmp_path):
    """A target outside the roots edited after the run listed its link but before its folder was watched (during
    the run that first found the link) was seen by no watch: the index kept the old photo until some other change.
    Newly watched targets modified since the run started are queued as changes; older ones, or ones in folders
    watched already, are not."""
    from indexer.roots import LinkFolders

    root, elsewhere, more = tmp_path / "photos", tmp_path / "elsewhere", tmp_path / "more"
    for folder in (root, elsewhere, more):
        folder.mkdir()
    for folder, name in ((elsewhere, "old.png"), (elsewhere, "edited.png"), (more, "later.png")):
        (folder / name).write_bytes(b"x")
        (root / name).symlink_to(folder / name)
    started = time.time() + 2 * scan.CHANGED_SLACK_S  # later than any status change made here (no ctime is set back)
    os.utime(elsewhere / "old.png", (started - 600, started - 600))
    os.utime(more / "later.png", (started - 600, started - 600))
    os.utime(elsewhere / "edited.png", (started + 1, started + 1))
    links = LinkFolders(folders={str(root): {""}})
    outside = watch._Outside()
    try:
        (root / "later.png").unlink()  # its folder not followed yet
        outside.follow(links, [str(root)], watch.WatchOptions(polling=True), False, since=started)
        assert outside.batches.get(timeout=5) == {(MODIFIED, str(elsewhere / "edited.png"))}
        (root / "later.png").symlink_to(more / "later.png")
        os.utime(elsewhere / "old.png", (started + 1, started + 1))  # in a folder watched already: the watch saw it
        outside.follow(links, [str(root)], watch.WatchOptions(polling=True), False, since=started)
        assert outside.batches.empty()
        os.utime(more / "later.png", (started + 2, started + 2))
        outside._folders = [str(elsewhere)]  # as before `more` was followed
        outside.follow(links, [str(root)], watch.WatchOptions(polling=True), False, since=started)
        assert outside.batches.get(timeout=5) == {(MODIFIED, str(more / "later.png"))}
    finally:
        outside.close()


def test_a_change_at_a_known_link_to_a_folder_starts_the_watcher_anew(tmp_path):
    from indexer.roots import LinkFolders

    root = tmp_path / "photos"
    (root / "2024" / "summer").mkdir(parents=True)
    (root / "a").mkdir()
    (root / "a" / "fav").symlink_to(root / "2024" / "summer", target_is_directory=True)
    found: list[str] = []
    assert list(scan.scan_folder(str(root), folder_links=found)) == [] and found == ["a/fav"]
    links = LinkFolders()
    assert not watch.relinked({(DELETED, f"{root}/a/fav")}, links)
    links.listed(str(root), None, [], [], found)
    assert watch.relinked({(DELETED, f"{root}/a/fav")}, links)
    assert not watch.relinked({(DELETED, f"{root}/a/other"), (ADDED, f"{root}/a/fav/x.jpg")}, links)
    links.listed(str(root), ("a",), [], [], [])  # a listed again, the link gone
    assert not watch.relinked({(ADDED, f"{root}/a/fav")}, links)


def test_a_batch_is_counted_per_root_the_deepest_root_owning_each_path():
    roots = {"/photos": False, "/photos2": True, "/data/list.csv": False}
    kinds = {"/photos2/.x/a.png": False, "/photos/a.jpg": False, "/photos/b.txt": False}
    changes = {(ADDED, "/photos/a.jpg"), (ADDED, "/photos/b.txt"), (ADDED, "/photos2/.x/a.png"),
               (MODIFIED, "/data/list.csv"), (ADDED, "/elsewhere/a.jpg")}
    assert watch.touched(changes, roots, "/ix", lambda p: kinds.get(p, False)) == \
        {"/photos": [""], "/photos2": [".x"], "/data/list.csv": [""]}
    assert watch.owner("/photos2/a.jpg", ["/photos", "/photos2"]) == "/photos2"
    assert watch.owner("/a/b/c.jpg", ["/a", "/a/b"]) == "/a/b"


def test_later_runs_drop_one_time_actions_and_leave_remembered_choices_to_the_index():
    first = {"index_dir": "/ix", "model": "m", "device": "cpu", "rebuild": True, "reindex": True, "compact": True,
             "include_hidden": True, "list_column": "url", "caption_column": "c", "video_interval": 5.0, "ocr": True,
             "ondisk_shards": 2, "index_shards": None, "workers": 0, "batch_size": 8}
    later = watch.later_job(first)
    assert later == {**first, "model": None, "rebuild": False, "reindex": False, "compact": None, "include_hidden": None,
                     "list_column": None, "caption_column": None, "video_interval": None, "ocr": None,
                     "ondisk_shards": None, "index_shards": None}
    assert watch.later_job({**first, "compact": False})["compact"] is False


def test_errors_that_fail_every_run_end_the_watch_others_do_not():
    ix = "/home/u/.alignsearch"
    assert watch.ends_watch(IndexDamagedError("x"), ix)
    assert watch.ends_watch(ModelLoadError("x"), ix)
    assert watch.ends_watch(PermissionError(errno.EACCES, "denied", f"{ix}/write.lock"), ix)
    assert watch.ends_watch(OSError(errno.EROFS, "read-only", ix), ix)
    assert not watch.ends_watch(PermissionError(errno.EACCES, "denied", "/home/u/photos/a.jpg"), ix)
    assert not watch.ends_watch(OSError(errno.ENOSPC, "No space left on device"), ix)
    assert not watch.ends_watch(DiskFullError("full"), ix)
    assert not watch.ends_watch(CatalogBusyError("busy"), ix)
    assert not watch.ends_watch(BadInputError("x"), ix)


def test_roots_gone_back_replaced_and_unmounted():
    assert watch.identity_changed((1, 2), None) and watch.identity_changed(None, (1, 2))
    assert watch.identity_changed((1, 2), (1, 3)) and not watch.identity_changed((1, 2), (1, 2))
    # indexer/roots.py's rule, a run's too (tests/test_roots.py): devices, recorded and now
    assert watch.looks_unmounted(5, 1, empty=True)  # the mount point left behind, empty
    assert not watch.looks_unmounted(5, 1, empty=False)  # another drive with files: indexed
    assert not watch.looks_unmounted(5, 5, empty=True)  # emptied by the user: a run removes its files
    assert not watch.looks_unmounted(5, None, empty=False)  # missing: a run keeps its files
    assert not watch.looks_unmounted(None, 1, empty=True)  # none recorded (an index from before the record)
    assert watch.identity_changed((1, 2, False), (1, 2, True))  # made readable: watched anew
    assert watch.identity_changed((1, 2, True), (1, 2, False))
    assert not watch.watchable("s3://bucket/photos") and watch.watchable("/data/list.csv")


def test_a_root_s_identity_says_whether_it_can_be_read(tmp_path):
    folder, file = tmp_path / "photos", tmp_path / "list.csv"
    folder.mkdir()
    file.write_text("path\n")
    st = folder.stat()
    assert watch.identity(str(folder)) == (st.st_dev, st.st_ino, True)
    assert watch.identity(str(file))[2] and watch.identity(str(tmp_path / "gone")) is None
    os.mkfifo(tmp_path / "fifo")  # a FIFO in a root's place: looked at without waiting for a writer
    assert watch.identity(str(tmp_path / "fifo"))[2]


def test_an_empty_root_on_another_device_than_seen_holds_the_runs(tmp_path):
    """The watch's rule is the run's (indexer/roots.py looks_unmounted) on the devices of the identities it saw:
    simulated by an identity whose device is not the empty folder's (no drive is mounted in a test)."""
    folder = tmp_path / "photos"
    folder.mkdir()
    st = folder.stat()
    said = []
    w = watch.Watch(str(tmp_path / "ix"), roots={str(folder): watch.Root(str(folder), identity=(st.st_dev + 1, 7, True))})
    assert watch._paths(w, said.append) == [str(folder)]
    assert w.roots[str(folder)].held and w.roots[str(folder)].identity == (st.st_dev + 1, 7, True)
    assert len(said) == 1 and "another device" in said[0]
    w.roots[str(folder)].identity = (st.st_dev, 7, True)  # the same device: emptied by the user, not held
    watch._paths(w, said.append)
    assert not w.roots[str(folder)].held


def test_network_file_systems_are_polled(tmp_path):
    info = tmp_path / "mountinfo"
    info.write_text("22 1 8:1 / / rw - ext4 /dev/sda1 rw\n"
                    "40 22 0:50 / /mnt/nas rw - nfs4 nas:/photos rw\n"
                    "41 22 0:51 / /mnt/my\\040share rw - cifs //srv/s rw\n")
    table = watch.mounts(str(info))
    assert watch.fs_type("/mnt/nas/2024/a", table) == "nfs4"
    assert watch.fs_type("/mnt/my share/x", table) == "cifs"
    assert watch.fs_type("/mnt/nasty", table) == "ext4"
    assert watch.network_fs("nfs4") and watch.network_fs("fuse.sshfs") and not watch.network_fs("ext4")
    assert watch.fs_type("/x", watch.mounts(str(tmp_path / "absent"))) == ""


@pytest.mark.slow
def test_an_error_in_one_run_is_reported_and_the_watch_goes_on(tmp_path):
    """watch_index over a real folder and real watchfiles, with a stand-in for the index job whose second run
    meets a full disk: reported, and the next change makes the next run; an error that fails every run ends it."""
    from alignsearch.storage import catalog, state
    from alignsearch.storage.paths import DB_FILE

    root, ix = tmp_path / "photos", tmp_path / "ix"
    root.mkdir()
    ix.mkdir()
    db = catalog.connect(ix / DB_FILE)  # an index of the root, which the stand-in runs leave as it is
    with db.begin() as conn:
        state.write(conn, roots=state.RootsState(roots=(str(root.resolve()),)))
    db.dispose()
    calls, reports, lines = [], [], []

    def run(roots, **job):
        calls.append((roots, job))
        if len(calls) == 2:
            raise DiskFullError("no space left on device")
        return {"run": len(calls)}

    def report(summary, facts, error):
        reports.append((summary, facts, error))
        if len(reports) < 3:
            (root / f"{len(reports)}.jpg").write_bytes(b"x")  # the next change
        else:
            raise KeyboardInterrupt  # Ctrl-C

    options = watch.WatchOptions(settle_ms=100, tick_s=0.2)
    job = {"index_dir": str(ix), "rebuild": True}
    assert watch.watch_index([str(root)], job, options, run, report, lines.append) == 130
    assert isinstance(reports[1][2], DiskFullError) and reports[2][2] is None
    assert [r[1]["run"] for r in reports] == [1, 2, 3] and reports[2][1]["roots"] == [str(root.resolve())]
    encoders = calls[0][1]["encoders"]
    assert isinstance(encoders, EncoderCache)
    links = calls[0][1]["links"]  # the folders holding links to files, kept across runs
    assert calls[0] == ([str(root.resolve())], {**job, "index_dir": str(ix.resolve()), "encoders": encoders,
                                                "links": links})
    scope = watch.Scope(folders={str(root.resolve()): ("",)})  # run 2 lists where its change was, the folder
    # of 1.jpg; run 3 comes after a failed run, whose changes may not be indexed: it lists every root whole
    assert [c[1]["scope"] for c in calls[1:]] == [scope, None]
    assert all(c == ([], {**watch.later_job(calls[0][1]), "scope": c[1]["scope"]}) for c in calls[1:])  # no --rebuild
    assert all(c[1]["encoders"] is encoders and c[1]["links"] is links for c in calls)  # one model kept loaded for every run
    assert lines[-1] == "watch stopped"

    def damaged(roots, **job):
        calls.append(roots)
        if len(calls) > 4:
            raise IndexDamagedError("the vector store is damaged")
        (root / "3.jpg").write_bytes(b"x")  # during the run: the next one sees it
        return {}

    with pytest.raises(IndexDamagedError):
        watch.watch_index([str(root)], job, options, damaged, lambda *a: None, lines.append)
    assert len(calls) == 5
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C as before


@pytest.mark.slow
def test_runs_of_one_watch_load_the_model_once_and_another_model_when_the_index_changes(tmp_path, tiny_model,
                                                                                       monkeypatch):
    """index_folders with an EncoderCache (what the watch passes) loads the encoder on its first run only; after
    another process re-encodes the index with other weights, the next run loads those (the old model would
    write vectors of another space)."""
    from alignsearch.encoders import loader

    loads = []
    real = loader.open_encoder

    def counted(*args, **kwargs):
        loads.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(loader, "open_encoder", counted)
    root, ix = tmp_path / "photos", tmp_path / "ix"
    make_images(root, 2, seed=21)
    cache = EncoderCache()
    job = {"index_dir": ix, "model": str(tiny_model), "device": "cpu", "workers": 0, "encoders": cache}
    index_folders([root], **job)
    first = cache.encoder
    make_images(root / "more", 1, seed=22)
    assert index_folders([], **job).added == 1
    assert index_folders([], **job).unchanged == 3
    assert len(loads) == 1 and cache.encoder is first
    assert index_folders([], **{**job, "encoders": None}).unchanged == 3 and len(loads) == 2  # a plain run loads
    job["model"] = None  # the index's model, whichever it records
    other = Path(shutil.copytree(tiny_model, tmp_path / "other-weights"))  # its tokenizer and processor
    resave_with_other_weights(tiny_model, other, seed=3)
    index_folders([], index_dir=ix, device="cpu", workers=0, model=str(other), reindex=True)  # another process
    make_images(root / "later", 1, seed=23)
    assert index_folders([], **job).added == 1
    assert cache.encoder is not first and cache.encoder.fingerprint != first.fingerprint
    assert cache.encoder.name == str(other) and len(loads) == 4  # the reindex's own load, then this run's
    assert index_folders([], **job).unchanged == 4 and len(loads) == 4
    assert verify_problems(ix) == []


@pytest.mark.slow
def test_a_watch_started_with_model_goes_on_after_another_process_reindexes_to_another_model(tmp_path, tiny_model,
                                                                                            other_model):
    """`index ROOT --watch --model M1`, then `index --reindex --model M2` from another shell: the watch's later runs
    named M1 still, were refused as the wrong model (ModelMismatchError), and the watch ended, its new files never
    indexed. They leave the model to the index now, keep the encoder loaded while it is the recorded one, and load
    the new one after the re-encode."""
    root, ix = tmp_path / "photos", tmp_path / "ix"
    make_images(root, 2, seed=31)
    job = {"index_dir": ix, "model": str(tiny_model), "device": "cpu", "workers": 0, "encoders": EncoderCache()}
    index_folders([root], **job)
    first = job["encoders"].encoder
    later = watch.later_job(job)
    make_images(root / "more", 1, seed=32)
    assert index_folders([], **later).added == 1 and job["encoders"].encoder is first  # still loaded once
    index_folders([], index_dir=ix, device="cpu", workers=0, model=str(other_model), reindex=True)  # another shell
    make_images(root / "later", 1, seed=33)
    assert index_folders([], **later).added == 1
    assert job["encoders"].encoder.name == str(other_model)
    assert verify_problems(ix) == []


# -- runs that list where changes were seen ------------------------------------------------------------------------


def test_a_change_is_listed_in_the_folder_holding_it_and_a_run_lists_those_folders_and_url_roots():
    assert watch.listing_folder("/photos/2024/trip/a.jpg", ROOT) == "2024/trip"
    assert watch.listing_folder("/photos/2024/trip", ROOT) == "2024"  # a folder made, gone, renamed: its parent
    assert watch.listing_folder("/photos/a.jpg", ROOT) == ""
    assert watch.listing_folder("/data/list.csv", "/data/list.csv") == ""  # a list or shard: the whole root
    changes = {(ADDED, "/photos/2024/a.jpg"), (DELETED, "/photos/2024/trip"), (ADDED, "/photos/2025/b.jpg")}
    kinds = {"/photos/2024/a.jpg": False, "/photos/2025/b.jpg": False}
    pending = watch.touched(changes, {ROOT: False, "/other": False}, SKIP, kinds.get)
    assert sorted(pending[ROOT]) == ["2024", "2024", "2025"] and "/other" not in pending
    scope = watch.run_scope(pending, [ROOT, "/other", "s3://bucket/photos"])
    assert scope.folders == {ROOT: ("2024", "2025"), "s3://bucket/photos": ("",)}  # /other is not listed
    assert outermost(["a/b", "a", "c/d", "c/de", "x", "x"]) == ("a", "c/d", "c/de", "x")
    assert outermost(["a", ""]) == ("",)


def test_a_folder_a_full_listing_would_not_reach_is_listed_from_the_nearest_folder_above_it(tmp_path):
    root, outside = (tmp_path / "photos").resolve(), tmp_path / "outside"
    (root / "a" / "b").mkdir(parents=True)
    (root / ".hidden" / "x").mkdir(parents=True)
    (root / "ix" / "thumbs").mkdir(parents=True)
    (outside / "sub").mkdir(parents=True)
    (root / "a" / "was-a-folder").write_bytes(b"")
    (root / "link").symlink_to(outside, target_is_directory=True)
    r, skip = str(root), str(root / "ix")
    assert scan.listable(r, "a/b", False, skip) == "a/b"
    assert scan.listable(r, "a/gone/deeper", False, skip) == "a"  # gone: its parent shows it gone
    assert scan.listable(r, "a/was-a-folder", False, skip) == "a"  # now a file
    assert scan.listable(r, "link", False, skip) == "" and scan.listable(r, "link/sub", False, skip) == ""
    assert scan.listable(r, ".hidden/x", False, skip) == "" and scan.listable(r, ".hidden/x", True, skip) == ".hidden/x"
    assert scan.listable(r, "ix/thumbs", True, skip) == ""  # the index's own folder: never listed


@pytest.mark.slow
def test_a_scoped_run_lists_only_its_folders_and_takes_no_file_elsewhere_for_gone(tmp_path, tiny_model, monkeypatch):
    """index_folders(scope=...) as the watch runs it after a change in folder a: b is not listed (neither
    listed nor read from the catalog), so a file added there is not found and one deleted there is not removed
    until a run lists b; b, which the last run could not list, is tried again (still refused: its rows and
    listing error stay)."""
    from alignsearch.storage import catalog
    from alignsearch.storage.paths import DB_FILE

    root, other, ix = tmp_path / "photos", tmp_path / "other", tmp_path / "ix"
    make_images(root / "x" / "a", 2, seed=41)
    make_images(root / "x" / "b", 2, seed=42)
    make_images(root, 1, seed=43)
    make_images(other, 1, seed=45)
    job = {"index_dir": ix, "model": str(tiny_model), "device": "cpu", "workers": 0}
    r = str(root.resolve())
    listed, refused = [], set()
    scandir = os.scandir

    def listing(path="."):
        listed.append(str(path))
        if str(path) in refused:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", listing)
    assert index_folders([root, other], **job).added == 6
    refused.add(f"{r}/x/b")  # b cannot be listed by the next run: its listing error is remembered
    assert index_folders([], **job).kept == 2
    staged = make_images(tmp_path / "staging", 2, seed=44)
    shutil.copy(staged[0], root / "x" / "a" / "new.png")
    shutil.copy(staged[1], root / "x" / "b" / "new.png")
    (root / "x" / "b" / "img001.jpg").unlink()
    (other / "img000.png").unlink()
    listed.clear()
    done = index_folders([], **job, scope=watch.Scope(folders={r: ("x/a",)}))
    assert (done.added, done.removed, done.unchanged, len(done.listing_errors)) == (1, 0, 2, 1)
    libraries = [p for p in listed if p.startswith((r, str(other.resolve())))]  # not the model's, the index's
    assert libraries == [f"{r}/x/a", f"{r}/x/b"], libraries  # b tried again; neither the root nor the other root
    with catalog.connect(ix / DB_FILE).connect() as conn:
        assert len(catalog.files_under(conn, r, ("x/b",))) == 2  # its deleted file is not taken for gone
    roots = json.loads(alignsearch("roots", "--json", "--index", ix).stdout)
    assert [e["folder"] for e in roots[0]["listing_errors"]] == [f"{r}/x/b"]  # still remembered
    refused.clear()
    done = index_folders([], **job, scope=watch.Scope(folders={r: ("x/b",)}))
    assert (done.added, done.removed, done.unchanged) == (1, 1, 1)
    assert json.loads(alignsearch("roots", "--json", "--index", ix).stdout)[0]["listing_errors"] == []
    shutil.rmtree(root / "x" / "a")  # a folder listed that is gone: listed from above, its files removed
    done = index_folders([], **job, scope=watch.Scope(folders={r: ("x/a",)}))
    assert (done.added, done.removed, done.unchanged) == (0, 3, 2)
    done = index_folders([], **job)  # every root whole: the other root's deleted file goes now
    assert (done.removed, done.unchanged) == (1, 3)
    assert verify_problems(ix) == []


@pytest.mark.slow
def test_a_flood_of_changes_makes_the_next_run_list_every_root(tmp_path):
    """inotify drops what overflows its queue and watchfiles says nothing of it: after full_after changes the
    run lists every root whole (scope None), as the first run does."""
    from alignsearch.storage import catalog, state
    from alignsearch.storage.paths import DB_FILE

    root, ix = tmp_path / "photos", tmp_path / "ix"
    (root / "sub").mkdir(parents=True)
    ix.mkdir()
    db = catalog.connect(ix / DB_FILE)
    with db.begin() as conn:
        state.write(conn, roots=state.RootsState(roots=(str(root.resolve()),)))
    db.dispose()
    scopes = []

    def run(roots, **job):
        scopes.append(job.get("scope", "first"))
        return {}

    def report(summary, facts, error):
        if len(scopes) == 1:
            (root / "sub" / "1.jpg").write_bytes(b"x")
        elif len(scopes) == 2:
            for i in range(6):  # no image among them, yet changes the kernel queued
                (root / "sub" / f"{i}.txt").write_bytes(b"x")
            (root / "sub" / "2.jpg").write_bytes(b"x")
        else:
            raise KeyboardInterrupt

    options = watch.WatchOptions(settle_ms=100, tick_s=0.2, full_after=5)
    assert watch.watch_index([str(root)], {"index_dir": str(ix)}, options, run, report, lambda line: None) == 130
    assert scopes == ["first", watch.Scope(folders={str(root.resolve()): ("sub",)}), None]

    other = tmp_path / "other"
    other.mkdir()
    scopes.clear()

    def another_process_adds_a_root(summary, facts, error):
        if len(scopes) == 1:  # the watcher starts anew on the new root: a change meanwhile may go unseen
            db = catalog.connect(ix / DB_FILE)
            with db.begin() as conn:
                state.write(conn, roots=state.RootsState(roots=(str(root.resolve()), str(other.resolve()))))
            db.dispose()
            (root / "sub" / "3.jpg").write_bytes(b"x")  # lost when the watcher it came to stops: a run anyway
        else:
            raise KeyboardInterrupt

    assert watch.watch_index([], {"index_dir": str(ix)}, options, run, another_process_adds_a_root,
                             lambda line: None) == 130
    assert scopes == ["first", None]


def test_the_rows_under_a_folder_are_one_range_of_the_catalog_index(tmp_path):
    from sqlalchemy import select

    from alignsearch.storage import catalog

    db = catalog.connect(tmp_path / "catalog.db")
    with db.begin() as conn:
        for rel in ("a/1.jpg", "a/b/2.jpg", "a.jpg", "a b/3.jpg", "ab/4.jpg", "c/5.jpg"):
            conn.execute(catalog.files.insert().values(root="/r", relpath=rel, size=1, mtime=1.0, status="indexed",
                                                       indexed_at=1.0))
        assert sorted(catalog.files_under(conn, "/r", ("a",))) == ["a/1.jpg", "a/b/2.jpg"]
        assert sorted(catalog.files_under(conn, "/r", ("a/b", "c"))) == ["a/b/2.jpg", "c/5.jpg"]
        assert len(catalog.files_under(conn, "/r", ("",))) == 6
        query = select(catalog.files).where(catalog.files.c.root == "/r", *catalog.under_folder("a"))
        plan = " ".join(str(row[-1]) for row in conn.exec_driver_sql(
            "EXPLAIN QUERY PLAN " + str(query.compile(compile_kwargs={"literal_binds": True}))))
    db.dispose()
    assert "USING INDEX" in plan and "relpath>? AND relpath<?" in plan, plan


# -- the command ----------------------------------------------------------------------------------------------------

DEADLINE = 120  # seconds any one expected run may take to show up (a loaded 2-core machine)


class Watching:
    """`alignsearch index --watch --json` in a child process; its JSON lines (one per run) and stderr lines, read
    as they come."""

    def __init__(self, ix, *args, launcher=("-m", "alignsearch"), unprivileged: bool = False):
        cmd = [sys.executable, *launcher, "index", *map(str, args), "--index", str(ix), "--device", "cpu",
               "--workers", "0", "--watch", "--json"]
        # unprivileged: without root's power to read whatever the modes say (helpers.alignsearch's)
        preexec = _drop_dac_capabilities if unprivileged and os.geteuid() == 0 else None
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "HF_HUB_OFFLINE": "1"}, preexec_fn=preexec)  # noqa: PLW1509 - prctl alone
        self.runs: list[dict] = []
        self.errors: list[str] = []
        self._readers = [threading.Thread(target=self._read, args=(self.proc.stdout, self.runs, json.loads)),
                         threading.Thread(target=self._read, args=(self.proc.stderr, self.errors, str.rstrip))]
        for t in self._readers:
            t.start()
        # the first run's JSON line comes before that stderr line, but through another pipe and reader: both
        self.until(lambda: self.runs and any("Ctrl-C stops" in e for e in self.errors), "the watch to start")

    @staticmethod
    def _read(stream, into, parse):
        for line in stream:
            into.append(parse(line))

    def until(self, ready, what: str, deadline: float = DEADLINE):
        end = time.monotonic() + deadline
        while not ready():
            assert self.proc.poll() is None, f"the watch ended ({self.proc.returncode}): {self.errors[-20:]}"
            assert time.monotonic() < end, f"no {what} within {deadline} s; runs {self.runs}, stderr {self.errors[-20:]}"
            time.sleep(0.05)

    def next_run(self, **expected) -> dict:
        """The next run whose counts include `expected` (earlier runs that did part of it are skipped)."""
        seen = len(self.runs)

        def found():
            return any(all(r.get(k) == v for k, v in expected.items()) for r in self.runs[seen:])

        self.until(found, f"run with {expected}")
        return next(r for r in self.runs[seen:] if all(r.get(k) == v for k, v in expected.items()))

    def quiet(self, seconds: float = 3.0) -> None:
        """Until no run has come for `seconds`: the late batches of changes already made are run (on a loaded
        machine one save can come as two batches, two runs), so a run after this is one of what comes next."""
        last = [len(self.runs), time.monotonic()]

        def still():
            if len(self.runs) != last[0]:
                last[:] = [len(self.runs), time.monotonic()]
            return time.monotonic() - last[1] >= seconds

        self.until(still, f"{seconds} s without a run")

    def stop(self, sig=signal.SIGINT) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            for t in self._readers:
                t.join(10)
        return code


@pytest.fixture
def watching():
    started = []

    def start(ix, *args, **kwargs):
        started.append(Watching(ix, *args, **kwargs))
        return started[-1]

    yield start
    for w in started:
        w.stop(signal.SIGTERM)


def indexed_paths(ix) -> set[str]:
    proc = alignsearch("query", "anything", "-k", "1000", "--json", "--index", ix)
    assert proc.returncode == 0, proc.stderr
    return {h["path"] for h in json.loads(proc.stdout)["results"]}


@pytest.mark.slow
def test_added_renamed_and_deleted_files_are_found_and_gone(indexed_images, watching):
    root, ix = indexed_images(4)
    w = watching(ix)
    new = make_images(root / "new", 1, seed=7)[0]
    w.next_run(added=1)
    hits = alignsearch("query", "--image", new, "-k", "1", "--json", "--index", ix)
    assert json.loads(hits.stdout)["results"][0]["path"] == str(new)  # `query` finds it: the index is current
    renamed = root / "renamed.png"
    os.rename(new, renamed)
    w.next_run(moved=1)
    paths = indexed_paths(ix)
    assert str(renamed) in paths and str(new) not in paths
    renamed.unlink()
    w.next_run(removed=1)
    assert str(renamed) not in indexed_paths(ix)
    assert all(r["watch"]["roots"] == [str(root.resolve())] for r in w.runs[1:])
    assert w.stop() == 130


@pytest.mark.slow
def test_a_burst_makes_few_runs_and_a_change_during_a_run_makes_the_next(indexed_images, watching, tmp_path):
    root, ix = indexed_images(4)
    w = watching(ix)
    made = make_images(tmp_path / "staging", 60, seed=3)
    for path in made:  # a copy of 60 files, one after the other, as a file manager does
        shutil.copy(path, root / f"burst-{path.name}")
    w.until(lambda: writer_running(ix) or len(w.runs) > 1, "run start")
    late = make_images(tmp_path / "late", 1, seed=9)[0]
    shutil.copy(late, root / "late.png")  # while the run lists or encodes the burst
    w.until(lambda: sum(r.get("added", 0) for r in w.runs[1:]) == 61, "61 files added")
    # the run going when it came saw it, or the next did; a run started after it either way: never lost
    w.until(lambda: any(r["watch"]["changes"] and r["watch"]["run"] > 2 or r["added"] == 61 for r in w.runs[1:]),
            "a run after the late change")
    assert len(w.runs) - 1 <= 3, [r["watch"] for r in w.runs]  # not one run per file
    assert str(root / "late.png") in indexed_paths(ix)
    assert w.stop() == 130


@pytest.mark.slow
def test_a_change_in_one_folder_lists_that_folder_and_folders_renamed_moved_out_and_in_are_found(
        indexed_images, watching, tmp_path):
    """A run after a change lists the folder holding it, not the library: its `unchanged` counts only that
    folder's other files (every file of every root before). A folder renamed, moved out or in shows in its
    parent's listing."""
    root, ix = indexed_images(4)
    make_images(root / "trips" / "a", 2, seed=51)
    make_images(root / "trips" / "b", 3, seed=52)
    w = watching(ix)
    assert w.runs[0]["added"] == 5
    staged = make_images(tmp_path / "staging", 1, seed=53)[0]
    os.rename(staged, root / "trips" / "a" / "new.png")
    assert w.next_run(added=1)["unchanged"] == 2  # trips/a alone: not trips/b's 3, nor the root's 4
    make_images(root / "trips" / "a" / "made" / "deeper", 1, seed=54)  # folders made: trips/a listed
    assert w.next_run(added=1)["unchanged"] == 3
    os.rename(root / "trips" / "b", root / "trips" / "c")  # renamed: trips listed
    run = w.next_run(moved=3)
    assert (run["unchanged"], run["removed"], run["added"]) == (4, 0, 0)  # trips/a's 4
    os.rename(root / "trips" / "c", tmp_path / "c")  # moved out
    assert w.next_run(removed=3)["unchanged"] == 4
    os.rename(tmp_path / "c", root / "c")  # moved in at the top: the root listed
    assert w.next_run(added=3)["unchanged"] == 8
    assert len(indexed_paths(ix)) == 11 and verify_problems(ix) == []
    assert w.stop() == 130


@pytest.mark.slow
def test_other_writers_work_between_runs_and_a_held_lock_is_waited_out(indexed_images, watching, tmp_path):
    from indexer.lock import writer_lock

    root, ix = indexed_images(4)
    w = watching(ix)
    tagged = alignsearch("tag", "--labels-file", write_labels(tmp_path / "labels.txt", ["a dog", "a car"]), "--index", ix,
                         "--device", "cpu")
    assert tagged.returncode == 0, tagged.stderr  # the watch holds no lock while it waits
    with writer_lock(ix):  # another writer is busy when a batch is due
        make_images(root / "more", 1, seed=11)
        w.until(lambda: any("waits" in e for e in w.errors), "the run waiting for the lock")
        assert len(w.runs) == 1
    w.next_run(added=1)
    assert w.proc.poll() is None
    assert w.stop(signal.SIGTERM) == 0


@pytest.mark.slow
def test_a_root_that_goes_keeps_its_files_and_is_watched_again_when_back(indexed_images, watching):
    root, ix = indexed_images(4)
    w = watching(ix)
    away = root.with_name("away")
    os.rename(root, away)  # the drive unmounted, the folder moved away
    w.next_run(removed=0, kept=4)
    listed = json.loads(alignsearch("roots", "--json", "--index", ix).stdout)
    assert [(r["state"], r["indexed"]) for r in listed] == [("missing", 4)]
    os.rename(away, root)
    w.next_run(removed=0, unchanged=4)
    make_images(root / "after", 1, seed=12)  # watched again
    w.next_run(added=1)
    assert len(indexed_paths(ix)) == 5
    assert w.stop() == 130


@pytest.mark.slow
def test_sigint_during_a_run_and_while_idle_ends_cleanly(indexed_images, watching, tmp_path):
    root, ix = indexed_images(4)
    w = watching(ix, "--batch-size", "1")  # a run long enough to be caught
    for path in make_images(tmp_path / "staging", 40, seed=4):
        shutil.copy(path, root / f"burst-{path.name}")
    w.until(lambda: writer_running(ix), "run start")
    assert w.stop(signal.SIGINT) == 130
    assert [e for e in w.errors if "watch stopped" in e] and not [e for e in w.errors if "Traceback" in e]
    assert "abandoned" in w.errors[-1]
    assert verify_problems(ix) == []
    again = watching(ix)  # the next run finishes the work
    again.until(lambda: len(indexed_paths(ix)) == 44, "the abandoned files indexed")
    assert again.stop(signal.SIGINT) == 130
    assert again.errors[-1] == "watch stopped"
    assert verify_problems(ix) == []
    done = alignsearch("verify", "--json", "--index", ix)
    assert done.returncode == 0, done.stdout


# A second SIGINT as the command closes, after its one line: sent by the command to itself when `where` (a
# module:function) has returned or raised, or as the interpreter ends (its last objects are freed once Python has
# put SIGINT back to the system default: the soak's exit -2, killed by the signal with no line at all).
SECOND_SIGINT = r"""
import importlib, os, signal, sys

where, when = sys.argv[1], sys.argv[2]  # module:function, "returned" or "finalizing"
module, _, name = where.partition(":")
owner = importlib.import_module(module)
real, late = getattr(owner, name), []

class Late:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)

def second(*args, **kwargs):
    try:
        return real(*args, **kwargs)
    finally:
        if when == "returned":
            os.kill(os.getpid(), signal.SIGINT)
        else:
            late.append(Late())  # a module global: freed as the interpreter ends

setattr(owner, name, second)
from alignsearch.surfaces.cli import main
main(sys.argv[3:], prog_name="alignsearch")
"""


def _until_line(lines: list[str], text: str, proc) -> None:
    end = time.monotonic() + DEADLINE
    while not any(text in line for line in lines) and proc.poll() is None and time.monotonic() < end:
        time.sleep(0.005)


@pytest.mark.slow
@pytest.mark.parametrize("when", ["returned", "finalizing", "stopped said"])
def test_a_second_sigint_while_the_watch_closes_ends_in_its_one_line_and_130(indexed_images, watching, when):
    _, ix = indexed_images(3)
    if when == "stopped said":  # the second Ctrl-C from here, as soon as the line shows
        w = watching(ix)
        w.proc.send_signal(signal.SIGINT)
        _until_line(w.errors, "watch stopped", w.proc)
    else:
        w = watching(ix, launcher=("-c", SECOND_SIGINT, "indexer.watch:watch_index", when))
    assert w.stop(signal.SIGINT) == 130, w.errors[-20:]
    assert w.errors[-1] == "watch stopped", w.errors[-20:]
    assert not [e for e in w.errors if "Traceback" in e or e.startswith(("error:", "Aborted"))], w.errors[-20:]


# A Ctrl-C that lands in a string exec (a dataclass or namedtuple made as a module imports: any library's, and a run
# imports what it first needs) ends that exec with KeyboardInterrupt. CPython notes it as unhandled even once it
# is caught (pythonrun.c run_eval_code_obj) and, under `python -m`, ends the process by SIGINT (status -2) after
# the command has returned its code (main.c Py_RunMain); a script or -c does not. A module of this test's own, run
# with -m as `python -m alignsearch` is: each index_folders run is interrupted inside a string exec.
IN_A_STRING_EXEC = r"""
import sys

from indexer import job

def interrupted(*args, **kwargs):
    exec("import os, signal, time\nos.kill(os.getpid(), signal.SIGINT)\ntime.sleep(30)")

job.index_folders = interrupted
from alignsearch.surfaces.cli import main
main(sys.argv[1:], prog_name="alignsearch")
"""


@pytest.mark.slow
@pytest.mark.parametrize("watch_too", [True, False])
def test_a_ctrl_c_inside_a_string_exec_under_python_m_still_ends_in_130(indexed_images, tmp_path, monkeypatch,
                                                                       watch_too):
    _, ix = indexed_images(3)
    (tmp_path / "interrupted_launch").mkdir()
    (tmp_path / "interrupted_launch" / "__main__.py").write_text(IN_A_STRING_EXEC)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", "interrupted_launch", "index", "--index", str(ix), "--device", "cpu",
                           *(["--watch"] if watch_too else [])], capture_output=True, text=True, timeout=DEADLINE,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    said = proc.stderr.strip().splitlines()
    assert proc.returncode == 130, said[-20:]
    assert said[-1:] == (["watch stopped: the run in progress was abandoned; the index is as the last finished run "
                          "left it, the next `alignsearch index` finishes the work"] if watch_too else
                         ["error: interrupted"]), said[-20:]


@pytest.mark.slow
@pytest.mark.parametrize("when", ["finalizing", "error said"])
def test_index_stopped_by_two_sigints_says_one_line_and_exits_130(indexed_images, tmp_path, when):
    """`index` without --watch, Ctrl-C during its run and again as it closes: its one line and 130 too."""
    root, ix = indexed_images(3)
    for path in make_images(tmp_path / "staging", 40, seed=4):
        shutil.copy(path, root / f"more-{path.name}")
    launcher = ("-c", SECOND_SIGINT, "indexer.job:index_folders", when) if when == "finalizing" else \
        ("-m", "alignsearch")
    proc = subprocess.Popen([sys.executable, *launcher, "index", "--index", str(ix), "--device", "cpu", "--workers",
                             "0", "--batch-size", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "ALIGNSEARCH_PROGRESS_SECONDS": "0"})
    errors: list[str] = []
    reader = threading.Thread(target=Watching._read, args=(proc.stderr, errors, str.rstrip))
    reader.start()
    try:
        _until_line(errors, "indexing:", proc)  # the first batch committed: the run is under way
        proc.send_signal(signal.SIGINT)
        if when == "error said":
            _until_line(errors, "error: interrupted", proc)
            proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        reader.join(10)
    assert code == 130, errors[-20:]
    assert errors[-1:] == ["error: interrupted"] and not [e for e in errors if "Traceback" in e], errors[-20:]


@pytest.mark.slow
def test_a_running_server_answers_with_the_new_file(indexed_images, watching):
    root, ix = indexed_images(4)
    proc, url = start_serve(ix, "--token", "s3cret")
    try:
        w = watching(ix)
        new = make_images(root / "new", 1, seed=8)[0]
        w.next_run(added=1)
        status, _, body = call(url, "/api/search?q=anything&k=100")
        assert status == 200
        assert str(new) in {h["path"] for h in json.loads(body)["results"]}
    finally:
        stop(proc)


@pytest.mark.slow
def test_polled_bad_files_are_failures_and_errors_of_a_run_are_one_line(indexed_images, watching):
    root, ix = indexed_images(4)
    w = watching(ix, "--watch-polling")  # as on a network drive
    (root / "broken.jpg").write_bytes(b"not an image")  # a damaged file: failed, the watch goes on
    w.next_run(failed=1)
    vectors = ix / "vectors.f16"
    os.truncate(vectors, vectors.stat().st_size // 2)  # the index damaged: every run would fail
    make_images(root / "more", 1, seed=13)
    assert w.proc.wait(timeout=DEADLINE) == 7
    w.stop()
    assert len(w.errors) == 2 and w.errors[-1].startswith("error: ") and "verify --repair" in w.errors[-1], w.errors


@pytest.mark.slow
def test_a_list_root_is_watched_as_a_file_even_when_an_editor_replaces_it(tmp_path, tiny_model, watching):
    images = make_images(tmp_path / "images", 3, seed=14)
    listing, ix = tmp_path / "photos.csv", tmp_path / "ix"
    listing.write_text("path\n" + "".join(f"{p}\n" for p in images[:2]))
    w = watching(ix, listing, "--model", tiny_model)
    assert w.runs[0]["added"] == 2
    with open(listing, "a") as f:  # appended in place
        f.write(f"{images[2]}\n")
    w.next_run(added=1)
    replacement = tmp_path / "photos.csv.new"
    replacement.write_text("path\n" + "".join(f"{p}\n" for p in images[1:]))
    os.replace(replacement, listing)  # saved as editors save: a new file renamed over the old
    w.next_run(removed=1)
    images[0].unlink()
    with open(listing, "a") as f:  # the replaced file is watched too
        f.write(f"{images[0]}\n")
    w.next_run(failed=1)
    assert w.stop() == 130


@pytest.mark.slow
def test_url_roots_are_not_watched_but_listed_again_every_interval(tmp_path, tiny_model, watching):
    folder, ix = tmp_path / "remote", tmp_path / "ix"
    make_images(folder, 2, seed=15)
    w = watching(ix, f"file://{folder}", "--model", tiny_model, "--watch-interval", "1")
    assert any("is not watched (a URL): listed again every 1 s" in e for e in w.errors), w.errors
    assert w.runs[0]["added"] == 2
    make_images(folder / "new", 1, seed=16)
    w.next_run(added=1)  # no change notification: the interval's listing found it
    assert w.stop() == 130


@pytest.mark.slow
def test_watch_options_are_documented(tmp_path):
    helped = alignsearch("index", "--help")
    assert all(option in helped.stdout for option in ("--watch", "--watch-polling", "--watch-interval", "JSON lines"))
    bad = alignsearch("index", tmp_path, "--watch-polling", "--index", tmp_path / "ix")
    assert bad.returncode == 2 and "--watch-polling goes with --watch" in bad.stderr
    assert not Path(tmp_path / "ix").exists()


def _hwm_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


@pytest.mark.slow
def test_a_file_copied_slowly_ends_indexed_with_its_final_content(indexed_images, watching, tmp_path):
    """A big photo written in chunks with pauses longer than the settle time (a slow drive, a network copy):
    runs in between may see it cut short; once the copy is done it is indexed whole, not left failed."""
    from PIL import Image

    root, ix = indexed_images(4)
    big = tmp_path / "big.png"
    rng = __import__("numpy").random.default_rng(5)
    Image.fromarray((rng.random((900, 1200, 3)) * 255).astype("uint8")).save(big)
    data = big.read_bytes()
    w = watching(ix)
    target = root / "big.png"
    chunks = 4
    with open(target, "wb") as f:
        for i in range(chunks):
            f.write(data[i * len(data) // chunks:(i + 1) * len(data) // chunks])
            f.flush()
            if i < chunks - 1:
                time.sleep(1.3)  # longer than the 1 s settle: a run may start mid-copy

    def settled():
        if writer_running(ix) or str(target) not in indexed_paths(ix):
            return False
        info = json.loads(alignsearch("info", "--failed", "--json", "--index", ix).stdout)
        with sqlite3.connect(f"file:{ix / 'catalog.db'}?mode=ro", uri=True) as db:
            size = db.execute("SELECT size FROM files WHERE relpath = 'big.png'").fetchone()[0]
        return info["failed_files"] == [] and info["images"] == 5 and size == len(data)  # its final content

    w.until(settled, "the copied file indexed whole")
    hits = alignsearch("query", "--image", big, "-k", "1", "--json", "--index", ix)
    assert json.loads(hits.stdout)["results"][0]["path"] == str(target)
    assert w.stop() == 130


@pytest.mark.slow
def test_a_dotted_folder_moved_out_of_a_root_is_removed(indexed_images, watching, tmp_path):
    root, ix = indexed_images(4)
    w = watching(ix)
    trip = root / "2024.trip"
    make_images(trip, 2, seed=31)
    w.next_run(added=2)
    os.rename(trip, tmp_path / "2024.trip")  # moved away: inotify reports the folder alone, gone
    w.next_run(removed=2)
    assert not any("2024.trip" in p for p in indexed_paths(ix))
    assert w.stop() == 130


@pytest.mark.slow
def test_changes_through_a_link_to_a_folder_outside_the_root_start_no_run(indexed_images, watching, tmp_path):
    """The watcher follows a link to a folder (watchfiles does), a run never does (scan.scan_folder): a change
    out there is no change of the root. A change in the root made at the same moment is the only one counted."""
    root, ix = indexed_images(4)
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "elsewhere").symlink_to(outside, target_is_directory=True)
    w = watching(ix)
    staged = make_images(tmp_path / "staging", 1, seed=33)[0]
    make_images(outside, 3, seed=32)
    os.rename(staged, root / f"new-{staged.name}")  # one change in the root
    run = w.next_run(added=1)
    assert run["watch"]["changes"] == 1, run["watch"]
    assert not any(str(outside) in p or "/elsewhere/" in p for p in indexed_paths(ix))
    assert w.stop() == 130


@pytest.mark.slow
def test_a_folder_replaced_by_a_link_to_a_folder_loses_its_files_and_the_link_is_not_followed(
        indexed_images, watching, tmp_path):
    root, ix = indexed_images(4)
    make_images(root / "trip", 2, seed=36)
    outside = tmp_path / "outside"
    make_images(outside, 3, seed=37)
    w = watching(ix)
    shutil.rmtree(root / "trip")
    (root / "trip").symlink_to(outside, target_is_directory=True)  # its files' deletions come through the link
    run = w.next_run(removed=2)
    assert (run["added"], run["unchanged"]) == (0, 4)
    assert not any("/trip/" in p or str(outside) in p for p in indexed_paths(ix))
    assert w.stop() == 130


@pytest.mark.slow
def test_an_event_storm_makes_few_runs_and_bounded_memory(indexed_images, watching):
    root, ix = indexed_images(4)
    w = watching(ix)
    before = _hwm_kb(w.proc.pid)
    photos = sorted(p for p in root.iterdir() if p.is_file())
    for i in range(10_000):  # 10,000 touches: of the photos, and of files that are no photos
        if i % 2:
            os.utime(photos[i // 2 % len(photos)], (1_600_000_000 + i, 1_600_000_000 + i))
        else:
            (root / f"note-{i}.txt").touch()
    w.next_run(updated=4)
    w.until(lambda: not writer_running(ix), "the last run to end")
    assert len(w.runs) - 1 <= 3, [r["watch"] for r in w.runs]
    grown = _hwm_kb(w.proc.pid) - before
    assert grown < 150_000, f"the watch's peak memory grew by {grown} kB"
    assert w.stop() == 130


@pytest.mark.slow
def test_the_index_deleted_while_watched_ends_the_watch_in_one_line(indexed_images, watching):
    root, ix = indexed_images(4)
    w = watching(ix)
    shutil.rmtree(ix)
    make_images(root / "after", 1, seed=34)
    assert w.proc.wait(timeout=DEADLINE) == 3
    w.stop()
    said = [e for e in w.errors if e.startswith("error")]
    assert len(said) == 1 and "is gone" in said[0], w.errors
    assert not ix.exists()  # no new, empty index made in its place


@pytest.mark.slow
def test_a_second_watch_of_one_index_is_refused_and_the_first_goes_on(indexed_images, watching):
    root, ix = indexed_images(4)
    w = watching(ix)
    second = alignsearch("index", "--index", ix, "--device", "cpu", "--workers", "0", "--watch", timeout=DEADLINE)
    assert second.returncode == 6, second.stderr
    assert second.stderr.strip().splitlines()[-1].startswith("error: another `alignsearch index --watch`")
    make_images(root / "more", 1, seed=35)
    w.next_run(added=1)
    assert verify_problems(ix) == []
    assert w.stop() == 130


@pytest.mark.slow
def test_a_change_at_a_name_that_is_not_utf8_makes_a_whole_run_and_notifications_go_on(indexed_images, watching,
                                                                                         tmp_path):
    """watchfiles raises for a batch holding a path that is not UTF-8 (polling too): the watch took it for failed
    notifications and polled every root from then on. It is a change it cannot name: a run lists every root, and
    the watch goes on with notifications."""
    root, ix = indexed_images(4)
    w = watching(ix)
    staged = make_images(tmp_path / "staging", 3, seed=34)
    latin1 = os.fsencode(str(root)) + b"/caf\xe9"
    os.mkdir(latin1)
    for p in staged[:2]:
        shutil.copy(p, os.fsdecode(latin1 + b"/" + os.fsencode(p.name)))
    w.next_run(added=2)
    shutil.copy(staged[2], root / "new.jpg")
    w.next_run(added=1)
    assert not any("polling" in e for e in w.errors), w.errors
    assert w.stop() == 130


@pytest.mark.slow
def test_a_link_to_a_file_follows_its_target_changed_in_another_folder(indexed_images, watching, tmp_path):
    """The watch keeps the folders holding links to files across its runs: a change of a link's target, seen in
    the target's folder only, updates the link's row in the same run (test_attacks_watch.py has the cases)."""
    root, ix = indexed_images(4)
    target = make_images(root / "b", 1, seed=35)[0]
    (root / "a").mkdir()
    (root / "a" / "fav.jpg").symlink_to(os.path.join("..", "b", target.name))
    w = watching(ix)
    assert w.runs[0]["added"] == 2
    shutil.copy(make_images(tmp_path / "staging", 1, seed=36)[0], target)
    assert w.next_run(updated=2)["unchanged"] == 0  # b's photo and a's link; a and b listed, not the root
    assert w.stop() == 130


@pytest.mark.slow
def test_a_folder_that_could_not_be_read_is_indexed_and_watched_once_readable(indexed_images, watching, tmp_path):
    """A folder the watch cannot read keeps a listing error, and inotify cannot watch it. Made readable (chmod), it
    shows only as a change of the folder's own attributes, which started no run, so its photos waited for another
    change; and once listed it was still unwatched, so photos added to it later were never seen. A full `index`
    finds both. The change of a folder an earlier run could not list starts a run, and a folder listed again is
    watched anew."""
    if not can_drop_dac():
        pytest.skip("cannot start a process without root's permission bypass here")
    root, ix = indexed_images(4)
    make_images(root / "locked", 1, seed=37)
    readable_while_watched(watching, ix, root / "locked", tmp_path)


def readable_while_watched(watching, ix, locked, tmp_path):
    """`locked` (holding one photo not indexed yet) made unreadable, the watch started as a user without root's
    read bypass, then `locked` made readable: its photo is indexed, and a photo added to it later too."""
    locked.chmod(0)
    try:
        w = watching(ix, unprivileged=True)
        assert (w.runs[0]["added"], len(w.runs[0]["listing_errors"])) == (0, 1), w.runs[0]
        locked.chmod(0o755)
        assert w.next_run(added=1)["listing_errors"] == []
        shutil.copy(make_images(tmp_path / "staging", 1, seed=38)[0], locked / "new.jpg")
        w.next_run(added=1)
        assert str(locked / "new.jpg") in indexed_paths(ix)
        assert w.stop() == 130
    finally:
        locked.chmod(0o755)


@pytest.mark.slow
def test_a_root_that_could_not_be_read_when_the_watch_started_is_watched_once_readable(indexed_images, watching,
                                                                                       tmp_path):
    """A root the watch could not read when it started: inotify cannot watch it, and made readable (chmod) it was
    never watched, so its new photos waited for a full `index`. A root's readability is part of what the watch
    looks at every tick: a change starts the watcher anew and a run listing every root."""
    if not can_drop_dac():
        pytest.skip("cannot start a process without root's permission bypass here")
    root, ix = indexed_images(4)
    shutil.copy(make_images(tmp_path / "first", 1, seed=41)[0], root / "meanwhile.png")  # in the root's top folder
    readable_while_watched(watching, ix, root, tmp_path)


@pytest.mark.slow
def test_what_links_lead_to_outside_the_roots_is_watched(indexed_images, watching, tmp_path):
    """A photo and a caption that are links to files outside every root (elsewhere/): a full listing notices an
    edit there (the link's row holds its target's size and time; the caption is read again), but no watch of a
    root sees it, so the index kept the old photo and caption until some change in a root started a run. The
    folders of such targets are watched (alone, not below them), and a change of a target starts a run."""
    root, ix = indexed_images(4)
    elsewhere = tmp_path / "elsewhere"
    first, second = make_images(tmp_path / "staging", 2, seed=43)
    elsewhere.mkdir()
    shutil.copy(first, elsewhere / "shared.png")
    (elsewhere / "note.txt").write_text("a red bicycle")
    (root / "fav.png").symlink_to(elsewhere / "shared.png")
    (root / "fav.txt").symlink_to(elsewhere / "note.txt")
    w = watching(ix)
    assert w.runs[0]["added"] == 1, w.runs[0]
    shutil.copy(second, elsewhere / "shared.new")
    os.replace(elsewhere / "shared.new", elsewhere / "shared.png")  # as an editor saves it
    w.next_run(updated=1)
    hits = alignsearch("query", "--image", second, "-k", "1", "--json", "--index", ix)
    assert json.loads(hits.stdout)["results"][0]["path"] == str(root / "fav.png")
    # saved whole, as an editor saves (the photo above too): written in place, its truncation and its write came as
    # two batches of changes on a loaded machine (CI), two runs, and the second one came after `runs` below
    (elsewhere / "note.new").write_text("a blue whale")
    os.replace(elsewhere / "note.new", elsewhere / "note.txt")
    w.until(lambda: any(r["times"]["extra"]["captions_read_again"] == 1 for r in w.runs[2:]), "the caption read again")
    w.quiet()  # CI: a late batch of that save made one more run, counted as the one below (2 failed, stop 44)
    runs = len(w.runs)
    (elsewhere / "unrelated.png").write_bytes(first.read_bytes())  # beside a target, not one: no run
    time.sleep(3)
    assert len(w.runs) == runs, [r["watch"] for r in w.runs[runs:]]
    assert w.stop() == 130
    assert all(r["watch"]["roots"] == [str(root.resolve())] for r in w.runs[1:])


@pytest.mark.slow
def test_a_caption_link_s_target_edited_in_a_root_is_read_again(indexed_images, watching):
    """A photo's sidecar caption that is a link to a text elsewhere in the root (captions/beach.txt): a full listing
    reads it again each run, but an edit of the text is a change of a .txt, which the watch does not read, so no run
    started and the photo kept its old caption. A text that a known caption link leads to starts a run."""
    root, ix = indexed_images(4)
    photo = sorted(p for p in root.iterdir() if p.is_file())[0]
    (root / "captions").mkdir()
    (root / "captions" / "beach.txt").write_text("a red bicycle")
    (root / f"{photo.stem}.txt").symlink_to(os.path.join("captions", "beach.txt"))
    w = watching(ix)
    assert w.runs[0]["times"]["extra"]["captions_read_again"] == 1
    (root / "captions" / "beach.txt").write_text("a blue whale")
    w.until(lambda: any(r["times"]["extra"]["captions_read_again"] == 1 for r in w.runs[1:]), "the caption read again")
    assert w.stop() == 130


@pytest.mark.slow
def test_a_folder_still_watched_after_a_link_to_it_from_another_root_is_removed(indexed_images, watching, tmp_path):
    """inotify watches a folder once whatever the paths to it; watchfiles names it by the path it came to it by last,
    here a link in a root watched after the folder's own, and removing that link removed the folder's one watch:
    photos added to the folder from then on were never seen (a full `index` finds them). A known link to a folder
    gone or replaced starts the watcher anew, and a run lists every root."""
    root, ix = indexed_images(4)
    make_images(root / "summer", 1, seed=39)
    other = tmp_path / "other"
    make_images(other, 1, seed=40)
    (other / "fav").symlink_to(root / "summer", target_is_directory=True)
    assert index_json(ix, other, "--device", "cpu")["added"] == 2
    w = watching(ix)
    (other / "fav").unlink()
    w.next_run()
    shutil.copy(make_images(tmp_path / "staging", 1, seed=41)[0], root / "summer" / "new.jpg")
    w.next_run(added=1)
    assert str(root / "summer" / "new.jpg") in indexed_paths(ix)
    assert w.stop() == 130


def test_drives_mounted_inside_the_roots_are_told_by_their_mount_ids(tmp_path):
    info = tmp_path / "mountinfo"
    info.write_text("22 1 8:1 / / rw - ext4 /dev/sda1 rw\n"
                    "30 22 0:40 / /photos rw - ext4 /dev/sdb1 rw\n"  # the root's own drive: its identity tells
                    "40 30 0:50 / /photos/nas rw - nfs4 nas:/photos rw\n"
                    "41 40 0:51 / /photos/nas/usb rw - vfat /dev/sdc1 rw\n"  # a mount inside a mount
                    "42 30 0:52 / /photos/.snapshots rw - btrfs /dev/sdb1 rw\n"
                    "43 30 0:53 / /photos/.alignsearch/x rw - tmpfs tmpfs rw\n"
                    "44 22 0:54 / /photosx/y rw - tmpfs tmpfs rw\n")
    table = watch.mounted(str(info))
    assert ("40", "/photos/nas") in table and watch.mounts(str(info))[2] == ("/photos/nas", "nfs4")
    assert watch.inner_mounts(table, {ROOT: False}, SKIP) == {("40", "/photos/nas"), ("41", "/photos/nas/usb")}
    assert ("42", "/photos/.snapshots") in watch.inner_mounts(table, {ROOT: True}, SKIP)  # hidden files included
    assert watch.inner_mounts(table, {"/photos/nas/usb": False}, SKIP) == frozenset()
    remounted = [(str(int(i) + 100) if p == "/photos/nas/usb" else i, p) for i, p in table]  # unplugged, back
    assert watch.inner_mounts(remounted, {ROOT: False}, SKIP) != watch.inner_mounts(table, {ROOT: False}, SKIP)
    assert watch.mounted(str(tmp_path / "absent")) == []


@pytest.mark.slow
def test_a_drive_unplugged_and_plugged_in_again_inside_a_root_keeps_its_files_and_is_watched(indexed_images,
                                                                                            watching, tmp_path):
    """A drive mounted at photos/nas: unmounted while watched, no run came (inotify reports no unmount); plugged
    back in, neither, and photos added to it later were never indexed (nothing watched it). Now each is a run
    listing every root: the unplugged drive's files kept (indexer/roots.py MOUNTS), the drive's photos found
    unchanged when back, and a photo added to it then indexed. A real tmpfs (skipped where the test may not mount);
    plugged back by a bind mount of a filled one, as a drive comes with its photos at once."""
    from helpers import bind_mount, mount_tmpfs, unmount

    root, ix = indexed_images(4)
    drive, nas = tmp_path / "drive", root / "nas"
    if not mount_tmpfs(drive):
        pytest.skip("cannot mount a tmpfs here")
    try:
        for photo in make_images(tmp_path / "saved", 3, seed=3):
            shutil.copy2(photo, drive / photo.name)
        nas.mkdir()
        bind_mount(drive, nas)
        w = watching(ix)
        assert w.runs[0]["added"] == 3
        unmount(nas)
        run = w.next_run(kept=3)
        assert run["removed"] == 0 and [e["folder"] for e in run["listing_errors"]] == [str(nas)]
        assert len(indexed_paths(ix)) == 7
        bind_mount(drive, nas)
        run = w.next_run(unchanged=7)
        assert (run["removed"], run["listing_errors"]) == (0, [])
        make_images(nas / "later", 1, seed=9)
        w.next_run(added=1)
        assert len(indexed_paths(ix)) == 8
        assert w.stop() == 130
    finally:
        unmount(nas)
        unmount(drive)


def test_mount_points_with_names_not_ascii_are_read_as_the_file_system_names_them(tmp_path):
    """/proc/self/mountinfo holds a mount point's bytes, escaping only space, tab, newline and backslash: read as
    text and unescaped, /home/jürgen/Pictures/nas was /home/jÃ¼rgen/Pictures/nas, under no root, so neither its
    file system (polled if a network one) nor a drive mounted there was seen."""
    info = tmp_path / "mountinfo"
    info.write_bytes(b"22 1 8:1 / / rw - ext4 /dev/sda1 rw\n"
                     b"40 22 0:50 / /home/j\xc3\xbcrgen/Pictures/nas rw - nfs4 nas:/photos rw\n"
                     b"41 22 0:51 / /home/j\xc3\xbcrgen/Pictures/my\\040usb rw - vfat /dev/sdb1 rw\n"
                     b"42 22 0:52 / /data/\xff rw - ext4 /dev/sdc1 rw\n")
    assert watch.fs_type("/home/jürgen/Pictures/nas/2024", watch.mounts(str(info))) == "nfs4"
    assert watch.inner_mounts(watch.mounted(str(info)), {"/home/jürgen/Pictures": False}, SKIP) == {
        ("40", "/home/jürgen/Pictures/nas"), ("41", "/home/jürgen/Pictures/my usb")}
    assert ("42", os.fsdecode(b"/data/\xff")) in watch.mounted(str(info))  # not UTF-8: as os.listdir names it


@pytest.mark.slow
def test_a_drive_unplugged_and_plugged_in_again_between_two_looks_is_watched_anew(indexed_images, watching, tmp_path):
    """The drive at photos/nas unmounted and mounted again at once (a loose cable, a share remounted by its
    automounter) between two of the watch's looks at the mount table: the mount came back with the mount id it had
    (ids are reused, lowest first), so the watch saw no change, the watches inotify had on the drive went with the
    unmount, and photos added to the drive then were never indexed (seen with a real tmpfs; the drive's files stayed
    indexed). A change of the mount table (/proc/self/mountinfo polled) with drives inside the roots is a change of
    them. A real tmpfs unmounted, then a new one filled as the drive was (skipped where the test may not mount)."""
    from helpers import mount_tmpfs, unmount

    root, ix = indexed_images(4)
    nas = root / "nas"
    if not mount_tmpfs(nas):
        pytest.skip("cannot mount a tmpfs here")
    try:
        saved = make_images(tmp_path / "saved", 3, seed=3)
        for photo in saved:
            shutil.copy2(photo, nas / photo.name)
        w = watching(ix)
        assert w.runs[0]["added"] == 3
        before = watch.inner_mounts(watch.mounted(), {str(root): False}, str(ix))
        unmount(nas)
        assert mount_tmpfs(nas)
        for photo in saved:
            shutil.copy2(photo, nas / photo.name)
        if watch.inner_mounts(watch.mounted(), {str(root): False}, str(ix)) != before:
            pytest.skip("the mount came back with another mount id here")
        time.sleep(2)  # a look or two of the watch
        later = make_images(nas / "later", 1, seed=9)[0]  # on the drive plugged in again: seen, indexed
        assert w.next_run(added=1)["removed"] == 0 and str(later) in indexed_paths(ix)
    finally:
        unmount(nas)


@pytest.mark.slow
def test_mounts_coming_and_going_outside_the_roots_make_no_run(indexed_images, watching, tmp_path):
    """Any change of the mount table, with a drive mounted inside a root, restarted the watcher (a walk of every
    root's folders) and made a run listing every root: on a host whose mounts change all the time elsewhere (a
    container host mounts each container's layers) that is every look, every second. Only a drive inside a root
    that went (unmounted, even if mounted again since with the id it had) counts. A real tmpfs mounted and
    unmounted again and again outside the roots (skipped where the test may not mount)."""
    from helpers import mount_tmpfs, unmount

    root, ix = indexed_images(2)
    nas, elsewhere = root / "nas", tmp_path / "elsewhere"
    if not mount_tmpfs(nas):
        pytest.skip("cannot mount a tmpfs here")
    try:
        w = watching(ix)
        time.sleep(2)  # the first look's
        before = len(w.runs)
        for _ in range(12):
            assert mount_tmpfs(elsewhere)
            time.sleep(0.25)
            unmount(elsewhere)
            time.sleep(0.25)
        time.sleep(2)
        assert w.runs[before:] == [], w.errors[-5:]
        later = make_images(nas / "later", 1, seed=9)[0]  # the drive's watches are alive: its change is a run
        assert w.next_run(added=1)["removed"] == 0 and str(later) in indexed_paths(ix)
    finally:
        unmount(elsewhere)
        unmount(nas)


def test_a_drive_unmounted_and_mounted_again_is_told_gone_and_an_unwatchable_one_unknown(tmp_path):
    """DrivesGone, under the two tests above: a real tmpfs unmounted and mounted again at once is gone (once: the
    next look starts anew), and a drive whose top folder cannot be watched is not known (any change of the mount
    table then counts). Skipped where the test may not mount."""
    from helpers import mount_tmpfs, unmount

    assert watch.DrivesGone([str(tmp_path / "no such folder")]).gone() is None
    nas = tmp_path / "nas"
    if not mount_tmpfs(nas):
        pytest.skip("cannot mount a tmpfs here")
    drives = watch.DrivesGone([str(nas)])
    try:
        assert drives.gone() is False
        unmount(nas)
        assert mount_tmpfs(nas)
        assert drives.gone() is True and drives.gone() is False
    finally:
        drives.close()
        unmount(nas)
