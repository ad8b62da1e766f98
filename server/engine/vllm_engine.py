"""The vLLM engine: a teacher under vLLM's AsyncLLM, implementing :class:`TeacherEngine`.

vLLM reports, per prompt position i >= 1, the actual token x[i] first and then the top-k, all as
log-softmax over the full vocabulary at temperature 1, in a flat layout of exactly k + 1 entries per
position. Position 0 has none; the distribution after the last prompt token comes from the one
generated token's logprobs. We reshape the flat lists into [T-1, k+1] arrays without Python loops
over positions. That path (:meth:`VLLMEngine.raw_output`) builds a Python float per entry in
vLLM's front end; it remains for full-vocabulary requests and as the reference of the self-check.

Captures run engine-side instead (``vllm_worker``, ``device_capture``): top-k, draws and
normalisers are computed next to the logits and arrive as one numpy array per record. Before its
first engine-side capture the engine checks that path against vLLM's own prompt log-probs on a
few sequences, and refuses to capture (FailedPrecondition) if they disagree.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import difflib
import gc
import hashlib
import json
import os
import uuid
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from logitcache.client.codecs import TopKRows
from logitcache.client.errors import FailedPrecondition, InvalidArgument, Unavailable
from logitcache.server.engine.capture import FULL_VOCAB
from logitcache.server.engine.columns import (
    EXTRA_ARGS_KEY,
    CapturedColumns,
    CaptureRequest,
    check_agreement,
    self_check_sequences,
)
from logitcache.server.engine.protocol import (
    GIB,
    HUB_ENGINE_ARGS,
    EngineOptions,
    check_options,
    check_width,
)
from logitcache.server.engine.shared_memory import remove_leftover_shared_memory
from logitcache.server.teachers.identity import TeacherInfo

if TYPE_CHECKING:
    from vllm import AsyncEngineArgs


# vLLM imports it in every worker process, which installs logitcache's capture hook there.
WORKER_EXTENSION = "logitcache.server.engine.vllm_worker.CaptureWorkerExtension"

# The environment of vLLM's engine processes on CPUs (they read it when they start). glibc's
# malloc maps each buffer above a threshold afresh and faults its pages in on every use; with the
# threshold at its largest (32 MiB) and no trimming, the 16 MiB logits buffers of engine-side
# capture are reused instead. A value the user set is kept.
CPU_ENGINE_ENVIRONMENT = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20),
                          "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}  # fmt: skip
# tcmalloc, which vLLM's CPU build asks to have preloaded, also reuses larger buffers (vLLM's own
# prompt log-probs make 1 GiB of logits per step at V = 131k): preloaded where it is installed.
# bench capture, V = 131k: top-64 about 2x with either; sampled and tempered captures gain more
# with tcmalloc. Intel's OpenMP, which vLLM also names, measured no gain and is not preloaded.
TCMALLOC_NAMES = ("tcmalloc_minimal", "tcmalloc")


class VLLMEngine:
    """A teacher running under vLLM's AsyncLLM; the engine core lives in its own process.

    The constructor is the vLLM engine factory: it blocks until the engine has loaded.
    """

    def __init__(self, info: TeacherInfo, options: EngineOptions) -> None:
        check_options(options)
        check_engine_arg_names(options.engine_args)
        remove_leftover_shared_memory()  # of engines killed before (see engine.shared_memory)
        from vllm.v1.engine.async_llm import AsyncLLM

        kv_cache_bytes = _kv_cache_bytes(options)
        args = vllm_engine_args(info, options, kv_cache_bytes)
        try:
            config = args.create_engine_config()
        except (TypeError, ValueError) as e:  # vLLM's own checks of names, values and combinations
            raise InvalidArgument(f"vLLM refused the engine options: {e}") from None
        _check_cpu_thread_binding(config.parallel_config.world_size)
        if kv_cache_bytes is not None:
            # The CPU build replaces it with VLLM_CPU_KVCACHE_SPACE where that is set: an
            # explicit size wins over the environment, as every other flag does.
            config.cache_config.kv_cache_memory_bytes = kv_cache_bytes
        self.info = info
        self.options = options
        self.max_top_k = options.max_top_k
        from vllm.platforms import current_platform

        with engine_process_environment(current_platform.is_cpu()):
            self._llm: AsyncLLM | None = AsyncLLM.from_vllm_config(config,
                                                                   disable_log_stats=True)  # fmt: skip
        # Blocks of block_size tokens the KV cache holds (per rank), as the engine core sized it.
        self.kv_cache_blocks = int(config.cache_config.num_gpu_blocks or 0)
        model_config = self._llm.model_config
        self.vocab_size = int(model_config.get_vocab_size())
        self.dtype = engine_dtype(
            str(model_config.dtype),
            model_config.quantization,
            config.cache_config.cache_dtype,
            options.engine_args.get("hf_overrides"),
        )
        # One generated token must fit after the prompt: it carries the last row.
        self.max_sequence_len = int(model_config.max_model_len) - 1
        self._checked: asyncio.Future[None] | None = None

    async def capture(self, input_ids: np.ndarray, k: int, priority: int = 0) -> TopKRows:
        """Rows for one sequence; lower ``priority`` runs first when the engine schedules by it.

        ``k = FULL_VOCAB`` returns every token of the vocabulary (engines started with
        ``full_vocab``), in descending probability.
        """
        if k == FULL_VOCAB:
            output = await self.raw_output(input_ids, k, priority)
            return rows_from_vllm_output(output, len(input_ids), self.vocab_size)
        check_width(k, self.options)
        request = CaptureRequest(top_k=k)
        return (await self.capture_columns(input_ids, request, priority)).top_rows()

    async def capture_columns(
        self, input_ids: np.ndarray, request: CaptureRequest, priority: int = 0
    ) -> CapturedColumns:
        """One record's engine-side capture (see ``device_capture``), after the self-check."""
        await self._self_checked()
        return await self._columns(input_ids, request, priority)

    async def _columns(
        self, input_ids: np.ndarray, request: CaptureRequest, priority: int = 0
    ) -> CapturedColumns:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if request.top_k > self.vocab_size:
            raise InvalidArgument(f"top-k {request.top_k} exceeds the vocabulary")
        if request.score_width and request.scored_ids().shape[0] != len(input_ids):
            raise InvalidArgument("ids to score must have one row per token of the sequence")
        params = SamplingParams(
            prompt_logprobs=0,  # enrols the request in vLLM's prompt step, which the hook takes
            max_tokens=1,
            temperature=0.0,
            detokenize=False,
            flat_logprobs=True,
            extra_args={EXTRA_ARGS_KEY: request.to_args()},
        )
        prompt = TokensPrompt(prompt_token_ids=np.asarray(input_ids).tolist())
        final = await self._generate(prompt, params, priority)
        columns = final.prompt_token_id_logprobs
        if columns is None:
            raise FailedPrecondition(
                "vLLM returned no engine-side capture: logitcache's worker hook is not running "
                "in this vLLM (see server/engine/vllm_worker.py)"
            )
        return CapturedColumns.split(columns, request)

    async def _self_checked(self) -> None:
        """Run the self-check once (concurrent callers wait for the same run); re-raise its
        refusal to every later caller."""
        if self._checked is None:
            self._checked = asyncio.ensure_future(self._self_check())
        await asyncio.shield(self._checked)

    async def _self_check(self) -> None:
        """Engine-side rows against vLLM's own prompt log-probs, on a few fixed sequences."""
        k = min(8, self.max_top_k, self.vocab_size)
        request = CaptureRequest(top_k=k, samples=4, seed=1, temperatures=(1.0,))
        for ids in self_check_sequences(self.vocab_size, self.max_sequence_len):
            expected = rows_from_vllm_output(await self.raw_output(ids, k), len(ids), k)
            scoring = request.scoring(expected.token_ids)  # scored ids: the top-k themselves
            check_agreement(expected, await self._columns(ids, scoring))

    async def prefill_only(self, input_ids: np.ndarray) -> None:
        """Run one sequence with no log-probs at all: vLLM's prefill limit that ``bench capture``
        compares captures with."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)
        await self._generate(TokensPrompt(prompt_token_ids=np.asarray(input_ids).tolist()),
                             params, 0)  # fmt: skip

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
        return await self._generate(prompt, params, priority)

    async def _generate(self, prompt: Any, params: Any, priority: int) -> Any:
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
            remove_leftover_shared_memory()


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


def engine_dtype(
    dtype: str, quantization: str | None, kv_cache_dtype: str, hf_overrides: Any = None
) -> str:
    """The engine dtype a capture space records: the compute dtype, plus what else changes the
    numbers (quantisation, the KV-cache dtype, overrides of the model's config), so that such
    rows never mix with the same teacher's plain ones (``bfloat16+fp8+kv-fp8_e4m3``)."""
    parts = [dtype.removeprefix("torch.")]
    if quantization:
        parts.append(quantization)
    if kv_cache_dtype not in ("auto", parts[0]):
        parts.append(f"kv-{kv_cache_dtype}")
    if hf_overrides:
        canonical = json.dumps(hf_overrides, sort_keys=True, default=repr).encode()
        parts.append(f"hf-{hashlib.sha256(canonical).hexdigest()[:12]}")
    return "+".join(parts)


def vllm_engine_args(
    info: TeacherInfo, options: EngineOptions, kv_cache_bytes: int | None = None
) -> AsyncEngineArgs:
    """vLLM's AsyncEngineArgs for a teacher: the user's engine options, then what capture needs
    (token ids in, flat log-probs up to the widest capture out), which nobody overrides."""
    from vllm import AsyncEngineArgs

    kwargs: dict[str, Any] = {"enable_prefix_caching": False, "disable_log_stats": True}
    # The hub options chose the checkpoint that info.path already is.
    kwargs.update((k, v) for k, v in options.engine_args.items() if k not in HUB_ENGINE_ARGS)
    for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens"):
        if getattr(options, name):
            kwargs[name] = getattr(options, name)
    if kv_cache_bytes is not None:
        kwargs["kv_cache_memory_bytes"] = kv_cache_bytes
    kwargs.update(
        model=str(info.path),
        skip_tokenizer_init=True,
        max_logprobs=FULL_VOCAB if options.full_vocab else options.max_top_k,
        dtype=options.dtype_for(info),
        gpu_memory_utilization=options.gpu_memory_utilization,
        scheduling_policy="priority" if options.scheduling_priority else "fcfs",
        worker_extension_cls=WORKER_EXTENSION,
    )
    try:
        return AsyncEngineArgs(**kwargs)
    except (TypeError, ValueError) as e:
        raise InvalidArgument(f"vLLM refused the engine options: {e}") from None


def check_engine_arg_names(engine_args: Mapping[str, Any]) -> None:
    """Refuse names that are not fields of vLLM's AsyncEngineArgs, with vLLM's message and the
    nearest names, before anything loads (vLLM's import takes seconds; the engine start, more)."""
    if not engine_args:
        return
    from vllm import AsyncEngineArgs

    names = [f.name for f in dataclasses.fields(AsyncEngineArgs) if not f.name.startswith("_")]
    unknown = sorted(set(engine_args) - set(names))
    if not unknown:
        return
    try:
        AsyncEngineArgs(**{unknown[0]: engine_args[unknown[0]]})
        message = f"unexpected keyword argument {unknown[0]!r}"
    except TypeError as e:
        message = str(e)
    nearest = difflib.get_close_matches(unknown[0], names, n=4)
    hint = f"; nearest: {', '.join(nearest)}" if nearest else ""
    raise InvalidArgument(
        f"unknown engine option {unknown[0]!r} ({message}){hint}; the options are the fields "
        "of vLLM's AsyncEngineArgs (vllm serve --help lists them)"
    )


def _check_cpu_thread_binding(world_size: int) -> None:
    """Refuse, with the setting that works, several CPU ranks that vLLM cannot bind itself.

    vLLM's CPU build binds each rank's threads to a NUMA node of its own; with fewer nodes than
    ranks its engine core dies at start-up, deep in a worker. An explicit CPU list per rank
    (VLLM_CPU_OMP_THREADS_BIND, which the engine's processes read when they start) works.
    """
    from vllm.platforms import current_platform

    if world_size <= 1 or not current_platform.is_cpu():
        return
    if os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto") != "auto":
        return
    from vllm.utils.cpu_resource_utils import get_visible_memory_node

    nodes = len(get_visible_memory_node())
    if nodes >= world_size:
        return
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < world_size:
        raise InvalidArgument(f"{world_size} engine ranks need a CPU each; {len(cpus)} are allowed")
    per_rank = np.array_split(np.asarray(cpus), world_size)
    binding = "|".join(",".join(str(c) for c in group) for group in per_rank)
    raise InvalidArgument(
        f"{world_size} engine ranks on {nodes} NUMA node(s): vLLM's CPU build binds each rank to "
        f"a node of its own; give each rank its CPUs with VLLM_CPU_OMP_THREADS_BIND='{binding}'"
    )


@contextlib.contextmanager
def engine_process_environment(on_cpu: bool) -> Iterator[None]:
    """CPU_ENGINE_ENVIRONMENT, and tcmalloc in LD_PRELOAD where it is installed, while vLLM
    starts its engine processes on a CPU (a variable the user set is kept as it is); the
    environment as it was again afterwards, so that no other child gets them."""
    candidates = dict(CPU_ENGINE_ENVIRONMENT) if on_cpu else {}
    tcmalloc = installed_tcmalloc() if on_cpu else None
    if tcmalloc is not None:
        candidates["LD_PRELOAD"] = tcmalloc
    added = {name: value for name, value in candidates.items() if name not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def installed_tcmalloc() -> str | None:
    """The name the dynamic loader knows tcmalloc by on this machine, if it is installed."""
    import ctypes.util

    return next(filter(None, map(ctypes.util.find_library, TCMALLOC_NAMES)), None)


def _kv_cache_bytes(options: EngineOptions) -> int | None:
    """The KV cache size to give vLLM: the one asked for, in bytes (any fraction of a GiB).

    On CPUs, where vLLM would otherwise reserve most of the RAM, the default is
    VLLM_CPU_KVCACHE_SPACE if set (which vLLM's CPU build reads as whole GiB), else 1 GiB.
    """
    from vllm.platforms import current_platform

    asked = options.kv_cache_bytes()
    if not current_platform.is_cpu():
        return asked
    env = os.environ.get("VLLM_CPU_KVCACHE_SPACE", "").strip()
    if env and not env.isdigit():
        raise InvalidArgument(
            f"VLLM_CPU_KVCACHE_SPACE={env!r}: vLLM's CPU build reads it as a whole number of "
            f"GiB; unset it and pass --kv-cache-gib {env} (any fraction) instead"
        )
    if asked is None and not env:
        return GIB
    return asked
