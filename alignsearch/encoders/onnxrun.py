"""ALIGN's towers on ONNX Runtime or OpenVINO, as alignsearch/encoders/onnxexport.py leaves them in the cache.

Imports neither torch nor transformers: a cold `alignsearch query TEXT` loads onnxruntime, the text
tower and the tokenizer's tokenizer.json only (about a second rather than five).

A cached folder (backend.onnx_dir(fingerprint, content digest)) holds the towers, tokenizer.json and
the manifest (records/, one record per artefact: alignsearch/encoders/records.py). It records each file's
size, modification time and SHA-256, and probe inputs with the embeddings torch gave for them at export time. A load checks size and time (a file written since is
hashed and must match), then runs the probes again and compares (cosine): a truncated, rewritten or
bit-flipped file is exported again rather than used.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from alignsearch.encoders import records
from alignsearch.encoders.backend import lock_in_use
from alignsearch.storage.paths import untrusted

log = logging.getLogger(__name__)

OPENVINO_CACHE = "openvino"  # OpenVINO's compiled graphs, beside the files they were compiled from
TOKENIZER = "tokenizer.json"
FILES = {"text-fp32": "text-fp32.onnx", "text-int8": "text-int8.onnx", "vision-fp32": "vision-fp32.onnx",
         "tokenizer": TOKENIZER}
# Cosine to torch fp32 on the probes that a tower must reach: fp32 is exact parity up to kernel
# rounding; bf16 and int8 move embeddings by design (0.9999 and 0.9995 measured on align-base geometry).
FLOOR = {"fp32": 0.9999, "bf16": 0.999, "int8": 0.99}
PROBE_TEXTS = (
    "a photo of a red car on the beach",
    "x",
    "Ünïcödé façade, 東京の夜景 at night 🙂",
    " ".join(["a big dog running across a large green field under the blue sky"] * 12),  # past the token limit
)
PROBE_SEED = 0
# Bumped when the exported graphs change: caches written before are exported again (2: the vision pooler
# as a global mean, which OpenVINO reads).
EXPORT_VERSION = 2
PROBE_IMAGES = 2


class OnnxUnusable(Exception):
    """The cached or freshly exported tower cannot be used; the message says why (one line)."""


def normalise(x: np.ndarray) -> np.ndarray:
    """Unit rows, computed in float64 as the torch path does (tiny untrained outputs would underflow)."""
    x = np.asarray(x, dtype=np.float64)
    return (x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-300)).astype(np.float32)


def probe_crops(size: tuple[int, int]) -> np.ndarray:
    """The vision probes: uint8 noise of the model's input size, the same on every machine (PCG64)."""
    h, w = size
    return np.random.default_rng(PROBE_SEED).integers(0, 256, (PROBE_IMAGES, h, w, 3), dtype=np.uint8)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (normalise(a) * normalise(b)).sum(axis=1)


CPUINFO = "/proc/cpuinfo"
# The instruction sets that change what a bf16 or int8 kernel computes (x86 flags, ARM features, as /proc/cpuinfo
# names them): AVX512-BF16 or AMX runs bf16 natively where others round through f32; VNNI takes another int8
# path than AVX2's u8s8 (which saturates). A hypervisor can hide some under the same model name.
NUMERIC_FLAGS = frozenset({"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx_vnni_int8",
                           "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "amx_fp16",
                           "asimddp", "asimdhp", "fphp", "i8mm", "bf16", "sve", "sve2", "svebf16", "svei8mm"})


def _cpuinfo(path: str = CPUINFO) -> tuple[str, set[str]]:
    """The CPU's model name and its flags (x86) or features (ARM), from the first core's lines (every core
    repeats them); the platform's name where there is no /proc/cpuinfo (macOS), with no flags."""
    import platform

    found: dict[str, str] = {}
    try:
        with open(path) as f:
            for line in f:
                name, _, value = line.partition(":")
                found.setdefault("flags" if name.strip() == "Features" else name.strip(), value.strip())
                if "model name" in found and "flags" in found:
                    break  # the other cores' lines repeat the first's (thousands on a large server)
    except OSError:
        pass
    return found.get("model name") or platform.processor() or platform.machine(), set(found.get("flags", "").split())


def machine() -> str:
    """The CPU model and core count: what decides whether ONNX Runtime or torch is faster (the vision tower's
    measured rates are kept per machine)."""
    import os

    return f"{_cpuinfo()[0]} x{os.cpu_count()}"


def numerics(cpuinfo: str = CPUINFO) -> str:
    """What a precision's parity depends on in the CPU: its model and the instruction sets of NUMERIC_FLAGS it
    has. Not its core count: more threads split a reduction differently, a rounding-level change (~1e-7) far
    inside every floor, while a refusal remembered per core count was measured again on each size of one CPU."""
    model, flags = _cpuinfo(cpuinfo)
    return f"{model} [{' '.join(sorted(flags & NUMERIC_FLAGS))}]"


