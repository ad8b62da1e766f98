"""``logitcache demo-teacher``, ``demo-data`` and ``demo-service``: the offline demo kit."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add the three demo commands."""
    p = sub.add_parser(
        "demo-teacher",
        help="build the small demo teacher (Llama architecture, local tokenizer) with no network",
        description="Generate a synthetic language, train a tokenizer and a small Llama model on it; deterministic for a seed.",
    )
    p.add_argument("out_dir", metavar="OUT_DIR", type=Path, help="model directory to write")
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the language and the weights (default: 0)"
    )
    p.add_argument(
        "--large-vocab",
        action="store_true",
        help="build the large-vocabulary teacher instead (131,072 rows, a class grammar over a generated lexicon)",
    )
    p.set_defaults(handler=_demo_teacher)

    p = sub.add_parser(
        "demo-data", help='write documents of the demo language as JSONL ({"text": ...} per line)'
    )
    p.add_argument("out_file", metavar="OUT_FILE", type=Path, help="JSONL file to write")
    p.add_argument("--documents", type=int, default=200, help="documents to write (default: 200)")
    p.add_argument(
        "--seed",
        type=int,
        default=1,
        help="use a seed other than the teacher's to get held-out text (default: 1)",
    )
    p.set_defaults(handler=_demo_data)

    p = sub.add_parser(
        "demo-service",
        help="the service end to end: serve, submit a job, watch it, read through, stream it back, verify",
    )
    p.add_argument("--teacher", required=True, help="teacher directory (the demo teacher)")
    p.add_argument("--data", required=True, help='JSONL of {"text": ...} rows to submit as a job')
    p.add_argument("--store", required=True, help="store directory the server uses")
    p.add_argument(
        "--dataset", default="demo-served", help="dataset the job builds (default: demo-served)"
    )
    p.add_argument("--top-k", type=int, default=64, help="entries per position (default: 64)")
    p.set_defaults(handler=_demo_service)


def _demo_teacher(args: argparse.Namespace) -> int:
    from logitcache.demo.large_vocab import build_large_vocab_teacher
    from logitcache.demo.model_card import DEMO_LANGUAGE_DATA, ensure_model_card
    from logitcache.demo.teacher import build_demo_teacher

    build = build_large_vocab_teacher if args.large_vocab else build_demo_teacher
    path = build(args.out_dir, seed=args.seed)
    ensure_model_card(path, "logitcache demo teacher", DEMO_LANGUAGE_DATA)  # its licence
    print(f"demo teacher written to {path}")
    return 0


def _demo_data(args: argparse.Namespace) -> int:
    from logitcache.demo.language import generate_documents

    docs = generate_documents(args.documents, seed=args.seed)
    args.out_file.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out_file, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}) + "\n")
    print(f"wrote {len(docs)} documents to {args.out_file}")
    return 0


def _demo_service(args: argparse.Namespace) -> int:
    from logitcache.demo.walkthrough import run_walkthrough

    run_walkthrough(args)
    return 0
