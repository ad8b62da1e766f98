"""logitcache's capture inside vLLM's worker: prompt rows computed where the logits are.

vLLM (0.32, the v1 model runner that its CPU and GPU builds use) computes prompt log-probs in
``GPUModelRunner._get_prompt_logprobs_dict``: per request, the logits of the scheduled prompt
chunk, log-softmax, top-k, then the values travel to the front end, where every entry becomes a
Python float in a list. A request that carries :data:`EXTRA_ARGS_KEY` in its
``SamplingParams.extra_args`` is taken out of that path here: its chunks go through
:func:`~logitcache.server.engine.device_capture.capture_columns` on the device, and the finished
[T, C] float32 tensor rides vLLM's own per-request tensor channel to the front end
(``ModelRunnerOutput.prompt_token_id_logprobs_dict`` -> ``RequestOutput.prompt_token_id_logprobs``,
a numpy array: no per-entry Python objects). Every other request is left to vLLM.

vLLM loads this module in each worker process because the engine names
:class:`CaptureWorkerExtension` as its ``worker_extension_cls``; loading it installs the hook.

What breaks when vLLM changes: the names used here (the method above, ``num_prompt_logprobs``,
``requests[..].prompt_token_ids / num_computed_tokens / sampling_params``, ``input_batch``,
``query_start_loc``, ``model.compute_logits``, the output's ``prompt_token_id_logprobs_dict``).
The engine's start-up self-check compares this path with vLLM's own prompt log-probs and refuses
to run when they disagree, so a change shows up as a refusal, never as wrong rows.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from logitcache.server.engine.columns import EXTRA_ARGS_KEY, CaptureRequest, without_seed
from logitcache.server.engine.device_capture import capture_columns, seed_tensor

HOOK_VERSION = 1
_DONE = "_logitcache_done"  # runner attribute: finished records waiting for this step's output
_PARTIAL = "_logitcache_partial"  # runner attribute: records with chunks still to come
# Logits computed at once (float32: 16 MiB; capture_columns then works on them in blocks of rows
# with one small buffer): small enough for the CPU's last-level cache and for the allocator to
# reuse the memory (larger buffers are mapped and faulted in afresh on every call), large enough
# for an efficient output-layer matmul (torch, V = 131k, hidden 32, one thread: 32 rows per call
# cost 194 us a row; 16 rows, 220; 8, 317).
_LOGIT_ELEMENTS = 1 << 22


class CaptureWorkerExtension:
    """vLLM ``worker_extension_cls``: importing it installs the hook; ``collective_rpc`` can ask
    each worker which version it runs."""

    def logitcache_hook_version(self) -> int:
        return HOOK_VERSION if _installed() else 0


def _request_of(runner: Any, req_id: str) -> CaptureRequest | None:
    state = runner.requests.get(req_id)
    extra = getattr(getattr(state, "sampling_params", None), "extra_args", None) or {}
    args = extra.get(EXTRA_ARGS_KEY)
    return None if args is None else CaptureRequest.from_args(args)


def _capture_chunks(runner: Any, hidden_states: torch.Tensor,
                    num_scheduled_tokens: dict[str, int],
                    ours: dict[str, CaptureRequest]) -> set[str]:  # fmt: skip
    """Columns of this step's prompt chunk of each of ``ours``; the ids of finished records.

    The chunks of all records that share a column layout are computed together, in calls of
    at most ``_LOGIT_ELEMENTS / V`` rows (one logits matmul and one softmax per call).
    """
    partial: dict[str, torch.Tensor] = runner.__dict__.setdefault(_PARTIAL, {})
    done: dict[str, torch.Tensor] = runner.__dict__.setdefault(_DONE, {})
    finished: set[str] = set()
    groups: dict[CaptureRequest, list[_Chunk]] = {}
    for req_id, request in ours.items():
        scheduled = num_scheduled_tokens.get(req_id)
        if scheduled is None:  # preempted in prefill: it is scheduled again from the start
            continue
        state = runner.requests[req_id]
        length, start = len(state.prompt_token_ids), state.num_computed_tokens
        n = min(scheduled, length - start)
        if n <= 0:
            finished.add(req_id)
            continue
        if req_id not in partial and n < length:  # a record whose prefill spans steps
            partial[req_id] = torch.empty(length, request.columns, dtype=torch.float32)
        offset = int(runner.query_start_loc.np[runner.input_batch.req_id_to_index[req_id]])
        chunk = _Chunk(req_id, request, state.prompt_token_ids, start, n, offset)
        groups.setdefault(without_seed(request), []).append(chunk)
    step = max(1, _LOGIT_ELEMENTS // runner.model_config.get_vocab_size())
    for layout, chunks in groups.items():
        index, targets, rows, seeds, scored = _row_tables(chunks)
        out = torch.empty(len(index), layout.columns, dtype=torch.float32)
        device = hidden_states.device
        for a in range(0, len(index), step):
            b = min(a + step, len(index))
            logits = runner.model.compute_logits(hidden_states[index[a:b].to(device)])
            if logits is None:  # a tensor-parallel rank that the logits were not gathered to
                continue
            scored_ids = scored[a:b].to(device) if layout.score_width else None
            columns = capture_columns(logits, targets[a:b].to(device), rows[a:b].to(device),
                                      seeds[a:b].to(device), layout, scored_ids)  # fmt: skip
            out[a:b].copy_(columns, non_blocking=True)
        at = 0
        for c in chunks:
            rows_of_c = out[at : at + c.n]  # a view: a record prefilled in one step is not copied
            at += c.n
            if c.req_id in partial:
                partial[c.req_id][c.start : c.start + c.n] = rows_of_c
            if c.start + c.n >= len(c.prompt):
                done[c.req_id] = partial.pop(c.req_id, rows_of_c)
                finished.add(c.req_id)
    for req_id in [r for r in partial if r not in runner.requests]:  # aborted mid-prefill
        del partial[req_id]
    return finished


@dataclass(frozen=True)
class _Chunk:
    """The prompt positions start..start+n-1 of one record, at ``offset`` in the step's tokens."""

    req_id: str
    request: CaptureRequest
    prompt: Sequence[int]
    start: int
    n: int
    offset: int


