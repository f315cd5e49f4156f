"""Sources beyond a local folder: list files (CSV / parquet), URL prefixes through fsspec, WebDataset
tar shards. Each must index the same images as the folder they came from, and re-runs stay incremental."""

import csv
import importlib.util
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

import alignsearch
from alignsearch.media import sources
from alignsearch.errors import BadInputError
from indexer.job import index_folders
from indexer.scan import scan
from conftest import run, index_json
from helpers import write_shard


def results(ix, query_image) -> list[tuple[str, float]]:
    """(file name, score) of every hit: sources are compared by the images they return."""
    with alignsearch.open(ix) as engine:
        return [(h.relpath.rsplit("/", 1)[-1], round(h.score, 4)) for h in engine.search(image=query_image, k=30)]


def test_kind_expand_location():
    assert sources.kind("/data/photos") == sources.FOLDER
    assert sources.kind("s3://bucket/photos/") == sources.PREFIX
    assert sources.kind("gs://b/list.parquet") == sources.LIST
    assert sources.kind("/d/urls.CSV") == sources.LIST
    assert sources.kind("https://host/shard-0001.tar") == sources.TAR
    assert sources.expand("s-{08..11}.tar") == ["s-08.tar", "s-09.tar", "s-10.tar", "s-11.tar"]
    assert sources.expand("a{0..1}/b{1..2}.tar") == ["a0/b1.tar", "a0/b2.tar", "a1/b1.tar", "a1/b2.tar"]
    with pytest.raises(BadInputError, match="counts down"):
        sources.expand("s-{9..1}.tar")
    assert sources.location("/d/s.tar", "x/1.jpg") == "/d/s.tar/x/1.jpg"
    assert sources.location("s3://b/p", "a/1.jpg") == "s3://b/p/a/1.jpg"
    assert sources.location("/d/list.csv", "s3://b/1.jpg") == "s3://b/1.jpg"
    assert sources.info_mtime({"LastModified": "2026-01-02T03:04:05Z"}) == 1767323045.0
    assert sources.info_mtime({"size": 3}) == 0.0


def test_read_list_columns(tmp_path):
    headed = tmp_path / "a.csv"
    headed.write_text("caption,URL\nx,/p/1.jpg\ny,/p/2.jpg\n")
    assert sources.read_list(str(headed)) == ["/p/1.jpg", "/p/2.jpg"]
    bare = tmp_path / "b.csv"
    bare.write_text("/p/1.jpg\n/p/2.jpg\n")  # find(1) output: no header
    assert sources.read_list(str(bare)) == ["/p/1.jpg", "/p/2.jpg"]
    other = tmp_path / "c.csv"
    other.write_text("caption,where\nx,/p/1.jpg\n")
    with pytest.raises(BadInputError, match="--list-column"):
        sources.read_list(str(other))
    assert sources.read_list(str(other), "where") == ["/p/1.jpg"]


def test_missing_fsspec_package_says_what_to_install():
    if importlib.util.find_spec("s3fs") is not None:
        pytest.skip("s3fs is installed here")
    with pytest.raises(BadInputError, match="pip install s3fs") as caught:
        sources.normalise("s3://bucket/photos")
    # fsspec's own "Install s3fs to access S3." was said before ours: the package named twice in one line
    assert str(caught.value).count("s3fs") == 2 and "Install s3fs to access" not in str(caught.value), caught.value


