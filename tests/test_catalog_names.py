"""A flipped byte in a catalog row's name is damage a reader reports, never a path it shows (catalog.check_names).

SQLite pages carry no checksum: a byte flipped in the files table's page was read as it stood, and `query` printed
/photos/hmg001.jpg for img001.jpg with exit 0; only `verify` (SQLite's integrity check of the whole catalog) found it.
Each shown row's name is now looked up in the unique index that holds a second copy of it.
"""

import os
import shutil
import sqlite3
from pathlib import Path

import pytest

from conftest import make_images, run
from helpers import flip_in_table_page, index_with_a_name_not_utf8, killed_at_call
from alignsearch.media import sources
from alignsearch.storage import catalog


def _paths(ix, k=12):
    return sorted(line.split()[-1] for line in run("query", "a photo", "--index", ix, "-k", k).stdout.splitlines())


def test_an_intact_index_answers_every_file(indexed_images):
    photos, ix = indexed_images(12)
    assert _paths(ix) == sorted(str(p) for p in photos.iterdir())


@pytest.mark.parametrize("at", [0, 3])  # the name's first letter; the root's, which every row repeats
def test_a_flipped_byte_in_a_rows_name_is_damage_not_a_path(indexed_images, at):
    photos, ix = indexed_images(12)
    needle = b"img001.jpg" if at == 0 else os.fsencode(photos)
    flip_in_table_page(ix / "catalog.db", "files", needle, at)
    result = run("query", "a photo", "--index", ix, "-k", 12, code=7)  # exit 0 with /photos/hmg001.jpg before
    assert "hmg001" not in result.output and "/tmp" not in result.stdout
    assert result.output.strip().splitlines() == [result.output.strip()]  # one line
    assert "catalog.db is damaged" in result.output and "alignsearch verify --repair" in result.output
    run("similar", photos / "img000.png", "--index", ix, "-k", 12, code=7)  # every surface reads rows so
    assert run("verify", "--index", ix, code=7)  # and verify finds it, as it did


@pytest.mark.slow  # an index of its own (~4 s)
def test_a_flipped_byte_in_a_names_kept_bytes_is_damage(tmp_path, tiny_model):
    """A name that is not UTF-8 keeps its bytes in relpath_raw, which no index copies; they must spell the key."""
    index_with_a_name_not_utf8(tmp_path, tiny_model)
    flip_in_table_page(tmp_path / "ix" / "catalog.db", "files", b"caf\xe9.jpg")  # the bytes, not the key caf\xe9
    result = run("query", "a photo", "--index", tmp_path / "ix", code=7)  # exit 0 with .../baf\xe9.jpg before
    assert "baf" not in result.output and "alignsearch verify --repair" in result.output
    assert "name" in run("verify", "--index", tmp_path / "ix", code=7).output


@pytest.mark.slow  # an index of its own (~4 s)
def test_verify_repair_writes_a_names_kept_bytes_again_from_its_key(tmp_path, tiny_model):
    """The key is lossless and has its second copy in the unique index: the bytes are rebuilt from it, and the
    index is kept (before: "damaged beyond repair: move ... aside and rebuild", exit 7)."""
    folder, ix, _ = index_with_a_name_not_utf8(tmp_path, tiny_model)
    flip_in_table_page(ix / "catalog.db", "files", b"caf\xe9.jpg")
    assert "--repair` writes them again from their keys" in run("verify", "--skip-model", "--index", ix, code=7).output
    result = run("verify", "--repair", "--skip-model", "--index", ix)
    assert "repaired: wrote the name bytes of 1 files again from their keys" in result.output
    assert "beyond repair" not in result.output
    assert run("verify", "--skip-model", "--index", ix).output.startswith("ok: ")
    conn = sqlite3.connect(ix / "catalog.db")
    try:
        assert conn.execute("SELECT relpath_raw FROM files WHERE relpath_raw IS NOT NULL").fetchall() == [(b"caf\xe9.jpg",)]
    finally:
        conn.close()
    shown = sorted(line.split()[-1] for line in run("query", "a photo", "--index", ix, "-k", 2).stdout.splitlines())
    assert shown == [f"{folder}/caf\\xe9.jpg", f"{folder}/img000.png"]  # its bytes not UTF-8 as \xNN, as shown


@pytest.mark.slow  # an index of its own (~4 s)
def test_verify_repair_leaves_a_name_whose_key_is_not_lossless(tmp_path, tiny_model):
    """A catalog whose keys were written before they were lossless (state.keys_lossless unset): the key does not
    spell the bytes for sure, so --repair changes nothing and says how to rebuild, as before."""
    _, ix, _ = index_with_a_name_not_utf8(tmp_path, tiny_model)
    conn = sqlite3.connect(ix / "catalog.db")
    with conn:
        conn.execute("DELETE FROM meta WHERE key = 'keys_lossless'")
    conn.close()
    flip_in_table_page(ix / "catalog.db", "files", b"caf\xe9.jpg")
    result = run("verify", "--repair", "--skip-model", "--index", ix, code=7)
    assert "repaired:" not in result.output and "damaged beyond repair" in result.output
    conn = sqlite3.connect(ix / "catalog.db")
    try:
        assert conn.execute("SELECT relpath_raw FROM files WHERE relpath_raw IS NOT NULL").fetchall() == [(b"baf\xe9.jpg",)]
    finally:
        conn.close()


