"""More guarantees attacked with real processes, real SQLite and real video files, aimed at the newer features:
the keyword index (FTS5) that holds captions and the text read in images, `forget`, video moments (committed
whole or not at all, served only while they are the file indexed), and the server's ranged video route."""

from __future__ import annotations

import importlib.util
import json
import os
import sqlite3
import time
from pathlib import Path

import pytest
from conftest import index_json, make_images, run
from helpers import killed_at_call

from alignsearch.storage import catalog

CAPTIONS = {"img000": "Zanzibar harbour at dawn", "img001": "receipt INV4711A paid in Lisbon",
            "img002": "the yellow tram"}


def _captioned(root: Path, captions: dict[str, str], n: int = 4, seed: int = 0) -> Path:
    """n images with sidecar captions (photo.txt beside photo.jpg) for some: text in the keyword index."""
    for path in make_images(root, n, seed=seed):
        if path.stem in captions:
            path.with_suffix(".txt").write_text(captions[path.stem])
    return root


def _ro(ix: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{ix / 'catalog.db'}?mode=ro", uri=True)


def keyword_drift(ix: Path) -> list[str]:
    """How the catalog's keyword tables (FTS5) disagree with its files: rows left for files the catalog no longer
    holds (photo fields, keyword text, phashes), indexed files without keyword text, keyword text that is not what
    the file's caption, text in the image, name and tags make, and FTS5's own integrity check (run on a copy)."""
    conn = _ro(ix)
    try:
        files = {i for (i,) in conn.execute("SELECT id FROM files")}
        indexed = {i: (rel, cap, ocr) for i, rel, cap, ocr in conn.execute(
            "SELECT f.id, f.relpath, p.caption, p.ocr FROM files f JOIN photos p ON p.file_id = f.id "
            "WHERE f.status = 'indexed'")}
        labels: dict[int, list[str]] = {}
        for i, label in conn.execute("SELECT file_id, label FROM tags"):
            labels.setdefault(i, []).append(label)
        bodies = dict(conn.execute(f"SELECT rowid, body FROM {catalog.KEYWORDS}"))
        trigram = {i for (i,) in conn.execute(f"SELECT rowid FROM {catalog.KEYWORDS_TRIGRAM}")}
        photos = {i for (i,) in conn.execute("SELECT file_id FROM photos")}
        phashes = {i for (i,) in conn.execute("SELECT file_id FROM phashes")}
    finally:
        conn.close()
    drift = []
    for name, ids in (("photos", photos), (catalog.KEYWORDS, set(bodies)), (catalog.KEYWORDS_TRIGRAM, trigram),
                      ("phashes", phashes)):
        if ids - files:
            drift.append(f"{name} holds {len(ids - files)} rows of files the catalog no longer has")
    if set(indexed) - set(bodies):
        drift.append(f"{len(set(indexed) - set(bodies))} indexed files have no keyword text")
    wrong = [i for i, (rel, cap, ocr) in indexed.items()
             if i in bodies and bodies[i] != catalog.keyword_text(rel, cap, labels.get(i, ()), ocr)]
    if wrong:
        drift.append(f"{len(wrong)} files' keyword text is not their caption, text, name and tags")
    copy = ix.parent / f".{ix.name}-fts-check.db"
    check = sqlite3.connect(copy)  # FTS5's check is an INSERT: run on a copy (WAL included), the index unwritten
    try:
        source = _ro(ix)
        source.backup(check)
        source.close()
        for table in (catalog.KEYWORDS, catalog.KEYWORDS_TRIGRAM):
            try:
                check.execute(f"INSERT INTO {table}({table}) VALUES ('integrity-check')")
            except sqlite3.DatabaseError as exc:
                drift.append(f"{table}: {exc}")
        check.close()
    finally:
        copy.unlink()
    return drift


def _keyword_hits(ix: Path, text: str) -> list[str]:
    out = run("query", "--index", ix, "--json", "-k", "10", "--mode", "keyword", "--", text).output
    return [r["relpath"] for r in json.loads(out)["results"]]


# -- 1. `forget ROOT` leaves nothing of the root behind ------------------------------------------------------------

@pytest.mark.slow
def test_forget_drops_the_roots_captions_text_and_keyword_rows(tmp_path, tiny_model):
    """`alignsearch forget ROOT` deleted the root's files and tags but left their photo fields (caption, text read
    in the image, GPS position), their keyword text and their perceptual hashes in catalog.db for good: what the
    user asked to drop stayed readable in the index, found by nothing, removed by nothing."""
    private = _captioned(tmp_path / "private", CAPTIONS)
    kept = _captioned(tmp_path / "kept", {"img000": "Kilimanjaro at noon"}, n=3, seed=3)
    ix = tmp_path / "ix"
    index_json(ix, private, kept, "--model", tiny_model, "--device", "cpu")
    assert _keyword_hits(ix, "zanzibar") == ["img000.png"]
    assert keyword_drift(ix) == []
    run("forget", private, "--index", ix)
    assert _keyword_hits(ix, "zanzibar") == [] and len(_keyword_hits(ix, "kilimanjaro")) == 1
    assert keyword_drift(ix) == []
    conn = _ro(ix)
    try:
        text = "\n".join(str(row) for table in ("photos", catalog.KEYWORDS, catalog.KEYWORDS_TRIGRAM)
                         for row in conn.execute(f"SELECT * FROM {table}"))
    finally:
        conn.close()
    for caption in CAPTIONS.values():
        assert caption not in text
    assert "INV4711A" not in text
    assert run("verify", "--index", ix, "--skip-model").exit_code == 0


@pytest.mark.slow
def test_a_root_taken_over_by_its_parent_folder_is_found_by_its_folders_name(tmp_path, tiny_model):
    """`index LIB` after `index LIB/zanzibar`: the files of LIB/zanzibar move under LIB (ids and vectors kept),
    their paths become zanzibar/NAME, but their keyword text kept the old path's words: a keyword search for
    the folder's name found none of them, where an index built from LIB at once finds them all."""
    lib = tmp_path / "lib"
    _captioned(lib / "zanzibar", {"img001": "harbour at dawn"}, n=3)
    make_images(lib / "elsewhere", 2, seed=4)
    ix = tmp_path / "ix"
    index_json(ix, lib / "zanzibar", "--model", tiny_model, "--device", "cpu")
    assert _keyword_hits(ix, "zanzibar") == []  # a root's own name is no part of its files' paths
    index_json(ix, lib, "--device", "cpu")
    assert sorted(_keyword_hits(ix, "zanzibar")) == ["zanzibar/img000.png", "zanzibar/img001.jpg", "zanzibar/img002.jpg"]
    assert _keyword_hits(ix, "harbour") == ["zanzibar/img001.jpg"]
    assert keyword_drift(ix) == []


# -- 2. bytes flipped in the catalog's keyword index ---------------------------------------------------------------

def _flip_keyword_data(db: Path) -> None:
    """Flip bytes in the largest block of the keyword index's data (what a bad sector or a stray write does to
    those pages); SQLite's page structure stays sound, so only FTS5 can tell."""
    conn = sqlite3.connect(db)
    try:
        block_id, block = conn.execute(f"SELECT id, block FROM {catalog.KEYWORDS}_data "
                                       "ORDER BY length(block) DESC LIMIT 1").fetchone()
        flipped = bytearray(block)
        for i in range(4, len(flipped), 7):
            flipped[i] ^= 0xFF
        with conn:
            conn.execute(f"UPDATE {catalog.KEYWORDS}_data SET block = ? WHERE id = ?", (bytes(flipped), block_id))
    finally:
        conn.close()


@pytest.mark.slow
def test_verify_finds_bytes_flipped_in_the_keyword_index(indexed_images):
    """Bytes flipped in the keyword index (FTS5's data rows): every keyword query answered nothing, or failed,
    and `verify` said the index was sound (PRAGMA integrity_check reads FTS5 tables only from SQLite 3.44). It
    finds it now, and `--repair` writes the keyword index again from the catalog's rows."""
    root, ix = indexed_images(12)
    name = sorted(p.name for p in root.iterdir())[5]
    assert _keyword_hits(ix, Path(name).stem) == [name]
    _flip_keyword_data(ix / "catalog.db")
    assert keyword_drift(ix)  # the attack did damage the index
    result = run("verify", "--index", ix, "--skip-model", code=None)
    assert result.exit_code != 0, result.output
    assert "keyword" in result.output and "catalog.db" in result.output, result.output
    # derived from the catalog's own rows: --repair writes it again (nothing re-encoded, no rebuild from the folders)
    vectors_before = (ix / "vectors.f16").read_bytes()
    result = run("verify", "--index", ix, "--skip-model", "--repair")
    assert "repaired: keyword index" in result.output, result.output
    assert keyword_drift(ix) == [] and _keyword_hits(ix, Path(name).stem) == [name]
    assert (ix / "vectors.f16").read_bytes() == vectors_before
    assert run("verify", "--index", ix, "--skip-model").exit_code == 0


# -- kill -9 at the n-th call of a function, in a child `alignsearch` --------------------------------------------

# -- 3. kill -9 while the text in images is being read ---------------------------------------------------------

SIGNS = {"zanzibar": ["Zanzibar Spice Co."], "kilimanjaro": ["Kilimanjaro Express"], "serengeti": ["Serengeti Safari"],
         "okavango": ["Okavango Delta"], "lassi": ["Mango Lassi 450"]}
needs_ocr = pytest.mark.skipif(importlib.util.find_spec("rapidocr") is None, reason="pip install '.[ocr]'")


def _read_ocr(ix: Path) -> dict[str, str | None]:
    conn = _ro(ix)
    try:
        return dict(conn.execute("SELECT f.relpath, p.ocr FROM files f JOIN photos p ON p.file_id = f.id"))
    finally:
        conn.close()


@pytest.mark.slow
@needs_ocr
def test_kill_9_while_text_is_read_into_an_existing_index_leaves_whole_batches(tmp_path, tiny_model):
    """An index gains text in images (`index --ocr` on an index built without it: indexer/ocrfill.py), killed -9
    inside its second batch's transaction: the first batch's text is there and searchable, nothing of the second,
    the keyword index agrees with the files table (and FTS5's own check), verify finds nothing wrong, and the next
    run reads only the files not read yet."""
    from helpers import render_sign

    root = tmp_path / "signs"
    signs = {word: f"sign{i}.png" for i, word in enumerate(SIGNS)}  # no word of the text in its name
    for word, lines in SIGNS.items():
        render_sign(root / signs[word], lines)
    ix = tmp_path / "ix"
    index_json(ix, root, "--model", tiny_model, "--device", "cpu")
    proc = killed_at_call("alignsearch.storage.catalog:set_ocr", 2, {"indexer.ocrfill:BATCH": 2},
                           "index", "--index", ix, "--device", "cpu", "--ocr", "--workers", "0")
    assert proc.returncode == -9, proc.stderr[-3000:]
    read = {name: text for name, text in _read_ocr(ix).items() if text is not None}
    assert len(read) == 2, read  # the first batch, whole; the second rolled back
    assert keyword_drift(ix) == []
    assert run("verify", "--index", ix, "--skip-model").exit_code == 0
    for word in SIGNS:
        assert _keyword_hits(ix, word) == ([signs[word]] if signs[word] in read else []), word
    again = index_json(ix, "--device", "cpu", "--ocr")
    assert again["times"]["extra"]["ocr_filled"] == len(SIGNS) - 2 and again["added"] == again["updated"] == 0
    assert {name: text for name, text in _read_ocr(ix).items() if name in read} == read  # not read twice
    for word in SIGNS:
        assert _keyword_hits(ix, word) == [signs[word]], word
    assert keyword_drift(ix) == []


# -- 4. kill -9 while a video's moments are committed ------------------------------------------------------------

def _moments(ix: Path) -> dict[str, int]:
    """{video: its indexed moments}."""
    conn = _ro(ix)
    try:
        return dict(conn.execute("SELECT relpath, count(*) FROM files WHERE t IS NOT NULL AND status = 'indexed' "
                                 "GROUP BY relpath"))
    finally:
        conn.close()


@pytest.mark.slow
def test_kill_9_in_a_videos_commit_leaves_it_whole_or_absent(tmp_path, tiny_model):
    """Two videos indexed by a run killed -9 while the second one's moment rows are being written (its vectors
    appended and fsync'ed, its transaction open): the first video is there with every moment, the second with
    none, no photo field or keyword row is left of it; the next run reads it whole and verify finds nothing
    wrong. And killed inside the first video's transaction: nothing of either."""
    from helpers import make_video

    lib = tmp_path / "lib"
    for name, seeds in (("a.mp4", (11, 12, 13)), ("b.mp4", (21, 22, 23))):
        make_video(lib / name, [(s, 2) for s in seeds])
    args = ("index", lib, "--model", tiny_model, "--device", "cpu", "--workers", "0")
    whole = tmp_path / "whole"
    index_json(whole, *args[1:])
    counts = _moments(whole)
    assert sorted(counts) == ["a.mp4", "b.mp4"] and min(counts.values()) >= 3, counts
    first = counts["a.mp4"]  # videos are read in the order of their names
    for nth, expected in ((first + 2, {"a.mp4": first}), (2, {})):
        ix = tmp_path / f"killed-at-{nth}"
        proc = killed_at_call("alignsearch.storage.catalog:set_photo", nth, {}, *args, "--index", ix)
        assert proc.returncode == -9, proc.stderr[-3000:]
        assert _moments(ix) == expected, nth
        assert keyword_drift(ix) == [], nth
        s = index_json(ix, "--device", "cpu")
        assert _moments(ix) == counts and s["index"]["vectors"] == sum(counts.values()), (nth, s)
        assert keyword_drift(ix) == [] and run("verify", "--index", ix, "--skip-model").exit_code == 0, nth


# -- 5-7. the server's routes for video moments ------------------------------------------------------------------

@pytest.fixture(scope="module")
def served_videos(tmp_path_factory, tiny_model):
    """A served index of two photos and three videos: clip.mp4 whole, cut.mkv cut off part way (what a copy
    that stopped leaves), swap.mp4 (a test swaps it for a symlink). Yields (library, url, {video: [moment ids]})."""
    from helpers import make_video, start_serve, stop

    base = tmp_path_factory.mktemp("served-videos")
    lib = base / "lib"
    make_images(lib, 2)
    make_video(lib / "clip.mp4", [(71, 3), (72, 3)])
    make_video(lib / "swap.mp4", [(81, 3), (82, 3)])
    whole = make_video(base / "whole.mkv", [(61, 3), (62, 3), (63, 3)]).read_bytes()
    (lib / "cut.mkv").write_bytes(whole[: int(len(whole) * 0.6)])
    ix = base / "ix"
    s = index_json(ix, lib, "--model", tiny_model, "--device", "cpu")
    assert s["failed"] == 0, s
    conn = _ro(ix)
    try:
        ids: dict[str, list[int]] = {}
        for relpath, file_id in conn.execute("SELECT relpath, id FROM files WHERE t IS NOT NULL ORDER BY relpath, t"):
            ids.setdefault(relpath, []).append(file_id)
    finally:
        conn.close()
    proc, url = start_serve(ix, "--token", "s3cret")
    try:
        yield lib, url, ids
    finally:
        stop(proc)


@pytest.mark.slow
def test_a_video_cut_off_part_way_serves_the_moments_it_kept(served_videos):
    """A video indexed after a copy stopped part way keeps the moments before the break (media/video.py); each
    of them is served as a thumbnail and its file plays, and nothing the server answers about it is a 500."""
    from helpers import call

    lib, url, ids = served_videos
    assert 1 <= len(ids["cut.mkv"]) < 3, ids  # the third scene was cut off
    data = (lib / "cut.mkv").read_bytes()
    for moment in ids["cut.mkv"]:
        status, headers, body = call(url, f"/api/image/{moment}?size=64")
        assert status == 200 and headers["Content-Type"] == "image/jpeg", (status, body[:200])
        status, _, body = call(url, f"/api/video/{moment}")
        assert status == 200 and body == data
        status, _, body = call(url, f"/api/video/{moment}", headers={"Range": f"bytes={len(data) - 10}-"})
        assert status == 206 and body == data[-10:]


RANGES = {  # Range header -> the bytes a conforming server sends: (206, slice), the whole file (200), or 416
    "bytes=0-9": (206, slice(0, 10)),
    "bytes=-10": (206, slice(-10, None)),
    "bytes=10-": (206, slice(10, None)),
    "bytes=5-5": (206, slice(5, 6)),
    "bytes=0-99999999999999999999": (206, slice(0, None)),  # the end past the file: up to its last byte
    "bytes=99999999999999999999-": (416, None),  # starts past the file: unsatisfiable
    "bytes=" + "9" * 5000 + "-": (416, None),  # more digits than Python's int() reads
    "bytes=0-" + "9" * 5000: (206, slice(0, None)),
    "bytes=-0": (416, None),
    # not a byte-range-spec of RFC 9110 (1*DIGIT "-" [1*DIGIT]): ignored, the whole file, as RFC 9110 14.2
    # lets a server; never read as a range by rules another cache or proxy on the way does not share
    "bytes=1_0-2_0": (200, slice(None)),  # Python's int() takes "1_0" as 10
    "bytes=\u0661-\u0669": (200, slice(None)),  # Arabic-Indic digits: int() reads them as 1 and 9
    "bytes=+5-9": (200, slice(None)),
    "bytes=9-5": (200, slice(None)),  # last-pos before first-pos: invalid (RFC 9110 14.1.1)
    "bytes=-": (200, slice(None)),
    # a range unit the server does not understand MUST be ignored (RFC 9110 14.2)
    "items=0-9": (200, slice(None)),
}


@pytest.mark.slow
def test_malformed_and_oversized_range_headers_on_a_moments_video(served_videos):
    """/api/video's Range header, as a player sends it and as an attacker does: valid ranges give exactly those
    bytes, an unsatisfiable one 416, and a header that is not a byte range as RFC 9110 writes it (digits Python
    reads but HTTP does not, another unit, last before first) is ignored: the whole file, never a guessed slice."""
    from helpers import call

    lib, url, ids = served_videos
    moment = ids["clip.mp4"][0]
    data = (lib / "clip.mp4").read_bytes()
    got = {}
    for header, (status, part) in RANGES.items():
        code, headers, body = call(url, f"/api/video/{moment}", headers={"Range": header.encode("utf-8").decode("latin-1")})
        got[header] = code
        if code == status and part is not None:
            assert body == data[part], header
            if code == 206:
                first = part.indices(len(data))[0]
                assert headers["Content-Range"] == f"bytes {first}-{first + len(body) - 1}/{len(data)}", header
    assert got == {header: status for header, (status, _) in RANGES.items()}
    assert call(url, "/healthz", token=None)[0] == 200


@pytest.mark.slow
def test_a_video_swapped_for_a_symlink_to_a_file_outside_the_root_is_not_served(served_videos, tmp_path):
    """swap.mp4 replaced, after it was indexed, by a symlink to a file outside the root with the same size and
    mtime (another user's file, or one the server must not hand out): neither its bytes nor a frame of it
    comes back, for any of its moments, with or without a range."""
    from helpers import call

    lib, url, ids = served_videos
    video = lib / "swap.mp4"
    data = video.read_bytes()
    secret = tmp_path / "secret.mp4"
    secret.write_bytes(bytes(b ^ 0x5A for b in data[:64]) + data[64:])  # a playable-looking file of the same size
    st = video.stat()
    os.utime(secret, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert call(url, f"/api/video/{ids['swap.mp4'][0]}")[2] == data  # served before the swap
    video.rename(lib / "swap.old")
    video.symlink_to(secret)
    for moment in ids["swap.mp4"]:
        for path, headers in ((f"/api/video/{moment}", None), (f"/api/video/{moment}", {"Range": "bytes=0-63"}),
                              (f"/api/image/{moment}?size=64", None), (f"/api/image/{moment}", None)):
            status, _, body = call(url, path, headers=headers)
            assert status == 409 and secret.read_bytes()[:64] not in body, (path, status, body[:200])


# -- 8. export and finetune outputs: killed part way, or pointed through a link ----------------------------------

def _tree(folder: Path) -> dict[str, bytes | str]:
    """Every entry under folder: a file's bytes, a link's target (not followed)."""
    out: dict[str, bytes | str] = {}
    for p in sorted(folder.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(folder))] = "-> " + os.readlink(p)
        elif p.is_file():
            out[str(p.relative_to(folder))] = p.read_bytes()
    return out


@pytest.mark.slow
def test_export_killed_part_way_leaves_the_earlier_export_and_links_are_never_written_through(tmp_path):
    """`export` killed -9 while it writes (a parquet file, a clip-retrieval folder: mid-shard, and after its list
    of files), each over an earlier export of its own: the earlier export is there byte for byte, and the next
    export replaces it whole. A clip-retrieval OUT whose img_emb is a link to the user's folder (holding files
    named like shards) is refused, that folder untouched."""
    import pyarrow.parquet as pq

    from helpers import vector_index

    ix = tmp_path / "ix"
    vector_index(ix, 40, 16)
    out = tmp_path / "out"
    out.mkdir()
    small = {"alignsearch.search.export:BATCH": 10, "alignsearch.search.export:PAGE": 10}
    for target, fmt, where, nth in ((out / "emb.parquet", "parquet", "_record_batch", 2),  # the third row group written
                                    (out / "clip", "clip-retrieval", "_finish_npy", 2),  # the second shard closed
                                    # every shard and the list of them written, not yet swapped in
                                    (out / "clip", "clip-retrieval", "_write_marker", 1)):
        # --shard-rows is clip-retrieval's alone (a parquet export refuses it: d181f6e)
        shards = ["--shard-rows", "10"] if fmt == "clip-retrieval" else []
        run("export", target, "--index", ix, "--format", fmt, *shards, "--path", "00000[0-2]*")
        earlier = _tree(out)
        proc = killed_at_call(f"alignsearch.search.export:{where}", nth, small,
                               "export", target, "--index", ix, "--format", fmt, *shards)
        assert proc.returncode == -9, proc.stderr[-3000:]
        assert {k: v for k, v in _tree(out).items() if k in earlier} == earlier, fmt
        left = [p for p in out.iterdir() if p.name.startswith(f".{target.name}.")]
        assert len(left) == 1, left  # the killed export's temporary copy
        os.utime(left[0], (time.time() - 120, time.time() - 120))  # a minute past: no write is at work on it
        run("export", target, "--index", ix, "--format", fmt, *shards)
        assert not left[0].exists(), fmt  # removed by the next export of OUT (it stayed for good before)
        rows = pq.read_table(target).num_rows if fmt == "parquet" else sum(
            pq.read_table(p).num_rows for p in (target / "metadata").iterdir())
        assert rows == 40, fmt
        if fmt == "clip-retrieval":  # the new export lists what it wrote, for the next one to replace
            assert (target / "alignsearch-export.json").is_file()

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "img_emb_0.npy").write_bytes(b"the user's own array")
    clip = tmp_path / "linked-clip"
    clip.mkdir()
    (clip / "img_emb").symlink_to(mine, target_is_directory=True)
    before = _tree(tmp_path / "mine"), _tree(clip)
    result = run("export", clip, "--index", ix, "--format", "clip-retrieval", code=2)
    assert result.output.startswith("error:") and len(result.output.strip().splitlines()) == 1, result.output
    assert (_tree(tmp_path / "mine"), _tree(clip)) == before


