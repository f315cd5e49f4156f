"""A one-shot `alignsearch query TEXT` starts loading the cached text tower first, on a thread.

ONNX Runtime builds a session (0.5-1 s for align-base's 440 MB text tower) without holding the GIL, so it can
run while this process imports SQLAlchemy, faiss and the engine and opens the index (~0.6 s): 1.5 s instead
of 2.0 s in a measurement on a 2-core Xeon. Which tower to load comes from a read-only peek at the catalog's
`model` meta with the standard sqlite3 module (state.peek; SQLAlchemy is among the imports to overlap);
it is only a hint: the engine uses the result only if it is for the model its own snapshot records (Engine._text_encoder_of).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from alignsearch.encoders.backend import EncoderOptions
from alignsearch.storage import state
from alignsearch.storage.paths import DB_FILE


def peek_model(index_dir: Path) -> dict | None:
    """The catalog's recorded model, read-only; None when it cannot be read (the engine then reports why)."""
    found = state.peek(Path(index_dir) / DB_FILE, "model")
    return None if found is None or found.model is None else found.model.to_record()


def text_encoder_soon(index_dir: Path, options: EncoderOptions) -> tuple[dict, Future] | None:
    """(the model meta it is for, a future of cached.text_encoder(...): the text-only encoder or None), or
    None when there is nothing to start. The future never loads the checkpoint: should the cached tower fail,
    the engine's own load (loader.open_encoder) falls back and says so."""
    info = peek_model(index_dir)
    if info is None:
        return None

    def load():
        from alignsearch.encoders import cached

        return cached.text_encoder(info, options)

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="alignsearch-text")
    future = pool.submit(load)
    pool.shutdown(wait=False)  # the thread ends with the load
    return info, future
