"""The model record's seal: a short BLAKE2b of the `model` (and `reindex`) meta values, stored inside them.

SQLite pages carry no checksum. A flipped byte in the fingerprint of the stored model record read as another
model's: `query` said "this index was built with another model" (exit 5, the user's mistake: pass the index's own
model), and `verify` said ok. From schema 15 (migrate step 15) every writer of a model record stores this digest
in it (state.encode), and readers check it (state.decode): a record that does not hold its digest, or that lacks
one at schema 15 or later, is damage (exit 7), never another model. Pure functions: no database here.

Kept apart from rowdigest (the files and photos rows' digests): another record, another key.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping

KEY = "record_digest"  # the field of the stored record that holds its digest
SEALED = 15  # the schema version from which every stored model record holds one (migrate step 15)


def digest(record: Mapping[str, Any]) -> str:
    """16 hex digits of the record's fields but KEY, in a canonical JSON form: the same for the record as
    written and as json.loads reads it back (floats round-trip, keys sorted)."""
    body = {k: v for k, v in record.items() if k != KEY}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True)
    return hashlib.blake2b(text.encode(), digest_size=8, person=b"as-model").hexdigest()


def sealed(record: Mapping[str, Any]) -> dict:
    """The record to store: its fields and their digest."""
    body = {k: v for k, v in record.items() if k != KEY}
    return {**body, KEY: digest(body)}


def opened(value: Any, required: bool) -> dict:
    """The stored record without its digest, once the digest holds; ValueError when it does not, or when it is
    missing and `required` (the catalog is at SEALED or later: every writer stored one)."""
    if not isinstance(value, dict):
        raise TypeError(f"expected an object, found {type(value).__name__}")
    written = value.get(KEY)
    if written is None and not required:
        return dict(value)
    if not isinstance(written, str) or digest(value) != written:
        raise ValueError("its checksum differs from the one written" if written is not None
                         else "it lacks the checksum every writer stores")
    return {k: v for k, v in value.items() if k != KEY}
