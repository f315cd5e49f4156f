"""`alignsearch index`: scan the roots, encode what is new or changed, update the index."""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from alignsearch import atomic, notices
from alignsearch.storage import catalog, layouts, state, vectors
from alignsearch.media import sources, video
from alignsearch.encoders.backend import CPU_MICRO_BATCH, EncoderOptions
from alignsearch.encoders.classify import DEFAULT_TEMPLATES, check_templates
from alignsearch.storage.paths import ANN_FILE, DB_FILE, INDEX_DIRNAME, find_index_dir
from alignsearch.errors import BadInputError, IndexDamagedError, ModelLoadError, UsageError
from alignsearch.storage.vectors import VectorStore
from indexer import build, compact, ocrfill, phashfill, photos, pipeline, privacy, progress, reindex, scan, videos, writer
from indexer import roots as index_roots
from indexer.compact import remove_leftovers as remove_vector_leftovers  # `compact` is index_folders' option
from indexer.lock import writer_lock
from indexer.workers import workers_for

if TYPE_CHECKING:
    from alignsearch.encoders.model import Encoder


@dataclass
class Summary:
    index_dir: str
    added: int = 0
    updated: int = 0
    moved: int = 0  # new paths whose content was indexed under a path that is gone: vector reused
    removed: int = 0
    failed: int = 0
    unchanged: int = 0
    reencoded: int = 0  # files encoded again with --reindex (a new generation)
    reused: int = 0  # files not encoded because identical content was already indexed
    kept: int = 0  # files kept although not seen: their folder could not be listed (listing_errors)
    listing_errors: list = field(default_factory=list)  # [{"root", "folder", "reason"}]: kept, not removed
    no_images: list = field(default_factory=list)  # roots that were listed and hold no image
    notes: list = field(default_factory=list)  # roots given inside (or around) known roots, and what was done
    index: dict = field(default_factory=dict)
    tags: dict | None = None
    times: dict = field(default_factory=dict)
    encoder: dict = field(default_factory=dict)  # backend and precision that ran (alignsearch/encoders/backend.py)
    ocr: dict = field(default_factory=dict)  # {"enabled", "read", "with_text"}: text in images (alignsearch/media/ocr.py)
    compacted: dict | None = None  # the vector store compacted at the end of the run (indexer/compact.py)
    # {"ocr", "phash"}: indexed files each fill step could not read (this run or before), skipped until they change
    fill_failures: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True, kw_only=True)
class IndexOptions:
    model: str | None
    device: str
    batch_size: int | None
    workers: int | None
    include_hidden: bool | None
    rebuild: bool
    progress: bool
    use_ray: bool
    ray_address: str | None
    ondisk_shards: int | None
    index_shards: int | None
    fast_decode: bool
    list_column: str | None
    ray_actor_segments: bool
    caption_column: str | None = None  # a list's caption column (remembered per root)
    backend: str = "auto"  # alignsearch/encoders/backend.py: auto|torch|onnx
    precision: str = "auto"  # auto|fp32|bf16
    video_interval: float | None = None  # seconds between moments of unchanged picture (remembered per root)
    ocr: bool = False  # read the text in images (the index's remembered choice, or --ocr / --no-ocr)
    gpu_decode: bool | None = None  # JPEGs decoded on the GPU (indexer/gpudecode.py); None: where it works
    encoders: EncoderCache | None = None  # kept loaded across runs (index --watch); None: loaded by this run
    scope: index_roots.Scope | None = None  # only these roots and folders listed (index --watch); None: all
    links: index_roots.LinkFolders | None = None  # kept across runs (index --watch): folders holding file links
    lists: dict | None = None  # the run's tables of list roots (sources.list_table): those privacy judged are scanned

    @property
    def encoder(self) -> EncoderOptions:
        return EncoderOptions(device=self.device, backend=self.backend, precision=self.precision)


def model_identity(model: state.ModelIdentity | Encoder) -> tuple[str, str, str | None]:
    """The recorded model's or a loaded encoder's name (a hub id or its folder), fingerprint and content digest:
    what a reused encoder and the index's record are compared by."""
    return model.name, model.fingerprint, model.content_digest


@dataclass
class EncoderCache:
    """The encoder one process keeps loaded across its runs (`index --watch`): a run reuses it while the model
    asked for, the encoder options and the model the index records are those it was loaded for. Another
    process's --reindex to another model changes the record, so the next run loads that one (as the search
    engine does, search/engine.py _encoder_of). Decode workers and Ray actors are untouched: they never held it."""

    key: tuple | None = None
    encoder: Encoder | None = None

    @staticmethod
    def key_of(model: str | None, options: EncoderOptions, identity: state.ModelIdentity | None) -> tuple | None:
        """None (never reused) for an index with no model recorded yet: the run picks and records one."""
        if identity is None:
            return None
        return model, options, *model_identity(identity)

    def get(self, key: tuple | None) -> Encoder | None:
        """The kept encoder for `key`; a run naming no model (the index's own: a watch's later runs) takes the one
        kept for the same options and recorded model, whatever model the run that loaded it named."""
        if key is None or self.key is None:
            return None
        same = key == self.key or (key[0] is None and key[1:] == self.key[1:])
        return self.encoder if same else None

    def keep(self, model: str | None, options: EncoderOptions, encoder: Encoder) -> None:
        """Kept for the next run, once the index records `encoder` as its model."""
        self.key = (model, options, *model_identity(encoder))
        self.encoder = encoder


