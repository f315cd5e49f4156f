"""One line on stderr when a first use makes the user wait (exporting, quantizing or compiling the towers,
measuring engines, finishing an index run): said once, piped or not. The CLI turns it on for commands whose
stdout is not JSON (it is off by default, so the Python API and `--json` stay quiet)."""

from __future__ import annotations

import sys

_state = {"on": False, "said": set()}


def enable(on: bool = True) -> None:
    _state["on"] = on
    _state["said"] = set()


def say(message: str) -> None:
    """Print message on stderr once per command (when enabled)."""
    if not _state["on"] or message in _state["said"]:
        return
    _state["said"].add(message)
    try:  # the process's own stderr: a caller capturing sys.stderr as output (click's runner) gets no notices mixed in
        write_line(sys.__stderr__ or sys.stderr, message)
    except (OSError, ValueError):  # stderr gone: not worth failing for
        pass


def write_line(stream, text: str) -> None:
    """text and its newline in one write, then a flush. print() writes them apart, and a Ctrl-C between the two
    (198 of 200 tries with a line printed in a loop) left the line open: the "error: interrupted" said next
    was glued to its end, so the command's last line was not that error."""
    stream.write(text + "\n")
    stream.flush()
