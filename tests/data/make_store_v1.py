"""Writes tests/data/store-v1: a small store in the format of logitcache before issue 9.

Run with the code of commit 6643b39 importable as ``logitcache`` (not with this tree):

    git worktree add /tmp/old 6643b39   # then make /tmp/oldpkg/logitcache point at its folders
    cd /tmp && PYTHONPATH=/tmp/oldpkg python /path/to/make_store_v1.py /path/to/tests/data

It writes ``store-v1/`` (three capture spaces, one per codec, in several segments, one key
sealed twice with different numbers, four datasets, one of them still building) and
``store-v1-expected.npz``: every sealed record of every dataset as that old code decodes it.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np

from logitcache.client.codec import TopKRows
from logitcache.client.sampling import sample_rows
from logitcache.client.space import CaptureSpace, record_key
from logitcache.server.segments import CapturedRecord
from logitcache.server.store import open_store

TOPK = CaptureSpace("sha256:old-teacher", "sha256:old-tok", 1000, "topk", 8, "float32", "topk-v2")
Q64 = CaptureSpace("sha256:old-teacher", "sha256:old-tok", 500, "topk", 6, "float32",
                   "topk-q64-delta-v1")  # fmt: skip
SAMPLED = CaptureSpace("sha256:old-teacher", "sha256:old-tok", 300, "sampled", 16, "float32",
                       "sampled-v1")  # fmt: skip
FIELDS = ("input_ids", "token_ids", "logprobs", "target_logprobs", "tail_logprobs", "counts")


def full_rows(rng: np.random.Generator, ids: np.ndarray, vocab: int) -> np.ndarray:
    logits = rng.normal(scale=3.0, size=(len(ids), vocab))
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def targets(lp: np.ndarray, ids: np.ndarray) -> np.ndarray:
    t = np.full(len(ids), np.nan)
    t[:-1] = lp[np.arange(len(ids) - 1), ids[1:]]
    return t.astype(np.float32)


def topk_rows(rng: np.random.Generator, ids: np.ndarray, space: CaptureSpace, ragged: bool):
    lp = full_rows(rng, ids, space.vocab_size)
    order = np.argsort(-lp, axis=1, kind="stable")[:, : space.k]
    kept = np.take_along_axis(lp, order, axis=1).astype(np.float32)
    tail = None
    if ragged:  # a top-p prefix: each row keeps 1..k entries, the tail from the exact values
        keep = rng.integers(1, space.k + 1, size=len(ids))
        cut = np.arange(space.k)[None, :] >= keep[:, None]
        order = np.where(cut, 0, order)
        kept = np.where(cut, -np.inf, kept).astype(np.float32)
        mass = np.exp(kept.astype(np.float64)).sum(axis=1)
        tail = np.log(np.maximum(1.0 - mass, 1e-30)).astype(np.float32)
    return TopKRows(order.astype(np.int32), kept, targets(lp, ids), tail_logprobs=tail)


def sampled_rows(rng: np.random.Generator, ids: np.ndarray, space: CaptureSpace):
    lp = full_rows(rng, ids, space.vocab_size).astype(np.float32)
    full = TopKRows(
        np.tile(np.arange(space.vocab_size, dtype=np.int32), (len(ids), 1)), lp, targets(lp, ids)
    )
    return sample_rows(full, space.k, rng)


def records(space: CaptureSpace, lengths: list[int], seed: int, make) -> list[CapturedRecord]:
    out = []
    for i, length in enumerate(lengths):
        rng = np.random.default_rng([seed, i])
        ids = rng.integers(0, space.vocab_size, size=length, dtype=np.int32)
        out.append(
            CapturedRecord.encode(record_key(space.space_id, ids), ids, make(rng, ids), space)
        )
    return out


def seal(store, space: CaptureSpace, recs: list[CapturedRecord]) -> None:
    builder = store.new_segment(space)
    for r in recs:
        builder.add(r)
    store.seal(builder)


def main(out: Path) -> None:
    root = out / "store-v1"
    shutil.rmtree(root, ignore_errors=True)
    store = open_store(str(root), writable=True)

    topk = records(TOPK, [1, 2, 5, 9, 16, 3, 20, 7, 1, 12, 4, 8, 15, 6], 1,
                   lambda rng, ids: topk_rows(rng, ids, TOPK, ragged=True))  # fmt: skip
    seal(store, TOPK, topk[:5])
    seal(store, TOPK, topk[5:10])
    # topk[2] again with other numbers: the first sealed copy (above) must stay the answer.
    rng = np.random.default_rng(99)
    again = CapturedRecord.encode(
        topk[2].key, topk[2].input_ids, topk_rows(rng, topk[2].input_ids, TOPK, True), TOPK
    )
    seal(store, TOPK, [*topk[10:], again])

    q64 = records(Q64, [3, 10, 1, 6, 14, 2], 2,
                  lambda rng, ids: topk_rows(rng, ids, Q64, ragged=False))  # fmt: skip
    seal(store, Q64, q64)

    sampled = records(SAMPLED, [4, 1, 11, 7, 2, 9], 3,
                      lambda rng, ids: sampled_rows(rng, ids, SAMPLED))  # fmt: skip
    seal(store, SAMPLED, sampled[:3])
    seal(store, SAMPLED, sampled[3:])

    never = [record_key(TOPK.space_id, np.full(3, 990 + i, dtype=np.int32)) for i in range(2)]
    datasets = {
        "topk": (TOPK, [r.key for r in topk[::-1]] + [topk[2].key], True),
        "q64": (Q64, [r.key for r in q64], True),
        "sampled": (SAMPLED, [r.key for r in sampled[3:] + sampled[:3]], True),
        "partial": (TOPK, [topk[0].key, never[0], topk[3].key, never[1], topk[6].key], False),
    }
    expected: dict[str, np.ndarray] = {}
    for name, (space, keys, complete) in datasets.items():
        positions = sum(len(r.input_ids) for r in topk + q64 + sampled if r.key in keys)
        store.create_dataset(name, space, keys, positions, provenance={"fixture": "store-v1"})
        if complete:
            store.mark_complete(name)
        expected[f"{name}/keys"] = np.frombuffer(b"".join(keys), np.uint8).reshape(-1, 16)
        reader = open_store(str(root))
        for i, key in enumerate(keys):
            if not reader.contains(key):
                continue
            record = reader.get(key)
            for f in FIELDS:
                value = getattr(record, f)
                if value is not None:
                    expected[f"{name}/{i}/{f}"] = value
    np.savez_compressed(out / "store-v1-expected.npz", **expected)


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve())