def default_workers() -> int:
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def index_folders(
    roots: list[str | os.PathLike],
    index_dir: str | os.PathLike | None = None,
    model: str | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    workers: int | None = None,
    include_hidden: bool | None = None,
    rebuild: bool = False,
    reindex: bool = False,
    progress: bool = False,
    ray_address: str | None = None,
    use_ray: bool = False,
    ondisk_shards: int | None = None,
    index_shards: int | None = None,
    fast_decode: bool = False,
    list_column: str | None = None,
    caption_column: str | None = None,
    ray_actor_segments: bool = True,
    backend: str = "auto",
    precision: str = "auto",
    video_interval: float | None = None,
    ocr: bool | None = None,
    gpu_decode: bool | None = None,
    compact: bool | None = None,
    encoders: EncoderCache | None = None,
    scope: index_roots.Scope | None = None,
    links: index_roots.LinkFolders | None = None,
) -> Summary:
    """Index `roots` (plus every root the index already knows) into index_dir.

    A root is a folder, a URL prefix (s3://bucket/photos: any fsspec protocol whose package is
    installed), a .csv/.parquet list of paths or URLs (list_column names the column; remembered), or
    WebDataset .tar shards (`shards-{000..099}.tar` expands); see alignsearch/media/sources.py.

    index_dir defaults to $ALIGNSEARCH_INDEX, else the nearest `.alignsearch` above cwd, else a new
    `.alignsearch` in cwd. rebuild retrains the ANN index; reindex forgets every vector and
    encodes everything again (the way to switch an index to another model). use_ray runs the stages
    on Ray Data (a local instance, or the cluster at ray_address). ondisk_shards > 0 builds IVF-PQ
    indexes from that many parallel shards with lists on disk (0 turns it off; None keeps the index's choice);
    index_shards > 0 keeps IVF-PQ as that many shard files searched with faiss.IndexShards (choosing one
    layout turns the other off).
    ray_actor_segments=False makes every Ray encoder actor send its vectors to the driver, as actors on
    machines that do not see index_dir do anyway (for comparing the two; the default is faster at scale).
    fast_decode decodes JPEGs at reduced scale (images.open_rgb's draft): faster, pixels slightly different.
    backend and precision choose how the vision tower runs (alignsearch/encoders/backend.py); int8 is for queries only.
    video_interval: a video gets a moment at each scene cut and at least one every this many seconds (default
    10; remembered like include_hidden; alignsearch/media/video.py).
    include_hidden True/False is remembered for the roots given (for every root when none is given);
    None applies what each root remembers (indexer/roots.py). A folder inside a known root is indexed as
    part of it; one containing known roots takes them over.
    ocr True reads the text in every image (new ones as they are encoded, those already indexed without
    encoding them again) and is remembered, so later runs with None read new images too; False stops reading
    (the text already read stays searchable); None applies the index's choice (off for a new index).
    gpu_decode True decodes JPEGs on the GPU (indexer/gpudecode.py; an error where it cannot), False on the CPU,
    None on the GPU where it can (a CUDA encoder, torchvision's nvJPEG working, no ocr, not on Ray).
    compact True copies the live vectors into a new store now if any row is dead (deleted, changed or
    forgotten files'), False never, None when the dead rows are many (indexer/compact.py).
    encoders keeps the encoder loaded for the next run of this process (index --watch); None loads it per run.
    scope lists only where changes were seen (index --watch; indexer/roots.py Scope); None lists every root whole.
    links: the folders holding links to files, kept across runs (index --watch) and listed by each scoped run.
    """
    roots = [name for root in roots for name in sources.normalise(str(root))]
    # option values out of range, or two options that exclude each other: bad usage, exit 2 (they said 6)
    # inf too: it was remembered, and `roots --json` then printed Infinity, which no JSON reader takes
    if video_interval is not None and not 1 <= video_interval < float("inf"):
        raise UsageError(f"--video-interval must be a number of seconds, at least 1, got {video_interval}")
    if ondisk_shards and index_shards:
        raise UsageError("choose one layout: --ondisk-shards (one merged file) or --index-shards (several files)")
    asked = [f"--{name}" for name, given in (("list-column", list_column), ("caption-column", caption_column)) if given]
    if asked and not any(sources.kind(r) == sources.LIST for r in roots):  # it was dropped, or remembered for a folder
        raise UsageError(f"{asked[0]} names a column of a .csv or .parquet list given with it, and "
                         f"{'no root is given' if not roots else 'no root given is one'} (a folder's captions are "
                         "photo.txt files beside its photos): e.g. `alignsearch index photos.csv --caption-column "
                         "caption`")
    if ondisk_shards and index_shards is None:
        index_shards = 0
    if index_shards and ondisk_shards is None:
        ondisk_shards = 0
    out = chosen_index_dir(index_dir)
    try:  # faiss takes only UTF-8 file names: the run failed at its very end, "unexpected TypeError ... write_index"
        str(out).encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"the index folder {out} has a name that is not UTF-8, which faiss cannot write its "
                         "ANN index to: give another --index") from None
    index_roots.refuse_names_not_utf8(roots)
    index_roots.refuse_index_folder(roots, out)
    if not roots and not (out / DB_FILE).exists():  # said before the model loads, and no empty index made
        raise BadInputError("no folder to index: give one, e.g. `alignsearch index ./photos`")
    # judged before the folder is made (catalog.connect judges it again): a run refused for a parent others may write
    # left the folder it made there behind
    catalog.refuse_untrusted(out, writing=True)
    created = not out.exists()
    # a link to a folder not made yet (`--index mine`, mine -> /mnt/big/ix): the folder it names, as its parent was
    # judged (paths.untrusted_parent); mkdir on the link itself said "File exists" (exit 1)
    made = Path(os.path.realpath(out)) if created and out.is_symlink() else out
    atomic.make_folders(made)  # never 0777 under umask 000: the index would refuse itself (untrusted_index)
    # each list read once in the run: the table judged (privacy) is the table the scan lists, never a list
    # replaced in between (sources.list_table)
    lists: dict = {}
    if created:  # no more readable by others than the photos it will hold, from its first file on
        made_st = os.stat(made)
        privacy.keep_private(out, roots, list_column, lists, judged=(made_st.st_dev, made_st.st_ino))
    try:
        with writer_lock(out) as held:
            db = catalog.connect(out / DB_FILE)
            try:
                # an index that existed: once this run holds it and can read it, so a run refused (another writer,
                # a damaged catalog) leaves it as it was and says one line
                told = None if created else _keep_private(db, out, roots, list_column, lists, held, scope)
                if told:
                    notices.say(told)
                use_ocr = _ocr_choice(db, ocr)
                remove_vector_leftovers(db, out)  # a killed compaction's copy, whether this run may compact or not
                options = IndexOptions(
                    model=model, device=device, batch_size=batch_size, workers=workers, include_hidden=include_hidden,
                    rebuild=rebuild, progress=progress, use_ray=use_ray or ray_address is not None,
                    ray_address=ray_address, ondisk_shards=ondisk_shards, index_shards=index_shards,
                    fast_decode=fast_decode, list_column=list_column, ray_actor_segments=ray_actor_segments,
                    caption_column=caption_column, backend=backend, precision=precision, video_interval=video_interval,
                    ocr=use_ocr, gpu_decode=gpu_decode, encoders=encoders, scope=scope, links=links, lists=lists)
                summary = _reindex(db, out, roots, options) if reindex else _index(db, out, roots, options)
                summary.compacted = _compact(db, out, compact)
                with db.begin() as conn:  # only now: a compaction or re-encode stopped part way is the run's too
                    state.write(conn, index_run=None)
                return summary
            finally:
                db.dispose()
    except ModelLoadError:
        if created:  # the model loads before anything is written: leave no empty index behind
            shutil.rmtree(made, ignore_errors=True)
        raise
    except (BadInputError, UsageError):  # refused: unusable input, or options that cannot go together (int8)
        # A first run refused before its model was recorded (--precision int8) left an index of nothing, which later
        # commands took for the user's: `query` answered "no results", exit 0, instead of "no index", 3. One refused
        # later (a new list without its --list-column) keeps the model it recorded, so the corrected run needs none.
        if created and _holds_nothing(out):
            shutil.rmtree(made, ignore_errors=True)
        raise


