"""Errors a user can act on. Each carries the CLI exit code that reports it."""


class AlignSearchError(Exception):
    exit_code = 1


class IndexNotFoundError(AlignSearchError):
    exit_code = 3


class UsageError(AlignSearchError):
    """A malformed option value the parser could not check by itself (a --where expression, a date)."""

    exit_code = 2


class ModelLoadError(AlignSearchError):
    exit_code = 4


class ModelMismatchError(AlignSearchError):
    exit_code = 5


class BadInputError(AlignSearchError):
    """A query argument that cannot be used (unreadable image, nothing to search for)."""

    exit_code = 6


class IndexDamagedError(AlignSearchError):
    """A file of the index fails its checksum or cannot be read: `alignsearch verify --repair` mends it."""

    exit_code = 7


class CatalogBusyError(AlignSearchError):
    """The catalog stayed locked by another process past the wait: nothing is damaged; run again later."""

    exit_code = 6


class DiskFullError(AlignSearchError):
    """The disk holding the index filled up: what was committed stays; free space and run again."""

    exit_code = 1


class BadImageError(Exception):
    """One image file that cannot be used; the indexer records the reason and moves on."""
