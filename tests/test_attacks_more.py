"""More guarantees attacked with real processes, real SQLite and real video files, aimed at the newer features:
the keyword index (FTS5) that holds captions and the text read in images, `forget`, video moments (committed
whole or not at all, served only while they are the file indexed), and the server's ranged video route."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from conftest import index_json, make_images, run

from alignsearch.storage import catalog

CAPTIONS = {"img000": "Zanzibar harbour at dawn", "img001": "receipt INV4711A paid in Lisbon",
            "img002": "the yellow tram"}


def _captioned(root: Path, captions: dict[str, str], n: int = 4, seed: int = 0) -> Path:
    """n images with sidecar captions (photo.txt beside photo.jpg) for some: text in the keyword index."""
    for path in make_images(root, n, seed=seed):
        if path.stem in captions:
            path.with_suffix(".txt").write_text(captions[path.stem])
    return root


def _ro(ix: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{ix / 'catalog.db'}?mode=ro", uri=True)


def keyword_drift(ix: Path) -> list[str]:
    """How the catalog's keyword tables (FTS5) disagree with its files: rows left for files the catalog no longer
    holds (photo fields, keyword text, phashes), indexed files without keyword text, keyword text that is not what
    the file's caption, text in the image, name and tags make, and FTS5's own integrity check (run on a copy)."""
    conn = _ro(ix)
    try:
        files = {i for (i,) in conn.execute("SELECT id FROM files")}
        indexed = {i: (rel, cap, ocr) for i, rel, cap, ocr in conn.execute(
            "SELECT f.id, f.relpath, p.caption, p.ocr FROM files f JOIN photos p ON p.file_id = f.id "
            "WHERE f.status = 'indexed'")}
        labels: dict[int, list[str]] = {}
        for i, label in conn.execute("SELECT file_id, label FROM tags"):
            labels.setdefault(i, []).append(label)
        bodies = dict(conn.execute(f"SELECT rowid, body FROM {catalog.KEYWORDS}"))
        trigram = {i for (i,) in conn.execute(f"SELECT rowid FROM {catalog.KEYWORDS_TRIGRAM}")}
        photos = {i for (i,) in conn.execute("SELECT file_id FROM photos")}
        phashes = {i for (i,) in conn.execute("SELECT file_id FROM phashes")}
    finally:
        conn.close()
    drift = []
    for name, ids in (("photos", photos), (catalog.KEYWORDS, set(bodies)), (catalog.KEYWORDS_TRIGRAM, trigram),
                      ("phashes", phashes)):
        if ids - files:
            drift.append(f"{name} holds {len(ids - files)} rows of files the catalog no longer has")
    if set(indexed) - set(bodies):
        drift.append(f"{len(set(indexed) - set(bodies))} indexed files have no keyword text")
    wrong = [i for i, (rel, cap, ocr) in indexed.items()
             if i in bodies and bodies[i] != catalog.keyword_text(rel, cap, labels.get(i, ()), ocr)]
    if wrong:
        drift.append(f"{len(wrong)} files' keyword text is not their caption, text, name and tags")
    copy = ix.parent / f".{ix.name}-fts-check.db"
    check = sqlite3.connect(copy)  # FTS5's check is an INSERT: run on a copy (WAL included), the index unwritten
    try:
        source = _ro(ix)
        source.backup(check)
        source.close()
        for table in (catalog.KEYWORDS, catalog.KEYWORDS_TRIGRAM):
            try:
                check.execute(f"INSERT INTO {table}({table}) VALUES ('integrity-check')")
            except sqlite3.DatabaseError as exc:
                drift.append(f"{table}: {exc}")
        check.close()
    finally:
        copy.unlink()
    return drift


def _keyword_hits(ix: Path, text: str) -> list[str]:
    out = run("query", "--index", ix, "--json", "-k", "10", "--mode", "keyword", "--", text).output
    return [r["relpath"] for r in json.loads(out)["results"]]


# -- 1. `forget ROOT` leaves nothing of the root behind ------------------------------------------------------------

def test_forget_drops_the_roots_captions_text_and_keyword_rows(tmp_path, tiny_model):
    """`alignsearch forget ROOT` deleted the root's files and tags but left their photo fields (caption, text read
    in the image, GPS position), their keyword text and their perceptual hashes in catalog.db for good: what the
    user asked to drop stayed readable in the index, found by nothing, removed by nothing."""
    private = _captioned(tmp_path / "private", CAPTIONS)
    kept = _captioned(tmp_path / "kept", {"img000": "Kilimanjaro at noon"}, n=3, seed=3)
    ix = tmp_path / "ix"
    index_json(ix, private, kept, "--model", tiny_model, "--device", "cpu")
    assert _keyword_hits(ix, "zanzibar") == ["img000.png"]
    assert keyword_drift(ix) == []
    run("forget", private, "--index", ix)
    assert _keyword_hits(ix, "zanzibar") == [] and len(_keyword_hits(ix, "kilimanjaro")) == 1
    assert keyword_drift(ix) == []
    conn = _ro(ix)
    try:
        text = "\n".join(str(row) for table in ("photos", catalog.KEYWORDS, catalog.KEYWORDS_TRIGRAM)
                         for row in conn.execute(f"SELECT * FROM {table}"))
    finally:
        conn.close()
    for caption in CAPTIONS.values():
        assert caption not in text
    assert "INV4711A" not in text
    assert run("verify", "--index", ix, "--skip-model").exit_code == 0


# -- 2. bytes flipped in the catalog's keyword index ---------------------------------------------------------------

def _flip_keyword_data(db: Path) -> None:
    """Flip bytes in the largest block of the keyword index's data (what a bad sector or a stray write does to
    those pages); SQLite's page structure stays sound, so only FTS5 can tell."""
    conn = sqlite3.connect(db)
    try:
        block_id, block = conn.execute(f"SELECT id, block FROM {catalog.KEYWORDS}_data "
                                       "ORDER BY length(block) DESC LIMIT 1").fetchone()
        flipped = bytearray(block)
        for i in range(4, len(flipped), 7):
            flipped[i] ^= 0xFF
        with conn:
            conn.execute(f"UPDATE {catalog.KEYWORDS}_data SET block = ? WHERE id = ?", (bytes(flipped), block_id))
    finally:
        conn.close()


def test_verify_finds_bytes_flipped_in_the_keyword_index(indexed_images):
    """Bytes flipped in the keyword index (FTS5's data rows): every keyword query answered nothing, or failed,
    and `verify` said the index was sound (PRAGMA integrity_check reads FTS5 tables only from SQLite 3.44)."""
    root, ix = indexed_images(12)
    name = sorted(p.name for p in root.iterdir())[5]
    assert _keyword_hits(ix, Path(name).stem) == [name]
    _flip_keyword_data(ix / "catalog.db")
    assert keyword_drift(ix)  # the attack did damage the index
    result = run("verify", "--index", ix, "--skip-model", code=None)
    assert result.exit_code != 0, result.output
    assert "keyword" in result.output and "catalog.db" in result.output, result.output
