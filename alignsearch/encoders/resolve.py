"""From a plan to running towers: the one place that builds an encoder's exported towers and falls back.

backend.plan decides (pure) which engine runs each tower at which precision; plan_for gives it what is
installed here. Towers then builds each exported tower from that plan on first use (an export or a load
takes seconds, and a tower never used costs nothing), on ONNX Runtime or OpenVINO, from one of two sources:

- Exported: a loaded checkpoint (model.Encoder), whose towers are exported, checked and cached by
  onnxexport.Exporter; torch runs what the plan gives to it, and everything after a failure.
- Cached: a cache folder's exports alone (cached.CachedEncoder, or cached.CachedText for text queries; no
  torch); after a failure the checkpoint is loaded (model.Encoder, given as `load_full`) and runs the rest
  of the run.

The plan changes here only, in Towers._change, and only on first use of a tower (each change needs the
tower built, exported or measured: not decided without exporting at construction): under --backend auto the
vision tower goes to the engine measured fastest on this CPU; int8 or bf16 text, or bf16 images, measured too
far from torch run at fp32 on the same engine (remembered: onnxexport.Exporter._reject); and a tower that cannot be built (OnnxUnusable: the export, its check or its load failed) makes
the fallback. Each change is said in one line and kept in the plan's note. Encoders read `plan`; none
writes it.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Callable

from alignsearch.encoders import records
from alignsearch.encoders.backend import (ENGINES, EncoderOptions, Plan, choose_images, fallback, installed_engines,
                                          onnxruntime_installed, openvino_bf16, openvino_installed, plan,
                                          torch_free_text)
from alignsearch.encoders.onnxrun import OnnxUnusable, TextEncoder, load_vision, machine, rejected
from alignsearch.errors import ModelMismatchError

log = logging.getLogger(__name__)

# What makes an exported tower unusable: onnxrun and onnxexport turn every failure of an engine, an
# exporter or a cache file into this, with one line saying why.
FAILURES = (OnnxUnusable,)


def plan_for(options: EncoderOptions, device_type: str) -> Plan:
    """backend.plan for a device ("cpu" or "cuda") with the engines installed here. OpenVINO (a slow import:
    a cold text query must not pay it) is looked for only where the plan depends on it: asked for, bf16, or
    no onnxruntime."""
    cpu = device_type == "cpu"
    ort = cpu and onnxruntime_installed()
    ov = cpu and (options.backend == "openvino" or options.precision == "bf16" or not ort) and openvino_installed()
    return plan(options, device_type, ort, ov, ov and options.precision == "bf16" and openvino_bf16())


def text_plan(options: EncoderOptions, model: str | None) -> Plan | None:
    """The plan for text queries run from an index's cached text tower with neither torch nor transformers
    (cached.text_encoder), or None where torch runs text: backend.torch_free_text's conditions, then the CPU's
    plan (the one every encoder gets here) putting text on an exported engine. --device auto counts as the
    CPU for text (25 ms a query there, and no GPU without importing torch)."""
    if not torch_free_text(options, model):
        return None
    p = plan_for(options, "cpu")
    return p if p.backend in ENGINES else None


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
    """Towers run from a cache folder's exports alone (cached.CachedEncoder, cached.CachedText): the text tower
    with its own tokenizer.json (onnxrun.TextEncoder), the vision tower as checked at export. A damaged
    manifest or an unreadable file is a tower that cannot be used, as an export's failure is."""

    def __init__(self, folder: Path, manifest: dict, size: tuple[int, int] | None,
                 load_full: Callable[[], object] | None):
        self.folder, self.manifest, self.size = folder, manifest, size
        self.load_full = load_full

    def rejected(self, precision: str, engine: str, tower: str = "text") -> str | None:
        """Why this model's `tower` ("text" or "vision") at `precision` on `engine` was refused when it was
        measured (at export: onnxrun.rejected), or None: not measured here, or measured good; the checkpoint
        then loads and measures (the fallback)."""
        return _unusable(lambda: rejected(self.manifest, precision, engine, tower))

    def _refused(self, precision: str, engine: str, tower: str) -> None:
        why = self.rejected(precision, engine, tower) if precision != "fp32" else None
        if why:
            raise OnnxUnusable(why)

    def text(self, precision: str, engine: str):
        self._refused(precision, engine, "text")
        return _unusable(lambda: TextEncoder(self.folder, self.manifest, precision, engine))

    def vision(self, engine: str, precision: str):
        self._refused(precision, engine, "vision")
        return _unusable(lambda: load_vision(self.folder, self.manifest, self.size, engine, precision))

    def vision_speed(self, engines: tuple[str, ...]) -> dict:
        speed = self.manifest["vision_speed"][machine()]
        return {e: float(speed[e]) for e in engines}


