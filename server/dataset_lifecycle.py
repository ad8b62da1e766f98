"""Ending a dataset that no job will finish: finish it as partial, or delete it.

A cancelled job, or one whose server is gone with no other server to take it over, leaves its
dataset ``building`` for ever. Finishing marks it ``partial`` (``complete`` if every record is
sealed after all): readers know it will not grow, and stream its sealed part with
``allow_partial``. Deleting removes its manifest and key list; its records stay for other
datasets, until ``gc`` collects those no dataset references. Both hold the dataset's lease while
they change it, so they are refused while a precompute or a server's job builds the dataset, and
both mark its unfinished jobs cancelled, so that no server resumes them later.

Resuming needs the job's input and a teacher: a server does it (``JobManager.resume_dataset``),
or the same ``logitcache precompute`` command run again.
"""

from __future__ import annotations

from dataclasses import dataclass

from logitcache.client.errors import FailedPrecondition
from logitcache.server.jobs import end_jobs
from logitcache.server.leases import LeaseStore, claimed, dataset_lease, leases_for
from logitcache.server.store.store import Store, validate_dataset_name

_WHEN_HELD = (
    "it is being built; cancel its job (or stop its precompute) first, or wait for it to finish"
)


@dataclass(frozen=True)
class DatasetEnd:
    """What finishing or deleting did: the dataset's state after it, and the jobs it ended."""

    dataset: str
    state: str  # "partial", "complete" or "deleted"
    ended_jobs: list[str]


def finish_dataset(store: Store, name: str, leases: LeaseStore | None = None) -> DatasetEnd:
    """Mark a building dataset ended: ``partial``, or ``complete`` if all its records are sealed.
    ``leases``: the store's lease store (default: its files; a server passes its shared one)."""
    validate_dataset_name(name)
    with claimed(leases or leases_for(store), dataset_lease(name), "logitcache datasets finish",
                 what=f"dataset {name!r}", todo=_WHEN_HELD):  # fmt: skip
        ds = store.dataset(name)
        state = ds.manifest["state"]
        if state != "building":
            raise FailedPrecondition(f"dataset {name!r} is {state} already: nothing to finish")
        ended = end_jobs(store, name, "its dataset was finished as partial")
        state = "complete" if ds.sealed_count() == len(ds) else "partial"
        store.mark_state(name, state)
    return DatasetEnd(name, state, [j.id for j in ended])


def delete_dataset(store: Store, name: str, leases: LeaseStore | None = None) -> DatasetEnd:
    """Remove a dataset's manifest and key list (its records stay, for ``gc``)."""
    validate_dataset_name(name)
    with claimed(leases or leases_for(store), dataset_lease(name), "logitcache datasets delete",
                 what=f"dataset {name!r}", todo=_WHEN_HELD):  # fmt: skip
        store.dataset(name)  # NotFound
        ended = end_jobs(store, name, "its dataset was deleted")
        store.delete_dataset(name)
    return DatasetEnd(name, "deleted", [j.id for j in ended])
