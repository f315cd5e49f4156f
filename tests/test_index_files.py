"""The files of an index folder are opened as the index keeps them, never through what someone else put at their
names: a symbolic link at a lock file or at an ANN file, an emptied catalog beside its vectors, and an index folder
(or its files) that another user can write or made."""

import json
import shutil
import os
import subprocess

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


@pytest.mark.slow
@pytest.mark.parametrize("layout,pattern", [({}, "index.faiss"), ({"index_shards": 3}, "shard-*.faiss"),
                                            ({"index_shards": 3}, "shards.json"),
                                            ({"ondisk_shards": 2}, "lists-*.ivfdata")],
                         ids=["single", "shard", "manifest", "lists"])
def test_a_symlink_at_an_ann_file_is_damage_and_repaired(tmp_path, layout, pattern):
    """index.faiss, a shard file, the shard manifest or an on-disk lists file swapped for a symbolic link to a copy of
    itself: readers followed it (queries answered, verify said ok), though writers only ever rename a file of their
    own there; a link to a FIFO would hang them. Now a link there is damage: every reader says so (exit 7), verify
    names it, --repair builds the ANN files again from the vectors and leaves the link's target as it was."""
    from helpers import layout_index

    ix = tmp_path / "ix"
    layout_index(ix, 10_000 if layout else 2_000, **layout)[0].dispose()
    planted = sorted(ix.glob(pattern))[0]
    target = tmp_path / "elsewhere"
    planted.rename(target)
    planted.symlink_to(target)
    before = target.read_bytes()
    out = run("similar", "5", "--index", ix, code=7).output
    assert f"{planted.name} is a symbolic link" in out and len(out.strip().splitlines()) == 1, out
    problems = verify_json(ix, code=7)["problems"]
    assert any(p.startswith(f"{planted.name} is a symbolic link") for p in problems), problems
    assert verify_json(ix, "--repair", code=0)["ok"]
    assert target.read_bytes() == before
    run("similar", "5", "--index", ix)
    assert verify_json(ix, code=0)["checked"]["index_vectors"] == (10_000 if layout else 2_000)


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="becoming another user (nobody) needs root")
def test_a_catalog_another_user_planted_in_an_index_folder_others_can_write_is_refused(indexed_images, tmp_path):
    """An index folder every user can write (mode 0777): another user (nobody) renamed over catalog.db a copy of it
    naming one more root, a private folder of this user's (mode 0700). The next `index` run read that folder into a
    catalog owned by the other user (its paths, hashes, EXIF, embeddings theirs to read), and every command used
    it. Now every command refuses such an index in one line (exit 6), and one whose catalog another user made
    even once the folder is closed again; nothing is read into it."""
    import shutil
    import sqlite3
    import subprocess

    from conftest import make_images
    from helpers import as_nobody

    root, ix = indexed_images(3)
    private = make_images(tmp_path / "private", 2, seed=7)[0].parent
    private.chmod(0o700)
    ix.chmod(0o777)

    def in_the_index_as_nobody():
        os.chdir(ix)  # the tests' folders are root's own (0700): the other user works from inside the index
        as_nobody()

    theirs = tmp_path / "theirs.db"  # their catalog: a copy of this index's, naming the private folder as a root too
    shutil.copy(ix / "catalog.db", theirs)
    conn = sqlite3.connect(theirs)
    with conn:
        roots = json.loads(conn.execute("SELECT value FROM meta WHERE key = 'roots'").fetchone()[0])
        conn.execute("UPDATE meta SET value = ? WHERE key = 'roots'", (json.dumps(roots + [str(private)]),))
    conn.close()
    shutil.copy(theirs, ix / ".theirs")  # where they can read it (python cannot run as nobody here: sh's cp and mv)
    planted = subprocess.run(["sh", "-c", "cp .theirs .planted && mv .planted catalog.db && rm -f catalog.db-wal "
                              "catalog.db-shm"], preexec_fn=in_the_index_as_nobody, capture_output=True, text=True,
                             timeout=60)
    assert planted.returncode == 0, planted.stderr
    assert (ix / "catalog.db").stat().st_uid == 65534
    for args in (("index",), ("similar", "1"), ("roots",), ("verify", "--skip-model")):
        out = run(*args, "--index", ix, code=6).output
        assert f"refusing the index {ix}: {ix} is writable by every user" in out, (args, out)
        assert len(out.strip().splitlines()) == 1, (args, out)
    ix.chmod(0o755)
    out = run("info", "--index", ix, code=6).output
    assert "catalog.db belongs to another user (uid 65534)" in out, out
    conn = sqlite3.connect(f"file:{ix / 'catalog.db'}?mode=ro", uri=True)
    try:
        assert conn.execute("SELECT count(*) FROM files WHERE root = ?", (str(private),)).fetchone()[0] == 0
    finally:
        conn.close()


