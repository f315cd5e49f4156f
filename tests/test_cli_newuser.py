"""The command line as a new user meets it: odd file names on every command that takes or prints one, prompt
templates that are not what str.format wants, and first `index` runs that were refused."""

import json
import os
import shutil

import pytest

from conftest import make_images, run
from helpers import alignsearch, write_labels

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


def test_similar_finds_indexed_files_by_names_that_are_not_utf8_or_hold_a_backslash(odd_names):
    root, ix = odd_names
    proc = alignsearch("similar", root / BAD, "-k", "1", "--json", "--index", ix)
    assert proc.returncode == 0, proc.stderr  # was: unexpected UnicodeEncodeError, exit 1
    assert json.loads(proc.stdout)["query"]["path"] == str(root / BAD_SHOWN)
    proc = alignsearch("similar", root / "back\\slash.png", "-k", "1", "--index", ix)
    assert proc.returncode == 0, proc.stderr  # was: "is not an indexed image", exit 6


