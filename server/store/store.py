"""The store: capture spaces, sealed segments, an index from key to record, and datasets.

Layout under the store URL:
    logitcache-store.json                        store format marker
    spaces/<space_id>/space.json                 the capture space (teacher, tokenizer, k, codec)
    spaces/<space_id>/segments/<segment_id>/     sealed segments (zarr groups), never modified
    spaces/<space_id>/unsealed/<segment_id>/     segments being written; ignored by readers
                                                 (on object storage segments are written in
                                                 place: one without its zarr.json is unsealed)
    datasets/<name>/dataset.json                 manifest: state, capture space, provenance
    datasets/<name>/keys/  (zarr)                the dataset's ordered record keys
    datasets/.unsealed/<id>/                     datasets being written, published create-only

Every byte goes through the store's backend (``backend``), chosen by the store URL: a local
directory, or ``s3://bucket/prefix`` (``store.objectstore``).

When several segments hold one key, the answer is the copy in the segment sealed first (the
smallest ``SegmentReader.order``: the time of sealing, then the id), and every handle gives the
same answer whatever order it found the segments in.

Several processes, on several machines, may share one store: each handle sees what the others
sealed at its next :meth:`Store.refresh` (a server refreshes every ``store_refresh_seconds``, and
at once for a record it does not know yet), so its view is at most that old.
"""

from __future__ import annotations

import functools
import math
import re
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np
import zarr

from logitcache.client.errors import AlreadyExists, InvalidArgument, NotFound
from logitcache.client.record import Record
from logitcache.client.space import KEY_BYTES, CaptureSpace
from logitcache.server.names import shown
from logitcache.server.store.backend import StoreBackend, backend_for_url, json_bytes

if TYPE_CHECKING:
    from logitcache.server.store.objectstore import S3Settings
from logitcache.server.store.cache import SegmentCache
from logitcache.server.store.gc import condemned_segments, other_copies, withdrawn_segments
from logitcache.server.store.liveness import writer_gone
from logitcache.server.store.masks import DatasetMasks, Masks, open_masks, write_masks
from logitcache.server.store.read import EncodedBatch, read_batch
from logitcache.server.store.reader import SegmentReader, Unsealed
from logitcache.server.store.segments import segments_dir, shard_rows, unsealed_dir, zarr_array
from logitcache.server.store.writer import CapturedRecord, write_segment

STORE_FORMAT = "logitcache-store-v1"
STORE_MARKER = "logitcache-store.json"  # at the root of every store
DEFAULT_SEGMENT_CACHE_BYTES = 1 << 30  # a handle's own segment cache (a trainer's, say)
_DATASET_PUBLISH_GRACE_S = 3600.0  # publishing a dataset's key list takes seconds, not hours
_KEY_DTYPE = np.dtype((np.void, KEY_BYTES))  # one key as one item: .tolist() gives its bytes
_COUNT_CHUNK = 8192  # keys per GIL-holding pass of count_sealed (about a millisecond)
_DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# Folders whose entries are published create-only (``backend.publish``): where a publisher that
# died can have left a half-published name.
_PUBLISHED_PARENTS = ("datasets", "jobs")
_OPEN_THREADS = 8


