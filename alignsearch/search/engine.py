"""The Python API: open an index directory and search it by text, image or both."""

from __future__ import annotations

import base64
import functools
import logging
import os
import threading
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from alignsearch.storage import ann, catalog, keywords, layouts, state, vectors
from alignsearch.search import filters, onefile, querycheck
# keyword_ranks is called through the module (a benchmark puts the sequential ranks in its place)
from alignsearch.search import query as query_module
from alignsearch.encoders.backend import encoder_options
from alignsearch.encoders.classify import DEFAULT_TEMPLATES
from alignsearch.search.columns import Columns
from alignsearch.media.photometa import iso
# DEFAULT_PER_VIDEO, MODES, SORTS: the request's rules, still named here for callers of the engine module
from alignsearch.search.request import DEFAULT_PER_VIDEO, MODES, SHARE_METHODS, SORTS, SearchRequest, build as build_request  # noqa: F401
from alignsearch.search.query import CALIBRATION_SAMPLE, LATE_FUSION, RRF_K, Parts, Scorer, resolve_compose, scorer
from alignsearch.search.query import AUTO_FUSION, best_first, fuse_candidates, null_prompts, null_z, settle_ties, tied_runs
from alignsearch.search.query import by_name
from alignsearch.errors import BadInputError, IndexDamagedError, IndexNotFoundError, ModelLoadError, UsageError
from alignsearch.storage.paths import ANN_FILE, DB_FILE, INDEX_DIRNAME, SERVER_FILE, VECTORS_FILE, find_index_dir, judged_key, own_entry, resolve_index_dir

log = logging.getLogger(__name__)

__all__ = ["ANN_FILE", "DB_FILE", "INDEX_DIRNAME", "SERVER_FILE", "VECTORS_FILE", "Engine", "Hit", "find_index_dir",
           "open", "resolve_index_dir"]


@dataclass(frozen=True)
class Hit:
    id: int
    path: str
    score: float
    root: str
    relpath: str
    width: int | None
    height: int | None
    format: str | None
    size: int
    mtime: float
    duplicates: list[int] = field(default_factory=list)  # near duplicates folded into this hit (collapse=True)
    taken: str | None = None  # ISO 8601 (UTC): EXIF capture time, else the file's mtime
    camera: str | None = None
    lens: str | None = None
    lat: float | None = None
    lon: float | None = None
    caption: str | None = None
    tags: list[str] = field(default_factory=list)
    t: float | None = None  # a video moment's start and end in seconds (alignsearch/media/video.py); None for photos
    t_end: float | None = None
    ocr: str | None = None  # the text read in the image (`index --ocr`); null when not read or none found
    # The vector side's exact score: the cosine to the query vector, or a late-fused score (compose product,
    # weicom). `score` equals it except in keyword and hybrid rankings, where `score` is the fused rank score.
    similarity: float | None = None
    parts: dict | None = None  # what the score is made of (late fusion's cosines, hybrid's ranks)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (CLI, HTTP): a name that is not UTF-8 shows its bytes as \\xNN in `path`, as in
        `relpath`, and comes whole in `path_b64` (base64 of the bytes), so a program can open the file."""
        out = asdict(self)
        raw = os.fsencode(self.path)
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            out["path"] = raw.decode("utf-8", "backslashreplace")
            out["path_b64"] = base64.b64encode(raw).decode("ascii")
        return out


@dataclass(frozen=True)
class Snapshot:
    """One consistent view of an index: a catalog generation with its model, vector store, ANN index and
    tuning. A reader swaps it whole (Engine.refresh), so a search never mixes two generations or an old
    plan with a new index."""

    generation: int
    model_info: dict
    roots: list
    tuning: dict
    store: vectors.VectorStore
    index: Any
    plan: ann.IndexPlan
    stamp: int  # the ANN files' modification stamp when read (layouts.stamp)
    videos: bool = False  # the index has held video moments (per-video caps apply)
    unbuilt: bool = False  # no ANN index was ever published: `index` is an exact one over the committed vectors
    # (file id, vector address) of the live files the ANN index lacks, read only while the state records an `index`
    # run whose process is gone (stopped after its commits, before its ANN build): scored exactly and merged into
    # every search's candidates (_vector_ids), so they are found until the next run builds them in. None: no such
    # run (no cost). A run still at work is not read: its files join the ANN index when it ends, and reading every
    # live pair again after each of its commits cost a query a catalog scan per batch the run committed. A run begun
    # after a stopped one keeps the stopped one's (carried from the snapshot before, no scan): the resumed run
    # builds them in only when it ends, and they were in no answer meanwhile. A snapshot opened while that run is at
    # work reads them too (those below its IndexRun.pending_below: committed before it began), so a reader opened
    # then finds what one opened before finds. Rows a run replaces or forgets drop out as searches find them gone
    # (pending_now)
    pending: np.ndarray | None = None
    run: Any = None  # the index run the state recorded when this was read (state.IndexRun; refresh compares it)
    run_stopped: bool = False  # that run's process was gone when this was read (its files read: pending)
    _columns: list = field(default_factory=list, compare=False, repr=False)  # filled once, on first use
    _lock: Any = field(default_factory=threading.Lock, compare=False, repr=False)
    _pruned: list = field(default_factory=list, compare=False, repr=False)  # pending less the rows found gone

    def pending_now(self) -> np.ndarray | None:
        """pending, less the rows searches found gone from the catalog since (drop_pending)."""
        with self._lock:
            return self._pruned[0] if self._pruned else self.pending

    def drop_pending(self, gone: list[int]) -> None:
        """Leave these ids out of pending from now on: their rows are gone, and ids are never reused."""
        with self._lock:
            now = self._pruned[0] if self._pruned else self.pending
            self._pruned[:] = [now[~np.isin(now[:, 0], np.asarray(gone, dtype=np.int64))]]

    @property
    def nprobe(self) -> int:
        """Tuned for the target recall after each build (indexer/tune.py), else the size rule."""
        return int(self.tuning.get("nprobe") or ann.default_nprobe(self.plan))

    def columns(self, db) -> Columns:
        """The snapshot's filterable metadata, loaded on first use (alignsearch/search/columns.py)."""
        with self._lock:
            if not self._columns:
                self._columns.append(Columns(db))
            return self._columns[0]


class _Stale(Exception):
    """The catalog moved to another generation while a search was reading it: search again."""


class SnapshotMoved(Exception):
    """A search pinned to a snapshot (Engine.snapshot) found the index moved to another generation: take a
    new snapshot and encode the query again (its model may have changed)."""


