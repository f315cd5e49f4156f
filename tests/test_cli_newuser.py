"""The command line as a new user meets it: odd file names on every command that takes or prints one, prompt
templates that are not what str.format wants, and first `index` runs that were refused."""

import json
import os
import shutil

import pytest

from conftest import index_json, make_images, run
from helpers import alignsearch, can_drop_dac, start_serve, stop, write_labels

BAD = "bad\udcff name.png"  # os.fsdecode of b"bad\xff name.png": a name that is not UTF-8
BAD_SHOWN = "bad\\xff name.png"  # how every output shows it (docs/json.md)


@pytest.fixture
def odd_names(indexed_images):
    """(folder, index): indexed images plus copies named with a byte that is not UTF-8, a backslash, and
    terminal control characters (an escape sequence and a newline)."""
    root, ix = indexed_images(6)
    first = sorted(root.iterdir())[0]
    for name in (BAD, "back\\slash.png", "x\x1b[31mred\nline.png"):
        shutil.copyfile(first, os.path.join(root, name))
    run("index", "--index", ix)
    return root, ix


@pytest.mark.slow
def test_similar_finds_indexed_files_by_names_that_are_not_utf8_or_hold_a_backslash(odd_names):
    root, ix = odd_names
    proc = alignsearch("similar", root / BAD, "-k", "1", "--json", "--index", ix)
    assert proc.returncode == 0, proc.stderr  # was: unexpected UnicodeEncodeError, exit 1
    assert json.loads(proc.stdout)["query"]["path"] == str(root / BAD_SHOWN)
    proc = alignsearch("similar", root / "back\\slash.png", "-k", "1", "--index", ix)
    assert proc.returncode == 0, proc.stderr  # was: "is not an indexed image", exit 6


@pytest.mark.slow
def test_json_echoes_a_name_that_is_not_utf8_as_every_path_shows_it(odd_names, tiny_model):
    """The echo of an image given on the command line carried os.fsdecode's lone surrogate (\\udcff), which strict
    JSON readers refuse, where docs/json.md promises \\xNN as in the hits."""
    root, ix = odd_names
    image, shown = str(root / BAD), str(root / BAD_SHOWN)
    outputs = {
        "query": alignsearch("query", "--image", image, "-k", "1", "--json", "--index", ix),
        "embed": alignsearch("embed", "--image", image, "--index", ix),
        "similarity": alignsearch("similarity", "--text", "a cat", "--image", image, "--json", "--index", ix),
        "classify": alignsearch("classify", image, "--labels", "a", "--labels", "b", "--json", "--index", ix),
    }
    for command, proc in outputs.items():
        assert proc.returncode == 0, (command, proc.stderr)
        assert "\\udcff" not in proc.stdout, (command, proc.stdout[:300])
    assert json.loads(outputs["query"].stdout)["query"]["image"] == shown
    assert json.loads(outputs["embed"].stdout)[0]["input"] == shown
    assert json.loads(outputs["similarity"].stdout)["image"] == shown
    assert json.loads(outputs["classify"].stdout)[0]["image"] == shown


@pytest.mark.slow
def test_classify_prints_names_and_labels_escaped_one_line_each(odd_names):
    root, ix = odd_names
    proc = alignsearch("classify", root / "x\x1b[31mred\nline.png", "--labels", "a\x1b[2J", "--labels", "b",
                       "--index", ix)
    assert proc.returncode == 0, proc.stderr
    assert "\x1b" not in proc.stdout
    lines = proc.stdout.splitlines()
    assert len(lines) == 3, lines  # the name, then one line per label: the name's newline started none
    assert lines[0].endswith("x\\x1b[31mred\\nline.png") and "a\\x1b[2J" in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("template", ["{} and {}", "{label}", "a photo of {", "{!r}"])
def test_a_template_str_format_cannot_fill_is_bad_usage(indexed_images, template, tmp_path):
    root, ix = indexed_images(6)
    out = run("classify", sorted(root.iterdir())[0], "--labels", "a", "--labels", "b", "--template", template,
              "--index", ix, code=2).output
    assert out.count("\n") == 1 and "write {} once where the label goes" in out  # was: unexpected IndexError, exit 1
    labels = write_labels(tmp_path / "labels.txt", ["a cat"])
    run("tag", "--labels-file", labels, "--index", ix)
    run("tag", "--clear", "--labels-file", labels, "--template", template, "--index", ix, code=2)
    assert json.loads(run("tags", "--json", "--index", ix).stdout) != []  # refused before --clear removed anything


