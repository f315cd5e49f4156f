"""Decode worker processes that a Ctrl-C does not reach.

A terminal sends SIGINT to the whole process group: every spawned worker raised KeyboardInterrupt and printed
its traceback before the command's one line `error: interrupted`. Workers ignore SIGINT instead; the command
itself stops on it and terminates them (Pool.terminate: SIGTERM, which ends them quietly)."""

from __future__ import annotations

import contextlib
import multiprocessing
import signal
import threading


def ignore_sigint() -> None:
    """Pool initializer: a worker the pool starts later (after one died) does not inherit SIG_IGN."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextlib.contextmanager
def sigint_ignored():
    """SIGINT ignored in this process while processes are started in the block, so they start ignoring it (an
    ignored signal survives exec: a Ctrl-C while a worker imports is quiet)."""
    if threading.current_thread() is not threading.main_thread():
        # signal.signal is the main thread's; a blocked signal mask is this thread's, and a child inherits it
        # (the worker's initializer then ignores SIGINT, which discards one pending)
        previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def spawn_pool(workers: int):
    """A spawn-context Pool whose workers ignore SIGINT from their first instruction: an ignored signal
    survives exec and Python then installs no KeyboardInterrupt handler, so a Ctrl-C while they import is
    quiet too. The parent ignores SIGINT only while it starts them (milliseconds)."""
    context = multiprocessing.get_context("spawn")
    if threading.current_thread() is not threading.main_thread():  # signal.signal works in the main thread only
        return context.Pool(workers, initializer=ignore_sigint)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return context.Pool(workers, initializer=ignore_sigint)
    finally:
        signal.signal(signal.SIGINT, previous)
