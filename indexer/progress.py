"""Progress of a long run on stderr: tqdm's bar on a terminal; elsewhere (piped, nohup, a log file) one
plain line every ALIGNSEARCH_PROGRESS_SECONDS (default 5) with files done, rate and ETA, and a last one."""

from __future__ import annotations

import logging
import math
import os
import sys
import time

from alignsearch import notices


def bar(total: int | None = None, desc: str = "", enabled: bool = True):
    """An object with update(n) and close(): a tqdm bar when stderr is a TTY, else a LineProgress."""
    if enabled and not sys.stderr.isatty():
        return LineProgress(total, desc)
    from tqdm import tqdm

    return tqdm(total=total, unit="img", disable=not enabled, desc=desc)


DEFAULT_SECONDS = 5.0


def interval_from_env() -> float:
    """ALIGNSEARCH_PROGRESS_SECONDS, else DEFAULT_SECONDS. A value that is not a number of seconds (a typo) is
    said in one note and the default kept: it ended an `index` run with "unexpected ValueError" (exit 1), after
    its files were listed, as logs.configure treats a bad ALIGNSEARCH_LOG."""
    raw = os.environ.get("ALIGNSEARCH_PROGRESS_SECONDS")
    if raw is None:
        return DEFAULT_SECONDS
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds < 0:
        logging.getLogger(__name__).warning("note: ALIGNSEARCH_PROGRESS_SECONDS=%r is not a number of seconds: "
                                            "every %g s instead", raw, DEFAULT_SECONDS)
        return DEFAULT_SECONDS
    return seconds


class LineProgress:
    def __init__(self, total: int | None, desc: str, interval: float | None = None, stream=None):
        self.total, self.desc, self.n = total, desc, 0
        self.interval = interval_from_env() if interval is None else interval
        self.stream = stream or sys.stderr
        self.started = self.last = time.monotonic()
        self.closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self._print(now)

    def close(self) -> None:
        if not self.closed and self.n:
            self._print(time.monotonic())
        self.closed = True

    def _print(self, now: float) -> None:
        elapsed = max(now - self.started, 1e-9)
        rate = self.n / elapsed
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        line = f"{self.desc}: {done} files, {rate:.1f} img/s"
        if self.total:
            left = (self.total - self.n) / rate if rate > 0 else 0
            line += f", ETA {_clock(left)}"
        line += f", {_clock(elapsed)} elapsed"
        try:
            notices.write_line(self.stream, line)
        except (OSError, ValueError):  # stderr gone (closed pipe): progress is not worth failing for
            pass


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
