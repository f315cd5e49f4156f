"""alignsearch: cross-modal semantic search over image collections with ALIGN, FAISS and SQLite.

    import alignsearch
    engine = alignsearch.open()                       # the nearest .alignsearch/ index
    hits = engine.search(text="red car", image="beach.jpg", k=10, text_weight=2.0)

Imports are lazy so that decode workers, which import alignsearch.media.images, never load torch.
"""

from os import environ as _environ

# OpenMP's idle threads (faiss's and torch's: each wheel loads its own libgomp) sleep instead of spinning. By
# default libgomp spins a thread up to 300000 rounds after each parallel region (faiss's search of one query is
# one), and on a busy machine the spinner is descheduled and the next search on the caller's thread waits for it to
# run again: Engine.search of a 6-image index was several times slower (benchmarks/RESULTS.md, bench_inproc.py).
# `serve` alone set this; the Python API and the CLI's own searches spun. Set here, where every entry passes before
# faiss or torch loads (each reads it once, as it loads); a caller's own setting stands.
_environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
# The errors a caller can catch, each with the CLI exit code it is reported with (alignsearch/errors.py); README
# names them from Python (`UsageError` for an option out of range, `BadInputError` for unusable input).
ERRORS = ("AlignSearchError", "UsageError", "BadInputError", "IndexNotFoundError", "IndexUntrustedError",
          "IndexDamagedError", "ModelLoadError", "ModelMismatchError", "CatalogBusyError", "DiskFullError")
__all__ = ["open", "Engine", "Hit", "Encoder", *ERRORS]


def __getattr__(name):
    if name in ("open", "Engine", "Hit"):
        from alignsearch.search import engine

        return getattr(engine, name)
    if name == "Encoder":
        from alignsearch.encoders.model import Encoder

        return Encoder
    if name in ERRORS:
        from alignsearch import errors

        return getattr(errors, name)
    raise AttributeError(f"module 'alignsearch' has no attribute {name!r}")
