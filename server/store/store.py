"""The store: capture spaces, sealed segments, an index from key to record, and datasets.

Layout under the store URL:
    logitcache-store.json                        store format marker
    spaces/<space_id>/space.json                 the capture space (teacher, tokenizer, k, codec)
    spaces/<space_id>/segments/<segment_id>/     sealed segments (zarr groups), never modified
    spaces/<space_id>/unsealed/<segment_id>/     segments being written; ignored by readers
    datasets/<name>/dataset.json                 manifest: state, capture space, provenance
    datasets/<name>/keys/  (zarr)                the dataset's ordered record keys
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import zarr

from logitcache.client.errors import AlreadyExists, InvalidArgument, NotFound
from logitcache.client.record import Record
from logitcache.client.space import KEY_BYTES, CaptureSpace
from logitcache.server.store.backend import LocalStorage, storage_for_url
from logitcache.server.store.segments import (
    CapturedRecord,
    SegmentBuilder,
    SegmentReader,
    segments_dir,
    unsealed_dir,
)

STORE_FORMAT = "logitcache-store-v1"
_DATASET_PUBLISH_GRACE_S = 3600.0  # publishing a dataset's key list takes seconds, not hours
_DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def validate_dataset_name(name: str) -> str:
    if not _DATASET_NAME.match(name):
        raise InvalidArgument(
            f"dataset name {name!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


@dataclass(frozen=True)
class Location:
    segment: SegmentReader
    index: int


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
        return self._store.get(bytes(self._keys[i % n]))

    def __iter__(self) -> Iterator[Record]:
        for i in range(len(self)):
            yield self[i]

    @property
    def complete(self) -> bool:
        """Whether the dataset's job has finished (read afresh: it may finish while we read)."""
        if self.manifest["state"] != "complete":
            self.manifest = self._store.storage.read_json(f"datasets/{self.name}/dataset.json")
        return self.manifest["state"] == "complete"

    def raw_key(self, i: int) -> bytes:
        return bytes(self._keys[i])

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
        return sum(self._store.contains(bytes(k)) for k in self._keys)

    def __repr__(self) -> str:
        return f"Dataset({self.name!r}, sequences={len(self)}, state={self.manifest['state']})"


