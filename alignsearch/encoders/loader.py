"""The one way to get an encoder (callers: the engine, the indexer, the CLI, Ray's encoder actors).

Imports neither torch nor transformers itself: an encoder that runs from the cached exports alone
(alignsearch/encoders/cached.py) never loads them; model.Encoder, which does, is imported only when the
checkpoint must load. Either encoder's towers come from resolve.Towers.
"""

from __future__ import annotations

from alignsearch.encoders import cached
from alignsearch.encoders.backend import EncoderOptions
from alignsearch.encoders.encoding import DEFAULT_MODEL, EncoderBase


def open_encoder(model: str | None, options: EncoderOptions, recorded: dict | None = None, *,
                 cache: bool = True, text_only: bool = False) -> EncoderBase:
    """The one way to get an encoder: `model` (else the one an index recorded, else the default), its towers
    on what options and this machine allow (resolve.Towers). cache: from the cached exports alone when they
    are all a CPU run needs (alignsearch/encoders/cached.py: no torch), else the checkpoint is loaded; a
    model other than the recorded one is refused (load_recorded). text_only: for text alone, the recorded
    model's cached text tower (cached.CachedText, `text_only` set) where the plan allows, the full encoder
    otherwise and after a failure of that tower."""
    if text_only and cache and recorded is not None:
        enc = cached.text_encoder(recorded, options, model,
                                  load_full=lambda: open_encoder(model, options, recorded, cache=False))
        if enc is not None:
            return enc
    kw = dict(backend=options.backend, precision=options.precision)

    def checkpoint(name: str, device: str = options.device):
        from alignsearch.encoders.model import Encoder  # torch: only when the checkpoint loads

        return Encoder(name, device, **kw)

    # a cached encoder whose tower fails later loads the checkpoint from the folder it found (resolve.Towers)
    enc = cached.find(model, recorded, options, load_full=lambda folder: checkpoint(folder, "cpu")) if cache else None
    if enc is not None:
        return enc
    if recorded is None:
        return checkpoint(model or DEFAULT_MODEL)
    from alignsearch.encoders.model import load_recorded

    return load_recorded(recorded, model, options.device, **kw)