def _row_tables(chunks: list[_Chunk]) -> tuple[torch.Tensor, ...]:
    """Per row of the chunks, in order: its index in the step's hidden states, its next token
    (-1 after the last prompt token), its position in its record, its record's seed, the ids it
    scores ([n, score_width])."""
    index = np.concatenate([np.arange(c.offset, c.offset + c.n) for c in chunks])
    rows = np.concatenate([np.arange(c.start, c.start + c.n) for c in chunks])
    targets = np.full(len(index), -1, dtype=np.int64)
    seeds = np.concatenate([seed_tensor(c.request.seed, c.n).numpy() for c in chunks])
    scored = np.concatenate([c.request.scored_ids()[c.start : c.start + c.n] for c in chunks])
    at = 0
    for c in chunks:
        following = np.asarray(c.prompt[c.start + 1 : c.start + c.n + 1], dtype=np.int64)
        targets[at : at + len(following)] = following
        at += c.n
    return tuple(torch.from_numpy(a) for a in (index, targets, rows, seeds, scored))


def _prompt_logprobs_with_capture(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def wrapper(self: Any, hidden_states: torch.Tensor,
                num_scheduled_tokens: dict[str, int]) -> Any:  # fmt: skip
        pending: dict[str, int] = self.num_prompt_logprobs
        ours = {r: q for r in pending if (q := _request_of(self, r)) is not None}
        if not ours:
            return original(self, hidden_states, num_scheduled_tokens)
        widths = {r: pending.pop(r) for r in ours}
        finished: set[str] = set()
        try:
            result = original(self, hidden_states, num_scheduled_tokens)
            finished = _capture_chunks(self, hidden_states, num_scheduled_tokens, ours)
            if finished:
                self._sync_device()  # the non-blocking copies of finished records
        finally:
            pending.update((r, w) for r, w in widths.items() if r not in finished)
        return result

    return wrapper


def _attach_outputs(original: Callable[..., Any]) -> Callable[..., Any]:
    """Put the records finished in this step into the step's ModelRunnerOutput."""

    @functools.wraps(original)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = original(self, *args, **kwargs)
        done = self.__dict__.get(_DONE)
        if done and out is not None:
            target = getattr(out, "_model_runner_output", out)  # async scheduling's wrapper
            if hasattr(target, "prompt_token_id_logprobs_dict"):
                target.prompt_token_id_logprobs_dict.update(done)
                done.clear()
        return out

    return wrapper


def _installed() -> bool:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    return getattr(GPUModelRunner, "_logitcache_hook", 0) == HOOK_VERSION


def install() -> None:
    """Wrap the v1 model runner's prompt-logprob step and its output (once per process)."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if _installed():
        return
    runner: Any = GPUModelRunner
    runner._get_prompt_logprobs_dict = _prompt_logprobs_with_capture(
        runner._get_prompt_logprobs_dict
    )
    runner.sample_tokens = _attach_outputs(runner.sample_tokens)
    runner.execute_model = _attach_outputs(runner.execute_model)
    runner._logitcache_hook = HOOK_VERSION


install()
