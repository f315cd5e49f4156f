"""A video as a sequence of moments: a new moment at each scene cut, at least one every `interval` seconds of
unchanged picture, at most one per `min_gap` seconds; each moment one representative frame, cropped for the
encoder exactly as a photo is (alignsearch/media/images.py).

Decoding streams (PyAV, whose wheels carry FFmpeg): frames are examined every SAMPLE_SECONDS only, the others
are decoded (the codec needs them as references) but never converted; frames no other frame refers to are not
decoded at all (FFmpeg's skip_frame=NONREF). Scene cuts are found on a 32x18 thumbnail of each examined frame
against the previous one's: the distance of their joint colour histograms (robust to motion) and of their grey
patterns with brightness and contrast taken out (robust to fades and flashes; a cut between two scenes of the
same colours), the two summed, each over its threshold (cut_score; benchmarks/bench_scene_cuts.py chose the
measures and thresholds). A cut is confirmed by the next examined frame (Cuts): one that differs from the scene
before it only for one sample (a camera flash) is no cut. Only the open moment's frame, and at most one candidate
cut's frame, are held, so memory does not grow with the video's length. This module imports no torch.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import NamedTuple

import numpy as np

from alignsearch.media.images import ImageSpec, crop_uint8

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = frozenset({".mp4", ".mov", ".m4v", ".mkv", ".webm", ".avi"})
DEFAULT_INTERVAL = 10.0  # seconds: a moment at least this often (--video-interval)
MIN_GAP = 1.0  # seconds: at most one moment per second, however often the picture cuts
SAMPLE_SECONDS = 0.25  # frames examined for cuts; a cut is placed at the first examined frame after it
REPRESENTATIVE_AFTER = 0.5  # seconds into a moment: its frame, past a cut's fade (the first frame when shorter)
THUMB = (32, 18)  # width, height of the frames compared
HIST_BINS = 4  # per channel: a joint RGB histogram of 64 bins (576 pixels a thumbnail)
# A cut where hist / HIST_CUT + pattern / PATTERN_CUT > 1. Chosen on bench_scene_cuts' tuning photos, checked on
# its held-out ones: recall 0.46 -> 1.00, precision 0.975 -> 1.00. The rule before (per-channel histograms over 0.45 or
# mean pixel change over 0.25) missed cuts between photos of similar colours and brightness (scikit-image's cat to
# its rocket: 0.19 and 0.240), and its histogram distance could never reach its threshold (it was divided by 3
# twice: at most 1/3).
HIST_CUT = 0.948  # half the L1 distance of the joint histograms, in [0, 1]
PATTERN_CUT = 0.476  # 1 - the correlation of the grey thumbnails, in [0, 2] (pattern_distance)
STD_FLOOR = 4.0  # grey levels: a thumbnail less varied than this is flat, its pattern mostly noise


def is_video(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in VIDEO_EXTENSIONS


class VideoError(Exception):
    """A video that cannot be read at all; its message is the reason recorded for it."""


# A frame over MAX_PIXELS is a decompression bomb, refused from the header. Lower than a photo's limit: a decoder
# holds reference frames and per-thread buffers besides the frame converted (a 353 KB video of 12000x12000
# frames, under the photo limit, took 3.1 GB); 8192x8192 is twice real 8K.
MAX_PIXELS = 8192 * 8192
# Larger frames are decoded with slice threads only: each frame thread holds frames of its own (a 12-frame
# 8192x8192 video took 2.8 GB with 16 frame threads, 1.2 GB with slice threads).
FRAME_THREADS_MAX_PIXELS = 4096 * 2160


def _refuse_bomb(width: int | None, height: int | None) -> None:
    """Refuse a frame size over MAX_PIXELS before its pixels are converted: a video of a few hundred KB whose
    frames claim 16000x16000 took 5 GB and 13 s to read, where a photo that size is refused from its header."""
    if width and height and width * height > MAX_PIXELS:
        raise VideoError(f"video too large: {width}x{height} pixels a frame exceeds the limit of {MAX_PIXELS:,} "
                         "(decompression bomb guard)")


def _video_stream(container):
    """The container's first video stream, set up to decode; refused (VideoError) when there is none, when its
    codec is unknown to FFmpeg (codec_context None: an AttributeError stopped every index run) or when its
    header's frame size is a decompression bomb."""
    if not container.streams.video:
        raise VideoError("not a video: no video stream")
    stream = container.streams.video[0]
    if stream.codec_context is None:
        raise VideoError("cannot decode video: its video stream's codec is unknown")
    width, height = stream.codec_context.width, stream.codec_context.height
    _refuse_bomb(width, height)
    # FFmpeg itself refuses a frame over the limit, before it allocates it: a header of 160x90 then frames of
    # 8400x8400 (an 834 KB file) were decoded by each frame thread before the frames looked at were checked
    # (538 MB on 2 cores, more with more), and the whole video failed; now decoding stops at that frame and
    # the moments before it are kept, as for any video that breaks off.
    stream.codec_context.options = {**stream.codec_context.options, "max_pixels": str(MAX_PIXELS)}
    # FFmpeg's own threads (the GIL is released while it decodes); a size not in the header may be large
    small = bool(width and height) and width * height <= FRAME_THREADS_MAX_PIXELS
    stream.thread_type = "AUTO" if small else "SLICE"
    return stream


