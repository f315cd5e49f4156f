"""Pillow's decode into torch CPU tensors: the stage's decoder where it runs on the CPU without torchvision (its
logic is tested so in CI, where torchvision cannot be installed beside the CPU torch). A JPEG Pillow refuses
(cut off, broken tables) fails its batch, as nvJPEG's would."""

from __future__ import annotations

import warnings

import numpy as np
from PIL import Image

from alignsearch.media.images import open_image
from indexer.jpegdecoders.base import JpegDecoder


class PillowDecoder(JpegDecoder):
    name = "pillow"
    label = "Pillow"

    def decode(self, datas: list[bytes]) -> list:
        import torch

        out = []
        for data in datas:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the stage's probe bounds pixels
                with open_image(data) as img:
                    if img.format != "JPEG":
                        raise ValueError(f"not a JPEG ({img.format})")
                    # the whole picture as stored (no draft, no turn), copied out writable for torch
                    rgb = np.array(img if img.mode == "RGB" else img.convert("RGB"))
            out.append(torch.from_numpy(rgb).permute(2, 0, 1))
        return out

    @classmethod
    def missing(cls, device: str) -> str | None:
        return None if device == "cpu" else f"Pillow decodes on the CPU, not on {device}"
