"""Metadata filters: a small expression language (`--where`), the named flags that are shorthands for it,
and their evaluation over a snapshot's columns in numpy. Parsed here, never pasted into SQL.

    where   := or
    or      := and ("or" and)*
    and     := not ("and" not)*
    not     := "not" not | atom
    atom    := "(" or ")" | FIELD OP VALUE | "near" "(" LAT "," LON "," KM ")"
    OP      := = | != | < | <= | > | >= | ~          (~ : case-insensitive substring)
    VALUE   := a number, a "quoted" or 'quoted' string, or a bare word (a date: 2019-07-14)

Fields: taken, mtime (dates: ISO 8601 date or date-time, compared in UTC; a date alone means its
midnight), width, height, size, lat, lon (numbers), camera, lens, format, caption, path, root, tag
(text; `=` is exact and case-insensitive, `~` a substring). `path` also takes a glob with `glob`:
`path glob "Trips/**/*.jpg"` (`*` stays inside a folder, `**` crosses folders). A row whose field is
unknown (no EXIF date, no GPS) matches no comparison on it, and `not` of such a comparison does.
"""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass
from datetime import date, datetime, timezone
from typing import TYPE_CHECKING, Callable, Union

from alignsearch.errors import UsageError

if TYPE_CHECKING:
    import numpy as np

# numpy is imported where masks are made: parsing a filter (the CLI does, before it knows whether a warm
# server answers) needs none.

NUMBER_FIELDS = frozenset({"width", "height", "size", "lat", "lon", "t", "t_end"})  # t, t_end: a video moment's seconds
DATE_FIELDS = frozenset({"taken", "mtime"})
TEXT_FIELDS = frozenset({"camera", "lens", "format", "caption", "path", "root", "tag"})
FIELDS = NUMBER_FIELDS | DATE_FIELDS | TEXT_FIELDS
OPS = ("<=", ">=", "!=", "=", "<", ">", "~", "glob")
EARTH_KM = 6371.0088


@dataclass(frozen=True)
class Compare:
    field: str
    op: str
    value: Union[float, str]


@dataclass(frozen=True)
class Near:
    lat: float
    lon: float
    km: float


@dataclass(frozen=True)
class Not:
    arg: "Node"


@dataclass(frozen=True)
class And:
    args: tuple


@dataclass(frozen=True)
class Or:
    args: tuple


Node = Union[Compare, Near, Not, And, Or]

_TOKEN = re.compile(r"""\s*(?:(?P<str>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')|(?P<op><=|>=|!=|=|<|>|~)|(?P<punct>[(),])"""
                    r"""|(?P<word>[^\s()<>=!~,"']+))""")


