"""alignsearch: cross-modal semantic search over image collections with ALIGN, FAISS and SQLite.

    import alignsearch
    engine = alignsearch.open()                       # the nearest .alignsearch/ index
    hits = engine.search(text="red car", image="beach.jpg", k=10, text_weight=2.0)

Imports are lazy so that decode workers, which import alignsearch.media.images, never load torch.
"""

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
