"""The `alignsearch` command: a thin layer over the Python API.

Exit codes: 0 done (per-file failures are listed, not fatal; also when the reader of the output goes
away, as with `| head -1`: the rest is dropped quietly; a pipe of our own that broke is an error), 1
unexpected error (one line; ALIGNSEARCH_DEBUG=1 shows the traceback), 2 bad usage, 3 no index, 4 model
cannot be loaded, 5 model differs from the index's, 6 unusable input (a query argument, a query image
that is not a regular file of sane size, a root that cannot be listed, a root not in the index, an index
another process is writing), 7 the index is damaged or inconsistent (`verify` found problems, a catalog
that is not a database). Each error class carries its code (alignsearch/errors.py), the server's HTTP
status beside it; alignsearch/surfaces/boundary.py says which class an exception means.

Logging: -v info, -vv debug, or ALIGNSEARCH_LOG=LEVEL, for every command (alignsearch/logs.py); on stderr.
"""

from __future__ import annotations

import errno
import base64
import json
import logging
import math
import os
import re
import signal
import sys
from functools import wraps

import click

from alignsearch.encoders.backend import BACKENDS, PRECISIONS, EncoderOptions, torch_free_text
from alignsearch.errors import AlignSearchError, BadInputError

log = logging.getLogger(__name__)


class _IndexDir(click.Path):
    """--index: a folder, or where one will be made. A name no folder can ever be at (a symlink loop, a path
    through a file) is refused here, as one naming a file is (exit 2), not as a failure deep in a command."""

    _NEVER = {errno.ELOOP: "is a symlink loop", errno.ENOTDIR: "goes through a file"}

    def convert(self, value, param, ctx):
        path = super().convert(value, param, ctx)
        try:
            os.stat(path)
        except OSError as exc:
            if exc.errno in self._NEVER:
                self.fail(f"Directory {click.format_filename(value)!r} {self._NEVER[exc.errno]}.", param, ctx)
        return path


class _FiniteRange(click.FloatRange):
    """click.FloatRange that refuses NaN and infinity (exit 2): its bounds compare false with NaN, so `--lr nan`
    passed the parser and failed once the data and the model were loaded ("unexpected ValueError", exit 1), and an
    unbounded side took inf (`--watch-interval inf`: a watch that never looks again)."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


index_option = click.option(
    "--index", "index_dir", envvar="ALIGNSEARCH_INDEX", type=_IndexDir(file_okay=False),
    help="Index directory (default: the nearest .alignsearch/ in this folder or above; env ALIGNSEARCH_INDEX).",
)
model_option = click.option("--model", default=None, help="ALIGN checkpoint: hub id or local directory (default: the index's own).")
device_option = click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)


def run_options(fn):
    """--device, --backend and --precision: how the model runs (alignsearch/encoders/backend.py holds the rules)."""
    fn = click.option("--precision", type=click.Choice(list(PRECISIONS)), default="auto", show_default=True,
                      help="auto: fp32 (exact) on CPUs, bf16 on GPUs; bf16: faster on CPUs with BF16 instructions "
                           "(OpenVINO there); int8: the text tower quantized (queries only).")(fn)
    fn = click.option("--backend", type=click.Choice(list(BACKENDS)), default="auto", show_default=True,
                      help="auto: on CPUs ONNX Runtime for text, and for images the engine measured fastest here "
                           "(ONNX Runtime, OpenVINO or torch; same vectors); torch on GPUs.")(fn)
    return device_option(fn)


def _quiet_transformers() -> None:
    # Through the environment, not by importing transformers (a second and a half): a text query on the
    # cached ONNX tower never loads it. model.Encoder applies the progress-bar half when it loads.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def reports_errors(fn):
    """Turn AlignSearchError into a one-line message and its exit code, not a traceback."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except AlignSearchError as exc:
            _fail(click.get_current_context(), str(exc), exc.exit_code)

    return wrapper


class _Command(click.Command):
    """Every command: an option that takes one value given twice is refused (exit 2). click keeps the last
    silently, so `similarity --text a --text b` measured b alone, and `-k 5 ... -k 50` searched for 50."""

    def parse_args(self, ctx, args):
        if not ctx.resilient_parsing:  # shell completion parses partial lines: nothing to refuse there
            # the parser only splits the line (no conversion, no callback): run once more for the order it saw
            _, _, order = self.make_parser(ctx).parse_args(args=list(args))
            seen = set()
            for param in order:
                if isinstance(param, click.Option) and not (param.multiple or param.count or param.is_flag):
                    if param.name in seen:
                        raise click.UsageError(f"{param.opts[-1]} is given more than once: it takes one value", ctx)
                    seen.add(param.name)
        return super().parse_args(ctx, args)


class _Main(click.Group):
    """Every error ends in one line and a documented exit code (see the module docstring), never a
    traceback; output into a closed pipe (`| head -1`) ends quietly with exit 0."""

    command_class = _Command

    def main(self, *args, **kwargs):
        _hold_std_fds()
        if getattr(sys.stdout, "errors", None) == "strict" and hasattr(sys.stdout, "reconfigure"):
            # a terminal in a locale such as ISO-8859-1: a name it cannot show is escaped (\u4f60), not the
            # end of the command (`unexpected UnicodeEncodeError` for one result's name)
            sys.stdout.reconfigure(errors="backslashreplace")
        return super().main(*args, **kwargs)

    def make_context(self, *args, **kwargs):
        # The top-level options are parsed here, outside invoke (an eager --version, --help), where click's
        # own handler would end a Ctrl-C in "Aborted!" and exit 1.
        try:
            return super().make_context(*args, **kwargs)
        except KeyboardInterrupt:
            _ignore_sigint_until_exit()
            if kwargs.get("resilient_parsing"):  # shell completion: click's main runs it outside its handler
                _say_error("interrupted")
                sys.exit(130)
            _fail(click.Context(self), "interrupted", 130)

    def invoke(self, ctx):
        try:
            from alignsearch import notices

            notices.enable(False)  # each command turns on its waits' notices (never under --json)
            result = super().invoke(ctx)
            sys.stdout.flush()  # a closed pipe shows here, not as a warning at interpreter exit
            return result
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except AlignSearchError as exc:
            _fail(ctx, str(exc), exc.exit_code)
        except KeyboardInterrupt:
            _ignore_sigint_until_exit()
            _fail(ctx, "interrupted", 130)
        except Exception as exc:
            epipe = isinstance(exc, OSError) and exc.errno == errno.EPIPE
            if epipe and _stdout_gone():
                _quiet_stdout()
                ctx.exit(0)
            if os.environ.get("ALIGNSEARCH_DEBUG"):
                if epipe:  # click would end an EPIPE quietly with exit 0: shown here instead
                    import traceback

                    traceback.print_exc()
                    ctx.exit(1)
                raise
            log.debug("%s failed", ctx.invoked_subcommand, exc_info=exc)  # -vv: the traceback, in the log
            if epipe:  # a pipe of our own (a worker's, multiprocessing's resource tracker) broke: a failure
                _fail(ctx, f"unexpected {type(exc).__name__}: {exc} (ALIGNSEARCH_DEBUG=1 shows the traceback)", 1)
            from alignsearch.surfaces.boundary import library_error

            known = library_error(exc)
            if known is not None:
                _fail(ctx, str(known), known.exit_code)
            if isinstance(exc, OSError) and exc.strerror:
                where = f": {exc.filename}" if exc.filename else ""
                _fail(ctx, f"{exc.strerror}{where}", 1)
            _fail(ctx, f"unexpected {type(exc).__name__}: {exc} (ALIGNSEARCH_DEBUG=1 shows the traceback)", 1)


