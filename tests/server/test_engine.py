"""vLLM capture on the demo teacher against an independent transformers fp32 forward pass."""

from __future__ import annotations

import numpy as np
import pytest

from logitcache.client.errors import InvalidArgument

pytestmark = pytest.mark.slow
TIE = 1e-4  # log-probabilities closer than this may swap ranks legitimately
TOL = 2e-3  # vLLM's CPU kernels vs eager PyTorch, both in fp32


@pytest.mark.parametrize("k", [1, 8, 64])
def test_vllm_rows_match_reference_forward_pass(engine, loop_thread, reference, demo_sequences, k):
    for ids in demo_sequences:
        rows = loop_thread.run(engine.capture(ids, k))
        full = reference.full_logprobs(ids).numpy()  # [T, V]
        t_len = len(ids)
        assert rows.token_ids.shape == (t_len, k) and rows.token_ids.dtype == np.int32
        assert rows.logprobs.shape == (t_len, k) and rows.logprobs.dtype == np.float32
        assert rows.target_logprobs.shape == (t_len,)

        # Descending, and each stored value is the reference's value for that id at that row:
        # this checks the row alignment (row t = distribution after position t) too.
        assert np.all(np.diff(rows.logprobs, axis=1) <= 1e-6)
        at_ids = np.take_along_axis(full, rows.token_ids.astype(np.int64), axis=1)
        np.testing.assert_allclose(rows.logprobs, at_ids, atol=TOL)

        # The stored ids are a top-k set: nothing outside them beats the k-th value (up to ties).
        kth = np.sort(full, axis=1)[:, -k]
        np.testing.assert_allclose(rows.logprobs[:, -1], kth, atol=TOL)
        ref_top = np.argsort(-full, axis=1)[:, :k]
        for t in np.flatnonzero((np.sort(rows.token_ids, 1) != np.sort(ref_top, 1)).any(1)):
            differing = np.setxor1d(rows.token_ids[t], ref_top[t])
            assert np.all(np.abs(full[t, differing] - kth[t]) < TIE + TOL), f"row {t}"

        # Target: log p(x[t+1]) whether or not it is in the top-k; NaN on the last row.
        expected_target = full[np.arange(t_len - 1), ids[1:]]
        np.testing.assert_allclose(rows.target_logprobs[:-1], expected_target, atol=TOL)
        assert np.isnan(rows.target_logprobs[-1])


def test_demo_teacher_distributions_are_peaked(engine, loop_thread, demo_sequences):
    rows = loop_thread.run(engine.capture(demo_sequences[-1], 64))
    top1 = np.exp(rows.logprobs[:, 0])
    # A trained teacher, not a random init (whose top-1 probability is a few times 1/V):
    # parts of the demo language are near-deterministic, others genuinely open.
    assert (top1 > 0.9).mean() > 0.1
    assert top1.mean() > 0.3
    assert np.all(np.exp(rows.logprobs).sum(1) <= 1.0 + 1e-4)


def test_capture_rejects_k_above_engine_maximum(engine, loop_thread, demo_sequences):
    with pytest.raises(InvalidArgument, match="top-k"):
        loop_thread.run(engine.capture(demo_sequences[2], engine.max_top_k + 1))


def test_engine_dtype_is_the_checkpoint_dtype(engine):
    assert engine.dtype == "float32"
