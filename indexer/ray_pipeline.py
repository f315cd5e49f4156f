"""The same reader -> encoder -> writer stages on Ray Data, for many GPUs or many machines.

Each actor loads the model once (one GPU each when there are GPUs), then decodes and encodes the blocks of
the file list it is given (Ray Data fused the two stages into one actor anyway; one stage gives a batch that
kills its actor a bounded number of retries). Each actor appends its vectors to a vector-store segment of
its own and sends back only where they are (alignsearch/storage/vectors.py), so the driver, the single
catalog writer, handles ~100 bytes of metadata per image rather than its vector; an actor on a
machine that does not see the index folder sends its vectors instead. The driver commits batch by
batch as results stream back: a re-run after any failure skips what was committed, and rows a killed
actor wrote but nobody committed are cut off. The driver's loop is indexer/pipeline.py's runner
(`drive`), fed by `stream`: Ray Data's decoded and encoded batches, so its encoder stage only takes the
actors' vectors, and the stage times are the local path's.
"""

from __future__ import annotations

import gc
import json
import logging
import re
import signal
import sys
import threading
import time
import uuid
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np

from alignsearch import atomic
from alignsearch.storage import catalog, vectors
from alignsearch.errors import AlignSearchError, BadInputError, ModelLoadError
from alignsearch.media.images import ImageSpec
from alignsearch.storage.paths import DB_FILE
from alignsearch.storage.vectors import VectorStore
from indexer.decode import Item, read_item
from indexer.pipeline import Batch, EncoderConfig, StageTimes, drive, load_encoder
from indexer.scan import Found

log = logging.getLogger(__name__)

# An actor that dies is started again (Ray Data's default: a machine lost); a batch whose actor died this many
# times more is given up, as the local path gives up a file that kills its decode worker twice. Ray Data retried
# it forever: a file that crashes its decoder (a codec's fault, out of memory) kept the run going, never ending.
BATCH_RETRIES = 2
FOUND_FIELDS = ("root", "relpath", "size", "mtime", "error", "relpath_raw", "offset", "link", "listed_at")
RUN_TOKEN = ".run"  # in the segment folder: an actor that reads this run's token there shares the driver's disk


def _row(found: Found) -> dict:
    # Arrow columns have no None for these: empty string / bytes stand for it.
    # link: b"\0" stands for None (not looked at): no link's target holds a NUL byte
    return {**asdict(found), "error": found.error or "", "relpath_raw": found.relpath_raw or b"",
            "link": b"\0" if found.link is None else found.link, "listed_at": found.listed_at or 0.0}


def _found(batch: dict, i: int) -> Found:
    return Found(str(batch["root"][i]), str(batch["relpath"][i]), int(batch["size"][i]), float(batch["mtime"][i]),
                 str(batch["error"][i]) or None, bytes(batch["relpath_raw"][i]) or None, int(batch["offset"][i]),
                 link=None if bytes(batch["link"][i]) == b"\0" else bytes(batch["link"][i]),
                 listed_at=float(batch["listed_at"][i]) or None)


def decode_batch(batch: dict, spec: ImageSpec, fast: bool = False) -> dict:
    """CPU stage: rows of Found fields -> crops (zeros where decoding failed) and metadata."""
    items = [read_item(_found(batch, i), spec, fast=fast) for i in range(len(batch["relpath"]))]
    h, w = spec.output_size
    out = {f: batch[f] for f in FOUND_FIELDS}
    out["crop"] = np.stack([it.crop if it.crop is not None else np.zeros((h, w, 3), np.uint8) for it in items])
    out["ok"] = np.array([it.crop is not None for it in items])
    for name in ("sha256", "format", "reason"):  # "" and -1 stand for None: blocks must share one schema
        out[name] = np.array([getattr(it, name) or "" for it in items], dtype=object)
    for name in ("width", "height"):
        out[name] = np.array([getattr(it, name) or -1 for it in items], dtype=np.int64)
    out["decode_seconds"] = np.array([it.seconds for it in items])
    return out


def _token(folder: Path) -> str | None:
    try:
        return (folder / RUN_TOKEN).read_text()
    except OSError:
        return None


