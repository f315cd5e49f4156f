"""Decode worker processes that notice a dead worker: the reader stage's process pool.

multiprocessing.Pool.imap never learns that a worker died mid-task (the OOM killer, a crash in a codec):
it starts a replacement, the lost task's result never comes, and `index` waited forever holding the
writer lock; workers that could not start were restarted for minutes. concurrent.futures' pool marks
itself broken the moment a worker dies (one that dies part way through writing its result back wedges it
instead: _wait breaks it). Then the items that were in flight are decoded again one at a
time, each in a fresh worker: an item that kills its worker again is recorded as failed (its reason says
so), the others are indexed as usual, and the run goes on with a new pool. A fresh worker is first asked
for its pid: one that cannot even do that means workers cannot start here, which is an error, not a
reason to fail every file.
"""

from __future__ import annotations

import concurrent.futures
import importlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import time
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from itertools import chain, islice

from alignsearch.errors import AlignSearchError
from alignsearch.workerpool import quiet_worker, sigint_held, start_all

log = logging.getLogger(__name__)

CHUNK = 4  # items per task, as Pool.imap's chunksize was
IN_FLIGHT = 256  # items decoding or decoded ahead of the consumer (Pool.imap bounded nothing)
DIED = "the decode worker died while reading it (killed, out of memory?)"
WEDGED_S = 1.0  # how often a wait for a result looks for a worker that died without the pool saying so
STOP_WAIT_S = 10.0  # how long a stopped pool's manager thread is waited for (it ends within milliseconds of its workers)


class WorkersCannotStart(AlignSearchError):
    exit_code = 1


def _read_chunk(fn: Callable, chunk: list) -> list:
    return [fn(found) for found in chunk]


def _start_worker(initializer, initargs: tuple) -> None:
    """In each worker first: Ctrl-C is the command's to handle and it ends with the process that started it
    (alignsearch/workerpool.py), then the caller's initializer (the texts already read)."""
    quiet_worker()
    if initializer is not None:
        initializer(*initargs)


def _new_pool(workers: int, init: tuple = (None, ())) -> ProcessPoolExecutor:
    # spawn: workers import only PIL and numpy, never the torch state of this process. init: (initializer,
    # initargs) run once in each worker. The workers start at the first submit, with SIGINT held off in this
    # process meanwhile (a blocked signal survives exec: a Ctrl-C while they import is quiet too).
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
                               initargs=init)
    try:
        # All the workers started here, before the first submit starts the pool's manager thread (start_all: one
        # that cannot start, dying at once, made a later submit raise ValueError, not WorkersCannotStart)
        with sigint_held():
            start_all(pool)
            first = [pool.submit(os.getpid) for _ in range(workers)]
        for f in first:
            f.result(timeout=120)
    except (BrokenProcessPool, TimeoutError, concurrent.futures.TimeoutError, OSError) as exc:
        pool.shutdown(wait=False, cancel_futures=True)
        raise WorkersCannotStart(f"decode worker processes cannot start here ({exc or type(exc).__name__}): "
                                 "run with --workers 0 to decode in this process") from None
    except BaseException:  # Ctrl-C while they start
        _stop(pool)
        raise
    return pool


def decode_in_processes(fn: Callable, todo: Iterable, workers: int, failed: Callable, initializer=None,
                        initargs: tuple = ()) -> Iterator:
    """fn(item) for each item of todo, in order, in `workers` processes (each started with
    initializer(*initargs)); failed(item, reason) makes the result of an item whose worker died twice over it.
    todo may be an iterator that is still being filled (the GPU decode stage hands back the files it does not
    read as it meets them, indexer/gpudecode.py)."""
    init = (initializer, initargs)
    pool = _new_pool(workers, init)
    pending: deque[tuple[list, Future]] = deque()
    chunks = _chunked(todo)
    window = max(IN_FLIGHT, workers * 4 * CHUNK) // CHUNK
    again = None
    try:
        while True:
            while len(pending) < window and (chunk := next(chunks, None)) is not None:
                pending.append((chunk, pool.submit(_read_chunk, fn, chunk)))
            if not pending:
                return
            chunk, future = pending[0]
            try:
                results = _wait(pool, future)
            except BrokenProcessPool:
                pool.shutdown(wait=False, cancel_futures=True)
                kept = [_result(f) for _, f in pending]  # in order: what finished before the death is kept
                lost = [item for (c, _), r in zip(pending, kept) if r is None for item in c]
                log.warning("a decode worker died: decoding the %d items it may have held again", len(lost))
                again = _again(fn, lost, workers, failed, init)
                for (c, _), r in zip(list(pending), kept):
                    yield from r if r is not None else (next(again) for _ in c)
                pending.clear()
                pool = _new_pool(workers, init)
                continue
            pending.popleft()
            yield from results
    finally:
        if again is not None:
            again.close()  # its own pools stop with it (finished too: it is paused after its last yield)
        _stop(pool)


