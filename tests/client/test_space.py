"""Capture spaces and record keys: stable ids, tamper detection, content addresses, modes."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from logitcache.client.space import KEY_BYTES, CaptureMode, CaptureSpace, record_key

SPACE = CaptureSpace(
    teacher_fingerprint="sha256:teacher-0001",
    tokenizer_fingerprint="sha256:tokenizer-0001",
    vocab_size=32000,
    mode="topk",
    k=64,
    engine_dtype="bfloat16",
    codec="topk-q64-delta-v1",
)

# One changed value per field: every field of the space must reach its id.
CHANGES = {
    "teacher_fingerprint": "sha256:teacher-0002",
    "tokenizer_fingerprint": "sha256:tokenizer-0002",
    "vocab_size": 32001,
    "mode": "sampled",
    "k": 32,
    "engine_dtype": "float32",
    "codec": "topk-q64-delta-v2",
    "temperatures": (2.0,),
}


def test_changes_cover_every_field() -> None:
    assert set(CHANGES) == {f.name for f in dataclasses.fields(CaptureSpace)}


def test_space_id_is_deterministic() -> None:
    again = CaptureSpace(**dataclasses.asdict(SPACE))
    assert again.space_id == SPACE.space_id
    assert SPACE.space_id == SPACE.space_id
    assert len(SPACE.space_id) == 20
    int(SPACE.space_id, 16)  # hexadecimal, usable as a directory name


@pytest.mark.parametrize(("field", "value"), CHANGES.items())
def test_space_id_changes_with_every_field(field: str, value: object) -> None:
    changed = dataclasses.replace(SPACE, **{field: value})
    assert changed.space_id != SPACE.space_id


def test_json_round_trip() -> None:
    doc = json.loads(json.dumps(SPACE.to_json()))
    assert doc["space_id"] == SPACE.space_id
    assert CaptureSpace.from_json(doc) == SPACE


def test_from_json_without_space_id() -> None:
    assert CaptureSpace.from_json(dataclasses.asdict(SPACE)) == SPACE


def test_from_json_rejects_tampered_space_id() -> None:
    doc = SPACE.to_json()
    doc["space_id"] = "0" * 20
    with pytest.raises(ValueError, match="does not match"):
        CaptureSpace.from_json(doc)


def test_from_json_rejects_tampered_field() -> None:
    doc = SPACE.to_json()
    doc["k"] = 128  # the stored id was computed for k=64
    with pytest.raises(ValueError, match="does not match"):
        CaptureSpace.from_json(doc)


def test_record_key_is_16_bytes_and_deterministic() -> None:
    key = record_key(SPACE.space_id, np.array([1, 2, 3], dtype=np.int32))
    assert isinstance(key, bytes)
    assert len(key) == KEY_BYTES == 16
    assert record_key(SPACE.space_id, np.array([1, 2, 3], dtype=np.int32)) == key


def test_record_key_differs_across_spaces() -> None:
    other = dataclasses.replace(SPACE, k=32)
    ids = np.arange(10, dtype=np.int32)
    assert record_key(SPACE.space_id, ids) != record_key(other.space_id, ids)


@pytest.mark.parametrize(
    "other", [[1, 2, 4], [1, 2], [1, 2, 3, 0], [3, 2, 1], [0, 1, 2, 3], [1 << 16 | 1, 2, 3]]
)
def test_record_key_differs_across_token_sequences(other: list[int]) -> None:
    assert record_key(SPACE.space_id, np.array(other)) != record_key(
        SPACE.space_id, np.array([1, 2, 3])
    )


def test_record_key_is_independent_of_the_input_dtype() -> None:
    values = [5, 0, 31999, 17, 17, 2]
    expected = record_key(SPACE.space_id, np.array(values, dtype=np.int32))
    assert record_key(SPACE.space_id, np.array(values, dtype=np.int64)) == expected
    assert record_key(SPACE.space_id, np.array(values, dtype=np.uint16)) == expected
    assert record_key(SPACE.space_id, np.array(values, dtype=">i4")) == expected
    assert record_key(SPACE.space_id, values) == expected
    strided = np.array([[v, -1] for v in values], dtype=np.int64)[:, 0]
    assert record_key(SPACE.space_id, strided) == expected


@pytest.mark.parametrize(
    ("stored", "mode", "top_p"),
    [("topk", CaptureMode.TOPK, None), ("top_p:0.95", CaptureMode.TOP_P, 0.95),
     ("sampled", CaptureMode.SAMPLED, None)],
)  # fmt: skip
def test_stored_mode_strings_parse_to_the_enum(
    stored: str, mode: CaptureMode, top_p: float | None
) -> None:
    space = dataclasses.replace(SPACE, mode=stored)
    assert (space.capture_mode, space.top_p) == (mode, top_p)
    assert space.capture_mode is mode
    # The enum is the stored string: a space built from it is the space written before it existed.
    built = dataclasses.replace(SPACE, mode=mode if top_p is None else f"{mode}:{top_p:g}")
    assert json.dumps(built.to_json()) == json.dumps(space.to_json())


def test_unknown_stored_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="not a valid CaptureMode"):
        _ = dataclasses.replace(SPACE, mode="beam").capture_mode