def _ignore_sigint_until_exit() -> None:
    """Stopped by Ctrl-C, the command says so in one line and ends: a second Ctrl-C as it closes (a key pressed
    twice, a terminal's to the whole process group) would raise KeyboardInterrupt past that line, or, once Python's
    finalization has put SIGINT back to the system default, kill the process by the signal (exit -2) unsaid."""
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread (a caller's): the signal is not this command's to handle
        pass
    _interrupt_handled()


def _interrupt_handled() -> None:
    """A Ctrl-C that landed in a string exec or eval (a dataclass or namedtuple made as a module imports, in any
    library) ended it with KeyboardInterrupt, which CPython notes as unhandled even once caught, and under
    `python -m alignsearch` then ends the process by SIGINT (status -2, not the command's exit code) after
    finalization (pythonrun.c run_eval_code_obj, main.c Py_RunMain). Each string exec clears the note first."""
    exec("")


def _hold_std_fds() -> None:
    """A standard stream started closed (`>&-`, `2>&-`) is /dev/null: Python leaves sys.stdout None (the command
    failed on its first print or flush, `index` before it began) and the descriptor free, so the next file
    opened took its number (the index's write.lock, its catalog), to be written by whatever writes there: a
    library's printf, a decode worker's traceback."""
    streams = {0: ("stdin", "r"), 1: ("stdout", "w"), 2: ("stderr", "w")}
    for fd, (name, mode) in streams.items():
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)  # the lowest free number: fd itself, as the lower ones are open
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
            if getattr(sys, name) is None:
                setattr(sys, name, open(fd, mode, encoding="utf-8", errors="backslashreplace", closefd=False))  # noqa: SIM115 - the stream stays open, as sys.stdout does


def _stdout_gone() -> bool:
    """Has the reader of stdout gone away (`| head -1`)? Only then does a broken pipe mean "stop quietly":
    poll reports POLLERR on the write end of a pipe whose reader closed it. Any other pipe that broke
    (a worker's, multiprocessing's resource tracker) is an error like any other."""
    import select

    try:
        fd = sys.stdout.fileno()
        poller = select.poll()
        poller.register(fd, 0)  # POLLERR and POLLHUP are always reported
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (AttributeError, ValueError, OSError):  # no real stdout (tests)
        return False


# Characters a terminal acts on rather than shows: C0 and C1 controls (newline, ESC starting an ANSI sequence,
# carriage return), DEL, the line and paragraph separators, and the bidirectional overrides that reorder
# what follows them.
_UNSHOWABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _shown(text) -> str:
    """A file name, tag label or message as text output prints it: one line that cannot drive the terminal.
    Control characters become Python escapes (\\n, \\x1b), bytes that are not UTF-8 \\xNN. JSON output is
    already safe and keeps the exact strings; --paths keeps the exact bytes."""
    text = str(text)
    try:
        text = os.fsencode(text).decode("utf-8", "backslashreplace")  # names that are not UTF-8
    except UnicodeEncodeError:  # a lone surrogate that no file name decodes to
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return _UNSHOWABLE.sub(lambda m: repr(m.group())[1:-1], text)


def _json_name(path):
    """A path the user gave, as JSON output echoes it: bytes that are not UTF-8 as \\xNN, as hits show `path`
    (docs/json.md). os.fsdecode's lone surrogates (\\udcff) are no Unicode text: strict JSON readers refuse them."""
    if path is None or isinstance(path, bool):
        return path
    try:
        return os.fsencode(path).decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that no file name decodes to: kept as it was given
        return path


def _with_path_b64(entry: dict) -> dict:
    """A JSON entry naming an indexed file, its `path` as hits give it (docs/json.md): a name that is not UTF-8 with
    its bytes as \\xNN, and whole in `path_b64`, so a script can open (or delete, for dupes) the very file. It
    carried os.fsdecode's lone surrogates (\\udcff), which strict JSON readers refuse."""
    from alignsearch.storage.catalog import shown_path

    path, b64 = shown_path(entry["path"])
    return {**entry, "path": path, **({"path_b64": b64} if b64 else {})}


