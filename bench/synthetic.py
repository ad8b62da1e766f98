"""The benchmarks' made-up inputs: token sequences of the demo language, and a synthetic store.

The store's rows are shaped like a real teacher's (peaked, descending, a 32k vocabulary) and are
built in seconds without an engine: ``logitcache bench stream`` streams one, and tests that need
a store of many records use it too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from logitcache.client.codecs import DEFAULT_CODEC, TopKRows
from logitcache.client.space import CaptureSpace, record_key
from logitcache.server.store.store import open_store
from logitcache.server.store.writer import CapturedRecord


def benchmark_sequences(
    teacher_path: str, count: int, length: int, seed: int = 1
) -> list[np.ndarray]:
    """``count`` sequences of ``length`` tokens: demo-language documents of ``seed``, tokenised
    with the teacher's tokenizer, run together and cut; a teacher of another language (the
    large-vocabulary one) gives its own held-out texts instead, repeated if too few."""
    from transformers import AutoTokenizer

    from logitcache.demo.language import generate_documents

    tokenizer = AutoTokenizer.from_pretrained(teacher_path)
    stream: list[int] = []
    docs_seed = seed
    own = _own_language_texts(Path(teacher_path))
    while len(stream) < count * length:
        texts = own or generate_documents(200, seed=docs_seed)
        for ids in tokenizer(texts)["input_ids"]:
            stream.extend(ids)
        docs_seed += 1000
    return list(np.asarray(stream[: count * length], dtype=np.int32).reshape(count, length))


def _own_language_texts(teacher_path: Path) -> list[str]:
    """The held-out texts of a teacher that does not speak the demo language, else none."""
    import json

    from logitcache.demo.large_vocab import HELD_OUT_FILE, LANGUAGE

    facts = teacher_path / "demo_teacher.json"
    if not facts.is_file() or json.loads(facts.read_text()).get("language") != LANGUAGE:
        return []
    with open(teacher_path / HELD_OUT_FILE, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def synthetic_store(root: Path, positions: int, seq_len: int, k: int, vocab: int = 32000) -> str:
    """A store with one dataset, ``bench``, of peaked descending top-k rows (vectorised)."""
    space = CaptureSpace("bench-teacher", "bench-tokenizer", vocab, "topk", k, "bfloat16",
                         DEFAULT_CODEC)  # fmt: skip
    store = open_store(str(root), writable=True)
    rng = np.random.default_rng(0)
    n = max(1, positions // seq_len)
    keys: list[bytes] = []
    segment: list[CapturedRecord] = []
    for i in range(n):
        ids = rng.integers(0, vocab, seq_len, dtype=np.int32)
        gaps = rng.exponential(0.35, size=(seq_len, k)).astype(np.float32)
        gaps[:, 0] = np.abs(rng.normal(0.0, 0.6, seq_len))
        rows = TopKRows(
            token_ids=rng.integers(0, vocab, (seq_len, k), dtype=np.int32),
            logprobs=-np.cumsum(gaps, axis=1),
            target_logprobs=np.append(-rng.exponential(1.5, seq_len - 1), np.nan).astype(
                np.float32
            ),
        )
        key = record_key(space.space_id, ids)
        keys.append(key)
        segment.append(CapturedRecord.encode(key, ids, rows, space))
        if len(segment) * seq_len >= 1 << 16 or i == n - 1:
            store.write_segment(space, segment)
            segment = []
    store.create_dataset("bench", space, keys, n * seq_len, provenance={"synthetic": True})
    store.mark_complete("bench")
    return str(root)
