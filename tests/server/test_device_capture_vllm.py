"""Engine-side capture inside vLLM (the session engine, demo teacher): the start-up self-check
passed, and draws, normalisers, top-k and scored ids agree with the transformers reference running the same
computation; a record's draws do not depend on the batch it was captured in."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from logitcache.server.engine.columns import CaptureRequest, seed_of_key

pytestmark = pytest.mark.slow
TOL = 2e-3  # vLLM's CPU kernels vs eager PyTorch, both in fp32
REQUEST = CaptureRequest(top_k=16, samples=12, seed=seed_of_key(b"\x2a" * 32),
                         temperatures=(1.0, 2.0, 4.0))  # fmt: skip


def test_vllm_engine_side_capture_matches_the_reference(engine, loop_thread, reference,
                                                        demo_sequences) -> None:  # fmt: skip
    rng = np.random.default_rng(0)
    requests = [REQUEST.scoring(rng.integers(-1, 1785, (len(s), 3))) for s in demo_sequences]

    async def capture_all() -> list:
        pairs = zip(demo_sequences, requests, strict=True)
        return list(await asyncio.gather(*(engine.capture_columns(s, r) for s, r in pairs)))

    got = loop_thread.run(capture_all())
    assert engine._checked is not None and engine._checked.exception() is None
    same = total = 0
    for ids, request, cols in zip(demo_sequences, requests, got, strict=True):
        want = reference.capture_columns(ids, request)
        assert cols.draw_ids.shape == (len(ids), 12)
        np.testing.assert_allclose(cols.top_logprobs, want.top_logprobs, atol=TOL)
        np.testing.assert_allclose(cols.log_normalisers, want.log_normalisers, atol=TOL)
        np.testing.assert_allclose(cols.target_logprobs, want.target_logprobs, atol=TOL)
        np.testing.assert_allclose(cols.scored_logprobs, want.scored_logprobs, atol=TOL)
        # The same uniforms on (almost) the same CDF: only a draw on a boundary may move.
        same += int((cols.draw_ids == want.draw_ids).sum())
        total += cols.draw_ids.size
    assert same >= 0.999 * total


def test_vllm_draws_do_not_depend_on_the_batch(engine, loop_thread, demo_sequences) -> None:
    record = demo_sequences[-1]

    async def alone():
        return await engine.capture_columns(record, REQUEST)

    async def in_a_crowd():
        others = [engine.capture_columns(s, REQUEST) for s in demo_sequences[:-1]]
        return (await asyncio.gather(engine.capture_columns(record, REQUEST), *others))[0]

    a, b = loop_thread.run(alone()), loop_thread.run(in_a_crowd())
    assert (a.draw_ids == b.draw_ids).mean() >= 0.999
    np.testing.assert_allclose(a.top_logprobs, b.top_logprobs, atol=1e-4)