def _tokens(text: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise UsageError(f"--where: cannot read {text[pos:pos + 20]!r} at character {pos + 1}")
        kind = m.lastgroup
        value = m.group(kind)
        if kind == "str":
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        out.append((kind, value))
        pos = m.end()
    return out


def parse(text: str) -> Node:
    """The expression's tree; UsageError (exit 2) with the place of the mistake when it is malformed."""
    tokens = _tokens(text)
    if not tokens:
        raise UsageError("--where: the expression is empty")
    node, pos = _or(tokens, 0)
    if pos != len(tokens):
        raise UsageError(f"--where: unexpected {tokens[pos][1]!r} after a complete expression")
    return node


def _peek(tokens, pos) -> str | None:
    return tokens[pos][1].lower() if pos < len(tokens) and tokens[pos][0] in ("word", "punct", "op") else None


# Parentheses and `not`s nested deeper than this are refused (exit 2 / HTTP 400): the parser and the
# evaluation recurse once per level, and a few hundred levels raised RecursionError (exit 1, HTTP 500).
MAX_NESTING = 64


def _chain(tokens, pos, depth, word, operand, join):
    """operand (word operand)*: one operand alone, else `join` of them all."""
    node, pos = operand(tokens, pos, depth)
    args = [node]
    while _peek(tokens, pos) == word:
        node, pos = operand(tokens, pos + 1, depth)
        args.append(node)
    return (args[0] if len(args) == 1 else join(tuple(args))), pos


def _or(tokens, pos, depth=0):
    return _chain(tokens, pos, depth, "or", _and, Or)


def _and(tokens, pos, depth):
    return _chain(tokens, pos, depth, "and", _not, And)


def _not(tokens, pos, depth):
    if depth > MAX_NESTING:
        raise UsageError(f"--where: parentheses and `not` nest more than {MAX_NESTING} deep")
    if _peek(tokens, pos) == "not":
        node, pos = _not(tokens, pos + 1, depth + 1)
        return Not(node), pos
    return _atom(tokens, pos, depth)


def _expect(tokens, pos, what: str) -> int:
    if _peek(tokens, pos) != what:
        got = repr(tokens[pos][1]) if pos < len(tokens) else "the end"
        raise UsageError(f"--where: expected {what!r}, got {got}")
    return pos + 1


def _atom(tokens, pos, depth):
    if pos >= len(tokens):
        raise UsageError("--where: the expression ends too early")
    if _peek(tokens, pos) == "(":
        node, pos = _or(tokens, pos + 1, depth + 1)
        return node, _expect(tokens, pos, ")")
    kind, word = tokens[pos]
    if kind == "word" and word.lower() == "near":
        pos = _expect(tokens, pos + 1, "(")
        numbers = []
        for i in range(3):
            if pos >= len(tokens):
                raise UsageError("--where: near(LAT, LON, KM) ends too early")
            numbers.append(_number(tokens[pos][1], "near"))
            pos = _expect(tokens, pos + 1, "," if i < 2 else ")")
        return near(*numbers), pos
    if kind != "word" or word.lower() not in FIELDS:
        raise UsageError(f"--where: {word!r} is not a field (fields: {', '.join(sorted(FIELDS))})")
    field = word.lower()
    if pos + 2 > len(tokens) or tokens[pos + 1][1].lower() not in OPS:
        raise UsageError(f"--where: {field} needs a comparison (one of {' '.join(OPS)})")
    op = tokens[pos + 1][1].lower()
    if pos + 2 >= len(tokens) or tokens[pos + 2][0] not in ("word", "str"):
        raise UsageError(f"--where: {field} {op} needs a value")
    return compare(field, op, tokens[pos + 2][1]), pos + 3


def _number(text: str, field: str) -> float:
    """field: a --where field, or an option (--near) whose value is read here: that one is named alone, as
    "--where: --near takes a number" sent the user to an option they had not given."""
    said = field if field.startswith("--") else f"--where: {field}"
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"{said} takes a number, not {text!r}") from None
    if not math.isfinite(value):
        raise UsageError(f"{said} takes a finite number, not {text!r}")
    return value


def parse_date(text: str, what: str = "date") -> float:
    """ISO 8601 date or date-time to UTC epoch seconds (a naive time is taken as UTC)."""
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            moment = datetime.combine(date.fromisoformat(text), datetime.min.time())
        else:
            moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"{what}: {text!r} is not an ISO 8601 date (2019-07-14 or 2019-07-14T10:30:00+02:00)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def compare(field: str, op: str, value: str) -> Compare:
    """One comparison, its value checked and converted for the field."""
    if field not in FIELDS:
        raise UsageError(f"unknown field {field!r} (fields: {', '.join(sorted(FIELDS))})")
    if op == "glob" and field != "path":
        raise UsageError("--where: glob applies to path only")
    if field in NUMBER_FIELDS:
        if op in ("~", "glob"):
            raise UsageError(f"--where: {field} is a number: use = != < <= > >=")
        return Compare(field, op, _number(value, field))
    if field in DATE_FIELDS:
        if op in ("~", "glob"):
            raise UsageError(f"--where: {field} is a date: use = != < <= > >=")
        return Compare(field, op, parse_date(value, "--where"))
    if op in ("<", "<=", ">", ">="):
        raise UsageError(f"--where: {field} is text: use = != ~" + (" or glob" if field == "path" else ""))
    if field == "format" and op in ("=", "!="):
        value = FORMAT_ALIASES.get(value.lower(), value)
        if value.lower() not in FORMATS:  # `--format bogus` (or a typo, `--format pgn`) found nothing, exit 0
            raise UsageError(f"format {value!r} is not one alignsearch indexes: {', '.join(sorted(FORMATS))} "
                             f"(or {', '.join(sorted(FORMAT_ALIASES))})")
    return Compare(field, op, value)


