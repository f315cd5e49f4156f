"""`alignsearch finetune`: adapt an ALIGN checkpoint to your own image-caption pairs.

The ALIGN recipe: L2-normalised embeddings, a learned temperature, symmetric cross-entropy over the
in-batch similarities with label smoothing 0.1 (AlignModel's own loss, except that pairs with identical
captions are not treated as each other's negatives: contrastive_loss), AdamW with warm-up and cosine
decay, random crop (and flip) at the model's resolution, retrieval metrics on a held-out split each epoch.
The output is a save_pretrained directory that `--model DIR` takes everywhere.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from alignsearch import atomic
from alignsearch.errors import BadImageError, BadInputError, ModelLoadError, UsageError
from alignsearch.media.images import ImageSpec, open_rgb
from alignsearch.media.sources import read_local
from alignsearch.encoders.model import check_source, load_failure, load_image_spec, resolve_device
from alignsearch.encoders.pixels import to_pixel_values
from alignsearch.encoders.pairs import Pair, load_pairs

CHECKPOINT = "checkpoint"  # inside the output directory: the last finished epoch, for --resume
MARKER = "alignsearch_finetune.json"  # in each folder finetune writes: the files it wrote there
TRAINER_STATE = "trainer_state.pt"  # tensors and plain values only: loaded with weights_only=True
INITIAL_TEMPERATURE = 0.07
RECALL_AT = (1, 5, 10)  # the config default of 1.0 learns too slowly from a fresh initialisation


@dataclass
class FinetuneConfig:
    epochs: int = 3
    batch_size: int = 32
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1
    accumulate: int = 1  # optimizer step every N batches (the contrastive batch stays batch_size)
    freeze: str | None = None  # "text" or "vision"
    val_fraction: float = 0.1
    flip: bool = True
    seed: int = 0
    device: str = "auto"


def retrieval_metrics(image_vectors: np.ndarray, text_vectors: np.ndarray) -> dict[str, float]:
    """R@1/5/10 both ways, where image i and text i belong together; R@K only with more than K pairs."""
    sims = image_vectors @ text_vectors.T
    n = len(sims)
    out = {}
    for name, matrix in (("image_to_text", sims), ("text_to_image", sims.T)):
        rank = (matrix > matrix[np.arange(n), np.arange(n)][:, None]).sum(axis=1)
        for k in RECALL_AT:
            if k < n:  # with n <= k pairs every rank is < k: 1.0 whatever the model
                out[f"{name}_R@{k}"] = float((rank < k).mean())
    return out


def train_crop(img, spec: ImageSpec, rng: np.random.Generator, flip: bool) -> np.ndarray:
    """Resize as the processor does, then a random (not centre) crop and an optional mirror."""
    height, width = spec.resize
    arr = np.asarray(img.resize((width, height), resample=spec.resample), dtype=np.uint8)
    crop_h, crop_w = spec.crop or spec.resize
    top, left = rng.integers(0, height - crop_h + 1), rng.integers(0, width - crop_w + 1)
    arr = arr[top : top + crop_h, left : left + crop_w]
    if flip and rng.random() < 0.5:
        arr = arr[:, ::-1]
    return np.ascontiguousarray(arr)


def contrastive_loss(logits_per_text: torch.Tensor, captions: list[str], smoothing: float = 0.1) -> torch.Tensor:
    """ALIGN's symmetric cross-entropy with label smoothing, where pairs whose captions are identical
    are not each other's negatives: their target mass is shared. With distinct captions this is
    exactly AlignModel's loss; with repeated ones ("a dog", "untitled") it stops pushing apart images
    that the text cannot tell apart."""
    n = len(captions)
    index = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    ids = torch.tensor([index[c] for c in captions], device=logits_per_text.device)
    same = (ids[:, None] == ids[None, :]).float()
    targets = (1 - smoothing) * same / same.sum(1, keepdim=True) + smoothing / n
    caption_loss = torch.nn.functional.cross_entropy(logits_per_text, targets)
    image_loss = torch.nn.functional.cross_entropy(logits_per_text.t(), targets)  # `same` is symmetric
    return (caption_loss + image_loss) / 2


def _embedding(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class _Images:
    """Decodes pairs' images, remembering the ones that fail so they are reported once and skipped."""

    def __init__(self, spec: ImageSpec):
        self.spec, self.bad = spec, {}

    def load(self, pairs: list[Pair]):
        good, images = [], []
        for pair in pairs:
            if pair.image in self.bad:
                continue
            try:
                images.append(open_rgb(read_local(pair.image))[0])  # a FIFO refused, never waited on
                good.append(pair)
            except (OSError, BadImageError) as exc:
                self.bad[pair.image] = str(exc)
        return good, images