def _to_image(frame):
    """A decoded frame as a PIL RGB image, turned as its display matrix says (a phone's portrait video is stored
    sideways: its moments were encoded, and shown on the web page, lying on their side): the pixels of
    frame.to_image(), which holds two more copies of the frame while it converts (decoding an 8192x8192 frame
    peaked at 1.2 GB with it, 0.8 GB without)."""
    from PIL import Image

    img = Image.fromarray(frame.to_ndarray(format="rgb24"))
    turn = {90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180,
            270: Image.Transpose.ROTATE_270}.get(_rotation(frame))  # PIL turns counter-clockwise too
    return img if turn is None else img.transpose(turn)


def _rotation(frame) -> int:
    """The frame's display rotation, counter-clockwise degrees in 0, 90, 180, 270 (0 for any other angle)."""
    degrees = round(float(getattr(frame, "rotation", 0) or 0)) % 360
    return degrees if degrees in (90, 180, 270) else 0


@dataclass
class Moment:
    index: int
    t: float
    t_end: float
    crop: np.ndarray  # (H, W, 3) uint8 for the encoder
    image: object  # the representative frame as a PIL image (for its perceptual hash)
    phash: str | None = None


@dataclass
class VideoInfo:
    width: int | None = None
    height: int | None = None
    format: str | None = None  # the container, as FFmpeg names it (first of its names)
    duration: float | None = None
    truncated: str | None = None  # why decoding stopped early (what came before is kept)
    damaged: str | None = None  # which packets the decoder refused and were passed over (the moments after are kept)
    created: float | None = None  # the container's creation_time (UTC epoch seconds), when it has one
    frames_examined: int = 0


def _signature(frame) -> tuple[np.ndarray, np.ndarray]:
    return signature_of(frame.reformat(width=THUMB[0], height=THUMB[1], format="rgb24").to_ndarray())


