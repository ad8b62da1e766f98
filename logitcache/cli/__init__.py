"""The ``logitcache`` command: one parser built from every command family, one error mapping.

Each family module registers its subcommands (``add_commands``) and imports what a command needs
only when it runs, so ``logitcache --help`` and the client commands start without vLLM, torch or
the server. Whatever a command raises that a user can act on is turned into one line on stderr
and an exit status by :func:`error_status`, and nowhere else.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from logitcache import __version__
from logitcache.cli import bench, datasets, demo, gc, policy, precompute, provenance, serve
from logitcache.client import commands as client_commands
from logitcache.client.errors import LogitCacheError

DESCRIPTION = """\
logitcache: capture a teacher's top-k next-token distributions with vLLM and keep them,
compressed, in a Zarr store for knowledge distillation.

Row t of a sequence is the teacher's distribution over the token after position t (aligned with
a student's logits[:, t]): the top-k token ids in descending probability, their log-probabilities
over the whole vocabulary at temperature 1, and the log-probability of the actual next token.
"""

# Exit statuses: 0 done; 1 the command ran and the work did not succeed (a followed job failed, the
# disk is full); 2 the request was refused: bad flags (argparse's own status), input files or names,
# or any typed error or server status; 130 interrupted, as a shell reports ^C.
EXIT_FAILED, EXIT_BAD_REQUEST, EXIT_INTERRUPTED = 1, 2, 130
INTERRUPTED = "interrupted; sealed work is kept, rerun the same command to resume"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="logitcache",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="show the engine's own log lines"
    )
    parser.add_argument(
        "--version", action="version", version=f"logitcache {__version__}", help="print it"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    precompute.add_commands(sub)  # precompute, inspect
    gc.add_commands(sub)
    datasets.add_commands(sub)  # datasets finish|resume|delete
    serve.add_commands(sub)
    client_commands.add_commands(sub)  # submit, jobs, fetch: clients of a running server
    demo.add_commands(sub)  # demo-teacher, demo-data, demo-service
    bench.add_commands(sub)  # bench capture|distill|stream|lookup|storage
    policy.add_commands(sub)  # tokens create|list|revoke, audit verify
    provenance.add_commands(sub)  # provenance DATASET
    _record_flags(sub)
    return parser


def _record_flags(sub: argparse._SubParsersAction) -> None:
    """Give every command the flag of each of its options by destination (``top_p``: ``--top-p``),
    so that a typed error naming request fields names the flags the user typed instead."""
    for command in sub.choices.values():
        nested = [a for a in command._actions if isinstance(a, argparse._SubParsersAction)]
        for action in nested:
            _record_flags(action)
        if not nested:
            options = [a for a in command._actions if a.option_strings]
            command.set_defaults(flags={a.dest: max(a.option_strings, key=len) for a in options})


def error_status(error: BaseException, flags: dict[str, str]) -> tuple[int, str] | None:
    """The exit status and the line to print for an error a user can act on; None for a bug.

    ``flags`` maps request fields to the command's flags, for typed errors that name fields.
    """
    if isinstance(error, KeyboardInterrupt):
        return EXIT_INTERRUPTED, f"logitcache: {INTERRUPTED}"
    if isinstance(error, client_commands.JobNotCompleted):
        return EXIT_FAILED, f"logitcache: error: {error}"
    if isinstance(error, LogitCacheError):
        return EXIT_BAD_REQUEST, f"logitcache: error: {error.worded(flags)}"
    grpc = sys.modules.get("grpc")  # only a command that loaded grpc can raise its errors
    if grpc is not None and isinstance(error, grpc.RpcError) and hasattr(error, "code"):
        return EXIT_BAD_REQUEST, f"logitcache: error: {error.code().name}: {error.details()}"
    if isinstance(error, OSError) and error.strerror:  # disk full, no permission, a dead peer
        where = f"{error.filename}: " if error.filename is not None else ""
        return EXIT_FAILED, f"logitcache: error: {where}{error.strerror}"
    return None


def command_flags(args: argparse.Namespace) -> dict[str, str]:
    """The flag that sets each request field on this command line, for :func:`error_status`."""
    flags = dict(args.flags)
    # A command whose field is set by one flag or another depending on the rest (precompute's k
    # comes from --top-k, --max-k or --samples) says which with its own ``field_flags``.
    if (field_flags := getattr(args, "field_flags", None)) is not None:
        flags.update(field_flags(args))
    return flags


def small_pages_for_numpy() -> None:
    """Stop numpy asking for transparent huge pages on its large arrays in this process, unless
    the user chose with ``NUMPY_MADVISE_HUGEPAGE``.

    Every command here makes and drops arrays of tens of MB per segment (sealing, reading,
    encoding) from several threads, next to an engine. Measured on a 2-core VM with huge pages
    on madvise: the writer thread's seal of one 65,536-position topk-v5 segment during a demo
    capture took 3.4 s of CPU with them and 0.5-0.7 s without (capture 7,200-8,000 -> 13,200-
    14,200 positions/s), and `bench stream`'s cold pass went 173-216K -> 297-359K positions/s;
    warm passes were the same."""
    if "NUMPY_MADVISE_HUGEPAGE" in os.environ:
        return  # numpy read it at import
    try:
        from numpy._core.multiarray import _set_madvise_hugepage
    except ImportError:  # a numpy without the switch
        return
    _set_madvise_hugepage(False)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.verbose:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    small_pages_for_numpy()
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except (Exception, KeyboardInterrupt) as error:
        status = error_status(error, command_flags(args))
        if status is None:
            raise
        print(status[1], file=sys.stderr)
        return status[0]