def _stop(pool: ProcessPoolExecutor) -> None:
    """Shut the pool down and terminate its workers, as Pool.terminate did. A shutdown alone cancels only the
    queued chunks: the running ones (Ctrl-C, an error, the consumer gone) go on, and Python's exit waits for them (a
    worker ignores SIGINT). Idle ones at a run's end too: one killed -9 just after it wrote its last result back
    can die holding the result queue's lock, and the others, told to stop, each wait for that lock to write a last
    word back, and Python's exit waited for them for ever. SIGTERM ends a worker quietly."""
    # ProcessPoolExecutor has no public way to end its workers before Python 3.14 (terminate_workers)
    workers = list((getattr(pool, "_processes", None) or {}).values())
    manager = getattr(pool, "_executor_manager_thread", None)  # shutdown forgets it
    for process in workers:
        process.terminate()  # a no-op for one already ended
    pool.shutdown(wait=False, cancel_futures=True)
    # Its manager thread, which ends soon with its workers, is waited for (a while): Python's exit wakes every pool's
    # manager, and one closing its wake-up pipe at that moment made the exit print "OSError: [Errno 9] Bad file
    # descriptor" with a traceback after Ctrl-C (seen in CI; CPython's race). The exit joins these threads anyway.
    if manager is not None:
        manager.join(timeout=STOP_WAIT_S)


def _wait(pool: ProcessPoolExecutor, future: Future):
    """future.result(), but a pool that a worker's death left wedged is broken here: BrokenProcessPool.

    A worker killed (the OOM killer, kill -9) part way through writing its result back (a chunk of decoded images
    is far over a pipe's 64 KB) left half a message in the pool's result pipe: the pool's manager thread read it
    and waited for the rest for ever (this process holds a copy of that pipe's write end, so no end of file came),
    no future was ever set, and `index` waited forever holding the writer lock. A dead worker still there at two
    looks WEDGED_S apart (the manager notices a death otherwise within milliseconds) means that: its workers are
    killed and this process's copy of the write end closed, so the manager's read ends (end of file, and the
    manager thread with it: Python's exit joins it), and the caller decodes the items in flight again."""
    dead_before = False
    while True:
        try:
            return future.result(timeout=WEDGED_S)
        except (TimeoutError, concurrent.futures.TimeoutError):  # one class from Python 3.11 on, two on 3.10
            pass
        # ProcessPoolExecutor keeps its workers and result queue private (as _stop reads the workers)
        workers = list((getattr(pool, "_processes", None) or {}).values())
        dead = bool(multiprocessing.connection.wait([p.sentinel for p in workers], timeout=0))
        if dead and dead_before and not future.done():
            for process in workers:
                process.kill()  # one blocked on the result queue's lock the dead one held ends too
            for process in workers:
                process.join(5)
            if (results := getattr(pool, "_result_queue", None)) is not None:
                results._writer.close()
            raise BrokenProcessPool("a worker died part way through writing its result back")
        dead_before = dead


def _chunked(todo: Iterable) -> Iterator[list]:
    items = iter(todo)
    while chunk := list(islice(items, CHUNK)):
        yield chunk


def _result(future: Future):
    """A finished future's result, else None (not done, cancelled, or its worker died)."""
    if not future.done() or future.cancelled() or future.exception() is not None:
        return None
    return future.result()


