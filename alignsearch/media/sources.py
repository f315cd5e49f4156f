"""Where images are read from. A catalog root names a source; an image is (root, relpath) inside it:

- a local folder: relpath is the path under it;
- a URL prefix read through fsspec (s3://bucket/photos, gs://..., any protocol whose fsspec package is
  installed): relpath is the key under the prefix;
- a list file (.csv or .parquet, local or a URL) with a column of paths or URLs: relpath is the entry,
  made absolute against the list's folder;
- a WebDataset shard (an uncompressed .tar, local or a URL): relpath is the member's name.

Light to import (no torch): decode workers and the server read through it.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import tarfile
from datetime import datetime
from pathlib import Path
from typing import IO
from urllib.parse import unquote, urlsplit

from alignsearch import safeopen
from alignsearch.errors import BadImageError, BadInputError

FOLDER, PREFIX, LIST, TAR = "folder", "prefix", "list", "tar"
LIST_SUFFIXES = (".csv", ".parquet")
PATH_COLUMNS = ("path", "url", "uri", "image", "image_path", "filepath", "file", "filename", "key")
FSSPEC_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs",
                   "http": "aiohttp", "https": "aiohttp"}
_BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}")
# No image file is read past this many bytes: a larger one is recorded as failed, never loaded whole
# (a 200-megapixel camera's JPEG is under 100 MB; an uncompressed 16-bit TIFF of 60 MP about 360 MB).
MAX_FILE_BYTES = 256 * 2**20


def is_url(path: str) -> bool:
    return "://" in path


def kind(root: str) -> str:
    """By the name's suffix (a URL's path, so signed query strings do not count); a local folder that
    happens to be named like a file (photos.tar/) stays a folder."""
    url = is_url(root)
    lower = (urlsplit(root).path if url else root).lower().rstrip("/")
    if lower.endswith(".tar") or lower.endswith(LIST_SUFFIXES):
        if not url and os.path.isdir(root):
            return FOLDER
        return TAR if lower.endswith(".tar") else LIST
    return PREFIX if url else FOLDER


def is_pattern(name: str) -> bool:
    """Whether a root as given holds a shard range (`{000..099}`) that expand() turns into several names."""
    return _BRACES.search(name) is not None


MAX_EXPANDED = 1_000_000  # names one pattern may stand for: more shards than any WebDataset set holds


def expand(pattern: str) -> list[str]:
    """WebDataset's shard notation: `shards-{000..009}.tar` is ten names (zero padding kept). A pattern for more
    than MAX_EXPANDED names is refused before any is made: `{000..99999999}` (a digit too many) built 100 million
    names, 9.5 GB and 90 s, before the first missing shard was said."""
    count = 1
    for lo, hi in _BRACES.findall(pattern):
        count *= max(int(hi) - int(lo) + 1, 1)
    if count > MAX_EXPANDED:
        raise BadInputError(f"{pattern} stands for {count:,} names; at most {MAX_EXPANDED:,}: check the range")
    m = _BRACES.search(pattern)
    if m is None:
        return [pattern]
    lo, hi = m.group(1), m.group(2)
    if int(hi) < int(lo):
        raise BadInputError(f"{pattern}: the range {{{lo}..{hi}}} counts down; write the low number first")
    names = [f"{pattern[:m.start()]}{i:0{len(lo)}d}{pattern[m.end():]}" for i in range(int(lo), int(hi) + 1)]
    return [name for partial in names for name in expand(partial)]


def filesystem(url: str):
    """(fsspec filesystem, path inside it); a clear error when the protocol's package is missing."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as exc:
        protocol = url.split("://", 1)[0]
        package = FSSPEC_PACKAGES.get(protocol)
        if package is not None and isinstance(exc, ImportError):  # fsspec's own line says "Install s3fs" too
            raise BadInputError(f"cannot read {url}: {package} is not installed (pip install {package}) "
                                f"to index {protocol}:// paths") from None
        raise BadInputError(f"cannot read {url}: {exc}. Install {package or f'the fsspec package for {protocol}://'}"
                            f"{f' (pip install {package})' if package else ''} to index {protocol}:// paths") from None


