"""Damage to the index is said as damage (exit 7), never as the user's mistake: the three cases of the catalog flip
sweep (benchmarks/sweep_catalog_flips.py) that blamed the user.

- a flipped byte of the model record's fingerprint read as another model (exit 5, "built with another model");
- a flipped byte of the meta key `model` read as a new index (exit 3, "holds no indexed images yet");
- a flipped byte of a file's entry in the index of names made `similar FILE` say "is not an indexed image" (exit 6).
"""

import json
import sqlite3

import pytest

from conftest import run
from helpers import as_schema, catalog_pages, flip_in_table_page, flip_vector_address

from alignsearch.errors import IndexDamagedError
from alignsearch.storage import catalog, migrate, state


def _meta(ix):
    conn = sqlite3.connect(ix / "catalog.db")
    try:
        return dict(conn.execute("SELECT key, value FROM meta").fetchall())
    finally:
        conn.close()


def _set_meta(ix, **values):
    conn = sqlite3.connect(ix / "catalog.db")
    with conn:
        for key, value in values.items():
            conn.execute("UPDATE meta SET value = ? WHERE key = ?", (value, key))
    conn.close()


def _flip_at(db, at: int) -> None:
    data = bytearray(db.read_bytes())
    data[at] ^= 0x01
    db.write_bytes(data)


def _one_line(result) -> str:
    text = result.output.strip()
    assert text.splitlines() == [text], text
    return text


def _flip_fingerprint(db) -> None:
    data = db.read_bytes()
    start = data.find(b'"fingerprint": "') + len(b'"fingerprint": "')
    # a digit of it: its flip is another digit, so the record still reads as a well-formed record of another model
    _flip_at(db, next(i for i in range(start, start + 32) if chr(data[i]).isdigit()))


def test_a_flipped_fingerprint_is_damage_not_another_model(indexed_images):
    _, ix = indexed_images(12)
    _flip_fingerprint(ix / "catalog.db")
    line = _one_line(run("query", "red circle", "--index", ix, code=7))  # exit 5 before: "built with ... not ..."
    assert "catalog.db is damaged: the value of 'model' in its meta table is not what alignsearch writes" in line
    assert "checksum" in line and "restore the index from a backup" in line
    assert _one_line(run("info", "--index", ix, code=7)) == line
    assert _one_line(run("verify", "--skip-model", "--index", ix, code=7)) == line  # ok (exit 0) before


def test_the_python_api_says_a_flipped_fingerprint_as_the_cli_does(indexed_images):
    import alignsearch

    _, ix = indexed_images(12)
    _flip_fingerprint(ix / "catalog.db")
    line = _one_line(run("query", "red circle", "--index", ix, code=7))
    with pytest.raises(IndexDamagedError) as raised:
        alignsearch.open(ix, device="cpu")
    assert f"error: {raised.value}" == line


def test_a_model_record_without_its_digest_is_read_before_schema_15_and_refused_from_it(indexed_images):
    """Step 15 seals the record as it stands; a reader of an older catalog (it cannot upgrade) reads it unsealed."""
    from alignsearch.storage import metaseal

    _, ix = indexed_images(12)
    record = json.loads(_meta(ix)["model"])
    assert record[metaseal.KEY] == metaseal.digest(record)  # every writer seals it
    record.pop(metaseal.KEY)
    _set_meta(ix, model=json.dumps(record))
    with sqlite3.connect(ix / "catalog.db") as conn:
        as_schema(conn, 14)  # its photos rows digested as schema 14 wrote them (no key)
    conn.close()
    run("query", "red circle", "--index", ix)  # a schema-14 catalog: no digest asked
    db = catalog.connect(ix / "catalog.db")  # a writer upgrades it
    db.dispose()
    meta = _meta(ix)
    assert meta["schema_version"] == str(migrate.LATEST) and json.loads(meta["model"]) == metaseal.sealed(record)
    run("query", "red circle", "--index", ix)
    _set_meta(ix, model=json.dumps(record))  # at 15 every writer stored one: its lack is damage
    assert "it lacks the checksum every writer stores" in _one_line(run("query", "red circle", "--index", ix, code=7))


