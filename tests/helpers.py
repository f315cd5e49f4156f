"""Helpers shared by several test modules (conftest.py keeps the fixtures and `run`)."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys

PR_CAPBSET_DROP = 24
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 1, 2


def _drop_dac_capabilities() -> None:
    """In a child before exec: drop root's power to read and list whatever the file modes say, so a
    chmod 000 folder really cannot be listed (the tests run as root, where chmod alone stops nothing)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def can_drop_dac() -> bool:
    """Whether a child can be started without the root file-permission bypass (else such tests skip)."""
    if os.geteuid() != 0:
        return True
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        locked = os.path.join(tmp, "locked")
        os.mkdir(locked, 0)
        try:
            probe = subprocess.run([sys.executable, "-c", f"import os; os.listdir({locked!r})"],
                                   preexec_fn=_drop_dac_capabilities, capture_output=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return False
        finally:
            os.chmod(locked, 0o700)
    return probe.returncode != 0  # a mode-0 folder lists only with the bypass


def alignsearch(*args, timeout: float = 300, unprivileged: bool = False, stdin=None, **kwargs) -> subprocess.CompletedProcess:
    """`python -m alignsearch ARGS` in a child process; unprivileged: without the root permission bypass."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **kwargs.pop("env", {})}
    preexec = _drop_dac_capabilities if unprivileged and os.geteuid() == 0 else None
    return subprocess.run([sys.executable, "-m", "alignsearch", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, preexec_fn=preexec, stdin=stdin, **kwargs)


PEAK_RSS = """
import resource, sys
from alignsearch.cli import main
try:
    main(sys.argv[1:], prog_name="alignsearch")
except SystemExit as exc:
    code = exc.code
else:
    code = 0
peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
print("PEAK_RSS_KB", peak, file=sys.stderr)
sys.exit(code)
"""


def alignsearch_peak_rss(*args, timeout: float = 300) -> tuple[subprocess.CompletedProcess, int]:
    """Run the command in a child; returns the result and the peak resident memory (bytes) of the child
    and its worker processes (the larger of the two)."""
    proc = subprocess.run([sys.executable, "-c", PEAK_RSS, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    line = [x for x in proc.stderr.splitlines() if x.startswith("PEAK_RSS_KB")]
    assert line, proc.stderr[-3000:]
    return proc, int(line[-1].split()[1]) * 1024


def summary(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def near_copies(src, folder, stem: str | None = None) -> list:
    """Copies of one image as libraries hold them: re-saved as a lower-quality JPEG, resized to half, and
    cropped by 4% on each side (then re-saved). Returns their paths."""
    from pathlib import Path

    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stem = stem or Path(src).stem
    img = Image.open(src).convert("RGB")
    w, h = img.size
    out = [folder / f"{stem}-resaved.jpg", folder / f"{stem}-half.png", folder / f"{stem}-cropped.jpg"]
    img.save(out[0], quality=60)
    img.resize((max(1, w // 2), max(1, h // 2)), Image.LANCZOS).save(out[1])
    dx, dy = int(w * 0.04), int(h * 0.04)
    img.crop((dx, dy, w - dx, h - dy)).save(out[2], quality=85)
    return out


def smooth_photos(folder, n: int, seed: int = 0, size=(320, 240)) -> list:
    """n distinct photo-like images (smooth colour fields with blurred shapes, as photos compress)."""
    from pathlib import Path

    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    w, h = size
    for i in range(n):
        img = Image.fromarray((rng.random((6, 8, 3)) * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)
        draw = ImageDraw.Draw(img)
        for _ in range(5):
            x, y, r = int(rng.integers(0, w)), int(rng.integers(0, h)), int(rng.integers(w // 12, w // 4))
            draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        path = folder / f"photo{i:04d}.jpg"
        img.filter(ImageFilter.GaussianBlur(2)).save(path, quality=90)
        paths.append(path)
    return paths
