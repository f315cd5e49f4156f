"""One query, one answer: the same bad query gets the same error, exit code and HTTP status from the CLI
(`alignsearch query`), the Python API (alignsearch.open(...).search) and a real `alignsearch serve`; and the CLI
refuses what it used to pass over in silence (an option given twice, an unknown --format, a threshold out of
range said with the wrong code)."""

import json
import re
import urllib.parse

import pytest

import alignsearch
from alignsearch.errors import AlignSearchError, BadInputError, UsageError
from conftest import run
from helpers import call, served_with_local_copy, stop


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model):
    served = served_with_local_copy(tmp_path_factory.mktemp("one-answer"), tiny_model, 6)
    yield served
    stop(served["proc"])


# (CLI arguments, Engine.search keywords, GET /api/search parameters, exit code, words of the one message)
CASES = [
    # nothing to search for: a usage error everywhere (the API and the server said 6 where the CLI said 2)
    ([], {}, {}, 2, "give a text, an image, or both"),
    # an empty negative is refused as an empty text is (it was dropped: the search ran without it)
    (["dog", "--negative", ""], {"text": "dog", "negative": ""}, {"q": "dog", "negative": ""}, 6,
     "the negative text is empty"),
    (["dog", "--negative", "  "], {"text": "dog", "negative": "  "}, {"q": "dog", "negative": "  "}, 6,
     "the negative text is empty"),
    # a format no file can have: refused (it found nothing, exit 0), as an unknown --where field is
    (["dog", "--format", "bogus"], {"text": "dog", "format": "bogus"}, {"q": "dog", "format": "bogus"}, 2,
     "format 'bogus' is not one alignsearch indexes"),
    (["dog", "--where", "format != pgn"], {"text": "dog", "where": "format != pgn"},
     {"q": "dog", "where": "format != pgn"}, 2, "format 'pgn' is not one"),
    # the limits that were already shared: kept the same on every surface
    (["x" * 100_000], {"text": "x" * 100_000}, None, 6, "the text is 100000 characters long"),
    # an option out of its range, or empty, is bad usage (2, 400) on every surface, as click's IntRange says
    # --per-video 0: -k, the weights, --nprobe and --tag said 6 (and HTTP 422 for the numbers)
    (["dog", "-k", "0"], {"text": "dog", "k": 0}, {"q": "dog", "k": 0}, 2, "k must be an integer from 1 to 1000"),
    (["dog", "-k", "1001"], {"text": "dog", "k": 1001}, {"q": "dog", "k": 1001}, 2, "k must be an integer from 1"),
    (["dog", "--text-weight", "101"], {"text": "dog", "text_weight": 101}, {"q": "dog", "text_weight": 101}, 2,
     "text_weight must be a finite number from -100 to 100"),
    (["dog", "--image-weight", "nan"], {"text": "dog", "image_weight": float("nan")},
     {"q": "dog", "image_weight": "nan"}, 2, "image_weight must be a finite number"),
    (["dog", "--negative-weight", "-inf"], {"text": "dog", "negative_weight": float("-inf")},
     {"q": "dog", "negative_weight": "-inf"}, 2, "negative_weight must be a finite number"),
    (["dog", "--nprobe", "0"], {"text": "dog", "nprobe": 0}, {"q": "dog", "nprobe": 0}, 2,
     "nprobe must be an integer from 1 to 65536"),
    (["dog", "--nprobe", "65537"], {"text": "dog", "nprobe": 65537}, {"q": "dog", "nprobe": 65537}, 2,
     "nprobe must be an integer from 1"),
    (["dog", "--tag", ""], {"text": "dog", "tag": ""}, {"q": "dog", "tag": ""}, 2, "a tag is a label of 1 to"),
    (["dog", "--tag", "t" * 300], {"text": "dog", "tag": "t" * 300}, {"q": "dog", "tag": "t" * 300}, 2,
     "a tag is a label of 1 to"),
    (["dog", "--camera", ""], {"text": "dog", "camera": ""}, {"q": "dog", "camera": ""}, 2, "--camera is empty"),
    # ranges and names click checks on the CLI (its own usage message there): the library and HTTP say 2 and 400
    (["dog", "--per-video", "0"], {"text": "dog", "per_video": 0}, {"q": "dog", "per_video": 0}, 2,
     ("Invalid value for '--per-video'", "per_video must be a whole number of at least 1")),
    (["dog", "--min-score", "2"], {"text": "dog", "min_score": 2}, {"q": "dog", "min_score": 2}, 2,
     ("Invalid value for '--min-score'", "min_score is a similarity in [-1, 1]")),
    (["dog", "--min-score", "nan"], {"text": "dog", "min_score": float("nan")}, {"q": "dog", "min_score": "nan"}, 2,
     ("is not a finite number", "min_score is a similarity in [-1, 1]")),
    (["dog", "--sort", "size"], {"text": "dog", "sort": "size"}, {"q": "dog", "sort": "size"}, 2,
     ("Invalid value for '--sort'", "sort must be one of")),
    (["dog", "--mode", "fast"], {"text": "dog", "mode": "fast"}, {"q": "dog", "mode": "fast"}, 2,
     ("Invalid value for '--mode'", "mode must be one of")),
    (["dog", "--compose", "median"], {"text": "dog", "compose": "median"}, {"q": "dog", "compose": "median"}, 2,
     ("Invalid value for '--compose'", "compose must be one of")),
    (["dog", "--media", "audio"], {"text": "dog", "media": "audio"}, {"q": "dog", "media": "audio"}, 2,
     ("Invalid value for '--media'", "media must be photo or video")),
]