def test_the_seal_is_a_pure_function_of_the_record():
    from alignsearch.storage import metaseal

    record = {"model": "m", "fingerprint": "ab12", "dim": 32, "preprocessing": {"rescale_factor": 0.00784313725490196}}
    sealed = json.loads(json.dumps(metaseal.sealed(record)))  # as stored and read back
    assert metaseal.opened(sealed, required=True) == record
    assert metaseal.opened(record, required=False) == record
    with pytest.raises(ValueError):
        metaseal.opened(record, required=True)
    with pytest.raises(ValueError):
        metaseal.opened({**sealed, "fingerprint": "ab13"}, required=False)


def test_a_flipped_model_key_is_damage_not_a_new_index(indexed_images):
    photos, ix = indexed_images(12)
    db = ix / "catalog.db"
    at = db.read_bytes().find(b'model{"model": ')  # the key's text in the meta row, just before its value
    assert at > 0
    _flip_at(db, at + 1)  # "mndel"
    line = _one_line(run("query", "red circle", "--index", ix, code=7))  # exit 3 before: "holds no indexed images yet"
    assert line == ("error: catalog.db is damaged: its meta table records no model, yet the index holds 12 indexed "
                    "images and 12 vector rows and an ANN index: restore the index from a backup, or index the "
                    "folders again into a new index")
    assert _one_line(run("similar", photos / "img001.jpg", "--index", ix, code=7)) == line
    assert _one_line(run("info", "--index", ix, code=7)) == line
    run("verify", "--skip-model", "--index", ix, code=7)  # SQLite's integrity check finds the meta key's index off


def test_verify_names_a_missing_model_key_of_an_index_with_rows(indexed_images):
    """The key gone with its index entry sound (SQLite's check passes): verify said "the index was never built"."""
    _, ix = indexed_images(12)
    conn = sqlite3.connect(ix / "catalog.db")
    with conn:
        conn.execute("UPDATE meta SET key = 'mndel' WHERE key = 'model'")
    conn.close()
    assert "its meta table records no model, yet the index holds 12 indexed images" in \
        run("verify", "--skip-model", "--index", ix, code=7).output
    run("query", "red circle", "--index", ix, code=7)


def test_an_index_with_nothing_encoded_is_still_no_index():
    """The decision: no model and nothing a run writes after recording it is a new index (exit 3 stays)."""
    assert state.unrecorded_model(state.IndexState(), 0, False) is None
    assert state.unrecorded_model(state.IndexState(), 3, False).endswith("holds 3 indexed images")
    assert "an ANN index" in state.unrecorded_model(state.IndexState(), 0, True)


def test_similar_of_a_file_whose_name_entry_is_flipped_is_damage(indexed_images):
    photos, ix = indexed_images(12)
    db = ix / "catalog.db"
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    page = conn.execute("PRAGMA page_size").fetchone()[0]
    root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'sqlite_autoindex_files_1'").fetchone()[0]
    conn.close()
    data = db.read_bytes()
    at = data.find(b"img001.jpg", (root - 1) * page, root * page)  # the entry of the unique index of names
    assert at > 0
    _flip_at(db, at + len(b"img00"))  # the entry now reads img000.jpg; the row itself is sound
    line = _one_line(run("similar", photos / "img001.jpg", "--index", ix, code=7))  # exit 6 before
    assert line == ("error: catalog.db is damaged: its index of names does not hold the row of img001.jpg: "
                    "run `alignsearch verify`")
    assert "sqlite_autoindex_files_1" in run("verify", "--skip-model", "--index", ix, code=7).output


def test_similar_of_a_file_whose_rows_own_name_is_flipped_is_damage(indexed_images):
    """The other copy: the row's name flipped, its index entry sound (the entry finds the row under another name)."""
    photos, ix = indexed_images(12)
    flip_in_table_page(ix / "catalog.db", "files", b"img001.jpg", len(b"img00"))  # the row reads img000.jpg
    line = _one_line(run("similar", photos / "img001.jpg", "--index", ix, code=7))
    assert line.startswith("error: catalog.db is damaged: the name in the row of file ")