def normalise(root: str) -> list[str]:
    """The catalog names for a root given on the command line: braces expanded, local paths absolute.
    Raises BadInputError when a root cannot be a source at all."""
    if str(root) == "":  # os.path.abspath("") is the current folder: `index "$UNSET"` indexed it
        raise BadInputError("an empty root was given: name a folder of images, e.g. `alignsearch index ./photos`")
    out = []
    for name in expand(str(root)):
        if name.lower().endswith((".tar.gz", ".tgz", ".tar.zst", ".tar.bz2", ".tar.xz")):
            raise BadInputError(f"{name}: compressed tar shards cannot be read by offset; index uncompressed .tar "
                                "shards (WebDataset's usual format)")
        if not is_url(name):
            # Folders as earlier versions stored them (symlinks resolved); a list or shard as named, so a
            # list's relative entries are relative to the folder the user sees it in.
            name = str(Path(name).resolve()) if os.path.isdir(name) else os.path.abspath(name)
        elif kind(name) == PREFIX:
            name = name.rstrip("/")
        if not exists(name):
            problem = _not_a_source(name) if not is_url(name) else "does not exist"
            raise BadInputError(f"{name} {problem}: give a folder of images, a .csv/.parquet list of paths or "
                                "URLs, an uncompressed .tar shard, or a URL prefix such as s3://bucket/photos")
        out.append(name)
    return out


_NOT_SOURCES = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"),
                (stat.S_ISBLK, "a device"))


def _not_a_source(name: str) -> str:
    """What a local name that is no source is, in words, judged by stat alone: opening a FIFO would block."""
    try:
        mode = os.stat(name).st_mode
    except OSError as exc:
        return "is a symlink loop" if exc.errno == errno.ELOOP else "does not exist"
    if stat.S_ISREG(mode):  # named as a folder (a list or shard name that is a file exists)
        return "is a file"
    what = next((words for test, words in _NOT_SOURCES if test(mode)), "not a regular file")
    return f"is {what}"


def exists(root: str) -> bool:
    """Whether the source is there now (a folder is a directory; a list or shard is a file)."""
    k = kind(root)
    if not is_url(root):
        return os.path.isdir(root) if k == FOLDER else os.path.isfile(root)
    fs, path = filesystem(root)
    try:
        return fs.isdir(path) if k == PREFIX else fs.isfile(path)
    except FileNotFoundError:
        return False
    except Exception as exc:  # noqa: BLE001 - credentials, permissions, network: say which
        raise BadInputError(f"cannot reach {root}: {type(exc).__name__}: {exc}") from None


def catalog_key(name: str) -> tuple[str, bytes | None]:
    """(relpath, raw) of an entry's name (os.fsdecode's surrogates for bytes that are not UTF-8): the catalog's
    key, text with every backslash doubled and each byte that is not UTF-8 as \\xNN, a lossless escape of the
    name's bytes; raw, the bytes, only where the key is not the name itself. A name that is not UTF-8 and one
    literally spelled like its \\xNN form once shared a key (one was never searchable)."""
    raw = os.fsencode(name)
    key = raw.replace(b"\\", b"\\\\").decode("utf-8", "backslashreplace")
    return key, (None if key == name else raw)


def key_holds(relpath: str, relpath_raw: bytes | None) -> bool:
    """Whether a row's kept bytes are the name its key spells (or there are none): the key is a lossless escape of
    them (catalog_key), or, in a catalog not yet upgraded to lossless keys, the bytes with those that are not UTF-8
    as \\xNN. The key has a second copy in the catalog's unique index, the bytes none: a damaged byte of theirs shows
    here (catalog.check_names)."""
    if relpath_raw is None:
        return True
    if not isinstance(relpath_raw, bytes) or not relpath_raw:  # a writer stores bytes or NULL, never text or b""
        return False
    return relpath in (catalog_key(os.fsdecode(relpath_raw))[0], relpath_raw.decode("utf-8", "backslashreplace"))


_KEY_ESCAPE = re.compile(r"\\(\\|x[0-9a-f]{2})?")  # what catalog_key writes: a doubled backslash, \xNN


