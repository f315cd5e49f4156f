"""The GPU decode stage's JPEG decoders (the interface is indexer/jpegdecoders/base.py): which one a run uses, and
whether it works on a device. torchvision's nvJPEG on CUDA unless ALIGNSEARCH_GPU_DECODER (or
GpuDecodeOptions.decoder) names another; on the CPU (the stage's logic run there, in tests) torchvision where it
loads, else Pillow. Nothing here imports torch or a decoder's library until the stage runs."""

from __future__ import annotations

import os
from functools import lru_cache

from indexer.jpegdecoders.base import JpegDecoder
from indexer.jpegdecoders.nvimgcodec import NvImageCodecDecoder
from indexer.jpegdecoders.nvjpeg import TorchvisionDecoder
from indexer.jpegdecoders.pillow import PillowDecoder

__all__ = ["DECODERS", "ENV", "JpegDecoder", "build", "chosen", "forget", "pick", "requested", "unavailable"]

ENV = "ALIGNSEARCH_GPU_DECODER"
DECODERS: dict[str, type[JpegDecoder]] = {cls.name: cls for cls in (TorchvisionDecoder, NvImageCodecDecoder,
                                                                       PillowDecoder)}


def requested(option: str | None) -> str | None:
    """The decoder asked for: the option, else the environment; None (or "auto") is the default."""
    name = (option or os.environ.get(ENV, "")).strip().lower()
    return None if name in ("", "auto") else name


def pick(asked: str | None, device: str, torchvision_works: bool) -> str:
    """The decoder's name: the one asked for, else torchvision (nvJPEG) on CUDA, and on the CPU torchvision where
    it works there, else Pillow."""
    if asked is not None:
        return asked
    if device.startswith("cuda") or torchvision_works:
        return TorchvisionDecoder.name
    return PillowDecoder.name


def chosen(device: str, option: str | None = None) -> str:
    """The name of the decoder a run on `device` uses (pick's rule, the option or the environment asked)."""
    asked = requested(option)
    cpu = asked is None and not device.startswith("cuda")
    return pick(asked, device, cpu and _unavailable(TorchvisionDecoder.name, device) is None)


@lru_cache(maxsize=None)
def _unavailable(name: str, device: str) -> str | None:
    if name not in DECODERS:
        return f"no JPEG decoder is named {name!r} ({ENV}: {', '.join(DECODERS)})"
    return DECODERS[name].unavailable(device)


def unavailable(device: str, option: str | None = None) -> str | None:
    """Why the decoder this run would use does not decode a JPEG on `device`, or None when it does."""
    return _unavailable(chosen(device, option), device)


def build(device: str, option: str | None = None) -> JpegDecoder:
    """The decoder this run uses, for the thread that decodes."""
    name = chosen(device, option)
    if name not in DECODERS:
        raise ValueError(_unavailable(name, device))
    return DECODERS[name](device)


def forget() -> None:
    """Try the decoders again at the next question (they are tried once per process otherwise)."""
    _unavailable.cache_clear()
