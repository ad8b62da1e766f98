"""The teachers a server runs: engine, fingerprints, limits, and the checks on incoming sequences.

Engines come from an injected :data:`EngineFactory` (vLLM's unless told otherwise) and start in
an executor, so the event loop keeps answering health probes while a teacher loads.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from logitcache.client.errors import FailedPrecondition, InvalidArgument, NotFound
from logitcache.client.space import DEFAULT_DRAWS, CaptureMode, CaptureSpace
from logitcache.server.config import TeacherConfig
from logitcache.server.engine.capture import CaptureConfig, parse_mode
from logitcache.server.engine.protocol import EngineFactory, TeacherEngine
from logitcache.server.engine.vllm_engine import VLLMEngine
from logitcache.server.names import shown
from logitcache.server.teachers.identity import TeacherInfo, resolve_teacher, topk_space


@dataclass
class Teacher:
    config: TeacherConfig
    info: TeacherInfo
    engine: TeacherEngine

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def license(self) -> str | None:
        return self.config.license or self.info.license

    def resolve_k(self, k: int) -> int:
        """0 means the teacher's default; anything above its maximum is refused."""
        if k == 0:
            return self.config.default_top_k
        if not 1 <= k <= self.config.max_top_k:
            raise InvalidArgument(
                f"top_k {k} is outside 1..{self.config.max_top_k} for teacher {self.name!r}",
                fields=["top_k"],
            )
        return k

    def capture(self, mode: str, k: int, temperatures: Sequence[float] = ()) -> CaptureConfig:
        """The capture a request asks of this teacher: ``mode`` (:func:`parse_mode`), its k (the
        entries, the most entries, the draws; 0: the teacher's default, or DEFAULT_DRAWS draws)
        and the ``temperatures`` whose tails are stored too. INVALID_ARGUMENT naming ``mode`` or
        ``top_p`` for a bad mode, ``top_k`` for a k out of its mode's range, ``temperatures``."""
        capture_mode, top_p = parse_mode(mode)
        k = k or DEFAULT_DRAWS if capture_mode is CaptureMode.SAMPLED else self.resolve_k(k)
        try:
            return CaptureConfig(capture_mode, k, top_p, temperatures=tuple(temperatures))
        except InvalidArgument as e:  # the core's k is the wire's top_k
            raise InvalidArgument(e.worded({"k": "top_k"}), fields=["top_k", *e.fields]) from None

    def space(self, k: int) -> CaptureSpace:
        return topk_space(self.info, self.engine.dtype, k)

    def check_sequences(self, sequences: list[np.ndarray]) -> None:
        """Refuse the first bad sequence, naming its index in the request."""
        limit = self.engine.max_sequence_len
        for i, ids in enumerate(sequences):
            if ids.size == 0:
                raise InvalidArgument(f"sequence {i} is empty")
            if ids.size > limit:
                raise InvalidArgument(
                    f"sequence {i} has {ids.size} tokens; teacher {self.name!r} accepts at most {limit}"
                )
            bad = np.flatnonzero(ids >= self.info.vocab_size)
            if bad.size:
                raise InvalidArgument(
                    f"sequence {i}: token id {int(ids[bad[0]])} at position {int(bad[0])} is outside "
                    f"the vocabulary [0, {self.info.vocab_size}) of teacher {self.name!r}"
                )


class TeacherRegistry:
    """Name -> running teacher. The first configured teacher is the default."""

    def __init__(self, teachers: list[Teacher]) -> None:
        self._teachers = {t.name: t for t in teachers}
        # No teacher: a store-only server (streaming and listings; nothing is computed).
        self.default = teachers[0].name if teachers else ""

    @classmethod
    async def start(
        cls, configs: list[TeacherConfig], engine_factory: EngineFactory = VLLMEngine
    ) -> TeacherRegistry:
        """Resolve and start every teacher off the event loop: fingerprinting reads the weights
        and an engine loads for seconds to minutes. If one fails, the others are shut down."""
        loop = asyncio.get_running_loop()
        teachers: list[Teacher] = []
        try:
            for config in configs:
                options = config.engine_options()
                info = await loop.run_in_executor(
                    None, resolve_teacher, config.source, options.revision, options.download_dir
                )
                engine = await loop.run_in_executor(None, engine_factory, info, options)
                teachers.append(Teacher(config, info, engine))
        except BaseException:
            for teacher in teachers:
                teacher.engine.shutdown()
            raise
        return cls(teachers)

    def get(self, name: str) -> Teacher:
        if not self._teachers:
            raise FailedPrecondition("this server runs no teacher (store-only): it cannot compute")
        try:
            return self._teachers[name or self.default]
        except KeyError:
            raise NotFound(
                f"teacher {shown(name)} is not served here (teachers: {sorted(self._teachers)})"
            ) from None

    def __iter__(self) -> Iterator[Teacher]:
        return iter(self._teachers.values())

    def shutdown(self) -> None:
        for t in self._teachers.values():
            t.engine.shutdown()
