"""Attacks on `index --watch`'s scoped runs (indexer/watch.py, indexer/roots.py Scope): after changes settle and a
run lists only the folders the watcher saw them in, the catalog must be what a full `alignsearch index` makes, so a
full run right after finds nothing to do. Each scenario runs the watch's own decisions (watch.touched, run_scope)
on the changes made, then the scoped run as the watch makes it, then a full run."""

import dataclasses
import os
import shutil
import sqlite3
import time
from pathlib import Path

import pytest

from alignsearch.storage.paths import DB_FILE
from conftest import make_images
from helpers import refuse_listing
from indexer import watch
from indexer.job import index_folders
from indexer.roots import LinkFolders
from indexer.watch import DELETED, MODIFIED


def scoped_run(job: dict, roots: list[str], changes: list[tuple[int, str]]):
    """The run the watch makes after `changes` (paths under `roots`): its scope from the watch's decisions."""
    look = watch._CatalogLook(Path(job["index_dir"]).resolve())
    try:
        pending = watch.touched(changes, {r: False for r in roots}, str(Path(job["index_dir"]).resolve()),
                                watch.path_kind, look.known_folder, watch.through_link, sidecar=look.sidecar)
    finally:
        look.close()
    return index_folders([], **job, scope=watch.run_scope(pending, roots))


def nothing_left(job: dict) -> None:
    """A full run after the scoped one finds the catalog as it would make it."""
    done = index_folders([], **job)
    assert (done.added, done.updated, done.moved, done.removed, done.failed) == (0, 0, 0, 0, 0), done


def library(tmp_path, tiny_model, folders: dict[str, tuple[int, int]]) -> tuple:
    """A root with {folder: (images, seed)}, indexed: (root, its name as the index knows it, the job)."""
    root = tmp_path / "photos"
    for folder, (n, seed) in folders.items():
        make_images(root / folder, n, seed=seed)
    job = {"index_dir": tmp_path / "ix", "model": str(tiny_model), "device": "cpu", "workers": 0}
    assert index_folders([root], **job).added == sum(n for n, _ in folders.values())
    return root, str(root.resolve()), job


def test_a_link_to_a_file_in_another_folder_follows_its_target_changed_or_deleted(tmp_path, tiny_model):
    """A link in folder a to a photo in folder b (or in another root) is indexed with its target's content: a
    change of the target is seen in b only, so a run listing b alone left the link's row stale (its old vector, or
    a broken link still indexed). Folders holding links to files are listed by every scoped run."""
    root, other, ix = tmp_path / "photos", tmp_path / "other", tmp_path / "ix"
    targets = make_images(root / "b", 3, seed=61)
    outside = make_images(other, 1, seed=62)
    (root / "a").mkdir()
    (root / "a" / "fav.jpg").symlink_to(os.path.join("..", "b", targets[1].name))
    (root / "a" / "far.png").symlink_to(outside[0])
    make_images(root / "c", 1, seed=63)
    job = {"index_dir": ix, "model": str(tiny_model), "device": "cpu", "workers": 0, "links": LinkFolders()}
    assert index_folders([root, other], **job).added == 7
    roots = [str(root.resolve()), str(other.resolve())]

    fresh = make_images(tmp_path / "staging", 2, seed=64)
    shutil.copy(fresh[0], targets[1])  # the target rewritten in place: a change of b only
    done = scoped_run(job, roots, [(MODIFIED, str(targets[1]))])
    assert done.updated == 2, done  # the photo and the link to it
    nothing_left(job)

    shutil.copy(fresh[1], outside[0])  # a change in the other root
    scoped_run(job, roots, [(MODIFIED, str(outside[0]))])
    nothing_left(job)

    targets[1].unlink()  # the link is broken now: a full run fails it
    done = scoped_run(job, roots, [(DELETED, str(targets[1]))])
    assert (done.removed, done.failed) == (1, 1), done
    nothing_left(job)


