"""The teacher engine interface, and the vLLM engine that implements it.

An engine turns a token sequence of length T into T rows (see ARCHITECTURE: row t is the
distribution over the token after position t). vLLM is the engine; the transformers reference in
``reference_engine`` exists only so tests can check vLLM against an independent computation.

vLLM reports, per prompt position i >= 1, the actual token x[i] first and then the top-k, all as
log-softmax over the full vocabulary at temperature 1, in a flat layout of exactly k + 1 entries per
position. Position 0 has none; the distribution after the last prompt token comes from the one
generated token's logprobs. We reshape the flat lists into [T-1, k+1] arrays without Python loops
over positions.
"""

from __future__ import annotations

import asyncio
import gc
import os
import uuid
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from logitcache.client.codecs import TopKRows
from logitcache.client.errors import InvalidArgument
from logitcache.server.engine.capture import FULL_VOCAB, MAX_TOP_K
from logitcache.server.teachers.identity import TeacherInfo


class TeacherEngine(Protocol):
    """What the rest of the server needs from an engine."""

    info: TeacherInfo
    dtype: str
    max_top_k: int
    max_sequence_len: int

    async def capture(self, input_ids: np.ndarray, k: int, priority: int = 0) -> TopKRows: ...

    def shutdown(self) -> None: ...


@dataclass(frozen=True)
class VLLMOptions:
    """Engine settings that matter for a teacher service; everything else keeps vLLM's default."""

    max_top_k: int = 64
    # "model": the checkpoint's own dtype (vLLM's "auto" would run a float32 teacher in bfloat16
    # on CPUs, which is not what a cache of exact teacher distributions wants).
    dtype: str = "model"
    max_model_len: int | None = None
    kv_cache_gib: float = 1.0  # CPU only: KV cache size (vLLM's default reserves most of the RAM)
    gpu_memory_utilization: float = 0.85
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    # Schedule by request priority (interactive requests before precompute jobs).
    scheduling_priority: bool = False
    # Allow full-vocabulary requests (k = FULL_VOCAB), which sampled captures need.
    full_vocab: bool = False


class VLLMEngine:
    """A teacher running under vLLM's AsyncLLM; the engine core lives in its own process."""

    def __init__(self, info: TeacherInfo, options: VLLMOptions) -> None:
        if not 1 <= options.max_top_k <= MAX_TOP_K:
            raise InvalidArgument(f"max top-k must be between 1 and {MAX_TOP_K}")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", _gib(options.kv_cache_gib))
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        kwargs: dict = {}
        if options.scheduling_priority:
            kwargs["scheduling_policy"] = "priority"
        if options.max_num_seqs:
            kwargs["max_num_seqs"] = options.max_num_seqs
        if options.max_num_batched_tokens:
            kwargs["max_num_batched_tokens"] = options.max_num_batched_tokens
        args = AsyncEngineArgs(
            model=str(info.path),
            skip_tokenizer_init=True,
            max_logprobs=FULL_VOCAB if options.full_vocab else options.max_top_k,
            dtype=(info.native_dtype or "auto") if options.dtype == "model" else options.dtype,
            max_model_len=options.max_model_len,
            gpu_memory_utilization=options.gpu_memory_utilization,
            enable_prefix_caching=False,
            disable_log_stats=True,
            **kwargs,
        )
        self.info = info
        self.max_top_k = options.max_top_k
        self.full_vocab = options.full_vocab
        self._llm = AsyncLLM.from_engine_args(args)
        model_config = self._llm.model_config
        self.vocab_size = int(model_config.get_vocab_size())
        self.dtype = str(model_config.dtype).removeprefix("torch.")
        # One generated token must fit after the prompt: it carries the last row.
        self.max_sequence_len = int(model_config.max_model_len) - 1

    async def capture(self, input_ids: np.ndarray, k: int, priority: int = 0) -> TopKRows:
        """Rows for one sequence; lower ``priority`` runs first when the engine schedules by it.

        ``k = FULL_VOCAB`` returns every token of the vocabulary (engines started with
        ``full_vocab``), in descending probability.
        """
        output = await self.raw_output(input_ids, k, priority)
        return rows_from_vllm_output(output, len(input_ids), self.vocab_size if k < 0 else k)

    async def raw_output(self, input_ids: np.ndarray, k: int, priority: int = 0):
        """vLLM's own RequestOutput for one sequence (what ``bench capture`` times as baseline)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if k == FULL_VOCAB:
            if not self.full_vocab:
                raise InvalidArgument("this engine was not started for full-vocabulary captures")
        elif not 1 <= k <= self.max_top_k:
            raise InvalidArgument(f"top-k {k} is outside 1..{self.max_top_k} for this engine")
        params = SamplingParams(
            prompt_logprobs=k,
            logprobs=k,
            max_tokens=1,
            temperature=0.0,
            detokenize=False,
            flat_logprobs=True,
        )
        prompt = TokensPrompt(prompt_token_ids=np.asarray(input_ids).tolist())
        final = None
        request_id = uuid.uuid4().hex
        async for out in self._llm.generate(prompt, params, request_id, priority=priority):
            final = out
        if final is None:
            raise RuntimeError("vLLM returned no output")
        return final

    def shutdown(self) -> None:
        """Stop the engine core process now (not at interpreter exit, when vLLM cannot)."""
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None
            gc.collect()


def rows_from_vllm_output(output, length: int, k: int) -> TopKRows:
    """Convert one vLLM RequestOutput with flat logprobs into T rows (vectorised)."""
    width = k + 1
    prompt = output.prompt_logprobs
    ids = np.asarray(prompt.token_ids, dtype=np.int32)
    lps = np.asarray(prompt.logprobs, dtype=np.float32)
    if ids.shape[0] != (length - 1) * width:
        raise RuntimeError(
            f"vLLM returned {ids.shape[0]} prompt logprob entries; expected {(length - 1) * width}"
        )
    ids = ids.reshape(length - 1, width)
    lps = lps.reshape(length - 1, width)
    last = output.outputs[0].logprobs
    start, end = last.start_indices[0], last.end_indices[0]
    if end - start != width:
        raise RuntimeError(
            f"vLLM returned {end - start} entries for the last row; expected {width}"
        )
    last_ids = np.asarray(last.token_ids[start + 1 : end], dtype=np.int32)
    last_lps = np.asarray(last.logprobs[start + 1 : end], dtype=np.float32)
    return TopKRows(
        token_ids=np.concatenate([ids[:, 1:], last_ids[None, :]]),
        logprobs=np.concatenate([lps[:, 1:], last_lps[None, :]]),
        target_logprobs=np.concatenate([lps[:, 0], np.array([np.nan], dtype=np.float32)]),
    )


def _gib(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


async def capture_many(
    engine: TeacherEngine, sequences: list[np.ndarray], k: int
) -> list[TopKRows]:
    """Capture several sequences concurrently (vLLM batches them)."""
    return list(await asyncio.gather(*(engine.capture(s, k) for s in sequences)))