def _quiet_stdout() -> None:
    """The reader went away: send whatever is still buffered to /dev/null instead of raising again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no real stdout (tests): nothing to flush
        pass


def _fail(ctx, message: str, code: int):
    _say_error(message)
    ctx.exit(code)


def _say_error(message: str) -> None:
    try:
        click.echo(f"error: {_shown(' '.join(str(message).split()))}", err=True)
    except BrokenPipeError:
        pass


def _image_file(ctx, param, value):
    """A query image must be a regular file under the size cap: a FIFO, a device (/dev/zero) or a folder
    would block or never end; refused at once (exit 6)."""
    paths = value if isinstance(value, tuple) else (value,) if value is not None else ()
    for path in paths:
        from alignsearch.media import sources
        from alignsearch.errors import BadInputError

        try:
            problem = sources.unusable(os.stat(path))
        except OSError as exc:
            raise BadInputError(f"cannot use image {path}: {exc.strerror or exc}") from None
        if problem:
            raise BadInputError(f"cannot use image {path}: {problem}")
    return value


@click.group(cls=_Main)
@click.version_option(package_name="alignsearch")
@click.option("-v", "--verbose", count=True,
              help="Log on stderr: -v what happens (info), -vv debug (env ALIGNSEARCH_LOG=LEVEL also).")
def main(verbose: int) -> None:
    """Semantic search over image folders with ALIGN: index once, query by text, image, or both."""
    from alignsearch import logs

    logs.configure(verbose)


@main.command()
@click.argument("roots", nargs=-1)
@index_option
@model_option
@run_options
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Images per encoder batch (default 32 on CPU, 256 on CUDA).")
@click.option("--workers", type=click.IntRange(min=0), default=None, help="Decode processes (default: cores - 1; 0 decodes in-process).")
@click.option("--include-hidden/--exclude-hidden", default=None,
              help="Also index hidden files and folders of the roots given (all roots when none is given); "
                   "remembered per root, --exclude-hidden turns it off.")
@click.option("--rebuild", is_flag=True, help="Retrain the ANN index from the stored vectors.")
@click.option("--reindex", is_flag=True, help="Encode every file again, e.g. with a new --model.")
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
              help="Run on Ray Data: a local instance, or the cluster at --ray=ADDRESS (pip install '.[ray]'). "
                   "Put a bare --ray after the folders.")
@click.option("--ondisk-shards", type=click.IntRange(min=0), default=None,
              help="Build IVF-PQ from N shards in parallel, lists on disk and memory-mapped (0: off; remembered).")
@click.option("--index-shards", type=click.IntRange(min=0), default=None,
              help="Keep IVF-PQ as N shard files searched together (faiss IndexShards, memory-mapped), "
                   "updated in place (0: one file; remembered).")
@click.option("--fast-decode", is_flag=True,
              help="Decode JPEGs at reduced scale (Pillow draft): faster on big photos, pixels differ slightly.")
@click.option("--gpu-decode/--no-gpu-decode", default=None,
              help="With a CUDA encoder: decode JPEGs on the GPU (nvJPEG, needs torchvision; on by default where it "
                   "works). --no-gpu-decode keeps the exact CPU decode.")
@click.option("--list-column", default=None, metavar="NAME",
              help="For a .csv/.parquet list root: the column of paths or URLs (default: path, url, uri, image...).")
@click.option("--caption-column", default=None, metavar="NAME",
              help="A list's caption column (default: caption, text or alt when present); remembered.")
@click.option("--video-interval", type=float, default=None, metavar="SECONDS",
              help="Videos: a moment at each scene cut and at least one every SECONDS (default 10); remembered.")
@click.option("--ocr/--no-ocr", default=None,
              help="Read the text in images for keyword search (pip install 'alignsearch[ocr]'); remembered. "
                   "--no-ocr stops reading; text already read stays searchable.")
@click.option("--compact/--no-compact", default=None,
              help="Reclaim the vector rows of deleted, changed and forgotten files now (--compact) or never "
                   "(--no-compact); by default when they are at least half the store and 65,536 rows.")
@click.option("--watch", is_flag=True,
              help="After the run, keep watching the local roots (folders, list and shard files) and index again once "
                   "changes settle, until Ctrl-C or SIGTERM. URL roots are not watched. With --json: one JSON object "
                   "per run, one line each (JSON lines).")
@click.option("--watch-polling", is_flag=True,
              help="With --watch: look for changes by polling, for network drives (NFS, SMB) where change "
                   "notifications miss other machines' writes (default: polling where the root is on one).")
@click.option("--watch-interval", type=_FiniteRange(min=1), default=None, metavar="SECONDS",
              help="With --watch and URL roots (s3://..., which cannot be watched): list them again this often.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON (with --watch: one line per run).")
@reports_errors
def index(roots, index_dir, model, device, backend, precision, batch_size, workers, include_hidden, rebuild, reindex, ray_address,
          ondisk_shards, index_shards, fast_decode, gpu_decode, list_column, caption_column, video_interval, ocr, compact,
          watch, watch_polling, watch_interval, as_json):
    """Index the images under ROOTS (and every root this index already holds).

    A root is a folder, a .csv/.parquet list of paths or URLs, WebDataset .tar shards
    (shards-{000..099}.tar), or a URL prefix such as s3://bucket/photos (needs s3fs; any fsspec
    protocol). Re-runs encode only new and changed files; moved or renamed files keep their vectors.
    """
    _quiet_transformers()
    from alignsearch import notices
    from indexer.job import index_folders  # the write path lives outside the core package

    notices.enable(not as_json)

    job = dict(
        index_dir=index_dir, model=model, device=device, batch_size=batch_size, workers=workers,
        include_hidden=include_hidden, rebuild=rebuild, reindex=reindex, progress=not as_json,
        use_ray=ray_address is not None, ray_address=None if ray_address in (None, "local") else ray_address,
        ondisk_shards=ondisk_shards, index_shards=index_shards, fast_decode=fast_decode, list_column=list_column,
        caption_column=caption_column, backend=backend, precision=precision, video_interval=video_interval,
        ocr=ocr, gpu_decode=gpu_decode, compact=compact,
    )
    if (watch_polling or watch_interval) and not watch:
        raise click.UsageError(f"{'--watch-polling' if watch_polling else '--watch-interval'} goes with --watch")
    if watch:
        from indexer.watch import WatchOptions, watch_index

        code = watch_index(list(roots), job, WatchOptions(polling=True if watch_polling else None,
                                                       interval_s=watch_interval, process_ends=True), index_folders,
                           lambda s, facts, error: _say_watch_run(s, facts, error, as_json),
                           lambda line: click.echo(_shown(line), err=True))
        _interrupt_handled()  # the watch caught its Ctrl-C itself
        click.get_current_context().exit(code)
    _say_index(index_folders(list(roots), **job), as_json)


def _say_watch_run(s, facts: dict, error: BaseException | None, as_json: bool) -> None:
    """One run of `index --watch`: its summary (a JSON line with --json), or its error in one line."""
    if error is not None:
        message = " ".join(str(error).split()) or type(error).__name__
        click.echo(f"error: run {facts['run']} failed: {_shown(message)} (the watch goes on)", err=True)
        if as_json:
            click.echo(json.dumps({"watch": facts, "error": message}))
    elif as_json:
        click.echo(json.dumps({**s.to_dict(), "watch": facts}))
    else:
        if facts["run"] > 1:
            click.echo(f"run {facts['run']}: {facts['changes']} change(s) in {', '.join(map(_shown, facts['roots'])) or 'the roots'}")
        _say_index(s, False)
    sys.stdout.flush()


def _count(n: int, noun: str) -> str:
    """`1 image`, `2 images`: what a summary line counts."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _say_index(s, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(s.to_dict(), indent=2))
        return
    for note in s.notes:
        click.echo(f"note: {note}")
    # a sidecar caption edited beside an unchanged photo changes what keyword search finds: said, not "nothing changed"
    recaptioned = s.times.get("extra", {}).get("captions_read_again", 0)
    if s.added + s.updated + s.moved + s.removed + s.failed + s.reencoded + recaptioned == 0:
        click.echo(f"nothing changed ({s.unchanged} unchanged)")
    else:
        click.echo(f"{s.added} added, {s.updated} updated, {s.moved} moved, {s.removed} removed, "
                   f"{s.failed} failed, {s.unchanged} unchanged")
    if recaptioned:
        click.echo(f"{_count(recaptioned, 'caption')} read again: made, edited or removed beside an unchanged photo")
    if s.reencoded:  # --reindex: every file encoded again, which the counts above (changes on disk) do not show
        click.echo(f"{s.reencoded} re-encoded (a new generation)")
    if s.ocr.get("read"):
        held = s.ocr.get("with_text", 0)
        click.echo(f"text read in {_count(s.ocr['read'], 'image')} ({_count(held, 'indexed image')} "
                   f"{'holds' if held == 1 else 'hold'} text)")
    if any(s.fill_failures.values()):
        click.echo(_fill_failures_line(s.fill_failures))
    for root in s.no_images:
        click.echo(f"no images found in {_shown(root)}")
    if s.listing_errors:
        click.echo(f"{len(s.listing_errors)} folder(s) could not be listed; the {s.kept} files indexed under them "
                   "stay in the index until they list again:")
        for e in s.listing_errors:
            click.echo(f"  {_shown(e['folder'])}: {_shown(e['reason'])}")
    click.echo(f"index: {s.index['plan']['kind']} with {s.index['vectors']} vectors ({s.index['action']}) in {s.index_dir}")
    _say_compacted(s.compacted)
    if s.failed:
        click.echo("see the failures with: alignsearch info --failed", err=True)


def _fill_failures_line(counts: dict) -> str:
    """What fill steps could not read ({step: files}), as `index` and `info` say it."""
    said = ", ".join(f"{n} for {FILL_WORDS.get(step, step)}" for step, n in counts.items() if n)
    return f"files that could not be read again: {said} (skipped until they change: alignsearch info --failed)"


FILL_WORDS = {"ocr": "text", "phash": "perceptual hashes"}  # catalog.FILL_STEPS, in words


def _say_compacted(done: dict | None) -> None:
    if done:
        click.echo(f"vectors compacted: {done['rows_after']} rows kept of {done['rows_before']}, "
                   f"{done['bytes_freed'] / 2**20:.1f} MiB freed")


def listed_paths(hits: list[dict]) -> list[bytes]:
    """The files --paths lists for hits: each path's exact bytes once, where it first ranks. A video's moments
    (up to --per-video of them) are one file: printed once per moment, `query --paths | xargs cp -t DIR` copied
    it again over itself (cp refuses that, or warns), `xargs rm` failed on the second."""
    seen: dict[bytes, None] = {}
    for h in hits:
        seen.setdefault(base64.b64decode(h["path_b64"]) if h.get("path_b64") else os.fsencode(h["path"]))
    return list(seen)


def _print_hits(query: dict, hits: list[dict], as_json: bool, paths: str | None = None, explain: bool = False) -> None:
    """JSON, a ranked list, or (paths "\n" or "\0") the paths alone as raw bytes, for `xargs` and scripts."""
    plan = query.pop("plan", None)
    if paths is not None:
        out = sys.stdout.buffer
        for path in listed_paths(hits):
            out.write(path + paths.encode())
        out.flush()
        return
    if as_json:
        click.echo(json.dumps({"query": query, "results": hits, **({"plan": plan} if plan else {})}, indent=2))
        return
    if not hits:
        click.echo("no results")
    for rank, h in enumerate(hits, 1):
        shown = _shown(h["path"])
        folded = f"  (+{len(h['duplicates'])} near duplicates)" if h.get("duplicates") else ""
        if h.get("t") is not None:  # a video moment: where to start playing
            from alignsearch.media.video import timestamp

            shown += f" @ {timestamp(h['t'])}"
        click.echo(f"{rank:>3}. {h['score']:.4f}  {shown}{folded}")
        if explain:  # what the score is made of
            made_of = {"similarity": round(h["similarity"], 4)} if h.get("similarity") is not None else {}
            parts = {**made_of, **(h.get("parts") or {})}  # a part a hit has none of (no keyword match): left out,
            # as Python's `None` it read `keyword_rank None` (--json gives null)
            click.echo("       " + ", ".join(f"{key} {value}" for key, value in parts.items() if value is not None))


