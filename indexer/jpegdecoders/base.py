"""What the GPU decode stage (indexer/gpudecode.py) asks of a JPEG decoder: JPEG bytes in, one (3, H, W) uint8
RGB tensor per file out, on the decoder's device, as stored (no EXIF turn: the stage turns, as the CPU path
does). A batch with any file it cannot decode raises; the stage then tries the files one by one, so only those
that fail alone go to the CPU workers."""

from __future__ import annotations

import io

from PIL import Image


def tiny_jpeg() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(out, "JPEG")
    return out.getvalue()


class JpegDecoder:
    """One implementation per module of this package (nvjpeg, nvimgcodec, pillow); built once per stage, in the
    thread that decodes."""

    name = ""  # what ALIGNSEARCH_GPU_DECODER and GpuDecodeOptions.decoder call it
    label = ""  # how a reason it is unavailable names it

    def __init__(self, device: str):
        self.device = device

    def decode(self, datas: list[bytes]) -> list:
        """(3, H, W) uint8 tensors on self.device, in order; raises when any of `datas` does not decode."""
        raise NotImplementedError

    @classmethod
    def missing(cls, device: str) -> str | None:
        """Why it cannot be built for `device` at all (its library not installed, a device it does not run on)."""
        return None

    @classmethod
    def unavailable(cls, device: str) -> str | None:
        """Why it does not decode a JPEG on `device`, or None when it does (it is tried on a tiny one)."""
        why = cls.missing(device)
        if why is not None:
            return why
        if device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                return "no CUDA device"
        try:
            out = cls(device).decode([tiny_jpeg()])
            if tuple(out[0].shape) != (3, 16, 16):
                return f"{cls.label} gave shape {tuple(out[0].shape)}"
        except Exception as exc:  # noqa: BLE001 - e.g. a torchvision built without nvJPEG
            return f"{cls.label} on {device} failed: {exc}"
        return None
