"""A re-encode's new vector addresses (pending_vectors) are sealed as they are written (schema 19), checked at its
switch and moved with their seal into files.vec_seal: the switch sealed each address anew from what it read, so a
flipped byte in one went live already sealed, another file's vector scored under this name, exit 0."""

from __future__ import annotations

import functools
import sqlite3

import pytest
from conftest import index_json, run
from helpers import (as_schema, catalog_pages, catalog_rows, checkpointed_ids, fixed_answers, flipped_field, index_generation,
                     killed_at, killed_at_call, record_columns, vector_index, verify_problems)

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
    sealed = catalog_rows(ix, "SELECT file_id, vec_row, vec_seal FROM pending_vectors")
    assert len(sealed) == 6 and all(rowdigest.pending_seal(i, row) == seal for i, row, seal in sealed)  # as written
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
        (1, 5, rowdigest.pending_seal(1, 5)), (2, 300, rowdigest.pending_seal(2, 300)),
        (3, 0, rowdigest.pending_seal(3, 0))]  # and, at schema 22, with their file ids


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
    assert len(error) == 1 and "not as written (SQLite: " in error[0] and "out of order" in error[0], result.output
    assert "--reindex" in error[0], result.output
    (written, read), = flipped
    assert sorted(i for (i,) in catalog_rows(ix, "SELECT file_id FROM pending_vectors")).count(read) == 2
    assert index_generation(ix) == generation and fixed_answers(ix) == want  # the old generation still answers
    monkeypatch.setattr(indexer.reindex, "reencode", reencode)
    assert index_json(ix, *REINDEX)["reencoded"] == 6  # every file, the damaged table's rows all dropped
    assert _addresses_apart(ix) and fixed_answers(ix) == want and verify_problems(ix) == []
    assert catalog_rows(ix, "PRAGMA integrity_check") == [("ok",)]


def _rewrite_a_pending_file_id(db, written: int, read: int) -> None:
    """One pending row's rowid (its file_id) rewritten where its cell holds it (both ids under 128: one byte), as a
    damaged byte rewrites it; the WAL is checkpointed into the file first (_flip_a_pending_file_id). db: a catalog."""
    columns = record_columns(db, "pending_vectors")
    page_size, _ = checkpointed_ids(db, "SELECT file_id FROM pending_vectors")
    data = bytearray(db.read_bytes())
    for _, _, _, first, end in catalog_pages(db)["pending_vectors"]:
        for at in range(first, end):
            if data[at] == written and flipped_field(bytes(data), page_size, at, columns).endswith(": rowid"):
                data[at] = read
                db.write_bytes(data)
                return
    raise AssertionError(f"no pending row of file {written}")


def _killed_after_two_files(ix) -> list[int]:
    """A re-encode (two files a batch) killed after its first batch's commit: the pending file ids it left."""
    proc = killed_at_call("alignsearch.storage.vectors:record_chunk", 2, {}, "index", "--index", ix, *REINDEX,
                          "--batch-size", "2")
    assert proc.returncode == -9, proc.stderr[-3000:]
    pending = sorted(i for (i,) in catalog_rows(ix, "SELECT file_id FROM pending_vectors"))
    assert len(pending) == 2, pending
    return pending


@pytest.mark.slow
def test_a_resumed_re_encode_drops_a_pending_file_id_read_as_a_file_not_yet_encoded(indexed_images):
    """A stopped re-encode's pending file id damaged (a byte of its key) into the id of a file it had not encoded yet:
    read once, not doubled, but out of the table's order. The resumed run took that file as done and never encoded it,
    and the switch gave it the other file's old vector: exit 0, verify ok, the file scored another's vector. A key
    out of order is damage as one read twice: the resumed run drops the table's rows and encodes every file again."""
    _, ix = indexed_images(6)
    want = fixed_answers(ix)
    first, second = _killed_after_two_files(ix)
    (onto,), = catalog_rows(ix, "SELECT max(id) FROM files")  # a file id above both pending ones: out of order
    assert onto > second
    _rewrite_a_pending_file_id(ix / "catalog.db", first, onto)
    reencoded = index_json(ix, *REINDEX)["reencoded"]
    assert fixed_answers(ix) == want and _addresses_apart(ix) and verify_problems(ix) == []
    assert reencoded == 6  # every file, the damaged table's rows all dropped


@pytest.mark.slow
def test_a_resumed_re_encode_drops_a_pending_file_id_flipped_in_order(indexed_images):
    """As above, the highest pending id flipped onto a file not encoded yet, which keeps the keys in order (SQLite's
    check passes): the resumed run skipped that file, which went live with the other's old vector (exit 0, verify
    ok). From schema 22 the seal covers the file id: the row is off it, dropped, and its file encoded again."""
    _, ix = indexed_images(6)
    want = fixed_answers(ix)
    _, second = _killed_after_two_files(ix)
    _rewrite_a_pending_file_id(ix / "catalog.db", second, second ^ 0x01 if second & 1 == 0 else second + 1)
    index_json(ix, *REINDEX)
    assert fixed_answers(ix) == want and verify_problems(ix) == []


