"""Issue 24, "First use": what a new user met (Ctrl-C, an interrupted first run, the index folder as a root,
export's roots, the server against the CLI, stale server records, small lies, waits, colour in near
duplicates, decode memory, a writer holding the catalog)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import run
from helpers import child_pids, decode_growth, seal, smooth_photos

CHILD_ENV = {"HF_HUB_OFFLINE": "1", "ALIGNSEARCH_PROGRESS_SECONDS": "0"}


# -- item 1: Ctrl-C during `index` with decode workers -------------------------------------------------------


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, tiny_model):
    """A first `index` run stopped as a terminal's Ctrl-C stops it: SIGINT to every process of the group, the
    decode workers included, while they decode (after the first committed batch).
    Returns (process, stderr, index folder, photos, the worker pids)."""
    tmp = tmp_path_factory.mktemp("interrupted")
    photos = tmp / "photos"
    smooth_photos(photos, 48, size=(1200, 900))
    proc = subprocess.Popen(
        [sys.executable, "-m", "alignsearch", "index", str(photos), "--index", str(tmp / "ix"), "--model",
         str(tiny_model), "--device", "cpu", "--workers", "2", "--batch-size", "4"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, **CHILD_ENV})
    lines = []
    for line in proc.stderr:  # the first committed batch: workers are up and decoding the next ones
        lines.append(line)
        if line.startswith("indexing:"):
            break
    workers = child_pids(proc.pid)
    assert proc.poll() is None and workers, "".join(lines)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    return proc, "".join(lines) + err, tmp / "ix", photos, workers


@pytest.mark.slow
def test_ctrl_c_to_the_process_group_ends_quietly_with_130(interrupted):
    """One line, exit 130, no worker traceback, no worker left behind."""
    proc, err, _, _, workers = interrupted
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "SpawnPoolWorker" not in err and "KeyboardInterrupt" not in err, err
    assert err.splitlines()[-1] == "error: interrupted" and err.count("error:") == 1, err
    time.sleep(0.5)
    assert not [p for p in workers if Path(f"/proc/{p}").exists() and "Z" not in Path(f"/proc/{p}/stat").read_text()]


# -- item 2: an interrupted first run is searchable ------------------------------------------------------------


@pytest.mark.slow
def test_interrupted_first_run_is_searchable_and_info_says_so(interrupted):
    """No ANN index was built: exact search over the committed vectors; `info` says the run was interrupted,
    and the next run finishes it."""
    import json

    import alignsearch

    proc, _, ix, photos, _ = interrupted
    info = json.loads(run("info", "--index", ix, "--json").stdout)
    assert info["last_run"] == "interrupted"
    assert 4 <= info["images"] < 48 and info["index"]["vectors"] == info["images"]
    assert "interrupted" in run("info", "--index", ix).output
    with alignsearch.open(ix) as engine:
        first = engine.file(1)
        hits = engine.search(image=first.path, k=3)
        assert hits[0].path == first.path and hits[0].score > 0.999
        assert len(engine.search(text="a photo", k=100)) == info["images"]
    out = run("query", "--image", first.path, "--index", ix, "-k", "2").output
    assert first.path in out.splitlines()[0]
    assert run("similar", "1", "--index", ix, "-k", "2").output.count("\n") == 2
    # an interrupted run is not damage: verify says so and exits 0
    assert "the first index run did not finish" in run("verify", "--index", ix, "--skip-model").output
    run("index", "--index", ix)
    info = json.loads(run("info", "--index", ix, "--json").stdout)
    assert info["last_run"] == "finished" and info["images"] == 48 and info["index"]["layout"] == "memory"


# -- item 3: the index folder is never a root, never listed -----------------------------------------------------


@pytest.mark.slow
def test_the_index_folder_is_refused_as_a_root_and_never_listed(tmp_path, tiny_model):
    import json
    import shutil

    from conftest import make_images

    photos = tmp_path / "photos"
    make_images(photos, 3)
    ix = photos / "library-index"  # an index kept inside the library, not hidden
    run("index", photos, "--index", ix, "--model", tiny_model, "--device", "cpu", "--include-hidden")
    (ix / "thumbs").mkdir(exist_ok=True)  # what the server caches there
    shutil.copy(photos / "img001.jpg", ix / "thumbs" / "1.jpg")
    again = json.loads(run("index", "--index", ix, "--json").stdout)
    assert again["added"] == 0 and again["unchanged"] == 3
    for inside in (ix, ix / "thumbs"):
        out = run("index", inside, "--index", ix, code=6).output
        assert "index folder" in out and out.count("\n") == 1, out
    default = tmp_path / "lib"  # the default .alignsearch/, indexed from the folder that holds it
    make_images(default, 2)
    run("index", default, "--index", default / ".alignsearch", "--include-hidden", "--model", tiny_model,
        "--device", "cpu")
    (default / ".alignsearch" / "thumbs").mkdir(exist_ok=True)
    shutil.copy(default / "img001.jpg", default / ".alignsearch" / "thumbs" / "1.jpg")
    assert json.loads(run("index", "--index", default / ".alignsearch", "--json").stdout)["added"] == 0
    run("index", default / ".alignsearch", "--index", default / ".alignsearch", code=6)


# -- item 4: export --root resolves roots as forget does ----------------------------------------------------------


@pytest.mark.slow
def test_export_root_is_resolved_like_forget_and_an_unknown_one_refused(tmp_path, tiny_model, monkeypatch):
    import json

    import pyarrow.parquet as pq

    from conftest import make_images

    make_images(tmp_path / "photos", 3)
    make_images(tmp_path / "other", 2, seed=1)
    ix = tmp_path / "ix"
    run("index", tmp_path / "photos", tmp_path / "other", "--index", ix, "--model", tiny_model, "--device", "cpu")
    monkeypatch.chdir(tmp_path)
    for given in ("./photos", "photos/", str(tmp_path / "photos")):
        done = json.loads(run("export", f"out-{len(given)}.parquet", "--root", given, "--index", ix, "--json").stdout)
        assert done["rows"] == 3, given
        assert pq.read_table(done["path"]).num_rows == 3
    out = run("export", "none.parquet", "--root", "./elsewhere", "--index", ix, code=6).output
    assert "not a root of this index" in out and not (tmp_path / "none.parquet").exists()
    out = run("export", "-", "--index", ix, code=2).output
    assert "standard output" in out and out.startswith("error: ") and out.count("\n") == 1
    assert not (tmp_path / "-").exists()


# -- item 5: the server agrees with the CLI -------------------------------------------------------------------------


@pytest.mark.slow
def test_server_agrees_with_the_cli(tmp_path, tiny_model):
    """similar= leaves the image out (as `similar`); /api/recent carries the hit fields (taken, caption, tags);
    POST honours k in the URL; a body over the cap answers the documented JSON error."""
    import json
    import socket
    import uuid

    from conftest import make_images
    from helpers import call, start_serve, stop, write_labels

    photos = tmp_path / "photos"
    make_images(photos, 12)
    (photos / "img001.txt").write_text("a caption for the first one")
    ix = tmp_path / "ix"
    run("index", photos, "--index", ix, "--model", tiny_model, "--device", "cpu")
    run("tag", "--labels-file", write_labels(tmp_path / "labels.txt", ["a red car"]), "--threshold", "0",
        "--index", ix, "--device", "cpu")
    cli = json.loads(run("similar", "3", "-k", "4", "--index", ix, "--json").stdout)["results"]
    proc, url = start_serve(ix, "--token", "s3cret")
    try:
        served = json.loads(call(url, "/api/search?similar=3&k=4")[2])["results"]
        assert [h["id"] for h in served] == [h["id"] for h in cli] and 3 not in [h["id"] for h in served]
        collapsed = json.loads(call(url, "/api/search?similar=3&k=4&collapse=1")[2])["results"]
        assert 3 not in [h["id"] for h in collapsed] and len(collapsed) == 4

        recent = json.loads(call(url, "/api/recent?limit=12")[2])["results"]
        assert all(r["taken"] and r["tags"] == ["a red car"] and "score" not in r for r in recent), recent[0]
        assert next(r for r in recent if r["relpath"] == "img001.jpg")["caption"] == "a caption for the first one"

        boundary = uuid.uuid4().hex
        body = (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="q.jpg"\r\n'
                "Content-Type: image/jpeg\r\n\r\n").encode() + (photos / "img004.jpg").read_bytes() + \
            f"\r\n--{boundary}--\r\n".encode()
        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        status, _, answer = call(url, "/api/search?k=3", data=body, headers=headers)
        assert status == 200 and len(json.loads(answer)["results"]) == 3

        host, port = url.removeprefix("http://").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(("POST /api/search HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer s3cret\r\n"
                       f"Content-Type: multipart/form-data; boundary=x\r\nContent-Length: {21 * 1024 * 1024}\r\n"
                       "Connection: close\r\n\r\n").encode() + b"--x\r\n" + b"x" * 1024)
            response = b""
            try:
                while block := s.recv(65536):
                    response += block
            except OSError:
                pass
        head, _, payload = response.partition(b"\r\n\r\n")
        assert b" 413 " in head.split(b"\r\n")[0] and b"application/json" in head.lower(), response[:400]
        assert "exceeds the limit" in json.loads(payload)["error"]
    finally:
        stop(proc)


# -- item 6: a killed server's record is cleaned once; a busy port is explained --------------------------------------


@pytest.mark.slow
def test_killed_servers_record_is_removed_once_and_a_busy_port_explained(indexed_images):
    import socket

    from alignsearch.storage.paths import SERVER_FILE
    from helpers import alignsearch, free_port, start_serve, stop

    _, ix = indexed_images(3)
    proc, _ = start_serve(ix)
    stop(proc, signal.SIGKILL)  # reaped: its pid is gone
    assert (ix / SERVER_FILE).exists()
    first = alignsearch("query", "dog", "-k", "1", "--index", ix)
    assert first.returncode == 0 and first.stderr.count("notice:") == 1, first.stderr
    assert not (ix / SERVER_FILE).exists()
    second = alignsearch("query", "dog", "-k", "1", "--index", ix)
    assert second.returncode == 0 and "notice:" not in second.stderr, second.stderr

    proc, url = start_serve(ix)
    try:
        port = url.rsplit(":", 1)[1]
        record = (ix / SERVER_FILE).read_bytes()
        again = alignsearch("serve", "--index", ix, "--port", port, "--device", "cpu", timeout=120)
        assert again.returncode != 0 and "already served" in again.stderr and url in again.stderr, again.stderr
        assert again.stderr.strip().count("\n") == 0 and again.stderr.startswith("error: "), again.stderr
        # issue 24 #23: a second server on another port wrote its record over the first's, and removed it on exit
        elsewhere = alignsearch("serve", "--index", ix, "--port", free_port(), "--device", "cpu", timeout=120)
        assert elsewhere.returncode != 0 and "already served" in elsewhere.stderr, elsewhere.stderr
        assert (ix / SERVER_FILE).read_bytes() == record  # the running server's record is untouched
    finally:
        stop(proc)
    with socket.socket() as other:  # another program on the port
        port = free_port()
        other.bind(("127.0.0.1", port))
        other.listen(1)
        busy = alignsearch("serve", "--index", ix, "--port", port, "--device", "cpu", timeout=120)
    assert busy.returncode != 0 and "another program" in busy.stderr and "--port" in busy.stderr, busy.stderr


# -- item 7: small lies ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_small_lies_format_aliases_zero_tags_threshold_usage_exact_copy_and_restored_shard(tmp_path, tiny_model):
    import json
    import shutil
    import tarfile

    from conftest import make_images
    from helpers import write_labels

    photos = tmp_path / "photos"
    made = make_images(photos, 6)  # img000/img003 are PNG, the rest JPEG
    shutil.copy(made[1], photos / "copy-of-img001.jpg")  # an exact byte copy
    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w") as tar:
        tar.add(made[2], arcname="member.jpg")
    ix = tmp_path / "ix"
    run("index", photos, shard, "--index", ix, "--model", tiny_model, "--device", "cpu")

    for given in ("jpg", "JPG", "jpeg", "Jpeg"):
        hits = json.loads(run("query", "x", "-k", "50", "--format", given, "--index", ix, "--json").stdout)["results"]
        assert len(hits) == 6 and {h["format"] for h in hits} == {"JPEG"}, given
    where = json.loads(run("query", "x", "-k", "50", "--where", "format = jpg", "--index", ix, "--json").stdout)
    assert len(where["results"]) == 6

    run("tag", "--labels-file", write_labels(tmp_path / "l.txt", ["a unicorn"]), "--threshold", "1", "--index", ix,
        "--device", "cpu")
    assert json.loads(run("tags", "--json", "--index", ix).stdout) == [{"label": "a unicorn", "images": 0}]
    assert "a unicorn" in run("tags", "--index", ix).output

    for args in (["--threshold", "99"], ["--tier", "similar", "--threshold", "1.5"]):
        out = run("dupes", *args, "--index", ix, code=2).output
        assert out.startswith("error: ") and out.count("\n") == 1, out

    import alignsearch

    with alignsearch.open(ix) as engine:
        original = next(r for r in engine.search_vector(engine.vector_of(2), k=10) if r.relpath == "img001.jpg")
    out = json.loads(run("similar", str(original.id), "-k", "1", "--index", ix, "--json").stdout)["results"]
    assert out[0]["relpath"] == "copy-of-img001.jpg" and abs(out[0]["score"] - 1.0) < 1e-6, out[0]["score"]

    shard.rename(tmp_path / "away.tar")
    run("index", "--index", ix)  # the shard is missing: its rows are kept, the listing error recorded
    assert json.loads(run("roots", "--json", "--index", ix).stdout)[1]["state"] == "missing"
    (tmp_path / "away.tar").rename(shard)
    restored = json.loads(run("roots", "--json", "--index", ix).stdout)[1]
    assert restored["root"] == str(shard) and restored["state"] == "ok" and restored["listing_errors"] == []


def test_an_exact_copy_scores_one_though_its_fp16_row_is_not_unit_length(tmp_path):
    """Two catalog rows holding the same vector, whose fp16 rounding left it 1e-4 short of unit length (as
    align-base's vectors can be): `similar` of one scores the other 1.0, not 0.9999."""
    import numpy as np

    import alignsearch
    from alignsearch.storage import ann, catalog, state, vectors
    from alignsearch.storage.paths import ANN_FILE, DB_FILE, VECTORS_FILE

    dim = 640
    for seed in range(10_000):
        v = np.random.default_rng(seed).standard_normal(dim)
        v = (v / np.linalg.norm(v)).astype(np.float32)
        if float(np.sum(v.astype(np.float16).astype(np.float32) ** 2)) < 1 - 1e-4:
            break
    rows = np.stack([v, v, *np.random.default_rng(1).standard_normal((3, dim))]).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    store = vectors.VectorStore(tmp_path / VECTORS_FILE, dim, 0)
    store.append(rows)
    db = catalog.connect(tmp_path / DB_FILE)
    with db.begin() as conn:
        conn.execute(catalog.insert(catalog.files), [
            dict(root="/synthetic", relpath=f"{i}.jpg", size=1000 + i, mtime=1.6e9, sha256=f"{i:064x}", width=64,
                 height=64, format="JPEG", status=catalog.INDEXED, indexed_at=0.0, vec_row=i) for i in range(5)])
        seal(conn)
        state.write(conn, model=state.ModelIdentity(name="synthetic", fingerprint="synthetic", dim=dim))
        state.write(conn, roots=state.RootsState(roots=("/synthetic",)))
        vectors.save(conn, store)
    db.dispose()
    index = ann.create(ann.plan_index(0, dim), dim)
    ann.add(index, rows, np.arange(1, 6))
    ann.write_atomic(index, tmp_path / ANN_FILE)
    with alignsearch.open(tmp_path) as engine:
        hits = engine.search_vector(engine.vector_of(1), k=2)
    assert [h.id for h in hits][:2] in ([1, 2], [2, 1])
    assert all(abs(h.score - 1.0) < 1e-6 for h in hits), [h.score for h in hits]


# -- item 11: a writer holding the catalog in EXCLUSIVE locking mode ----------------------------------------------


@pytest.mark.slow
def test_a_catalog_held_exclusively_is_said_at_once_not_blamed_on_damage(indexed_images):
    import fcntl
    import sqlite3

    from helpers import alignsearch

    _, ix = indexed_images(3)
    holder = sqlite3.connect(ix / "catalog.db")
    holder.execute("PRAGMA locking_mode=EXCLUSIVE")
    holder.execute("BEGIN EXCLUSIVE")
    holder.execute("UPDATE meta SET value = value WHERE key = 'roots'")
    try:
        started = time.monotonic()
        other = alignsearch("info", "--index", ix, timeout=120)
        assert time.monotonic() - started < 15, other.stderr
        assert other.returncode == 6 and "another program holds it" in other.stderr, other.stderr
        assert "verify" not in other.stderr and "damaged" not in other.stderr.replace("not damaged", "")
        with open(ix / "write.lock", "w") as lock:  # as an index run holds it
            fcntl.flock(lock, fcntl.LOCK_EX)
            query = alignsearch("query", "dog", "--index", ix, timeout=120)
        assert query.returncode == 6 and "alignsearch run writing this index" in query.stderr, query.stderr
        assert query.stderr.count("\n") == 1
    finally:
        holder.rollback()
        holder.close()
    assert alignsearch("info", "--index", ix).returncode == 0


# -- item 9: near duplicates agree in colour too ------------------------------------------------------------------


@pytest.mark.slow
def test_near_duplicates_and_collapse_tell_colours_of_equal_brightness_apart(tmp_path, tiny_model):
    import json

    from PIL import Image, ImageDraw

    from helpers import near_copies

    photos = tmp_path / "photos"
    photos.mkdir()
    for name, colour in (("red", (255, 20, 0)), ("yellow", (100, 100, 0))):  # equal luminance: one phash
        img = Image.new("RGB", (320, 240), (230, 230, 230))
        ImageDraw.Draw(img).ellipse([100, 60, 220, 180], fill=colour)
        img.save(photos / f"{name}.png")
    original = smooth_photos(photos, 1, seed=3, size=(480, 360))[0]
    copies = near_copies(original, photos / "copies")  # re-saved, half size, cropped: still one picture
    ix = tmp_path / "ix"
    run("index", photos, "--index", ix, "--model", tiny_model, "--device", "cpu")
    groups = json.loads(run("dupes", "--tier", "near", "--index", ix, "--json").stdout)
    grouped = [sorted(Path(i["path"]).name for i in g["items"]) for g in groups]
    assert grouped == [sorted([original.name] + [c.name for c in copies])], grouped
    hits = json.loads(run("query", "a circle", "-k", "10", "--collapse", "--index", ix, "--json").stdout)["results"]
    names = {Path(h["path"]).name: h["duplicates"] for h in hits}
    assert "red.png" in names and "yellow.png" in names, names
    assert len(hits) == 3 and sum(len(d) for d in names.values()) == 3


# -- item 8: first-use waits are said, once; the cache's size is in info ----------------------------------------------


@pytest.mark.slow
def test_first_use_waits_are_said_once_on_piped_stderr_and_info_gives_the_cache_size(tmp_path, tiny_model):
    import json

    from conftest import make_images
    from helpers import alignsearch

    make_images(tmp_path / "photos", 4)
    ix = tmp_path / "ix"
    env = {"ALIGNSEARCH_CACHE": str(tmp_path / "cache")}  # a new model for this cache: every tower exported
    first = alignsearch("index", tmp_path / "photos", "--index", ix, "--model", tiny_model, "--device", "cpu",
                        "--backend", "onnx", env=env)
    assert first.returncode == 0, first.stderr
    lines = first.stderr.splitlines()
    assert sum("exporting the vision tower" in x for x in lines) == 1, first.stderr
    assert sum("exporting the text tower" in x for x in lines) == 1, first.stderr
    assert sum(x.startswith("finishing:") for x in lines) == 1, first.stderr
    again = alignsearch("index", "--index", ix, "--device", "cpu", "--backend", "onnx", env=env)
    assert again.returncode == 0 and "exporting" not in again.stderr, again.stderr
    quiet = alignsearch("index", "--index", ix, "--json", env=env)
    assert quiet.returncode == 0 and "finishing" not in quiet.stderr
    int8 = alignsearch("query", "a red car", "--precision", "int8", "--index", ix, env=env)
    assert int8.returncode == 0 and int8.stderr.count("quantizing the text tower") == 1, int8.stderr
    assert "quantizing" not in alignsearch("query", "a dog", "--precision", "int8", "--index", ix, env=env).stderr
    info = json.loads(alignsearch("info", "--json", "--index", ix, env=env).stdout)
    on_disk = sum(p.stat().st_size for p in (tmp_path / "cache").rglob("*") if p.is_file())
    assert 0 < info["encoder"]["onnx_cache"]["bytes"] <= on_disk
    assert "MiB" in alignsearch("info", "--index", ix, env=env).stdout


# -- item 10: decode memory and the drift of reduced decoding -----------------------------------------------------



@pytest.mark.slow
def test_a_large_jpeg_decodes_in_bounded_memory_at_its_stored_size(tmp_path):
    """A 60-megapixel JPEG: decoded at the smallest DCT scale still twice align-base's input, not in full
    (~180 MB of pixels, then copies). Its stored size is reported."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    big = Image.fromarray((rng.random((45, 60, 3)) * 255).astype(np.uint8)).resize((9000, 6667), Image.BICUBIC)
    path = tmp_path / "pano.jpg"
    big.save(path, quality=85)
    del big
    width, height, growth = decode_growth(path)
    assert (int(width), int(height)) == (9000, 6667)
    assert int(growth) < 100 * 2**20, f"decode took {int(growth) / 2**20:.0f} MB"


def test_reduced_decoding_drifts_less_than_1e4_on_real_photos(tmp_path):
    """scikit-image's photos (camera, portrait, coffee, rocket, retina, Hubble, histology...) as JPEGs, through a
    model whose input the draft scales down to (DECODE_MARGIN times its 86 px resize): cosine to the exact full
    decode >= 0.9999 for each. (benchmarks/RESULTS.md has align-base's geometry.)"""
    import io

    import numpy as np
    from PIL import Image

    skimage_data = pytest.importorskip("skimage.data")
    from tiny_align import build_tiny_align

    from alignsearch.media import images
    from alignsearch.encoders.model import Encoder

    enc = Encoder(str(build_tiny_align(tmp_path / "model", image=(86, 72))), device="cpu", backend="torch")
    exact, reduced, sizes = [], [], []
    for name in ("astronaut", "coffee", "chelsea", "rocket", "retina", "hubble_deep_field", "immunohistochemistry",
                 "cell", "camera"):
        buf = io.BytesIO()
        Image.fromarray(getattr(skimage_data, name)()).convert("RGB").save(buf, "JPEG", quality=92)
        full, _ = images.open_rgb(buf.getvalue())
        exact.append(images.crop_uint8(full, enc.spec))
        decoded = images.decode(buf.getvalue(), enc.spec)
        reduced.append(decoded.crop)
        sizes.append((decoded.image.size, full.size, (decoded.width, decoded.height)))
    assert sum(small != whole for small, whole, _ in sizes) >= 7, sizes  # most were decoded reduced
    assert all(stored == whole for _, whole, stored in sizes)
    a, b = enc.encode_crops(np.stack(exact)), enc.encode_crops(np.stack(reduced))
    cosine = (a * b).sum(axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosine.min() >= 0.9999, cosine


# -- a Ctrl-C while the decode workers start -------------------------------------------------------------------

CTRL_C_AS_WORKERS_START = r"""
import contextlib, os, signal, sys
import indexer.workers

real = indexer.workers.sigint_held

@contextlib.contextmanager
def ctrl_c_at(when):
    # a terminal's Ctrl-C (SIGINT to the whole process group) inside the block that starts the workers, or just
    # after it, while they import
    with real():
        print("the decode workers start", file=sys.stderr, flush=True)
        if when == "inside":
            os.killpg(0, signal.SIGINT)
        yield
    if when == "after":
        os.killpg(0, signal.SIGINT)

indexer.workers.sigint_held = lambda: ctrl_c_at(sys.argv[1])
from alignsearch.surfaces.cli import main
main(sys.argv[2:], prog_name="alignsearch")
"""


@pytest.mark.slow
@pytest.mark.parametrize("when", ["inside", "after"])
def test_ctrl_c_as_the_decode_workers_start_is_not_dropped(tmp_path, tiny_model, when):
    """A first run (an empty model cache) stopped while its decode workers start: it was ignored there, and
    `index` went on to finish with exit 0. Now one line, exit 130, the workers quiet, none left behind."""
    smooth_photos(tmp_path / "photos", 40)  # enough to be decoded in worker processes
    proc = subprocess.Popen(
        [sys.executable, "-c", CTRL_C_AS_WORKERS_START, when, "index", "--json", str(tmp_path / "photos"), "--index",
         str(tmp_path / "ix"), "--model", str(tiny_model), "--device", "cpu", "--workers", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, **CHILD_ENV, "ALIGNSEARCH_CACHE": str(tmp_path / "cache")})
    out, err = proc.communicate(timeout=300)
    assert "the decode workers start" in err, err
    assert proc.returncode == 130, err
    assert out == "", out
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert err.splitlines()[-1] == "error: interrupted", err
    time.sleep(0.5)
    assert not _alive_in_group(proc.pid)  # its session's process group: the workers, whoever their parent is now


def _alive_in_group(pgid: int) -> list[int]:
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue
        if int(pgrp) == pgid and state != "Z":
            alive.append(int(stat.parent.name))
    return alive
