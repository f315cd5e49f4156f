"""The one error boundary of the surfaces: what an exception that reached the CLI's main or the server's
handlers means to the user. An AlignSearchError carries its exit code and HTTP status (alignsearch/errors.py);
a few foreign exceptions mean one of those errors and are reported as it; the rest are unexpected (one line
on the CLI, a 500 JSON answer from the server, the traceback logged at debug level only)."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from alignsearch.errors import AlignSearchError, BadInputError, CatalogBusyError, DiskFullError, IndexDamagedError, \
    IndexNotFoundError, IndexUntrustedError, ModelLoadError, ModelMismatchError, UsageError

INTERNAL_STATUS = 500  # an unexpected exception's HTTP status; its exit code is 1 (the CLI's main)

# The kinds of error a JSON error answer of `serve` names ("kind", beside "error"): the classes of errors.py, whose
# HTTP status each carries. The first ones a search here meets the same way (the query's rules, the same index
# folder and files): the CLI's client raises them again (same exit code, same line) rather than search again. The
# others are the server's own (its model, a catalog busy now, its disk, anything else) that a search here may not
# meet: the client searches locally. The server (answer_of) and the client (raised_again) read this one table.
SAME_HERE = (UsageError, BadInputError, IndexUntrustedError, IndexNotFoundError, IndexDamagedError)
KINDS = {cls.__name__: cls for cls in (*SAME_HERE, ModelLoadError, ModelMismatchError, CatalogBusyError,
                                       DiskFullError, AlignSearchError)}
_SAID = {IndexDamagedError: "the index is damaged: "}  # what the server's answer adds before the error's own line


def kind_of(exc: AlignSearchError) -> type[AlignSearchError]:
    """The class of errors.py exc is (a subclass of one of its own, indexer's WriterBusy too, counts as it)."""
    return next(cls for cls in type(exc).__mro__ if KINDS.get(cls.__name__) is cls)


def answer_of(exc: AlignSearchError) -> tuple[int, dict]:
    """The server's answer to a library error: its HTTP status (errors.py) and JSON body, the line and its kind."""
    kind = kind_of(exc)
    return exc.http_status, {"error": _SAID.get(kind, "") + str(exc), "kind": kind.__name__}


# A JSON error answer that is no library error's (answer_of) names a kind too, so every error answer of `serve` has one:
# a request malformed in itself (the framework's type check 422, a form over its limits 400, not multipart 415, a
# range that cannot be served 416) is a UsageError, as the CLI's parser refuses an option's value (exit 2); anything
# else (no such endpoint or method, a token missing, a Host or site refused, a body too large, a file gone or
# changed, busy) is the server's own: AlignSearchError, which the client does not raise again (it searches here).
MALFORMED = (400, 415, 416, 422)


def kind_of_status(status: int) -> str:
    """The kind of an error answer that is no library error's, by its HTTP status (MALFORMED)."""
    return (UsageError if status in MALFORMED else AlignSearchError).__name__


def raised_again(body: dict) -> AlignSearchError | None:
    """The error a server's JSON error answer names (answer_of), where a search here would meet the same one: the
    same class and line; else None (a server from before kinds, or the server's own trouble)."""
    kind, said = body.get("kind"), body.get("error")
    cls = KINDS.get(kind) if isinstance(kind, str) else None
    if cls not in SAME_HERE or not isinstance(said, str):
        return None
    return cls(said.removeprefix(_SAID.get(cls, "")))


def library_error(exc: BaseException) -> AlignSearchError | None:
    """exc as the library error it means, else None: an AlignSearchError itself; a full disk or a catalog
    locked past the wait (catalog.not_damage: the index is fine); a catalog SQLite cannot read (damage)."""
    if isinstance(exc, AlignSearchError):
        return exc
    from alignsearch.storage.catalog import not_damage

    trouble = not_damage(exc)
    if trouble is not None:
        return trouble
    damaged = _damaged_catalog(exc) or _unreadable_index_file(exc)
    return IndexDamagedError(damaged) if damaged else None


def _unreadable_index_file(exc: BaseException) -> str | None:
    """A file of an index (index.faiss, vectors.f16, a shard, list or segment file) that this user cannot read, or
    a folder in its place, in words; else None. An index file others made unreadable (chmod, another owner) stopped every command with
    "Permission denied" as an unexpected error (exit 1), while an unreadable catalog.db was exit 7. A file that
    can be read met a refused write instead: that is no damage, and stays the error it is."""
    from alignsearch.storage.paths import DB_FILE

    if not isinstance(exc, (PermissionError, IsADirectoryError)) or exc.filename is None:
        return None
    path = Path(os.fsdecode(exc.filename))
    if not any(_is_file(folder / DB_FILE) for folder in list(path.parents)[:3]):  # vectors/next/<id>.f16 at most
        return None
    if isinstance(exc, IsADirectoryError):  # every command said "Is a directory" (exit 1), verify --repair too
        return (f"{path.name} in {path.parent} is a folder where the index keeps a file: move it away, then run "
                "`alignsearch verify --repair`")
    if os.access(path, os.R_OK, effective_ids=os.access in os.supports_effective_ids):
        return None
    return (f"{path.name} in {path.parent} cannot be read ({exc.strerror}): the index cannot be used until the file "
            "is readable again (its owner's chmod); `alignsearch verify` says what else is wrong")


def _damaged_catalog(exc: BaseException) -> str | None:
    """A catalog.db that SQLite cannot read (not a database, malformed), in words; else None."""
    from sqlalchemy.exc import DatabaseError

    from alignsearch.storage import keywords

    if isinstance(exc, (DatabaseError, sqlite3.DatabaseError)):
        cause = getattr(exc, "orig", None) or exc
        if "no such table: keywords" in str(cause):  # derived tables (keywords_trigram too): --repair writes them
            return str(keywords.damaged(cause))
        return (f"the index catalog cannot be read ({cause}): it is damaged or not an alignsearch index; "
                "restore it from a backup or index into a new --index DIR")
    return None


def _is_file(path: Path) -> bool:
    """Path.is_file, False where the folder cannot be searched (is_file raises PermissionError there)."""
    try:
        return path.is_file()
    except OSError:
        return False