class EncoderActor:
    """GPU (or CPU) stage: one model per actor, loaded once. Vectors go to a segment of the actor's own
    in `segments` (fsync'ed before the batch is returned) when that folder holds the driver's `token`;
    otherwise they travel back as fp16 bytes."""

    def __init__(self, encoder: EncoderConfig, segments: str | None = None, token: str | None = None,
                 spec: ImageSpec | None = None, fast: bool = False):
        self.encoder = load_encoder(encoder)
        self.decode = {"spec": spec or self.encoder.spec, "fast": fast}
        shared = segments is not None and _token(Path(segments)) == token
        # A fresh name per actor process: a restarted actor never appends to a file its predecessor left.
        self.segment = VectorStore(Path(segments) / f"{uuid.uuid4().hex}.f16", self.encoder.dim, 0) if shared else None

    def __call__(self, batch: dict) -> dict:
        if "crop" not in batch:  # rows of Found fields: decoded here first
            batch = decode_batch(batch, **self.decode)
        start = time.perf_counter()
        ok = batch["ok"].astype(bool)
        n = len(ok)
        encoded = np.zeros((n, self.encoder.dim), np.float32)
        if ok.any():
            encoded[ok] = self.encoder.encode_crops(batch["crop"][ok])
        out = {k: v for k, v in batch.items() if k != "crop"}  # crops stay on the worker
        out["segment"], out["seg_row"] = np.full(n, "", dtype=object), np.full(n, -1, dtype=np.int64)
        if self.segment is not None and ok.any():
            first = self.segment.append(encoded[ok])
            out["segment"][ok] = self.segment.path.stem
            out["seg_row"][ok] = np.arange(first, first + int(ok.sum()))
            out["vector"] = np.full(n, b"", dtype=object)
        else:
            out["vector"] = np.array([v.astype(vectors.DTYPE).tobytes() if keep else b"" for v, keep in zip(encoded, ok)],
                                     dtype=object)
        out["encode_seconds"] = np.full(n, (time.perf_counter() - start) / max(n, 1))
        # what ran (backend, precision, why): an actor's export can fail where the driver's would not
        out["plan"] = np.full(n, json.dumps(self.encoder.plan.to_dict(), sort_keys=True), dtype=object)
        return out


def stream(ds, store: VectorStore, batch_size: int, extra: dict):
    """The runner's reader on Ray: the actors' output as pipeline.Batch, the vectors they stored in segments
    committed to `store` (the caller saves it with the catalog rows) and addressed by the items' vec_row,
    the rest in Batch.vectors. Counts both in `extra`."""
    blocks = ds.iter_batches(batch_size=batch_size, batch_format="numpy")
    try:
        yield from _batches(blocks, store, extra)
    finally:
        # Now, while Ray is up: left to the garbage collector, Ray Data's iterator was closed after ray.shutdown
        # (a stop part way), logged tracebacks ("Ray is not initialized") and could wait forever on its threads
        # as the interpreter ended, the command hung after its last line.
        close = getattr(blocks, "close", None)
        if close is not None:
            close()


def _batches(blocks, store: VectorStore, extra: dict):
    for block in blocks:
        ok = block["ok"].astype(bool)
        items = [
            Item(_found(block, i), np.empty(0) if ok[i] else None, str(block["sha256"][i]) or None,
                 int(block["width"][i]) if block["width"][i] >= 0 else None,
                 int(block["height"][i]) if block["height"][i] >= 0 else None,
                 str(block["format"][i]) or None, str(block["reason"][i]) or None, float(block["decode_seconds"][i]))
            for i in range(len(ok))
        ]
        shipped = [np.frombuffer(block["vector"][i], vectors.DTYPE) for i in np.flatnonzero(ok) if not block["segment"][i]]
        written = ok & (block["seg_row"] >= 0)
        for name in set(block["segment"][written].tolist()):
            mine = written & (block["segment"] == name)
            number = store.commit(name, int(block["seg_row"][mine].max()) + 1)
            for i in np.flatnonzero(mine):
                items[i].vec_row = vectors.address(number, int(block["seg_row"][i]))
        extra["vectors_in_actor_segments"] += int(written.sum())
        if "plan" in block:
            extra["actor_plans"].update(block["plan"].tolist())
        extra["vectors_sent_to_driver"] += len(shipped)
        yield Batch(items, np.stack(shipped) if shipped else np.zeros((0, store.dim), vectors.DTYPE),
                    [items[i].vec_row for i in np.flatnonzero(written)], float(block["encode_seconds"].sum()))


def _ray_console_level() -> int:
    """The level from which Ray's own driver-side lines reach stderr: its start, Ray Data's execution plan and
    deprecation notes would surround our one-line messages, so errors only, unless our log is at debug (-vv).
    Ray's log files (/tmp/ray/session_*/logs) keep everything; our own loggers are not touched."""
    return logging.INFO if log.isEnabledFor(logging.DEBUG) else logging.ERROR


def _quiet_ray_data(level: int) -> None:
    """Ray Data's console handler (its logger keeps DEBUG for its own ray-data.log) from `level` on."""
    from ray._private.log import PlainRayHandler

    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, PlainRayHandler):
            handler.setLevel(level)


