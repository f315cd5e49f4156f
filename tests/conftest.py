import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
# Exported ONNX towers go to a folder of this run, never the user's ~/.cache (alignsearch/encoders/backend.py),
# removed when the session ends (pytest_sessionfinish): every run left one in the temp folder. One the caller
# gives (ALIGNSEARCH_CACHE set) is theirs, kept; so is this one in xdist workers, which inherit it.
_MADE_CACHE = None
if "ALIGNSEARCH_CACHE" not in os.environ:
    _MADE_CACHE = os.environ["ALIGNSEARCH_CACHE"] = tempfile.mkdtemp(prefix="alignsearch-cache-")
_MADE_BY = os.getpid()
# A suite started in the background by a non-interactive shell (`.ci/run &`, nohup, some CI runners) inherits
# SIGINT ignored, and so would every command a test starts: Python then installs no KeyboardInterrupt handler and
# every test that presses Ctrl-C on a child failed. An ignored SIGINT is the caller's
# choice that alignsearch honours; the tests need the terminal's default, so they put it back for their children
# (a handler is reset to the default across exec, SIG_IGN is not).
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

from tiny_align import build_tiny_align  # noqa: E402 - after the environment above is set


def pytest_sessionfinish(session, exitstatus):
    if _MADE_CACHE is not None and os.getpid() == _MADE_BY:
        shutil.rmtree(_MADE_CACHE, ignore_errors=True)


def run(*args, code=0):
    """The `alignsearch` command in-process; fails the test unless it exits with `code` (None: any code)."""
    from click.testing import CliRunner

    from alignsearch.surfaces.cli import main

    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert code is None or result.exit_code == code, result.output
    return result


def index_json(ix, *args) -> dict:
    """`alignsearch index ARGS --index IX --json`, parsed."""
    import json

    return json.loads(run("index", *args, "--index", ix, "--json").stdout)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random ALIGN checkpoint saved with save_pretrained, loaded like real weights."""
    return build_tiny_align(tmp_path_factory.mktemp("tiny-align"))


@pytest.fixture(scope="session")
def prebuilt(tmp_path_factory):
    """Folders built once a session and handed to each test as its own copy (helpers.Prebuilt)."""
    from helpers import Prebuilt

    return Prebuilt(tmp_path_factory.mktemp("prebuilt"))


@pytest.fixture
def indexed_images(prebuilt, tiny_model):
    """indexed_images(n) -> (root, index): make_images(root, n) and their index by the tiny model, for tests
    whose first `index` run is only where they start: one run a session for each n, a copy per test."""

    def indexed(n: int) -> tuple[Path, Path]:
        def build(base):
            index_json(base / "ix", make_images(base / "photos", n)[0].parent, "--model", tiny_model, "--device", "cpu")

        base, _ = prebuilt.folder(f"indexed-images-{n}", build)
        return base / "photos", base / "ix"

    return indexed


@pytest.fixture
def exported_cache(prebuilt, tiny_model, monkeypatch) -> Path:
    """ALIGNSEARCH_CACHE set to a cache of this test's own that already holds the tiny model's exported towers
    (exported, and the engines' speed measured, once a session): for tests of what follows an export."""

    def build(base):
        from alignsearch.encoders.model import Encoder

        with monkeypatch.context() as env:
            env.setenv("ALIGNSEARCH_CACHE", str(base))
            encoder = Encoder(str(tiny_model), device="cpu")
            encoder.encode_text(["a dog"])
            encoder.encode_crops(np.zeros((1, *encoder.spec.output_size, 3), dtype=np.uint8))

    folder, _ = prebuilt.folder("onnx-cache", build)
    monkeypatch.setenv("ALIGNSEARCH_CACHE", str(folder))
    return folder


@pytest.fixture(scope="session")
def other_model(tmp_path_factory) -> Path:
    return build_tiny_align(tmp_path_factory.mktemp("other-align"), seed=1)


def make_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """Distinct images: a coloured shape on a noisy background, varied sizes and formats."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        w, h = int(rng.integers(48, 160)), int(rng.integers(48, 160))
        img = Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
        draw.ellipse([x0, y0, x0 + w // 2, y0 + h // 2], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        path = folder / (f"img{i:03d}.jpg" if i % 3 else f"img{i:03d}.png")
        img.save(path)
        paths.append(path)
    return paths


def fill_corpus(root: Path) -> Path:
    """18 images (6 in nested/) and a broken.jpg that is not an image."""
    make_images(root, 12)
    make_images(root / "nested", 6, seed=1)
    (root / "broken.jpg").write_bytes(b"this is not an image")
    return root


@pytest.fixture
def corpus(tmp_path) -> Path:
    return fill_corpus(tmp_path / "corpus")


@pytest.fixture
def indexed_corpus(prebuilt, tiny_model) -> tuple[Path, Path]:
    """(corpus, index): the `corpus` fixture's files and their index, `.alignsearch` beside them, made by one
    `index` run a session; each test gets its own copy of both (see helpers.Prebuilt)."""

    def build(base):
        run("index", fill_corpus(base / "corpus"), "--index", base / ".alignsearch", "--model", tiny_model,
            "--device", "cpu")

    base, _ = prebuilt.folder("indexed-corpus", build)
    return base / "corpus", base / ".alignsearch"


@pytest.fixture
def ivfpq(prebuilt, tiny_model):
    """3 images and 12,000 clustered synthetic vectors, an IVF-PQ index: built once a session, a copy per test."""
    from helpers import with_synthetic

    return prebuilt.folder("compose-ivfpq", lambda base: with_synthetic(base, tiny_model, 3, 12_000, 5, "ivfpq"))[1]