class Engine:
    """An opened index. The model loads on first use; searches may run from several threads.
    Opening writes nothing: a read-only index (mount, permissions) can be queried."""

    def __init__(self, index_dir: Path, model: str | None = None, device: str = "auto", text_bf16: bool = False, *,
                 backend: str = "auto", precision: str = "auto", text_soon=None):
        """text_soon: (model meta, future of a text encoder) from coldstart.text_encoder_soon, used if it is
        for the model this index's snapshot records."""
        self.dir = Path(index_dir)
        self._model_name = model
        self._enc_options = encoder_options(device=device, backend=backend, precision=precision, text_bf16=text_bf16)
        self._judged = judged_key(self.dir)  # before connect's judgement: a change while it judges is judged again
        self.db = catalog.connect(self.dir / DB_FILE, readonly=True)
        # The one encoder cache: (fingerprint, encoder, whether it encodes images); a text-only one
        # (cached.CachedText: no torch) gives way to the full encoder when an image is encoded.
        self._encoder = None
        self._text_soon = text_soon
        self._encoder_lock = threading.Lock()
        self._refresh_lock = threading.Lock()
        self._catalog_checked: set[tuple[int, str | None]] = set()  # (snapshot, table or None: all)
        self._calibration = None  # (snapshot, sample of its stored vectors): compose weicom's reference
        self._nulls = None  # (snapshot, best cosines of the null queries): the gate's scale (query.null_z)
        self.snap = self._open_snapshot()

    def _open_snapshot(self, before: Snapshot | None = None) -> Snapshot:
        """before: the snapshot this one replaces (refresh), whose pending files a run at work keeps searching."""
        with self.db.connect() as conn:
            # one read transaction: a writer's commit between the reads below gave live rows past the store read
            # first (a query during a first run failed with IndexError)
            conn.exec_driver_sql("BEGIN")
            st = state.read(conn)
            if st.model is None:
                damage = state.unrecorded_model(st, catalog.counts(conn).get(catalog.INDEXED, 0),
                                                layouts.pick(self.dir, st.ann).exists())
                if damage:
                    raise IndexDamagedError(f"{damage}: {state.RESTORE}")
                raise IndexNotFoundError(f"{self.dir} holds no indexed images yet: run `alignsearch index FOLDER`")
            model_info, generation, roots, videos = st.model.record, st.generation, list(st.roots.roots), st.videos
            record = st.ann
            tuning = dict(record.tuning)
            store = vectors.load(conn, self.dir, st.model.dim, st.vectors)
            store.expect_chunks(conn)  # a query checks the chunks it reads (vectors.VectorStore.expect_chunks)
            unbuilt = record.digest is None and not layouts.pick(self.dir, record).exists()
            run = st.index_run
            stopped = run is not None and not run_at_work(run)  # a finished index reads nothing more
            carried = run is not None and not stopped and before is not None and before.pending is not None \
                and before.generation == generation  # addresses move only with the generation
            # a run at work begun after a stopped one: the files committed before it began (no scan if carried)
            below = None if run is None or stopped or carried else run.pending_below
            live = catalog.live_pairs(conn) if unbuilt or stopped else \
                None if below is None else catalog.live_pairs(conn, below=below)
        if unbuilt:  # a first run stopped (or still running) before its ANN index: what it committed is searchable
            index = exact_index(store, live)
            return Snapshot(generation, model_info, roots, tuning, store, index, ann.describe(index), 0, unbuilt=True,
                            videos=videos)
        if not layouts.pick(self.dir, record).exists():  # the catalog records it built: gone is damage, not "no
            # index" (exit 3, which verify called damage and --repair mends)
            raise IndexDamagedError(f"{layouts.missing(self.dir)} again, or `alignsearch verify --repair`")
        stamp = layouts.stamp(self.dir)  # taken first: a publish while opening triggers one more refresh
        index = layouts.open_current(self.dir, record, reread=lambda: layouts.recorded(self.db))
        pending = None if live is None else missing_from(live, ann.stored_ids(index))
        if carried:
            kept = before.pending_now()
            pending = kept if before.stamp == stamp else missing_from(kept, ann.stored_ids(index))
        return Snapshot(generation, model_info, roots, tuning, store, index, ann.describe(index), stamp, videos,
                        pending=pending, run=st.index_run, run_stopped=stopped)

    def judge(self) -> None:
        """IndexUntrustedError where the folder is no longer one this engine may read (catalog.refuse_untrusted, the
        open's rule), judged again only when it changed (judged_key: a stat of each folder untrusted_parent judges, the
        folder's path walked as the kernel does, and one for each file the last judgement judged): one made writable by others since the open (`serve` runs for days) may hold a catalog or
        ANN file they planted, and a file of it made writable by others (`chmod o+w vectors.f16`) may be rewritten by
        them. Every read of a long-open engine asks it first: refresh does, and the server's reads that need no newer
        snapshot (Library.engine); a server's search asks once, for its snapshot (Library.snapshot), and its
        encoding and search read through that snapshot."""
        key = judged_key(self.dir, like=self._judged)
        if key != self._judged:  # entries, modes or owners changed since last judged: the whole folder again
            key = judged_key(self.dir)  # listed again, before the judgement: a change while it judges is judged again
            catalog.refuse_untrusted(self.dir, writing=False)
            own_entry(self.dir / DB_FILE)  # the pool's next connection opens it by name: not through a link
            self._judged = key

    def refresh(self) -> bool:
        """Pick up a newer generation or ANN index (files are replaced atomically); True if it changed. The folder
        is judged first (judge), so a catalog or ANN file planted since is read neither by this check nor by a new
        pooled connection."""
        self.judge()
        snap = self.snap
        with self.db.connect() as conn:
            # a first run's commits are searched as they come (unbuilt); a later run's once it is stopped (pending):
            # a run begun, ended or gone since the snapshot was read is a new one to read (one row of state more)
            st = state.read(conn, "generation", "index_run")
            generation = st.generation
            grown = snap.unbuilt and catalog.counts(conn)[catalog.INDEXED] != snap.index.ntotal or \
                not snap.unbuilt and run_stopped_since(snap.run, snap.run_stopped, st.index_run)
        if generation == snap.generation and layouts.stamp(self.dir) == snap.stamp and not grown:
            return False
        with self._refresh_lock:
            if self.snap is not snap:  # another thread refreshed meanwhile
                return True
            new = self._open_snapshot(snap)
            self.snap = new  # a re-encode's new model is loaded on next use (_encoder_of)
        return True

    # The snapshot's parts, for callers that read one of them (a search takes the snapshot once).
    model_info = property(lambda self: self.snap.model_info)
    roots = property(lambda self: self.snap.roots)
    tuning = property(lambda self: self.snap.tuning)
    store = property(lambda self: self.snap.store)
    index = property(lambda self: self.snap.index)
    plan = property(lambda self: self.snap.plan)

    @property
    def nprobe(self) -> int:
        return self.snap.nprobe

    @property
    def encoder(self):
        """The model of the index's current generation, loaded once; a different model given at open() is
        an error."""
        return self._encoder_of(self.snap)

    def _encoder_of(self, snap: Snapshot):
        with self._encoder_lock:
            fingerprint = snap.model_info["fingerprint"]
            if self._encoder is None or self._encoder[0] != fingerprint or not self._encoder[2]:
                # first use, a re-encode switched the model, or only text was loaded
                from alignsearch.encoders.loader import open_encoder

                # the index's model from its cached exports (no torch: alignsearch/encoders/cached.py), else loaded
                self._encoder = (fingerprint, open_encoder(self._model_name, self._enc_options, snap.model_info), True)
            return self._encoder[1]

    def _text_encoder_of(self, snap: Snapshot):
        """For text alone: the model if it is loaded, else the cached text tower of the index's model where the
        plan allows (no torch, no transformers: a cold query in about a second), else the model. The cache is found by
        the fingerprint the index recorded, so it is that model whatever --model says; an explicit --model
        still loads it (and checks it is the same)."""
        fingerprint = snap.model_info["fingerprint"]
        with self._encoder_lock:
            if self._encoder is not None and self._encoder[0] == fingerprint:
                return self._encoder[1]
            from alignsearch.encoders.loader import open_encoder

            # the plan decides (resolve.text_plan), as for every encoder; a failing cached tower falls back there
            enc = self._early_text(snap) or open_encoder(self._model_name, self._enc_options, snap.model_info,
                                                         text_only=True)
            self._encoder = (fingerprint, enc, not enc.text_only)
            return enc

    def _early_text(self, snap: Snapshot):
        """The text encoder coldstart began loading before this engine opened, if it is for this index's model."""
        if self._text_soon is None:
            return None
        (info, future), self._text_soon = self._text_soon, None
        if not all(info.get(k) == snap.model_info.get(k) for k in ("fingerprint", "content_digest")):
            return None
        try:
            return future.result()
        except Exception as exc:  # noqa: BLE001 - only a head start: the usual load runs (and reports) instead
            log.info("early text load failed: %s", exc)
            return None

    def encoder_plan(self) -> dict | None:
        """What encodes queries (backend and precision per tower), once one is loaded."""
        if self._encoder is None:
            return None
        enc = self._encoder[1]
        p = enc.plan
        return p if isinstance(p, dict) else p.to_dict()

    def snapshot(self) -> Snapshot:
        """The current snapshot, after picking up a newer one. A caller that encodes a query in one step and
        searches in another passes it to both (embed, vector_of, search_vector), so the query is encoded
        with the model of the vectors it is ranked against, even across a re-encode's model switch."""
        self.refresh()
        return self.snap

    def embed(self, text: str | None = None, image=None, negative: str | None = None,
              text_weight: float = 2.0, image_weight: float = 1.0, negative_weight: float = 1.0, *,
              snapshot: Snapshot | None = None) -> np.ndarray:
        """The unit query vector for text, image (path, bytes or PIL image), or both, minus a negative.
        snapshot: encode with that snapshot's model (see snapshot())."""
        checked = querycheck.validate(text=text, image=image, negative=negative, text_weight=text_weight,
                                      image_weight=image_weight, negative_weight=negative_weight)
        text, image, negative = checked["text"], checked["image"], checked["negative"]
        text_weight, image_weight, negative_weight = (checked[w] for w in ("text_weight", "image_weight",
                                                                             "negative_weight"))
        return self._embed(snapshot or self.snap, text, image, negative, text_weight, image_weight, negative_weight)

    def embed_parts(self, text: str | None = None, image=None, negative: str | None = None,
                    text_weight: float = 2.0, image_weight: float = 1.0, negative_weight: float = 1.0, *,
                    snapshot: Snapshot | None = None) -> Parts:
        """A query's halves encoded (unit vectors), for search_vector with any compose method. snapshot: encode
        with that snapshot's model (see snapshot())."""
        checked = querycheck.validate(text=text, image=image, negative=negative, text_weight=text_weight,
                                      image_weight=image_weight, negative_weight=negative_weight)
        return self._parts(snapshot or self.snap, checked["text"], checked["image"], checked["negative"],
                           checked["text_weight"], checked["image_weight"], checked["negative_weight"])

    def _embed(self, snap: Snapshot, text, image, negative, text_weight, image_weight, negative_weight) -> np.ndarray:
        from alignsearch.search.query import compose

        parts = self._parts(snap, text, image, negative, text_weight, image_weight, negative_weight)
        try:
            return compose(parts.text, parts.image, parts.negative, text_weight, image_weight, negative_weight)
        except ValueError as exc:
            raise BadInputError(str(exc)) from None

    def _parts(self, snap: Snapshot, text, image, negative, text_weight, image_weight, negative_weight) -> Parts:
        from alignsearch.search.query import unit

        if text is None and image is None:
            raise querycheck.nothing_to_search()
        enc = self._encoder_of(snap) if image is not None else self._text_encoder_of(snap)
        with self._encoder_lock:  # torch modules are not safe to call from two threads at once
            t = enc.encode_text([text])[0] if text is not None else None
            i = enc.encode_images([image])[0] if image is not None else None
            n = enc.encode_text([negative])[0] if negative else None
        try:
            t, i, n = (None if v is None else unit(v) for v in (t, i, n))
        except ValueError as exc:
            raise BadInputError(str(exc)) from None
        return Parts(t, i, n, text_weight, image_weight, negative_weight)

    @staticmethod
    def _scorer(parts: Parts, compose: str) -> Scorer:
        if compose in SHARE_METHODS and parts.compound:  # embed_parts' halves: their weights checked as a search's
            querycheck.check_shares(parts.text_weight, parts.image_weight, compose)
        try:
            return scorer(parts, compose)
        except ValueError as exc:
            raise (UsageError if "must be one of" in str(exc) else BadInputError)(str(exc)) from None

    def search(self, text: str | None = None, image=None, k: int = 10, negative: str | None = None,
               text_weight: float = 2.0, image_weight: float = 1.0, negative_weight: float = 1.0,
               nprobe: int | None = None, tag: str | None = None, collapse: bool = False, *,
               where: str | None = None, after: str | None = None, before: str | None = None,
               camera: str | None = None, near=None, path: str | None = None, format: str | None = None,  # noqa: A002
               min_score: float | None = None, sort: str = "score", mode: str = "auto", media: str | None = None,
               per_video: int | None = DEFAULT_PER_VIDEO, compose: str = "auto") -> list[Hit]:
        """Top-k hits, best first by `score`. compose: how an image and a text combine (alignsearch/search/query.py:
        sum, the ALIGN paper's text 2 : image 1; slerp; product, late fusion of the two similarities; weicom;
        auto, the best measured).
        collapse: a hit that is a near duplicate (perceptual hash) of a better one is folded into it and listed
        in its `duplicates`, so the k hits are k different pictures (alignsearch/search/dupes.py).
        Filters (alignsearch/search/filters.py): where (the --where language), after/before (ISO dates, on `taken`),
        camera (substring of make or model), near ((lat, lon, km) or "lat,lon,km"), path (glob on the path
        under its root), format, tag. Exactly min(k, matching images) hits come back, ranked as an exact
        search over the matching images would rank them. min_score drops hits below that similarity; sort
        orders the result set by score, taken, -taken or path. mode: vector, keyword (the keyword index's
        ranking), hybrid (reciprocal rank fusion of both: the exact-similarity ranking of the vector candidates
        and keyword matches together, and the keyword ranking), auto (hybrid when the text's words are in a
        caption, the text read in an image or a tag; file and folder names count only in keyword and hybrid), else vector. In keyword
        and hybrid rankings `score` is the fused rank score and `similarity` the vector side's; min_score
        always applies to `similarity`. The query is encoded with the model of the generation it searches.
        media: "photo" or "video" keeps only those; per_video: at most this many moments of one video (None: no
        limit)."""
        return self.run(build_request(
            text=text, image=image, k=k, negative=negative, text_weight=text_weight, image_weight=image_weight,
            negative_weight=negative_weight, nprobe=nprobe, tag=tag, collapse=collapse, where=where, after=after,
            before=before, camera=camera, near=near, path=path, format=format, min_score=min_score, sort=sort,
            mode=mode, media=media, per_video=per_video, compose=compose))

    def run(self, request: SearchRequest, *, query: np.ndarray | Parts | None = None,
            snapshot: Snapshot | None = None, exclude=()) -> list[Hit]:
        """The hits of a checked request (alignsearch/search/request.py: build), taken whole. query: the request
        already encoded (embed_parts' halves, or a unit vector of the index's model); else its text and image
        are encoded with the model of the generation searched. snapshot: search that snapshot (the one the
        query was encoded for); SnapshotMoved when the index has moved to another generation meanwhile.
        exclude: ids never returned, still k hits (k counts the hits returned)."""
        opts = self._options(request, exclude)
        if snapshot is None:
            self.refresh()
        given = None
        if query is not None:
            dim = (snapshot or self.snap).store.dim
            # a query's encoded halves come from embed_parts (checked there); a bare vector from the caller: checked
            given = self._scorer(query, request.compose) if isinstance(query, Parts) else \
                Scorer([querycheck.check_vector(query, dim)])
        for attempt in range(4):
            snap = snapshot or self.snap
            # encoded here: with the model of the generation searched, again after a switch
            sc = given if given is not None else self._scorer(self.parts_of(request, snap), request.compose)
            try:
                return self._collapsed(snap, sc, opts) if request.collapse else self._search(snap, sc, opts)
            except _Stale:
                if snapshot is not None:
                    raise SnapshotMoved() from None
                if attempt == 3:
                    raise
                self.refresh()
                continue
        raise AssertionError("unreachable")

    def _collapsed(self, snap: Snapshot, query: Scorer, opts: "_Options") -> list[Hit]:
        """The best k pictures, near duplicates folded (alignsearch/search/dupes.py), in the order asked for. The
        candidates are folded best first whatever the sort (folded in the sort's order, a copy was kept over the
        better original and the newest of 3k candidates were cut to k, not the best), and looked for deeper while
        folding leaves fewer than k and the search had more to give (a picture with more copies than 3k), up to
        COLLAPSE_MAX_DEPTH candidates: past that, a library whose best matches are copies of fewer than k pictures
        would be scored and folded whole (about 20 µs a hit to fold: 20 s at a million), so it answers fewer."""
        from alignsearch.search.dupes import collapse_hits

        depth = opts.k * COLLAPSE_DEPTH
        while True:
            hits = self._search(snap, query, replace(opts, k=depth, sort="score"))
            folded = collapse_hits(self.db, hits, opts.k)
            if len(folded) >= opts.k or len(hits) < depth or depth >= COLLAPSE_MAX_DEPTH:
                return sort_hits(folded, opts.sort)
            depth = min(depth * 4, max(COLLAPSE_MAX_DEPTH, opts.k * COLLAPSE_DEPTH))

    def parts_of(self, request: SearchRequest, snapshot: Snapshot | None = None) -> Parts:
        """The request's text, image and negative encoded (unit vectors) with the model of `snapshot`."""
        return self._parts(snapshot or self.snap, request.text, request.image, request.negative, request.text_weight,
                           request.image_weight, request.negative_weight)

    def search_vector(self, query: np.ndarray | Parts, k: int = 10, nprobe: int | None = None, tag: str | None = None,
                      *, text: str | None = None, mode: str = "vector", collapse: bool = False,
                      where: str | None = None, after: str | None = None, before: str | None = None,
                      camera: str | None = None, near=None, path: str | None = None, format: str | None = None,  # noqa: A002
                      min_score: float | None = None, sort: str = "score", media: str | None = None,
                      per_video: int | None = DEFAULT_PER_VIDEO, compose: str = "auto", exclude=(),
                      snapshot: Snapshot | None = None) -> list[Hit]:
        """Top-k hits for a unit query vector of the index's current model, or for a query's encoded halves
        (embed_parts) composed by `compose` (filters, modes and collapse as in search; text: the words for the
        keyword index, when the vector was encoded from a text). exclude: ids never returned (`similar` leaves
        out the image itself), still k hits: k counts the hits returned. snapshot: search that snapshot (the one
        the vector was encoded for); SnapshotMoved when the index has moved to another generation meanwhile
        (encode again with a new snapshot)."""
        request = build_request(k=k, nprobe=nprobe, tag=tag, text=text, mode=mode, collapse=collapse, where=where,
                                after=after, before=before, camera=camera, near=near, path=path, format=format,
                                min_score=min_score, sort=sort, media=media, per_video=per_video, compose=compose,
                                by_vector=True)
        return self.run(request, query=query, snapshot=snapshot, exclude=exclude)

    def explain(self, request: SearchRequest, snapshot: Snapshot | None = None) -> dict[str, Any]:
        """How a request would run (`query --explain`), without running it: matches, selectivity, exact or ANN,
        nprobe, and for a text and an image how they combine. snapshot: the one a search ran on (the server's
        request), else the current one."""
        opts = self._options(request)
        mode, compose, compound = request.mode, request.compose, request.compound
        weights = (request.text_weight, request.image_weight)
        snap = self.snap if snapshot is None else snapshot
        n = int(snap.index.ntotal)
        method = resolve_compose(compose) if compound else None
        if compound and compose == "auto" and not min(weights) > 0:
            method = "sum"  # as query.scorer decides
        # the vectors an unfinished run committed that the ANN index lacks: every search scores them too
        pending = self.searched_exactly(snap)
        out: dict[str, Any] = {"index": snap.plan.factory, "vectors": n, "searched_exactly": pending, "mode": mode,
                               "words": opts.words.words, "compose": method}
        if method is not None:
            out["compose_rule"] = COMPOSE_RULES[method] + (" (auto)" if compose == "auto" else "")
        mask = allowed = None
        if opts.node is not None:
            cols = snap.columns(self.db)
            mask = filters.evaluate(opts.node, cols.column, cols.tagged)
            allowed = cols.ids[mask]
        if opts.words and mode != "vector":
            # as the search keeps them (_keyword_matches: its limit, and those tied with the last one at it): else
            # caption_or_tag_matches, a part of these, counted more than these where copies straddled KEYWORD_DEPTH
            # or k passed it
            out["keyword_matches"] = len(self._keyword_matches(opts, None, evidence_only=False))
            if mode == "auto":
                out["caption_or_tag_matches"] = len(self._keyword_matches(opts, None))
            # The ranking _search uses (_ranking): fused only where keyword matches pass the filter
            matched = mode != "keyword" and (allowed is None or len(allowed) > 0) and \
                bool(self._keyword_matches(opts, allowed))
            # auto fuses as hybrid does (AUTO_FUSION, no option sets it); bench_auto.py's other fusions are not explained
            out["ranking"] = _ranking(mode, matched)
        out["score"] = {"keyword": "1/(60 + keyword rank)", FUSED: "1/(60 + similarity rank) + 1/(60 + "
                        "keyword rank)"}.get(out.get("ranking"), "similarity")
        out["min_score_applies_to"] = "similarity"
        late = method in LATE_FUSION
        # as _indexed_ids asks FAISS: the depth the search needs (a fused ranking's FUSION_DEPTH, the per-video cap's
        # room), not k's: a fused text was said to ask candidate_count(k) while the search asked FUSION_DEPTH's
        depth = _depth(opts, out.get("ranking") == FUSED, snap.videos, n)
        want = self._late_want(snap, depth) if late else ann.candidate_count(depth, snap.plan,
                                                                              snap.tuning.get("rerank_factor", 10))
        if opts.node is None:
            out.update(filter=None, path="ANN" if snap.plan.kind != "flat" else "exact (flat index)", nprobe=snap.nprobe)
            if snap.plan.kind != "flat":
                out.update(_candidates_plan(want))  # and the tie margin past them
            if late:
                out["path"] = ("exact: every vector scored (flat index)" if snap.plan.kind == "flat" else
                               f"ANN for the image and for the text ({want} candidates each), union re-scored exactly")
            return _with_pending(out, pending)
        m = int(mask.sum())
        out.update(filter=repr(opts.node), matching=m, selectivity=round(m / max(n, 1), 6))
        if m <= EXACT_BELOW or snap.plan.kind == "flat":
            out["path"] = "exact: every matching vector scored"
        else:
            out.update(path="ANN restricted to matching ids (bitmap selector), exact re-rank; exact if it finds fewer "
                       "than k", nprobe=ann.filtered_nprobe(snap.nprobe, snap.plan, want, n, m), **_candidates_plan(want))
            if late:
                out["path"] = "for the image and for the text: " + out["path"]
        return _with_pending(out, pending)

    @staticmethod
    def _options(request: SearchRequest, exclude=()) -> "_Options":
        words = keywords.parse(request.text, partial_last=request.mode == "auto") if request.mode != "vector" \
            else keywords.Query()
        return _Options(k=request.k, nprobe=request.nprobe, node=request.node, words=words, mode=request.mode,
                        min_score=request.min_score, sort=request.sort, per_video=request.per_video,
                        exclude=querycheck.check_ids(exclude))

    def _search(self, snap: Snapshot, query: Scorer, opts: "_Options") -> list[Hit]:
        if snap.index.ntotal == 0 and not _count(snap.pending_now()):
            return []
        allowed = None
        if opts.node is not None:
            cols = snap.columns(self.db)
            allowed = cols.ids[filters.evaluate(opts.node, cols.column, cols.tagged)]
            if len(allowed) == 0:
                return []
        if query.method == "weicom" and query.stats is None:
            query.calibrate(self._calibration_sample(snap))
        looked = 0
        while True:
            matches = self._keyword_matches(opts, allowed) if opts.words else []
            keyword = [i for i, _ in matches]
            ranking = _ranking(opts.mode, bool(keyword))
            ranked = ranking != "vector"
            vector = [] if ranking == "keyword" else self._vector_ids(snap, query, opts, allowed,
                                                                       fusing=ranking == FUSED)
            # Keyword matches are scored from their stored vectors too: they take their place in the similarity
            # ranking, so a match in both lists outranks one in the similarity list alone at the same rank.
            ids = np.array(list(dict.fromkeys(vector + keyword)), dtype=np.int64)
            nulls = self._null_best(snap) if keyword and opts.mode == "auto" and _fusion(opts.mode) == "gate" else None
            hits, capped = self._hits(snap, query, ids, opts, matches if ranked else None, nulls, allowed)
            # The per-video cap left fewer than k: the candidates were one video's moments mostly (a long shot holds
            # alike moments), or rows of files two roots name, one hit each. Look deeper while that finds more
            # candidates, so neither starves the results.
            if not capped or len(ids) <= looked:
                return hits
            looked = len(ids)
            opts = replace(opts, pool=looked * PER_VIDEO_DEPTH)

    def _null_best(self, snap: Snapshot) -> np.ndarray | None:
        """The best cosine over the index of each null query (query.null_prompts), encoded with the snapshot's
        text tower and searched as a query is: the scale the gate measures a query's best cosine on. Once per
        snapshot. None where the model cannot be loaded (a caller's vector searched with text for keywords):
        with no scale the gate cannot tell, and keyword evidence leads."""
        kept = self._nulls
        if kept is not None and kept[0] is snap:
            return kept[1]
        from alignsearch.search.query import unit

        try:
            enc = self._text_encoder_of(snap)
        except ModelLoadError as exc:
            log.warning("auto: no text tower to calibrate the keyword gate against (%s): keyword evidence leads", exc)
            self._nulls = (snap, None)
            return None
        with self._encoder_lock:
            vectors_ = enc.encode_text(null_prompts())
        cols = snap.columns(self.db)
        opts = _Options(k=1, nprobe=None, node=None, words=keywords.Query(), mode="vector", min_score=None, sort="score")
        best = []
        for v in vectors_:
            sc = Scorer([unit(v)])
            rows = cols.rows_present(np.array(self._vector_ids(snap, sc, opts, None), dtype=np.int64))
            sims = sc.score(_unit(self._stored(snap, cols.vec_rows[rows]))) if len(rows) else [0.0]
            best.append(float(np.max(sims)))
        self._nulls = (snap, np.array(best))
        return self._nulls[1]

    def _late_want(self, snap: Snapshot, k: int) -> int:
        """ANN candidates per half of a late-fused query: deep, as the best fused hits need not be near the
        top of either half (recall@10 against the exact fused score: tests/test_compose.py)."""
        return ann.candidate_count(max(k, LATE_DEPTH), snap.plan, snap.tuning.get("rerank_factor", 10))

    def _calibration_sample(self, snap: Snapshot) -> np.ndarray:
        """A fixed sample of the stored vectors (the same for every query of a snapshot, read once):
        WeiCom's reference."""
        kept = self._calibration
        if kept is not None and kept[0] is snap:
            return kept[1]
        cols = snap.columns(self.db)
        rng = np.random.default_rng(0)
        rows = cols.vec_rows if len(cols.vec_rows) <= CALIBRATION_SAMPLE else \
            np.sort(rng.choice(cols.vec_rows, CALIBRATION_SAMPLE, replace=False))
        sample = _unit(self._stored(snap, np.asarray(rows, dtype=np.int64)).astype(np.float32))  # scored as queries are
        self._calibration = (snap, sample)
        return sample

    def _vector_ids(self, snap: Snapshot, query: Scorer, opts: "_Options", allowed: np.ndarray | None,
                    fusing: bool = False) -> list[int]:
        """The ANN index's candidates (_indexed_ids), and while an unfinished run left live files the ANN index
        lacks (Snapshot.pending), the best of those scored exactly, as many as the ANN side's depth: every search
        re-ranks its candidates exactly (_hits), so they take their place by their true cosine. A row found gone
        among the best (replaced or forgotten by the run at work) leaves the snapshot's pending list and the best are
        chosen again: _hits drops such rows, and one there took the place of a live file just behind it."""
        ids = self._indexed_ids(snap, query, opts, allowed, fusing)
        while True:
            pending = snap.pending_now()
            if not _count(pending):
                return ids
            if allowed is not None:
                pending = pending[np.isin(pending[:, 0], allowed)]
            depth = _depth(opts, fusing, snap.videos, len(pending))
            if query.late:
                depth = max(depth, self._late_want(snap, depth))
            best = self._best_of(snap, query, pending[:, 0], pending[:, 1], depth)
            gone = self._gone(best)
            if not gone:
                return list(dict.fromkeys(ids + best))
            snap.drop_pending(gone)

    def _gone(self, ids: list[int]) -> list[int]:
        """Those of ids the catalog no longer holds as indexed files."""
        if not ids:
            return []
        with self.db.connect() as conn:
            held = catalog.addresses_of(conn, ids)
        return [i for i in ids if i not in held]

    def searched_exactly(self, snap: Snapshot | None = None) -> int:
        """How many vectors the ANN index lacks that every search scores exactly (Snapshot.pending), those found
        gone from the catalog left out (and from the snapshot's list): what `info` and `--explain` add to the ANN
        index's count."""
        snap = self.snap if snap is None else snap
        pending = snap.pending_now()
        if not _count(pending):
            return 0
        gone = self._gone(pending[:, 0].tolist())
        if gone:
            snap.drop_pending(gone)
        return len(pending) - len(gone)

    def _indexed_ids(self, snap: Snapshot, query: Scorer, opts: "_Options", allowed: np.ndarray | None,
                     fusing: bool = False) -> list[int]:
        """The best ids by similarity (ANN candidates, or every allowed one when few are), best first,
        enough for the exact re-rank and, when fusing with keyword hits, for fusion; never fewer than
        min(k, allowed) (no starving). Only fusion needs FUSION_DEPTH: a text whose words match no keyword
        (most queries of a photo library) re-ranks k x rerank_factor candidates, not 100 x (29 -> 4 ms at 100k).
        A late-fused query searches with each half and takes the union (on a flat index: every vector)."""
        depth = _depth(opts, fusing, snap.videos, int(snap.index.ntotal))
        want = self._late_want(snap, depth) if query.late else \
            ann.candidate_count(depth, snap.plan, snap.tuning.get("rerank_factor", 10))
        n = int(snap.index.ntotal)
        if query.late and allowed is None and snap.plan.kind == "flat":
            allowed = snap.columns(self.db).ids  # exact: the fused top-k need not be in either half's top-k
        if allowed is not None and (len(allowed) <= EXACT_BELOW or snap.plan.kind == "flat"):
            return self._exact(snap, query, allowed, max(depth, want) if query.late else depth)
        nprobe = opts.nprobe or snap.nprobe
        if allowed is not None:
            nprobe = ann.filtered_nprobe(nprobe, snap.plan, want, n, len(allowed))
        ids = self._ann_ids(snap, query, want, nprobe, allowed)
        if allowed is not None and len(ids) < min(depth, len(allowed)):
            return self._exact(snap, query, allowed, depth)  # the lists visited held too few: score them all
        if allowed is None and len(ids) < min(depth, n) and nprobe < snap.plan.nlist:
            # The lists visited held fewer vectors than the search needs (k near the library's size on a small
            # IVF-PQ index, a low --nprobe): `-k 1000` answered 79 of 336. Every list then, still re-ranked exactly.
            ids = self._ann_ids(snap, query, want, snap.plan.nlist, None)
        return ids

    @staticmethod
    def _ann_ids(snap: Snapshot, query: Scorer, want: int, nprobe: int, allowed: np.ndarray | None) -> list[int]:
        """The ANN index's candidates for the query's probes, best first, each id once: each probe's first `want`, and
        those after that may tie with the last of them (query.tied_at_cut; FAISS asked for query.TIE_MARGIN more, and
        again wider while every one of those tied: query.margin_spent), all re-ranked and settled by name; the others
        are not re-ranked. A tie is exact on a flat index and between copies on IVF-PQ (equal vectors: equal codes in
        one list, equal approximate scores)."""
        there = int(snap.index.ntotal) if allowed is None else len(allowed)
        def within(margin: int) -> tuple[list[int], bool]:
            asked = want + margin
            scores, ids = ann.search(snap.index, np.stack(query.probes), asked, nprobe, allowed)
            kept = [row_ids[row_ids >= 0][: query_module.tied_at_cut(row_scores[row_ids >= 0], want)]
                    for row_scores, row_ids in zip(scores, ids)]
            best = list(dict.fromkeys(np.concatenate(kept).tolist())) if kept else []  # probe after probe
            return best, any(query_module.margin_spent(len(row), asked, asked < there) for row in kept)

        return _until_settled(within)

    def _exact(self, snap: Snapshot, query: Scorer, allowed: np.ndarray, depth: int) -> list[int]:
        """Exact scores of every allowed vector (from the snapshot's columns), best first: _best_of's `depth` and
        those tied with the depth-th."""
        cols = snap.columns(self.db)
        return self._best_of(snap, query, allowed, cols.vec_rows[cols.rows_of(allowed)], depth)

    def _best_of(self, snap: Snapshot, query: Scorer, ids: np.ndarray, addresses: np.ndarray, depth: int) -> list[int]:
        """Exact scores of the vectors at these addresses (ids[i]'s at addresses[i]), best first: `depth` ids, and
        those after that may tie with the depth-th (query.tied_at_cut), looked for within query.TIE_MARGIN past it,
        wider while the margin is spent (query.margin_spent)."""
        # Kept past depth: those that may tie with the depth-th (copies, query.tied_at_cut), so that _hits settles
        # them by name; cut at depth, one was kept in the order of the ids (the order they were indexed in).
        def within(margin: int) -> tuple[list[int], bool]:
            best = self._best_within(snap, query, ids, addresses, depth, depth + margin)
            return best, query_module.margin_spent(len(best), depth + margin, len(ids) > depth + margin)

        return _until_settled(within)

    def _best_within(self, snap: Snapshot, query: Scorer, ids: np.ndarray, addresses: np.ndarray, depth: int,
                     margin: int) -> list[int]:
        """_best_of's scores with one margin: of the best `margin`, the first depth and those tied with the depth-th."""
        if query.late:  # many equal scores (a product's zeros): ordered by the tie-break, as _hits orders them
            best_ids, best_parts = np.zeros(0, np.int64), np.zeros((0, 2), np.float32)
            for start in range(0, len(ids), EXACT_CHUNK):
                chunk = ids[start : start + EXACT_CHUNK]
                parts = query.parts(self._stored(snap, addresses[start : start + EXACT_CHUNK]))
                best_ids, best_parts = np.concatenate([best_ids, chunk]), np.concatenate([best_parts, parts])
                keep = query.order(best_parts)[:margin]
                best_ids, best_parts = best_ids[keep], best_parts[keep]
            # a copy ties in the score and in the tie-break (a product's zeros in the score alone: not kept)
            kept = query_module.tied_at_cut(query.fused(best_parts), depth, query.tiebreak(best_parts))
            return best_ids[:kept].tolist()
        best_ids, best_scores = np.zeros(0, np.int64), np.zeros(0, np.float32)
        for start in range(0, len(ids), EXACT_CHUNK):  # bounded memory however many match
            chunk = ids[start : start + EXACT_CHUNK]
            scores = query.score(_unit(self._stored(snap, addresses[start : start + EXACT_CHUNK])))
            best_ids, best_scores = np.concatenate([best_ids, chunk]), np.concatenate([best_scores, scores])
            if len(best_ids) > margin:
                keep = np.argpartition(-best_scores, margin)[:margin]
                best_ids, best_scores = best_ids[keep], best_scores[keep]
        order = np.argsort(-best_scores, kind="stable")
        return best_ids[order][: query_module.tied_at_cut(best_scores[order], depth)].tolist()

    def _keyword_matches(self, opts: "_Options", allowed: np.ndarray | None, *,
                         evidence_only: bool | None = None) -> list[tuple[int, float]]:
        """Keyword matches (id, bm25) among the allowed ids, best first, as many as k asks for: the filter goes into the SQL,
        before the limit (filtering the global top list starved a narrow filter). In auto mode only words in a
        caption, the text read in the image or a tag count: a word of a file or folder name alone
        ("red_circle.png" for "red car on beach") must not override the model. evidence_only: None, as the mode
        says (explain counts every match with False)."""
        if evidence_only is None:
            evidence_only = opts.mode == "auto"
        with self.db.connect() as conn:
            among = None if allowed is None else allowed.tolist()
            if not opts.words or not catalog.has_keywords(conn):
                return []
            limit = max(opts.k + len(opts.exclude), KEYWORD_DEPTH, opts.pool)
            # a margin past the limit: matches tied with the last one at it are kept too (query.through_ties); a longer
            # run is cut in name order (keywords.TIE_ORDER), not asked again wider as the ANN and exact paths are:
            # a folder's word ties every file of it, and widening cost such a search 2-3.6x (RESULTS.md, bench_tie_runs)
            found = keywords.search(conn, opts.words, limit + query_module.TIE_MARGIN, among,
                                    evidence_only=evidence_only)
            return found[:query_module.through_ties([s for _, s in found], limit)]

    def _hits(self, snap: Snapshot, query: Scorer, ids: np.ndarray, opts: "_Options",
              keyword: list[tuple[int, float]] | None = None, nulls: np.ndarray | None = None,
              allowed: np.ndarray | None = None) -> tuple[list[Hit], bool]:
        """Catalog rows for candidate ids, scored exactly from the stored vectors, best first; cut to k, cutoff,
        sort. keyword: the keyword ranking, (id, bm25) best first, to fuse with the similarity ranking (in keyword
        mode, alone); matches equal in bm25 share a rank (query.keyword_ranks). nulls:
        the null queries' best cosines, for auto's gate (query.null_z). Also whether the per-video cap, or each file
        once (_distinct), left fewer than k of candidates that all passed the cutoff (deeper candidates could fill
        the list). allowed: the ids the filters admit (None: all), of which a file's row to show is chosen."""
        with self.db.connect() as conn:  # one connection: addresses, their generation, then the chosen rows
            addresses = catalog.addresses_of(conn, ids.tolist())
            if state.read(conn, "generation").generation != snap.generation:
                raise _Stale()
            if len(addresses) < len(ids):
                self._check_catalog(snap)
            ids = np.array([i for i in ids.tolist() if i in addresses and i not in opts.exclude], dtype=np.int64)
            # Every score comes from the stored vectors, which carry checksums: a damaged ANN file cannot
            # inject scores, and a damaged vector (not unit length) is reported rather than ranked.
            stored = self._stored(snap, np.array([addresses[i] for i in ids.tolist()], dtype=np.int64))
            norms = np.linalg.norm(stored, axis=1)
            damaged = vectors.not_unit_length(stored, tolerance=0.02, norms=norms)
            if damaged:
                raise IndexDamagedError(f"{damaged} stored vectors are damaged (not unit length): run `alignsearch "
                                        "verify --repair`")
            stored = stored / np.maximum(norms, 1e-12)[:, None]  # fp16 rows are unit length only to ~1e-4
            parts = query.parts(stored, exact=True)  # equal vectors, equal scores: their order is settle_ties
            similarity = query.fused(parts).astype(np.float32)
            tiebreak = query.tiebreak(parts)
            scores, ranks, beliefs, model_z, order = similarity, None, None, None, None
            if keyword is not None:  # the similarity ranking fused with the keyword ranking (query.fuse_candidates)
                at = dict(zip((i for i, _ in keyword), query_module.keyword_ranks([s for _, s in keyword]).tolist()))
                keyword_rank = np.array([at.get(i, 0) for i in ids.tolist()], dtype=np.int64)
                if opts.mode != "keyword":
                    fusion = _fusion(opts.mode)
                    if fusion == "gate" and len(similarity) and nulls is not None:  # does the model recognise the query?
                        model_z = null_z(float(similarity.max()), nulls)
                    fused = fuse_candidates(similarity, keyword_rank, method=fusion, z=model_z, tiebreak=tiebreak)
                    scores, order, vector_rank, beliefs = fused.scores, fused.order, fused.vector_rank, fused.beliefs
                else:
                    keep = keyword_rank > 0
                    ids, parts, similarity = ids[keep], parts[keep], similarity[keep]
                    keyword_rank, tiebreak, vector_rank = keyword_rank[keep], tiebreak[keep], None
                    scores = 1.0 / (RRF_K + keyword_rank)
                ranks = (vector_rank, keyword_rank)
            if order is None:
                order = best_first(scores, similarity, tiebreak)  # best score first, ties by similarity
            if opts.min_score is not None:
                order = order[similarity[order] >= opts.min_score]
            passed = len(order)
            # ties settled before the cut at k too: it kept the copy first in the ANN's order (the order the copies
            # were indexed in), so k=1 showed a Ray run's and a local run's copies of one photo by different names
            order = _settled(conn, ids, order, (scores, similarity, tiebreak), reach=opts.k + len(opts.exclude))
            cap = opts.per_video if snap.videos else None
            order, rows = _distinct(conn, ids, order, opts.k, cap, _files_of(conn, opts.exclude),
                                    _admits(ids[order] if opts.mode == "keyword" else allowed, opts.exclude))
            capped = len(order) < min(passed, opts.k) and passed == len(ids)
            order = settle_ties([i for i in order.tolist() if int(ids[i]) in rows], (scores, similarity, tiebreak),
                                lambda i: rows[int(ids[i])].path)
            # each hit's metadata is its shown row's, read by that row's id: by the ranked id, a file's folder row
            # was shown with a list's caption of the same bytes where the photo's own sidecar caption says otherwise.
            # The ranked row's are read too: where the shown row has no caption, the file's caption is the one of
            # its name that placed it (a list's caption a hybrid search matched), not none
            ranked = ids[order].tolist()
            shown = {*ranked, *(rows[i].id for i in ranked)}
            photos = self.photos_of(conn, shown, snap)
            labels = catalog.labels_of(conn, [rows[i].id for i in ranked])
        hits = []
        for i in order:  # (an id a writer removed since its address was read is gone, as on the next search)
            made_of = None
            if query.late:
                made_of = {"image": round(float(parts[i, 0]), 6), "text": round(float(parts[i, 1]), 6)}
            if ranks is not None:
                made_of = {**(made_of or {}), "similarity_rank": None if opts.mode == "keyword" else int(ranks[0][i]),
                           "keyword_rank": int(ranks[1][i]) or None}
                if beliefs is not None:  # how auto decided: the model's belief, and what the keyword match added
                    made_of.update(belief=round(float(beliefs[i]), 6), keyword_share=round(float(scores[i] - beliefs[i]), 6))
                if model_z is not None:  # the gate's measure: the query's best cosine in null sds
                    made_of["model_z"] = round(model_z, 3)
            row = rows[int(ids[i])]
            photo = _own_caption_else(photos.get(row.id), photos.get(int(ids[i])))
            hits.append(_hit(row, float(scores[i]), photo, labels.get(row.id, []),
                             similarity=float(similarity[i]), parts=made_of))
        return sort_hits(hits, opts.sort), capped

    def info(self) -> dict[str, Any]:
        snap = self.snap
        with self.db.connect() as conn:
            count = catalog.counts(conn)
            unread = catalog.fill_failure_counts(conn)
            st = state.read(conn)
            indexed_with, unfinished = st.encoder, st.index_run is not None
            # the store as committed now, as the counts beside it are (the snapshot's predates later runs)
            stored = vectors.usage(conn, vectors.load(conn, self.dir, snap.store.dim, st.vectors))
            labels = catalog.label_counts(conn, st.tagging)
            off_seals = catalog.count_off_seals(conn)
        return {
            "index_dir": str(self.dir.resolve()),
            "last_run": self._last_run(unfinished),
            "model": snap.model_info["model"],
            "fingerprint": snap.model_info["fingerprint"],
            "dim": snap.model_info["dim"],
            "roots": snap.roots,
            "images": count[catalog.INDEXED],
            "failed": count[catalog.FAILED],
            "fill_failures": unread,  # {step: indexed files it could not read, skipped until they change}
            "index": {
                "type": snap.plan.kind,
                "factory": snap.plan.factory,
                "nlist": snap.plan.nlist,
                "pq_m": snap.plan.m,
                "nprobe": snap.nprobe if snap.plan.kind != "flat" else None,
                "rerank_factor": snap.tuning.get("rerank_factor") if snap.plan.kind != "flat" else None,
                "tuned_recall_at_10": snap.tuning.get("recall"),
                "target_recall": snap.tuning.get("target"),
                "vectors": int(snap.index.ntotal),
                # committed by an unfinished run, not yet in the ANN index: scored exactly by every search
                "searched_exactly": self.searched_exactly(snap),
                "metric": "inner_product",
                "layout": "exact" if snap.unbuilt else ann.layout(snap.index),  # exact: no ANN index built yet
            },
            # rows in the vector files, rows files use; the rest is what `index --compact` frees
            "vector_store": stored,
            # vector addresses off their seals: live_rows counts what they name, another file's vector maybe; the CLI
            # says the damage beside the figures (exit 7), as every reader of those addresses refuses them
            "damaged_addresses": off_seals,
            "encoder": {"last_index_run": indexed_with, "queries": self.encoder_plan(),
                        "onnx_cache": onnx_cache_status(snap.model_info)},
            # here, not added by the CLI: GET /api/info is documented as what `info --json` says, and lacked both
            "listing_errors": st.roots.unlisted(),
            "tags": dict(labels),
        }

    def _last_run(self, unfinished: bool) -> str:
        """finished, running (a writer holds the index now) or interrupted (an index run began and never ended)."""
        if not unfinished:
            return "finished"
        # a read-only probe of the writer's lock
        from alignsearch.storage.paths import writer_running

        try:
            return "running" if writer_running(self.dir) else "interrupted"
        except OSError:
            return "interrupted"

    def classify(self, image, labels: list[str], templates: tuple[str, ...] = DEFAULT_TEMPLATES) -> list[dict]:
        """Label probabilities for one image, with the index's model (see Encoder.classify)."""
        enc = self.encoder
        with self._encoder_lock:
            return enc.classify([image], labels, templates)[0]

    def similarity(self, text: str, image) -> dict:
        """Cosine similarity and logit of a text and an image, with the index's model (see Encoder.similarity)."""
        enc = self.encoder
        with self._encoder_lock:
            return enc.similarity(text, image)

    def file(self, file_id: int) -> catalog.FileRow | None:
        """The catalog row of an indexed file, or None."""
        with self.db.connect() as conn:
            row = catalog.get_files(conn, [file_id]).get(file_id)
        return row if row is not None and row.vec_row is not None else None

    def vector_of(self, file_id: int, snapshot: Snapshot | None = None) -> np.ndarray | None:
        """The stored unit vector of an indexed file ("more like this"), or None. snapshot: from that
        snapshot's generation (SnapshotMoved if the catalog has moved on)."""
        while True:
            snap = snapshot or self.snapshot()  # taken before the row: a long-open engine's may be of an older generation
            row = self.file(file_id)
            if row is None:
                return None
            try:
                self._same_generation(snap)  # the row just read is of that generation
                return _unit(self._stored(snap, np.array([row.vec_row])))[0]
            except _Stale:
                if snapshot is not None:
                    raise SnapshotMoved() from None
                # a compaction or re-encode switched meanwhile: the next snapshot is of its generation

    def _same_generation(self, snap: Snapshot) -> None:
        """Raise _Stale when a re-encode switched generations since `snap` was taken: the rows just read
        may point at the new generation's vectors."""
        with self.db.connect() as conn:
            if state.read(conn, "generation").generation != snap.generation:
                raise _Stale()

    def photos_of(self, conn, ids: Iterable[int], snap: Snapshot | None = None) -> dict[int, dict]:
        """catalog.photos_of, checked as every reader that shows photo fields needs it (a search's hits, the
        server's landing page, export). A file without its photo row: not yet filled (a run in progress, or killed),
        or a damaged page hides the row (a flipped bit of a photos page's cell pointer: `query` showed the photo's
        date as none, exit 0, for the row is absent, not altered, and no digest is read). SQLite's check of the
        photos table tells which, once per snapshot (snap: the caller's; else the engine's), only when a file lacks
        its row: of that table alone, as a photo unreadable at its fill lacks its row for good, and the CLI pays the
        check at each query while it is a hit (bench_photos_check: the whole catalog's check costs several times as
        much). That check passes where a flipped bit of a row's key (its rowid) moved the row to an id no file has:
        the rows of no file are read too (catalog.photo_keys_off, once per snapshot), and one off its digest is
        damage; one that holds it is an old version's leftover, ignored as verify notes it."""
        ids = set(ids)
        photos = catalog.photos_of(conn, ids)
        if len(photos) < len(ids) and catalog.has_photos(conn):
            snap = self.snap if snap is None else snap
            self._check_catalog(snap, table="photos")
            if (snap.stamp, PHOTO_KEYS_READ) not in self._catalog_checked:
                if catalog.photo_keys_off(conn, unindexed=True):
                    catalog.refuse_photo_keys_off()
                self._catalog_checked.add((snap.stamp, PHOTO_KEYS_READ))
        return photos

    def _check_catalog(self, snap: Snapshot, table: str | None = None) -> None:
        """The ANN index named files the catalog lacks: a writer removed them and has not yet synced the
        index (a run in progress, or killed), or a damaged page hides rows. SQLite's check tells which,
        once per snapshot; damage is reported, never answered around."""
        if (snap.stamp, table) in self._catalog_checked or (snap.stamp, None) in self._catalog_checked:
            return
        problems = catalog.integrity_problems(self.dir / DB_FILE, table)
        if problems:
            raise IndexDamagedError(f"{problems[0]}: run `alignsearch verify`")
        self._catalog_checked.add((snap.stamp, table))

    def _stored(self, snap: Snapshot, addresses: np.ndarray) -> np.ndarray:
        if not snap.store.holds(addresses):
            with self.db.connect() as conn:
                store = vectors.holding(conn, snap.store, addresses, self.dir)  # rows committed since: a writer runs
            # checked after the load (the store and the generation commit together): a store of the next generation
            # lacks the segments these addresses name
            self._same_generation(snap)
            if not store.holds(addresses):  # addresses move only with the generation: these were never committed
                raise IndexDamagedError("catalog rows point past the stored vectors: run `alignsearch verify --repair`")
            snap = replace(snap, store=store, _columns=snap._columns, _lock=snap._lock)
            with self._refresh_lock:
                if self.snap.generation == snap.generation:
                    self.snap = snap
        try:
            return snap.store.get(addresses)
        except IndexDamagedError:
            # A switch of generation (a re-encode's, a compaction's) between the generation check and this read
            # is a new generation to search, not damage: the store and its checksums are read in separate
            # statements (old rows with new checksums: ChunkChanged), and a snapshot whose vectors.f16 was not
            # mapped yet meets the empty file the switch put in its place (shorter than its committed rows).
            self._same_generation(snap)
            raise

    def tags(self, file_id: int) -> list[tuple[str, float]]:
        with self.db.connect() as conn:
            return catalog.tags_of(conn, file_id)

    def failed(self) -> list[catalog.FileRow]:
        with self.db.connect() as conn:
            return catalog.failed_files(conn)

    def close(self) -> None:
        self.db.dispose()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _unit(rows: np.ndarray) -> np.ndarray:
    """Stored fp16 rows made unit length again (their norms are 1 only to ~1e-4): an exact copy of an image
    scores 1.0 against it, as a re-encoded copy does."""
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)


