"""``logitcache precompute`` and ``logitcache inspect``: build a store offline, and describe one."""

from __future__ import annotations

import argparse
import json

from logitcache.cli.options import (
    add_capture_options,
    add_engine_options,
    capture_field_flags,
    capture_mode,
    engine_options,
)
from logitcache.client.errors import InvalidArgument
from logitcache.client.options import add_dataset_options, add_progress_option
from logitcache.client.space import CaptureMode

STORE_URL = "a directory path or file:// URL"


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``precompute`` and ``inspect``."""
    p = sub.add_parser(
        "precompute",
        help="capture a dataset's teacher distributions into a store (offline, resumable)",
        description=(
            "Run the teacher over every sequence of a JSONL or Parquet file and store the top-k "
            'distribution at every position. Rows hold {"text": ...} (tokenised with the '
            'teacher\'s tokenizer, special tokens included) or {"input_ids": [...]}; Parquet '
            "files need a 'text' or 'input_ids' column (--text-field, --ids-field choose others). "
            "Every shard is checked first; a bad row stops the run with file:line (or "
            "shard:row N) and nothing written (or is skipped with --skip-invalid). "
            "Interrupted runs resume: rerun the same command."
        ),
    )
    p.add_argument("--teacher", required=True, help="teacher model directory or Hugging Face id")
    p.add_argument(
        "--data",
        required=True,
        type=_input_source,
        help="input: a .jsonl or .parquet file, a directory of such shards, or a glob (quote it); "
        "shards are read in name order, as a stream. A Hugging Face dataset: a directory saved "
        "with save_to_disk, or hf://NAME[/CONFIG]?split=SPLIT[&revision=R] for a hub dataset "
        "(streamed; pin the revision to resume), hf://json?data_files=GLOB or "
        "hf://parquet?data_files=GLOB for files read through the datasets library",
    )
    p.add_argument(
        "--text-field", default="text", help="the column of texts to tokenise (default: text)"
    )
    p.add_argument(
        "--ids-field",
        default="input_ids",
        help="the column of token ids, used before --text-field (default: input_ids)",
    )
    p.add_argument("--out", required=True, help=f"the store to write ({STORE_URL})")
    add_dataset_options(p, license_default="the model card's 'license:'")
    add_capture_options(p)
    p.add_argument(
        "--skip-invalid",
        action="store_true",
        help="skip bad rows (counted in the provenance) instead of failing",
    )
    p.add_argument(
        "--segment-positions",
        type=int,
        default=1 << 16,
        help="positions per sealed segment (default: 65536)",
    )
    p.add_argument(
        "--max-in-flight",
        type=int,
        default=256,
        help="sequences queued in the engine at once (default: 256)",
    )
    add_progress_option(p)
    add_engine_options(p)
    p.set_defaults(handler=_precompute, field_flags=capture_field_flags)

    p = sub.add_parser(
        "inspect", help="describe a store: capture spaces, datasets, sizes, provenance"
    )
    p.add_argument("store", metavar="STORE_URL", help=f"the store ({STORE_URL})")
    p.add_argument("--dataset", default=None, help="describe only this dataset")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    g = p.add_argument_group("fidelity (re-runs the teacher on a sample of --dataset)")
    g.add_argument(
        "--fidelity",
        action="store_true",
        help="compare stored rows with the engine's exact values: log-prob errors, tail-mass "
        "error, KL(exact top-k with tail || stored); for sampled datasets, draw checks",
    )
    g.add_argument(
        "--teacher",
        default=None,
        help="teacher to re-run (default: the one in the dataset's provenance; must match the "
        "space's fingerprint)",
    )
    g.add_argument("--sample", type=int, default=16, help="sequences to re-run (default: 16)")
    g.add_argument("--seed", type=int, default=0, help="which sequences (default: 0)")
    p.set_defaults(handler=_inspect)


def _input_source(text: str) -> object:
    """``--data`` as the server's input reader names it (imported only when the flag is used)."""
    from logitcache.server.inputs import input_source

    return input_source(text)


def _precompute(args: argparse.Namespace) -> int:
    mode, k = capture_mode(args)  # before the server's import: a bad flag fails at once
    from logitcache.server.precompute import PrecomputeRequest, run_precompute

    req = PrecomputeRequest(
        teacher=args.teacher,
        data=args.data,
        out=args.out,
        dataset=args.dataset,
        top_k=k,
        mode=mode,
        top_p=args.top_p,
        codec=args.codec,
        max_len=args.max_len,
        overflow=args.overflow,
        skip_invalid=args.skip_invalid,
        text_field=args.text_field,
        ids_field=args.ids_field,
        segment_positions=args.segment_positions,
        max_in_flight=args.max_in_flight,
        license=args.license,
        engine=engine_options(args, 1 if mode is CaptureMode.SAMPLED else k),
        progress=not args.no_progress,
    )
    r = run_precompute(req)
    skipped = sum(r.report.skipped.values())
    print(
        f"dataset {r.dataset}: {r.sequences:,} sequences, {r.positions:,} positions; computed "
        f"{r.computed_sequences:,} sequences ({r.computed_positions:,} positions) in {r.seconds:.1f} s "
        f"({r.positions_per_s:,.0f} positions/s), reused {r.reused_sequences:,}, "
        f"{r.segments_written} segments sealed"
        + (f"; skipped {skipped} rows {dict(r.report.skipped)}" if skipped else "")
        + (f"; truncated {r.report.truncated}" if r.report.truncated else "")
        + (f"; split {r.report.split}" if r.report.split else "")
    )
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from logitcache.server.store.store import open_store
    from logitcache.server.store.summary import format_summary, store_summary

    store = open_store(args.store)
    summary = store_summary(store, args.dataset)
    if args.fidelity:
        from logitcache.server.fidelity_check import check_fidelity, format_fidelity

        names = [args.dataset] if args.dataset else store.datasets()
        if len(names) != 1:
            raise InvalidArgument("--fidelity needs --dataset (the store has several datasets)")
        summary["fidelity"] = check_fidelity(store, names[0], args.teacher, args.sample, args.seed)
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print(format_summary(summary))
        if args.fidelity:
            print(format_fidelity(summary["fidelity"]))
    return 0