def _again(fn: Callable, items: list, workers: int, failed: Callable, init: tuple = (None, ())) -> Iterator:
    """The items in flight when a worker died, in order: all again on a fresh pool; if a worker dies again,
    the ones still lost one at a time, each alone in its worker, so only an item that kills its worker twice
    alone fails."""
    pool = _new_pool(workers, init)
    futures = [pool.submit(fn, found) for found in items]
    try:
        done = [_wait(pool, f) for f in futures]
    except BrokenProcessPool:
        done = [_result(f) for f in futures]
    finally:
        _stop(pool)
    single = None
    try:
        for found, result in zip(items, done):
            if result is not None:
                yield result
                continue
            # Alone, a death is the item's own; a pool's death blames none for sure (the item may not even
            # have started before another killed the pool), so an item fails after two deaths alone.
            for attempt in range(2):
                single = single or _new_pool(1, init)
                try:
                    result = _wait(single, single.submit(fn, found))
                    break
                except BrokenProcessPool:
                    single.shutdown(wait=False, cancel_futures=True)
                    single = None
            else:
                log.warning("%s: %s", getattr(found, "relpath", found), DIED)
                result = failed(found, DIED)
            yield result
    finally:
        if single is not None:
            _stop(single)


def catalog_pages(db, fetch: Callable, limit: int, without_ids: list) -> Iterator[list]:
    """The rows fetch(conn, after, limit, without_ids=...) pages through, a page at a time, each read when the
    one before has been taken (a fill step's files: catalog.files_without_ocr, files_without_phash,
    files_without_photo)."""
    after = 0
    while True:
        with db.connect() as conn:
            rows = fetch(conn, after, limit, without_ids=without_ids)
        if not rows:
            return
        after = rows[-1].id
        yield rows


def map_rows(fn: Callable, pages: Iterator[list], workers: int, failed: Callable, min_rows: int = 2) -> Generator:
    """fn(row) for each row of pages, in order, in worker processes when there are any (decode_in_processes: a
    worker that dies is noticed, where Pool.map waited forever for its task), else (--workers 0) in this process.
    A first page of fewer than min_rows is decoded by one worker: a file that crashes its decoder (a segfault or
    an abort in a C library) then kills that worker and is recorded, where in this process it ended the whole run
    on every run, before anything could be recorded; nothing to do starts none. failed(row, reason): the result
    of a row whose worker died twice. Closing the generator (the caller's finally) terminates the workers at once."""
    first = next(pages, [])
    if not first:
        return
    rows = chain(first, chain.from_iterable(pages))
    count = workers_for(workers, len(first), batch_size=min_rows - 1)  # the one rule of how many decode processes
    if count:
        yield from decode_in_processes(fn, rows, count, failed)
    else:
        yield from map(fn, rows)


def workers_for(workers: int, items: int, batch_size: int) -> int:
    """How many decode processes a run of `items` files starts: `workers` when there are more than a batch, one
    for a smaller run (the usual incremental run, every `index --watch` run), none with nothing to decode or
    with --workers 0 (then the index process decodes, as the user asked). A file that crashes its decoder (a
    segfault or an abort in a C library) kills only a worker and is recorded (decode_in_processes); decoded in
    the index process it ended the run, every run, before anything could be recorded."""
    if workers <= 0 or items == 0:
        return 0
    return workers if items > batch_size else 1


class WorkerDied(AlignSearchError):
    """The process streaming a generator's items died before its end (a crash in a C codec, the OOM killer)."""


def hand_over(gen: Generator, put: Callable[[tuple], bool]) -> None:
    """The producer's side of a stream: each item of gen as put(("item", item)), then ("end", its return value) or
    ("error", the exception that ended it). put answers False when the consumer is gone: gen is closed then."""
    try:
        while True:
            try:
                item = next(gen)
            except StopIteration as end:
                put(("end", end.value))
                return
            if not put(("item", item)):
                gen.close()
                return
    except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
        put(("error", exc))


def handed_over(get: Callable[[], tuple]) -> Generator:
    """The consumer's side of a stream (hand_over), each message taken by get(): yields (item, seconds waited),
    returns the producer's return value and raises the exception that ended it."""
    while True:
        t0 = time.perf_counter()
        kind, value = get()
        waited = time.perf_counter() - t0
        if kind == "end":
            return value
        if kind == "error":
            raise value
        yield value, waited


