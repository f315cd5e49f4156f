"""From a plan to running towers: the one place that builds an encoder's exported towers and falls back.

backend.plan decides (pure) which engine runs each tower at which precision; plan_for gives it what is
installed here. Towers then builds each exported tower from that plan on first use (an export or a load
takes seconds, and a tower never used costs nothing), on ONNX Runtime or OpenVINO, from one of two sources:

- Exported: a loaded checkpoint (model.Encoder), whose towers are exported, checked and cached by
  onnxexport.Exporter; torch runs what the plan gives to it, and everything after a failure.
- Cached: a cache folder's exports alone (cached.CachedEncoder, no torch); after a failure the checkpoint
  is loaded (model.Encoder, given as `load_full`) and runs the rest of the run.

The plan changes here only, and only on first use of a tower: under --backend auto the vision tower goes to
the engine measured fastest on this CPU; int8 text that fails its check runs at fp32; and a tower that
cannot be built (OnnxUnusable: the export, its check or its load failed) makes the fallback, said in one
line. Encoders read `plan`; none writes it.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Callable

from alignsearch.encoders.backend import (ENGINES, EncoderOptions, Plan, choose_images, fallback, installed_engines,
                                          onnxruntime_installed, openvino_bf16, openvino_installed, plan)
from alignsearch.encoders.onnxrun import OnnxUnusable, TextEncoder, load_vision, machine
from alignsearch.errors import ModelMismatchError

log = logging.getLogger(__name__)

# What makes an exported tower unusable: onnxrun and onnxexport turn every failure of an engine, an
# exporter or a cache file into this, with one line saying why.
FAILURES = (OnnxUnusable,)


def plan_for(options: EncoderOptions, device_type: str) -> Plan:
    """backend.plan for a device ("cpu" or "cuda") with the engines installed here."""
    cpu = device_type == "cpu"
    ov = cpu and openvino_installed()
    return plan(options, device_type, cpu and onnxruntime_installed(), ov,
                ov and options.precision == "bf16" and openvino_bf16())


def cached_plan(options: EncoderOptions, speed: dict) -> Plan | None:
    """The plan for running a cache's exports alone on this CPU, given the vision rates measured here
    (speed: {engine: images/s}); None where torch would run a tower (measured fastest, or asked for) or the
    installed engines were not all measured here (the full load measures them)."""
    p = plan_for(options, "cpu")
    if options.backend == "auto" and p.image == "fp32":
        engines = installed_engines()
        if not set(engines) <= set(speed):
            return None
        p = choose_images(p, {e: float(speed[e]) for e in engines})
    if p.backend == "torch" or p.images_on == "torch":
        return None
    return p


class Exported:
    """Towers exported from a loaded checkpoint (model.Encoder) by onnxexport.Exporter, made on first use."""

    def __init__(self, enc):
        self.enc = enc
        self._exporter = None

    def _export(self):
        if self._exporter is None:
            from alignsearch.encoders import onnxexport  # torch: only where a checkpoint is loaded

            self._exporter = onnxexport.Exporter(self.enc)
        return self._exporter

    def text(self, precision: str, engine: str):
        return self._export().text(precision, engine)

    def vision(self, engine: str, precision: str):
        return self._export().vision(engine, precision)

    def vision_speed(self, engines: tuple[str, ...]) -> dict:
        return self._export().vision_speed(engines)


class Cached:
    """Towers run from a cache folder's exports alone (cached.CachedEncoder): the text tower with its own
    tokenizer.json (onnxrun.TextEncoder), the vision tower as checked at export."""

    def __init__(self, folder: Path, manifest: dict, size: tuple[int, int], load_full: Callable[[], object] | None):
        self.folder, self.manifest, self.size = folder, manifest, size
        self.load_full = load_full

    def text(self, precision: str, engine: str):
        return TextEncoder(self.folder, self.manifest, precision, engine)

    def vision(self, engine: str, precision: str):
        return load_vision(self.folder, self.manifest, self.size, engine, precision)

    def vision_speed(self, engines: tuple[str, ...]) -> dict:
        speed = self.manifest["vision_speed"][machine()]
        return {e: float(speed[e]) for e in engines}


def resolve(options: EncoderOptions, device_type: str, enc) -> Towers:
    """The towers of a loaded checkpoint (model.Encoder) on a device ("cpu" or "cuda"), as the options and
    the engines installed here allow."""
    return Towers(plan_for(options, device_type), options, Exported(enc))


class Towers:
    """The exported text and image towers of one encoder and the plan they run on (module docstring)."""

    def __init__(self, p: Plan, options: EncoderOptions, source: Exported | Cached):
        self._plan = p
        self.options = options
        self.source = source
        self.built: dict[str, object] = {}  # "text"/"image" -> the tower, once built and checked
        self.full = None  # a Cached source's fallback: the checkpoint loaded (model.Encoder)

    @property
    def plan(self) -> Plan:
        return self.full.plan if self.full is not None else self._plan

    def get(self, tower: str):
        """The exported tower ("text" or "image"), built on first use; None where torch runs it: the plan
        says so, or the tower failed (the fallback then ran: `full` runs it for a cache's encoder)."""
        if self.full is not None or self._engine(tower) not in ENGINES:
            return None
        if tower not in self.built:
            built = self.attempt(lambda: self.require(tower))
            if built is None:
                return None
            self.built[tower] = built
        return self.built[tower]

    def require(self, tower: str):
        """The tower built now, or the failure raised (no fallback): a cache's encoder checks its vision
        tower before it is used."""
        if tower == "image":
            engine = self._image_engine()
            return None if engine == "torch" else self.source.vision(engine, self._plan.image)
        if self._plan.text == "int8":
            try:
                return self.source.text("int8", self._plan.backend)
            except OnnxUnusable as why:  # this model does not quantize well: exact text instead
                log.warning("text at fp32: %s", why)
                self._plan = replace(self._plan, text="fp32", why=str(why))
        return self.source.text(self._plan.text, self._plan.backend)

    def attempt(self, fn):
        """fn() (building or checking exported towers), or None after the fallback when it fails."""
        try:
            return fn()
        except FAILURES as why:
            self._fall_back(why)
            return None

    def _engine(self, tower: str) -> str:
        return self._plan.images_on if tower == "image" else self._plan.backend

    def _image_engine(self) -> str:
        """The vision tower's engine: the plan's, or under --backend auto at fp32 the one measured fastest on
        this CPU (once, kept in the cache's manifest), with the measurement in the plan's note."""
        if self.options.backend == "auto" and self._plan.image == "fp32":
            self._plan = choose_images(self._plan, self.source.vision_speed(installed_engines()))
        return self._plan.images_on

    def _fall_back(self, why: Exception) -> None:
        """The one fallback, said in one line: a loaded checkpoint runs both towers on torch from here on; a
        cache's encoder loads the checkpoint, which runs the rest of the run (exporting again what failed)."""
        self.built.clear()
        if isinstance(self.source, Exported):
            log.warning("running the model on torch: %s", why)
            self._plan = fallback(str(why))
            return
        if self.source.load_full is None:
            raise why
        log.warning("loading the checkpoint: %s", why)
        full = self.source.load_full()
        if full.fingerprint != self.source.manifest["fingerprint"]:
            raise ModelMismatchError(f"the checkpoint in {full.name} changed during this run: run the command again")
        self.full = full
