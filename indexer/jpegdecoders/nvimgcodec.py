"""NVIDIA's nvImageCodec (`pip install nvidia-nvimgcodec-cu13 nvidia-nvjpeg`, or -cu12 with nvidia-nvjpeg-cu12:
the one for the installed torch's CUDA): nvJPEG's batched decode with its hardware JPEG engine where the GPU has
one, chosen with ALIGNSEARCH_GPU_DECODER=nvimgcodec (README: GPU JPEG decode). Only its GPU backends are allowed:
a JPEG they refuse goes to the stage's CPU workers (Pillow, the reference), not to nvImageCodec's own CPU codec.
Its images reach torch through DLPack, without a copy, ordered on the stage's CUDA stream."""

from __future__ import annotations

import logging

from indexer.jpegdecoders.base import JpegDecoder

log = logging.getLogger(__name__)


def load():
    """nvidia.nvimgcodec, or None where it is not installed or cannot load (no libnvjpeg, another CUDA)."""
    try:
        from nvidia import nvimgcodec
    except Exception as exc:  # noqa: BLE001 - not installed is the usual case: another decoder runs
        log.debug("nvImageCodec not usable: %s", exc)
        return None
    return nvimgcodec


OPTIONS = ":fancy_upsampling=1"  # chroma upsampled as libjpeg does by default (Pillow, the CPU path's reference)


def decode_params(nvimgcodec) -> dict:
    """As stored (the stage turns by EXIF, as the CPU path does), RGB interleaved at 8 bits (a grey JPEG too).
    The sRGB colour spec is ColorSpec.SRGB in the 0.9 wheels, ColorSpec.RGB in older ones, which lack sample_format."""
    spec = nvimgcodec.ColorSpec
    params = {"apply_exif_orientation": False, "color_spec": spec.SRGB if hasattr(spec, "SRGB") else spec.RGB,
              "allow_any_depth": False}
    if hasattr(nvimgcodec, "SampleFormat"):
        params["sample_format"] = nvimgcodec.SampleFormat.I_RGB
    return params


class NvImageCodecDecoder(JpegDecoder):
    name = "nvimgcodec"
    label = "nvImageCodec"

    def __init__(self, device: str):
        import torch

        super().__init__(device)
        nvimgcodec = load()
        where = torch.device(device)
        self.index = where.index if where.index is not None else torch.cuda.current_device()
        kinds = nvimgcodec.BackendKind  # the hardware JPEG engine first, then nvJPEG's CUDA and hybrid decoders
        backends = [nvimgcodec.Backend(kind) for kind in (kinds.HW_GPU_ONLY, kinds.GPU_ONLY, kinds.HYBRID_CPU_GPU)]
        self.decoder = nvimgcodec.Decoder(device_id=self.index, backends=backends, options=OPTIONS)
        self.params = nvimgcodec.DecodeParams(**decode_params(nvimgcodec))
        self.codestream = nvimgcodec.CodeStream

    def decode(self, datas: list[bytes]) -> list:
        import torch

        stream = torch.cuda.current_stream(self.index)  # the stage's: its kernels then follow the decode
        images = self.decoder.decode([self.codestream(d) for d in datas], params=self.params,
                                     cuda_stream=stream.cuda_stream)
        failed = [i for i, img in enumerate(images) if img is None]
        if failed:  # nvImageCodec returns None where a file failed; the stage's contract is to raise
            raise RuntimeError(f"nvImageCodec could not decode {len(failed)} of {len(datas)} files")
        out = []
        for img in images:
            hwc = torch.from_dlpack(img)  # (H, W, 3) uint8 on the device, sharing nvImageCodec's buffer
            if hwc.dim() != 3 or hwc.shape[-1] != 3 or hwc.dtype != torch.uint8:
                raise RuntimeError(f"nvImageCodec gave {tuple(hwc.shape)} {hwc.dtype}, not (H, W, 3) uint8")
            out.append(hwc.permute(2, 0, 1))
        return out

    @classmethod
    def missing(cls, device: str) -> str | None:
        if not device.startswith("cuda"):
            return f"nvImageCodec decodes on a CUDA device, not on {device}"
        if load() is None:
            return "nvImageCodec is not installed (pip install nvidia-nvimgcodec-cu13 nvidia-nvjpeg, or -cu12)"
        return None
