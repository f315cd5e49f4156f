"""Zero-shot classification as in the ALIGN model card: softmax over cosine similarity / temperature.

Pure numpy over unit vectors, so the same numbers come from freshly encoded images and from the
vectors stored in an index.
"""

from __future__ import annotations

import numpy as np

MAX_TAG_CHARS = 200  # a tag label (index --tags, the tag filter)

DEFAULT_TEMPLATES = ("{}",)


def check_templates(templates) -> None:
    """Refuse a prompt template that is not a text with at most one `{}` where the label goes (UsageError,
    exit 2): str.format ended "{} and {}" in an IndexError, "{label}" in a KeyError and "{" in a ValueError,
    each an "unexpected" exit 1 after the model had loaded. A template without `{}` gets the label appended."""
    from string import Formatter

    from alignsearch.errors import UsageError

    for template in templates:
        try:
            fields = [(name, spec, conv) for _, name, spec, conv in Formatter().parse(template) if name is not None]
        except ValueError:
            fields = None
        if fields is None or len(fields) > 1 or any(f != ("", "", None) for f in fields):
            raise UsageError(f"--template {template!r}: write {{}} once where the label goes, e.g. \"a photo of {{}}\" "
                             "(no other braces; {{ and }} for literal ones)")


def prompts(label: str, templates: tuple[str, ...] = DEFAULT_TEMPLATES) -> list[str]:
    check_templates(templates)
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


# What a tag's label competes with (`alignsearch tag`): prompts that describe any photo. A label is tagged
# when the image matches it better than this background, whatever other labels are being tagged.
BACKGROUND_PROMPTS = ("a photo", "a picture", "an image", "a photo of something", "a picture of something")


def against_background(image_vectors: np.ndarray, label_vectors: np.ndarray, background_vectors: np.ndarray,
                       temperature: float) -> np.ndarray:
    """(images, labels): each label's probability in a softmax over [that label, the background prompts] of
    similarity / temperature. Unlike `probabilities`, one label's value does not depend on the others."""
    images = image_vectors.astype(np.float64)
    own = images @ label_vectors.astype(np.float64).T / temperature  # (n, L)
    background = images @ background_vectors.astype(np.float64).T / temperature  # (n, B)
    top = np.maximum(own, background.max(axis=1, keepdims=True))
    rest = np.exp(background[:, None, :] - top[:, :, None]).sum(axis=2)
    mine = np.exp(own - top)
    return mine / (mine + rest)
