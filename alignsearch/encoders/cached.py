"""Encoding from the cached ONNX exports alone: neither torch nor transformers is imported.

Before it encodes a photo, an `alignsearch index` run on a CPU spent ~9 s importing torch and transformers
and loading the checkpoint (2-core Xeon, benchmarks/RESULTS.md): more than OpenVINO then needs for 64 photos.
Once a model's towers are exported and checked (model.Encoder does it on first use), the exports are all
that runs them, so a later run finds them without loading the checkpoint:

- an index that recorded its model: by that model's fingerprint and content digest (the cache folder's
  name), as cold text queries do (onnxrun.text_encoder);
- a new index: by the checkpoint folder's *stamp*, every file's name, size, modification time and inode,
  which model.Encoder recorded in the manifest after loading exactly those files.

Either way the folder's current stamp must be one the manifest recorded: a checkpoint file rewritten,
touched, replaced or copied elsewhere changes it, and the full load (which hashes the weights) runs instead.
Hub ids always take the full load (transformers decides which revision that is). The vision tower is loaded
and its probes checked before the encoder is returned; any later failure of a tower switches to the full
model.Encoder for the rest of the run.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from alignsearch.storage.paths import cache_root
from alignsearch.encoders.backend import (CPU_MICRO_BATCH, EncoderOptions, Plan, cache_untrusted, choose_images,
                                 installed_engines, onnxruntime_installed, openvino_bf16, openvino_installed, plan)
from alignsearch.encoders.encoding import DEFAULT_MODEL, EncoderBase, describe_model
from alignsearch.errors import ModelMismatchError
from alignsearch.media.images import ImageSpec
from alignsearch.encoders.onnxrun import (EXPORT_VERSION, MANIFEST, OnnxUnusable, TextEncoder, check_file, load_vision,
                                 machine, read_manifest)

log = logging.getLogger(__name__)
NEEDED = ("vision-fp32", "text-fp32", "tokenizer")  # the files this encoder runs from


@dataclass(frozen=True)
class Device:
    """What callers read of torch.device (`.type`), without importing torch."""

    type: str = "cpu"

    def __str__(self) -> str:
        return self.type


def checkpoint_stamp(path) -> dict | None:
    """{"path": absolute folder, "files": {name: [size, mtime_ns, ctime_ns, inode, device]}} of a local
    checkpoint folder's files (symlinks followed, as in the Hugging Face cache's snapshots); None for a hub id
    or a folder that cannot be listed. ctime because nothing else is enough: a checkpoint re-extracted from an
    archive with fixed mtimes (tar --mtime, SOURCE_DATE_EPOCH) got back the same sizes, mtimes and (reused)
    inodes with other weights; every write, rename or utime sets ctime, and no user can set it back."""
    folder = Path(path)
    try:
        if not folder.is_dir():
            return None
        files = {}
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            if entry.is_file():
                st = entry.stat()
                files[entry.name] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]
    except OSError:
        return None
    return {"path": str(folder.resolve()), "files": files}


def gpu_possible() -> bool:
    """Could torch see a GPU here? Not without an NVIDIA or ROCm driver (or on macOS, where MPS may): without
    one, --device auto is the CPU, known without importing torch."""
    return sys.platform == "darwin" or any(os.path.exists(p) for p in ("/proc/driver/nvidia", "/dev/nvidiactl", "/dev/kfd"))


def spec_from(d: dict) -> ImageSpec:
    """The ImageSpec a manifest recorded (lists back to tuples)."""
    return ImageSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def _manifests():
    if cache_untrusted():
        return
    for path in sorted((cache_root() / "onnx").glob(f"*/{MANIFEST}")):
        if cache_untrusted(path.parent):
            continue
        manifest = read_manifest(path.parent)
        if isinstance(manifest, dict):
            yield path.parent, manifest


def _usable(manifest: dict, stamp: dict, recorded: dict | None) -> bool:
    """Does this manifest hold a complete export of the stamped folder's weights (the index's, if recorded)?
    Any manifest that cannot be read as one is not usable (the full load exports again where it must)."""
    try:
        return _matches(manifest, stamp, recorded)
    except Exception:  # noqa: BLE001 - a damaged or foreign manifest: not this model's export
        return False


def _matches(manifest: dict, stamp: dict, recorded: dict | None) -> bool:
    if manifest.get("export_version") != EXPORT_VERSION or stamp not in manifest.get("checkpoints", []):
        return False
    if not all(k in manifest.get("files", {}) for k in NEEDED) or "tokenizer" not in manifest:
        return False
    if recorded is not None and (manifest.get("fingerprint"), manifest.get("content_digest")) != \
            (recorded.get("fingerprint"), recorded.get("content_digest")):
        return False  # other weights than the index's: the full load says so (ModelMismatchError)
    return True


def find(model: str | None, recorded: dict | None, options: EncoderOptions) -> CachedEncoder | None:
    """The encoder that runs the cached exports of `model` (else the index's recorded model, else the default),
    or None where the full model.Encoder must load: a GPU may be used, torch was asked for or measured
    fastest here, the exports or the measurement are not cached yet, the folder is not one they were made
    from, or the vision tower fails its check."""
    if options.device not in ("auto", "cpu") or (options.device == "auto" and gpu_possible()):
        return None
    if options.backend == "torch" or options.precision == "int8":
        return None
    name = model or (recorded or {}).get("model") or DEFAULT_MODEL
    stamp = checkpoint_stamp(name)
    if stamp is None:
        return None
    for folder, manifest in _manifests():
        if not _usable(manifest, stamp, recorded):
            continue
        try:
            return _encoder(folder, manifest, stamp, options)
        except Exception as why:  # noqa: BLE001 - a damaged cache (missing keys, unloadable tower): the next, else
            # the full load, which exports again
            log.info("cached exports in %s not used: %s", folder,
                     str(why).splitlines()[0] if str(why) else type(why).__name__)
    return None


def _encoder(folder: Path, manifest: dict, stamp: dict, options: EncoderOptions) -> CachedEncoder | None:
    ov = openvino_installed()
    p = plan(options, "cpu", onnxruntime_installed(), ov, ov and options.precision == "bf16" and openvino_bf16())
    if options.backend == "auto" and p.image == "fp32":
        speed = manifest.get("vision_speed", {}).get(machine(), {})
        engines = installed_engines()
        if not set(engines) <= set(speed):
            return None  # not measured here with these engines: the full load measures
        p = choose_images(p, {e: float(speed[e]) for e in engines})
    if p.backend == "torch" or p.images_on == "torch":
        return None
    enc = CachedEncoder(folder, manifest, stamp["path"], p, options)
    enc.vision()  # the probes, before any image is encoded
    return enc


class CachedEncoder(EncoderBase):
    """model.Encoder's interface over a cached export's towers (CPU only). Not thread-safe."""

    def __init__(self, folder: Path, manifest: dict, name: str, p: Plan, options: EncoderOptions):
        self.name = name
        self.fingerprint = manifest["fingerprint"]
        self.content_digest = manifest["content_digest"]
        self.dim = int(manifest["dim"])
        self.temperature = float(manifest["temperature"])
        self.max_length = int(manifest["max_length"])
        self.spec = spec_from(manifest["spec"])
        self.device = Device("cpu")
        self.plan = p
        self.options = options
        self._folder, self._manifest = folder, manifest
        self._vision = None
        self._text: TextEncoder | None = None
        self._full = None  # model.Encoder, once a tower failed

    def identifies(self, fingerprint: str) -> bool:
        return fingerprint == self.fingerprint

    def describe(self) -> dict:
        return describe_model(self.name, self.fingerprint, self.content_digest, self.dim, self.max_length, self.spec)

    def vision(self):
        if self._vision is None:
            self._vision = load_vision(self._folder, self._manifest, self.spec.output_size, self.plan.images_on,
                                       self.plan.image)
        return self._vision

    def _fall_back(self, why: Exception):
        """The full model for the rest of the run: a tower that checked out at the start failed later."""
        from alignsearch.encoders.model import Encoder

        log.warning("loading the checkpoint: %s", why)
        full = Encoder(self.name, "cpu", backend=self.options.backend, precision=self.options.precision)
        if full.fingerprint != self.fingerprint:
            raise ModelMismatchError(f"the checkpoint in {self.name} changed during this run: run the command again")
        self._full, self.plan = full, full.plan
        return full

    def encode_crops(self, crops: np.ndarray) -> np.ndarray:
        if len(crops) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        if self._full is None:
            try:
                tower = self.vision()
                return np.concatenate([tower.run(crops=np.ascontiguousarray(crops[i : i + CPU_MICRO_BATCH]))
                                       for i in range(0, len(crops), CPU_MICRO_BATCH)])
            except OnnxUnusable as why:
                self._fall_back(why)
        return self._full.encode_crops(crops)

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        if isinstance(texts, str):
            texts = [texts]
        if self._full is None:
            try:
                if self._text is None:
                    self._text = TextEncoder(self._folder, self._manifest, self.plan.text, self.plan.backend)
                return self._text.encode_text(texts)
            except OnnxUnusable as why:
                self._fall_back(why)
        return self._full.encode_text(texts)

    def prepare_text(self) -> None:
        """What model.Encoder.prepare_text promises (the next text query needs no torch): the cached text tower
        and tokenizer.json still as exported (size and time, hashed when changed), else the checkpoint loads
        and exports them."""
        if self._full is None:
            try:
                for key in ("text-fp32", "tokenizer"):
                    check_file(self._folder, self._manifest, key)
                return
            except OnnxUnusable as why:
                self._fall_back(why)
        self._full.prepare_text()