@pytest.mark.slow
@pytest.mark.parametrize("args, kwargs, params, code, words", CASES)
def test_a_bad_query_is_one_error_on_every_surface(served, args, kwargs, params, code, words):
    said, words = (words, words) if isinstance(words, str) else words  # click's words on the CLI, else ours
    out = run("query", *args, "--index", served["alone"], code=code).output
    assert said in out and "Traceback" not in out, out
    assert said != words or len(out.strip().splitlines()) == 1, out
    through_server = run("query", *args, "--index", served["ix"], code=code).output  # checked before it is sent
    assert said in through_server, through_server

    engine = alignsearch.open(served["alone"], device="cpu")
    with pytest.raises(AlignSearchError, match=re.escape(words)) as raised:
        engine.search(**kwargs)
    assert type(raised.value) is {2: UsageError, 6: BadInputError}[code] and raised.value.exit_code == code

    if params is None:  # 100 KB does not fit a URL: the server's own check of it is test_server's
        return
    status, _, body = call(served["url"], "/api/search?" + urllib.parse.urlencode(params))
    assert status == 400 == raised.value.http_status, body
    assert words in json.loads(body)["error"]


def test_the_formats_a_query_takes_are_those_the_catalog_records():
    """filters.FORMATS names the formats without importing media (a query is checked without numpy or Pillow):
    held here to what the indexer records, so a format it learns is never refused."""
    from alignsearch.media.images import READ_FORMATS
    from alignsearch.media.video import VIDEO_EXTENSIONS
    from alignsearch.search.filters import FORMAT_ALIASES, FORMATS

    assert FORMATS == {f.lower() for f in READ_FORMATS} | {"mpo"} | {e.lstrip(".") for e in VIDEO_EXTENSIONS}
    assert set(FORMAT_ALIASES.values()) <= FORMATS


def test_an_indexed_format_is_found_by_any_of_its_names(indexed_images):
    _, ix = indexed_images(6)
    for name in ("jpeg", "JPG", "jfif", "png", "PNG"):
        hits = json.loads(run("query", "dog", "--format", name, "--index", ix, "--json").stdout)["results"]
        assert hits and all(h["format"].lower() == {"jpg": "jpeg", "jfif": "jpeg"}.get(name.lower(), name.lower())
                            for h in hits), name
    assert json.loads(run("query", "dog", "--format", "webp", "--index", ix, "--json").stdout)["results"] == []