def key_name(relpath: str) -> tuple[str, bytes | None] | None:
    """The inverse of catalog_key for a lossless key: (relpath, raw) as catalog_key gives them for the name the key
    escapes; None where the key is no lossless escape (a lone backslash, or one catalog_key would not write, as
    \\x41 for A). Keys written before keys were lossless left backslashes single: no name is rebuilt from those."""
    out, pos = bytearray(), 0
    try:
        for m in _KEY_ESCAPE.finditer(relpath):
            if m.group(1) is None:
                return None
            out += relpath[pos:m.start()].encode("utf-8")
            out += b"\\" if m.group(1) == "\\" else bytes([int(m.group(1)[1:], 16)])
            pos = m.end()
        out += relpath[pos:].encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: catalog_key never writes one
        return None
    key = catalog_key(os.fsdecode(bytes(out)))
    return key if key[0] == relpath else None


def name_bytes(relpath: str, relpath_raw: bytes | None = None) -> bytes:
    """The bytes of a catalogued name: raw where the catalog kept them, else the key, which is then the name."""
    return relpath_raw if relpath_raw else relpath.encode("utf-8")


def shown_name(relpath: str, relpath_raw: bytes | None = None) -> str:
    """A catalogued name as text to show: its bytes that are not UTF-8 as \\xNN, backslashes as they are."""
    return relpath_raw.decode("utf-8", "backslashreplace") if relpath_raw else relpath


def location(root: str, relpath: str, relpath_raw: bytes | None = None) -> str:
    """The path or URL to show for an image (for a tar member: shard/member, WebDataset style)."""
    k = kind(root)
    if k == LIST:
        return shown_name(relpath, relpath_raw)
    if k == FOLDER:
        return os.path.join(root, os.fsdecode(relpath_raw) if relpath_raw else relpath)
    return f"{root.rstrip('/')}/{shown_name(relpath, relpath_raw)}"


def file_path(url: str) -> str | None:
    """The local path a file:// URL names (None for any other URL): read as a local file, with a local
    file's checks, never through fsspec. A file:// URL naming another host is refused."""
    parts = urlsplit(url)
    if parts.scheme.lower() != "file":
        return None
    if parts.netloc not in ("", "localhost"):
        raise BadInputError(f"{url} names another host: file:// URLs must name a file on this machine")
    return unquote(parts.path, errors="surrogateescape")  # %E9 in a non-UTF-8 name stays that byte


def local_file(root: str, relpath: str, relpath_raw: bytes | None = None) -> tuple[str, str | bytes] | None:
    """(folder, path under it) of an indexed image that lies on this machine, for safeopen.open_under; None
    for a URL or a tar member. A folder's image is walked from the folder; a list's entry from the list's
    folder when it lies under it, else from the entry's own folder (its other folders are as the list
    names them)."""
    k = kind(root)
    if k == FOLDER:
        return root, relpath_raw or relpath
    if k != LIST:
        return None
    entry = os.fsdecode(relpath_raw) if relpath_raw else relpath
    if is_url(entry):
        entry = file_path(entry)
        if entry is None:
            return None
    entry = os.path.abspath(entry)
    base = None if is_url(root) else os.path.dirname(root)
    if base and entry.startswith(base.rstrip("/") + "/"):
        return base, entry[len(base.rstrip("/")) + 1:]
    return os.path.dirname(entry), os.path.basename(entry)


def open_binary(path: str) -> IO[bytes]:
    """A list file, a tar shard or another file named as a root: a local one only when it is a regular file
    (safeopen), never blocking on a FIFO."""
    local = file_path(path) if is_url(path) else path
    if local is not None:
        try:
            return os.fdopen(safeopen.open_regular(local), "rb")
        except BadImageError as exc:
            raise BadInputError(f"{path}: {exc}") from None
    fs, inner = filesystem(path)
    return fs.open(inner, "rb")


file_kind = safeopen.file_kind