def test_a_file_of_the_index_gone_while_it_is_judged_is_not_an_error(tmp_path, monkeypatch):
    """The files judged are listed, then each looked at: a writer's `.next` renamed into place or a segment compacted
    away in between raised FileNotFoundError out of every command that opened the index then (a reader beside a
    running `index`): a file gone holds nothing planted."""
    from alignsearch.storage import paths

    (tmp_path / "catalog.db").write_bytes(b"")
    listed = paths._index_entries
    monkeypatch.setattr(paths, "_index_entries", lambda folder: [*listed(folder), folder / "index.faiss.next"])
    assert paths.untrusted_index(tmp_path, writing=False) is None
    assert paths.untrusted_index(tmp_path, writing=True) is None


@pytest.mark.parametrize("put", ["link", "folder"])
@pytest.mark.slow
def test_verify_names_what_every_watch_refuses_at_the_watch_lock(tmp_path, put):
    """A symbolic link or a folder at watch.lock makes every `index --watch` stop (exit 7), but verify said the index
    was ok: it named such trouble at write.lock only. It names both now; --repair removes neither (another process
    may be replacing it) and says to; removed, the index is ok again."""
    from helpers import layout_index

    ix = tmp_path / "ix"
    layout_index(ix, 300)[0].dispose()
    planted = tmp_path / "planted"
    if put == "link":
        (ix / "watch.lock").symlink_to(planted)
    else:
        (ix / "watch.lock").mkdir()
    what = "a symbolic link" if put == "link" else "a folder"
    problems = verify_json(ix, code=7)["problems"]
    assert [p for p in problems if p.startswith(f"watch.lock is {what}") and "remove it" in p], problems
    assert any(p.startswith(f"watch.lock is {what}") for p in verify_json(ix, "--repair", code=7)["problems"])
    assert os.path.lexists(ix / "watch.lock") and not os.path.lexists(planted)
    if put == "link":
        (ix / "watch.lock").unlink()
    else:
        (ix / "watch.lock").rmdir()
    assert verify_json(ix, code=0)["ok"]


@pytest.mark.skipif(os.geteuid() != 0, reason="becoming another user (nobody) needs root")
def test_a_reader_open_for_long_judges_the_folder_again_before_a_new_snapshot(tmp_path):
    """`serve` judged the index folder once, when it opened: a folder made writable by every user after that, and a
    catalog and ANN file another user (nobody) then renamed over the index's, were read at the next request (its
    Engine.refresh picked up the planted index.faiss as a newer snapshot). Now each refresh judges the folder again
    (a few stats) and refuses it as every command's open does; the snapshot it had is not replaced."""
    from alignsearch.errors import BadInputError
    from alignsearch.search.engine import open as open_index
    from helpers import catalog_copy_at_generation, plant_as_nobody, vector_index

    ix = tmp_path / "ix"
    vector_index(ix, 3, 8)
    engine = open_index(ix)
    assert engine.refresh() is False
    snap = engine.snap
    theirs = catalog_copy_at_generation(ix, tmp_path / "theirs.db")
    ix.chmod(0o777)
    plant_as_nobody(ix, theirs, "catalog.db")
    plant_as_nobody(ix, ix / "index.faiss", "index.faiss")
    with pytest.raises(BadInputError, match=f"refusing the index {ix}: {ix} is writable by every user"):
        engine.refresh()
    assert engine.snap is snap
    engine.db.dispose()


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="becoming another user (nobody) needs root")
def test_serve_refuses_its_index_once_others_can_write_it(indexed_images):
    """The same through a real `serve`: its folder made 0777 while it runs, an index.faiss another user (nobody)
    renamed over the index's was the next request's snapshot (answered 200); now that request is refused: 500, the
    server's own index cannot be used (it was 400, as if the query were at fault), naming its kind for the CLI."""
    from helpers import call, plant_as_nobody, start_serve, stop

    root, ix = indexed_images(3)
    proc, url = start_serve(ix, "--token", "s3cret")
    try:
        assert call(url, "/api/search?q=a+photo&k=1")[0] == 200
        ix.chmod(0o777)
        plant_as_nobody(ix, ix / "index.faiss", "index.faiss")
        status, _, body = call(url, "/api/search?q=a+photo&k=1")
    finally:
        stop(proc)
    assert status == 500 and f"refusing the index {ix}: {ix} is writable by every user".encode() in body, body
    assert json.loads(body)["kind"] == "IndexUntrustedError", body


# Every data endpoint of `serve` as a request: (method, path template of the app's route, URL, form). The test checks
# the list against the app's own routes (/openapi.json), so an endpoint added later and not asked here fails it.
def _data_requests(photo: int, moment: int) -> list[tuple[str, str, str, dict | None]]:
    return [("GET", "/api/info", "/api/info", None),
            ("GET", "/api/search", "/api/search?q=red&k=1", None),
            ("GET", "/api/search", f"/api/search?similar={photo}&k=1", None),
            ("POST", "/api/search", "/api/search", {"q": "red", "k": "1"}),
            ("GET", "/api/recent", "/api/recent", None),
            ("GET", "/api/image/{file_id}", f"/api/image/{photo}", None),
            ("GET", "/api/image/{file_id}", f"/api/image/{photo}?size=64", None),  # cached thumbnail, once drawn
            ("GET", "/api/image/{file_id}", f"/api/image/{moment}?size=64", None),  # a moment's picture
            ("GET", "/api/video/{file_id}", f"/api/video/{moment}", None)]


