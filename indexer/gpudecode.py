"""The reader stage on a GPU: JPEG bytes read by threads, decoded in batches by nvJPEG, resized and cropped on the
device, handed to the encoder as a device tensor (`index --device cuda`, on by default where it works; README).

Camera photos decode at ~56 ms each on a CPU core (benchmarks/RESULTS.md): 15 workers feed a GPU encoder that
could take 2,000 images/s only ~270. Here the decode runs on the GPU: torchvision.io.decode_jpeg (nvJPEG) by
default, nvImageCodec with ALIGNSEARCH_GPU_DECODER=nvimgcodec (indexer/jpegdecoders/), and the crop follows the
CPU path's arithmetic (alignsearch/media/images.py): a large JPEG is first reduced by the power of two its draft
decode would use (box averages where libjpeg scales in the DCT), turned by its EXIF orientation, then resized
with an antialiased filter of the checkpoint's kind (torch's antialias follows Pillow's filters) and
centre-cropped. The pixels are close to the CPU path's, not identical: the embeddings'
cosine to it is measured (tests/test_gpudecode.py; benchmarks/bench_index.py on the GPU).

Per file, what nvJPEG does not take goes to the CPU decode workers of today, in the same run: other formats
(by name, or by their header), CMYK JPEGs, JPEGs with no end marker (a cut-off file, which Pillow refuses),
images over GPU_MAX_PIXELS, and any JPEG the GPU decoder rejects (a batch that fails is decoded again file by
file, so one bad file costs only itself).

Threads and queues, each bounded (ahead_bound): a feeder hands files to READ_THREADS threads (bytes, hash,
header, photo fields) four per thread at most; full batches (BATCH_IMAGES files or BATCH_PIXELS pixels, what
bounds GPU memory) wait in a queue of QUEUE_BATCHES for the GPU thread, whose crops wait in a queue of a few
batches for the encoder (the caller, pipeline.drive). A GPU failure on a group (out of memory, say) sends its
files to the CPU too. The perceptual hash (alignsearch/media/phash.py) is taken on the CPU from a small copy.
torch and the decoder's library are imported only when the stage runs: without torchvision, `index` decodes on
the CPU as before. On the CPU (device "cpu", the tests) the same logic runs with torchvision's CPU decode, or
Pillow's where torchvision is missing.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import threading
import time
import warnings
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Iterable, Iterator

import numpy as np
from PIL import Image

from alignsearch.media import photometa
from alignsearch.media.images import DECODE_MARGIN, DEFAULT_MAX_PIXELS, ImageSpec, open_image
from alignsearch.media.phash import PHASH_SIDE, phash_of
from indexer import jpegdecoders
from indexer.decode import Item, read_data, read_item, sidecar_caption
from indexer.scan import Found
from indexer.workers import decode_in_processes

log = logging.getLogger(__name__)

JPEG_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".jfif"})  # other names go straight to the CPU workers
BATCH_IMAGES = 64  # files per nvJPEG call
BATCH_PIXELS = 400_000_000  # decoded pixels per batch (1.2 GB of RGB on the device; ~33 camera photos of 12 MP)
GROUP_PIXELS = 100_000_000  # pixels resized at once (1.2 GB of float32 on the device)
GPU_MAX_PIXELS = 100_000_000  # larger images go to the CPU path (its reduced decode needs far less memory)
QUEUE_BATCHES = 2  # batches read ahead of the GPU, and batches decoded ahead of the encoder
READ_THREADS = min(16, os.cpu_count() or 2)  # reading and hashing release the GIL; the header parse does not
END_MARKER_TAIL = 1 << 16  # where a JPEG's end-of-image marker is looked for (entropy data never holds FF D9)
RESIZE_MODES = {int(Image.BILINEAR): "bilinear", int(Image.BICUBIC): "bicubic"}  # torch's antialias = Pillow's
ORIENTATION = 0x0112


@dataclass(frozen=True)
class Probe:
    """What a JPEG's header says, and why the GPU will not take it (reason None: it will)."""

    width: int = 0  # as stored (before orientation)
    height: int = 0
    orientation: int = 1
    reason: str | None = None


