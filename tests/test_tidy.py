"""Review leftovers: an upload over the server's pixel cap is a 413 whatever its format, ..."""

import io
import json
import os
import sqlite3
import uuid
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import alignsearch
from alignsearch import safeopen
from alignsearch.errors import BadImageError, ImageTooLarge
from alignsearch.media.images import open_rgb
from alignsearch.search.columns import Columns
from alignsearch.search.query import null_prompts
from alignsearch.storage.paths import DB_FILE
from alignsearch.surfaces.server import ServerConfig, start_in_thread
from helpers import call, indexed_corpus, png_bomb, seal
from indexer.scan import scan_folder

UPLOAD_CAP = 40_000  # pixels: 200x200 passes, 300x300 does not


@pytest.fixture(scope="module")
def small_cap_server(tmp_path_factory, tiny_model):
    """A server in this process on a real socket, decoding uploads of at most UPLOAD_CAP pixels."""
    ix = indexed_corpus(tmp_path_factory.mktemp("tidy-served"), tiny_model, 3)
    engine = alignsearch.open(ix, device="cpu")
    server = start_in_thread(engine, ServerConfig(port=0, token="s3cret", max_upload_pixels=UPLOAD_CAP))
    yield server.url
    server.shutdown()
    engine.close()


def upload(url: str, image: bytes) -> tuple[int, str]:
    boundary = uuid.uuid4().hex
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="k"\r\n\r\n1\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="q"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n").encode() + image + f"\r\n--{boundary}--\r\n".encode()
    status, _, answer = call(url, "/api/search", data=body,
                             headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    return status, json.loads(answer).get("error", "")


def encoded(fmt: str, side: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (200, 30, 30)).save(buf, fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["WEBP", "GIF", "TIFF", "BMP", "AVIF"])
def test_an_upload_over_the_pixel_cap_is_413_in_any_format(small_cap_server, fmt):
    assert upload(small_cap_server, encoded(fmt, 200))[0] == 200
    status, error = upload(small_cap_server, encoded(fmt, 300))
    assert status == 413 and f"at most {UPLOAD_CAP:,} pixels" in error, (status, error)


@pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning")
def test_an_upload_over_pillows_warning_size_is_413_with_warnings_as_errors(small_cap_server):
    """The server read an upload's header a second time, without open_rgb's warning filter, to tell a large
    image from an unreadable one: where Pillow's DecompressionBombWarning (above 200 MP) is an error (python -W
    error), that second read failed and a 225 MP image was answered 400 `unreadable image`, not 413."""
    status, error = upload(small_cap_server, png_bomb(15_000, 15_000))
    assert status == 413 and "too large" in error, (status, error)


def test_open_rgb_says_too_large_with_its_own_class():
    with pytest.raises(ImageTooLarge, match="image too large: 300x300 pixels"):
        open_rgb(encoded("PNG", 300), max_pixels=UPLOAD_CAP)
    with pytest.raises(ImageTooLarge, match="decompression bomb guard"):  # Pillow's own guard, far above ours
        open_rgb(png_bomb(30_000, 30_000), max_pixels=10**12)
    with pytest.raises(BadImageError) as refused:
        open_rgb(b"not an image")
    assert not isinstance(refused.value, ImageTooLarge)


# -- a listing's links: each folder walked once (safeopen.FolderWalks), judged as stat_through judges them ------


def _outcome(stat_it):
    try:
        st = stat_it()
    except (OSError, safeopen.Refused) as exc:
        return type(exc).__name__, str(exc)
    return st.st_ino, st.st_size


def _link_tree(tmp_path) -> tuple[Path, list[str]]:
    """A library of links in two folders (relative, absolute, chained, broken, to a folder, planted by another
    user where root can plant them) and the relpaths to stat, the folders interleaved."""
    real = tmp_path / "real"
    real.mkdir()
    for i in range(3):
        (real / f"{i}.jpg").write_bytes(b"x" * (i + 1))
    lib = tmp_path / "lib"
    (lib / "a" / "b").mkdir(parents=True)
    (lib / "a" / "rel.jpg").symlink_to("../../real/0.jpg")
    (lib / "a" / "abs.jpg").symlink_to(real / "1.jpg")
    (lib / "a" / "chain.jpg").symlink_to("rel.jpg")
    (lib / "a" / "broken.jpg").symlink_to("nothing.jpg")
    (lib / "a" / "folder.jpg").symlink_to(real)
    (lib / "a" / "b" / "deep.jpg").symlink_to(real / "2.jpg")
    (lib / "plain.jpg").write_bytes(b"plain")
    names = ["a/rel.jpg", "a/abs.jpg", "a/b/deep.jpg", "a/chain.jpg", "plain.jpg", "a/broken.jpg", "a/folder.jpg"]
    if os.geteuid() == 0:
        (lib / "a" / "planted.jpg").symlink_to(real / "0.jpg")
        os.lchown(lib / "a" / "planted.jpg", 4242, 4242)
        (lib / "a").chmod(0o2775)  # others may write it: a link another user made there is refused
        names.append("a/planted.jpg")
    return lib, names


def test_folder_walks_stat_links_as_stat_through_does(tmp_path):
    lib, names = _link_tree(tmp_path)
    expected = [_outcome(partial(safeopen.stat_through, lib, n)) for n in names]
    open_fds = len(os.listdir("/proc/self/fd"))
    walks = safeopen.FolderWalks(lib)
    assert [_outcome(partial(walks.stat_through, n)) for n in names] == expected
    assert [_outcome(partial(walks.stat_through, n)) for n in reversed(names)] == expected[::-1]
    assert any("another user" in str(e[1]) for e in expected) == (os.geteuid() == 0)
    walks.close()
    assert len(os.listdir("/proc/self/fd")) == open_fds
    walks.stat_through("a/rel.jpg")
    del walks  # a listing abandoned half way closes its folders too
    assert len(os.listdir("/proc/self/fd")) == open_fds


def test_a_listing_of_links_leaves_no_folder_open(tmp_path):
    lib, _ = _link_tree(tmp_path)
    open_fds = len(os.listdir("/proc/self/fd"))
    found = {f.relpath: f.error for f in scan_folder(str(lib))}
    assert found["a/rel.jpg"] is None and found["a/b/deep.jpg"] is None and found["a/broken.jpg"] == "broken symlink"
    assert len(os.listdir("/proc/self/fd")) == open_fds
    listing = scan_folder(str(lib))
    next(f for f in listing if f.relpath.startswith("a/"))  # its links' folder walked, and left half way
    listing.close()
    assert len(os.listdir("/proc/self/fd")) == open_fds


# -- the gate's null calibration over ANN ids the snapshot's columns lack --------------------------------------


def test_rows_present_drops_the_ids_the_columns_lack():
    cols = Columns.__new__(Columns)  # the id array alone: no catalog needed
    cols.ids = np.array([2, 5, 9], dtype=np.int64)
    assert cols.rows_present(np.array([9, 4, 2, 10, 1, 5])).tolist() == [2, 0, 1]  # 4: not 5's row, 10: past the end
    assert cols.rows_present(np.array([], dtype=np.int64)).tolist() == []


@pytest.mark.slow
def test_the_null_calibration_skips_ann_ids_whose_files_left_the_index(tmp_path, tiny_model):
    """_null_best (auto mode's gate fusion) read each null query's ANN candidates' rows by searchsorted: an id the
    snapshot's columns lack (its file failed or left after the ANN index was built) read a neighbour's vector, or,
    past the last id, raised IndexError."""
    ix = indexed_corpus(tmp_path, tiny_model, 4)
    con = sqlite3.connect(ix / DB_FILE)
    with con:  # every file but the first leaves the indexed ones; the ANN index still holds them all
        con.execute("UPDATE files SET status = 'failed', reason = 'gone' WHERE id > (SELECT MIN(id) FROM files)")
        seal(con)
    con.close()
    engine = alignsearch.open(ix, device="cpu")
    try:
        assert engine.snap.index.ntotal == 4 and len(engine.snap.columns(engine.db)) == 1
        nulls = engine._null_best(engine.snap)
        kept = engine.snap.columns(engine.db).vec_rows
        best_kept = engine._text_encoder_of(engine.snap).encode_text(null_prompts()) @ \
            engine.snap.store.get(kept).astype(np.float32).T
    finally:
        engine.close()
    assert len(nulls) == len(null_prompts())
    # each null query's best is the kept file's cosine, or none found among its candidates (0)
    for got, kept_cosine in zip(nulls, best_kept[:, 0]):
        assert got == 0.0 or got == pytest.approx(kept_cosine, abs=2e-3), (nulls, best_kept)
