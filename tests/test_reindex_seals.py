"""A re-encode's new vector addresses (pending_vectors) are sealed as they are written (schema 19), checked at its
switch and moved with their seal into files.vec_seal: the switch sealed each address anew from what it read, so a
flipped byte in one went live already sealed, another file's vector scored under this name, exit 0."""

from __future__ import annotations

import sqlite3

import pytest
from conftest import index_json, run
from helpers import (catalog_pages, catalog_rows, checkpointed_ids, fixed_answers, flipped_field, index_generation,
                     killed_at, record_columns, vector_index, verify_problems)

from alignsearch.storage import catalog, migrate, rowdigest

REINDEX = ("--device", "cpu", "--workers", "0", "--reindex")


def _flip_a_pending_address(ix) -> None:
    """One pending row's address made another's (as a flipped byte makes it), its seal kept: what no writer wrote."""
    with sqlite3.connect(ix / "catalog.db") as conn:
        (first, _), (second, theirs) = conn.execute("SELECT file_id, vec_row FROM pending_vectors "
                                                    "ORDER BY file_id LIMIT 2").fetchall()
        conn.execute("UPDATE pending_vectors SET vec_row = ? WHERE file_id = ?", (theirs, first))
    conn.close()


def _addresses_apart(ix) -> bool:
    """Whether every indexed file (distinct images) has an address of its own."""
    (distinct, rows), = catalog_rows(ix, "SELECT count(DISTINCT vec_row), count(*) FROM files WHERE status = 'indexed'")
    return distinct == rows


@pytest.mark.slow
def test_a_flipped_pending_address_is_refused_at_the_switch(indexed_images, monkeypatch):
    """Damaged between its write and the switch (the run's own), the address is refused in one line, exit 7, and
    nothing goes live: before, the switch sealed it as it read it and the file scored another's vector, exit 0."""
    import indexer.reindex

    _, ix = indexed_images(4)
    generation, want = index_generation(ix), fixed_answers(ix)
    reencode = indexer.reindex.reencode

    def reencode_then_flip(*args, **kwargs):
        done = reencode(*args, **kwargs)
        _flip_a_pending_address(ix)
        return done

    monkeypatch.setattr(indexer.reindex, "reencode", reencode_then_flip)
    result = run("index", "--index", ix, *REINDEX, code=7)
    error = [line for line in result.output.splitlines() if line.startswith("error:")]  # after the progress bar
    assert len(error) == 1 and "re-encode in progress" in error[0] and "--reindex" in error[0], result.output
    assert index_generation(ix) == generation and fixed_answers(ix) == want  # the old generation still answers


@pytest.mark.slow
def test_a_killed_re_encode_resumed_switches_and_encodes_a_flipped_pending_address_again(indexed_images):
    """A re-encode killed before its switch resumes with the addresses its first run sealed and switches to them;
    one of them flipped meanwhile is forgotten and its file encoded again (the way out the refusal names), never
    made live: before, the flipped address went live, two files scoring one vector."""
    _, ix = indexed_images(6)
    want = fixed_answers(ix)
    proc = killed_at("indexer.videos:reencode_moments", "before", "index", "--index", ix, *REINDEX)
    assert proc.returncode == -9, proc.stderr[-3000:]
    sealed = catalog_rows(ix, "SELECT vec_row, vec_seal FROM pending_vectors")
    assert len(sealed) == 6 and all(rowdigest.seal(row) == seal for row, seal in sealed)  # as each write sealed it
    _flip_a_pending_address(ix)
    assert index_json(ix, *REINDEX)["reencoded"] == 1  # the flipped one, encoded again
    assert _addresses_apart(ix) and fixed_answers(ix) == want and verify_problems(ix) == []


def test_an_upgrade_from_schema_18_seals_a_re_encodes_pending_addresses_as_they_stand(tmp_path):
    """A re-encode stopped at schema 18 left addresses with no seal: the next writer's upgrade (step 19) seals them as
    they stand, as step 17 sealed the files', so the resumed re-encode's switch accepts them."""
    vector_index(tmp_path, 8, 4)
    db_path = tmp_path / "catalog.db"
    with sqlite3.connect(db_path) as conn:  # the table as schema 18 made it: no seal column
        conn.execute("ALTER TABLE pending_vectors DROP COLUMN vec_seal")
        conn.executemany("INSERT INTO pending_vectors (file_id, vec_row) VALUES (?, ?)", [(1, 5), (2, 300), (3, 0)])
        conn.execute("UPDATE meta SET value = '18' WHERE key = 'schema_version'")
    conn.close()
    catalog.connect(db_path).dispose()  # a writer: upgraded
    assert catalog_rows(tmp_path, "SELECT value FROM meta WHERE key = 'schema_version'") == [(str(migrate.LATEST),)]
    assert catalog_rows(tmp_path, "SELECT file_id, vec_row, vec_seal FROM pending_vectors ORDER BY file_id") == [
        (1, 5, rowdigest.seal(5)), (2, 300, rowdigest.seal(300)), (3, 0, rowdigest.seal(0))]


