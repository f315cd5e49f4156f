"""Reader -> encoder -> writer, driven by one runner that times each stage (`drive`).

Both ways of indexing go through `drive`. Locally (`run`), the reader decodes in worker processes
(ordered imap, so decoding of the next batch overlaps the encoder), the encoder turns a batch of crops
into vectors, and the writer commits the batch. On Ray (indexer/ray_pipeline.py), the reader is Ray
Data's stream of batches that actors have already decoded and encoded, so the runner's encoder stage
only takes their vectors (or the addresses where the actors stored them); the writer is the same. A
batch is the unit of loss on a crash: everything before it is committed.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Iterable, Iterator, Protocol

import numpy as np

from alignsearch.media.images import DEFAULT_MAX_PIXELS, ImageSpec
from indexer.decode import Item, PixelBudget, read_item, set_known_text, start_worker
from indexer.scan import Found
from indexer.workers import decode_in_processes

log = logging.getLogger(__name__)


class BatchEncoder(Protocol):
    def encode_crops(self, crops: np.ndarray) -> np.ndarray: ...


@dataclass
class StageTimes:
    """Wall seconds the runner waited on each stage, and the workers' own decode seconds."""

    read_wait: float = 0.0
    decode_worker: float = 0.0
    ocr: float = 0.0  # the workers' seconds reading text in images (`index --ocr`), not in decode_worker
    encode: float = 0.0
    write: float = 0.0
    items: int = 0
    failed: int = 0
    reused: int = 0
    wall: float = 0.0
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


@dataclass
class Batch:
    """What a reader hands the runner: decoded items, and when they were encoded upstream (Ray's encoder
    actors) the vectors of those that have a crop and no vec_row yet, in order (items whose vector an
    actor stored carry its address in vec_row, listed again in actor_rows for the writer's checksums)."""

    items: list[Item]
    vectors: np.ndarray | None = None  # None: the runner's encoder encodes the batch
    actor_rows: list[int] = field(default_factory=list)
    encode_seconds: float = 0.0  # spent encoding upstream


@dataclass(frozen=True)
class EncoderConfig:
    """How to build an Encoder, as one value: what each Ray encoder actor receives to load the model.

    `options` are further Encoder keywords (backend=, precision=, ...), passed through as given."""

    model: str
    device: str = "auto"
    options: dict = field(default_factory=dict)


def load_encoder(config: EncoderConfig):
    from alignsearch.encoders.backend import encoder_options
    from alignsearch.encoders.loader import open_encoder

    return open_encoder(config.model, encoder_options(device=config.device, **config.options), cache=False)


def read_items(todo: list[Found], spec: ImageSpec, workers: int, max_pixels: int = DEFAULT_MAX_PIXELS,
               fast: bool = False, ocr: bool = False, ocr_known: dict[str, str] | None = None) -> Iterator[Item]:
    """Decoded items in scan order; in `workers` processes, or in this one when workers is 0. ocr: each worker
    also reads the text in its images (alignsearch/media/ocr.py, its engine loaded once per worker), except content
    whose text is known already (ocr_known: {sha256: text}, e.g. of files that moved)."""
    fn = partial(read_item, spec=spec, max_pixels=max_pixels, fast=fast, ocr=ocr)
    if workers <= 0:
        set_known_text(ocr_known)
        yield from map(fn, todo)
        return
    # a pool that notices a worker that died (indexer/workers.py): Pool.imap waited forever for its task. The
    # workers ignore Ctrl-C (the command stops them); the known texts go to each worker once (an initializer),
    # and the file whose lock is the pool's turn for images over a worker's pixel budget (decode.PixelBudget).
    with decode_turn() as turn:
        yield from decode_in_processes(fn, todo, workers, lambda found, reason: Item(found, None, reason=reason),
                                       initializer=start_worker, initargs=(ocr_known, PixelBudget(turn)))


@contextmanager
def decode_turn() -> Iterator[str]:
    """The path of a file of this run's own for the decode pool's flock (decode.PixelBudget), while the pool runs.

    A named temporary file stayed in the temp folder whenever the run was killed (kill -9, the OOM killer). This
    one has no name (O_TMPFILE, or unlinked as soon as made: tempfile.TemporaryFile): this process holds it open,
    and the workers (spawned: they inherit no descriptor; replacements for dead ones get the same path) open it
    again through /proc/<this pid>/fd, each its own open file, so their flocks still exclude one another and the
    kernel still drops a dead worker's. Nothing is left to remove, and no name in a shared folder for another user
    to make first. Where there is no /proc, a named temporary file as before."""
    with tempfile.TemporaryFile(prefix="alignsearch-decode-", suffix=".lock") as turn:
        unnamed = f"/proc/{os.getpid()}/fd/{turn.fileno()}"
        if os.path.exists(unnamed):
            yield unnamed
            return
    with tempfile.NamedTemporaryFile(prefix="alignsearch-decode-", suffix=".lock") as named:
        yield named.name