@pytest.mark.slow
def test_the_label_goes_where_a_valid_template_says(indexed_images):
    root, ix = indexed_images(6)
    image = sorted(root.iterdir())[0]
    for template in ("a photo of {}", "a {{braced}} photo of {}", "a photo of"):
        out = json.loads(run("classify", image, "--labels", "a", "--labels", "b", "--template", template,
                             "--index", ix, "--json").stdout)
        assert len(out[0]["labels"]) == 2


def test_index_without_a_folder_makes_no_index(tmp_path, tiny_model, monkeypatch):
    """`alignsearch index --model M` (the folder forgotten) in a new place: refused, exit 6, and no empty index left,
    which the next `query` answered with "no results", exit 0, instead of "no index", exit 3."""
    monkeypatch.chdir(tmp_path)
    out = run("index", "--model", tiny_model, code=6).output
    assert "no folder to index" in out
    assert not (tmp_path / ".alignsearch").exists()
    run("query", "cat", code=3)


def test_a_refused_first_index_run_leaves_no_index(tmp_path, tiny_model):
    make_images(tmp_path / "photos", 2)
    ix = tmp_path / "ix"
    out = run("index", tmp_path / "photos", "--index", ix, "--model", tiny_model, "--precision", "int8", code=2).output
    assert "int8" in out
    assert not ix.exists()


def test_an_empty_root_is_refused_not_taken_for_the_current_folder(tmp_path, tiny_model, monkeypatch):
    """`alignsearch index "$PHOTOS"` with PHOTOS unset indexed the current folder (os.path.abspath(""))."""
    make_images(tmp_path, 2)
    monkeypatch.chdir(tmp_path)
    out = run("index", "", "--model", tiny_model, code=6).output
    assert "an empty root" in out
    assert not (tmp_path / ".alignsearch").exists()


needs_permissions = pytest.mark.skipif(not can_drop_dac(), reason="cannot run a child without root's file access")


@pytest.mark.slow
@needs_permissions
def test_an_unreadable_image_is_unusable_input_and_classify_goes_on(indexed_images, tmp_path):
    """click's readable check refused a chmod 000 image as bad usage (exit 2, four lines) before anything ran: classify
    classified none of the others, which its README says it lists with the error (exit 0 when one was classified)."""
    root, ix = indexed_images(6)
    good = sorted(root.iterdir())[0]
    locked = tmp_path / "locked.png"
    shutil.copyfile(good, locked)
    locked.chmod(0)
    proc = alignsearch("classify", good, locked, "--labels", "a", "--labels", "b", "--json", "--index", ix,
                       unprivileged=True)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert "labels" in out[0] and out[1]["error"] == f"cannot use image {locked}: Permission denied"
    for args in (("query", "--image", locked), ("embed", "--image", locked),
                 ("similarity", "--text", "a", "--image", locked)):
        proc = alignsearch(*args, "--index", ix, unprivileged=True)
        assert proc.returncode == 6 and proc.stderr == f"error: cannot use image {locked}: Permission denied\n", args


@pytest.mark.slow
@needs_permissions
def test_export_into_a_folder_that_cannot_be_searched_names_out(indexed_images, tmp_path):
    root, ix = indexed_images(6)
    locked = tmp_path / "locked"
    locked.mkdir(mode=0)
    proc = alignsearch("export", locked / "x.parquet", "--index", ix, unprivileged=True)
    # was: "Permission denied: .../x.parquet/catalog.db", a path nobody named (the check for an index folder above OUT)
    assert proc.returncode == 1 and proc.stderr == f"error: Permission denied: {locked / 'x.parquet'}\n", proc.stderr


