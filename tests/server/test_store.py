"""The store on a local file system: sealed segments, content addressing, datasets, crashes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import logitcache
from logitcache.client.codecs import TopKRows
from logitcache.client.errors import AlreadyExists, InvalidArgument, NotFound
from logitcache.client.record import Record
from logitcache.client.space import CaptureSpace, record_key
from logitcache.server.store.store import Store, open_store
from logitcache.server.store.writer import CapturedRecord

BOUND = 1.0 / 128  # the codec's documented error bound in nats
SPACE = CaptureSpace(
    teacher_fingerprint="sha256:test-teacher",
    tokenizer_fingerprint="sha256:test-tokenizer",
    vocab_size=500,
    mode="topk",
    k=8,
    engine_dtype="float32",
    codec="topk-q64-delta-v1",
)
# The crash test's subprocess writes these; the test recomputes them from the seeds.
CRASH_SEALED_SEEDS = (1, 2, 3)
CRASH_UNSEALED_SEEDS = (101, 102)
CRASH_LENGTH = 40


@dataclass
class SyntheticRecord(CapturedRecord):
    """A record to write, plus the exact rows it was encoded from."""

    rows: TopKRows | None = None


def synthetic_record(seed: int, length: int, *, row_seed: int | None = None) -> SyntheticRecord:
    """A sequence of ``length`` ids (from ``seed``) and log_softmax top-k rows for it.

    ``row_seed`` draws different teacher numbers for the same sequence (hence the same key).
    """
    ids = np.random.default_rng(seed).integers(0, SPACE.vocab_size, size=length, dtype=np.int32)
    rng = np.random.default_rng([seed, 0 if row_seed is None else row_seed + 1])
    logits = rng.normal(scale=4.0, size=(length, SPACE.vocab_size))
    shifted = logits - logits.max(axis=1, keepdims=True)
    logprobs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    order = np.argsort(-logprobs, axis=1, kind="stable")[:, : SPACE.k]
    target = np.full(length, np.nan)
    target[:-1] = logprobs[np.arange(length - 1), ids[1:]]
    rows = TopKRows(
        token_ids=order.astype(np.int32),
        logprobs=np.take_along_axis(logprobs, order, axis=1).astype(np.float32),
        target_logprobs=target.astype(np.float32),
    )
    encoded = CapturedRecord.encode(record_key(SPACE.space_id, ids), ids, rows, SPACE)
    return SyntheticRecord(encoded.key, encoded.input_ids, encoded.arrays, rows=rows)


def write_segment(store: Store, records: Sequence[CapturedRecord]) -> str:
    return store.write_segment(SPACE, records)


def assert_matches(record: Record, expected: CapturedRecord) -> None:
    """Same key, exact ids, log-probs within the codec bound, documented dtypes and shapes."""
    t, k = len(expected.input_ids), SPACE.k
    assert record.key == expected.key.hex()
    assert (record.input_ids.dtype, record.input_ids.shape) == (np.int32, (t,))
    assert (record.token_ids.dtype, record.token_ids.shape) == (np.int32, (t, k))
    assert (record.logprobs.dtype, record.logprobs.shape) == (np.float32, (t, k))
    assert (record.target_logprobs.dtype, record.target_logprobs.shape) == (np.float32, (t,))
    np.testing.assert_array_equal(record.input_ids, expected.input_ids)
    np.testing.assert_array_equal(record.token_ids, expected.rows.token_ids)
    np.testing.assert_allclose(record.logprobs, expected.rows.logprobs, rtol=0, atol=BOUND)
    assert np.isnan(record.target_logprobs[-1])
    np.testing.assert_array_equal(
        np.isnan(record.target_logprobs), np.isnan(expected.rows.target_logprobs)
    )
    np.testing.assert_allclose(
        record.target_logprobs[:-1], expected.rows.target_logprobs[:-1], rtol=0, atol=BOUND
    )


def unsealed_path(store_path: Path) -> Path:
    return store_path / "spaces" / SPACE.space_id / "unsealed"


def plant_unsealed(store_path: Path, scratch: Path, records: Sequence[CapturedRecord]) -> Path:
    """Put a fully written segment under the store's unsealed directory, as a writer would."""
    segment_id = write_segment(open_store(str(scratch), writable=True), records)
    src = scratch / "spaces" / SPACE.space_id / "segments" / segment_id
    dst = unsealed_path(store_path) / segment_id
    shutil.copytree(src, dst)
    return dst


def write_writer_json(segment: Path, *, host: str, pid: int, started: float) -> None:
    (segment / "writer.json").write_text(json.dumps({"host": host, "pid": pid, "started": started}))


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()
    return proc.pid


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def writer(store_path: Path) -> Store:
    return open_store(str(store_path), writable=True)


