"""Zero-shot classification as in the ALIGN model card: softmax over cosine similarity / temperature.

Pure numpy over unit vectors, so the same numbers come from freshly encoded images and from the
vectors stored in an index.
"""

from __future__ import annotations

import numpy as np

DEFAULT_TEMPLATES = ("{}",)


def prompts(label: str, templates: tuple[str, ...] = DEFAULT_TEMPLATES) -> list[str]:
    return [t.format(label) if "{}" in t else f"{t} {label}" for t in templates]


def ensemble(template_vectors: np.ndarray) -> np.ndarray:
    """Prompt ensembling (ALIGN/CLIP papers): mean of the unit text vectors of one label, renormalised."""
    mean = template_vectors.mean(axis=0)
    return (mean / np.linalg.norm(mean)).astype(np.float32)


def probabilities(image_vectors: np.ndarray, label_vectors: np.ndarray, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, probabilities), each (images, labels): what
    AlignModel.forward(...).logits_per_image.softmax(-1) gives."""
    sims = image_vectors.astype(np.float64) @ label_vectors.astype(np.float64).T
    logits = sims / temperature
    logits -= logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    return sims, exp / exp.sum(axis=1, keepdims=True)


def choose_tags(probs: np.ndarray, labels: list[str], threshold: float, top: int) -> list[list[tuple[str, float]]]:
    """Per image, the labels with probability >= threshold, best first, at most `top`."""
    out = []
    for row in probs:
        order = np.argsort(-row)[:top]
        out.append([(labels[i], float(row[i])) for i in order if row[i] >= threshold])
    return out
