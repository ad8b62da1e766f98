"""``logitcache gc``: delete the records no dataset references, with a dry run first."""

from __future__ import annotations

import argparse
import json

from logitcache.cli.precompute import STORE_URL


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``gc``."""
    p = sub.add_parser(
        "gc",
        help="delete sealed records that no dataset references (read-through results, records of "
        "deleted datasets); --dry-run shows what would go",
        description=(
            "Collect whole sealed segments none of whose records a dataset (building, partial or "
            "complete) lists. Segments that mix referenced and unreferenced records are kept. "
            "Safe while servers and precompute run: candidates are marked, the datasets are read "
            "again (a dataset created meanwhile rescues what it uses), and the rest is deleted "
            "after --grace seconds, which servers need to stop reading it. One gc at a time."
        ),
    )
    p.add_argument("store", metavar="STORE_URL", help=f"the store ({STORE_URL})")
    p.add_argument(
        "--dry-run", action="store_true", help="report what would be deleted; change nothing"
    )
    p.add_argument(
        "--min-age",
        type=float,
        default=3600.0,
        help="keep segments sealed less than this many seconds ago (fresh read-through "
        "results; default: 3600)",
    )
    p.add_argument(
        "--grace",
        type=float,
        default=60.0,
        help="seconds between condemning segments and deleting them, for running servers to "
        "stop reading them; longer than their refresh interval (default: 60)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=_gc)


def _gc(args: argparse.Namespace) -> int:
    from logitcache.client.errors import NotFound
    from logitcache.server.store.backend import backend_for_url
    from logitcache.server.store.gc import collect
    from logitcache.server.store.store import STORE_MARKER, open_store

    if not backend_for_url(args.store, create=False).exists(STORE_MARKER):
        raise NotFound(f"{args.store!r} is not a logitcache store")  # not made one by a typo
    store = open_store(args.store, writable=not args.dry_run)
    report = collect(store, dry_run=args.dry_run, min_age_s=args.min_age, grace_s=args.grace)
    print(json.dumps(report.to_json(), indent=1) if args.json else report.format())
    return 0
