"""The policy's messages on the wire: tokens, limits and access lists, protobuf to policy
objects and back (the rest of the conversions are in ``convert``). Who the caller is comes from
the request's metadata in :func:`~logitcache.server.grpc.status.rpc`, through the servicer's
:class:`~logitcache.server.policy.gate.PolicyGate`."""

from __future__ import annotations

from logitcache.server.policy.governance import TokenStatus
from logitcache.server.policy.state import DatasetAccess, Limits
from logitcache.v1 import logitcache_pb2 as pb


def token_info(status: TokenStatus) -> pb.TokenInfo:
    record, flag = status.record, status.flag
    return pb.TokenInfo(
        id=record.id,
        user=record.user,
        role=record.role.value,
        groups=list(record.groups),
        created_at=record.created_at,
        revoked_at=record.revoked_at or 0.0,
        limits=limits_message(status.limits),
        positions_computed_today=status.computed_today,
        positions_served_today=status.served_today,
        flag=flag.state.value if flag is not None else "",
        flag_reason=flag.reason if flag is not None else "",
    )


def limits_message(limits: Limits) -> pb.Limits:
    """Limits in force; 0 on the wire is "none" (unlimited) here, since defaults are applied."""
    return pb.Limits(
        positions_computed_per_day=limits.positions_computed_per_day or 0,
        positions_served_per_day=limits.positions_served_per_day or 0,
        concurrent_streams=limits.concurrent_streams or 0,
        requests_per_second=limits.requests_per_second or 0.0,
    )


def limits_of(message: pb.Limits) -> Limits:
    """A token's own limits from SetLimits: 0 (unset) keeps the server's default."""
    return Limits(
        positions_computed_per_day=message.positions_computed_per_day or None,
        positions_served_per_day=message.positions_served_per_day or None,
        concurrent_streams=message.concurrent_streams or None,
        requests_per_second=message.requests_per_second or None,
    )


def access_message(access: DatasetAccess | None) -> pb.DatasetAccess:
    """A dataset's access list; none (a dataset older than access lists) reads as no owner."""
    if access is None:
        return pb.DatasetAccess()
    return pb.DatasetAccess(owner=access.owner, users=access.users, groups=access.groups)