def run_ray(todo: list[Found], model: str, device: str, spec: ImageSpec, store: VectorStore, write, batch_size: int,
            address: str | None = None, encoders: int | None = None, on_batch=lambda n: None,
            fast: bool = False, actor_segments: bool = True, encoder_options: dict | None = None) -> StageTimes:
    """Index `todo` on Ray (local when address is None); `write(items, new_vectors, actor_rows)` commits on the
    driver. Each encoder actor loads `model` with the further Encoder keywords `encoder_options` (on a GPU of
    its own when the cluster has any, else on `device`).

    With actor_segments, encoder actors that see store's folder append to segments of their own (each
    is committed to `store` as batches arrive); the rest, or all without it, send vectors to `write`.
    """
    import ray

    if not todo:
        return StageTimes()
    started_here = not ray.is_initialized()
    ray_level = _ray_console_level()
    sigterm = _HeldSigterm()  # before ray.init, which puts a handler of its own in place
    if started_here:
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True,
                     logging_level=ray_level)
        except ConnectionError as exc:
            sigterm.release()  # ray.init's handler would end a watch by SIGTERM, its "watch stopped" unsaid
            raise BadInputError(
                f"cannot join the Ray cluster at {address}: {str(exc).splitlines()[-1]}. A cluster started with "
                "`ray start` authenticates with a token: set RAY_AUTH_MODE=token (the token is read from "
                "~/.ray/auth_token or RAY_AUTH_TOKEN)") from None
        except BaseException:
            sigterm.release()
            raise
    sigterm.hold()
    finished = False
    rays_own = set(threading.enumerate())  # ray.init's threads live as long as Ray
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False  # ours is the driver's bar
        _quiet_ray_data(ray_level)
        gpus = int(ray.cluster_resources().get("GPU", 0))
        actors = encoders or max(1, gpus)
        token, segments = uuid.uuid4().hex, None
        if actor_segments:
            if not store.folder.exists():
                atomic.make_folders(store.folder)  # as the index folder (job.py): under umask 000 too
                vectors.fsync_dir(store.folder.parent)
            atomic.write_bytes(store.folder / RUN_TOKEN, token.encode())
            segments = str(store.folder.resolve())
        encoder = EncoderConfig(model, "cuda" if gpus else device, dict(encoder_options or {}))
        log.info("Ray: %d files, %d encoder actors, %d GPUs, actor segments %s", len(todo), actors, gpus,
                 "on" if segments else "off")
        rows = [_row(found) for found in todo]
        ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // batch_size, 200)))
        with warnings.catch_warnings():  # Ray's notes on its own API's future, addressed to developers
            if ray_level > logging.INFO:
                warnings.simplefilter("ignore", DeprecationWarning)
            ds = ds.map_batches(EncoderActor, fn_constructor_kwargs={"encoder": encoder, "segments": segments,
                                                                     "token": token, "spec": spec, "fast": fast},
                                batch_size=batch_size, batch_format="numpy", concurrency=actors,
                                num_gpus=1 if gpus else 0, max_task_retries=BATCH_RETRIES)
        extra = {"vectors_in_actor_segments": 0, "vectors_sent_to_driver": 0, "actor_plans": set()}
        batches = stream(ds, store, batch_size, extra)
        try:
            times = drive(batches, None, write, on_batch)
        except ray.exceptions.RayTaskError as exc:  # a task raised: a decode, an actor's encode or write
            log.debug("the Ray task's report: %s", exc)
            raise AlignSearchError(f"a Ray task failed: {_raised(str(exc))} (the batches committed before it are "
                                   "kept; -vv logs Ray's report)") from None
        except ray.exceptions.RayActorError as exc:  # an actor failed to load its model, or died on a batch
            log.debug("the Ray actor's report: %s", exc)
            raise actor_failure(exc) from None
        finally:
            batches.close()  # stops Ray Data's execution before ray.shutdown (stream)
        extra["actor_plans"] = [json.loads(p) for p in sorted(extra["actor_plans"])]  # each distinct plan once
        times.extra.update(extra, ray_encoders=actors)
        finished = True
        return times
    finally:
        try:
            if started_here:
                _settle(rays_own)
                ray.shutdown()
            if not finished:
                # Stopped part way (Ctrl-C, SIGTERM, an error): the actors ran ahead of the driver's commits, so
                # their segments hold rows no commit lists (a segment with none is a file no commit knows). Cut
                # now, as the next run would: `verify` finds the index as the last commit left it.
                _cut_uncommitted(store)
        finally:
            sigterm.release()


# The line a traceback ends in ("RuntimeError: a codec's bug"): a task's error reaches the driver as Ray's report
# (the remote traceback as text, terminal colour codes), the exception itself is not sent along.
_RAISED = re.compile(r"^[A-Za-z_][\w.]*(?:Error|Exception)\b.*$", re.M)


