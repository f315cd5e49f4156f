"""`alignsearch verify`: do catalog, vector store, FAISS index and model agree? `--repair` mends what it can.

What is checked, each against what the writer recorded when it committed:
- catalog.db: SQLite's own integrity check (every page and index of the database), and FTS5's check of the
  keyword index (catalog.keyword_problems: SQLite reads FTS5 in integrity_check only from 3.44);
- the vector store: every committed batch of rows re-hashed (catalog.vector_chunks), files cut short,
  rows past the commits, segment files nobody knows, files pointing at no committed row;
- the ANN index: its layout's files against their recorded checksums (alignsearch/storage/layout.py: check),
  then its ids against the catalog;
- the model: it still loads and has the recorded fingerprint (unless --skip-model);
- the records of files a fill step could not read (catalog.fill_failures): each names an indexed file and a fill step.

An `index` run stopped part way (Ctrl-C, kill -9) is a normal state, not damage: its committed files are kept and
searched exactly until the next run builds their ANN entries (a run still at work: when it ends) (the engine merges them into every search's candidates;
a first run's: no ANN index exists yet), and what it left past its commits the next run cuts. While the
state records such a run (state.IndexRun, removed when a run ends), those findings are notes, not problems, and
--repair leaves them to `index`; the same findings after a finished run are damage.

--repair cuts what was never committed, forgets the files whose vectors were lost and encodes them
again (only them), rebuilds the ANN index from the stored vectors, writes a damaged keyword index again
from what it is made of, drops fill failure records that name no indexed file or no fill step, and writes
a row's kept name bytes (a name that is not UTF-8) again from its key where they no longer spell it and the key is
lossless (sources.key_name). A file whose row or photo fields fail their digest (catalog.off_digest: a flipped
byte in a caption, a camera, a width) is forgotten and indexed again from the file. A photos row of no file whose digest fails
with its own key (catalog.photo_keys_off: a flipped bit of its key, schema 21) is dropped, and the next `index` run
reads its file's photo fields again. A photos row off the seal the filter columns check (catalog.photo_seals_off, schema
23) whose fields hold their digest is sealed again, as is a files row off the seal of its width, height, size and
mtime (catalog.file_seals_off, schema 24). A damaged catalog cannot be mended from what is left: it says how to rebuild the index
from its folders.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sqlalchemy import select

from alignsearch.storage import ann, catalog, layouts, migrate, state, vectors
from alignsearch.storage.paths import ANN_FILE, DB_FILE
from alignsearch.errors import AlignSearchError, IndexDamagedError, IndexNotFoundError
from alignsearch.storage.vectors import VectorStore
from indexer.build import sync_index
from indexer.lock import LOCK_FILE, LOCK_TURN, WATCH_LOCK, lock_trouble, writer_lock, writer_running

log = logging.getLogger(__name__)


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # expected states (an interrupted run's leftovers): not problems
    checked: dict = field(default_factory=dict)
    ann_damaged: bool = False
    catalog_damaged: bool = False
    keywords_damaged: bool = False
    dangling_fill_failures: int = 0  # fill failure rows that name no indexed file
    unknown_step_fill_failures: int = 0  # fill failure rows that name no fill step (catalog.FILL_STEPS)
    malformed_phashes: int = 0  # perceptual hashes not in the form a writer stores: --repair drops them
    misspelled_names: int = 0  # rows whose kept name bytes are not their lossless key's: --repair writes them again
    linked_vectors: list[str] = field(default_factory=list)  # vector files that are symlinks: --repair copies them
    leftover_rows: int = 0  # tags, hashes, photo fields, keywords of files no longer in the catalog: --repair drops them
    split_keywords: list[int] = field(default_factory=list)  # keyword rows cut at an invisible character: rewritten
    misplaced: list[int] = field(default_factory=list)  # files whose vector address names another file's vector
    incomplete_videos: list[int] = field(default_factory=list)  # moments of videos that lost one: encoded again
    off_digest: list[int] = field(default_factory=list)  # files whose shown fields fail their digest: read again
    photo_keys_off: list[int] = field(default_factory=list)  # photos rows of no file off their digest: dropped
    seals_off: list[int] = field(default_factory=list)  # photos rows off their field seal, digest held: sealed again
    file_seals_off: list[int] = field(default_factory=list)  # files rows off their field seal, digest held: the same
    read: tuple | None = None  # what the catalog said of the vectors and the ANN index when it was read (_written)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {"ok": self.ok, "problems": self.problems, "repaired": self.repaired, "notes": self.notes,
                "checked": self.checked}


def verify(index_dir: Path, repair: bool = False, check_model: bool = True) -> Report:
    report = _check(index_dir, check_model)
    if repair and (report.problems or report.leftover_rows or report.split_keywords):
        fixed = _repair(index_dir, report)
        report = _check(index_dir, check_model)
        report.repaired = fixed
    return report


CHECK_TRIES = 3  # a check that found problems while writers committed is done again, at most this often


def _check(index_dir: Path, check_model: bool) -> Report:
    """The index's problems. A writer that commits while the check reads (an `index`, a watch's run) moves the
    vectors or the ANN index past what the check read of the catalog: problems found then are looked at again."""
    for _ in range(CHECK_TRIES - 1):
        r = _check_once(index_dir, check_model)
        if not r.problems or r.read is None or r.read == _written(index_dir):
            return r
        log.info("a writer committed while the index was checked: checked again")
    return _check_once(index_dir, check_model)


def _written(index_dir: Path) -> tuple | None:
    """What the catalog says now of the vectors and the ANN index (the generation, the store, the published ANN)."""
    db = catalog.connect(index_dir / DB_FILE, readonly=True)
    try:
        with db.connect() as conn:
            st = state.read(conn)
        return st.generation, st.vectors, st.ann
    finally:
        db.dispose()


def _check_once(index_dir: Path, check_model: bool) -> Report:
    r = Report()
    side = catalog.side_file_problems(index_dir / DB_FILE)
    if side:  # SQLite opens the catalog through none of them (or for reading only): nothing else can be checked;
        # not catalog damage (the catalog may be sound), and --repair, which cannot open it either, says so in one line
        r.problems += side
        return r
    damage = catalog.integrity_problems(index_dir / DB_FILE)
    if damage:
        r.problems += damage
        r.catalog_damaged = True
        return r
    keywords = catalog.keyword_problems(index_dir / DB_FILE)  # derived data: --repair writes it again
    r.problems += keywords
    r.keywords_damaged = bool(keywords)
    db = catalog.connect(index_dir / DB_FILE, readonly=True)
    try:
        with db.connect() as conn:
            # one read transaction: every read below sees one commit (statements read one each: the store's rows
            # before a writer's commit and its checksums after it were "committed vector rows missing")
            conn.exec_driver_sql("BEGIN")
            r.dangling_fill_failures = catalog.count_dangling_fill_failures(conn)
            if r.dangling_fill_failures:  # harmless to searches, but no run drops them: --repair does
                r.problems.append(f"{r.dangling_fill_failures} records of files a fill step could not read name "
                                  "no indexed file")
            r.unknown_step_fill_failures = catalog.count_dangling_fill_failures(conn, unknown_step=True)
            if r.unknown_step_fill_failures:  # `index` and `info` leave them out; --repair drops them
                r.problems.append(f"{r.unknown_step_fill_failures} records of files a fill step could not read name "
                                  f"no fill step ({', '.join(catalog.FILL_STEPS)})")
            leftover = catalog.leftover_rows(conn, keywords=not r.keywords_damaged)
            r.leftover_rows = sum(leftover.values())
            unreadable = catalog.unreadable_tables(conn)
            # a photos row of no file that fails its digest is not an old version's leftover: a flipped bit of its
            # key moved it off its file (rowdigest.PHOTO_KEY), whose photo fields readers then missed
            r.photo_keys_off = catalog.photo_keys_off(conn) if leftover.get("photos") and not unreadable else []
            if r.photo_keys_off:
                r.problems.append(f"{len(r.photo_keys_off)} photo rows name no file, their key not the one written "
                                  "(it fails their checksum): `alignsearch verify --repair` drops them, and the next "
                                  "`alignsearch index` reads their files' photo fields again")
                leftover = {table: n - (len(r.photo_keys_off) if table == "photos" else 0)
                            for table, n in leftover.items()}
                leftover = {table: n for table, n in leftover.items() if n}
            if leftover:  # harmless (every reader joins files), so a note, not damage: alignsearch before d819991
                # left a removed file's hashes behind and an upgraded index failed verify for it; --repair drops them
                r.notes.append(f"{sum(leftover.values())} rows name no file of the catalog ("
                               + ", ".join(f"{table}: {n}" for table, n in leftover.items())
                               + "): no answer shows them; `alignsearch verify --repair` drops them")
            if unreadable:  # every reader refuses such a catalog, and every read below would fail on it
                r.problems += unreadable
                r.catalog_damaged = True
                return r
            r.split_keywords = [] if r.keywords_damaged else catalog.format_split_keywords(conn)
            if r.split_keywords:  # searches answer, but miss these words: a note, as an older writer's rows are
                r.notes.append(f"the keyword rows of {len(r.split_keywords)} files hold zero-width or other "
                               "invisible characters (written before keyword search dropped them), which cut their "
                               "words: a caption `sun<U+200B>set` is not found by `sunset`; `alignsearch verify "
                               "--repair` writes them again")
            malformed, names = catalog.malformed_values(conn), catalog.misspelled_names(conn)
            mendable = catalog.mendable_names(conn) if names and not malformed else None  # a read only then
            if malformed or names:  # numbers or name bytes no writer stores, and every check below trips on them:
                # name bytes are mended from their keys where those are lossless; nothing else is there to mend from
                r.misspelled_names = len(mendable or ())
                r.problems += malformed + [f"{line}: `alignsearch verify --repair` writes them again from their keys"
                                           if r.misspelled_names else line for line in names]
                r.catalog_damaged = not r.misspelled_names
                return r
            r.off_digest = catalog.off_digest(conn)
            if r.off_digest:  # a flipped byte in a caption, camera, width...: readers refuse them (rowdigest.py)
                r.problems.append(f"the rows of {len(r.off_digest)} files are not as written (their fields fail their "
                                  "checksum): `alignsearch verify --repair` reads those files again")
            # a photos row off the seal the filter columns check (schema 23) whose fields hold their digest: the seal
            # alone is damaged (a row off its digest is read again, above)
            r.seals_off = sorted(set(catalog.photo_seals_off(conn)) - set(r.off_digest))
            if r.seals_off:
                r.problems.append(f"the photo rows of {len(r.seals_off)} files are off the seal filters check (their "
                                  "fields hold their checksum): `alignsearch verify --repair` seals them again")
            r.file_seals_off = sorted(set(catalog.file_seals_off(conn)) - set(r.off_digest))  # the same, schema 24
            if r.file_seals_off:
                r.problems.append(f"the rows of {len(r.file_seals_off)} files are off the seal filters check of their "
                                  "width, height, size and mtime (their fields hold their checksum): `alignsearch "
                                  "verify --repair` seals them again")
            r.incomplete_videos = catalog.incomplete_videos(conn)
            if r.incomplete_videos:  # moments are committed whole per video: a gap is a row lost to damage
                videos = len(set(catalog.video_keys(conn, r.incomplete_videos).values()))
                r.problems.append(f"{videos} videos lack some of their moments (never read again as they stand)")
            r.malformed_phashes = len(catalog.malformed_phashes(conn))
            if r.malformed_phashes:  # dupes and --collapse refuse them; the hash fill takes them again once dropped
                r.problems.append(f"{r.malformed_phashes} perceptual hashes are not in the form alignsearch writes")
            st = state.read(conn)
            if st.model is None:
                damage = state.unrecorded_model(st, catalog.counts(conn).get(catalog.INDEXED, 0),
                                                layouts.pick(index_dir, st.ann).exists())
                r.problems.append(damage or "no model recorded: the index was never built")
                return r
            model = st.model.record
            # a flipped byte of the meta table's roots: `similar FILE` refuses (exit 7), said here too; an unfinished
            # run's rows are left unjudged, as its rows missing from the ANN index are a note
            unlisted = [] if st.index_run is not None else catalog.unlisted_roots(conn, st.roots.roots)
            if unlisted:
                r.problems.append(catalog.unlisted_problem(unlisted))
            store = vectors.load(conn, index_dir, st.model.dim)
            live = catalog.live_pairs(conn, check_seals=False)  # off_digest above judged the seals: a problem, not a refusal
            # images counts files, a video once whatever its moments, as `info` does (README: Video); live has
            # a row per vector (a video's moments each), which verify printed as images (6 for 3 photos and a
            # video of 3 moments, where info said 4)
            indexed = catalog.counts(conn)[catalog.INDEXED]
            found = vectors.check(conn, store, live)
            record, unfinished = st.ann, st.index_run is not None
            r.read = (st.generation, st.vectors, st.ann)
    finally:
        db.dispose()
    writing = writer_running(index_dir)  # then rows past the commits, and new segment files, are in flight
    for name, who in ((LOCK_FILE, "every writer"), (WATCH_LOCK, "every `index --watch`"), (LOCK_TURN, "every writer")):
        trouble = lock_trouble(index_dir / name)
        if trouble:  # --repair leaves it (it cannot take write.lock either): removing what another process may be
            # replacing is not safe
            r.problems.append(f"{name} is {trouble}, not the lock file alignsearch makes: {who} refuses the index "
                              "until it is removed (verify --repair leaves it: remove it yourself)")
    r.checked.update(images=indexed, vectors_indexed=len(live), vector_segments=len(store.numbers()), vector_rows_hashed=found.rows_hashed,
                     vector_rows=sum(store.committed(s) for s in store.numbers()), writer_running=writing,
                     last_run=last_run(unfinished, writing))
    interrupted = r.checked["last_run"] == "interrupted"
    # what a run stopped part way leaves is the next run's to finish: noted, not counted as damage
    leftover = r.notes if interrupted else r.problems
    r.problems += found.problems
    r.linked_vectors = [p.name for p in store.linked()]
    if r.linked_vectors:  # readers follow them (the rows are checksummed); a writer would write into the target
        r.problems.append(f"{', '.join(r.linked_vectors)}: a symbolic link where the index keeps its vectors (writers "
                          "refuse to write through it; --repair copies the file it names into its place)")
    if found.legacy_segments:
        r.problems.append(f"{len(found.legacy_segments)} vector files were written before checksums were recorded: "
                          "`alignsearch index` or `verify --repair` records them")
    if not writing:
        for segment in store.numbers():
            path, rows = store.segment_path(segment), store.committed(segment)
            size = _size(path)
            if size > rows * store.row_bytes:
                leftover.append(f"{path.name} has {size - rows * store.row_bytes} uncommitted bytes past row {rows}")
            elif size < rows * store.row_bytes and not cut_reported(found, store, segment, size // store.row_bytes):
                # readers map the committed rows and refuse a shorter file: said here where no checksum names the
                # missing rows (a flipped count); where one does, vectors.check said it ("is truncated")
                r.problems.append(f"{path.name} is shorter than its committed rows ({rows} committed, "
                                  f"{size // store.row_bytes} in the file)")
        unknown = store.unknown_files()
        if unknown:
            leftover.append(f"{len(unknown)} vector segment files the catalog does not know (left by a run killed "
                            "part way: encoder actors before their first commit, or a compaction or re-encode after "
                            "its switch; the next `index` run deletes them)")
    if interrupted:
        r.notes.insert(0, "the last index run was interrupted before it finished: what it committed is kept and "
                          "searchable, and `alignsearch index` finishes it")
    index = _open_ann(index_dir, record, writing, r, unbuilt_ok=unfinished)
    if index is not None:
        ids = ann.stored_ids(index)
        r.checked.update(index_vectors=len(ids), index_type=ann.describe(index).kind)
        if index.d != store.dim:
            r.problems.append(f"index dimension {index.d} differs from the model's {store.dim}")
        if len(ids) != len(np.unique(ids)):
            r.problems.append(f"{len(ids) - len(np.unique(ids))} ids appear twice in the index")
        missing, extra = np.setdiff1d(live[:, 0], ids), np.setdiff1d(ids, live[:, 0])
        if len(missing) and unfinished:  # committed by a run that has not (yet) built their ANN entries
            # a stopped run's: the engine scores them exactly meanwhile and merges them into every search
            # (Snapshot.pending); a run at work's join the ANN index when it ends (read on each commit, they cost
            # every query a catalog scan per batch)
            r.notes.append(f"{len(missing)} files committed since the ANN index was built are "
                           + ("found by searches when the run at work finishes" if writing else
                              "searched exactly until `alignsearch index` finishes the run"))
        elif len(missing):
            r.problems.append(f"{len(missing)} indexed files are missing from the ANN index")
        if len(extra):
            r.problems.append(f"{len(extra)} ANN ids name no indexed file")
        # compared only with a sound store: rows that fail their checksum or are missing are reported above
        r.misplaced, compared = [], 0
        if not found.problems and not found.legacy_segments:
            r.misplaced, compared = _misplaced(index, live, store)
        r.checked["addresses_compared"] = compared
        if r.misplaced:
            r.problems.append(f"{len(r.misplaced)} indexed files' vector addresses name another vector than the ANN "
                              "index holds for them (queries would answer with the wrong file)")
    if check_model:
        from alignsearch.encoders.model import load_recorded

        try:
            r.checked["model_fingerprint"] = load_recorded(model, None, "cpu").fingerprint
        except AlignSearchError as exc:
            r.problems.append(f"the index's model cannot be used: {exc}".splitlines()[0])
    return r


MISPLACED_COSINE = 0.999  # a flat index's copy of a stored row: cosine >= 0.9999 (fp16 rounding)
# An IVF-PQ entry whose code is not the stored row's own: the squared distance (unit vectors) from the row to the
# code's reconstruction exceeds the row's own code's by more than this. The row's own code is the nearest per
# sub-quantizer, so a sound entry exceeds it by 0 (a CPU build) or float rounding at near-ties (a GPU build);
# another file's code exceeds it by about |a - b|^2 = 2 - 2 cos(a, b): pictures closer than cos ~0.99 pass.
MISPLACED_PQ_EXCESS = 0.02
MISPLACED_STEP = 65536  # rows read and compared at a time
# IVF-PQ entries compared per verify: every one up to this, a random sample of this many above it. Encoding a row
# costs ~256 * dim flops (~6 CPU-seconds per 65,536 rows at 640-d here): all of a million rows took minutes.
MISPLACED_PQ_SAMPLE = 131_072


def _misplaced(index, live: np.ndarray, store: VectorStore) -> tuple[list[int], int]:
    """The files whose stored vector (at the address the catalog gives) is not the one the ANN index holds
    for their id. Every vector batch and the ANN file carry checksums, but the address of each file is a plain
    catalog number: altered or swapped, a query re-ranked another file's vector under this file's path (an
    image query returned the wrong file at 1.0000) and verify said ok. A flat index holds the vectors; an
    IVF-PQ index holds a code of each, compared with the code of the stored row (_misplaced_pq). With how many
    were compared."""
    if not len(live):
        return [], 0
    rows = dict(live.tolist())
    flat = ann.flat_vectors(index)
    if flat is None:
        parts = ann.pq_entries(index) or []
        total = sum(len(ids) for _, ids, _, _ in parts)
        share = min(1.0, MISPLACED_PQ_SAMPLE / max(total, 1))  # a fresh sample each run: runs add up
        found = [_misplaced_pq(*part, rows, store, share) for part in parts]
        return [i for out, _ in found for i in out], sum(n for _, n in found)
    ids, held = flat
    known = np.array([i in rows for i in ids.tolist()], dtype=bool)
    ids, held = ids[known], held[known]
    out = []
    for start, chunk, stored in _stored_rows(ids, rows, store):
        cos = np.einsum("ij,ij->i", stored, held[start : start + len(chunk)]) / np.maximum(
            np.linalg.norm(stored, axis=1) * np.linalg.norm(held[start : start + len(chunk)], axis=1), 1e-12)
        out += chunk[cos < MISPLACED_COSINE].tolist()
    return out, len(ids)


def _stored_rows(ids: np.ndarray, rows: dict, store: VectorStore):
    """(start, ids[start:start + MISPLACED_STEP], their stored rows as float32) for each step of ids."""
    buffer = np.empty((min(MISPLACED_STEP, len(ids)) or 1, store.dim), dtype=vectors.DTYPE)
    for start in range(0, len(ids), MISPLACED_STEP):
        chunk = ids[start : start + MISPLACED_STEP]
        yield start, chunk, vectors.read_into(store, np.array([rows[i] for i in chunk.tolist()], dtype=np.int64),
                                              buffer).astype(np.float32)


def _misplaced_pq(ivf, ids: np.ndarray, lists: np.ndarray, codes: np.ndarray, rows: dict,
                  store: VectorStore, share: float = 1.0) -> tuple[list[int], int]:
    """The ids of one IVF-PQ part whose code is not the code of their stored row, and how many were compared
    (share of them, drawn at random): each row is encoded again in the list the index holds it in (no coarse
    search) and both codes decoded."""
    known = np.array([i in rows for i in ids.tolist()], dtype=bool)
    if share < 1.0:
        known &= np.random.default_rng().random(len(ids)) < share
    ids, lists, codes = ids[known], lists[known], codes[known]
    centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist) if ivf.by_residual else None
    out = []
    for start, chunk, stored in _stored_rows(ids, rows, store):
        end = start + len(chunk)
        residual = stored - centroids[lists[start:end]] if centroids is not None else stored
        held = ivf.pq.decode(np.ascontiguousarray(codes[start:end]))
        own = ivf.pq.decode(ivf.pq.compute_codes(np.ascontiguousarray(residual)))
        excess = ((residual - held) ** 2).sum(axis=1) - ((residual - own) ** 2).sum(axis=1)
        out += chunk[excess > MISPLACED_PQ_EXCESS].tolist()
    return out, len(ids)


def last_run(unfinished: bool, writing: bool) -> str:
    """finished, running (a writer holds the index now) or interrupted (an index run began and never ended), as
    `info` says it."""
    if not unfinished:
        return "finished"
    return "running" if writing else "interrupted"


def _open_ann(index_dir: Path, record: state.AnnState, writing: bool, r: Report, unbuilt_ok: bool = False):
    """The served ANN index, opened only when its layout's files carry the recorded checksums (or predate them).
    unbuilt_ok: an index run is unfinished, so an ANN index never built is its to build, not damage."""
    current = layouts.pick(index_dir, record)
    if not current.exists() and unbuilt_ok and not record.digest:
        r.notes.append(f"{ANN_FILE} was not built yet (the first index run did not finish; queries search exactly "
                       "meanwhile): `alignsearch index` builds it")
        return None
    if not current.exists():
        r.problems.append(f"{ANN_FILE} is missing" + ("" if record.digest else ": no ANN index was built yet (the "
                          "first index run did not finish; queries search exactly meanwhile): `alignsearch index` "
                          "builds it"))
        r.ann_damaged = True
        return None
    if not writing:
        try:
            damaged = current.check()
        except IndexDamagedError as exc:  # a manifest that cannot be read names no files to check
            damaged = [str(exc).split(": run")[0]]
        except PermissionError as exc:  # derived from the vectors: --repair writes it again (a fresh file)
            damaged = [f"{Path(exc.filename).name} cannot be read ({exc.strerror})"]
        if damaged:
            r.problems += damaged
            r.ann_damaged = True
            return None
    try:  # a running writer may publish meanwhile: the open is retried with the record it committed
        return layouts.open_current(index_dir, record, reread=lambda: _recorded(index_dir))
    except (RuntimeError, IndexDamagedError, IndexNotFoundError) as exc:
        r.problems.append(f"the ANN index cannot be read: {str(exc).splitlines()[0][:200]}")
        r.ann_damaged = True
        return None


def _recorded(index_dir: Path) -> state.AnnState:
    db = catalog.connect(index_dir / DB_FILE, readonly=True)
    try:
        return layouts.recorded(db)
    finally:
        db.dispose()


def _repair(index_dir: Path, report: Report) -> list[str]:
    if report.catalog_damaged:
        return []  # nothing to mend it from; the caller says how to rebuild
    done = []
    with writer_lock(index_dir):
        db = catalog.connect(index_dir / DB_FILE)
        try:
            if report.misspelled_names:
                with db.begin() as conn:  # found again under the lock: what a writer left since the check counts
                    mended = catalog.mend_names(conn, catalog.mendable_names(conn) or {})
                if mended:
                    done.append(f"wrote the name bytes of {mended} files again from their keys")
            if report.keywords_damaged:
                with db.begin() as conn:
                    catalog.rebuild_keywords(conn)
                done.append("keyword index written again from the files' captions, text, paths and tags")
            elif report.split_keywords:
                with db.begin() as conn:  # found again under the lock: a writer since the check wrote its rows right
                    split = catalog.format_split_keywords(conn)
                    catalog.refresh_keywords(conn, split)
                done.append(f"wrote the keyword rows of {len(split)} files again without zero-width or other invisible characters")
            if report.dangling_fill_failures or report.unknown_step_fill_failures:
                with db.begin() as conn:
                    dropped = catalog.forget_dangling_fill_failures(conn)
                    unknown = catalog.forget_dangling_fill_failures(conn, unknown_step=True)
                if dropped:
                    done.append(f"dropped {dropped} records of fill failures of files no longer indexed")
                if unknown:
                    done.append(f"dropped {unknown} records of fill failures of no fill step")
            if report.leftover_rows:
                with db.begin() as conn:
                    dropped = catalog.forget_leftover_rows(conn, keywords=not report.keywords_damaged)
                keys_off = len(report.photo_keys_off)  # among them: their files' fields wait for the next run's fill
                if keys_off:
                    done.append(f"dropped {keys_off} photo rows whose key was not the one written: the next "
                                "`alignsearch index` reads their files' photo fields again")
                if dropped > keys_off:
                    done.append(f"dropped {dropped - keys_off} rows of tags, hashes, photo fields or keywords of "
                                "files no longer in the catalog")
            if report.seals_off:
                with db.begin() as conn:  # found again under the lock: only rows whose digest holds are sealed
                    resealed = migrate.seal_photo_fields(conn.connection.dbapi_connection)
                if resealed:
                    done.append(f"sealed the photo rows of {resealed} files again (their fields held their checksum)")
            if report.file_seals_off:
                with db.begin() as conn:  # found again under the lock: only rows whose digest holds are sealed
                    resealed = migrate.seal_file_fields(conn.connection.dbapi_connection)
                if resealed:
                    done.append(f"sealed the rows of {resealed} files again (their width, height, size and mtime held "
                                "their checksum)")
            if report.malformed_phashes:
                with db.begin() as conn:
                    catalog.forget_phashes(conn, catalog.malformed_phashes(conn))
                done.append(f"dropped {report.malformed_phashes} damaged perceptual hashes: the next `alignsearch "
                            "index` run takes them again")
            with db.connect() as conn:
                model = state.read(conn).model
            if model is None:
                return done
            with db.connect() as conn:
                store = vectors.load(conn, index_dir, model.dim)
            cut = [store.segment_path(s).name for s in store.numbers()
                   if _size(store.segment_path(s)) > store.committed(s) * store.row_bytes]
            short = [store.segment_path(s).name for s in store.numbers()
                     if _size(store.segment_path(s)) < store.committed(s) * store.row_bytes]
            copied = store.own_linked()  # before any write: writers never write through a link
            if copied:
                done.append(f"copied the files {', '.join(copied)} linked to into their places")
            store = _held(store)
            store.truncate_uncommitted()
            with db.begin() as conn:
                # addresses off their seals are forgotten below (off_digest), not refused by live_pairs
                found = vectors.check(conn, store, catalog.live_pairs(conn, check_seals=False))
                # a row failing its digest (found again under the lock): forgotten and read again from its file,
                # never its digest written anew over what a flipped byte left
                off = catalog.off_digest(conn)
                # each file once: a flipped address is off its seal and misplaced too (told twice, as two files)
                lost = sorted({int(i) for i in (found.damaged_ids.tolist() + found.unchecked_ids.tolist()
                                                 + report.misplaced + report.incomplete_videos + off)})
                # their names, read before the rows go: the run below finds again only those still on disk
                forgotten = _keys(conn, lost)
                catalog.delete_files(conn, lost)  # forgotten: encoded again below, and only they
                for key, start, rows in found.bad:
                    vectors.forget_chunks(conn, key, start, start + 1)
                for segment in found.legacy_segments:
                    if vectors.adopt_segment(conn, store, segment):
                        raise IndexDamagedError(f"{store.segment_path(segment).name} holds damaged vectors written "
                                                "before checksums existed: re-encode with `alignsearch index --reindex`")
                vectors.save(conn, store)
            if len(lost) > len(off):  # off is in lost: the files forgotten for their vectors alone
                done.append(f"forgot {len(lost) - len(off)} files whose vectors were lost")
            if off:
                done.append(f"forgot {len(off)} files whose rows failed their checksum, to be read again")
            if found.legacy_segments:
                done.append(f"recorded checksums for {len(found.legacy_segments)} vector files written before them")
            if cut:
                done.append(f"cut {', '.join(cut)} to the committed rows")
            if short:  # _held: the rows a file holds are the committed ones (a live address past them was lost above)
                done.append(f"recorded the rows {', '.join(short)} holds as its committed rows")
            built = sync_index(db, store, index_dir / ANN_FILE, rebuild=report.ann_damaged or _has_duplicates(index_dir))
            done.append(f"ANN index {built['action']}, {built['vectors']} vectors")
        finally:
            db.dispose()
    if lost:
        done.append(_reencode(index_dir, len(lost), forgotten))
    return done


def _keys(conn, ids: list[int]) -> set[tuple[str, str]]:
    """The (root, relpath) names of these files (a video's moments: one name). Read plainly, not through the row
    checks (get_files), which refuse the very rows forgotten here for failing their checksum."""
    f, out = catalog.files.c, set()
    for start in range(0, len(ids), 500):  # as every lookup by ids: SQLite limits the variables of a statement
        out.update((root, relpath) for root, relpath in conn.execute(
            select(f.root, f.relpath).where(f.id.in_(ids[start : start + 500]))))
    return out


def _reencode(index_dir: Path, lost: int, forgotten: set[tuple[str, str]]) -> str:
    """Encode the forgotten files again: an ordinary run finds them as new (nothing else is encoded). A forgotten
    file the run found no more (deleted since it was indexed) has no row now: said, as a row dropped, for "re-encoded
    0 files" alone told nothing of the row --repair had removed."""
    from indexer.job import index_folders

    try:
        summary = index_folders([], index_dir=index_dir, device="auto")
    except AlignSearchError as exc:
        return f"could not re-encode the {lost} forgotten files ({str(exc).splitlines()[0]}): run `alignsearch index`"
    gone = len(forgotten) - _still_named(index_dir, forgotten)
    return f"re-encoded {summary.added} files" + (f"; dropped the rows of {gone} files gone from disk" if gone else "")


def _still_named(index_dir: Path, names: set[tuple[str, str]]) -> int:
    """How many of these (root, relpath) names the catalog holds a row of (indexed or failed): a lookup each in the
    unique index of names, as few as the files forgotten."""
    f = catalog.files.c
    db = catalog.connect(index_dir / DB_FILE, readonly=True)
    try:
        with db.connect() as conn:
            return sum(conn.execute(select(f.id).where(f.root == root, f.relpath == relpath).limit(1)).first()
                       is not None for root, relpath in names)
    finally:
        db.dispose()


def repair_advice(index_dir: Path) -> str:
    """What to do when the catalog itself is damaged (nothing to mend it from)."""
    roots = []
    try:
        db = catalog.connect(index_dir / DB_FILE, readonly=True)
        with db.connect() as conn:
            roots = list(state.read(conn).roots.roots)
        db.dispose()
    except Exception:  # noqa: BLE001 - the roots are a courtesy; the file may be unreadable
        pass
    where = " ".join(roots) if roots else "FOLDER..."
    return (f"catalog.db is damaged beyond repair: move {index_dir} aside and rebuild the index from its folders "
            f"with `alignsearch index {where} --index {index_dir}`")


def _has_duplicates(index_dir: Path) -> bool:
    unchecked = state.AnnState()  # read as it stands: the checksums were checked before
    if not layouts.pick(index_dir, unchecked).exists():
        return False
    try:
        ids = ann.stored_ids(layouts.open_current(index_dir, unchecked))
    except (RuntimeError, IndexDamagedError):
        return True
    return len(ids) != len(np.unique(ids))


def cut_reported(found: vectors.ChunkCheck, store: VectorStore, segment: int, held: int) -> bool:
    """Whether vectors.check reported the segment's rows past `held` missing (pure): a segment without checksums
    ("holds N rows"), or a chunk of it that reaches past them ("is truncated")."""
    key = vectors.segment_key(store, segment)
    return segment in found.legacy_segments or any(k == key and start + n > held for k, start, n in found.bad)


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _held(store: VectorStore) -> VectorStore:
    """The store as its files stand: each segment's committed rows cut to the whole rows its file holds."""
    def held(s: int) -> int:
        return min(store.committed(s), _size(store.segment_path(s)) // store.row_bytes)

    return VectorStore(store.path, store.dim, held(0), {s: (name, held(s)) for s, (name, _) in store.segments.items()})