def test_an_upgrade_from_schema_21_seals_each_pending_address_with_its_file_id_and_keeps_one_off_its_seal_off(tmp_path):
    """Step 22 adds each pending row's file id term to its seal as it stands: a sealed address is sealed with its id
    (the resumed re-encode's switch accepts it), one off its seal stays off (never sealed anew), a NULL stays NULL."""
    vector_index(tmp_path, 8, 4)
    db_path = tmp_path / "catalog.db"
    with sqlite3.connect(db_path) as conn:  # rows as schema 21 wrote them: the address's seal alone
        conn.executemany("INSERT INTO pending_vectors (file_id, vec_row, vec_seal) VALUES (?, ?, ?)",
                         [(1, 5, rowdigest.seal(5)), (2, 300, rowdigest.seal(300)), (3, 7, rowdigest.seal(8)),
                          (4, 9, None)])
        conn.execute("UPDATE meta SET value = '21' WHERE key = 'schema_version'")
    conn.close()
    catalog.connect(db_path).dispose()  # a writer: upgraded
    assert catalog_rows(tmp_path, "SELECT value FROM meta WHERE key = 'schema_version'") == [(str(migrate.LATEST),)]
    rows = catalog_rows(tmp_path, "SELECT file_id, vec_row, vec_seal FROM pending_vectors ORDER BY file_id")
    assert rows[:2] == [(1, 5, rowdigest.pending_seal(1, 5)), (2, 300, rowdigest.pending_seal(2, 300))]
    assert rows[2][2] != rowdigest.pending_seal(3, 7) and rows[3] == (4, 9, None)


def test_pending_seals_cover_the_file_id_and_move_off_it_at_the_switch():
    """A flip of a file id (k * 256**j) changes its pending seal; the seal less the id's term is the address's
    (what files.vec_seal holds after the switch), in Python, numpy and SQL alike."""
    import numpy as np

    for file_id, address in [(1, 0), (12, 5), (2**31, 2**40), (2**40 + 3, 7)]:
        sealed = rowdigest.pending_seal(file_id, address)
        for shift in (1, -1, 128, 256, 255 * 256**3, 2**56):
            if file_id + shift > 0:
                assert rowdigest.pending_seal(file_id + shift, address) != sealed
        assert (sealed - rowdigest.key_term(file_id)) % rowdigest.SEAL_PRIME == rowdigest.seal(address)
        ids, addresses = np.array([file_id], dtype=np.int64), np.array([address], dtype=np.int64)
        assert rowdigest.pending_sealed(ids, addresses, np.array([sealed]))
        (in_sql,), = sqlite3.connect(":memory:").execute(
            f"SELECT ({rowdigest.seal_sql(str(address))} + {rowdigest.key_term_sql(str(file_id))}) "
            f"% {rowdigest.SEAL_PRIME}").fetchall()
        assert in_sql == sealed


def test_key_problems_names_a_pending_key_out_of_order(tmp_path):
    """SQLite's check of pending_vectors alone: [] on a sound table, a line naming the key out of order (one read
    twice among them) once a rowid byte is flipped."""
    from sqlalchemy import create_engine

    from indexer.reindex import key_problems

    for written, read in [(None, None), (2, 3), (2, 9)]:  # sound; read twice; read once, out of order
        db = tmp_path / f"{read}.db"
        engine = create_engine(f"sqlite:///{db}")
        catalog.pending_vectors.create(engine)
        with engine.begin() as conn:
            conn.exec_driver_sql("INSERT INTO pending_vectors (file_id, vec_row) VALUES (1, 0), (2, 1), (3, 2), (4, 3)")
        engine.dispose()
        if written is not None:
            _rewrite_a_pending_file_id(db, written, read)
        with engine.connect() as conn:
            found = key_problems(conn)
        engine.dispose()
        assert found == [] if read is None else (len(found) == 1 and f"Rowid {read} out of order" in found[0]
                                                 and "\n" not in found[0]), found


def _as_version(ix, version: int) -> None:
    """The index's catalog as schema `version` (17 or 18) left it, with a re-encode's pending addresses (one a file)
    and no seal column for them (step 19 adds it): what the upgrade from it is to seal."""
    with sqlite3.connect(ix / "catalog.db") as conn:
        conn.execute("ALTER TABLE pending_vectors DROP COLUMN vec_seal")
        conn.execute("INSERT INTO pending_vectors (file_id, vec_row) SELECT id, 300 + id FROM files "
                     "WHERE status = 'indexed'")
        as_schema(conn, version)  # its photo rows digested as that version wrote them (no key: schema 21)
    conn.close()


def _dump(ix) -> list[str]:
    conn = sqlite3.connect(f"file:{ix / 'catalog.db'}?mode=ro", uri=True)
    try:
        return list(conn.iterdump())
    finally:
        conn.close()


