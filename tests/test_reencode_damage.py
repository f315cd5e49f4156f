"""A re-encode killed before its switch resumes from the rows it committed under vectors/next/: those rows carry
checksums, and one whose bytes changed meanwhile must not go live."""

from pathlib import Path

import numpy as np
import pytest
from conftest import run
from helpers import killed_at, verify_problems

from alignsearch.storage import catalog, state, vectors


def live_rows(ix: Path) -> set[bytes]:
    db = catalog.connect(ix / "catalog.db", readonly=True)
    try:
        with db.connect() as conn:
            store = vectors.load(conn, ix, state.read(conn).model.dim)
            got = store.get(vectors.live_addresses(conn))
    finally:
        db.dispose()
    return {row.astype(vectors.DTYPE).tobytes() for row in got}


@pytest.mark.slow
def test_a_pending_row_damaged_before_a_resumed_re_encode_is_encoded_again_not_made_live(indexed_images,
                                                                                        other_model):
    """Killed before the switch, a flipped byte in the committed pending rows (a unit-length row still) went
    live: the switch made the segment live and the fold wrote a fresh checksum over the damaged row, so
    queries, `similar` and verify ("ok") served it without a word. The resumed run encodes its file again."""
    _, ix = indexed_images(6)
    args = ("index", "--index", ix, "--reindex", "--model", other_model, "--device", "cpu", "--workers", "0")
    assert killed_at("indexer.reindex:switch", "before", *args).returncode == -9
    [segment] = (ix / "vectors" / "next").glob("*.f16")
    data = bytearray(segment.read_bytes())
    row_bytes = len(data) // 6
    rows = {bytes(data[i * row_bytes:(i + 1) * row_bytes]) for i in range(6)}
    data[3 * row_bytes] ^= 0x40  # the low byte of one component: the row stays unit length
    segment.write_bytes(bytes(data))
    damaged = bytes(data[3 * row_bytes:4 * row_bytes])
    assert abs(np.linalg.norm(np.frombuffer(damaged, vectors.DTYPE).astype(np.float32)) - 1) < vectors.UNIT_TOLERANCE

    run(*args[:-2], "--workers", "0")
    live = live_rows(ix)
    assert damaged not in live
    assert live == rows  # the file of the damaged row was encoded again, to the row it had
    assert verify_problems(ix) == []


@pytest.mark.slow
def test_a_new_generation_damaged_before_its_fold_is_refused_not_given_a_fresh_checksum(indexed_images,
                                                                                        other_model, monkeypatch):
    """The fold after a re-encode's switch copies the new segment into vectors.f16 and records a fresh checksum
    over what it read: a row damaged between the switch and the fold went into it unchecked, and every later
    read and verify ("ok") took it for sound. The fold reads the rows against their checksums: the run stops in
    one line and verify finds the damage (--repair encodes the file again)."""
    from indexer import reindex

    _, ix = indexed_images(6)
    real = reindex.switch

    def switch_then_damage(db, out, *args, **kwargs):
        built = real(db, out, *args, **kwargs)
        [segment] = (Path(out) / "vectors" / "next").glob("*.f16")
        data = bytearray(segment.read_bytes())
        data[len(data) // 2] ^= 0x40
        segment.write_bytes(bytes(data))
        return built

    monkeypatch.setattr(reindex, "switch", switch_then_damage)
    out = run("index", "--index", ix, "--reindex", "--model", other_model, "--device", "cpu", "--workers", "0",
              code=7)
    errors = [line for line in out.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "changed since they were written" in errors[0], out.output
    assert "Traceback" not in out.output, out.output
    assert verify_problems(ix)
    monkeypatch.setattr(reindex, "switch", real)
    run("verify", "--index", ix, "--skip-model", "--repair")
    assert verify_problems(ix) == []