@pytest.mark.parametrize("args", [
    ["similarity", "--text", "a cat", "--text", "a dog", "--image", "IMAGE"],  # measured "a dog" alone
    ["query", "dog", "-k", "2", "-k", "50"],
    ["query", "dog", "--negative", "cat", "--negative", "car"],
    ["dupes", "--tier", "near", "--tier", "similar"],
    ["embed", "--text", "a", "--device", "cpu", "--device", "cuda"],
])
def test_an_option_of_one_value_given_twice_is_refused(indexed_images, args):
    """click kept the last value of a repeated option silently; repeatable options (--text of embed, --labels)
    and flags stay as they are."""
    root, ix = indexed_images(3)
    args = [str(next(root.glob("*.jpg"))) if a == "IMAGE" else a for a in args]
    out = run(*args, "--index", ix, code=2).output
    assert "given more than once: it takes one value" in out, out


def test_repeatable_options_and_flags_still_repeat(indexed_images):
    _, ix = indexed_images(3)
    vectors = json.loads(run("embed", "--text", "a", "--text", "b", "--index", ix).stdout)
    assert [v["input"] for v in vectors] == ["a", "b"]
    assert json.loads(run("query", "dog", "--json", "--json", "-k", "1", "--index", ix).stdout)["results"]
    run("-v", "-v", "info", "--index", ix)


def test_a_threshold_out_of_range_is_a_usage_error_in_every_command(indexed_images, tmp_path):
    """README: exit 2 is bad usage, an option's value included (dupes said 2, tag 6 for the same mistake)."""
    _, ix = indexed_images(3)
    labels = tmp_path / "labels.txt"
    labels.write_text("a cat\na dog\n")
    for bad in ("1.5", "-0.1", "nan"):
        out = run("tag", "--labels-file", labels, "--threshold", bad, "--index", ix, code=2).output
        assert "--threshold must be in [0, 1]" in out, out
    run("dupes", "--tier", "near", "--threshold", "70", "--index", ix, code=2)
    run("dupes", "--tier", "similar", "--threshold", "nan", "--index", ix, code=2)
    assert "exact copies" in run("dupes", "--tier", "exact", "--threshold", "5", "--index", ix, code=2).output  # was ignored
    run("query", "dog", "--min-score", "2", "--index", ix, code=2)
    run("tag", "--labels-file", labels, "--threshold", "0.4", "--index", ix)  # in range: tagged
    root = next(iter(ix.parent.glob("photos")))
    for args in (["--video-interval", "0.5"], ["--video-interval", "nan"], ["--video-interval", "inf"],
                 ["--ondisk-shards", "2", "--index-shards", "2"]):
        run("index", root, "--index", ix, *args, code=2)  # said 6, where --watch-interval 0.5 said 2


@pytest.mark.slow  # a real server (the module's, ~7 s to start)
def test_a_search_parameter_given_twice_is_refused_by_the_server(served):
    """As the CLI refuses an option given twice: the framework kept the last (?q=dog&q=cat searched for cat)."""
    for query in ("q=dog&q=cat", "q=dog&k=2&k=50"):
        status, _, body = call(served["url"], "/api/search?" + query)
        assert status == 400 and "given more than once in the URL" in json.loads(body)["error"], body
    image = next(served["corpus"].glob("*.jpg")).read_bytes()
    boundary = "b0undary"

    def form(*fields):
        parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
                 for name, value in fields]
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="q"\r\n'
                     "Content-Type: application/octet-stream\r\n\r\n".encode() + image + b"\r\n")
        return b"".join(parts) + f"--{boundary}--\r\n".encode()

    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    status, _, body = call(served["url"], "/api/search", data=form(("q", "dog"), ("q", "cat")), headers=headers)
    assert status == 400 and "q is given more than once in the form" in json.loads(body)["error"], body
    status, _, body = call(served["url"], "/api/search?k=2&sort=path", data=form(("q", "dog"), ("k", "2")), headers=headers)
    assert status == 200 and len(json.loads(body)["results"]) == 2, body  # once in each place, agreeing: as before
    status, _, body = call(served["url"], "/api/search?k=2&q=dog")
    assert status == 200 and json.loads(body)["query"]["k"] == 2


