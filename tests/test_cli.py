"""End to end through the `alignsearch` command: index generated images, query by text, image and both."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from alignsearch.surfaces.cli import main
from conftest import index_json, make_images, run


@pytest.fixture
def corpus(indexed_corpus):
    """Here the corpus is the indexed one (the tests below query it, and change it)."""
    return indexed_corpus[0]


@pytest.fixture
def indexed(indexed_corpus, monkeypatch):
    """The working folder holds the corpus and its index, the default .alignsearch/; returns the index."""
    corpus, ix = indexed_corpus
    monkeypatch.chdir(ix.parent)
    monkeypatch.delenv("ALIGNSEARCH_INDEX", raising=False)
    return ix


@pytest.mark.slow
def test_index_summary_and_failures(tmp_path, tiny_model, monkeypatch):
    from conftest import fill_corpus

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ALIGNSEARCH_INDEX", raising=False)
    corpus = fill_corpus(tmp_path / "corpus")  # a first run of its own: its summary is what is checked
    out = run("index", corpus, "--model", tiny_model, "--device", "cpu", "--batch-size", "4", "--workers", "2", "--json")
    indexed = json.loads(out.stdout)
    assert indexed["added"] == 18 and indexed["failed"] == 1 and indexed["removed"] == 0  # failed apart from added
    assert indexed["index"]["plan"]["kind"] == "flat" and indexed["index"]["vectors"] == 18
    assert set(indexed["times"]) >= {"read_wait", "encode", "write", "decode_worker", "extra"}
    assert (tmp_path / ".alignsearch" / "catalog.db").exists()
    info = json.loads(run("info", "--failed", "--json").stdout)
    assert info["images"] == 18 and info["failed"] == 1
    assert info["index"]["type"] == "flat"
    assert [os.path.basename(f["path"]) for f in info["failed_files"]] == ["broken.jpg"]
    assert "not an image" in info["failed_files"][0]["reason"]
    assert "broken.jpg" in run("info", "--failed").output


@pytest.mark.slow
def test_text_query_json_schema(indexed):
    out = json.loads(run("query", "red car on beach", "-k", "5", "--json").stdout)
    assert out["query"]["text"] == "red car on beach"
    assert len(out["results"]) == 5
    for hit in out["results"]:
        assert {"id", "path", "score", "width", "height", "format"} <= set(hit)
        assert os.path.exists(hit["path"])
    scores = [h["score"] for h in out["results"]]
    assert scores == sorted(scores, reverse=True)


def test_image_query_finds_the_image_itself(indexed, corpus):
    target = corpus / "img004.jpg"
    out = json.loads(run("query", "--image", target, "-k", "3", "--json").stdout)
    assert out["results"][0]["path"] == str(target)
    assert out["results"][0]["score"] == pytest.approx(1.0, abs=2e-3)


def test_compound_and_negative_queries_differ_from_their_parts(indexed, corpus):
    image = corpus / "img005.jpg"
    def ids(*args):
        return [h["id"] for h in json.loads(run("query", *args, "-k", "18", "--json").stdout)["results"]]
    text_only, image_only = ids("at night"), ids("--image", image)
    both = ids("at night", "--image", image)
    assert len(both) == 18 and both != image_only and both != text_only
    assert ids("at night", "--image", image, "--negative", "dog") != both
    human = run("query", "at night", "--image", image, "-k", "2").output
    assert str(image.parent) in human and "1." in human


def test_k_beyond_the_collection_returns_all(indexed):
    out = json.loads(run("query", "dog", "-k", "500", "--json").stdout)
    assert len(out["results"]) == 18 and len({h["id"] for h in out["results"]}) == 18


@pytest.mark.slow
def test_rerun_is_incremental_and_tracks_changes(indexed, corpus, tmp_path):
    again = json.loads(run("index", "--json").stdout)  # roots remembered, model remembered
    assert (again["added"], again["updated"], again["removed"], again["unchanged"]) == (0, 0, 0, 19)
    (corpus / "img001.jpg").unlink()
    make_images(tmp_path / "tmpimg", 3, seed=9)[2].replace(corpus / "img002.jpg")  # same name, new content
    second = tmp_path / "second"
    make_images(second, 2, seed=4)
    out = json.loads(run("index", second, "--json").stdout)
    assert (out["added"], out["updated"], out["removed"]) == (2, 1, 1)
    info = json.loads(run("info", "--json").stdout)
    assert info["images"] == 19 and len(info["roots"]) == 2
    paths = [h["path"] for h in json.loads(run("query", "x", "-k", "100", "--json").stdout)["results"]]
    assert str(corpus / "img001.jpg") not in paths and str(second / "img000.png") in paths
    top = json.loads(run("query", "--image", corpus / "img002.jpg", "-k", "1", "--json").stdout)["results"][0]
    assert top["path"] == str(corpus / "img002.jpg") and top["score"] == pytest.approx(1.0, abs=2e-3)


def test_querying_with_another_model_is_a_clear_error(indexed, other_model):
    result = CliRunner().invoke(main, ["query", "dog", "--model", str(other_model)])
    assert result.exit_code == 5
    assert "built with" in result.output
    result = CliRunner().invoke(main, ["index", "--model", str(other_model)])
    assert result.exit_code == 5


def test_embed_matches_transformers(indexed, corpus, tiny_model):
    from helpers import reference_embeddings
    from PIL import Image

    # --precision fp32: exact on a GPU too, where auto means bf16 (0.998 there, seen on an H200)
    out = json.loads(run("embed", "--text", "a red car", "--image", corpus / "img004.jpg", "--precision", "fp32").stdout)
    assert [o["kind"] for o in out] == ["text", "image"]
    text_ref = reference_embeddings(tiny_model, texts=["a red car"])[0]
    image_ref = reference_embeddings(tiny_model, images=[Image.open(corpus / "img004.jpg").convert("RGB")])[0]
    assert float(np.dot(out[0]["embedding"], text_ref)) >= 0.9999
    assert float(np.dot(out[1]["embedding"], image_ref)) >= 0.9999
    assert abs(np.linalg.norm(out[0]["embedding"]) - 1) < 1e-5


def test_bad_arguments_get_messages(tmp_path, monkeypatch, tiny_model):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ALIGNSEARCH_INDEX", raising=False)
    assert "no .alignsearch/ index" in run("query", "dog", code=3).output
    assert "give a text, an image, or both" in run("query", code=2).output
    assert "k must be an integer from 1 to 1000, got 0" in run("query", "dog", "-k", "0", code=2).output  # as -k 1001
    assert "missing does not exist: give a folder" in run("index", tmp_path / "missing", code=6).output
    (tmp_path / "one.jpg").write_bytes(b"x")
    assert "one.jpg is a file" in run("index", tmp_path / "one.jpg", code=6).output
    assert "uncompressed .tar" in run("index", tmp_path / "s.tar.gz", code=6).output
    result = CliRunner().invoke(main, ["embed", "--text", "x", "--model", str(tmp_path / "nothing")])
    assert result.exit_code == 4 and "--model" in result.output


@pytest.mark.slow
def test_console_script_runs_as_a_module(indexed):
    env = {**os.environ, "ALIGNSEARCH_INDEX": str(indexed)}
    proc = subprocess.run([sys.executable, "-m", "alignsearch", "query", "a dog", "-k", "2", "--json"],
                          capture_output=True, text=True, env=env, cwd="/")
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)["results"]) == 2


def test_index_path_that_is_a_symlink_loop_is_refused_in_one_line(tmp_path, monkeypatch):
    """--index naming a symlink loop (or a path through a file) can never be a folder: refused by every
    command as bad usage (exit 2), as one naming a file is, not an `unexpected RuntimeError` (exit 1)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ALIGNSEARCH_INDEX", raising=False)
    os.symlink("loop2", "loop1")
    os.symlink("loop1", "loop2")
    (tmp_path / "photos").mkdir()
    (tmp_path / "afile").write_bytes(b"x")
    for command in (["index", "photos"], ["query", "dog"], ["info"], ["serve"]):
        out = run(*command, "--index", "loop1", code=2).output
        assert "'loop1' is a symlink loop" in out and "unexpected" not in out, (command, out)
    assert "goes through a file" in run("index", "photos", "--index", "afile/sub", code=2).output
    from alignsearch.errors import UsageError
    from indexer.job import index_folders

    with pytest.raises(UsageError, match="symlink loop"):  # the Python API alike
        index_folders(["photos"], index_dir="loop1")


