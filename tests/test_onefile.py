"""One file on disk is one entry (alignsearch/search/onefile.py): search, similar, export, the recent listing and
dupes agree, and show it by one name: its real path, not a link's name or a list's file:// URL."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import index_json, make_images, run


@pytest.fixture(scope="module")
def named_twice(tmp_path_factory, tiny_model):
    """A folder of 4 photos, a symlink in it to img002.jpg, and a list naming img001.jpg by its file:// URL: 5 names
    (6 rows), 4 files. The list is indexed after the folder, so its row has the higher id."""
    base = tmp_path_factory.mktemp("named-twice")
    lib, ix = base / "lib", base / "ix"
    photos = make_images(lib, 4)
    (lib / "a-link.jpg").symlink_to(photos[2])
    (base / "fav.csv").write_text(f"path\n{photos[1].as_uri()}\n")
    index_json(ix, lib, "--model", tiny_model, "--device", "cpu")
    assert index_json(ix, base / "fav.csv")["added"] == 1
    return base, ix, [str(p) for p in photos]


def _paths(ix, *args) -> list[str]:
    return [h["path"] for h in json.loads(run(*args, "--json", "--index", ix).stdout)["results"]]


@pytest.mark.slow
def test_a_symlink_beside_its_target_is_one_hit(named_twice):
    """(a) `query` listed img002.jpg and a-link.jpg (its symlink) as two hits with one score while `dupes` called
    them one file; `similar img002.jpg` answered its link. Each file once, by its real path, the k hits filled."""
    base, ix, photos = named_twice
    everything = _paths(ix, "query", "x", "-k", "100")
    assert sorted(everything) == photos, everything
    for k in range(1, 5):  # k files, the ranking cut at k
        assert _paths(ix, "query", "x", "-k", str(k)) == everything[:k], k
    alike = _paths(ix, "similar", photos[2], "-k", "10")
    assert sorted(alike) == [p for p in photos if p != photos[2]], alike
    alike = _paths(ix, "similar", base / "lib" / "a-link.jpg", "-k", "10")
    assert sorted(alike) == [p for p in photos if p != photos[2]], alike
    assert json.loads(run("dupes", "--tier", "exact", "--json", "--index", ix).stdout) == []


@pytest.mark.slow
def test_a_file_two_names_reach_is_shown_by_its_real_path(named_twice):
    """(c) Which row stood for a file two roots name was the first ranked: `query` showed img001.jpg as
    file:///.../img001.jpg, the list's URL. The real path is shown, whatever ranks first; a search of the list's
    root alone still shows the list's row (its only name there)."""
    base, ix, photos = named_twice
    hits = json.loads(run("query", "x", "-k", "100", "--json", "--index", ix).stdout)["results"]
    shown = {h["path"]: h for h in hits}
    assert photos[1] in shown and shown[photos[1]]["root"] == str(base / "lib"), hits
    assert _paths(ix, "query", "x", "-k", "100", "--where", f"root = {base / 'fav.csv'}") == [f"file://{photos[1]}"]


def _captioned_twice(tmp_path, tiny_model) -> tuple:
    """(lib, ix, listing, photos): 3 photos in lib, img000.jpg with a sidecar caption, img000.jpg and img001.jpg
    also named (file:// URLs) by a caption list; both indexed."""
    lib, ix, listing = tmp_path / "lib", tmp_path / "ix", tmp_path / "fav.csv"
    photos = make_images(lib, 3)
    (lib / "img000.txt").write_text("harbour at dawn")
    listing.write_text(f"path,caption\n{photos[0].as_uri()},zanzibar sunset\n{photos[1].as_uri()},kilimanjaro snow\n")
    index_json(ix, lib, "--model", tiny_model, "--device", "cpu")
    assert index_json(ix, listing)["added"] == 2
    return lib, ix, listing, photos


