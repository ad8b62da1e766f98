"""``logitcache bench ...``: one subcommand per benchmark module of ``logitcache.bench``."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable

from logitcache.cli.options import add_engine_options, engine_options


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``bench`` and its benchmarks: capture, distill, stream, lookup, soak, storage."""
    bench = sub.add_parser("bench", help="benchmarks that print figures").add_subparsers(
        dest="bench", required=True, metavar="BENCH"
    )
    p = bench.add_parser(
        "capture",
        help="positions/s of vLLM alone vs precompute end to end; bytes/position of the store",
        description="Same engine, same inputs, one run: (a) vLLM with the capture's logprob settings, (b) precompute end to end (capture, encode, write, seal).",
    )
    _add_teacher_option(p)
    p.add_argument("--sequences", type=int, default=256, help="sequences (default: 256)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default: 256)")
    p.add_argument("--top-k", type=int, default=64, help="entries per position (default: 64)")
    p.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="alternating rounds of (a) and (b); the best of each is reported",
    )
    g = p.add_argument_group(
        "input readers (instead of (a) and (b))",
        "Read an input with the streamed reader and with the old whole-file reader (the "
        "baseline, reimplemented in the benchmark), each in a fresh process: seconds and peak "
        "RSS; then capture the first --capture-positions positions fed by each.",
    )
    g.add_argument("--data", default=None, help="an input as precompute's --data takes it")
    g.add_argument(
        "--data-tokens",
        type=int,
        default=None,
        help="instead of --data: about this many tokens of the demo language in 100 JSONL "
        "shards, written to a temporary directory (the issue's figure: 10000000)",
    )
    g.add_argument(
        "--capture-positions",
        type=int,
        default=1 << 18,
        help="positions captured from the input's leading shards (default: 262144)",
    )
    add_engine_options(p)
    p.set_defaults(handler=_capture)

    p = bench.add_parser(
        "distill",
        help="held-out KL and perplexity of a student trained by CE, online KD, and KD from the cache",
        description="With the demo teacher and its language, train one small student from one initialisation for the same steps on the same batches three ways: (a) cross-entropy on the text, (b) online distillation from the teacher's full logits computed on the fly, (c) distillation from the top-k cache streamed from a running logitcache server, and also (d) from an adaptive top-p cache and (e) from a sampled cache (both precomputed offline and streamed from the store). Prints held-out KL(teacher || student) and perplexity of each, and (c)'s stream throughput next to its step rate.",
    )
    _add_teacher_option(p)
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
        help="which of the extra runs to do: d (adaptive top-p cache), e (sampled cache), "
        "l (the top-k loss on full logits, next to (c)'s fused one), t (two runs at "
        "--temperature: (t) from a cache that stores the tails at it, exact; (u) from (c)'s "
        "cache without them, the top-k renormalised); '' for none (default: de)",
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=2.0,
        help="temperature of the t runs; every run is also scored by held-out KL at it "
        "(default: 2)",
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
        "--data",
        default=None,
        help='JSONL texts (one {"text": ...} per line) to train and score on instead of the demo '
        "language, tokenised with the teacher's tokenizer and cut into --seq-len blocks: the last "
        "--eval-sequences blocks are held out (e.g. the real-text teacher's held_out.jsonl)",
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
        "--student-vocab",
        type=int,
        default=None,
        help="student output layer size, padded beyond the teacher's vocabulary, e.g. 65536 "
        "for a large-vocabulary student where the fused losses matter (default: the teacher's)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of the trainer in all three runs (default: 1, leaving the other "
        "core to the server and the stream)",
    )
    p.set_defaults(handler=_run("distill"))

    p = bench.add_parser(
        "stream",
        help="positions/s streamed from a warm store to one client over loopback, decoded to numpy",
        description="Starts a store-only server on loopback and streams a dataset into numpy records; prints positions/s and the client's and server's CPU use.",
    )
    p.add_argument(
        "--store",
        default=None,
        help="stream this store's --dataset (a directory or an s3:// URL) instead of a synthetic one",
    )
    p.add_argument(
        "--dataset", default="bench", help="dataset to stream with --store (default: bench)"
    )
    p.add_argument(
        "--positions", type=int, default=2_000_000, help="synthetic store size (default: 2,000,000)"
    )
    p.add_argument(
        "--seq-len", type=int, default=512, help="synthetic tokens per sequence (default: 512)"
    )
    p.add_argument(
        "--top-k", type=int, default=64, help="synthetic entries per position (default: 64)"
    )
    p.add_argument(
        "--batch-records", type=int, default=64, help="records per streamed batch (default: 64)"
    )
    p.add_argument("--passes", type=int, default=3, help="timed passes (default: 3)")
    p.set_defaults(handler=_run("stream"))

    p = bench.add_parser(
        "lookup",
        help="p50/p99 latency of a read-through cache hit: one 512-token sequence, and a batch of 64",
    )
    _add_teacher_option(p)
    p.add_argument("--top-k", type=int, default=64, help="entries per position (default: 64)")
    p.add_argument(
        "--repeats", type=int, default=300, help="single-sequence requests timed (default: 300)"
    )
    p.set_defaults(handler=_run("lookup"))

    p = bench.add_parser(
        "soak",
        help="N streams, read-through clients and a lister against one server for a bounded time",
        description="Builds a store (a streamable synthetic dataset and a dataset of --listing-keys records), starts a server, then (1) streams alone and beside a client calling ListDatasets in a loop, and (2) runs --streams streams, --readthrough GetDistributions clients and one lister for --duration seconds. Prints stream positions/s, p50/p99 latencies and the server's RSS over time.",
    )
    _add_teacher_option(p)
    p.add_argument("--duration", type=float, default=30.0, help="soak seconds (default: 30)")
    p.add_argument(
        "--interval", type=float, default=5.0, help="seconds per printed row (default: 5)"
    )
    p.add_argument(
        "--compare-seconds",
        type=float,
        default=10.0,
        help="seconds of streaming alone, then beside the lister (default: 10)",
    )
    p.add_argument("--streams", type=int, default=4, help="concurrent streams (default: 4)")
    p.add_argument(
        "--readthrough",
        type=int,
        default=2,
        help="GetDistributions clients; 0 runs a store-only server (default: 2)",
    )
    p.add_argument(
        "--rt-batch", type=int, default=8, help="sequences per GetDistributions (default: 8)"
    )
    p.add_argument(
        "--rt-seq-len",
        type=int,
        default=128,
        help="tokens per read-through sequence (default: 128)",
    )
    p.add_argument(
        "--listing-keys",
        type=int,
        default=2_000_000,
        help="records of the dataset that makes the store big (default: 2,000,000)",
    )
    p.add_argument(
        "--positions", type=int, default=500_000, help="streamable positions (default: 500,000)"
    )
    p.add_argument(
        "--seq-len", type=int, default=512, help="tokens per streamed sequence (default: 512)"
    )
    p.add_argument(
        "--top-k",
        type=int,
        default=16,
        help="entries per position, stream and teacher (default: 16)",
    )
    p.add_argument(
        "--batch-records", type=int, default=16, help="records per streamed batch (default: 16)"
    )
    p.set_defaults(handler=_run("soak"))

    p = bench.add_parser(
        "storage",
        help="bytes/position, encode/decode speed and fidelity of every encoding on the same positions",
        description=(
            "On the demo teacher (demo language) and the real-text teacher (held-out texts), or "
            "on --teacher with --data: runs the teacher once with full-vocabulary log-probs and "
            "encodes the same positions as: naive int32+fp32, a DistillKit-style reference (16 "
            "exact bf16 values, a polynomial fit of the rest, bit-packed ids), every logitcache "
            "top-k codec, adaptive top-p, and sampled mode; then again on a large synthetic "
            "vocabulary (the same distributions with ids mapped into it). Prints the teacher's "
            "statistics (vocabulary, mean entropy, top-k mass), bytes/position on disk, "
            "encode/decode positions/s on one core, fidelity against the exact top-k, and the "
            "targets."
        ),
    )
    p.add_argument(
        "--teacher",
        default=None,
        help="teacher directory or id (default: the demo teacher on the demo language, then the "
        "real-text teacher on its held-out texts, both built if needed)",
    )
    p.add_argument(
        "--data",
        default=None,
        help='JSONL texts to measure on (one {"text": ...} per line, as precompute reads '
        "them; default: the demo language with --teacher, else the real-text teacher's "
        "held-out texts)",
    )
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
    p.add_argument(
        "--seed", type=int, default=1, help="which sequences and id mapping (default: 1)"
    )
    p.set_defaults(handler=_run("storage"))


def _add_teacher_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--teacher",
        default=None,
        help="teacher directory or id (default: the demo teacher, built if needed)",
    )


def _capture(args: argparse.Namespace) -> int:
    from logitcache.bench.capture import run_capture_benchmark

    run_capture_benchmark(args, engine_options(args, args.top_k))
    return 0


def _run(benchmark: str) -> Callable[[argparse.Namespace], int]:
    """The handler of ``bench BENCHMARK``: imports its module only when it runs."""

    def handler(args: argparse.Namespace) -> int:
        module = importlib.import_module(f"logitcache.bench.{benchmark}")
        getattr(module, f"run_{benchmark}_benchmark")(args)
        return 0

    return handler
