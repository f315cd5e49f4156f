"""Errors a user can act on. Each carries the CLI exit code that reports it and the HTTP status the server
answers it with (alignsearch/surfaces/boundary.py is where both surfaces turn an exception into them).

A 4xx says the request is at fault and asking otherwise helps; a 5xx says the server or its index is. The
server's answer names the class (boundary.KINDS): the CLI's client raises it again where a search without the
server meets it too (its index damaged or refused, a query refused), with the same exit code and line, and
searches locally where the trouble is the server's own (its model, a catalog busy now, its disk)."""


class AlignSearchError(Exception):
    """An error without a more precise class: for HTTP the server's own trouble (500)."""

    exit_code = 1
    http_status = 500


class IndexNotFoundError(AlignSearchError):
    """No index where one was named or looked for, or one with nothing in it yet: 404 (no such thing)."""

    exit_code = 3
    http_status = 404


class UsageError(AlignSearchError):
    """A malformed option value the parser could not check by itself (a --where expression, a date, a threshold
    out of range), or a search asked with nothing to search for: 400."""

    exit_code = 2
    http_status = 400


class ModelLoadError(AlignSearchError):
    """The model cannot be loaded (a folder gone, not a checkpoint, unreadable): 500, the server's own
    configuration, not the request, is at fault, and waiting does not mend it (not 503)."""

    exit_code = 4
    http_status = 500


class ModelMismatchError(AlignSearchError):
    """The model differs from the one the index was built with (or changed during the run): 500, the
    server's index and model disagree whatever the request."""

    exit_code = 5
    http_status = 500


class BadInputError(AlignSearchError):
    """A query argument that cannot be used (an unreadable image, an empty or too long text): 400."""

    exit_code = 6
    http_status = 400


class IndexUntrustedError(BadInputError):
    """An index folder another user could have written (paths.untrusted_index): nothing in it is read. Exit 6 as
    before (a BadInputError, refused as input is). 500: to a client of `serve` it is the server's own index that
    cannot be used, not the request (a 400 told it to fix its query), and it stays so until the folder's owner
    mends it (`chmod go-w`), as a damaged index does (not 503)."""

    http_status = 500


class IndexDamagedError(AlignSearchError):
    """A file of the index fails its checksum or cannot be read: `alignsearch verify --repair` mends it.
    500: the index, not the request, is at fault, and it stays so until repaired (not 503)."""

    exit_code = 7
    http_status = 500


class CatalogBusyError(AlignSearchError):
    """The catalog stayed locked by another process past the wait: nothing is damaged; run again later.
    503: the service is unavailable for now, and the same request works once the lock is gone."""

    exit_code = 6
    http_status = 503


class DiskFullError(AlignSearchError):
    """The disk holding the index filled up: what was committed stays; free space and run again.
    507 Insufficient Storage: the server cannot store what the request needs."""

    exit_code = 1
    http_status = 507


class BadImageError(Exception):
    """One image file that cannot be used; the indexer records the reason and moves on."""


class ImageTooLarge(BadImageError):
    """An image whose header declares more pixels than the decoder was allowed (a decompression-bomb guard).
    Its own class so a surface whose cap is lower than the indexer's (the server's) can say so (413) without
    reading the header a second time."""
