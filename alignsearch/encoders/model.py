"""The ALIGN encoder: loads a checkpoint with from_pretrained and turns text and images into unit vectors."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from alignsearch.encoders.backend import CPU_MICRO_BATCH, encoder_options
from alignsearch.encoders.encoding import DEFAULT_MODEL, EncoderBase, ImageInput, checkpoint_stamp, describe_model
from alignsearch.encoders.pixels import scale_pixels, to_pixel_values
from alignsearch.encoders.resolve import resolve
from alignsearch.errors import BadInputError, ModelLoadError, ModelMismatchError, UsageError
from alignsearch.media.images import ImageSpec

log = logging.getLogger(__name__)
__all__ = ["DEFAULT_MODEL", "Encoder", "ImageInput", "load_recorded", "scale_pixels", "to_pixel_values"]


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise UsageError(f"unknown device {device!r}: use auto, cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BadInputError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu or auto")
    return torch.device(device)


def _pair(value, key_h: str = "height", key_w: str = "width") -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    get = value.get if hasattr(value, "get") else lambda k: getattr(value, k)
    return int(get(key_h)), int(get(key_w))


def _triple(value) -> tuple[float, float, float] | None:
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    return tuple(float(v) for v in value)


def image_spec_from_processor(proc) -> ImageSpec:
    """Read what a transformers EfficientNet/ALIGN image processor does from its attributes.

    Attributes rather than class defaults: align-base's saved config overrides most of them.
    """
    if not getattr(proc, "do_resize", True):
        raise ModelLoadError("the checkpoint's image processor does not resize; alignsearch needs a fixed input size")
    resample = getattr(proc, "resample", Image.BILINEAR)
    do_rescale = getattr(proc, "do_rescale", True)
    do_normalize = getattr(proc, "do_normalize", False)
    std = _triple(getattr(proc, "image_std", None))
    return ImageSpec(
        resize=_pair(proc.size),
        resample=int(resample if resample is not None else Image.BILINEAR),
        crop=_pair(proc.crop_size) if getattr(proc, "do_center_crop", False) else None,
        rescale_factor=float(getattr(proc, "rescale_factor", 1 / 255)) if do_rescale else 1.0,
        rescale_offset=bool(getattr(proc, "rescale_offset", False)) and do_rescale,
        mean=_triple(getattr(proc, "image_mean", None)) if do_normalize else None,
        std=std if do_normalize else None,
        include_top_std=std if getattr(proc, "include_top", False) else None,
    )


# Keys of a saved config that say where or by what it was read, not what the model is: a copied
# checkpoint folder, or one saved by another transformers version, is the same model.
_PLACE_KEYS = frozenset({"_name_or_path", "name_or_path", "transformers_version", "_commit_hash"})


def config_identity(config: dict) -> dict:
    """The config without the keys that depend on the folder it was loaded from (recursively)."""
    return {k: config_identity(v) if isinstance(v, dict) else v for k, v in config.items() if k not in _PLACE_KEYS}


def _weights_digest(digest, model: torch.nn.Module):
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // 256)
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(flat[::step].float().cpu().numpy().tobytes())
    return digest


def _fingerprint(model: torch.nn.Module) -> str:
    """Identifies config and weights without hashing all 690 MB: shapes plus evenly spaced samples.
    Where the checkpoint lies is not part of it (config_identity)."""
    config = json.dumps(config_identity(model.config.to_dict()), sort_keys=True, default=str)
    return _weights_digest(hashlib.sha256(config.encode()), model).hexdigest()[:32]


def tokenizer_state(tokenizer) -> str:
    """The tokenizer as content_digest hashes it: its fast backend's JSON (else its repr). Taken when the
    tokenizer is loaded: calling it with padding or truncation rewrites that JSON, which made two loads of the
    same checkpoint disagree on the digest once one of them had tokenized."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend.to_str() if backend is not None else repr(tokenizer)