@pytest.mark.slow
def test_a_list_column_the_list_lacks_is_refused_for_a_known_list_too(tmp_path, tiny_model):
    """The column typed wrong on a later run: it was a listing error, exit 0, and remembered, so every later plain
    `index` failed to list the root (its files kept, nothing new indexed) until the right column was given again."""
    images = make_images(tmp_path / "photos", 2)
    listing = tmp_path / "photos.csv"
    listing.write_text("path\n" + "".join(f"{p}\n" for p in images))
    ix = tmp_path / "ix"
    run("index", listing, "--list-column", "path", "--index", ix, "--model", tiny_model)
    for option in ("--list-column", "--caption-column"):
        out = run("index", listing, option, "pth", "--index", ix, code=6).output
        assert "has no column pth (columns: path)" in out and out.count("\n") == 1
    roots = json.loads(run("roots", "--json", "--index", ix).stdout)
    assert roots[0]["state"] == "ok" and roots[0]["indexed"] == 2
    assert json.loads(run("index", "--index", ix, "--json").stdout)["listing_errors"] == []  # the column kept is right


@pytest.mark.slow
def test_dupes_and_info_failed_json_give_a_name_that_is_not_utf8_as_hits_do(odd_names):
    """dupes --json and info --failed --json carried \\udcff (refused by strict JSON readers, and no way for a script
    in another language to reach the file): now \\xNN text and the bytes in path_b64, as hits."""
    import base64

    root, ix = odd_names
    (root / "broken\udcfd.png").write_bytes(b"not an image")
    run("index", "--index", ix)
    groups = json.loads(run("dupes", "--tier", "exact", "--json", "--index", ix).stdout)
    item = next(i for g in groups for i in g["items"] if "bad" in i["path"])
    assert item["path"] == str(root / BAD_SHOWN) and base64.b64decode(item["path_b64"]) == os.fsencode(root / BAD)
    failed = json.loads(run("info", "--failed", "--json", "--index", ix).stdout)["failed_files"]
    entry = next(f for f in failed if "broken" in f["path"])
    assert entry["path"] == str(root / "broken\\xfd.png") and "\udcfd" not in json.dumps(failed, ensure_ascii=False)
    assert base64.b64decode(entry["path_b64"]) == os.fsencode(root / "broken\udcfd.png")


def test_the_printed_url_carries_a_chosen_token_whole():
    """`serve --token 'a&b c'` printed http://.../?token=a&b c: the browser sent the token `a`, answered 401."""
    from urllib.parse import parse_qs, urlsplit

    from alignsearch.surfaces.server import RunningServer

    for token in ("a&b c;d#e", "plain-token_1.2~"):
        url = RunningServer(url="http://127.0.0.1:8765", port=8765, token=token, server=None).open_url
        assert " " not in url and parse_qs(urlsplit(url).query) == {"token": [token]}
    assert RunningServer(url="http://127.0.0.1:8765", port=8765, token=None, server=None).open_url.endswith(":8765/")


@pytest.mark.slow
def test_serve_on_every_interface_prints_a_url_other_machines_can_open(indexed_images):
    """`serve --host 0.0.0.0 --allow-host photos.lan` printed only http://127.0.0.1:PORT/?token=…, which
    other machines cannot open; the URL by the --allow-host name is printed beside it, on the same stderr."""
    from urllib.parse import parse_qs, urlsplit

    from alignsearch.storage.paths import SERVER_FILE

    _, ix = indexed_images(3)
    proc, url = start_serve(ix, "--host", "0.0.0.0", "--allow-host", "photos.lan", "--allow-host", "other.lan")
    token = json.loads((ix / SERVER_FILE).read_text())["token"]
    stop(proc)
    lines = proc.stderr.read().splitlines()
    local = [line for line in lines if line.startswith("serving ")]
    remote = [line for line in lines if "photos.lan" in line]
    assert len(local) == 1 and f"{url}/?token=" in local[0], lines
    assert len(remote) == 1 and "other.lan" not in remote[0], lines
    opened = urlsplit(remote[0].split()[-1])
    assert (opened.hostname, opened.port) == ("photos.lan", urlsplit(url).port), remote
    assert parse_qs(opened.query) == {"token": [token]}, remote


def test_finetune_says_a_model_folder_is_missing_before_reading_pairs(tmp_path, corpus):
    """finetune read every pair, then said "Repo id must use alphanumeric chars" for a --model folder not there,
    which every other command says plainly (README: refused at once, exit 4)."""
    out = run("finetune", corpus, "--model", "./no-such-model", "--out", tmp_path / "ft", code=4).output
    assert "the model folder ./no-such-model does not exist" in out and "Repo id" not in out
    assert "skipped" not in out  # refused before the pairs were read
    assert not (tmp_path / "ft").exists()