# The names users give formats, to the names Pillow stores (the catalog's `format`): `--format jpg` found nothing.
FORMAT_ALIASES = {"jpg": "jpeg", "jpe": "jpeg", "jfif": "jpeg", "tif": "tiff", "heic": "heif"}
# Every `format` the catalog records: Pillow's names of the image formats the indexer reads (media/images.py
# READ_FORMATS, and MPO: a camera's JPEG) and a video's extension (media/video.py VIDEO_EXTENSIONS). Names here,
# not imports: a query is checked without numpy or Pillow (request.py); tests/test_request.py holds them equal.
FORMATS = frozenset({"jpeg", "mpo", "png", "webp", "bmp", "gif", "tiff", "avif", "heif",
                     "mp4", "m4v", "mov", "mkv", "webm", "avi"})


def near(lat: float, lon: float, km: float) -> Near:
    if not (-90 <= lat <= 90 and -180 <= lon <= 180 and km > 0):
        raise UsageError(f"near: latitude in [-90, 90], longitude in [-180, 180] and km > 0, got {lat}, {lon}, {km}")
    return Near(lat, lon, km)


def parse_near(text: str) -> Near:
    """`--near LAT,LON,KM`."""
    parts = text.split(",")
    if len(parts) != 3:
        raise UsageError(f"--near takes LAT,LON,KM, got {text!r}")
    return near(*(_number(p.strip(), "--near") for p in parts))


@dataclass(frozen=True)
class FilterOptions:
    """The named flags of `query` (and keywords of Engine.search): each a shorthand for --where."""

    where: str | None = None
    after: str | None = None
    before: str | None = None
    camera: str | None = None
    near: str | tuple | None = None
    path: str | None = None
    format: str | None = None
    tag: str | None = None


def build(opts: FilterOptions) -> Node | None:
    """One tree for the flags and --where, combined with `and`; None when there is no filter. A flag given
    empty is refused (`--camera ""` was silently no filter at all), as is --after not before --before."""
    for name in ("where", "after", "before", "camera", "near", "path", "format"):
        value = getattr(opts, name)
        if isinstance(value, str) and not value.strip():
            raise UsageError(f"--{name} is empty: give a value or leave the option out")
    if opts.after and opts.before and parse_date(opts.after, "--after") >= parse_date(opts.before, "--before"):
        raise UsageError(f"--after {opts.after} is not before --before {opts.before}: no photo can match "
                         "(--after is inclusive, --before exclusive)")
    parts: list[Node] = []
    if opts.where:
        parts.append(parse(opts.where))
    if opts.after:
        parts.append(Compare("taken", ">=", parse_date(opts.after, "--after")))
    if opts.before:
        parts.append(Compare("taken", "<", parse_date(opts.before, "--before")))
    if opts.camera:
        parts.append(Compare("camera", "~", opts.camera))
    if opts.near is not None:
        parts.append(parse_near(opts.near) if isinstance(opts.near, str) else near(*map(float, opts.near)))
    if opts.path:
        parts.append(Compare("path", "glob", opts.path))
    if opts.format:
        parts.append(compare("format", "=", opts.format))  # aliases: jpg is jpeg, tif tiff
    if opts.tag:
        parts.append(Compare("tag", "=", opts.tag))
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else And(tuple(parts))


def with_media(node: Node | None, media: str) -> Node:
    """The tree, narrowed to photos or to video moments (`--media`): a moment has a start time `t`."""
    is_video = Compare("t", ">=", 0.0)
    part = is_video if media == "video" else Not(is_video)
    return part if node is None else And((node, part))


def fields_of(node: Node) -> set[str]:
    """The fields a tree reads (so a snapshot loads only those columns)."""
    if isinstance(node, Compare):
        return {node.field}
    if isinstance(node, Near):
        return {"lat", "lon"}
    if isinstance(node, Not):
        return fields_of(node.arg)
    return set().union(*(fields_of(a) for a in node.args))


