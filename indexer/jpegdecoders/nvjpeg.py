"""nvJPEG through torchvision's decode_jpeg: the stage's decoder on CUDA unless another is asked for. One call
decodes the whole batch (torchvision's batched nvJPEG); on the CPU the same call runs libjpeg-turbo."""

from __future__ import annotations

import logging
import warnings

from indexer.jpegdecoders.base import JpegDecoder

log = logging.getLogger(__name__)


def load():
    """torchvision.io, or None where it is not installed or cannot load (a build for another torch)."""
    try:
        import torchvision.io
    except Exception as exc:  # noqa: BLE001 - a broken install is no install: the CPU path runs
        log.debug("torchvision not usable: %s", exc)
        return None
    return torchvision.io


def as_tensor(data: bytes):
    import torch

    with warnings.catch_warnings():  # read only: decode_jpeg never writes to its input
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(data, dtype=torch.uint8)


class TorchvisionDecoder(JpegDecoder):
    name = "torchvision"
    label = "decode_jpeg"

    def __init__(self, device: str):
        super().__init__(device)
        self.tvio = load()

    def decode(self, datas: list[bytes]) -> list:
        return self.tvio.decode_jpeg([as_tensor(d) for d in datas], device=self.device,
                                     mode=self.tvio.ImageReadMode.RGB)

    @classmethod
    def missing(cls, device: str) -> str | None:
        return "torchvision is not installed (pip install 'alignsearch[gpu]')" if load() is None else None