def _holds_nothing(out: Path) -> bool:
    """Whether the index at out records neither a model nor a file (False when that cannot be told)."""
    try:
        db = catalog.connect(out / DB_FILE, readonly=True)
        try:
            with db.connect() as conn:
                return state.read(conn).model is None and not any(catalog.counts(conn).values())
        finally:
            db.dispose()
    except Exception:  # noqa: BLE001 - an unreadable catalog is kept: never delete what cannot be judged
        return False


def chosen_index_dir(index_dir: str | os.PathLike | None) -> Path:
    """The index folder a run writes: index_dir, else $ALIGNSEARCH_INDEX, else the nearest `.alignsearch` above
    cwd, else a new `.alignsearch` in cwd."""
    return Path(index_dir or os.environ.get("ALIGNSEARCH_INDEX") or find_index_dir() or Path(INDEX_DIRNAME))


def _compact(db, out: Path, force: bool | None) -> dict | None:
    """Reclaim the vector rows no file uses any more (indexer/compact.py): when due (None), now (True), never
    (False). What was done, or None."""
    if force is False:
        return None
    done = compact.compact(db, out, force=bool(force))
    return done.to_dict() if done else None


def _keep_private(db, out: Path, roots: list[str], list_column: str | None, lists: dict, held: tuple[int, int],
                  scope: index_roots.Scope | None) -> str | None:
    """privacy.keep_private for an index that existed, judged by every root it holds, named or remembered (the run
    lists them all): a root made private since it was indexed left the index open to every user until it was named
    again. A remembered list is judged by the photos it names in a full run, which reads it anyway, and by the file
    alone in a scoped one (index --watch: a million-line list read at every change seen)."""
    with db.connect() as conn:
        recorded = state.read(conn).roots
    # as the scan reads them (_index): a list's remembered column unless this run names another; None over it judged
    # a list named again without --list-column by the default column (none in a list of two: its file alone)
    columns = {**recorded.list_columns, **({r: list_column for r in roots if sources.kind(r) == sources.LIST}
                                           if list_column else {})}
    every = list(dict.fromkeys([*roots, *recorded.roots]))
    return privacy.keep_private(out, every, columns, lists, judged=held, by_photos=roots if scope is not None else None)