@pytest.mark.slow
def test_every_endpoint_of_serve_refuses_an_index_folder_made_writable_by_others(tmp_path, tiny_model):
    """Only the searches (and /api/info) judged the index folder again while `serve` ran: made 0777 after the start,
    /api/recent, /api/image (the file, its cached thumbnail) and /api/video still answered 200 from the catalog, which
    another user could by then have replaced by one naming any file this server's user can read, with its size and
    mtime, and /api/image served its bytes. Now every endpoint that reads the index answers the searches' refusal
    (500, IndexUntrustedError) until `chmod go-w`; /healthz, the page and its assets read nothing of the index."""
    import httpx
    from conftest import make_images
    from helpers import make_video, start_serve, stop

    lib, ix = tmp_path / "lib", tmp_path / "ix"
    upload = make_images(lib, 2)[0].read_bytes()
    make_video(lib / "clip.mp4", [(71, 3), (72, 3)])
    run("index", lib, "--index", ix, "--model", tiny_model, "--device", "cpu")
    proc, url = start_serve(ix, "--token", "s3cret")
    try:
        with httpx.Client(base_url=url, headers={"Authorization": "Bearer s3cret"}, trust_env=False,
                          timeout=60) as client:
            routes = {path for path in client.get("/openapi.json").json()["paths"] if path != "/healthz"}
            listed = client.get("/api/recent").json()["results"]
            photo = next(r["id"] for r in listed if r.get("t") is None)
            moment = next(r["id"] for r in listed if r.get("t") is not None)
            asked = _data_requests(photo, moment)
            assert routes == {route for _, route, _, _ in asked}, routes  # every endpoint that reads the index

            def answers():
                out = {}
                for method, _, path, form in asked:
                    files = None if form is None else {"image": ("q.png", upload)}
                    r = client.request(method, path, data=form, files=files)
                    out[f"{method} {path}"] = (r.status_code, r.headers.get("content-type"), r.content)
                return out

            def plain():
                return {path: client.get(path).status_code for path in ("/healthz", "/", "/static/app.js",
                                                                       "/static/style.css")}

            before = answers()
            ix.chmod(0o777)
            try:
                refused, plain_refused = answers(), plain()
            finally:
                ix.chmod(0o755)  # chmod go-w
            after = answers()
    finally:
        ix.chmod(0o755)
        stop(proc)
    assert {k: v[0] for k, v in before.items()} == {k: 200 for k in before}, before
    assert {k: v[0] for k, v in after.items()} == {k: 200 for k in after}, after
    kinds = {k: (status, json.loads(body).get("kind") if ctype == "application/json" else ctype)
             for k, (status, ctype, body) in refused.items()}
    assert kinds == {k: (500, "IndexUntrustedError") for k in refused}, kinds
    for status, ctype, body in refused.values():
        assert json.loads(body)["error"].startswith(f"refusing the index {ix}: {ix} is writable by every user"), body
    assert plain_refused == {"/healthz": 200, "/": 200, "/static/app.js": 200, "/static/style.css": 200}
    stderr = proc.stderr.read()
    # logged once an endpoint (server.Trouble keeps its state per route: the refused requests above reach five), not
    # once a request; and once an endpoint when it answers again
    routes = {"/api/info", "/api/search", "/api/recent", "/api/image/{file_id}", "/api/video/{file_id}"}
    met = [line for line in stderr.splitlines() if "refusing the index" in line and "logged once while it lasts" in line]
    again = [line.split(" is answered again")[0] for line in stderr.splitlines()
             if " is answered again (before: refusing the index" in line]
    assert len(met) == len(routes) and sorted(again) == sorted(routes), stderr[-3000:]


def test_serve_judges_its_index_folder_again_after_loading_the_model(tmp_path):
    """`serve` opens the index, then loads the model (seconds), then read the catalog's index id for its record and
    every error's header straight from the pooled connection: a folder made writable by every user meanwhile was
    read. Now that read goes through the endpoints' judgement, and serve stops with the open's refusal."""
    from alignsearch.errors import IndexUntrustedError
    from alignsearch.search.engine import open as open_index
    from alignsearch.surfaces.server import ServerConfig, create_app
    from helpers import vector_index

    ix = tmp_path / "ix"
    vector_index(ix, 3, 8)
    engine = open_index(ix)
    try:
        ix.chmod(0o777)
        with pytest.raises(IndexUntrustedError, match=f"refusing the index {ix}: {ix} is writable by every user"):
            create_app(engine, ServerConfig(), token="t")
    finally:
        ix.chmod(0o755)
        engine.db.dispose()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vectors.f16", "catalog.db"])
