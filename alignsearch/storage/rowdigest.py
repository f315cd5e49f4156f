"""A catalog row's digest: a short BLAKE2b of the fields a search, `similar`, `dupes`, the server or an export shows.

SQLite pages carry no checksum: a byte flipped inside a caption, a camera or a width was read as it stood and shown,
exit 0, and `verify` (SQLite's integrity check) said ok, for no index holds a second copy of such a value. Every
writer of a files or photos row now stores this digest in the same statement as the fields (catalog.insert_file,
catalog.set_photo, set_captions, set_ocr; migrate step 14 for the rows written before), and readers compare it with
the fields they read (catalog.check_rows, catalog.photos_of). Pure functions: no database here.

The name (root, relpath, relpath_raw) is left out: the unique index on the key holds its second copy
(catalog.check_names), and writers rename rows in place (upgrade_keys_lossless, roots.move_file). So is the vector
address: compaction moves ranges of it in one UPDATE, which cannot compute BLAKE2; it has a seal of its own that SQL
can shift (seal, below; files.vec_seal from schema 17). A photos row's key (file_id) is digested with its fields
from schema 21 (PHOTO_KEYED_FIELDS).
"""

from __future__ import annotations

import hashlib
import math
import struct
from typing import Any, Iterable, Mapping

INT, REAL, TEXT = "integer", "real", "text"

# (column, the SQLite type its writers store): the order is part of the digest
FILE_FIELDS = (("size", INT), ("mtime", REAL), ("sha256", TEXT), ("width", INT), ("height", INT), ("format", TEXT),
               ("status", TEXT), ("reason", TEXT), ("indexed_at", REAL), ("moment", INT), ("t", REAL),
               ("t_end", REAL))
PHOTO_FIELDS = (("taken", REAL), ("taken_source", TEXT), ("camera", TEXT), ("lens", TEXT), ("lat", REAL),
                ("lon", REAL), ("caption", TEXT), ("ocr", TEXT))
# The photos row's key (file_id, its rowid) digested with its fields from schema 21 (migrate step 21): a rowid table has
# no second copy of its key, so a flipped bit of one moved the row to another id, that of no file, where every reader
# missed it (the photo's date shown as none, exit 0) and verify called it a harmless leftover. The key first, so a row
# digested without it (schema 14 to 20) never holds with it. No writer changes a photos row's key in place (set_photo
# deletes and inserts; a file taken again gets a new id: catalog.upsert_file), so none need digest a row anew for it.
PHOTO_KEY = (("file_id", INT),)
PHOTO_KEYED_FIELDS = PHOTO_KEY + PHOTO_FIELDS
SIZE = 8  # bytes of digest (16 hex digits): a random change passes unseen once in 2**64


def photo_fields(keyed: bool) -> tuple:
    """The photos row's digested fields: with its key (PHOTO_KEYED_FIELDS: every writer, and readers of a catalog at
    schema 21 on), or without it (PHOTO_FIELDS: what schemas 14 to 20 wrote, as their readers check it)."""
    return PHOTO_KEYED_FIELDS if keyed else PHOTO_FIELDS


def stored(fields: tuple, values: Mapping[str, Any]) -> dict[str, Any]:
    """The values as SQLite stores them in those columns (what a reader reads back), for the fields given: a number
    in a REAL column reads as a float, an integral float in an INTEGER column as an int, a number in a TEXT column as
    text, NaN as NULL. A writer stores these, and digests them, so the digest is of what a reader will read."""
    out = {}
    for name, kind in fields:
        if name not in values:
            continue
        v = values[name]
        if isinstance(v, bool):
            v = int(v)
        if isinstance(v, float) and math.isnan(v):
            v = None  # SQLite stores NaN as NULL
        elif kind == REAL and isinstance(v, float) and v == 0:
            # SQLite keeps a REAL with no fraction as an integer, so -0.0 (a place at 0 degrees W or S) reads back
            # 0.0: digested as -0.0, the healthy row was called damaged (exit 7)
            v = 0.0
        elif kind == REAL and isinstance(v, int):
            v = float(v)
        elif kind == INT and isinstance(v, float) and v.is_integer():
            v = int(v)
        elif kind == TEXT and isinstance(v, (int, float)):
            v = str(v)
        out[name] = v
    return out


