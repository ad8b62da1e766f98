"""The vLLM engine: a teacher under vLLM's AsyncLLM, implementing :class:`TeacherEngine`.

vLLM reports, per prompt position i >= 1, the actual token x[i] first and then the top-k, all as
log-softmax over the full vocabulary at temperature 1, in a flat layout of exactly k + 1 entries per
position. Position 0 has none; the distribution after the last prompt token comes from the one
generated token's logprobs. We reshape the flat lists into [T-1, k+1] arrays without Python loops
over positions.
"""

from __future__ import annotations

import gc
import os
import uuid
from typing import Any

import numpy as np

from logitcache.client.codecs import TopKRows
from logitcache.client.errors import Unavailable
from logitcache.server.engine.capture import FULL_VOCAB
from logitcache.server.engine.protocol import EngineOptions, check_options, check_width
from logitcache.server.teachers.identity import TeacherInfo


class VLLMEngine:
    """A teacher running under vLLM's AsyncLLM; the engine core lives in its own process.

    The constructor is the vLLM engine factory: it blocks until the engine has loaded.
    """

    def __init__(self, info: TeacherInfo, options: EngineOptions) -> None:
        check_options(options)
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", _gib(options.kv_cache_gib))
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        kwargs: dict[str, Any] = {}
        if options.scheduling_priority:
            kwargs["scheduling_policy"] = "priority"
        if options.max_num_seqs:
            kwargs["max_num_seqs"] = options.max_num_seqs
        if options.max_num_batched_tokens:
            kwargs["max_num_batched_tokens"] = options.max_num_batched_tokens
        if options.max_model_len:
            kwargs["max_model_len"] = options.max_model_len
        args = AsyncEngineArgs(
            model=str(info.path),
            skip_tokenizer_init=True,
            max_logprobs=FULL_VOCAB if options.full_vocab else options.max_top_k,
            dtype=options.dtype_for(info),  # type: ignore[arg-type]  # vLLM checks the name
            gpu_memory_utilization=options.gpu_memory_utilization,
            enable_prefix_caching=False,
            disable_log_stats=True,
            **kwargs,
        )
        self.info = info
        self.options = options
        self.max_top_k = options.max_top_k
        self._llm: AsyncLLM | None = AsyncLLM.from_engine_args(args)
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
        return rows_from_vllm_output(
            output, len(input_ids), self.vocab_size if k == FULL_VOCAB else k
        )

    async def raw_output(self, input_ids: np.ndarray, k: int, priority: int = 0) -> Any:
        """vLLM's own RequestOutput for one sequence (what ``bench capture`` times as baseline)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        check_width(k, self.options)
        params = SamplingParams(
            prompt_logprobs=k,
            logprobs=k,
            max_tokens=1,
            temperature=0.0,
            detokenize=False,
            flat_logprobs=True,
        )
        prompt = TokensPrompt(prompt_token_ids=np.asarray(input_ids).tolist())
        if self._llm is None:
            raise Unavailable("the engine has been shut down")
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


def rows_from_vllm_output(output: Any, length: int, k: int) -> TopKRows:
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
