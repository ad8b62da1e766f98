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

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from logitcache.client.codecs import TopKRows
from logitcache.client.errors import InvalidArgument
from logitcache.server.engine.capture import FULL_VOCAB, MAX_TOP_K
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

    def shutdown(self) -> None: ...


@dataclass(frozen=True)
class EngineOptions:
    """Engine settings that matter for a teacher service, named as vLLM names them; everything
    else keeps the engine's default. An engine ignores the settings that do not apply to it
    (the reference engine has no KV cache or scheduler)."""

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

    def dtype_for(self, info: TeacherInfo) -> str:
        """The dtype to ask the engine for: ``model`` resolves to the checkpoint's own, or to
        the engine's choice (``auto``) where the checkpoint declares none."""
        return (info.native_dtype or "auto") if self.dtype == "model" else self.dtype


def check_options(options: EngineOptions) -> None:
    """Refuse settings no engine can honour, before anything loads."""
    if not 1 <= options.max_top_k <= MAX_TOP_K:
        raise InvalidArgument(f"max top-k must be between 1 and {MAX_TOP_K}")


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
