"""The Python API: open an index directory and search it by text, image or both."""

from __future__ import annotations

import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from alignsearch import ann, catalog, shards, vectors
from alignsearch.errors import BadInputError, IndexNotFoundError, ModelMismatchError
from alignsearch.paths import ANN_FILE, DB_FILE, INDEX_DIRNAME, SERVER_FILE, VECTORS_FILE, find_index_dir, resolve_index_dir

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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Engine:
    """An opened index. The model loads on first use; searches may run from several threads."""

    def __init__(self, index_dir: Path, model: str | None = None, device: str = "auto", text_bf16: bool = False):
        self.dir = Path(index_dir)
        self.db = catalog.connect(self.dir / DB_FILE)
        with self.db.connect() as conn:
            self.model_info = catalog.get_meta(conn, "model")
            self.roots = catalog.get_meta(conn, "roots", [])
            self.tuning = catalog.get_meta(conn, "tuning") or {}
        if self.model_info is None:
            raise IndexNotFoundError(f"{self.dir} holds no indexed images yet: run `alignsearch index FOLDER`")
        with self.db.connect() as conn:
            self.store = vectors.load(conn, self.dir, int(self.model_info["dim"]))
        self._model_name = model
        self._device = device
        self._text_bf16 = text_bf16
        self._encoder = None
        self._encoder_lock = threading.Lock()
        self._load_index()

    def _load_index(self) -> None:
        if not (self.dir / ANN_FILE).exists() and shards.files(self.dir) is None:
            raise IndexNotFoundError(f"{self.dir / ANN_FILE} is missing: run `alignsearch index` to build it")
        stamp = shards.stamp(self.dir)  # taken first: a publish while opening triggers one more refresh
        self.index = shards.open_served(self.dir)
        self.plan = ann.describe(self.index)
        self._index_stamp = stamp

    def refresh(self) -> bool:
        """Pick up an index rebuilt since opening (files are replaced atomically); True if it changed."""
        if shards.stamp(self.dir) == self._index_stamp:
            return False
        with self.db.connect() as conn:
            self.store = vectors.load(conn, self.dir, self.store.dim)
            self.tuning = catalog.get_meta(conn, "tuning") or {}
            self.roots = catalog.get_meta(conn, "roots", [])
        self._load_index()
        return True

    @property
    def nprobe(self) -> int:
        """Tuned for the target recall after each build (indexer/tune.py), else the size rule."""
        return int(self.tuning.get("nprobe") or ann.default_nprobe(self.plan))

    @property
    def encoder(self):
        """The index's own model, loaded once; a different model given at open() is an error."""
        with self._encoder_lock:
            if self._encoder is None:
                from alignsearch.model import Encoder

                enc = Encoder(self._model_name or self.model_info["model"], self._device, self._text_bf16)
                if enc.fingerprint != self.model_info["fingerprint"]:
                    raise ModelMismatchError(
                        f"this index was built with {self.model_info['model']} "
                        f"(fingerprint {self.model_info['fingerprint']}), but {enc.name} has fingerprint "
                        f"{enc.fingerprint}: query with the index's model, or re-index with the new one"
                    )
                self._encoder = enc
            return self._encoder

    def embed(self, text: str | None = None, image=None, negative: str | None = None,
              text_weight: float = 2.0, image_weight: float = 1.0, negative_weight: float = 1.0) -> np.ndarray:
        """The unit query vector for text, image (path, bytes or PIL image), or both, minus a negative."""
        from alignsearch.query import compose

        if text is None and image is None:
            raise BadInputError("give a text, an image, or both to search for")
        enc = self.encoder
        with self._encoder_lock:  # torch modules are not safe to call from two threads at once
            t = enc.encode_text([text])[0] if text is not None else None
            i = enc.encode_images([image])[0] if image is not None else None
            n = enc.encode_text([negative])[0] if negative else None
        try:
            return compose(t, i, n, text_weight, image_weight, negative_weight)
        except ValueError as exc:
            raise BadInputError(str(exc)) from None

    def search(self, text: str | None = None, image=None, k: int = 10, negative: str | None = None,
               text_weight: float = 2.0, image_weight: float = 1.0, negative_weight: float = 1.0,
               nprobe: int | None = None, tag: str | None = None) -> list[Hit]:
        """Top-k hits, best first. Compound queries follow the ALIGN paper (text 2 : image 1).
        tag: only images tagged with this label (see `alignsearch tag`)."""
        query = self.embed(text, image, negative, text_weight, image_weight, negative_weight)
        return self.search_vector(query, k, nprobe, tag)

    def search_vector(self, query: np.ndarray, k: int = 10, nprobe: int | None = None, tag: str | None = None) -> list[Hit]:
        from alignsearch.query import rerank

        if k < 1:
            raise BadInputError(f"k must be at least 1, got {k}")
        allowed = None
        if tag is not None:
            with self.db.connect() as conn:
                allowed = np.array(catalog.ids_with_tag(conn, tag), dtype=np.int64)
            if len(allowed) == 0:
                return []
        if self.index.ntotal == 0:
            return []
        want = ann.candidate_count(k, self.plan, self.tuning.get("rerank_factor", 10))
        scores, ids = ann.search(self.index, query[None, :], want, nprobe or self.nprobe, allowed)
        keep = ids[0] >= 0
        ids, scores = ids[0][keep], scores[0][keep]
        with self.db.connect() as conn:
            rows = catalog.get_files(conn, ids.tolist())
        known = np.array([i in rows and rows[i].vec_row is not None for i in ids.tolist()], dtype=bool)
        ids, scores = ids[known], scores[known]
        if self.plan.kind != "flat":  # PQ scores are approximate: re-score from the stored vectors
            stored = self._stored(np.array([rows[i].vec_row for i in ids.tolist()], dtype=np.int64))
            ids, scores = rerank(query, ids, stored, k)
        return [_hit(rows[int(i)], float(s)) for i, s in zip(ids[:k], scores[:k])]

    def info(self) -> dict[str, Any]:
        with self.db.connect() as conn:
            count = catalog.counts(conn)
        return {
            "index_dir": str(self.dir.resolve()),
            "model": self.model_info["model"],
            "fingerprint": self.model_info["fingerprint"],
            "dim": self.model_info["dim"],
            "roots": self.roots,
            "images": count[catalog.INDEXED],
            "failed": count[catalog.FAILED],
            "index": {
                "type": self.plan.kind,
                "factory": self.plan.factory,
                "nlist": self.plan.nlist,
                "pq_m": self.plan.m,
                "nprobe": self.nprobe if self.plan.kind != "flat" else None,
                "rerank_factor": self.tuning.get("rerank_factor") if self.plan.kind != "flat" else None,
                "tuned_recall_at_10": self.tuning.get("recall"),
                "target_recall": self.tuning.get("target"),
                "vectors": int(self.index.ntotal),
                "metric": "inner_product",
                "layout": ann.layout(self.index),
            },
        }

    def classify(self, image, labels: list[str], templates: tuple[str, ...] = ("{}",)) -> list[dict]:
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

    def vector_of(self, file_id: int) -> np.ndarray | None:
        """The stored unit vector of an indexed file ("more like this"), or None."""
        row = self.file(file_id)
        return None if row is None else self._stored(np.array([row.vec_row]))[0]

    def _stored(self, addresses: np.ndarray) -> np.ndarray:
        store = self.store
        if not store.holds(addresses):  # rows committed since this store was loaded: a writer is running
            with self.db.connect() as conn:
                store = self.store = vectors.load(conn, self.dir, store.dim)
        return store.get(addresses)

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


def _hit(row: catalog.FileRow, score: float) -> Hit:
    return Hit(row.id, row.path, score, row.root, row.relpath, row.width, row.height, row.format, row.size, row.mtime)


def open(index_dir: str | os.PathLike | None = None, model: str | None = None, device: str = "auto",  # noqa: A001
         text_bf16: bool = False) -> Engine:
    """Open an index: the given directory, $ALIGNSEARCH_INDEX, or the nearest `.alignsearch` above cwd.
    text_bf16: faster text queries on CPUs with bfloat16 support (see Encoder)."""
    return Engine(resolve_index_dir(index_dir), model=model, device=device, text_bf16=text_bf16)
