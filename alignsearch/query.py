"""Query vectors and exact re-ranking: pure numpy, no model, no index."""

from __future__ import annotations

import numpy as np


def unit(v: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(v))
    if norm == 0.0 or not np.isfinite(norm):
        raise ValueError("the query vector is zero: the weights cancel each other out")
    return (v / norm).astype(np.float32)


def compose(
    text: np.ndarray | None = None,
    image: np.ndarray | None = None,
    negative: np.ndarray | None = None,
    text_weight: float = 2.0,
    image_weight: float = 1.0,
    negative_weight: float = 1.0,
) -> np.ndarray:
    """The ALIGN paper's compound query: normalise each part, weighted sum, subtract the negative,
    normalise the result. A lone text or image is simply its own unit vector."""
    parts = []
    if text is not None:
        parts.append((text_weight if image is not None else 1.0) * unit(text))
    if image is not None:
        parts.append((image_weight if text is not None else 1.0) * unit(image))
    if not parts:
        raise ValueError("a query needs text, an image, or both")
    if negative is not None:
        parts.append(-negative_weight * unit(negative))
    return unit(np.sum(parts, axis=0))


def rerank(query: np.ndarray, ids: np.ndarray, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner products of the candidates, best k first: (ids, scores)."""
    scores = vectors @ query.astype(np.float32)
    order = np.argsort(-scores, kind="stable")[:k]
    return ids[order], scores[order]


RRF_K = 60  # reciprocal rank fusion's constant (Cormack et al. 2009; what Elasticsearch and others use)


def fuse(*rankings: list[int], k: int = RRF_K) -> list[int]:
    """Reciprocal rank fusion: each id scores the sum of 1 / (k + rank) over the lists it is in (rank from 1);
    best first, ties in order of first appearance."""
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, i in enumerate(ranking, start=1):
            scores[i] = scores.get(i, 0.0) + 1.0 / (k + rank)
    return sorted(scores, key=lambda i: -scores[i])


def words(text: str | None) -> list[str]:
    """The words of a query text for the keyword index (letters and digits, lower-cased, 2+ characters)."""
    import re

    found = re.findall(r"\w+", (text or "").lower())
    return list(dict.fromkeys(w for w in found if len(w) > 1 and w not in STOPWORDS))


# Words too common in captions to say anything about a match (so "a dog on the beach" is not a keyword
# match for every caption that has "on" and "the").
STOPWORDS = frozenset("an the of on in at and or with to for by is it its this that from as are be".split())
