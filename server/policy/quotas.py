"""Per-token quotas: positions computed and served per day, concurrent streams, requests per
second. Over a limit the caller gets RESOURCE_EXHAUSTED naming the limit and when it resets.

Daily counts and stream leases live in the policy state, so they hold across a restart and
across replicas that share it; the request rate is a token bucket in this process (a rate is
about the next second, and each replica guards its own).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from types import TracebackType

from logitcache.client.errors import InvalidArgument, ResourceExhausted
from logitcache.server.policy.state import Limits, PolicyState

COMPUTED = "positions_computed"
SERVED = "positions_served"


def utc_day(at: float) -> str:
    """The day a daily count belongs to (UTC), e.g. "2026-12-01"."""
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d")


def next_reset(at: float) -> datetime:
    """When the daily counts of the day of ``at`` reset: the next 00:00 UTC."""
    day = datetime.fromtimestamp(at, UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return day + timedelta(days=1)


def effective_limits(state: PolicyState, defaults: Limits, token_id: str) -> Limits:
    """The limits in force for a token: each of its own where set, else the default."""
    own = state.limits(token_id)
    if own is None:
        return defaults
    return Limits(
        **{
            name: value if value is not None else getattr(defaults, name)
            for name, value in asdict(own).items()
        }
    )


def daily_usage(state: PolicyState, token_id: str, at: float) -> dict[str, int]:
    """A token's counts of the UTC day of ``at``."""
    day = utc_day(at)
    return {c: state.usage(token_id, c, day) for c in (COMPUTED, SERVED)}


@dataclass
class _Bucket:
    tokens: float
    at: float


class StreamLease:
    """One open stream counted against ``concurrent_streams``; closing it frees the slot."""

    def __init__(self, state: PolicyState, lease: str | None) -> None:
        self._state, self._lease = state, lease

    def close(self) -> None:
        if self._lease is not None:
            self._state.close_stream(self._lease)
            self._lease = None

    def __enter__(self) -> StreamLease:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class QuotaKeeper:
    """Checks and charges a token's limits: its own (set by an admin) or ``defaults``."""

    def __init__(
        self,
        state: PolicyState,
        defaults: Limits | None = None,
        *,
        replica: str = "local",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.state, self.replica, self._clock = state, replica, clock
        self.defaults = defaults or Limits()
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()
        state.clear_streams(replica)  # this replica's streams ended when it last stopped

    def limits(self, token_id: str) -> Limits:
        return effective_limits(self.state, self.defaults, token_id)

    def admit_request(self, token_id: str, ceiling: float | None = None) -> None:
        """Count one request against ``requests_per_second`` (or ``ceiling``, a lower rate the
        extraction guard imposes on a throttled token)."""
        rates = [r for r in (self.limits(token_id).requests_per_second, ceiling) if r is not None]
        if not rates:
            return
        rate = min(rates)
        if rate <= 0:
            raise ResourceExhausted(
                f"token {token_id} may send no requests (requests_per_second 0)"
            )
        now = self._clock()
        burst = max(1.0, rate)
        with self._lock:
            bucket = self._buckets.setdefault(token_id, _Bucket(burst, now))
            bucket.tokens = min(burst, bucket.tokens + (now - bucket.at) * rate)
            bucket.at = now
            if bucket.tokens < 1.0:
                wait = (1.0 - bucket.tokens) / rate
                raise ResourceExhausted(
                    f"requests_per_second limit of {rate:g} reached for token {token_id}; "
                    f"resets in {wait:.2f} s"
                )
            bucket.tokens -= 1.0

    def admit_computing(self, token_id: str) -> None:
        """RESOURCE_EXHAUSTED once the day's computed positions have reached
        ``positions_computed_per_day``. Which positions a request computes (its misses) is
        known only once it runs, so a request admitted under the limit runs and is counted
        (:meth:`record_computed`): a day overshoots by at most one request."""
        limit = self.limits(token_id).positions_computed_per_day
        if limit is None:
            return
        now = self._clock()
        used = self.state.usage(token_id, COMPUTED, utc_day(now))
        if used >= limit:
            raise self._exhausted(token_id, COMPUTED, limit, used, now)

    def record_computed(self, token_id: str, positions: int) -> int:
        """Count positions the teacher computed for this token; the day's total."""
        return self._charge(token_id, COMPUTED, positions, None)

    def charge_served(self, token_id: str, positions: int) -> int:
        """Count positions served to this token (reads, streams, hits) before they are sent,
        refused whole when they would pass ``positions_served_per_day``; the day's total."""
        return self._charge(
            token_id, SERVED, positions, self.limits(token_id).positions_served_per_day
        )

    def _charge(self, token_id: str, counter: str, positions: int, limit: int | None) -> int:
        if positions < 0:
            raise InvalidArgument("a charge counts positions, >= 0")
        now = self._clock()
        day = utc_day(now)
        total = self.state.add_usage(token_id, counter, day, positions, limit)
        if total is None:
            assert limit is not None  # add_usage refuses only against a limit
            used = self.state.usage(token_id, counter, day)
            raise self._exhausted(token_id, counter, limit, used, now, asked=positions)
        return total

    @staticmethod
    def _exhausted(
        token_id: str, counter: str, limit: int, used: int, now: float, asked: int = 0
    ) -> ResourceExhausted:
        more = f", {asked:,} more asked" if asked else ""
        return ResourceExhausted(
            f"{counter}_per_day limit of {limit:,} reached for token {token_id} ({used:,} "
            f"used today{more}); resets at {next_reset(now).isoformat(timespec='seconds')}"
        )

    def usage(self, token_id: str) -> dict[str, int]:
        """Today's counts of a token, for admins and metrics."""
        return daily_usage(self.state, token_id, self._clock())

    def open_stream(self, token_id: str) -> StreamLease:
        """A lease on one of the token's ``concurrent_streams``; close it when the stream ends."""
        limit = self.limits(token_id).concurrent_streams
        lease = self.state.open_stream(token_id, self.replica, limit)
        if lease is None:
            raise ResourceExhausted(
                f"concurrent_streams limit of {limit} reached for token {token_id}; it resets "
                "when one of its streams ends"
            )
        return StreamLease(self.state, lease)