@pytest.mark.slow
def test_a_hit_shows_its_own_rows_caption_else_the_one_that_placed_it(tmp_path, tiny_model):
    """A hit showed the chosen row's path and id beside the ranked row's caption: a hybrid search for a list's caption
    ranked the list's row of img000.jpg first and showed the folder's row (its real path) with the list's caption,
    though the photo's own sidecar caption (img000.txt) says otherwise. A hit's caption is its shown row's, in the
    Python API, `query --json` and /api/search alike; where the shown row has none (img001.jpg, no sidecar), the
    caption of the name that placed it, not none. The list's row, shown where the search admits only it, keeps its."""
    import alignsearch
    from alignsearch.surfaces.server import ServerConfig, start_in_thread
    from helpers import call

    lib, ix, listing, photos = _captioned_twice(tmp_path, tiny_model)

    def first(hits: list[dict]) -> tuple:
        return hits[0]["path"], hits[0]["root"], hits[0]["caption"]

    def cli(*args: str) -> tuple:
        return first(json.loads(run("query", *args, "--mode", "hybrid", "-k", "3", "--json", "--index", ix).stdout)["results"])

    assert cli("zanzibar") == (str(photos[0]), str(lib), "harbour at dawn")
    assert cli("kilimanjaro") == (str(photos[1]), str(lib), "kilimanjaro snow")
    assert cli("zanzibar", "--where", f"root = {listing}") == (photos[0].as_uri(), str(listing), "zanzibar sunset")
    with alignsearch.open(ix, device="cpu") as engine:
        assert first([h.to_dict() for h in engine.search(text="zanzibar", mode="hybrid", k=3)])[2] == "harbour at dawn"
        server = start_in_thread(engine, ServerConfig(port=0))
        try:
            status, _, body = call(server.url, "/api/search?q=zanzibar&mode=hybrid&k=3", token=server.token)
            listed = call(server.url, "/api/recent?limit=10", token=server.token)
        finally:
            server.shutdown()
    assert status == 200, body
    assert first(json.loads(body)["results"]) == (str(photos[0]), str(lib), "harbour at dawn"), body
    # the landing page's listing shows each file by the same name with the same caption (it showed img001.jpg bare)
    assert listed[0] == 200, listed
    want = {str(photos[0]): "harbour at dawn", str(photos[1]): "kilimanjaro snow", str(photos[2]): None}
    assert {h["path"]: h["caption"] for h in json.loads(listed[2])["results"]} == want, listed[2]


@pytest.mark.slow
def test_export_gives_a_file_with_no_caption_of_its_own_the_caption_of_the_name_it_left_out(tmp_path, tiny_model):
    """Export writes a file once, by the name search shows, and left out the list's row naming it: the list's caption
    of img001.jpg (no sidecar) was in no row of the export, though search shows it for that file. The file's own
    caption still comes first (img000.jpg's sidecar), and a file no list names has none."""
    lib, ix, listing, photos = _captioned_twice(tmp_path, tiny_model)
    want = {str(photos[0]): "harbour at dawn", str(photos[1]): "kilimanjaro snow", str(photos[2]): None}
    run("export", tmp_path / "o.parquet", "--index", ix)
    assert {r["path"]: r["caption"] for r in pq.read_table(tmp_path / "o.parquet").to_pylist()} == want
    run("export", tmp_path / "clip", "--format", "clip-retrieval", "--index", ix)
    rows = pq.read_table(tmp_path / "clip" / "metadata" / "metadata_0.parquet").to_pylist()
    assert {r["image_path"]: r["caption"] for r in rows} == want
    # where --root admits only the list, its rows are exported with their own captions
    run("export", tmp_path / "list.parquet", "--index", ix, "--root", listing)
    assert sorted(r["caption"] for r in pq.read_table(tmp_path / "list.parquet").to_pylist()) == [
        "kilimanjaro snow", "zanzibar sunset"]