def validate_dataset_name(name: str) -> str:
    """The name itself, if it is 1-128 printable characters of a small set with no whitespace
    anywhere (so no name looks like another); refused naming only a short prefix of it."""
    if not _DATASET_NAME.fullmatch(name):
        raise InvalidArgument(
            f"dataset name {shown(name)}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


@dataclass(frozen=True)
class Location:
    segment: SegmentReader
    index: int


@dataclass(frozen=True)
class StoreTotals:
    """What the sealed segments hold (of one capture space, or of the whole store)."""

    spaces: int
    segments: int
    records: int
    positions: int
    stored_bytes: int


class Dataset:
    """A named, ordered list of record keys with provenance; ``ds[i]`` is a :class:`Record`."""

    def __init__(self, store: Store, manifest: dict, keys: np.ndarray) -> None:
        self._store = store
        self.manifest = manifest
        self.name: str = manifest["name"]
        self.space = CaptureSpace.from_json(manifest["capture_space"])
        self._keys = keys

    def __len__(self) -> int:
        return int(self._keys.shape[0])

    def __getitem__(self, i: int) -> Record:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"dataset {self.name!r} has {n} sequences; index {i} is out of range")
        record = self._store.get(bytes(self._keys[i % n]))
        masks = self.loss_masks
        return record if masks is None else replace(record, loss_mask=masks[i % n])

    def __iter__(self) -> Iterator[Record]:
        for i in range(len(self)):
            yield self[i]

    def read(
        self,
        indices: Sequence[int] | np.ndarray,
        *,
        allow_missing: bool = False,
        cache: SegmentCache | None = None,
    ) -> EncodedBatch:
        """Records at ``indices`` as one encoded batch (``decode()`` it for Records).

        ``found`` in the batch indexes ``indices``; records not sealed yet are left out with
        ``allow_missing``, and are FailedPrecondition without it.
        """
        at = np.asarray(indices, dtype=np.int64)
        blob = self._keys[at].tobytes()
        keys = [blob[i : i + KEY_BYTES] for i in range(0, len(blob), KEY_BYTES)]
        return read_batch(
            self._store,
            cache or self._store.segment_cache,
            self.space,
            keys,
            allow_missing=allow_missing,
            label=lambda i: f"record {int(at[i])} of dataset {self.name!r}",
        )

    @property
    def complete(self) -> bool:
        """Whether the dataset's job has finished (read afresh: it may finish while we read)."""
        if self.manifest["state"] != "complete":
            self.manifest = self._store.backend.read_json(f"datasets/{self.name}/dataset.json")
        return self.manifest["state"] == "complete"

    @cached_property
    def loss_masks(self) -> DatasetMasks | None:
        """The per-position loss masks of a chat dataset (``store.masks``); None: every
        position counts."""
        return open_masks(self._store.backend, f"datasets/{self.name}")

    def raw_key(self, i: int) -> bytes:
        return bytes(self._keys[i])

    @property
    def raw_keys(self) -> np.ndarray:
        """Every key, uint8 [n, 16], in dataset order."""
        return self._keys

    @property
    def keys(self) -> list[str]:
        return [bytes(k).hex() for k in self._keys]

    @property
    def provenance(self) -> dict:
        return self.manifest["provenance"]

    @property
    def positions(self) -> int:
        return int(self.manifest["positions"])

    def sealed_count(self) -> int:
        """How many of the dataset's sequences can be read now (all of them once complete)."""
        self._store.refresh()
        return self._store.count_sealed(self._keys)

    def __repr__(self) -> str:
        return f"Dataset({self.name!r}, sequences={len(self)}, state={self.manifest['state']})"


