"""``logitcache tokens create|list|revoke`` and ``logitcache audit verify``: the offline side of
the policy, against a server's state directory and audit log.

Offline token commands are how the first admin gets a token: they open the state file the
server uses (SQLite in WAL mode, so a running server keeps working). A created token is printed
once, alone on stdout, and kept nowhere; only its hash is stored.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``tokens`` (create, list, revoke) and ``audit`` (verify)."""
    tokens = sub.add_parser(
        "tokens", help="create, list and revoke API tokens in a server's state directory"
    )
    actions = tokens.add_subparsers(dest="tokens_command", required=True, metavar="ACTION")

    p = actions.add_parser(
        "create", help="create a token and print it once (the first admin's way in)"
    )
    _state_option(p)
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

    p = actions.add_parser("list", help="list tokens (ids, users, roles; never the tokens)")
    _state_option(p)
    p.add_argument("--json", action="store_true", help="one JSON object per token")
    p.set_defaults(handler=_list)

    p = actions.add_parser("revoke", help="revoke a token by its id (tok_...)")
    _state_option(p)
    p.add_argument("token_id", metavar="TOKEN_ID", help="the id `tokens list` shows")
    p.set_defaults(handler=_revoke)

    audit = sub.add_parser("audit", help="check the audit log")
    actions = audit.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    p = actions.add_parser(
        "verify",
        help="check the hash chain: exit 0 when intact, 1 naming the first edited, deleted or "
        "reordered line",
    )
    p.add_argument("path", metavar="PATH", type=Path, help="the audit directory, or one file of it")
    p.set_defaults(handler=_verify)


def _state_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--state", required=True, type=Path, metavar="DIR", help="the server's state directory"
    )


def _create(args: argparse.Namespace) -> int:
    from logitcache.server.policy.access import issue_token
    from logitcache.server.policy.state import Role, open_state

    state = open_state(args.state)
    try:
        token, record = issue_token(state, args.user, Role.parse(args.role), args.group)
    finally:
        state.close()
    print(
        f"created token {record.id} for user {record.user!r} ({record.role.value}); it is shown "
        "once, store it now:",
        file=sys.stderr,
    )
    print(token)
    return 0


def _list(args: argparse.Namespace) -> int:
    from logitcache.server.policy.state import open_state

    state = open_state(args.state)
    try:
        records = state.tokens()
    finally:
        state.close()
    for r in records:
        if args.json:
            row = {
                "id": r.id,
                "user": r.user,
                "role": r.role.value,
                "groups": list(r.groups),
                "created_at": r.created_at,
                "revoked_at": r.revoked_at,
            }
            print(json.dumps(row))
        else:
            status = "active" if r.active else f"revoked {_when(r.revoked_at or 0.0)}"
            groups = ",".join(r.groups) or "-"
            print(
                f"{r.id}  {r.user}  {r.role.value}  groups={groups}  created {_when(r.created_at)}  {status}"
            )
    if not records and not args.json:
        print("no tokens", file=sys.stderr)
    return 0


def _revoke(args: argparse.Namespace) -> int:
    from logitcache.client.errors import NotFound
    from logitcache.server.policy.state import open_state

    state = open_state(args.state)
    try:
        record = state.token(args.token_id)
        if record is None:
            raise NotFound(f"no token {args.token_id} in {args.state}")
        if not state.revoke_token(args.token_id, time.time()):
            print(f"token {args.token_id} was already revoked", file=sys.stderr)
            return 0
    finally:
        state.close()
    print(f"revoked token {args.token_id} of user {record.user!r}")
    return 0


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
