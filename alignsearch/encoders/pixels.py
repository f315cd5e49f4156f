"""Crops to the vision tower's input: the image processor's arithmetic, in torch (the torch tower runs it, and the
exported vision tower runs it inside its graph)."""

from __future__ import annotations

import numpy as np
import torch

from alignsearch.media.images import ImageSpec


def scale_pixels(x: torch.Tensor, spec: ImageSpec) -> torch.Tensor:
    """uint8 (N, H, W, 3) to the float (N, 3, H, W) the vision tower takes: the processor's arithmetic.
    The exported ONNX vision tower runs this same function inside its graph."""
    x = x.permute(0, 3, 1, 2).float() * spec.rescale_factor
    if spec.rescale_offset:
        x = x - 1.0
    if spec.mean is not None:
        x = (x - torch.tensor(spec.mean, device=x.device).view(1, 3, 1, 1)) / torch.tensor(spec.std, device=x.device).view(1, 3, 1, 1)
    if spec.include_top_std is not None:
        x = x / torch.tensor(spec.include_top_std, device=x.device).view(1, 3, 1, 1)
    return x


def to_pixel_values(crops: np.ndarray, spec: ImageSpec, device: torch.device) -> torch.Tensor:
    """uint8 (N, H, W, 3) crops to the float tensor the vision tower takes, scaled on the device. A tensor (the
    indexer's GPU decode) is used where it lies when that is the device."""
    if isinstance(crops, torch.Tensor):
        return scale_pixels(crops.to(device), spec)
    x = torch.from_numpy(np.ascontiguousarray(crops))
    if device.type == "cuda":
        x = x.pin_memory().to(device, non_blocking=True)
    return scale_pixels(x, spec)