def _serve_streams(jobs, out, room, warm: tuple[str, ...] = ()) -> None:
    """In the worker: the modules named in warm imported first (while the consumer does other work: the jobs need
    them), then for each (fn, args) job, fn(*args)'s items sent on `out`, each once `room` (a semaphore the
    consumer releases per message taken) lets it (a fast producer is held back), then how it ended; None ends the
    worker. Sent from this thread, not a queue's feeder thread: a crash in the decoder never cuts a message short."""
    _start_worker(None, ())
    for name in warm:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - only a head start: the job that needs it imports it and says why not
            pass

    def put(message: tuple) -> bool:
        room.acquire()
        try:
            out.send(message)
        except OSError:  # the consumer is gone, killed -9 too (a broken pipe): exit_with_parent ends this process
            return False
        return True

    while (job := jobs.get()) is not None:
        fn, args = job
        hand_over(fn(*args), put)


class StreamWorker:
    """One spawn worker process that runs generators, one at a time, for this process (stream): each streams its
    items back `maxsize` ahead at most (memory stays bounded). The worker is reused from one generator to the next,
    started at the first (its start and imports cost once a run, not once an item) or earlier by start(), so that
    they go on while this process does other work; warm: the modules it imports as soon as it starts, before the
    first generator (those the generators need). One that died or was left mid-stream is replaced by a fresh one at
    the next. close() (a `with` block's end) ends it."""

    def __init__(self, maxsize: int, warm: tuple[str, ...] = ()):
        self.maxsize = max(1, maxsize)
        self.warm = tuple(warm)
        self.process = self.jobs = self.out = self.room = None

    def start(self) -> StreamWorker:
        """The worker process started now, unless one is running: it spawns and imports while this process goes
        on (nothing here waits for it)."""
        if self.process is None:
            self._start()
        return self

    def _start(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.jobs, self.room = ctx.SimpleQueue(), ctx.Semaphore(self.maxsize)
        self.out, writer = ctx.Pipe(duplex=False)
        self.process = ctx.Process(target=_serve_streams, args=(self.jobs, writer, self.room, self.warm), name="stream-worker",
                                   daemon=True)
        try:
            with sigint_held():
                self.process.start()
        except BaseException:  # not started (no process could be made, Ctrl-C): nothing for close() to end
            self.out.close()
            self.jobs.close()
            self.process = self.jobs = self.out = self.room = None
            raise
        finally:
            # The write end is the worker's alone: its death is an end of file here, even part way through a
            # message. With a copy held here (a multiprocessing.Queue's), a reader given half a moment (a crop over
            # the pipe's 64 KB) waited for the rest for ever.
            writer.close()

    def _get(self) -> tuple:
        try:
            message = self.out.recv()
        except (EOFError, OSError):  # it ended, part way through a message too (what it sent before is read first)
            self.process.join(5)
            raise WorkerDied(f"the worker ended with exit code {self.process.exitcode}") from None
        self.room.release()
        return message

    def stream(self, fn: Callable, args: tuple) -> Generator:
        """fn(*args), a generator, run in the worker: yields (item, seconds waited) and returns its return value;
        an exception that ended it is raised here. A worker that dies first (a crash in its decoder) raises
        WorkerDied; closing this generator early (Ctrl-C, an error, the consumer gone) terminates the worker at
        once."""
        self.start()
        self.jobs.put((fn, args))
        ended = False
        try:
            try:
                value = yield from handed_over(self._get)
            except WorkerDied:
                raise
            except BaseException as exc:
                ended = not isinstance(exc, (GeneratorExit, KeyboardInterrupt)) and self.process.is_alive()
                raise
            ended = True
            return value
        finally:
            if not ended:
                self.close()

    def close(self) -> None:
        """The worker terminated (a no-op for one already ended), its queues closed."""
        if self.process is None:
            return
        self.process.terminate()
        self.process.join(5)
        self.out.close()
        self.jobs.close()
        self.process = self.jobs = self.out = self.room = None

    def __enter__(self) -> StreamWorker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
