"""The extraction guard: flags a token that pulls a teacher's distributions in bulk, the way API
outputs are harvested to clone a model by distillation.

The signal is read-through computation for novel sequences (misses, which make the teacher run)
far beyond what the token's user has put into datasets it owns: a lab distilling its own
datasets computes about as much as they hold, a harvester computes ever more new text. Over the
bound, the token is flagged, throttled to a low request rate or suspended, as the policy says,
until an admin clears the flag. Counts are per UTC day, in the policy state.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from logitcache.client.errors import PermissionDenied
from logitcache.server.policy.quotas import utc_day
from logitcache.server.policy.state import FlagState, GuardFlag, PolicyState

NOVEL = "novel_positions"


class GuardAction(StrEnum):
    THROTTLE = "throttle"
    SUSPEND = "suspend"


@dataclass(frozen=True)
class GuardPolicy:
    """A token is flagged when its novel positions in one day pass both ``floor`` and
    ``owned_ratio`` times the positions of the datasets its user owns."""

    floor: int = 5_000_000
    owned_ratio: float = 10.0
    action: GuardAction = GuardAction.THROTTLE
    throttled_requests_per_second: float = 0.2


class ExtractionGuard:
    """``owned_positions(user)`` counts the positions in the datasets a user owns (the store
    knows; the state's access lists say which datasets are whose)."""

    def __init__(
        self,
        state: PolicyState,
        policy: GuardPolicy,
        owned_positions: Callable[[str], int],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.state, self.policy = state, policy
        self._owned_positions, self._clock = owned_positions, clock

    def admit(self, token_id: str) -> float | None:
        """PERMISSION_DENIED for a suspended token; the request-rate ceiling of a throttled one
        (for :meth:`QuotaKeeper.admit_request`); None for a token in good standing."""
        flag = self.state.flag(token_id)
        if flag is None:
            return None
        if flag.state is FlagState.SUSPENDED:
            raise PermissionDenied(
                f"token {token_id} is suspended by the extraction guard ({flag.reason}); an "
                "admin can review and clear the flag"
            )
        return self.policy.throttled_requests_per_second

    def observe_novel(self, token_id: str, user: str, positions: int) -> GuardFlag | None:
        """Count ``positions`` computed for novel sequences; the new flag when this passes the
        bound (None otherwise, or when the token is flagged already)."""
        now = self._clock()
        total = self.state.add_usage(token_id, NOVEL, utc_day(now), positions, None)
        assert total is not None  # no limit given: add_usage always adds
        if total <= self.policy.floor or self.state.flag(token_id) is not None:
            return None
        owned = self._owned_positions(user)
        bound = max(self.policy.floor, self.policy.owned_ratio * owned)
        if total <= bound:
            return None
        state = (
            FlagState.SUSPENDED
            if self.policy.action is GuardAction.SUSPEND
            else FlagState.THROTTLED
        )
        flag = GuardFlag(
            token_id=token_id,
            state=state,
            reason=(
                f"{total:,} novel positions computed today, above {bound:,.0f} "
                f"({self.policy.owned_ratio:g}x the {owned:,} positions of datasets it owns)"
            ),
            at=now,
            detail={"novel_positions": total, "owned_positions": owned, "bound": bound},
        )
        self.state.set_flag(flag)
        return flag

    def flagged(self) -> list[GuardFlag]:
        """The flagged tokens, for admins."""
        return self.state.flags()

    def clear(self, token_id: str) -> bool:
        """An admin's decision that a flagged token may go on; whether it was flagged."""
        return self.state.clear_flag(token_id)