def test_finetune_out_through_a_link_to_the_users_folder_is_refused(tmp_path, tiny_model):
    """`finetune --out LINK` where LINK points at the training folder (or any folder of the user's): refused
    before anything is trained or written, the folder and the link as they were."""
    from shapes_data import all_specs, write_set

    pairs = tmp_path / "train"
    write_set(pairs, all_specs(held_out=False)[:2], 2, seed=1)
    link = tmp_path / "model-out"
    link.symlink_to(pairs, target_is_directory=True)
    before = _tree(pairs)
    result = run("finetune", pairs, "--model", tiny_model, "--out", link, "--epochs", "1", "--device", "cpu", code=2)
    assert "not an earlier finetune output" in result.output, result.output
    assert _tree(pairs) == before and link.is_symlink() and os.readlink(link) == str(pairs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model-out", "train"]  # nothing beside it either


@pytest.mark.slow
def test_finetune_out_that_is_a_model_in_use_is_refused(tmp_path, tiny_model, monkeypatch):
    """An earlier finetune output is a valid --out, and the save replaced the model in it: with --out the
    model training starts from, or the model of the index found here (ALIGNSEARCH_INDEX, or .alignsearch/ in
    the current folder or above), that model's weights were gone and the index's vectors no longer matched its
    model. Refused before training, the model as it was."""
    import shutil

    from shapes_data import all_specs, write_set

    pairs = tmp_path / "train"
    write_set(pairs, all_specs(held_out=False)[:2], 2, seed=1)
    tuned = tmp_path / "tuned"  # an earlier finetune output
    shutil.copytree(tiny_model, tuned)
    (tuned / "alignsearch_finetune.json").write_text("{}")
    home = tmp_path / "home"
    index_json(home / ".alignsearch", make_images(tmp_path / "photos", 3)[0].parent, "--model", tuned, "--device", "cpu")
    before = _tree(tuned)
    args = ("finetune", pairs, "--out", tuned, "--epochs", "1", "--device", "cpu")
    result = run(*args, "--model", tuned, code=2)
    assert "is the model it starts from" in result.output, result.output
    monkeypatch.setenv("ALIGNSEARCH_INDEX", str(home / ".alignsearch"))
    assert "is the model of the index" in run(*args, "--model", tiny_model, code=2).output
    monkeypatch.delenv("ALIGNSEARCH_INDEX")
    monkeypatch.chdir(home)
    assert "is the model of the index" in run(*args, "--model", tiny_model, code=2).output
    assert _tree(tuned) == before
    run("query", "a square", "--backend", "torch", "--device", "cpu")  # the index's model is still its model


# -- 9. a thumbnail cache another user can write ------------------------------------------------------------------

@pytest.mark.slow
def test_thumbnails_planted_in_the_cache_are_not_served(indexed_images, tmp_path):
    """The server keeps thumbnails in INDEX/thumbs and served whatever it found there by name: with thumbs/
    writable by every user, or another user's, a planted `ID-SIZE.jpg` symlink handed any file the server can
    read (a secret of its user's) to the client, and a planted picture was shown for the indexed one; in its own
    private cache, a planted link did the same. A cached thumbnail is read only from a folder no one else can
    write, and never through a link."""
    import io

    from PIL import Image

    from helpers import call, start_serve, stop

    root, ix = indexed_images(12)
    conn = _ro(ix)
    try:
        ids = [i for (i,) in conn.execute("SELECT id FROM files WHERE status = 'indexed' ORDER BY id")]
    finally:
        conn.close()
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"the server user's private key " * 10)
    thumbs = ix / "thumbs"
    hows = ["a link in my own", "writable by every user"] + (["another user's"] if os.geteuid() == 0 else [])
    proc, url = start_serve(ix, "--token", "s3cret")
    try:
        for n, how in enumerate(hows):
            link, picture = ids[2 * n], ids[2 * n + 1]
            thumbs.mkdir(exist_ok=True)
            thumbs.chmod(0o755)
            (thumbs / f"{link}-64.jpg").symlink_to(secret)  # the secret, through a link named as a thumbnail
            planted = thumbs / f"{picture}-64.jpg"
            Image.new("RGB", (64, 64), (255, 0, 255)).save(planted, "JPEG")  # another picture for the indexed one
            if how == "writable by every user":
                thumbs.chmod(0o777)
            elif how == "another user's":  # only root can give a folder to another user
                os.chown(thumbs, 4242, 4242)
                os.chown(planted, 4242, 4242)
            status, _, body = call(url, f"/api/image/{link}?size=64")
            assert status == 200 and b"private key" not in body, (how, status, body[:100])
            Image.open(io.BytesIO(body)).verify()  # a real thumbnail
            if how != "a link in my own":  # a picture in my own cache is one a process of mine put there
                status, _, body = call(url, f"/api/image/{picture}?size=64")
                assert status == 200 and body != planted.read_bytes(), how
    finally:
        stop(proc)
    assert secret.read_bytes() == b"the server user's private key " * 10


