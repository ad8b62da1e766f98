"""``logitcache precompute`` and ``logitcache inspect``: build a store offline, and describe one."""

from __future__ import annotations

import argparse
import json
import os
from typing import TYPE_CHECKING

from logitcache.cli.options import (
    add_capture_options,
    add_engine_options,
    capture_field_flags,
    capture_mode,
    engine_options,
)
from logitcache.client.errors import InvalidArgument
from logitcache.client.options import (
    add_dataset_options,
    add_progress_option,
    add_temperatures_option,
    add_use_options,
    use_of,
)
from logitcache.client.space import CaptureMode

if TYPE_CHECKING:
    from logitcache.server.engine.protocol import EngineFactory

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
    p.add_argument(
        "--messages-field",
        default="",
        help="the column of chat rows ({'role', 'content'} messages), used before the others: "
        "rendered with --chat-template, each sequence gets an assistant-only loss mask "
        "(default: none, rows are texts or token ids)",
    )
    p.add_argument(
        "--chat-template",
        default=None,
        help="how chat rows are rendered: chatml or llama3 (shipped), or a Jinja file "
        "(default: the teacher tokenizer's own chat template)",
    )
    p.add_argument("--out", required=True, help=f"the store to write ({STORE_URL})")
    add_dataset_options(p, license_default="the model card's 'license:'")
    add_use_options(p)
    add_capture_options(p)
    add_temperatures_option(p)
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
    _add_distributed_options(p)
    p.set_defaults(handler=precompute_command, field_flags=capture_field_flags)

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


def _add_distributed_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "distributed precompute",
        "Split the input into work units of --unit-sequences sequences (in input order) and run "
        "one command per worker, e.g. as a Kubernetes Indexed Job: worker I does the units u "
        "with u % N == I. Every worker publishes the same dataset; a killed worker is rerun "
        "and skips what it sealed. The last worker to finish marks the dataset complete (or "
        "--finalize does); it then equals a one-worker run's dataset, key for key and in order.",
    )
    g.add_argument(
        "--workers", type=int, default=1, metavar="N", help="number of workers (default: 1)"
    )
    g.add_argument(
        "--worker",
        type=int,
        default=None,
        metavar="I",
        help="this worker's index, 0..N-1 (default: $JOB_COMPLETION_INDEX, which a Kubernetes "
        "Indexed Job sets)",
    )
    g.add_argument(
        "--unit-sequences",
        type=int,
        default=256,
        metavar="S",
        help="sequences per work unit; every worker must use the same (default: 256)",
    )
    g.add_argument(
        "--finalize",
        action="store_true",
        help="run nothing: mark --dataset in --out complete if every work unit is sealed, or "
        "fail naming the missing units and their workers",
    )
    g.add_argument(
        "--state-url",
        default=os.environ.get("LOGITCACHE_STATE_URL", ""),
        help="postgresql:// URL of the shared state that holds the workers' leases when they "
        "run on several hosts (default: $LOGITCACHE_STATE_URL; else lease files in a local "
        "store)",
    )


def _finalize(args: argparse.Namespace) -> int:
    from logitcache.server.store.store import open_store
    from logitcache.server.work_units import finalize

    progress = finalize(open_store(args.out, writable=True), args.dataset)
    print(f"dataset {args.dataset}: complete; {progress.describe()}")
    return 0


def precompute_command(
    args: argparse.Namespace, engine_factory: EngineFactory | None = None
) -> int:
    """``logitcache precompute``; tests pass another ``engine_factory`` (the reference one)."""
    if args.finalize:
        return _finalize(args)
    mode, k = capture_mode(args)  # before the server's import: a bad flag fails at once
    from logitcache.server.policy.decision import UseRequest
    from logitcache.server.precompute import PrecomputeRequest, run_precompute
    from logitcache.server.work_units import WorkShare

    req = PrecomputeRequest(
        teacher=args.teacher,
        data=args.data,
        out=args.out,
        dataset=args.dataset,
        top_k=k,
        mode=mode,
        top_p=args.top_p,
        codec=args.codec,
        temperatures=args.temperatures,
        max_len=args.max_len,
        overflow=args.overflow,
        skip_invalid=args.skip_invalid,
        text_field=args.text_field,
        ids_field=args.ids_field,
        messages_field=args.messages_field,
        chat_template=args.chat_template,
        segment_positions=args.segment_positions,
        max_in_flight=args.max_in_flight,
        license=args.license,
        engine=engine_options(args, 1 if mode is CaptureMode.SAMPLED else k),
        progress=not args.no_progress,
        use=UseRequest.of(use) if (use := use_of(args)) is not None else None,
        sensitive_data=args.sensitive_data or "",
        share=WorkShare.of(args.worker, args.workers, args.unit_sequences),
        state_url=args.state_url,
    )
    r = run_precompute(req) if engine_factory is None else run_precompute(req, engine_factory)
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
    if r.progress is not None:
        share = req.share
        state = "complete" if r.complete else "building: the other workers' units are missing"
        print(f"worker {share.worker} of {share.workers}: {r.progress.describe()}; dataset {state}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from logitcache.server.store.store import open_store
    from logitcache.server.store.summary import format_summary, store_summary

    store = open_store(args.store)
    summary = store_summary(store, args.dataset)
    _add_work_units(store, summary)
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
        for entry in summary["datasets"]:
            if "work_units" in entry:
                print(f"dataset {entry['name']}: {_units_line(entry['work_units'])}")
        if args.fidelity:
            print(format_fidelity(summary["fidelity"]))
    return 0


def _add_work_units(store, summary: dict) -> None:
    """Each dataset built by several workers gets its work units' progress (``work_units``)."""
    from logitcache.server.work_units import unit_progress

    for entry in summary["datasets"]:
        if (entry.get("provenance") or {}).get("work_units"):
            entry["work_units"] = unit_progress(store, entry["name"]).to_json()


def _units_line(units: dict) -> str:
    line = f"{units['sealed_units']:,} of {units['units']:,} work units sealed"
    if units["workers_left"]:
        left = ", ".join(str(w) for w in units["workers_left"])
        line += f"; workers {left} of {units['workers']} have units left"
    return line
