"""The video pass of `alignsearch index`: each new or changed video becomes its moments (alignsearch/media/video.py),
one catalog row and one vector each, committed in one transaction per video.

Frames are decoded in a worker process (one for the run's videos; --workers 0: a thread of this process, FFmpeg
releases the GIL while it decodes) and their moments (crop and perceptual hash, never the full-size frame) stream
into the encoder through a bounded queue, a batch of moments at a time; only the video's vectors (2.5 KB a moment
at 640-d) are held until its commit. As for photos, the vectors are appended and fsync'ed before the rows that
point at them are committed: a run killed part way through a video leaves nothing of it, and the next run reads
it again. A video that cannot be read is recorded as failed with its reason; one that breaks off part way keeps
the moments before the break. One whose decoder crashes (a segfault or an abort in a C codec) kills only the
worker: it is read once more in a fresh one, and dying again it is recorded as failed (indexer.workers.DIED),
nothing of it kept.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field

import numpy as np
from sqlalchemy import delete

from alignsearch.storage import catalog, state, vectors
from alignsearch.media import photometa, sources
from alignsearch.errors import BadImageError
from alignsearch.media.images import ImageSpec
from alignsearch.storage.vectors import VectorStore
from alignsearch.media.video import DEFAULT_INTERVAL, VideoError, VideoInfo
from indexer.decode import sidecar_caption
from indexer.scan import Found, content_changed, row_time
from indexer.videodecode import CHANGED, WARM, _open_local, decode_moments, file_identity
from indexer.workers import DIED, StreamWorker, WorkerDied, hand_over, handed_over

log = logging.getLogger(__name__)


@dataclass
class VideoStats:
    videos: int = 0
    moments: int = 0
    failed: set = field(default_factory=set)  # (root, relpath)
    reused: int = 0  # videos whose content was indexed already (renamed, moved, copied): vectors kept
    moved_in: list = field(default_factory=list)  # hashes of reused videos
    seconds: dict = field(default_factory=lambda: {"decode": 0.0, "encode": 0.0, "write": 0.0})
    video_seconds: float = 0.0  # length of the videos read

    def to_dict(self) -> dict:
        return {"videos": self.videos, "moments": self.moments, "video_seconds": round(self.video_seconds, 1),
                **{f"video_{k}": round(v, 3) for k, v in self.seconds.items()}}


def index_videos(db, store: VectorStore, encoder, todo: list[Found], intervals: dict[str, float], batch_size: int,
                 on_video: Callable[[int], None] = lambda n: None, workers: int = 0,
                 worker: StreamWorker | None = None) -> VideoStats:
    """Read, encode and commit every video of todo (new or changed files); returns counts and times. workers > 0:
    each video is decoded in a worker process (a video that crashes its codec is recorded as failed, where in
    this process it ended the run); 0 (--workers 0): in a thread of this process. worker: that process, started
    early by the caller (decoder(), closed by the caller), instead of one started and ended here."""
    stats = VideoStats()
    with contextlib.nullcontext(worker) if worker is not None else decoder(workers, batch_size) as worker:
        for found in todo:
            _one(db, store, encoder, found, intervals.get(found.root, DEFAULT_INTERVAL), batch_size, stats, worker)
            on_video(1)
    return stats


def decoder(workers: int, batch_size: int):
    """The worker process that decodes a run's videos one after the other, started now: its spawn and its imports
    (indexer.videodecode: PyAV, numpy, PIL) go on while this process works (the photos, the first video's hash);
    replaced when one dies, ended by close() (a `with` block's end). A nullcontext (None) with workers 0: a thread
    of this process decodes."""
    return StreamWorker(batch_size, warm=WARM).start() if workers > 0 else contextlib.nullcontext()


def _one(db, store: VectorStore, encoder, found: Found, interval: float, batch_size: int, stats: VideoStats,
         worker: StreamWorker | None) -> None:
    stats.videos += 1
    reason = found.error
    sha = identity = None
    if reason is None:
        try:
            sha, identity = _sha256(found)
        except (OSError, ValueError, BadImageError) as exc:  # BadImageError: refused by safeopen
            reason = f"cannot read: {getattr(exc, 'strerror', None) or exc}"
        except VideoError as exc:  # it changed while it was hashed
            reason = str(exc)
    if reason is None and sha is not None:
        with db.connect() as conn:
            known = catalog.moments_by_hash(conn, sha)
        if known:
            with db.connect() as conn:
                old = catalog.phashes_of(conn, [r.id for r in known])
                fields = catalog.photos_of(conn, [known[0].id]).get(known[0].id)
                # no row: a flipped bit of its key may have moved it to an id of no file (schema 21), where the date
                # would be lost for good, the mtime written in its place with a sound digest
                if fields is None and catalog.photo_keys_off(conn, unindexed=True):
                    catalog.refuse_photo_keys_off()
                fields = fields or {}
            # the container's creation_time goes with the content, as its vectors do: a renamed video was dated
            # by its mtime instead (the day it was renamed), and `--after`/`--before` lost it
            created = fields.get("taken") if fields.get("taken_source") == "video:creation_time" else None
            _write(db, store, found, sha, known[0].width, known[0].height, [(r.t, r.t_end, r.vec_row) for r in known],
                   np.zeros((0, 0), np.float32), [old.get(r.id) for r in known], stats, reuse=True, created=created)
            stats.reused += 1
            stats.moved_in.append(sha)
            return
    if reason is None:
        info = VideoInfo()
        try:
            found_moments, vecs, hashes = _encode_retrying(found, encoder, info, interval, batch_size, stats, worker,
                                                           identity)
        except WorkerDied:  # twice: nothing of it is kept (a decode error keeps the moments before it)
            log.warning("%s: %s", found.path, DIED)
            reason = DIED
        except (VideoError, BadImageError) as exc:
            reason = str(exc)
        except OSError as exc:
            reason = f"cannot read: {exc.strerror or exc}"
        else:
            stats.video_seconds += info.duration or 0.0
            if info.truncated:
                log.warning("%s: %s (the moments before it are kept)", found.path, info.truncated)
            if info.damaged:
                log.warning("%s: %s (the moments after them are kept)", found.path, info.damaged)
            _write(db, store, found, sha, info.width, info.height, found_moments, vecs, hashes, stats,
                   created=info.created, note="; ".join(filter(None, (info.damaged, info.truncated))) or None)
            return
    t0 = time.perf_counter()
    with db.begin() as conn:
        catalog.upsert_file(conn, {"root": found.root, "relpath": found.relpath, "relpath_raw": found.relpath_raw,
                                   "size": found.size, "mtime": found.mtime, "sha256": sha, "format": _format(found),
                                   "status": catalog.FAILED, "reason": reason, "vec_row": None, "link": found.link,
                                   **row_time(found)})
    stats.seconds["write"] += time.perf_counter() - t0
    stats.failed.add((found.root, found.relpath))


def _sha256(found: Found) -> tuple[str | None, tuple | None]:
    """The content's SHA-256 and the identity of the file hashed (file_identity), which the decode checks: it opens
    the file again, and a video replaced or rewritten in between had the old content's hash recorded over the new
    content's moments (a copy of the old content then took those moments by hash). (None, None) for a URL (not
    fetched twice) or a tar member. Raises VideoError when the file changes while it is hashed."""
    if sources.kind(found.root) == sources.TAR:
        return None, None
    f = _open_local(found)
    if f is None:
        return None, None
    with f:
        before = file_identity(f.fileno())
        digest = hashlib.file_digest(f, "sha256").hexdigest()
        if file_identity(f.fileno()) != before:
            raise VideoError(CHANGED)
    return digest, before


def _encode_retrying(found: Found, encoder, info: VideoInfo, interval: float, batch_size: int, stats: VideoStats,
                     worker: StreamWorker | None, identity: tuple | None):
    """_encode; a decode worker that dies mid-video loses all of it: the video is read once more, in a fresh
    worker. Dying again raises WorkerDied."""
    try:
        return _encode(found, encoder, info, interval, batch_size, stats, worker, identity)
    except WorkerDied as exc:
        log.warning("%s: the video decode worker died (%s): reading it again in a fresh one", found.path, exc)
    return _encode(found, encoder, info, interval, batch_size, stats, worker, identity)


def _encode(found: Found, encoder, info: VideoInfo, interval: float, batch_size: int, stats: VideoStats,
            worker: StreamWorker | None, identity: tuple | None):
    """(moments as (t, t_end, None), their vectors, their perceptual hashes), encoding batch by batch as the
    decoding worker process (workers > 0: a crash in its codec ends only it) or thread hands moments over.
    identity: the file hashed (_sha256), which the decode must find (VideoError otherwise); None only where _sha256
    gives none (a URL). No default: `--reindex` decoded videos with none, unchecked."""
    spec: ImageSpec = encoder.spec
    found_moments, hashes, parts, batch = [], [], [], []

    def flush():
        t0 = time.perf_counter()
        parts.append(np.asarray(encoder.encode_crops(np.stack([m.crop for m in batch])), dtype=np.float32))
        stats.seconds["encode"] += time.perf_counter() - t0
        batch.clear()

    args = (found, spec, interval, identity)
    stream = (worker.stream(decode_moments, args) if worker is not None
              else _threaded(decode_moments(*args), maxsize=batch_size))
    try:
        while True:
            try:
                m, waited = next(stream)
            except StopIteration as end:
                vars(info).update(vars(end.value))
                break
            stats.seconds["decode"] += waited
            found_moments.append((m.t, m.t_end, None))
            hashes.append(m.phash)
            batch.append(m)
            if len(batch) >= batch_size:
                flush()
        if batch:
            flush()
    finally:
        stream.close()
    return found_moments, np.concatenate(parts) if parts else np.zeros((0, 0), np.float32), hashes


def _threaded(gen: Generator, maxsize: int) -> Generator:
    """The generator run in a thread, `maxsize` moments ahead at most; yields (moment, seconds waited) and
    returns the generator's return value."""
    q: queue.Queue = queue.Queue(max(1, maxsize))
    stop = threading.Event()

    def put(message: tuple) -> bool:
        while not stop.is_set():
            try:
                q.put(message, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    thread = threading.Thread(target=hand_over, args=(gen, put), name="video-decode", daemon=True)
    thread.start()
    try:
        return (yield from handed_over(q.get))
    finally:
        stop.set()
        thread.join(timeout=5)


def _format(found: Found) -> str:
    return found.relpath.rsplit(".", 1)[-1].lower()[:16] if "." in found.relpath else "video"


def _write(db, store: VectorStore, found: Found, sha, width, height, rows: list, new_vectors: np.ndarray,
           hashes: list, stats: VideoStats, reuse: bool = False, created: float | None = None,
           note: str | None = None) -> None:
    """Commit a video's moments: the new vectors appended (fsync'ed) first, then one transaction replaces
    every row the file had with one row per moment."""
    t0 = time.perf_counter()
    start = store.append(new_vectors) if not reuse and len(new_vectors) else store.rows
    caption = sidecar_caption(found)
    photo = photometa.read(b"", found.mtime, caption)
    if created is not None:
        photo = {**photo, "taken": created, "taken_source": "video:creation_time"}
    with db.begin() as conn:
        stale = [r.id for r in catalog.rows_at(conn, found.root, found.relpath)]
        catalog.forget_extras(conn, stale)
        conn.execute(delete(catalog.files).where(catalog.files.c.root == found.root,
                                                 catalog.files.c.relpath == found.relpath))
        for i, ((t, t_end, vec_row), phash) in enumerate(zip(rows, hashes)):
            values = {"root": found.root, "relpath": found.relpath, "relpath_raw": found.relpath_raw,
                      "size": found.size, "mtime": found.mtime, "sha256": sha, "width": width, "height": height,
                      "format": _format(found), "status": catalog.INDEXED, "reason": note,
                      "vec_row": vec_row if reuse else start + i, "moment": i, "t": t, "t_end": t_end,
                      **row_time(found)}
            file_id = catalog.insert_file(conn, values)  # with its digest (rowdigest.py)
            if phash:
                catalog.set_phashes(conn, [(file_id, phash)])
            catalog.set_photo(conn, file_id, found.relpath, photo)
            catalog.set_link(conn, file_id, found.link)
        if not reuse:
            vectors.record_chunk(conn, store, 0, start, len(rows))
        if rows:
            state.write(conn, videos=True)  # readers cap the moments of one video (engine.py)
        vectors.save(conn, store)
    stats.moments += len(rows)
    stats.seconds["write"] += time.perf_counter() - t0



def reencode_moments(db, encoder, rows: list, intervals: dict[str, float], batch_size: int,
                     commit: Callable[[list, np.ndarray], None], on_video: Callable[[int], None] = lambda n: None,
                     workers: int = 0) -> int:
    """`index --reindex`: the moments of each video among rows (catalog rows with t) encoded again with the new
    model. The video is read again as it was indexed (same interval, same decoder: the same moments); each row
    takes the vector of the moment read again that contains its start. commit(rows, vectors) stores a video's
    new vectors; a video that cannot be read again (or whose decode worker dies twice) gets none (the switch then
    records it as failed). workers: as for index_videos."""
    videos: dict[tuple[str, str], list] = {}
    for row in rows:
        videos.setdefault((row.root, row.relpath), []).append(row)
    with decoder(workers, batch_size) as worker:
        for (root, _), moment_rows in videos.items():
            _reencode_one(encoder, moment_rows, intervals.get(root, DEFAULT_INTERVAL), batch_size, commit, worker)
            on_video(1)
    return len(videos)


def _reencode_one(encoder, moment_rows: list, interval: float, batch_size: int,
                  commit: Callable[[list, np.ndarray], None], worker: StreamWorker | None) -> None:
    """One video's moment rows re-encoded (reencode_moments)."""
    r = moment_rows[0]
    found = Found(r.root, r.relpath, r.size, r.mtime, None, r.relpath_raw)
    try:
        # an index run's check (_sha256, then the decode finds the file hashed): read with none, a video replaced
        # with the same size and mtime had the new content's vectors recorded under the old content's hash, and
        # no later run, its listing matching, read it again. No vectors: failed, `cannot read` (read again).
        sha, identity = _sha256(found)
        if content_changed(r.sha256, sha):
            raise VideoError(CHANGED)
        again, vecs, _ = _encode_retrying(found, encoder, VideoInfo(), interval, batch_size, VideoStats(), worker,
                                          identity)
    except (VideoError, BadImageError, OSError, ValueError, WorkerDied) as exc:
        log.warning("%s cannot be read again to re-encode it: %s", found.path, exc)
        return
    starts = np.array([t for t, _, _ in again])
    pick = np.clip(np.searchsorted(starts, [row.t for row in moment_rows], side="right") - 1, 0, len(starts) - 1)
    commit(moment_rows, vecs[pick])
