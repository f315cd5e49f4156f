"""The index folder is no more readable by other users than the photos it indexes (indexer/privacy.py): it holds
their paths, captions, places, OCR text and the server's thumbnails, and was made 0755 beside photos in a 0700
folder."""

from __future__ import annotations

import os
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest
from conftest import run
from helpers import smooth_photos

from indexer.privacy import GROUP, OTHERS, Step, narrowed, reachable

D = stat.S_IFDIR
F = stat.S_IFREG


def test_which_users_reach_a_root():
    """OTHERS by the others bits of every folder on the way (x) and of the root (r, and x for a folder); GROUP by
    the group bits where a step's group is the index folder's, else by its others bits."""
    public = [Step(D | 0o755, 0), Step(D | 0o755, 0)]
    assert reachable(public, 100) == GROUP | OTHERS
    assert reachable([Step(D | 0o700, 0), Step(D | 0o755, 0)], 100) == 0  # a 0700 home above the photos
    assert reachable([Step(D | 0o711, 0), Step(D | 0o755, 0)], 100) == GROUP | OTHERS  # searchable is enough above
    assert reachable([Step(D | 0o755, 0), Step(D | 0o750, 100)], 100) == GROUP  # the index's group may read
    assert reachable([Step(D | 0o755, 0), Step(D | 0o750, 200)], 100) == 0  # another group's folder
    assert reachable([Step(D | 0o755, 0), Step(D | 0o754, 0)], 100) == 0  # readable, not searchable: no photo opens
    assert reachable([Step(D | 0o755, 0), Step(F | 0o644, 0)], 100) == GROUP | OTHERS  # a list file: read alone
    assert reachable([Step(D | 0o755, 0), Step(F | 0o600, 0)], 100) == 0


def test_the_index_folder_loses_only_read_and_search_bits():
    public, private = [Step(D | 0o755, 0)], [Step(D | 0o700, 0)]
    assert narrowed(D | 0o755, 100, [public]) == 0o755
    assert narrowed(D | 0o755, 100, [public, private]) == 0o700
    assert narrowed(D | 0o2775, 100, [[Step(D | 0o750, 100)]]) == 0o2770  # setgid, the group's write kept
    assert narrowed(D | 0o700, 100, [public]) == 0o700  # never opened wider
    assert narrowed(D | 0o755, 100, []) == 0o755


@pytest.fixture
def public_dir():
    """A folder every user may search and read (pytest's own are root's, 0700)."""
    base = Path(tempfile.mkdtemp(prefix="alignsearch-privacy-"))
    base.chmod(0o755)
    yield base
    subprocess.run(["rm", "-rf", str(base)], check=False)


@pytest.mark.slow
def test_an_index_of_private_photos_is_private_and_of_public_ones_public(tiny_model, public_dir, capfd):
    """`index` of photos in a 0700 folder into a folder others may read: the index was 0755, its catalog and
    thumbnails readable by every user. Made 0700 now; an index of photos every user may read stays 0755. An index
    opened to others since (chmod 755) is narrowed again at the next run that names the private folder, with a line."""
    open_photos, hidden = public_dir / "open", public_dir / "hidden"
    smooth_photos(open_photos, 2)
    smooth_photos(hidden, 2)
    open_photos.chmod(0o755)
    hidden.chmod(0o700)
    shown, kept = public_dir / "shown-ix", public_dir / "kept-ix"
    run("index", "--index", shown, "--model", tiny_model, open_photos)
    assert stat.S_IMODE(os.stat(shown).st_mode) == 0o755
    run("index", "--index", kept, "--model", tiny_model, open_photos, hidden)
    assert stat.S_IMODE(os.stat(kept).st_mode) == 0o700
    assert len(run("query", "--index", kept, "a photo", "-k", "10", "--paths").stdout.split()) == 4
    kept.chmod(0o755)
    capfd.readouterr()
    run("index", "--index", kept, "--model", tiny_model, hidden)
    assert stat.S_IMODE(os.stat(kept).st_mode) == 0o700
    assert f"notice: {kept} made 0700 (was 0755)" in capfd.readouterr().err  # notices go to the process's stderr
    run("index", "--index", shown, "--model", tiny_model, hidden)  # a private root added to a public index
    assert stat.S_IMODE(os.stat(shown).st_mode) == 0o700