@pytest.mark.parametrize("target", ["copy", "theirs", "/dev/zero", "fifo"])
def test_a_reader_never_opens_the_vectors_or_the_catalog_through_a_link(tmp_path, name, target):
    """vectors.f16 or catalog.db swapped for a symbolic link: writers refused one at vectors.f16, yet readers
    followed both (and writers, `tag --clear`, wrote through one at catalog.db). A link to a FIFO hung `similar` (and
    `info`, at the catalog) for ever; one to a copy, or to a file of another user's, was read as the index's own; one
    to /dev/zero was taken for a cut vector file or a catalog with no tables. Now a reader refuses a link there as a
    writer does: one line, exit 7, in the time an open takes."""
    from helpers import NOBODY, layout_index

    ix = tmp_path / "ix"
    layout_index(ix, 300)[0].dispose()
    own = ix / name
    if target in ("copy", "theirs"):
        elsewhere = tmp_path / target
        shutil.copy(own, elsewhere)
        if target == "theirs":
            os.chown(elsewhere, NOBODY, NOBODY)
    elif target == "fifo":
        elsewhere = tmp_path / "fifo"
        os.mkfifo(elsewhere)
    else:
        elsewhere = target
    own.unlink()
    own.symlink_to(elsewhere)
    for args in (("similar", "5"), ("info",)) if name == "catalog.db" else (("similar", "5"),):
        proc = as_child(*args, "--index", ix, timeout=60)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 7 and len(lines) == 1 and f"{name} is a symbolic link" in lines[0], (args, proc.stderr)


def test_a_reader_open_for_long_refuses_a_catalog_linked_in_after_it_opened(tmp_path):
    """`serve`'s Engine.refresh judged the folder again after catalog.db changed, but a link there made by the user
    passed that judgement, and the pool's next connection opened the file it named (here a copy at a newer
    generation: taken as the next snapshot). Now the refresh says the index is damaged and keeps its snapshot."""
    from alignsearch.errors import IndexDamagedError
    from alignsearch.search.engine import open as open_index
    from helpers import catalog_copy_at_generation, vector_index

    ix = tmp_path / "ix"
    vector_index(ix, 3, 8)
    engine = open_index(ix)
    snap = engine.snap
    theirs = catalog_copy_at_generation(ix, tmp_path / "theirs.db")
    (ix / "catalog.db.link").symlink_to(theirs)
    os.replace(ix / "catalog.db.link", ix / "catalog.db")
    try:
        with pytest.raises(IndexDamagedError, match="catalog.db is a symbolic link"):
            engine.refresh()
        assert engine.snap is snap
    finally:
        engine.db.dispose()


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="becoming another user (nobody) needs root")
def test_an_index_in_a_folder_others_can_write_is_refused_before_they_swap_it(tmp_path):
    """The index folder's parent was never judged: in a folder every user may write without the sticky bit, another
    user (nobody) renamed this user's index folder aside and put a copy of their own in its place; a reader read
    theirs as this one (another user's own index is queryable as it is). Now readers and writers refuse an index
    whose parent others may write (exit 6, naming the folder), and discovery skips it; /tmp's sticky bit passes."""
    from helpers import NOBODY, as_nobody, layout_index

    shared = tmp_path / "shared"
    shared.mkdir()
    ix = shared / "ix"
    layout_index(ix, 300)[0].dispose()
    shared.chmod(0o777)
    theirs = shared / ".theirs"
    shutil.copytree(ix, theirs)
    for folder, _, files in os.walk(theirs):
        os.chown(folder, NOBODY, NOBODY)
        for f in files:
            os.chown(os.path.join(folder, f), NOBODY, NOBODY)

    def in_shared_as_nobody():
        os.chdir(shared)
        as_nobody()

    swap = subprocess.run(["sh", "-c", "mv ix ix.aside && mv .theirs ix"], preexec_fn=in_shared_as_nobody,
                          capture_output=True, text=True, timeout=60)
    assert swap.returncode == 0 and ix.stat().st_uid == NOBODY, swap.stderr
    why = f"its parent folder {shared} is writable by every user"
    for args in (("similar", "5"), ("info",), ("tag", "--clear")):
        proc = as_child(*args, "--index", ix, timeout=60)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 6 and len(lines) == 1 and why in lines[0], (args, proc.stderr)
    env = {k: v for k, v in os.environ.items() if k != "ALIGNSEARCH_INDEX"}
    shutil.rmtree(ix)
    os.rename(shared / "ix.aside", shared / ".alignsearch")
    (shared / "work").mkdir()
    found = as_child("info", env=env, cwd=shared / "work", timeout=60)
    assert found.returncode == 3 and why in found.stderr, found.stderr
    shared.chmod(0o1777)  # sticky, as /tmp: others cannot rename what is this user's
    assert as_child("info", env=env, cwd=shared / "work", timeout=60).returncode == 0


