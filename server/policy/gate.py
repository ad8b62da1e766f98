"""The policy in front of the core: every request of every front end passes one PolicyGate.

A request is admitted first: who sent it (its token, or the single user of an anonymous
loopback server), whether the extraction guard suspended or throttles its token, its request
rate, and whether its role may do this kind of thing at all. Then the request's own checks
(the dataset's access list, who owns it) and charges (positions computed and served, streams
open) run as it goes; and when it ends one audit line says who did what to which dataset or
teacher, over how many positions, with which decision and status.

The state is blocking (SQLite) and runs in the gate's executor; an anonymous caller touches no
state at all, so the single-user mode costs the hot path nothing.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from logitcache.server.policy.access import (
    ANONYMOUS,
    Action,
    Principal,
    authenticate,
    may_read,
    require,
    require_owner,
    require_read,
)
from logitcache.server.policy.audit import AuditEvent, AuditLog
from logitcache.server.policy.governance import Governance
from logitcache.server.policy.guard import ExtractionGuard, GuardPolicy
from logitcache.server.policy.quotas import QuotaKeeper
from logitcache.server.policy.state import DatasetAccess, Limits, PolicyState, Role, SqliteState

log = logging.getLogger(__name__)
T = TypeVar("T")
Metadata = Sequence[tuple[str, str | bytes]]


@dataclass
class Call:
    """One request as the policy sees it: who made it (once admitted) and what its audit line
    will say. The front end fills ``target``, ``decision`` and ``detail`` as it learns them;
    the gate counts ``positions`` served."""

    method: str
    principal: Principal | None = None
    target: str | None = None
    positions: int = 0
    decision: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def user(self) -> str:
        """The authenticated user: what the core records as a dataset's owner or requester."""
        assert self.principal is not None, "the call was not admitted"
        return self.principal.user


