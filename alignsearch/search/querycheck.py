"""What a valid query is: one set of limits for the CLI, the Python API and the HTTP API.

Pure functions, no model and no index: the CLI checks a query before it chooses between a warm
server and a local engine, the server before it queues anything for the encoder, and Engine.search
on entry, so the same query gets the same answer (or the same error and exit code) on every path.
The text cap is in characters and applies before tokenising, so a huge text never reaches the
tokenizer or holds the encoder.
"""

from __future__ import annotations

import datetime
import math
import operator
import os
import stat
import sys
from typing import TYPE_CHECKING, Any

from alignsearch.errors import BadInputError, UsageError

if TYPE_CHECKING:
    import numpy as np

# numpy, the tag limit (encoders/classify) and the file checks (media/sources) are imported where they are
# used: a query the CLI sends to a warm server is checked without them.

MAX_TEXT_CHARS = 1000  # ALIGN reads 64 tokens; a thousand characters is far past any useful query
MAX_K = 1000
DEFAULT_K = 10
MAX_WEIGHT = 100.0  # |weight|
MAX_NPROBE = 65536
# How the server says an uploaded image cannot be decoded; the CLI puts the image's path back in its place, so a
# query says the same with or without a server ("cannot use image PATH: ...", as a local search says it).
UNREADABLE_IMAGE = "unreadable image: "
MAX_ID = 2**63 - 1  # SQLite's INTEGER
MAX_IMAGE_BYTES = 20 * 1024 * 1024  # an uploaded (or CLI --image) query image
MAX_IMAGE_PIXELS = 50_000_000  # decompression-bomb guard for query images


def _unicode(value: str, name: str) -> str:
    """value, unless it holds lone surrogates: bytes that are not UTF-8 (a command line typed in a Latin-1
    locale arrives so) could not be tokenised (a TypeError) nor stored nor sent to the server."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        shown = value.encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")
        raise BadInputError(f"the {name} is not valid UTF-8 ('{shown[:60]}'): type it in a UTF-8 locale") from None
    return value


def check_text(value: str | None, name: str = "text") -> str | None:
    """A query text: None stays None; an empty or blank one, one over MAX_TEXT_CHARS, or one that is not valid
    UTF-8, is refused."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadInputError(f"the {name} must be a string")
    _unicode(value, name)
    if len(value) > MAX_TEXT_CHARS:
        raise BadInputError(f"the {name} is {len(value)} characters long; the limit is {MAX_TEXT_CHARS}")
    if not value.strip():
        raise BadInputError(f"the {name} is empty")
    return value


def _integer(value: Any, name: str, high: int) -> int:
    """An int (numpy's too, not bool or float) from 1 to high; else a UsageError (exit 2), as click's IntRange
    says an option out of its range (-k 0 was exit 6 where --per-video 0 was exit 2)."""
    try:
        number = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        number = None
    if number is None or not 1 <= number <= high:
        raise UsageError(f"{name} must be an integer from 1 to {high}, got {value!r}")
    return int(number)


def check_k(value: int) -> int:
    return _integer(value, "k", MAX_K)


def check_weight(value: float, name: str) -> float:
    """A weight: an option's value, so out of its range is a UsageError (exit 2), as --min-score's is."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number) or abs(number) > MAX_WEIGHT:
        raise UsageError(f"{name} must be a finite number from {-MAX_WEIGHT:g} to {MAX_WEIGHT:g}, got {value!r}")
    return number


def check_shares(text_weight: float, image_weight: float, method: str) -> None:
    """slerp, product and weicom split a text+image query by text_weight / (text_weight + image_weight): both
    weights must be positive, an option out of its range for that method (UsageError, exit 2) as any weight's."""
    if not (text_weight > 0 and image_weight > 0):
        raise UsageError(f"--compose {method} needs positive text and image weights, got text_weight "
                         f"{text_weight:g} and image_weight {image_weight:g}")


def check_nprobe(value: int | None) -> int | None:
    return None if value is None else _integer(value, "nprobe", MAX_NPROBE)


def check_tag(value: str | None) -> str | None:
    """A --tag filter: empty or past the label limit is a UsageError (exit 2), as an empty --camera is; the tag
    filters the results, it is not what the query searches for."""
    if value is None:
        return None
    from alignsearch.encoders.classify import MAX_TAG_CHARS

    if not isinstance(value, str) or not value.strip() or len(value) > MAX_TAG_CHARS:
        raise UsageError(f"a tag is a label of 1 to {MAX_TAG_CHARS} characters, got {str(value)[:40]!r}")
    return _unicode(value, "tag")


def check_id(value: int) -> int:
    """A catalog id, as in `similar=ID` and /api/image/ID."""
    return _integer(value, "an image id", MAX_ID)


def check_ids(values: Any) -> frozenset[int]:
    """Catalog ids to leave out (search_vector's exclude): a collection of ids, each as check_id. One id alone, a
    string or None is an option of the wrong type, a UsageError (exit 2) as every other option's (one int was a
    raw TypeError, "'int' object is not iterable"; a string was taken for its characters)."""
    try:
        ids = None if isinstance(values, (str, bytes)) else list(values)
    except TypeError:  # an int, None, a 0-d numpy array
        ids = None
    if ids is None:
        raise UsageError(f"exclude must be a collection of image ids, got {type(values).__name__} {values!r:.40}")
    return frozenset(check_id(i) for i in ids)