def _ocr_choice(db, ocr: bool | None) -> bool:
    """Whether this run reads text in images: `ocr` when given (remembered), else the index's choice. A missing
    engine is refused here, before anything is loaded or written."""
    with db.connect() as conn:
        remembered = state.read(conn).ocr
    chosen = remembered if ocr is None else bool(ocr)
    if chosen:
        from alignsearch.media.ocr import check_available

        try:
            check_available()
        except BadInputError as exc:
            if ocr is None:  # remembered from an earlier run, not asked now: the other way out is to stop asking
                raise BadInputError(f"{exc} (this index reads text in images since an earlier `index --ocr`; "
                                    "`alignsearch index --no-ocr` stops)") from None
            raise
    if ocr is not None and chosen != remembered:
        with db.begin() as conn:
            state.write(conn, ocr=chosen)
    return chosen


def _reindex(db, out: Path, roots: list, opts: IndexOptions) -> Summary:
    """Re-encode everything as a new generation (indexer/reindex.py), then index new and changed files."""
    with db.connect() as conn:
        st = state.read(conn)
        recorded = st.model
        indexed = {root: n.get(catalog.INDEXED, 0) for root, n in index_roots.count_by_root(conn).items()}
    if recorded is None:  # nothing encoded yet: an ordinary first run
        return _index(db, out, roots, opts)
    hidden = {root: bool(o.get("include_hidden")) for root, o in st.roots.options.items()}
    away = reindex.out_of_reach(indexed, sources.kind, sources.exists,
                                lambda r: scan.empty_folder(r, include_hidden=hidden.get(r, False))
                                or not os.access(r, os.R_OK | os.X_OK))
    if away:  # before the model loads: nothing written
        n = sum(indexed[r] for r in away)
        raise BadInputError(f"cannot re-encode: {', '.join(away)} {'is' if len(away) == 1 else 'are'} missing, empty or "
                            f"unreadable (an unplugged drive?), and {n} indexed file(s) there would drop out of search "
                            f"until back: reconnect it and run again, or `alignsearch forget {away[0]}` first")
    with db.connect() as conn:
        unmounted = [os.path.join(root, rel) for root, o in sorted(st.roots.options.items()) if indexed.get(root)
                     for rel in index_roots.unplugged_mounts(
                         root, o.get(index_roots.MOUNTS, {}), include_hidden=bool(o.get("include_hidden")),
                         indexed=lambda rel, root=root: _indexed_under(conn, root, rel))]
    if unmounted:  # a drive mounted inside a root: its files look deleted, and would lose their vectors
        raise BadInputError(f"cannot re-encode: {', '.join(unmounted[:3])}{' and more' if len(unmounted) > 3 else ''} "
                            f"{'is a folder' if len(unmounted) == 1 else 'are folders'} where a drive was mounted, now "
                            "empty or without the files indexed there (unplugged?), and those files would drop out of "
                            "search: reconnect it and run again")
    # access first: one system call for a readable file (most), a second only for one it cannot read
    within = reindex.unreadable_within(_local_indexed_paths(db), _listing_error,
                                       lambda p: not os.access(p, os.R_OK) and os.path.lexists(p))
    if within:  # a chmod, an I/O error below a root that lists, a link to an unplugged drive: refused as a missing root
        n, shown = sum(within.values()), list(within)[:3]
        raise BadInputError(f"cannot re-encode: {n} indexed file(s) in {', '.join(shown)}"
                            f"{f' and {len(within) - 3} more folder(s)' if len(within) > 3 else ''} cannot be read now "
                            "(unreadable, or links whose target is gone: an unplugged drive?), and would drop out of "
                            "search: make them readable and run again, or remove them first")
    encoder = reindex.load_new_model(recorded.record, opts.model, opts.encoder)  # before anything is written
    _run_begins(db)
    with db.connect() as conn:
        store = vectors.load(conn, out, recorded.dim)
    store.truncate_uncommitted()
    bar = progress.bar(desc="re-encoding", enabled=opts.progress)
    workers = default_workers() if opts.workers is None else opts.workers
    count = reindex.reencode(db, out, encoder, store, workers, _batch_size(opts, encoder), opts.fast_decode, bar.update)
    bar.close()
    reindex.switch(db, out, encoder, store, {"ondisk_shards": opts.ondisk_shards, "index_shards": opts.index_shards})
    if opts.encoders is not None:  # the index records the new model now
        opts.encoders.keep(opts.model, opts.encoder, encoder)
    with db.connect() as conn:
        reindex.fold(db, vectors.load(conn, out, encoder.dim))
    summary = _index(db, out, roots, opts, encoder, run_begun=True)
    summary.reencoded = count
    if count:  # the run after it records its encoder only when it encodes new files: `info` named the one before
        with db.begin() as conn:
            state.write(conn, encoder=summary.encoder)
    return summary


