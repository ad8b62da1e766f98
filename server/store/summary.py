"""Summaries of a store: what ``logitcache inspect`` prints, and what the server lists.

:func:`store_summary` describes a store once, from scratch (the CLI). :class:`StoreSummaries` is
the server's: listings, descriptions and totals kept between calls and brought up to date in a
worker thread, so that nothing proportional to the store runs on the event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from logitcache.client.errors import NotFound
from logitcache.client.space import KEY_BYTES
from logitcache.server.store.store import Store, StoreTotals, validate_dataset_name

log = logging.getLogger(__name__)
RECOUNT_S = 1.0  # a building dataset's sealed count is recounted at most this often


def store_summary(store: Store, dataset: str | None = None) -> dict:
    """A JSON-able description of a store (or of one dataset in it)."""
    spaces = []
    for space in store.spaces():
        totals = store.totals(space.space_id)
        positions, nbytes = totals.positions, totals.stored_bytes
        spaces.append(
            {
                **space.to_json(),
                "segments": totals.segments,
                "records": totals.records,
                "positions": positions,
                "bytes": nbytes,
                "bytes_per_position": nbytes / positions if positions else None,
            }
        )
    per_position = {s["space_id"]: s["bytes_per_position"] for s in spaces}
    names = [dataset] if dataset is not None else store.datasets()
    datasets = []
    for name in names:
        ds = store.dataset(name)
        bpp = per_position.get(ds.space.space_id)
        sealed = len(ds) if ds.manifest["state"] == "complete" else ds.sealed_count()
        datasets.append(
            {
                **dataset_entry(ds.manifest, len(ds), sealed),
                "unique_sequences": len(np.unique(_key_items(ds.raw_keys))),
                "estimated_bytes": round(bpp * ds.positions) if bpp else None,
            }
        )
    return {"store": store.url, "spaces": spaces, "datasets": datasets}


def dataset_entry(manifest: dict, sequences: int, sealed: int) -> dict:
    """One dataset as listings show it, from its manifest and its counts."""
    space = manifest["capture_space"]
    return {
        "name": manifest["name"],
        "state": manifest["state"],
        "space_id": space["space_id"],
        "space": space,
        "sequences": sequences,
        "sealed_sequences": sealed,
        "positions": int(manifest["positions"]),
        "created_at": manifest["created_at"],
        "completed_at": manifest["completed_at"],
        "provenance": manifest["provenance"],
    }


def _key_items(keys: np.ndarray) -> np.ndarray:
    """Keys uint8 [n, 16] as n items of 16 bytes (so numpy compares whole keys)."""
    return np.ascontiguousarray(keys, dtype=np.uint8).view(np.dtype((np.void, KEY_BYTES))).ravel()


@dataclass(frozen=True)
class _Listed:
    """One dataset as last looked at: its listing entry, or the error that reading it raised."""

    modified: float  # its manifest's modification time then
    entry: dict | None
    error: Exception | None = None
    keys: np.ndarray | None = None  # kept while it is not complete, to recount what is sealed
    counted_generation: int = -1
    counted_at: float = -math.inf  # time.monotonic()


class StoreSummaries:
    """The server's listings, descriptions and totals of its store, never computed on the loop.

    They are brought up to date in one worker thread and kept. An answer is reused while nothing
    changed in this process (``Store.generation``: a segment sealed or seen, a dataset created,
    marked or deleted); every ``refresh_seconds`` the worker looks at the store again, so that
    datasets and segments written by other processes show within that bound, and a description
    of a dataset not seen yet looks first. What a complete dataset holds is in its manifest; the
    sealed count of one still building is recounted (in chunks, yielding the GIL) at most every
    :data:`RECOUNT_S`.
    """

    def __init__(self, store: Store, *, refresh_seconds: float | None = None) -> None:
        self.store = store
        self.refresh_seconds = refresh_seconds
        self.totals = StoreTotals(0, 0, 0, 0, 0)  # as of the last update
        self.updated_at = -math.inf  # time.monotonic() at the start of the last update
        self._listed: dict[str, _Listed] = {}
        self._generation = -1  # the store's generation that the listing reflects
        self._refreshed_at = -math.inf  # start of the last update that refreshed the store
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-summary")
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        """Make the first listing, then look again every ``refresh_seconds`` (if set)."""
        await self._update(refresh=False)
        if self.refresh_seconds:
            self._task = asyncio.get_running_loop().create_task(self._refresh_periodically())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._worker.shutdown(wait=False, cancel_futures=True)

    async def datasets(self) -> list[dict]:
        """Every dataset's entry, sorted by name (an unreadable one raises its error)."""
        if self._generation != self.store.generation:
            await self._update(refresh=False)
        listed = self._listed
        return [_entry_of(listed[name]) for name in sorted(listed)]

    async def dataset(self, name: str) -> dict:
        """One dataset's entry; one not seen yet is looked for in the store before NotFound."""
        validate_dataset_name(name)
        if self._generation != self.store.generation:
            await self._update(refresh=False)
        if name not in self._listed:  # written by another process since the last look?
            await self._update(refresh=True)
        listed = self._listed.get(name)
        if listed is None:
            raise NotFound(f"dataset {name!r} is not in store {self.store.url}")
        return _entry_of(listed)

    async def _update(self, *, refresh: bool) -> None:
        asked = time.monotonic()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._worker, self._update_now, asked, refresh)

    async def _refresh_periodically(self) -> None:
        assert self.refresh_seconds
        while True:
            await asyncio.sleep(self.refresh_seconds)
            try:
                await self._update(refresh=True)
            except Exception:  # a store that cannot be listed now may be listable next time
                log.warning("looking at store %s again failed", self.store.url, exc_info=True)

    def _update_now(self, asked: float, refresh: bool) -> None:
        """Bring everything up to date (in the worker); calls that waited for an update which
        started after they asked share its result."""
        if (self._refreshed_at if refresh else self.updated_at) >= asked:
            return
        started = time.monotonic()
        if refresh:
            self.store.refresh()
        generation = self.store.generation  # read first: later changes mean another update
        listed = {}
        for name in self.store.datasets():
            seen = self._look(name, self._listed.get(name), generation)
            if seen is not None:
                listed[name] = seen
        self.totals = self.store.totals()
        self._listed = listed
        self._generation = generation
        self.updated_at = started
        if refresh:
            self._refreshed_at = started

    def _look(self, name: str, old: _Listed | None, generation: int) -> _Listed | None:
        """One dataset now, from ``old`` where its manifest has not changed (None: gone)."""
        backend = self.store.backend
        rel = f"datasets/{name}/dataset.json"
        try:
            modified = backend.modified_at(rel)
        except NotFound:
            return None  # deleted meanwhile
        building = old is not None and old.entry is not None and old.entry["state"] != "complete"
        if old is not None and old.modified == modified and not building:
            return old  # complete and unchanged, or unreadable and unchanged
        try:
            manifest = backend.read_json(rel)
            if manifest["state"] == "complete" and "sequences" in manifest:
                sequences = int(manifest["sequences"])
                return _Listed(modified, dataset_entry(manifest, sequences, sequences))
            keys = old.keys if building and old is not None else None
            if keys is None or old is None or old.modified != modified:
                keys = self.store.dataset(name).raw_keys
            elif (
                generation == old.counted_generation
                or time.monotonic() - old.counted_at < RECOUNT_S
            ):
                assert old.entry is not None  # counted lately: the manifest may be newer
                entry = dataset_entry(manifest, len(keys), old.entry["sealed_sequences"])
                return _Listed(modified, entry, None, keys, old.counted_generation, old.counted_at)
            if manifest["state"] == "complete":  # a manifest of an older store: no count in it
                return _Listed(modified, dataset_entry(manifest, len(keys), len(keys)))
            counted_at = time.monotonic()
            entry = dataset_entry(manifest, len(keys), self.store.count_sealed(keys))
            return _Listed(modified, entry, None, keys, generation, counted_at)
        except NotFound:
            return None
        except Exception as e:  # a damaged dataset: its own answers fail, the others' do not
            return _Listed(modified, None, e)