_REQUEST_OPTIONS = [
    click.argument("text", required=False),
    click.option("--image", type=click.Path(readable=False), callback=_image_file, help="Image to search with (alone or with TEXT)."),
    click.option("--negative", help="Text whose concept to subtract from the query."),
    # -k and --nprobe are whole numbers here; their range is querycheck's, as for Engine.search and HTTP: exit 2 as
    # IntRange's, with the one message every surface gives
    click.option("-k", "k", type=int, default=10, show_default=True, help="Number of results (1 to 1000)."),
    click.option("--text-weight", type=float, default=2.0, show_default=True, help="Weight of TEXT in a text+image query."),
    click.option("--image-weight", type=float, default=1.0, show_default=True),
    click.option("--negative-weight", type=float, default=1.0, show_default=True),
    click.option("--nprobe", type=int, default=None, help="IVF lists to visit (default: the index's tuned value)."),
    click.option("--tag", help="Only images tagged with this label (see `alignsearch tag`)."),
    click.option("--collapse", is_flag=True, help="Fold near duplicates of a better result into it (listed as its duplicates)."),
    click.option("--after", metavar="DATE", help="Taken on or after DATE (ISO 8601: 2019-07-14 or a date-time)."),
    click.option("--before", metavar="DATE", help="Taken before DATE."),
    click.option("--camera", metavar="TEXT", help="Camera make or model contains TEXT (case-insensitive)."),
    click.option("--near", metavar="LAT,LON,KM", help="Taken within KM kilometres of LAT,LON (GPS in EXIF)."),
    click.option("--path", "path_glob", metavar="GLOB", help="Path under its root matches GLOB (** crosses folders)."),
    click.option("--format", "fmt", metavar="FMT", help="Image format (jpeg, png, webp...)."),
    click.option("--where", metavar="EXPR", help="A filter expression, e.g. \"camera ~ canon and taken >= 2019-01-01\"."),
    click.option("--media", type=click.Choice(["photo", "video"]), default=None, help="Only photos, or only video moments."),
    click.option("--per-video", type=click.IntRange(min=1), default=3, show_default=True,
                  help="At most this many moments of one video in the results."),
    click.option("--min-score", type=_FiniteRange(-1, 1), default=None,
                  help="Drop results whose similarity is below this, in every mode: the cosine, or with --compose product "
                       "or weicom the fused similarity (0 to 1); never the rank score of keyword and hybrid rankings."),
    click.option("--sort", type=click.Choice(["score", "taken", "-taken", "path"]), default="score", show_default=True,
                  help="Order of the result set (the best k by score that pass the filters)."),
    click.option("--mode", type=click.Choice(["auto", "vector", "keyword", "hybrid"]), default="auto", show_default=True,
                  help="vector, keyword (captions, text in images, names, tags; AND, OR, -word, \"phrase\", word*: README), hybrid (both fused; score = the fused rank score), auto "
                       "(hybrid when words are in a caption, text in an image or a tag; file and folder names count only in keyword/hybrid)."),
    click.option("--compose", type=click.Choice(["auto", "sum", "slerp", "product", "weicom"]), default="auto",
                  show_default=True, help="How TEXT and --image combine: sum (weighted), slerp, product (both must "
                                          "match: late fusion), weicom (normalised late fusion), auto (the best measured)."),
    click.option("--explain", is_flag=True, help="Also say how the search ran: matches, selectivity, exact or ANN, nprobe; "
                                                  "and what each hit's score is made of."),
]


def request_options(fn):
    """`query`'s options that make its search request, checked once into one SearchRequest (request.build,
    the rules of every surface). The command gets `request` and `asked`, the `query` its output echoes."""

    @wraps(fn)
    def command(text, image, negative, k, text_weight, image_weight, negative_weight, nprobe, tag, collapse, after,
                before, camera, near, path_glob, fmt, where, media, per_video, min_score, sort, mode, compose, explain,
                **rest):
        # nothing to search for is refused by build (exit 2), as Engine.search and the server refuse it
        from alignsearch.search.request import DEFAULT_PER_VIDEO, build

        narrowing = {"where": where, "after": after, "before": before, "camera": camera, "near": near,
                     "path": path_glob, "format": fmt}
        request = build(text=text, image=image, negative=negative, k=k, text_weight=text_weight,
                        image_weight=image_weight, negative_weight=negative_weight, nprobe=nprobe, tag=tag,
                        collapse=collapse, media=media, per_video=per_video, min_score=min_score, sort=sort,
                        mode=mode, compose=compose, explain=explain, **narrowing)
        plain = not any(narrowing.values()) and min_score is None and sort == "score" and mode == "auto" \
            and not explain and compose == "auto" and media is None and per_video == DEFAULT_PER_VIDEO
        asked = {"text": text, "image": _json_name(image), "negative": negative, "k": k, "text_weight": text_weight,
                 "image_weight": image_weight, "negative_weight": negative_weight, "tag": tag,
                 **{key: value for key, value in narrowing.items() if value is not None},
                 **({} if plain else {"min_score": min_score, "sort": sort, "mode": mode, "compose": compose})}
        if media is not None or per_video != DEFAULT_PER_VIDEO:
            asked.update(media=media, per_video=per_video)
        if collapse:
            asked["collapse"] = True
        return fn(request=request, asked=asked, **rest)

    for option in reversed(_REQUEST_OPTIONS):
        command = option(command)
    return command


@main.command()
@request_options
@click.option("--paths", "paths_only", is_flag=True, help="Print only the paths, each file once (a video for all its moments), one per line (for pipes).")
@click.option("-0", "--null", "null", is_flag=True, help="With --paths: end each path with NUL, for xargs -0.")
@click.option("--json", "as_json", is_flag=True, help="Print {query, results} as JSON.")
@index_option
@model_option
@run_options
@reports_errors
def query(request, asked, paths_only, null, as_json, index_dir, model, device, backend, precision):
    """Search the index by TEXT, by --image, or by both; filter by metadata, cut off and sort."""
    from alignsearch import notices
    from alignsearch.storage.paths import resolve_index_dir

    # before the search: -0 alone was refused only once the search had run, and --paths silently won over --json
    if null and not paths_only:
        raise click.UsageError("-0 goes with --paths")
    if paths_only and as_json:
        raise click.UsageError("--paths and --json are two outputs: give one")
    notices.enable(not as_json and not paths_only)
    found = resolve_index_dir(index_dir)
    # an explicit --device says where the model runs, so it too is searched here: the answer (a refused cuda on a
    # machine without one) must not depend on whether a server happens to run for the index
    if model is not None or (device, backend, precision) != ("auto", "auto", "auto"):
        answer, why_local = None, "--model, --device, --backend or --precision choose an encoder: the server runs its own"
    else:  # a warm `alignsearch serve` answers in milliseconds
        from alignsearch.surfaces.client import search_via_server

        routed = search_via_server(found, request, notice=lambda line: click.echo(line, err=True))
        answer, why_local = routed.answer, routed.why_local
    plan = None
    if answer is not None:
        hits = answer["results"]
        if request.explain:
            plan = {**answer.get("plan", {}), "via": "server"}
    else:
        hits, plan = _search_locally(found, request, model, device, backend, precision)
        if plan is not None:
            plan.update(via="local", why_local=why_local)
    if plan is not None:
        if as_json:
            asked["plan"] = plan
        else:
            click.echo("plan: " + ", ".join(f"{key}={value}" for key, value in plan.items()), err=True)
    if not hits and request.tag and not as_json and not paths_only:  # JSON and path lists stay clean for programs
        click.echo(f"note: no image passed the filters with the tag {request.tag!r} (tags ignore case; `alignsearch tags` "
                   "lists them)", err=True)
    _print_hits(asked, hits, as_json, ("\0" if null else "\n") if paths_only else None, explain=request.explain)


