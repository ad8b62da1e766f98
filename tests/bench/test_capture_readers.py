"""bench capture --data: the whole-file baseline reads the same sequences as the streamed reader,
so the two are compared on equal work, and the reader measure reports what it read."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from logitcache.bench.capture import measure_reader, whole_file_sequences
from logitcache.server.inputs import input_shards, load_sequences

WORDS = {"the": 1, "cat": 2, "sat": 3, "on": 4, "mat": 5}


def tokenize(texts: list[str]) -> list[list[int]]:
    return [[WORDS[w] for w in text.split()] for text in texts]


def test_the_baseline_reads_what_the_streamed_reader_reads(tmp_path: Path) -> None:
    rows = [{"text": "the cat sat on the mat"}, {"input_ids": [7, 8, 9]}, {"text": "the cat"}]
    for n in range(3):
        lines = [json.dumps(r) for r in rows[n:] + rows[:n]]
        (tmp_path / f"part-{n}.jsonl").write_text("\n".join(lines) + "\n\n")
    streamed = load_sequences(
        tmp_path, vocab_size=10, max_len=4, tokenize=tokenize, overflow="split"
    )
    baseline = whole_file_sequences(input_shards(tmp_path), 10, 4, tokenize)
    assert [s.tolist() for s in baseline] == [s.input_ids.tolist() for s in streamed.sequences]
    assert all(s.dtype == np.int32 for s in baseline)


def test_a_reader_measure_counts_the_input_and_its_memory(
    demo_teacher: Path, tmp_path: Path
) -> None:
    (tmp_path / "data.jsonl").write_text(json.dumps({"text": "the cat sat on the mat"}) + "\n")
    for reader in ("streamed", "whole-file"):
        measured = measure_reader(reader, tmp_path, str(demo_teacher))
        assert measured["sequences"] == 1 and measured["tokens"] > 0
        assert measured["peak_rss"] >= measured["rss_over_start"] >= 0
