"""Exporting ALIGN's towers to ONNX, once per model, checked against torch before anything uses them.

Each tower is exported with torch.onnx on first use, run on probe inputs by ONNX Runtime and compared
with torch fp32 (cosine >= 0.9999, onnxrun.FLOOR), and only then recorded in the cache folder's
manifest (a record per artefact: alignsearch/encoders/records.py), where later runs (and other indexes of
the same model) find it by the model's fingerprint.
The vision tower takes the uint8 crops the reader makes and scales them inside the graph, so the
preprocessing stays exactly what the index records (images.ImageSpec) and no float copy is made in
Python. Anything that fails raises onnxrun.OnnxUnusable with one line saying why; the encoder then runs
on torch.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from dataclasses import asdict
from functools import partial
from pathlib import Path

import numpy as np
import torch

from alignsearch import atomic
from alignsearch.encoders import exportcache, records
from alignsearch.encoders.backend import cache_untrusted, make_cache_dir, onnx_dir
from alignsearch.encoders.onnxrun import (EXPORT_VERSION, FILES, PROBE_TEXTS, TOKENIZER, OnnxUnusable, Tower,
                                 clear_folder, file_record, int8_saturates, load_text, load_vision, machine,
                                 measured_on, openvino_cache, probe_crops, read_manifest, rejected, rejection_key,
                                 tokenizer)
from alignsearch.encoders.pixels import scale_pixels

log = logging.getLogger(__name__)
OPSET = 17


def _features(output) -> torch.Tensor:
    # transformers 4.x returns the tensor; 5.x an output object whose pooler_output is the embedding.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class _TextTower(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return _features(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))


class _GlobalPool(torch.nn.Module):
    """ALIGN's pooler is AvgPool2d (MaxPool2d) with a kernel of hidden_dim (2560) and ceil_mode, which pools
    the whole 9x9 map; OpenVINO refuses that graph (a kernel larger than its input). The same arithmetic,
    written as a mean (max) over the map, exports as a graph both engines run; the probes check it."""

    def __init__(self, pooler: torch.nn.Module):
        super().__init__()
        self.mean = isinstance(pooler, torch.nn.AvgPool2d)

    def forward(self, x):
        return x.mean(dim=(2, 3), keepdim=True) if self.mean else x.amax(dim=(2, 3), keepdim=True)


class _VisionTower(torch.nn.Module):
    """uint8 (N, H, W, 3) crops in, features out: model.to_pixel_values' arithmetic, inside the graph."""

    def __init__(self, model, spec):
        super().__init__()
        self.model = model
        self.spec = spec

    def forward(self, crops):
        vision = self.model.vision_model
        pooler = vision.pooler
        vision.pooler = _GlobalPool(pooler)  # for the export only: the model is the Encoder's own
        try:
            return _features(self.model.get_image_features(pixel_values=scale_pixels(crops, self.spec)))
        finally:
            vision.pooler = pooler


def _export(module: torch.nn.Module, args: tuple, path: Path, names: list[str], axes: dict) -> str:
    """Write one ONNX file (weights inside it). The TorchScript exporter first: it takes a second where
    torch.export takes minutes on align-base; torch.export (dynamo) when the former fails or is gone."""
    module = module.eval()
    kw = dict(input_names=names, output_names=["embeds"], dynamic_axes=axes, opset_version=OPSET)
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(module, args, str(path), dynamo=False, **kw)
            return "torchscript"
        except Exception as first:  # noqa: BLE001 - any exporter failure: try the other one
            log.info("TorchScript ONNX export failed (%s); trying torch.export", first)
            torch.onnx.export(module, args, str(path), dynamo=True, external_data=False, **kw)
            return "dynamo"


def _timed(fn) -> float:
    import time

    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _versions(*names: str) -> dict:
    """The installed versions of these packages (those installed), without importing them."""
    from importlib import metadata

    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def _entry(exc: OSError, folder: Path) -> str:
    """The path an OSError names, relative to folder when inside it, else as it is (the folder itself, or a
    parent of it: a file where a folder should be, a folder not writable). A rename's is its destination."""
    path = Path(os.fsdecode(exc.filename2 or exc.filename))
    return str(path.relative_to(folder)) if folder in path.parents else str(path)


def _spec_dict(spec) -> dict:
    return json.loads(json.dumps(asdict(spec)))  # tuples as lists, as the manifest reads back


WAIT_NOTICES = {  # what a first use waits for, said once (alignsearch/notices.py); align-base's times
    "vision-fp32": "exporting the vision tower to ONNX and checking it against torch (once per model: about half a "
                   "minute for align-base)",
    "text-fp32": "exporting the text tower to ONNX (once per model: a few seconds), so text queries need no torch",
    "text-int8": "quantizing the text tower to int8 (once per model: about 15 s for align-base)",
}


