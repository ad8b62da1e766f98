"""Typed errors of the core; the gRPC service maps each to one status code at its boundary."""

from __future__ import annotations


class LogitCacheError(Exception):
    """Base class: the message says what went wrong and what to do about it."""


class InvalidArgument(LogitCacheError):
    """The request or input is malformed (bad JSON, empty text, ids outside the vocabulary)."""


class NotFound(LogitCacheError):
    """A named teacher, dataset, record or file does not exist."""


class AlreadyExists(LogitCacheError):
    """A dataset with this name exists and differs from what was asked."""


class FailedPrecondition(LogitCacheError):
    """The system is not in a state that allows the request (e.g. capture space mismatch)."""


class ResourceExhausted(LogitCacheError):
    """A request exceeds a size limit or a quota."""


class Unavailable(LogitCacheError):
    """A dependency (engine, storage) cannot be reached right now; retrying may help."""