# -- round trip -----------------------------------------------------------------------------------


def test_round_trip_through_get_and_dataset(store_path: Path, writer: Store) -> None:
    records = [synthetic_record(seed, length) for seed, length in enumerate([1, 2, 17, 300, 5])]
    write_segment(writer, records[:3])
    write_segment(writer, records[3:])
    in_dataset_order = records[::-1]  # not the write order
    writer.create_dataset(
        "wiki",
        SPACE,
        [r.key for r in in_dataset_order],
        positions=sum(len(r.input_ids) for r in records),
        provenance={"requester": "test"},
    )

    reader = logitcache.open_store(str(store_path))
    for r in records:
        assert_matches(reader.get(r.key.hex()), r)
        assert_matches(reader.get(r.key), r)

    ds = reader.dataset("wiki")
    assert len(ds) == len(records)
    assert ds.keys == [r.key.hex() for r in in_dataset_order]
    assert ds.positions == 325
    assert ds.provenance == {"requester": "test"}
    for i, expected in enumerate(in_dataset_order):
        assert_matches(ds[i], expected)
    for got, expected in zip(ds, in_dataset_order, strict=True):
        assert_matches(got, expected)


def test_dataset_indexing(store_path: Path, writer: Store) -> None:
    records = [synthetic_record(seed, 6) for seed in range(3)]
    write_segment(writer, records)
    writer.create_dataset("d", SPACE, [r.key for r in records], positions=18, provenance={})
    ds = logitcache.open_store(str(store_path)).dataset("d")

    assert len(ds) == 3
    assert_matches(ds[-1], records[2])
    assert_matches(ds[-3], records[0])
    for bad in (3, 4, -4):
        with pytest.raises(IndexError):
            ds[bad]


def test_dataset_becomes_complete(store_path: Path, writer: Store) -> None:
    record = synthetic_record(0, 4)
    write_segment(writer, [record])
    writer.create_dataset("d", SPACE, [record.key], positions=4, provenance={})

    assert not writer.dataset("d").complete
    assert not logitcache.open_store(str(store_path)).dataset("d").complete
    writer.mark_complete("d")
    assert writer.dataset("d").complete
    assert logitcache.open_store(str(store_path)).dataset("d").complete


def test_sealed_segment_is_readable_without_a_dataset(store_path: Path, writer: Store) -> None:
    """The read-through cache seals records that no dataset names; readers must still see them."""
    record = synthetic_record(0, 9)
    write_segment(writer, [record])

    assert_matches(logitcache.open_store(str(store_path)).get(record.key), record)


def test_writer_handle_sees_what_it_sealed(writer: Store) -> None:
    """``contains`` must agree with ``get``, or a long-lived writer stores a sequence twice."""
    writer.ensure_space(SPACE)
    record = synthetic_record(0, 9)
    write_segment(writer, [record])

    assert writer.contains(record.key)
    assert_matches(writer.get(record.key), record)


def test_sealing_an_empty_segment_is_refused(writer: Store) -> None:
    with pytest.raises(ValueError, match="empty"):
        writer.write_segment(SPACE, [])


# -- unsealed segments and crashes ----------------------------------------------------------------


def test_unsealed_segment_is_invisible(store_path: Path, tmp_path: Path, writer: Store) -> None:
    writer.ensure_space(SPACE)
    sealed = [synthetic_record(seed, 10) for seed in range(2)]
    hidden = [synthetic_record(seed, 10) for seed in range(10, 13)]
    write_segment(writer, sealed)
    plant_unsealed(store_path, tmp_path / "scratch", hidden)
    writer.create_dataset(
        "partial", SPACE, [r.key for r in sealed + hidden], positions=50, provenance={}
    )

    reader = logitcache.open_store(str(store_path))
    for store in (reader, writer):
        store.refresh()
        assert [len(s) for s in store.segments()] == [len(sealed)]
        for r in sealed:
            assert_matches(store.get(r.key), r)
        for r in hidden:
            assert not store.contains(r.key)
            with pytest.raises(KeyError):
                store.get(r.key)
    ds = reader.dataset("partial")
    assert ds.sealed_count() == len(sealed)
    with pytest.raises(KeyError):
        ds[len(sealed)]