@pytest.mark.slow
def test_list_file_indexes_its_entries_and_follows_edits(tmp_path, corpus, tiny_model):
    folder_ix, list_ix = tmp_path / "folder-ix", tmp_path / "list-ix"
    index_json(folder_ix, corpus, "--model", tiny_model, "--device", "cpu", "--workers", "0")
    files = sorted(p for p in corpus.rglob("*") if p.is_file())
    listing = tmp_path / "lists" / "photos.csv"
    listing.parent.mkdir()
    with open(listing, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["caption", "image"])
        for i, p in enumerate(files):  # relative entries are relative to the list's folder
            w.writerow([f"c{i}", f"../corpus/{p.relative_to(corpus)}" if i % 2 else str(p)])
        w.writerow(["gone", str(tmp_path / "nowhere.jpg")])
    first = index_json(list_ix, listing, "--model", tiny_model, "--device", "cpu", "--workers", "2")
    assert (first["added"], first["failed"]) == (18, 2)  # 19 files + a missing entry; 2 fail (not counted as added)
    query = files[3]
    assert results(list_ix, query) == results(folder_ix, query)
    with alignsearch.open(list_ix) as engine:
        failed = {f.relpath: f.reason for f in engine.failed()}
        hit = engine.search(image=query, k=1)[0]
    assert failed[str(tmp_path / "nowhere.jpg")] == "file not found"
    assert hit.path == str(query)

    again = index_json(list_ix)  # the list is remembered as a root
    assert (again["added"], again["unchanged"], again["removed"]) == (0, 20, 0)
    lines = listing.read_text().splitlines()
    listing.write_text("\n".join(lines[:5]) + "\n")  # header + 4 entries
    shrunk = index_json(list_ix)
    info = alignsearch.open(list_ix).info()
    assert shrunk["removed"] == 16 and (info["images"], info["failed"]) == (3, 1)  # broken.jpg sorts first


@pytest.mark.slow
def test_parquet_list_with_a_named_column(tmp_path, corpus, tiny_model):
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted(str(p) for p in corpus.rglob("*.jpg") if p.name != "broken.jpg")
    listing = tmp_path / "photos.parquet"
    pq.write_table(pa.table({"where": files, "n": list(range(len(files)))}), listing)
    run("index", listing, "--index", tmp_path / "ix", "--model", tiny_model, "--device", "cpu", code=6)
    s = index_json(tmp_path / "ix", listing, "--list-column", "where")
    assert s["added"] == len(files) and s["failed"] == 0
    assert index_json(tmp_path / "ix")["unchanged"] == len(files)  # the column is remembered


@pytest.mark.slow
def test_webdataset_shards_index_like_the_folder(tmp_path, corpus, tiny_model):
    folder_ix, tar_ix = tmp_path / "folder-ix", tmp_path / "tar-ix"
    index_json(folder_ix, corpus, "--model", tiny_model, "--device", "cpu", "--workers", "0")
    files = sorted(p for p in corpus.rglob("*") if p.is_file())
    shards = tmp_path / "shards"
    shards.mkdir()
    for s in range(3):
        write_shard(shards / f"part-{s:03d}.tar", files[s::3], corpus)
    first = index_json(tar_ix, shards / "part-{000..002}.tar", "--model", tiny_model, "--device", "cpu", "--workers", "2")
    assert (first["added"], first["failed"]) == (18, 1)  # captions and .json members are not images
    query = files[4]
    assert results(tar_ix, query) == results(folder_ix, query)
    with alignsearch.open(tar_ix) as engine:
        hit = engine.search(image=query, k=1)[0]
        row = engine.file(hit.id)
    key = query.relative_to(corpus).as_posix()
    assert hit.relpath == key and hit.path == f"{shards}/part-{files.index(query) % 3:03d}.tar/{key}"
    assert row.read() == query.read_bytes()  # read back by member name (the server's thumbnails)
    again = index_json(tar_ix)
    assert (again["added"], again["unchanged"]) == (0, 19)