# -- 10. a folder of videos, and a video, the indexer cannot read ------------------------------------------------

@pytest.mark.slow
def test_an_unreadable_video_folder_keeps_its_moments_and_an_unreadable_video_is_a_failure(tmp_path, tiny_model):
    """As a process without root's permission bypass: a folder of indexed videos made unreadable (chmod 000)
    keeps every moment of its videos (not removed as gone, no moment lost: a video is kept whole), a video
    that cannot be opened is recorded as failed with its reason and the run goes on; once the folder is
    readable again the new video in it is read and nothing else is read twice."""
    from helpers import alignsearch, can_drop_dac, make_video, summary

    if not can_drop_dac():
        pytest.skip("cannot start a process without root's permission bypass")
    lib, ix = tmp_path / "lib", tmp_path / "ix"
    make_images(lib, 2)
    make_video(lib / "clips" / "a.mp4", [(31, 2), (32, 2), (33, 2)])
    first = index_json(ix, lib, "--model", tiny_model, "--device", "cpu")
    assert first["added"] == 3 and first["failed"] == 0, first
    moments = _moments(ix)
    make_video(lib / "clips" / "b.mp4", [(41, 2), (42, 2)])
    make_video(lib / "locked.mp4", [(51, 2), (52, 2)])
    os.chmod(lib / "locked.mp4", 0)
    os.chmod(lib / "clips", 0)
    try:
        s = summary(alignsearch("index", "--index", ix, "--json", unprivileged=True))
    finally:
        os.chmod(lib / "clips", 0o755)
        os.chmod(lib / "locked.mp4", 0o644)
    assert s["removed"] == 0 and s["failed"] == 1 and [e["folder"] for e in s["listing_errors"]] == [str(lib / "clips")], s
    assert _moments(ix) == moments
    conn = _ro(ix)
    try:
        (reason,) = conn.execute("SELECT reason FROM files WHERE relpath = 'locked.mp4' AND status = 'failed'").fetchone()
    finally:
        conn.close()
    assert "Permission denied" in reason, reason
    s = summary(alignsearch("index", "--index", ix, "--json", unprivileged=True))
    assert s["listing_errors"] == [] and s["added"] == 1 and s["removed"] == 0, s  # b.mp4; a.mp4 not read again
    assert _moments(ix)["clips/a.mp4"] == moments["clips/a.mp4"] and "clips/b.mp4" in _moments(ix)
    assert keyword_drift(ix) == [] and run("verify", "--index", ix, "--skip-model").exit_code == 0
