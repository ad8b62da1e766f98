"""A zarr v3 group's arrays, read several at a time in one call into zarr's event loop.

zarr's synchronous API makes one call into its event loop per read, opening an array reads its
metadata first, and a read runs each chunk through zarr's asynchronous codec pipeline. A segment
has a dozen arrays, most of them small, so a whole-segment read paid more for those steps than
for its bytes: about 30 ms for a ``topk-v5`` segment of 32,768 positions whose decompression
takes 6. :class:`GroupArrays` fetches in one call the metadata of every array it does not know
yet, then their objects, concurrently (on object storage two round trips, not several per
array), and decodes them here, in the calling thread:

- an array held in one shard (the segment layout, ``segments``) whose codecs this module knows
  (``bytes`` little-endian, then blosc or zstd; ``crc32c`` on the shard index), from the shard
  object itself;
- any other (segments of older stores: one object per chunk) through zarr, in the same call.

Rows of an array (one record's) are read through zarr, which fetches only the chunks they need;
those reads too are gathered into one call.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numcodecs  # type: ignore[import-untyped]
import numpy as np
from numcodecs.abc import Codec as BytesCodec  # type: ignore[import-untyped]
from zarr.core.array import AsyncArray
from zarr.core.buffer import default_buffer_prototype
from zarr.core.metadata import ArrayV3Metadata
from zarr.core.sync import sync
from zarr.errors import ArrayNotFoundError, GroupNotFoundError
from zarr.storage import StorePath

from logitcache.server.store.backend import ZarrLocation

Rows = tuple[int, int]  # start, stop along an array's first axis
_EMPTY = 2**64 - 1  # a shard index's offset and length of an inner chunk it does not hold
_COMPRESSORS: dict[str, type[BytesCodec]] = {"blosc": numcodecs.Blosc, "zstd": numcodecs.Zstd}
_CRC32C: type[BytesCodec] | None = getattr(numcodecs, "CRC32C", None)  # with google-crc32c


@dataclass(frozen=True)
class _Shard:
    """How to decode an array that one shard object holds (see :func:`_one_shard`)."""

    key: str  # the shard object, relative to the array
    shape: tuple[int, ...]
    dtype: np.dtype
    fill: int | float | bool
    chunk_rows: int  # rows of each inner chunk (inner chunks span every other axis)
    chunks: int  # inner chunks in the shard
    compressors: tuple[BytesCodec, ...]  # after the bytes codec, in the order of encoding
    index_checked: bool  # the index ends with its crc32c
    index_at_end: bool


class GroupArrays:
    """The arrays of one zarr v3 group (immutable once written: what is read once is kept)."""

    def __init__(self, location: ZarrLocation) -> None:
        self._root = location if isinstance(location, StorePath) else StorePath(location)
        self._documents: dict[str, dict] = {}  # each array's zarr.json
        self._zarr: dict[str, AsyncArray] = {}  # arrays opened for reads of rows

    def open(self, names: Sequence[str]) -> tuple[dict, dict[str, np.ndarray]]:
        """The group's attributes and the named arrays, whole; GroupNotFoundError where the
        group has no metadata (nothing else is read then)."""
        attributes, fetched = sync(self._fetch(names, {}, group=True))
        return attributes, _decoded(fetched)

    def read(
        self, whole: Sequence[str] = (), rows: Mapping[str, Rows] | None = None
    ) -> dict[str, np.ndarray]:
        """Arrays read whole, and rows of others; ArrayNotFoundError for one that is absent."""
        _, fetched = sync(self._fetch(whole, rows or {}, group=False))
        return _decoded(fetched)

    async def _fetch(
        self, whole: Sequence[str], rows: Mapping[str, Rows], *, group: bool
    ) -> tuple[dict, list[tuple[str, _Shard | None, np.ndarray | None]]]:
        """In zarr's event loop: the documents not known yet, then every array's shard object
        (left to decode), or its values read by zarr."""
        unknown = [name for name in (*whole, *rows) if name not in self._documents]
        found = await asyncio.gather(
            *(self._json("zarr.json") for _ in range(group)),
            *(self._json(f"{name}/zarr.json") for name in unknown),
        )
        attributes: dict = {}
        if group:
            document = found.pop(0)
            if document is None or document.get("node_type") != "group":
                raise GroupNotFoundError(str(self._root.store), self._root.path)
            attributes = document.get("attributes") or {}
        for name, document in zip(unknown, found, strict=True):
            self._documents[name] = self._array_document(name, document)
        reads: list[tuple[str, _Shard | None, Rows | None]]
        reads = [(name, _one_shard(self._documents[name]), None) for name in whole]
        reads += [(name, None, span) for name, span in rows.items()]
        values = await asyncio.gather(
            *(
                self._shard(name, shard) if shard is not None else self._through_zarr(name, span)
                for name, shard, span in reads
            )
        )
        return attributes, [
            (name, shard, value) for (name, shard, _), value in zip(reads, values, strict=True)
        ]

    def _array_document(self, name: str, document: dict | None) -> dict:
        if document is None:
            raise ArrayNotFoundError(str(self._root.store), (self._root / name).path)
        if document.get("node_type") != "array":
            raise ValueError(f"{name!r} in {self._root} is a group, not an array")
        return document

    async def _json(self, key: str) -> dict | None:
        buffer = await (self._root / key).get(prototype=default_buffer_prototype())
        return None if buffer is None else json.loads(buffer.to_bytes())

    async def _shard(self, name: str, shard: _Shard) -> np.ndarray | None:
        """The shard object's bytes (None: absent, so every chunk is the fill value)."""
        buffer = await (self._root / name / shard.key).get(prototype=default_buffer_prototype())
        return None if buffer is None else np.asarray(buffer.as_numpy_array())

    async def _through_zarr(self, name: str, span: Rows | None) -> np.ndarray:
        array = self._zarr.get(name)
        if array is None:
            array = self._zarr[name] = AsyncArray(
                ArrayV3Metadata.from_dict(self._documents[name]), self._root / name
            )
        selection = slice(None) if span is None else slice(*span)
        return np.asarray(await array.getitem(selection))