def int8_saturates(cpuinfo: str = CPUINFO) -> bool:
    """Whether ONNX Runtime's int8 matrix products saturate on this CPU: x86 with AVX2 (or AVX512BW) but no VNNI runs
    u8s8 products through VPMADDUBSW, whose 16-bit pair sums clip (ONNX Runtime's quantization guide: "reduce_range"
    for such machines). On an AVX2-only EPYC the tiny test model's text tower quantized at cosine 0.9876 to torch
    (refused, floor 0.99) and at >= 0.99 with 7-bit weights. VNNI sums in 32 bits; ARM's int8 dot products too."""
    flags = _cpuinfo(cpuinfo)[1]
    return bool(flags & {"avx2", "avx512bw"}) and not flags & {"avx512_vnni", "avx_vnni", "avx_vnni_int8", "amx_int8"}


ENGINE_PACKAGES = {"onnx": "onnxruntime", "openvino": "openvino"}


def rejection_key(precision: str, engine: str, tower: str = "text") -> str:
    """The name a tower's ("text" or "vision") refusal at `precision` on `engine` is remembered under. ONNX
    Runtime's text one is the one int8 refusals had before engines were named ("text-int8"), so those stay
    remembered."""
    return f"{tower}-{precision}" if engine == "onnx" else f"{tower}-{precision}-{engine}"


def measured_on(engine: str) -> dict:
    """What a precision's parity depends on besides the weights and the export (which the cache folder's name
    and the records' export identity already key): this CPU's model and instruction sets (numerics: bf16 is AMX
    or AVX512-BF16 arithmetic) and the engine's version. A refusal measured under other ones is measured again,
    and kept beside theirs (one record per place: records.Writer.rejected), so machines that share a cache (an
    NFS home) each reuse their own. Where ONNX Runtime's int8 products saturate, its int8 file is made with 7-bit
    weights (int8_saturates), and that is said too: a refusal of the 8-bit file made there before (cosine 0.9876 on
    an AVX2-only EPYC) held the same CPU and version, so the 7-bit one was never made nor measured."""
    from importlib import metadata

    try:
        version = metadata.version(ENGINE_PACKAGES[engine])
    except metadata.PackageNotFoundError:
        version = None
    here = {"machine": numerics(), "engine": engine, "version": version}
    if engine == "onnx" and int8_saturates():
        here["int8_weights"] = "7-bit"
    return here


def rejected(manifest: dict, precision: str, engine: str, tower: str = "text") -> str | None:
    """Why `tower` ("text" or "vision") at `precision` on `engine` was refused when measured against torch
    (remembered by onnxexport.Exporter, the same way for every precision and tower), or None: never measured,
    measured good, or measured on another CPU or engine version. A refusal recorded before records said where
    (int8's, by older versions, or converted from the single manifest.json) was measured on a CPU and ONNX
    Runtime nobody knows, and int8's arithmetic depends on both (VNNI or not, the version's kernels): it held
    everywhere for ever, so int8 was never measured again. It is measured again once here, as one from another
    CPU is; the measurement then replaces it (Exporter: a refusal recorded with where, or the old record dropped)."""
    here = measured_on(engine)
    for refusal in (manifest.get("refusals") or {}).get(rejection_key(precision, engine, tower), ()):
        if refusal.get("on") == here:
            return str(refusal["why"])
    return None


def read_manifest(folder: Path) -> dict | None:
    """The cache folder's manifest as one dict (records.read), or None."""
    return records.read(folder)


def _session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # warnings about unused initializers are not the user's business
    # No busy-waiting between runs: ORT's idle threads otherwise spin on the cores that decode workers, torch
    # and faiss need (a text query took 78 ms spinning, 43 ms not, beside a torch matmul loop on 2 cores).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _openvino(path: Path, precision: str):
    """The file compiled by OpenVINO for this CPU: f32, or bf16 (on AMX or AVX512-BF16; the plan checked).

    Compiled graphs are kept in the folder's openvino/FILE/ (OpenVINO's own model cache, keyed by the file and the
    settings): a later run loads one in 0.2 s instead of reading and compiling the ONNX file for 1.1 s. A
    cache OpenVINO cannot use (unwritable, damaged) is cleared and the file compiled without it."""
    import openvino as ov

    # LATENCY: one request using every core, which is how the encoder calls it (one batch at a time); the
    # default THROUGHPUT splits the cores into streams that a single request leaves idle (half the speed).
    config = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32", "PERFORMANCE_HINT": "LATENCY"}
    cache = openvino_cache(path)
    if not any(cache.glob("*")):
        from alignsearch.notices import say

        say(f"compiling the {path.stem} graph for this CPU with OpenVINO (once per model and precision)")
    try:
        core = ov.Core()
        core.set_property({"CACHE_DIR": str(cache)})
        return core.compile_model(str(path), "CPU", config).create_infer_request()
    except Exception as exc:  # noqa: BLE001 - OpenVINO raises RuntimeError for everything
        log.info("OpenVINO's model cache in %s not used: %s", cache, str(exc).splitlines()[0][:200] if str(exc) else exc)
        clear_folder(cache)
    return ov.Core().compile_model(str(path), "CPU", config).create_infer_request()


