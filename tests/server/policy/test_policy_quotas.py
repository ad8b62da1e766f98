"""Quotas and the extraction guard over a real state file: each limit gives RESOURCE_EXHAUSTED
naming itself and its reset, recovers after the reset, and holds across a restart. The clock is
a plain function the test moves forward, so resets are exact and no test waits."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from logitcache.client.errors import PermissionDenied, ResourceExhausted
from logitcache.server.policy.guard import ExtractionGuard, GuardAction, GuardPolicy
from logitcache.server.policy.quotas import QuotaKeeper, next_reset, utc_day
from logitcache.server.policy.state import FlagState, Limits, open_state

NOON = datetime(2026, 12, 1, 12, 0, tzinfo=UTC).timestamp()
MIDNIGHT = datetime(2026, 12, 2, 0, 0, tzinfo=UTC).timestamp()


class Clock:
    def __init__(self, at: float) -> None:
        self.at = at

    def __call__(self) -> float:
        return self.at


def test_days_and_resets_are_utc() -> None:
    assert utc_day(NOON) == "2026-12-01"
    assert next_reset(NOON).isoformat() == "2026-12-02T00:00:00+00:00"
    assert next_reset(MIDNIGHT).isoformat() == "2026-12-03T00:00:00+00:00"


def test_served_positions_are_refused_past_the_limit_then_recover_after_midnight(tmp_path) -> None:
    state, clock = open_state(tmp_path), Clock(NOON)
    quotas = QuotaKeeper(state, Limits(positions_served_per_day=1000), clock=clock)
    assert quotas.charge_served("tok_a", 600) == 600
    with pytest.raises(ResourceExhausted) as raised:
        quotas.charge_served("tok_a", 600)
    message = str(raised.value)
    assert "positions_served_per_day limit of 1,000" in message
    assert "600 used today, 600 more asked" in message
    assert "resets at 2026-12-02T00:00:00+00:00" in message
    assert quotas.charge_served("tok_a", 400) == 1000  # exactly up to the limit
    assert quotas.charge_served("tok_b", 1000) == 1000  # limits are per token
    clock.at = MIDNIGHT + 1
    assert quotas.charge_served("tok_a", 600) == 600
    state.close()


def test_computing_is_admitted_under_the_limit_and_counted_after(tmp_path) -> None:
    """Misses are known only once a request runs: one admitted under the limit is counted whole,
    and the next is refused until midnight."""
    state, clock = open_state(tmp_path), Clock(NOON)
    quotas = QuotaKeeper(state, Limits(positions_computed_per_day=1000), clock=clock)
    quotas.admit_computing("tok_a")
    assert quotas.record_computed("tok_a", 1200) == 1200
    with pytest.raises(ResourceExhausted) as raised:
        quotas.admit_computing("tok_a")
    message = str(raised.value)
    assert "positions_computed_per_day limit of 1,000 reached for token tok_a" in message
    assert "1,200 used today); resets at 2026-12-02T00:00:00+00:00" in message
    quotas.admit_computing("tok_b")
    clock.at = MIDNIGHT + 1
    quotas.admit_computing("tok_a")
    state.close()


def test_usage_and_limits_hold_across_a_restart(tmp_path) -> None:
    state, clock = open_state(tmp_path), Clock(NOON)
    quotas = QuotaKeeper(state, clock=clock)
    state.set_limits("tok_a", Limits(positions_computed_per_day=100, concurrent_streams=1))
    quotas.record_computed("tok_a", 100)
    state.close()

    state = open_state(tmp_path)
    quotas = QuotaKeeper(state, clock=clock)
    assert quotas.usage("tok_a") == {"positions_computed": 100, "positions_served": 0}
    with pytest.raises(ResourceExhausted, match="positions_computed_per_day limit of 100"):
        quotas.admit_computing("tok_a")
    assert quotas.limits("tok_a").concurrent_streams == 1
    state.close()


def test_a_token_gets_the_defaults_where_it_has_no_limit_of_its_own(tmp_path) -> None:
    state = open_state(tmp_path)
    defaults = Limits(positions_served_per_day=5, concurrent_streams=3)
    quotas = QuotaKeeper(state, defaults, clock=Clock(NOON))
    with pytest.raises(ResourceExhausted):
        quotas.charge_served("tok_any", 6)
    state.set_limits("tok_vip", Limits(positions_served_per_day=10**9))
    assert quotas.charge_served("tok_vip", 10**9) == 10**9
    assert quotas.limits("tok_vip").concurrent_streams == 3  # unset: the default's
    state.close()


def test_concurrent_streams_are_limited_and_a_closed_stream_frees_its_slot(tmp_path) -> None:
    state = open_state(tmp_path)
    quotas = QuotaKeeper(state, Limits(concurrent_streams=2), clock=Clock(NOON))
    first, second = quotas.open_stream("tok_a"), quotas.open_stream("tok_a")
    with pytest.raises(ResourceExhausted, match="concurrent_streams limit of 2"):
        quotas.open_stream("tok_a")
    first.close()
    first.close()  # closing twice frees one slot once
    with quotas.open_stream("tok_a"):
        with pytest.raises(ResourceExhausted):
            quotas.open_stream("tok_a")
    second.close()
    state.close()


def test_streams_of_a_stopped_server_do_not_count_after_it_restarts(tmp_path) -> None:
    state = open_state(tmp_path)
    QuotaKeeper(state, Limits(concurrent_streams=1)).open_stream("tok_a")  # never closed
    restarted = QuotaKeeper(state, Limits(concurrent_streams=1))
    restarted.open_stream("tok_a").close()
    state.close()


def test_requests_per_second_is_exhausted_then_refills(tmp_path) -> None:
    state, clock = open_state(tmp_path), Clock(NOON)
    quotas = QuotaKeeper(state, Limits(requests_per_second=2), clock=clock)
    quotas.admit_request("tok_a")
    quotas.admit_request("tok_a")
    with pytest.raises(
        ResourceExhausted, match=r"requests_per_second limit of 2 .* resets in 0\.50 s"
    ):
        quotas.admit_request("tok_a")
    clock.at += 0.5
    quotas.admit_request("tok_a")
    quotas.admit_request("tok_b")
    state.close()


def test_guard_throttles_bulk_novel_reads_beyond_owned_datasets(tmp_path) -> None:
    state, clock = open_state(tmp_path), Clock(NOON)
    owned = {"alice": 1_000, "bob": 1_000_000}
    guard = ExtractionGuard(
        state, GuardPolicy(floor=10_000, owned_ratio=10.0), owned.__getitem__, clock=clock
    )
    quotas = QuotaKeeper(state, clock=clock)
    assert guard.observe_novel("tok_bob", "bob", 500_000) is None  # a lab on its own data
    assert guard.observe_novel("tok_alice", "alice", 9_000) is None  # under the floor
    flag = guard.observe_novel("tok_alice", "alice", 2_000)
    assert flag is not None and flag.state is FlagState.THROTTLED
    assert "11,000 novel positions" in flag.reason and "1,000 positions" in flag.reason
    assert guard.observe_novel("tok_alice", "alice", 50_000) is None  # flagged once
    assert [f.token_id for f in guard.flagged()] == ["tok_alice"]

    ceiling = guard.admit("tok_alice")
    assert ceiling == GuardPolicy().throttled_requests_per_second
    quotas.admit_request("tok_alice", ceiling)
    with pytest.raises(ResourceExhausted, match="requests_per_second limit of 0.2"):
        quotas.admit_request("tok_alice", ceiling)
    assert guard.admit("tok_bob") is None

    assert guard.clear("tok_alice") and guard.admit("tok_alice") is None
    state.close()


def test_guard_suspends_by_policy_and_the_flag_survives_a_restart(tmp_path) -> None:
    state = open_state(tmp_path)
    policy = GuardPolicy(floor=100, owned_ratio=1.0, action=GuardAction.SUSPEND)
    guard = ExtractionGuard(state, policy, lambda user: 0, clock=Clock(NOON))
    assert guard.observe_novel("tok_x", "mallory", 101) is not None
    state.close()

    state = open_state(tmp_path)
    guard = ExtractionGuard(state, policy, lambda user: 0, clock=Clock(NOON))
    with pytest.raises(PermissionDenied, match="suspended by the extraction guard"):
        guard.admit("tok_x")
    state.close()