@pytest.mark.parametrize(
    ("elsewhere", "alive", "age_s", "removed"),
    [
        pytest.param(False, False, 0.0, True, id="dead-writer-here"),
        pytest.param(False, True, 0.0, False, id="live-writer-here"),
        pytest.param(True, True, 0.0, False, id="recent-writer-elsewhere"),
        pytest.param(True, True, 3 * 24 * 3600.0, True, id="old-writer-elsewhere"),
    ],
)
def test_clean_unsealed(
    store_path: Path,
    tmp_path: Path,
    writer: Store,
    elsewhere: bool,
    alive: bool,
    age_s: float,
    removed: bool,
) -> None:
    writer.ensure_space(SPACE)
    kept = synthetic_record(0, 5)
    write_segment(writer, [kept])
    segment = plant_unsealed(store_path, tmp_path / "scratch", [synthetic_record(1, 5)])
    write_writer_json(
        segment,
        host="another-host" if elsewhere else socket.gethostname(),
        pid=os.getpid() if alive else dead_pid(),
        started=time.time() - age_s,
    )

    assert writer.clean_unsealed() == int(removed)
    assert segment.exists() != removed
    assert_matches(logitcache.open_store(str(store_path)).get(kept.key), kept)


def test_clean_unsealed_frees_what_a_remover_that_died_left_hidden(
    store_path: Path, writer: Store
) -> None:
    # A remover hides a segment by one rename, then frees it; one killed in between leaves the
    # hidden name, which no reader sees and nothing else would ever free.
    writer.ensure_space(SPACE)
    kept = synthetic_record(0, 5)
    kept_id = write_segment(writer, [kept])
    withdrawn_id = write_segment(writer, [synthetic_record(1, 5)])
    segments = store_path / "spaces" / SPACE.space_id / "segments"
    hidden = segments / f".{withdrawn_id}.{'0' * 32}.removing"
    (segments / withdrawn_id).rename(hidden)

    assert writer.clean_unsealed() == 1
    assert [p.name for p in segments.iterdir()] == [kept_id]
    assert_matches(logitcache.open_store(str(store_path)).get(kept.key), kept)
    assert writer.clean_unsealed() == 0


# Runs in a subprocess: seal one segment, then write a second one completely and hang at the moment
# of sealing it, so that the test can kill the writer with SIGKILL mid-segment.
_CRASHING_WRITER = """
import sys, time
from pathlib import Path

tests_dir, store_path, marker = sys.argv[1:]
sys.path.insert(0, tests_dir)
from test_store import (
    CRASH_LENGTH, CRASH_SEALED_SEEDS, CRASH_UNSEALED_SEEDS, SPACE, synthetic_record, write_segment,
)
from logitcache.server.store.store import open_store

store = open_store(store_path, writable=True)
store.ensure_space(SPACE)
write_segment(store, [synthetic_record(s, CRASH_LENGTH) for s in CRASH_SEALED_SEEDS])


def hang_instead_of_publishing(staging, final):
    Path(marker).touch()
    time.sleep(3600)


store.backend.publish = hang_instead_of_publishing
write_segment(store, [synthetic_record(s, CRASH_LENGTH) for s in CRASH_UNSEALED_SEEDS])
"""


def test_writer_killed_mid_segment(store_path: Path, tmp_path: Path) -> None:
    marker = tmp_path / "writing-second-segment"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-P",  # the repository's own logitcache/ folder must not shadow the installed one
            "-c",
            _CRASHING_WRITER,
            str(Path(__file__).parent),
            str(store_path),
            str(marker),
        ],
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120  # a guard against hanging, not a timing assertion
        while not marker.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"writer did not reach the second seal: {proc.stderr.read().decode()}")
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL

    leftovers = list(unsealed_path(store_path).iterdir())
    assert len(leftovers) == 1
    assert (leftovers[0] / "writer.json").exists()
    assert (leftovers[0] / "keys").is_dir()  # the second segment's arrays were written

    sealed = [synthetic_record(s, CRASH_LENGTH) for s in CRASH_SEALED_SEEDS]
    lost = [synthetic_record(s, CRASH_LENGTH) for s in CRASH_UNSEALED_SEEDS]
    reader = logitcache.open_store(str(store_path))
    assert [len(s) for s in reader.segments()] == [len(sealed)]
    for r in sealed:
        assert_matches(reader.get(r.key), r)
    for r in lost:
        assert not reader.contains(r.key)

    assert open_store(str(store_path), writable=True).clean_unsealed() == 1
    assert list(unsealed_path(store_path).iterdir()) == []
    for r in sealed:
        assert_matches(logitcache.open_store(str(store_path)).get(r.key), r)


# -- content addressing ---------------------------------------------------------------------------


def test_first_sealed_copy_wins(store_path: Path, writer: Store) -> None:
    writer.ensure_space(SPACE)
    first = synthetic_record(7, 30)
    second = synthetic_record(7, 30, row_seed=1)  # same sequence, other teacher numbers
    assert first.key == second.key
    assert np.abs(first.rows.logprobs - second.rows.logprobs).max() > 10 * BOUND
    write_segment(writer, [first])
    write_segment(writer, [synthetic_record(8, 3), second])

    assert_matches(writer.get(first.key), first)
    assert_matches(logitcache.open_store(str(store_path)).get(first.key), first)