def _indexed_under(conn, root: str, folder: str) -> Iterator[tuple[str, int]]:
    """(path, size indexed) of the files catalogued under `folder` (relative) of a folder root, read as they are
    asked for (unplugged_mounts stops at the first that is there): three columns, not whole rows."""
    from sqlalchemy import select

    f = catalog.files.c
    query = select(f.relpath, f.relpath_raw, f.size).where(f.root == root,
                                                           *catalog.under_folder(scan.printable(folder)[0]))
    for relpath, raw, size in conn.execute(query):
        yield sources.location(root, relpath, raw), size


def _local_indexed_paths(db) -> list[str]:
    """The path of every indexed file of a local folder root, a video once. Only the three columns the paths take
    are read (whole rows of a million files took about 0.9 GB), and each root's kind is decided once."""
    from sqlalchemy import select

    f = catalog.files.c
    with db.connect() as conn:
        rows = conn.execute(select(f.root, f.relpath, f.relpath_raw).where(
            f.status == catalog.INDEXED, f.moment == 0).order_by(f.id)).all()
    folder = {root: not sources.is_url(root) and sources.kind(root) == sources.FOLDER for root in {r[0] for r in rows}}
    return [sources.location(root, relpath, raw) for root, relpath, raw in rows if folder[root]]


def _listing_error(folder: str) -> str | None:
    """Why a folder cannot be listed now; None when it can, or is gone (deleted or moved: not an error)."""
    try:
        with os.scandir(folder) as it:
            next(it, None)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def _batch_size(opts: IndexOptions, encoder: Encoder) -> int:
    batch_size = opts.batch_size or (256 if encoder.device.type == "cuda" else 32)
    if batch_size < 1:
        raise BadInputError("--batch-size must be at least 1")
    return batch_size


def _load_encoder(db, model: str | None, options: EncoderOptions, encoders: EncoderCache | None = None) -> Encoder:
    """The index's model (from `model` when given: the same weights at another place, remembered there);
    the first run records the model it loads. Its cached exports when they are all a CPU run needs
    (alignsearch/encoders/cached.py: no torch, no transformers), else the checkpoint itself. encoders: the
    one an earlier run of this process loaded, when it is still the one asked for (EncoderCache)."""
    from alignsearch.encoders.loader import open_encoder

    if options.precision == "int8":
        raise UsageError("--precision int8 is for the text tower (query, serve): index with fp32 or bf16")
    with db.connect() as conn:
        identity = state.read(conn).model
    recorded = None if identity is None else identity.record
    warm = encoders.get(EncoderCache.key_of(model, options, identity)) if encoders is not None else None
    if warm is not None:
        return warm
    enc = open_encoder(model, options, recorded)
    if identity is None or model_identity(identity) != model_identity(enc):
        with db.begin() as conn:
            state.write(conn, model=state.ModelIdentity.from_record(enc.describe()))
    if encoders is not None:
        encoders.keep(model, options, enc)
    return enc


def ray_plan(actor_plans: list[dict], driver: dict) -> dict:
    """What a Ray run reports as its encoder: the plan the actors reported (all the same), else the driver's
    with each distinct actor plan listed (an actor whose export failed ran torch, and says why)."""
    if len(actor_plans) == 1:
        return {**actor_plans[0], "note": "; ".join(filter(None, ["what every Ray encoder actor ran",
                                                                   actor_plans[0].get("note")]))}
    return {**driver, "actors": actor_plans,
            "note": "Ray encoder actors ran different plans: see actors" if actor_plans else
            "encoded by Ray actors, which reported no plan"}


def _check_store(db, store: VectorStore, out: Path) -> None:
    """Refuse to append to a vector store whose committed rows fail their checksums or are cut short;
    adopt (checksum) rows written before checksums existed; finish an ANN rename a crash interrupted."""
    with db.begin() as conn:
        found = vectors.check(conn, store)
        if found.problems:
            raise IndexDamagedError(f"the vector store is damaged ({'; '.join(found.problems)}): nothing was "
                                    "changed; run `alignsearch verify --repair`")
        for segment in found.legacy_segments:
            if vectors.adopt_segment(conn, store, segment):
                raise IndexDamagedError(f"{store.segment_path(segment).name} holds vectors that are not unit "
                                        "length (damaged): run `alignsearch verify --repair`")
        record = layouts.read_record(conn)
    layouts.finish_publish(out, record)