def exact_index(store: vectors.VectorStore, live: np.ndarray):
    """An exact (flat) index of the committed (id, address) pairs, in memory: what a query searches while no
    ANN index was ever built (a first `index` run interrupted, or still running). Its scores are re-ranked from
    the stored vectors as every search's are."""
    index = ann.create(ann.plan_index(0, store.dim), store.dim)
    for start in range(0, len(live), 65_536):
        chunk = live[start : start + 65_536]
        ann.add(index, store.get(chunk[:, 1]), chunk[:, 0])
    return index


def run_at_work(run) -> bool:
    """Is the recorded index run's process still there (state.IndexRun.pid; one of another user's answers EPERM,
    and is, unless /proc tells as below)? Not where /proc says the number is now another process's (one that began
    after the run did: a reboot or a crash, then the number reused, this user's or another's) or a zombie's (a
    killed run not yet reaped): kill 0 answers for both, and the stopped run's files were in no answer until the
    next run ended. Without /proc (or another user's hidden by hidepid), a live pid is the run's."""
    try:
        os.kill(run.pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: another user's process, the run (a reader of a shared index) or its number's since
        pass
    began, zombie = _process_facts(run.pid)
    return not zombie and (began is None or began <= run.started + RUN_START_SLACK)


# Seconds a process may seem to have begun after its run recorded `started` (the run writes it after the model
# loads, so the true start is earlier): /proc/stat's boot time is whole seconds, a tick is 1/100 s
RUN_START_SLACK = 5.0
PHOTO_KEYS_READ = "photo keys"  # _catalog_checked's mark of a snapshot whose photos rows of no file were read (photos_of)


@functools.lru_cache(maxsize=1)
def _boot_time() -> float:
    """The machine's boot time (/proc/stat btime): fixed while this process lives, read once, not on each refresh
    that asks whether a recorded run is at work (StopIteration or OSError where /proc cannot say)."""
    return next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                if line.startswith("btime "))


