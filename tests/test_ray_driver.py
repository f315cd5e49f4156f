"""The Ray driver's decisions that need no Ray started (indexer/ray_pipeline.py): the SIGTERM handler ray.init
installs is taken back out whatever ray.init does, and an actor that cannot load the model is told apart from
one that died on a batch."""

from __future__ import annotations

import signal
import sys
import types

import pytest

from alignsearch.errors import AlignSearchError, BadInputError, ModelLoadError
from indexer import ray_pipeline


def _rays_handler(signum, frame):
    sys.exit(signum)


def fake_ray(error: BaseException):
    """A `ray` whose init does what Ray's does first (its own SIGTERM handler), then fails with `error`."""
    def init(**kwargs):
        signal.signal(signal.SIGTERM, _rays_handler)
        raise error
    return types.SimpleNamespace(is_initialized=lambda: False, init=init)


@pytest.fixture
def sigterm_kept():
    before = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, before)


@pytest.mark.parametrize("error, raised", [(ConnectionError("no cluster at 10.0.0.9:6379"), BadInputError),
                                           (RuntimeError("Ray's own failure"), RuntimeError),
                                           (KeyboardInterrupt(), KeyboardInterrupt)])
@pytest.mark.parametrize("before", [signal.SIG_DFL, signal.SIG_IGN, "a handler"])
def test_a_failed_ray_init_leaves_sigterm_as_it_was(monkeypatch, sigterm_kept, error, raised, before):
    """`index --watch --ray=ADDR` with a cluster it cannot reach: ray.init's handler (sys.exit) stayed, and the
    watch's SIGTERM ended the process by exit 15 without its "watch stopped" line."""
    def watchs_handler(signum, frame):
        pass

    before = watchs_handler if before == "a handler" else before
    signal.signal(signal.SIGTERM, before)
    monkeypatch.setitem(sys.modules, "ray", fake_ray(error))
    with pytest.raises(raised):
        ray_pipeline.run_ray([object()], "model", "cpu", None, None, None, 8, address="10.0.0.9:6379")
    assert signal.getsignal(signal.SIGTERM) is before


def test_an_ignored_sigterm_stays_ignored_while_held(sigterm_kept):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    held = ray_pipeline._HeldSigterm()
    signal.signal(signal.SIGTERM, _rays_handler)  # ray.init's
    held.hold()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    held.release()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN


def test_an_actor_that_cannot_load_the_model_is_a_model_load_error():
    """A model path not visible on a node, out of GPU memory at load: Ray reports the actor's constructor
    failed. It was told as a batch that killed its actor 3 times (exit 1); it is the model that cannot load
    (exit 4)."""
    exceptions = pytest.importorskip("ray.exceptions")
    try:
        raise FileNotFoundError("no model at /models/align")
    except FileNotFoundError as exc:
        cause = exceptions.RayTaskError("EncoderActor.__init__", "Traceback (most recent call last):\n  ...\n"
                                        "FileNotFoundError: no model at /models/align", exc)
    failed = ray_pipeline.actor_failure(exceptions.ActorDiedError(cause))
    assert isinstance(failed, ModelLoadError) and failed.exit_code == 4
    assert "could not load the model: FileNotFoundError: no model at /models/align" in str(failed)

    died = ray_pipeline.actor_failure(exceptions.ActorDiedError())
    assert type(died) is AlignSearchError and "died on the same batch 3 times" in str(died)


@pytest.mark.slow
def test_ray_is_shut_down_once_the_runs_threads_have_ended_or_parked():
    """Ray Data leaves its iterator's threads running when the iterator is closed (a stop part way): Ray shut down
    under one still in a Ray call ended the process at once (exit 1, "The core worker has already been shutdown").
    _settle waits for each thread the run started until it has ended or is parked (a queue's get, an Event or a
    Condition waited on with no timeout: nothing left running can wake it), and no longer than its deadline."""
    import queue
    import threading
    import time

    before = set(threading.enumerate())
    stop, never, waited_on = threading.Event(), threading.Event(), queue.Queue()
    polling_until_stopped = threading.Thread(target=lambda: [stop.wait(0.01) for _ in iter(stop.is_set, True)],
                                             daemon=True)
    parked = [threading.Thread(target=never.wait, daemon=True),
              threading.Thread(target=waited_on.get, daemon=True)]
    for t in [polling_until_stopped, *parked]:
        t.start()
    assert ray_pipeline._settle(before, seconds=0.3) == [polling_until_stopped]  # still polling at the deadline
    threading.Timer(0.2, stop.set).start()
    started = time.monotonic()
    assert ray_pipeline._settle(before, seconds=30) == []
    assert not polling_until_stopped.is_alive() and all(t.is_alive() for t in parked)
    assert time.monotonic() - started < 10  # not the deadline: as soon as only parked threads were left
    never.set()
    waited_on.put(None)