class Store:
    """A handle on a store. Read-only handles never write; writer handles create what they need."""

    def __init__(self, storage: LocalStorage, *, read_only: bool) -> None:
        self.storage = storage
        self.read_only = read_only
        self._spaces: dict[str, CaptureSpace] = {}
        self._segments: dict[str, SegmentReader] = {}
        self._index: dict[bytes, Location] = {}
        # Segments are sealed from writer threads while the event loop reads the index.
        self._lock = threading.RLock()
        self.refresh()

    @property
    def url(self) -> str:
        return self.storage.url

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
        rel = f"spaces/{space.space_id}/space.json"
        if not self.storage.exists(rel):
            self.storage.write_json(rel, space.to_json())
        self._spaces[space.space_id] = space

    # -- records --------------------------------------------------------------------------------

    def refresh(self) -> None:
        """Pick up capture spaces and segments sealed since the last look."""
        with self._lock:
            self._refresh()

    def _refresh(self) -> None:
        for space_id in self.storage.list_dir("spaces"):
            if space_id not in self._spaces:
                if not self.storage.exists(f"spaces/{space_id}/space.json"):
                    continue
                doc = self.storage.read_json(f"spaces/{space_id}/space.json")
                self._spaces[space_id] = CaptureSpace.from_json(doc)
            space = self._spaces[space_id]
            for segment_id in self.storage.list_dir(segments_dir(space_id)):
                if segment_id not in self._segments:
                    self._add_segment(space, segment_id)

    def _add_segment(self, space: CaptureSpace, segment_id: str) -> None:
        reader = SegmentReader(self.storage, space, segment_id)
        with self._lock:
            if segment_id in self._segments:
                return
            self._segments[segment_id] = reader
            for i, key in enumerate(reader.keys):
                # The first sealed copy of a key is the answer; later duplicates are ignored.
                self._index.setdefault(bytes(key), Location(reader, i))

    def contains(self, key: bytes | str) -> bool:
        return _key_bytes(key) in self._index

    def get(self, key: bytes | str) -> Record:
        """The record for a key (hex string or 16 raw bytes)."""
        loc = self.locate(key)
        return loc.segment.record(loc.index)

    def encoded(self, key: bytes | str) -> CapturedRecord:
        """The record for a key in the codec's encoding (what the wire carries)."""
        loc = self.locate(key)
        return loc.segment.encoded(loc.index)

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

    def new_segment(self, space: CaptureSpace) -> SegmentBuilder:
        self._require_writable()
        self.ensure_space(space)
        return SegmentBuilder(self.storage, space)

    def seal(self, builder: SegmentBuilder) -> str:
        """Seal a segment and index it, so this handle sees its records at once."""
        segment_id = builder.seal()
        self._add_segment(builder.space, segment_id)
        return segment_id

    def clean_unsealed(self, *, older_than_s: float = 24 * 3600) -> int:
        """Remove unsealed segments whose writer is gone (dead local process, or too old)."""
        self._require_writable()
        removed = 0
        host = socket.gethostname()
        for space_id in self.storage.list_dir("spaces"):
            base = unsealed_dir(space_id)
            for segment_id in self.storage.list_dir(base):
                rel = f"{base}/{segment_id}"
                try:
                    writer = self.storage.read_json(f"{rel}/writer.json")
                except (OSError, ValueError):
                    writer = {}  # a writer between creating its directory and naming itself
                started = float(writer.get("started", self.storage.modified_at(rel)))
                same_host = writer.get("host") == host
                dead = same_host and not _process_alive(int(writer.get("pid", -1)))
                if dead or time.time() - started > older_than_s:
                    self.storage.remove_tree(rel)
                    removed += 1
        for tmp in self.storage.list_dir("datasets/.unsealed"):
            rel = f"datasets/.unsealed/{tmp}"
            if time.time() - self.storage.modified_at(rel) > _DATASET_PUBLISH_GRACE_S:
                self.storage.remove_tree(rel)
                removed += 1
        return removed

    # -- datasets -------------------------------------------------------------------------------

    def datasets(self) -> list[str]:
        return [n for n in self.storage.list_dir("datasets") if not n.startswith(".")]

    def dataset(self, name: str) -> Dataset:
        rel = f"datasets/{validate_dataset_name(name)}"
        if not self.storage.exists(f"{rel}/dataset.json"):
            raise NotFound(f"dataset {name!r} is not in store {self.url}")
        manifest = self.storage.read_json(f"{rel}/dataset.json")
        group = zarr.open_group(store=self.storage.zarr_store(rel, read_only=True), mode="r")
        keys = np.asarray(group["keys"][:]).reshape(-1, KEY_BYTES)
        return Dataset(self, manifest, keys)

    def create_dataset(
        self,
        name: str,
        space: CaptureSpace,
        keys: list[bytes],
        positions: int,
        provenance: dict,
    ) -> Dataset:
        """Publish a dataset (state ``building``) with its full ordered key list, atomically."""
        self._require_writable()
        validate_dataset_name(name)
        if self.storage.exists(f"datasets/{name}"):
            raise AlreadyExists(f"dataset {name!r} already exists in store {self.url}")
        self.ensure_space(space)
        tmp = f"datasets/.unsealed/{uuid.uuid4().hex}"
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
        group = zarr.open_group(store=self.storage.zarr_store(tmp, read_only=False), mode="w")
        self.storage.write_json(f"{tmp}/dataset.json", manifest)
        key_array = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(-1, KEY_BYTES)
        group.create_array(
            "keys", data=key_array, chunks=(max(1, min(len(keys), 1 << 16)), KEY_BYTES)
        )
        self.storage.seal(tmp, f"datasets/{name}")
        return self.dataset(name)

    def mark_complete(self, name: str) -> None:
        self._require_writable()
        rel = f"datasets/{validate_dataset_name(name)}/dataset.json"
        if not self.storage.exists(rel):
            raise NotFound(f"dataset {name!r} is not in store {self.url}")
        manifest = self.storage.read_json(rel)
        manifest["state"] = "complete"
        manifest["completed_at"] = time.time()
        self.storage.write_json(rel, manifest)

    def delete_dataset(self, name: str) -> None:
        """Remove a dataset's key list; records stay (other datasets may share them)."""
        self._require_writable()
        self.storage.remove_tree(f"datasets/{validate_dataset_name(name)}")

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


def _process_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def open_store(url: str, *, writable: bool = False) -> Store:
    """Open a store by URL. Read-only unless ``writable``; a writable open creates the store."""
    storage = storage_for_url(url, create=writable)
    marker = "logitcache-store.json"
    if storage.exists(marker):
        fmt = storage.read_json(marker).get("format")
        if fmt != STORE_FORMAT:
            raise InvalidArgument(f"store {url!r} has format {fmt!r}; expected {STORE_FORMAT!r}")
    elif writable:
        storage.write_json(marker, {"format": STORE_FORMAT, "created_at": time.time()})
    else:
        raise NotFound(f"{url!r} is not a logitcache store (no {marker})")
    return Store(storage, read_only=not writable)