def _encode(value: Any) -> bytes:
    """One value, its type told apart (1 and 1.0 and "1" differ; a text read as bytes differs), length-prefixed so
    no two rows' fields run together into the same bytes."""
    if value is None:
        return b"N"
    if isinstance(value, int) and not isinstance(value, bool):
        body, tag = str(value).encode(), b"I"
    elif isinstance(value, float):
        body, tag = struct.pack(">d", value), b"F"
    elif isinstance(value, str):
        body, tag = value.encode("utf-8", "surrogatepass"), b"S"
    elif isinstance(value, (bytes, bytearray, memoryview)):
        body, tag = bytes(value), b"B"
    else:  # a type no reader gets from SQLite: never equal to a digest written
        body, tag = repr(value).encode(), b"?"
    return tag + struct.pack(">I", len(body)) + body


_LENGTH, _DOUBLE = struct.Struct(">I").pack, struct.Struct(">d").pack
_FLOAT_HEAD = b"F" + _LENGTH(8)
# the tag and length of a text or integer of under 256 bytes (every integer SQLite holds; most text), made once
_TEXT_HEADS, _INT_HEADS = (tuple(tag + _LENGTH(n) for n in range(256)) for tag in (b"S", b"I"))


def _encoded(shown: Iterable[Any]) -> bytes:
    """The values in their fields' order, each as _encode gives it, run together: the bytes a digest is of. The
    types a reader gets from SQLite (None, int, float, str: exact types) are encoded here in line, for a call of
    _encode with its isinstance tests and an update of the hash per field was about half of a shown row's check
    (cProfile of a search); any other type, a subclass or bytes included, is _encode's, so the bytes are _encode's
    for every value (tests/test_row_digest.py pins digests written by the code before)."""
    parts = []
    add = parts.append
    for value in shown:
        kind = type(value)
        if value is None:
            add(b"N")
        elif kind is float:
            add(_FLOAT_HEAD + _DOUBLE(value))
        elif kind is str:
            body = value.encode("utf-8", "surrogatepass")
            add((_TEXT_HEADS[len(body)] if len(body) < 256 else b"S" + _LENGTH(len(body))) + body)
        elif kind is int:
            body = str(value).encode()
            add((_INT_HEADS[len(body)] if len(body) < 256 else b"I" + _LENGTH(len(body))) + body)
        else:
            add(_encode(value))
    return b"".join(parts)


def digest_of(fields: tuple, shown: Iterable[Any]) -> str:
    """The digest of a row's shown values given in the order of `fields` (a reader's tuple: catalog.check_rows reads
    them off a FileRow in one step, no dict): digest() of the same values."""
    # personalised: a files row's digest never fits a photos row
    return hashlib.blake2b(_encoded(shown), digest_size=SIZE,
                           person=b"as-files" if fields is FILE_FIELDS else b"as-photos").hexdigest()


def digest(fields: tuple, values: Mapping[str, Any]) -> str:
    """The digest of a row's shown fields as read (or as stored() gives them to a writer): 16 hex digits. A field
    missing from values counts as NULL (a reader of an older catalog's photos lacks ocr)."""
    return digest_of(fields, [values.get(name) for name, _ in fields])


def holds(fields: tuple, values: Mapping[str, Any], written: Any) -> bool:
    """Whether a row's fields as read are the ones its digest was written for (NULL or a damaged digest: no)."""
    return isinstance(written, str) and digest(fields, values) == written


def holds_shown(fields: tuple, shown: Iterable[Any], written: Any) -> bool:
    """holds() of the shown values given in the order of `fields` (digest_of)."""
    return isinstance(written, str) and digest_of(fields, shown) == written


def next_digest(fields: tuple, before: Mapping[str, Any], written: Any, after: Mapping[str, Any]) -> Any:
    """The digest to store when a writer changes some fields of a row that read `before` with digest `written`:
    that of `after` when the row was as written; else `written` unchanged, so a damaged row stays found (verify,
    readers) and is never blessed by an unrelated write (an OCR fill, a caption read again)."""
    return digest(fields, after) if holds(fields, before, written) else written


def mismatched(fields: tuple, rows: Iterable[tuple[int, Mapping[str, Any], Any]]) -> list[int]:
    """The ids of the (id, fields as read, digest) rows whose digest does not hold."""
    return [i for i, values, written in rows if not holds(fields, values, written)]


