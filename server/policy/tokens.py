"""API tokens: made once, stored only as hashes, read from ``authorization: Bearer`` metadata.

A token is 32 random bytes (``secrets.token_urlsafe``) behind the prefix ``lc_``, so a leaked one
is recognisable (secret scanners, :func:`redact`). With 256 bits of entropy a plain SHA-256 is a
safe verifier: there is nothing to brute-force, and an index on the hash finds the record.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
from collections.abc import Iterable

from logitcache.client.errors import Unauthenticated

TOKEN_PREFIX = "lc_"
# token_urlsafe(32) gives 43 characters; anything much longer than a token is not one.
MAX_TOKEN_CHARS = 128
MAX_HEADER_CHARS = 256
_TOKEN = re.compile(rf"{TOKEN_PREFIX}[A-Za-z0-9_-]{{20,{MAX_TOKEN_CHARS}}}")
_TOKEN_IN_TEXT = re.compile(rf"{TOKEN_PREFIX}[A-Za-z0-9_-]{{8,}}")
REDACTED = f"{TOKEN_PREFIX}[redacted]"


def new_token() -> str:
    """A fresh API token; shown to its owner once, never stored."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    """The stored verifier of a token (hex SHA-256)."""
    return hashlib.sha256(token.encode("ascii")).hexdigest()


def token_matches(token: str, stored_hash: str) -> bool:
    """Whether ``token`` hashes to ``stored_hash``, compared in constant time."""
    return hmac.compare_digest(token_hash(token), stored_hash)


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The token of the one ``authorization: Bearer`` entry in ``metadata``; None when there is
    none. Anything else that claims to be credentials raises Unauthenticated, whose message
    never quotes the value (it may be someone's secret)."""
    values = [v for k, v in metadata or () if isinstance(k, str) and k.lower() == "authorization"]
    if not values:
        return None
    if len(values) > 1:
        raise Unauthenticated("send one authorization header, not several")
    value = values[0]
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            raise Unauthenticated("the authorization header is not ASCII") from None
    if len(value) > MAX_HEADER_CHARS:
        raise Unauthenticated("the authorization header is too long to hold a logitcache token")
    if not value.isascii():
        raise Unauthenticated("the authorization header is not ASCII")
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer":
        raise Unauthenticated('the authorization header must read "Bearer <token>"')
    token = token.strip()
    if not _TOKEN.fullmatch(token):
        raise Unauthenticated(f"the bearer value is not a logitcache token ({TOKEN_PREFIX}...)")
    return token


def redact(text: str) -> str:
    """``text`` with every logitcache token in it replaced, for logs and error messages."""
    return _TOKEN_IN_TEXT.sub(REDACTED, text)


class RedactTokens(logging.Filter):
    """A logging filter that redacts tokens from each record's formatted message, so a token
    passed to any logger (a request dump, an exception) never reaches a handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True