def test_a_name_is_rebuilt_only_from_a_lossless_key():
    for raw in [b"caf\xe9 a\\b.jpg", b"a\\b", b"\xff\\x41", "caf\u00e9.jpg".encode(), b"img.jpg"]:
        key = sources.catalog_key(os.fsdecode(raw))
        assert sources.key_name(key[0]) == key
    assert sources.key_name("caf\\xe9 a\\b.jpg") is None  # written before keys were lossless: a lone backslash
    assert sources.key_name("\\x41") is None  # catalog_key writes A, never \x41


def test_key_holds_both_forms_of_key():
    raw = b"caf\xe9 a\\b.jpg"
    assert sources.key_holds(sources.catalog_key(os.fsdecode(raw))[0], raw)  # lossless: backslashes doubled
    assert sources.key_holds("caf\\xe9 a\\b.jpg", raw)  # written before keys were lossless
    assert sources.key_holds("img.jpg", None)
    assert not sources.key_holds("caf\\xe9 a\\\\b.jpg", b"baf\xe9 a\\b.jpg")
    assert not sources.key_holds("x", "x")  # text where a writer stores bytes


def test_the_check_seeks_the_names_index(indexed_images):
    """The lookup must read the index's copy, not the row again (then it would agree with any damage)."""
    _, ix = indexed_images(12)
    from sqlalchemy import select
    from sqlalchemy.dialects import sqlite

    sql = str(select(catalog.files, catalog._key_owner()).where(catalog.files.c.id == 1)
              .compile(dialect=sqlite.dialect(), compile_kwargs={"literal_binds": True}))
    conn = sqlite3.connect(f"file:{ix / 'catalog.db'}?mode=ro", uri=True)
    try:
        plan = " ".join(row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sql))
    finally:
        conn.close()
    assert "COVERING INDEX sqlite_autoindex_files_1 (root=? AND relpath=? AND moment=?)" in plan, plan


NOT_UTF8 = (b"caf\xe9.jpg", b"na\xefve.jpg", b"\xfcber.jpg")  # three rows that keep their name's bytes


def _kept_names(ix) -> list[bytes]:
    conn = sqlite3.connect(ix / "catalog.db")
    try:
        return sorted(raw for raw, in conn.execute("SELECT relpath_raw FROM files WHERE relpath_raw IS NOT NULL"))
    finally:
        conn.close()


# kill -9 of `verify --repair` as it mends three rows' name bytes (one transaction), each moment the n-th return of
# a function (helpers.killed_at_call), and the catalog the kill must leave: "old" (every row's bytes still flipped)
# or "mended" (every row's written again), never some rows of each
MEND_MOMENTS = [
    ("alignsearch.storage.catalog:mendable_names", 2, "old"),  # the rows found again under the writer lock
    ("alignsearch.storage.catalog:update", 2, "old"),  # one row's bytes written in the transaction
    ("alignsearch.storage.catalog:update", 3, "old"),  # two rows' written
    ("alignsearch.storage.catalog:mend_names", 1, "old"),  # all three written, not yet committed
    ("indexer.verify:_held", 1, "mended"),  # committed: the repair's next step (the vectors) begun
]


@pytest.mark.slow  # an index and six runs of verify (~15 s)
def test_verify_repair_killed_while_it_mends_names_leaves_the_old_or_the_mended_catalog(tmp_path, tiny_model):
    """kill -9 at each moment of a mend leaves the catalog as it was or mended whole (the rows are written in one
    transaction, committed together), and a second `verify --repair` finishes the job: verify ok, every row's bytes
    the name its key spells."""
    folder = tmp_path / "photos"
    for path, name in zip(make_images(folder, 4)[1:], NOT_UTF8):
        os.rename(path, os.path.join(os.fsencode(folder), name))
    built = tmp_path / "built"
    run("index", folder, "--index", built, "--model", tiny_model, "--device", "cpu")
    for name in NOT_UTF8:
        flip_in_table_page(built / "catalog.db", "files", name)  # its first byte: c -> b, n -> o, \xfc -> \xfd
    old = _kept_names(built)
    assert len(old) == 3 and not set(old) & set(NOT_UTF8)
    for where, nth, left in MEND_MOMENTS:
        ix = Path(shutil.copytree(built, tmp_path / f"{where.rpartition(':')[2]}-{nth}"))
        proc = killed_at_call(where, nth, {}, "verify", "--repair", "--skip-model", "--index", ix)
        assert proc.returncode == -9, (where, nth, proc.returncode, proc.stdout + proc.stderr)  # killed at the moment
        assert _kept_names(ix) == (old if left == "old" else sorted(NOT_UTF8)), (where, nth)
        again = run("verify", "--repair", "--skip-model", "--index", ix)
        assert ("wrote the name bytes of 3 files again" in again.output) == (left == "old"), (where, nth, again.output)
        assert run("verify", "--skip-model", "--index", ix).output.startswith("ok: "), (where, nth)
        assert _kept_names(ix) == sorted(NOT_UTF8), (where, nth)
