"""One search request: what a query asks, checked once where it enters (the CLI's options, the HTTP
parameters, Engine.search's keywords) and carried whole to the engine, or over HTTP to a warm server.

Light to import (no numpy, no model, no catalog): the CLI builds a request before it knows whether a
server or a local engine answers it. The rules are querycheck's (limits of texts, weights, k, images)
and the filter language's (alignsearch/search/filters.py); the `where` expression and the named filters
are parsed here into one tree (`node`), which the engine uses as is.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field, fields, replace
from typing import Any

from alignsearch.errors import UsageError
from alignsearch.search import filters, querycheck
from alignsearch.search.filters import FilterOptions

DEFAULT_PER_VIDEO = 3  # moments of one video in a result list (query --per-video)
SORTS = ("score", "taken", "-taken", "path")
MODES = ("auto", "vector", "keyword", "hybrid")
MEDIA = ("photo", "video")
COMPOSE_METHODS = ("auto", "sum", "slerp", "product", "weicom")  # as alignsearch/search/query.py resolves them
SHARE_METHODS = ("slerp", "product", "weicom")  # they split a text+image query by the weights' shares
FILTER_NAMES = tuple(f.name for f in fields(FilterOptions))  # where, after, before, camera, near, path, format, tag


@dataclass(frozen=True)
class SearchRequest:
    """A checked search (build() makes one). image: a path, bytes or a decoded image; similar: an indexed
    image's id whose stored vector is the query (the HTTP API's similar=); node: the filter tree of
    `filters` (and media), parsed once."""

    text: str | None = None
    image: Any = field(default=None, compare=False, repr=False)
    negative: str | None = None
    text_weight: float = 2.0
    image_weight: float = 1.0
    negative_weight: float = 1.0
    compose: str = "auto"
    k: int = querycheck.DEFAULT_K
    nprobe: int | None = None
    filters: FilterOptions = FilterOptions()
    media: str | None = None
    per_video: int | None = DEFAULT_PER_VIDEO
    min_score: float | None = None
    sort: str = "score"
    mode: str = "auto"
    collapse: bool = False
    explain: bool = False
    similar: int | None = None
    node: Any = field(default=None, compare=False, repr=False)

    @property
    def tag(self) -> str | None:
        return self.filters.tag

    @property
    def compound(self) -> bool:
        return self.text is not None and self.image is not None

    def narrowed(self) -> dict[str, Any]:
        """The named filters that are set."""
        return {name: getattr(self.filters, name) for name in FILTER_NAMES
                if name != "tag" and getattr(self.filters, name) is not None}


def build(*, text: str | None = None, image: Any = None, negative: str | None = None, text_weight: float = 2.0,
          image_weight: float = 1.0, negative_weight: float = 1.0, compose: str = "auto", k: int = querycheck.DEFAULT_K,
          nprobe: int | None = None, where: str | None = None, after=None, before=None, camera: str | None = None,
          near=None, path: str | None = None, format: str | None = None, tag: str | None = None,  # noqa: A002
          media: str | None = None, per_video: int | None = DEFAULT_PER_VIDEO, min_score: float | None = None,
          sort: str = "score", mode: str = "auto", collapse: bool = False, explain: bool = False,
          similar: int | None = None, by_vector: bool = False) -> SearchRequest:
    """The one check of a search, whoever asks: BadInputError (exit 6, HTTP 400) for the query's own text or
    image that cannot be used, UsageError (exit 2, HTTP 400) for an option out of its range or malformed (k, a
    weight, a filter, a sort, a mode...). by_vector: the query
    is a vector given by the caller (Engine.search_vector) or a stored one (similar), so no text or image is
    needed; a text is then only the words for the keyword index."""
    checked = querycheck.validate(text=text, image=image, k=k, negative=negative, text_weight=text_weight,
                                  image_weight=image_weight, negative_weight=negative_weight, nprobe=nprobe,
                                  tag=tag, by_vector=by_vector or similar is not None)
    if compose not in COMPOSE_METHODS:
        raise UsageError(f"compose must be one of {', '.join(COMPOSE_METHODS)}, got {compose!r}")
    if compose in SHARE_METHODS and checked["text"] is not None and checked["image"] is not None:
        # checked here, before the model loads: these methods take each half's share of the weights' sum, which a
        # zero or negative weight leaves meaningless (the sum and auto use the weighted sum as given)
        querycheck.check_shares(checked["text_weight"], checked["image_weight"], compose)
    if sort not in SORTS:
        raise UsageError(f"sort must be one of {', '.join(SORTS)}, got {sort!r}")
    if mode not in MODES:
        raise UsageError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    # numpy's bool only where numpy is loaded already: importing it here put numpy on the CLI's path to a running
    # server, which loads no numeric library (tests/test_request.py: a query through the server imports no engine)
    numpy = sys.modules.get("numpy")
    bools = (bool,) if numpy is None else (bool, numpy.bool_)
    for name, flag in (("collapse", collapse), ("explain", explain)):
        # a string was taken for its truth: collapse="no" folded duplicates
        if not isinstance(flag, bools):
            raise UsageError(f"{name} must be True or False, got {flag!r}")
    if isinstance(min_score, bools):  # True is 1.0 to float(): a cut nothing passes, as k=True is refused
        raise UsageError(f"min_score is a similarity in [-1, 1], got {min_score!r}")
    if min_score is not None:
        try:
            min_score = float(min_score)
        except (TypeError, ValueError):
            raise UsageError(f"min_score is a similarity in [-1, 1], got {min_score!r}") from None
        if not -1 <= min_score <= 1:  # NaN too
            raise UsageError(f"min_score is a similarity in [-1, 1], got {min_score}")
    if media not in (None, *MEDIA):
        raise UsageError(f"media must be photo or video, got {media!r}")
    if per_video is not None and (isinstance(per_video, bool) or not isinstance(per_video, int) or per_video < 1):
        raise UsageError(f"per_video must be a whole number of at least 1, got {per_video!r}")
    if similar is not None:
        similar = querycheck.check_id(similar)
        extra = _with_similar(checked)
        if extra:  # asked wrongly, as `similar ID --text` is in the CLI (exit 2; 400 UsageError over HTTP)
            raise UsageError(f"similar=ID searches by that image's stored vector alone, as `alignsearch similar` "
                                f"does; it takes no {' or '.join(extra)}: search for those apart")
    flt = FilterOptions(**querycheck.check_filters(where=where, after=after, before=before, camera=camera, near=near,
                                                   path=path, format=format, tag=checked["tag"]))
    node = filters.build(flt)
    if media is not None:
        node = filters.with_media(node, media)
    return SearchRequest(
        text=checked["text"], image=checked["image"], negative=checked["negative"],
        text_weight=checked["text_weight"], image_weight=checked["image_weight"],
        negative_weight=checked["negative_weight"], compose=compose, k=checked["k"], nprobe=checked["nprobe"],
        filters=flt, media=media, per_video=per_video, min_score=min_score, sort=sort, mode=mode,
        collapse=bool(collapse), explain=bool(explain), similar=similar, node=node)


def _with_similar(checked: dict) -> list[str]:
    """What was given besides similar=ID that it would not use (a text was ignored, and echoed back as if
    searched), in words; empty when nothing."""
    given = (("text", checked["text"]), ("negative", checked["negative"]), ("image", checked["image"]))
    return [name for name, value in given if value is not None]


def with_image(request: SearchRequest, image: Any) -> SearchRequest:
    """The request with its image replaced by another form of it (uploaded bytes decoded), not checked again."""
    return replace(request, image=image)


# The request as HTTP parameters (GET /api/search, and the URL of POST /api/search): the server's names.
def to_params(request: SearchRequest) -> dict[str, str]:
    """The request's fields that differ from the defaults, as the server's parameters (strings); the image
    travels apart (the POST form's file)."""
    out: dict[str, Any] = {"q": request.text, "similar": request.similar, "negative": request.negative,
                           **{name: getattr(request.filters, name) for name in FILTER_NAMES}}
    defaults = SearchRequest()
    for name in ("k", "text_weight", "image_weight", "negative_weight", "compose", "nprobe", "media", "per_video",
                 "min_score", "sort", "mode", "collapse", "explain"):
        value = getattr(request, name)
        if value != getattr(defaults, name):
            out[name] = value
    if isinstance(out.get("near"), tuple):
        out["near"] = ",".join(repr(float(v)) for v in out["near"])
    return {name: _param(value) for name, value in out.items() if value is not None}


def _param(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)
    return str(value)