def _entry_of(listed: _Listed) -> dict:
    if listed.error is not None:
        raise listed.error
    assert listed.entry is not None
    return listed.entry


def format_summary(summary: dict) -> str:
    """Human-readable form of :func:`store_summary`."""
    lines = [f"store {summary['store']}"]
    lines.append(f"capture spaces: {len(summary['spaces'])}")
    for s in summary["spaces"]:
        bpp = s["bytes_per_position"]
        lines += [
            f"  {s['space_id']}  mode={s['mode']} k={s['k']} vocab={s['vocab_size']} "
            f"dtype={s['engine_dtype']} codec={s['codec']}",
            f"    teacher {s['teacher_fingerprint'][:16]}  tokenizer {s['tokenizer_fingerprint'][:16]}",
            f"    {s['segments']} segments, {s['records']:,} records, {s['positions']:,} positions, "
            f"{_size(s['bytes'])} on disk"
            + (f", {bpp:.1f} bytes/position (naive int32+fp32: {8 * s['k']})" if bpp else ""),
        ]
    lines.append(f"datasets: {len(summary['datasets'])}")
    for d in summary["datasets"]:
        p = d["provenance"]
        lines += [
            f"  {d['name']}  [{d['state']}]  space {d['space_id']}",
            f"    {d['sequences']:,} sequences ({d['unique_sequences']:,} unique, "
            f"{d['sealed_sequences']:,} sealed), {d['positions']:,} positions"
            + (f", ~{_size(d['estimated_bytes'])}" if d["estimated_bytes"] else ""),
            f"    teacher {p['teacher']} ({p['teacher_architecture']}), license: "
            f"{p['license'] or 'not declared'}, requester: {p['requester']}",
            f"    source {p['source']['path']} (sha256 {p['source']['sha256'][:16]}), "
            f"created {_when(d['created_at'])}"
            + (f", completed {_when(d['completed_at'])}" if d["completed_at"] else ""),
        ]
        skipped = p["source"].get("skipped_rows") or {}
        if skipped or p["source"].get("truncated_rows") or p["source"].get("split_rows"):
            lines.append(
                f"    input: skipped {json.dumps(skipped)}, truncated {p['source']['truncated_rows']}, "
                f"split {p['source']['split_rows']}"
            )
    return "\n".join(lines)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n} B"


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))
