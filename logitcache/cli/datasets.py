"""``logitcache datasets finish|resume|delete NAME``: end, restart or remove a dataset (and
``datasets share``, from ``policy``).

Each command talks to a running server (``--server``), or works on a local store directly
(``--store``, no server needed) where that makes sense: finishing and deleting change only the
store; resuming needs a teacher and the job's input, so offline it is the same ``logitcache
precompute`` command run again.
"""

from __future__ import annotations

import argparse
from typing import Any

from logitcache.cli.policy import add_share_command
from logitcache.client.errors import FailedPrecondition
from logitcache.client.options import add_server_options, client_arguments

STORE_URL = "a directory path or file:// URL"


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``datasets`` with its ``finish``, ``resume`` and ``delete`` subcommands."""
    datasets = sub.add_parser(
        "datasets", help="finish a stuck dataset as partial, resume it, or delete it"
    ).add_subparsers(dest="datasets_command", required=True, metavar="ACTION")
    actions = {
        "finish": (
            "end a dataset as partial",
            "end a dataset that nothing builds any more (its job was cancelled, or its server "
            "is gone): its state becomes partial (complete if every record is sealed), and its "
            "unfinished jobs are cancelled; streams read its sealed part with allow_partial. "
            "Refused while a job or precompute builds it (the message names which).",
            _finish,
        ),
        "resume": (
            "run a dataset's job again",
            "run the newest job of a dataset that is not complete again, on the server "
            "(sealed records are not computed again). A dataset built by `logitcache "
            "precompute` resumes by running that command again.",
            _resume,
        ),
        "delete": (
            "remove a dataset (its records stay until gc)",
            "remove a dataset's manifest and key list; its records stay until `logitcache gc` "
            "collects those no dataset references. Refused while a job or precompute builds it.",
            _delete,
        ),
    }
    for action, (summary, description, handler) in actions.items():
        p = datasets.add_parser(action, help=summary, description=description)
        p.add_argument("dataset", metavar="NAME", help="the dataset")
        add_server_options(p)
        p.add_argument(
            "--store",
            default=None,
            metavar="STORE_URL",
            help=f"work on this local store instead of a server ({STORE_URL})",
        )
        p.set_defaults(handler=handler)
    add_share_command(datasets)


def _client(args: argparse.Namespace) -> Any:
    from logitcache.client.client import Client

    return Client(args.server, **client_arguments(args))


def _open(args: argparse.Namespace) -> Any:
    from logitcache.server.store.store import open_store

    return open_store(args.store, writable=True)


def _finish(args: argparse.Namespace) -> int:
    if args.store is not None:
        from logitcache.server.dataset_lifecycle import finish_dataset

        end = finish_dataset(_open(args), args.dataset)
        state, cancelled = end.state, end.ended_jobs
    else:
        with _client(args) as client:
            state, cancelled = client.finish_dataset(args.dataset).state, []
    print(f"dataset {args.dataset}: {state}" + _cancelled(cancelled))
    return 0


def _resume(args: argparse.Namespace) -> int:
    if args.store is not None:
        raise FailedPrecondition(
            "resuming computes, so it needs a teacher: give --server to have the server run the "
            "dataset's job again, or rerun the `logitcache precompute` command that built it "
            "(it continues from what is sealed)"
        )
    with _client(args) as client:
        job = client.resume_dataset(args.dataset)
    print(f"dataset {args.dataset}: job {job.id} {job.state}")
    return 0


def _delete(args: argparse.Namespace) -> int:
    if args.store is not None:
        from logitcache.server.dataset_lifecycle import delete_dataset

        cancelled = delete_dataset(_open(args), args.dataset).ended_jobs
    else:
        with _client(args) as client:
            cancelled = list(client.delete_dataset(args.dataset).cancelled_jobs)
    print(f"dataset {args.dataset}: deleted" + _cancelled(cancelled))
    return 0


def _cancelled(job_ids: list[str]) -> str:
    return f" (cancelled job {', '.join(job_ids)})" if job_ids else ""