def _query(ix) -> list[dict]:
    import json

    return json.loads(run("query", "a photo", "--index", ix, "-k", 12, "--json").stdout)["results"]


@pytest.mark.slow  # a child process per kill, and the upgrade after (~10 s)
@pytest.mark.parametrize("version, kills", [
    (17, [("alignsearch.storage.migrate:seal_addresses", "after"),  # step 18 applied, 19's seals written
          ("alignsearch.storage.migrate:_build_keywords", "after")]),  # the keyword index written again (step 18's)
    (18, [("alignsearch.storage.migrate:seal_addresses", "after")])])  # step 19's column added and filled
def test_kill_9_during_the_upgrade_from_17_or_18_leaves_the_old_catalog_then_a_writer_upgrades(indexed_images,
                                                                                                 version, kills):
    """Every step of an upgrade runs in one transaction: a writer killed -9 in the middle of the steps after 17 and 18
    (each kill point is reached only inside the upgrade: exit -9 says the kill landed there) leaves the catalog byte
    for byte as it was, at its old version, a reader answers as before, and the next writer upgrades it whole: FTS5's
    check of the keyword index passes and the pending addresses are sealed."""
    photos, ix = indexed_images(4)
    _as_version(ix, version)
    before, answers = _dump(ix), _query(ix)
    for where, when in kills:
        killed = killed_at(where, when, "index", photos, "--index", ix, "--device", "cpu")
        assert killed.returncode == -9, (where, killed.returncode, killed.stderr[-3000:])
        assert _dump(ix) == before, where  # nothing of the steps applied before the kill was committed
        assert catalog_rows(ix, "SELECT value FROM meta WHERE key = 'schema_version'") == [(str(version),)]
        assert _query(ix) == answers, where
    catalog.connect(ix / "catalog.db").dispose()  # a writer
    assert catalog_rows(ix, "SELECT value FROM meta WHERE key = 'schema_version'") == [(str(migrate.LATEST),)]
    assert catalog.keyword_problems(ix / "catalog.db") == []
    sealed = catalog_rows(ix, "SELECT file_id, vec_row, vec_seal FROM pending_vectors")
    assert len(sealed) == 4 and all(rowdigest.pending_seal(i, row) == seal for i, row, seal in sealed), sealed
    assert _query(ix) == answers


def test_the_switch_refuses_an_address_or_seal_no_writer_stores_as_the_check_per_row_did():
    """refuse_unsealed checks the seals in numpy: every address that is not an int (a REAL, text, bytes, NULL, a
    bool) and every seal that is not the address's (NULL, text, a REAL, another int) refused, as the check per row
    in Python refused them; sealed rows, and none, pass."""
    from indexer.reindex import refuse_unsealed

    from alignsearch.errors import IndexDamagedError

    sound = [(1, 7, rowdigest.pending_seal(1, 7)), (2, 2**40, rowdigest.pending_seal(2, 2**40)),
             (3, 0, rowdigest.pending_seal(3, 0))]
    refuse_unsealed(sound)
    refuse_unsealed([])
    seal = functools.partial(rowdigest.pending_seal, 4)
    for address, seal in [(3.5, seal(3)), (5.0, seal(5)), ("5", seal(5)), (b"5", seal(5)), (None, None),
                          (True, seal(1)), (1e300, 0), (5, None), (5, "x"), (5, str(seal(5))), (5, seal(4)),
                          (5, 2**70), (5, rowdigest.seal(5)), (5, rowdigest.pending_seal(5, 5))]:
        with pytest.raises(IndexDamagedError, match="re-encode in progress"):
            refuse_unsealed([*sound, (4, address, seal)])


def test_a_catalog_relabelled_at_19_to_21_upgrades_its_pending_seals_to_those_a_writer_writes(tmp_path):
    """helpers.as_schema at 19 to 21 leaves each pending seal as that version wrote it (the address's alone): the
    upgrade's step 22 then adds the file id's term once, as a re-encode at 22 writes it (it left the term on, and
    the upgrade added it twice: every pending address off its seal)."""
    from indexer.reindex import _pending_row

    for version in (19, 21):
        folder = tmp_path / str(version)
        vector_index(folder, 4, 4)
        with sqlite3.connect(folder / "catalog.db") as conn:
            conn.executemany("INSERT INTO pending_vectors (file_id, vec_row, vec_seal) VALUES (:file_id, :vec_row, "
                             ":vec_seal)", [_pending_row(i, 10 + i) for i in (1, 2, 3)])
            as_schema(conn, version)
        conn.close()
        catalog.connect(folder / "catalog.db").dispose()  # a writer: upgraded
        assert catalog_rows(folder, "SELECT file_id, vec_row, vec_seal FROM pending_vectors ORDER BY file_id") == [
            (i, 10 + i, rowdigest.pending_seal(i, 10 + i)) for i in (1, 2, 3)]
