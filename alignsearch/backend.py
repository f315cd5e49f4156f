"""Which engine runs the two towers, at which precision: pure decisions, no torch, no onnxruntime.

On CPUs ONNX Runtime runs ALIGN's towers about twice as fast as torch eager at identical results
(cosine 1.000000; benchmarks/RESULTS.md), so it is the default there whenever it is installed. GPUs keep
torch (bf16 autocast), which ORT's CUDA provider was not measured to beat. Precision beyond parity is
opt-in: bf16 (torch autocast, on CPUs with BF16 instructions) and int8 for the text tower (ORT dynamic
quantization), each with its measured drift in RESULTS.md.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from alignsearch.errors import BadInputError

BACKENDS = ("auto", "torch", "onnx")
PRECISIONS = ("auto", "fp32", "bf16", "int8")


@dataclass(frozen=True)
class EncoderOptions:
    """How to run the model: device (auto|cpu|cuda[:N]), backend (auto|torch|onnx) and precision
    (auto|fp32|bf16|int8). auto precision: bf16 on a GPU, fp32 (exact parity) on a CPU."""

    device: str = "auto"
    backend: str = "auto"
    precision: str = "auto"

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise BadInputError(f"unknown backend {self.backend!r}: use {', '.join(BACKENDS)}")
        if self.precision not in PRECISIONS:
            raise BadInputError(f"unknown precision {self.precision!r}: use {', '.join(PRECISIONS)}")


@dataclass(frozen=True)
class Plan:
    """What runs: backend ("torch" or "onnx"), the precision of each tower, and why when it is not what
    was asked for (empty when it is)."""

    backend: str
    text: str
    image: str
    why: str = ""
    image_backend: str = ""  # "" is `backend`; "torch" where it was measured faster for images (auto only)

    @property
    def images_on(self) -> str:
        return self.image_backend or self.backend

    def to_dict(self) -> dict:
        d = {"backend": self.backend, "text_precision": self.text, "image_precision": self.image}
        if self.images_on != self.backend:
            d["image_backend"] = self.images_on
        if self.why:
            d["note"] = self.why
        return d


def faster_for_images(speed: dict, margin: float = 1.05) -> str:
    """"torch" or "onnx" from the rates measured on this machine ({"onnx": images/s, "torch": images/s}):
    ONNX Runtime unless torch is clearly faster (it was 3.7 to 3.2 images/s on one 2-core Xeon, while ORT
    was 2.2x torch on an EPYC)."""
    return "torch" if speed["torch"] > speed["onnx"] * margin else "onnx"


def onnxruntime_installed() -> bool:
    """Importable, not merely present: a broken install counts as missing (torch runs instead)."""
    if importlib.util.find_spec("onnxruntime") is None:
        return False
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def plan(options: EncoderOptions, device_type: str, ort_available: bool) -> Plan:
    """Decide backend and per-tower precision for a device ("cpu" or "cuda").

    int8 applies to the text tower only (queries): images are encoded at fp32 then. bf16 runs on torch
    (ONNX Runtime has no bf16 kernels for x86 CPUs), so it overrides an automatic backend choice."""
    b, p = options.backend, options.precision
    if device_type == "cuda":
        if b == "onnx":
            raise BadInputError("the onnx backend runs on the CPU: use --device cpu, or --backend torch on the GPU")
        if p == "int8":
            raise BadInputError("--precision int8 is for text on the CPU (ONNX Runtime): add --device cpu, or use bf16 "
                                "or fp32 on the GPU")
        prec = "bf16" if p == "auto" else p
        return Plan("torch", prec, prec)
    if p == "bf16":
        if b == "onnx":
            raise BadInputError("--precision bf16 runs on torch (ONNX Runtime has no bf16 CPU kernels): "
                                "use --backend torch or auto")
        return Plan("torch", "bf16", "bf16")
    text = "int8" if p == "int8" else "fp32"
    if b == "torch":
        if p == "int8":
            raise BadInputError("--precision int8 needs the onnx backend (ONNX Runtime's dynamic quantization)")
        return Plan("torch", text, "fp32")
    if not ort_available:
        if b == "onnx" or p == "int8":
            raise BadInputError("onnxruntime is not installed: pip install onnxruntime (or use --backend torch)")
        return Plan("torch", "fp32", "fp32", "onnxruntime is not installed: torch runs the model (slower on CPUs)")
    return Plan("onnx", text, "fp32")


def fallback(why: str) -> Plan:
    """The torch plan used when the ONNX one cannot run (export or parity failed): int8 text falls back
    to fp32, since torch has no int8 path here."""
    return Plan("torch", "fp32", "fp32", why)


def cache_root() -> Path:
    """Where exported towers are kept, shared by every index of the same model: $ALIGNSEARCH_CACHE, else
    $XDG_CACHE_HOME/alignsearch, else ~/.cache/alignsearch."""
    if os.environ.get("ALIGNSEARCH_CACHE"):
        return Path(os.environ["ALIGNSEARCH_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "alignsearch"


def onnx_dir(fingerprint: str, content: str) -> Path:
    """The exported towers of one model, named by its fingerprint and its content digest (every weight and
    the tokenizer: model.content_digest), never by its place."""
    if not (fingerprint.isalnum() and content.isalnum()):
        raise ValueError(f"not a model fingerprint: {fingerprint!r}, {content!r}")
    return cache_root() / "onnx" / f"{fingerprint}-{content[:16]}"
