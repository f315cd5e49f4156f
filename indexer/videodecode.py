"""What a video decode worker process runs (indexer/videos.py, the video pass of `alignsearch index`): a video's
moments, decoded from what pickles (its Found). Apart from indexer.videos, which writes the catalog, so that the
worker imports PyAV, numpy, PIL and the media helpers it decodes with, never SQLAlchemy and the catalog: its
imports were most of the start-up a run with videos paid for its worker (benchmarks/bench_video_worker.py)."""

from __future__ import annotations

import os
from collections.abc import Generator

from alignsearch import safeopen
from alignsearch.media import sources
from alignsearch.media.images import ImageSpec
from alignsearch.media.phash import phash_of
from alignsearch.media.video import Moment, VideoError, VideoInfo, moments
from indexer.scan import Found

# What a video decode worker imports as soon as it starts, before its first video (indexer.workers.StreamWorker):
# this module and PyAV, which alignsearch.media.video imports only when it opens the first video.
WARM = (__name__, "av")
# "cannot read" (indexer.scan.TRANSIENT): tried again by the next run even where the file's size and mtime match the
# listing's, as a replacement's may (a sync keeps the mtime)
CHANGED = "cannot read: the video changed while it was read (read again by the next index run)"


def file_identity(fd: int) -> tuple[int, int, int, int, int]:
    """What tells one version of a file from another without reading it: a file replaced has another inode, one
    rewritten in place another size, mtime or ctime (ctime: set by any write, and by no user's touch)."""
    st = os.fstat(fd)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _open_local(found: Found):
    """The local video's file, opened under its root by safeopen (no symlinked folder on the way, a regular
    file, a FIFO never blocks) as every indexed file is; None for a URL."""
    local = sources.local_file(found.root, found.relpath, found.relpath_raw)
    if local is None:
        return None
    return os.fdopen(safeopen.open_under(*local, follow_last=True), "rb")


def _source(found: Found):
    """What PyAV opens: the local file (safeopen), or a file object for a URL; a tar member is not read."""
    if sources.kind(found.root) == sources.TAR:
        raise VideoError("videos inside tar shards are not read")
    f = _open_local(found)
    if f is not None:
        return f
    fs, inner = sources.filesystem(found.path)
    return fs.open(inner, "rb")


def decode_moments(found: Found, spec: ImageSpec, interval: float,
                   identity: tuple | None = None) -> Generator[Moment, None, VideoInfo]:
    """The video's moments, each with its perceptual hash and without its full-size frame (only the crop crosses
    to the encoder); returns what was learnt of the video. Runs in a decode worker process, or (--workers 0) in a
    thread of this one; opens the file itself (safeopen for a local one) from what pickles: found. identity: the
    file whose content was hashed (file_identity), checked when the file is opened and once it is read, so that
    the moments recorded under a hash are that content's (VideoError otherwise: the caller keeps none of them)."""
    info = VideoInfo()
    source = _source(found)
    try:
        _same_file(source, identity)
        for m in moments(source, spec, info, interval):
            m.phash = phash_of(m.image)
            m.image = None
            yield m
        _same_file(source, identity)
    finally:
        source.close()
    return info


def _same_file(source, identity: tuple | None) -> None:
    if identity is not None and file_identity(source.fileno()) != identity:
        raise VideoError(CHANGED)