def _search_locally(found, request, model, device, backend, precision) -> tuple[list[dict], dict | None]:
    """The hits of the request from an engine loaded here, and with --explain its plan."""
    _quiet_transformers()
    soon = None
    options = EncoderOptions(device=device, backend=backend, precision=precision)
    if request.text is not None and request.image is None and torch_free_text(options, model):
        from alignsearch.encoders.coldstart import text_encoder_soon  # the tower loads while the engine imports

        soon = text_encoder_soon(found, options)
    from alignsearch.search.engine import open as open_index

    engine = open_index(found, model=model, device=device, backend=backend, precision=precision, text_soon=soon)
    hits = [h.to_dict() for h in engine.run(request)]
    plan = {**engine.explain(request), "encoder": engine.encoder_plan()} if request.explain else None
    return hits, plan


def _encoder_for(index_dir, model, device, backend="auto", precision="auto"):
    """--model when given, else the index's own model when there is an index, else the default."""
    from alignsearch.search.engine import find_index_dir, open as open_index
    from alignsearch.encoders.loader import open_encoder

    if model is None and (index_dir or find_index_dir()):
        return open_index(index_dir, device=device, backend=backend, precision=precision).encoder
    return open_encoder(model, EncoderOptions(device=device, backend=backend, precision=precision), cache=False)


@main.command()
@click.option("--text", "texts", multiple=True, help="Text to embed (repeatable).")
@click.option("--image", "images", multiple=True, type=click.Path(readable=False), callback=_image_file, help="Image to embed (repeatable).")
@click.option("--json", "as_json", is_flag=True, default=True, help="JSON output (the only format).")
@index_option
@model_option
@run_options
@reports_errors
def embed(texts, images, as_json, index_dir, model, device, backend, precision):
    """Print normalised embeddings as a JSON array, for other tools."""
    if not texts and not images:
        raise click.UsageError("give at least one --text or --image")
    from alignsearch.search.querycheck import check_text

    for text in texts:  # a query's rules (exit 6): --text "" was embedded as if it said something
        check_text(text)
    _quiet_transformers()
    encoder = _encoder_for(index_dir, model, device, backend, precision)
    out = []
    if texts:
        out += [{"kind": "text", "input": t, "embedding": v.tolist()} for t, v in zip(texts, encoder.encode_text(list(texts)))]
    for path in images:
        out.append({"kind": "image", "input": _json_name(path), "embedding": encoder.encode_images([path])[0].tolist()})
    click.echo(json.dumps(out))


@main.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(readable=False))
@click.option("--labels", "labels", multiple=True, required=True, help='A candidate label (repeat), e.g. --labels "a cat".')
@click.option("--template", "templates", multiple=True, help='Prompt template (repeat to ensemble), e.g. "a photo of {}".')
@click.option("--json", "as_json", is_flag=True)
@index_option
@model_option
@run_options
@reports_errors
def classify(images, labels, templates, as_json, index_dir, model, device, backend, precision):
    """Zero-shot: the probability of each label for each image (softmax over similarity / temperature).

    An image that cannot be read is listed with its error and the others are classified: exit 0 when at
    least one image was classified, 6 when none could be."""
    from alignsearch.encoders.classify import DEFAULT_TEMPLATES, check_templates
    from alignsearch.errors import BadInputError

    check_templates(templates)  # before the model loads
    if any(not label.strip() for label in labels):  # --labels "$UNSET": a label of nothing got 100% of one image
        raise BadInputError("a label is empty: give each --labels a text, e.g. --labels \"a cat\"")
    _quiet_transformers()
    encoder = _encoder_for(index_dir, model, device, backend, precision)
    results = encoder.classify_each(list(images), list(labels), tuple(templates) or DEFAULT_TEMPLATES)
    if as_json:
        click.echo(json.dumps([{**r, "image": _json_name(r["image"])} for r in results], indent=2))
    else:
        for r in results:  # names and labels shown as every command shows them: escaped, one line each
            click.echo(_shown(r["image"]))
            if "error" in r:
                click.echo(f"  error: {_shown(r['error'])}")
            for entry in sorted(r.get("labels", []), key=lambda e: -e["probability"]):
                click.echo(f"  {entry['probability']:7.2%}  {_shown(entry['label'])}  (similarity {entry['similarity']:.4f})")
    if all("error" in r for r in results):
        raise BadInputError("no image could be classified")


@main.command()
@click.option("--text", required=True)
@click.option("--image", required=True, type=click.Path(readable=False), callback=_image_file)
@click.option("--json", "as_json", is_flag=True)
@index_option
@model_option
@run_options
@reports_errors
def similarity(text, image, as_json, index_dir, model, device, backend, precision):
    """Cosine similarity of a text and an image, and the model's logit."""
    from alignsearch.search.querycheck import check_text

    check_text(text)  # as a query's text (exit 6): --text "" was measured as if it said something
    _quiet_transformers()
    result = _encoder_for(index_dir, model, device, backend, precision).similarity(text, image)
    if as_json:
        click.echo(json.dumps({"text": text, "image": _json_name(image), **result}))
    else:
        click.echo(f"similarity {result['similarity']:.4f}  logit {result['logit']:.4f}")


@main.command()
@click.option("--labels-file", type=click.Path(exists=True, dir_okay=False, readable=False),
              help="One label per line (blank lines and lines starting with # are skipped).")
@click.option("--template", "templates", multiple=True, help='Prompt template (repeat to ensemble).')
@click.option("--threshold", type=float, default=0.5, show_default=True,
              help="Minimum probability of a label against the background prompts (README: Tags).")
@click.option("--top", type=click.IntRange(min=1), default=3, show_default=True, help="At most this many tags per image.")
@click.option("--clear", is_flag=True, help="Remove every tag (and forget the labels) first; alone, just that.")
@click.option("--json", "as_json", is_flag=True)
@index_option
@device_option
@reports_errors
def tag(labels_file, templates, threshold, top, clear, as_json, index_dir, device):
    """Tag every indexed image from its stored vector; later `index` runs tag new images too.

    Each label is decided on its own against a fixed set of background prompts, so the file's other labels
    do not change it. Tags of labels not in the file stay; --clear starts over."""
    _quiet_transformers()
    from alignsearch.search.engine import resolve_index_dir
    from indexer.job import tag_index

    if not labels_file and not clear:
        raise click.UsageError("give --labels-file FILE, or --clear to remove every tag")
    labels = _read_labels(labels_file) if labels_file else []
    result = tag_index(resolve_index_dir(index_dir), labels, list(templates), threshold, top, device, clear=clear)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    if clear:
        click.echo("removed every tag")
    if result["per_label"]:
        click.echo(f"{result['tags']} tags on {result['images']} images")
    for label, n in result["per_label"].items():
        click.echo(f"  {n:>8}  {_shown(label)}")


MAX_LABELS_BYTES = 16 << 20  # a label is at most 200 characters: more is not a labels file