def _process_facts(pid: int) -> tuple[float | None, bool]:
    """(when pid's process began, as a time.time() value, or None where /proc cannot say; whether it is a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = _boot_time()
        fields = stat[stat.rfind(")") + 2 :].split()  # after the name, which may hold spaces and parentheses
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK"), fields[0] == "Z"  # starttime: field 22
    except (OSError, StopIteration, IndexError, ValueError):
        return None, False


def run_stopped_since(was, read_stopped: bool, now) -> bool:
    """Does a snapshot read with index run `was` (seen stopped then, its pending files read, or not) need reading
    again, the state now recording `now`: a run begun or ended since (another record), or the one at work then gone
    now."""
    return was != now or now is not None and not read_stopped and not run_at_work(now)


def missing_from(live: np.ndarray, indexed: np.ndarray) -> np.ndarray:
    """The (id, address) pairs of `live` whose ids the ANN index (`indexed`: its ids) lacks."""
    return live[~np.isin(live[:, 0], indexed)]


def onnx_cache_status(model_info: dict) -> dict:
    """The exported towers cached for the index's model: where, which, and whether text queries can skip
    torch (the files listed and unchanged; the probes run when a query loads them)."""
    from alignsearch.encoders.backend import cache_untrusted, onnx_dir
    from alignsearch.encoders.onnxrun import OnnxUnusable, check_file, read_manifest

    if "content_digest" not in model_info:
        return {"path": None, "towers": [], "torch_free_text": False,
                "note": "recorded before content digests: the next `alignsearch index` records it"}
    folder = onnx_dir(model_info["fingerprint"], model_info["content_digest"])
    why = cache_untrusted(folder)
    if why:
        return {"path": None, "towers": [], "torch_free_text": False, "note": f"not used: {why}"}
    manifest = read_manifest(folder) or {}
    files = manifest.get("files", {})
    try:
        ready = "tokenizer" in manifest and all(check_file(folder, manifest, k) for k in ("text-fp32", "tokenizer"))
    except OnnxUnusable:
        ready = False
    from alignsearch.encoders import exportcache

    size = exportcache.tree_bytes(folder)  # the exports and OpenVINO's compiled graphs
    return {"path": str(folder), "towers": sorted(k for k in files if k != "tokenizer"), "torch_free_text": ready,
            "bytes": size, "total": exportcache.usage()}


def _own_caption_else(own: dict | None, ranked: dict | None) -> dict | None:
    """A hit's photo fields: its shown row's; the caption, where that row has none, the ranked row's (the same bytes
    under another name: a list's caption of a photo whose folder row has no sidecar). Time, camera, place and OCR
    text are read from the bytes, so both rows hold the same."""
    if ranked is None or ranked is own or (own or {}).get("caption") or not ranked.get("caption"):
        return own
    return {**(own or {}), "caption": ranked["caption"]}


def _hit(row: catalog.FileRow, score: float, photo: dict | None = None, labels: list[str] = (), *,
         similarity: float | None = None, parts: dict | None = None) -> Hit:
    photo = photo or {}
    return Hit(row.id, row.path, score, row.root, row.shown_relpath, row.width, row.height, row.format, row.size, row.mtime,
               taken=iso(photo.get("taken")), camera=photo.get("camera"), lens=photo.get("lens"),
               lat=photo.get("lat"), lon=photo.get("lon"), caption=photo.get("caption"), tags=list(labels),
               t=row.t, t_end=row.t_end, ocr=photo.get("ocr") or None,
               similarity=score if similarity is None else similarity, parts=parts)


COMPOSE_RULES = {
    "sum": "normalised weighted sum of the image and text vectors (text 2 : image 1 by default)",
    "slerp": "spherical interpolation from the image to the text at text_weight / (text_weight + image_weight)",
    "product": "max(cos image, 0) x max(cos text, 0), candidates from both halves, re-scored exactly",
    "weicom": "each cosine standardised on a fixed sample, normal CDF, blended by the text's share",
}


# Up to this many matching images are all scored exactly; more go through the ANN index with a selector.
# At 1M vectors exact scoring costs ~4 ms per thousand matches (gathering fp16 rows), the restricted IVF
# search a few ms whatever the count (bench_filter): they cross near 4,000.
EXACT_BELOW = 4_000
EXACT_CHUNK = 65_536
PER_VIDEO_DEPTH = 4  # candidates looked at per result wanted when moments of a video may be dropped
COLLAPSE_DEPTH = 3  # candidates folded per result wanted by collapse=True (more when copies fill them)
COLLAPSE_MAX_DEPTH = 65_536  # ... up to this many candidates (the first look is never cut: k * COLLAPSE_DEPTH)
FUSION_DEPTH = 100  # each list's depth when vector and keyword rankings are fused
LATE_DEPTH = 100  # a late-fused query's depth per half (x rerank_factor ANN candidates on IVF-PQ)
KEYWORD_DEPTH = 100
# How auto fuses keyword evidence: AUTO_FUSION (query.AUTO_FUSION, imported; query.keyword_fusion's methods, or gate).
# rrf, as hybrid: the others (belief, gate) are there for bench_auto.py, which sets this module's AUTO_FUSION to
# measure them against it and found neither better over every case (RESULTS.md).


def _candidates_plan(want: int) -> dict:
    """An explained ANN path's candidates: `want` re-ranked exactly, and what FAISS is asked for (_ann_ids: want and
    query.TIE_MARGIN more, of which those past want are re-ranked only where they tie with the want-th). It said
    candidates=want alone, so a reader could not tell copies at the cut were looked past."""
    return {"candidates": want, "candidates_asked": want + query_module.TIE_MARGIN,
            "candidates_past_want": "re-ranked only where tied with the last of want (asked again wider while all are, "
                                    f"up to {SETTLE_MAX + 1} past want)"}


def _with_pending(plan: dict, pending: int) -> dict:
    """An explained plan's path, saying the vectors the ANN index lacks that the search scores exactly beside it."""
    if pending:
        plan["path"] += f"; and {pending} vectors an unfinished index run committed, not yet in the ANN index: " \
                        "scored exactly"
    return plan