def test_a_list_root_naming_files_of_a_folder_root_follows_their_changes(tmp_path, tiny_model):
    """A list file's entries are other files, here the photos of a folder root: a change of one is seen in its
    folder, never in the list, so a run listing that folder alone left the list's row of it stale. A local list
    is listed by every run after changes, as a URL root is."""
    root, ix = tmp_path / "photos", tmp_path / "ix"
    photos = make_images(root / "a", 2, seed=65)
    listing = tmp_path / "picked.csv"
    listing.write_text("path\n" + "".join(f"{p}\n" for p in photos))
    job = {"index_dir": ix, "model": str(tiny_model), "device": "cpu", "workers": 0}
    assert index_folders([root, listing], **job).added == 4
    roots = [str(root.resolve()), str(listing.resolve())]
    shutil.copy(make_images(tmp_path / "staging", 1, seed=66)[0], photos[0])
    done = scoped_run(job, roots, [(MODIFIED, str(photos[0]))])
    assert done.updated == 2, done  # the photo as the folder's and as the list's
    nothing_left(job)
    photos[1].unlink()
    done = scoped_run(job, roots, [(DELETED, str(photos[1]))])
    assert (done.removed, done.failed) == (1, 1), done  # gone from the folder, "file not found" in the list
    nothing_left(job)


@pytest.mark.slow
def test_a_dotted_folder_moved_away_while_the_catalog_cannot_be_read_is_still_listed(tmp_path, tiny_model):
    """A folder with a dot in its name moved out of a root is told from a file only by the catalog (does it hold
    files under it?). Asked while another program holds the catalog locked, the watch took it for nothing: no run
    listed its parent, so its files stayed indexed. Now a folder the catalog cannot answer for is listed."""
    root, r, job = library(tmp_path, tiny_model, {"2024.trip": (2, 67), "b": (1, 68)})
    ix = job["index_dir"]
    shutil.move(str(root / "2024.trip"), str(tmp_path / "2024.trip"))
    holder = sqlite3.connect(ix / DB_FILE)  # a sqlite3 shell in EXCLUSIVE locking mode, say
    holder.execute("PRAGMA locking_mode=EXCLUSIVE")
    holder.execute("BEGIN EXCLUSIVE")
    look = watch._CatalogLook(ix)
    gone = [(DELETED, f"{r}/2024.trip"), *((DELETED, f"{r}/b/notes{i}.txt") for i in range(5))]
    start = time.monotonic()
    try:
        pending = watch.touched(gone, {r: False}, str(ix.resolve()), watch.path_kind, look.known_folder,
                                watch.through_link)
        assert time.monotonic() - start < 6  # the catalog's lock waited out once a batch, not once a path
    finally:
        look.close()
        holder.rollback()
        holder.close()
    assert pending == {r: ["", *["b"] * 5]}
    done = index_folders([], **job, scope=watch.run_scope(pending, [r]))
    assert done.removed == 2, done
    nothing_left(job)


def test_the_error_watchfiles_raises_for_a_name_that_is_not_utf8_is_told_from_failed_notifications(tmp_path):
    """What watchfiles raises when a change's path is not UTF-8 (its whole batch lost) is a change the watch cannot
    name, met with a run listing every root; notifications failing (inotify's watch limit) are not."""
    import threading

    import watchfiles

    folder = os.fsencode(str(tmp_path)) + b"/caf\xe9"
    stop = threading.Event()
    raised = []

    def change_soon():
        time.sleep(0.5)
        os.mkdir(folder)
        time.sleep(2)
        stop.set()

    threading.Thread(target=change_soon, daemon=True).start()
    try:
        for _ in watchfiles.watch(tmp_path, stop_event=stop, debounce=200, rust_timeout=100, raise_interrupt=False):
            pass
    except Exception as exc:  # noqa: BLE001 - the error as watchfiles raises it
        raised.append(exc)
    assert len(raised) == 1 and watch.unnamed_change(raised[0]), raised
    assert not watch.unnamed_change(OSError(28, "No space left on device"))
    assert not watch.unnamed_change(RuntimeError("OS file watch limit reached"))