def glob_regex(pattern: str) -> re.Pattern:
    """A path glob: `*` and `?` stay inside one folder, `**/` is any number of folders, `**` anything."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z", re.IGNORECASE)


def haversine_km(lat: np.ndarray, lon: np.ndarray, lat0: float, lon0: float) -> np.ndarray:
    import numpy as np

    p1, p2 = np.radians(lat), math.radians(lat0)
    dp, dl = p1 - p2, np.radians(lon - lon0)
    a = np.sin(dp / 2) ** 2 + np.cos(p1) * math.cos(p2) * np.sin(dl / 2) ** 2
    return 2 * EARTH_KM * np.arcsin(np.sqrt(np.clip(a, 0, 1)))


def evaluate(node: Node, column: Callable[[str], np.ndarray], tagged: Callable[[str], np.ndarray]) -> np.ndarray:
    """A boolean mask over the snapshot's rows. column(name) gives a numeric array (NaN when unknown) or an
    object array of lower-cased text (None when unknown); tagged(label) the mask of rows with that tag."""
    import numpy as np

    if isinstance(node, And):
        mask = evaluate(node.args[0], column, tagged)
        for arg in node.args[1:]:
            mask &= evaluate(arg, column, tagged)
        return mask
    if isinstance(node, Or):
        mask = evaluate(node.args[0], column, tagged)
        for arg in node.args[1:]:
            mask |= evaluate(arg, column, tagged)
        return mask
    if isinstance(node, Not):
        return ~evaluate(node.arg, column, tagged)
    if isinstance(node, Near):
        lat, lon = column("lat"), column("lon")
        known = ~np.isnan(lat) & ~np.isnan(lon)
        out = np.zeros(len(lat), dtype=bool)
        out[known] = haversine_km(lat[known], lon[known], node.lat, node.lon) <= node.km
        return out
    if node.field == "tag":
        mask = tagged(str(node.value))
        return ~mask if node.op == "!=" else mask
    values = column(node.field)
    if node.field in NUMBER_FIELDS or node.field in DATE_FIELDS:
        with np.errstate(invalid="ignore"):  # NaN (unknown) compares False, except under != where it is excluded
            out = {"=": np.equal, "!=": np.not_equal, "<": np.less, "<=": np.less_equal, ">": np.greater,
                   ">=": np.greater_equal}[node.op](values, node.value)
        return out & ~np.isnan(values) if node.op == "!=" else out
    return _text_mask(values, node.op, str(node.value))


@dataclass(frozen=True)
class TextColumn:
    """A lower-cased text column, dictionary-encoded: row i holds distinct[codes[i]] (None: unknown). Text
    filters test each distinct value once (cameras, formats, folders repeat a lot)."""

    codes: np.ndarray
    distinct: list

    @classmethod
    def of(cls, values) -> "TextColumn":
        import numpy as np

        index: dict = {}
        codes = np.fromiter((index.setdefault(v, len(index)) for v in values), dtype=np.int32, count=len(values))
        return cls(codes, list(index))


def as_stored(value: str) -> str:
    """A filter's text as the catalog shows names: bytes that are not UTF-8 (typed in a shell as $'bad\\xff*',
    they arrive as lone surrogates) as \\xNN. `--path 'bad\\xff*'` matched nothing though `bad\\xff.jpg` was
    indexed and shown by that name."""
    # run by run of os.fsdecode's surrogates (U+DC80-U+DCFF): another lone surrogate (the Python API takes any str)
    # stands for no byte, and the whole text's encode failed (UnicodeEncodeError); no name holds it: left as it is, it
    # matches nothing, as before. Runs apart decode as the whole would: escaped bytes never form a character with a real one's bytes.
    return _ESCAPED_BYTES.sub(lambda m: m.group().encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace"),
                              value)


_ESCAPED_BYTES = re.compile("[\udc80-\udcff]+")


def _text_mask(values, op: str, value: str) -> np.ndarray:
    import numpy as np

    column = values if isinstance(values, TextColumn) else TextColumn.of(values)
    # é typed (NFC) matches é as macOS names store it (NFD), as keyword search does, in every text comparison
    # (`path ~ café` found only the glob's matches before); a name's bytes that are not UTF-8 are shown as \\xNN,
    # plain ASCII that normalising leaves alone. Each distinct value is normalised once.
    distinct = ["\x00" if d is None else unicodedata.normalize("NFC", d) for d in column.distinct]
    inverse = column.codes
    value = as_stored(value)
    needle = unicodedata.normalize("NFC", value).lower()
    if op == "glob":
        regex = glob_regex(unicodedata.normalize("NFC", value))
        hit = np.array([d != "\x00" and regex.match(d) is not None for d in distinct], dtype=bool)
    elif op == "~":
        hit = np.array([d != "\x00" and needle in d for d in distinct], dtype=bool)
    else:
        hit = np.array([d != "\x00" and d == needle for d in distinct], dtype=bool)
        if op == "!=":
            hit = np.array([d != "\x00" for d in distinct], dtype=bool) & ~hit
    return hit[inverse] if len(inverse) else np.zeros(0, dtype=bool)
