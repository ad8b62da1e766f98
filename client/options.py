"""Command-line option groups that the client commands share with the rest of the one CLI.

They live in the client package because the client commands (``logitcache submit``, ``jobs``,
``fetch``) must not import the root CLI, which reaches the server; ``logitcache.cli`` imports
them from here. Standard library and the capture-space constants only (which the root CLI's
own options load anyway), so building a parser stays fast.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from logitcache.client.space import DEFAULT_DRAWS

DEFAULT_SERVER = os.environ.get("LOGITCACHE_SERVER", "localhost:50051")
OVERFLOW_POLICIES = ("error", "truncate", "split")
SENSITIVE_DATA_ACTIONS = ("reject", "redact", "allow")
PURPOSES = ("research", "commercial")


def add_server_options(parser: argparse.ArgumentParser, *, timeout: float = 60.0) -> None:
    """``--server``, ``--timeout``, TLS and ``--token``: where a running server is, how long a
    call may take, how to trust it and prove who this client is; :func:`client_arguments`
    reads them."""
    group = parser.add_argument_group("server")
    group.add_argument(
        "--server",
        default=DEFAULT_SERVER,
        metavar="HOST:PORT",
        help=f"gRPC address of the server (default: $LOGITCACHE_SERVER or {DEFAULT_SERVER})",
    )
    group.add_argument(
        "--timeout",
        type=float,
        default=timeout,
        help=f"deadline of each call in seconds (default: {timeout:g})",
    )
    group.add_argument(
        "--tls",
        action="store_true",
        help="connect with TLS, trusting the default roots (implied by --ca, --cert; "
        "default: $LOGITCACHE_TLS)",
    )
    group.add_argument(
        "--ca",
        metavar="PEM",
        help="CA certificate that signed the server's certificate (default: $LOGITCACHE_CA)",
    )
    group.add_argument(
        "--cert",
        metavar="PEM",
        help="this client's certificate, for a server that requires one (mutual TLS; "
        "default: $LOGITCACHE_CERT)",
    )
    group.add_argument(
        "--key", metavar="PEM", help="private key of --cert (default: $LOGITCACHE_KEY)"
    )
    group.add_argument(
        "--token",
        metavar="TOKEN",
        help="API token sent with every call (default: $LOGITCACHE_TOKEN; a single-user server "
        "on loopback needs none); prefer the variable: a flag shows in the process list",
    )


def client_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of ``Client(args.server, ...)`` that add_server_options' flags give."""
    return {
        "timeout": args.timeout,
        "tls": True if args.tls else None,
        "ca": args.ca,
        "cert": args.cert,
        "key": args.key,
        "token": args.token,
    }


def add_dataset_options(parser: argparse.ArgumentParser, *, license_default: str) -> None:
    """The dataset a command builds: its name, how long sequences may be, the licence recorded."""
    group = parser.add_argument_group("dataset to build")
    group.add_argument(
        "--dataset", required=True, help="name of the dataset (letters, digits, . _ -)"
    )
    group.add_argument(
        "--max-len",
        type=int,
        default=None,
        help="longest sequence in tokens (default and cap: the teacher's context - 1)",
    )
    group.add_argument(
        "--overflow",
        choices=OVERFLOW_POLICIES,
        default="error",
        help="sequences over --max-len: fail (error, the default), keep the first --max-len "
        "tokens (truncate), or cut them into consecutive pieces (split)",
    )
    group.add_argument(
        "--license", default=None, help=f"licence to record (default: {license_default})"
    )
    group.add_argument(
        "--sensitive-data",
        choices=SENSITIVE_DATA_ACTIONS,
        default=None,
        help="rows in which a sensitive-data detector (e-mail, phone, card, government id, "
        "secret, IP address) fires: fail naming the row (reject), replace the finding in texts "
        "and chat messages before tokenising (redact), or only count it in the provenance "
        "(allow) (default: the server's, reject)",
    )


def add_use_options(parser: argparse.ArgumentParser) -> None:
    """What the distributions are for: the declaration the licence policy decides on and the
    dataset's provenance records; :func:`use_of` reads it."""
    group = parser.add_argument_group(
        "use (the licence policy decides on it: allow, allow with obligations, or refuse)"
    )
    group.add_argument("--purpose", choices=PURPOSES, default=None, help="research or commercial")
    group.add_argument(
        "--student-name", default=None, help="intended name of the student model to train"
    )
    group.add_argument(
        "--student-family", default=None, help="family of the student model, e.g. llama3, qwen2"
    )
    group.add_argument(
        "--requester", default=None, help="person or team asking (default: this OS user)"
    )
    group.add_argument(
        "--monthly-active-users",
        type=int,
        default=None,
        help="monthly active users of the requester's products, for licences with a threshold",
    )


def use_of(args: argparse.Namespace) -> Any:
    """The declared :class:`~logitcache.client.use.Use`, or None when no use flag was given
    (the server then says what to declare)."""
    from logitcache.client.use import Use

    given = (args.purpose, args.student_name, args.student_family)
    if all(value is None for value in given):
        return None
    extra = {"requester": args.requester} if args.requester else {}
    return Use(
        args.purpose or "",
        args.student_name or "",
        args.student_family or "",
        monthly_active_users=args.monthly_active_users,
        **extra,
    )


def add_progress_option(parser: argparse.ArgumentParser) -> None:
    """``--no-progress``, for commands that draw a progress bar on stderr."""
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def add_mode_option(parser: argparse.ArgumentParser) -> None:
    """``--mode``, the capture mode of a server's job or read-through (checked by the server)."""
    parser.add_argument(
        "--mode",
        default=None,
        metavar="MODE",
        help="capture mode: topk (default), top_p:P (adaptive: the fewest entries whose "
        "probability reaches P, at most --top-k) or sampled (--top-k draws per position from "
        f"the teacher's full distribution; default {DEFAULT_DRAWS})",
    )


def parse_temperatures(text: str) -> tuple[float, ...]:
    """``2,4`` -> (2.0, 4.0): positive, finite temperatures (an argparse ``type``)."""
    try:
        values = tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None
    if not values or any(not 0 < t < float("inf") for t in values):
        raise argparse.ArgumentTypeError(f"temperatures must be positive numbers: {text!r}")
    return values


def add_temperatures_option(parser: argparse.ArgumentParser) -> None:
    """``--temperatures``: the temperatures whose tail masses a capture stores besides T = 1."""
    parser.add_argument(
        "--temperatures",
        type=parse_temperatures,
        default=(),
        metavar="T[,T...]",
        help="also store each position's tail mass at these temperatures (comma-separated, "
        "e.g. 2,4; topk and top_p modes only): the mass the teacher puts outside the kept "
        "entries under softmax(logits / T), so the trainer's losses at them "
        "(logitcache.trainer.tempered) are exact over the top-k plus the tail instead of "
        "renormalising the top-k. They are part of the capture space: records with other "
        "temperatures (or none) are kept apart (default: none)",
    )
