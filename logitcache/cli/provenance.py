"""``logitcache provenance DATASET``: where a dataset's distributions came from, and the
model-card section that a student's authors paste.

It reads a local store (``--store``) or asks a running server (``--server``, DescribeDataset);
both give the same provenance: teacher and fingerprints, licence, policy decision and
obligations, requester and user, capture settings, filter results and times.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from logitcache.client.options import add_server_options, client_arguments

STORE_URL = "a directory path or file:// URL"


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``provenance``."""
    p = sub.add_parser(
        "provenance",
        help="print a dataset's provenance and write the model-card section for its student",
        description=(
            "Print where a dataset's distributions came from: the teacher (name, source, "
            "revision, weights, tokenizer and chat-template fingerprints), its licence and the "
            "licence policy's decision with the obligations it puts on the student's authors, "
            "the requester and authenticated user, the capture settings, the sensitive-data "
            "filter's results and the times. The text printed is a markdown section for the "
            "student's model card; --model-card writes it to a file, --json prints the fields. "
            "Reads a local store (--store) or a running server (--server)."
        ),
    )
    p.add_argument("dataset", metavar="DATASET", help="the dataset")
    add_server_options(p)
    p.add_argument(
        "--store",
        default=None,
        metavar="STORE_URL",
        help=f"read this local store instead of asking a server ({STORE_URL})",
    )
    p.add_argument(
        "--model-card",
        type=Path,
        default=None,
        metavar="FILE.md",
        help="also write the model-card section (markdown) to this file",
    )
    p.add_argument("--json", action="store_true", help="print the provenance as JSON")
    p.set_defaults(handler=_provenance)


def _provenance(args: argparse.Namespace) -> int:
    from logitcache.server.policy.provenance import model_card_section, read_provenance

    provenance = read_provenance(_summary(args))
    section = model_card_section(provenance)
    if args.model_card is not None:
        args.model_card.parent.mkdir(parents=True, exist_ok=True)
        args.model_card.write_text(section, encoding="utf-8")
    print(json.dumps(provenance.to_json(), indent=2, sort_keys=True) if args.json else section)
    return 0


def _summary(args: argparse.Namespace) -> dict[str, Any]:
    """The dataset as a store summary describes it, from the store or from the server."""
    if args.store is not None:
        from logitcache.server.store.store import open_store
        from logitcache.server.store.summary import dataset_entry

        ds = open_store(args.store).dataset(args.dataset)
        return dataset_entry(ds.manifest, len(ds), ds.sealed_count())
    from logitcache.client.client import Client

    with Client(args.server, **client_arguments(args)) as client:
        info = client.describe_dataset(args.dataset)
    space = info.space
    return {
        "name": info.name,
        "state": info.state,
        "space": {
            "space_id": space.space_id,
            "teacher_fingerprint": space.teacher_fingerprint,
            "tokenizer_fingerprint": space.tokenizer_fingerprint,
            "vocab_size": space.vocab_size,
            "engine_dtype": space.engine_dtype,
        },
        "sequences": info.sequences,
        "positions": info.positions,
        "created_at": info.created_at,
        "completed_at": info.completed_at or None,
        "provenance": json.loads(info.provenance_json or "{}"),
    }