def test_the_index_group_reads_by_its_group_bits_alone():
    """A member of a folder's group gets its group bits, never its others bits (the kernel's rule): a folder of the
    index's group made 0705 keeps that group out, and the index was left 0755 to it."""
    assert reachable([Step(D | 0o755, 0), Step(D | 0o705, 100)], 100) == OTHERS
    assert reachable([Step(D | 0o705, 100), Step(D | 0o755, 0)], 100) == OTHERS  # a folder on the way
    assert reachable([Step(D | 0o755, 0), Step(D | 0o705, 200)], 100) == GROUP | OTHERS  # another group's: others'
    assert narrowed(D | 0o755, 100, [[Step(D | 0o755, 0), Step(D | 0o705, 100)]]) == 0o705


def test_a_file_url_root_is_judged_as_the_folder_it_names(public_dir):
    """file:///home/me/private is a local folder (read through fsspec): `index file://...` of photos in a 0700
    folder left the index 0755, where the same folder named as a path made it 0700. Other URLs are not judged."""
    from indexer.privacy import keep_private

    hidden, ix = public_dir / "hidden", public_dir / "ix"
    hidden.mkdir(mode=0o700)
    ix.mkdir(mode=0o755)
    hidden.chmod(0o700)
    ix.chmod(0o755)
    assert keep_private(ix, ["s3://bucket/photos", "file://otherhost/x"]) is None
    assert stat.S_IMODE(os.stat(ix).st_mode) == 0o755
    assert keep_private(ix, [hidden.as_uri()]) is not None
    assert stat.S_IMODE(os.stat(ix).st_mode) == 0o700


def test_a_list_is_judged_by_the_photos_it_names(public_dir):
    """A list every user may read naming photos in a 0700 folder (by path, relative to the list, or file://) left
    the index 0755: the list was judged as a file alone. A list naming only photos others may open leaves it so."""
    from indexer.privacy import keep_private

    shown, hidden = public_dir / "shown", public_dir / "hidden"
    smooth_photos(shown, 1)
    smooth_photos(hidden, 1)
    shown.chmod(0o755)
    hidden.chmod(0o700)
    public_photo, private_photo = next(shown.iterdir()), next(hidden.iterdir())
    public_photo.chmod(0o644)
    private_photo.chmod(0o644)
    for n, entry in enumerate([str(private_photo), f"hidden/{private_photo.name}", private_photo.as_uri()]):
        listed, ix = public_dir / f"list{n}.csv", public_dir / f"ix{n}"
        listed.write_text(f"path\n{public_photo}\n{entry}\n")
        listed.chmod(0o644)
        ix.mkdir()
        ix.chmod(0o755)
        assert keep_private(ix, [str(listed)]) is not None, entry
        assert stat.S_IMODE(os.stat(ix).st_mode) == 0o700, entry
    listed, ix = public_dir / "open.csv", public_dir / "open-ix"
    listed.write_text(f"photo\n{public_photo}\n")
    listed.chmod(0o644)
    ix.mkdir()
    ix.chmod(0o755)
    assert keep_private(ix, [str(listed)], "photo") is None
    assert stat.S_IMODE(os.stat(ix).st_mode) == 0o755
    assert keep_private(ix, [str(listed)], "no-such-column") is None  # the scan says what is wrong with it


def _shared_ancestors(public_dir, private: str | None) -> tuple[Path, list[Path]]:
    """A list every user may read naming one photo in each of 12 folders lib/a{i}/b{j}/ (their ancestors shared),
    the folder `private` (relative to lib, e.g. "a1") made 0700, the rest 0755. (list, photos)"""
    photos = []
    for i in range(3):
        for j in range(4):
            folder = public_dir / "lib" / f"a{i}" / f"b{j}"
            folder.mkdir(parents=True)
            photo = folder / "p.jpg"
            photo.write_bytes(b"x")
            photo.chmod(0o644)
            photos.append(photo)
    for folder in (public_dir / "lib").rglob("*"):
        if folder.is_dir():
            folder.chmod(0o755)
    (public_dir / "lib").chmod(0o755)
    if private:
        (public_dir / "lib" / private).chmod(0o700)
    listed = public_dir / "fav.csv"
    listed.write_text("path\n" + "".join(f"{p}\n" for p in photos))
    listed.chmod(0o644)
    return listed, photos