@pytest.mark.slow
def test_export_writes_a_file_two_names_reach_once_and_says_so(named_twice, tmp_path):
    """(b) `export` wrote a row per name: 6 rows for 4 files (img001.jpg and its file:// URL, img002.jpg and its
    link). One row per file, the one search shows, and the summary counts the rows left out; exporting the list's
    root alone keeps its row."""
    base, ix, photos = named_twice
    out = run("export", tmp_path / "all.parquet", "--index", ix).stdout
    assert "4 images exported" in out and "2 rows naming a file another row names left out" in out, out
    assert sorted(pq.read_table(tmp_path / "all.parquet").column("path").to_pylist()) == photos
    summary = json.loads(run("export", tmp_path / "fav.parquet", "--root", base / "fav.csv", "--json",
                             "--index", ix).stdout)
    assert (summary["rows"], summary["same_file"]) == (1, 0)
    assert pq.read_table(tmp_path / "fav.parquet").column("path").to_pylist() == [f"file://{photos[1]}"]


@pytest.mark.slow
def test_the_recent_listing_lists_a_file_two_names_reach_once(named_twice):
    """(b) The landing page's listing (/api/recent) listed img001.jpg and its file:// URL, img002.jpg and its link:
    total 6 for 4 files. Each file once, by its real path, pages by files (offset = files shown so far)."""
    from alignsearch.search.engine import open as open_index
    from alignsearch.surfaces.server import Library, ServerConfig

    base, ix, photos = named_twice
    library = Library(open_index(ix), ServerConfig())
    try:
        whole = library.recent(0, 60)
        assert whole["total"] == 4
        assert sorted(h["path"] for h in whole["results"]) == photos
        paged = [h["path"] for offset in range(4) for h in library.recent(offset, 1)["results"]]
        assert paged == [h["path"] for h in whole["results"]]
        assert library.recent(4, 1)["results"] == []
    finally:
        library.engine.db.dispose()




def _served_link_then_copy(tmp_path, tiny_model, keep_mtime: bool) -> dict:
    """lib/ of 3 photos and a-link.jpg -> img000.jpg, indexed, and a Library over it as `serve` holds it, which lists
    3 files (the link left out); then the link replaced by a copy of img000.jpg's bytes (keep_mtime: its mtime too)
    and `index` run again. The summary of that run, the photos, the copy and the Library listing then (recent)."""
    import shutil

    from alignsearch.search.engine import open as open_index
    from alignsearch.surfaces.server import Library, ServerConfig

    lib, ix = tmp_path / "lib", tmp_path / "ix"
    photos = make_images(lib, 3)
    link = lib / "a-link.jpg"
    link.symlink_to(photos[0])
    index_json(ix, lib, "--model", tiny_model, "--device", "cpu")
    library = Library(open_index(ix), ServerConfig())
    try:
        before = library.recent(0, 60)
        assert before["total"] == 3 and str(link) not in [h["path"] for h in before["results"]]
        link.unlink()
        (shutil.copy2 if keep_mtime else shutil.copy)(photos[0], link)
        summary = index_json(ix, lib, "--device", "cpu")
        first = library.recent(0, 2)
        paged = [h["path"] for h in first["results"]] + [h["path"] for h in library.recent(2, 2)["results"]]
    finally:
        library.engine.db.dispose()
    return {"summary": summary, "ix": ix, "files": sorted(map(str, [*photos, link])), "total": first["total"],
            "paged": sorted(paged)}


@pytest.mark.slow
def test_the_recent_listing_sees_a_link_replaced_by_a_copy_of_its_target(tmp_path, tiny_model):
    """The listing keeps the ids it leaves out (onefile.left_out) while the indexed rows' count and highest id stay
    the same (Library._same_file). A symlink beside its target is left out; replaced by a copy of the target's bytes
    it is a file of its own, listed. Its re-indexed row takes a new id (catalog.upsert_file) and the old row goes, so
    the count stays and the highest id moves: a row replaced in place, keeping its id, left the listing without it."""
    got = _served_link_then_copy(tmp_path, tiny_model, keep_mtime=False)
    assert got["summary"]["updated"] == 1, got["summary"]
    assert got["total"] == 4 and got["paged"] == got["files"]


