"""Who the caller is and what it may do: tokens to principals, roles to actions, access lists
to datasets. Missing or bad credentials are UNAUTHENTICATED; a known caller that may not do a
thing is PERMISSION_DENIED. Messages name the user and the token's public id, never a token."""

from __future__ import annotations

import ipaddress
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from logitcache.client.errors import InvalidArgument, PermissionDenied, Unauthenticated
from logitcache.server.policy.state import DatasetAccess, PolicyState, Role, TokenRecord
from logitcache.server.policy.tokens import bearer_token, new_token, token_hash, token_matches


@dataclass(frozen=True)
class Principal:
    """The caller of one request. ``token_id`` is None only in single-user (anonymous) mode."""

    user: str
    role: Role
    groups: tuple[str, ...] = ()
    token_id: str | None = None


# --allow-anonymous is the demo's single-user mode on a loopback bind: its one user is the admin.
ANONYMOUS = Principal(user="anonymous", role=Role.ADMIN)


def check_anonymous_bind(host: str) -> None:
    """INVALID_ARGUMENT unless ``host`` is a loopback address or name: anonymous callers are
    everyone who can reach the port, which must then be only this machine."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise InvalidArgument(
            f"--allow-anonymous needs a loopback bind (127.0.0.1, ::1 or localhost), not {host!r}",
            fields=("allow_anonymous",),
        )


class Action(StrEnum):
    ADMINISTER = "administer"  # teachers, tokens, licences, quotas, flags
    PRODUCE = "produce"  # submit jobs, read-through
    READ = "read"  # read and stream datasets (then the dataset's access list decides)


_ALLOWED = {
    Action.ADMINISTER: {Role.ADMIN},
    Action.PRODUCE: {Role.ADMIN, Role.PRODUCER},
    Action.READ: {Role.ADMIN, Role.PRODUCER, Role.CONSUMER},
}


def issue_token(
    state: PolicyState, user: str, role: Role, groups: Iterable[str] = ()
) -> tuple[str, TokenRecord]:
    """A new token for ``user`` and the record stored for it; the token itself is returned once
    and kept nowhere."""
    if not user or not user.isprintable() or len(user) > 200:
        raise InvalidArgument("a token's user must be a printable name of 1-200 characters")
    token = new_token()
    record = TokenRecord(
        id="tok_" + secrets.token_hex(6),
        hash=token_hash(token),
        user=user,
        role=role,
        groups=tuple(sorted(set(groups))),
        created_at=time.time(),
    )
    state.add_token(record)
    return token, record


def authenticate(
    state: PolicyState,
    metadata: Iterable[tuple[str, str | bytes]] | None,
    *,
    allow_anonymous: bool = False,
) -> Principal:
    """The principal of a request's metadata; UNAUTHENTICATED for no, a malformed, an unknown or
    a revoked token (anonymous callers only where the server allows them)."""
    token = bearer_token(metadata)
    if token is None:
        if allow_anonymous:
            return ANONYMOUS
        raise Unauthenticated(
            "this server needs a token: send authorization: Bearer <token> "
            "(Client(target, token=...), LOGITCACHE_TOKEN or --token)"
        )
    record = state.token_by_hash(token_hash(token))
    if record is None or not token_matches(token, record.hash):
        raise Unauthenticated("unknown token; ask an admin for one (logitcache tokens create)")
    if not record.active:
        raise Unauthenticated(f"token {record.id} was revoked; ask an admin for a new one")
    return Principal(record.user, record.role, record.groups, record.id)


def require(principal: Principal, action: Action) -> None:
    """PERMISSION_DENIED unless the principal's role may take ``action``."""
    if principal.role not in _ALLOWED[action]:
        allowed = " or ".join(sorted(r.value for r in _ALLOWED[action]))
        raise PermissionDenied(
            f"user {principal.user!r} has role {principal.role.value}; {action.value} needs {allowed}"
        )


def may_read(principal: Principal, access: DatasetAccess | None) -> bool:
    """Whether the principal may read a dataset with this access list. A dataset without one
    (made before policy existed) is an admin's to share."""
    if principal.role is Role.ADMIN:
        return True
    if access is None:
        return False
    return (
        principal.user == access.owner
        or principal.user in access.users
        or not set(principal.groups).isdisjoint(access.groups)
    )


def require_read(principal: Principal, dataset: str, access: DatasetAccess | None) -> None:
    """PERMISSION_DENIED unless the dataset is shared with the principal."""
    require(principal, Action.READ)
    if not may_read(principal, access):
        raise PermissionDenied(
            f"dataset {dataset!r} is not shared with user {principal.user!r}; its owner or an "
            "admin can add the user or one of its groups to the dataset's access list"
        )


def require_owner(principal: Principal, owner: str, what: str) -> None:
    """PERMISSION_DENIED unless the principal owns ``what`` (a job, a dataset) or is an admin."""
    if principal.role is not Role.ADMIN and principal.user != owner:
        raise PermissionDenied(f"{what} belongs to user {owner!r}; only it or an admin may do this")