@pytest.mark.slow
def test_verify_and_repair_never_read_a_fifo_a_vector_link_names(tmp_path):
    """vectors.f16 -> a FIFO: `verify` and `verify --repair` hung for ever, the first hashing the rows through the link,
    the second copying the file it names into its place (a link to /dev/zero had that copy fill the disk: 3.5 GB in
    15 s). Now verify names the link without reading through it, and --repair refuses to copy anything but a regular
    file: one line, exit 7, the link left for the user to remove."""
    from helpers import layout_index

    ix = tmp_path / "ix"
    layout_index(ix, 300)[0].dispose()
    os.mkfifo(tmp_path / "fifo")
    (ix / "vectors.f16").unlink()
    (ix / "vectors.f16").symlink_to(tmp_path / "fifo")
    proc = as_child("verify", "--index", ix, "--json", "--skip-model", timeout=60)
    assert proc.returncode == 7, proc.stderr
    assert any("vectors.f16: a symbolic link" in p for p in json.loads(proc.stdout)["problems"]), proc.stdout
    proc = as_child("verify", "--index", ix, "--repair", "--skip-model", timeout=60)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 7 and len(lines) == 1 and "cannot be copied into its place" in lines[0], proc.stderr
    assert (ix / "vectors.f16").is_symlink() and sorted(p.name for p in ix.iterdir() if p.name.startswith(".")) == []


@pytest.mark.slow
def test_the_folder_an_index_really_lies_in_is_judged_through_a_link_or_a_dotdot(tmp_path):
    """Only the parent its path names (abspath's) was judged: `--index mine` with mine -> an index in a folder every
    user may write, `--index a/down/../ix` with down -> a folder in it (abspath drops 'down/..' by the letters, the
    kernel goes through the link), and a `.alignsearch` found by walking up that is such a link were all read (exit
    0), though the same index named by its real path is refused: another user may swap the folder it lies in. Now the
    folder it really lies in is judged too: exit 6 naming it, and discovery skips it."""
    from helpers import layout_index

    shared = tmp_path / "shared"
    (shared / "sub").mkdir(parents=True)
    layout_index(shared / "ix", 300)[0].dispose()
    shared.chmod(0o777)
    me = tmp_path / "me"
    (me / "a").mkdir(parents=True)
    (me / "mine").symlink_to(shared / "ix")
    (me / "a" / "down").symlink_to(shared / "sub")
    why = f"its parent folder {shared} is writable by every user"
    for ix in ("mine", "a/down/../ix"):
        proc = as_child("similar", "5", "--index", ix, cwd=me, timeout=60)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 6 and len(lines) == 1 and why in lines[0], (ix, proc.stderr)
    (me / ".alignsearch").symlink_to(shared / "ix")
    env = {k: v for k, v in os.environ.items() if k != "ALIGNSEARCH_INDEX"}
    found = as_child("info", env=env, cwd=me / "a", timeout=60)
    assert found.returncode == 3 and why in found.stderr, found.stderr
    shared.chmod(0o755)  # the same paths read once the folder is the user's alone
    assert as_child("similar", "5", "--index", "mine", cwd=me, timeout=60).returncode == 0



@pytest.mark.slow
def test_the_folder_holding_a_link_on_the_index_path_is_judged(tmp_path):
    """`--index a/link/ix` with `a/link` a link to this user's folder: only the folder the link led to (the index's
    parent) was judged, not `a`, which holds the link; with `a` writable by every user another user could point
    `link` at a folder of theirs, and the index read was theirs (exit 0 before and after the swap). Now `a` is judged
    as a parent is: exit 6 naming it, from a new open and from a reader open since (`serve`); and a link made by another
    user in /tmp's kind of folder (every user may write it, sticky) is refused: its maker may point it anywhere."""
    from alignsearch.errors import IndexUntrustedError
    from alignsearch.search.engine import open as open_index
    from alignsearch.storage.paths import untrusted_index
    from helpers import vector_index

    vector_index(tmp_path / "mine" / "ix", 3, 8)
    a = tmp_path / "a"
    (a / "b").mkdir(parents=True)
    (a / "link").symlink_to(tmp_path / "mine")
    (a / "b" / "up").symlink_to("../link")  # a link to a link: both folders hold one
    engine = open_index(a / "link" / "ix")
    try:
        engine.judge()
        for holder, named in ((a, "a/link/ix"), (a / "b", "a/b/up/ix")):
            holder.chmod(0o777)
            why = f"{holder} is writable by every user, and holds the link {holder / named.split('/')[-2]} on its path"
            assert why in untrusted_index(tmp_path / named, writing=False)
            proc = as_child("info", "--index", named, cwd=tmp_path, timeout=60)
            lines = proc.stderr.strip().splitlines()
            assert proc.returncode == 6 and len(lines) == 1 and why in lines[0], proc.stderr
            if holder == a:
                with pytest.raises(IndexUntrustedError, match=why):
                    engine.judge()
            holder.chmod(0o755)
        engine.judge()
        assert untrusted_index(a / "b" / "up" / "ix", writing=False) is None
    finally:
        engine.db.dispose()
    if os.geteuid() == 0:
        a.chmod(0o1777)  # sticky: others cannot replace this user's link, but one of theirs is theirs to point
        assert untrusted_index(a / "link" / "ix", writing=False) is None
        os.lchown(a / "link", 4242, 4242)
        assert "the link" in untrusted_index(a / "link" / "ix", writing=False)
        assert "made by another user (uid 4242)" in untrusted_index(a / "link" / "ix", writing=False)