def _index(db, out: Path, roots: list, opts: IndexOptions, encoder: Encoder | None = None, *,
           run_begun: bool = False) -> Summary:
    """An ordinary run over roots. run_begun: the caller (_reindex) already marked the run under way: one run writes
    its mark once (it was written again here, a second transaction moving the recorded start)."""
    summary = Summary(str(out.resolve()))
    encoder = encoder or _load_encoder(db, opts.model, opts.encoder, opts.encoders)
    with db.connect() as conn:
        before = state.read(conn)  # _check_store below writes neither roots nor the run's mark
        store = vectors.load(conn, out, encoder.dim, before.vectors)
    columns = dict(before.roots.list_columns)
    _check_store(db, store, out)
    known_roots = list(before.roots.roots)
    if not run_begun:
        _run_begins(db)
    with _refusal_undoes_the_mark(db, before.index_run):
        _refuse_missing_columns(roots, opts)
        all_roots, known_roots, holders, summary.notes = index_roots.place(db, roots, known_roots, opts.include_hidden)
        if opts.list_column:
            columns.update({r: opts.list_column for r in roots if sources.kind(r) == sources.LIST})
        if not all_roots:
            raise BadInputError("no folder to index: give one, e.g. `alignsearch index ./photos`")
        options = index_roots.options_for(db, list(dict.fromkeys(holders.values())) if roots else all_roots,
                                          opts.include_hidden)
        if opts.caption_column:  # a list's column: a folder given beside the list has none
            for r in roots:
                if sources.kind(r) == sources.LIST:
                    options.setdefault(r, {})["caption_column"] = opts.caption_column
        if opts.video_interval is not None:
            for r in (list(dict.fromkeys(holders.values())) if roots else all_roots):
                options.setdefault(r, {})["video_interval"] = opts.video_interval
                if opts.video_interval == video.DEFAULT_INTERVAL:  # only what differs from the default is kept
                    options[r].pop("video_interval")

        scanned = index_roots.scan_all(db, all_roots, known_roots, options, columns, str(out.resolve()), opts.scope,
                                         opts.links, opts.lists)
    index_roots.remember(db, all_roots, columns, options, scanned)
    if scanned.confirmed:  # their content is the one recorded: the next run need not hash them again
        with db.begin() as conn:
            catalog.relisted(conn, scanned.confirmed)
    todo, removed = scanned.todo, scanned.removed
    clips = [f for f in todo if video.is_video(f.relpath)]  # read by indexer/videos.py, after the photos
    photo_todo = [f for f in todo if not video.is_video(f.relpath)]
    summary.unchanged, summary.kept = scanned.unchanged, scanned.kept
    summary.listing_errors, summary.no_images = scanned.listing_errors, scanned.no_images
    summary.notes += scanned.notes
    failed_now: set = set()
    read_now = [0]  # images whose text this run's pipeline read
    write = _counting_failures(writer.catalog_writer(db, store), failed_now, read_now)

    store.truncate_uncommitted()
    workers = default_workers() if opts.workers is None else opts.workers
    batch_size = _batch_size(opts, encoder)
    bar = progress.bar(total=len(todo), desc="indexing", enabled=opts.progress)
    gone_hashes = {r.sha256 for r in removed if r.status == catalog.INDEXED}
    moved_in = []

    def known(hashes: list[str]) -> dict[str, int]:
        with db.connect() as conn:
            rows = catalog.vectors_by_hash(conn, hashes)
        moved_in.extend(h for h in hashes if h in rows and h in gone_hashes)
        return rows

    # a video is committed whole; its moments are encoded as they come, in the CPU's best batch
    video_batch = CPU_MICRO_BATCH if encoder.device.type == "cpu" else batch_size
    # The videos' decode worker starts now, when the run knows it has videos to read: its spawn and imports go on
    # during the photos (and the first video's hash), where a worker started at the first video made the run wait.
    with videos.decoder(workers, video_batch) if clips else contextlib.nullcontext() as video_worker:
        if opts.use_ray:
            from indexer.ray_pipeline import run_ray

            times = run_ray(photo_todo, encoder.name, opts.device, encoder.spec, store, write, batch_size,
                            opts.ray_address, on_batch=bar.update, fast=opts.fast_decode,
                            actor_segments=opts.ray_actor_segments,
                            encoder_options={"backend": opts.backend, "precision": opts.precision})
            store.truncate_uncommitted()  # what actors killed mid-batch wrote; every actor has finished
            times.extra["vectors_folded"] = writer.fold_small_segments(db, store, writer.FOLD_BELOW_ROWS)
        else:
            known_text = {}
            if opts.ocr and removed:  # a moved or renamed file keeps the text read in it, as it keeps its vector
                with db.connect() as conn:
                    texts = catalog.ocr_of(conn, [r.id for r in removed if r.status == catalog.INDEXED])
                known_text = {r.sha256: texts[r.id] for r in removed if r.id in texts and r.sha256}
            on_gpu = _gpu_decode(opts, encoder) if photo_todo else None
            if on_gpu is not None:
                from indexer import gpudecode

                items = gpudecode.read_items(photo_todo, encoder.spec, workers_for(workers, len(photo_todo), batch_size),
                                             gpudecode.GpuDecodeOptions(
                                                 device=str(encoder.device), fast=opts.fast_decode))
            else:
                items = pipeline.read_items(photo_todo, encoder.spec, workers_for(workers, len(photo_todo), batch_size),
                                            fast=opts.fast_decode, ocr=opts.ocr, ocr_known=known_text)
            times = pipeline.run(items, encoder, write, batch_size, bar.update, known,
                                 encode_size=CPU_MICRO_BATCH if encoder.device.type == "cpu" else None)
            if on_gpu is not None:
                times.extra["gpu_decode"] = {"note": on_gpu, **items.stats.to_dict()}
        if clips:
            found = videos.index_videos(db, store, encoder, clips, {r: options.get(r, {}).get(
                "video_interval", video.DEFAULT_INTERVAL) for r in all_roots},
                video_batch, bar.update, workers=workers, worker=video_worker)
            failed_now |= found.failed
            moved_in.extend(h for h in found.moved_in if h in gone_hashes)
            times.reused += found.reused
            times.items += len(clips)
            times.failed += len(found.failed)
            times.extra.update(found.to_dict())
    bar.close()
    from alignsearch.notices import say

    say("finishing: removing gone files, filling hashes and photo fields, building the ANN index, "
        "preparing text queries")
    # Gone files leave only after the new paths were written, so moved content could reuse their vectors, and
    # in the transaction that commits the ANN index without them (sync_index below): a run killed before
    # leaves catalog and ANN index as they were (a catalog ahead of its ANN index answered fewer than k: the
    # top hits named files no longer in it)
    gone_ids = [r.id for r in removed]  # not read by the fill steps: deleted from disk, their rows about to go
    times.extra["phashes_filled"] = phashfill.fill_index(db, workers, without_ids=gone_ids)
    times.extra["photo_fields_filled"] = photos.fill(db, {r: o.get("caption_column") for r, o in options.items()},
                                                     columns, without_ids=gone_ids)
    unread: set[str] = set()
    times.extra["captions_read_again"] = photos.recaption(db, scanned.caption_links, unread)
    for root in unread:  # a caption it could not read now is read by the next run, as one edited since
        scanned.listed.pop(root, None)
    index_roots.remember_listed(db, scanned)  # only now: a run killed before leaves them to the next
    summary.ocr = {"enabled": opts.ocr, "read": read_now[0]}
    if opts.ocr:  # images indexed before --ocr (or by Ray's actors): read now, their vectors untouched
        with db.connect() as conn:
            unread = catalog.count_without_ocr(conn, without_ids=gone_ids)
        reading = progress.bar(total=unread, desc="reading text", enabled=opts.progress and unread > 0)
        filled, seconds = ocrfill.fill(db, workers, reading.update, without_ids=gone_ids)
        reading.close()
        times.ocr += seconds
        times.extra["ocr_filled"] = filled
        summary.ocr["read"] += filled
    # Each file counted once: failed (new or changed, it could not be used), else updated (changed), moved
    # (new path, content of a gone file), or added.
    summary.moved = len(set(moved_in))
    summary.removed = len(removed) - summary.moved
    summary.failed = len(failed_now)
    summary.updated = len(scanned.changed - failed_now)
    summary.added = len(todo) - len(scanned.changed) - len(failed_now - scanned.changed) - summary.moved
    summary.reused = times.reused
    live = None
    if gone_ids:  # what the ANN index holds once their deletion commits with it
        with db.connect() as conn:
            live = catalog.live_pairs(conn, without_ids=gone_ids)
    built = build.sync_index(db, store, out / ANN_FILE, rebuild=opts.rebuild, ondisk_shards=opts.ondisk_shards,
                             index_shards=opts.index_shards, live=live,
                             on_commit=lambda conn: catalog.delete_files(conn, gone_ids))
    with db.connect() as conn:
        summary.ocr["with_text"] = catalog.count_with_text(conn)
        summary.fill_failures = catalog.fill_failure_counts(conn)
    times.extra["index_build"] = round(built.pop("seconds"), 3)
    summary.index = built
    # After encoding (a failed ONNX export has switched the plan to torch), before tagging (whose text export
    # could switch it again, for text only).
    summary.encoder = encoder.plan.to_dict()
    if opts.use_ray and "actor_plans" in times.extra:  # none when nothing was new: no actor ran (run_ray)
        summary.encoder = ray_plan(times.extra.pop("actor_plans"), summary.encoder)
    with db.connect() as conn:
        tagging = state.read(conn).tagging
    if tagging:  # new images get the labels the library was tagged with
        summary.tags = _tag(db, store, encoder, tagging)
    summary.times = times.to_dict()
    encoder.prepare_text()  # with ONNX: the first `alignsearch query` then runs without loading torch
    if times.items - times.reused - times.failed > 0:
        with db.begin() as conn:
            state.write(conn, encoder=summary.encoder)  # what `info` reports
    return summary


