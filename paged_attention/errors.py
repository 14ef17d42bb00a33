"""Error hierarchy of the public contract.

Every error a caller can provoke with bad input or a missing capability derives from
`PagedAttentionError`, so a serving loop can catch one type and keep going.
"""


class PagedAttentionError(Exception):
    """Base class of every error this package raises on purpose."""


class InvalidInput(PagedAttentionError, ValueError):
    """An argument has the wrong shape, dtype or range. Raised before any kernel runs."""


class PoolExhausted(PagedAttentionError):
    """The block pool has too few free blocks; the allocation was not applied."""


class UnsupportedPath(PagedAttentionError):
    """The requested decode path does not exist on this backend or device."""


class BackendUnavailable(PagedAttentionError):
    """The backend cannot run on this machine; the message says what to install."""