def test_similar_of_a_file_whose_status_is_flipped_is_damage(indexed_images):
    """file_at asks status = 'indexed': the file's own row read 'indexod' was "not an indexed image" (exit 6), though
    a search refuses such a row (tests/test_catalog_flips.py)."""
    photos, ix = indexed_images(12)
    db = ix / "catalog.db"
    data = db.read_bytes()
    name = data.find(b"img001.jpg")
    while b"indexed" not in data[name : name + 200]:  # the row's own cell (the index's entry holds no status)
        name = data.find(b"img001.jpg", name + 1)
    _flip_at(db, data.find(b"indexed", name) + len(b"index"))  # 'indexdd'
    line = _one_line(run("similar", photos / "img001.jpg", "--index", ix, code=7))  # exit 6 before
    assert line.startswith("error: catalog.db is damaged: 1 statuses are not 'indexed' or 'failed'")


@pytest.mark.parametrize("at", [1, -3])  # the key ("rnots"), a letter of the root's name ("photns")
def test_similar_under_a_flipped_roots_record_is_damage(indexed_images, at):
    """The meta table's list of roots flipped: no listed root held the file, so `similar FILE` said "not an indexed
    image" (exit 6) and verify said ok."""
    photos, ix = indexed_images(12)
    db = ix / "catalog.db"
    needle = b'roots["' + str(photos).encode() + b'"]'
    start = db.read_bytes().find(needle)
    assert start > 0
    _flip_at(db, start + (at if at > 0 else len(needle) + at))
    line = _one_line(run("similar", photos / "img001.jpg", "--index", ix, code=7))  # exit 6 before
    assert line == (f"error: catalog.db is damaged: it holds files of {photos}, which its meta table does not list as "
                     "roots: restore the index from a backup, or index the folders again into a new index")
    said = run("verify", "--skip-model", "--index", ix, code=7).output  # ok (exit 0) before, of the root's name
    # the key's flip leaves the meta table's own index off, which SQLite's check reports first
    assert ("sqlite_autoindex_meta_1" if at > 0 else "which its meta table does not list as roots") in said


@pytest.mark.slow
def test_a_flipped_vector_address_is_damage_not_another_files_score(indexed_images):
    """The catalog flip sweep: a flipped byte of img009's vec_row (outside the row digest, which compaction would
    rewrite per row) made `similar` rank img009 #7 by another file's vector and `query` show another similarity,
    exit 0; only verify noticed. Its seal (files.vec_seal) no longer matches: each command says damage, one line."""
    photos, ix = indexed_images(12)
    intact = run("similar", photos / "img009.png", "--index", ix).output
    written, read = flip_vector_address(ix / "catalog.db", "img009.png")
    assert read == written ^ 1
    for args in (("similar", photos / "img009.png"), ("query", "a photo")):
        line = _one_line(run(*args, "--index", ix, code=7))  # exit 0 before, another file's vector scored
        assert line.startswith("error: catalog.db is damaged"), line
    # verify names the row (catalog.off_digest) and --repair reads the file again: the answer is the intact one
    assert "the rows of 1 files are not as written" in run("verify", "--skip-model", "--index", ix, code=7).output
    run("verify", "--repair", "--index", ix)
    assert run("similar", photos / "img009.png", "--index", ix).output == intact



@pytest.mark.slow
def test_verify_repair_counts_a_file_with_a_flipped_address_once(indexed_images):
    """A flipped vector address is off its seal (off_digest) and misplaced (another vector than the ANN index holds):
    --repair told it twice, "forgot 1 files whose vectors were lost" and "forgot 1 files whose rows failed their
    checksum" (a re-encode that failed: "the 2 forgotten files"), for the one file it forgot and encoded again."""
    photos, ix = indexed_images(12)
    flip_vector_address(ix / "catalog.db", "img009.png")
    said = run("verify", "--repair", "--index", ix).output
    assert "forgot 1 files whose rows failed their checksum" in said and "re-encoded 1 files" in said, said
    assert "whose vectors were lost" not in said, said

