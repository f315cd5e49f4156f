"""`alignsearch tag`: label every indexed image from its stored vector, no re-encoding.

Each label is decided on its own: its probability in a softmax over [the label, classify.BACKGROUND_PROMPTS]
with the model's temperature, tagged when >= the threshold (at most `top` labels of one run per image). So
a file of one label tags what a file of fifty would have tagged with that label. Runs accumulate: a run
replaces the tags of its own labels (case-insensitively) and keeps the others; `tag --clear` removes all.
The runs are remembered (meta `tagging`) so later `index` runs tag new images with every label set.
"""

from __future__ import annotations

import numpy as np
from sqlalchemy.engine import Engine

from alignsearch.storage import catalog, state
from alignsearch.encoders.classify import BACKGROUND_PROMPTS, DEFAULT_TEMPLATES, against_background, choose_tags
from alignsearch.errors import BadInputError
from alignsearch.storage.state import runs_of
from alignsearch.storage.vectors import VectorStore

CHUNK = 65_536
DEFAULT_THRESHOLD = 0.5


def parse_labels(lines) -> list[str]:
    """A labels file's lines: one label per line; blank lines and lines starting with # are not labels.
    Labels are one label whatever their case (tags match case-insensitively: `CAT` and `cat` became two
    labels of one tag), the first spelling kept; one longer than a query's --tag may be is refused."""
    from alignsearch.encoders.classify import MAX_TAG_CHARS

    labels: dict[str, str] = {}
    for line in lines:
        label = line.strip()
        if not label or label.startswith("#"):
            continue
        if len(label) > MAX_TAG_CHARS:
            raise BadInputError(f"the label {label[:40]!r}... is {len(label)} characters long; the limit is "
                                f"{MAX_TAG_CHARS} (as for --tag)")
        labels.setdefault(label.lower(), label)
    return list(labels.values())


def with_run(tagging: dict | None, run: dict) -> dict:
    """The meta after `run`: earlier runs keep the labels it does not (re)tag."""
    mine = {label.lower() for label in run["labels"]}
    runs = []
    for old in runs_of(tagging):
        kept = [label for label in old["labels"] if label.lower() not in mine]
        if kept:
            runs.append({**old, "labels": kept})
    return {"runs": [*runs, run], "background": list(BACKGROUND_PROMPTS)}


def tag_all(db: Engine, store: VectorStore, label_vectors: np.ndarray, labels: list[str], temperature: float,
            threshold: float, top: int, background_vectors: np.ndarray | None = None, refresh: bool = True,
            remember: dict | None = None) -> dict:
    """Replace the tags of these labels with this labelling of every indexed file (tags of other labels
    stay); returns counts per label. background_vectors: the encoded BACKGROUND_PROMPTS. remember: the tagging
    runs to store with the tags, in their transaction."""
    if background_vectors is None:
        raise BadInputError("tagging needs the background prompts' vectors")
    with db.connect() as conn:
        live = catalog.live_pairs(conn)
        images, one_file = catalog.counts(conn)[catalog.INDEXED], catalog.first_moments(conn)
    rows = []
    for start in range(0, len(live), CHUNK):
        ids, vec_rows = live[start : start + CHUNK, 0], live[start : start + CHUNK, 1]
        probs = against_background(store.get(vec_rows), label_vectors, background_vectors, temperature)
        for file_id, chosen in zip(ids.tolist(), choose_tags(probs, labels, threshold, top)):
            rows += [{"file_id": file_id, "label": label, "probability": p} for label, p in chosen]
    with db.begin() as conn:
        catalog.replace_tags(conn, rows, labels)
        if refresh and catalog.has_keywords(conn):
            catalog.refresh_keywords(conn)  # tags are keywords too
        if remember is not None:  # with the tags: a kill between two commits left tags later runs did not repeat
            state.write(conn, tagging=remember)
    # a video counts once, as `info` counts it: its moments are tagged each, "7 tags on 5 images" counted a tag
    # of three moments three times and the video as three images
    tagged = {(one_file.get(r["file_id"], r["file_id"]), r["label"]) for r in rows}
    counts = dict.fromkeys(labels, 0)
    for _, label in tagged:
        counts[label] += 1
    return {"images": images, "tags": len(tagged), "per_label": counts}


def tag_runs(db: Engine, store: VectorStore, encoder, tagging: dict | None, remember: dict | None = None) -> dict:
    """Tag every indexed file with every remembered run's labels (after new images came in); remember: the
    tagging runs to store with the last run's tags (tag_all)."""
    runs = runs_of(tagging)
    background = encoder.encode_text(list(BACKGROUND_PROMPTS))
    total = {"images": 0, "tags": 0, "per_label": {}}
    for i, run in enumerate(runs):
        vectors = encoder.encode_labels(run["labels"], run.get("templates") or DEFAULT_TEMPLATES)
        done = tag_all(db, store, vectors, run["labels"], encoder.temperature, run["threshold"], run["top"],
                       background, refresh=i == len(runs) - 1, remember=remember if i == len(runs) - 1 else None)
        total["images"] = done["images"]
        total["tags"] += done["tags"]
        total["per_label"].update(done["per_label"])
    return total


def clear(db: Engine) -> None:
    """Forget every tag and every remembered run."""
    with db.begin() as conn:
        catalog.replace_tags(conn, [])
        state.write(conn, tagging=None)
        if catalog.has_keywords(conn):
            catalog.refresh_keywords(conn)