@pytest.mark.parametrize("private", [None, "a1", "a2/b3"])
def test_a_lists_photos_under_shared_folders_are_judged_as_each_alone_and_each_folder_stated_once(
        public_dir, monkeypatch, private):
    """privacy._steps remembers the folders it stat'ed in one judgement (a list's photos in 10,000 folders of one
    library stat'ed /, /home, /home/me again for each): the index folder is narrowed as when each photo's folders
    are stat'ed anew (a private folder above some of the photos, or none), and no folder is stat'ed twice."""
    from indexer import privacy

    listed, photos = _shared_ancestors(public_dir, private)
    ix = public_dir / "ix"
    ix.mkdir()
    ix.chmod(0o755)
    alone = [privacy._steps(str(path)) for path in [str(listed), *map(str, photos)]]
    want = narrowed(os.stat(ix).st_mode, os.stat(ix).st_gid, alone)
    stated: list[str] = []
    real_stat = os.stat

    def counting(path, *args, **kwargs):
        stated.append(str(path))
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(privacy.os, "stat", counting)
    told = privacy.keep_private(ix, [str(listed)])
    monkeypatch.undo()
    assert stat.S_IMODE(os.stat(ix).st_mode) == want == (0o755 if private is None else 0o700)
    assert (told is None) == (private is None)
    folders = [p for p in stated if os.path.isdir(p) and p != str(ix)]
    assert sorted(folders) == sorted(set(folders)), "a folder stat'ed twice"
    assert str(public_dir / "lib") in folders


@pytest.mark.parametrize("as_url", [False, True])
def test_the_list_judged_is_the_list_the_scan_lists(public_dir, monkeypatch, as_url):
    """privacy.keep_private reads a list into the run's tables (sources.list_table) and the scan lists that table:
    a list replaced after the judgement by one naming a photo in a 0700 folder is listed as it was judged (read
    again, the new list's private photo was indexed into a folder left open), and the file is parsed once, where
    the judgement, the scan's captions and its entries each read it (a list of 1M entries parsed three times), and
    its entries made strings once for the judgement and the scan (the same column). as_url: the list named by its
    file:// URL (judged as the local file it names, kept under the URL the scan lists)."""
    from alignsearch.media import sources
    from indexer import privacy, scan

    listed, photos = _shared_ancestors(public_dir, None)
    root = listed.as_uri() if as_url else str(listed)
    judged = sorted(f.relpath for f in scan.scan(root))  # as the scan names them (a URL list's entries by URL)
    hidden = public_dir / "hidden"
    hidden.mkdir()
    (hidden / "p.jpg").write_bytes(b"x")
    hidden.chmod(0o700)
    ix = public_dir / "ix"
    ix.mkdir()
    ix.chmod(0o755)
    reads: list[str] = []
    made: list[str] = []
    real_table, real_entries = sources._list_table, sources.read_list
    monkeypatch.setattr(sources, "_list_table", lambda path: reads.append(path) or real_table(path))
    monkeypatch.setattr(sources, "read_list", lambda path, *args: made.append(path) or real_entries(path, *args))
    lists: dict = {}
    assert privacy.keep_private(ix, [root], None, lists) is None
    assert stat.S_IMODE(os.stat(ix).st_mode) == 0o755
    swapped = public_dir / "swapped.csv"
    swapped.write_text(f"path\n{hidden / 'p.jpg'}\n")
    os.replace(swapped, listed)
    found = list(scan.scan(root, lists=lists))
    assert sorted(f.relpath for f in found) == judged and len(judged) == len(photos)
    assert reads == made == [root] and lists == {}  # read and made entries once, not held past its listing
    assert len(list(scan.scan(root))) == 1  # a next run reads the new list


def test_a_list_unreadable_when_judged_is_unreadable_to_the_scan(public_dir):
    """A list privacy could not read (missing: judged by nothing it names) is not listed by the scan of the same run even
    where it reads since: the error is kept in the run's tables, and the scan reports it as before."""
    from alignsearch.errors import BadInputError
    from indexer import privacy, scan

    listed = public_dir / "fav.csv"  # not there yet when judged
    ix = public_dir / "ix"
    ix.mkdir()
    lists: dict = {}
    privacy.keep_private(ix, [str(listed)], None, lists)
    listed.write_text("path\n/nowhere/p.jpg\n")
    with pytest.raises(BadInputError, match="cannot read the list"):
        list(scan.scan(str(listed), lists=lists))
    assert len(list(scan.scan(str(listed)))) == 1


