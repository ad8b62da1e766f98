"""The transformers reference engine, counting what it is asked to compute (core tests share it).

Importable from tests in this folder (pytest puts a test file's folder on ``sys.path``).
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from logitcache.client.codecs import TopKRows
from logitcache.server.engine.columns import CapturedColumns, CaptureRequest
from logitcache.server.engine.protocol import EngineOptions
from logitcache.server.engine.reference import ReferenceEngine
from logitcache.server.teachers.identity import TeacherInfo

REFERENCE_K = 8  # the top-k the core tests capture at


class CountingEngine(ReferenceEngine):
    """The reference engine, counting the sequences it is asked to compute."""

    def __init__(self, info: TeacherInfo, options: EngineOptions) -> None:
        super().__init__(info, options)
        self.computed: Counter[bytes] = Counter()

    async def capture(self, input_ids: np.ndarray, k: int, priority: int = 0) -> TopKRows:
        self.computed[np.asarray(input_ids, dtype=np.int32).tobytes()] += 1
        return await super().capture(input_ids, k, priority)

    async def capture_columns(
        self, input_ids: np.ndarray, request: CaptureRequest, priority: int = 0
    ) -> CapturedColumns:
        self.computed[np.asarray(input_ids, dtype=np.int32).tobytes()] += 1
        return await super().capture_columns(input_ids, request, priority)
