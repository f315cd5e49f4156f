"""The ONNX cache's manifest: one small JSON record per artefact, each written atomically on its own.

A cache folder (backend.onnx_dir) keeps its records in records/: model.json (what the exports are of: the
model's identity, preprocessing and sizes), file-KEY.json per exported file (its size, time and SHA-256,
and what it needs to be checked: the probes torch answered for a tower, the pad token for tokenizer.json),
rejected-KEY@PLACE.json (a tower measured unusable at a precision: int8 or bf16 text, bf16 images, that drift, one
per place it was measured: the CPU and engine version; rejected-KEY.json for one written before refusals said
where), speed-MACHINE.json (the vision tower's measured engine rates on one CPU) and
checkpoint-PLACE.json (the stamp of a checkpoint folder these weights were loaded from). Two processes
exporting different towers each write their own record, so neither needs a merge, and a crash leaves every
record whole (the old or the new one). One step is shared: a writer's first record checks model.json and, where
it is missing or another export's, clears the folder and writes its own. That is done under an exclusive lock
(write.lock, beside the records): two first writers into an empty folder each read "no model.json" and the
later one's clearing deleted the records the other had written meanwhile (an `index` and a `serve` measuring
at once kept one of their two records, and the other measured again on its next run).

read() assembles them into one dict of the shape the single manifest.json had before; a folder that still
holds only that older manifest.json is read as it is, and converted to records on the next write.

Each record names the export it belongs to (OF: a digest of model.json's IDENTITY), and read() takes only
those of model.json's: two processes of different export versions writing into one folder at once (one
clears the other's records and writes its model.json, the other, already past that, goes on writing its
own) leave records of the other version that are skipped (their artefacts made again), never taken for
this one's. A record is read as a regular file, never through a symlink, of a bounded size (safeopen):
one that is not (or not JSON) is taken for missing, and its artefact made again.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from alignsearch import atomic, safeopen

log = logging.getLogger(__name__)

FOLDER = "records"
LEGACY = "manifest.json"  # the single manifest written before per-artefact records
MODEL = "model.json"
LOCK = "write.lock"  # in FOLDER, not a record (*.json): held while a first write checks or clears the folder
LOCK_WAIT = 60.0  # seconds a writer waits for another's first write (milliseconds of work; else a stopped process)
IDENTITY = ("fingerprint", "content_digest", "spec", "export_version")
MODEL_KEYS = IDENTITY + ("model", "dim", "max_length", "temperature")
MAX_CHECKPOINTS = 8  # checkpoint folders (stamps) remembered per model
MAX_PLACES = 8  # places (CPU and engine version) a refusal is remembered for, per tower and precision
MAX_RECORD_BYTES = 4 << 20  # a tower's probes are tens of KB; a larger file is not a record
OF = "of"  # the key naming, in every record but model.json, the export it belongs to (of_export)
# What using a damaged manifest's values raises (a key missing, a value of another type or shape): readers
# take such a manifest for no export at all, and the full load exports again.
DAMAGED = (LookupError, TypeError, ValueError, AttributeError)
# What a file's record carries besides its own entry, per manifest key: the probes of its tower, the pad token.
_FILE_EXTRAS = {"text-fp32": (("probes", "texts"), ("probes", "text")), "vision-fp32": (("probes", "image"),),
                "tokenizer": (("tokenizer",),)}


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _at(record) -> int:
    """When a checkpoint record was written (0 where it cannot be read), to keep the latest ones."""
    at = record.get("at") if isinstance(record, dict) else None
    return at if isinstance(at, int) else 0


def of_export(model: dict) -> str:
    """The digest of an export's identity, which its records carry under OF."""
    return _digest(json.dumps([model.get(k) for k in IDENTITY], sort_keys=True, default=str))


def _load(path: Path):
    """The JSON in the regular file at path (not a symlink, at most MAX_RECORD_BYTES), else None."""
    try:
        data = safeopen.read_fd(safeopen.open_regular(path, follow=False), MAX_RECORD_BYTES)
        return json.loads(data) if len(data) <= MAX_RECORD_BYTES else None
    except (OSError, ValueError, safeopen.Refused):
        return None


