"""Work units of a distributed precompute: a dataset's share for each of N workers.

A dataset's sequences, in input order, are cut into units of ``unit_sequences`` consecutive
sequences; worker ``I`` of ``N`` does the units ``u`` with ``u % N == I``. The cut depends only
on the input and the unit size, never on N or on which worker runs first, so any worker can be
killed and retried (it skips what is sealed, as every precompute does), and the dataset, whose
key list every worker publishes alike (create-only: the first one wins), is the one a single
worker would build. It completes once every unit is sealed: the last worker to finish marks it
complete, or ``logitcache precompute --finalize`` does (and says which units are missing).
Progress is the store's own: which of the dataset's keys are sealed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from logitcache.client.errors import FailedPrecondition, InvalidArgument
from logitcache.server.leases import dataset_lease
from logitcache.server.store.store import Store

DEFAULT_UNIT_SEQUENCES = 256
WORKER_INDEX_ENV = "JOB_COMPLETION_INDEX"  # what a Kubernetes Indexed Job sets in each pod
_T = TypeVar("_T")
_U = TypeVar("_U")


@dataclass(frozen=True)
class WorkShare:
    """The units one run does: all of them (one worker), or unit set ``worker`` of ``workers``."""

    worker: int = 0
    workers: int = 1
    unit_sequences: int = DEFAULT_UNIT_SEQUENCES

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise InvalidArgument("workers must be at least 1", fields=("workers",))
        if not 0 <= self.worker < self.workers:
            raise InvalidArgument(
                f"worker {self.worker} is not in 0..{self.workers - 1} (workers {self.workers})",
                fields=("worker",),
            )
        if self.unit_sequences < 1:
            raise InvalidArgument("unit_sequences must be at least 1", fields=("unit_sequences",))

    @classmethod
    def of(cls, worker: int | None, workers: int, unit_sequences: int) -> WorkShare:
        """The share of a command line: the worker index given, or else the one the scheduler
        put in ``JOB_COMPLETION_INDEX``; needed only with more than one worker."""
        if worker is None and workers > 1:
            index = os.environ.get(WORKER_INDEX_ENV, "")
            if not index.isdigit():
                raise InvalidArgument(
                    f"with {workers} workers, each run needs its index: worker I (0..{workers - 1}) "
                    f"or {WORKER_INDEX_ENV}, which a Kubernetes Indexed Job sets",
                    fields=("worker",),
                )
            worker = int(index)
        return cls(worker or 0, workers, unit_sequences)

    @property
    def distributed(self) -> bool:
        return self.workers > 1

    def mine(self, count: int) -> np.ndarray:
        """Which of ``count`` sequences (in input order) are this worker's: bool [count]."""
        return (np.arange(count) // self.unit_sequences) % self.workers == self.worker

    def select(self, keys: Sequence[_T], items: Sequence[_U]) -> tuple[list[_T], list[_U]]:
        """The keys and items (one per sequence) that are this worker's, in order."""
        if not self.distributed:
            return list(keys), list(items)
        picked = np.flatnonzero(self.mine(len(keys))).tolist()
        return [keys[i] for i in picked], [items[i] for i in picked]

    def lease(self, dataset: str) -> str:
        """The lease a worker holds while it works: two runs of one share never overlap."""
        return f"{dataset_lease(dataset)}/units-{self.worker}-of-{self.workers}"

    def to_json(self) -> dict[str, int]:
        """What a dataset's provenance records of the split (``work_units``)."""
        return {"unit_sequences": self.unit_sequences, "workers": self.workers}


@dataclass(frozen=True)
class UnitProgress:
    """Which of a dataset's work units are sealed (a dataset built by one run: one unit)."""

    unit_sequences: int
    workers: int
    units: int
    missing: tuple[int, ...]  # units with a sequence not sealed yet

    @property
    def sealed_units(self) -> int:
        return self.units - len(self.missing)

    @property
    def complete(self) -> bool:
        return not self.missing

    @property
    def workers_left(self) -> list[int]:
        """The workers whose units are missing."""
        return sorted({u % self.workers for u in self.missing})

    def describe(self) -> str:
        done = f"{self.sealed_units:,} of {self.units:,} work units sealed"
        if self.complete:
            return done
        shown = ", ".join(str(u) for u in self.missing[:10])
        more = f" and {len(self.missing) - 10:,} more" if len(self.missing) > 10 else ""
        workers = ", ".join(str(w) for w in self.workers_left)
        return f"{done}; missing units {shown}{more} (workers {workers} of {self.workers})"

    def to_json(self) -> dict:
        return {
            "unit_sequences": self.unit_sequences,
            "workers": self.workers,
            "units": self.units,
            "sealed_units": self.sealed_units,
            "missing_units": list(self.missing),
            "workers_left": self.workers_left,
        }


def unit_progress(store: Store, name: str) -> UnitProgress:
    """The dataset's units as its provenance's ``work_units`` cut them, against the segments
    sealed now (the store is looked at again first)."""
    ds = store.dataset(name)
    split = ds.provenance.get("work_units") or {}
    count = len(ds)
    unit_sequences = int(split.get("unit_sequences", max(count, 1)))
    store.refresh()
    sealed = np.fromiter((store.contains(bytes(k)) for k in ds.raw_keys), bool, count)
    missing = np.unique(np.flatnonzero(~sealed) // unit_sequences)
    return UnitProgress(
        unit_sequences=unit_sequences,
        workers=int(split.get("workers", 1)),
        units=-(-count // unit_sequences),
        missing=tuple(missing.tolist()),
    )


def finish(store: Store, name: str) -> UnitProgress:
    """Mark the dataset complete if every unit is sealed (any worker may, more than once)."""
    progress = unit_progress(store, name)
    if progress.complete and not store.dataset(name).complete:
        store.mark_complete(name)
    return progress


def finalize(store: Store, name: str) -> UnitProgress:
    """:func:`finish`, as a last step: FailedPrecondition naming the missing units if any."""
    progress = finish(store, name)
    if not progress.complete:
        raise FailedPrecondition(
            f"dataset {name!r} in {store.url} is not complete: {progress.describe()}; run those "
            "workers again (they resume from what they sealed), then finalize again"
        )
    return progress
