"""What the server needs from a teacher engine, and how it is given one.

Front ends and the core (registry, read-through, jobs, precompute) depend only on
:class:`TeacherEngine`; which engine runs is decided by the :data:`EngineFactory` that ``serve``,
the teacher registry and ``precompute`` are handed. Production uses vLLM's factory (the
default); in-process tests pass the transformers reference engine's. Like vLLM's own
``EngineClient`` protocol, this keeps every caller testable without starting vLLM.

An engine turns a token sequence of length T into T rows (see ARCHITECTURE: row t is the
distribution over the token after position t), in descending probability, as log-softmax over
the whole vocabulary at temperature 1.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

import numpy as np

from logitcache.client.codecs import TopKRows
from logitcache.client.errors import InvalidArgument
from logitcache.server.engine.capture import FULL_VOCAB, MAX_TOP_K
from logitcache.server.engine.columns import CapturedColumns, CaptureRequest
from logitcache.server.teachers.identity import TeacherInfo


class TeacherEngine(Protocol):
    """A running teacher: it captures rows, and it is shut down once."""

    info: TeacherInfo
    dtype: str  # the dtype the teacher runs in ("float32", "bfloat16"): part of capture spaces
    max_top_k: int  # the widest top-k request accepted
    max_sequence_len: int  # the longest sequence accepted

    async def capture(self, input_ids: np.ndarray, k: int, priority: int = 0) -> TopKRows:
        """T rows of the ``k`` most probable tokens (``k = FULL_VOCAB``: every token, for
        engines started with ``full_vocab``); lower ``priority`` runs first where the engine
        schedules by it."""
        ...

    async def capture_columns(
        self, input_ids: np.ndarray, request: CaptureRequest, priority: int = 0
    ) -> CapturedColumns:
        """The engine-side capture of one record (``device_capture``): top-k, draws at T = 1
        seeded by the record, log-normalisers at temperatures, computed next to the logits."""
        ...

    def shutdown(self) -> None: ...


# Our options that are sugar for one of vLLM's AsyncEngineArgs fields, by that field's name.
SUGAR_ENGINE_ARGS = {
    "dtype": "dtype",
    "max_model_len": "max_model_len",
    "gpu_memory_utilization": "gpu_memory_utilization",
    "max_num_seqs": "max_num_seqs",
    "max_num_batched_tokens": "max_num_batched_tokens",
    "kv_cache_gib": "kv_cache_memory_bytes",
}
# AsyncEngineArgs fields that logitcache sets itself, with the reason a user may not.
OWNED_ENGINE_ARGS = {
    "model": "the teacher is the one given as --teacher (a directory or a hub id)",
    "skip_tokenizer_init": "logitcache passes token ids, so vLLM loads no tokenizer",
    "tokenizer": "logitcache tokenizes with, and fingerprints, the tokenizer in the teacher's "
    "directory; put a different tokenizer there",
    "max_logprobs": "it is set from the widest capture this engine serves (--top-k / max_top_k)",
    "scheduling_policy": "logitcache sets it: priority on a server (interactive requests before "
    "jobs), first come first served offline",
    "worker_extension_cls": "logitcache's engine-side capture runs as vLLM's worker extension",
    "hf_token": "give a hub token in the HF_TOKEN environment variable, where it stays out of "
    "command lines, config files and logs",
}
# Fields resolved before the engine starts: they choose which checkpoint is fetched.
HUB_ENGINE_ARGS = ("revision", "download_dir")
_SPECULATIVE = ("speculative_config", "spec_method", "spec_model", "spec_tokens")
# The only logprobs_mode whose values are log-softmax over the whole vocabulary at temperature 1.
RAW_LOGPROBS = "raw_logprobs"
GIB = 1 << 30


@dataclass(frozen=True)
class EngineOptions:
    """Engine settings for a teacher: a few dedicated ones, and any other field of vLLM's
    ``AsyncEngineArgs`` by vLLM's name in ``engine_args`` (tensor_parallel_size, quantization,
    kv_cache_dtype, trust_remote_code, revision, enforce_eager, ...), validated by vLLM when the
    engine starts. The dedicated settings are sugar over the same fields: giving one in
    ``engine_args`` sets it; giving it both ways with different values is refused. An engine
    ignores the settings that do not apply to it (the reference engine has no KV cache)."""

    max_top_k: int = 64
    # "model": the checkpoint's own dtype (vLLM's "auto" would run a float32 teacher in bfloat16
    # on CPUs, which is not what a cache of exact teacher distributions wants).
    dtype: str = "model"
    max_model_len: int | None = None
    # KV cache size (vLLM's kv_cache_memory_bytes); None: 1 GiB on CPUs (unless
    # VLLM_CPU_KVCACHE_SPACE says otherwise; vLLM's default reserves most of the RAM), and what
    # gpu_memory_utilization leaves on GPUs.
    kv_cache_gib: float | None = None
    gpu_memory_utilization: float = 0.85
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    # Schedule by request priority (interactive requests before precompute jobs).
    scheduling_priority: bool = False
    # Allow full-vocabulary requests (k = FULL_VOCAB), which sampled captures need.
    full_vocab: bool = False
    engine_args: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        rest = dict(self.engine_args)
        for name, key in SUGAR_ENGINE_ARGS.items():
            if key not in rest or name == "kv_cache_gib":
                continue
            value, default = rest.pop(key), _DEFAULTS[name]
            current = getattr(self, name)
            if current != default and current != value:
                raise InvalidArgument(
                    f"engine option {key} is given twice, as {current!r} and as {value!r}"
                )
            object.__setattr__(self, name, value)
        if self.kv_cache_gib is not None and "kv_cache_memory_bytes" in rest:
            raise InvalidArgument(
                "the KV cache size is given twice: as kv_cache_gib and as kv_cache_memory_bytes"
            )
        object.__setattr__(self, "engine_args", rest)

    def dtype_for(self, info: TeacherInfo) -> str:
        """The dtype to ask the engine for: ``model`` resolves to the checkpoint's own, or to
        the engine's choice (``auto``) where the checkpoint declares none. A recorded engine
        dtype (``bfloat16+fp8``) gives its compute dtype; quantisation is an engine option."""
        if self.dtype == "model":
            return info.native_dtype or "auto"
        return self.dtype.split("+", 1)[0]

    def kv_cache_bytes(self) -> int | None:
        """The KV cache size asked for, in bytes (any fraction of a GiB), or None."""
        if self.kv_cache_gib is not None:
            return int(self.kv_cache_gib * GIB)
        value = self.engine_args.get("kv_cache_memory_bytes")
        return None if value is None else int(value)

    @property
    def revision(self) -> str | None:
        """The hub revision (branch, tag or commit) to fetch the teacher at."""
        return self.engine_args.get("revision")

    @property
    def download_dir(self) -> str | None:
        """Where hub checkpoints are cached (default: the Hugging Face cache)."""
        return self.engine_args.get("download_dir")


_DEFAULTS = {f.name: f.default for f in fields(EngineOptions)}
_WORDS: dict[str, Any] = {"true": True, "false": False, "none": None, "null": None}


def parse_engine_args(items: Iterable[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings (``--engine-arg``) as AsyncEngineArgs keyword arguments.

    VALUE is read as JSON where it parses (``2``, ``0.5``, ``true``, ``{"method": "ngram"}``),
    as a boolean or None for ``True``/``False``/``None`` in any case, else as the string itself.
    KEY may be spelt with dashes, as vLLM's flags are (``tensor-parallel-size``).
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise InvalidArgument(f"engine option {item!r}: expected KEY=VALUE")
        if key in out:
            raise InvalidArgument(f"engine option {key} is given twice")
        try:
            out[key] = json.loads(text)
        except ValueError:
            word = text.strip().lower()
            out[key] = _WORDS[word] if word in _WORDS else text
    return out


def check_options(options: EngineOptions) -> None:
    """Refuse settings no engine can honour, or that would corrupt the captured distributions,
    with the reason, before anything loads."""
    if not 1 <= options.max_top_k <= MAX_TOP_K:
        raise InvalidArgument(f"max top-k must be between 1 and {MAX_TOP_K}")
    if options.kv_cache_gib is not None and not options.kv_cache_gib > 0:
        raise InvalidArgument(f"the KV cache size must be positive, got {options.kv_cache_gib}")
    args = options.engine_args
    for key, reason in OWNED_ENGINE_ARGS.items():
        if key in args:
            raise InvalidArgument(f"engine option {key} cannot be set: {reason}")
    for key in _SPECULATIVE:
        if args.get(key) is not None:
            raise InvalidArgument(
                f"engine option {key}: speculative decoding is refused on a teacher, because it "
                "is known to corrupt prompt log-probabilities"
            )
    if args.get("load_format") == "dummy":
        raise InvalidArgument(
            "engine option load_format='dummy' runs random weights, not the teacher's"
        )
    # enable_prefix_caching is allowed: vLLM never reads the prefix cache for a request with
    # prompt logprobs (SamplingParams.skip_reading_prefix_cache), so every row is computed.
    mode = args.get("logprobs_mode", RAW_LOGPROBS)
    if mode != RAW_LOGPROBS:
        raise InvalidArgument(
            f"engine option logprobs_mode={mode!r}: captures store log-softmax over the whole "
            f"vocabulary at temperature 1, which only {RAW_LOGPROBS!r} gives (raw_logits are not "
            "normalised; processed_* apply temperature and sampling filters)"
        )


def check_width(k: int, options: EngineOptions) -> None:
    """Refuse a capture wider than the engine was started for."""
    if k == FULL_VOCAB:
        if not options.full_vocab:
            raise InvalidArgument("this engine was not started for full-vocabulary captures")
    elif not 1 <= k <= options.max_top_k:
        raise InvalidArgument(f"top-k {k} is outside 1..{options.max_top_k} for this engine")


# Starts an engine for a resolved teacher. It blocks for as long as the engine loads (seconds to
# minutes), so callers on an event loop run it in an executor.
EngineFactory = Callable[[TeacherInfo, EngineOptions], TeacherEngine]