class Store:
    """A handle on a store. Read-only handles never write; writer handles create what they need."""

    def __init__(self, backend: StoreBackend, *, read_only: bool) -> None:
        self.backend = backend
        self.read_only = read_only
        self._spaces: dict[str, CaptureSpace] = {}
        self._segments: dict[str, SegmentReader] = {}
        self._index: dict[bytes, Location] = {}
        # segments, records, positions, stored bytes per space; segments of older stores do not
        # carry their stored bytes: those are measured once, when totals are first asked for.
        self._counts: dict[str, list[int]] = {}
        self._unsized: list[SegmentReader] = []
        self._sizing = threading.Lock()
        self._segment_cache: SegmentCache | None = None
        # Segments are sealed from writer threads while the event loop reads the index.
        self._lock = threading.RLock()
        self._refreshing = threading.Lock()  # one look at the backend at a time
        self._refresh_started = -math.inf  # time.monotonic() at the start of the last look
        # Bumped whenever what this handle knows changes (a segment or dataset added, marked or
        # dropped, here or seen by a refresh): summaries of the store are current while it holds.
        self.generation = 0
        self.refresh()

    @property
    def url(self) -> str:
        return self.backend.url

    @property
    def segment_cache(self) -> SegmentCache:
        """This handle's own segment cache, for batched reads that bring none."""
        with self._lock:
            if self._segment_cache is None:
                self._segment_cache = SegmentCache(DEFAULT_SEGMENT_CACHE_BYTES)
            return self._segment_cache

    # -- spaces ---------------------------------------------------------------------------------

    def spaces(self) -> list[CaptureSpace]:
        with self._lock:
            return list(self._spaces.values())

    def space(self, space_id: str) -> CaptureSpace:
        try:
            return self._spaces[space_id]
        except KeyError:
            raise NotFound(f"capture space {space_id!r} is not in store {self.url}") from None

    def ensure_space(self, space: CaptureSpace) -> None:
        """Record a capture space (idempotent: the document is a function of its id)."""
        if space.space_id in self._spaces:
            return
        self.backend.create(f"spaces/{space.space_id}/space.json", json_bytes(space.to_json()))
        with self._lock:
            self._spaces.setdefault(space.space_id, space)

    # -- records --------------------------------------------------------------------------------

    def refresh(self) -> None:
        """Pick up capture spaces and segments sealed since the last look.

        Concurrent callers share looks: one that waited while a look started after it asked
        takes that look's result. The backend is listed without the index lock, which is held
        only while a segment's keys go into the index, so lookups never wait for a listing.
        """
        asked = time.monotonic()
        with self._refreshing:
            if self._refresh_started >= asked:
                return
            started = time.monotonic()
            self._refresh()
            self._refresh_started = started

    def _refresh(self) -> None:
        for space_id in self.backend.list_dir("spaces"):
            if space_id not in self._spaces:
                if not self.backend.exists(f"spaces/{space_id}/space.json"):
                    continue
                doc = self.backend.read_json(f"spaces/{space_id}/space.json")
                self._spaces[space_id] = CaptureSpace.from_json(doc)
            space = self._spaces[space_id]
            with self._lock:  # known before the listing, so published before it
                known = {s for s, r in self._segments.items() if r.space.space_id == space_id}
            listed = self.backend.list_dir(segments_dir(space_id))
            withdrawn = self._forget_withdrawn(space_id, known, listed)
            new = [s for s in listed if s not in self._segments and s not in withdrawn]
            # Opening a segment reads its index arrays: a few requests each on object storage,
            # so a store's segments are opened several at a time.
            with ThreadPoolExecutor(min(_OPEN_THREADS, max(1, len(new)))) as pool:
                for reader in pool.map(functools.partial(self._open_segment, space), new):
                    if reader is not None:
                        self._add_segment(reader)

    def _open_segment(self, space: CaptureSpace, segment_id: str) -> SegmentReader | None:
        """A listed segment's reader; None if it is not sealed yet or was collected meanwhile."""
        try:
            return SegmentReader(self.backend, space, segment_id)
        except Unsealed:  # being written in place: indexed once it is sealed
            return None
        except Exception:  # collected since the listing: nothing to index
            if self.backend.exists(f"{segments_dir(space.space_id)}/{segment_id}"):
                raise
            return None

    def _forget_withdrawn(self, space_id: str, known: set[str], listed: list[str]) -> set[str]:
        """Forget the ``known`` segments that gc collected or condemned (see ``store.gc``);
        returns the condemned ones, which are not to be indexed again."""
        withdrawn = condemned_segments(self.backend, space_id)
        self.forget_segments(known - (set(listed) - withdrawn))
        return withdrawn

    def forget_segments(self, segment_ids: Iterable[str]) -> int:
        """Stop answering from these segments (collected, or about to be): their keys point at
        another sealed copy if this handle knows one, else they are absent. Returns how many."""
        with self._lock:
            dropped = [self._segments.pop(s) for s in list(segment_ids) if s in self._segments]
            self.generation += bool(dropped)
            orphans: list[bytes] = []
            for reader in dropped:
                blob = reader.keys.tobytes()
                for i in range(len(reader)):
                    key = blob[i * KEY_BYTES : (i + 1) * KEY_BYTES]
                    held = self._index.get(key)
                    if held is not None and held.segment is reader:
                        del self._index[key]
                        orphans.append(key)
                counts = self._counts[reader.space.space_id]
                counts[0] -= 1
                counts[1] -= len(reader)
                counts[2] -= reader.positions
                if reader in self._unsized:
                    self._unsized.remove(reader)
                else:
                    counts[3] -= reader.stored_bytes
            if orphans:  # rare (two sealed copies of a key): one vectorised look over the rest
                for reader, i in other_copies(list(self._segments.values()), orphans):
                    key = bytes(reader.keys[i])
                    held = self._index.get(key)
                    if held is None or reader.order < held.segment.order:
                        self._index[key] = Location(reader, i)
            if dropped:
                self.generation += 1
            return len(dropped)

    def _add_segment(self, reader: SegmentReader) -> None:
        segment_id, space = reader.segment_id, reader.space
        blob = reader.keys.tobytes()
        with self._lock:
            if segment_id in self._segments:
                return
            self._segments[segment_id] = reader
            for i in range(len(reader)):
                key = blob[i * KEY_BYTES : (i + 1) * KEY_BYTES]
                held = self._index.get(key)
                # The first sealed copy of a key is the answer (the smallest order).
                if held is None or reader.order < held.segment.order:
                    self._index[key] = Location(reader, i)
            self.generation += 1
            counts = self._counts.setdefault(space.space_id, [0, 0, 0, 0])
            counts[0] += 1
            counts[1] += len(reader)
            counts[2] += reader.positions
            if reader.stored_bytes_known:
                counts[3] += reader.stored_bytes
            else:
                self._unsized.append(reader)

    def totals(self, space_id: str | None = None) -> StoreTotals:
        """Totals of the sealed segments this handle has indexed, kept as segments are added."""
        with self._sizing:
            with self._lock:
                unsized, self._unsized = self._unsized, []
            sizes = [(r.space.space_id, r.stored_bytes) for r in unsized]  # outside the lock
            with self._lock:
                for sid, nbytes in sizes:
                    self._counts[sid][3] += nbytes
                rows = [c for sid, c in self._counts.items() if space_id in (None, sid)]
                spaces = len(self._spaces) if space_id is None else int(space_id in self._spaces)
                return StoreTotals(spaces, *(sum(c[j] for c in rows) for j in range(4)))

    def contains(self, key: bytes | str) -> bool:
        return _key_bytes(key) in self._index

    def count_sealed(self, keys: np.ndarray) -> int:
        """How many of ``keys`` (uint8 [n, 16]) this handle has indexed, duplicates counted.

        Counted in chunks: each chunk is one pass in C, and between chunks other threads (the
        event loop among them) take the GIL, however many keys there are.
        """
        rows = np.ascontiguousarray(keys, dtype=np.uint8).view(_KEY_DTYPE).ravel()
        contains = self._index.__contains__
        return sum(
            sum(map(contains, rows[start : start + _COUNT_CHUNK].tolist()))
            for start in range(0, len(rows), _COUNT_CHUNK)
        )

    def find(self, key: bytes) -> Location | None:
        """Where a sealed record is, as far as this handle knows (no refresh)."""
        return self._index.get(key)

    def get(self, key: bytes | str) -> Record:
        """The record for a key (hex string or 16 raw bytes)."""
        loc = self.locate(key)
        return loc.segment.record(loc.index)

    def encoded(self, key: bytes | str) -> CapturedRecord:
        """The record for a key in the codec's encoding (what the wire carries)."""
        loc = self.locate(key)
        return loc.segment.encoded(loc.index)

    def read_batch(
        self,
        space: CaptureSpace,
        keys: Sequence[bytes],
        *,
        allow_missing: bool = False,
        cache: SegmentCache | None = None,
    ) -> EncodedBatch:
        """Records of ``space`` for ``keys`` as one encoded batch (see ``store.read``)."""
        return read_batch(
            self, cache or self.segment_cache, space, keys, allow_missing=allow_missing
        )

    def locate(self, key: bytes | str) -> Location:
        """Which sealed segment holds a key, refreshing once if it is not known yet."""
        raw = _key_bytes(key)
        loc = self._index.get(raw)
        if loc is None:
            self.refresh()
            loc = self._index.get(raw)
        if loc is None:
            raise KeyError(f"record {raw.hex()} is not in store {self.url}")
        return loc

    def segments(self) -> list[SegmentReader]:
        with self._lock:
            return list(self._segments.values())

    def write_segment(self, space: CaptureSpace, records: Sequence[CapturedRecord]) -> str:
        """Seal ``records`` as one segment and index it, so this handle sees them at once."""
        self._require_writable()
        self.ensure_space(space)
        segment_id = write_segment(self.backend, space, records)
        self._add_segment(SegmentReader(self.backend, space, segment_id))
        return segment_id

    def clean_unsealed(self) -> int:
        """Remove unsealed segments whose writer is provably gone (``liveness.writer_gone``),
        and what dead publishers left (old dataset staging, half-published names)."""
        self._require_writable()
        removed = 0
        for space_id in self.backend.list_dir("spaces"):
            removed += self.backend.clean_abandoned(segments_dir(space_id))  # half-unpublished
            for rel in self._unsealed_segments(space_id):
                try:
                    writer = self.backend.read_json(f"{rel}/writer.json")
                except (NotFound, OSError, ValueError):
                    writer = {}  # a writer between creating its directory and naming itself
                try:
                    started = float(writer.get("started", self.backend.modified_at(rel)))
                except NotFound:
                    continue  # published or removed meanwhile
                if writer_gone(writer, time.time() - started) and not self._sealed(rel):
                    self.backend.remove_tree(rel)
                    removed += 1
        for parent in _PUBLISHED_PARENTS:
            removed += self.backend.clean_abandoned(parent)
        for tmp in self.backend.list_dir("datasets/.unsealed"):
            rel = f"datasets/.unsealed/{tmp}"
            try:
                stale = time.time() - self.backend.modified_at(rel) > _DATASET_PUBLISH_GRACE_S
            except NotFound:
                continue
            if stale:
                self.backend.remove_tree(rel)
                removed += 1
        return removed

    def _unsealed_segments(self, space_id: str) -> list[str]:
        """Segments of a space being written or left unsealed: staging folders, or (sealing in
        place) listed segments without their group metadata."""
        if self.backend.renames:
            base = unsealed_dir(space_id)
            return [f"{base}/{s}" for s in self.backend.list_dir(base)]
        base = segments_dir(space_id)
        with self._lock:
            known = set(self._segments)
        return [
            f"{base}/{s}"
            for s in self.backend.list_dir(base)
            if s not in known and not self._sealed(f"{base}/{s}")
        ]

    def _sealed(self, rel: str) -> bool:
        """Whether the segment folder ``rel`` holds a sealed segment (a staging folder never)."""
        return not self.backend.renames and self.backend.exists(f"{rel}/zarr.json")

    # -- datasets -------------------------------------------------------------------------------

    def datasets(self) -> list[str]:
        return self.backend.list_dir("datasets")

    def dataset(self, name: str) -> Dataset:
        rel = f"datasets/{validate_dataset_name(name)}"
        if not self.backend.exists(f"{rel}/dataset.json"):
            raise NotFound(f"dataset {name!r} is not in store {self.url}")
        manifest = self.backend.read_json(f"{rel}/dataset.json")
        group = zarr.open_group(store=self.backend.zarr_store(rel, read_only=True), mode="r")
        keys = np.asarray(zarr_array(group, "keys")[:]).reshape(-1, KEY_BYTES)
        return Dataset(self, manifest, keys)

    def create_dataset(
        self,
        name: str,
        space: CaptureSpace,
        keys: list[bytes],
        positions: int,
        provenance: dict,
        loss_masks: Masks | None = None,
    ) -> Dataset:
        """Publish a dataset (state ``building``) with its full ordered key list, create-only;
        ``loss_masks`` (one per key, see ``store.masks``) are published with it.

        Of two creations of one name, exactly one succeeds; the other is AlreadyExists.
        """
        self._require_writable()
        validate_dataset_name(name)
        if self.backend.exists(f"datasets/{name}"):
            raise AlreadyExists(f"dataset {name!r} already exists in store {self.url}")
        self.ensure_space(space)
        staging = f"datasets/.unsealed/{uuid.uuid4().hex}"
        manifest = {
            "format": STORE_FORMAT,
            "name": name,
            "state": "building",
            "capture_space": space.to_json(),
            "sequences": len(keys),
            "positions": int(positions),
            "provenance": provenance,
            "created_at": time.time(),
            "completed_at": None,
        }
        group = zarr.open_group(store=self.backend.zarr_store(staging, read_only=False), mode="w")
        self.backend.write_json(f"{staging}/dataset.json", manifest)
        key_array = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(-1, KEY_BYTES)
        rows = max(1, min(len(keys), 1 << 16))
        group.create_array(
            "keys",
            data=key_array,
            chunks=(rows, KEY_BYTES),
            shards=(shard_rows(len(keys), rows), KEY_BYTES),
        )
        if loss_masks is not None:
            write_masks(group, loss_masks, len(keys))
        if not self.backend.publish(staging, f"datasets/{name}"):
            raise AlreadyExists(f"dataset {name!r} already exists in store {self.url}")
        self.generation += 1
        self._forget_reused_withdrawn(space, keys)
        return self.dataset(name)

    def _forget_reused_withdrawn(self, space: CaptureSpace, keys: list[bytes]) -> None:
        """The writer's half of gc's handshake (``store.gc``), run after the key list is
        published: copies in segments gc has marked or collected are not counted on, so the
        dataset's writer computes those records again instead of reusing them."""
        with self._lock:  # taken before the listings, so every segment was published before them
            held = {k: loc for k in keys if (loc := self._index.get(k)) is not None}
        marked = withdrawn_segments(self.backend, space.space_id)
        listed = set(self.backend.list_dir(segments_dir(space.space_id)))
        with self._lock:
            self.forget_segments({loc.segment.segment_id for loc in held.values()} - listed)
            for key, loc in held.items():
                if loc.segment.segment_id in marked and self._index.get(key) is loc:
                    del self._index[key]
                    self.generation += 1

    def mark_complete(self, name: str) -> None:
        self.mark_state(name, "complete")

    def mark_state(self, name: str, state: str) -> None:
        """``building``, ``complete``, or ``partial``: ended with records missing (see
        ``server.dataset_lifecycle``)."""
        self._require_writable()
        rel = f"datasets/{validate_dataset_name(name)}/dataset.json"
        if not self.backend.exists(rel):
            raise NotFound(f"dataset {name!r} is not in store {self.url}")
        manifest = self.backend.read_json(rel)
        manifest["state"] = state
        manifest["completed_at"] = None if state == "building" else time.time()
        self.backend.write_json(rel, manifest)
        self.generation += 1

    def delete_dataset(self, name: str) -> None:
        """Remove a dataset's manifest and key list; records stay (other datasets may share
        them; ``gc`` collects the unreferenced). Withdrawn in one step first (``unpublish``), so
        that a reader finds the whole dataset or none of it."""
        self._require_writable()
        rel = f"datasets/{validate_dataset_name(name)}"
        if not self.backend.exists(rel):
            raise NotFound(f"dataset {name!r} is not in store {self.url}")
        self.backend.unpublish(rel)
        self.generation += 1

    def _require_writable(self) -> None:
        if self.read_only:
            raise PermissionError(f"store {self.url} was opened read-only")


