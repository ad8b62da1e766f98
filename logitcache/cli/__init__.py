"""The ``logitcache`` command. Each subcommand imports what it needs only when it runs."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

DESCRIPTION = """\
logitcache: capture a teacher's top-k next-token distributions with vLLM and keep them,
compressed, in a Zarr store for knowledge distillation.

Row t of a sequence is the teacher's distribution over the token after position t (aligned with
a student's logits[:, t]): the top-k token ids in descending probability, their log-probabilities
over the whole vocabulary at temperature 1, and the log-probability of the actual next token.
"""


def _add_engine_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine (vLLM)")
    g.add_argument(
        "--dtype",
        default="model",
        help="teacher dtype in vLLM: model (the checkpoint's own), auto (vLLM's choice: bfloat16 "
        "on CPUs), float32, bfloat16, float16 (default: model)",
    )
    g.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="context length to run the teacher with (default: the model's)",
    )
    g.add_argument(
        "--kv-cache-gib",
        type=float,
        default=1.0,
        help="CPU engine only: KV cache size in GiB (default: 1)",
    )
    g.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.85,
        help="GPU engine only: fraction of GPU memory vLLM may use (default: 0.85)",
    )
    g.add_argument(
        "--max-num-seqs",
        type=int,
        default=None,
        help="most sequences vLLM batches at once (default: vLLM's)",
    )
    g.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=None,
        help="most tokens per engine step (default: vLLM's)",
    )


def _engine_options(args: argparse.Namespace, top_k: int):
    from logitcache.server.engine.vllm_engine import VLLMOptions

    return VLLMOptions(
        max_top_k=top_k,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        kv_cache_gib=args.kv_cache_gib,
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="logitcache",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="show the engine's own log lines"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "precompute",
        help="capture a dataset's teacher distributions into a store (offline, resumable)",
        description=(
            "Run the teacher over every sequence of a JSONL or Parquet file and store the top-k "
            'distribution at every position. Rows hold {"text": ...} (tokenised with the '
            'teacher\'s tokenizer, special tokens included) or {"input_ids": [...]}; Parquet '
            "files need a 'text' or 'input_ids' column. The whole file is checked first; a bad row "
            "stops the run with file:line and nothing written (or is skipped with --skip-invalid). "
            "Interrupted runs resume: rerun the same command."
        ),
    )
    p.add_argument("--teacher", required=True, help="teacher model directory or Hugging Face id")
    p.add_argument("--data", required=True, type=Path, help="input .jsonl or .parquet file")
    p.add_argument("--out", required=True, help="store URL (a directory path or file:// URL)")
    p.add_argument("--dataset", required=True, help="dataset name (letters, digits, . _ -)")
    g = p.add_argument_group(
        "capture (what is stored per position; see the README's 'Storage' section)"
    )
    g.add_argument(
        "--top-k", type=int, default=None, help="the k most probable tokens (1..256; default 64)"
    )
    g.add_argument(
        "--top-p",
        type=float,
        default=None,
        help="adaptive k: the fewest top tokens whose probability reaches P (at least 1, at most "
        "--max-k), plus the exact remaining mass",
    )
    g.add_argument(
        "--max-k", type=int, default=None, help="with --top-p: most entries (default 64)"
    )
    g.add_argument(
        "--mode",
        choices=("topk", "sampled"),
        default="topk",
        help="topk (default) or sampled: --samples draws per position from the teacher's full "
        "distribution, stored as distinct ids with counts (unbiased; needs full-vocabulary "
        "log-probs from the engine, slower to capture)",
    )
    g.add_argument(
        "--samples",
        type=int,
        default=None,
        help="draws per position with --mode sampled (default 12)",
    )
    g.add_argument(
        "--codec",
        default=None,
        help="storage codec (default: topk-v2, or sampled-v1 for --mode sampled); "
        "topk-q64-delta-v1 is the older fixed-k codec",
    )
    p.add_argument(
        "--max-len",
        type=int,
        default=None,
        help="longest sequence in tokens (default and cap: the teacher's context - 1)",
    )
    p.add_argument(
        "--overflow",
        choices=("error", "truncate", "split"),
        default="error",
        help="longer sequences: fail (default), keep the first --max-len tokens, or split into consecutive pieces",
    )
    p.add_argument(
        "--skip-invalid",
        action="store_true",
        help="skip bad rows (counted in the provenance) instead of failing",
    )
    p.add_argument(
        "--license",
        default=None,
        help="teacher licence to record (default: the model card's 'license:')",
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
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_engine_options(p)
    p.set_defaults(handler=_precompute)

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
    from logitcache.server.config import FIELD_HELP, TEACHER_FLAG_HELP

    for name, text in FIELD_HELP.items():
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, default=None, help=text)
    g = p.add_argument_group("teachers given with --teacher")
    for name, text in TEACHER_FLAG_HELP.items():
        g.add_argument(
            f"--{name.replace('_', '-')}", dest=f"teacher_{name}", default=None, help=text
        )
    p.set_defaults(handler=_serve)

    p = sub.add_parser(
        "inspect", help="describe a store: capture spaces, datasets, sizes, provenance"
    )
    p.add_argument("store", metavar="STORE_URL")
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

    p = sub.add_parser(
        "demo-teacher",
        help="build the small demo teacher (Llama architecture, local tokenizer) with no network",
        description="Generate a synthetic language, train a tokenizer and a small Llama model on it; deterministic for a seed.",
    )
    p.add_argument("out_dir", metavar="OUT_DIR", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=_demo_teacher)

    p = sub.add_parser(
        "demo-data", help='write documents of the demo language as JSONL ({"text": ...} per line)'
    )
    p.add_argument("out_file", metavar="OUT_FILE", type=Path)
    p.add_argument("--documents", type=int, default=200)
    p.add_argument(
        "--seed",
        type=int,
        default=1,
        help="use a seed other than the teacher's to get held-out text",
    )
    p.set_defaults(handler=_demo_data)

    p = sub.add_parser(
        "demo-service",
        help="the service end to end: serve, submit a job, watch it, read through, stream it back, verify",
    )
    p.add_argument("--teacher", required=True, help="teacher directory (the demo teacher)")
    p.add_argument("--data", required=True, help='JSONL of {"text": ...} rows to submit as a job')
    p.add_argument("--store", required=True, help="store directory the server uses")
    p.add_argument("--dataset", default="demo-served")
    p.add_argument("--top-k", type=int, default=64)
    p.set_defaults(handler=_demo_service)

    bench = sub.add_parser("bench", help="benchmarks that print figures").add_subparsers(
        dest="bench", required=True, metavar="BENCH"
    )
    p = bench.add_parser(
        "capture",
        help="positions/s of vLLM alone vs precompute end to end; bytes/position of the store",
        description="Same engine, same inputs, one run: (a) vLLM with the capture's logprob settings, (b) precompute end to end (capture, encode, write, seal).",
    )
    p.add_argument(
        "--teacher",
        default=None,
        help="teacher directory or id (default: the demo teacher, built if needed)",
    )
    p.add_argument("--sequences", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="alternating rounds of (a) and (b); the best of each is reported",
    )
    _add_engine_options(p)
    p.set_defaults(handler=_bench_capture)

    p = bench.add_parser(
        "distill",
        help="held-out KL and perplexity of a student trained by CE, online KD, and KD from the cache",
        description="With the demo teacher and its language, train one small student from one initialisation for the same steps on the same batches three ways: (a) cross-entropy on the text, (b) online distillation from the teacher's full logits computed on the fly, (c) distillation from the top-k cache streamed from a running logitcache server, and also (d) from an adaptive top-p cache and (e) from a sampled cache (both precomputed offline and streamed from the store). Prints held-out KL(teacher || student) and perplexity of each, and (c)'s stream throughput next to its step rate.",
    )
    p.add_argument(
        "--teacher",
        default=None,
        help="teacher directory or id (default: the demo teacher, built if needed)",
    )
    p.add_argument(
        "--steps", type=int, default=300, help="optimizer steps of each run (default: 300)"
    )
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step (default: 16)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default: 128)")
    p.add_argument(
        "--lr", type=float, default=3e-3, help="AdamW peak learning rate (default: 3e-3)"
    )
    p.add_argument(
        "--top-k", type=int, default=64, help="entries per position in the cache (default: 64)"
    )
    p.add_argument(
        "--top-p",
        type=float,
        default=0.95,
        help="(d) adaptive cache: the fewest of the top --top-k reaching P (default: 0.95)",
    )
    p.add_argument(
        "--samples",
        type=int,
        default=12,
        help="(e) sampled cache: draws per position (default: 12)",
    )
    p.add_argument(
        "--modes",
        default="de",
        help="which of the extra cache modes to run: d (adaptive top-p), e (sampled); "
        "'' for none (default: de)",
    )
    p.add_argument(
        "--loss",
        choices=("forward_kl", "reverse_kl", "jsd"),
        default="forward_kl",
        help="divergence for (b) (dense) and (c) (top-k + tail bucket) (default: forward_kl)",
    )
    p.add_argument(
        "--alpha",
        type=float,
        default=0.0,
        help="share of cross-entropy mixed into (b) and (c) (default: 0)",
    )
    p.add_argument(
        "--train-sequences",
        type=int,
        default=None,
        help="distinct training sequences, cycled in order (default: steps x batch size, one epoch)",
    )
    p.add_argument(
        "--eval-sequences", type=int, default=128, help="held-out sequences (default: 128)"
    )
    p.add_argument(
        "--train-seed", type=int, default=1, help="seed of the training documents (default: 1)"
    )
    p.add_argument(
        "--eval-seed", type=int, default=2, help="seed of the held-out documents (default: 2)"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="student initialisation and stream seed (default: 0)"
    )
    p.add_argument(
        "--student-hidden", type=int, default=64, help="student hidden size (default: 64)"
    )
    p.add_argument("--student-layers", type=int, default=2, help="student layers (default: 2)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of the trainer in all three runs (default: 1, leaving the other "
        "core to the server and the stream)",
    )
    p.set_defaults(handler=_bench_distill)

    p = bench.add_parser(
        "stream",
        help="positions/s streamed from a warm store to one client over loopback, decoded to numpy",
        description="Starts a store-only server on loopback and streams a dataset into numpy records; prints positions/s and the client's and server's CPU use.",
    )
    p.add_argument(
        "--store", default=None, help="stream this store's --dataset instead of a synthetic one"
    )
    p.add_argument("--dataset", default="bench")
    p.add_argument(
        "--positions", type=int, default=2_000_000, help="synthetic store size (default: 2,000,000)"
    )
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--batch-records", type=int, default=64)
    p.add_argument("--passes", type=int, default=3)
    p.set_defaults(handler=_bench_stream)

    p = bench.add_parser(
        "lookup",
        help="p50/p99 latency of a read-through cache hit: one 512-token sequence, and a batch of 64",
    )
    p.add_argument("--teacher", default=None, help="teacher directory (default: the demo teacher)")
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--repeats", type=int, default=300)
    p.set_defaults(handler=_bench_lookup)
    p = bench.add_parser(
        "storage",
        help="bytes/position, encode/decode speed and fidelity of every encoding on the same positions",
        description=(
            "Runs the teacher once with full-vocabulary log-probs and encodes the same positions "
            "as: naive int32+fp32, a DistillKit-style reference (16 exact bf16 values, a "
            "polynomial fit of the rest, bit-packed ids), the old and the default logitcache "
            "codecs, adaptive top-p, and sampled mode; then again on a large synthetic "
            "vocabulary (the same distributions with ids mapped into it). Prints bytes/position, "
            "encode/decode positions/s on one core, fidelity against the exact top-k, and the "
            "targets."
        ),
    )
    p.add_argument("--teacher", default=None, help="teacher directory (default: the demo teacher)")
    p.add_argument("--sequences", type=int, default=128, help="sequences (default: 128)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default: 256)")
    p.add_argument("--top-k", type=int, default=64, help="k of the top-k encodings (default: 64)")
    p.add_argument(
        "--top-p",
        type=float,
        nargs="+",
        default=[0.95, 0.99],
        help="adaptive mode's P, one row each (default: 0.95 0.99)",
    )
    p.add_argument("--samples", type=int, default=12, help="sampled mode's U (default: 12)")
    p.add_argument(
        "--synthetic-vocab",
        type=int,
        default=151_936,
        help="size of the large synthetic vocabulary (default: 151,936)",
    )
    p.add_argument("--repeats", type=int, default=3, help="timing repeats, best kept (default: 3)")
    p.add_argument("--seed", type=int, default=1)
    p.set_defaults(handler=_bench_storage)

    from logitcache.client.commands import add_client_commands

    add_client_commands(sub)  # submit, jobs, fetch: clients of a running server
    return parser


def _precompute(args: argparse.Namespace) -> int:
    from logitcache.server.precompute import PrecomputeRequest, run_precompute

    mode, k = _capture_mode(args)
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
        segment_positions=args.segment_positions,
        max_in_flight=args.max_in_flight,
        license=args.license,
        engine=_engine_options(args, k if mode != "sampled" else 1),
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


def _capture_mode(args: argparse.Namespace) -> tuple[str, int]:
    """(mode, k) from the capture flags, refusing combinations that mean nothing."""
    from logitcache.client.errors import InvalidArgument

    if args.mode == "sampled":
        if args.top_k is not None or args.top_p is not None or args.max_k is not None:
            raise InvalidArgument("--mode sampled takes --samples, not --top-k/--top-p/--max-k")
        return "sampled", 12 if args.samples is None else args.samples
    if args.samples is not None:
        raise InvalidArgument("--samples needs --mode sampled")
    if args.top_p is not None:
        if args.top_k is not None:
            raise InvalidArgument("with --top-p, give the most entries as --max-k, not --top-k")
        return "top_p", 64 if args.max_k is None else args.max_k
    if args.max_k is not None:
        raise InvalidArgument("--max-k needs --top-p")
    return "topk", 64 if args.top_k is None else args.top_k


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


def _inspect(args: argparse.Namespace) -> int:
    from logitcache.server.store.store import open_store
    from logitcache.server.store.summary import format_summary, store_summary

    store = open_store(args.store)
    summary = store_summary(store, args.dataset)
    if args.fidelity:
        from logitcache.client.errors import InvalidArgument
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


def _demo_teacher(args: argparse.Namespace) -> int:
    from logitcache.demo.teacher import build_demo_teacher

    path = build_demo_teacher(args.out_dir, seed=args.seed)
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
    from logitcache.demo.walkthrough import run_service_demo

    run_service_demo(args)
    return 0


def _bench_capture(args: argparse.Namespace) -> int:
    from logitcache.bench.capture import run_capture_benchmark

    run_capture_benchmark(args, _engine_options(args, args.top_k))
    return 0


def _bench_storage(args: argparse.Namespace) -> int:
    from logitcache.bench.storage import run_storage_benchmark

    run_storage_benchmark(args)
    return 0


def _bench_distill(args: argparse.Namespace) -> int:
    from logitcache.bench.distill import run_distill_benchmark

    run_distill_benchmark(args)
    return 0


def _bench_stream(args: argparse.Namespace) -> int:
    from logitcache.bench.service import run_stream_benchmark

    run_stream_benchmark(args)
    return 0


def _bench_lookup(args: argparse.Namespace) -> int:
    from logitcache.bench.service import run_lookup_benchmark
    from logitcache.demo.assets import demo_teacher_path

    run_lookup_benchmark(args, args.teacher or str(demo_teacher_path()))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.verbose:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from logitcache.client.errors import LogitCacheError

    try:
        return args.handler(args)
    except LogitCacheError as e:
        print(f"logitcache: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "logitcache: interrupted; sealed work is kept, rerun the same command to resume",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