@pytest.mark.parametrize("opened, made_writable", [("link", "folder"), ("link", "parent"), ("path", "parent")])
def test_a_reader_open_for_long_judges_again_the_folder_it_really_reads_and_its_parent(tmp_path, opened, made_writable):
    """An index opened through a link at its name (`serve --index mine`): what the reader's judgement rested on was the
    link's own stat, its catalog's and its parent's, none of which changes when the folder the link names, or the
    folder that one lies in, is made writable by every user; so serve went on reading it as judged. Now the folder a
    link names and its real parent are in what the judgement rests on (paths.judged_key); an index opened by its path
    is judged again once its parent is made writable by every user, as its folder is."""
    from alignsearch.errors import IndexUntrustedError
    from alignsearch.search.engine import open as open_index
    from helpers import vector_index

    real = tmp_path / "shared" / "ix"
    vector_index(real, 3, 8)
    (tmp_path / "mine").symlink_to(real)
    engine = open_index(tmp_path / "mine" if opened == "link" else real)
    changed = real if made_writable == "folder" else real.parent
    named = tmp_path / "mine" if made_writable == "folder" else real.parent  # the folder by the name it was given
    try:
        engine.judge()
        changed.chmod(0o777)
        with pytest.raises(IndexUntrustedError, match=f"{named} is writable by every user"):
            engine.judge()
    finally:
        changed.chmod(0o755)
        engine.db.dispose()



@pytest.mark.parametrize("made_writable", ["every user", "group"])
@pytest.mark.parametrize("entry", ["vectors.f16", "index.faiss", "vectors/1796527815173563733.f16"])
def test_a_reader_open_for_long_judges_again_a_file_of_the_index_made_writable_by_others(tmp_path, entry,
                                                                                          made_writable):
    """`chmod o+w` (or g+w, its group another than this user's own) of one file of the index, after a long-open reader
    (the server's Library) judged it: what the judgement rested on (paths.judged_key) was the stats of the folder,
    vectors/, the catalog and the parent, none of which a child's chmod changes, so the server went on reading
    vectors, an ANN index or a segment others could rewrite, where a new open refuses it. Now every file the
    judgement judged is in the key: the next request is refused as the open would be, and answered again once the
    file is the user's alone."""
    from alignsearch.errors import IndexUntrustedError
    from alignsearch.search.engine import open as open_index
    from alignsearch.storage.paths import untrusted_index
    from alignsearch.surfaces.server import Library, ServerConfig
    from helpers import vector_index

    if made_writable == "group" and os.geteuid() != 0:
        pytest.skip("giving a file another group needs root")
    ix = tmp_path / "ix"
    vector_index(ix, 3, 8)
    (ix / "vectors").mkdir()
    (ix / "vectors" / "1796527815173563733.f16").write_bytes(b"")  # a segment of a run killed before it committed
    path = ix / entry
    if made_writable == "group":
        os.chown(path, os.geteuid(), 12345)  # a group others are in: harmless while it may not write
    bit, why = (0o002, "writable by every user") if made_writable == "every user" else (0o020, "writable by its group")
    library = Library(open_index(ix), ServerConfig())
    try:
        library.engine.judge()
        path.chmod(path.stat().st_mode | bit)
        assert why in untrusted_index(ix, writing=False)  # what a new open says
        with pytest.raises(IndexUntrustedError, match=f"{path} is {why}"):
            library.engine
        with pytest.raises(IndexUntrustedError, match=f"{path} is {why}"):
            library.fresh()
        path.chmod(path.stat().st_mode & ~bit)
        assert library.engine.refresh() is False  # the user's alone again: read as it was
    finally:
        library.engine.db.dispose()


def test_the_clients_peek_at_the_catalog_never_reads_through_a_link(tmp_path):
    """state.peek (the CLI client's first look at the catalog, for the index id a running server must serve) is judged
    as catalog.connect is (paths.own_entry): catalog.db as a link to another catalog (here one naming another index
    id) is no catalog to it, not that catalog's id taken for this index's; a link to a FIFO is not waited on."""
    import sqlite3

    from alignsearch.storage import state
    from helpers import vector_index

    ix = tmp_path / "ix"
    vector_index(ix, 3, 8)
    assert state.peek(ix / "catalog.db", "index_id") is not None
    other = tmp_path / "other.db"
    shutil.copy(ix / "catalog.db", other)
    conn = sqlite3.connect(other)
    with conn:
        conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('index_id', '\"theirs\"')")
    conn.close()
    os.rename(ix / "catalog.db", tmp_path / "own.db")
    (ix / "catalog.db").symlink_to(other)
    assert state.peek(ix / "catalog.db", "index_id") is None
    (ix / "catalog.db").unlink()
    os.mkfifo(tmp_path / "fifo")
    (ix / "catalog.db").symlink_to(tmp_path / "fifo")
    assert state.peek(ix / "catalog.db", "index_id") is None