def test_a_folder_named_like_a_temporary_file_moved_in_and_out_is_listed(tmp_path, tiny_model):
    """A full listing walks every folder whatever its name, so `#2024` or `scans.tmp` moved into a root has its
    photos indexed; the watch ignored the change as an editor's or a browser's temporary file, so no run listed
    it (nor removed its files once moved out). A folder is never a temporary file; a gone one the catalog holds
    files under is a folder."""
    away = tmp_path / "away"
    make_images(away / "#2024", 2, seed=70)
    make_images(away / "scans.tmp", 1, seed=71)
    root, r, job = library(tmp_path, tiny_model, {"b": (1, 69)})
    ix = job["index_dir"]

    def moved(names, there, back):
        for name in names:
            shutil.move(str(there / name), str(back / name))
        look = watch._CatalogLook(ix)
        try:
            pending = watch.touched([(DELETED if back == away else watch.ADDED, f"{r}/{name}") for name in names],
                                    {r: False}, str(ix.resolve()), watch.path_kind, look.known_folder,
                                    watch.through_link)
        finally:
            look.close()
        return index_folders([], **job, scope=watch.run_scope(pending, [r]))

    assert moved(["#2024", "scans.tmp"], away, root).added == 3
    nothing_left(job)
    assert moved(["#2024", "scans.tmp"], root, away).removed == 3
    nothing_left(job)