@pytest.mark.slow  # a real server (the module's, ~7 s to start)
def test_a_parameter_the_search_does_not_take_is_refused_by_the_server(served):
    """As the CLI refuses an unknown option: the server ignored it, so a typo searched without what it asked for
    (?min-score=0.99 answered every image, a form's negativ=leash subtracted nothing) and looked like any answer."""
    for query in ("q=dog&min-score=0.99", "q=dog&negativ=leash", "q=dog&image=x"):
        status, _, body = call(served["url"], "/api/search?" + query)
        said = json.loads(body)
        assert status == 400 and said["kind"] == "UsageError", body
        assert f"does not take '{query.split('&')[1].split('=')[0]}' in the URL" in said["error"], body
        assert "min_score" in said["error"], body  # the names it takes, to correct the typo by
    image = next(served["corpus"].glob("*.jpg")).read_bytes()
    boundary = "b0undary"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="negativ"\r\n\r\nleash\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="q"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n").encode() + image + f"\r\n--{boundary}--\r\n".encode()
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    status, _, said = call(served["url"], "/api/search?k=2", data=body, headers=headers)
    assert status == 400 and "does not take 'negativ' in the form" in json.loads(said)["error"], said
    status, _, said = call(served["url"], "/api/search?k=2", data=body.replace(b'"negativ"', b'"negative"'),
                           headers=headers)
    assert status == 200 and json.loads(said)["query"]["negative"] == "leash", said  # the right name: searched


def test_a_number_option_refuses_nan_and_infinity_before_anything_loads(indexed_images, tmp_path, tiny_model):
    """click's FloatRange compares its bounds with NaN, which is always false: `finetune --lr nan` passed and
    ended, after the data and the model were loaded, in "unexpected ValueError", exit 1; `tune --recall nan`
    was exit 6 from the library. Every bounded number option now refuses them while parsing, exit 2."""
    _, ix = indexed_images(3)
    (tmp_path / "pairs").mkdir()
    for args in (["finetune", tmp_path / "pairs", "--model", tiny_model, "--out", tmp_path / "o", "--lr", "nan"],
                 ["finetune", tmp_path / "pairs", "--model", tiny_model, "--out", tmp_path / "o", "--val-fraction", "nan"],
                 ["finetune", tmp_path / "pairs", "--model", tiny_model, "--out", tmp_path / "o", "--lr", "inf"],
                 ["tune", "--recall", "nan", "--index", ix],
                 ["query", "dog", "--min-score", "nan", "--index", ix]):
        out = run(*args, code=2).output
        assert "is not a finite number" in out, (args, out)
    assert not (tmp_path / "o").exists()
    from indexer.job import tune_index
    from alignsearch.errors import UsageError

    with pytest.raises(UsageError):  # the library's own check: the same code
        tune_index(ix, float("nan"))


def test_query_output_options_that_cannot_go_together_are_refused_before_the_search(indexed_images):
    """`query -0` without --paths was refused only after the search had run (its plan printed first), and
    `--paths --json` printed paths, the --json ignored."""
    _, ix = indexed_images(3)
    out = run("query", "dog", "-0", "--explain", "--index", ix, code=2).output
    assert "-0 goes with --paths" in out and "plan:" not in out, out
    assert "give one" in run("query", "dog", "--paths", "--json", "--index", ix, code=2).output
    assert run("query", "dog", "--paths", "-0", "-k", "1", "--index", ix).stdout_bytes.endswith(b"\0")


