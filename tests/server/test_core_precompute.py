"""Offline precompute in process, on an injected engine (the transformers reference engine).

The dataset is built in input order under the engine's capture space, with the engine's exact
rows (within the codec's bounds); a second run reuses every sealed record and computes nothing.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
from counting_engine import CountingEngine

import logitcache
from logitcache.server.engine.reference import TransformersReference
from logitcache.server.precompute import PrecomputeRequest, precompute

K = 8


def test_precompute_runs_on_the_engine_it_is_given(demo_teacher: Path, tmp_path: Path) -> None:
    data = tmp_path / "data.jsonl"
    texts = ["the cat sat on the mat", "a dog ran far away", "the cat sat on the mat"]
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    store_url = str(tmp_path / "store")
    req = PrecomputeRequest(
        teacher=str(demo_teacher), data=data, out=store_url, dataset="d", top_k=K, progress=False
    )
    engines: list[CountingEngine] = []

    def factory(info, options) -> CountingEngine:
        engines.append(CountingEngine(info, options))
        return engines[-1]

    first = asyncio.run(precompute(req, engine_factory=factory))
    assert (first.sequences, first.computed_sequences, first.reused_sequences) == (3, 2, 0)
    assert sum(engines[0].computed.values()) == 2  # the duplicate text is computed once

    ds = logitcache.open_store(store_url).dataset("d")
    assert ds.complete and len(ds) == 3
    assert ds.space.engine_dtype == engines[0].dtype and ds.space.k == K
    reference = TransformersReference(demo_teacher)
    for record in ds:
        exact = reference.full_logprobs(record.input_ids).numpy()  # [T, V]
        stored = np.isfinite(record.logprobs)
        at = np.take_along_axis(exact, record.token_ids.astype(np.int64), axis=1)
        big = stored & (np.exp(at) >= 1e-3)  # the storage contract: 0.01 nats there
        assert np.max(np.abs(record.logprobs[big] - at[big])) <= 0.01
        top = np.sort(np.argsort(-exact, axis=1)[:, :K], axis=1)
        np.testing.assert_array_equal(np.sort(record.token_ids, axis=1), top)
    assert ds[0].key == ds[2].key

    second = asyncio.run(precompute(req, engine_factory=factory))
    assert (second.computed_sequences, second.reused_sequences) == (0, 2)  # distinct sequences
    assert len(engines) == 1  # a complete dataset needs no engine at all
