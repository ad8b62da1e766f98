"""The one error vocabulary of logitcache: typed errors raised by the core, the trainer and the CLI.

Each class stands for one gRPC status code, named in its docstring: the service maps the error to
that code once, at its boundary, and the CLI maps it to an exit status. Anything that is not a
LogitCacheError reaches a gRPC caller as INTERNAL, with an error id instead of its message.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping


class LogitCacheError(Exception):
    """Base class: the message says what went wrong and what to do about it.

    ``fields`` are the request fields the message names, spelled as the wire contract and the
    core spell them (``top_p``, ``max_len``), so a message is right at the gRPC boundary as it
    is. A front end with its own names for those fields (the CLI's flags) prints
    :meth:`worded`.
    """

    def __init__(self, message: str = "", *, fields: Iterable[str] = ()) -> None:
        super().__init__(message)
        self.fields = tuple(fields)

    def worded(self, names: Mapping[str, str]) -> str:
        """The message with each of its fields called what ``names`` calls it, e.g.
        ``{"top_p": "--top-p"}`` turns "top_p must be in (0, 1]" into "--top-p must be ..."."""
        message = str(self)
        for field in self.fields:
            if field in names:
                # A whole name only: "k" is not the k of "top-k", nor "top_p" part of "top_p_x".
                pattern = rf"(?<![\w-]){re.escape(field)}(?![\w-])"
                message = re.sub(pattern, names[field].replace("\\", r"\\"), message)
        return message


class InvalidArgument(LogitCacheError):
    """INVALID_ARGUMENT: the request or input is malformed (bad JSON, empty text, ids outside the
    vocabulary). Retrying the same request fails again; fix what the message names."""


class NotFound(LogitCacheError):
    """NOT_FOUND: a named teacher, dataset, job, record or file does not exist."""


class AlreadyExists(LogitCacheError):
    """ALREADY_EXISTS: a dataset with this name exists and differs from what was asked; pick
    another name, or ask for what it holds."""


class FailedPrecondition(LogitCacheError):
    """FAILED_PRECONDITION: the request is well formed but the state does not allow it (a capture
    space mismatch, a student that does not fit the cache, a job that has already ended).
    Retrying does not help until that state changes."""


class PermissionDenied(LogitCacheError):
    """PERMISSION_DENIED: the caller is known and may not do this (a licence or a policy refuses
    it); other credentials or a policy change are needed, not a retry."""


class Unauthenticated(LogitCacheError):
    """UNAUTHENTICATED: the caller did not prove who it is (no, expired or bad credentials)."""


class ResourceExhausted(LogitCacheError):
    """RESOURCE_EXHAUSTED: a request exceeds a size limit or a quota; send less, or later."""


class Unavailable(LogitCacheError):
    """UNAVAILABLE: a dependency (engine, storage) cannot be reached right now; retrying with
    backoff may help (the client retries these by itself)."""