class PolicyGate:
    """Admission, authorisation, quotas, the extraction guard and the audit log of a server.

    ``dataset_positions(names)`` counts the positions of datasets (the store knows them); the
    guard compares a token's novel read-through positions with those of the datasets its user
    owns. ``audit`` None records nothing (tests of the core).
    """

    def __init__(
        self,
        state: PolicyState,
        *,
        allow_anonymous: bool = False,
        defaults: Limits | None = None,
        guard: GuardPolicy | None = None,
        dataset_positions: Callable[[list[str]], int] = lambda names: 0,
        audit: AuditLog | None = None,
        replica: str = "local",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.state = state
        self.allow_anonymous = allow_anonymous
        self.quotas = QuotaKeeper(state, defaults, replica=replica, clock=clock)
        self.guard = ExtractionGuard(
            state,
            guard or GuardPolicy(),
            lambda user: dataset_positions(state.datasets_owned_by(user)),
            clock=clock,
        )
        self.governance = Governance(state, defaults, clock=clock)
        self.audit = audit
        self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="policy")

    @classmethod
    def single_user(cls) -> PolicyGate:
        """A gate for one local user with every right and nothing kept (in-process tests)."""
        return cls(SqliteState(":memory:"), allow_anonymous=True)

    async def _run(self, function: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(function, *args))

    # -- admission ------------------------------------------------------------------------------

    async def admit(self, call: Call, metadata: Metadata | None, action: Action) -> None:
        """Admit a request whose metadata is ``metadata`` to take ``action``: UNAUTHENTICATED,
        PERMISSION_DENIED (role, suspended token), RESOURCE_EXHAUSTED (request rate) or
        UNAVAILABLE (the audit log cannot be written), else ``call.principal`` is set."""
        if self.audit is not None:
            self.audit.check()
        sends_credentials = any(
            isinstance(k, str) and k.lower() == "authorization" for k, _ in metadata or ()
        )
        if self.allow_anonymous and not sends_credentials:
            call.principal = ANONYMOUS
        else:
            call.principal = await self._run(self._authenticate, metadata)
        require(call.principal, action)

    def _authenticate(self, metadata: Metadata | None) -> Principal:
        principal = authenticate(self.state, metadata, allow_anonymous=self.allow_anonymous)
        if principal.token_id is not None:
            ceiling = self.guard.admit(principal.token_id)
            self.quotas.admit_request(principal.token_id, ceiling)
        return principal

    async def admit_message(self, call: Call) -> None:
        """Count one more message of a request stream against the token's request rate."""
        token = _token_of(call)
        if token is not None:
            await self._run(self._admit_message, token)

    def _admit_message(self, token: str) -> None:
        self.quotas.admit_request(token, self.guard.admit(token))

    # -- authorisation --------------------------------------------------------------------------

    async def require_read(self, call: Call, dataset: str) -> DatasetAccess | None:
        """PERMISSION_DENIED unless ``dataset`` is shared with the caller; its access list."""
        access = await self._run(self.state.access, dataset)
        require_read(_principal(call), dataset, access)
        return access

    async def require_owner(self, call: Call, dataset: str) -> None:
        """PERMISSION_DENIED unless the caller owns ``dataset`` (created it) or is an admin."""
        principal = _principal(call)
        if principal.role is Role.ADMIN:
            return
        access = await self._run(self.state.access, dataset)
        require_owner(principal, access.owner if access else "", f"dataset {dataset!r}")

    async def readable(
        self, call: Call, datasets: Iterable[str]
    ) -> dict[str, DatasetAccess | None]:
        """The access lists of those of ``datasets`` that the caller may read."""
        principal = _principal(call)
        lists = await self._run(lambda: {name: self.state.access(name) for name in datasets})
        return {name: a for name, a in lists.items() if may_read(principal, a)}

    async def access(self, dataset: str) -> DatasetAccess | None:
        """A dataset's access list (None: it has none, admins' to share)."""
        return await self._run(self.state.access, dataset)

    async def owned(self, call: Call, datasets: Iterable[str]) -> set[str]:
        """Those of ``datasets`` whose jobs the caller may see and change: its own (all, for
        an admin)."""
        principal = _principal(call)
        names = set(datasets)
        if principal.role is Role.ADMIN:
            return names
        return set(await self._run(self.state.datasets_owned_by, principal.user)) & names

    async def created(self, call: Call, dataset: str) -> None:
        """Record the caller as the owner of a dataset its request made (kept if it has one:
        a retried submission answers with the first one's dataset)."""
        await self._run(self._created, call.user, dataset)

    def _created(self, user: str, dataset: str) -> None:
        if self.state.access(dataset) is None:
            self.state.set_access(dataset, DatasetAccess(owner=user))

    async def deleted(self, dataset: str) -> None:
        """Forget a deleted dataset's access list (a new dataset of its name starts afresh)."""
        await self._run(self.state.delete_access, dataset)

    async def governed(self, operation: Callable[[Governance], T]) -> T:
        """Run an admin operation (the caller was admitted to ADMINISTER, or owns what it
        changes) on the state."""
        return await self._run(operation, self.governance)

    # -- charges --------------------------------------------------------------------------------

    @asynccontextmanager
    async def stream(self, call: Call) -> AsyncIterator[None]:
        """Hold one of the token's concurrent streams while the block runs."""
        token = _token_of(call)
        if token is None:
            yield
            return
        lease = await self._run(self.quotas.open_stream, token)
        try:
            yield
        finally:
            await asyncio.shield(self._run(lease.close))

    async def serve(self, call: Call, positions: int) -> None:
        """Charge positions about to be sent (RESOURCE_EXHAUSTED past the daily limit)."""
        token = _token_of(call)
        if token is not None:
            await self._run(self.quotas.charge_served, token, positions)
        call.positions += positions

    async def may_compute(self, call: Call) -> None:
        """RESOURCE_EXHAUSTED when the token's computed positions reached today's limit."""
        token = _token_of(call)
        if token is not None:
            await self._run(self.quotas.admit_computing, token)

    async def computed(self, call: Call, positions: int, *, novel: bool = True) -> None:
        """Count positions the teacher computes for the call: a job's, or a read-through's
        misses (``novel``: sequences new to the store, which the guard watches against what
        the user owns)."""
        call.detail["computed"] = call.detail.get("computed", 0) + positions
        token = _token_of(call)
        if token is not None and positions:
            await self._run(self._computed, token, call.user, positions, novel)

    def _computed(self, token: str, user: str, positions: int, novel: bool) -> None:
        self.quotas.record_computed(token, positions)
        if not novel:
            return
        flag = self.guard.observe_novel(token, user, positions)
        if flag is not None:
            log.warning("extraction guard: token %s of user %r %s: %s",
                        token, user, flag.state.value, flag.reason)  # fmt: skip

    # -- audit ----------------------------------------------------------------------------------

    def record(self, call: Call, status: str) -> None:
        """The call's audit line (queued: the writer thread writes it)."""
        if self.audit is None:
            return
        principal = call.principal
        detail = dict(call.detail)
        if principal is not None and principal.token_id is not None:
            detail["token_id"] = principal.token_id
        event = AuditEvent(
            who=principal.user if principal is not None else "unauthenticated",
            action=call.method,
            status=status,
            target=call.target,
            positions=call.positions,
            decision=call.decision,
            detail=detail,
        )
        try:
            self.audit.record(event)
        except Exception:  # the next admission refuses calls while the log cannot be written
            log.exception("the audit log refused a record of %s", call.method)

    async def close(self) -> None:
        """Write every audit line queued, then close the state."""
        if self.audit is not None:
            await self._run(self.audit.close)
        self._executor.shutdown(wait=True)
        self.state.close()


def _principal(call: Call) -> Principal:
    assert call.principal is not None, "the call was not admitted"
    return call.principal


def _token_of(call: Call) -> str | None:
    return _principal(call).token_id
