"""`alignsearch tag`: label every indexed image from its stored vector, no re-encoding."""

from __future__ import annotations

import numpy as np
from sqlalchemy.engine import Engine

from alignsearch import catalog
from alignsearch.classify import choose_tags, probabilities
from alignsearch.vectors import VectorStore

CHUNK = 65_536


def tag_all(db: Engine, store: VectorStore, label_vectors: np.ndarray, labels: list[str], temperature: float,
            threshold: float, top: int) -> dict:
    """Replace all tags with this labelling of every indexed file; returns counts per label."""
    with db.connect() as conn:
        live = np.array(list(catalog.live_vectors(conn)), dtype=np.int64).reshape(-1, 2)
    rows = []
    for start in range(0, len(live), CHUNK):
        ids, vec_rows = live[start : start + CHUNK, 0], live[start : start + CHUNK, 1]
        _, probs = probabilities(store.get(vec_rows), label_vectors, temperature)
        for file_id, chosen in zip(ids.tolist(), choose_tags(probs, labels, threshold, top)):
            rows += [{"file_id": file_id, "label": label, "probability": p} for label, p in chosen]
    with db.begin() as conn:
        catalog.replace_tags(conn, rows)
        if catalog.has_keywords(conn):
            catalog.refresh_keywords(conn)  # tags are keywords too
    counts = dict.fromkeys(labels, 0)
    for r in rows:
        counts[r["label"]] += 1
    return {"images": len(live), "tags": len(rows), "per_label": counts}
