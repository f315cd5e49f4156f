"""The FAISS index: which kind for N vectors (pure functions), building it, searching it.

Exact search below FLAT_BELOW vectors, where 8-bit PQ and k-means cannot be trained well; IVF-PQ
above, with candidates re-ranked exactly from the vector store by the query layer.
"""

from __future__ import annotations

import errno
import hashlib
import math
import os
import stat
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np

from alignsearch import safeopen
from alignsearch.atomic import fsync_dir, replacing
from alignsearch.errors import IndexDamagedError

FLAT_BELOW = 10_000
PQ_SIZES = (64, 40, 32, 20, 16, 8, 4, 2, 1)  # bytes per code; the large ones are GPU-legal for d=640


@dataclass(frozen=True)
class IndexPlan:
    kind: str  # "flat" or "ivfpq"
    nlist: int = 0
    m: int = 0  # PQ sub-quantizers (bytes per vector at 8 bits)
    nbits: int = 8

    @property
    def factory(self) -> str:
        return "IDMap,Flat" if self.kind == "flat" else f"IVF{self.nlist},PQ{self.m}"

    def to_dict(self) -> dict:
        return asdict(self)


def plan_index(n: int, dim: int, flat_below: int = FLAT_BELOW) -> IndexPlan:
    """Flat below flat_below vectors; otherwise IVF-PQ with nlist ~ 4*sqrt(N) (a power of two,
    at least 39 training points per list) and the largest PQ code that splits dim evenly.

    4*sqrt(N), the low end of faiss's advice, keeps k-means training (~ nlist^2) affordable on a CPU:
    at 1M it is 4096 lists; re-ranking recovers the recall that larger lists would cost."""
    if n < max(flat_below, 256):
        return IndexPlan("flat")
    nlist = 2 ** round(math.log2(4 * math.sqrt(n)))
    while nlist > 16 and nlist * 39 > n:
        nlist //= 2
    m = next(m for m in PQ_SIZES if (dim % m == 0 and dim // m >= 2) or m == 1)
    return IndexPlan("ivfpq", nlist=nlist, m=m)


def default_nprobe(plan: IndexPlan) -> int:
    """Lists to visit per query: 1/32 of them, at least 8. Re-ranking makes up for PQ's error."""
    if plan.kind == "flat":
        return 0
    return min(plan.nlist, max(8, plan.nlist // 32))


def train_size(n: int, plan: IndexPlan) -> int:
    """Random training sample: 40 points per list (faiss wants >= 39), enough for 256 PQ centroids."""
    if plan.kind == "flat":
        return 0
    return min(n, max(40 * plan.nlist, 256 * 64))


def candidate_count(k: int, plan: IndexPlan, rerank_factor: int = 10) -> int:
    """How many ANN candidates a top-k query re-ranks exactly: on IVF-PQ at least 50, on a flat index (exact scores)
    k. The engine asks for query.TIE_MARGIN more and keeps of those only the ones that may tie with the last."""
    return k if plan.kind == "flat" else max(k * rerank_factor, 50)


def filtered_nprobe(nprobe: int, plan: IndexPlan, candidates: int, n: int, allowed: int) -> int:
    """Lists to visit when only `allowed` of `n` vectors may be returned: enough that the visited lists
    hold about sixteen times `candidates` allowed vectors (a list holds allowed / nlist of them on average;
    at 1% of 1M in bench_filter, 4x gave recall@10 0.89, 8x 0.96, 16x 0.98 at the same p50 of 14 ms: the
    filtered neighbours lie in lists ranked lower), never fewer than the unfiltered nprobe nor more than nlist."""
    if plan.kind == "flat" or allowed <= 0:
        return nprobe
    wanted = math.ceil(16 * candidates * plan.nlist / allowed)
    return int(min(plan.nlist, max(nprobe, wanted)))


def needs_rebuild(trained: IndexPlan | None, trained_n: int, n: int, dim: int) -> bool:
    """Retrain when the right kind of index changed or N grew 4x past what the index was trained for."""
    if trained is None:
        return True
    wanted = plan_index(n, dim)
    if wanted.kind != trained.kind:
        return True
    return trained.kind == "ivfpq" and n > 4 * max(trained_n, 1)


def _gpu_count() -> int:
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


KMEANS_ITERATIONS = 10  # faiss uses 25; 10 trains 2.5x faster (benchmarks/RESULTS.md compares both)


def create(plan: IndexPlan, dim: int, kmeans_iterations: int = KMEANS_ITERATIONS) -> faiss.Index:
    index = faiss.index_factory(dim, plan.factory, faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.cp.niter = kmeans_iterations
        # The factory turns on polysemous training, which only serves Hamming-filtered search we never
        # use, and took 50 of 60 s to train at 100k vectors (benchmarks/RESULTS.md).
        faiss.downcast_index(ivf).do_polysemous_training = False
    return index


def train_and_fill(index: faiss.Index, sample: np.ndarray, chunks) -> faiss.Index:
    """Train on the sample and add every (vectors, ids) chunk; on a GPU when faiss has one.

    Returns a CPU index ready to be written.
    """
    use_gpu = _gpu_count() > 0 and isinstance(index, faiss.IndexIVF)
    if use_gpu:
        options = faiss.GpuClonerOptions()
        options.useFloat16 = True  # 64-byte PQ codes need float16 lookup tables on the GPU
        resources = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(resources, 0, index, options)
    if not index.is_trained:
        index.train(np.ascontiguousarray(sample, dtype=np.float32))
    for vectors, ids in chunks:
        add(index, vectors, ids)
    return faiss.index_gpu_to_cpu(index) if use_gpu else index


def add(index: faiss.Index, vectors: np.ndarray, ids: np.ndarray) -> None:
    if len(ids):
        index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.asarray(ids, dtype=np.int64))


def remove(index: faiss.Index, ids) -> int:
    ids = np.asarray(list(ids), dtype=np.int64)
    return int(index.remove_ids(faiss.IDSelectorBatch(ids))) if len(ids) else 0


def write_next(index: faiss.Index, path: Path) -> str:
    """Write the index to `path`.next (fsync'ed) and return its digest, for the caller to record in the
    catalog before it calls publish_next(path)."""
    write_atomic(index, next_path(path))
    return own_digest(next_path(path))


def publish_next(path: Path) -> None:
    """Rename `path`.next over `path` (after the catalog recorded its digest), durably: the files of the
    layout before are removed next, and a power cut must not keep their removal and lose the rename."""
    if next_path(path).exists():
        os.replace(next_path(path), path)
        fsync_dir(Path(path).parent)


def write_atomic(index: faiss.Index, path: Path) -> None:
    """Temporary file, fsync, rename: a reader sees the old index or the new one, never half."""
    with replacing(path) as tmp:
        faiss.write_index(index, str(tmp))


def open_own(path: Path) -> int:
    """A read-only descriptor of one of the ANN files the index keeps (index.faiss, shards and their manifest, a
    lists file), only when it is a regular file at its own name (safeopen). Writers replace them by a rename, so
    a symbolic link there was never written by alignsearch: readers followed one (to a FIFO, which hung them, or to
    another index's file), and verify hashed the file it named. It is damage: IndexDamagedError (exit 7), mended
    by `verify --repair`, which builds the files again. FileNotFoundError when nothing is there."""
    try:
        return safeopen.open_regular(path, follow=False)
    except safeopen.Refused as exc:
        raise _not_own(path, exc) from None
    except OSError as exc:  # opened in its folder, the error names the file alone: the whole path, as open() gave,
        # tells the CLI an index file is unreadable (surfaces/boundary.py), not an unexpected error
        raise type(exc)(exc.errno, exc.strerror, str(path)) from None


def _not_own(path: Path, exc: safeopen.Refused) -> OSError | IndexDamagedError:
    """What open_own raises for what it refused: a folder stays "Is a directory" (the CLI says to move it away:
    a rebuild cannot rename over it), anything else is damage --repair mends."""
    try:
        folder = stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        folder = False
    if folder:
        return IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    said = str(exc) if str(exc).startswith("is ") else f"is {exc}"
    return IndexDamagedError(f"{Path(path).name} {said}, where the index keeps a file of its own (damage: never "
                             f"written there by alignsearch){REPAIR}")


REPAIR = ": run `alignsearch verify --repair`"


def own(path: Path) -> str:
    """path, as a string for faiss (which opens it itself, mapping shards and lists), once open_own found a
    regular file there. faiss opens it again by name; a swap in between needs the index folder writable by
    someone else, which every command refuses (paths.untrusted_index)."""
    os.close(open_own(path))
    return str(path)


def read(path: Path) -> faiss.Index:
    return faiss.read_index(own(path))


def read_ondisk(path: Path) -> faiss.Index:
    """An on-disk layout's index.faiss with its lists file mapped read-only from the index's own folder. faiss
    opened the lists "r+" at the absolute path they were built at: an index a reader may not write (another
    user's, a read-only mount) could not be searched (exit 7), and a moved index looked for its lists in the
    old folder (a copy read the original's). IO_FLAG_ONDISK_SAME_DIR would do the second but prints to stdout."""
    try:
        index = faiss.read_index(own(path), faiss.IO_FLAG_READ_ONLY | faiss.IO_FLAG_SKIP_IVF_DATA)
    except RuntimeError:  # lists held in the file (faiss cannot skip them): the layout before, which a writer killed
        # between its commit and its publish left in place, readers serve (tests/test_attacks.py SWITCHES)
        return read(path)
    ivf = faiss.try_extract_index_ivf(index)
    lists = faiss.downcast_InvertedLists(ivf.invlists) if ivf is not None else None
    if not isinstance(lists, faiss.OnDiskInvertedLists):  # written before the layout's lists: read as it is
        return read(path)
    lists.filename = own(Path(path).parent / Path(lists.filename).name)
    if os.stat(lists.filename).st_size < lists.totsize:  # a page past the end of a mapped file is SIGBUS: a query
        # on a lists file cut short died with exit 135 and no word (lists are hashed by verify, not on open)
        raise IndexDamagedError(f"{Path(lists.filename).name} is shorter than its index says: run "
                                "`alignsearch verify --repair`")
    lists.do_mmap()
    return index


NEXT_SUFFIX = ".next"  # index.faiss.next: written and fsync'ed, recorded in the catalog, then renamed over


def next_path(path: Path) -> Path:
    return Path(path).with_name(Path(path).name + NEXT_SUFFIX)


def file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return _digest(f)


def own_digest(path: Path) -> str:
    """file_digest of one of the index's own ANN files, opened by open_own (a symbolic link there is damage)."""
    with os.fdopen(open_own(path), "rb") as f:
        return _digest(f)


def _digest(f) -> str:
    h = hashlib.sha256()
    for block in iter(lambda: f.read(1 << 22), b""):
        h.update(block)
    return h.hexdigest()


def read_verified(path: Path, digest: str | None) -> faiss.Index:
    """The index at `path` whose bytes hash to `digest` (the catalog's record), else its `.next` file (a
    writer recorded it and is about to rename it over). Damaged bytes are never deserialised: a header or
    lists overwritten on disk would crash faiss or give scores like 1e36. digest None: an index written
    before digests were recorded, read as it is. One attempt: a reader that may meet a writer's publish
    opens through layouts.open_current, which retries with the catalog's record read again.
    Raises FileNotFoundError when neither file is there (digest given), IndexDamagedError when neither has the bytes."""
    if digest is None:
        return read(path)
    found = False
    for candidate in (path, next_path(path)):
        try:
            with os.fdopen(open_own(candidate), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            continue
        found = True
        if hashlib.sha256(data).hexdigest() == digest:
            return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    if not found:
        raise FileNotFoundError(path)
    raise IndexDamagedError(f"{Path(path).name} is damaged (its checksum differs from the one the catalog recorded):"
                            " run `alignsearch verify --repair`")


def search(index: faiss.Index, queries: np.ndarray, k: int, nprobe: int,
           allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids), each (len(queries), k'), ids -1 where fewer than k exist.

    allowed: only these ids may be returned (a filter applied inside the scan, not after it).
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    k = max(1, min(k, index.ntotal))
    selector = None if allowed is None else id_selector(allowed)
    if isinstance(faiss.try_extract_index_ivf(parts(index)[0]), faiss.IndexIVF):  # IndexShards pass params on
        params = faiss.SearchParametersIVF(nprobe=int(nprobe), sel=selector)
    else:
        params = faiss.SearchParameters(sel=selector)
    return index.search(queries, k, params=params)


def describe(index: faiss.Index) -> IndexPlan:
    """The plan an existing index was built with, read from the index itself (its first shard)."""
    ivf = faiss.try_extract_index_ivf(parts(index)[0])
    if ivf is None:
        return IndexPlan("flat")
    pq = faiss.downcast_index(ivf).pq
    return IndexPlan("ivfpq", nlist=int(ivf.nlist), m=int(pq.M), nbits=int(pq.nbits))


def stored_ids(index: faiss.Index) -> np.ndarray:
    """Every id an IDMap or IVF index (or each of its shards) holds."""
    if isinstance(index, faiss.IndexShards):
        found = [stored_ids(part) for part in parts(index)]
        return np.concatenate(found) if found else np.zeros(0, dtype=np.int64)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        return faiss.vector_to_array(index.id_map).astype(np.int64)
    lists = ivf.invlists
    chunks = [
        faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy()
        for i in range(ivf.nlist)
        if lists.list_size(i)
    ]
    return np.concatenate(chunks).astype(np.int64) if chunks else np.zeros(0, dtype=np.int64)


def flat_vectors(index: faiss.Index) -> tuple[np.ndarray, np.ndarray] | None:
    """(ids, their vectors) of a flat index, as it holds them (a view: no copy); None for IVF-PQ and shards,
    which keep codes, not vectors."""
    if isinstance(index, faiss.IndexShards) or faiss.try_extract_index_ivf(index) is not None:
        return None
    flat = faiss.downcast_index(index.index)
    if not isinstance(flat, faiss.IndexFlat):
        return None
    xb = faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * index.d).reshape(-1, index.d)
    return faiss.vector_to_array(index.id_map).astype(np.int64), xb


def pq_entries(index: faiss.Index) -> list[tuple[faiss.IndexIVFPQ, np.ndarray, np.ndarray, np.ndarray]] | None:
    """For each IVF-PQ part (the index, or each of its shards): (the part, its ids, the list each is in, their
    PQ codes), as it holds them (copies); None for a flat index."""
    out = []
    for part in parts(index):
        ivf = faiss.try_extract_index_ivf(part)
        if ivf is None or not isinstance(faiss.downcast_index(ivf), faiss.IndexIVFPQ):
            return None
        ivf, lists = faiss.downcast_index(ivf), ivf.invlists
        ids, nos, codes = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros((0, lists.code_size), np.uint8)]
        for i in range(ivf.nlist):
            size = lists.list_size(i)
            if size:
                ids.append(faiss.rev_swig_ptr(lists.get_ids(i), size).astype(np.int64))
                nos.append(np.full(size, i, dtype=np.int64))
                codes.append(faiss.rev_swig_ptr(lists.get_codes(i), size * lists.code_size)
                             .reshape(size, lists.code_size).copy())
        out.append((ivf, np.concatenate(ids), np.concatenate(nos), np.concatenate(codes)))
    return out


def layout(index: faiss.Index) -> str:
    """"ondisk" when the inverted lists are memory-mapped from one merged file, "sharded (N files)" for
    an IndexShards, else "memory"."""
    if isinstance(index, faiss.IndexShards):
        return f"sharded ({index.count()} files)"
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        return "memory"
    return "ondisk" if isinstance(faiss.downcast_InvertedLists(ivf.invlists), faiss.OnDiskInvertedLists) else "memory"


def parts(index: faiss.Index) -> list[faiss.Index]:
    """The shards of an IndexShards, else the index itself."""
    if isinstance(index, faiss.IndexShards):
        return [index.at(i) for i in range(index.count())]
    return [index]


def id_selector(allowed: np.ndarray) -> faiss.IDSelector:
    """A selector of these ids: a bitmap (one bit per id up to the largest, built in a millisecond at 1M
    ids) rather than a hash set of them."""
    allowed = np.asarray(allowed, dtype=np.int64)
    bits = np.zeros(int(allowed.max()) + 1 if len(allowed) else 1, dtype=bool)
    bits[allowed] = True
    packed = np.packbits(bits, bitorder="little")  # faiss reads bit (id & 7) of byte id >> 3
    selector = faiss.IDSelectorBitmap(len(packed), faiss.swig_ptr(packed))  # n counts bytes
    selector.referenced = packed  # the selector does not copy: keep the bitmap alive with it
    return selector


def rerank(query: np.ndarray, ids: np.ndarray, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner products of the candidates, best k first: (ids, scores)."""
    scores = vectors @ query.astype(np.float32)
    order = np.argsort(-scores, kind="stable")[:k]
    return ids[order], scores[order]