def _refuse_missing_columns(roots: list[str], opts: IndexOptions) -> None:
    """A --list-column or --caption-column the list given with it does not have: refused before anything is written
    (BadInputError, exit 6). For a list the index knew, the run said it as a listing error, exit 0, and remembered
    the column, so every later run failed to list the root until it was given again right."""
    for root in roots:
        if sources.kind(root) != sources.LIST:
            continue
        asked = [c for c in (opts.list_column, opts.caption_column) if c is not None]
        names = sources.list_columns(root) if asked else None
        missing = [c for c in asked if names is not None and c not in names]
        if missing:
            raise BadInputError(f"cannot index {root}: the list has no column {missing[0]} (columns: {', '.join(names)}): "
                                "name the one you mean with --list-column / --caption-column")


@contextlib.contextmanager
def _refusal_undoes_the_mark(db, mark):
    """A run refused while it places and lists its roots (BadInputError: no folder to index, a new root that cannot
    be listed) wrote nothing a run leaves but place's roots move (one transaction): the run-under-way mark goes back
    to what it was (an earlier interrupted run's stays), so `info` does not call the refused run interrupted. A run
    killed there keeps the mark: it was under way."""
    try:
        yield
    except BadInputError:
        with db.begin() as conn:
            state.write(conn, index_run=mark)
        raise


