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