def check_image(value: Any) -> Any:
    """A query image: a path (its file size is capped), bytes (capped), or an already decoded image (not
    empty, within the pixel cap). Anything else is refused here rather than deep in the decoder."""
    image_module = sys.modules.get("PIL.Image")  # not loaded: the value cannot be a decoded image (no import)
    if image_module is not None and isinstance(value, image_module.Image):
        width, height = value.size
        if width < 1 or height < 1:
            raise BadInputError(f"the query image is {width}x{height} pixels: there is nothing to search for")
        if width * height > MAX_IMAGE_PIXELS:
            raise BadInputError(f"the query image has {width * height} pixels; the limit is {MAX_IMAGE_PIXELS}")
        return value
    if not isinstance(value, (str, os.PathLike, bytes, bytearray, memoryview)):
        raise BadInputError(f"the query image must be a path, bytes or a PIL image, got {type(value).__name__}")
    size = None
    if isinstance(value, (str, os.PathLike)):
        try:
            st = os.stat(value)
        except OSError as exc:
            raise BadInputError(f"cannot read the query image {os.fspath(value)}: {exc.strerror or exc}") from None
        if not stat.S_ISREG(st.st_mode):  # a FIFO would block, /dev/zero never end: refused from the stat
            from alignsearch.media.sources import unusable

            raise BadInputError(f"cannot use the query image {os.fspath(value)}: {unusable(st)}")
        size = st.st_size
        if size == 0:  # said as the decoder says it: through a server the empty upload was "the query image is empty"
            raise BadInputError(f"cannot use image {os.fspath(value)}: empty file")
    elif isinstance(value, (bytes, bytearray, memoryview)):
        size = len(value)
        if size == 0:
            raise BadInputError("the query image is empty")
    if size is not None and size > MAX_IMAGE_BYTES:
        raise BadInputError(f"the query image is {size} bytes; the limit is {MAX_IMAGE_BYTES}")
    return value


UNIT_TOLERANCE = 0.02  # as for stored vectors (engine._hits): fp16 storage keeps norms within ~1e-3


def check_vector(value: Any, dim: int) -> np.ndarray:
    """A query vector for Engine.search_vector: dim finite numbers of unit length (a zero, NaN or
    unnormalised vector ranked meaninglessly; a wrong size failed inside FAISS)."""
    import numpy as np

    try:
        vector = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError):
        raise BadInputError(f"the query vector must be {dim} numbers, got {type(value).__name__}") from None
    if vector.ndim == 2 and vector.shape[0] == 1:
        vector = vector[0]
    if vector.shape != (dim,):
        raise BadInputError(f"the query vector must have shape ({dim},) for this index's model, got {vector.shape}")
    if not np.all(np.isfinite(vector)):
        raise BadInputError("the query vector holds NaN or infinite values")
    norm = float(np.linalg.norm(vector))
    if abs(norm - 1.0) > UNIT_TOLERANCE:
        raise BadInputError(f"the query vector must be unit length, its norm is {norm:.4g}"
                            + ("" if norm == 0 else ": divide it by its norm"))
    return vector


def check_filters(**values: Any) -> dict[str, Any]:
    """The named filters of Engine.search (where, after, before, camera, near, path, format, tag), as the
    filter parser takes them: text, with dates also as date/datetime (a naive one is UTC, as in --where)
    and near also as (lat, lon, km) numbers. A wrong type is one clear error, not a raw Python one: a UsageError
    (exit 2), as the filter parser says a malformed one (near=(1, 2) was exit 6 where near="1,2" was 2)."""
    out: dict[str, Any] = {}
    for name, value in values.items():
        if value is not None and name in ("after", "before") and isinstance(value, (datetime.date, datetime.datetime)):
            value = value.isoformat()
        if value is not None and name == "near" and not isinstance(value, str):
            try:
                parts = tuple(float(v) for v in value)
            except (TypeError, ValueError):
                parts = ()
            if len(parts) != 3 or not all(math.isfinite(p) for p in parts):
                raise UsageError(f"near must be (lat, lon, km) or \"lat,lon,km\", got {value!r}")
            value = parts
        elif value is not None and not isinstance(value, str):
            raise UsageError(f"{name} must be a string, got {type(value).__name__} {value!r}")
        out[name] = value
    return out


def nothing_to_search() -> UsageError:
    """A search given neither a text nor an image: the command was asked wrongly (exit 2, HTTP 400), as a missing
    argument and an option out of its range are; a text or image that is given but unusable (empty, too long,
    unreadable) is bad input (exit 6).
    One error for every surface: the CLI said exit 2 here where Engine.search and the server said 6."""
    return UsageError("give a text, an image, or both to search for")


def validate(text: str | None = None, image: Any = None, k: int = DEFAULT_K, negative: str | None = None,
             text_weight: float = 2.0, image_weight: float = 1.0, negative_weight: float = 1.0,
             nprobe: int | None = None, tag: str | None = None, by_vector: bool = False) -> dict[str, Any]:
    """Check a search and return its arguments normalised. A negative given empty is refused as an empty text is
    (it was dropped silently, so `--negative "$UNSET"` searched without the subtraction asked for).
    by_vector: the query is a stored vector (Engine.search_vector, `similar`), so no text or image.
    Raises BadInputError (CLI exit code 6, HTTP 400) for the query's own text or image (empty, too long, not
    UTF-8, unreadable); UsageError (exit 2, HTTP 400) for an option out of its range (k, a weight, nprobe, an
    empty tag) and when there is nothing to search for. Both name the limit."""
    if not by_vector and text is None and image is None:
        raise nothing_to_search()
    checked_text = check_text(text)
    checked_image = check_image(image) if image is not None else None
    return {
        "text": checked_text,
        "image": checked_image,
        "k": check_k(k),
        "negative": check_text(negative, "negative text"),
        "text_weight": check_weight(text_weight, "text_weight"),
        "image_weight": check_weight(image_weight, "image_weight"),
        "negative_weight": check_weight(negative_weight, "negative_weight"),
        "nprobe": check_nprobe(nprobe),
        "tag": check_tag(tag),
    }