def read(folder: Path) -> dict | None:
    """The folder's manifest as one dict (records assembled; else the older manifest.json), or None when it
    has none that reads as a JSON object. The values are not validated here: each reader checks what it uses."""
    folder = Path(folder)
    model = _load(folder / FOLDER / MODEL)
    if not isinstance(model, dict):
        legacy = _load(folder / LEGACY)
        return legacy if isinstance(legacy, dict) else None
    manifest = {**{k: model[k] for k in MODEL_KEYS if k in model}, "files": {}, "probes": {}, "rejected": {},
                "refusals": {}, "vision_speed": {}, "checkpoints": []}
    stamps, refusals, of = [], [], of_export(model)
    for path in sorted((folder / FOLDER).glob("*.json")):
        record = _load(path)
        # a damaged record, or another export's: its artefact is made again. One without OF was written before
        # records named their export (only an older version writes such): taken, as that version did
        if not isinstance(record, dict) or record.get(OF, of) != of:
            continue
        kind, _, key = path.stem.partition("-")
        if kind == "file" and isinstance(record.get("entry"), dict):
            manifest["files"][key] = record["entry"]
            for part in _FILE_EXTRAS.get(key, ()):
                if part[-1] in record:
                    target = manifest
                    for name in part[:-1]:
                        target = target.setdefault(name, {})
                    target[part[-1]] = record[part[-1]]
        elif kind == "rejected" and "why" in record:
            key = record["key"] if isinstance(record.get("key"), str) else key.partition("@")[0]
            refusals.append((_at(record), key, {"why": record["why"], "on": record.get("on")}))
        elif kind == "speed" and isinstance(record.get("speed"), dict):
            manifest["vision_speed"][str(record.get("machine"))] = record["speed"]
        elif kind == "checkpoint" and "stamp" in record:
            stamps.append((_at(record), record["stamp"]))
    manifest["checkpoints"] = [s for _, s in sorted(stamps, key=lambda t: t[0])]
    # per key: every place's refusal (on: where it was measured, None before refusals said where: onnxrun.rejected
    # takes the one measured here), and in "rejected" the latest one's reason, to say what was refused
    for _, key, refusal in sorted(refusals, key=lambda t: t[0]):
        manifest["refusals"].setdefault(key, []).append(refusal)
        manifest["rejected"][key] = refusal["why"]
    return manifest


def exists(folder: Path) -> bool:
    """Has the folder a manifest (records, or the older single file)?"""
    return (Path(folder) / FOLDER / MODEL).exists() or (Path(folder) / LEGACY).exists()