def openvino_cache(path: Path) -> Path:
    """Where OpenVINO keeps the graphs it compiled from one tower file (one folder per file: a failed check
    clears that tower's alone)."""
    return path.parent / OPENVINO_CACHE / path.stem


def file_record(path: Path) -> dict:
    """What the manifest keeps of a file it lists."""
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256_file(path)}


def sha256_file(path: Path) -> str:
    from alignsearch.storage.ann import file_digest  # the one file hash of the project (the ANN index's too)

    return file_digest(path)


def check_file(folder: Path, manifest: dict, key: str) -> Path:
    """The path of a listed file that is as the export left it; OnnxUnusable otherwise. Size and time are
    compared on every load (free); a file whose time moved is hashed (a copy or touch passes, an edit not)."""
    entry = manifest.get("files", {}).get(key)
    path = folder / FILES[key]
    if entry is None or not path.exists():
        raise OnnxUnusable(f"no exported {key} in {folder}")
    why = untrusted(path, owners=(0,))
    if why:  # the folder is checked by cache_untrusted; the file too, where another user could rewrite it
        raise OnnxUnusable(f"not using {path}: {why}")
    st = path.stat()
    if st.st_size != entry["size"]:
        raise OnnxUnusable(f"{path} is {st.st_size} bytes, the export wrote {entry['size']}")
    if st.st_mtime_ns != entry.get("mtime_ns") and sha256_file(path) != entry.get("sha256"):
        raise OnnxUnusable(f"{path} was changed after the export (its SHA-256 differs)")
    return path


class Tower:
    """One tower file on ONNX Runtime or OpenVINO, at a precision, checked against its manifest entry when
    loaded. `key` names the file ("vision-fp32"); bf16 is OpenVINO computing the fp32 file in bf16."""

    def __init__(self, folder: Path, manifest: dict, key: str, engine: str = "onnx", precision: str | None = None):
        self.in_use = lock_in_use(folder)  # while this tower lives, its folder is never removed (exportcache)
        path = check_file(folder, manifest, key)
        self.key, self.engine, self.folder = key, engine, folder
        self.precision = precision or key.split("-")[1]
        try:
            if engine == "openvino":
                before = _blobs(openvino_cache(path))
                self.request = _openvino(path, self.precision)
                _COMPILED_HERE.update(_blobs(openvino_cache(path)) - before)
                self.inputs = [i.get_any_name() for i in self.request.model_inputs]
            else:
                self.session = _session(path)
                self.inputs = [i.name for i in self.session.get_inputs()]
        except Exception as exc:  # noqa: BLE001 - the engines raise their own Fail/InvalidGraph/RuntimeError types
            raise OnnxUnusable(f"{engine} cannot load {path}: {str(exc).splitlines()[0][:200]}") from None

    def run(self, **feeds: np.ndarray) -> np.ndarray:
        inputs = {k: feeds[k] for k in self.inputs}
        if self.engine == "openvino":
            return normalise(self.request.infer(inputs)[0])
        return normalise(self.session.run(None, inputs)[0])

    def check(self, got: np.ndarray, want: Sequence) -> float:
        """The lowest probe cosine to what torch gave; OnnxUnusable below this precision's floor."""
        worst = float(cosines(got, np.asarray(want, dtype=np.float32)).min())
        floor = FLOOR[self.precision]
        if not worst >= floor:  # NaN fails too
            raise OnnxUnusable(f"the {self.key} tower on {self.engine} at {self.precision} gives cosine {worst:.6f} "
                               f"to torch on the probes (needs {floor})")
        return worst