def content_digest(model: torch.nn.Module, tokenizer) -> str:
    """Every weight and the tokenizer, unlike the sampled fingerprint: what the ONNX cache is keyed by, so
    two checkpoints that differ only where the fingerprint does not sample (or only in their tokenizer)
    never share exported towers. Each tensor in rows of 1024 values, each row's float64 sum weighted by a
    fixed random vector (one pass at memory speed, ~0.3 s for align-base), then SHA-256 of those sums."""
    digest = hashlib.sha256()
    w = torch.rand(1024, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.5
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        for start in range(0, flat.numel(), 1 << 20):
            part = flat[start : start + (1 << 20)].double()
            pad = (-part.numel()) % 1024
            rows = torch.nn.functional.pad(part, (0, pad)).view(-1, 1024)
            digest.update((rows @ w).numpy().tobytes())
    digest.update((tokenizer if isinstance(tokenizer, str) else tokenizer_state(tokenizer)).encode())
    return digest.hexdigest()[:32]


def _legacy_fingerprint(model: torch.nn.Module) -> str:
    """The fingerprint indexes recorded before it ignored the folder's path (config with _name_or_path)."""
    config = json.dumps(model.config.to_dict(), sort_keys=True, default=str)
    return _weights_digest(hashlib.sha256(config.encode()), model).hexdigest()[:32]


def micro_batch(device_type: str) -> int | None:
    """Images per forward pass. On CPUs EfficientNet-B7 runs ~2x faster per image in batches of
    2-4 than of 32 (activations stay in cache; benchmarks/RESULTS.md); GPUs want the whole batch."""
    return CPU_MICRO_BATCH if device_type == "cpu" else None


def _normalise(x: torch.Tensor) -> np.ndarray:
    # In float64: an untrained tower's outputs can be so small (1e-20) that float32 squares underflow,
    # and F.normalize's eps of 1e-12 would leave them un-normalised.
    x = x.double()
    x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    return x.float().cpu().numpy()


def _embedding(output) -> torch.Tensor:
    # transformers 4.x returns the tensor; 5.x an output object whose pooler_output is the embedding.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def load_image_spec(model: str, local_files_only: bool = False) -> ImageSpec:
    from transformers import AutoImageProcessor

    return image_spec_from_processor(AutoImageProcessor.from_pretrained(model, local_files_only=local_files_only))


def _download_hint(folder: str = "./align-base") -> str:
    return (f"Without network access, download it once elsewhere (hf download {DEFAULT_MODEL} --local-dir {folder}, "
            f"the huggingface_hub CLI) and pass --model {folder} (or set HF_HUB_OFFLINE=1 with a filled Hugging Face cache).")


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One quick request to the hub (proxies honoured): any HTTP answer means it is reachable. Without this,
    an unreachable hub costs ~30 s of retries per file before transformers gives up."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(urllib.request.Request(_endpoint(), method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):
        return False
    return True


_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def check_source(model: str) -> str:
    """Refuse a checkpoint folder that is not there (not "Repo id must use alphanumeric chars"). Returns where
    to load from: "folder", "offline" (HF_HUB_OFFLINE: the cache), "unreachable" (the hub did not answer one
    quick request: the cache, in seconds rather than after ~30 s of retries) or "hub"."""
    from huggingface_hub import constants

    path = Path(model).expanduser()
    if path.is_dir():
        _check_readable(path)
        try:  # the folder as loaded (Encoder resolves it): safetensors takes only UTF-8 paths
            str(path.resolve()).encode("utf-8")
        except UnicodeEncodeError:  # it was "unexpected SafetensorError: Path ... is not valid UTF-8", exit 1
            raise ModelLoadError(f"the model folder {path.resolve()} has a name that is not UTF-8, which the "
                                 "checkpoint reader (safetensors) cannot open: rename or move it") from None
        if not (path / "config.json").exists():
            raise ModelLoadError(f"the model folder {model} holds no config.json: it is not a saved ALIGN checkpoint. "
                                 + _download_hint(model))
        return "folder"
    if path.exists():
        raise ModelLoadError(f"--model {model} is a file: pass a checkpoint folder or a hub id such as {DEFAULT_MODEL}")
    if _looks_local(model) or not _HUB_ID.match(model):
        raise ModelLoadError(f"the model folder {model} does not exist. " + _download_hint(model))
    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return "offline"
    if not _hub_reachable():
        os.environ["HF_HUB_OFFLINE"] = "1"  # later loads in this process go straight to the cache too
        return "unreachable"
    return "hub"


def load_failure(name: str, source: str, exc: Exception) -> ModelLoadError:
    """What a checkpoint that check_source let through but transformers could not load is, in one line: the hub
    unreachable or HF_HUB_OFFLINE said as such, else transformers' reason; then how to get the weights."""
    why = {"unreachable": f"cannot reach {_endpoint()} and it is not in the Hugging Face cache",
           "offline": "HF_HUB_OFFLINE is set and it is not in the Hugging Face cache"}.get(source, str(exc))
    # the hint starts a sentence of its own: joined into one line, "cache Without network access" ran on
    return ModelLoadError(f"could not load the ALIGN checkpoint {name!r}: {why.rstrip('. ')}. {_download_hint()}")


def _check_readable(folder: Path) -> None:
    """A checkpoint folder or file this user cannot read is said to be so (transformers reported it as
    missing, or not in the cache)."""
    try:
        entries = sorted(folder.iterdir())
    except PermissionError:
        raise ModelLoadError(f"cannot read the model folder {folder}: permission denied") from None
    for entry in entries:
        try:
            if entry.is_file():
                with open(entry, "rb"):
                    pass
        except PermissionError:
            raise ModelLoadError(f"cannot read the model file {entry}: permission denied (the checkpoint is "
                                 "there, but this user may not read it)") from None


class Encoder(EncoderBase):
    """One loaded ALIGN checkpoint on one device. Not thread-safe: serialise calls."""

    def __init__(self, model: str = DEFAULT_MODEL, device: str = "auto", text_bf16: bool = False, *,
                 backend: str = "auto", precision: str = "auto"):
        """backend: auto (on CPUs text on ONNX Runtime and images on the engine measured fastest; torch on
        GPUs), torch, onnx or openvino; precision: auto (fp32 on CPUs, bf16 on GPUs), fp32, bf16 or int8 (text
        tower only); see alignsearch/encoders/backend.py.
        text_bf16: the older spelling of precision="bf16" for query encoders."""
        from transformers import AlignModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        self.options = encoder_options(device=device, backend=backend, precision=precision, text_bf16=text_bf16)
        if os.environ.get("TRANSFORMERS_VERBOSITY") == "error":  # the CLI's quiet mode (cli._quiet_transformers)
            hf_logging.disable_progress_bar()
        # A local directory is remembered by absolute path, so later runs find it from anywhere.
        self.name = str(Path(model).resolve()) if Path(model).is_dir() else str(model)
        self.device = resolve_device(device)
        source = check_source(str(model))
        local_only = source != "hub"
        stamp = checkpoint_stamp(self.name)  # before loading: the files these weights came from
        try:
            self.model = AlignModel.from_pretrained(self.name, local_files_only=local_only).float().eval().to(self.device)
            self.tokenizer = AutoTokenizer.from_pretrained(self.name, local_files_only=local_only)
            self.spec = load_image_spec(self.name, local_only)
        except (OSError, ValueError) as exc:
            raise load_failure(self.name, source, exc) from None
        # Kept only if no file changed while loading (then the stamp describes exactly these weights)
        self.checkpoint_stamp = stamp if stamp is not None and checkpoint_stamp(self.name) == stamp else None
        self.dim = int(self.model.config.projection_dim)
        text_limit = int(self.model.config.text_config.max_position_embeddings)
        tok_limit = int(getattr(self.tokenizer, "model_max_length", text_limit) or text_limit)
        # ALIGN was trained on 64 tokens; tokenizers without a saved limit report a huge sentinel.
        self.max_length = min(text_limit, tok_limit, 64)
        self.fingerprint = _fingerprint(self.model)
        self._content = None
        self._tokenizer_state = tokenizer_state(self.tokenizer)  # before any call changes it
        self.temperature = float(self.model.temperature.detach().cpu())
        # the towers on the engines the plan names (alignsearch/encoders/resolve.py): exported on first use
        self.towers = resolve(self.options, self.device.type, self)
        if self.device.type == "cpu":
            # oneDNN's convolutions want NHWC: fp32 3.2 -> 3.7 images/s on a 2-core Xeon, bf16 2x on an EPYC
            # (benchmarks/RESULTS.md); the vectors stay at cosine 1.0 to NCHW.
            self.model.vision_model.to(memory_format=torch.channels_last)

    def identifies(self, fingerprint: str) -> bool:
        """Is this the model an index recorded? Also true for a fingerprint recorded before fingerprints
        ignored the folder's path, when the model is loaded from that same folder."""
        return fingerprint == self.fingerprint or fingerprint == _legacy_fingerprint(self.model)

    @property
    def content_digest(self) -> str:
        if self._content is None:
            self._content = content_digest(self.model, self._tokenizer_state)
        return self._content

    def describe(self) -> dict:
        """What an index records about the model that built it."""
        return describe_model(self.name, self.fingerprint, self.content_digest, self.dim, self.max_length, self.spec)

    def _autocast(self, precision: str):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    @property
    def plan(self):
        """What runs each tower (backend.Plan): decided once, changed only by the towers (resolve.Towers)."""
        return self.towers.plan

    @property
    def _towers(self) -> dict:
        return self.towers.built

    def prepare_text(self) -> None:
        """Export the text tower now (index does, at its end), so the first query needs no torch."""
        self.towers.get("text")

    @torch.inference_mode()
    def _torch_text(self, texts: list[str], precision: str) -> np.ndarray:
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        batch = {k: v.to(self.device) for k, v in batch.items()}
        with self._autocast(precision):
            out = self.model.get_text_features(**batch)
        return _normalise(_embedding(out))

    @torch.inference_mode()
    def _torch_crops(self, crops: np.ndarray, precision: str) -> np.ndarray:
        step = micro_batch(self.device.type) or len(crops)
        parts = []
        with self._autocast(precision):
            for start in range(0, len(crops), step):
                x = to_pixel_values(crops[start : start + step], self.spec, self.device)
                if self.device.type == "cpu":
                    x = x.contiguous(memory_format=torch.channels_last)
                parts.append(_normalise(_embedding(self.model.get_image_features(pixel_values=x))))
        return np.concatenate(parts)

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        """(N, dim) float32 unit vectors. Long texts are truncated to the model's token limit."""
        if isinstance(texts, str):
            texts = [texts]
        if len(texts) == 0:  # the tokenizer fails on an empty batch (IndexError): none is no rows, as encode_crops says
            return np.zeros((0, self.dim), dtype=np.float32)
        tower = self.towers.get("text")
        if tower is not None:
            from alignsearch.encoders.onnxrun import text_feeds

            b = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="np")
            return tower.run(**text_feeds(b["input_ids"], b["attention_mask"]))
        return self._torch_text(list(texts), self.plan.text)

    def encode_crops(self, crops: np.ndarray) -> np.ndarray:
        """(N, dim) float32 unit vectors from uint8 crops made by images.crop_uint8."""
        if len(crops) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        tower = self.towers.get("image")
        if tower is not None:
            if isinstance(crops, torch.Tensor):
                crops = crops.cpu().numpy()
            # ORT's convolutions run fastest in small batches on CPUs too (activations stay in cache).
            step = micro_batch("cpu")
            return np.concatenate([tower.run(crops=np.ascontiguousarray(crops[i : i + step]))
                                   for i in range(0, len(crops), step)])
        return self._torch_crops(crops, self.plan.image)


def load_recorded(recorded: dict, model: str | None = None, device: str = "auto", text_bf16: bool = False, *,
                  backend: str = "auto", precision: str = "auto") -> Encoder:
    """The model an index recorded (its `model` meta), loaded from `model` when given (the same weights at
    another place) else from where the index last saw it. A different model is refused (exit 5)."""
    name = model or recorded["model"]
    if model is None and _looks_local(name) and not Path(name).exists():
        raise ModelLoadError(f"the index's model folder {name} is gone: pass --model with its new place")
    enc = Encoder(name, device, text_bf16, backend=backend, precision=precision)
    if not enc.identifies(recorded["fingerprint"]):
        raise ModelMismatchError(
            f"this index was built with {recorded['model']} (fingerprint {recorded['fingerprint']}), not "
            f"{enc.name} ({enc.fingerprint}): pass the index's own model, re-encode with `alignsearch index "
            "--reindex --model NEW`, or index into a new --index DIR"
        )
    return enc


def _looks_local(name: str) -> bool:
    """A folder path rather than a hub id (`org/name`): absolute, or starting with . or ~."""
    return os.path.isabs(name) or name.startswith((".", "~"))
