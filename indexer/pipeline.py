"""Reader -> encoder -> writer, driven by a runner that times each stage.

The reader decodes in worker processes (ordered imap, so decoding of the next batch overlaps the
encoder); the encoder turns a batch of crops into vectors; the writer commits the batch. A batch is
the unit of loss on a crash: everything before it is committed.
"""

from __future__ import annotations

import multiprocessing
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Iterable, Iterator, Protocol

import numpy as np

from alignsearch.images import DEFAULT_MAX_PIXELS, ImageSpec
from indexer.decode import Item, read_item
from indexer.scan import Found


class BatchEncoder(Protocol):
    def encode_crops(self, crops: np.ndarray) -> np.ndarray: ...


@dataclass
class StageTimes:
    """Wall seconds the runner waited on each stage, and the workers' own decode seconds."""

    read_wait: float = 0.0
    decode_worker: float = 0.0
    encode: float = 0.0
    write: float = 0.0
    items: int = 0
    failed: int = 0
    reused: int = 0
    wall: float = 0.0
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def read_items(todo: list[Found], spec: ImageSpec, workers: int, max_pixels: int = DEFAULT_MAX_PIXELS,
               fast: bool = False) -> Iterator[Item]:
    """Decoded items in scan order; in `workers` processes, or in this one when workers is 0."""
    fn = partial(read_item, spec=spec, max_pixels=max_pixels, fast=fast)
    if workers <= 0:
        yield from map(fn, todo)
        return
    # spawn: workers import only PIL and numpy, never the torch state of this process
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(fn, todo, chunksize=4)


def batches(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    batch: list[Item] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def run(
    items: Iterable[Item],
    encoder: BatchEncoder,
    write: Callable[[list[Item], np.ndarray], None],
    batch_size: int,
    on_batch: Callable[[int], None] = lambda n: None,
    known: Callable[[list[str]], dict[str, int]] = lambda hashes: {},
) -> StageTimes:
    """Encode and write every batch; returns where the time went.

    `known` maps content hashes to vector rows already stored: those items reuse the row and skip
    the encoder (renamed, moved, duplicated or merely touched files).
    """
    times = StageTimes()
    start = time.perf_counter()
    source = batches(items, batch_size)
    while True:
        t0 = time.perf_counter()
        batch = next(source, None)
        t1 = time.perf_counter()
        times.read_wait += t1 - t0
        if batch is None:
            break
        good = [it for it in batch if it.crop is not None]
        rows = known([it.sha256 for it in good])
        for it in good:
            it.vec_row = rows.get(it.sha256)
        fresh = [it for it in good if it.vec_row is None]
        vectors = encoder.encode_crops(np.stack([it.crop for it in fresh])) if fresh else np.zeros((0, 0), np.float32)
        t2 = time.perf_counter()
        write(batch, vectors)
        t3 = time.perf_counter()
        times.encode += t2 - t1
        times.write += t3 - t2
        times.decode_worker += sum(it.seconds for it in batch)
        times.items += len(batch)
        times.failed += len(batch) - len(good)
        times.reused += len(good) - len(fresh)
        on_batch(len(batch))
    times.wall = time.perf_counter() - start
    return times
