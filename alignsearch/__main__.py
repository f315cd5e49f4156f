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
    try:
        try:
            from alignsearch.surfaces.cli import main

            main(prog_name="alignsearch")
        except SystemExit:  # the command has ended (click ends every one so) and said what it had to
            _ignore_sigint()
            raise
    except KeyboardInterrupt:
        _ignore_sigint()
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