@pytest.mark.slow
def test_an_offline_hub_id_is_said_in_sentences(tmp_path, corpus):
    """The reason and the download hint were joined as "...not in the Hugging Face cache Without network access"."""
    proc = alignsearch("classify", corpus / "img001.jpg", "--labels", "a", "--model", "kakaobrain/align-base",
                       env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert proc.returncode == 4 and "Hugging Face cache. Without network access" in proc.stderr, proc.stderr
    for image in make_images(tmp_path / "pairs", 3):
        image.with_suffix(".txt").write_text("a red circle")
    proc = alignsearch("finetune", tmp_path / "pairs", "--out", tmp_path / "ft",
                       env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert proc.returncode == 4 and "Hugging Face cache. Without network access" in proc.stderr, proc.stderr


@pytest.mark.parametrize("near, said", [("0,0,inf", "error: --near takes a finite number, not 'inf'\n"),
                                        ("1,abc,2", "error: --near takes a number, not 'abc'\n")])
def test_a_bad_near_names_near_not_where(indexed_images, near, said):
    _, ix = indexed_images(6)
    assert run("query", "cat", "--near", near, "--index", ix, code=2).output == said  # was "--where: --near ..."


@pytest.mark.slow
def test_an_image_that_is_no_image_is_said_alike_with_a_server(indexed_images, tmp_path):
    """With a server running the same query said "unreadable image: ..." without the path, alone "cannot use image
    PATH: ..." (README: the same result and exit code with or without a server)."""
    root, ix = indexed_images(6)
    alone = tmp_path / "alone"
    shutil.copytree(ix, alone)
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"hello, no image here")
    proc, _ = start_serve(ix)
    try:
        warm = alignsearch("query", "--image", junk, "--index", ix)
    finally:
        stop(proc)
    local = alignsearch("query", "--image", junk, "--index", alone)
    assert (warm.returncode, warm.stderr) == (local.returncode, local.stderr) == (6, local.stderr)
    assert local.stderr.startswith(f"error: cannot use image {junk}: ")


def test_a_shard_range_a_digit_too_long_is_refused_at_once(tmp_path):
    """`index 'part-{000..99999999}.tar'` built 100 million names (9.5 GB, 90 s) before saying part-002 is missing."""
    import time

    from alignsearch.errors import BadInputError
    from alignsearch.media import sources

    started = time.perf_counter()
    with pytest.raises(BadInputError, match="stands for 100,000,000 names; at most 1,000,000"):
        sources.normalise(str(tmp_path / "part-{000..99999999}.tar"))
    assert time.perf_counter() - started < 5
    with pytest.raises(BadInputError, match="stands for 1,000,000,000 names"):  # nested ranges multiply
        sources.expand("s{0000..9999}-{00000..99999}.tar")
    assert len(sources.expand("part-{000..099}.tar")) == 100


@pytest.mark.slow
def test_forget_takes_the_shard_pattern_index_was_given(tmp_path, tiny_model):
    """`index 'part-{000..001}.tar'` remembers each shard as a root; `forget` with the same pattern said it was no
    root (exit 6), so a hundred shards took a hundred commands. Now every shard it names goes in one commit, and a
    pattern naming a shard the index does not hold forgets nothing."""
    from helpers import verify_problems, write_shard

    images = make_images(tmp_path / "src", 4)
    (tmp_path / "shards").mkdir()
    for i in range(2):
        write_shard(tmp_path / "shards" / f"part-{i:03d}.tar", images[2 * i:2 * i + 2], tmp_path / "src")
    ix = tmp_path / "ix"
    run("index", str(tmp_path / "shards" / "part-{000..001}.tar"), "--index", ix, "--model", tiny_model)
    out = run("forget", str(tmp_path / "shards" / "part-{000..002}.tar"), "--index", ix, code=6).output
    assert "part-002.tar is not a root" in out
    assert len(json.loads(run("roots", "--json", "--index", ix).stdout)) == 2  # nothing forgotten
    out = run("forget", str(tmp_path / "shards" / "part-{000..001}.tar"), "--index", ix).output
    assert "(2 roots): 4 files removed" in out
    assert json.loads(run("roots", "--json", "--index", ix).stdout) == []
    assert json.loads(run("info", "--json", "--index", ix).stdout)["images"] == 0
    assert verify_problems(ix) == []


def test_a_labels_file_saved_with_a_byte_order_mark_tags_its_first_label_by_name(indexed_images, tmp_path):
    _, ix = indexed_images(6)
    labels = tmp_path / "labels.txt"
    labels.write_bytes("\ufeffa cat\r\nred car\r\n".encode())  # as Notepad saves it
    out = json.loads(run("tag", "--labels-file", labels, "--threshold", "0", "--index", ix, "--json").stdout)
    assert list(out["per_label"]) == ["a cat", "red car"]  # was "\ufeffa cat"
    hits = json.loads(run("query", "cat", "--tag", "a cat", "--index", ix, "--json").stdout)["results"]
    assert hits and all("a cat" in h["tags"] for h in hits)


@pytest.mark.slow
def test_a_sidecar_caption_saved_with_a_byte_order_mark_is_read_without_it(tmp_path, tiny_model):
    photo = make_images(tmp_path / "photos", 2)[0]
    photo.with_suffix(".txt").write_bytes("\ufeffa tiger in the snow".encode())
    run("index", tmp_path / "photos", "--index", tmp_path / "ix", "--model", tiny_model)
    hits = json.loads(run("query", "tiger", "--mode", "keyword", "--index", tmp_path / "ix", "--json").stdout)["results"]
    assert [h["caption"] for h in hits] == ["a tiger in the snow"]  # was "\ufeffa tiger in the snow"


@pytest.mark.slow
def test_a_caption_edited_or_added_after_indexing_is_read_by_the_next_run(tmp_path, tiny_model):
    """photo.txt edited (a typo fixed) or written after its photo was indexed changed neither the photo's size nor
    its time: every later `index` kept the old caption, or none, and keyword search never found the new words."""
    import time

    first, second = make_images(tmp_path / "photos", 2)
    first.with_suffix(".txt").write_text("a red tram in Lisbn")
    ix = tmp_path / "ix"
    run("index", tmp_path / "photos", "--index", ix, "--model", tiny_model)
    time.sleep(0.05)
    first.with_suffix(".txt").write_text("a red tram in Lisbon")
    second.with_suffix(".txt").write_text("a zebra crossing")
    summary = index_json(ix)
    assert summary["added"] == summary["updated"] == 0 and summary["times"]["extra"]["captions_read_again"] == 2

    def captions(words):
        out = run("query", words, "--mode", "keyword", "--index", ix, "--json").stdout
        return [(os.path.basename(h["path"]), h["caption"]) for h in json.loads(out)["results"]]

    assert captions("lisbon") == [(first.name, "a red tram in Lisbon")]
    assert captions("zebra") == [(second.name, "a zebra crossing")]
    assert captions("lisbn") == []
    assert index_json(ix)["times"]["extra"]["captions_read_again"] == 0  # read again, nothing changed, nothing said


def _captioned_pairs(folder, n=3):
    for image in make_images(folder, n):
        image.with_suffix(".txt").write_text("a red circle")
    return folder


def test_finetune_refuses_an_out_under_a_file_before_training(tmp_path, tiny_model):
    """--out photo.jpg/ft trained a whole epoch, then failed to save: "Not a directory", exit 1."""
    pairs = _captioned_pairs(tmp_path / "pairs")
    out = run("finetune", pairs, "--model", tiny_model, "--out", pairs / "img001.jpg" / "ft", code=2).output
    assert "is a file, not a folder" in out and "epoch" not in out and out.count("\n") == 1


@pytest.mark.slow
@needs_permissions
def test_finetune_refuses_an_out_it_cannot_write_before_training(tmp_path, tiny_model):
    pairs = _captioned_pairs(tmp_path / "pairs")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    proc = alignsearch("finetune", pairs, "--model", tiny_model, "--out", locked / "ft", unprivileged=True)
    assert proc.returncode == 2 and "cannot be written by you" in proc.stderr and "epoch" not in proc.stderr, proc.stderr


def test_empty_values_from_unset_variables_are_refused_in_one_line(indexed_images, tmp_path, monkeypatch):
    """export "" said ". is a folder" (the current folder taken for OUT); classify --labels "" printed "100.00%"
    for a label of nothing; serve --allow-host "" started, allowing no name at all."""
    root, ix = indexed_images(6)
    monkeypatch.chdir(tmp_path)
    out = run("export", "", "--index", ix, code=2).output
    assert out == "error: export needs OUT: a file name such as lib.parquet, or a folder for --format clip-retrieval\n"
    out = run("classify", sorted(root.iterdir())[0], "--labels", "a cat", "--labels", " ", "--index", ix, code=6).output
    assert out.startswith("error: a label is empty") and out.count("\n") == 1
    out = run("serve", "--allow-host", "", "--index", ix, code=2).output
    assert "--allow-host needs a name" in out


def test_similar_and_query_refuse_too_many_results_alike(indexed_images):
    """-k 5000: query said one line, exit 6 (the rule of every surface, querycheck); similar four lines of click's
    usage text, exit 2."""
    _, ix = indexed_images(6)
    said = "error: k must be an integer from 1 to 1000, got 5000\n"
    assert run("query", "cat", "-k", "5000", "--index", ix, code=2).output == said
    assert run("similar", "1", "-k", "5000", "--index", ix, code=2).output == said
    assert len(json.loads(run("similar", "1", "-k", "1000", "--index", ix, "--json").stdout)["results"]) == 5


@pytest.mark.slow
def test_a_list_column_with_no_list_given_is_bad_usage(tmp_path, tiny_model):
    """`index ./photos --caption-column foo` indexed the folder and remembered a caption column for it (`roots --json`
    showed it; a folder's captions are photo.txt files), and `index --list-column path` with no root dropped the
    option without a word. Both are refused, exit 2, before the model loads (no index made); a folder given beside a
    list does not take the list's column."""
    images = make_images(tmp_path / "photos", 2)
    ix = tmp_path / "ix"
    for args in ([tmp_path / "photos", "--caption-column", "foo"], ["--list-column", "path"]):
        out = run("index", *args, "--index", ix, "--model", tiny_model, code=2).output
        assert "names a column of a .csv or .parquet list given with it" in out and out.count("\n") == 1, out
    assert not ix.exists()
    listing = tmp_path / "list.csv"
    listing.write_text("path,caption\n" + "".join(f"{p},a caption\n" for p in images))
    other = make_images(tmp_path / "more", 1)[0].parent
    run("index", listing, other, "--caption-column", "caption", "--index", ix, "--model", tiny_model)
    options = {r["root"]: r["options"] for r in json.loads(run("roots", "--json", "--index", ix).stdout)}
    assert options == {str(listing): {"caption_column": "caption"}, str(other): {}}, options


@pytest.mark.slow  # imports the server's framework in-process (~5 s on a loaded 2-core machine)
def test_allow_host_takes_a_name_without_port_or_scheme(indexed_images):
    """serve --allow-host photos.lan:8765 started, printed `other machines open http://[photos.lan:8765]:8765/`
    and refused every request addressed so (Host names compare without the port), saying to pass --allow-host
    NAME: what the user had done. A port, scheme, path or space is refused before anything loads."""
    import socket

    _, ix = indexed_images(6)
    with socket.socket() as taken:  # were the name let through, serve would stop here (exit 6), not serve on
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        for bad in ("photos.lan:8765", "http://photos.lan"):
            out = run("serve", "--port", port, "--allow-host", bad, "--index", ix, code=2).output
            assert "--allow-host takes a name or address alone, without port or scheme" in out and repr(bad) in out, out
    from alignsearch.surfaces.server import allow_host_problem

    for good in ("photos.lan", "Photos.LAN.", "192.168.1.5", "[::1]", "fe80::1", "localhost"):
        assert allow_host_problem(good) is None, good
    for bad in ("photos.lan/", "a b", "user@photos.lan", "photos.lan:", "[::1]:80"):
        assert "without port or scheme" in allow_host_problem(bad), bad
    assert "needs a name" in allow_host_problem(" ")