def test_a_folder_a_scoped_run_could_not_list_is_listed_again_by_the_next(tmp_path, tiny_model, monkeypatch):
    """A change seen in folder a whose listing then failed (a flaky disk, too many open files) keeps a's rows and
    a listing error, as a full run does; but a full run lists a again each time, while scoped runs listed only
    where new changes were seen, so a's change waited for another change in a. Every scoped run lists again the
    folders the last runs could not list."""
    root, r, job = library(tmp_path, tiny_model, {"a": (1, 72), "b": (1, 73)})
    staged = make_images(tmp_path / "staging", 2, seed=74)
    refused = {f"{r}/a"}
    scandir = os.scandir

    def listing(path="."):
        if str(path) in refused:
            raise OSError(5, "Input/output error", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", listing)
    shutil.copy(staged[0], root / "a" / "new.jpg")
    done = scoped_run(job, [r], [(watch.ADDED, f"{r}/a/new.jpg")])
    assert (done.added, done.kept, len(done.listing_errors)) == (0, 1, 1), done
    refused.clear()  # a can be listed again; the next change is elsewhere
    shutil.copy(staged[1], root / "b" / "new.jpg")
    done = scoped_run(job, [r], [(watch.ADDED, f"{r}/b/new.jpg")])
    assert (done.added, done.listing_errors) == (2, []), done
    nothing_left(job)


def test_a_caption_through_a_link_is_read_again_by_a_scoped_run_as_by_a_full_one(tmp_path, tiny_model):
    """A photo's caption sidecar that is a link is read again by every run that lists its folder (its target may
    change where no change of the photo shows). A full run lists every folder; a scoped run listed only changed
    ones, so the caption stayed old until its photo's folder changed. Folders holding such links are listed by
    every scoped run."""
    root, r, job = library(tmp_path, tiny_model, {"a": (1, 75), "b": (1, 76)})
    captions = tmp_path / "captions"
    captions.mkdir()
    (captions / "img000.txt").write_text("a red bicycle")
    photo = next((root / "a").iterdir())
    (root / "a" / f"{photo.stem}.txt").symlink_to(captions / "img000.txt")
    job["links"] = LinkFolders()
    index_folders([], **job)  # the watch's first run: the caption read, its folder remembered
    (captions / "img000.txt").write_text("a blue whale")
    shutil.copy(make_images(tmp_path / "staging", 1, seed=77)[0], root / "b" / "new.jpg")
    done = scoped_run(job, [r], [(watch.ADDED, f"{r}/b/new.jpg")])
    assert (done.added, done.times["extra"]["captions_read_again"]) == (1, 1), done
    assert index_folders([], **job).times["extra"]["captions_read_again"] == 0


def watched(roots: list[str], change) -> set:
    """The changes the watch's own watcher (real watchfiles, notifications) reports for what `change()` does."""
    watcher = watch._Watcher(roots, watch.WatchOptions(settle_ms=300, max_batch_ms=3_000), None)
    try:
        change()
        seen: set = set()
        end = time.monotonic() + 20
        while not seen and time.monotonic() < end:
            time.sleep(0.5)
            while not watcher.batches.empty():
                seen |= watcher.batches.get()
        return seen
    finally:
        watcher.close()


@pytest.mark.slow
def test_a_change_named_through_a_link_from_another_root_is_one_of_the_folder_it_leads_to(tmp_path, tiny_model):
    """inotify watches a folder once, whatever the paths leading to it, and watchfiles names its changes by the
    path it came to it by last: with a link in root `other` to root photos' folder 2024, watched after photos,
    a photo added to 2024 was reported as other/fav/new.jpg, a change through a link, and started no run. It is
    a change of the folder the link leads to."""
    root, other, ix = tmp_path / "photos", tmp_path / "other", tmp_path / "ix"
    make_images(root / "2024", 2, seed=78)
    make_images(other, 1, seed=79)
    (other / "fav").symlink_to(root / "2024", target_is_directory=True)
    job = {"index_dir": ix, "model": str(tiny_model), "device": "cpu", "workers": 0}
    assert index_folders([root, other], **job).added == 3
    roots = [str(root.resolve()), str(other.resolve())]
    staged = make_images(tmp_path / "staging", 1, seed=80)[0]
    changes = watched(roots, lambda: shutil.copy(staged, root / "2024" / "new.jpg"))
    assert changes == {(watch.ADDED, f"{roots[1]}/fav/new.jpg")}  # the name inotify gives it
    pending = watch.touched(changes, {r: False for r in roots}, str(ix.resolve()), watch.path_kind,
                            linked=watch.through_link)
    assert pending == {roots[0]: ["2024"]}
    assert index_folders([], **job, scope=watch.run_scope(pending, roots)).added == 1
    nothing_left(job)


def test_a_photo_named_like_a_temporary_file_is_indexed_and_removed_as_a_full_listing_does(tmp_path, tiny_model):
    """`#1.jpg` is a photo to a full listing (scan._wanted reads any image by its extension, whatever its name), but
    the watch took it for an editor's temporary file (a # prefix) and started no run: added, it waited for another
    change of its folder. Only names no listing reads are temporary files."""
    root, r, job = library(tmp_path, tiny_model, {"a": (1, 81)})
    staged = make_images(tmp_path / "staging", 1, seed=82)[0]
    shutil.copy(staged, root / "a" / "#1.jpg")
    assert scoped_run(job, [r], [(watch.ADDED, f"{r}/a/#1.jpg")]).added == 1
    nothing_left(job)
    (root / "a" / "#1.jpg").unlink()
    assert scoped_run(job, [r], [(DELETED, f"{r}/a/#1.jpg")]).removed == 1
    nothing_left(job)


def test_a_folder_replaced_by_a_file_of_its_name_loses_its_files(tmp_path, tiny_model):
    """`trip` moved away and a file `trip` (no photo) made in its place at once: the watch saw a change at a path
    that is now a file it does not read, and started no run, so trip's photos stayed indexed. A path the catalog
    holds files under is a folder that was there, whatever is there now."""
    root, r, job = library(tmp_path, tiny_model, {"trip": (2, 83), "b": (1, 84)})
    shutil.move(str(root / "trip"), str(tmp_path / "trip"))
    (root / "trip").write_text("notes")
    assert scoped_run(job, [r], [(DELETED, f"{r}/trip"), (watch.ADDED, f"{r}/trip")]).removed == 2
    nothing_left(job)


def test_a_caption_link_made_or_pointed_elsewhere_is_read_as_a_full_listing_reads_it(tmp_path, tiny_model):
    """A full listing reads again the caption of every photo whose sidecar photo.txt is a link; the watch took a
    .txt made or replaced for a file it does not read and started no run, so a caption link made (or pointed at
    another text) next to an indexed photo was not read until its folder changed otherwise."""
    root, r, job = library(tmp_path, tiny_model, {"a": (1, 85), "b": (1, 86)})
    texts = tmp_path / "captions"
    texts.mkdir()
    (texts / "one.txt").write_text("a red bicycle")
    (texts / "two.txt").write_text("a blue whale")
    caption = root / "a" / f"{next((root / 'a').iterdir()).stem}.txt"
    caption.symlink_to(texts / "one.txt")
    done = scoped_run(job, [r], [(watch.ADDED, str(caption))])
    assert done.times["extra"]["captions_read_again"] == 1, done
    assert index_folders([], **job).times["extra"]["captions_read_again"] == 0
    caption.unlink()
    caption.symlink_to(texts / "two.txt")  # ln -sf: the link made anew
    done = scoped_run(job, [r], [(DELETED, str(caption)), (watch.ADDED, str(caption))])
    assert done.times["extra"]["captions_read_again"] == 1, done
    assert index_folders([], **job).times["extra"]["captions_read_again"] == 0


def _caption(job: dict, photo) -> str | None:
    import sqlite3

    conn = sqlite3.connect(f"file:{Path(job['index_dir']) / 'catalog.db'}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT p.caption FROM files f JOIN photos p ON p.file_id = f.id WHERE f.relpath = ?",
                            (f"{photo.parent.name}/{photo.name}",)).fetchone()[0]
    finally:
        conn.close()


def test_a_sidecar_caption_made_edited_or_removed_beside_an_unchanged_photo_is_read_again(tmp_path, tiny_model):
    """photo.txt beside photo.jpg is its caption (keyword search, export). Made, edited or removed while the photo
    stayed as it was, it changed neither the photo's size nor its time: `index` said "nothing changed" and kept the
    old caption for good, and the watch took a .txt for a file it does not read and made no run. A listing reads
    again the captions made or changed since the root's last whole listing (or all of a folder changed since), and a
    .txt beside a photo of its stem makes the watch list its folder; a text beside no photo makes no run."""
    root, r, job = library(tmp_path, tiny_model, {"a": (2, 87)})
    photo = sorted((root / "a").iterdir())[0]
    caption = photo.with_suffix(".txt")
    for change, text in ((watch.ADDED, "a red bicycle"), (MODIFIED, "a blue whale"), (DELETED, None)):
        caption.write_text(text) if text else caption.unlink()
        done = scoped_run(job, [r], [(change, str(caption))])
        assert (done.times["extra"]["captions_read_again"], done.updated) == (1, 0), (change, done)
        assert _caption(job, photo) == text
    caption.write_text("a green kite")  # a plain run (cron) reads it too
    assert index_folders([], **job).times["extra"]["captions_read_again"] == 1
    assert _caption(job, photo) == "a green kite"
    assert index_folders([], **job).times["extra"]["captions_read_again"] == 0
    (root / "a" / "notes.txt").write_text("shopping list")
    look = watch._CatalogLook(Path(job["index_dir"]).resolve())
    try:
        assert watch.touched({(MODIFIED, f"{r}/a/notes.txt")}, {r: False}, str(Path(job["index_dir"]).resolve()),
                             watch.path_kind, sidecar=look.sidecar) == {}
        assert watch.touched({(MODIFIED, f"{r}/a/{caption.name}")}, {r: False}, str(Path(job["index_dir"]).resolve()),
                             watch.path_kind, sidecar=look.sidecar) == {r: ["a"]}
    finally:
        look.close()


def test_a_run_killed_before_it_reads_the_captions_again_leaves_them_to_the_next(tmp_path, tiny_model, monkeypatch):
    """A caption edited beside an unchanged photo is read again by the next run (root option listed: when its last
    whole listing started). That time was committed with the roots, before the run encoded anything; a run killed
    during its encoding (Ctrl-C, the OOM killer: hours into a big import) had not read the caption again, and the
    next run took it for read (older than the killed run's listing) and kept the old caption for good."""
    from indexer import photos, scan

    root, r, job = library(tmp_path, tiny_model, {"a": (2, 91)})
    photo = sorted((root / "a").iterdir())[0]
    photo.with_suffix(".txt").write_text("a blue whale")
    monkeypatch.setattr(scan, "CHANGED_SLACK_S", 0)  # the killed run starts well after the edit, as in life
    time.sleep(0.05)

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(photos, "recaption", killed)
    with pytest.raises(KeyboardInterrupt):
        index_folders([], **job)
    monkeypatch.undo()
    monkeypatch.setattr(scan, "CHANGED_SLACK_S", 0)
    assert index_folders([], **job).times["extra"]["captions_read_again"] == 1
    assert _caption(job, photo) == "a blue whale"


def test_a_caption_edited_in_a_root_another_takes_over_is_read_again(tmp_path, tiny_model, monkeypatch):
    """index photos/a, then index photos: photos takes photos/a over (its rows move, unchanged). The time photos/a
    was last listed whole (root option listed) was dropped with its other recorded options, so the first listing of
    photos read no caption again, then recorded its own start: a caption edited in photos/a between its last run
    and the takeover kept its old text for good. The new root starts from the earliest time of the roots it takes
    over."""
    from indexer import scan

    monkeypatch.setattr(scan, "CHANGED_SLACK_S", 0)  # the takeover runs well after the edit, as in life
    root = tmp_path / "photos"
    photo = make_images(root / "a", 2, seed=92)[0]
    make_images(root / "b", 1, seed=93)
    job = {"index_dir": tmp_path / "ix", "model": str(tiny_model), "device": "cpu", "workers": 0}
    assert index_folders([root / "a"], **job).added == 2
    photo.with_suffix(".txt").write_text("a blue whale")
    time.sleep(0.05)
    done = index_folders([root], **job)
    assert (done.added, done.times["extra"]["captions_read_again"]) == (1, 1), done


def test_captions_are_read_again_in_a_root_with_a_folder_it_cannot_list(tmp_path, tiny_model, monkeypatch):
    """A root holding a folder no run can list (a drive's lost+found, mode 700, for a user indexing it): the time of
    the last whole listing (root option listed) was only recorded by a listing that listed every folder, so it was
    never recorded and no edited caption was read again, ever. A whole listing records it with the folders it could
    not list (option unread), whose captions count as read only up to the time they had: an edit made there while
    it could not be listed is read once it can."""
    from indexer import scan

    monkeypatch.setattr(scan, "CHANGED_SLACK_S", 0)  # each run starts well after the edit before it, as in life
    root = tmp_path / "photos"
    photo = make_images(root / "a", 2, seed=94)[0]
    locked = make_images(root / "locked", 1, seed=95)[0]
    refused: set[str] = {str(root / "locked")}
    refuse_listing(monkeypatch, refused, PermissionError(13, "Permission denied", str(root / "locked")))
    job = {"index_dir": tmp_path / "ix", "model": str(tiny_model), "device": "cpu", "workers": 0}
    assert index_folders([root], **job).added == 2
    photo.with_suffix(".txt").write_text("a blue whale")
    time.sleep(0.05)
    assert index_folders([], **job).times["extra"]["captions_read_again"] == 1
    assert _caption(job, photo) == "a blue whale"
    refused.clear()
    assert index_folders([], **job).added == 1  # locked/ listed at last
    refused.add(str(root / "locked"))
    locked.with_suffix(".txt").write_text("a green kite")  # edited while the run cannot list its folder
    time.sleep(0.05)
    done = index_folders([], **job)
    assert (done.times["extra"]["captions_read_again"], len(done.listing_errors)) == (0, 1), done
    time.sleep(0.05)
    refused.clear()
    assert index_folders([], **job).times["extra"]["captions_read_again"] == 1
    assert _caption(job, locked) == "a green kite"


def test_the_captions_of_a_changed_folder_are_compared_in_few_queries(tmp_path, tiny_model, monkeypatch):
    """A caption made in a folder flags every photo of it (a caption removed shows only as a change of its folder),
    and each flagged photo's stored caption was asked in a query of its own: 0.3 ms a photo, minutes a run for a
    library whose folders changed, and every watch run of a large folder paid it again. They are asked in batches."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    from indexer import photos

    root, r, job = library(tmp_path, tiny_model, {"a": (20, 96)})
    photo = sorted((root / "a").iterdir())[0]
    photo.with_suffix(".txt").write_text("a blue whale")
    statements, reading = [], [False]
    recaption = photos.recaption

    def counted(*args):
        reading[0] = True
        try:
            return recaption(*args)
        finally:
            reading[0] = False

    def seen(conn, cursor, statement, *args):
        if reading[0] and statement.lstrip().upper().startswith("SELECT") and "JOIN photos" in statement:
            statements.append(statement)

    monkeypatch.setattr(photos, "recaption", counted)
    event.listen(Engine, "before_cursor_execute", seen)
    try:
        assert index_folders([], **job).times["extra"]["captions_read_again"] == 1
    finally:
        event.remove(Engine, "before_cursor_execute", seen)
    assert _caption(job, photo) == "a blue whale"
    assert len(statements) <= 2, statements


def test_a_caption_that_cannot_be_read_now_is_kept_not_cleared(tmp_path, tiny_model, monkeypatch):
    """A photo added to a folder changes the folder, so every photo in it has its caption read again (one removed
    shows only so). A sidecar that could not be read at that moment (an NFS hiccup, EIO, too many open files) was
    taken for no caption: the stored one was cleared, keyword search lost its words, and nothing read it again until
    the .txt itself changed. A caption that is there but unreadable now is kept as stored."""
    from alignsearch import safeopen
    from indexer import scan

    root, r, job = library(tmp_path, tiny_model, {"a": (2, 97)})
    photo = sorted((root / "a").iterdir())[0]
    photo.with_suffix(".txt").write_text("a blue whale")
    assert index_folders([], **job).times["extra"]["captions_read_again"] == 1
    assert _caption(job, photo) == "a blue whale"
    opened = safeopen.open_under

    def flaky(folder, name, *args, **kwargs):
        if os.fsdecode(name).endswith(".txt"):
            raise OSError(5, "Input/output error", os.fsdecode(name))
        return opened(folder, name, *args, **kwargs)

    monkeypatch.setattr(safeopen, "open_under", flaky)
    monkeypatch.setattr(scan, "CHANGED_SLACK_S", 0)  # each run starts well after the edit before it, as in life
    new = make_images(tmp_path / "staging", 1, seed=98)[0]
    shutil.copy(new, root / "a" / f"new{new.suffix}")
    photo.with_suffix(".txt").write_text("a grey whale")
    time.sleep(0.05)
    done = index_folders([], **job)
    assert done.added == 1, done
    assert _caption(job, photo) == "a blue whale"
    monkeypatch.setattr(safeopen, "open_under", opened)  # readable again: the edit is read, though made before
    assert index_folders([], **job).times["extra"]["captions_read_again"] == 1
    assert _caption(job, photo) == "a grey whale"


def test_a_clock_set_back_after_a_run_does_not_hide_the_edits_made_since(tmp_path, tiny_model, monkeypatch):
    """A run made while the clock was ahead (a board without a battery clock before NTP set it, a wrong time
    zone set right) recorded that time as the root's last whole listing (option listed); once the clock was set
    back, every caption edited until the clock caught up was older than it and never read again. A recorded time
    ahead of the clock is no time to go by: that run reads every caption again, once."""
    import types

    from indexer import roots

    root, r, job = library(tmp_path, tiny_model, {"a": (2, 99)})
    ahead = types.SimpleNamespace(time=lambda: time.time() + 86400)  # this run's clock a day ahead
    monkeypatch.setattr(roots, "time", ahead)
    assert index_folders([], **job).updated == 0
    monkeypatch.undo()  # set right
    photo = sorted((root / "a").iterdir())[0]
    photo.with_suffix(".txt").write_text("a blue whale")
    assert index_folders([], **job).times["extra"]["captions_read_again"] == 1
    assert _caption(job, photo) == "a blue whale"


def test_an_index_made_before_listed_was_recorded_reads_its_captions_again_once(tmp_path, tiny_model):
    """An index made before the root option listed existed (or one whose roots a takeover merged, one never listed
    whole) holds captions read when their photos were indexed; its next listing had no time to go by, read no
    caption again and recorded its own start: a caption fixed before the upgrade kept its old text for good. A root
    with indexed files and no time recorded reads every caption again, once."""
    from alignsearch.storage import catalog, state
    from alignsearch.storage.paths import DB_FILE
    from indexer.roots import LISTED

    root, r, job = library(tmp_path, tiny_model, {"a": (2, 100)})
    photo = sorted((root / "a").iterdir())[0]
    photo.with_suffix(".txt").write_text("a blue whale")  # fixed under the old version: no run read it
    db = catalog.connect(Path(job["index_dir"]) / DB_FILE)
    with db.begin() as conn:  # as the old version left it: no listed recorded
        recorded = state.read(conn, "roots").roots
        options = {k: {n: v for n, v in o.items() if n != LISTED} for k, o in recorded.options.items()}
        state.write(conn, roots=dataclasses.replace(recorded, options={k: o for k, o in options.items() if o}))
    db.dispose()
    assert index_folders([], **job).times["extra"]["captions_read_again"] == 1
    assert _caption(job, photo) == "a blue whale"
    assert index_folders([], **job).times["extra"]["captions_read_again"] == 0


@pytest.mark.slow
def test_a_scoped_run_reads_again_only_the_captions_changed_since_its_folder_was_last_listed(tmp_path, tiny_model,
                                                                                             monkeypatch):
    """Scoped runs never recorded up to when they had read captions (root option listed is a whole listing's), so
    each run of a folder read again every caption edited since the last whole listing, and every caption of a folder
    changed since (a photo added): under `index --watch`, which lists every root whole only after a restart, a big
    folder's captions were all read again by each run of it, for days. A scoped run records the folders it listed
    with no listing error (root option read); a listing of a folder under one counts its captions read up to then."""
    from indexer import photos, scan

    monkeypatch.setattr(scan, "CHANGED_SLACK_S", 0)  # each run starts well after the edit before it, as in life
    root, r, job = library(tmp_path, tiny_model, {"a": (10, 101), "b": (1, 102)})
    shots = sorted((root / "a").iterdir())
    for i, photo in enumerate(shots):
        photo.with_suffix(".txt").write_text(f"photo {i}")
    time.sleep(0.05)
    assert index_folders([], **job).times["extra"]["captions_read_again"] == 10
    read: list[int] = []
    recaption = photos.recaption

    def counted(db, rows, *args):
        rows = list(rows)
        read.append(len(rows))
        return recaption(db, rows, *args)

    monkeypatch.setattr(photos, "recaption", counted)
    staged = make_images(tmp_path / "staging", 1, seed=103)[0]
    steps = [lambda: shots[0].with_suffix(".txt").write_text("a red bicycle"),  # edited in place: a alone changed
             lambda: shots[1].with_suffix(".txt").write_text("a blue whale"),
             lambda: shutil.copy(staged, root / "a" / "new.jpg"),  # the folder changed: each caption read, once
             lambda: shots[2].with_suffix(".txt").write_text("a green kite")]
    changed = [shots[0].with_suffix(".txt"), shots[1].with_suffix(".txt"), root / "a" / "new.jpg",
               shots[2].with_suffix(".txt")]
    for step, path in zip(steps, changed):
        time.sleep(0.05)
        step()
        time.sleep(0.05)
        scoped_run(job, [r], [(MODIFIED, str(path))])
    assert read == [1, 1, 10, 1]
    assert [_caption(job, p) for p in shots[:3]] == ["a red bicycle", "a blue whale", "a green kite"]
    assert index_folders([], **job).times["extra"]["captions_read_again"] == 0


def test_a_scoped_run_that_could_not_list_a_folder_under_its_own_records_no_time_for_it(tmp_path, tiny_model,
                                                                                         monkeypatch):
    """A folder listed by a scoped run counts its captions read up to then (root option read) only when nothing
    under it went unlisted: a caption edited in a/locked while it could not be listed is read once it can."""
    from helpers import index_state
    from indexer import scan
    from indexer.roots import READ

    monkeypatch.setattr(scan, "CHANGED_SLACK_S", 0)  # each run starts well after the edit before it, as in life
    root, r, job = library(tmp_path, tiny_model, {"a": (1, 104), "a/locked": (1, 105)})
    locked = next((root / "a" / "locked").iterdir())
    refused = {str(root / "a" / "locked")}
    refuse_listing(monkeypatch, refused, PermissionError(13, "Permission denied", str(root / "a" / "locked")))
    time.sleep(0.05)
    locked.with_suffix(".txt").write_text("a green kite")  # edited while a run cannot list its folder
    staged = make_images(tmp_path / "staging", 1, seed=106)[0]
    shutil.copy(staged, root / "a" / "new.jpg")
    time.sleep(0.05)
    done = scoped_run(job, [r], [(watch.ADDED, f"{r}/a/new.jpg")])
    assert (done.added, len(done.listing_errors)) == (1, 1), done
    assert "a" not in index_state(job["index_dir"]).roots.options[r].get(READ, {})
    refused.clear()
    time.sleep(0.05)
    done = scoped_run(job, [r], [(MODIFIED, f"{r}/a/locked")])
    assert (done.times["extra"]["captions_read_again"], done.listing_errors) == (1, []), done
    conn = sqlite3.connect(f"file:{Path(job['index_dir']) / DB_FILE}?mode=ro", uri=True)
    try:
        assert conn.execute("SELECT p.caption FROM files f JOIN photos p ON p.file_id = f.id WHERE f.relpath = ?",
                            (f"a/locked/{locked.name}",)).fetchall() == [("a green kite",)]
    finally:
        conn.close()
    assert index_state(job["index_dir"]).roots.options[r][READ] == {"a/locked": pytest.approx(time.time(), abs=60)}
