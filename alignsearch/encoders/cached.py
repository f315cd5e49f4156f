"""Encoding from the cached ONNX exports alone: neither torch nor transformers is imported.

Before it encodes a photo, an `alignsearch index` run on a CPU spent ~9 s importing torch and transformers
and loading the checkpoint (2-core Xeon, benchmarks/RESULTS.md): more than OpenVINO then needs for 64 photos.
Once a model's towers are exported and checked (model.Encoder does it on first use), the exports are all
that runs them, so a later run finds them without loading the checkpoint:

- an index that recorded its model: by that model's fingerprint and content digest (the cache folder's
  name), as cold text queries do (text_encoder);
- a new index: by the checkpoint folder's *stamp*, every file's name, size, modification time and inode,
  which model.Encoder recorded in the manifest after loading exactly those files.

Either way the folder's current stamp must be one the manifest recorded: a checkpoint file rewritten,
touched, replaced or copied elsewhere changes it, and the full load (which hashes the weights) runs instead.
Hub ids always take the full load (transformers decides which revision that is). The vision tower is loaded
and its probes checked before the encoder is returned; any later failure of a tower switches to the full
model.Encoder for the rest of the run (resolve.Towers, with the loader loader.open_encoder gives).

A text query needs less (text_encoder, CachedText): the text tower and tokenizer.json of the model the index
recorded, found by its fingerprint and content digest alone (those are the weights its vectors came from,
whatever the checkpoint folder holds now), on the plan every encoder gets here (resolve.text_plan).
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from alignsearch.storage.paths import cache_root
from alignsearch.encoders import records
from alignsearch.encoders.backend import CPU_MICRO_BATCH, EncoderOptions, Plan, cache_untrusted, onnx_dir
from alignsearch.encoders.encoding import DEFAULT_MODEL, EncoderBase, checkpoint_stamp, describe_model
from alignsearch.encoders.resolve import FAILURES, Cached, Towers, cached_plan, text_plan
from alignsearch.media.images import ImageSpec
from alignsearch.encoders.onnxrun import EXPORT_VERSION, check_file, machine, read_manifest

log = logging.getLogger(__name__)
NEEDED = ("vision-fp32", "text-fp32", "tokenizer")  # the files this encoder runs from


@dataclass(frozen=True)
class Device:
    """What callers read of torch.device (`.type`), without importing torch."""

    type: str = "cpu"

    def __str__(self) -> str:
        return self.type


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
    for folder in sorted((cache_root() / "onnx").glob("*")):
        if not records.exists(folder) or cache_untrusted(folder):
            continue
        manifest = read_manifest(folder)
        if isinstance(manifest, dict):
            yield folder, manifest


def _usable(manifest: dict, stamp: dict, recorded: dict | None) -> bool:
    """Does this manifest hold a complete export of the stamped folder's weights (the index's, if recorded)?
    Any manifest that cannot be read as one is not usable (the full load exports again where it must)."""
    try:
        return _matches(manifest, stamp, recorded)
    except records.DAMAGED:  # a damaged or foreign manifest: not this model's export
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


def find(model: str | None, recorded: dict | None, options: EncoderOptions,
         load_full: Callable[[str], EncoderBase] | None = None) -> CachedEncoder | None:
    """The encoder that runs the cached exports of `model` (else the index's recorded model, else the default),
    or None where the full model.Encoder must load: a GPU may be used, torch was asked for or measured
    fastest here, the exports or the measurement are not cached yet, the folder is not one they were made
    from, or the vision tower fails its check. load_full(checkpoint folder): the full encoder, should a
    tower fail later (loader.open_encoder gives it)."""
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
            return _encoder(folder, manifest, stamp, options, load_full)
        except (*FAILURES, *records.DAMAGED, OSError) as why:  # a damaged cache (missing keys, unloadable tower):
            # the next, else the full load, which exports again
            log.info("cached exports in %s not used: %s", folder,
                     str(why).splitlines()[0] if str(why) else type(why).__name__)
    return None


def _encoder(folder: Path, manifest: dict, stamp: dict, options: EncoderOptions, load_full) -> CachedEncoder | None:
    p = cached_plan(options, manifest.get("vision_speed", {}).get(machine(), {}))
    if p is None:
        return None
    enc = CachedEncoder(folder, manifest, stamp["path"], p, options, load_full)
    enc.towers.built["image"] = enc.towers.require("image")  # the probes, before any image is encoded
    return enc


class _FromCache(EncoderBase):
    """What the encoders of a cache folder share: the model's identity from its manifest, and text from the
    cached text tower (resolve.Towers), or from the checkpoint loaded after a tower failed. CPU only."""

    def __init__(self, folder: Path, manifest: dict, name: str, p: Plan, options: EncoderOptions,
                 size: tuple[int, int] | None, load_full: Callable[[], EncoderBase] | None):
        self.name = name
        self.fingerprint = manifest["fingerprint"]
        self.content_digest = manifest["content_digest"]
        self.dim = int(manifest["dim"])
        self.temperature = float(manifest["temperature"])
        self.max_length = int(manifest["max_length"])
        self.device = Device("cpu")
        self.options = options
        self._folder, self._manifest = folder, manifest
        self.towers = Towers(p, options, Cached(folder, manifest, size, load_full))

    def identifies(self, fingerprint: str) -> bool:
        return fingerprint == self.fingerprint

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        if isinstance(texts, str):
            texts = [texts]
        if len(texts) == 0:  # the tokenizer fails on an empty batch (IndexError): none is no rows
            return np.zeros((0, self.dim), dtype=np.float32)
        tower = self.towers.get("text")
        if tower is None:
            return self.towers.full.encode_text(texts)
        return tower.encode_text(texts)


class CachedEncoder(_FromCache):
    """model.Encoder's interface over a cached export's towers (CPU only). Not thread-safe."""

    def __init__(self, folder: Path, manifest: dict, name: str, p: Plan, options: EncoderOptions,
                 load_full: Callable[[str], EncoderBase] | None = None):
        self.spec = spec_from(manifest["spec"])
        super().__init__(folder, manifest, name, p, options, self.spec.output_size,
                         partial(load_full, name) if load_full else None)

    @property
    def plan(self) -> Plan:
        return self.towers.plan

    def describe(self) -> dict:
        return describe_model(self.name, self.fingerprint, self.content_digest, self.dim, self.max_length, self.spec)

    def encode_crops(self, crops: np.ndarray) -> np.ndarray:
        if len(crops) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        tower = self.towers.get("image")
        if tower is None:
            return self.towers.full.encode_crops(crops)
        return np.concatenate([tower.run(crops=np.ascontiguousarray(crops[i : i + CPU_MICRO_BATCH]))
                               for i in range(0, len(crops), CPU_MICRO_BATCH)])

    def prepare_text(self) -> None:
        """What model.Encoder.prepare_text promises (the next text query needs no torch): the cached text tower
        and tokenizer.json still as exported (size and time, hashed when changed), else the checkpoint loads
        and exports them."""
        if self.towers.full is None and self.towers.attempt(
                lambda: [check_file(self._folder, self._manifest, key) for key in ("text-fp32", "tokenizer")]):
            return
        self.towers.full.prepare_text()


TEXT_ONLY = "text only: torch and transformers not loaded"


def recorded_export(recorded: dict) -> tuple[Path, dict] | None:
    """(folder, manifest) of the cached export of the model an index recorded (its `model` meta: fingerprint
    and content digest) with a tokenizer.json, or None: not exported yet, recorded before content digests,
    the cache not private, the manifest damaged or another model's."""
    fingerprint, content = recorded.get("fingerprint", ""), recorded.get("content_digest")
    if content is None:
        return None  # an index recorded before content digests: found again after its next `index` run
    try:
        folder = onnx_dir(fingerprint, content)
    except ValueError:
        return None
    if cache_untrusted(folder):
        return None  # noted: the full load runs on torch
    manifest = read_manifest(folder)
    if not isinstance(manifest, dict) or (manifest.get("fingerprint"), manifest.get("content_digest")) != \
            (fingerprint, content) or "tokenizer" not in manifest:
        return None  # none, damaged ([] or "x" is valid JSON) or another model's: the full load exports again
    return folder, manifest


def text_encoder(recorded: dict, options: EncoderOptions = EncoderOptions(), model: str | None = None,
                 load_full: Callable[[], EncoderBase] | None = None) -> EncoderBase | None:
    """The encoder for text queries on an index that recorded `recorded`: CachedText (no torch) where the plan
    puts text on an exported engine (resolve.text_plan) and its export is cached, its text tower built and
    checked now; None where neither holds (the caller opens the full encoder). A tower that fails makes
    resolve.Towers' fallback: the encoder load_full() gives is returned, said in one line; without
    load_full (a head start on a thread: coldstart) None, and the caller's own load says it."""
    p = text_plan(options, model)
    found = recorded_export(recorded) if p is not None else None
    if found is None:
        return None
    try:
        enc = CachedText(*found, p, options, load_full)
        tower = enc.towers.get("text")
    except (*FAILURES, *records.DAMAGED) as why:  # no load_full: the fallback raised why
        log.info("cached ONNX text tower not used: %s", str(why).splitlines()[0] if str(why) else type(why).__name__)
        return None
    return enc if tower is not None else enc.towers.full


class CachedText(_FromCache):
    """Text queries from a cached export's text tower and tokenizer.json (onnxrun.TextEncoder): neither torch
    nor transformers. Stands in for the full encoder where only text is encoded (search.engine.Engine)."""

    text_only = True

    def __init__(self, folder: Path, manifest: dict, p: Plan, options: EncoderOptions,
                 load_full: Callable[[], EncoderBase] | None = None):
        super().__init__(folder, manifest, manifest["model"], p, options, None, load_full)

    @property
    def plan(self) -> Plan:
        """The towers' plan, with no image tower: none is loaded (the full encoder's, after a fallback)."""
        p = self.towers.plan
        if self.towers.full is not None:
            return p
        return replace(p, image=None, image_backend="", why="; ".join(filter(None, (TEXT_ONLY, p.why))))

    def encode_crops(self, crops: np.ndarray) -> np.ndarray:
        raise TypeError("a text-only encoder encodes no images: open the full encoder (loader.open_encoder)")