def probe(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Probe:
    """Read the header only: a JPEG the GPU path decodes as the CPU path would, or the reason it goes there."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = open_image(data)
            fmt, mode, (width, height) = img.format, img.mode, img.size
            orientation = img.getexif().get(ORIENTATION, 1) if fmt == "JPEG" else 1
    except Exception:  # noqa: BLE001 - the CPU path's decoder gives the reason a person reads
        return Probe(reason="header not readable")
    if fmt != "JPEG":  # a camera's MPO too: the CPU workers draft-decode it and keep its format, MPO
        return Probe(reason=f"{fmt} (not JPEG)")
    if mode not in ("RGB", "L"):  # CMYK/YCCK: Pillow's colour conversion is the reference
        return Probe(reason=f"{mode} JPEG")
    if width * height > min(max_pixels, GPU_MAX_PIXELS):
        return Probe(reason="too many pixels for the GPU path")
    if b"\xff\xd9" not in data[-END_MARKER_TAIL:]:
        return Probe(reason="no end-of-image marker (cut off, or data after it)")
    return Probe(width, height, orientation if orientation in range(1, 9) else 1)


def draft_factor(width: int, height: int, spec: ImageSpec) -> int:
    """The scale Pillow's JPEG draft decodes at on the CPU path (images.decode asks for DECODE_MARGIN times the
    resize target's longer side, squared): the largest of 8, 4, 2, 1 not above both sides' ratio to it."""
    side = DECODE_MARGIN * max(spec.resize)
    ratio = min(width // side, height // side)
    return next(f for f in (8, 4, 2, 1) if f <= ratio or f == 1)


def orient(x, orientation: int):
    """An (..., H, W) tensor turned as EXIF orientation 1..8 says (PIL's ImageOps.exif_transpose)."""
    import torch

    h, w = x.dim() - 2, x.dim() - 1
    if orientation == 2:
        return x.flip(w)
    if orientation == 3:
        return x.flip(h, w)
    if orientation == 4:
        return x.flip(h)
    if orientation == 5:
        return x.transpose(h, w)
    if orientation == 6:
        return torch.rot90(x, -1, (h, w))
    if orientation == 7:
        return x.transpose(h, w).flip(h, w)
    if orientation == 8:
        return torch.rot90(x, 1, (h, w))
    return x


def crop_on_device(imgs, orientation: int, spec: ImageSpec):
    """Decoded (N, 3, H, W) uint8 images of one size and orientation to (the (N, H, W, 3) uint8 crops the encoder
    takes, the (N, h, w, 3) uint8 images the perceptual hash is taken from), both on the images' device; the CPU
    path's steps (module doc), as a few kernels for the whole group."""
    import torch
    import torch.nn.functional as F

    x = imgs.float()
    factor = draft_factor(x.shape[-1], x.shape[-2], spec)
    if factor > 1:  # what the DCT-scaled draft decode gives, as whole pixel values
        x = F.avg_pool2d(x, factor, ceil_mode=True).round_()
    x = orient(x, orientation)
    reduce = min(x.shape[-2:]) // PHASH_SIDE  # phash_of box-reduces as much before hashing
    small = F.avg_pool2d(x, reduce, ceil_mode=True).round_() if reduce >= 2 else x
    height, width = spec.resize
    if tuple(x.shape[-2:]) != (height, width):
        x = F.interpolate(x, size=(height, width), mode=RESIZE_MODES[spec.resample], antialias=True,
                          align_corners=False).round_().clamp_(0, 255)
    if spec.crop is not None:
        crop_h, crop_w = spec.crop
        top, left = (height - crop_h) // 2, (width - crop_w) // 2
        x = x[..., top : top + crop_h, left : left + crop_w]
    as_hwc = partial(torch.Tensor.permute, dims=(0, 2, 3, 1))
    return as_hwc(x.to(torch.uint8)).contiguous(), as_hwc(small.to(torch.uint8)).contiguous()


def unsupported(spec: ImageSpec) -> str | None:
    """Why the GPU path cannot follow this checkpoint's preprocessing, or None."""
    if spec.resample not in RESIZE_MODES:
        return f"the checkpoint resizes with Pillow filter {spec.resample}, which the GPU path does not follow"
    return None


def unavailable(device: str, decoder: str | None = None) -> str | None:
    """Why the JPEG decoder this run would use (`decoder`, else ALIGNSEARCH_GPU_DECODER, else torchvision's nvJPEG)
    does not work on this device, or None when it decodes a JPEG there."""
    return jpegdecoders.unavailable(device, decoder)


def choose(requested: bool | None, device_type: str, *, ocr: bool, use_ray: bool, spec_problem: str | None,
           why_not: Callable[[], str | None]) -> tuple[bool, str]:
    """Whether `index` decodes on the GPU, and why (a note for the log and the run's times). requested None
    (the default) is on where it can run: a CUDA encoder, no --ocr (the text engine reads the CPU decode's
    image), not on Ray (its actors decode), a checkpoint filter the GPU follows, and the JPEG decoder working there.
    requested True where it cannot run is an error the caller reports; False is always the CPU path."""
    if requested is False:
        return False, "off (--no-gpu-decode)"
    problem = ("the encoder is not on a CUDA device" if device_type != "cuda" else
               "--ocr reads text from the CPU decode's image" if ocr else
               "Ray's actors decode" if use_ray else spec_problem)
    if problem is None:
        problem = why_not()
    if problem is None:
        return True, "on"
    return False, f"off: {problem}"


@dataclass(frozen=True, kw_only=True)
class GpuDecodeOptions:
    device: str  # where nvJPEG decodes and the crops stay ("cuda", "cuda:1"; "cpu" runs the same logic on a CPU)
    decoder: str | None = None  # torchvision, nvimgcodec, pillow; None: $ALIGNSEARCH_GPU_DECODER, else the default
    max_pixels: int = DEFAULT_MAX_PIXELS
    fast: bool = False  # the CPU path's --fast-decode, for the files it takes
    threads: int = READ_THREADS
    batch_images: int = BATCH_IMAGES
    batch_pixels: int = BATCH_PIXELS
    queue_batches: int = QUEUE_BATCHES


@dataclass
class _Prepared:
    """A file read and judged by a read thread, waiting for its batch."""

    found: Found
    data: bytes
    sha256: str
    probe: Probe
    photo: dict
    seconds: float


@dataclass
class GpuStats:
    """Where the stage's time went (index's times.extra["gpu_decode"]; benchmarks/bench_index.py)."""

    decoder: str = ""  # the JPEG decoder that ran (indexer/jpegdecoders)
    gpu_images: int = 0
    cpu_images: int = 0  # decoded by the CPU workers (other formats, or JPEGs the GPU did not take)
    read_failed: int = 0
    batches: int = 0
    read_seconds: float = 0.0  # the read threads' own seconds (bytes, hash, header, photo fields)
    gpu_seconds: float = 0.0  # the GPU thread's: decode, reduce, resize, crop, up to the batch being ready
    phash_seconds: float = 0.0  # the read threads' perceptual hashing of the GPU images
    feeder_wait: float = 0.0  # the feeder waiting for room in the GPU's queue (the GPU was the slower)
    gpu_wait: float = 0.0  # the GPU thread waiting for a batch (the reads were the slower)
    max_ahead: int = 0  # most JPEGs read (bytes or crops held) and not yet handed to the encoder (ahead_bound)
    to_cpu: Counter = field(default_factory=Counter)  # why files went to the CPU workers

    def to_dict(self) -> dict:
        out = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in self.__dict__.items() if k != "to_cpu"}
        return {**out, "to_cpu": dict(self.to_cpu.most_common(8))}


class _Stopped(Exception):
    """The consumer went away (an error elsewhere, Ctrl-C, or it stopped reading): threads end quietly."""


_END = object()


class GpuReader:
    """Iterate to get the Items of `todo` (any order: decoded on the GPU or, per file, by the CPU workers);
    `stats` says where the time went. Stopping early (close, an exception in the caller) ends the threads."""

    def __init__(self, todo: list[Found], spec: ImageSpec, workers: int, options: GpuDecodeOptions):
        self.todo, self.spec, self.workers, self.opts = todo, spec, workers, options
        self.stats = GpuStats()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._ahead = 0
        self._gpu_q: queue.Queue = queue.Queue(maxsize=options.queue_batches)
        self._cpu_q: queue.Queue = queue.Queue()  # Found objects only: what it holds is small
        self._out_q: queue.Queue = queue.Queue(maxsize=options.queue_batches + 2)

    # -- plumbing: every blocking call wakes up to notice a stop ----------------------------------------
    def _put(self, q: queue.Queue, value) -> None:
        while not self._stop.is_set():
            try:
                q.put(value, timeout=0.1)
                return
            except queue.Full:
                continue
        raise _Stopped

    def _get(self, q: queue.Queue):
        while not self._stop.is_set():
            try:
                return q.get(timeout=0.1)
            except queue.Empty:
                continue
        raise _Stopped

    def _count(self, n: int) -> None:
        with self._lock:
            self._ahead += n
            self.stats.max_ahead = max(self.stats.max_ahead, self._ahead)

    def _thread(self, target: Callable[[], None], name: str) -> threading.Thread:
        def body() -> None:
            try:
                target()
            except _Stopped:
                return
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
                self._stop_with(exc)

        thread = threading.Thread(target=body, name=name, daemon=True)
        thread.start()
        return thread

    def _stop_with(self, exc: BaseException) -> None:
        try:
            self._out_q.put(("error", exc), timeout=1)
        except queue.Full:
            pass
        self._stop.set()

    # -- the read threads --------------------------------------------------------------------------------
    def _prepare(self, found: Found) -> _Prepared | Item:
        start = time.perf_counter()
        data = read_data(found, start)
        if isinstance(data, Item):
            return data
        found_probe = probe(data, self.opts.max_pixels)
        if found_probe.reason is not None:
            return _Prepared(found, b"", "", found_probe, {}, time.perf_counter() - start)  # re-read there
        sha = hashlib.sha256(data).hexdigest()
        photo = photometa.read(data, found.mtime, found.caption or sidecar_caption(found))
        return _Prepared(found, data, sha, found_probe, photo, time.perf_counter() - start)

    def _feed(self, pool: ThreadPoolExecutor) -> None:
        """Files to the read threads (a bounded window), then JPEGs in batches to the GPU's queue, the others to
        the CPU's; read failures straight to the consumer."""
        window: deque[tuple[Found, Future]] = deque()
        batch: list[_Prepared] = []
        pixels = 0
        files = iter(self.todo)
        limit = self.opts.threads * 4
        try:
            while True:
                while len(window) < limit and (found := next(files, None)) is not None:
                    if os.path.splitext(found.relpath)[1].lower() in JPEG_EXTENSIONS and not found.error:
                        self._count(1)
                        window.append((found, pool.submit(self._prepare, found)))
                    else:
                        self._to_cpu(found, "not a JPEG by name" if not found.error else "cannot be read")
                if not window:
                    break
                _, future = window.popleft()
                got = future.result()
                if isinstance(got, Item):
                    self.stats.read_failed += 1
                    self.stats.read_seconds += got.seconds
                    self._count(-1)
                    self._put(self._out_q, ("items", [got], [], False))
                    continue
                self.stats.read_seconds += got.seconds
                if got.probe.reason is not None:
                    self._count(-1)
                    self._to_cpu(got.found, got.probe.reason)
                    continue
                size = got.probe.width * got.probe.height
                if batch and (len(batch) >= self.opts.batch_images or pixels + size > self.opts.batch_pixels):
                    self._send_batch(batch)
                    batch, pixels = [], 0
                batch.append(got)
                pixels += size
            if batch:
                self._send_batch(batch)
        finally:
            for _, future in window:
                future.cancel()
            try:
                self._put(self._gpu_q, _END)
            except _Stopped:
                pass

    def _send_batch(self, batch: list[_Prepared]) -> None:
        t0 = time.perf_counter()
        self._put(self._gpu_q, batch)
        self.stats.feeder_wait += time.perf_counter() - t0

    def _to_cpu(self, found: Found, reason: str) -> None:
        with self._lock:  # the feeder and the GPU thread both send files there
            self.stats.to_cpu[reason.split(":")[0]] += 1
            self.stats.cpu_images += 1
        self._cpu_q.put(found)

    # -- the GPU thread ----------------------------------------------------------------------------------
    def _gpu(self, pool: ThreadPoolExecutor) -> None:
        import torch

        decoder = jpegdecoders.build(self.opts.device, self.opts.decoder)
        self.stats.decoder = decoder.name
        cuda = self.opts.device.startswith("cuda")
        # Its own stream: the encoder's kernels (the caller's thread, default stream) are not queued behind
        # the decode's; the batch's stream is synchronised before its crops are handed over. The caller copies
        # them (pipeline.stack_crops) and syncs when it takes the vectors back, before it drops the items: no
        # kernel still reads a crop's memory when the allocator hands it to this stream again.
        stream = torch.cuda.Stream(device=self.opts.device) if cuda else None
        try:
            while True:
                t0 = time.perf_counter()
                batch = self._get(self._gpu_q)
                self.stats.gpu_wait += time.perf_counter() - t0
                if batch is _END:
                    return
                t1 = time.perf_counter()
                with torch.cuda.stream(stream) if stream is not None else nullcontext(), torch.inference_mode():
                    done, rejected = self._decode_batch(decoder, batch)
                    crops = torch.cat([c for _, c, _ in done]) if done else None
                    smalls = [s for _, _, group in done for s in group.cpu().numpy()]  # the phash's copy only
                    done = [p for group, _, _ in done for p in group]
                if stream is not None:
                    stream.synchronize()
                seconds = time.perf_counter() - t1
                self.stats.gpu_seconds += seconds
                self.stats.batches += 1
                for prepared, reason in rejected:
                    self._count(-1)
                    self._to_cpu(prepared.found, reason)
                share = seconds / max(1, len(batch))
                items = [Item(p.found, crops[i], p.sha256, *_shown_size(p.probe), "JPEG", seconds=p.seconds + share,
                              photo=p.photo) for i, p in enumerate(done)]
                self.stats.gpu_images += len(items)
                hashes = [pool.submit(self._hash, small) for small in smalls]
                self._put(self._out_q, ("items", items, hashes, True))
        finally:
            self._cpu_q.put(_END)

    def _decode_batch(self, decoder: jpegdecoders.JpegDecoder, batch: list[_Prepared]) -> tuple[list, list]:
        """([([prepared], crops, smalls)] by group of one size and orientation, [(prepared, reason)]): the whole
        batch in one decoder call; when that fails, file by file, so only the files that fail alone go to the CPU."""
        try:
            images = decoder.decode([p.data for p in batch])
            return self._crop_groups(list(zip(batch, images))), []
        except Exception as exc:  # noqa: BLE001 - which file? each alone says
            log.debug("a batch of %d failed on the GPU (%s): file by file", len(batch), exc)
        decoded, rejected = [], []
        for p in batch:
            try:
                decoded.append((p, decoder.decode([p.data])[0]))
            except Exception as exc:  # noqa: BLE001 - the CPU path decodes it, or says why it cannot
                log.debug("%s: not decoded on the GPU (%s)", p.found.relpath, exc)
                rejected.append((p, "rejected by the GPU decoder"))
        try:
            return self._crop_groups(decoded), rejected
        except Exception as exc:  # noqa: BLE001 - e.g. out of GPU memory: the CPU path still indexes them
            log.warning("cropping %d images on the GPU failed (%s): they go to the CPU decode", len(decoded), exc)
            return [], rejected + [(p, "GPU resize failed") for p, _ in decoded]

    def _crop_groups(self, decoded: list) -> list:
        """Images of one size and orientation cropped together, GROUP_PIXELS at most at once (their float copies
        are 12 bytes a pixel)."""
        import torch

        groups: dict[tuple, list] = {}
        for p, img in decoded:
            groups.setdefault((tuple(img.shape), p.probe.orientation), []).append((p, img))
        out = []
        for (shape, orientation), members in groups.items():
            step = max(1, GROUP_PIXELS // (shape[-1] * shape[-2]))
            for i in range(0, len(members), step):
                part = members[i : i + step]
                crops, smalls = crop_on_device(torch.stack([img for _, img in part]), orientation, self.spec)
                out.append(([p for p, _ in part], crops, smalls))
        return out

    def _hash(self, small: np.ndarray) -> str | None:
        t0 = time.perf_counter()
        try:
            return phash_of(Image.fromarray(small))
        finally:
            with self._lock:
                self.stats.phash_seconds += time.perf_counter() - t0

    # -- the CPU workers ---------------------------------------------------------------------------------
    def _cpu(self) -> None:
        first = self._get(self._cpu_q)
        if first is _END:
            return
        fn = partial(read_item, spec=self.spec, max_pixels=self.opts.max_pixels, fast=self.opts.fast)

        def files() -> Iterator[Found]:
            yield first
            while (found := self._get(self._cpu_q)) is not _END:
                yield found

        if self.workers <= 0:
            results: Iterable[Item] = map(fn, files())
        else:
            results = decode_in_processes(fn, files(), self.workers, lambda found, reason: Item(found, None, reason=reason))
        try:
            for item in results:
                self._put(self._out_q, ("items", [item], [], False))
        finally:
            close = getattr(results, "close", None)
            if close is not None:
                close()  # ends the worker processes now

    # -- the consumer ------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Item]:
        pool = ThreadPoolExecutor(self.opts.threads, thread_name_prefix="gpudecode-read")
        threads = [self._thread(partial(self._feed, pool), "gpudecode-feed"),
                   self._thread(partial(self._gpu, pool), "gpudecode-gpu"),
                   self._thread(self._cpu, "gpudecode-cpu")]
        try:
            while any(t.is_alive() for t in threads) or not self._out_q.empty():
                try:
                    message = self._out_q.get(timeout=0.1)
                except queue.Empty:
                    continue
                if message[0] == "error":
                    raise message[1]
                _, items, hashes, counted = message
                for item, future in zip(items, hashes):
                    item.phash = future.result()
                if counted:
                    self._count(-len(items))
                yield from items
        finally:
            self._stop.set()
            for t in threads:
                t.join(timeout=30)
            pool.shutdown(wait=False, cancel_futures=True)


def ahead_bound(opts: GpuDecodeOptions) -> int:
    """At most this many JPEGs are held (bytes or crops) at once: the read window, the feeder's batch, the GPU's
    queue and the batch it decodes, the consumer's queue and the batch it hands out. The files the CPU workers
    take wait as names (Found) and are read in decode_in_processes' own window."""
    return opts.threads * 4 + opts.batch_images * (1 + opts.queue_batches + 1 + (opts.queue_batches + 2) + 1)


def _shown_size(found_probe: Probe) -> tuple[int, int]:
    """(width, height) as displayed: EXIF orientations 5..8 swap the stored sides (as images.decode reports)."""
    w, h = found_probe.width, found_probe.height
    return (h, w) if found_probe.orientation in (5, 6, 7, 8) else (w, h)


def read_items(todo: list[Found], spec: ImageSpec, workers: int, options: GpuDecodeOptions) -> GpuReader:
    """Items of todo decoded on options.device where nvJPEG takes them, else by `workers` CPU processes (0: in
    a thread of this one); iterate the result, then read its `stats`."""
    return GpuReader(todo, spec, workers, options)
