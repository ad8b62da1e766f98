"""``logitcache tokens create|list|revoke|limit|unflag``, ``datasets share`` and ``audit verify``.

Each token and share command works against a running server (``--server`` with an admin's
``--token``, or a dataset owner's for ``share``), or offline against the server's state
directory (``--state DIR``): that is how the first admin gets a token. Offline they open the
state file the server uses (SQLite in WAL mode, so a running server keeps working) and run the
same operations as the server's admin RPCs. A created token is printed once, alone on stdout,
and kept nowhere; only its hash is stored.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from logitcache.client.errors import InvalidArgument
from logitcache.client.options import add_server_options, client_arguments

LIMITS = {
    "positions_computed_per_day": (int, "positions the teacher computes for it per UTC day"),
    "positions_served_per_day": (int, "positions streamed or returned to it per UTC day"),
    "concurrent_streams": (int, "streams it has open at once"),
    "requests_per_second": (float, "requests per second (one second of burst)"),
}


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``tokens`` (create, list, revoke, limit, unflag) and ``audit`` (verify)."""
    tokens = sub.add_parser(
        "tokens",
        help="create, list, limit and revoke API tokens (on a server, or in its state directory)",
    )
    actions = tokens.add_subparsers(dest="tokens_command", required=True, metavar="ACTION")

    p = actions.add_parser(
        "create",
        help="create a token and print it once (offline with --state: the first admin's way in)",
    )
    _where(p)
    p.add_argument(
        "--user", required=True, help="the user the token speaks for (access lists name users)"
    )
    p.add_argument(
        "--role",
        required=True,
        choices=["admin", "producer", "consumer"],
        help="admin: teachers, tokens, licences, quotas; producer: jobs and read-through; "
        "consumer: reads and streams the datasets shared with it",
    )
    p.add_argument(
        "--group", action="append", default=[], help="a group of the user (repeat for several)"
    )
    p.set_defaults(handler=_create)

    p = actions.add_parser(
        "list", help="list tokens: ids, users, roles, limits, today's usage, guard flags"
    )
    _where(p)
    p.add_argument("--json", action="store_true", help="one JSON object per token")
    p.set_defaults(handler=_list)

    p = actions.add_parser("revoke", help="revoke a token by its id (tok_...)")
    _where(p)
    _token_id(p)
    p.set_defaults(handler=_revoke)

    p = actions.add_parser(
        "limit", help="set a token's own limits (those not given keep the server's defaults)"
    )
    _where(p)
    _token_id(p)
    for name, (kind, text) in LIMITS.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None, help=text)
    p.set_defaults(handler=_limit)

    p = actions.add_parser("unflag", help="lift the extraction guard's flag from a token")
    _where(p)
    _token_id(p)
    p.set_defaults(handler=_unflag)

    audit = sub.add_parser("audit", help="check the audit log")
    actions = audit.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    p = actions.add_parser(
        "verify",
        help="check the hash chain: exit 0 when intact, 1 naming the first edited, deleted or "
        "reordered line",
    )
    p.add_argument("path", metavar="PATH", type=Path, help="the audit directory, or one file of it")
    p.set_defaults(handler=_verify)


def add_share_command(datasets: argparse._SubParsersAction) -> None:
    """Add ``datasets share`` to the ``datasets`` subcommands."""
    p = datasets.add_parser(
        "share",
        help="change who may read a dataset (its owner or an admin)",
        description="Add or remove users and groups on a dataset's access list. Consumers "
        "read and stream only the datasets shared with them (or one of their groups); the "
        "owner is the user whose job created it.",
    )
    p.add_argument("dataset", metavar="NAME", help="the dataset")
    _where(p)
    p.add_argument("--user", action="append", default=[], help="a user to add (repeatable)")
    p.add_argument("--group", action="append", default=[], help="a group to add (repeatable)")
    p.add_argument(
        "--remove-user", action="append", default=[], help="a user to remove (repeatable)"
    )
    p.add_argument(
        "--remove-group", action="append", default=[], help="a group to remove (repeatable)"
    )
    p.add_argument(
        "--owner",
        default=None,
        help="offline only: make this user the owner (for a dataset made by `logitcache "
        "precompute`, which has none)",
    )
    p.set_defaults(handler=_share)


def _where(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--state",
        metavar="DIR|URL",
        default=None,
        help="work offline on the server's state instead of calling --server: its state "
        "directory (--state-dir of serve; default there: policy/ inside a local store) or the "
        "postgresql:// URL of a shared state (--state-url of serve)",
    )
    add_server_options(parser)


