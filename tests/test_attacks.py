"""Guarantees attacked with real processes, real SQLite and real FAISS: two writers upgrading one catalog at
the same moment, the export cache's in-use lock across processes, the leftovers of a removal cut short, and
kill -9 at moments of an `index` run the other kill tests do not reach (the ANN layout switch, the removal
of deleted files)."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import sqlite3
import time
import traceback
from dataclasses import replace
from pathlib import Path

from helpers import FIXTURES, answers_as_recorded
from alignsearch.storage import catalog, migrate, state

FORK = multiprocessing.get_context("fork")  # a child is this process at the barrier: no second import of torch


# -- 1. two writers upgrade one catalog at the same moment ---------------------------------------------------------

def _upgrade_after_barrier(db_path: str, barrier, steps_log: str, hold: float, results) -> None:
    """A writer opening the catalog (catalog.connect runs the upgrade ladder) once every writer is ready;
    each step it applies is noted in steps_log (pid, version) and then holds the write lock `hold` seconds,
    so the other writer meets it mid-upgrade. Puts (pid, "ok" | "refused" | "traceback", text) in results."""
    from alignsearch.errors import AlignSearchError

    def noted(step: migrate.Step) -> migrate.Step:
        def apply(conn):
            step.apply(conn)
            with open(steps_log, "a") as f:
                f.write(f"{os.getpid()} {step.version}\n")
            time.sleep(hold)

        return replace(step, apply=apply)

    migrate.STEPS = tuple(noted(s) for s in migrate.STEPS)
    try:
        barrier.wait(timeout=60)
        catalog.connect(Path(db_path)).dispose()
        results.put((os.getpid(), "ok", ""))
    except AlignSearchError as exc:  # what the CLI prints as one line
        results.put((os.getpid(), "refused", str(exc)))
    except BaseException:  # noqa: BLE001 - any other failure is the finding
        results.put((os.getpid(), "traceback", traceback.format_exc()))


def test_two_writers_upgrading_an_old_catalog_at_once_apply_each_step_once(tmp_path):
    """The index an older alignsearch wrote (tests/fixtures/index-v3), its catalog's version set back to the
    first so every step of the ladder is due, opened by two writers released by one barrier: each step is
    applied once, the catalog ends at the current version, neither writer fails with a traceback, and the
    index answers every recorded query as before."""
    copy = Path(shutil.copytree(FIXTURES / "index-v3", tmp_path / "v3"))
    db_path = copy / ".alignsearch" / "catalog.db"
    conn = sqlite3.connect(db_path)
    with conn:
        conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (json.dumps(migrate.OLDEST),))
    conn.close()
    steps_log = tmp_path / "steps.log"
    barrier, results = FORK.Barrier(2), FORK.Queue()
    writers = [FORK.Process(target=_upgrade_after_barrier, args=(str(db_path), barrier, str(steps_log), 1.0, results))
               for _ in range(2)]
    for w in writers:
        w.start()
    got = [results.get(timeout=120) for _ in writers]
    for w in writers:
        w.join(timeout=60)
        assert w.exitcode == 0
    assert not [r for r in got if r[1] == "traceback"], got
    assert all(r[1] == "ok" or (r[1] == "refused" and "\n" not in r[2]) for r in got), got
    applied = [line.split() for line in steps_log.read_text().splitlines()]
    assert sorted(int(v) for _, v in applied) == [s.version for s in migrate.STEPS]  # each step once
    assert len({pid for pid, _ in applied}) == 1  # all by the writer that got the lock first
    db = catalog.connect(db_path, readonly=True)
    with db.connect() as conn:
        assert state.read(conn).schema_version == migrate.LATEST
    db.dispose()
    answers_as_recorded(copy)