@pytest.mark.slow
@pytest.mark.parametrize("seal", ["1e300", "'x'", "NULL"])
def test_a_seal_no_writer_stores_is_off_its_address_for_every_reader(indexed_images, seal):
    """A vector address's seal that is no integer: a REAL past int64 made a filtered query (search/columns.py loads
    every seal into numpy) die on OverflowError, exit 1, and text there said 'restore the index from a backup' where
    an unfiltered query said verify --repair. Every reader now says the row is off its checksum, and --repair mends it."""
    photos, ix = indexed_images(12)
    conn = sqlite3.connect(ix / "catalog.db")
    conn.execute(f"UPDATE files SET vec_seal = {seal} WHERE relpath = 'img005.jpg'")
    conn.commit()
    conn.close()
    for args in (("query", "a photo", "--where", "width > 1"), ("query", "a photo")):
        line = _one_line(run(*args, "--index", ix, code=7))
        assert line.startswith("error: catalog.db is damaged") and "verify --repair" in line, (args, line)
    run("verify", "--repair", "--index", ix)
    run("query", "a photo", "--where", "width > 1", "--index", ix)


def test_readdress_moves_seals_and_keeps_a_damaged_address_found(indexed_images):
    """catalog.readdress (a compaction's shift of a range) moves each seal with its address in SQL: the sound rows
    stay sealed, and a flipped address is not sealed anew from what it reads."""
    from alignsearch.storage import rowdigest

    _, ix = indexed_images(12)
    db = ix / "catalog.db"
    flip_vector_address(db, "img009.png")
    engine = catalog.connect(db)
    try:
        with engine.begin() as conn:
            catalog.readdress(conn, 0, 2**40, 7)
            rows = conn.exec_driver_sql("SELECT relpath, vec_row, vec_seal FROM files").all()
    finally:
        engine.dispose()
    assert {name for name, address, seal in rows if rowdigest.seal(address) != seal} == {"img009.png"}


def test_the_vector_address_seal_moves_with_its_address_and_tells_a_flipped_byte():
    """readdress shifts seals by seal_shift in SQL: the seal of an address moved is the seal of the new address, and
    no single flipped byte of an address keeps its seal (the prime divides no k * 256**j, 0 < |k| < 256)."""
    from alignsearch.storage import rowdigest

    for address in (2, 300, 5 << 32 | 77, 2**62 + 12345):
        for shift in (-2, 1, -(1 << 32), 10**12):
            if address + shift >= 0:
                moved = (rowdigest.seal(address) + rowdigest.seal_shift(shift)) % rowdigest.SEAL_PRIME
                assert moved == rowdigest.seal(address + shift)
        for byte in range(8):
            for bit in range(8):
                assert rowdigest.seal(address ^ (1 << (8 * byte + bit))) != rowdigest.seal(address)
    assert rowdigest.seal(None) is None


def test_similar_of_a_file_never_indexed_is_still_not_an_indexed_image(indexed_images):
    from PIL import Image

    photos, ix = indexed_images(12)
    Image.new("RGB", (40, 40), "red").save(photos / "new.png")  # under the root, since the last run
    assert "is not an indexed image" in _one_line(run("similar", photos / "new.png", "--index", ix, code=6))