def _run_begins(db) -> None:
    """Record that an index run is under way, until index_folders ends it after its compaction: `info` tells an
    interrupted run from a finished one, and `verify` notes what one stopped part way left (uncommitted vector
    bytes, unknown segments) instead of calling it damage. Recorded once the model has loaded, so a model that
    cannot be loaded leaves none."""
    with db.begin() as conn:
        stopped = state.read(conn, "index_run").index_run  # a run's mark still there: it stopped (the lock is ours)
        # where this run's own commits begin: readers search the stopped run's files below it until this run's build
        below = None if stopped is None else catalog.next_id(conn)
        state.write(conn, index_run=state.IndexRun(started=time.time(), pid=os.getpid(), pending_below=below))


def _gpu_decode(opts: IndexOptions, encoder: Encoder) -> str | None:
    """The GPU decode's note when this run decodes on the GPU (indexer/gpudecode.py), else None (logged why)."""
    import logging

    from indexer import gpudecode

    on, note = gpudecode.choose(opts.gpu_decode, encoder.device.type, ocr=opts.ocr, use_ray=opts.use_ray,
                                spec_problem=gpudecode.unsupported(encoder.spec),
                                why_not=lambda: gpudecode.unavailable(str(encoder.device)))
    if opts.gpu_decode and not on:
        raise BadInputError(f"--gpu-decode cannot run here: {note.removeprefix('off: ')}")
    logging.getLogger(__name__).info("GPU JPEG decode %s", note)
    return note if on else None


def _counting_failures(write, failed: set, read: list | None = None):
    """The writer, noting (root, relpath) of each file that could not be used (and counting in read[0] the
    images whose text was read)."""

    def counted(batch, new_vectors, *args, **kwargs):
        write(batch, new_vectors, *args, **kwargs)
        failed.update((it.found.root, it.found.relpath) for it in batch if it.crop is None)
        if read is not None:
            read[0] += sum(1 for it in batch if it.crop is not None and it.ocr_seconds > 0)  # not text carried over

    return counted


def _tag(db, store: VectorStore, encoder: Encoder, tagging: dict) -> dict:
    from indexer.tag import tag_runs

    return tag_runs(db, store, encoder, tagging)


def tag_index(index_dir: str | os.PathLike, labels: list[str], templates: list[str], threshold: float, top: int,
              device: str = "auto", clear: bool = False) -> dict:
    """Tag every indexed image with the labels (lines of a labels file) it matches, from stored vectors; tags
    of other labels stay (clear: forget every tag first); remembered for later runs (indexer/tag.py)."""
    from indexer import tag

    labels = tag.parse_labels(labels)
    if not labels and not clear:
        raise BadInputError("the labels file holds no labels: write one label per line (# starts a comment)")
    if not 0 <= threshold <= 1 or top < 1:  # an option value out of range: exit 2, as dupes --threshold and --top's own
        raise UsageError("--threshold must be in [0, 1] and --top at least 1")
    check_templates(templates)  # before --clear removes anything: a bad template is refused with nothing changed
    out = Path(index_dir)
    with writer_lock(out):
        db = catalog.connect(out / DB_FILE)
        try:
            if clear:
                tag.clear(db)
                if not labels:
                    return {"images": 0, "tags": 0, "per_label": {}, "cleared": True}
            encoder = _load_encoder(db, None, EncoderOptions(device=device))
            with db.connect() as conn:
                store = vectors.load(conn, out, encoder.dim)
                before = state.read(conn).tagging
            run = {"labels": labels, "templates": list(templates or DEFAULT_TEMPLATES), "threshold": threshold, "top": top}
            return {**tag.tag_runs(db, store, encoder, {"runs": [run]}, remember=tag.with_run(before, run)),
                    "cleared": clear}
        finally:
            db.dispose()


def tune_index(index_dir: str | os.PathLike, target_recall: float) -> dict:
    """Re-tune nprobe and the re-rank depth of an existing index for a new target recall@10."""
    if not 0 < target_recall <= 1:  # an option's value out of range: exit 2, as tag's --threshold
        raise UsageError(f"--recall must be in (0, 1], got {target_recall}")
    out = Path(index_dir)
    with writer_lock(out):
        db = catalog.connect(out / DB_FILE)
        try:
            with db.connect() as conn:
                store = vectors.load(conn, out, state.read(conn).model.dim)
            return build.sync_index(db, store, out / ANN_FILE, target_recall=target_recall)
        finally:
            db.dispose()