def _count(pending: np.ndarray | None) -> int:
    """Rows in a snapshot's pending list (None: none read)."""
    return 0 if pending is None else len(pending)


def _depth(opts: "_Options", fusing: bool, videos: bool, n: int) -> int:
    """How many of n vectors' best a search needs scored exactly."""
    depth = (max(opts.k, FUSION_DEPTH) if fusing else opts.k) + len(opts.exclude)
    if opts.per_video is not None and videos:  # room for the moments the cap drops
        depth = min(depth * PER_VIDEO_DEPTH, max(depth, n))
    return max(depth, opts.pool)  # looking deeper: the cap or a file two roots name left fewer than k


FUSED = "hybrid (RRF)"  # the ranking's name in explain where the similarity and keyword rankings are fused


def _ranking(mode: str, matched: bool) -> str:
    """The ranking a search in this mode uses, given whether keyword matches passed its filter: keyword mode's by
    keyword rank; fused (FUSED) in hybrid and auto where some matched (auto: in a caption, the text in an image, a
    tag); else by similarity, as hybrid with no match is. _search ranks by it, explain names it: explain once said
    "hybrid (RRF)" where a filter left out every match, or for hybrid with none, beside cosines."""
    if mode == "keyword":
        return "keyword"
    return FUSED if matched and mode in ("hybrid", "auto") else "vector"


