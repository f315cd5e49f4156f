"""Logging for the `alignsearch` command, set up in one place for every subcommand (`serve` included).

The level: `-v` info, `-vv` debug (the top-level option), or the level named by ALIGNSEARCH_LOG (debug,
info, warning, error, critical: `error` hides warnings); the more verbose of the two wins, WARNING when
neither is given. Logs go to stderr, never stdout (which carries the commands' output). At WARNING a
record is its message alone, as Python prints a warning nobody configured for; asked-for logs name their
level and logger.

Library modules only log (`logging.getLogger(__name__)`); nothing but the CLI calls configure().
"""

from __future__ import annotations

import logging
import os
import sys

ENV = "ALIGNSEARCH_LOG"
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "warn": logging.WARNING,
          "error": logging.ERROR, "critical": logging.CRITICAL}
PLAIN = "%(message)s"
DETAILED = "%(levelname)s %(name)s: %(message)s"


def level_for(verbose: int, named: str | None) -> tuple[int, str | None]:
    """The level for `verbose` -v options and an ALIGNSEARCH_LOG value, and what is wrong with that value
    (None when it is usable or absent)."""
    from_flags = None if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    from_env, problem = None, None
    if named and named.strip():
        from_env = LEVELS.get(named.strip().lower())
        if from_env is None:
            problem = f"{ENV}={named!r} is not a level name ({', '.join(n for n in LEVELS if n != 'warn')}): ignored"
    given = [level for level in (from_flags, from_env) if level is not None]
    return (min(given) if given else logging.WARNING), problem


class _Stderr(logging.StreamHandler):
    """Writes to sys.stderr as it is when a record comes, not as it was when logging was configured: a
    test runner (click's) swaps it per invocation, and a stream kept from then would be closed."""

    def __init__(self):
        logging.Handler.__init__(self)

    @property
    def stream(self):
        return sys.stderr


def not_an_interrupt(record: logging.LogRecord) -> bool:
    """False for a record of a Ctrl-C that a library logged on its way (SQLAlchemy's pool logs "Exception
    closing connection" with a KeyboardInterrupt it then re-raises): the interrupt goes on up and the
    command says it stopped, without a traceback."""
    return not (record.exc_info and isinstance(record.exc_info[1], KeyboardInterrupt))


_handler: _Stderr | None = None


def configure(verbose: int = 0) -> int:
    """Set the root logger's level and its one stderr handler (replaced, not added, when called again) from
    `verbose` and ALIGNSEARCH_LOG; returns the level."""
    global _handler
    level, problem = level_for(verbose, os.environ.get(ENV))
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
    _handler = _Stderr()
    _handler.addFilter(not_an_interrupt)
    _handler.setFormatter(logging.Formatter(PLAIN if level >= logging.WARNING else DETAILED))
    root.addHandler(_handler)
    root.setLevel(level)
    # faiss's loader logs at INFO each build it tries, with a ModuleNotFoundError for each one this CPU lacks
    # (faiss.swigfaiss_avx2): alarming and not ours at -v; shown from -vv (DEBUG)
    logging.getLogger("faiss").setLevel(logging.WARNING if level > logging.DEBUG else logging.NOTSET)
    if problem:
        logging.getLogger(__name__).warning("note: %s", problem)
    return level
