"""`alignsearch index --reindex`: encode every indexed file again as a new generation, never a wipe.

The new model is loaded (and so checked) before anything is written. Its vectors go to a segment of
their own (`vectors/next/<id>.f16`) and each file's new address to `pending_vectors`, committed batch by
batch with checksums, while queries go on answering from the live generation with its own model. A
killed re-encode resumes where it stopped (with the same model; another model starts it afresh). When
every file has its new vector, the ANN index of the new generation is written beside the old one
(index.faiss.next) and one transaction makes it live: files point at the new vectors, the model and
the ANN checksum are the new ones, the generation number grows. Readers notice the generation on their
next query and swap their snapshot whole (alignsearch/search/engine.py). Then the switch drops the old
generation's files as a compaction does (vectors.drop_generation): vectors.f16 emptied, every old segment
deleted, a previous switch's under vectors/next/ too. Killed before that, the next writer deletes them.
"""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import replace
from operator import itemgetter
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from sqlalchemy import delete, func, insert, select, text

from alignsearch import atomic
from alignsearch.media import sources
from alignsearch.storage import catalog, rowdigest, state, vectors
from alignsearch.storage.state import ModelIdentity, Reindex
from alignsearch.encoders.backend import CPU_MICRO_BATCH, EncoderOptions
from alignsearch.errors import IndexDamagedError
from alignsearch.storage.paths import ANN_FILE, DB_FILE, VECTORS_FILE
from alignsearch.storage.vectors import VectorStore
from indexer import build, pipeline, scan, videos, writer
from indexer.workers import workers_for

if TYPE_CHECKING:
    from alignsearch.encoders.model import Encoder

log = logging.getLogger(__name__)
NEXT_FOLDER = "next"  # under vectors/: not a live segment until the switch, so no writer deletes it


def out_of_reach(indexed: dict[str, int], kind, exists, empty) -> list[str]:
    """The roots whose indexed files (indexed: {root: files}) a re-encode could not read: a folder or shard that is
    missing, or a folder that is empty though it holds indexed files (the mount point an unplugged drive left) or
    cannot be listed. kind, exists, empty: sources.kind, sources.exists and whether a folder shows no file (empty,
    or unreadable), asked of local roots only.
    Re-encoded anyway, each of their files lost its vector (no file to read, and the old model's vector cannot
    stay beside the new model's) and was marked failed: out of every search until the drive came back."""
    out = []
    for root, n in sorted(indexed.items()):
        if n == 0 or sources.is_url(root) or kind(root) not in (sources.FOLDER, sources.TAR):
            continue  # a list's entries lie elsewhere; a URL is not asked here (each file's failure is its own)
        if not exists(root) or (kind(root) == sources.FOLDER and empty(root)):
            out.append(root)
    return out


def unreadable_within(paths: list[str], listing_error, unreadable) -> dict[str, int]:
    """The folders of reachable folder roots whose indexed files (paths, one per file) a re-encode could not read:
    {folder: files}. listing_error(folder): why it cannot be listed now (a chmod, an I/O error), None when it can or
    is gone; unreadable(path): a file that is there but cannot be read, a link whose target is gone among them (the
    photo is not deleted: its drive may be unplugged). A folder or file that is gone was deleted or moved: the run
    after the switch removes it or finds it moved, as any run does.
    The root-level check (out_of_reach) did not see these: re-encoded anyway, each such file lost its vector and
    was marked failed, while the run's own listing said the files under such a folder stayed in the index."""
    by_folder: dict[str, list[str]] = {}
    for path in paths:
        by_folder.setdefault(os.path.dirname(path), []).append(path)
    out = {}
    for folder, held in sorted(by_folder.items()):
        n = len(held) if listing_error(folder) else sum(1 for p in held if unreadable(p))
        if n:
            out[folder] = n
    return out


