"""Decode worker processes that a Ctrl-C does not reach, and worker processes that end with their parent.

A terminal sends SIGINT to the whole process group: every spawned worker raised KeyboardInterrupt and printed
its traceback before the command's one line `error: interrupted`. Workers ignore SIGINT instead; the command
itself stops on it and terminates them (Pool.terminate: SIGTERM, which ends them quietly).

Every process pool's workers run exit_with_parent first (its initializer): a parent killed -9 never tells them."""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
from concurrent.futures import ProcessPoolExecutor


def exit_with_parent() -> None:
    """Pool initializer: end this worker when the process that started it ends, killed -9 too. A worker waiting
    for its next task never learns it (it holds both ends of its queue's pipe), so it lived on for good, holding
    its memory and the output pipes of whoever ran the command (which then waited for them forever)."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def quiet_worker() -> None:
    """Pool initializer: ignore_sigint and exit_with_parent."""
    ignore_sigint()
    exit_with_parent()


def spawn_executor(workers: int) -> ProcessPoolExecutor:
    """A spawn-context ProcessPoolExecutor whose workers end with this process (exit_with_parent), all started
    (start_all); Ctrl-C reaches them as it reaches this process."""
    return start_all(ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                         initializer=exit_with_parent))


def start_all(pool: ProcessPoolExecutor) -> ProcessPoolExecutor:
    """pool with all its workers started now, before a submit starts its manager thread. A spawn pool otherwise
    starts one per submit, the later ones while that thread runs; a worker that died at once made the thread close
    the pool's queues while the next worker was being started with their descriptors noted for the child, whose
    own pipe then took such a number: submit raised `ValueError: bad value(s) in fds_to_keep` (CPython 3.11, seen
    in the tests) where a BrokenProcessPool was due. Private, as indexer/workers.py's reads of a pool are: without
    it (another Python), one worker per submit as before."""
    launch = getattr(pool, "_launch_processes", None)
    if launch is not None:
        launch()
    return pool


def ignore_sigint() -> None:
    """Pool initializer: the worker ignores SIGINT from now on (the command stops its workers itself), and one
    that came while it started, held off by sigint_held's blocked mask, is discarded pending. A worker the pool
    starts later (after one died) starts outside sigint_held: this is what quiets it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextlib.contextmanager
def sigint_held():
    """SIGINT held off while processes are started in the block, so they start with it blocked (a blocked
    signal mask survives exec: a Ctrl-C while a worker imports is quiet; its initializer then ignores SIGINT,
    which discards one pending). A Ctrl-C meanwhile is this process's still: raised when the block ends.
    SIG_IGN here instead discarded it, and `index` went on to finish with exit 0."""
    caught: list[int] = []
    main = threading.current_thread() is threading.main_thread()  # signal.signal is the main thread's
    # the main thread records one that another thread of this process took (its mask is not blocked)
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum)) if main else None
    previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)  # one pending is handled here, into caught
        if main:
            signal.signal(signal.SIGINT, previous)
            if caught:
                signal.raise_signal(signal.SIGINT)  # as the handler before the block handles it


def spawn_pool(workers: int):
    """A spawn-context Pool whose workers hold SIGINT off from their first instruction (a blocked signal
    survives exec) until their initializer ignores it, so a Ctrl-C while they import is quiet too; they end
    with this process. The parent holds SIGINT off only while it starts them (milliseconds)."""
    context = multiprocessing.get_context("spawn")
    with sigint_held():
        return context.Pool(workers, initializer=quiet_worker)