def _fusion(mode: str) -> str:
    """The fusion a mode's ranking uses: auto's AUTO_FUSION; hybrid keeps reciprocal rank fusion."""
    return AUTO_FUSION if mode == "auto" else "rrf"


@dataclass(frozen=True)
class _Options:
    k: int
    nprobe: int | None
    node: Any
    words: keywords.Query  # what the text asks of the keyword index (alignsearch/storage/keywords.py)
    mode: str
    min_score: float | None
    sort: str
    per_video: int | None = None
    exclude: frozenset = frozenset()  # ids left out (`similar`: the image itself), fetched beyond k, not out of it
    pool: int = 0  # at least this many candidates of each kind: a search looking deeper (_search)


def _files_of(conn, ids) -> set[onefile.Key]:
    """The entries (file, moment) of the ids left out (`similar`'s image): none of their rows is a hit either."""
    return set(onefile.keys(conn, catalog.get_files(conn, ids).values()).values()) if ids else set()


def _admits(among: np.ndarray | None, exclude) -> Callable[[list[int]], np.ndarray]:
    """Which of some ids a search may show: among those given (the filters' ids; a keyword search's matches; None:
    any), not left out."""
    def admits(some: list[int]) -> np.ndarray:
        ok = np.ones(len(some), dtype=bool) if among is None else np.isin(np.asarray(some, dtype=np.int64), among)
        return ok & ~np.isin(np.asarray(some, dtype=np.int64), np.fromiter(exclude, dtype=np.int64, count=len(exclude)))
    return admits


