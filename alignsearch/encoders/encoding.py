"""What every encoder offers on top of its two towers, with neither torch nor transformers.

model.Encoder runs the checkpoint loaded by transformers (torch, or its ONNX exports); cached.CachedEncoder
runs the exports alone, found without loading the checkpoint. Both provide encode_text and encode_crops,
`spec`, `temperature` and the identity fields; the rest (reading images, labels, classification) is here,
once.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence, Union

import numpy as np
from PIL import Image

from alignsearch.encoders.classify import DEFAULT_TEMPLATES
from alignsearch.errors import BadImageError, BadInputError
from alignsearch.media.images import DEFAULT_MAX_PIXELS, ImageSpec, crop_uint8, decode, to_rgb
from alignsearch.media.sources import read_local

DEFAULT_MODEL = "kakaobrain/align-base"
ImageInput = Union[str, os.PathLike, bytes, Image.Image]


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


def describe_model(name: str, fingerprint: str, content_digest: str, dim: int, max_length: int, spec: ImageSpec) -> dict:
    """What an index records about the model that built it (its `model` meta)."""
    s = spec
    return {
        "model": name,
        "fingerprint": fingerprint,
        "content_digest": content_digest,  # finds the ONNX export of exactly these weights and tokenizer
        "dim": dim,
        "max_text_tokens": max_length,
        "preprocessing": {
            "resize": list(s.resize),
            "resample": s.resample,
            "crop": list(s.crop) if s.crop else None,
            "rescale_factor": s.rescale_factor,
            "rescale_offset": s.rescale_offset,
            "mean": s.mean,
            "std": s.std,
            "include_top_std": s.include_top_std,
        },
    }


class EncoderBase:
    """Needs encode_text(texts) and encode_crops(crops) -> (N, dim) unit vectors, `spec`, `dim` and `temperature`."""

    spec: ImageSpec
    dim: int
    temperature: float
    text_only = False  # True for an encoder of text alone (cached.CachedText): images need the full one

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        raise NotImplementedError

    def encode_crops(self, crops: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def crop(self, image: ImageInput, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
        """A path, bytes or PIL image to the uint8 crop; BadInputError when it cannot be read."""
        if isinstance(image, Image.Image):
            return crop_uint8(to_rgb(image), self.spec)
        try:
            data = image if isinstance(image, bytes) else read_local(image)  # never a FIFO or a device whole
            return decode(data, self.spec, max_pixels).crop  # as the indexer decodes (large images reduced)
        except (OSError, BadImageError) as exc:
            why = getattr(exc, "strerror", None) or exc  # "Permission denied", not "[Errno 13] ... 'x.jpg'"
            raise BadInputError(f"cannot use image {image if not isinstance(image, bytes) else '<bytes>'}: {why}") from None

    def encode_images(self, images: Sequence[ImageInput]) -> np.ndarray:
        crops = [self.crop(im) for im in images]
        if not crops:  # np.stack refuses an empty list: none is no rows
            return np.zeros((0, self.dim), dtype=np.float32)
        return self.encode_crops(np.stack(crops))

    def encode_labels(self, labels: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES) -> np.ndarray:
        """One unit vector per label: its prompts' embeddings averaged (prompt ensembling)."""
        from alignsearch.encoders.classify import ensemble, prompts

        return np.stack([ensemble(self.encode_text(prompts(label, tuple(templates)))) for label in labels])

    def classify(self, images: Sequence[ImageInput], labels: Sequence[str],
                 templates: Sequence[str] = DEFAULT_TEMPLATES) -> list[list[dict]]:
        """Per image, per label: probability (softmax of similarity / temperature) and similarity."""
        from alignsearch.encoders.classify import probabilities

        if not labels:
            raise BadInputError("give at least one label")
        sims, probs = probabilities(self.encode_images(images), self.encode_labels(labels, templates), self.temperature)
        return [
            [{"label": lab, "probability": float(p), "similarity": float(s)} for lab, p, s in zip(labels, prow, srow)]
            for prow, srow in zip(probs, sims)
        ]

    def classify_each(self, images: Sequence[ImageInput], labels: Sequence[str],
                      templates: Sequence[str] = DEFAULT_TEMPLATES) -> list[dict]:
        """classify, one image at a time as far as reading goes: per image {"image", "labels"}, or
        {"image", "error"} for one that cannot be read (the others are still classified)."""
        from alignsearch.encoders.classify import probabilities

        if not labels:
            raise BadInputError("give at least one label")
        out, crops = [], []
        for image in images:
            name = image if isinstance(image, (str, bytes)) else str(image)
            try:
                crops.append(self.crop(image))
                out.append({"image": name})
            except BadInputError as exc:
                out.append({"image": name, "error": str(exc)})
        if crops:
            sims, probs = probabilities(self.encode_crops(np.stack(crops)), self.encode_labels(labels, templates),
                                        self.temperature)
            good = iter(zip(probs, sims))
            for entry in out:
                if "error" not in entry:
                    prow, srow = next(good)
                    entry["labels"] = [{"label": lab, "probability": float(p), "similarity": float(s)}
                                       for lab, p, s in zip(labels, prow, srow)]
        return out

    def similarity(self, text: str, image: ImageInput) -> dict:
        """Cosine similarity of a text and an image, and the model's logit (similarity / temperature)."""
        sim = float(self.encode_text([text])[0] @ self.encode_images([image])[0])
        return {"similarity": sim, "logit": sim / self.temperature}
