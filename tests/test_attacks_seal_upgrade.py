"""kill -9 during the upgrade from schema 23 to 24 (migrate.seal_file_fields: files.field_seal added, each healthy
files row sealed). The upgrade is one transaction a writer's catalog.connect opens and commits: a writer killed at any
moment of it leaves the catalog at 23 (readers answer as before, unsealed columns) or at 24 whole, never a catalog at
24 with rows unsealed (each would read as damage) nor one at 23 with the column half filled; the next writer redoes
it and every answer is the same."""

import sqlite3

import numpy as np
import pytest

import alignsearch
from helpers import as_schema, catalog_rows, filter_columns, fixed_answers, killed_upgrading, layout_index, \
    verify_problems
from alignsearch.storage import catalog, migrate
from alignsearch.storage.paths import DB_FILE

ROWS = 600
# (where, when, nth): the moments the writer is killed at, and the schema each leaves (24: only once it committed)
MOMENTS = [
    ("alignsearch.storage.migrate:seal_file_fields", "before", 0, 23),  # the column added, no row sealed
    ("sealing", None, 1, 23),  # the first row sealed
    ("sealing", None, ROWS // 2, 23),  # half of them, their pages spilled into the WAL uncommitted
    ("sealing", None, ROWS, 23),  # the last row's UPDATE
    ("alignsearch.storage.migrate:seal_file_fields", "after", 0, 23),  # every row sealed, the version not written
    ("alignsearch.storage.migrate:upgrade", "after", 0, 23),  # the version written, the transaction not committed
    ("alignsearch.storage.catalog:connect", "after", 0, 24),  # committed
]


def _answers(ix) -> tuple:
    """What readers see: the ranked paths of a fixed vector, the same filtered by width, and the width column."""
    with alignsearch.open(ix) as engine:
        query = np.random.default_rng(7).standard_normal(engine.store.dim).astype(np.float32)
        query /= np.linalg.norm(query)
        filtered = [h.path for h in engine.search_vector(query, k=50, where="width >= 1")]
    return fixed_answers(ix), filtered, filter_columns(ix / DB_FILE, readonly=True).column("width").tolist()


@pytest.mark.slow  # an index built, a child killed at each of seven moments
@pytest.mark.parametrize("where,when,nth,left", MOMENTS)
def test_a_writer_killed_9_upgrading_to_24_leaves_a_catalog_that_opens_and_answers_the_same(tmp_path, where, when,
                                                                                            nth, left):
    ix = tmp_path / "ix"
    layout_index(ix, ROWS, 16)[0].dispose()
    with sqlite3.connect(ix / DB_FILE) as conn:
        as_schema(conn, 23)
    conn.close()
    before = _answers(ix)
    assert len(before[0]) == 100 and len(before[1]) == 50 and len(before[2]) == ROWS

    proc = killed_upgrading(ix / DB_FILE, where, when, nth=nth)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert catalog_rows(ix, "PRAGMA integrity_check") == [("ok",)]
    assert catalog_rows(ix, "SELECT value FROM meta WHERE key = 'schema_version'") == [(str(left),)]
    columns = [name for (name,) in catalog_rows(ix, "SELECT name FROM pragma_table_info('files')")]
    assert ("field_seal" in columns) == (left == 24)  # the column goes with the transaction that added it
    if left == 24:
        assert catalog_rows(ix, "SELECT count(*) FROM files WHERE field_seal IS NULL") == [(0,)]
    assert _answers(ix) == before  # readers (which never upgrade) answer as before

    catalog.connect(ix / DB_FILE).dispose()  # the next writer upgrades it (again)
    assert catalog_rows(ix, "SELECT value FROM meta WHERE key = 'schema_version'") == [(str(migrate.LATEST),)]
    assert catalog_rows(ix, "SELECT count(*) FROM files WHERE field_seal IS NULL") == [(0,)]
    assert filter_columns(ix / DB_FILE).column("width").tolist() == before[2]  # checked against the seals now
    assert _answers(ix) == before
    assert verify_problems(ix) == []