SETTLE_REACH = 4
SETTLE_MAX = 1024


def _until_settled(within: Callable[[int], tuple[list[int], bool]]) -> list[int]:
    """The candidates `within` finds with the tie margin query.TIE_MARGIN, asked again with a wider margin (_wider)
    while it says the margin was spent (query.margin_spent: a run of copies longer than the margin straddles the
    cut): the one loop of _ann_ids (FAISS) and _best_of (exact scores)."""
    margin = query_module.TIE_MARGIN
    while True:
        best, spent = within(margin)
        wider = _wider(margin) if spent else None
        if wider is None:
            return best
        margin = wider


def _wider(margin: int) -> int | None:
    """The tie margin to ask again with where `margin` was spent (query.WIDER_MARGIN times it), at most SETTLE_MAX + 1;
    None once it passed SETTLE_MAX: a run of more copies than that is not settled by name (_settled), so asking for
    it whole bought nothing and cost a search all of it (100k copies: every one fetched, read and re-ranked)."""
    return None if margin > SETTLE_MAX else min(margin * query_module.WIDER_MARGIN, SETTLE_MAX + 1)


def _settled(conn, ids: np.ndarray, order: np.ndarray, keys: tuple[np.ndarray, ...], reach: int) -> np.ndarray:
    """The ranking with each run of candidates equal in every key ordered by their rows' names (settle_ties); only
    the tied candidates' rows are read, of the runs the cut at k may reach: those starting in the first
    SETTLE_REACH x reach places (reach: k and the ids left out; _distinct goes deeper only past another name of a
    file or a video's capped moments), of at most SETTLE_MAX candidates (50,000 equal black frames were 100 reads of
    500 rows a search: such a run keeps the ANN's order before the cut, and is settled by name after it)."""
    runs = [(s, e) for s, e in tied_runs(order, keys) if s < SETTLE_REACH * reach and e - s <= SETTLE_MAX]
    if not runs:
        return order
    tied = np.concatenate([order[s:e] for s, e in runs])
    names = {i: row.path for i, row in catalog.get_files(conn, ids[tied].tolist()).items()}
    # a row a writer removed since has no name: first of its run, dropped by _distinct
    return by_name(order, runs, lambda i: names.get(int(ids[i]), ""))


