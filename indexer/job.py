"""`alignsearch index`: scan the roots, encode what is new or changed, update the index."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from alignsearch import catalog, sources, vectors
from alignsearch.engine import ANN_FILE, DB_FILE, INDEX_DIRNAME, VECTORS_FILE, find_index_dir
from alignsearch.errors import BadInputError, ModelMismatchError
from alignsearch.model import DEFAULT_MODEL, Encoder
from alignsearch.vectors import VectorStore
from indexer import build, pipeline, scan, writer
from indexer.lock import writer_lock


@dataclass
class Summary:
    index_dir: str
    added: int = 0
    updated: int = 0
    moved: int = 0  # new paths whose content was indexed under a path that is gone: vector reused
    removed: int = 0
    failed: int = 0
    unchanged: int = 0
    reused: int = 0  # files not encoded because identical content was already indexed
    index: dict = field(default_factory=dict)
    tags: dict | None = None
    times: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class IndexOptions:
    model: str | None
    device: str
    batch_size: int | None
    workers: int | None
    include_hidden: bool
    rebuild: bool
    progress: bool
    use_ray: bool
    ray_address: str | None
    ondisk_shards: int | None
    index_shards: int | None
    fast_decode: bool
    list_column: str | None
    ray_actor_segments: bool


def default_workers() -> int:
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def index_folders(
    roots: list[str | os.PathLike],
    index_dir: str | os.PathLike | None = None,
    model: str | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    workers: int | None = None,
    include_hidden: bool = False,
    rebuild: bool = False,
    reindex: bool = False,
    progress: bool = False,
    ray_address: str | None = None,
    use_ray: bool = False,
    ondisk_shards: int | None = None,
    index_shards: int | None = None,
    fast_decode: bool = False,
    list_column: str | None = None,
    ray_actor_segments: bool = True,
) -> Summary:
    """Index `roots` (plus every root the index already knows) into index_dir.

    A root is a folder, a URL prefix (s3://bucket/photos: any fsspec protocol whose package is
    installed), a .csv/.parquet list of paths or URLs (list_column names the column; remembered), or
    WebDataset .tar shards (`shards-{000..099}.tar` expands); see alignsearch/sources.py.

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
    """
    roots = [name for root in roots for name in sources.normalise(str(root))]
    if ondisk_shards and index_shards:
        raise BadInputError("choose one layout: --ondisk-shards (one merged file) or --index-shards (several files)")
    if ondisk_shards and index_shards is None:
        index_shards = 0
    if index_shards and ondisk_shards is None:
        ondisk_shards = 0
    chosen = index_dir or os.environ.get("ALIGNSEARCH_INDEX") or find_index_dir() or Path(INDEX_DIRNAME)
    out = Path(chosen)
    out.mkdir(parents=True, exist_ok=True)
    with writer_lock(out):
        db = catalog.connect(out / DB_FILE)
        try:
            if reindex:
                _forget_vectors(db, out)
            options = IndexOptions(model, device, batch_size, workers, include_hidden, rebuild or reindex, progress,
                                   use_ray or ray_address is not None, ray_address, ondisk_shards, index_shards,
                                   fast_decode, list_column, ray_actor_segments)
            return _index(db, out, roots, options)
        finally:
            db.dispose()


def _forget_vectors(db, out: Path) -> None:
    """Empty the catalog and vector store in one commit (roots are kept); the model is chosen anew."""
    with db.begin() as conn:
        catalog.delete_all_files(conn)
        empty = VectorStore(out / VECTORS_FILE, 1, 0)
        vectors.save(conn, empty)
        catalog.delete_meta(conn, "model")
    empty.truncate_uncommitted()


def _load_encoder(db, model: str | None, device: str) -> Encoder:
    with db.connect() as conn:
        recorded = catalog.get_meta(conn, "model")
    enc = Encoder(model or (recorded or {}).get("model") or DEFAULT_MODEL, device)
    if recorded is None:
        with db.begin() as conn:
            catalog.set_meta(conn, "model", enc.describe())
    elif recorded["fingerprint"] != enc.fingerprint:
        raise ModelMismatchError(
            f"this index was built with {recorded['model']} (fingerprint {recorded['fingerprint']}), "
            f"not {enc.name} ({enc.fingerprint}): leave out --model, or index into a new --index DIR"
        )
    return enc


def _index(db, out: Path, roots: list, opts: IndexOptions) -> Summary:
    from tqdm import tqdm

    summary = Summary(str(out.resolve()))
    encoder = _load_encoder(db, opts.model, opts.device)
    with db.connect() as conn:
        known_roots = catalog.get_meta(conn, "roots", [])
        columns = catalog.get_meta(conn, "list_columns", {})
        store = vectors.load(conn, out, encoder.dim)
    all_roots = list(dict.fromkeys(known_roots + roots))
    if opts.list_column:
        columns.update({r: opts.list_column for r in roots if sources.kind(r) == sources.LIST})
    if not all_roots:
        raise BadInputError("no folder to index: give one, e.g. `alignsearch index ./photos`")

    todo: list[scan.Found] = []
    removed: list[catalog.FileRow] = []
    with db.connect() as conn:
        for root in all_roots:
            try:
                if not sources.exists(root):
                    raise FileNotFoundError(f"{root} is missing")
                found = list(scan.scan(root, opts.include_hidden, columns.get(root)))
            except Exception as exc:  # noqa: BLE001 - a source that cannot be listed, whatever its backend says
                reason = str(exc) if isinstance(exc, (BadInputError, FileNotFoundError)) else f"{type(exc).__name__}: {exc}"
                if root not in known_roots:  # a new root is only remembered once it could be listed
                    raise BadInputError(f"cannot index {root}: {reason}") from None
                print(f"warning: {reason}; its files stay in the index", file=sys.stderr)
                continue
            d = scan.diff(found, catalog.files_under(conn, root))
            todo += d.todo
            removed += d.removed
            summary.updated += len(d.changed_ids)
            summary.unchanged += d.unchanged
    with db.begin() as conn:
        catalog.set_meta(conn, "roots", all_roots)
        catalog.set_meta(conn, "list_columns", columns)

    store.truncate_uncommitted()
    workers = default_workers() if opts.workers is None else opts.workers
    batch_size = opts.batch_size or (256 if encoder.device.type == "cuda" else 32)
    if batch_size < 1:
        raise BadInputError("--batch-size must be at least 1")
    bar = tqdm(total=len(todo), unit="img", disable=not opts.progress, desc="indexing")
    gone_hashes = {r.sha256 for r in removed if r.status == catalog.INDEXED}
    moved_in = []

    def known(hashes: list[str]) -> dict[str, int]:
        with db.connect() as conn:
            rows = catalog.vectors_by_hash(conn, hashes)
        moved_in.extend(h for h in hashes if h in rows and h in gone_hashes)
        return rows

    if opts.use_ray:
        from indexer.ray_pipeline import run_ray

        times = run_ray(todo, encoder.name, opts.device, encoder.spec, store, writer.catalog_writer(db, store), batch_size,
                        opts.ray_address, on_batch=bar.update, fast=opts.fast_decode,
                        actor_segments=opts.ray_actor_segments)
        store.truncate_uncommitted()  # what actors killed mid-batch wrote; every actor has finished
        times.extra["vectors_folded"] = writer.fold_small_segments(db, store, writer.FOLD_BELOW_ROWS)
    else:
        items = pipeline.read_items(todo, encoder.spec, workers if len(todo) > batch_size else 0,
                                    fast=opts.fast_decode)
        times = pipeline.run(items, encoder, writer.catalog_writer(db, store), batch_size, bar.update, known)
    bar.close()
    # Gone files leave only after the new paths were written, so moved content could reuse their vectors.
    with db.begin() as conn:
        catalog.delete_files(conn, [r.id for r in removed])
    summary.moved = len(set(moved_in))
    summary.removed = len(removed) - summary.moved
    summary.added = len(todo) - summary.updated - summary.moved
    summary.failed = times.failed
    summary.reused = times.reused
    built = build.sync_index(db, store, out / ANN_FILE, rebuild=opts.rebuild, ondisk_shards=opts.ondisk_shards,
                             index_shards=opts.index_shards)
    times.extra["index_build"] = round(built.pop("seconds"), 3)
    summary.index = built
    with db.connect() as conn:
        tagging = catalog.get_meta(conn, "tagging")
    if tagging:  # new images get the labels the library was tagged with
        summary.tags = _tag(db, store, encoder, tagging)
    summary.times = times.to_dict()
    return summary


def _tag(db, store: VectorStore, encoder: Encoder, tagging: dict) -> dict:
    from indexer.tag import tag_all

    labels = tagging["labels"]
    vectors = encoder.encode_labels(labels, tagging["templates"])
    return tag_all(db, store, vectors, labels, encoder.temperature, tagging["threshold"], tagging["top"])


def tag_index(index_dir: str | os.PathLike, labels: list[str], templates: list[str], threshold: float, top: int,
              device: str = "auto") -> dict:
    """Tag every indexed image with the labels it matches, from stored vectors; remembered for later runs."""
    labels = list(dict.fromkeys(label.strip() for label in labels if label.strip()))
    if not labels:
        raise BadInputError("the labels file holds no labels: write one label per line")
    if not 0 <= threshold <= 1 or top < 1:
        raise BadInputError("--threshold must be in [0, 1] and --top at least 1")
    out = Path(index_dir)
    with writer_lock(out):
        db = catalog.connect(out / DB_FILE)
        try:
            encoder = _load_encoder(db, None, device)
            with db.connect() as conn:
                store = vectors.load(conn, out, encoder.dim)
            tagging = {"labels": labels, "templates": list(templates) or ["{}"], "threshold": threshold, "top": top}
            result = _tag(db, store, encoder, tagging)
            with db.begin() as conn:
                catalog.set_meta(conn, "tagging", tagging)
            return result
        finally:
            db.dispose()


def tune_index(index_dir: str | os.PathLike, target_recall: float) -> dict:
    """Re-tune nprobe and the re-rank depth of an existing index for a new target recall@10."""
    if not 0 < target_recall <= 1:
        raise BadInputError(f"--recall must be in (0, 1], got {target_recall}")
    out = Path(index_dir)
    with writer_lock(out):
        db = catalog.connect(out / DB_FILE)
        try:
            with db.connect() as conn:
                store = vectors.load(conn, out, int(catalog.get_meta(conn, "model")["dim"]))
            return build.sync_index(db, store, out / ANN_FILE, target_recall=target_recall)
        finally:
            db.dispose()