def test_a_writer_opens_the_catalog_a_path_through_a_link_and_dotdot_names(tmp_path):
    """`--index a/down/../ix` with down a link: the kernel (the folder's judgement, its lock, readers) goes to the
    index in the folder down names, but SQLAlchemy made the writer's path absolute by its letters (a/ix): `tag`,
    `index` said "catalog.db cannot be read ... run `alignsearch verify`" (exit 7) of a sound index, and where a/ix
    held another index wrote that one's catalog, judged by nothing. Now the writer opens the catalog judged."""
    import sqlite3

    from alignsearch.storage import catalog, state
    from helpers import vector_index

    vector_index(tmp_path / "shared" / "ix", 3, 8)
    (tmp_path / "shared" / "sub").mkdir()
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "down").symlink_to(tmp_path / "shared" / "sub")
    vector_index(tmp_path / "a" / "ix", 3, 8)  # what the path's letters name
    db = catalog.connect(tmp_path / "a" / "down" / ".." / "ix" / "catalog.db")
    try:
        with db.begin() as conn:
            state.write(conn, index_id="written-through-dotdot")
    finally:
        db.dispose()

    def index_id(folder):
        conn = sqlite3.connect(folder / "catalog.db")
        try:
            return conn.execute("SELECT value FROM meta WHERE key = 'index_id'").fetchone()[0]
        finally:
            conn.close()

    assert index_id(tmp_path / "shared" / "ix") == '"written-through-dotdot"'
    assert index_id(tmp_path / "a" / "ix") != '"written-through-dotdot"'


@pytest.mark.slow
def test_index_makes_the_folder_a_link_names_and_nothing_in_a_folder_others_can_write(tmp_path, tiny_model):
    """`index --index mine` with mine a link to a folder not made yet: "error: File exists: mine", exit 1 (mkdir on the
    link itself); the folder it names is made now. And a first run refused for a parent every user may write (exit
    6) left the empty index folder it had made there: the folder is judged before it is made."""
    from conftest import make_images

    photos = make_images(tmp_path / "photos", 2)[0].parent
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    (tmp_path / "mine").symlink_to(shared / "ix")
    for ix in (shared / "new", tmp_path / "mine"):
        proc = as_child("index", photos, "--index", ix, "--model", tiny_model, "--device", "cpu", timeout=120)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 6 and len(lines) == 1 and f"its parent folder {shared} is writable" in lines[0], (
            ix, proc.stderr)
    assert sorted(os.listdir(shared)) == []
    shared.chmod(0o755)
    proc = as_child("index", photos, "--index", tmp_path / "mine", "--model", tiny_model, "--device", "cpu", timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "mine").is_symlink() and (shared / "ix" / "catalog.db").is_file()


@pytest.mark.parametrize("side", ["catalog.db-wal", "catalog.db-shm"])
def test_a_link_at_a_side_file_under_a_long_open_reader_is_said_as_such(tmp_path, side):
    """A link planted at catalog.db-wal or -shm while `serve` runs: the next pooled connection the server made (any
    time: a pool grows and is refreshed) failed in Engine.refresh with SQLite's raw "unable to open database file",
    which the boundary could only answer as a damaged catalog to restore from a backup, though the catalog is
    sound. Now it is the damaged-index answer that names the link, as the CLI's open says it."""
    from helpers import vector_index

    from alignsearch.errors import IndexDamagedError
    from alignsearch.search import engine
    from alignsearch.surfaces.boundary import library_error

    ix = tmp_path / "ix"
    vector_index(ix, 4, 8)
    eng = engine.open(ix)
    target = tmp_path / "elsewhere"
    target.write_bytes(b"")
    for name in ("catalog.db-wal", "catalog.db-shm"):
        (ix / name).unlink(missing_ok=True)
    (ix / side).symlink_to(target)
    eng.db.dispose()  # what the pool does to its connections over a long run: the next one is opened afresh
    with pytest.raises(Exception) as raised:
        eng.refresh()
    said = library_error(raised.value)
    assert isinstance(said, IndexDamagedError), repr(raised.value)
    assert f"{side} is a symbolic link" in str(said), said


def test_a_querys_own_error_beside_a_side_file_link_is_not_called_the_link(tmp_path):
    """The side-file listener (catalog.open_readonly) turned any error but a busy catalog or a full disk into "the
    catalog.db-wal is a symbolic link" while such a link stood there: a query's own mistake (no such column) too,
    with exit 7 and the wrong remedy. Only a failure to open a file is the link's now."""
    import sqlite3

    from sqlalchemy import text
    from sqlalchemy.exc import OperationalError

    from alignsearch.storage import catalog

    db_path = tmp_path / "catalog.db"
    conn = sqlite3.connect(db_path)
    conn.execute("CREATE TABLE files (id INTEGER)")  # rollback journal: the -wal name is never opened
    conn.commit()
    conn.close()
    (tmp_path / "catalog.db-wal").symlink_to(tmp_path / "nowhere")
    engine = catalog.open_readonly(db_path, prepare=False)
    try:
        with engine.connect() as c:
            assert c.execute(text("SELECT count(*) FROM files")).scalar() == 0
            with pytest.raises(OperationalError, match="no such column"):
                c.execute(text("SELECT nope FROM files"))
    finally:
        engine.dispose()