def batches(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    batch: list[Item] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def stack_crops(crops: list):
    """One (N, H, W, 3) uint8 batch: numpy from the CPU decode; a tensor on the device when any crop is one (the
    GPU decode's, indexer/gpudecode.py), the CPU decode's crops of the same batch copied there."""
    if all(isinstance(c, np.ndarray) for c in crops):
        return np.stack(crops)
    import torch

    device = next(c.device for c in crops if isinstance(c, torch.Tensor))
    return torch.stack([torch.from_numpy(c).to(device) if isinstance(c, np.ndarray) else c for c in crops])


def drive(
    reader: Iterable[Batch],
    encoder: BatchEncoder | None,
    write: Callable[..., None],
    on_batch: Callable[[int], None] = lambda n: None,
    known: Callable[[list[str]], dict[str, int]] = lambda hashes: {},
    write_size: int = 0,
) -> StageTimes:
    """The runner: take each batch from the reader, encode it, write it; returns where the time went.

    read_wait is the time spent waiting on the reader, encode the runner's encoder stage plus what the
    reader reports it spent encoding upstream, write the writer's, decode_worker the decode seconds the
    items carry. `write(items, new_vectors, actor_rows)` commits a batch: each reader batch, or with
    write_size the reader's batches gathered until they hold that many items (so the encoder can start on
    the first few decoded images while a commit still holds many). For batches the runner encodes,
    `known` maps content hashes to vector rows already stored: those items reuse the row and skip the
    encoder (renamed, moved, duplicated or merely touched files).
    """
    times = StageTimes()
    start = time.perf_counter()
    pending: list[tuple[Batch, np.ndarray]] = []

    def flush() -> None:
        items = [it for b, _ in pending for it in b.items]
        parts = [v for _, v in pending if len(v)]
        new_vectors = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
        t2 = time.perf_counter()
        write(items, new_vectors, [r for b, _ in pending for r in b.actor_rows])
        times.write += time.perf_counter() - t2
        pending.clear()
        on_batch(len(items))

    source = iter(reader)
    while True:
        t0 = time.perf_counter()
        batch = next(source, None)
        t1 = time.perf_counter()
        times.read_wait += t1 - t0
        if batch is None:
            break
        good = [it for it in batch.items if it.crop is not None]
        new_vectors = batch.vectors
        if new_vectors is None:
            rows = known([it.sha256 for it in good])
            for it in good:
                it.vec_row = rows.get(it.sha256)
            fresh = [it for it in good if it.vec_row is None]
            times.reused += len(good) - len(fresh)
            new_vectors = encoder.encode_crops(stack_crops([it.crop for it in fresh])) if fresh else np.zeros((0, 0), np.float32)
        t2 = time.perf_counter()
        times.encode += t2 - t1 + batch.encode_seconds
        times.decode_worker += sum(it.seconds for it in batch.items)
        times.ocr += sum(it.ocr_seconds for it in batch.items)
        times.items += len(batch.items)
        times.failed += len(batch.items) - len(good)
        pending.append((batch, new_vectors))
        if sum(len(b.items) for b, _ in pending) >= write_size:
            flush()
        log.debug("batch of %d: read %.3f s, encode %.3f s", len(batch.items), t1 - t0, t2 - t1)
    if pending:
        flush()
    times.wall = time.perf_counter() - start
    return times


def run(
    items: Iterable[Item],
    encoder: BatchEncoder,
    write: Callable[..., None],
    batch_size: int,
    on_batch: Callable[[int], None] = lambda n: None,
    known: Callable[[list[str]], dict[str, int]] = lambda hashes: {},
    encode_size: int | None = None,
) -> StageTimes:
    """The local path: `drive` over decoded items (read_items), encoded here `encode_size` at a time (the
    encoder's own batch: a CPU encoder starts on the first few images decoded instead of waiting for a whole
    batch, 2.7 s of 32 decodes on one worker), written in batches of batch_size."""
    step = min(encode_size or batch_size, batch_size)
    return drive((Batch(chunk) for chunk in batches(items, step)), encoder, write, on_batch, known, batch_size)