@pytest.mark.slow
def test_an_index_run_lists_the_list_it_judged_and_reads_it_once(public_dir, tiny_model, monkeypatch):
    """`index` of a list: the run judged the index folder on the list as privacy read it, then its scan read the
    file again (and again for its captions). A list replaced in between by one naming a photo in a 0700 folder was
    indexed into a folder left 0755; now the run lists the table it judged (the new list waits for the next run,
    which judges it first), and the file is parsed once."""
    from alignsearch.media import sources
    from indexer import privacy
    from indexer.job import index_folders

    shown, hidden = public_dir / "shown", public_dir / "hidden"
    public = smooth_photos(shown, 2)
    private = smooth_photos(hidden, 1)
    shown.chmod(0o755)
    hidden.chmod(0o700)
    listed, swapped = public_dir / "fav.csv", public_dir / "swapped.csv"
    listed.write_text("path\n" + "".join(f"{p}\n" for p in public))
    listed.chmod(0o644)
    reads: list[str] = []
    real_table, real_keep = sources._list_table, privacy.keep_private
    monkeypatch.setattr(sources, "_list_table", lambda path: reads.append(path) or real_table(path))

    def judged_then_replaced(*args, **kwargs):
        told = real_keep(*args, **kwargs)
        swapped.write_text(f"path\n{private[0]}\n")
        os.replace(swapped, listed)
        return told

    monkeypatch.setattr(privacy, "keep_private", judged_then_replaced)
    ix = public_dir / "ix"
    summary = index_folders([str(listed)], index_dir=ix, model=str(tiny_model), device="cpu", workers=0)
    assert stat.S_IMODE(os.stat(ix).st_mode) == 0o755
    assert (summary.added, reads) == (2, [str(listed)])
    monkeypatch.undo()
    run("index", "--index", ix, str(listed))  # the next run judges the new list first
    assert stat.S_IMODE(os.stat(ix).st_mode) == 0o700


def _swap_for_link(ix: Path, target: Path) -> None:
    """What another user who may rename entries beside the index does: its folder renamed away, a link to a folder of
    their choice (or root's) put at its name."""
    ix.rename(ix.with_name(ix.name + ".away"))
    ix.symlink_to(target)


def test_a_link_swapped_in_after_the_judgement_is_not_chmodded_through(public_dir, monkeypatch):
    """keep_private read the index folder's mode, then chmodded it by name: a link put at its name between the two
    was followed, and the folder it named (another user's, or root's where run as root) was given the index's
    narrowed mode. Now the mode read and set are those of one open folder: the index folder judged is narrowed,
    the link's target is left as it was."""
    from indexer import privacy

    hidden, ix, theirs = public_dir / "hidden", public_dir / "ix", public_dir / "theirs"
    for folder, mode in ((hidden, 0o700), (ix, 0o755), (theirs, 0o755)):
        folder.mkdir()
        folder.chmod(mode)
    real_narrowed = privacy.narrowed

    def swapping(*args):  # between reading the index folder's mode and setting it
        _swap_for_link(ix, theirs)
        return real_narrowed(*args)

    monkeypatch.setattr(privacy, "narrowed", swapping)
    privacy.keep_private(ix, [str(hidden)])
    assert stat.S_IMODE(os.stat(theirs).st_mode) == 0o755
    assert stat.S_IMODE(os.stat(public_dir / "ix.away").st_mode) == 0o700


def test_a_link_swapped_in_before_the_call_is_not_the_judged_folder(public_dir):
    """Swapped before keep_private opens it (after job judged the folder and took its lock): the folder now at the
    name is not the one judged (writer_lock's identity), and nothing is changed."""
    from indexer.lock import writer_lock
    from indexer.privacy import keep_private

    hidden, ix, theirs = public_dir / "hidden", public_dir / "ix", public_dir / "theirs"
    for folder, mode in ((hidden, 0o700), (ix, 0o755), (theirs, 0o755)):
        folder.mkdir()
        folder.chmod(mode)
    with writer_lock(ix) as held:
        _swap_for_link(ix, theirs)
        assert keep_private(ix, [str(hidden)], judged=held) is None
    assert stat.S_IMODE(os.stat(theirs).st_mode) == 0o755
    assert stat.S_IMODE(os.stat(public_dir / "ix.away").st_mode) == 0o755