@pytest.mark.slow
def test_an_address_flipped_after_the_switchs_check_goes_live_off_its_seal(indexed_images, monkeypatch):
    """The switch moves each address's seal with it (rowdigest.shifted_seal_sql), never seals the address it reads
    anew: one damaged after its check (between the check and the commit) goes live off its seal, so the run's next
    read and every reader refuse it (exit 7) rather than score another file's vector under its name."""
    import indexer.reindex
    from alignsearch.errors import IndexDamagedError

    _, ix = indexed_images(4)
    check = indexer.reindex.refuse_unsealed

    def check_then_flip(read):
        check(read)
        _flip_a_pending_address(ix)

    monkeypatch.setattr(indexer.reindex, "refuse_unsealed", check_then_flip)
    assert "checksum" in run("index", "--index", ix, *REINDEX, code=7).output  # the run's own next read refuses it
    with pytest.raises(IndexDamagedError, match="checksum"):
        fixed_answers(ix)



def _flip_a_pending_file_id(ix) -> tuple[int, int]:
    """The lowest bit of one pending row's rowid (its file_id) flipped where its cell holds it, as a damaged byte
    flips it: (the id written, the id it reads as), that id another pending row's too. SQLite takes the cell as
    read: a rowid table has no second copy of its key, and a page carries no checksum. The WAL is checkpointed
    into the file first, so that the page flipped is the one read."""
    db = ix / "catalog.db"
    columns = record_columns(db, "pending_vectors")
    page_size, ids = checkpointed_ids(db, "SELECT file_id FROM pending_vectors")
    data = bytearray(db.read_bytes())
    for _, _, _, first, end in catalog_pages(db)["pending_vectors"]:
        for at in range(first, end):
            if flipped_field(bytes(data), page_size, at, columns).endswith(": rowid") and data[at] < 0x80:
                written = data[at]
                if written in ids and written ^ 1 in ids and written ^ 1 > 0:
                    data[at] ^= 0x01
                    db.write_bytes(data)
                    return written, written ^ 1
    raise AssertionError("no pending row whose flipped id is another's")


@pytest.mark.slow
def test_a_pending_row_whose_file_id_reads_as_anothers_is_never_made_live(indexed_images, monkeypatch):
    """A pending row's file_id (its rowid) is outside its seal: flipped to another pending row's id between the
    re-encode and its switch, two rows read for one file and none for the other, and the switch gave the one file
    whichever address SQLite's seek met (seen: the other's vector, wrong answers after, verify ok), exit 0. Two
    addresses for one file are damage: refused in one line (exit 7), nothing made live; the way out it names (a
    resumed re-encode, which drops such a table's rows and encodes its files again) then answers as before."""
    import indexer.reindex

    _, ix = indexed_images(6)
    generation, want = index_generation(ix), fixed_answers(ix)
    reencode = indexer.reindex.reencode
    flipped = []

    def reencode_then_flip(*args, **kwargs):
        done = reencode(*args, **kwargs)
        flipped.append(_flip_a_pending_file_id(ix))
        return done

    monkeypatch.setattr(indexer.reindex, "reencode", reencode_then_flip)
    result = run("index", "--index", ix, *REINDEX, code=7)
    error = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "two addresses for file" in error[0] and "--reindex" in error[0], result.output
    (written, read), = flipped
    assert sorted(i for (i,) in catalog_rows(ix, "SELECT file_id FROM pending_vectors")).count(read) == 2
    assert index_generation(ix) == generation and fixed_answers(ix) == want  # the old generation still answers
    monkeypatch.setattr(indexer.reindex, "reencode", reencode)
    assert index_json(ix, *REINDEX)["reencoded"] == 6  # every file, the damaged table's rows all dropped
    assert _addresses_apart(ix) and fixed_answers(ix) == want and verify_problems(ix) == []
    assert catalog_rows(ix, "PRAGMA integrity_check") == [("ok",)]


def test_doubled_names_the_ids_read_more_than_once():
    from indexer.reindex import doubled

    assert doubled([]) == [] and doubled([3, 1, 2]) == []
    assert doubled([1, 2, 4, 4, 6]) == [4] and doubled([9, 1, 9, 1, 2]) == [1, 9]