def load_new_model(recorded: dict, model: str | None, options: EncoderOptions) -> Encoder:
    """The model to re-encode with: the one named, else the one the index records (never the hub default)."""
    from alignsearch.encoders.loader import open_encoder

    return open_encoder(model, options, None if model else recorded, cache=False)


def reencode(db, out: Path, encoder: Encoder, store: VectorStore, workers: int, batch_size: int, fast: bool,
             on_batch=lambda n: None) -> int:
    """Encode every indexed file without a pending vector into the next generation; returns how many."""
    progress = _progress(db, encoder, store)
    pending = VectorStore(store.folder / f"{progress.segment}.f16", encoder.dim, progress.rows)
    atomic.make_folders(pending.path.parent)  # as the index folder (job.py): under umask 000 too
    vectors.fsync_dir(pending.path.parent.parent)
    pending.truncate_uncommitted()  # what a killed re-encode wrote past its last commit
    _forget_damaged(db, pending, progress)
    with db.connect() as conn:
        done = {i for (i,) in conn.execute(select(catalog.pending_vectors.c.file_id))}
        rows = [r for r in catalog.indexed_files(conn) if r.id not in done]
        intervals = {root: o["video_interval"] for root, o in state.read(conn).roots.options.items()
                     if "video_interval" in o}
    moment_rows = [r for r in rows if r.t is not None]  # read again by indexer/videos.py
    rows = [r for r in rows if r.t is None]
    ids = {(r.root, r.relpath): r.id for r in rows}
    recorded = {(r.root, r.relpath): r.sha256 for r in rows}
    todo = [scan.Found(r.root, r.relpath, r.size, r.mtime, None, r.relpath_raw) for r in rows]

    shared: dict[str, int] = {}  # content hash -> its row in the next generation, this run

    def write(batch, new_vectors, actor_rows=()) -> None:
        read = [it for it in batch if it.crop is not None]  # new_vectors: a row each
        keep = [n for n, it in enumerate(read)
                if not scan.content_changed(recorded[(it.found.root, it.found.relpath)], it.sha256)]
        for n in sorted(set(range(len(read))) - set(keep)):  # no new vector: failed at the switch (`cannot read`)
            log.warning("%s changed since it was indexed (another content, same size and mtime): it is read again "
                        "by the run after the re-encode", read[n].found.path)
        good, new_vectors = [read[n] for n in keep], new_vectors[keep]
        # Copies of one content share one row, as an index run stores them (the writer's rule); before, a
        # re-encode stored a row per copy. A resumed re-encode may store a copy's row once more: harmless.
        fresh, seen = [], set()
        for n, it in enumerate(good):
            if not it.sha256 or (it.sha256 not in shared and it.sha256 not in seen):
                seen.add(it.sha256)
                fresh.append(n)
        start = pending.append(new_vectors[fresh]) if fresh else pending.rows
        rows = {n: start + slot for slot, n in enumerate(fresh)}
        shared.update({good[n].sha256: rows[n] for n in fresh if good[n].sha256})
        with db.begin() as conn:
            if good:
                conn.execute(insert(catalog.pending_vectors), [
                    _pending_row(ids[(it.found.root, it.found.relpath)], rows[n] if n in rows else shared[it.sha256])
                    for n, it in enumerate(good)])
            vectors.record_chunk(conn, pending, 0, start, len(fresh), key=progress.segment)
            count = conn.execute(select(func.count()).select_from(catalog.pending_vectors)).scalar()
            state.write(conn, reindex=replace(progress, rows=pending.rows, done=count))

    items = pipeline.read_items(todo, encoder.spec, workers_for(workers, len(todo), batch_size), fast=fast)
    pipeline.run(items, encoder, write, batch_size, on_batch)

    def write_moments(moment_rows, new_vectors) -> None:
        start = pending.append(new_vectors)
        with db.begin() as conn:
            conn.execute(insert(catalog.pending_vectors), [_pending_row(r.id, start + n) for n, r in enumerate(moment_rows)])
            vectors.record_chunk(conn, pending, 0, start, len(moment_rows), key=progress.segment)
            count = conn.execute(select(func.count()).select_from(catalog.pending_vectors)).scalar()
            state.write(conn, reindex=replace(progress, rows=pending.rows, done=count))

    clips = videos.reencode_moments(db, encoder, moment_rows, intervals,
                                    CPU_MICRO_BATCH if encoder.device.type == "cpu" else batch_size, write_moments,
                                    on_batch, workers=workers)
    return len(todo) + clips