@pytest.mark.slow
def test_a_remembered_root_made_private_later_is_judged_by_the_next_run_without_naming_it(tiny_model, public_dir):
    """`chmod 700 photos` after they were indexed, then `alignsearch index` (every remembered root listed again): the
    index stayed 0755, the thumbnails and text of photos now private readable by every user, until the root was
    named again. Every run judges every root it holds; a watch's scoped run judges remembered lists by the file
    alone (reading a million-line list at each change seen would be the cost), a full run by the photos they name."""
    photos, more, ix = public_dir / "photos", public_dir / "more", public_dir / "ix"
    smooth_photos(photos, 2)
    smooth_photos(more, 1)
    photos.chmod(0o755)
    more.chmod(0o755)
    run("index", "--index", ix, "--model", tiny_model, photos)
    assert stat.S_IMODE(os.stat(ix).st_mode) == 0o755
    photos.chmod(0o700)
    run("index", "--index", ix)  # the remembered root alone
    assert stat.S_IMODE(os.stat(ix).st_mode) == 0o700
    ix.chmod(0o755)
    run("index", "--index", ix, more)  # another root named: the remembered one is judged beside it
    assert stat.S_IMODE(os.stat(ix).st_mode) == 0o700
    private_photo = next(photos.iterdir())
    listed = public_dir / "list.csv"
    listed.write_text(f"shot\n{private_photo}\n")
    listed.chmod(0o644)
    photos.chmod(0o755)
    ix.chmod(0o755)
    run("index", "--index", ix, listed, "--list-column", "shot")
    assert stat.S_IMODE(os.stat(ix).st_mode) == 0o755
    photos.chmod(0o700)
    run("index", "--index", ix)  # the list remembered with its column: its photo judged
    assert stat.S_IMODE(os.stat(ix).st_mode) == 0o700


def test_a_list_left_out_of_by_photos_is_judged_by_its_file_alone(public_dir):
    """A scoped run (index --watch) judges the remembered lists it does not read by the list file, not by reading a
    possibly million-line list at each change; its own, and a full run's, by the photos they name."""
    from indexer.privacy import keep_private

    hidden = public_dir / "hidden"
    smooth_photos(hidden, 1)
    hidden.chmod(0o700)
    listed = public_dir / "list.csv"
    listed.write_text(f"shot\n{next(hidden.iterdir())}\n")
    listed.chmod(0o644)
    for by_photos, mode in (((), 0o755), ([str(listed)], 0o700), (None, 0o700)):
        ix = public_dir / f"ix-{mode:o}-{by_photos is None}"
        ix.mkdir()
        ix.chmod(0o755)
        keep_private(ix, [str(listed)], {str(listed): "shot"}, by_photos=by_photos)
        assert stat.S_IMODE(os.stat(ix).st_mode) == mode, by_photos


@pytest.mark.slow
def test_a_list_named_again_without_its_column_is_judged_by_the_column_remembered(tiny_model, public_dir):
    """`alignsearch index list.csv` again without --list-column: the scan reads the column the index remembers for it,
    but the judgement asked for the default one (None over the remembered), found none in a list of two columns,
    and judged the list by its file alone: photos it names made private since left the index open to every user."""
    photos, ix = public_dir / "photos", public_dir / "ix"
    smooth_photos(photos, 1)
    photos.chmod(0o755)
    listed = public_dir / "list.csv"
    listed.write_text(f"shot,note\n{next(photos.iterdir())},a walk\n")
    listed.chmod(0o644)
    run("index", "--index", ix, "--model", tiny_model, listed, "--list-column", "shot")
    ix.chmod(0o755)
    photos.chmod(0o700)
    run("index", "--index", ix, listed)  # named, its column remembered
    assert stat.S_IMODE(os.stat(ix).st_mode) == 0o700


@pytest.mark.slow
def test_an_export_of_a_private_index_is_as_private(tiny_model, public_dir):
    """`export` of an index that `index` made 0700 (its photos in a 0700 folder) into a folder every user reads: the
    parquet file held their paths and captions 0644, read by every user; it gets the index folder's read bits now.
    An export of an index of public photos stays 0644."""
    from alignsearch.search.export import export_mode

    assert export_mode(0o40700) == 0o600 and export_mode(0o40755) == 0o644 and export_mode(0o40750) == 0o640
    hidden, open_photos = public_dir / "hidden", public_dir / "open"
    smooth_photos(hidden, 2)
    smooth_photos(open_photos, 2)
    hidden.chmod(0o700)
    open_photos.chmod(0o755)
    for photos, mode in ((hidden, 0o600), (open_photos, 0o644)):
        ix, out = public_dir / f"{photos.name}-ix", public_dir / f"{photos.name}.parquet"
        run("index", "--index", ix, "--model", tiny_model, photos)
        run("export", "--index", ix, out)
        assert stat.S_IMODE(os.stat(out).st_mode) == mode, photos.name
        clip = public_dir / f"{photos.name}-clip"  # the clip-retrieval folder was 0755 (the umask's) for either
        run("export", "--index", ix, "--format", "clip-retrieval", clip)
        assert stat.S_IMODE(os.stat(clip).st_mode) == {0o600: 0o700, 0o644: 0o755}[mode], photos.name
