"""OpenMP's idle threads sleep in every entry, not only `serve`: the Python API and the CLI's own searches spun.

libgomp (faiss's, torch's) spins a thread up to GOMP_SPINCOUNT rounds after each parallel region unless
OMP_WAIT_POLICY says PASSIVE, and on a busy machine a search on the caller's thread then waited for the spinner to be
scheduled again (benchmarks/RESULTS.md, bench_inproc.py). Each runtime reads the policy once, as it loads, and says
what it took when OMP_DISPLAY_ENV=VERBOSE: these tests read that, from processes started without the variable."""

import os
import re
import subprocess
import sys

import pytest

from helpers import alignsearch

SPIN = re.compile(r"GOMP_SPINCOUNT = '(\d+)'")
POLICY = re.compile(r"OMP_WAIT_POLICY = '(\w+)'")

SEARCH = """
import sys
from pathlib import Path
import alignsearch
with alignsearch.open(Path(sys.argv[1]), device="cpu") as engine:
    print(len(engine.search("red", k=3)))
"""


@pytest.fixture
def no_policy(monkeypatch):
    """The environment of a process whose user set no OpenMP wait policy (this pytest process's own, from importing
    alignsearch, taken out) and asks each OpenMP runtime to say what it took."""
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setenv("OMP_DISPLAY_ENV", "VERBOSE")


def spin_counts(stderr: str) -> list[int]:
    return [int(n) for n in SPIN.findall(stderr)]


@pytest.mark.slow
def test_the_python_api_searches_with_sleeping_threads(indexed_corpus, no_policy):
    """Engine.search in a script: faiss's OpenMP runtime (torch's too where loaded) never spins (it spun 300000)."""
    proc = subprocess.run([sys.executable, "-c", SEARCH, str(indexed_corpus[1])], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "3"
    counts = spin_counts(proc.stderr)
    assert counts and counts == [0] * len(counts), proc.stderr[-2000:]


@pytest.mark.slow
def test_the_cli_query_searches_with_sleeping_threads(indexed_corpus, no_policy):
    """`alignsearch query` searching here (no server): the same."""
    proc = alignsearch("query", "red", "-k", "3", "--index", indexed_corpus[1])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(proc.stdout.strip().splitlines()) == 3
    counts = spin_counts(proc.stderr)
    assert counts and counts == [0] * len(counts), proc.stderr[-2000:]


@pytest.mark.slow
def test_a_callers_own_wait_policy_stands(indexed_corpus, no_policy, monkeypatch):
    """OMP_WAIT_POLICY=ACTIVE given by the caller is what the runtimes take (the default only fills an unset one)."""
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    proc = subprocess.run([sys.executable, "-c", SEARCH, str(indexed_corpus[1])], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    policies = POLICY.findall(proc.stderr)
    assert policies and set(policies) == {"ACTIVE"}, proc.stderr[-2000:]
    assert 0 not in spin_counts(proc.stderr)