@pytest.mark.slow
def test_the_recent_listing_sees_a_link_become_a_file_no_catalog_row_changed(tmp_path, tiny_model):
    """A symlink replaced by a copy of its target's bytes, size and mtime: `index` found it unchanged (it stats
    through the link), so no row changed and the listing's cache key (the indexed rows' count and highest id) stayed;
    a running server's listing left the copy out (total 3) while a search listed it and a new server did (4). The
    catalog records which names are links (catalog.links): the name's change is a change, its row indexed again."""
    got = _served_link_then_copy(tmp_path, tiny_model, keep_mtime=True)
    s = got["summary"]
    assert (s["added"], s["updated"], s["removed"]) == (0, 1, 0), s
    assert len(_paths(got["ix"], "query", "x", "-k", "10")) == 4
    assert got["total"] == 4 and got["paged"] == got["files"]


@pytest.mark.slow
def test_the_recent_listing_sees_a_file_become_a_link_and_a_link_retargeted(tmp_path, tiny_model):
    """The reverse: a copy of a photo (same bytes, size and mtime) replaced by a link to it was found unchanged, and
    a running server listed the link as a file of its own (4 where a new server lists 3). A link pointed at another
    copy of its target's bytes, size and mtime (outside the folder) is a file of its own again (4)."""
    import shutil

    from alignsearch.search.engine import open as open_index
    from alignsearch.surfaces.server import Library, ServerConfig

    lib, ix, elsewhere = tmp_path / "lib", tmp_path / "ix", tmp_path / "elsewhere"
    photos = make_images(lib, 3)
    copy = lib / "a-copy.jpg"
    shutil.copy2(photos[0], copy)
    index_json(ix, lib, "--model", tiny_model, "--device", "cpu")
    library = Library(open_index(ix), ServerConfig())
    try:
        assert library.recent(0, 60)["total"] == 4
        copy.unlink()
        copy.symlink_to(photos[0])
        summary = index_json(ix, lib, "--device", "cpu")
        assert (summary["added"], summary["updated"], summary["removed"]) == (0, 1, 0), summary
        listed = library.recent(0, 60)
        assert listed["total"] == 3 and str(copy) not in [h["path"] for h in listed["results"]], listed
        elsewhere.mkdir()
        shutil.copy2(photos[0], elsewhere / "img000.jpg")
        copy.unlink()
        copy.symlink_to(elsewhere / "img000.jpg")
        summary = index_json(ix, lib, "--device", "cpu")
        assert (summary["added"], summary["updated"], summary["removed"]) == (0, 1, 0), summary
        assert library.recent(0, 60)["total"] == 4
        assert (index_json(ix, lib, "--device", "cpu")["updated"]) == 0  # recorded: the next run finds no change
    finally:
        library.engine.db.dispose()


def test_the_name_shown_is_the_real_path_then_the_shortest(tmp_path):
    """onefile.shown_first: the real path before a link's name or a file:// URL of it; among names that all go
    through links (the file outside every root), the shortest, then byte order; others() keeps one row per file."""
    from alignsearch.search import onefile
    from alignsearch.storage.catalog import FileRow

    outside, lib = tmp_path / "outside", tmp_path / "lib"
    outside.mkdir()
    lib.mkdir()
    (outside / "a.jpg").write_bytes(b"x")
    (lib / "a.jpg").write_bytes(b"y")
    (lib / "link.jpg").symlink_to(lib / "a.jpg")
    (lib / "l1.jpg").symlink_to(outside / "a.jpg")
    (lib / "long-link.jpg").symlink_to(outside / "a.jpg")

    def row(i, root, relpath):
        return FileRow(i, str(root), relpath, None, 1, 0.0, "h", 1, 1, "JPEG", "indexed", None, 0.0, 0)

    csv = tmp_path / "fav.csv"
    rows = [row(1, lib, "link.jpg"), row(2, csv, (lib / "a.jpg").as_uri()), row(3, lib, "a.jpg"),
            row(4, lib, "long-link.jpg"), row(5, lib, "l1.jpg")]
    assert min(rows[:3], key=onefile.shown_first).id == 3
    assert min(rows[3:], key=onefile.shown_first).id == 5
    assert onefile.others(rows) == {1, 2, 4}
    assert onefile.others(rows, admitted=lambda r: r.id != 3) == {2, 4}  # the link first, then the URL (longer)