def actor_failure(exc: Exception) -> AlignSearchError:
    """The error to report for a Ray actor that failed: one whose constructor raised (the model not where the
    node looks, out of GPU memory as it loads) cannot load the model, on any batch; any other died on a batch
    every retry."""
    if getattr(exc, "actor_init_failed", False):
        return ModelLoadError(f"a Ray encoder actor could not load the model: {_raised(str(exc))} (the batches "
                              "committed before it are kept; -vv logs Ray's report)")
    return AlignSearchError(
        f"a Ray encoder actor died on the same batch {BATCH_RETRIES + 1} times (a file that crashes its "
        "decoder, or out of memory?): the batches committed before it are kept; `alignsearch index` "
        "without --ray records a file that kills its decoder as failed, and goes on")


def _raised(report: str) -> str:
    found = _RAISED.search(report)
    return found.group(0).strip() if found else report.strip().splitlines()[-1]


class _Terminated(BaseException):
    """SIGTERM during a Ray run, raised in the driver's main thread: the run unwinds through its clean-up."""


class _HeldSigterm:
    """SIGTERM while the Ray run goes on unwinds it (the cluster shut down, what no commit lists cut), then goes
    to whatever took SIGTERM before: by default the process ends by it, as a local run does; `index --watch`
    stops. ray.init's own handler, left in place, raised SystemExit through Ray Data's threads (their
    tracebacks, a C++ stack dump) and the driver ended aborted (exit -6), or a watch by it."""

    def __init__(self):
        self.here = threading.current_thread() is threading.main_thread()  # signals are set there only
        # None: a handler set outside Python, which cannot be put back; the default is the nearest
        before = signal.getsignal(signal.SIGTERM) if self.here else None
        self.before = signal.SIG_DFL if before is None else before
        self.received = False

    def _raise(self, signum, frame):
        self.received = True
        raise _Terminated

    def hold(self) -> None:
        if self.here:  # an ignored SIGTERM stays ignored: ray.init's handler would end the run by it
            signal.signal(signal.SIGTERM, signal.SIG_IGN if self.before is signal.SIG_IGN else self._raise)

    def release(self) -> None:
        if not self.here:
            return
        signal.signal(signal.SIGTERM, self.before)
        if self.received:
            signal.raise_signal(signal.SIGTERM)


def _settle(rays_own: set, seconds: float = 3.0) -> list:
    """Wait (up to `seconds`) until the threads the run started in this process (Ray Data's: its prefetcher, its
    iterator's workers, its executor's) have ended or are parked, before Ray is shut down. Ray Data does not join
    them when its iterator is closed (they watch a flag); one still inside a Ray call as Ray shut down ended the
    process at once, exit 1 and Ray's C++ "The core worker has already been shutdown ... The process will exit",
    where a stopped run says `error: interrupted` (130). A parked thread waits on a condition with no timeout: only
    another thread of the run can wake it, and none is left running. Returns those still running at the deadline:
    seen, a worker of Ray Data's iterator polling for a slot no consumer will free (its stop flag is set when its
    generator is finalized, which the stop's traceback delays), which touches Ray only once it has a slot."""
    deadline = time.monotonic() + seconds
    gc.collect()  # once (~0.2 s of a torch process): the finalizers that stop them, the closed iterator's generators
    while True:
        frames = sys._current_frames()
        running = [t for t in threading.enumerate()
                   if t not in rays_own and t.is_alive() and not parked(frames.get(t.ident))]
        if not running or time.monotonic() >= deadline:
            if running:
                log.debug("Ray shut down with the run's threads still running: %s", [t.name for t in running])
            return running
        running[0].join(min(0.05, max(0.0, deadline - time.monotonic())))


def parked(frame) -> bool:
    """Whether a thread whose innermost frame is `frame` waits on a threading.Condition with no timeout (a
    queue's get, an Event's wait, a Condition's): it runs again only when another thread notifies it."""
    return (frame is not None and frame.f_code is threading.Condition.wait.__code__
            and frame.f_locals.get("timeout") is None)


def _cut_uncommitted(store: VectorStore) -> None:
    """Cut what the store's files hold past the catalog's last commit, as read from the catalog: the driver's
    store may count a batch whose transaction the stop cut short. Only rows no commit lists are cut: an actor of
    a cluster still winding down that appends after this leaves bytes the next run cuts, never a loss."""
    try:
        db = catalog.connect(store.path.parent / DB_FILE)
        try:
            with db.connect() as conn:
                committed = vectors.load(conn, store.path.parent, store.dim)
        finally:
            db.dispose()
        committed.truncate_uncommitted()
    except Exception as exc:  # noqa: BLE001 - the stop's own error is the one to report; the next run cuts them
        log.warning("could not cut the rows the stopped Ray run left uncommitted (the next run will): %s", exc)