def _pending_row(file_id: int, vec_row: int) -> dict:
    """A pending_vectors row: the address sealed with its file id as it is written (rowdigest.pending_seal, schemas
    19 and 22), checked at the switch."""
    return {"file_id": file_id, "vec_row": int(vec_row), "vec_seal": rowdigest.pending_seal(file_id, int(vec_row))}


def _forget_damaged(db, pending: VectorStore, progress: Reindex) -> None:
    """Forget the pending vectors of a resumed re-encode that lie in committed batches whose bytes no longer match
    their checksum: their files are encoded again by this run. Nothing reads the pending rows before the switch,
    which makes them live, and the fold that follows writes a fresh checksum over what it copies: a byte flipped
    in vectors/next/ while the re-encode was stopped went live unnoticed, and verify said ok.
    Also those whose address, or file id, is off its seal (schemas 19, 22): the switch refuses them (exit 7), and this run, the way out
    it names, encodes their files again rather than trust an address that may name another file's vector."""
    with db.begin() as conn:
        # a file id out of the table's key order (read twice among them): a flipped key byte (outside the seal) made
        # one row another file's; which row SQLite's seek meets is down to the page's order, so no key of such a
        # table is trusted: all are dropped (DELETE without WHERE frees the pages whole, not seeking the keys it
        # cannot trust). First, before any other delete seeks in it.
        misread = key_problems(conn)
        if misread:
            conn.execute(delete(catalog.pending_vectors))
        damaged = vectors.changed_chunks(conn, pending, 0, key=progress.segment)
        p = catalog.pending_vectors.c
        for start, rows in damaged:
            conn.execute(delete(catalog.pending_vectors).where(p.vec_row >= start, p.vec_row < start + rows))
            vectors.forget_chunks(conn, progress.segment, start, start + 1)
        unsealed = conn.execute(delete(catalog.pending_vectors)
                                .where(p.vec_seal.is_distinct_from(rowdigest.pending_seal_of(p.file_id, p.vec_row)))).rowcount
    if damaged:
        log.warning("%s: %d rows of the re-encode in progress changed since they were written (checksum): their "
                    "files are encoded again", pending.path.name, sum(rows for _, rows in damaged))
    if misread:
        log.warning("the file ids of the re-encode in progress are not as written (SQLite: %s): all its files are "
                    "encoded again", misread[0])
    if unsealed:
        log.warning("%d vector addresses of the re-encode in progress are not those written (their seal differs): "
                    "their files are encoded again", unsealed)


def _progress(db, encoder: Encoder, store: VectorStore) -> Reindex:
    """The re-encode in progress with this model, or a new one (a different model's is discarded)."""
    with db.begin() as conn:
        progress = state.read(conn).reindex
        if progress is not None and progress.model.fingerprint == encoder.fingerprint:
            return progress
        if progress is not None:
            log.info("discarding the unfinished re-encode with %s", progress.model.name)
            _discard(conn, store, progress)
        remove_leftovers(store)
        progress = Reindex(model=ModelIdentity.from_record(encoder.describe()),
                           segment=f"{NEXT_FOLDER}/{uuid.uuid4().hex}")
        state.write(conn, reindex=progress)
        return progress


