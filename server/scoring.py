"""Scoring ids: the teacher's log-probs of ids the caller chooses, at every position.

A trainer sends sequences with, per position, a set of ids (a student's own top-k, for reverse KL
on the student's support); the teacher computes each position's full log-softmax on the engine's
device (``CaptureRequest.scoring``) and only the requested ids come back. Scoring is not caching:
nothing new is stored, every call computes its sequences (and is charged for them), and the
stored record of a sequence is returned beside its scores where the store has one, found by the
key the read-through cache files it under (the teacher's default capture space).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np

from logitcache.client.errors import InvalidArgument
from logitcache.client.space import record_key
from logitcache.server.engine.columns import CaptureRequest
from logitcache.server.policy.decision import UseRequest
from logitcache.server.policy.filters import FilterAction, screen_sequences
from logitcache.server.readthrough import INTERACTIVE_PRIORITY, ReadThroughCache
from logitcache.server.spool import teacher_detokenize
from logitcache.server.store.read import EncodedBatch, gather, locate
from logitcache.server.teachers.registry import Teacher


@dataclass(frozen=True)
class IdSets:
    """The ids to score at each position of one sequence: ``ids`` of every position
    concatenated in position order, ``counts[t]`` of them at position t."""

    ids: np.ndarray  # int64 [sum(counts)]
    counts: np.ndarray  # int64 [T]

    def padded(self) -> np.ndarray:
        """int64 [T, max(counts)]: each position's ids in order, then -1 (none)."""
        width = int(self.counts.max(initial=0))
        out = np.full((len(self.counts), width), -1, dtype=np.int64)
        rows, cols = self.where()
        out[rows, cols] = self.ids
        return out

    def where(self) -> tuple[np.ndarray, np.ndarray]:
        """Position and column of every id in :meth:`padded`, in request order."""
        rows = np.repeat(np.arange(len(self.counts)), self.counts)
        starts = np.cumsum(self.counts) - self.counts
        return rows, np.arange(len(self.ids)) - np.repeat(starts, self.counts)


@dataclass(frozen=True)
class Scored:
    """Per sequence, the log-probs (float32, T = 1) of its ids in request order; the stored
    records of the sequences the store has, in order (``stored.found``: their indices)."""

    logprobs: list[np.ndarray]
    stored: EncodedBatch

    @property
    def has_stored(self) -> list[bool]:
        present = np.zeros(len(self.logprobs), dtype=bool)
        present[self.stored.found] = True
        return present.tolist()


def check_id_sets(
    sequences: list[np.ndarray],
    id_sets: list[IdSets],
    vocab_size: int,
    max_ids_per_position: int,
) -> None:
    """INVALID_ARGUMENT naming the first sequence whose id sets do not fit it, or that asks for
    more than ``max_ids_per_position`` ids at a position (the server's setting)."""
    if len(id_sets) != len(sequences):
        raise InvalidArgument(
            f"{len(id_sets)} id sets for {len(sequences)} sequences: send one per sequence",
            fields=["ids"],
        )
    for i, (ids, sets) in enumerate(zip(sequences, id_sets, strict=True)):
        if len(sets.counts) != len(ids):
            raise InvalidArgument(
                f"sequence {i}: {len(sets.counts)} id counts for {len(ids)} positions",
                fields=["ids"],
            )
        if int(sets.counts.sum()) != len(sets.ids):
            raise InvalidArgument(
                f"sequence {i}: the counts add up to {int(sets.counts.sum())}, but "
                f"{len(sets.ids)} ids were sent",
                fields=["ids"],
            )
        widest = int(sets.counts.max(initial=0))
        if widest > max_ids_per_position:
            raise InvalidArgument(
                f"sequence {i}: {widest} ids at position {int(sets.counts.argmax())}; at most "
                f"{max_ids_per_position} per position (the server's max_ids_per_position)",
                fields=["ids"],
            )
        bad = np.flatnonzero((sets.ids < 0) | (sets.ids >= vocab_size))
        if bad.size:
            raise InvalidArgument(
                f"sequence {i}: id {int(sets.ids[bad[0]])} is outside the vocabulary "
                f"[0, {vocab_size})",
                fields=["ids"],
            )


class IdScorer:
    """Scores ids on a teacher's engine, with the read-through cache's licence policy and its
    view of the store (the records it serves are the ones returned beside the scores), at most
    ``max_ids_per_position`` ids per position (``ServerConfig.max_ids_per_position``)."""

    def __init__(self, readthrough: ReadThroughCache, max_ids_per_position: int) -> None:
        self.readthrough = readthrough
        self.max_ids_per_position = max_ids_per_position

    async def score(
        self,
        teacher: Teacher,
        sequences: list[np.ndarray],
        id_sets: list[IdSets],
        *,
        use: UseRequest | None = None,
        user: str | None = None,
    ) -> tuple[Scored, int]:
        """The scores of ``id_sets`` on ``sequences`` and the positions computed for them
        (every position of every sequence with an id to score)."""
        self.readthrough.admit(teacher, use, user)
        teacher.check_sequences(sequences)
        check_id_sets(sequences, id_sets, teacher.info.vocab_size, self.max_ids_per_position)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._screen, teacher, sequences)
        stored = loop.run_in_executor(None, self._stored, teacher, sequences)
        scores = await asyncio.gather(
            *(
                self._score_one(teacher, ids, sets)
                for ids, sets in zip(sequences, id_sets, strict=True)
            )
        )
        computed = sum(
            len(ids) for ids, sets in zip(sequences, id_sets, strict=True) if len(sets.ids)
        )
        return Scored(list(scores), await stored), computed

    @staticmethod
    async def _score_one(teacher: Teacher, ids: np.ndarray, sets: IdSets) -> np.ndarray:
        if not len(sets.ids):
            return np.empty(0, dtype=np.float32)
        request = CaptureRequest().scoring(sets.padded())
        columns = await teacher.engine.capture_columns(ids, request, INTERACTIVE_PRIORITY)
        return columns.scored_logprobs[sets.where()]

    def _screen(self, teacher: Teacher, sequences: list[np.ndarray]) -> None:
        """The sensitive-data filter on every sequence (each reaches the teacher), as on
        read-through's misses: INVALID_ARGUMENT naming the first one with findings, unless the
        server's filter allows them."""
        filter_ = self.readthrough.admission.filter()
        if filter_.action is FilterAction.ALLOW:
            return
        detokenize = teacher_detokenize(teacher.info)
        screen_sequences(filter_, len(sequences), sequences.__getitem__, detokenize,
                         filter_.report())  # fmt: skip

    def _stored(self, teacher: Teacher, sequences: list[np.ndarray]) -> EncodedBatch:
        """The sealed records of ``sequences`` in the teacher's default space."""
        space = teacher.space(teacher.resolve_k(0))
        keys = [record_key(space.space_id, ids) for ids in sequences]
        slices = locate(self.readthrough.store, self.readthrough.loaded, keys)
        if self.readthrough.on_hits is not None:  # read like any hit (retention)
            self.readthrough.on_hits([s.key for s in slices if s is not None])
        found = np.array([i for i, s in enumerate(slices) if s is not None], dtype=np.int64)
        return gather(space, [s for s in slices if s is not None], found)