def _key_bytes(key: bytes | str) -> bytes:
    if isinstance(key, str):
        try:
            raw = bytes.fromhex(key)
        except ValueError:
            raise InvalidArgument(f"record key {key!r} is not hexadecimal") from None
    else:
        raw = bytes(key)
    if len(raw) != KEY_BYTES:
        raise InvalidArgument(f"record key must be {KEY_BYTES} bytes, got {len(raw)}")
    return raw


def open_store(url: str, *, writable: bool = False, s3: S3Settings | None = None) -> Store:
    """Open a store by URL. Read-only unless ``writable``; a writable open creates the store.

    ``s3``: endpoint, region, credentials and cache size of an ``s3://`` store (empty fields
    come from the AWS environment variables)."""
    backend = backend_for_url(url, create=writable, s3=s3)
    marker = STORE_MARKER
    if backend.exists(marker):
        fmt = backend.read_json(marker).get("format")
        if fmt != STORE_FORMAT:
            raise InvalidArgument(f"store {url!r} has format {fmt!r}; expected {STORE_FORMAT!r}")
    elif writable:
        backend.create(marker, json_bytes({"format": STORE_FORMAT, "created_at": time.time()}))
    else:
        raise NotFound(f"{url!r} is not a logitcache store (no {marker})")
    return Store(backend, read_only=not writable)