def test_a_real_path_through_the_folder_memo_is_realpaths(tmp_path):
    """onefile.real_path with a folder memo (one realpath a folder, one lstat a name) answers what os.path.realpath
    does: a plain name, a symlink (to a file, to a missing one), a name inside a symlinked folder, a gone name."""
    import os

    from alignsearch.search import onefile
    from alignsearch.storage.catalog import FileRow

    lib, other = tmp_path / "lib", tmp_path / "other"
    (lib / "sub").mkdir(parents=True)
    other.mkdir()
    (other / "b.jpg").write_bytes(b"b")
    (lib / "a.jpg").write_bytes(b"a")
    (lib / "to-b.jpg").symlink_to(other / "b.jpg")
    (lib / "dangling.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (lib / "linked").symlink_to(other)
    names = ["a.jpg", "to-b.jpg", "dangling.jpg", "linked/b.jpg", "gone.jpg", "sub/../a.jpg"]
    memo: dict = {}
    for name in names:
        row = FileRow(1, str(lib), name, None, 1, 0.0, "h", 1, 1, "JPEG", "indexed", None, 0.0, 0)
        assert onefile.real_path(row, memo) == onefile.real_path(row) == os.path.realpath(os.fsencode(lib / name)), name


def _link_shapes(tmp_path):
    """lib/ (the root) and other/ with a file each, and in lib/ a link of each shape onefile._through_link follows or
    leaves to realpath: absolute, relative, through `..`, a chain across folders, a link to a link in a symlinked
    folder, a loop, dangling, a target naming a folder (`..`). Returns (lib, [names])."""
    lib, other = tmp_path / "lib", tmp_path / "other"
    (lib / "sub").mkdir(parents=True)
    other.mkdir()
    (lib / "a.jpg").write_bytes(b"a")
    (other / "b.jpg").write_bytes(b"b")
    (other / "to-a.jpg").symlink_to("../lib/a.jpg")
    (lib / "linked").symlink_to(other)
    links = {"abs.jpg": lib / "a.jpg", "rel.jpg": "a.jpg", "up.jpg": "sub/../../other/b.jpg",
             "chain.jpg": "linked/to-a.jpg", "chain2.jpg": "chain.jpg", "loop1.jpg": "loop2.jpg",
             "loop2.jpg": "loop1.jpg", "dangling.jpg": tmp_path / "nowhere.jpg", "dotdot.jpg": "sub/..",
             "sub/back.jpg": "../rel.jpg"}
    for name, target in links.items():
        (lib / name).symlink_to(target)
    return lib, ["a.jpg", "linked/b.jpg", "gone.jpg", *links]


def _realpath_others(rows) -> set[int]:
    """onefile.others as the code before the folder memo answered it: each row's key (onefile.key with no memo: its
    local name resolved whole by os.path.realpath), the row shown first by shown_first with no memo (the same)."""
    from alignsearch.search import onefile

    best, out = {}, set()
    for row in rows:
        key = onefile.key(row)
        order = onefile.shown_first(row)
        if key not in best:
            best[key] = (order, row.id)
        elif order < best[key][0]:
            out.add(best[key][1])
            best[key] = (order, row.id)
        else:
            out.add(row.id)
    return out


def test_links_followed_through_the_folder_memo_lead_where_realpath_does(tmp_path):
    """onefile.real_path follows a link from the folder memo (readlink, its target's folder resolved once): each
    shape of link leads where os.path.realpath of the whole name does, with a fresh memo and with one shared by all."""
    import os

    from alignsearch.search import onefile
    from alignsearch.storage.catalog import FileRow

    lib, names = _link_shapes(tmp_path)
    shared: dict = {}
    for name in names:
        row = FileRow(1, str(lib), name, None, 1, 0.0, "h", 1, 1, "JPEG", "indexed", None, 0.0, 0)
        want = os.path.realpath(os.fsencode(lib / name))
        assert onefile.real_path(row, {}) == onefile.real_path(row, shared) == want, name
    assert onefile.real_path(FileRow(1, str(lib), "chain2.jpg", None, 1, 0.0, "h", 1, 1, "JPEG", "indexed", None,
                                     0.0, 0), {}) == os.fsencode(lib / "a.jpg")  # a link resolved, not its name


def test_the_rows_left_out_are_realpaths_answer_as_links_change(tmp_path):
    """onefile.others (the recent listing's and export's left-out rows) over rows of one content naming every link
    shape (and a list naming two of them), the same as resolving each name whole with os.path.realpath: as indexed,
    then with links pointed elsewhere, then with links removed (the catalog not told: a server's next first page)."""
    import os

    from alignsearch.search import onefile
    from alignsearch.storage.catalog import FileRow

    lib, names = _link_shapes(tmp_path)
    csv = tmp_path / "fav.csv"
    rows = [FileRow(i, str(lib), name, None, 1, 0.0, "h", 1, 1, "JPEG", "indexed", None, 0.0, 0)
            for i, name in enumerate(names, 1)]
    rows += [FileRow(90, str(csv), (lib / "chain2.jpg").as_uri(), None, 1, 0.0, "h", 1, 1, "JPEG", "indexed", None,
                     0.0, 0),
             FileRow(91, str(csv), str(lib / "linked" / "b.jpg"), None, 1, 0.0, "h", 1, 1, "JPEG", "indexed", None,
                     0.0, 0)]
    first = onefile.others(rows)
    assert first == _realpath_others(rows)
    assert {r.relpath for r in rows if r.id in first} >= {"abs.jpg", "rel.jpg", "chain.jpg", "chain2.jpg"}
    for name, target in (("abs.jpg", tmp_path / "other" / "b.jpg"), ("rel.jpg", "linked/b.jpg"),
                         ("chain.jpg", "up.jpg"), ("loop2.jpg", "a.jpg")):
        os.unlink(lib / name)
        (lib / name).symlink_to(target)
    retargeted = onefile.others(rows)
    assert retargeted == _realpath_others(rows) and retargeted != first
    for name in ("chain.jpg", "rel.jpg", "sub/back.jpg"):
        os.unlink(lib / name)
    assert onefile.others(rows) == _realpath_others(rows)


@pytest.mark.slow
def test_names_through_a_symlinked_folder_show_the_files_own_name(tmp_path, tiny_model):
    """A list naming photos through a folder that is itself a symlink (~/Pictures on another disk; macOS's /tmp), or
    a folder root that became one (moved to another disk, a link left behind): no name is a real path, so the
    shortest won, and a symlink `l.jpg` beside IMG_0001.jpg was the hit shown (and the row exported, the landing
    page's entry) for that photo, its own name left out. Its own name is shown: the real path reached through a
    link above the root's folder, none below it."""
    from alignsearch.search import onefile
    from alignsearch.storage.catalog import FileRow

    disk, lib, ix = tmp_path / "disk", tmp_path / "Pictures", tmp_path / "ix"
    photos = make_images(disk, 3)
    own = photos[1].rename(photos[1].with_name("IMG_0001" + photos[1].suffix))
    (disk / "l.jpg").symlink_to(own.name)
    lib.symlink_to(disk)

    def row(i, relpath):
        return FileRow(i, str(lib), relpath, None, 1, 0.0, "h", 1, 1, "JPEG", "indexed", None, 0.0, 0)

    rows = [row(1, own.name), row(2, "l.jpg")]
    assert min(rows, key=onefile.shown_first).id == 1
    assert onefile.others(rows) == {2}
    (tmp_path / "lists").mkdir()
    listed = tmp_path / "lists" / "fav.csv"  # not above the link: a folder link below a list's folder is refused
    listed.write_text("path\n" + "".join(f"{lib / name}\n" for name in ("l.jpg", own.name, photos[0].name)))
    index_json(ix, listed, "--model", tiny_model, "--device", "cpu")
    assert sorted(_paths(ix, "query", "x", "-k", "10")) == sorted([str(lib / own.name), str(lib / photos[0].name)])


@pytest.mark.slow
def test_a_search_over_long_videos_reads_the_rows_of_its_hits_moments_only(tmp_path, monkeypatch):
    """Every moment of a video holds the video's sha256: the rows of each hit's content were read by hash alone, so
    a search whose hits held moments of long videos read every moment of each (36,000 rows, ~0.6 s a search, at
    ten two-hour videos: benchmarks/bench_onefile_video.py). Only the rows of the hits' (sha256, moment) are read."""
    import alignsearch
    from alignsearch.storage import catalog
    from helpers import video_moments_index

    ix = video_moments_index(tmp_path / "ix", videos=4, moments=500, dim=16)
    checked, real_check = [], catalog.check_rows  # every row read is checked: their count, per read
    monkeypatch.setattr(catalog, "check_rows", lambda conn, rows: checked.append(len(rows)) or real_check(conn, rows))
    engine = alignsearch.open(ix)
    try:
        query = np.ones(16, dtype=np.float32) / 4.0
        hits = engine.search_vector(query, k=10)
    finally:
        engine.close()
    assert len(hits) == 10 and len({h.path for h in hits}) == 4, [h.path for h in hits]  # capped per video
    assert sum(checked) < 100, checked  # the hits' rows and their contents' (each one row): not 2,000 moments


def test_the_rows_of_a_moments_content_are_found_by_the_index_on_sha256_and_moment(tmp_path):
    """Read by (sha256, moment), a video moment's rows were still found by walking all of the video's moments in
    files_sha256 (on sha256 alone) to match the moment: 13 ms a search before onefile, 44 ms after, at k=10 over
    10 videos x 3,600 moments (bench_onefile_video.py). Since schema 10 the index holds both columns, and the read
    seeks on both."""
    from sqlalchemy import create_engine

    from alignsearch.storage import catalog
    from helpers import video_moments_index

    ix = video_moments_index(tmp_path / "ix", videos=2, moments=50, dim=16)
    db = create_engine(f"sqlite:///{ix / 'catalog.db'}")
    plans = []
    with db.connect() as conn:
        conn.connection.driver_connection.set_trace_callback(plans.append)  # the SQL rows_holding sends
        found = catalog.rows_holding(conn, [("%064x" % 1, 3), ("%064x" % 0, 7)])
        conn.connection.driver_connection.set_trace_callback(None)
        query = next(q for q in plans if "FROM files" in q)
        plan = " ".join(row[-1] for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {query}"))
    db.dispose()
    assert sorted((r.sha256[-1], r.moment) for r in found) == [("0", 7), ("1", 3)]
    assert "files_sha256 (sha256=? AND moment=?)" in plan, plan


@pytest.mark.slow
def test_a_link_beside_a_photo_whose_name_is_not_utf8_is_one_hit_shown_by_that_name(tmp_path, tiny_model):
    """The key is the real path as bytes: a photo whose name is not UTF-8 and holds a control character, with a
    symlink beside it, is one hit (its own name, not the link's), and a second real file of the same bytes stays a
    hit of its own."""
    import os
    import shutil

    import alignsearch

    lib, ix = tmp_path / "lib", tmp_path / "ix"
    photos = make_images(lib, 2)
    odd = os.path.join(os.fsencode(lib), b"\xffph\x01oto.jpg")
    os.rename(photos[0], odd)
    os.symlink(odd, os.path.join(os.fsencode(lib), b"z-link.jpg"))
    copy = lib / "copy.jpg"
    shutil.copyfile(odd, copy)  # same bytes, another file
    index_json(ix, lib, "--model", tiny_model, "--device", "cpu")
    with alignsearch.open(ix, device="cpu") as engine:
        hits = engine.search(text="x", k=10)
    names = sorted(os.fsencode(h.path) for h in hits)
    assert names == sorted([odd, os.fsencode(copy), os.fsencode(photos[1])]), names


@pytest.mark.slow
def test_a_schema_12_index_answers_as_it_stands_and_its_next_index_run_upgrades_it_and_records_its_links(
        tmp_path, tiny_model):
    """Schema 13 added catalog.links. An index of schema 12 (the same catalog without that table) is read as it
    stands by a search and the recent listing (writing nothing); the next `index` upgrades it, finds its link a
    change once (the link was not recorded: its row indexed again, its vector reused, none encoded) and then none;
    the link replaced by a copy of its target is then seen."""
    import shutil
    import sqlite3

    from alignsearch.search.engine import open as open_index
    from alignsearch.storage import migrate
    from alignsearch.surfaces.server import Library, ServerConfig
    from helpers import dump

    lib, ix = tmp_path / "lib", tmp_path / "ix"
    photos = make_images(lib, 3)
    link = lib / "a-link.jpg"
    link.symlink_to(photos[0])
    index_json(ix, lib, "--model", tiny_model, "--device", "cpu")
    db = ix / "catalog.db"
    conn = sqlite3.connect(db)
    with conn:
        conn.execute("DROP TABLE links")
        conn.execute("UPDATE meta SET value = '12' WHERE key = 'schema_version'")
    conn.close()
    before, vectors = dump(db), (ix / "vectors.f16").stat().st_size

    def version() -> int:
        c = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            return int(c.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0])
        finally:
            c.close()

    assert sorted(_paths(ix, "query", "x", "-k", "10")) == sorted(map(str, photos))
    library = Library(open_index(ix), ServerConfig())
    try:
        assert library.recent(0, 60)["total"] == 3
    finally:
        library.engine.db.dispose()
    assert version() == 12 and dump(db) == before  # a reader writes nothing
    first = index_json(ix, lib, "--device", "cpu")
    assert version() == migrate.LATEST
    assert (first["added"], first["updated"], first["removed"]) == (0, 1, 0), first
    assert (ix / "vectors.f16").stat().st_size == vectors  # the link's content known: its vector reused
    assert index_json(ix, lib, "--device", "cpu")["updated"] == 0
    link.unlink()
    shutil.copy2(photos[0], link)
    assert index_json(ix, lib, "--device", "cpu")["updated"] == 1
    assert sorted(_paths(ix, "query", "x", "-k", "10")) == sorted(map(str, [*photos, link]))


@pytest.mark.slow
def test_a_names_link_record_outlives_a_reindex_and_rides_a_ray_batch(tmp_path, tiny_model):
    """The record of a link (catalog.links) is kept by `index --reindex` (it encodes every row again from the
    catalog, never listing a name): lost, the next run found every link a change and read it again. Ray's batch
    rows carry Found.link, b"" and None alike (lost there, each run read the links it indexed again)."""
    from indexer import ray_pipeline
    from indexer.scan import Found

    lib, ix = tmp_path / "lib", tmp_path / "ix"
    photos = make_images(lib, 2)
    (lib / "a-link.jpg").symlink_to(photos[0])
    index_json(ix, lib, "--model", tiny_model, "--device", "cpu")
    assert index_json(ix, lib, "--device", "cpu")["updated"] == 0
    index_json(ix, "--reindex", "--device", "cpu")
    again = index_json(ix, lib, "--device", "cpu")
    assert (again["added"], again["updated"], again["removed"]) == (0, 0, 0), again
    for link in (None, b"", b"../img000.jpg"):
        found = Found(str(lib), "a.jpg", 1, 2.0, None, None, link=link)
        batch = {key: [value] for key, value in ray_pipeline._row(found).items()}
        assert ray_pipeline._found(batch, 0) == found