@pytest.mark.parametrize("damage", ["fingerprint", "key"])
def test_a_server_says_the_damage_a_command_says(indexed_images, damage):
    """A server open before the damage: its next search re-reads the meta table (a new generation) and answers the
    line `query` prints, as its 500 (the index is damaged)."""
    import alignsearch
    from helpers import call

    from alignsearch.surfaces.server import ServerConfig, start_in_thread

    _, ix = indexed_images(12)
    engine = alignsearch.open(ix, device="cpu")
    server = start_in_thread(engine, ServerConfig(port=0, no_token=True))
    try:
        assert call(server.url, "/api/search?q=red&k=3", token=None)[0] == 200
        record = json.loads(_meta(ix)["model"])
        conn = sqlite3.connect(ix / "catalog.db")
        with conn:
            if damage == "fingerprint":  # as a flipped byte reads: another fingerprint, the digest as written
                conn.execute("UPDATE meta SET value = ? WHERE key = 'model'",
                             (json.dumps({**record, "fingerprint": "3" + record["fingerprint"][1:]}),))
            else:
                conn.execute("UPDATE meta SET key = 'mndel' WHERE key = 'model'")
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('generation', '1')")  # a fresh index: 0
        conn.close()
        status, _, body = call(server.url, "/api/search?q=red&k=3", token=None)
    finally:
        server.shutdown()
        engine.close()
    line = _one_line(run("query", "red circle", "--index", ix, code=7))
    assert status == 500 and line.replace("error: ", "the index is damaged: ", 1) in body.decode(), body


@pytest.mark.slow
def test_a_flipped_cell_pointer_of_a_photos_page_is_damage_not_a_missing_date(indexed_images, monkeypatch):
    """The flip sweep's photos cases: the lowest bit of a photos page's cell pointer flipped, the cell read one byte
    off, so a photo's row (and a neighbour's, the b-tree's order broken) is absent to a seek: `query` showed those
    photos' dates as none, exit 0 (the digest is of a row read; none was read). Each pointer of the page in turn:
    the intact answer, or exit 7 with one line; never another answer with exit 0."""
    root, ix = indexed_images(12)
    db = ix / "catalog.db"
    args = ["query", "red circle", "--index", ix, "--json", "-k", 12]
    checks = []
    real_check = catalog.integrity_problems
    monkeypatch.setattr(catalog, "integrity_problems", lambda path, table=None: checks.append(path) or real_check(path, table))
    intact = run(*args).output
    assert checks == []  # the intact catalog's query runs no integrity check: every hit has its photo row
    original = db.read_bytes()
    (start, head, pointers_end, _, _), = catalog_pages(db)["photos"]
    outcomes = []
    for at in range(head + 9, pointers_end, 2):  # each pointer's low byte (the page header is 8 bytes: a leaf)
        _flip_at(db, at)
        result = run(*args, code=None)
        db.write_bytes(original)
        outcomes.append("same" if (result.exit_code, result.output) == (0, intact) else
                        "refused" if result.exit_code == 7 and len(result.output.strip().splitlines()) == 1 else
                        f"exit {result.exit_code}: {result.output[:80]}")
    assert set(outcomes) <= {"same", "refused"}, outcomes
    assert "refused" in outcomes  # the sweep's cases are among them


def test_a_stopped_runs_pending_vectors_are_scored_at_sealed_addresses_only(tmp_path):
    """The files a stopped run committed and the ANN index lacks are scored exactly at the addresses live_pairs reads
    (engine Snapshot.pending), on a path that loads no snapshot columns: a flipped address, its seal kept, scored
    another file's vector under this name and the file that matched best was left out, exit 0."""
    import os

    import numpy as np

    import alignsearch
    from helpers import vector_index
    from alignsearch.storage import catalog

    store = vector_index(tmp_path, 64, 16)
    mine = store.get(np.array([7]))[0].astype(np.float32)
    far = int(np.argmin(store.get(np.arange(64)).astype(np.float32) @ mine))  # the vector least like its own
    db = catalog.connect(tmp_path / "catalog.db")
    with db.begin() as conn:
        conn.exec_driver_sql("UPDATE files SET vec_row = ? WHERE vec_row = 7", (far,))  # no writer's seal
        # a run that stopped before its ANN index: this process began after it did, so it is not the run
        state.write(conn, index_run=state.IndexRun(started=0.0, pid=os.getpid()))
    db.dispose()
    with pytest.raises(IndexDamagedError, match="checksum"):
        alignsearch.open(tmp_path).search_vector(mine, k=1)  # another file answered, exit 0



