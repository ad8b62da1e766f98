"""``logitcache serve``: the gRPC service with its HTTP side, configured from file, env and flags."""

from __future__ import annotations

import argparse


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``serve``; its flags are the fields of the server's configuration."""
    from dataclasses import fields

    from logitcache.server.config import FIELD_HELP, TEACHER_FLAG_HELP, ServerConfig

    p = sub.add_parser(
        "serve",
        help="run the gRPC service (read-through cache, dataset streaming, precompute jobs)",
        description=(
            "Run teachers under vLLM behind a gRPC service, with an HTTP side for health and "
            "metrics. Settings come from defaults, then --config (TOML or JSON with the same "
            "keys as the flags, and a [[teachers]] table per teacher), then LOGITCACHE_<KEY> "
            "environment variables (LOGITCACHE_TEACHERS=a=PATH,b=PATH), then flags."
        ),
    )
    p.add_argument("--config", default=None, help="TOML or JSON configuration file")
    p.add_argument(
        "--teacher",
        action="append",
        default=None,
        metavar="[NAME=]PATH_OR_ID",
        help="teacher to serve (repeatable; the first is the default); replaces the config's teachers. "
        "With no teacher the server is store-only: it streams and lists, and computes nothing",
    )
    switches = {f.name for f in fields(ServerConfig) if f.type == "bool"}
    for name, text in FIELD_HELP.items():
        flag = f"--{name.replace('_', '-')}"
        if name in switches:
            p.add_argument(flag, dest=name, action="store_const", const=True, help=text)
        else:
            p.add_argument(flag, dest=name, default=None, help=text)
    g = p.add_argument_group("teachers given with --teacher")
    for name, text in TEACHER_FLAG_HELP.items():
        repeatable = {"action": "append", "metavar": "KEY=VALUE"} if name == "engine_arg" else {}
        g.add_argument(
            f"--{name.replace('_', '-')}",
            dest=f"teacher_{name}",
            default=None,
            help=text,
            **repeatable,
        )
    p.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    from logitcache.server.app import serve
    from logitcache.server.config import FIELD_HELP, load_config, teachers_from_flags

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    overrides: dict = {name: getattr(args, name) for name in FIELD_HELP}
    if args.teacher:
        overrides["teachers"] = teachers_from_flags(args.teacher, vars(args))
    asyncio.run(serve(load_config(args.config, overrides)))
    return 0
