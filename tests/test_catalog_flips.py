"""A flipped bit anywhere in catalog.db never makes a reader answer short: it answers as before, or refuses in one
line (exit 7), and verify reports what readers refuse.

SQLite pages carry no checksum. a7af884's sweep (every byte of the files table's page flipped in turn, `query` run
on each) found 96 flips that made a row vanish with exit 0: each was of a row's status ('indexed' read as
'hndexed', or as bytes). The search reads an ANN hit's row by `status = 'indexed'`, so the row was taken for a file
removed since the ANN index was built and dropped, and SQLite's integrity check (run when rows are missing) sees no
fault in a column no index holds. benchmarks/sweep_catalog_flips.py sweeps every page; the slow test here a sample.
"""

import json

import pytest

from conftest import run
from helpers import (CRASH, FEWER, REFUSED, SWEPT, VERIFY_OK, flip_in_table_page, flip_offsets, flip_sweep,
                     swept_outcome)


@pytest.mark.parametrize("at", [0, 6])  # 'hndexed', 'indexee'
def test_a_flipped_status_is_damage_not_a_file_gone(indexed_images, at):
    photos, ix = indexed_images(12)
    flip_in_table_page(ix / "catalog.db", "files", b"JPEGindexed", 4 + at)  # the format, then the status: not the root
    result = run("query", "red circle", "--index", ix, "--json", "-k", 12, code=7)  # 11 rows, exit 0 before
    assert result.output.strip().splitlines() == [result.output.strip()]  # one line
    assert "catalog.db is damaged: 1 statuses are not 'indexed' or 'failed'" in result.output
    assert "statuses" in run("similar", photos / "img001.jpg", "--index", ix, "--json", "-k", 12, code=7).output
    assert "1 statuses are not 'indexed' or 'failed'" in run("verify", "--skip-model", "--index", ix, code=7).output


def test_failed_files_and_a_file_gone_are_no_damage(indexed_images):
    """The legitimate states the status check must not take for damage: a failed file's row, and an ANN hit whose
    row a writer removed (the integrity check, once per snapshot, says the catalog is sound)."""
    import sqlite3

    _, ix = indexed_images(12)
    conn = sqlite3.connect(ix / "catalog.db")
    with conn:
        conn.execute("UPDATE files SET status = 'failed', vec_row = NULL, reason = 'test' WHERE id = 3")
        conn.execute("DELETE FROM files WHERE id = 4")
    conn.close()
    shown = json.loads(run("query", "red circle", "--index", ix, "--json", "-k", 12).stdout)["results"]
    assert sorted(hit["id"] for hit in shown) == [i for i in range(1, 13) if i not in (3, 4)]


def test_the_sweeps_outcomes_are_told_apart():
    intact = json.dumps({"results": [{"id": 1}, {"id": 2}]})
    assert swept_outcome("query", 0, intact, intact) == "same"
    assert swept_outcome("query", 0, json.dumps({"results": [{"id": 1}]}), intact) == FEWER
    assert swept_outcome("query", 7, "error: catalog.db is damaged: x\n", intact) == REFUSED
    assert swept_outcome("query", 1, "Traceback (most recent call last):\n  ...\n", intact) == CRASH
    assert swept_outcome("verify", 0, "ok: images=12\n", "") == VERIFY_OK


@pytest.mark.slow  # ~650 flips, each query, similar and verify in-process (~1-2 min)
def test_no_flipped_byte_of_any_catalog_page_answers_short(indexed_images):
    """Every 17th used byte of each page of the catalog holding cells (files, its indexes, photos, phashes, meta,
    the keyword tables, the schema): no flip gives fewer rows with exit 0, none a traceback, and verify finds
    damage wherever a reader refused."""
    photos, ix = indexed_images(12)
    swept = flip_sweep(photos, ix, flip_offsets(ix / "catalog.db", every=17))
    assert len({row["table"] for row in swept}) > 10  # every page, not the files table's alone
    for command in ("query", "similar"):
        bad = [(row["table"], row["at"], row[command]) for row in swept if row[command][0] in (FEWER, CRASH)]
        assert not bad, (command, bad)
    unseen = [(row["table"], row["at"], row["query"], row["similar"]) for row in swept
              if REFUSED in (row["query"][0], row["similar"][0]) and row["verify"][0] == VERIFY_OK]
    assert not unseen, unseen
    assert set(SWEPT) <= set(swept[0])


def test_a_flipped_column_name_in_the_schema_is_found_by_verify(indexed_images):
    """A byte of a column's name in files' CREATE statement (the schema's page): readers refuse the catalog in one
    line, and verify, whose integrity check passes and which never selected indexed_at, said ok (exit 0)."""
    _, ix = indexed_images(12)
    db = ix / "catalog.db"
    data = bytearray(db.read_bytes())
    # the schema's text (sqlite_master): page 1 and, since schema 14's columns lengthened it, a page it overflows to
    at = data.find(b"indexed_at FLOAT")
    assert at > 0
    data[at] ^= 0x01  # "hndexed_at"
    db.write_bytes(data)
    result = run("query", "red circle", "--index", ix, "--json", "-k", 12, code=7)
    assert result.output.strip().splitlines() == [result.output.strip()]
    assert "its table files does not read as alignsearch writes it (no such column: files.indexed_at)" in \
        run("verify", "--skip-model", "--index", ix, code=7).output


def test_a_flipped_column_name_of_the_keyword_index_is_found_and_repaired(indexed_images):
    """keywords_idx's pgno read as pgoo (the schema's page): every keyword search of the catalog fails, yet verify's
    FTS5 check, on a copy whose shadow tables it makes afresh, called it sound (exit 0). Now verify searches the
    catalog itself, and --repair writes the keyword index again, as for other damage of it."""
    _, ix = indexed_images(12)
    db = ix / "catalog.db"
    data = bytearray(db.read_bytes())
    at = data.find(b"'keywords_idx'(segid, term, pgno")  # the schema's text, wherever its pages lie
    assert at > 0
    data[at + len(b"'keywords_idx'(segid, term, pg")] ^= 0x01  # pgno -> pgoo
    db.write_bytes(data)
    result = run("query", "red circle", "--index", ix, "--json", "-k", 12, code=7)
    assert result.output.strip().splitlines() == [result.output.strip()] and "verify --repair" in result.output
    assert "its keyword index keywords cannot be searched" in run("verify", "--skip-model", "--index", ix, code=7).output
    run("verify", "--repair", "--skip-model", "--index", ix)
    assert len(json.loads(run("query", "red circle", "--index", ix, "--json", "-k", 12).stdout)["results"]) == 12


def test_the_sweeps_page_groups_are_checked_before_any_work():
    """benchmarks/sweep_catalog_flips.py --pages with no such group: refused by its argument parser (exit 2), before
    the model, the base's worktree and the index builds (a base that is no commit: the old code got as far as it)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "sweep_catalog_flips.py"
    proc = subprocess.run([sys.executable, script, "--pages", "file", "--base", "no-such-commit-xyz", "--no-save"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "invalid choice: 'file'" in proc.stderr, proc.stderr[-2000:]