@pytest.mark.slow  # a real server (the module's, ~7 s to start)
def test_an_empty_query_image_is_said_alike_with_or_without_a_server(served, tmp_path):
    """Searched locally, an empty image file was "cannot use image PATH: empty file"; through a server, its upload
    was "the query image is empty". The path is checked before the choice (querycheck.check_image)."""
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    said = {run("query", "--image", empty, "--index", served[ix], code=6).output for ix in ("alone", "ix")}
    assert said == {f"error: cannot use image {empty}: empty file\n"}, said
    with pytest.raises(AlignSearchError, match="empty file"):
        alignsearch.open(served["alone"], device="cpu").search(image=str(empty))


@pytest.mark.slow
def test_info_shows_an_index_and_model_folder_named_with_any_bytes_escaped(indexed_images, tmp_path, tiny_model):
    """`info` printed the index's and the model's folder as they were: a name that is not UTF-8 went out as raw
    bytes, a newline or ESC in one reached the terminal. Escaped as the roots already were."""
    import os
    import shutil

    root, _ = indexed_images(2)
    odd, model = tmp_path / "ix\x1b[31m", tmp_path / "model\n\x1b[2J"
    shutil.copytree(tiny_model, model)
    run("index", root, "--index", odd, "--model", model, "--device", "cpu")
    moved = os.fsdecode(bytes(tmp_path) + b"/ix\xff")  # an index can be moved or copied to any name
    os.rename(odd, moved)
    lines = run("info", "--index", moved).stdout_bytes.splitlines()
    assert lines[0].endswith(b"/ix\\xff") and b"/model\\n\\x1b[2J (dim " in lines[1], lines[:2]


def test_an_index_folder_named_with_bytes_that_are_not_utf8_is_refused_before_indexing(indexed_images, tmp_path,
                                                                                        tiny_model):
    """faiss opens only UTF-8 file names: `index --index DIR\xff` encoded every image and then ended in "unexpected
    TypeError: Wrong number or type of arguments for overloaded function 'write_index'", exit 1. Refused first."""
    import os

    root, _ = indexed_images(2)
    odd = os.fsdecode(bytes(tmp_path) + b"/ix\xff")
    out = run("index", root, "--index", odd, "--model", tiny_model, "--device", "cpu", code=2).output
    assert "has a name that is not UTF-8" in out and "ix\\xff" in out, out
    assert not os.path.exists(odd)


def test_a_model_folder_named_with_bytes_that_are_not_utf8_is_a_model_load_error(indexed_images, tmp_path, tiny_model):
    """safetensors opens only UTF-8 paths: `--model` naming such a folder ended in "unexpected SafetensorError",
    exit 1, for index and query alike; now the model cannot be loaded, exit 4, saying why."""
    import os
    import shutil

    root, ix = indexed_images(2)
    model = os.fsdecode(bytes(tmp_path) + b"/model\xfe")
    shutil.copytree(tiny_model, model)
    for args in (["index", root, "--index", tmp_path / "ix"], ["query", "dog", "--index", ix],
                 ["embed", "--text", "a"]):
        out = run(*args, "--model", model, "--device", "cpu", code=4).output
        assert "has a name that is not UTF-8" in out and "model\\xfe" in out, out


def test_outputs_named_with_bytes_that_are_not_utf8_are_refused_before_any_work(indexed_images, tmp_path, tiny_model):
    """finetune --out DIR\\xff trained a whole epoch, then its save (safetensors: UTF-8 paths only) ended in
    "unexpected UnicodeEncodeError", exit 1, leaving an empty DIR\\xff; export --format clip-retrieval to such a
    folder ended the same way (pyarrow). Both refused first, exit 2, nothing made; a parquet export (written
    through an open file) goes to any name, as before."""
    import os

    from shapes_data import all_specs, write_set

    _, ix = indexed_images(2)
    pairs = tmp_path / "train"
    write_set(pairs, all_specs(held_out=False)[:2], 2, seed=1)
    odd = os.fsdecode(bytes(tmp_path) + b"/out\xff")
    out = run("finetune", pairs, "--model", tiny_model, "--out", odd, "--epochs", "1", "--device", "cpu", code=2).output
    assert "not UTF-8" in out and "epoch" not in out, out
    out = run("export", odd, "--format", "clip-retrieval", "--index", ix, code=2).output
    assert "not UTF-8" in out, out
    assert not os.path.exists(odd) and sorted(os.listdir(tmp_path)) == ["train"]
    run("export", odd + ".parquet", "--index", ix)