@pytest.mark.slow
def test_url_prefix_through_fsspec(tmp_path, corpus, tiny_model):
    """file:// goes through fsspec in the decode workers; memory:// is in-process only, so 0 workers."""
    import fsspec

    folder_ix = tmp_path / "folder-ix"
    index_json(folder_ix, corpus, "--model", tiny_model, "--device", "cpu", "--workers", "0")
    url_ix = tmp_path / "url-ix"
    s = index_json(url_ix, f"file://{corpus}/", "--model", tiny_model, "--device", "cpu", "--workers", "2")
    assert (s["added"], s["failed"]) == (18, 1)
    query = corpus / "nested" / "img002.jpg"
    assert results(url_ix, query) == results(folder_ix, query)
    with alignsearch.open(url_ix) as engine:
        assert engine.info()["roots"] == [f"file://{corpus}"]
        assert engine.search(image=query, k=1)[0].path == f"file://{query}"

    fs = fsspec.filesystem("memory")
    for p in sorted(corpus.rglob("*.png")):
        fs.pipe(f"/bucket/photos/{p.relative_to(corpus).as_posix()}", p.read_bytes())
    fs.pipe("/bucket/photos/notes.txt", b"not an image")
    found = list(scan("memory://bucket/photos"))
    assert [f.relpath for f in found] == ["img000.png", "img003.png", "img006.png", "img009.png",
                                          "nested/img000.png", "nested/img003.png"]
    summary = index_folders(["memory://bucket/photos"], tmp_path / "mem-ix", model=str(tiny_model), device="cpu",
                            workers=0)
    assert summary.added == 6 and summary.failed == 0
    fs.rm("/bucket/photos/img003.png")
    assert index_folders([], tmp_path / "mem-ix", workers=0).removed == 1
    vectors = alignsearch.open(tmp_path / "mem-ix").vector_of(1)
    assert np.isfinite(vectors).all()


def test_kind_by_url_path_and_folders_named_like_files(tmp_path):
    (tmp_path / "photos.tar").mkdir()
    assert sources.kind(str(tmp_path / "photos.tar")) == sources.FOLDER
    assert sources.kind("https://h/s-001.tar?X-Amz-Signature=abc") == sources.TAR
    assert sources.kind("https://h/lists/x.parquet?sig=1") == sources.LIST


def test_transient_errors_keep_vectors_and_failed_reads_are_retried():
    from alignsearch.storage.catalog import FileRow
    from indexer.scan import Found, diff

    def row(i, rel, status="indexed", reason=None):
        return FileRow(i, "/l.csv", rel, None, 10, 5.0, "h", 1, 1, "PNG", status, reason, 0.0, i if status == "indexed" else None)

    a, b, c, d = "s3://b/a.jpg", "s3://b/b.jpg", "s3://b/c.jpg", "/local/d.jpg"
    known = {a: row(1, a), b: row(2, b, "failed", "cannot read: timed out"), c: row(3, c, "failed", "not an image"),
             d: row(4, d, "failed", "cannot read: Permission denied")}
    found = [Found("/l.csv", a, 0, 0.0, "cannot stat: timed out"), Found("/l.csv", b, 10, 5.0),
             Found("/l.csv", c, 10, 5.0), Found("/l.csv", d, 10, 5.0)]
    out = diff(found, known)
    assert [f.relpath for f in out.todo] == [b] and out.unchanged == 3 and out.removed == []  # local: not retried
    gone = diff([Found("/l.csv", a, 0, 0.0, "file not found")], {a: row(1, a)})
    assert [f.relpath for f in gone.todo] == [a]  # really gone: recorded as failed, vector dropped


def test_a_new_root_that_cannot_be_listed_is_not_remembered(tmp_path, tiny_model):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    out = run("index", empty, "--index", tmp_path / "ix", "--model", tiny_model, code=6)
    assert "cannot index" in out.output and "empty.csv" in out.output
    assert "no folder to index" in run("index", "--index", tmp_path / "ix", code=6).output


