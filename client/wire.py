"""Records on the wire: the store's codec arrays in a RecordBatch, decoded with vectorised numpy.

The server sends the codec's integer arrays exactly as stored (no decode, no re-encode); the
client decodes a whole batch at once and splits it into records with views, so the cost grows with
batches, not with positions.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from logitcache.client.codecs import TopKRows, codec_for
from logitcache.client.codecs.tempered import temperatures_of
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
    loss_mask: np.ndarray | None = None,
) -> pb.RecordBatch:
    """Wrap the codec arrays of concatenated records (see ``logitcache.client.codecs``), and
    their ``loss_mask`` (uint8 [P], see ``Record.loss_mask``) where their dataset has one.
    A space's tails at other temperatures travel as arrays named by their temperature."""
    codec = codec_for(space.codec, space.vocab_size, space.temperatures)
    return pb.RecordBatch(
        space_id=space.space_id,
        codec=space.codec,
        k=space.k,
        vocab_size=space.vocab_size,
        keys=list(keys),
        lengths=np.asarray(lengths, dtype=np.int64).tolist(),
        input_ids=np.ascontiguousarray(input_ids, dtype="<i4").tobytes(),
        arrays=[
            pb.EncodedArray(name=f.name, data=_le_bytes(arrays[f.name], f.dtype))
            for f in codec.fields
        ],
        indices=list(indices),
        cursor=cursor,
        loss_mask=b"" if loss_mask is None else np.asarray(loss_mask, dtype=np.uint8).tobytes(),
    )


def decode_arrays(batch: pb.RecordBatch, codec, positions: int) -> dict[str, np.ndarray]:
    """The codec's arrays of a batch, checked against the batch's positions and k."""
    given = {a.name: a.data for a in batch.arrays}
    arrays, entries = {}, None
    for f in codec.fields:
        if f.name not in given:
            raise ValueError(f"malformed RecordBatch: codec {codec.name} needs array {f.name!r}")
        a = np.frombuffer(given[f.name], dtype=f.dtype.newbyteorder("<"))
        if f.per == "entry":
            if entries is not None and a.shape[0] != entries:
                raise ValueError("malformed RecordBatch: entry arrays differ in length")
            entries = a.shape[0]
        elif f.per_k:
            if a.shape[0] != positions * batch.k:
                raise ValueError(f"malformed RecordBatch: array {f.name!r} is not [P, k]")
            a = a.reshape(positions, batch.k)
        elif a.shape[0] != positions:
            raise ValueError(f"malformed RecordBatch: array {f.name!r} does not match lengths")
        arrays[f.name] = a
    return arrays


def decode_batch(batch: pb.RecordBatch) -> list[Record]:
    """All records of a batch, in batch order (with the tails at the temperatures whose arrays
    the batch carries)."""
    if not batch.keys:
        return []
    temperatures = temperatures_of(a.name for a in batch.arrays)
    codec = codec_for(batch.codec, batch.vocab_size, temperatures)
    lengths = np.asarray(batch.lengths, dtype=np.int64)
    positions = int(lengths.sum())
    input_ids = np.frombuffer(batch.input_ids, dtype="<i4")
    if input_ids.shape[0] != positions or len(batch.keys) != len(lengths):
        raise ValueError("malformed RecordBatch: array sizes do not match lengths and k")
    arrays = decode_arrays(batch, codec, positions)
    rows = codec.decode(arrays)
    keys = [k.hex() for k in batch.keys]
    loss_mask = None
    if batch.loss_mask:
        loss_mask = np.frombuffer(batch.loss_mask, dtype=np.uint8)
        if loss_mask.shape[0] != positions:
            raise ValueError("malformed RecordBatch: loss_mask does not match lengths")
    ids = input_ids.astype(np.int32)
    return split_records(keys, ids, lengths, rows, arrays.get("n"), loss_mask)


def split_records(
    keys: Sequence[str],
    input_ids: np.ndarray,
    lengths: np.ndarray,
    rows: TopKRows,
    row_lengths: np.ndarray | None = None,
    loss_mask: np.ndarray | None = None,
) -> list[Record]:
    """Decoded rows of concatenated records -> one Record each (views, no copies), with their
    ``loss_mask`` (uint8 [P]) where there is one.

    Ragged rows come back padded to the widest row of the whole batch; each record is cut to
    its own widest row, so it has the same shape as when it is read from the store.
    """
    bounds = np.cumsum(lengths)[:-1]
    starts = np.concatenate([[0], bounds]).astype(np.int64)
    if row_lengths is not None:  # the codec's own counts: no pass over the rows
        n = np.asarray(row_lengths).astype(np.int64)
    else:
        present = rows.counts > 0 if rows.counts is not None else rows.logprobs > -np.inf
        n = present.sum(axis=1)
    width = rows.token_ids.shape[1]
    widths = np.full(len(keys), width, dtype=np.int64)
    nonempty = np.asarray(lengths) > 0
    if n.size and nonempty.any() and not (n == width).all():
        widths[nonempty] = np.maximum.reduceat(n, starts[nonempty])

    def parts(a: np.ndarray | None) -> list:
        if a is None:
            return [None] * len(keys)
        pieces = np.split(a, bounds)
        if a.ndim == 1:
            return pieces
        return [p if w == width else p[:, :w] for p, w in zip(pieces, widths.tolist(), strict=True)]

    return [
        Record(key, ids, tok, lp, tgt, tail, cnt, mask, tempered, rows.temperatures)
        for key, ids, tok, lp, tgt, tail, cnt, mask, tempered in zip(
            keys,
            np.split(input_ids, bounds),
            parts(rows.token_ids),
            parts(rows.logprobs),
            parts(rows.target_logprobs),
            parts(rows.tail_logprobs),
            parts(rows.counts),
            parts(loss_mask),
            parts(rows.tempered_log_tails),
            strict=True,
        )
    ]


def _le_bytes(a: np.ndarray, dtype: np.dtype) -> bytes:
    return np.ascontiguousarray(a, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()
