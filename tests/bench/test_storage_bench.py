"""``bench storage`` without an engine: which teachers and texts it runs on, the held-out texts it
reads, and every encoding of the real-text teacher's rows at both vocabularies, stored in real
sealed segments and read back."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from logitcache.bench import storage
from logitcache.client.codecs import DEFAULT_CODEC, TopKRows, codec_for
from logitcache.client.space import CaptureSpace
from logitcache.demo.real_text import held_out_path
from logitcache.server.engine.sampling import sample_rows
from logitcache.server.store.backend import LocalBackend
from logitcache.server.store.reader import SegmentReader
from logitcache.server.store.writer import CapturedRecord, write_segment

SYNTHETIC_VOCAB = 151_936


def bench_args(**overrides) -> argparse.Namespace:
    values = dict(teacher=None, data=None, top_k=64, top_p=[0.95], samples=12, repeats=1,
                  synthetic_vocab=SYNTHETIC_VOCAB, sequences=4, seq_len=64, seed=1)  # fmt: skip
    values.update(overrides)
    return argparse.Namespace(**values)


def test_by_default_both_teachers_and_with_teacher_only_that_one(
    demo_teacher: Path, real_text_teacher: Path
) -> None:
    demo, real = storage.cases(bench_args())
    assert (demo.teacher, demo.data) == (str(demo_teacher), None)
    assert (real.teacher, real.data) == (
        str(real_text_teacher),
        str(held_out_path(real_text_teacher)),
    )
    assert storage.cases(bench_args(data="x.jsonl"))[1].data == "x.jsonl"
    (only,) = storage.cases(bench_args(teacher=str(demo_teacher), data="y.jsonl"))
    assert (only.teacher, only.data) == (str(demo_teacher), "y.jsonl")


def test_held_out_texts_become_full_sequences_of_the_teachers_tokens(
    real_text_teacher: Path, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    sequences = storage.data_sequences(
        str(real_text_teacher), str(held_out_path(real_text_teacher)), 5, 100
    )
    assert len(sequences) == 5 and all(s.shape == (100,) and s.dtype == np.int32 for s in sequences)
    tokenizer = AutoTokenizer.from_pretrained(str(real_text_teacher))
    first = json.loads(held_out_path(real_text_teacher).open().readline())["text"]
    expected = tokenizer(first)["input_ids"][:100]
    np.testing.assert_array_equal(sequences[0][: len(expected)], expected)
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"text": "too short"}) + "\n")
    with pytest.raises(SystemExit, match="fewer than 100 tokens"):
        storage.data_sequences(str(real_text_teacher), str(short), 5, 100)


def captured(rows: TopKRows, vocab: int) -> storage.Captured:
    """The bench's positions from rows of full distributions' top-k (no engine run)."""
    mapping = np.random.default_rng(0).choice(SYNTHETIC_VOCAB, size=vocab, replace=False)
    big = TopKRows(mapping[rows.token_ids].astype(np.int32), rows.logprobs, rows.target_logprobs)
    rng = np.random.default_rng(1)
    return storage.Captured(
        exact=TopKRows(rows.token_ids, rows.logprobs, rows.target_logprobs),
        sampled=sample_rows(rows, 12, rng),
        exact_big=big,
        sampled_big=sample_rows(big, 12, rng),
        lengths=[128] * (len(rows) // 128),
        inputs=[np.arange(128, dtype=np.int32) % 5 for _ in range(len(rows) // 128)],
        mean_entropy=0.0,
        top_k_mass=float(np.exp(rows.logprobs.astype(np.float64)).sum(axis=1).mean()),
    )


def test_every_encoding_at_both_vocabularies_from_sealed_segments(
    real_text_rows: TopKRows, tmp_path: Path
) -> None:
    args = bench_args()
    cap = captured(real_text_rows, 2000)
    table = storage._encodings(args, cap, str(tmp_path), False, 2000) + storage._encodings(
        args, cap, str(tmp_path), True, SYNTHETIC_VOCAB
    )
    names = {"naive int32+fp32", "distillkit-style", "topk-q64-delta-v1", "topk-v2", "topk-v3",
             "topk-v4", "topk-v5", "topk-v6", f"top_p:0.95 ({DEFAULT_CODEC})",
             "sampled U=12"}  # fmt: skip
    for vocab in (2000, SYNTHETIC_VOCAB):
        assert {r.name for r in table if r.vocab == vocab} == names
    for r in table:
        assert r.bytes_per_position > 0
        if r.read_rate is not None:  # a logitcache encoding: its segment's files on disk
            assert r.bytes_per_position < 8 * 64
    checks = storage._targets(table, args)
    bounds = [ok for what, _, ok in checks if "within 0.01 nats" in what]
    assert len(bounds) == 10 and all(bounds)  # topk-v2 to v6 at both vocabularies


@pytest.mark.parametrize("codec_name", ["topk-v3", "topk-v4", "topk-v5", "topk-v6"])
def test_a_segment_reads_back_exactly_after_reopening(
    real_text_rows: TopKRows, tmp_path: Path, codec_name: str
) -> None:
    """A sealed segment, read by a new backend and reader (as after a restart), decodes to
    exactly the rows of the in-memory encoding: the codec needs no state beyond its space and
    the segment (topk-v4's and v5's tables are in the segment; the input tokens recur, so they
    are used)."""
    space = CaptureSpace("teacher", "tokenizer", 2000, "topk", 64, "float32", codec_name)
    codec = codec_for(space.codec, space.vocab_size)
    records = [
        CapturedRecord.encode(
            i.to_bytes(16, "little"), np.arange(128, dtype=np.int32) % 5,
            TopKRows(*(a[i * 128 : (i + 1) * 128] for a in (
                real_text_rows.token_ids, real_text_rows.logprobs,
                real_text_rows.target_logprobs, real_text_rows.tail_logprobs))),
            space,
        )
        for i in range(len(real_text_rows) // 128)
    ]  # fmt: skip
    segment_id = write_segment(LocalBackend(tmp_path), space, records)
    loaded = SegmentReader(LocalBackend(tmp_path), space, segment_id).load()
    decoded = codec_for(codec_name, 2000).decode(loaded)
    expected = codec.decode(codec.encode(real_text_rows))
    for name in ("token_ids", "logprobs", "target_logprobs", "tail_logprobs"):
        np.testing.assert_array_equal(getattr(decoded, name), getattr(expected, name))