def text_feeds(ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    return {"input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64)}


def load_text(folder: Path, manifest: dict, precision: str, tokenize, probes: int | None = None,
              engine: str = "onnx") -> Tower:
    """The text tower at `precision` on `engine`, its probes (the first `probes` of them) re-run through
    `tokenize(texts) -> (ids, mask)`. bf16 is the fp32 file on OpenVINO."""
    ids, mask = tokenize(list(manifest["probes"]["texts"][:probes]))
    key = f"text-{'int8' if precision == 'int8' else 'fp32'}"
    return _checked(lambda: Tower(folder, manifest, key, engine, precision),
                    lambda tower: tower.check(tower.run(**text_feeds(ids, mask)), manifest["probes"]["text"][:probes]))


def load_vision(folder: Path, manifest: dict, size: tuple[int, int], engine: str = "onnx",
                precision: str = "fp32") -> Tower:
    return _checked(lambda: Tower(folder, manifest, "vision-fp32", engine, precision),
                    lambda tower: tower.check(tower.run(crops=probe_crops(size)), manifest["probes"]["image"]))


# The compiled graphs (path, size, time) OpenVINO wrote into its cache in this process, from a file checked
# before (check_file). A tower that fails its probes on those alone drifts at that precision: clearing and
# compiling again gives the same graph. A bf16 text tower that drifts is loaded up to four times in one run (the
# cold path's head start and its own try, then the checkpoint's, before and after its fp32 check), and each
# failure cleared the graphs, compiled again and said so: four warnings for one measurement. (OpenVINO keeps
# one graph per file for f32 and bf16 alike: whether a compile wrote a new one does not tell.)
_COMPILED_HERE: set[tuple] = set()


def _blobs(folder: Path) -> set[tuple]:
    found = set()
    for blob in folder.glob("*"):
        try:
            st = blob.stat()
        except OSError:
            continue
        found.add((str(blob), st.st_size, st.st_mtime_ns))
    return found


def _checked(make, check) -> Tower:
    """make() a tower and check() its probes. On OpenVINO a failed check on graphs another run compiled is tried
    once more with them cleared: a damaged cache blob gave cosine -0.02 from an intact ONNX file. On graphs this
    process compiled (_COMPILED_HERE) the failure is the precision's drift, and stands."""
    tower = make()
    try:
        check(tower)
    except OnnxUnusable as why:
        cache = openvino_cache(tower.folder / FILES[tower.key])
        if tower.engine != "openvino" or _blobs(cache) <= _COMPILED_HERE:
            raise
        log.warning("OpenVINO's %s graph at %s, compiled by an earlier run, fails its probes (%s): clearing the "
                    "graphs in %s and compiling again, once (a damaged compiled graph fails so; a precision that "
                    "drifts from fp32 fails again, and is then refused)",
                    tower.key, tower.precision, why, cache)
        clear_folder(cache)
        tower = make()
        check(tower)
    return tower


def clear_folder(folder: Path) -> None:
    """Delete the files in folder (OpenVINO's compiled graphs), what can be deleted."""
    for blob in folder.glob("*"):
        try:
            blob.unlink()
        except OSError:
            pass


def tokenizer(folder: Path, max_length: int, pad_id: int, pad_token: str):
    """tokenize(texts) -> (ids, mask) from tokenizer.json, as transformers' fast tokenizer is called
    (padding to the longest text, truncation at max_length)."""
    try:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(folder / TOKENIZER))
    except Exception as exc:  # noqa: BLE001 - the tokenizers library raises a bare Exception for a file it cannot read
        raise OnnxUnusable(f"cannot read {folder / TOKENIZER}: {str(exc).splitlines()[0][:200] if str(exc) else exc!r}") from None
    tok.enable_truncation(max_length=max_length)
    tok.enable_padding(pad_id=pad_id, pad_token=pad_token)

    def tokenize(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        enc = tok.encode_batch(texts)
        return np.array([e.ids for e in enc]), np.array([e.attention_mask for e in enc])

    return tokenize


class TextEncoder:
    """A cached text tower with its own tokenizer.json: texts in, unit vectors out, with neither torch nor
    transformers. The text tower of encoders that run from the cache (resolve.Cached)."""

    def __init__(self, folder: Path, manifest: dict, precision: str, engine: str = "onnx"):
        t = manifest["tokenizer"]
        check_file(folder, manifest, "tokenizer")
        self.tokenize = tokenizer(folder, int(manifest["max_length"]), int(t["pad_id"]), t["pad_token"])
        self.name = manifest["model"]
        self.fingerprint = manifest["fingerprint"]
        self.dim = int(manifest["dim"])
        self.temperature = float(manifest["temperature"])
        self.max_length = int(manifest["max_length"])
        # The three short probes: the long one (64 tokens) would double a cold query's check, and any damage
        # to the weights shows in every probe (the file hashes catch the rest).
        self.tower = load_text(folder, manifest, precision, self.tokenize, probes=3, engine=engine)

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        if isinstance(texts, str):
            texts = [texts]
        return self.tower.run(**text_feeds(*self.tokenize(list(texts))))