def is_legacy(folder: Path) -> bool:
    return (Path(folder) / LEGACY).exists() and not (Path(folder) / FOLDER / MODEL).exists()


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Hold the records folder's LOCK (flock) for the block. Opened as the index's lock files are (indexer/lock.py):
    created 0600 (the folder's trust check judges every entry in it: backend.cache_untrusted), never through a
    symbolic link, a FIFO opened at once. Another process holding it longer than LOCK_WAIT is an OSError, which
    callers take as "not recorded" (made or measured again next time). Where the filesystem has no flock
    (ENOLCK, EOPNOTSUPP), the write goes on unlocked, as every write did before."""
    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + LOCK_WAIT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise OSError(errno.EWOULDBLOCK, f"another process held {folder / LOCK} for {LOCK_WAIT:.0f} s",
                                  str(folder / LOCK)) from None
                time.sleep(0.02)
            except OSError as exc:
                if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                break
        yield  # the lock goes with the descriptor, also when the process dies
    finally:
        os.close(fd)


class Writer:
    """Writes one cache folder's records, each atomically (alignsearch/atomic.py). The first write makes
    model.json and converts an older manifest.json (one line in the log), or clears records left by an
    export of another version."""

    def __init__(self, folder: Path, model: dict):
        self.folder = Path(folder)
        self.model = {k: model[k] for k in MODEL_KEYS}
        self._of = of_export(self.model)
        self._ready = False

    def _put(self, name: str, record: dict) -> None:
        if name != MODEL:
            record = {**record, OF: self._of}
        atomic.write_bytes(self.folder / FOLDER / name, json.dumps(record, indent=1).encode(), durable=False)

    def _prepare(self) -> None:
        """model.json current before any other record is written (a reader takes records under it). An older
        manifest.json is converted before model.json is written: until then readers still read the older file,
        and a run killed half-way through converts it again, whole, next time."""
        if self._ready:
            return
        records = self.folder / FOLDER
        records.mkdir(mode=0o700, exist_ok=True)
        with _locked(records):  # read, clear and write model.json as one step: see the module's docstring
            legacy = _load(self.folder / LEGACY) if is_legacy(self.folder) else None
            on_disk = _load(records / MODEL)
            if not (isinstance(on_disk, dict) and all(on_disk.get(k) == self.model[k] for k in IDENTITY)):
                for stale in records.glob("*.json"):  # another export version's records describe other files
                    stale.unlink(missing_ok=True)
            if isinstance(legacy, dict) and all(legacy.get(k) == self.model[k] for k in IDENTITY):
                log.info("note: converting the ONNX cache manifest in %s to per-artefact records", self.folder)
                self._convert(legacy)
            # replaced only when it changes: every process's first record rewrote it, and a reader meeting the replace
            # (safeopen: "replaced by another file while it was opened") took the whole cache for none, exported again
            if on_disk != json.loads(json.dumps(self.model)):
                self._put(MODEL, self.model)
            if (self.folder / LEGACY).exists():
                (self.folder / LEGACY).unlink(missing_ok=True)
        self._ready = True

    def _convert(self, legacy: dict) -> None:
        """The older single manifest's entries as records: what it listed stays usable without exporting again."""
        try:
            for key, entry in (legacy.get("files") or {}).items():
                self._file(key, entry, legacy)
            for key, why in (legacy.get("rejected") or {}).items():
                self._put(f"rejected-{key}.json", {"why": why})
            for machine, speed in (legacy.get("vision_speed") or {}).items():
                self._put(f"speed-{_digest(machine)}.json", {"machine": machine, "speed": speed})
            for i, stamp in enumerate(legacy.get("checkpoints") or []):
                self._put(f"checkpoint-{_digest(str(stamp.get('path')))}.json", {"stamp": stamp, "at": i})
        except (AttributeError, TypeError, KeyError) as exc:  # a damaged older manifest: its towers are made again
            log.info("the older ONNX cache manifest in %s is not converted: %s", self.folder, exc)

    def _file(self, key: str, entry: dict, manifest: dict) -> None:
        record = {"entry": entry}
        for part in _FILE_EXTRAS.get(key, ()):
            value = manifest
            for name in part:
                value = value.get(name) if isinstance(value, dict) else None
            if value is not None:
                record[part[-1]] = value
        self._put(f"file-{key}.json", record)

    def file(self, key: str, entry: dict, manifest: dict) -> None:
        """Record an exported file (its entry, with its probes or pad token taken from `manifest`)."""
        self._prepare()
        self._file(key, entry, manifest)

    def drop_file(self, key: str) -> None:
        (self.folder / FOLDER / f"file-{key}.json").unlink(missing_ok=True)

    def rejected(self, key: str, why: str, on: dict) -> None:
        """Record a tower refused at a precision where it was measured (`on`: onnxrun.measured_on), in a record of
        that place's own: a cache shared by machines of other CPUs keeps each one's (one record per key, each
        overwriting the other's, made every machine measure again after another had). It replaces one written
        before refusals said where; the MAX_PLACES latest places are kept."""
        import time

        self._prepare()
        self._put(f"rejected-{key}@{_digest(json.dumps(on, sort_keys=True))}.json",
                  {"key": key, "why": why, "on": on, "at": time.time_ns()})
        self.drop_rejected(key)
        self._keep_latest(f"rejected-{key}@*.json", MAX_PLACES)

    def drop_rejected(self, key: str) -> None:
        """Forget a refusal recorded without where it was measured (measured again: onnxrun.rejected)."""
        self._prepare()  # an older manifest.json is converted first, or its refusal would come back
        (self.folder / FOLDER / f"rejected-{key}.json").unlink(missing_ok=True)

    def _keep_latest(self, pattern: str, n: int) -> None:
        kept = sorted((_at(_load(p)), p) for p in (self.folder / FOLDER).glob(pattern))
        for _, old in kept[:-n]:
            old.unlink(missing_ok=True)

    def speed(self, machine: str, speed: dict) -> None:
        self._prepare()
        self._put(f"speed-{_digest(machine)}.json", {"machine": machine, "speed": speed})

    def checkpoint(self, stamp: dict) -> None:
        """Remember a checkpoint folder's stamp (the latest per folder), and the MAX_CHECKPOINTS latest folders."""
        import time

        self._prepare()
        self._put(f"checkpoint-{_digest(str(stamp.get('path')))}.json", {"stamp": stamp, "at": time.time_ns()})
        self._keep_latest("checkpoint-*.json", MAX_CHECKPOINTS)
