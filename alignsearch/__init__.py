"""alignsearch: cross-modal semantic search over image collections with ALIGN, FAISS and SQLite.

    import alignsearch
    engine = alignsearch.open()                       # the nearest .alignsearch/ index
    hits = engine.search(text="red car", image="beach.jpg", k=10, text_weight=2.0)

Imports are lazy so that decode workers, which import alignsearch.media.images, never load torch.
"""

__version__ = "0.1.0"
__all__ = ["open", "Engine", "Hit", "Encoder", "AlignSearchError"]


def __getattr__(name):
    if name in ("open", "Engine", "Hit"):
        from alignsearch.search import engine

        return getattr(engine, name)
    if name == "Encoder":
        from alignsearch.encoders.model import Encoder

        return Encoder
    if name == "AlignSearchError":
        from alignsearch.errors import AlignSearchError

        return AlignSearchError
    raise AttributeError(f"module 'alignsearch' has no attribute {name!r}")