@pytest.mark.slow
@pytest.mark.parametrize("side", ["catalog.db-wal", "catalog.db-shm", "catalog.db-journal"])
def test_a_fifo_at_a_side_file_is_refused_by_every_command_without_hanging(tmp_path, side):
    """A FIFO planted at SQLite's files beside the catalog: at catalog.db-wal readers (`info`, `similar`) read it as
    an empty log and exited 0 where writers and verify said exit 7; at catalog.db-journal every command hung in
    SQLite's open of it. Now each says what is there, in one line, exit 7, before SQLite opens anything."""
    from helpers import vector_index

    ix = tmp_path / "ix"
    vector_index(ix, 4, 8)
    for name in ("catalog.db-wal", "catalog.db-shm"):
        (ix / name).unlink(missing_ok=True)
    os.mkfifo(ix / side)
    for args in (("info",), ("similar", "1", "-k", "1"), ("verify", "--skip-model"), ("roots",)):
        proc = as_child(*args, "--index", ix, timeout=60)  # the old code hung here at -journal: TimeoutExpired
        assert proc.returncode == 7, (args, proc.stdout, proc.stderr)
        assert f"{side} is a fifo" in proc.stdout + proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr)
    (ix / side).unlink()
    assert as_child("similar", "1", "-k", "1", "--index", ix, timeout=60).returncode == 0


def test_lock_holders_reads_the_flocks_of_one_file_from_proc_locks():
    """/proc/locks names each lock's process and file (MAJ:MIN:INODE, in hex but the inode); waiters ("->") hold none."""
    from indexer.lock import lock_holders

    locks = ("1: FLOCK  ADVISORY  WRITE 9231 fe:00:2147788 0 EOF\n"
             "1: -> FLOCK  ADVISORY  WRITE 9300 fe:00:2147788 0 EOF\n"
             "2: POSIX  ADVISORY  WRITE 77 fe:00:2147788 0 EOF\n"
             "3: FLOCK  ADVISORY  READ 12 fe:01:2147788 0 EOF\n"
             "4: FLOCK  ADVISORY  READ 13 fe:00:21477881 0 EOF\n")
    assert lock_holders(locks, os.makedev(0xfe, 0), 2147788) == [9231]
    assert lock_holders(locks, os.makedev(0xfe, 1), 2147788) == [12]
    assert lock_holders("", os.makedev(0xfe, 0), 2147788) == []


def test_a_writer_arriving_while_an_old_lock_file_is_replaced_is_refused(tmp_path, monkeypatch):
    """Two writers of this user's and a lock file another user holds: the first replaces it (in its turn), and a
    second that comes meanwhile, or after, is refused, never holding the old file or a second fresh one while the
    first holds its own. (Another user's hold is told here by foreign_hold, made to say so of the old file.)"""
    import fcntl

    from indexer import lock

    ix = tmp_path / "ix"
    ix.mkdir()
    old = ix / "write.lock"
    old.touch()
    theirs = os.open(old, os.O_RDONLY)
    fcntl.flock(theirs, fcntl.LOCK_EX)
    old_ino = old.stat().st_ino
    monkeypatch.setattr(lock, "foreign_hold", lambda fd: os.fstat(fd).st_ino == old_ino and "another user")
    monkeypatch.setattr(lock, "TURN_WAIT", 0)  # the second's wait for the first's turn, not waited here
    arrived = []
    real_fresh = lock._fresh_lock

    def fresh(folder, name):
        if arrived:  # the second writer replacing too (renaming over the first's)
            arrived.append("replaced again")
        else:  # a second writer, while the first is in its turn, about to replace the old file
            arrived.append("arriving")
            arrived[0] = lock.take_lock(ix, "write.lock")[0]
        return real_fresh(folder, name)

    monkeypatch.setattr(lock, "_fresh_lock", fresh)
    try:
        first, _ = lock.take_lock(ix, "write.lock")
        assert first is not None and arrived == [None]
        assert os.fstat(first).st_ino == old.stat().st_ino != old_ino  # the file at the name is the first's, held
        monkeypatch.setattr(lock, "_fresh_lock", real_fresh)
        assert lock.take_lock(ix, "write.lock")[0] is None  # after: the first, this user's, holds it
        os.close(first)
        after, _ = lock.take_lock(ix, "write.lock")
        assert after is not None
        os.close(after)
    finally:
        os.close(theirs)


@pytest.mark.parametrize("pid", [0, -1, -42])
def test_a_lock_holder_with_no_process_number_here_is_never_taken_for_another_users(tmp_path, monkeypatch, pid):
    """/proc/locks gives a number <= 0 for a holder it cannot name here (another pid namespace's, a remote lock):
    it may be a writer of this user's, so its lock file is never replaced (two writers at once). foreign_hold took
    such a holder for "another user" (_process_uid answers None for it, which counted as neither this user nor
    root) and take_lock replaced the lock file under it."""
    from indexer import lock

    monkeypatch.setattr(lock, "lock_holders", lambda locks, dev, ino: [pid])
    fd = os.open(tmp_path / "write.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        assert lock.foreign_hold(fd) is None
    finally:
        os.close(fd)
