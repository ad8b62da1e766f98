"""Tokens: made with a recognisable prefix, stored as hashes, parsed from bearer metadata that
may be anything a client sends, and kept out of logs."""

from __future__ import annotations

import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from logitcache.client.errors import Unauthenticated
from logitcache.server.policy.tokens import (
    MAX_HEADER_CHARS,
    REDACTED,
    TOKEN_PREFIX,
    RedactTokens,
    bearer_token,
    new_token,
    redact,
    token_hash,
    token_matches,
)


def test_a_token_is_prefixed_random_and_verified_by_its_hash() -> None:
    token, other = new_token(), new_token()
    assert token.startswith(TOKEN_PREFIX) and token != other
    assert len(token) >= 40
    stored = token_hash(token)
    assert token not in stored and len(stored) == 64
    assert token_matches(token, stored)
    assert not token_matches(other, stored)


def test_the_bearer_value_of_one_authorization_header_is_the_token() -> None:
    token = new_token()
    assert bearer_token([("authorization", f"Bearer {token}")]) == token
    assert bearer_token([("Authorization", f"bearer   {token} ")]) == token
    assert bearer_token([("authorization", f"Bearer {token}".encode())]) == token
    assert bearer_token([("user-agent", "grpc-python")]) is None
    assert bearer_token(None) is None


@pytest.mark.parametrize(
    "metadata",
    [
        [("authorization", "")],
        [("authorization", "Bearer")],
        [("authorization", "Bearer ")],
        [("authorization", "Basic dXNlcjpwYXNz")],
        [("authorization", "Bearer not-a-logitcache-token")],
        [("authorization", "Bearer lc_" + "a" * 5000)],
        [("authorization", "Bearer lc_caf\u00e9caf\u00e9caf\u00e9caf\u00e9caf\u00e9")],
        [("authorization", b"Bearer lc_\xff\xfe" + b"a" * 30)],
        [("authorization", "Bearer lc_" + "a" * 30 + "\nX-Injected: 1")],
        [("authorization", f"Bearer {new_token()}"), ("authorization", f"Bearer {new_token()}")],
    ],
    ids=[
        "empty",
        "scheme-only",
        "scheme-space",
        "basic",
        "foreign",
        "huge",
        "non-ascii",
        "non-ascii-bytes",
        "newline",
        "two-headers",
    ],
)
def test_malformed_credentials_are_unauthenticated_and_never_quoted(metadata: list) -> None:
    with pytest.raises(Unauthenticated) as raised:
        bearer_token(metadata)
    value = metadata[0][1]
    credential = (value.decode("latin-1") if isinstance(value, bytes) else value).partition(" ")[2]
    if len(credential) >= 8:
        assert credential[:8] not in str(raised.value)


_keys = st.one_of(st.sampled_from(["authorization", "Authorization", "AUTHORIZATION"]), st.text())
_values = st.one_of(
    st.text(max_size=2 * MAX_HEADER_CHARS),
    st.binary(max_size=2 * MAX_HEADER_CHARS),
    st.builds(lambda s: "Bearer " + s, st.text(max_size=300)),
    st.builds(lambda s: "Bearer lc_" + s, st.text(alphabet=st.characters(), max_size=200)),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(_keys, _values), max_size=12))
def test_fuzzed_metadata_gives_a_token_none_or_unauthenticated(metadata: list) -> None:
    """Whatever a client sends, the parser answers with a token, None or Unauthenticated."""
    try:
        token = bearer_token(metadata)
    except Unauthenticated:
        return
    assert token is None or (token.startswith(TOKEN_PREFIX) and token.isascii())


def test_redact_removes_tokens_from_text() -> None:
    token = new_token()
    text = f"request from {token} failed; header Bearer {token}"
    cleaned = redact(text)
    assert token not in cleaned and cleaned.count(REDACTED) == 2
    assert redact("lc_ and lc_x stay; sk-1 too") == "lc_ and lc_x stay; sk-1 too"


def test_the_logging_filter_keeps_tokens_out_of_a_log_file(tmp_path) -> None:
    token = new_token()
    log_file = tmp_path / "server.log"
    logger = logging.getLogger("logitcache.test.redact")
    handler = logging.FileHandler(log_file)
    handler.addFilter(RedactTokens())
    logger.addHandler(handler)
    try:
        logger.warning("metadata %s", [("authorization", f"Bearer {token}")])
        try:
            raise ValueError(f"bad token {token}")
        except ValueError:
            logger.exception("call failed")
    finally:
        logger.removeHandler(handler)
        handler.close()
    content = log_file.read_text()
    assert token not in content
    assert REDACTED in content and "call failed" in content and "ValueError" in content
