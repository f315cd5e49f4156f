"""`python -m alignsearch` and the `alignsearch` command (pyproject.toml [project.scripts] names run).

A Ctrl-C while the CLI still imported (its first tenth of a second, before any of its handlers existed) printed
Python's KeyboardInterrupt traceback, one while click parsed the arguments its "Aborted!" (exit 1), and one as
a finished command's interpreter closed killed it by the signal (exit -2) or printed a traceback from an exit
handler. Here a Ctrl-C before the command ends is said as one anywhere else is, in the one line
`error: interrupted` and exit 130, and one after it has ended is ignored: its exit code stands. Only the
interpreter's own start (site, runpy) comes before this module. Nothing is imported at the top: each import
is time in which a Ctrl-C would not be caught."""

import sys


def run() -> None:
    """The CLI, ended by SystemExit. Called as the program (the console script, `python -m`), the process ends
    with it and SIGINT is ignored from then on; a Python caller's own SIGINT is left as it was, unless a Ctrl-C
    stopped the command (ignored then, as the CLI does in process)."""
    try:
        process_ends = sys._getframe(1).f_globals.get("__name__") == "__main__"
        try:
            from alignsearch.surfaces.cli import main

            main(prog_name="alignsearch")
        except SystemExit:  # the command has ended (click ends every one so) and said what it had to
            if process_ends:
                _ignore_sigint()
            raise
    except KeyboardInterrupt:
        _ignore_sigint()
        # A KeyboardInterrupt out of a string exec (a dataclass made as the CLI imports) is noted by CPython as
        # unhandled even once caught; under `python -m` the process then ended by SIGINT (-2), not 130. Each
        # string exec clears the note (as surfaces/cli.py's _interrupt_handled, not imported here: it may be
        # what was being imported).
        exec("")
        try:
            sys.stderr.write("error: interrupted\n")  # the CLI's own words for it (surfaces/cli.py, _Main.invoke)
            sys.stderr.flush()
        except (OSError, ValueError, AttributeError):  # stderr closed or gone: the exit code still says it
            pass
        sys.exit(130)


def _ignore_sigint() -> None:
    """SIGINT ignored until the process ends. Kept so through the interpreter's finalization, which puts a
    Python handler back to the system default (a Ctrl-C then killed the process unsaid). A Ctrl-C that lands
    before it is caught and the step tried again (a key pressed twice, a terminal's to the process group)."""
    while True:
        try:
            import signal

            signal.signal(signal.SIGINT, signal.SIG_IGN)
            return
        except KeyboardInterrupt:
            continue
        except ValueError:  # not the main thread (run called by a caller's thread): not ours to handle
            return


if __name__ == "__main__":
    run()