def remove_leftovers(store: VectorStore, pending: str | None = None) -> None:
    """Delete the files under vectors/next/ no commit knows: the new segment of a compaction or re-encode
    killed before its switch, or a segment whose rows a committed switch (the old generation) or fold moved
    elsewhere, left by a kill before it was deleted. pending: the segment of a re-encode in progress (known
    to its progress record, not to the store), kept."""
    live = {store.segments[n][0] for n in store.segments} | ({pending} if pending else set())
    for left in (store.folder / NEXT_FOLDER).glob("*.f16"):
        if f"{NEXT_FOLDER}/{left.stem}" not in live:
            log.info("%s: deleting a segment no commit knows (the new segment of a compaction or re-encode killed "
                     "before its switch, or one whose rows a switch or fold moved elsewhere)",
                     left.relative_to(store.path.parent))
            left.unlink()


def _discard(conn, store: VectorStore, progress: Reindex) -> None:
    conn.execute(delete(catalog.pending_vectors))
    vectors.forget_chunks(conn, progress.segment)
    state.write(conn, reindex=None)
    (store.folder / f"{progress.segment}.f16").unlink(missing_ok=True)


def switch(db, out: Path, encoder: Encoder, store: VectorStore, rebuild_options: dict) -> dict:
    """Make the re-encoded generation live (see the module's docstring); returns the ANN build's report."""
    with db.connect() as conn:
        recorded = state.read(conn)
        progress = recorded.reindex
        p = catalog.pending_vectors.c
        read = conn.execute(select(p.file_id, p.vec_row, p.vec_seal)
                            .join(catalog.files, catalog.files.c.id == p.file_id)
                            .where(catalog.files.c.status == catalog.INDEXED).order_by(p.file_id)).all()
        misread = key_problems(conn)  # every row's key, not what a join's seek meets
        generation = recorded.generation
    refuse_misread(misread)  # first: a table whose keys are out of order has no row to trust, sealed or not
    refuse_unsealed(read)
    pending = np.array([(file_id, row) for file_id, row, _ in read], dtype=np.int64).reshape(-1, 2)
    number = max(store.numbers()) + 1  # a number no reader of the old generation knows
    new = VectorStore(out / VECTORS_FILE, encoder.dim, 0, {number: (progress.segment, progress.rows)})
    live = np.stack([pending[:, 0], vectors.address(number, 0) + pending[:, 1]], axis=1) if len(pending) else pending
    old_keys = [vectors.segment_key(store, s) for s in store.numbers()]

    def commit(conn) -> None:
        f = catalog.files.c
        base = vectors.address(number, 0)
        # each address moves into the new segment with its seal (rowdigest.shifted_seal_sql), both in one lookup (a
        # row value, as compaction moves them): the seal written with the address, never one computed anew from the
        # address read, so one damaged since the check above stays found (verify, readers) rather than goes live sealed
        # the file id's term taken off (rowdigest.key_term): files.vec_seal seals the address alone
        moved = rowdigest.shifted_seal_sql("pending_vectors.vec_seal", str(base))
        key = rowdigest.key_term_sql("pending_vectors.file_id")
        seal = f"(({moved}) - {key} + {rowdigest.SEAL_PRIME}) % {rowdigest.SEAL_PRIME}"
        conn.execute(text(f"UPDATE files SET (vec_row, vec_seal) = (SELECT pending_vectors.vec_row + {base}, {seal} "
                          "FROM pending_vectors WHERE pending_vectors.file_id = files.id) WHERE status = :indexed"),
                     {"indexed": catalog.INDEXED})
        unread = [i for (i,) in conn.execute(select(f.id).where(f.status == catalog.INDEXED, f.vec_row.is_(None)))]
        catalog.mark_failed(conn, unread, "cannot read: the file could not be read again to re-encode it")
        conn.execute(delete(catalog.pending_vectors))
        for key in old_keys:
            vectors.forget_chunks(conn, key)
        vectors.save(conn, new)
        state.write(conn, model=ModelIdentity.from_record(encoder.describe()), generation=generation + 1, reindex=None)

    built = build.sync_index(db, new, out / ANN_FILE, rebuild=True, live=live, on_commit=commit, **rebuild_options)
    # every file of the old generation, under vectors/next/ too (a previous compaction's or re-encode's segment):
    # the new store lists none of them, and no reader of the new generation maps them
    vectors.drop_generation(store, f"every file is re-encoded into {new.segment_path(number).relative_to(out)}")
    return built