def _read_labels(path) -> list[str]:
    """The lines of a labels file: a regular file (a FIFO waited for ever, /dev/zero filled the memory) of at
    most MAX_LABELS_BYTES of UTF-8; else BadInputError (exit 6) saying why."""
    from alignsearch import safeopen
    from alignsearch.errors import BadInputError

    try:
        data = safeopen.read_fd(safeopen.open_regular(path), MAX_LABELS_BYTES)
    except (OSError, safeopen.Refused) as exc:
        raise BadInputError(f"cannot use the labels file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if len(data) > MAX_LABELS_BYTES:
        raise BadInputError(f"the labels file {path} is larger than {MAX_LABELS_BYTES} bytes")
    try:
        # utf-8-sig: a file saved by Notepad starts with a byte-order mark, which made its first label "\ufeffa cat",
        # a tag apart from "a cat" that `query --tag "a cat"` never found
        return data.decode("utf-8-sig").splitlines()
    except UnicodeDecodeError as exc:
        raise BadInputError(f"the labels file {path} is not UTF-8 (byte {exc.start})") from None


@main.command()
@click.option("--json", "as_json", is_flag=True, help='Print [{"label", "images"}].')
@index_option
@reports_errors
def tags(as_json, index_dir):
    """The tag labels of the index with how many images carry each, most used first."""
    listed = [{"label": label, "images": n} for label, n in _tag_counts(index_dir)]
    lines = [f"{e['images']:>8}  {_shown(e['label'])}" for e in listed] or ["no tags: tag the index with `alignsearch tag --labels-file FILE`"]
    click.echo(json.dumps(listed, indent=2) if as_json else "\n".join(lines))


def _tag_counts(index_dir) -> list[tuple[str, int]]:
    """[(label, images)] from the index's catalog; the remembered labels that tag no image yet are listed with 0
    (later index runs apply them)."""
    from alignsearch.storage import catalog, state
    from alignsearch.storage.paths import DB_FILE, resolve_index_dir

    db = catalog.connect(resolve_index_dir(index_dir) / DB_FILE, readonly=True)
    try:
        with db.connect() as conn:
            return catalog.label_counts(conn, state.read(conn).tagging)
    finally:
        db.dispose()


@main.command()
@click.argument("data", type=click.Path(exists=True))
@click.option("--model", "base", default=None, help="Checkpoint to start from (hub id or directory; default kakaobrain/align-base).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory for the fine-tuned checkpoint.")
@click.option("--epochs", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=2), default=32, show_default=True, help="Pairs per contrastive batch.")
@click.option("--lr", type=_FiniteRange(min=0, min_open=True), default=5e-5, show_default=True)
@click.option("--accumulate", type=click.IntRange(min=1), default=1, show_default=True, help="Batches per optimizer step.")
@click.option("--freeze", type=click.Choice(["text", "vision"]), default=None, help="Keep one tower fixed.")
@click.option("--val-fraction", type=_FiniteRange(0, 0.5), default=0.1, show_default=True)
@click.option("--no-flip", is_flag=True, help="No mirror augmentation (when captions say left/right).")
@click.option("--image-column", default="image", show_default=True)
@click.option("--caption-column", default="caption", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--resume", is_flag=True, help="Continue from OUT/checkpoint, the last finished epoch.")
@device_option
@reports_errors
def finetune(data, base, out, epochs, batch_size, lr, accumulate, freeze, val_fraction, no_flip, image_column,
             caption_column, seed, resume, device):
    """Fine-tune ALIGN on image-caption pairs: a folder of images with .txt captions, or a CSV/JSONL/parquet file."""
    if os.path.isdir(data) and (_given("image_column") or _given("caption_column")):  # they were dropped silently
        from alignsearch.errors import UsageError

        raise UsageError("--image-column and --caption-column name columns of a CSV, JSONL or parquet file; in a "
                         f"folder ({data}) each image's caption is the .txt file of its stem: leave them out")
    _quiet_transformers()
    from alignsearch.encoders.finetune import FinetuneConfig, finetune as run_finetune
    from alignsearch.encoders.model import DEFAULT_MODEL

    config = FinetuneConfig(epochs=epochs, batch_size=batch_size, lr=lr, accumulate=accumulate, freeze=freeze,
                            val_fraction=val_fraction, flip=not no_flip, seed=seed, device=device)
    metrics = run_finetune(data, base or DEFAULT_MODEL, out, config, resume=resume, image_column=image_column,
                           caption_column=caption_column, progress=sys.stderr.isatty(),
                           log=lambda line: click.echo(line, err=True))
    click.echo(json.dumps({"out": str(out), **metrics}))


@main.command()
@click.option("--failed", is_flag=True, help="List the files that could not be indexed, with the reason.")
@click.option("--json", "as_json", is_flag=True)
@index_option
@reports_errors
def info(failed, as_json, index_dir):
    """What the index holds: model, counts, index type and parameters."""
    from alignsearch.search.engine import open as open_index

    engine = open_index(index_dir)
    data = engine.info()
    if failed:
        data["failed_files"] = [_with_path_b64({"id": r.id, "path": r.path, "reason": r.reason}) for r in engine.failed()]
        data["fill_failed_files"] = _fill_failed_files(engine.db)
    if as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        _show_info(data, failed=failed)
    if data["damaged_addresses"]:  # the figures are shown, for info is a status display; the damage is said beside
        # them with the code every other reader of those addresses exits with, not a silently short count, exit 0
        from alignsearch.errors import IndexDamagedError
        from alignsearch.storage.paths import DB_FILE

        raise IndexDamagedError(f"{DB_FILE} is damaged: {data['damaged_addresses']} vector addresses are not those "
                                "written (their seal differs), so the counts above may be off: run `alignsearch "
                                "verify --repair`")


def _show_info(data: dict, *, failed: bool) -> None:
    """`info`'s lines, from engine.info's dict (failed: --failed, whose lists replace the counts' lines)."""
    ix = data["index"]
    click.echo(f"index:   {_shown(data['index_dir'])}")  # escaped as the roots are: a folder's name may hold any byte
    click.echo(f"model:   {_shown(data['model'])} (dim {data['dim']})")
    click.echo(f"roots:   {', '.join(_shown(r) for r in data['roots'])}")
    click.echo(f"images:  {data['images']} indexed, {data['failed']} failed")
    params = (
        f" nlist={ix['nlist']} PQ{ix['pq_m']} nprobe={ix['nprobe']} rerank={ix['rerank_factor']}x"
        f" (recall@10 {ix['tuned_recall_at_10']} measured for target {ix['target_recall']})"
        if ix["type"] != "flat" else ""
    )
    click.echo(f"ann:     {ix['type']} ({ix['factory']}){params}, {ix['vectors']} vectors"
               + (", searched exactly (no ANN index built yet)" if ix["layout"] == "exact" else "")
               + (f"; {ix['searched_exactly']} more committed by an unfinished run, not yet in it, searched exactly"
                  if ix.get("searched_exactly") else ""))
    store = data["vector_store"]
    click.echo(f"vectors: {store['rows']} rows stored, {store['live_rows']} in use"
               + (f" ({store['dead_bytes'] / 2**20:.1f} MiB of deleted or changed files'; `alignsearch index "
                  "--compact` frees it)" if store["dead_bytes"] else ""))
    if data["last_run"] == "interrupted":
        click.echo("note:    the last index run was interrupted before it finished: the images it committed are "
                   "searchable; run `alignsearch index` to finish it")
    elif data["last_run"] == "running":
        click.echo("note:    an index run is in progress: the images it has committed so far are searchable")
    enc = data["encoder"]
    if enc["last_index_run"]:
        e = enc["last_index_run"]
        click.echo(f"encoder: images on {e.get('image_backend', e['backend'])} at {e['image_precision']} "
                   f"(last index run)" + (f"; note: {e['note']}" if e.get("note") else ""))
    cache = enc["onnx_cache"]
    if cache["path"] is None:
        click.echo(f"onnx:    {cache['note']}")
    else:
        click.echo(f"onnx:    {', '.join(cache['towers']) or 'nothing exported yet'} in {cache['path']} "
                   f"({cache['bytes'] / 2**20:.1f} MiB; {_cache_total(cache['total'])})"
                   + ("; text queries run without torch" if cache["torch_free_text"] else ""))
    if data["tags"]:
        click.echo("tags:    " + ", ".join(f"{_shown(label)} ({n})" for label, n in data["tags"].items()))
    if any(data["fill_failures"].values()) and not failed:
        click.echo(f"fills:   {_fill_failures_line(data['fill_failures'])}")
    if data["listing_errors"] and not failed:
        click.echo(f"listing: {len(data['listing_errors'])} folder(s) could not be listed by the last run "
                   "(alignsearch info --failed)")
    for f in data.get("failed_files", []):
        click.echo(f"failed:  {_shown(f['path'])}: {_shown(f['reason'])}")
    for f in data.get("fill_failed_files", []):
        click.echo(f"unread:  {_shown(f['path'])}: {FILL_WORDS.get(f['step'], f['step'])}: {_shown(f['reason'])}")
    for e in data["listing_errors"] if failed else []:
        click.echo(f"unlisted: {_shown(e['folder'])}: {_shown(e['reason'])} (its indexed files were kept)")


def _cache_total(total: dict) -> str:
    models = total["models"]
    return f"the cache holds {total['bytes'] / 2**20:.1f} MiB for {models} model{'s' if models != 1 else ''}"


def _fill_failed_files(db) -> list[dict]:
    """Indexed files a fill step could not read: [{id, path, step, reason}], in path order."""
    from alignsearch.storage import catalog

    with db.connect() as conn:
        return [_with_path_b64({"id": r.id, "path": r.path, "step": step, "reason": reason})
                for r, step, reason in catalog.fill_failed_files(conn)]


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on; another than loopback only when you mean it.")
@click.option("--port", type=click.IntRange(0, 65535), default=8765, show_default=True)
@click.option("--token", envvar="ALIGNSEARCH_TOKEN", help="Require this token instead of a random one per start (env ALIGNSEARCH_TOKEN).")
@click.option("--no-token", is_flag=True, help="Require no token (loopback only): any local program or user can then search.")
@click.option("--allow-host", "allow_hosts", multiple=True, metavar="NAME",
              help="Also answer requests addressed to NAME (a DNS name or address clients use; repeatable). "
                   "Other Host headers are refused, which stops DNS rebinding.")
@click.option("--verbose", is_flag=True, help="Log every request (the same as `alignsearch -v serve`).")
@click.option("--bf16-text", is_flag=True, hidden=True, help="The older spelling of --precision bf16.")
@index_option
@run_options
@reports_errors
def serve(host, port, token, no_token, allow_hosts, verbose, bf16_text, index_dir, device, backend, precision):
    """Serve the index warm: a JSON API (its OpenAPI schema at /openapi.json) and a search page at the URL it prints.

    The URL carries a random token, required by every API call; opening it sets a cookie. The CLI's
    `query` finds the server and its token in the index's server record."""
    # The encoder thread and the search threads each drive an OpenMP team (torch's, faiss's): spinning idle teams
    # starve each other (a 2 ms query took 80 ms on 2 cores). Their threads sleep instead: OMP_WAIT_POLICY, set
    # for every entry as the package loads (alignsearch/__init__.py), before torch and faiss.
    from alignsearch.surfaces.server import LOOPBACK, ServerConfig, allow_host_problem, is_loopback, serve as run_server

    if not host.strip():  # an unset variable (--host "$HOST") listened on every interface
        raise click.UsageError("--host needs an address: 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)")
    problem = next(filter(None, map(allow_host_problem, allow_hosts)), None)
    if problem:
        raise click.UsageError(f"--allow-host {problem}")
    if no_token and (token or not is_loopback(host)):
        raise click.UsageError("--no-token is for loopback only (--host 127.0.0.1, ::1 or localhost) and without --token")
    _quiet_transformers()
    from alignsearch.search.engine import open as open_index

    if verbose:  # an alias of the top-level -v: at least info
        from alignsearch import logs

        logs.configure(max(1, click.get_current_context().find_root().params.get("verbose", 0)))
    verbose = logging.getLogger().isEnabledFor(logging.INFO)  # -v, --verbose or ALIGNSEARCH_LOG: every request
    if host not in LOOPBACK and not allow_hosts:
        click.echo(f"note: clients must address this server as {host}; add --allow-host NAME for the names they use",
                   err=True)
    from alignsearch import notices

    notices.enable(True)
    engine = open_index(index_dir, device=device, text_bf16=bf16_text, backend=backend, precision=precision)
    from alignsearch.surfaces.client import verified_server

    # One server per index: a second one on another port wrote its record over the first's (queries went to
    # the second only) and removed it on exit, leaving the first unknown to `query`.
    running = verified_server(engine.dir, notice=lambda line: None)
    if running is not None:
        # exit 6, as an index another process writes: a resource another process holds, no unexpected error (1)
        raise BadInputError(f"this index is already served at {running['url']} (process {running['pid']}): "
                               "`alignsearch query` uses it; stop it first to serve it again")
    config = ServerConfig(host=host, port=port, token=token, no_token=no_token, allow_hosts=tuple(allow_hosts))

    serving = []

    def ready(server):
        serving.append(server)
        click.echo(f"serving {engine.dir} on {server.open_url} (Ctrl-C to stop)", err=True)
        if allow_hosts and not is_loopback(host):  # where the token is printed already: this terminal only
            click.echo(f"other machines open {server.open_url_as(allow_hosts[0])}", err=True)

    try:
        run_server(engine, config, ready, verbose)
    except KeyboardInterrupt:
        if not serving:  # while the model loaded: stopped before it served, said as any command's Ctrl-C is
            raise
    except OSError as exc:
        raise BadInputError(_cannot_listen(engine.dir, host, port, exc)) from None


def _cannot_listen(index_dir, host: str, port: int, exc: OSError) -> str:
    """Why `serve` cannot listen, in words: this index already served there, or the port taken by another."""
    message = f"cannot listen on {host}:{port}: {exc.strerror or exc}"
    if exc.errno != errno.EADDRINUSE:
        return message
    from alignsearch.surfaces.client import verified_server

    running = verified_server(index_dir, notice=lambda line: None)
    if running is not None:
        # not "another port": one server per index (the check before the model loads refuses a second anywhere)
        return (f"this index is already served at {running['url']} (process {running['pid']}): `alignsearch query` "
                "uses it; stop it first to serve it again")
    return f"{message}: another program listens there; choose another port with --port N (--port 0: any free one)"


@main.command()
@click.option("--recall", type=_FiniteRange(0, 1, min_open=True), default=0.95, show_default=True,
              help="Target recall@10 against exact search.")
@index_option
@reports_errors
def tune(recall, index_dir):
    """Re-tune nprobe and the re-rank depth for a target recall, on this index's own vectors."""
    from alignsearch.search.engine import resolve_index_dir
    from indexer.job import tune_index

    t = tune_index(resolve_index_dir(index_dir), recall)["tuning"]
    if t.get("nprobe"):
        click.echo(f"nprobe={t['nprobe']} rerank_factor={t['rerank_factor']}: recall@10 {t['recall']:.3f} "
                   f"(target {t['target']}, {t['queries']} off-distribution queries)")
    else:
        click.echo("exact index: recall is 1.0, nothing to tune")


@main.command()
@click.option("--repair", is_flag=True, help="Fix what can be fixed: cut uncommitted vectors, resync the ANN index.")
@click.option("--skip-model", is_flag=True, help="Do not load the model to check its fingerprint.")
@click.option("--json", "as_json", is_flag=True)
@index_option
@reports_errors
def verify(repair, skip_model, as_json, index_dir):
    """Check that catalog, vector store, ANN index and model agree; exit 7 if they do not."""
    _quiet_transformers()
    from alignsearch.search.engine import resolve_index_dir
    from indexer.verify import verify as run_verify

    from indexer.verify import repair_advice

    found = resolve_index_dir(index_dir)
    report = run_verify(found, repair=repair, check_model=not skip_model)
    if repair and report.catalog_damaged:
        report.problems.append(repair_advice(found))
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        for line in report.repaired:
            click.echo(f"repaired: {line}")
        for line in report.problems:
            click.echo(f"problem:  {line}")
        for line in report.notes:
            click.echo(f"note:     {line}")
        click.echo("ok: " + ", ".join(f"{k}={v}" for k, v in report.checked.items()) if report.ok else "index is inconsistent")
    if not report.ok:
        sys.exit(7)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print [{root, indexed, failed, state, options, listing_errors}].")
@index_option
@reports_errors
def roots(as_json, index_dir):
    """The roots of the index, with their file counts and state (ok, missing, listing errors)."""
    from alignsearch.storage import catalog
    from alignsearch.storage.paths import DB_FILE, resolve_index_dir
    from indexer.roots import report

    db = catalog.connect(resolve_index_dir(index_dir) / DB_FILE)
    try:
        listed = report(db)
    finally:
        db.dispose()
    if as_json:
        click.echo(json.dumps(listed, indent=2))
        return
    if not listed:
        click.echo("no roots: index one with `alignsearch index FOLDER`")
    for r in listed:
        options = "".join(f", {k}" for k, v in r["options"].items() if v)
        click.echo(f"{_shown(r['root'])}  [{r['state']}]  {r['indexed']} indexed, {r['failed']} failed{options}")
        for e in r["listing_errors"]:
            click.echo(f"  could not list {_shown(e['folder'])}: {_shown(e['reason'])}")


@main.command()
@click.argument("root")
@index_option
@reports_errors
def forget(root, index_dir):
    """Remove ROOT and its files from the index (also when its folder is gone)."""
    from alignsearch.storage.paths import resolve_index_dir
    from indexer.roots import forget_root

    done = forget_root(resolve_index_dir(index_dir), root)
    click.echo(f"forgot {_shown(done['root'])}: {done['files']} files removed from the index")
    _say_compacted(done["compacted"])


def _given(param: str) -> bool:
    """Whether the running command's option was given (not its default): an option another mode ignores is refused
    when given, as `dupes --tier exact --threshold` is, not dropped without a word."""
    return click.get_current_context().get_parameter_source(param) is not click.core.ParameterSource.DEFAULT


@main.command()
@click.option("--tier", type=click.Choice(["exact", "near", "similar"]), default="near", show_default=True,
              help="exact: same bytes (SHA-256); near: same picture re-saved, resized or lightly cropped (perceptual "
                   "hash); similar: embedding cosine >= threshold (bursts, near-identical shots).")
@click.option("--threshold", type=float, default=None,
              help="near: most differing bits of 64 (default 12); similar: least cosine (default 0.95).")
@click.option("--nprobe", type=click.IntRange(min=1), default=8, show_default=True, help="similar: IVF lists visited per image.")
@click.option("--json", "as_json", is_flag=True, help='Print [{"tier", "keep", "items": [{"id", "path", "score", ...}]}].')
@index_option
@reports_errors
def dupes(tier, threshold, nprobe, as_json, index_dir):
    """Group duplicate images, largest groups first. Reports only: nothing is ever deleted.

    The file to keep in each group: the largest resolution, then the oldest (modification time)."""
    from alignsearch.search.dupes import check_threshold, find_groups, to_be_rid_of
    from alignsearch.search.engine import open as open_index

    check_threshold(tier, threshold)  # before the index opens; find_groups checks it again for Python callers
    if _given("nprobe") and tier != "similar":  # exact and near compare hashes: no IVF list is visited
        from alignsearch.errors import UsageError

        raise UsageError(f"--nprobe is for --tier similar (the IVF lists each vector visits); --tier {tier} compares "
                         "hashes and visits none: leave --nprobe out")
    groups = find_groups(open_index(index_dir), tier, threshold, nprobe)
    if as_json:
        click.echo(json.dumps([{**g.to_dict(), "items": [_with_path_b64(i) for i in g.to_dict()["items"]]} for g in groups],
                              indent=2))
        return
    if not groups:
        click.echo(f"no {tier} duplicates")
    for g in groups:
        click.echo(f"{g.tier}: {len(g.items)} files")
        for item in g.items:
            shown = _shown(item["path"])
            mark = "keep" if item["keep"] else "    "
            click.echo(f"  {mark} {item['score']:.4f}  {item['width']}x{item['height']}  {shown}")
    if groups:
        rid = len(to_be_rid_of(groups))
        click.echo(f"{len(groups)} group{'s' * (len(groups) != 1)}, {rid} file{'s' * (rid != 1)} besides the ones to keep")


@main.command()
@click.argument("out", type=click.Path())
@click.option("--format", "fmt", type=click.Choice(["parquet", "clip-retrieval"]), default="parquet", show_default=True,
              help="parquet: one file, a row per image with its embedding; clip-retrieval: OUT/img_emb/*.npy + "
                   "OUT/metadata/*.parquet.")
@click.option("--where", default=None, metavar="EXPR", help="Only images the filter admits (the --where language of `query`).")
@click.option("--path", "path_glob", default=None, metavar="GLOB", help="Only images whose relative path matches GLOB.")
@click.option("--root", "roots", multiple=True, help="Only images of this root (repeatable).")
@click.option("--shard-rows", type=click.IntRange(min=1), default=1_000_000, show_default=True,
              help="clip-retrieval: rows per img_emb_{i}.npy / metadata_{i}.parquet pair.")
@click.option("--json", "as_json", is_flag=True)
@index_option
@reports_errors
def export(out, fmt, where, path_glob, roots, shard_rows, as_json, index_dir):
    """Write every indexed image's metadata and embedding to OUT (parquet, or clip-retrieval's layout)."""
    from alignsearch.errors import UsageError
    from alignsearch.search.engine import open as open_index
    from alignsearch.search.export import export as run_export
    from indexer.roots import known_root

    if out == "":  # an unset variable (export "$OUT"): it was taken for the current folder, ". is a folder"
        raise UsageError("export needs OUT: a file name such as lib.parquet, or a folder for --format clip-retrieval")
    if out == "-":
        raise UsageError("export writes files (parquet needs its footer, clip-retrieval a folder), not standard "
                               "output: give a file name such as lib.parquet, or a folder for --format clip-retrieval")
    if _given("shard_rows") and fmt != "clip-retrieval":  # it was ignored without a word: the parquet export is one file
        raise UsageError("--shard-rows is for --format clip-retrieval (rows per img_emb/metadata pair); a parquet "
                         "export is one file: leave --shard-rows out, or add --format clip-retrieval")
    engine = open_index(index_dir)
    named = []
    for root in roots:  # as `forget` resolves them: relative, with a trailing slash, through symlinks
        named.append(known_root(root, list(engine.roots)))
    result = run_export(engine, out, fmt, named, where, path_glob, shard_rows=shard_rows)
    if as_json:
        click.echo(json.dumps(result))
    else:
        same = result.get("same_file", 0)  # said, not dropped silently: a row per name was what an export wrote
        also = f"; {_count(same, 'row')} naming a file another row names left out" if same else ""
        moments = result.get("moments", 0)  # a row each: "15 images" of 11 photos and two videos' 4 moments misled
        images = result["rows"] - moments
        what = " and ".join([_count(images, "image")] * bool(images or not moments) +
                            [_count(moments, "video moment")] * bool(moments))
        click.echo(f"{what} exported to {result['path']} ({fmt}{also})")


@main.command()
@click.argument("ref", metavar="ID|PATH")
@click.option("-k", "k", type=int, default=10, show_default=True, help="Number of results (1 to 1000; querycheck's range).")
@click.option("--collapse", is_flag=True, help="Fold near duplicates of a better result into it.")
@click.option("--json", "as_json", is_flag=True, help="Print {query, results} as JSON.")
@index_option
@reports_errors
def similar(ref, k, collapse, as_json, index_dir):
    """Images like an indexed one (by catalog id or path), from its stored vector; the image itself is left out."""
    from alignsearch.search.dupes import find_indexed
    from alignsearch.search.engine import open as open_index
    from alignsearch.errors import BadInputError

    engine = open_index(index_dir)
    row = find_indexed(engine, ref)
    if row is None:
        raise BadInputError(f"{ref} is not an indexed image (give a catalog id or the path of an indexed file)")
    # the image itself is excluded inside the search, so -k counts the results (k + 1 was refused at 1000)
    hits = engine.search_vector(engine.vector_of(row.id), k=k, collapse=collapse, exclude=[row.id])
    _print_hits({"similar": row.id, "path": _json_name(row.path), "k": k, "collapse": collapse}, [h.to_dict() for h in hits], as_json)


if __name__ == "__main__":
    main()