def unusable(st: os.stat_result, max_bytes: int = MAX_FILE_BYTES) -> str | None:
    """Why a stat'ed file cannot be an image (not a regular file, or too large), else None."""
    if not stat.S_ISREG(st.st_mode):
        return f"not a regular file: {file_kind(st.st_mode)}"
    if st.st_size > max_bytes:
        return too_large(st.st_size, max_bytes)
    return None


def too_large(size: int, max_bytes: int = MAX_FILE_BYTES) -> str:
    return f"file too large: {size:,} bytes, over the limit of {max_bytes:,}"


def _read_checked(fd: int, max_bytes: int) -> bytes:
    """The bytes of an open regular file (safeopen), refused from its fstat when over max_bytes, and never
    more than max_bytes read, even from a file that grows meanwhile."""
    try:
        problem = unusable(os.fstat(fd), max_bytes)
    except BaseException:
        os.close(fd)
        raise
    if problem:
        os.close(fd)
        raise BadImageError(problem)
    data = safeopen.read_fd(fd, max_bytes)
    if len(data) > max_bytes:
        raise BadImageError(too_large(len(data), max_bytes))
    return data


def read_local(path: str | os.PathLike, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """A local file named by the user (a query image), checked before anything is read: a FIFO, device,
    directory or socket, or a file over max_bytes, raises BadImageError with the reason; opening never
    blocks (O_NONBLOCK). Other failures raise OSError."""
    return _read_checked(safeopen.open_regular(path), max_bytes)


def read_bytes(root: str, relpath: str, relpath_raw: bytes | None = None, offset: int = -1, size: int = 0,
               max_bytes: int = MAX_FILE_BYTES, *, follow_last: bool = True,
               expect: tuple[int, float] | None = None) -> bytes:
    """An image's bytes, never more than max_bytes (BadImageError: too large, or not a regular file).
    A local one is opened under its root (safeopen.open_under: no symlinked folder on the way; the file
    itself a symlink only with follow_last, as the indexer's scan follows file links; expect: the catalog's
    size and mtime). A tar member is read at its data offset when known, else looked up by name.
    Raises OSError (FileNotFoundError when it is gone)."""
    if kind(root) != TAR:
        local = local_file(root, relpath, relpath_raw)
        if local is not None:
            return _read_checked(safeopen.open_under(*local, follow_last=follow_last, expect=expect), max_bytes)
        with open_binary(location(root, relpath, relpath_raw)) as f:
            data = f.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise BadImageError(too_large(len(data), max_bytes))
        return data
    with open_binary(root) as f:
        if offset < 0:
            name = os.fsdecode(relpath_raw) if relpath_raw else relpath
            try:
                member = tarfile.open(fileobj=f, mode="r:").getmember(name)  # noqa: SIM115 - reads f, closed by the with
            except (KeyError, tarfile.TarError):
                raise FileNotFoundError(f"no member {relpath} in {root}") from None
            offset, size = member.offset_data, member.size
        if size > max_bytes:
            raise BadImageError(too_large(size, max_bytes))
        f.seek(offset)
        return f.read(size)


def tar_members(root: str) -> dict[str, tuple[int, int]]:
    """Member name -> (data offset, size) for every regular file of a shard, from one pass over its headers."""
    with open_binary(root) as f:
        return {m.name.removeprefix("./"): (m.offset_data, m.size) for m in tarfile.open(fileobj=f, mode="r:") if m.isfile()}


class ListRead:
    """One list file as a run read it (list_table): its table, or the error reading it raised, and the entries of
    each path column asked (list_entries)."""

    def __init__(self, table=None, error: BadInputError | None = None):
        self.table, self.error = table, error
        self.entries: dict[str | None, list[str]] = {}


def list_table(path: str, tables: dict | None = None):
    """A list file's table, read once per run where `tables` (a run's {path: ListRead}, added to) is given: the table
    privacy.keep_private judged is the one the scan lists (read again, a list replaced between the two was listed
    unjudged), and a list of 1M entries is parsed once, not three times (the judgement, the scan's captions, its
    entries). An error is kept too: a list unreadable when judged is unreadable to the scan."""
    if tables is None:
        return _list_table(path)
    if path not in tables:
        try:
            tables[path] = ListRead(_list_table(path))
        except BadInputError as exc:
            tables[path] = ListRead(error=exc)
    held = tables[path]
    if held.error is not None:
        raise BadInputError(str(held.error))
    return held.table


def list_entries(path: str, column: str | None, tables: dict | None = None) -> list[str]:
    """read_list of the run's table (list_table), kept per column in `tables`: the judgement and the scan of a run
    ask for the same column, and making 1M cells strings cost about what parsing the file did."""
    table = list_table(path, tables)
    if tables is None:
        return read_list(path, column, table)
    held = tables[path].entries
    if column not in held:
        held[column] = read_list(path, column, table)
    return held[column]


def _list_table(path: str):
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    try:
        with open_binary(path) as f:
            return pq.read_table(f) if path.lower().endswith(".parquet") else pacsv.read_csv(f)
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise BadInputError(f"cannot read the list {path}: {exc}") from None


def list_columns(path: str) -> list[str] | None:
    """The column names of a list file, from its header (parquet: its footer) alone; None when it cannot be read
    now (a listing error of the run, not a refusal)."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    try:
        with open_binary(path) as f:
            return pq.read_schema(f).names if path.lower().endswith(".parquet") else pacsv.open_csv(f).schema.names
    except (OSError, ValueError, BadInputError):  # pyarrow's ArrowInvalid is a ValueError
        return None


def _path_column(path: str, table, column: str | None) -> str:
    names = table.column_names
    lowered = {name.lower(): name for name in names}
    chosen = column if column is not None else next((lowered[c] for c in PATH_COLUMNS if c in lowered), None)
    if chosen is None and len(names) == 1:
        chosen = names[0]
    if chosen not in names:
        raise BadInputError(f"the list {path} has no column {chosen or 'named path or url'} (columns: "
                            f"{', '.join(names)}): name the one with the paths with --list-column")
    return chosen


def read_list(path: str, column: str | None = None, table=None) -> list[str]:
    """The entries of a list file's path column: `column`, else the first of PATH_COLUMNS present, else
    its only column. A one-column CSV without a header (its first line a path) is read as all entries.
    table: the list's table already read (list_table), else it is read now."""
    table = _list_table(path) if table is None else table
    names = table.column_names
    chosen = _path_column(path, table, column)
    entries = [str(v) for v in table.column(chosen).to_pylist() if v is not None and str(v).strip()]
    if len(names) == 1 and column is None and _looks_like_path(chosen) and path.lower().endswith(".csv"):
        entries.insert(0, chosen)  # no header: the first line was an entry
    return entries


CAPTION_COLUMNS = ("caption", "text", "alt")


def list_captions(path: str, column: str | None = None, caption_column: str | None = None,
                  table=None) -> dict[str, str]:
    """{entry: caption} from a list's caption column (`caption_column`, else caption/text/alt); {} if none.
    table: the list's table already read (list_table), else it is read now."""
    table = _list_table(path) if table is None else table
    lowered = {name.lower(): name for name in table.column_names}
    chosen = caption_column if caption_column is not None else next(
        (lowered[c] for c in CAPTION_COLUMNS if c in lowered), None)
    if chosen is None:
        return {}
    if chosen not in table.column_names:
        raise BadInputError(f"the list {path} has no column {chosen} (columns: {', '.join(table.column_names)})")
    entries = table.column(_path_column(path, table, column)).to_pylist()
    return {str(e).strip(): str(c) for e, c in zip(entries, table.column(chosen).to_pylist())
            if e is not None and c is not None}


def _looks_like_path(text: str) -> bool:
    return is_url(text) or "/" in text or os.path.splitext(text)[1].lower() in {".jpg", ".jpeg", ".png", ".webp"}


def info_mtime(info: dict) -> float:
    """A modification time from an fsspec info dict, whatever the filesystem calls it (0.0 if none)."""
    for key in ("mtime", "LastModified", "last_modified", "updated", "modified", "created", "timeCreated"):
        value = info.get(key)
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, str):
            try:
                return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
    return 0.0