def _unusable(fn):
    """fn(), reading a cache's files and manifest, with their damage (a missing key, a wrong type, a file
    gone) raised as OnnxUnusable, one line."""
    try:
        return fn()
    except (*records.DAMAGED, OSError) as exc:
        raise OnnxUnusable(f"the cached exports cannot be read: {str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}") from None


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
            if engine == "torch":
                return None
            return self._exact_if_refused("image", engine, lambda precision: self.source.vision(engine, precision))
        engine = self._plan.backend
        return self._exact_if_refused("text", engine, lambda precision: self.source.text(precision, engine))

    def _exact_if_refused(self, tower: str, engine: str, build):
        """build(the plan's precision for `tower`); below fp32 (int8 or bf16: one rule for both, and for both
        towers) one measured too far from torch makes the tower run at fp32 on the same engine, said once."""
        precision = getattr(self._plan, tower)
        if precision != "fp32":
            try:
                return build(precision)
            except OnnxUnusable as why:
                name = "vision" if tower == "image" else "text"
                if isinstance(self.source, Cached) and not self.source.rejected(precision, engine, name):
                    raise  # never measured here: the checkpoint loads and measures it (the fallback)
                # measured: this model drifts too far at this precision, exact instead (same engine)
                said = "images" if tower == "image" else "text"
                self._change(f"{said} at fp32: {why}", to=replace(self._plan, **{tower: "fp32"},
                                                                   why=_noted(self._plan.why, why)))
        return build(getattr(self._plan, tower))

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
            chosen = choose_images(self._plan, self.source.vision_speed(installed_engines()))
            if chosen != self._plan:
                self._change(chosen.why, logging.INFO, to=replace(chosen, why=_noted(self._plan.why, chosen.why)))
        return self._plan.images_on

    def _fall_back(self, why: Exception) -> None:
        """The one fallback: a loaded checkpoint runs both towers on torch from here on; a cache's encoder
        loads the checkpoint, which runs the rest of the run (exporting again what failed)."""
        self.built.clear()
        if isinstance(self.source, Exported):
            self._change(f"running the model on torch: {why}", to=fallback(str(why)))
        elif self.source.load_full is None:
            raise why
        else:
            self._change(f"loading the checkpoint: {why}", load=self.source.load_full)

    def _change(self, said: str, level: int = logging.WARNING, *, to: Plan | None = None,
                load: Callable[[], object] | None = None) -> None:
        """The one place the plan changes after construction: `said` in one line (once: a change happens on
        a tower's first use, and a tower is built once), then the plan is `to`; or, for a cache's towers
        whose checkpoint must load, the plan of the encoder load() gives, which runs the rest of the run."""
        log.log(level, "%s", said)
        if load is None:
            self._plan = to
            return
        full = load()
        if full.fingerprint != self.source.manifest["fingerprint"]:
            raise ModelMismatchError(f"the checkpoint in {full.name} changed during this run: run the command again")
        self.full = full


def _noted(note: str, why) -> str:
    """A plan's note with one more reason: each change says why, and none hides an earlier one."""
    return "; ".join(filter(None, (note, str(why))))