def test_embed_and_similarity_take_a_text_as_a_query_does(indexed_images):
    """`embed --text ""` and `similarity --text ""` answered (exit 0) with the vector of an empty text, and a
    100 KB text was tokenised whole, where `query ""`, Engine.embed(text="") and `classify --labels ""` refuse:
    the query's text rules (querycheck.check_text, exit 6) apply to them too."""
    root, ix = indexed_images(2)
    image = next(root.glob("*.jpg"))
    for text, words in (("", "the text is empty"), ("  ", "the text is empty"),
                        ("x" * 100_000, "the text is 100000 characters long")):
        assert words in run("embed", "--text", "a cat", "--text", text, "--index", ix, code=6).output
        assert words in run("similarity", "--text", text, "--image", image, "--index", ix, code=6).output
    assert json.loads(run("embed", "--text", "a cat", "--index", ix).stdout)[0]["input"] == "a cat"


@pytest.mark.slow  # the module's server (~7 s to start)
@pytest.mark.parametrize("options, words", [
    ({"backend": "torch", "precision": "int8"}, "--precision int8 needs the onnx backend"),
    ({"backend": "onnx", "precision": "bf16"}, "--precision bf16 runs on OpenVINO or torch"),
])
def test_a_backend_and_precision_that_cannot_go_together_are_bad_usage(served, options, words):
    """README: exit 2 is an option's value that cannot be taken; a --precision the chosen --backend cannot run said
    6 (unusable input) from query, serve and Engine.search alike, where an unknown --precision said click's 2."""
    given = [part for name, value in options.items() for part in (f"--{name}", value)]
    out = run("query", "dog", *given, "--device", "cpu", "--index", served["alone"], code=2).output
    assert out.startswith(f"error: {words}") and len(out.splitlines()) == 1, out
    with pytest.raises(UsageError, match=re.escape(words)):
        alignsearch.open(served["alone"], device="cpu", **options).search(text="dog")
    with pytest.raises(UsageError, match="unknown backend"):  # as click's Choice says --backend tensorrt (exit 2)
        alignsearch.open(served["alone"], device="cpu", backend="tensorrt").search(text="dog")
    assert words in run("serve", *given, "--device", "cpu", "--index", served["alone"], code=2).output


def test_index_at_int8_is_bad_usage(indexed_images):
    """int8 is a precision of the text tower: index refused it with exit 6, as if a file were unusable."""
    root, ix = indexed_images(2)
    out = run("index", root, "--index", ix, "--precision", "int8", "--device", "cpu", code=2).output
    assert "int8 is for the text tower" in out


@pytest.mark.parametrize("command", [["forget", ""], ["forget", "  "], ["export", "OUT", "--root", ""]])
def test_an_empty_root_is_said_so_by_forget_and_export(indexed_images, tmp_path, command):
    """`forget ""` said "error:  is not a root of this index": the name shown as nothing. Said as `index ''` says it,
    exit 6 as that is, and nothing forgotten or written."""
    root, ix = indexed_images(2)
    args = [str(tmp_path / "out.parquet") if a == "OUT" else a for a in command]
    out = run(*args, "--index", ix, code=6).output
    assert out.startswith("error: an empty root was given: name one of this index's roots") and str(root) in out, out
    assert len(json.loads(run("roots", "--json", "--index", ix).stdout)) == 1 and not (tmp_path / "out.parquet").exists()
