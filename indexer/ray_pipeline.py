"""The same reader -> encoder -> writer stages driven by Ray Data, for many GPUs or many machines.

Decoding runs as CPU tasks over blocks of the file list, encoding in actors that each load the model
once (one GPU each when there are GPUs), and the driver stays the single catalog writer, committing
batch by batch as results stream back: a re-run after any failure skips what was committed.
"""

from __future__ import annotations

import time
from dataclasses import asdict

import numpy as np

from alignsearch.errors import BadInputError
from alignsearch.images import ImageSpec
from indexer.decode import Item, read_item
from indexer.pipeline import StageTimes
from indexer.scan import Found

FOUND_FIELDS = ("root", "relpath", "size", "mtime", "error", "relpath_raw", "offset")


def _row(found: Found) -> dict:
    # Arrow columns have no None for these: empty string / bytes stand for it.
    return {**asdict(found), "error": found.error or "", "relpath_raw": found.relpath_raw or b""}


def _found(batch: dict, i: int) -> Found:
    return Found(str(batch["root"][i]), str(batch["relpath"][i]), int(batch["size"][i]), float(batch["mtime"][i]),
                 str(batch["error"][i]) or None, bytes(batch["relpath_raw"][i]) or None, int(batch["offset"][i]))


def decode_batch(batch: dict, spec: ImageSpec, fast: bool = False) -> dict:
    """CPU stage: rows of Found fields -> crops (zeros where decoding failed) and metadata."""
    items = [read_item(_found(batch, i), spec, fast=fast) for i in range(len(batch["relpath"]))]
    h, w = spec.output_size
    out = {f: batch[f] for f in FOUND_FIELDS}
    out["crop"] = np.stack([it.crop if it.crop is not None else np.zeros((h, w, 3), np.uint8) for it in items])
    out["ok"] = np.array([it.crop is not None for it in items])
    for name in ("sha256", "format", "reason"):  # "" and -1 stand for None: blocks must share one schema
        out[name] = np.array([getattr(it, name) or "" for it in items], dtype=object)
    for name in ("width", "height"):
        out[name] = np.array([getattr(it, name) or -1 for it in items], dtype=np.int64)
    out["decode_seconds"] = np.array([it.seconds for it in items])
    return out


class EncoderActor:
    """GPU (or CPU) stage: one model per actor, loaded once."""

    def __init__(self, model: str, device: str):
        from alignsearch.model import Encoder

        self.encoder = Encoder(model, device)

    def __call__(self, batch: dict) -> dict:
        start = time.perf_counter()
        ok = batch["ok"].astype(bool)
        vectors = np.zeros((len(ok), self.encoder.dim), np.float32)
        if ok.any():
            vectors[ok] = self.encoder.encode_crops(batch["crop"][ok])
        out = {k: v for k, v in batch.items() if k != "crop"}  # crops stay on the worker
        out["vector"] = vectors
        out["encode_seconds"] = np.full(len(vectors), (time.perf_counter() - start) / max(len(vectors), 1))
        return out


def run_ray(todo: list[Found], model: str, device: str, spec: ImageSpec, write, batch_size: int,
            address: str | None = None, encoders: int | None = None, on_batch=lambda n: None,
            fast: bool = False) -> StageTimes:
    """Index `todo` on Ray (local when address is None); `write(items, vectors)` commits on the driver."""
    import ray

    times = StageTimes()
    if not todo:
        return times
    started_here = not ray.is_initialized()
    if started_here:
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
        except ConnectionError as exc:
            raise BadInputError(
                f"cannot join the Ray cluster at {address}: {str(exc).splitlines()[-1]}. A cluster started with "
                "`ray start` authenticates with a token: set RAY_AUTH_MODE=token (the token is read from "
                "~/.ray/auth_token or RAY_AUTH_TOKEN)") from None
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False  # ours is the driver's bar
        gpus = int(ray.cluster_resources().get("GPU", 0))
        actors = encoders or max(1, gpus)
        rows = [_row(found) for found in todo]
        ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // batch_size, 200)))
        ds = ds.map_batches(decode_batch, fn_kwargs={"spec": spec, "fast": fast}, batch_size=batch_size, batch_format="numpy")
        ds = ds.map_batches(EncoderActor, fn_constructor_kwargs={"model": model, "device": "cuda" if gpus else device},
                            batch_size=batch_size, batch_format="numpy", concurrency=actors, num_gpus=1 if gpus else 0)
        start = time.perf_counter()
        for batch in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
            t = time.perf_counter()
            ok = batch["ok"].astype(bool)
            items = [
                Item(_found(batch, i), np.empty(0) if ok[i] else None, str(batch["sha256"][i]) or None,
                     int(batch["width"][i]) if batch["width"][i] >= 0 else None,
                     int(batch["height"][i]) if batch["height"][i] >= 0 else None,
                     str(batch["format"][i]) or None, str(batch["reason"][i]) or None)
                for i in range(len(ok))
            ]
            write(items, batch["vector"][ok])
            times.write += time.perf_counter() - t
            times.decode_worker += float(batch["decode_seconds"].sum())
            times.encode += float(batch["encode_seconds"].sum())
            times.items += len(items)
            times.failed += int((~ok).sum())
            on_batch(len(items))
        times.wall = time.perf_counter() - start
        times.extra["ray_encoders"] = actors
        return times
    finally:
        if started_here:
            ray.shutdown()