def test_same_sequence_in_two_datasets_is_one_record(store_path: Path) -> None:
    a, shared, b = (synthetic_record(seed, 12) for seed in range(3))
    first_job = open_store(str(store_path), writable=True)
    first_job.create_dataset("first", SPACE, [a.key, shared.key], positions=24, provenance={})
    write_segment(first_job, [a, shared])
    # A later job computes only what is not sealed yet, as precompute does.
    second_job = open_store(str(store_path), writable=True)
    second_keys = [record_key(SPACE.space_id, r.input_ids) for r in (shared, b)]
    second_job.create_dataset("second", SPACE, second_keys, positions=24, provenance={})
    write_segment(second_job, [r for r in (shared, b) if not second_job.contains(r.key)])

    reader = logitcache.open_store(str(store_path))
    assert sum(len(s) for s in reader.segments()) == 3
    assert reader.dataset("first").keys[1] == reader.dataset("second").keys[0] == shared.key.hex()
    from_first, from_second = reader.dataset("first")[1], reader.dataset("second")[0]
    np.testing.assert_array_equal(from_first.logprobs, from_second.logprobs)
    assert_matches(from_second, shared)


# -- errors ---------------------------------------------------------------------------------------


def test_read_only_handles_refuse_writes(store_path: Path, writer: Store) -> None:
    record = synthetic_record(0, 4)
    write_segment(writer, [record])
    writer.create_dataset("d", SPACE, [record.key], positions=4, provenance={})
    reader = logitcache.open_store(str(store_path))

    with pytest.raises(PermissionError):
        reader.write_segment(SPACE, [record])
    with pytest.raises(PermissionError):
        reader.clean_unsealed()
    with pytest.raises(PermissionError):
        reader.create_dataset("other", SPACE, [record.key], positions=4, provenance={})
    with pytest.raises(PermissionError):
        reader.mark_complete("d")
    with pytest.raises(PermissionError):
        reader.delete_dataset("d")
    assert reader.datasets() == ["d"]
    assert not reader.dataset("d").complete


def test_open_missing_store(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(NotFound):
        logitcache.open_store(str(missing))
    assert not missing.exists(), "a read-only open must not create the store"


def test_open_directory_that_is_not_a_store(tmp_path: Path) -> None:
    (tmp_path / "some-file.txt").write_text("not a store")
    with pytest.raises(NotFound, match="not a logitcache store"):
        logitcache.open_store(str(tmp_path))


def test_open_by_file_url(store_path: Path, writer: Store) -> None:
    writer.ensure_space(SPACE)
    record = synthetic_record(0, 4)
    write_segment(writer, [record])
    assert_matches(logitcache.open_store(store_path.as_uri()).get(record.key), record)


@pytest.mark.parametrize(
    "name", ["", ".hidden", "-dash", "_under", "a/b", "../escape", "a b", "x" * 129, "naïve"]
)
def test_invalid_dataset_names(writer: Store, name: str) -> None:
    with pytest.raises(InvalidArgument):
        writer.create_dataset(name, SPACE, [], positions=0, provenance={})
    with pytest.raises(InvalidArgument):
        writer.dataset(name)


@pytest.mark.parametrize("name", ["a", "9", "Wiki-2024_v1.test", "x" * 128])
def test_valid_dataset_names(writer: Store, name: str) -> None:
    record = synthetic_record(0, 3)
    writer.create_dataset(name, SPACE, [record.key], positions=3, provenance={})
    assert writer.dataset(name).keys == [record.key.hex()]


def test_creating_a_dataset_twice(writer: Store) -> None:
    record = synthetic_record(0, 3)
    writer.create_dataset("d", SPACE, [record.key], positions=3, provenance={})
    with pytest.raises(AlreadyExists):
        writer.create_dataset("d", SPACE, [record.key], positions=3, provenance={})


def test_missing_dataset(writer: Store) -> None:
    with pytest.raises(NotFound):
        writer.dataset("absent")


def test_mark_complete_of_a_missing_dataset(writer: Store) -> None:
    with pytest.raises(NotFound):
        writer.mark_complete("absent")


def test_unknown_and_malformed_keys(writer: Store) -> None:
    unknown = synthetic_record(0, 3).key
    with pytest.raises(KeyError):
        writer.get(unknown)
    with pytest.raises(KeyError):
        writer.get(unknown.hex())
    assert not writer.contains(unknown)
    for malformed in ("zz" * 16, "abcd", b"\x00" * 15):
        with pytest.raises(InvalidArgument):
            writer.get(malformed)