def test_non_utf8_tar_member_names(tmp_path, tiny_model):
    from conftest import make_images

    img = make_images(tmp_path / "src", 1)[0]
    shard = tmp_path / "odd.tar"
    with tarfile.open(shard, "w", format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape") as tar:
        name = b"caf\xe9.png".decode("utf-8", "surrogateescape")
        info = tarfile.TarInfo(name)
        data = img.read_bytes()
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    s = index_json(tmp_path / "ix", shard, "--model", tiny_model, "--device", "cpu", "--workers", "0")
    assert (s["added"], s["failed"]) == (1, 0)
    with alignsearch.open(tmp_path / "ix") as engine:
        row = engine.file(engine.search(image=img, k=1)[0].id)
    assert row.relpath == "caf\\xe9.png" and row.read() == img.read_bytes()


def test_server_serves_tar_members_over_a_socket(tmp_path, corpus, tiny_model, monkeypatch):
    import urllib.request

    from alignsearch.surfaces.server import ServerConfig, start_in_thread

    files = sorted(p for p in corpus.rglob("*.png"))
    write_shard(tmp_path / "s.tar", files, corpus)
    index_json(tmp_path / "ix", tmp_path / "s.tar", "--model", tiny_model, "--device", "cpu", "--workers", "0")
    engine = alignsearch.open(tmp_path / "ix", device="cpu")
    listings = []
    members = sources.tar_members
    monkeypatch.setattr(sources, "tar_members", lambda root: listings.append(root) or members(root))
    server = start_in_thread(engine, ServerConfig(port=0))
    auth = {"Authorization": f"Bearer {server.token}"}
    try:
        for f in files[:3]:
            hit = engine.search(image=f, k=1)[0]
            with urllib.request.urlopen(urllib.request.Request(f"{server.url}/api/image/{hit.id}", headers=auth), timeout=30) as r:
                assert r.headers["Content-Type"] == "image/png" and r.read() == f.read_bytes()
            with urllib.request.urlopen(urllib.request.Request(f"{server.url}/api/image/{hit.id}?size=32", headers=auth),
                                        timeout=30) as r:
                assert r.headers["Content-Type"] == "image/jpeg" and r.read()[:2] == b"\xff\xd8"
        assert listings == [str(tmp_path / "s.tar")]  # the shard's headers were read once, then kept
    finally:
        server.shutdown()
        engine.close()


@pytest.mark.slow
def test_catalog_keys_are_lossless_and_duplicate_members_reported_not_updated_forever(tmp_path, tiny_model):
    """Issue 24 #13: a name that is not UTF-8 and a file literally named like its \\xNN form shared one catalog
    key: one was never searchable. Keys are lossless now: both are indexed and found, each as itself. Two tar
    members with one name are one entry (the last), reported; a second run changes nothing and adds no
    vector row; verify is ok; a name with control characters is shown escaped."""
    import io
    import json
    import os
    import tarfile

    from conftest import index_json, make_images

    pics = make_images(tmp_path / "pics", 6)
    shard = tmp_path / "shard.tar"
    with tarfile.open(shard, "w") as tar:
        for name, path in (("a.jpg", pics[1]), ("b.jpg", pics[2]), ("a.jpg", pics[0])):
            data = path.read_bytes()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    folder = tmp_path / "folder"
    folder.mkdir()
    names = {b"caf\xe9.jpg": pics[3], b"caf\\xe9.jpg": pics[4], b"back\\\\slash\x1b[2J.jpg": pics[5]}
    for raw, path in names.items():
        os.rename(path, os.path.join(os.fsencode(folder), raw))
    ix = tmp_path / "ix"
    first = index_json(ix, shard, folder, "--model", tiny_model, "--device", "cpu")
    assert first["added"] == 5, first
    assert first["notes"] == [f"{shard}/a.jpg: 2 entries share this name in the catalog (duplicate members); "
                              "only the last one listed is indexed"], first["notes"]
    with alignsearch.open(ix) as engine:
        for raw, path in names.items():
            hit = engine.search(image=os.fsdecode(os.path.join(os.fsencode(folder), raw)), k=1)[0]
            assert os.fsencode(hit.path) == os.path.join(os.fsencode(folder), raw) and hit.score > 0.999, raw
            assert engine.file(hit.id).read() == Path(os.fsdecode(os.path.join(os.fsencode(folder), raw))).read_bytes()
        member = engine.search(image=pics[0], k=1)[0]
        assert member.path == f"{shard}/a.jpg" and member.score > 0.999
    rows = (ix / "vectors.f16").stat().st_size
    again = index_json(ix, shard, folder)
    assert again["updated"] == 0 and again["added"] == 0 and again["unchanged"] == 5, again
    assert (ix / "vectors.f16").stat().st_size == rows
    assert json.loads(run("verify", "--index", ix, "--json").output)["ok"]
    listed = run("query", "x", "-k", "10", "--index", ix).output
    assert "\x1b" not in listed and "back\\\\slash\\x1b[2J.jpg" in listed, listed
    assert "caf\\xe9.jpg" in listed and "caf\\\\xe9.jpg" not in listed
    only = run("query", "x", "-k", "10", "--path", "back\\\\slash*", "--index", ix).output  # as the name is spelled
    assert "slash" in only and "caf" not in only, only


@pytest.mark.slow
def test_keys_written_before_they_were_lossless_are_upgraded_in_place(tmp_path, tiny_model):
    """An index written when a backslash in a name was kept as it is: its rows get the lossless key the
    next time a writer opens it (catalog.upgrade_keys_lossless), ids and vectors kept, nothing re-encoded."""
    import os

    from sqlalchemy import text

    from alignsearch.storage import catalog, state
    from conftest import index_json, make_images

    pics = make_images(tmp_path / "pics", 3)
    os.rename(pics[0], pics[0].with_name("a\\xe9.jpg"))
    os.rename(pics[1], os.path.join(os.fsencode(pics[1].parent), b"b\\\xe9.jpg"))
    ix = tmp_path / "ix"
    index_json(ix, tmp_path / "pics", "--model", tiny_model, "--device", "cpu")
    db = catalog.connect(ix / "catalog.db")
    with db.begin() as conn:  # as the old code wrote them: the name itself, \\xNN for bytes not UTF-8
        conn.execute(text("UPDATE files SET relpath = 'a\\xe9.jpg', relpath_raw = NULL WHERE relpath = 'a\\\\xe9.jpg'"))
        conn.execute(text("UPDATE files SET relpath = 'b\\\\xe9.jpg' WHERE relpath = 'b\\\\\\xe9.jpg'"))
        state.write(conn, keys_lossless=None)
        before = dict(conn.execute(text("SELECT id, relpath FROM files")).all())
    db.dispose()
    rows = (ix / "vectors.f16").stat().st_size
    again = index_json(ix, tmp_path / "pics")
    assert (again["added"], again["updated"], again["unchanged"]) == (0, 0, 3), again
    assert (ix / "vectors.f16").stat().st_size == rows
    db = catalog.connect(ix / "catalog.db", readonly=True)
    with db.connect() as conn:
        after = {r[0]: (r[1], r[2]) for r in conn.execute(text("SELECT id, relpath, relpath_raw FROM files"))}
    db.dispose()
    assert set(after) == set(before)
    assert sorted(after.values(), key=str) == sorted([("a\\\\xe9.jpg", b"a\\xe9.jpg"), ("b\\\\\\xe9.jpg", b"b\\\xe9.jpg"),
                                                      (pics[2].name, None)], key=str), after


@pytest.mark.slow
def test_a_refused_run_is_not_taken_for_an_interrupted_one(tmp_path, tiny_model):
    """A run refused before it writes anything (a new root that cannot be listed, no folder to index) left the
    index marked as a run under way: `info` then said the last run was interrupted and told the user to run index
    again, and `verify` took a later real leftover for one of that run."""
    from conftest import make_images

    ix = tmp_path / "ix"
    make_images(tmp_path / "photos", 2)
    run("index", tmp_path / "photos", "--index", ix, "--model", tiny_model, "--device", "cpu")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    assert "cannot index" in run("index", empty, "--index", ix, code=6).output
    assert json.loads(run("info", "--index", ix, "--json").stdout)["last_run"] == "finished"
    fresh = tmp_path / "fresh"
    assert "no folder to index" in run("index", "--index", fresh, "--model", tiny_model, code=6).output
    assert not fresh.exists()  # nothing to take for interrupted: a refused first run leaves no index at all
    run("info", "--index", fresh, code=3)


def same_names_other_bytes(shard: Path, planted: Path) -> Path:
    """planted: a copy of shard whose .png members have the same names and sizes but other bytes."""
    with tarfile.open(shard) as old, tarfile.open(planted, "w") as new:
        for member in old.getmembers():
            data = old.extractfile(member).read()
            if member.name.endswith(".png"):
                data = data[:64] + bytes(255 - b for b in data[64:-16]) + data[-16:]
            new.addfile(member, io.BytesIO(data))
    return planted


def test_a_tar_member_replaced_by_other_bytes_of_its_size_is_not_served(tmp_path, corpus, tiny_model):
    """A shard in a folder another user may write (a shared dataset folder), renamed over by their own shard whose
    member has the indexed one's name and size but other bytes: the server served their picture for the indexed one's
    vectors (only the member's name and size were compared, never its content as a folder's file's is: scan.confirm,
    Contents). Now a shard changed since the index read it has the member's bytes hashed against the catalog's."""
    import urllib.error
    import urllib.request

    from alignsearch.surfaces.server import ServerConfig, start_in_thread

    files = sorted(p for p in corpus.rglob("*.png"))[:2]
    shard = tmp_path / "s.tar"
    write_shard(shard, files, corpus)
    index_json(tmp_path / "ix", shard, "--model", tiny_model, "--device", "cpu", "--workers", "0")
    planted = same_names_other_bytes(shard, tmp_path / "planted.tar")
    planted.replace(shard)
    engine = alignsearch.open(tmp_path / "ix", device="cpu")
    server = start_in_thread(engine, ServerConfig(port=0))
    auth = {"Authorization": f"Bearer {server.token}"}
    try:
        for f in files:
            (row_id,) = [h.id for h in engine.search(image=f, k=5) if h.relpath.endswith(f.name)][:1]
            request = urllib.request.Request(f"{server.url}/api/image/{row_id}", headers=auth)
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, timeout=30).read()
            assert refused.value.code == 409, refused.value.read()
    finally:
        server.shutdown()
        engine.close()


