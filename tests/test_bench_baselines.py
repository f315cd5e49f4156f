"""The benchmarks that time this tree against a base commit's module (common.module_at) run with their default base.

benchmarks/bench_photo_keys.py's --seals and --file-seals time this tree's filter columns load against a base
commit's (module_at): the base's columns.py calls catalog functions this tree merged since (count_photos and
count_indexed_photos_scanned into count_photos_scanned, 7dcb35a), and --file-seals' base was main, which checks the
files seals itself since their merge (cedc39a). bench_photo_counts.py and bench_columns_memory.py alike."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench(*args: str) -> str:
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_photo_keys.py"), "--n", "40",
                             "--rounds", "1", "--no-save", *args], capture_output=True, text=True, cwd=ROOT,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def _has(rev: str) -> bool:
    return subprocess.run(["git", "cat-file", "-e", f"{rev}:alignsearch/search/columns.py"], cwd=ROOT,
                          capture_output=True).returncode == 0


@pytest.mark.slow  # two catalogs built and loaded by a benchmark in a subprocess
def test_the_seals_baseline_loads_with_the_catalog_functions_it_calls():
    """Before: AttributeError (catalog.count_photos), exit 1."""
    if not _has("7d28022^1"):
        pytest.skip("no git history (a shallow clone): the baseline is a commit's columns.py")
    assert "filter columns load, 7d28022^1's (no seal read or checked)" in _bench("--seals")


@pytest.mark.slow  # a catalog built and loaded by a benchmark in a subprocess
def test_the_file_seals_baseline_checks_no_files_seal():
    """Before: main's load, which checks the files seals since cedc39a, timed against itself as the one without."""
    if not _has("cedc39a^1"):
        pytest.skip("no git history (a shallow clone): the baseline is a commit's columns.py")
    out = _bench("--file-seals", "--inserts", "20")
    (base,) = re.findall(r"filter columns load, (\S+)'s \(photos seals checked, no files seal", out)
    source = subprocess.run(["git", "show", f"{base}:alignsearch/search/columns.py"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout
    assert "file_seals" not in source and "FILE_SEED" not in source, base


@pytest.mark.slow  # a catalog built, counted and loaded by a benchmark in a subprocess
def test_the_photo_counts_baseline_has_the_two_counts():
    """bench_photo_counts.py times --base's two counts (count_photos, count_indexed_photos_scanned) against the one
    scan; its default base was main, which has neither since the one scan merged (6b56b1f): AttributeError, exit 1."""
    if not _has("6b56b1f^1"):
        pytest.skip("no git history (a shallow clone): the baseline is a commit's catalog.py")
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_photo_counts.py"), "--n", "40",
                             "--rounds", "1", "--caption", "0", "--no-save"], capture_output=True, text=True, cwd=ROOT,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "one scan: count_photos_scanned" in result.stdout


@pytest.mark.slow  # a catalog built and loaded by a benchmark in two subprocesses
def test_the_columns_memory_catalog_loads():
    """bench_columns_memory.py builds its catalog in SQL: its files rows had no field seal (schema 24), and the load
    refused them all (IndexDamagedError in the child, CalledProcessError, exit 1)."""
    if not _has("2ca070c"):
        pytest.skip("no git history (a shallow clone): the baseline is a commit's columns.py")
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_columns_memory.py"), "--n", "40",
                             "--rounds", "1", "--no-save"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
