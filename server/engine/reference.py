"""An independent teacher computation with a plain transformers forward pass.

It is what tests hold vLLM's output against, and, as :class:`ReferenceEngine`, the engine that
fast in-process tests of the core run on. It is never a production engine and never a fallback:
no configuration option or flag selects it (it is slow and has none of vLLM's batching); only
code that passes its factory explicitly gets it.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from logitcache.client.codecs import TopKRows
from logitcache.client.errors import InvalidArgument
from logitcache.server.engine.capture import FULL_VOCAB
from logitcache.server.engine.columns import CapturedColumns, CaptureRequest
from logitcache.server.engine.device_capture import capture_columns, seed_tensor
from logitcache.server.engine.protocol import EngineOptions, check_options, check_width
from logitcache.server.teachers.identity import TeacherInfo

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class TransformersReference:
    """A forward pass, log_softmax over the full vocabulary, the top k (or all) per position."""

    def __init__(self, path: str | Path, dtype: torch.dtype = torch.float32) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()

    @torch.no_grad()
    def full_logprobs(self, input_ids: np.ndarray) -> torch.Tensor:
        """float32 [T, V] log-probabilities of the next token at every position."""
        ids = torch.as_tensor(np.asarray(input_ids, dtype=np.int64))[None]
        logits = self.model(input_ids=ids).logits[0].float()
        return torch.log_softmax(logits, dim=-1)

    @torch.no_grad()
    def capture_columns(self, input_ids: np.ndarray, request: CaptureRequest) -> CapturedColumns:
        """The engine-side capture of one record, on this model's logits (as vLLM's hook)."""
        ids = torch.as_tensor(np.asarray(input_ids, dtype=np.int64))
        logits = self.model(input_ids=ids[None]).logits[0].float()
        targets = torch.cat([ids[1:], torch.tensor([-1])])
        rows = torch.arange(len(ids))
        seeds = seed_tensor(request.seed, len(ids))
        scored = torch.from_numpy(request.scored_ids().copy()) if request.score_width else None
        columns = capture_columns(logits, targets, rows, seeds, request, scored)
        return CapturedColumns.split(columns.numpy(), request)

    def capture(self, input_ids: np.ndarray, k: int) -> TopKRows:
        """T rows of the ``k`` most probable tokens (``FULL_VOCAB``: all), most probable first."""
        logprobs = self.full_logprobs(input_ids)
        top = torch.topk(logprobs, logprobs.shape[1] if k == FULL_VOCAB else k, dim=-1)
        ids = torch.as_tensor(np.asarray(input_ids, dtype=np.int64))
        target = torch.full((len(ids),), float("nan"))
        target[:-1] = logprobs[:-1].gather(1, ids[1:, None])[:, 0]
        return TopKRows(
            token_ids=top.indices.to(torch.int32).numpy(),
            logprobs=top.values.numpy(),
            target_logprobs=target.numpy(),
        )


class ReferenceEngine:
    """:class:`TeacherEngine` over :class:`TransformersReference`; its constructor is the
    reference engine factory (it blocks while the model loads).

    Sequences are computed one at a time, in arrival order, on one worker thread, so the event
    loop never runs a forward pass; ``priority`` is accepted and has nothing to reorder.
    """

    def __init__(self, info: TeacherInfo, options: EngineOptions) -> None:
        check_options(options)
        requested = options.dtype_for(info)
        if requested == "auto":
            requested = "float32"
        if requested not in _DTYPES:
            raise InvalidArgument(
                f"dtype {requested!r}: the reference engine runs {', '.join(_DTYPES)}"
            )
        self.info = info
        self.options = options
        self.dtype = requested
        self.max_top_k = options.max_top_k
        self.max_sequence_len = (options.max_model_len or info.max_model_len) - 1
        self._model = TransformersReference(info.path, _DTYPES[requested])
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reference-engine")

    async def capture(self, input_ids: np.ndarray, k: int, priority: int = 0) -> TopKRows:
        check_width(k, self.options)
        ids = self._checked(input_ids)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._worker, self._model.capture, ids, k)

    async def capture_columns(
        self, input_ids: np.ndarray, request: CaptureRequest, priority: int = 0
    ) -> CapturedColumns:
        ids = self._checked(input_ids)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._worker, self._model.capture_columns, ids, request)

    def _checked(self, input_ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(input_ids)
        if not 1 <= ids.size <= self.max_sequence_len:
            raise InvalidArgument(
                f"a sequence of {ids.size} tokens is outside 1..{self.max_sequence_len}"
            )
        return ids

    def shutdown(self) -> None:
        self._worker.shutdown(wait=True, cancel_futures=True)