def test_a_shard_renamed_over_between_its_check_and_its_read_is_not_read(tmp_path, corpus, tiny_model, monkeypatch):
    """The shard judged (its ctime: unchanged, so its member not hashed) is the shard read: it was opened by name
    again to read the member, and another shard renamed over it in between (another user who may write its folder)
    had its member of the same name and size served. The swap is made while the server lists the shard's members."""
    import urllib.request

    from alignsearch.surfaces.server import ServerConfig, start_in_thread

    files = sorted(p for p in corpus.rglob("*.png"))[:1]
    shard = tmp_path / "s.tar"
    write_shard(shard, files, corpus)
    planted = same_names_other_bytes(shard, tmp_path / "planted.tar")
    index_json(tmp_path / "ix", shard, "--model", tiny_model, "--device", "cpu", "--workers", "0")
    members = sources.tar_members

    def swapped(root):
        listed = members(root)
        planted.replace(shard)
        return listed

    monkeypatch.setattr(sources, "tar_members", swapped)
    engine = alignsearch.open(tmp_path / "ix", device="cpu")
    server = start_in_thread(engine, ServerConfig(port=0))
    try:
        row_id = engine.search(image=files[0], k=1)[0].id
        request = urllib.request.Request(f"{server.url}/api/image/{row_id}",
                                         headers={"Authorization": f"Bearer {server.token}"})
        with urllib.request.urlopen(request, timeout=30) as r:
            assert r.read() == files[0].read_bytes()  # the shard judged, read through its descriptor
    finally:
        server.shutdown()
        engine.close()
