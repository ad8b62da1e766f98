"""GroupArrays reads what zarr reads: the one-shard arrays it decodes itself (partial and empty
inner chunks, absent shards, two dimensions) and the others it leaves to zarr (older segments:
one object per chunk), whole and by rows, with typed errors for what is missing or damaged."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, GzipCodec, ZstdCodec
from zarr.errors import ArrayNotFoundError, GroupNotFoundError
from zarr.storage import LocalStore

from logitcache.server.store.arrays import GroupArrays, _one_shard
from logitcache.server.store.segments import PLAIN, SHUFFLED


def _values(rng: np.random.Generator) -> dict[str, tuple[np.ndarray, dict]]:
    """Arrays and how each is written: the segment layout's shapes, and older layouts."""
    ids = rng.integers(0, 300, 10_000).astype(np.uint16)
    with_empty_chunk = rng.integers(1, 9, 5_000).astype(np.int32)
    with_empty_chunk[1024:2048] = 0  # one whole inner chunk of fill values: not stored
    one_shard = {"chunks": (1024,), "shards": (5 * 1024,)}
    return {
        "entries": (ids, {"chunks": (4096,), "shards": (12_288,), "compressors": PLAIN}),
        "positions": (with_empty_chunk, one_shard | {"compressors": SHUFFLED}),
        "keys": (rng.integers(0, 256, (37, 16)).astype(np.uint8), {"chunks": (37, 16)}),
        "floats": (rng.normal(size=3_000).astype(np.float32), {"chunks": (3_000,)}),
        "all_fill": (np.zeros(2_000, dtype=np.int64), {"chunks": (512,), "shards": (2_048,)}),
        "fill_seven": (np.full(100, 7, dtype=np.uint8), {"chunks": (100,), "fill_value": 7}),
        "zstd": (ids[:777], {"chunks": (256,), "shards": (1024,), "compressors": ZstdCodec()}),
        # Read by zarr: older layouts (a chunk per object, several shards), other codecs.: a chunk per object, or several shards.
        "unsharded": (ids[:5_000], {"chunks": (1024,), "shards": None}),
        "two_shards": (ids, {"chunks": (1024,), "shards": (8192,)}),
        "blosc_unsharded": (ids[:50], {"chunks": (50,), "shards": None,
                                       "compressors": BloscCodec(cname="lz4")}),
        "gzip": (ids[:50], {"chunks": (50,), "compressors": GzipCodec()}),
    }  # fmt: skip


def _write(path: Path, arrays: dict[str, tuple[np.ndarray, dict]]) -> None:
    group = zarr.open_group(LocalStore(path), mode="w", zarr_format=3, attributes={"a": 1})
    for name, (data, how) in arrays.items():
        how = {"shards": (max(how["chunks"][0], data.shape[0]), *data.shape[1:])} | how
        group.create_array(name, data=data, **how)


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("group")
    arrays = _values(np.random.default_rng(4))
    _write(path, arrays)
    return path, {name: data for name, (data, _) in arrays.items()}


def test_whole_arrays_read_as_written(written: tuple[Path, dict]) -> None:
    path, expected = written
    decoded_here = {
        name for name in expected
        if _one_shard(json.loads((path / name / "zarr.json").read_text())) is not None
    }  # fmt: skip
    assert decoded_here == set(list(expected)[:7])  # the others: zarr's
    assert not (path / "all_fill" / "c").exists()  # no shard object: every chunk is fill
    attributes, arrays = GroupArrays(LocalStore(path, read_only=True)).open(list(expected))
    assert attributes == {"a": 1}
    for name, data in expected.items():
        assert arrays[name].dtype == data.dtype and arrays[name].flags.writeable, name
        np.testing.assert_array_equal(arrays[name], data, err_msg=name)


def test_rows_read_as_slices(written: tuple[Path, dict]) -> None:
    path, expected = written
    group = GroupArrays(LocalStore(path, read_only=True))
    spans = {"entries": (4000, 4200), "keys": (3, 5), "unsharded": (1023, 2049), "floats": (0, 0)}
    arrays = group.read(whole=("positions",), rows=spans)
    np.testing.assert_array_equal(arrays["positions"], expected["positions"])
    for name, (start, stop) in spans.items():
        np.testing.assert_array_equal(arrays[name], expected[name][start:stop], err_msg=name)


def test_missing_group_and_array_are_typed(tmp_path: Path, written: tuple[Path, dict]) -> None:
    with pytest.raises(GroupNotFoundError):
        GroupArrays(LocalStore(tmp_path, read_only=True)).open(["keys"])
    group = GroupArrays(LocalStore(written[0], read_only=True))
    with pytest.raises(ArrayNotFoundError):
        group.read(("nothing",))
    with pytest.raises(ArrayNotFoundError):
        group.read(rows={"nothing": (0, 1)})


def test_a_damaged_shard_index_is_an_error_not_values(tmp_path: Path) -> None:
    data = np.arange(3000, dtype=np.uint16)
    _write(tmp_path, {"x": (data, {"chunks": (1000,), "shards": (3000,)})})
    shard = tmp_path / "x" / "c" / "0"
    damaged = bytearray(shard.read_bytes())
    damaged[-10] ^= 0xFF  # inside the index, before its checksum
    shard.write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match="damaged"):
        GroupArrays(LocalStore(tmp_path, read_only=True)).read(("x",))
