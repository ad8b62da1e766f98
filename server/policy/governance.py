"""What admins do: tokens, their limits and guard flags, and who may read which dataset.

One set of operations on a :class:`PolicyState`, behind the admin RPCs of a running server and
the offline ``logitcache tokens|datasets share --state DIR`` commands alike, so both act and
answer the same. Blocking: the server calls them from executors.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from logitcache.client.errors import InvalidArgument, NotFound
from logitcache.server.names import shown
from logitcache.server.policy.access import issue_token
from logitcache.server.policy.quotas import COMPUTED, SERVED, daily_usage, effective_limits
from logitcache.server.policy.state import (
    DatasetAccess,
    GuardFlag,
    Limits,
    PolicyState,
    Role,
    TokenRecord,
)


@dataclass(frozen=True)
class TokenStatus:
    """A token as an admin sees it: its record (never the secret), the limits in force, today's
    usage and the guard's flag."""

    record: TokenRecord
    limits: Limits
    computed_today: int
    served_today: int
    flag: GuardFlag | None


class Governance:
    """Admin operations; ``defaults`` are the server's limits for tokens without their own."""

    def __init__(
        self,
        state: PolicyState,
        defaults: Limits | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.state, self.defaults, self._clock = state, defaults or Limits(), clock

    def status(self, record: TokenRecord) -> TokenStatus:
        usage = daily_usage(self.state, record.id, self._clock())
        return TokenStatus(
            record,
            effective_limits(self.state, self.defaults, record.id),
            usage[COMPUTED],
            usage[SERVED],
            self.state.flag(record.id),
        )

    def _record(self, token_id: str) -> TokenRecord:
        record = self.state.token(token_id)
        if record is None:
            raise NotFound(f"no token {shown(token_id)}; `logitcache tokens list` shows the ids")
        return record

    def create_token(
        self, user: str, role: str, groups: Iterable[str] = ()
    ) -> tuple[str, TokenStatus]:
        """A new token (shown this once) and its status."""
        token, record = issue_token(self.state, user, Role.parse(role), groups)
        return token, self.status(record)

    def tokens(self) -> list[TokenStatus]:
        """Every token, oldest first."""
        return [self.status(r) for r in self.state.tokens()]

    def revoke(self, token_id: str) -> TokenStatus:
        """Revoke a token (a token revoked already stays as it was)."""
        self._record(token_id)
        self.state.revoke_token(token_id, self._clock())
        return self.status(self._record(token_id))

    def set_limits(self, token_id: str, limits: Limits) -> TokenStatus:
        """A token's own limits; None fields keep the server's defaults."""
        self._record(token_id)
        for name, value in vars(limits).items():
            if value is not None and value <= 0:
                raise InvalidArgument(f"{name} must be > 0 (unset keeps the default)")
        self.state.set_limits(token_id, limits)
        return self.status(self._record(token_id))

    def clear_flag(self, token_id: str) -> TokenStatus:
        """Lift the extraction guard's flag: the token may go on at its normal limits."""
        self._record(token_id)
        self.state.clear_flag(token_id)
        return self.status(self._record(token_id))

    def share(
        self,
        dataset: str,
        *,
        add_users: Iterable[str] = (),
        add_groups: Iterable[str] = (),
        remove_users: Iterable[str] = (),
        remove_groups: Iterable[str] = (),
        owner: str | None = None,
    ) -> DatasetAccess:
        """Change a dataset's access list. A dataset made before access lists (or offline) has
        none: its owner is ``owner`` if given, else nobody (admins share it)."""
        names = [*add_users, *add_groups, *remove_users, *remove_groups]
        if owner is not None:
            names.append(owner)
        if any(not n or not n.isprintable() or len(n) > 200 for n in names):
            raise InvalidArgument("users and groups are printable names of 1-200 characters")
        current = self.state.access(dataset) or DatasetAccess(owner="")
        users = (set(current.users) | set(add_users)) - set(remove_users)
        groups = (set(current.groups) | set(add_groups)) - set(remove_groups)
        access = DatasetAccess(
            owner=current.owner if owner is None else owner,
            users=tuple(sorted(users)),
            groups=tuple(sorted(groups)),
        )
        self.state.set_access(dataset, access)
        return access