def finetune(data: str | Path, base: str, out: str | Path, config: FinetuneConfig = FinetuneConfig(),
             resume: bool = False, image_column: str = "image", caption_column: str = "caption",
             progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """Train, evaluate each epoch, checkpoint, and save the model to `out`. Returns the last metrics."""
    from tqdm import tqdm
    from transformers import AlignModel, AutoImageProcessor, AutoTokenizer, get_cosine_schedule_with_warmup

    if config.freeze not in (None, "text", "vision"):
        raise BadInputError("--freeze takes text or vision")
    out = Path(out)
    check_out(out)
    check_not_in_use(out, str(base))
    if resume and not check_resume(out):
        log(f"nothing to resume in {out} (no {CHECKPOINT}/ there): training starts from {base}")
    # as every command loads a model: a folder that is not there said so at once ("Repo id must use alphanumeric
    # chars" after every pair was read, before), and an offline machine looks in the cache alone
    where = check_source(str(base))
    local_only = where != "hub"
    loaded = load_pairs(data, image_column, caption_column)
    for what, why in loaded.skipped:
        log(f"skipped {what}: {why}")
    if len(loaded.pairs) < 2:
        raise BadInputError(f"{data} holds {len(loaded.pairs)} usable image-caption pairs; at least 2 are needed")
    rng = np.random.default_rng(config.seed)
    torch.manual_seed(config.seed)
    order = rng.permutation(len(loaded.pairs))
    n_val = int(len(order) * config.val_fraction) if len(order) >= 20 else 0
    val = [loaded.pairs[i] for i in order[:n_val]]
    train = [loaded.pairs[i] for i in order[n_val:]]
    if n_val < 2:
        log(f"no validation split: {len(order)} pairs with --val-fraction {config.val_fraction} (it takes at least 20 "
            "pairs and 2 held out): no retrieval metrics")
    elif n_val <= max(RECALL_AT):
        cut = [k for k in RECALL_AT if k >= n_val]
        log(f"validation split has {n_val} pairs: " + ", ".join(f"R@{k} needs at least {k + 1}" for k in cut)
            + " (left out: it would be 1.0 by construction); use more pairs or a larger --val-fraction")

    device = resolve_device(config.device)
    checkpoint = out / CHECKPOINT
    source = str(checkpoint) if resume and (checkpoint / "config.json").exists() else base
    try:
        model = AlignModel.from_pretrained(source, local_files_only=local_only or source != base).float().to(device)
        tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=local_only)
        image_processor = AutoImageProcessor.from_pretrained(base, local_files_only=local_only)
    except (OSError, ValueError) as exc:
        raise load_failure(base, where, exc) from None
    spec = load_image_spec(base, local_only)
    max_length = min(64, int(model.config.text_config.max_position_embeddings))
    if source == base and float(model.temperature.detach()) > 0.5:
        model.temperature.data.fill_(INITIAL_TEMPERATURE)
    if config.freeze == "text":
        for p in [*model.text_model.parameters(), *model.text_projection.parameters()]:
            p.requires_grad_(False)
    elif config.freeze == "vision":
        for p in model.vision_model.parameters():
            p.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in trainable if p.ndim >= 2], "weight_decay": config.weight_decay},
         {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0}],  # no decay on norms, biases, temperature
        lr=config.lr,
    )
    steps_per_epoch = math.ceil(math.ceil(len(train) / config.batch_size) / config.accumulate)
    total = steps_per_epoch * config.epochs
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(total * config.warmup_fraction), total)
    start_epoch = 0
    if source != base:
        state = load_trainer_state(checkpoint / TRAINER_STATE)
        froze = (state.get("config") or {}).get("freeze", config.freeze)
        if froze != config.freeze:  # its optimizer holds other towers' parameters: an option to give again, not damage
            raise UsageError(f"cannot resume the training in {checkpoint}: it froze {froze or 'no tower'}, this run "
                             f"freezes {config.freeze or 'none'}; give the same --freeze to resume it, or run without "
                             "--resume to start again")
        try:
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            start_epoch, rng = int(state["epoch"]), np.random.default_rng()
            rng.bit_generator.state = state["rng"]
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(f"{checkpoint / TRAINER_STATE} does not fit this training ({exc}): run without "
                                 "--resume to start again") from None
        log(f"resumed from {checkpoint} after epoch {start_epoch}")
        if start_epoch >= config.epochs:  # a finished training: said, not a silent re-save that printed only "out"
            log(f"nothing left to train: {checkpoint} already ran {start_epoch} epoch(s) and --epochs is "
                f"{config.epochs}; give --epochs above {start_epoch} to train further")
    images, reported = _Images(spec), set()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    # a resume with no epoch left reports the last one's metrics, which its state keeps (an older state: its epoch)
    kept = state.get("metrics") if start_epoch else None
    metrics: dict = dict(kept) if isinstance(kept, dict) and kept else ({"epoch": start_epoch} if start_epoch else {})
    for epoch in range(start_epoch, config.epochs):
        model.train()
        perm = rng.permutation(len(train))
        bar = tqdm(range(0, len(perm), config.batch_size), disable=not progress, desc=f"epoch {epoch + 1}/{config.epochs}")
        seen, started, losses = 0, time.perf_counter(), []
        for step, start in enumerate(bar):
            batch, pil = images.load([train[i] for i in perm[start : start + config.batch_size]])
            if len(batch) < 2:  # a contrastive batch needs negatives
                continue
            crops = np.stack([train_crop(img, spec, rng, config.flip) for img in pil])
            text = tokenizer([p.caption for p in batch], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            with autocast:
                output = model(**{k: v.to(device) for k, v in text.items()},
                               pixel_values=to_pixel_values(crops, spec, device))
                loss = contrastive_loss(output.logits_per_text.float(), [p.caption for p in batch])
            (loss / config.accumulate).backward()
            if (step + 1) % config.accumulate == 0 or start + config.batch_size >= len(perm):
                torch.nn.utils.clip_grad_norm_(trainable, 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                with torch.no_grad():
                    model.temperature.clamp_(min=0.005)
            seen += len(batch)
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", img_s=f"{seen / (time.perf_counter() - started):.1f}")
        for path in images.bad.keys() - reported:
            log(f"skipped {path}: {images.bad[path]}")
        reported |= images.bad.keys()
        metrics = {"epoch": epoch + 1, "loss": float(np.mean(losses)) if losses else float("nan"),
                   "temperature": float(model.temperature.detach()), **_evaluate(model, tokenizer, images, val, spec, device, max_length)}
        log("  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))
        state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "epoch": epoch + 1,
                 "rng": rng.bit_generator.state, "config": asdict(config),
                 "metrics": metrics}  # no objects: see load_trainer_state
        _save(model, tokenizer, image_processor, checkpoint, state)
    _save(model, tokenizer, image_processor, out)
    return metrics


@torch.inference_mode()
def _evaluate(model, tokenizer, images: _Images, val: list[Pair], spec: ImageSpec, device, max_length: int) -> dict:
    if len(val) < 2:
        return {}
    from alignsearch.media.images import crop_uint8

    model.eval()
    pairs, pil = images.load(val)
    image_vecs, text_vecs = [], []
    for start in range(0, len(pairs), 64):
        crops = np.stack([crop_uint8(img, spec) for img in pil[start : start + 64]])
        v = _embedding(model.get_image_features(pixel_values=to_pixel_values(crops, spec, device))).float()
        image_vecs.append(torch.nn.functional.normalize(v, dim=-1).cpu().numpy())
        text = tokenizer([p.caption for p in pairs[start : start + 64]], padding=True, truncation=True,
                         max_length=max_length, return_tensors="pt")
        t = _embedding(model.get_text_features(**{k: v.to(device) for k, v in text.items()})).float()
        text_vecs.append(torch.nn.functional.normalize(t, dim=-1).cpu().numpy())
    return retrieval_metrics(np.concatenate(image_vecs), np.concatenate(text_vecs))


def check_out(out: Path) -> None:
    """Refuse (exit 2) an --out that holds anything but an earlier finetune output: its files would be replaced
    (--out set to the training folder would otherwise lose the user's pictures), and one that cannot be written:
    the place is checked before training, which found it out at the first save, after a whole epoch."""
    _writable_place(out)
    try:  # safetensors writes only to UTF-8 paths: the save after the first epoch failed, "unexpected UnicodeEncodeError"
        str(out.absolute()).encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"--out {out} has a name that is not UTF-8, which the checkpoint writer (safetensors) "
                         "cannot write to: give another folder") from None
    if not out.exists():
        return
    if not out.is_dir():
        raise UsageError(f"--out {out} is a file: give a new or empty folder, or an earlier finetune output")
    if any(out.iterdir()) and not is_finetune_output(out):
        raise UsageError(f"--out {out} holds other files and is not an earlier finetune output: give a new or "
                         "empty folder")


def check_resume(out: Path) -> bool:
    """Whether --resume finds a checkpoint in `out` to continue; refuse (exit 2) where it finds none but `out` holds
    an earlier output: training started over from --model without a word, and its save replaced the weights in
    `out` (a training whose checkpoint folder was deleted to save space, or left aside by a save cut short), so
    hours of an earlier training were lost by asking to keep them. A new or empty `out` has nothing to lose."""
    if (out / CHECKPOINT / "config.json").is_file():
        return True
    if out.is_dir() and any(out.iterdir()):
        raise UsageError(f"--resume: {out} holds no checkpoint to continue ({out / CHECKPOINT}/ has no model), and "
                         f"a training started anew would replace the model in it: run without --resume to do that, "
                         "or give a new --out")
    return False


def check_not_in_use(out: Path, base: str) -> None:
    """Refuse (exit 2) an --out that is the model training starts from, or the model of the index a command run
    here uses (ALIGNSEARCH_INDEX, else the nearest .alignsearch/, as `query` finds it): the save replaced it, an
    earlier finetune output being a valid --out, so its weights were gone and that index's vectors no longer
    matched its model (queries on torch said exit 5; only `index --reindex` with the new model mended it)."""
    if not out.is_dir():
        return
    in_use = [(Path(base).expanduser(), "the model it starts from (--model)")]
    in_use += [(Path(name), f"the model of the index {where}") for where, name in _index_models_here()]
    for folder, what in in_use:
        try:
            same = os.path.samefile(out, folder)
        except OSError:  # a hub id, a folder gone: not this one
            continue
        if same:
            raise UsageError(f"--out {out} is {what}: the save would replace it; give a new folder for the "
                             "fine-tuned model")


def _index_models_here() -> list[tuple[Path, str]]:
    """(index folder, model name) of the index found from here, and of the model a re-encode of it is moving
    to; nothing where no index is found or its catalog cannot be read (that is for the commands that use it)."""
    from alignsearch.storage import catalog, state
    from alignsearch.storage.paths import DB_FILE, find_index_dir

    chosen = os.environ.get("ALIGNSEARCH_INDEX")
    index = Path(chosen) if chosen else find_index_dir()
    if index is None or not (index / DB_FILE).is_file():
        return []
    try:
        db = catalog.open_readonly(index / DB_FILE)
        try:
            with db.connect() as conn:
                found = state.read(conn, "model", "reindex")
        finally:
            db.dispose()
    except Exception:  # noqa: BLE001 - damaged, locked, another version: no model to protect is known
        return []
    models = [found.model, found.reindex.model if found.reindex is not None else None]
    return [(index, m.name) for m in models if m is not None]


def _writable_place(out: Path) -> None:
    """Refuse (exit 2) an --out whose folder cannot be made or written: each save is written beside OUT, so the
    nearest folder above it that exists must be a folder this user may write (not a file, as in photo.jpg/ft)."""
    here = out.absolute().parent
    while not os.path.lexists(here) and here != here.parent:
        here = here.parent
    if not here.is_dir():
        raise UsageError(f"--out {out}: {here} is a file, not a folder: give a folder path")
    if not os.access(here, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: {here} cannot be written by you: give a folder you can write")


def is_finetune_output(folder: Path) -> bool:
    """A folder finetune wrote: its marker, or a checkpoint of an interrupted run (the trainer state alone
    marks outputs written before the marker existed)."""
    return any((folder / name).is_file() for name in (MARKER, f"{CHECKPOINT}/{MARKER}", f"{CHECKPOINT}/{TRAINER_STATE}"))


def load_trainer_state(path: Path) -> dict:
    """The optimizer, scheduler and RNG state of a checkpoint: tensors and plain values, read with
    weights_only=True, which builds no other object and runs no code (a pickle planted in the output
    folder cannot run its payload)."""
    import pickle

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's message suggests weights_only=False: exactly what must not happen
        raise ModelLoadError(f"cannot resume from {path}: it holds objects besides tensors and plain values (not "
                             "loaded: unpickling them can run code); run without --resume to start again") from None
    except Exception as exc:  # noqa: BLE001 - damaged, truncated: not usable either way
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot resume from {path}: not a readable trainer state ({reason}); run without "
                             "--resume to start again") from None
    if not isinstance(state, dict):
        raise ModelLoadError(f"cannot resume from {path}: not a trainer state; run without --resume to start again")
    return state


def _written_here(old: Path) -> list[str]:
    """The files an earlier save wrote into `old` (its marker), which a new save supersedes."""
    try:
        files = json.loads((old / MARKER).read_text()).get("files", [])
        return [f for f in files if isinstance(f, str)]
    except (OSError, ValueError, AttributeError):
        return []


def _save(model, tokenizer, image_processor, folder: Path, trainer_state: dict | None = None) -> None:
    """save_pretrained into a fresh folder beside `folder`, then swapped in whole (alignsearch/atomic.py):
    a kill leaves the old copy whole, siblings are never touched, and what the old folder held besides an
    earlier save's files (the checkpoint folder, the user's own files) is kept."""
    from transformers import AlignProcessor

    atomic.remove_stale(folder)  # a save killed mid-way (a checkpoint folder each epoch: gigabytes at align-base)
    with atomic.replacing_dir(folder, superseded=_written_here) as tmp:
        model.save_pretrained(tmp)
        AlignProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(tmp)
        if trainer_state is not None:
            torch.save(trainer_state, tmp / TRAINER_STATE)
        for written in tmp.iterdir():
            if written.is_file() and not written.is_symlink():
                atomic.follow_umask(written)  # model.safetensors was 0600, the rest the umask's
        files = sorted(p.name for p in tmp.iterdir()) + [MARKER]
        (tmp / MARKER).write_text(json.dumps({"files": files}, indent=1))
