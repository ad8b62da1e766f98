"""Records on the wire: the store's codec arrays in a RecordBatch, decoded with vectorised numpy.

The server sends the codec's integer arrays exactly as stored (no decode, no re-encode); the
client decodes a whole batch at once and splits it into records with views, so the cost grows with
batches, not with positions.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from logitcache.client.codec import codec_for
from logitcache.client.record import Record
from logitcache.client.space import CaptureSpace
from logitcache.v1 import logitcache_pb2 as pb


def encode_batch(
    space: CaptureSpace,
    keys: Sequence[bytes],
    input_ids: np.ndarray,
    lengths: np.ndarray,
    arrays: dict[str, np.ndarray],
    *,
    indices: Sequence[int] = (),
    cursor: int = 0,
) -> pb.RecordBatch:
    """Wrap codec arrays of concatenated records (see ``QuantizedTopKCodec.encode``)."""
    return pb.RecordBatch(
        space_id=space.space_id,
        codec=space.codec,
        k=space.k,
        vocab_size=space.vocab_size,
        keys=list(keys),
        lengths=np.asarray(lengths, dtype=np.int64).tolist(),
        input_ids=np.ascontiguousarray(input_ids, dtype="<i4").tobytes(),
        token_ids=_le_bytes(arrays["token_ids"]),
        logprob_gaps=_le_bytes(arrays["logprob_gaps"]),
        target_q=_le_bytes(arrays["target_q"]),
        indices=list(indices),
        cursor=cursor,
    )


def decode_batch(batch: pb.RecordBatch) -> list[Record]:
    """All records of a batch, in batch order."""
    if not batch.keys:
        return []
    codec = codec_for(batch.codec, batch.vocab_size)
    k = batch.k
    lengths = np.asarray(batch.lengths, dtype=np.int64)
    positions = int(lengths.sum())
    arrays = {
        "token_ids": np.frombuffer(batch.token_ids, dtype=codec.id_dtype.newbyteorder("<")),
        "logprob_gaps": np.frombuffer(batch.logprob_gaps, dtype="<u2"),
        "target_q": np.frombuffer(batch.target_q, dtype="<u2"),
    }
    input_ids = np.frombuffer(batch.input_ids, dtype="<i4")
    if (
        input_ids.shape[0] != positions
        or arrays["token_ids"].shape[0] != positions * k
        or arrays["logprob_gaps"].shape[0] != positions * k
        or arrays["target_q"].shape[0] != positions
        or len(batch.keys) != len(lengths)
    ):
        raise ValueError("malformed RecordBatch: array sizes do not match lengths and k")
    arrays["token_ids"] = arrays["token_ids"].reshape(positions, k)
    arrays["logprob_gaps"] = arrays["logprob_gaps"].reshape(positions, k)
    rows = codec.decode(arrays)
    input_ids = input_ids.astype(np.int32)
    bounds = np.cumsum(lengths)[:-1]
    return [
        Record(key=key.hex(), input_ids=ids, token_ids=tok, logprobs=lp, target_logprobs=tgt)
        for key, ids, tok, lp, tgt in zip(
            batch.keys,
            np.split(input_ids, bounds),
            np.split(rows.token_ids, bounds),
            np.split(rows.logprobs, bounds),
            np.split(rows.target_logprobs, bounds),
            strict=True,
        )
    ]


def _le_bytes(a: np.ndarray) -> bytes:
    a = np.asarray(a)
    return np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).tobytes()
