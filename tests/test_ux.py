"""Issue 18: classify with bad images, tags that do not depend on the label file, model loading
messages and speed offline, progress lines when stderr is not a TTY, finetune's warnings and reasons."""

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import make_images, run
from helpers import alignsearch, write_labels

LABELS = ["a red car", "a dog", "a photo of the beach at night"]


# -- item 5: model loading -------------------------------------------------------------------------------


def test_missing_model_folder_says_it_does_not_exist(tmp_path, corpus, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = run("classify", corpus / "img001.jpg", "--labels", "a", "--model", "./align-base", code=4).output
    assert "does not exist" in out and "./align-base" in out
    assert "hf download kakaobrain/align-base --local-dir ./align-base" in out
    assert "Repo id" not in out and "huggingface-cli" not in out


@pytest.mark.slow
def test_offline_default_model_fails_in_seconds(tmp_path):
    """HF_HUB_OFFLINE unset and the hub unreachable: one failed attempt, not half a minute of retries."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_ENDPOINT="https://huggingface.invalid", HF_HOME=str(tmp_path / "hf"))
    code = ("import time, sys\nfrom alignsearch.encoders.model import Encoder\nfrom alignsearch.errors import ModelLoadError\n"
            "t = time.perf_counter()\ntry:\n    Encoder('kakaobrain/align-base', device='cpu')\n"
            "except ModelLoadError as exc:\n    print(f'{time.perf_counter() - t:.2f}')\n    print(exc)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    lines = proc.stdout.splitlines()
    assert lines, proc.stderr[-2000:]
    assert float(lines[0]) < 10, proc.stdout
    assert "hf download kakaobrain/align-base" in proc.stdout and "cannot reach" in proc.stdout


def test_failed_first_index_leaves_no_index_folder(tmp_path, corpus):
    out = run("index", corpus, "--index", tmp_path / "ix", "--model", tmp_path / "no-model", code=4).output
    assert "does not exist" in out
    assert not (tmp_path / "ix").exists()


# -- item 1: classify with an unreadable image ----------------------------------------------------------


def test_classify_reports_bad_images_and_classifies_the_rest(tmp_path, corpus, tiny_model):
    bad = corpus / "broken.jpg"
    good = corpus / "img001.jpg"
    out = json.loads(run("classify", good, bad, tmp_path / "missing.jpg", "--labels", "a cat", "--labels", "a dog",
                         "--model", tiny_model, "--json").stdout)
    assert [o["image"] for o in out] == [str(good), str(bad), str(tmp_path / "missing.jpg")]
    assert [e["label"] for e in out[0]["labels"]] == ["a cat", "a dog"]
    assert "error" in out[1] and "labels" not in out[1] and "error" in out[2]
    text = run("classify", good, bad, "--labels", "a cat", "--labels", "a dog", "--model", tiny_model).output
    assert "a dog" in text and "broken.jpg" in text and "error" in text
    none = run("classify", bad, "--labels", "a cat", "--model", tiny_model, code=6).output
    assert "broken.jpg" in none


# -- item 2: tags ---------------------------------------------------------------------------------------


@pytest.fixture
def indexed(indexed_corpus):
    return indexed_corpus[1]


def _tagged(ix, label):
    return {h["id"] for h in json.loads(run("query", "x", "-k", "100", "--tag", label, "--json", "--index", ix).stdout)["results"]}


def test_label_file_comments_blanks_and_decision_independent_of_other_labels(tmp_path, indexed):
    ix = indexed
    one = write_labels(tmp_path / "one.txt", ["# animals", "", "a dog", "   "])
    out = json.loads(run("tag", "--labels-file", one, "--threshold", "0", "--top", "5", "--index", ix, "--json").stdout)
    assert list(out["per_label"]) == ["a dog"] and out["per_label"]["a dog"] == 18
    import alignsearch

    engine = alignsearch.open(ix)
    probs = sorted(p for h in engine.search(text="x", k=100) for label, p in engine.tags(h.id))
    assert len(probs) == 18
    threshold = (probs[8] + probs[9]) / 2  # about half of the images
    run("tag", "--clear", "--index", ix)
    assert json.loads(run("tags", "--json", "--index", ix).stdout) == []
    run("tag", "--labels-file", one, "--threshold", threshold, "--index", ix)
    alone = _tagged(ix, "a dog")
    assert 0 < len(alone) < 18
    many = write_labels(tmp_path / "many.txt", LABELS)
    run("tag", "--labels-file", many, "--threshold", threshold, "--top", "3", "--index", ix)
    assert _tagged(ix, "a dog") == alone  # the same decision with two more labels in the file


@pytest.mark.slow
def test_tag_runs_accumulate_clear_tags_listing_case_and_info(tmp_path, indexed_corpus):
    corpus, ix = indexed_corpus
    run("tag", "--labels-file", write_labels(tmp_path / "a.txt", ["A Dog", "a cat"]), "--threshold", "0", "--index", ix)
    run("tag", "--labels-file", write_labels(tmp_path / "b.txt", ["a red car"]), "--threshold", "0", "--index", ix)
    listed = json.loads(run("tags", "--json", "--index", ix).stdout)
    assert {e["label"]: e["images"] for e in listed} == {"A Dog": 18, "a cat": 18, "a red car": 18}
    text = run("tags", "--index", ix).output
    assert "A Dog" in text and "18" in text
    assert len(_tagged(ix, "a dog")) == 18 and _tagged(ix, "a dog") == _tagged(ix, "A DOG")
    info = json.loads(run("info", "--json", "--index", ix).stdout)
    assert info["tags"] == {"A Dog": 18, "a cat": 18, "a red car": 18}
    assert "a red car" in run("info", "--index", ix).output
    hit = json.loads(run("query", "x", "--json", "--index", ix).stdout)["results"][0]
    assert set(hit["tags"]) == {"A Dog", "a cat", "a red car"}
    # new images get every label set's tags
    make_images(corpus / "later", 2, seed=21)
    run("index", "--index", ix)
    assert {e["label"]: e["images"] for e in json.loads(run("tags", "--json", "--index", ix).stdout)} == {
        "A Dog": 20, "a cat": 20, "a red car": 20}
    run("tag", "--clear", "--index", ix)
    assert json.loads(run("tags", "--json", "--index", ix).stdout) == []
    run("index", "--index", ix)
    assert json.loads(run("tags", "--json", "--index", ix).stdout) == []  # cleared labels are not re-applied
    assert "no tags" in run("tags", "--index", ix).output


def test_label_file_of_comments_only_is_refused(tmp_path, indexed):
    out = run("tag", "--labels-file", write_labels(tmp_path / "c.txt", ["# nothing", ""]), "--index", indexed, code=6).output
    assert "no labels" in out


# -- item 6: progress lines when stderr is not a TTY ----------------------------------------------------


@pytest.mark.slow
def test_index_prints_progress_lines_when_stderr_is_piped(tmp_path, corpus, tiny_model):
    proc = alignsearch("index", corpus, "--index", tmp_path / "ix", "--model", tiny_model, "--device", "cpu",
                       "--workers", "0", env={"ALIGNSEARCH_PROGRESS_SECONDS": "0"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [x for x in proc.stderr.splitlines() if x.startswith("indexing:")]
    assert lines, proc.stderr[-2000:]
    assert re.match(r"indexing: \d+/19 files, [\d.]+ img/s, ETA \d+:\d\d:\d\d", lines[0]), lines[0]
    assert lines[-1].startswith("indexing: 19/19 files")
    assert "\r" not in proc.stderr


# -- item 7: finetune -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_finetune_small_validation_split_says_why_and_no_requires_grad_warning(tmp_path, recwarn):
    import warnings

    from shapes_data import all_specs, write_set
    from tiny_align import build_tiny_align

    base = build_tiny_align(tmp_path / "base", image=(72, 64), text_init=0.02)
    write_set(tmp_path / "train", all_specs(False)[:25], 1, seed=1)
    warnings.simplefilter("always")
    out = run("finetune", tmp_path / "train", "--model", base, "--out", tmp_path / "o", "--epochs", "1",
              "--batch-size", "8", "--device", "cpu").output
    assert "validation split has 2 pairs" in out and "R@10" in out
    assert not [f"{w.filename}:{w.lineno} {w.message}" for w in recwarn if "requires_grad" in str(w.message)]
    metrics = json.loads(out.strip().splitlines()[-1])
    assert "text_to_image_R@1" in metrics and "text_to_image_R@10" not in metrics  # 1.0 by construction: left out
    small = run("finetune", tmp_path / "train", "--model", base, "--out", tmp_path / "o2", "--epochs", "1",
                "--batch-size", "8", "--device", "cpu", "--val-fraction", "0").output
    assert "no validation split" in small


def test_labels_differing_in_case_are_one_label_and_long_ones_are_refused():
    """Issue 24 #23: `CAT` and `cat` in one labels file became two labels (of one case-insensitive tag); a label
    over 200 characters was accepted by `tag` but refused as --tag."""
    from alignsearch.errors import BadInputError
    from indexer.tag import parse_labels

    assert parse_labels(["CAT", "cat", " Cat ", "# cat", "dog"]) == ["CAT", "dog"]
    with pytest.raises(BadInputError, match="limit is 200"):
        parse_labels(["a dog", "x" * 201])
    assert parse_labels(["y" * 200]) == ["y" * 200]


@pytest.mark.slow  # 5 s: a child process loads the model
def test_a_model_file_the_user_cannot_read_is_said_to_be_unreadable(tmp_path, tiny_model):
    """Issue 24 #23: a checkpoint whose weights this user may not read was reported as missing."""
    import shutil

    from conftest import make_images
    from helpers import alignsearch, can_drop_dac

    if not can_drop_dac():
        pytest.skip("cannot drop root's permission bypass here")
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    weights = next(p for p in model.iterdir() if p.suffix in (".safetensors", ".bin"))
    weights.chmod(0)
    make_images(tmp_path / "photos", 2)
    proc = alignsearch("index", tmp_path / "photos", "--index", tmp_path / "ix", "--model", model, "--device", "cpu",
                       unprivileged=True)
    assert proc.returncode == 4, proc.stderr
    assert "permission denied" in proc.stderr and weights.name in proc.stderr, proc.stderr
    assert "does not exist" not in proc.stderr and "cache" not in proc.stderr


@pytest.mark.parametrize("value", ["abc", "nan", "-1"])
def test_a_progress_interval_that_is_no_number_of_seconds_is_a_note(monkeypatch, caplog, value):
    """ALIGNSEARCH_PROGRESS_SECONDS=abc ended an `index` run, files already listed, with "error: unexpected
    ValueError: could not convert string to float: 'abc'" (exit 1). A bad value is said in one note and the
    default interval kept, as a bad ALIGNSEARCH_LOG is."""
    import io

    from indexer import progress

    monkeypatch.setenv("ALIGNSEARCH_PROGRESS_SECONDS", value)
    with caplog.at_level("WARNING"):
        line = progress.LineProgress(3, "indexing", stream=io.StringIO())
    assert line.interval == progress.DEFAULT_SECONDS
    assert any("ALIGNSEARCH_PROGRESS_SECONDS" in r.getMessage() for r in caplog.records), caplog.text


class _Writes:
    """A stream that keeps each write() apart, as a signal between two of them would find them."""

    def __init__(self):
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return len(text)

    def flush(self) -> None:
        pass


def test_each_stderr_line_is_one_write(monkeypatch):
    """print() writes a line and its newline apart; a Ctrl-C between the two (CI: `index` stopped while it said
    its progress) glued "error: interrupted" to the end of the progress line. The progress lines, the notices
    and the client's lines are each written whole."""
    import sys

    from alignsearch import notices
    from alignsearch.surfaces import client
    from indexer import progress

    stream = _Writes()
    line = progress.LineProgress(2, "indexing", interval=0, stream=stream)
    line.update(1)
    line.close()
    monkeypatch.setattr(sys, "__stderr__", stream)
    monkeypatch.setattr(sys, "stderr", stream)
    monkeypatch.setitem(notices._state, "on", True)
    notices.say("note: compiling the towers once")
    client._stderr("note: answered by the server")
    assert len(stream.writes) == 4 and all(w.endswith("\n") and w.count("\n") == 1 for w in stream.writes), stream.writes


INTERRUPTED_WHILE_SAYING = r"""
import sys
from indexer import progress

line = progress.LineProgress(None, "indexing", interval=0)
try:
    print("ready", file=sys.stderr, flush=True)
    while True:
        line.update(1)
except KeyboardInterrupt:
    sys.stderr.write("error: interrupted\n")
"""


@pytest.mark.slow
def test_a_ctrl_c_while_progress_is_said_leaves_whole_lines():
    """The same with a real SIGINT: a loop of progress lines stopped by Ctrl-C, ten times; its last line is the
    error alone every time (the old print() glued them in 198 of 200 such runs)."""
    import signal
    import time

    for _ in range(10):
        proc = subprocess.Popen([sys.executable, "-c", INTERRUPTED_WHILE_SAYING], stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        assert proc.stderr.readline() == "ready\n"
        time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        lines = proc.stderr.read().splitlines()  # not communicate(): it reads the pipe itself, past what readline kept
        assert proc.wait(timeout=30) == 0
        assert lines[-1] == "error: interrupted", lines[-3:]
        odd = [t for t in lines[:-1] if not re.fullmatch(r"indexing: \d+ files, [\d.]+ img/s, \d+:\d\d:\d\d elapsed", t)]
        assert not odd, odd[:3]