def _distinct(conn, ids: np.ndarray, order: np.ndarray, k: int, cap: int | None, seen: set[onefile.Key],
              admits: Callable[[list[int]], np.ndarray]) -> tuple[np.ndarray, dict[int, catalog.FileRow]]:
    """The ranking cut at k with each file once (onefile.py), and at most `cap` moments of any one video (None: no
    cap), with the catalog rows of the ids kept. A file two roots or a symlink name has a row each: both ranked,
    with the one vector they share, and `query` showed it twice. A file holds its best place; the row shown for it
    is onefile.shown_first's among its rows the search may show (`admits`, from _admits: the filters' ids, not
    those left out): its real path, not a link's name or a file:// URL, whichever ranked first. `seen`: entries
    already out. The first read is of the top k, the rows the hits need anyway; further reads go down the ranking,
    each at least as long as all before it, until k files are in (a dropped name never leaves fewer than k when
    more files were ranked)."""
    keep: list[int] = []
    rows: dict[int, catalog.FileRow] = {}
    moments: dict = {}
    at = 0
    held: dict[onefile.Key, int] = {}  # entry -> its slot in keep
    reals: dict[int, bytes | None] = {}  # real paths looked up, by id: each row's links resolved once a search
    contents: dict[tuple[str, int], dict[int, catalog.FileRow]] = {}  # the rows of each (sha256, moment) read
    while len(keep) < k and at < len(order):
        step = order[at : at + max(k - len(keep), at)].tolist()  # twice as many read each time: few reads
        at += len(step)
        found = catalog.get_files(conn, ids[step].tolist())
        rows.update(found)
        for other in catalog.rows_holding(conn, ((r.sha256, r.moment) for r in found.values())):  # the index's range
            contents.setdefault((other.sha256, other.moment), {})[other.id] = other
        step_shared = {c for c in ((r.sha256, r.moment) for r in found.values()) if len(contents.get(c, ())) > 1}
        keyed = {r.id: onefile.named(r, reals)[0] if (r.sha256, r.moment) in step_shared else onefile.key(r, alone=True)
                 for r in found.values()}
        for i in step:
            row = found.get(int(ids[i]))
            if row is not None:  # else removed by a writer since its address was read: dropped with the hits
                entry = keyed[row.id]
                if entry in seen:
                    continue
                if row.t is not None and cap is not None:  # a video moment: its video's count, whatever the root
                    if moments.get(entry[0], 0) >= cap:
                        continue
                    moments[entry[0]] = moments.get(entry[0], 0) + 1
                seen.add(entry)
                held[entry] = len(keep)
            keep.append(i)
            if len(keep) == k:
                break
    # the kept files whose content more than one row holds: their files may have other names to show
    _shown_rows(ids, keep, rows, {e: s for e, s in held.items()
                                  if len(contents.get((rows[int(ids[keep[s]])].sha256, e[1]), ())) > 1},
                admits, reals, contents)
    return np.array(keep, dtype=np.int64), rows


def _shown_rows(ids: np.ndarray, keep: list[int], rows: dict, held: dict,
                admits: Callable[[list[int]], np.ndarray], reals: dict, contents: dict) -> None:
    """Each kept file shown by its preferred row (onefile.shown_first) among its rows the search may show, at the
    place and with the scores of its best-ranked row (they share one vector; a row ranked below it, or not a
    candidate at all when the ranking was cut at k, is the same file). Its other rows share its content: they
    are among `contents`, read with the ranked rows (catalog.rows_holding). held: the slots of the kept files
    whose content several rows hold. rows: the kept ids' entries are replaced in place by the row to show."""
    if not held:
        return
    best = {entry: int(ids[keep[slot]]) for entry, slot in held.items()}
    others = [r for entry, i in best.items() for r in contents.get((rows[i].sha256, entry[1]), {}).values()]
    if others:
        others = [r for r, ok in zip(others, admits([r.id for r in others])) if ok]
    shown: dict[onefile.Key, tuple] = {}
    for row in others:
        entry, rank = onefile.named(row, reals)
        if entry in best and (entry not in shown or rank < shown[entry][0]):
            shown[entry] = (rank, row)
    for entry, (_, row) in shown.items():
        rows[best[entry]] = row


def sort_hits(hits: list[Hit], key: str) -> list[Hit]:
    """The result set (already the best k) in the order asked for; unknown dates last."""
    if key == "score":
        return hits
    if key == "path":
        return sorted(hits, key=lambda h: h.path)
    known = [h for h in hits if h.taken is not None]
    # by the time, not its text: "...:20Z" sorted after "...:20.500000Z" ('.' < 'Z'); "+00:00": Python 3.10 reads no Z
    return sorted(known, key=lambda h: datetime.fromisoformat(h.taken.replace("Z", "+00:00")),
                  reverse=key == "-taken") + [h for h in hits if h.taken is None]


def open(index_dir: str | os.PathLike | None = None, model: str | None = None, device: str = "auto",  # noqa: A001
         text_bf16: bool = False, *, backend: str = "auto", precision: str = "auto", text_soon=None) -> Engine:
    """Open an index: the given directory, $ALIGNSEARCH_INDEX, or the nearest `.alignsearch` above cwd.
    backend and precision: see alignsearch/encoders/backend.py (text_bf16 is precision="bf16")."""
    return Engine(resolve_index_dir(index_dir), model=model, device=device, text_bf16=text_bf16, backend=backend,
                  precision=precision, text_soon=text_soon)
