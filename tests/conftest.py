import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
# Exported ONNX towers go to a folder of this run, never the user's ~/.cache (alignsearch/encoders/backend.py)
os.environ.setdefault("ALIGNSEARCH_CACHE", tempfile.mkdtemp(prefix="alignsearch-cache-"))

from tiny_align import build_tiny_align


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


@pytest.fixture
def corpus(tmp_path) -> Path:
    root = tmp_path / "corpus"
    make_images(root, 12)
    make_images(root / "nested", 6, seed=1)
    (root / "broken.jpg").write_bytes(b"this is not an image")
    return root