def _one_shard(document: dict) -> _Shard | None:
    """The layout of an array held in one shard whose codecs are known here; None: zarr reads
    it (several shards or none, other codecs, data types or fill values)."""
    return _shard_layout(json.dumps(document, sort_keys=True))


@functools.lru_cache(maxsize=1024)
def _shard_layout(document_json: str) -> _Shard | None:
    """:func:`_one_shard` on the document's JSON (segments of one space repeat their arrays'
    documents, so each is parsed once)."""
    document = json.loads(document_json)
    try:
        shape = tuple(int(n) for n in document["shape"])
        grid, encoding = document["chunk_grid"], document["chunk_key_encoding"]
        (sharding,) = document["codecs"]  # nothing before it (no array-to-array codecs)
        config = sharding["configuration"]
        outer = tuple(int(n) for n in grid["configuration"]["chunk_shape"])
        inner = tuple(int(n) for n in config["chunk_shape"])
        separator = (encoding.get("configuration") or {}).get("separator", "/")
        bytes_codec, *compressors = config["codecs"]
        index_codecs = [c["name"] for c in config["index_codecs"]]
        fill = document["fill_value"]
        dtype = np.dtype(document["data_type"])
    except (KeyError, TypeError, ValueError):
        return None
    if (
        document.get("storage_transformers")
        or grid["name"] != "regular"
        or encoding["name"] != "default"
        or sharding["name"] != "sharding_indexed"
        or not shape
        or not len(outer) == len(shape) == len(inner)
        or any(o < n for o, n in zip(outer, shape, strict=True))  # more than one shard
        or inner[1:] != outer[1:]
        or outer[0] % inner[0]
        or dtype.kind not in "biuf"
        or not isinstance(fill, int | float)
        or bytes_codec["name"] != "bytes"
        or (bytes_codec.get("configuration") or {}).get("endian", "little") != "little"
        or any(c["name"] not in _COMPRESSORS for c in compressors)
        or index_codecs not in (["bytes"], ["bytes", "crc32c"])
        or (index_codecs[-1] == "crc32c" and _CRC32C is None)
        or config.get("index_location", "end") not in ("start", "end")
    ):
        return None
    return _Shard(
        key=separator.join(["c", *("0" * len(shape))]),
        shape=shape,
        dtype=dtype.newbyteorder("<"),
        fill=fill,
        chunk_rows=inner[0],
        chunks=outer[0] // inner[0],
        compressors=tuple(_COMPRESSORS[c["name"]]() for c in compressors),
        index_checked=index_codecs[-1] == "crc32c",
        index_at_end=config.get("index_location", "end") == "end",
    )


def _decoded(fetched: list[tuple[str, _Shard | None, np.ndarray | None]]) -> dict[str, np.ndarray]:
    """What :meth:`GroupArrays._fetch` got, decoded (here, not in zarr's event loop)."""
    arrays = {}
    for name, shard, value in fetched:
        if shard is not None:
            arrays[name] = _decode(shard, value)
        else:
            assert value is not None  # read by zarr
            arrays[name] = value
    return arrays


def _decode(shard: _Shard, data: np.ndarray | None) -> np.ndarray:
    """A whole array from its shard object's bytes (C order: inner chunks along the rows)."""
    out = np.empty(shard.shape, dtype=shard.dtype.newbyteorder("="))
    if data is None:
        out.fill(shard.fill)
        return out
    index_bytes = shard.chunks * 16 + 4 * shard.index_checked
    index = data[-index_bytes:] if shard.index_at_end else data[:index_bytes]
    if shard.index_checked:
        assert _CRC32C is not None  # a layout with a checked index is only made with it
        try:
            index = np.frombuffer(_CRC32C(location="end").decode(index), dtype=np.uint8)
        except RuntimeError as e:  # the checksum's mismatch
            raise ValueError(f"a shard's index is damaged: {e}") from None
    spans = index.view("<u8").reshape(shard.chunks, 2)
    rows = shard.shape[0]
    for chunk, (offset, length) in enumerate(spans.tolist()):
        start = chunk * shard.chunk_rows
        if start >= rows:
            break
        stop = min(rows, start + shard.chunk_rows)
        if offset == _EMPTY and length == _EMPTY:
            out[start:stop] = shard.fill
            continue
        encoded: object = data[offset : offset + length]
        for compressor in reversed(shard.compressors):
            encoded = compressor.decode(encoded)
        values = np.frombuffer(encoded, dtype=shard.dtype)  # type: ignore[call-overload]
        out[start:stop] = values.reshape(shard.chunk_rows, *shard.shape[1:])[: stop - start]
    return out
