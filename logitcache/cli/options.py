"""Option groups of the commands that run a teacher, and the objects they turn into.

The groups the client commands share (server connection, the dataset to build, progress) are in
:mod:`logitcache.client.options`, since the client never imports this package. Heavy modules are
imported only when a command turns its options into objects, so building the parser stays fast.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from logitcache.client.errors import InvalidArgument
from logitcache.client.space import DEFAULT_DRAWS, CaptureMode

if TYPE_CHECKING:
    from logitcache.server.engine.protocol import EngineOptions

DEFAULT_TOP_K = 64


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    """vLLM's own settings for a teacher that this command starts: any field of vLLM's
    AsyncEngineArgs with --engine-arg, and dedicated flags for the common ones."""
    group = parser.add_argument_group(
        "engine (vLLM)",
        "Any vLLM engine option, by the name of its AsyncEngineArgs field (vllm serve --help), "
        "with --engine-arg; the flags below are shorthands for some of them. Refused, with the "
        "reason: speculative decoding and a logprobs_mode other than raw_logprobs (they change "
        "the captured distributions), and the options logitcache sets itself (model, tokenizer, "
        "max_logprobs, skip_tokenizer_init, scheduling_policy, hf_token).",
    )
    group.add_argument(
        "--engine-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a vLLM engine option, repeatable: tensor_parallel_size=2, quantization=fp8, "
        "kv_cache_dtype=fp8, trust_remote_code=true, enforce_eager=true, ... VALUE is read as "
        "JSON where it parses (numbers, true/false, {...}), else as a string",
    )
    group.add_argument(
        "--revision",
        default=None,
        help="hub teachers: the branch, tag or commit to fetch (recorded in provenance as the "
        "resolved commit; default: main)",
    )
    group.add_argument(
        "--dtype",
        default="model",
        help="teacher dtype in vLLM: model (the checkpoint's own), auto (vLLM's choice: bfloat16 "
        "on CPUs), float32, bfloat16, float16 (default: model)",
    )
    group.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="context length to run the teacher with (default: the model's)",
    )
    group.add_argument(
        "--kv-cache-gib",
        type=float,
        default=None,
        help="KV cache size in GiB, any fraction (vLLM's kv_cache_memory_bytes; default on CPUs: "
        "VLLM_CPU_KVCACHE_SPACE if set, else 1; on GPUs: what --gpu-memory-utilization leaves)",
    )
    group.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.85,
        help="GPU engine only: fraction of GPU memory vLLM may use (default: 0.85)",
    )
    group.add_argument(
        "--max-num-seqs",
        type=int,
        default=None,
        help="most sequences vLLM batches at once (default: vLLM's)",
    )
    group.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=None,
        help="most tokens per engine step (default: vLLM's)",
    )


def engine_options(args: argparse.Namespace, max_top_k: int) -> EngineOptions:
    """The engine group's values, for an engine that answers up to ``max_top_k`` entries;
    refused settings are refused here, before anything loads."""
    from logitcache.server.engine.protocol import EngineOptions, check_options, parse_engine_args

    engine_args = parse_engine_args(args.engine_arg)
    if args.revision is not None:
        if engine_args.get("revision", args.revision) != args.revision:
            raise InvalidArgument("the revision is given twice: --revision and --engine-arg")
        engine_args["revision"] = args.revision
    options = EngineOptions(
        max_top_k=max_top_k,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        kv_cache_gib=args.kv_cache_gib,
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        engine_args=engine_args,
    )
    check_options(options)
    return options


def add_capture_options(parser: argparse.ArgumentParser) -> None:
    """What is stored per position: top-k, an adaptive top-p prefix, or sampled ids."""
    group = parser.add_argument_group(
        "capture (what is stored per position; see the README's 'Storage' section)"
    )
    group.add_argument(
        "--top-k",
        type=int,
        default=None,
        help=f"the k most probable tokens (1..256; default {DEFAULT_TOP_K})",
    )
    group.add_argument(
        "--top-p",
        type=float,
        default=None,
        help="adaptive k: the fewest top tokens whose probability reaches P (at least 1, at most "
        "--max-k), plus the exact remaining mass",
    )
    group.add_argument(
        "--max-k",
        type=int,
        default=None,
        help=f"with --top-p: most entries (default {DEFAULT_TOP_K})",
    )
    group.add_argument(
        "--mode",
        choices=("topk", "sampled"),
        default="topk",
        help="topk (default) or sampled: --samples draws per position from the teacher's full "
        "distribution, stored as distinct ids with counts (unbiased; needs full-vocabulary "
        "log-probs from the engine, slower to capture)",
    )
    group.add_argument(
        "--samples",
        type=int,
        default=None,
        help=f"draws per position with --mode sampled (default {DEFAULT_DRAWS})",
    )
    group.add_argument(
        "--codec",
        default=None,
        help="storage codec (default: topk-v5, or sampled-v1 for --mode sampled); "
        "topk-v2 is the previous default, topk-q64-delta-v1 the older fixed-k codec",
    )


def capture_mode(args: argparse.Namespace) -> tuple[CaptureMode, int]:
    """(mode, k) from the capture group, refusing combinations that mean nothing.

    k is the number of entries for top-k, the most entries for top-p, the draws for sampled.
    """
    if args.mode == CaptureMode.SAMPLED:
        if args.top_k is not None or args.top_p is not None or args.max_k is not None:
            raise InvalidArgument("--mode sampled takes --samples, not --top-k/--top-p/--max-k")
        return CaptureMode.SAMPLED, DEFAULT_DRAWS if args.samples is None else args.samples
    if args.samples is not None:
        raise InvalidArgument("--samples needs --mode sampled")
    if args.top_p is not None:
        if args.top_k is not None:
            raise InvalidArgument("with --top-p, give the most entries as --max-k, not --top-k")
        return CaptureMode.TOP_P, DEFAULT_TOP_K if args.max_k is None else args.max_k
    if args.max_k is not None:
        raise InvalidArgument("--max-k needs --top-p")
    return CaptureMode.TOPK, DEFAULT_TOP_K if args.top_k is None else args.top_k


def capture_field_flags(args: argparse.Namespace) -> dict[str, str]:
    """The flag that set k (``k``, ``top_k`` in the core's errors) on this command line."""
    if args.mode == CaptureMode.SAMPLED:
        flag = "--samples"
    else:
        flag = "--max-k" if args.top_p is not None else "--top-k"
    return {"k": flag, "top_k": flag}