class Exporter:
    """The cache folder of one loaded model (model.Encoder): exports, checks and records its towers, each
    in its own record (records.Writer): two processes exporting different towers at once keep both."""

    def __init__(self, enc):
        self.enc = enc
        self.folder = onnx_dir(enc.fingerprint, enc.content_digest)
        why = cache_untrusted(self.folder)
        if why:  # never read from nor written to: the model runs on torch, and says why
            raise OnnxUnusable(f"the model cache is not private: {why}")
        exportcache.remove_leftovers(self.folder.parent)  # a removal killed midway: finished now, not at the next export
        disk = read_manifest(self.folder)
        self.manifest = self._current(disk)
        # an older export (another export version) is in the folder: its towers not exported again are
        # removed once the new ones are recorded (exportcache.remove_stale_files)
        self._outdated_ns = time.time_ns() if isinstance(disk, dict) and disk is not self.manifest else None
        self.records = records.Writer(self.folder, self.manifest)
        self._stamp = getattr(enc, "checkpoint_stamp", None)
        if self._stamp is not None and self._stamp not in self.manifest.setdefault("checkpoints", []):
            # where these exact weights were loaded from: cached.find then runs the exports without loading them
            self.manifest["checkpoints"] = (self.manifest["checkpoints"] + [self._stamp])[-records.MAX_CHECKPOINTS:]
            if records.exists(self.folder):
                self._record_stamp()

    def _current(self, manifest: dict | None) -> dict:
        """`manifest` if it describes this model and preprocessing, else a fresh one."""
        enc = self.enc
        ident = {"fingerprint": enc.fingerprint, "content_digest": enc.content_digest, "spec": _spec_dict(enc.spec),
                 "export_version": EXPORT_VERSION}
        if not isinstance(manifest, dict) or any(manifest.get(k) != v for k, v in ident.items()):
            manifest = {**ident, "files": {}, "probes": {}}
        manifest.update(model=enc.name, dim=enc.dim, max_length=enc.max_length, temperature=enc.temperature)
        return manifest

    def text(self, precision: str, engine: str = "onnx") -> Tower:
        """The text tower at fp32 or int8 (bf16: fp32 on OpenVINO) on `engine`, exported (and quantized)
        when not cached or not right. Below fp32 it is measured against torch once (on a checked fp32 tower: a
        damaged file is exported again, not taken for drift), and a refusal is remembered (_reject)."""
        why = rejected(self.manifest, precision, engine)
        if why:  # measured: this model drifts at this precision here; no compiling, quantizing or export again
            raise OnnxUnusable(why)
        try:
            return self._passed(load_text(self.folder, self.manifest, precision, self._tokenize, engine=engine), engine)
        except (OnnxUnusable, KeyError) as why:
            if records.exists(self.folder):
                log.info("the cached %s text tower is not used (made or measured again): %s", precision, why)
        if precision == "fp32":
            self._write(self._make_text, "text-fp32")
            return load_text(self.folder, self.manifest, precision, self._tokenize, engine=engine)
        self.text("fp32", engine)  # a checked fp32 tower: the one int8 quantizes, the one bf16 computes
        if precision == "int8":
            self._write(self._make_int8, "text-int8")
        try:
            return self._passed(load_text(self.folder, self.manifest, precision, self._tokenize, engine=engine), engine)
        except OnnxUnusable as why:
            self._reject(precision, engine, why)
            raise

    def _passed(self, tower: Tower, engine: str) -> Tower:
        """`tower`, which passed its probes: a refusal of it recorded without where it was measured (by an older
        version: onnxrun.rejected measures it again) is dropped, so the record says what was measured here."""
        key = rejection_key(tower.precision, engine, tower.key.split("-")[0])
        refusals = self.manifest.get("refusals", {}).get(key)
        if key in self.manifest.get("rejected", {}) and (refusals is None or any(r.get("on") is None for r in refusals)):
            placed = [r for r in refusals or () if r.get("on") is not None]  # other places' refusals stay
            self.manifest.setdefault("refusals", {})[key] = placed
            if not placed:
                self.manifest["rejected"].pop(key)
            try:
                self.records.drop_rejected(key)
            except OSError:
                pass  # dropped next time
        return tower

    def _reject(self, precision: str, engine: str, why: OnnxUnusable, tower: str = "text") -> None:
        """Remember that `tower` ("text" or "vision") drifts too far at `precision` on `engine` (one rule for
        int8 and bf16, text and images), with where it was measured (onnxrun.measured_on): later runs go
        straight to fp32 on that engine, and measure again only for other weights, another export version, CPU
        or engine version. A file made for that precision alone (int8's) is deleted."""
        key, own, on = rejection_key(precision, engine, tower), f"{tower}-{precision}", measured_on(engine)
        if own in FILES:  # int8's file (bf16 computes the checked fp32 one, kept)
            (self.folder / FILES[own]).unlink(missing_ok=True)
            self.manifest["files"].pop(own, None)
        self.manifest.setdefault("rejected", {})[key] = str(why)
        refusals = self.manifest.setdefault("refusals", {})  # other places' stay; an unplaced one is replaced
        refusals[key] = [r for r in refusals.get(key, []) if r.get("on") not in (None, on)] + [{"why": str(why), "on": on}]
        try:
            if own in FILES:
                self.records.drop_file(own)
            self.records.rejected(key, str(why), on)
        except OSError:
            pass  # measured again next time

    def vision(self, engine: str = "onnx", precision: str = "fp32") -> Tower:
        """The vision tower at fp32 (bf16: fp32 on OpenVINO) on `engine`, exported when not cached or not right.
        bf16 is measured as text's precisions are (text): once, on a checked fp32 tower (a damaged file is
        exported again, not taken for drift), and a refusal is remembered (_reject): without that, every run
        measured it again, exported the vision tower again and ran the whole model on torch."""
        size = self.enc.spec.output_size
        why = rejected(self.manifest, precision, engine, "vision") if precision != "fp32" else None
        if why:  # measured: the images drift at this precision here; no compiling or export again
            raise OnnxUnusable(why)
        try:
            return self._passed(load_vision(self.folder, self.manifest, size, engine, precision), engine)
        except (OnnxUnusable, KeyError) as why:
            if records.exists(self.folder):
                log.info("the cached vision tower is not used at %s (made or measured again): %s", precision, why)
        if precision == "fp32":
            self._write(self._make_vision, "vision-fp32")
            return load_vision(self.folder, self.manifest, size, engine, precision)
        self.vision(engine)  # a checked fp32 tower: the one bf16 computes
        try:
            return self._passed(load_vision(self.folder, self.manifest, size, engine, precision), engine)
        except OnnxUnusable as why:
            self._reject(precision, engine, why, "vision")
            raise

    def vision_speed(self, engines: tuple[str, ...]) -> dict:
        """Images per second of each engine ("onnx", "openvino", "torch"; fp32) for the vision tower on this
        machine, measured on the probes (best of two warm runs each) and kept in the manifest per machine
        (which is fastest depends on the CPU: backend.faster_for_images); measured again when an engine was
        installed since. An engine that cannot load the tower counts 0; OnnxUnusable when none can (the
        export itself failed: the encoder falls back to torch and says why)."""
        here = machine()
        speeds = self.manifest.setdefault("vision_speed", {})
        if set(engines) <= set(speeds.get(here, {})):
            return {e: speeds[here][e] for e in engines}
        crops = probe_crops(self.enc.spec.output_size)
        from alignsearch.notices import say

        say("measuring which engine runs the vision tower fastest on this CPU (once per CPU and model)")

        def rate(fn) -> float:
            fn()
            best = min(_timed(fn) for _ in range(2))
            return round(len(crops) / best, 3)

        measured, failures = {}, []
        for engine in engines:
            if engine == "torch":
                measured[engine] = rate(lambda: self.enc._torch_crops(crops, "fp32"))
                continue
            try:
                tower = self.vision(engine)
            except OnnxUnusable as why:
                log.info("the vision tower on %s is not measured: %s", engine, why)
                measured[engine] = 0.0
                failures.append(why)
                continue
            measured[engine] = rate(partial(tower.run, crops=crops))
            del tower  # its compiled graph's memory: only the winner is loaded again
        if failures and len(failures) == len(engines) - ("torch" in engines):
            raise failures[0]
        speeds[here] = measured
        try:
            self.records.speed(here, measured)
        except OSError:
            pass  # measured again next time
        return measured

    # -- making files -------------------------------------------------------------------------------
    def _tokenize(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        b = self.enc.tokenizer(texts, padding=True, truncation=True, max_length=self.enc.max_length, return_tensors="np")
        return b["input_ids"], b["attention_mask"]

    def _make_text(self, path: Path) -> str:
        ids, mask = self._tokenize(list(PROBE_TEXTS))
        how = _export(_TextTower(self.enc.model), (torch.from_numpy(ids), torch.from_numpy(mask)), path,
                      ["input_ids", "attention_mask"], {"input_ids": {0: "n", 1: "tokens"},
                                                        "attention_mask": {0: "n", 1: "tokens"}, "embeds": {0: "n"}})
        self.manifest["probes"]["texts"] = list(PROBE_TEXTS)
        self.manifest["probes"]["text"] = self.enc._torch_text(list(PROBE_TEXTS), "fp32").tolist()
        self._tokenizer_json(ids, mask)
        return how

    def _make_int8(self, path: Path) -> str:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        reduced = int8_saturates()
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # the quantizer logs its advice on the root logger
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                # 7-bit weights where the CPU's int8 products saturate (onnxrun.int8_saturates); the file is
                # measured against torch where it runs, as any int8 file is (made elsewhere: refused if it must be)
                quantize_dynamic(str(self.folder / FILES["text-fp32"]), str(path), weight_type=QuantType.QInt8,
                                 reduce_range=reduced)
        finally:
            root.setLevel(level)
        return f"onnxruntime.quantization.quantize_dynamic(QInt8{', reduce_range' if reduced else ''})"

    def _make_vision(self, path: Path) -> str:
        crops = probe_crops(self.enc.spec.output_size)
        how = _export(_VisionTower(self.enc.model, self.enc.spec), (torch.from_numpy(crops),), path, ["crops"],
                      {"crops": {0: "n"}, "embeds": {0: "n"}})
        self.manifest["probes"]["image"] = self.enc._torch_crops(crops, "fp32").tolist()
        return how

    def _tokenizer_json(self, ids: np.ndarray, mask: np.ndarray) -> None:
        """Save the fast tokenizer for torch-free queries, if the `tokenizers` library alone gives the same
        ids as transformers on the probes (else cold queries load transformers, as before)."""
        tok = self.enc.tokenizer
        if not getattr(tok, "is_fast", False) or tok.pad_token is None:
            self.manifest.pop("tokenizer", None)
            return
        atomic.write_bytes(self.folder / TOKENIZER, tok.backend_tokenizer.to_str().encode(), durable=False)
        self.manifest["files"]["tokenizer"] = file_record(self.folder / TOKENIZER)
        self.manifest["tokenizer"] = {"pad_id": int(tok.pad_token_id), "pad_token": str(tok.pad_token)}
        try:
            light = tokenizer(self.folder, self.enc.max_length, int(tok.pad_token_id), str(tok.pad_token))
            lids, lmask = light(list(PROBE_TEXTS))
            same = lids.shape == ids.shape and (lids == ids).all() and (lmask == mask).all()
        except Exception as exc:  # noqa: BLE001
            log.info("tokenizer.json not usable on its own: %s", exc)
            same = False
        if not same:
            log.info("the tokenizers library tokenizes differently from transformers: cold queries load transformers")
            self.manifest.pop("tokenizer", None)

    def _record_stamp(self) -> None:
        try:
            self.records.checkpoint(self._stamp)
        except OSError:
            pass  # recorded with the next export, or never: the checkpoint is then loaded each run

    def _write(self, make, key: str) -> None:
        """make(path) writes the file; it replaces the cached one atomically, then the manifest records it."""
        from alignsearch.notices import say

        say(WAIT_NOTICES.get(key, f"preparing the {key} tower (once per model)"))
        try:
            make_cache_dir(self.folder)
            for where in (self.folder, self.folder / records.FOLDER):  # killed exports' temporaries, up to GBs
                atomic.remove_stale_in(where)  # not another process's export at work: it holds their lock
            final = self.folder / FILES[key]
            with atomic.replacing(final, durable=False) as tmp:
                try:
                    how = make(tmp)
                except OSError:
                    raise
                except Exception as exc:  # noqa: BLE001 - an exporter's failure is a reason to run on torch
                    raise OnnxUnusable(f"could not export the {key} tower to ONNX: {str(exc).splitlines()[0][:200]}") from None
            clear_folder(openvino_cache(final))  # graphs compiled from the file replaced (~250 MB each)
            self.manifest["files"][key] = {**file_record(final), "made_by": how, "torch": torch.__version__,
                                          **_versions("onnxruntime", "openvino")}
            if key == "text-fp32" and "tokenizer" in self.manifest["files"]:  # written with it (_tokenizer_json)
                self.records.file("tokenizer", self.manifest["files"]["tokenizer"], self.manifest)
            self.records.file(key, self.manifest["files"][key], self.manifest)
            if self._stamp is not None:
                self._record_stamp()
            if self._outdated_ns is not None:
                exportcache.remove_stale_files(self.folder, self.manifest, self._outdated_ns)
        except OSError as exc:
            # which entry: one of another kind (a folder at a record's name) is never deleted, so it stays in the way
            where = f"{_entry(exc, self.folder)}: " if exc.strerror and (exc.filename or exc.filename2) else ""
            raise OnnxUnusable(f"cannot write the ONNX cache in {self.folder}: {where}{exc.strerror or exc}") from None
        if {"vision-fp32", "text-fp32"} <= set(self.manifest["files"]):  # complete: what it replaces can go
            gone = exportcache.remove_superseded(self.folder, self.manifest)
            if gone:
                say(f"removed {len(gone)} superseded export(s) of this model from the cache "
                    f"({sum(n for _, n in gone) / 2**20:.0f} MiB)")
