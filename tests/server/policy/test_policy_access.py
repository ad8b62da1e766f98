"""Authentication and authorisation over a real state file: no token is UNAUTHENTICATED, a
dataset not shared with a consumer is PERMISSION_DENIED."""

from __future__ import annotations

import pytest

from logitcache.client.errors import InvalidArgument, PermissionDenied, Unauthenticated
from logitcache.server.policy.access import (
    ANONYMOUS,
    Action,
    authenticate,
    check_anonymous_bind,
    issue_token,
    may_read,
    require,
    require_owner,
    require_read,
)
from logitcache.server.policy.state import DatasetAccess, Role, open_state


@pytest.fixture
def state(tmp_path):
    state = open_state(tmp_path)
    yield state
    state.close()


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def test_an_issued_token_authenticates_as_its_user_and_is_stored_only_as_a_hash(state) -> None:
    token, record = issue_token(state, "alice", Role.PRODUCER, ["nlp", "nlp", "vision"])
    assert record.groups == ("nlp", "vision")
    principal = authenticate(state, bearer(token))
    assert (principal.user, principal.role, principal.token_id) == (
        "alice",
        Role.PRODUCER,
        record.id,
    )
    assert token not in state.path.read_bytes().decode("latin-1")


def test_no_unknown_or_revoked_token_is_unauthenticated(state) -> None:
    with pytest.raises(Unauthenticated, match="needs a token"):
        authenticate(state, [])
    with pytest.raises(Unauthenticated, match="unknown token"):
        authenticate(state, bearer("lc_" + "x" * 43))
    token, record = issue_token(state, "bob", Role.CONSUMER)
    state.revoke_token(record.id, at=1.0)
    with pytest.raises(Unauthenticated, match="revoked") as raised:
        authenticate(state, bearer(token))
    assert token not in str(raised.value)


def test_anonymous_callers_are_the_single_user_only_where_allowed(state) -> None:
    assert authenticate(state, None, allow_anonymous=True) is ANONYMOUS
    token, _ = issue_token(state, "carol", Role.CONSUMER)
    assert authenticate(state, bearer(token), allow_anonymous=True).user == "carol"


def test_roles_allow_their_actions_only(state) -> None:
    consumer = authenticate(state, bearer(issue_token(state, "c", Role.CONSUMER)[0]))
    producer = authenticate(state, bearer(issue_token(state, "p", Role.PRODUCER)[0]))
    admin = authenticate(state, bearer(issue_token(state, "a", Role.ADMIN)[0]))
    for principal in (consumer, producer, admin):
        require(principal, Action.READ)
    require(producer, Action.PRODUCE)
    require(admin, Action.ADMINISTER)
    with pytest.raises(PermissionDenied, match="role consumer; produce needs admin or producer"):
        require(consumer, Action.PRODUCE)
    with pytest.raises(PermissionDenied):
        require(producer, Action.ADMINISTER)


def test_a_consumer_reads_only_datasets_shared_with_it(state) -> None:
    token, _ = issue_token(state, "dora", Role.CONSUMER, ["team-a"])
    dora = authenticate(state, bearer(token))
    state.set_access("shared-by-name", DatasetAccess("alice", users=("dora",)))
    state.set_access("shared-by-group", DatasetAccess("alice", groups=("team-a",)))
    state.set_access("private", DatasetAccess("alice", users=("erin",), groups=("team-b",)))
    require_read(dora, "shared-by-name", state.access("shared-by-name"))
    require_read(dora, "shared-by-group", state.access("shared-by-group"))
    with pytest.raises(PermissionDenied, match="'private' is not shared with user 'dora'"):
        require_read(dora, "private", state.access("private"))
    assert not may_read(dora, None)  # a dataset made before access lists: admins share it
    assert may_read(ANONYMOUS, None)


def test_only_the_owner_or_an_admin_acts_on_a_job(state) -> None:
    alice = authenticate(state, bearer(issue_token(state, "alice", Role.PRODUCER)[0]))
    bob = authenticate(state, bearer(issue_token(state, "bob", Role.PRODUCER)[0]))
    require_owner(alice, "alice", "job j1")
    require_owner(ANONYMOUS, "alice", "job j1")
    with pytest.raises(PermissionDenied, match="job j1 belongs to user 'alice'"):
        require_owner(bob, "alice", "job j1")


def test_a_token_needs_a_printable_user(state) -> None:
    with pytest.raises(InvalidArgument):
        issue_token(state, "", Role.ADMIN)
    with pytest.raises(InvalidArgument):
        issue_token(state, "a\nb", Role.ADMIN)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"])
def test_anonymous_access_is_accepted_on_a_loopback_bind(host: str) -> None:
    check_anonymous_bind(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.5", "example.org", ""])
def test_anonymous_access_is_refused_on_any_other_bind(host: str) -> None:
    with pytest.raises(InvalidArgument, match="loopback"):
        check_anonymous_bind(host)