def refuse_unsealed(read) -> None:
    """Refuse a switch whose pending addresses ((file id, address, seal) rows) are not all those written (their seal,
    schema 19, over the file id too from 22): made live, a flipped byte of one scored another file's vector under
    this name, exit 0 (of its id: the highest id flipped onto a file not re-encoded yet). An address
    that is not an integer (a flipped type byte) is one off its seal too. The seals are checked in numpy
    (rowdigest.sealed), as live_pairs and a snapshot's columns check the files', each column taken out of the rows
    by C-level map (zip(*read) over 480k SQLAlchemy Rows was slower than the check per row in Python it replaced):
    benchmarks/bench_refuse_unsealed.py."""
    ids, rows, written = (list(map(itemgetter(n), read)) for n in range(3))
    if set(map(type, rows)) - {int} or not rowdigest.pending_sealed(_column(ids), _column(rows), _column(written)):
        raise IndexDamagedError(f"{DB_FILE} is damaged: an address of the re-encode in progress, or its file id, is not the one written "
                                "(its seal differs): run `alignsearch index --reindex` again, which encodes those "
                                "files anew")


def _column(values: list) -> np.ndarray:
    """Values read, as an array that computes and compares as Python does: int64 when every one is an int SQLite can
    hold, else objects (a NULL, text or a REAL where a seal belongs, which no seal computed equals)."""
    if set(map(type, values)) <= {int}:
        try:
            return np.fromiter(values, dtype=np.int64, count=len(values))
        except OverflowError:  # past int64 (no SQLite integer): Python's integers, as rowdigest.seal computes
            pass
    return np.array(values, dtype=object)


def key_problems(conn) -> list[str]:
    """What SQLite's own check of pending_vectors' b-tree finds wrong in it (PRAGMA integrity_check of the table,
    every row read: a C loop, not every key pulled into Python); [] when sound. file_id is the table's key (its
    rowid): a byte of it flipped since it was written reads one row as another file's, which the check sees as a key
    out of order (one read twice is too); other damage of the table's pages (a cell pointer) leaves no key trusted
    either. A flip that keeps the order (into a gap of the ids, e.g. the highest id onto a file not re-encoded yet)
    it cannot see: the row's seal does, from schema 22 (rowdigest.key_term), as it sees the others too."""
    found = [row[0] for row in conn.exec_driver_sql(f"PRAGMA integrity_check({catalog.pending_vectors.name})")]
    # its first line ("*** in database main ***") names no row
    return [] if found == ["ok"] else [problem.splitlines()[-1] for problem in found]


def refuse_misread(problems: list[str]) -> None:
    """Refuse a switch whose pending keys are not as written (key_problems): one file with two pending addresses, or
    one that reads as another's: the switch's lookup took whichever its seek met, maybe the other file's vector
    (seen: scored under this name, exit 0, verify ok after), and a file with none was marked failed."""
    if problems:
        raise IndexDamagedError(f"{DB_FILE} is damaged: the file ids of the re-encode in progress are not as written "
                                f"(SQLite: {problems[0]}): run `alignsearch index --reindex` again, which encodes its "
                                "files anew")


def fold(db, store: VectorStore) -> None:
    """Copy a small new generation into vectors.f16 (as a Ray run's segments are). fold_small_segments reads each
    row against its checksum first (ChunkChanged, nothing moved): a row damaged since the switch must not go in
    with the fresh checksum the fold records over what it copies."""
    writer.fold_small_segments(db, store, writer.FOLD_BELOW_ROWS)