def test_index_root_that_is_a_fifo_says_so_without_opening_it(tmp_path):
    """A FIFO (named as a folder or as a list) is said to be one, exit 6; opening it would block the run."""
    import threading

    fifos = [tmp_path / "pipe", tmp_path / "list.csv"]
    opened, done = [], threading.Event()

    def watch():  # a writer opens without blocking only while someone reads: then the run opened it
        while not done.wait(0.02):
            for fifo in fifos:
                try:
                    os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # also lets the reader go on
                    opened.append(fifo)
                except OSError:
                    pass

    for fifo in fifos:
        os.mkfifo(fifo)
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        for fifo in fifos:
            out = run("index", fifo, "--index", tmp_path / "ix", code=6).output
            assert f"{fifo.name} is a FIFO" in out and "does not exist" not in out, out
    finally:
        done.set()
        watcher.join()
    assert opened == []


@pytest.mark.slow
def test_reindex_says_how_many_files_it_encoded_again(indexed_images):
    """`index --reindex` encoded every file again but printed `nothing changed (4 unchanged)`: the text summary
    had no word for `reencoded`, which the README says the summary counts."""
    _, ix = indexed_images(4)
    out = run("index", "--reindex", "--index", ix, "--device", "cpu").stdout
    assert "4 re-encoded" in out and "nothing changed" not in out, out