def _token_id(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("token_id", metavar="TOKEN_ID", help="the id `tokens list` shows")


@contextmanager
def _governance(args: argparse.Namespace) -> Iterator[Any]:
    """The offline state's admin operations, or None: call the server."""
    if args.state is None:
        yield None
        return
    from logitcache.server.policy.governance import Governance
    from logitcache.server.policy.state import open_state

    state = open_state(args.state)
    try:
        yield Governance(state)
    finally:
        state.close()


def _online(args: argparse.Namespace, call: Callable[[Any], Any]) -> Any:
    from logitcache.client.client import Client

    with Client(args.server, **client_arguments(args)) as client:
        return call(client)


def _info(status: Any) -> Any:
    from logitcache.server.grpc.auth import token_info

    return token_info(status)


def _create(args: argparse.Namespace) -> int:
    with _governance(args) as governance:
        if governance is not None:
            token, status = governance.create_token(args.user, args.role, args.group)
            info = _info(status)
        else:
            made = _online(args, lambda c: c.create_token(args.user, args.role, args.group))
            token, info = made.token, made.info
    print(
        f"created token {info.id} for user {info.user!r} ({info.role}); it is shown once, store "
        "it now:",
        file=sys.stderr,
    )
    print(token)
    return 0


def _list(args: argparse.Namespace) -> int:
    with _governance(args) as governance:
        if governance is not None:
            infos = [_info(s) for s in governance.tokens()]
        else:
            infos = _online(args, lambda c: c.list_tokens())
    for info in infos:
        print(json.dumps(_row(info)) if args.json else _line(info))
    if not infos and not args.json:
        print("no tokens", file=sys.stderr)
    return 0


def _revoke(args: argparse.Namespace) -> int:
    info = _token_action(args, lambda g: g.revoke(args.token_id), lambda c: c.revoke_token)
    print(f"revoked token {info.id} of user {info.user!r}")
    return 0


def _limit(args: argparse.Namespace) -> int:
    given = {name: getattr(args, name) for name in LIMITS if getattr(args, name) is not None}
    if not given:
        raise InvalidArgument("give at least one limit, e.g. --positions-served-per-day N")

    def offline(governance: Any) -> Any:
        from logitcache.server.policy.state import Limits

        return governance.set_limits(args.token_id, Limits(**given))

    info = _token_action(args, offline, lambda c: lambda i: c.set_limits(i, **given))
    print(_line(info))
    return 0


def _unflag(args: argparse.Namespace) -> int:
    info = _token_action(args, lambda g: g.clear_flag(args.token_id), lambda c: c.clear_flag)
    print(_line(info))
    return 0


def _token_action(
    args: argparse.Namespace,
    offline: Callable[[Any], Any],
    online: Callable[[Any], Callable[[str], Any]],
) -> Any:
    """One admin operation on one token, offline or online; the token's info after it."""
    with _governance(args) as governance:
        if governance is not None:
            return _info(offline(governance))
        return _online(args, lambda client: online(client)(args.token_id))


def _share(args: argparse.Namespace) -> int:
    changes = {
        "add_users": args.user,
        "add_groups": args.group,
        "remove_users": args.remove_user,
        "remove_groups": args.remove_group,
    }
    with _governance(args) as governance:
        if governance is not None:
            access = governance.share(args.dataset, owner=args.owner, **changes)
            owner, users, groups = access.owner, access.users, access.groups
        else:
            if args.owner is not None:
                raise InvalidArgument("--owner is offline only (with --state)")
            message = _online(args, lambda c: c.share_dataset(args.dataset, **changes))
            owner, users, groups = message.owner, message.users, message.groups
    print(
        f"dataset {args.dataset}: owner {owner or '-'}, users {', '.join(users) or '-'}, "
        f"groups {', '.join(groups) or '-'}"
    )
    return 0


def _row(info: Any) -> dict[str, Any]:
    limits = info.limits
    return {
        "id": info.id,
        "user": info.user,
        "role": info.role,
        "groups": list(info.groups),
        "created_at": info.created_at,
        "revoked_at": info.revoked_at or None,
        "limits": {name: getattr(limits, name) or None for name in LIMITS},
        "positions_computed_today": info.positions_computed_today,
        "positions_served_today": info.positions_served_today,
        "flag": info.flag or None,
        "flag_reason": info.flag_reason or None,
    }


def _line(info: Any) -> str:
    status = "active" if not info.revoked_at else f"revoked {_when(info.revoked_at)}"
    limits = ",".join(
        f"{name}={getattr(info.limits, name):g}" for name in LIMITS if getattr(info.limits, name)
    )
    flag = f"  FLAGGED {info.flag}: {info.flag_reason}" if info.flag else ""
    return (
        f"{info.id}  {info.user}  {info.role}  groups={','.join(info.groups) or '-'}  "
        f"created {_when(info.created_at)}  {status}  limits={limits or '-'}  "
        f"today computed={info.positions_computed_today:,} "
        f"served={info.positions_served_today:,}{flag}"
    )


def _verify(args: argparse.Namespace) -> int:
    from logitcache.cli import EXIT_FAILED
    from logitcache.server.policy.audit import verify

    report = verify(args.path)
    if report.problem is not None:
        print(f"logitcache: audit log broken at {report.problem}", file=sys.stderr)
        return EXIT_FAILED
    print(f"audit log intact: {report.lines} lines in {report.files} file(s)")
    return 0


def _when(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M UTC")