# The vector address's seal (files.vec_seal, schema 17). The address is outside the digest because compaction moves
# whole ranges of rows in one UPDATE (catalog.readdress), and SQL has no BLAKE2: re-digesting each moved row in Python
# turned that statement into a read and a write per row. The seal is arithmetic SQL can do: an affine map of the
# address modulo a prime. A shift of the address shifts the seal by a constant (seal_shift), so readdress moves both in
# its one statement without reading the address it trusts: a damaged one stays damaged, never sealed anew. A flipped
# byte changes the address by k * 256**j (0 < |k| < 256), never a multiple of the prime, so its seal never matches;
# the offset keeps an address and seal both zeroed from passing. Products stay below 2**62: no SQLite overflow to REAL.
SEAL_PRIME, SEAL_FACTOR, SEAL_OFFSET = 2147483647, 1103515245, 12345  # 2**31 - 1 (prime); factor, offset below it


def seal(address: int | None) -> int | None:
    """The seal written beside a vector address (None for none: a failed file's)."""
    return None if address is None else seal_of(address)


def seal_of(address):
    """The seal of an address, of a numpy array of them, or of an SQL expression (SQLAlchemy's operators): one
    formula wherever seals are computed, so they agree."""
    return (address % SEAL_PRIME * SEAL_FACTOR + SEAL_OFFSET) % SEAL_PRIME


def seal_shift(shift: int) -> int:
    """What adding `shift` to an address adds to its seal, modulo SEAL_PRIME (non-negative, so SQLite's %, signed
    like its dividend, never sees a negative sum)."""
    return shift % SEAL_PRIME * SEAL_FACTOR % SEAL_PRIME


def sealed(addresses, seals) -> bool:
    """Whether every address (numpy int64 array, as engine columns load them) holds the seal beside it."""
    return bool((seal_of(addresses) == seals).all())


# A re-encode's pending address is sealed with its file id too (pending_vectors.vec_seal, schema 22): the id is that
# table's key, outside the address, and a flipped byte of it that keeps the keys in order (the highest id onto a file
# not re-encoded yet) no check of SQLite's sees: a resumed re-encode took that file for done and its switch gave it
# the other file's vector, exit 0, verify ok. The id's own term, added to the address's seal, makes such a row off its
# seal; the switch takes the term off again as it moves the seal into files.vec_seal (the address's alone there: a
# file's id never changes, and readers look rows up by it). The factor (7**5) is below the prime, so a flip, which
# moves the id by k * 256**j (0 < |k| < 256), moves the term by a non-multiple of it: never the same seal.
SEAL_KEY_FACTOR = 16807


def key_term(file_id):
    """What a file id adds to its pending address's seal, modulo SEAL_PRIME: of an int, a numpy array of them, or
    an SQL expression (SQLAlchemy's operators), as seal_of."""
    return file_id % SEAL_PRIME * SEAL_KEY_FACTOR % SEAL_PRIME


def pending_seal(file_id: int, address: int | None) -> int | None:
    """The seal written beside a re-encode's pending address (None for none)."""
    return None if address is None else pending_seal_of(file_id, address)


def pending_seal_of(file_id, address):
    """The pending seal of (file id, address): ints, numpy arrays or SQL expressions, one formula (seal_of)."""
    return (seal_of(address) + key_term(file_id)) % SEAL_PRIME


def pending_sealed(file_ids, addresses, seals) -> bool:
    """Whether every pending (file id, address) (numpy arrays) holds the seal beside it."""
    return bool((pending_seal_of(file_ids, addresses) == seals).all())


def key_term_sql(file_id: str) -> str:
    """SQL for key_term of the file id an SQL expression gives."""
    return f"(({file_id}) % {SEAL_PRIME} * {SEAL_KEY_FACTOR} % {SEAL_PRIME})"


def seal_sql(address: str) -> str:
    """SQL for the seal of the address an SQL expression gives (NULL for NULL): what seal computes."""
    return f"(({address}) % {SEAL_PRIME} * {SEAL_FACTOR} + {SEAL_OFFSET}) % {SEAL_PRIME}"


def shifted_seal_sql(seal_column: str, shift: str) -> str:
    """SQL for a seal moved with its address by the shift an SQL expression gives (seal_shift; NULL for a NULL
    shift): the seal read is moved, never computed anew from the address read, so a damaged address stays found."""
    return f"(({seal_column}) + ((({shift}) % {SEAL_PRIME} + {SEAL_PRIME}) % {SEAL_PRIME}) * {SEAL_FACTOR}) % {SEAL_PRIME}"


