"""Which engine runs the two towers, at which precision: pure decisions, no torch, no onnxruntime.

On CPUs the towers run from their ONNX exports: the text tower on ONNX Runtime (25 ms a query, 9 ms at int8,
and a cold query needs neither torch nor transformers), the vision tower on whichever of ONNX Runtime,
OpenVINO and torch was measured fastest on this CPU (OpenVINO 7.3 images/s against torch's 3.7 and ORT's 2.9
on a 2-core Xeon; ORT 2.2x torch on an EPYC: benchmarks/RESULTS.md), all at identical results (cosine
>= 0.9999 to torch fp32, checked on probes). GPUs keep torch (bf16 autocast), which ORT's CUDA provider was
not measured to beat. Precision beyond parity is opt-in: bf16 (OpenVINO where the CPU has BF16, else torch
autocast) and int8 for the text tower (ORT dynamic quantization), each with its measured drift in RESULTS.md.
A backend, precision and device that cannot go together are bad usage (UsageError, exit 2), as an unknown name
is to click; what this machine lacks (an engine not installed, no BF16 on its CPU, no GPU) stays BadInputError (6).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from alignsearch import atomic
from alignsearch.errors import BadInputError, UsageError
from alignsearch.storage.paths import cache_root, untrusted

log = logging.getLogger(__name__)

# OpenVINO's Python package sends usage analytics when it is imported: it writes ~/intel/openvino_ga_cid and
# forks a sender process (openvino/tools/ovc/__init__.py through openvino_telemetry, which counts a missing
# opt-in file as consent). A tool that works offline must not phone home: with `openvino_telemetry`
# unimportable (None in sys.modules makes `import` raise ImportError), OpenVINO takes its own no-op stub. Set
# here, before any import of openvino: every import of it in alignsearch comes after this module's.
sys.modules.setdefault("openvino_telemetry", None)

BACKENDS = ("auto", "torch", "onnx", "openvino")
# Images per forward pass on CPUs: EfficientNet-B7 runs ~2x faster per image in batches of 2-4 than of 32
# (activations stay in cache; benchmarks/RESULTS.md), on every engine.
CPU_MICRO_BATCH = 4
ENGINES = ("onnx", "openvino")  # what runs an exported tower: ONNX Runtime, OpenVINO
PRECISIONS = ("auto", "fp32", "bf16", "int8")


@dataclass(frozen=True)
class EncoderOptions:
    """How to run the model: device (auto|cpu|cuda[:N]), backend (auto|torch|onnx|openvino) and precision
    (auto|fp32|bf16|int8). auto precision: bf16 on a GPU, fp32 (exact parity) on a CPU."""

    device: str = "auto"
    backend: str = "auto"
    precision: str = "auto"

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise UsageError(f"unknown backend {self.backend!r}: use {', '.join(BACKENDS)}")
        if self.precision not in PRECISIONS:
            raise UsageError(f"unknown precision {self.precision!r}: use {', '.join(PRECISIONS)}")


def encoder_options(*, device: str = "auto", backend: str = "auto", precision: str = "auto",
                    text_bf16: bool = False) -> EncoderOptions:
    """The options from the API's keywords: text_bf16 is the older spelling of precision="bf16" (query
    encoders), and gives way to an explicit precision."""
    return EncoderOptions(device=device, backend=backend, precision="bf16" if text_bf16 and precision == "auto"
                          else precision)


def torch_free_text(options: EncoderOptions, model: str | None) -> bool:
    """May text queries run from the index's cached text tower with neither torch nor transformers loaded?
    Not with a --model (the checkpoint loads to be checked against the index's), a GPU or torch asked for;
    where they may, the plan decides (resolve.text_plan). Pure and cheap: the CLI asks before any import."""
    return model is None and options.device in ("auto", "cpu") and options.backend != "torch"


@dataclass(frozen=True)
class Plan:
    """What runs: backend ("torch", "onnx" or "openvino": the text tower's engine, and the image tower's
    unless image_backend says otherwise), the precision of each tower, and why when it is not what was asked
    for (empty when it is)."""

    backend: str
    text: str
    image: str | None  # None: no image tower (a text-only encoder, cached.CachedText)
    why: str = ""
    image_backend: str = ""  # "" is `backend`; another engine where it was measured faster for images (auto only)

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
    """The engine for the vision tower from the rates measured on this machine ({"onnx": images/s,
    "openvino": images/s, "torch": images/s}, openvino only where installed): the fastest, where torch must
    be clearly faster (it needs its own memory for the weights; ties go to the ONNX engines)."""
    exported = {k: v for k, v in speed.items() if k != "torch"}
    best = max(exported, key=lambda k: (exported[k], k == "onnx"))
    return "torch" if speed.get("torch", 0.0) > exported[best] * margin else best


ENGINE_NAMES = {"onnx": "ONNX Runtime", "openvino": "OpenVINO", "torch": "torch"}


def choose_images(p: Plan, speed: dict) -> Plan:
    """`p` with the vision tower on the engine measured fastest here (speed: images/s per engine), and the
    measurement in its note when that is not the plan's own engine."""
    engine = faster_for_images(speed)
    if engine == p.images_on:
        return p
    others = ", ".join(f"{ENGINE_NAMES[e]} {speed[e]:.2f}" for e in speed if e != engine)
    return replace(p, image_backend=engine, why=(f"{ENGINE_NAMES[engine]} runs the vision tower: measured fastest "
                                                 f"here ({speed[engine]:.2f} images/s; {others})"))


def installed_engines() -> tuple[str, ...]:
    """The engines --backend auto measures for the vision tower: the exported ones installed, then torch."""
    return tuple(e for e, ok in (("onnx", onnxruntime_installed()), ("openvino", openvino_installed())) if ok) + ("torch",)


def _installed(name: str) -> bool:
    """Importable, not merely present: a broken install counts as missing (another engine runs instead)."""
    if importlib.util.find_spec(name) is None:
        return False
    try:
        importlib.import_module(name)
    except Exception:  # noqa: BLE001 - ImportError, or a broken install raising anything at import
        return False
    return True


def onnxruntime_installed() -> bool:
    return _installed("onnxruntime")


def openvino_installed() -> bool:
    return _installed("openvino")


def openvino_bf16() -> bool:
    """Does OpenVINO run bf16 on this CPU (AVX512-BF16 or AMX)? Elsewhere it would quietly compute in f32."""
    try:
        import openvino as ov

        return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except Exception:  # noqa: BLE001 - no usable OpenVINO is no bf16 from it
        return False


def plan(options: EncoderOptions, device_type: str, ort_available: bool, ov_available: bool = False,
         ov_bf16: bool = False) -> Plan:
    """Decide backend and per-tower precision for a device ("cpu" or "cuda"), given which CPU engines are
    installed (ov_bf16: OpenVINO runs bf16 on this CPU).

    int8 applies to the text tower only (queries), on ONNX Runtime: images are encoded at fp32 then. bf16 runs
    on OpenVINO where it can (2x its own fp32 on an AMX Xeon), else on torch autocast; ONNX Runtime has no bf16
    kernels for x86 CPUs. Under auto the vision tower's engine is chosen later, by measuring (Encoder)."""
    b, p = options.backend, options.precision
    if device_type == "cuda":
        if b in ("onnx", "openvino"):
            raise UsageError(f"the {b} backend runs on the CPU: use --device cpu, or --backend torch on the GPU")
        if p == "int8":
            raise UsageError("--precision int8 is for text on the CPU (ONNX Runtime): add --device cpu, or use bf16 "
                                "or fp32 on the GPU")
        prec = "bf16" if p == "auto" else p
        return Plan("torch", prec, prec)
    if b == "openvino" and not ov_available:
        raise BadInputError("openvino is not installed: pip install openvino (or use --backend auto)")
    if p == "bf16":
        if b == "onnx":
            raise UsageError("--precision bf16 runs on OpenVINO or torch (ONNX Runtime has no bf16 CPU kernels): "
                                "use --backend openvino, torch or auto")
        if b in ("auto", "openvino") and ov_available and ov_bf16:
            return Plan("openvino", "bf16", "bf16")
        if b == "openvino":
            raise BadInputError("OpenVINO has no bf16 on this CPU (it needs AVX512-BF16 or AMX): use --backend torch "
                                "or --precision fp32")
        why = "" if b == "torch" else ("openvino is not installed: torch runs bf16 (slower)" if not ov_available
                                       else "this CPU has no BF16 instructions for OpenVINO: torch runs bf16")
        return Plan("torch", "bf16", "bf16", why)
    text = "int8" if p == "int8" else "fp32"
    if b == "torch":
        if p == "int8":
            raise UsageError("--precision int8 needs the onnx backend (ONNX Runtime's dynamic quantization)")
        return Plan("torch", text, "fp32")
    if b == "openvino":
        if p == "int8":
            raise UsageError("--precision int8 runs on ONNX Runtime (OpenVINO was 4x slower on its int8 text "
                                "tower): use --backend auto or onnx")
        return Plan("openvino", "fp32", "fp32")
    if not ort_available:
        if b == "onnx" or p == "int8":
            raise BadInputError("onnxruntime is not installed: pip install onnxruntime (or use --backend torch)")
        if ov_available:
            return Plan("openvino", "fp32", "fp32", "onnxruntime is not installed: OpenVINO runs the model")
        return Plan("torch", "fp32", "fp32", "onnxruntime is not installed: torch runs the model (slower on CPUs)")
    return Plan("onnx", text, "fp32")


def fallback(why: str) -> Plan:
    """The torch plan used when the ONNX one cannot run (export or parity failed): int8 text falls back
    to fp32, since torch has no int8 path here."""
    return Plan("torch", "fp32", "fp32", why)


_cache_refused: set[str] = set()  # reasons already noted in this process


def cache_untrusted(folder: Path | None = None) -> str | None:
    """Why the export cache must not be used, or None. Its towers run as code-like data (a replaced text tower
    and manifest changed every query's results silently), so as ssh does for its keys: the cache root, its
    onnx/ folder and `folder` (one model's, with its manifest and OpenVINO's compiled graphs) must belong to
    this user (or root) and be writable by nobody else; the folders above the root likewise, except that a
    world-writable one with the sticky bit (/tmp) passes. Parts not created yet are not checked. Noted once
    per process (a warning: commands print it on stderr); callers then run on torch or without the cache."""
    root = Path(os.path.abspath(cache_root()))
    checks = [(p, True) for p in reversed(root.parents)] + [(root, False), (root / "onnx", False)]
    if folder is not None:
        graphs, kept = Path(folder) / "openvino", Path(folder) / "records"  # records: the manifest (records.py)
        checks += [(Path(folder), False), (Path(folder) / "manifest.json", False), (kept, False), (graphs, False)]
        checks += [(p, False) for d in (kept, graphs) for p in (sorted(d.iterdir()) if d.is_dir() else ())]
    for path, sticky_ok in checks:
        try:
            why = untrusted(path, owners=(0,), sticky_ok=sticky_ok)
        except (FileNotFoundError, NotADirectoryError):
            continue  # made later, by this user
        except OSError as exc:
            why = f"{path} cannot be checked ({exc.strerror or exc})"
        if why:
            if why not in _cache_refused:
                _cache_refused.add(why)
                log.warning("note: not using the model cache: %s (another user could replace the exported "
                            "model); fix its owner and modes (chmod go-w) or set ALIGNSEARCH_CACHE", why)
            return why
    return None


def make_cache_dir(folder: Path) -> None:
    """Create folder and any missing parents as private (0700) folders: the umask (002 leaves them
    group-writable) must not make the cache fail its own check (cache_untrusted) next time."""
    atomic.make_folders(folder, 0o700)


IN_USE = ".inuse"  # in a model's cache folder: locked shared by each process with a tower loaded from it


def lock_in_use(folder: Path, exclusive: bool = False, wait: float = 120.0):
    """folder's IN_USE file, locked (flock) while the returned file stays open; None where the lock cannot be
    had. Loaders hold it shared for as long as they run, and exportcache removes a superseded folder only under
    it exclusively, taken without waiting: never one a running process uses. A shared lock waits up to `wait`
    seconds for a remover's (which renames the folder away and deletes it) and is then held on the IN_USE file
    at that name now, if any: never on the one of a folder deleted meanwhile."""
    import fcntl

    path, flags = folder / IN_USE, os.O_NOFOLLOW | os.O_CLOEXEC
    deadline = time.monotonic() + wait
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | flags, 0o600)
        except OSError:
            try:  # a cache this user may not write (a read-only mount): a shared lock needs no write access
                fd = os.open(path, os.O_RDONLY | flags)
            except OSError:
                return None
        if not _flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH, 0 if exclusive else deadline):
            os.close(fd)
            return None
        if exclusive or _same_file(fd, path):
            return os.fdopen(fd, "rb")
        os.close(fd)  # the folder was removed while this waited: lock the one at that name now, if any


def _flock(fd: int, how: int, deadline: float) -> bool:
    """flock(fd, how), tried until time.monotonic() passes deadline (0: once)."""
    import fcntl

    while True:
        try:
            fcntl.flock(fd, how | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        except OSError:
            return False


def _same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def onnx_dir(fingerprint: str, content: str) -> Path:
    """The exported towers of one model, named by its fingerprint and its content digest (every weight and
    the tokenizer: model.content_digest), never by its place."""
    if not (fingerprint.isalnum() and content.isalnum()):
        raise ValueError(f"not a model fingerprint: {fingerprint!r}, {content!r}")
    return cache_root() / "onnx" / f"{fingerprint}-{content[:16]}"