@pytest.mark.slow  # two index runs
def test_index_says_it_read_captions_again_not_that_nothing_changed(indexed_images):
    """A sidecar caption written beside an unchanged photo is read again (keyword search finds it), but the
    text summary said `nothing changed (6 unchanged)`: only --json's times.extra.captions_read_again told."""
    root, ix = indexed_images(6)
    next(root.glob("*.jpg")).with_suffix(".txt").write_text("a zebra crossing")
    out = run("index", "--index", ix).stdout
    assert "1 caption read again" in out and "nothing changed" not in out, out
    assert "nothing changed (6 unchanged)" in run("index", "--index", ix).stdout  # read, nothing new: as before


@pytest.mark.slow
def test_serve_on_a_port_another_program_holds_is_exit_6_not_an_unexpected_error(indexed_images):
    """`serve --port P` with P taken said so in one line but exited 1, which README's table keeps for unexpected
    errors; a port held by another process is refused as an index another process writes is: exit 6."""
    import socket

    _, ix = indexed_images(4)
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        out = run("serve", "--port", port, "--index", ix, code=6).output
    assert "another program listens there" in out, out


def test_summary_counts_say_one_image_not_one_images():
    """`1 images exported`, `(1 indexed images hold text)`: the summary lines counted in the plural whatever n."""
    from alignsearch.surfaces.cli import _count

    assert [_count(n, "image") for n in (0, 1, 2)] == ["0 images", "1 image", "2 images"]


@pytest.mark.slow
def test_paths_lists_each_file_once_a_videos_moments_too(tmp_path, tiny_model):
    """--paths is for pipes: a video whose moments ranked three times (--per-video's default) was printed three
    times, and `query --paths | xargs cp -t DIR` met it again (cp refuses to overwrite a file it just
    created, or warns). Each path once, where it first ranks; --json and the ranked list keep every moment."""
    from conftest import index_json

    from helpers import make_video

    lib, ix = tmp_path / "lib", tmp_path / "ix"
    make_images(lib / "photos", 2)
    make_video(lib / "clips" / "match.mp4", [(1, 3), (2, 3), (3, 3), (4, 3)])  # four scenes: four moments
    index_json(ix, lib, "--model", tiny_model, "--device", "cpu")
    ranked = [h["path"] for h in json.loads(run("query", "a picture", "--json", "--index", ix).stdout)["results"]]
    video = str(lib / "clips" / "match.mp4")
    assert ranked.count(video) == 3 and len(ranked) == 5, ranked
    assert run("query", "a picture", "--index", ix).output.count("match.mp4 @ ") == 3
    for end, args in (("\n", ()), ("\0", ("-0",))):
        listed = run("query", "a picture", "--paths", *args, "--index", ix).stdout_bytes
        assert listed == "".join(path + end for path in dict.fromkeys(ranked)).encode(), listed


@pytest.mark.slow
def test_forget_says_a_root_with_a_newline_in_one_line(tmp_path, tiny_model):
    """`roots` shows a root named "odd\\nroot" as odd\\nroot; `forget` printed the newline itself, so its one
    line of output became two ("forgot /x/odd" and "root: 2 files removed")."""
    root = tmp_path / "odd\nroot"
    make_images(root, 2)
    index_json(tmp_path / "ix", root, "--model", tiny_model, "--device", "cpu")
    out = run("forget", root, "--index", tmp_path / "ix").output
    assert out.splitlines() == [f"forgot {tmp_path}/odd\\nroot: 2 files removed from the index"], out