# The photo fields' seal (photos.field_seal, schema 23). The snapshot's filter columns (search/columns.py) read every
# indexed file's date and place, not only a hit's row, and a BLAKE2 digest a row was too slow to check there (step 23,
# which checks each photos row's, took 1.1 s at 100k rows, against a load of 0.5 s: RESULTS.md, bench_photo_keys
# --seals): a byte flipped in a date left its file out of --after, exit 0. This seal is
# arithmetic numpy does for every row at once: a wrap-around uint64 mix (splitmix64's finaliser, a bijection) over
# the row's key and each field's float64 bits, as a reader reads them back (-0.0 as 0.0, NULL and NaN as one NaN).
# A change of one value changes the seal always (each round is a bijection of the state); of several, but once in 2**64.
# The key is sealed too: a row moved onto another indexed file's id (a flipped bit of its rowid) joins that file.
PHOTO_SEALED = ("taken", "lat", "lon")  # after the key, file_id: the numeric photo fields filters read
PHOTO_SEED = 0x61732D70686F746F  # "as-photo"
# The files row's numbers the filter columns read for every indexed file (files.field_seal, schema 24): a byte flipped
# in a width left its file out of `--where "width >= 640"`, exit 0. Sealed with the row's id as the photos rows are,
# under another seed: a photos row's seal never holds as a files row's of the same id and values, nor the other way
# round.
FILE_SEALED = ("width", "height", "size", "mtime")
FILE_SEED = 0x61732D66696C6573  # "as-files"
_MIX = (0xBF58476D1CE4E5B9, 0x94D049BB133111EB)  # splitmix64's finaliser
_NAN_BITS = 0x7FF8000000000000  # every NULL and NaN sealed as this one pattern


def _mixed(state):
    """splitmix64's finaliser over a uint64 array (wrapping; a bijection)."""
    import numpy as np

    state = (state ^ (state >> np.uint64(30))) * np.uint64(_MIX[0])
    state = (state ^ (state >> np.uint64(27))) * np.uint64(_MIX[1])
    return state ^ (state >> np.uint64(31))


def field_seals(keys, *columns, seed: int = PHOTO_SEED):
    """The seals (numpy int64, SQLite's INTEGER) of rows given as a key array (integers) and one array a field (floats,
    NaN for NULL), in the sealed fields' order (PHOTO_SEALED under PHOTO_SEED, FILE_SEALED under FILE_SEED): what
    writers store (field_seal, one row) and readers check, in one pass."""
    import numpy as np

    with np.errstate(over="ignore"):
        state = _mixed(np.full(len(keys), seed, dtype=np.uint64) ^ np.asarray(keys, np.int64).view(np.uint64))
        for column in columns:
            values = np.asarray(column, dtype=np.float64) + 0.0  # -0.0 + 0.0 is 0.0: SQLite reads -0.0 back as 0.0
            bits = np.where(np.isnan(values), np.uint64(_NAN_BITS), values.view(np.uint64))
            state = _mixed(state ^ bits)
    return state.view(np.int64)


def field_seal(key: int, values: Mapping[str, Any], *, names: tuple = PHOTO_SEALED, seed: int = PHOTO_SEED) -> int:
    """The seal of one row (its key and the values of `names` as stored: None for NULL): what field_seals gives it,
    in Python integers. A photos row's by default; a files row's with names=FILE_SEALED, seed=FILE_SEED. A writer
    seals each row it writes, and numpy's arrays of one row cost about what the INSERT does (a throwaway measure,
    not recorded); test_file_seals checks the two agree."""
    state = _mixed_int(seed ^ (int(key) & _MASK))
    for name in names:
        value = values.get(name)
        value = math.nan if value is None else float(value) + 0.0  # as field_seals reads it (-0.0 as 0.0)
        bits = _NAN_BITS if math.isnan(value) else struct.unpack("<Q", struct.pack("<d", value))[0]
        state = _mixed_int(state ^ bits)
    return state - (1 << 64) if state >> 63 else state  # as int64, SQLite's INTEGER


_MASK = (1 << 64) - 1


def _mixed_int(state: int) -> int:
    """_mixed of one uint64 as a Python integer."""
    state = ((state ^ (state >> 30)) * _MIX[0]) & _MASK
    state = ((state ^ (state >> 27)) * _MIX[1]) & _MASK
    return state ^ (state >> 31)


def fields_sealed(keys, columns, seals, *, seed: int = PHOTO_SEED):
    """Which rows (numpy arrays: keys, the sealed columns as float64, the seals read) hold their seal."""
    return field_seals(keys, *columns, seed=seed) == seals