def signature_of(thumb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A thumbnail's (THUMB, RGB uint8) joint colour histogram (sums to 1) and its standardised grey pattern."""
    width = 256 // HIST_BINS
    # two grids, the second offset by half a bin (HIST_BINS + 1 bins a channel): a flat frame one grey level across
    # a bin's edge (127 -> 128, a sky, a title card) filled another bin of the one grid and scored a whole cut; the
    # distance is the smaller of the two grids' (cut_score), and the same bin in one of them is no change
    rgb = thumb.reshape(-1, 3).astype(np.int64)
    side = HIST_BINS + 1
    hist = np.concatenate([np.bincount((q[:, 0] * side + q[:, 1]) * side + q[:, 2], minlength=side ** 3)
                           for q in (rgb // width, (rgb + width // 2) // width)])
    grey = thumb.reshape(-1, 3).astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    grey -= grey.mean()
    # over max(std, STD_FLOOR), not std: two flat noisy frames (a night sky) would correlate at random
    return hist / len(rgb), grey / max(float(grey.std()), STD_FLOOR)


def pattern_distance(a: np.ndarray, b: np.ndarray) -> float:
    """1 - the Pearson correlation of two standardised grey patterns (for patterns above the floor)."""
    return 0.5 * float(((a - b) ** 2).mean())


def cut_score(a, b) -> float:
    """Over 1 where signatures a and b (signature_of) are of different scenes."""
    grid = (HIST_BINS + 1) ** 3  # the bins of one grid (signature_of): the nearer of the two grids counts
    change = np.abs(a[0] - b[0])
    hist = 0.5 * min(float(change[:grid].sum()), float(change[grid:].sum()))
    return hist / HIST_CUT + pattern_distance(a[1], b[1]) / PATTERN_CUT


def _is_cut(a, b) -> bool:
    return cut_score(a, b) > 1


class Step(NamedTuple):
    """What Cuts.feed says of an examined frame, in the order moments() acts on it."""
    confirmed: float | None  # the candidate held from the frame before is a cut: a moment starts at its time
    start: bool  # a moment starts at this frame (the video's first frame, or `interval` reached)
    hold: bool  # this frame is a candidate cut that may start a moment: keep its image until the next step
    representative: bool  # this frame is the open moment's picture (REPRESENTATIVE_AFTER into it)


class Cuts:
    """Where a video's moments start, decided from its examined frames fed in time order as (t, signature): pure
    and streaming (moments() and benchmarks/bench_scene_cuts.py both run this). A frame A -> F that scores as a cut
    (is_cut) is only a candidate until the next examined frame G: a cut when G too differs from A, else F was a
    flash (a frame blended towards white; a one-sample glitch) and is passed over, G compared with A. So each cut
    is decided one sample (SAMPLE_SECONDS) late, and only the candidate's frame is held meanwhile. A confirmed cut
    starts a moment at F's time when the open moment is at least `min_gap` old by then; a moment starts anyway
    once the open one is `interval` old, as before. A frame that scores as a cut is never a moment's picture."""

    def __init__(self, *, interval: float = DEFAULT_INTERVAL, min_gap: float = MIN_GAP, is_cut=_is_cut):
        self.interval, self.min_gap, self.is_cut = interval, min_gap, is_cut
        self.start: float | None = None  # the open moment's start
        self.prev = None  # what the next frame is compared with: the last examined frame that was no flash
        self.pending: tuple | None = None  # (t, signature, may start a moment) of the candidate awaiting a frame
        self.rep_final = False

    def feed(self, t: float, sig) -> Step:
        if self.start is None:
            self.start, self.prev = t, sig
            return Step(None, True, False, False)
        confirmed, jump = None, None
        if self.pending is not None:
            pt, psig, may_start = self.pending
            self.pending = None
            if self.is_cut(self.prev, sig):  # the scene before the candidate is gone: it was a cut
                if may_start:
                    confirmed, self.start, self.rep_final = pt, pt, False
                self.prev = psig
            else:
                jump = False  # back to the scene before: the candidate was a flash, this frame no cut
        if jump is None:
            jump = self.is_cut(self.prev, sig)
        start = t - self.start >= self.interval
        if start:
            self.start, self.rep_final = t, False
        if jump:  # compared with the next frame before it counts; self.prev stays the scene before it
            may_start = not start and t - self.start >= self.min_gap
            self.pending = (t, sig, may_start)
            return Step(confirmed, start, may_start, False)
        self.prev = sig
        rep = not start and not self.rep_final and t - self.start >= REPRESENTATIVE_AFTER
        self.rep_final = self.rep_final or rep
        return Step(confirmed, start, False, rep)

    # At the end of the video a candidate still pending is no cut: with no frame after it a flash cannot be told
    # from a cut, and the scene it would start lasts under one sample (SAMPLE_SECONDS): a moment shorter than
    # MIN_GAP that a flash in the last quarter second would make as often. Nothing is called: it is dropped.


def cut_times(frames, *, interval: float = DEFAULT_INTERVAL, min_gap: float = MIN_GAP, is_cut=_is_cut) -> list[float]:
    """The times moments start at (the first frame's included) for examined frames [(t, signature), ...], as
    moments() places them."""
    cuts, out = Cuts(interval=interval, min_gap=min_gap, is_cut=is_cut), []
    for t, sig in frames:
        step = cuts.feed(t, sig)
        if step.confirmed is not None:
            out.append(step.confirmed)
        if step.start:
            out.append(t)
    return out


def moments(source, spec: ImageSpec, info: VideoInfo | None = None, interval: float = DEFAULT_INTERVAL,
            min_gap: float = MIN_GAP) -> Iterator[Moment]:
    """The moments of a video (a path or a binary file object), in time order, each yielded when it ends.
    Raises VideoError when nothing can be read; a video that breaks off part way yields what came before and
    says why in info.truncated. `info` is filled with the video's size, container and duration."""
    import av

    info = info if info is not None else VideoInfo()
    if interval <= 0 or min_gap < 0:
        raise ValueError("the video interval must be positive")
    try:
        container = av.open(source, mode="r", metadata_errors="ignore")
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError) as exc:
        raise VideoError(f"cannot read video: {_reason(exc)}") from None
    with container:
        stream = _video_stream(container)
        info.format = (container.format.name or "").split(",")[0] or None
        # An AVI has no presentation times: FFmpeg gives each packet one from its place in decode order, so with
        # B-frames the frames came out with times 0.1, 0.4, 0.3... (moments a few frames off, forced forward).
        # The decode-order time of the packet a frame comes out with rises in display order, a constant delay
        # behind it: such a video is timed by it, and all its frames are decoded (a skipped one would shift the
        # frames after it by one).
        by_dts = _is_avi(container)
        if not (by_dts and stream.codec_context.has_b_frames):
            stream.codec_context.skip_frame = "NONREF"
        info.width, info.height = stream.codec_context.width or None, stream.codec_context.height or None
        info.created = creation_time(container.metadata)
        rate = float(stream.average_rate) if stream.average_rate else 25.0
        cuts = Cuts(interval=interval, min_gap=min_gap)
        index, start, frame_img, held = 0, None, None, None  # held: the pending candidate cut's frame
        next_sample, last_t = 0.0, None
        last_packet, damage = [0.0], []
        frames = _decode(container, stream, last_packet, by_dts, damage)
        first_dts = None
        while True:
            try:
                frame = next(frames, None)
            except (av.error.FFmpegError, ValueError) as exc:
                if start is None:
                    raise VideoError(f"cannot decode video: {_reason(exc)}") from None
                info.truncated = f"decoding stopped at {last_t:.1f} s: {_reason(exc)}"
                log.info("%s", info.truncated)
                break
            if frame is None:
                break
            if by_dts and first_dts is None:
                first_dts = frame.dts
            t = _frame_time(frame, stream, first_dts if by_dts else None, last_t, rate)
            if last_t is not None and t < last_t:  # out-of-order timestamps: keep time moving forward
                t = last_t
            last_t = t
            if t < next_sample and start is not None:
                continue  # decoded (a reference for later frames), never converted
            next_sample = (math.floor(t / SAMPLE_SECONDS) + 1) * SAMPLE_SECONDS
            _refuse_bomb(frame.width, frame.height)  # a header without a size, or a size that changes mid-way
            info.frames_examined += 1
            step = cuts.feed(t, _signature(frame))
            if step.confirmed is not None:  # the frame held one sample ago starts a moment
                yield _moment(index, start, step.confirmed, frame_img, spec)
                index, start, frame_img = index + 1, step.confirmed, held
            held = None
            if step.start and start is None:
                start, frame_img = t, _to_image(frame)
                info.width, info.height = frame_img.size  # as displayed, as a photo's (after its rotation)
            elif step.start:
                yield _moment(index, start, t, frame_img, spec)
                index, start, frame_img = index + 1, t, _to_image(frame)
            elif step.representative:
                frame_img = _to_image(frame)
            if step.hold:
                held = _to_image(frame)
        # a candidate cut still held here is dropped (Cuts: no frame after it tells a flash from a cut)
        if start is None:
            raise VideoError(f"cannot decode video: {damage[-1][1] if damage else 'no frame could be decoded'}")
        if damage:
            info.damaged = (f"{len(damage)} damaged packet{'s' if len(damage) > 1 else ''} passed over "
                            f"(from {damage[0][0]:.1f} s to {damage[-1][0]:.1f} s): {damage[-1][1]}")
            log.info("%s", info.damaged)
        # The last packets may be frames never decoded (NONREF); they count, the header's duration does not: an
        # AVI of 2 s whose header claimed 10 hours had its last moment end at 10:00:00. Nor does a packet's own
        # duration (one claiming 12,000 s was met): a frame's length past the last frame or packet.
        end = max(max(last_t, 0.0 if info.truncated else last_packet[0]) + 1 / rate, start)
        info.duration = end
        yield _moment(index, start, end, frame_img, spec)


def _frame_time(frame, stream, origin, last_t: float | None, rate: float) -> float:
    """A decoded frame's time in seconds (never negative): its pts, or for an AVI (origin: the dts its first
    frame came out with) its dts since origin; a frame without either is a frame after the one before."""
    if origin is not None:
        t = None if frame.dts is None else float((frame.dts - origin) * stream.time_base)
    else:
        t = frame.time
    if t is None:
        t = (last_t + 1 / rate) if last_t is not None else 0.0
    return max(float(t), 0.0)


def _is_avi(container) -> bool:
    return (container.format.name or "").split(",")[0] == "avi"


def _decode(container, stream, last_packet: list, by_dts: bool = False, damage: list | None = None) -> Iterator:
    """container.decode(stream), noting in last_packet[0] the latest time (seconds) of a packet read, frames
    skipped undecoded (NONREF) included; by_dts (an AVI): its decode-order time since the first packet's.
    A packet the decoder refuses as invalid data is passed over, noted in damage as (its time, the reason): a
    stretch of damaged bytes mid-video (a bad sector, a hole a broken download left) stopped the whole decode
    there, and every moment after it was lost as if the file ended (the decoder takes the next packets, FFmpeg
    concealing what referred to the lost ones). A container that cannot be read on still stops it (demux)."""
    import av

    first = None
    for packet in container.demux(stream):
        stamp = packet.dts if by_dts else packet.pts
        if stamp is not None and packet.time_base is not None:
            first = stamp if by_dts and first is None else first
            last_packet[0] = max(last_packet[0], float((stamp - (first or 0)) * packet.time_base))
        try:
            decoded = packet.decode()
        except av.error.InvalidDataError as exc:
            if damage is None:
                raise
            damage.append((last_packet[0], _reason(exc)))
            continue
        yield from decoded


def _moment(index: int, t: float, t_end: float, image, spec: ImageSpec) -> Moment:
    return Moment(index, round(t, 3), round(t_end, 3), crop_uint8(image, spec), image)


def _reason(exc: Exception) -> str:
    text = getattr(exc, "strerror", None) or str(exc)
    return " ".join(str(text).split()) or type(exc).__name__


def timestamp(seconds: float | None) -> str:
    """1:23:45 (hours, minutes, seconds; 0:42 under an hour) for a moment's start; "" for none. A negative
    time keeps its sign (-0:05; floor division printed -5 s as "-1:59:55"), and a time that is not finite is
    "" (int() raised on it): neither comes from a video here, but a server's answer is printed with this too."""
    if seconds is None or not math.isfinite(seconds):
        return ""
    if seconds < 0:
        return "-" + timestamp(-seconds)
    s = int(seconds)
    h, m, s = s // 3600, s // 60 % 60, s % 60
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def creation_time(metadata) -> float | None:
    """A container's creation_time tag (ISO 8601) as UTC epoch seconds, else None."""
    text = (metadata or {}).get("creation_time")
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(str(text).replace("Z", "+00:00"))
        seconds = (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()
        datetime.fromtimestamp(seconds, timezone.utc)  # a date at the calendar's edge moved past it by its offset
    except (ValueError, OverflowError):  # (9999-12-31T23:59:59-23:59): every search showing the video failed
        return None
    return seconds


# What a video is served as (`serve`'s /api/video) is read from its container's own signature, never from its name:
# by the extension, a JPEG named .mp4 (FFmpeg reads it as a video of one frame, so it is indexed as one) went out
# as video/mp4, a Matroska file named .mp4 as MP4. The catalog's format column is the extension for a video (the
# name `--format mp4` filters on), so it cannot say. These are the signatures of the containers the indexer reads
# (VIDEO_EXTENSIONS); general sniffers (filetype, puremagic: not dependencies) would add a package for these five.
SNIFF_BYTES = 64  # the EBML header's DocType lies within its first few dozen bytes; ftyp and RIFF within 12
QUICKTIME_ATOMS = (b"moov", b"mdat", b"wide", b"free", b"skip", b"pnot")  # a QuickTime file older than ftyp
# ftyp brands of still images (and image sequences) in the same box format: HEIF/HEIC, AVIF, Canon's CR3 raw. FFmpeg's
# mov demuxer may read one as a video of one frame, as it reads a JPEG; no browser plays one in a <video>.
IMAGE_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs", b"mif1", b"mif2",
                          b"msf1", b"avif", b"avis", b"crx "})


def container_type(head: bytes, past: bytes | None = None) -> str | None:
    """The media type of a video container from its first bytes (SNIFF_BYTES), None when they are no MP4,
    QuickTime, WebM, Matroska or AVI container. ISO/IEC 14496-12 `ftyp` box: brand `qt  ` is QuickTime, an image's
    (IMAGE_BRANDS: HEIC, AVIF...) none, any other (isom, mp41, mp42, avc1, M4V...) MP4; EBML (RFC 8794) with DocType `webm` or `matroska` (RFC 9559);
    RIFF with form type `AVI `. past: the bytes after the leading padding and uuid boxes where the caller read them
    (sniff), else they are looked for within head."""
    # an MP4 (or HEIC) whose ftyp follows a free box: its brand decides, as FFmpeg reads it
    typed = _past_padding(head) if past is None else past
    if typed[4:8] == b"ftyp":
        if typed[8:12] in IMAGE_BRANDS or len(typed) < 12:
            return None
        return "video/quicktime" if typed[8:12] == b"qt  " else "video/mp4"
    # no ftyp: QuickTime older than it, by its first box, or by the box after a leading uuid (no brand says MP4)
    if head[4:8] in QUICKTIME_ATOMS or typed[4:8] in QUICKTIME_ATOMS:
        return "video/quicktime"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "video/x-msvideo"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return {b"webm": "video/webm", b"matroska": "video/x-matroska"}.get(_ebml_doctype(head))
    return None


# Boxes that say nothing of the file's type, stepped over to the box after them: padding, which holds nothing, and
# `uuid`, a vendor's extension (ISO/IEC 14496-12 4.2), whose contents no reader is bound to know. FFmpeg's mov
# probe steps over `skip` and `uuid` the same way (by their size) and judges the tag after them; a file that opens
# with a uuid box was refused (404) though FFmpeg and Chromium play it.
PADDING_ATOMS = (b"free", b"skip", b"wide", b"uuid")


def _past_padding(head: bytes) -> bytes:
    """head from its first box that is neither padding nor uuid (PADDING_ATOMS), each stepped over by its 32-bit
    size; head as given where such a box's size is 0 or 1 (to the end, or a 64-bit size) or the box after it lies
    past head. A leading `free` box made an isom MP4 (FFmpeg plays it, Firefox refuses video/quicktime) QuickTime,
    and an image's ftyp (HEIC) behind one a video."""
    at = 0
    while head[at + 4:at + 8] in PADDING_ATOMS:
        size = int.from_bytes(head[at:at + 4], "big")
        if size < 8 or at + size + 8 > len(head):
            return head
        at += size
    return head[at:]


LEADING_BOXES = 16  # padding and uuid boxes stepped over before a file's type is judged; FFmpeg's probe has no limit


def sniff(fd: int) -> str | None:
    """container_type of an open file, its leading padding and uuid boxes stepped over by their sizes (a 64-bit
    one too) wherever they end: the first SNIFF_BYTES reach only 56 bytes past a box's header, and a vendor's uuid
    box (XMP metadata, a camera's own) is often larger, so a video opening with one was refused (404) though
    FFmpeg plays it. A box that claims to run past the file's end leaves nothing after it to judge."""
    head = os.pread(fd, SNIFF_BYTES, 0)
    at, end = 0, os.fstat(fd).st_size
    for _ in range(LEADING_BOXES):
        box = os.pread(fd, 16, at)
        if len(box) < 8 or box[4:8] not in PADDING_ATOMS:
            break
        size = int.from_bytes(box[:4], "big")
        if size == 1 and len(box) == 16:  # ISO/IEC 14496-12 4.2: the size is the 64-bit largesize after the type
            size = int.from_bytes(box[8:16], "big")
        if size < 8:  # 0: the box runs to the file's end; else no box
            break
        # no further than the end: a 64-bit size of 2^63 or more put the next pread past what an offset holds
        # (OverflowError, a 500); read at the end, nothing is left to judge
        at = min(at + size, end)
    return container_type(head, os.pread(fd, SNIFF_BYTES, at) if at else None)


def _ebml_doctype(head: bytes) -> bytes | None:
    """The DocType (element 0x4282) of an EBML header, from the bytes given; None when they do not hold it."""
    at = head.find(b"\x42\x82", 4)
    if at < 0 or at + 2 >= len(head):
        return None
    first = head[at + 2]
    width = 8 - first.bit_length() + 1 if first else 9  # an EBML variable-size integer: its leading zeros + 1
    if width > 8 or at + 2 + width > len(head):
        return None
    size = int.from_bytes(head[at + 2:at + 2 + width], "big") & ((1 << (7 * width)) - 1)
    value = head[at + 2 + width:at + 2 + width + size]
    return value.rstrip(b"\0") if len(value) == size else None


# A moment's picture for the web page (frame_at) decodes from the keyframe before it: in a screen recording with
# one keyframe, a moment at 9:59 decoded ten minutes of frames (a 20 s 720p clip of noise took 1.6 s: ~50 s for
# ten minutes on 2 cores; flat content far less). Up to RUNUP_FULL seconds before the moment, frames no other
# refers to are skipped (NONREF: about half of H.264's with B-frames); after THUMB_RUNUP_SECONDS of decoding the
# frame reached is shown, marked as such (image.info["reached"]: its time), so that the server does not keep it.
# A budget in time, not in pixels: 2238 flat 720p frames decode in 0.8 s, where a cap of 800 M pixels (870 such
# frames) showed a frame 54 s early; 90 s of 720p noise took 9.5 s, now 2.0 s (benchmarks/RESULTS.md,
# bench_video_thumb).
THUMB_RUNUP_SECONDS = 2.0
RUNUP_FULL = 1.0


def frame_at(source, t: float, t_end: float | None = None):
    """The picture of a moment that starts at t (as its representative: REPRESENTATIVE_AFTER in, or halfway
    through a shorter moment), as a PIL image: a seek to the keyframe before it, then decoding up to it; where
    that takes over THUMB_RUNUP_SECONDS, the frame reached then (an earlier one, its time in info["reached"])."""
    import av

    want = t + min(REPRESENTATIVE_AFTER, max(0.0, ((t_end or t) - t) / 2))
    deadline = time.monotonic() + THUMB_RUNUP_SECONDS
    try:
        with av.open(source, mode="r", metadata_errors="ignore") as container:
            stream = _video_stream(container)
            rate = float(stream.average_rate) if stream.average_rate else 25.0
            # an AVI is timed as moments() timed it: by dts, from the dts its first frame comes out with
            origin = next((f.dts for f in container.decode(stream)), None) if _is_avi(container) else None
            if (want > 0 or origin is not None) and stream.time_base:
                container.seek(int(want / stream.time_base), stream=stream, backward=True)
            stream.codec_context.skip_frame = "NONREF"
            last, last_t, reached = None, None, False
            # damaged packets passed over as moments() passes them: a moment after a damaged stretch had no picture
            for frame in _decode(container, stream, [0.0], damage=[]):
                last, last_t = frame, _frame_time(frame, stream, origin, last_t, rate)
                if last_t + 1e-6 >= want:
                    break
                if last_t >= want - RUNUP_FULL:
                    stream.codec_context.skip_frame = "DEFAULT"
                if time.monotonic() > deadline:
                    log.info("the frame at %.1f s is far from a keyframe: the one at %.1f s shown", want, last_t)
                    reached = True
                    break
            if last is None:
                raise VideoError("cannot decode video: no frame at that time")
            _refuse_bomb(last.width, last.height)
            image = _to_image(last)
            if reached:
                image.info["reached"] = last_t
            return image
    except (av.error.FFmpegError, ValueError) as exc:
        raise VideoError(f"cannot read video: {_reason(exc)}") from None


def byte_range(header: str | None, total: int) -> tuple[int, int] | None:
    """(start, length) of an HTTP Range header's first range ("bytes=a-b", "bytes=a-", "bytes=-n") over a file
    of `total` bytes; None when there is none, or it is no byte range as RFC 9110 writes one (another unit,
    digits HTTP does not have such as "1_0" or "+5", a last position before the first): the whole file, as the
    RFC has a server ignore it, never a slice read by rules a cache on the way does not share. Raises
    ValueError when a valid range cannot be satisfied."""
    if not header:
        return None
    unit, _, spec = header.partition("=")
    found = _BYTE_RANGE.fullmatch(spec.split(",")[0].strip())
    if unit.strip().lower() != "bytes" or found is None or not (found[1] or found[2]):
        return None
    first, last = found[1], found[2]
    if not first:  # the last n bytes
        n = _position(last)
        if n <= 0:
            raise ValueError("an empty range")
        return max(0, total - n), min(n, total)
    start = _position(first)
    if last and _position(last) < start:
        return None
    end = min(_position(last), total - 1) if last else total - 1
    if start >= total:
        raise ValueError(f"range {header} is outside the file's {total} bytes")
    return start, end - start + 1


_BYTE_RANGE = re.compile(r"([0-9]*)-([0-9]*)")  # RFC 9110 14.1.2: 1*DIGIT "-" [ 1*DIGIT ] / "-" 1*DIGIT


def _position(digits: str) -> int:
    """A range's number; any of 19 digits or more stands for a place past every file (int() would read up to
    4300 digits, then refuse)."""
    return int(digits) if len(digits) < 19 else 1 << 63