@pytest.fixture
def hidden_photo(tmp_path):
    """An engine over an index where a flipped cell pointer of the photos page hides one file's photo row."""
    from helpers import hide_a_photo_row, vector_index
    from alignsearch.search.engine import open as open_index

    vector_index(tmp_path, 24, 8)
    hide_a_photo_row(tmp_path)
    engine = open_index(tmp_path)
    yield engine
    engine.close()


def test_export_calls_a_photo_row_a_damaged_page_hides_damage(hidden_photo):
    """Export reads photo fields as a search's hits do (Engine.photos_of): a row a flipped cell pointer hides was
    exported as a photo with no date or caption, exit 0 (the query path ran SQLite's check of the photos table)."""
    from alignsearch.search.export import batches

    with pytest.raises(IndexDamagedError, match="catalog.db is damaged"):
        list(batches(hidden_photo))


@pytest.mark.slow
def test_the_landing_page_calls_a_photo_row_a_damaged_page_hides_damage(hidden_photo):
    """The server's landing page (recent) too: the file was listed with no date or caption."""
    from alignsearch.surfaces.server import Library, ServerConfig

    with pytest.raises(IndexDamagedError, match="catalog.db is damaged"):
        Library(hidden_photo, ServerConfig()).recent(0, 100)


@pytest.mark.slow
def test_verify_repair_names_the_rows_of_a_flipped_file_gone_from_disk(indexed_images):
    """A flipped vector address whose file was also deleted: --repair forgot the row and the run after found nothing to
    encode, and its report said "re-encoded 0 files" without naming the row it dropped."""
    photos, ix = indexed_images(12)
    flip_vector_address(ix / "catalog.db", "img009.png")
    (photos / "img009.png").unlink()
    said = run("verify", "--repair", "--index", ix).output
    assert "repaired: re-encoded 0 files; dropped the rows of 1 files gone from disk" in said.splitlines(), said
    assert "img009.png" not in run("query", "a photo", "--index", ix, "-k", "20").output


@pytest.mark.slow
@pytest.mark.parametrize("as_json", [False, True])
def test_info_says_a_flipped_vector_address_beside_its_figures(indexed_images, as_json):
    """`info` on a catalog with a flipped vector address printed its figures (a row fewer in use: the flipped address
    named another file's row) and exited 0, where every reader of the addresses says damage, exit 7. It shows its
    figures still (a status display) and says the damage in one line, exit 7, naming `verify --repair`."""
    _, ix = indexed_images(12)
    flip_vector_address(ix / "catalog.db", "img009.png")
    result = run("info", "--index", ix, *(["--json"] if as_json else []), code=7)  # exit 0 before, the damage unsaid
    assert result.stderr.strip() == ("error: catalog.db is damaged: 1 vector addresses are not those written (their "
                                     "seal differs), so the counts above may be off: run `alignsearch verify --repair`")
    if as_json:
        assert json.loads(result.stdout)["damaged_addresses"] == 1
    else:
        assert "images:  12 indexed, 0 failed" in result.stdout.splitlines(), result.stdout
    run("verify", "--repair", "--index", ix)
    assert json.loads(run("info", "--json", "--index", ix).stdout)["damaged_addresses"] == 0


def test_verify_repair_reads_the_names_of_any_number_of_forgotten_files(tmp_path):
    """--repair reads the names of the files it forgets (verify._keys) in one IN list: past SQLite's limit on bound
    variables (32766 in most builds: a damaged vector file's worth of files) the repair failed, nothing mended. Read
    in chunks, as every other lookup by ids is (the limit lowered here to stand for it)."""
    from helpers import vector_index

    from indexer import verify

    vector_index(tmp_path, 1200, 4)
    db = catalog.connect(tmp_path / "catalog.db")
    try:
        with db.connect() as conn:
            conn.connection.dbapi_connection.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 500)
            assert verify._keys(conn, list(range(1, 1201))) == {("/synthetic", f"{i:07d}.jpg") for i in range(1200)}
    finally:
        db.dispose()
