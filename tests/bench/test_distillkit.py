"""DistillKitStyleCodec: exact ids, bf16 head values, the polynomial tail, the byte size."""

from __future__ import annotations

import math

import numpy as np
import pytest

from logitcache.bench.distillkit import (
    DistillKitStyleCodec,
    from_bfloat16_bits,
    to_bfloat16_bits,
)
from logitcache.client.codecs import TopKRows
from logitcache.client.fidelity import fidelity

VOCABS = (2, 2001, 2048, 65536, 65537, 151936)
KS = (17, 32, 64, 128)


def make_rows(rng: np.random.Generator, positions: int, vocab: int, k: int) -> TopKRows:
    """Rows with distinct random ids (0 and V - 1 among them where they fit) and descending
    log-probs of a teacher-like shape."""
    ids = np.stack([rng.choice(vocab, size=min(k, vocab), replace=False) for _ in range(positions)])
    if k > vocab:  # a tiny vocabulary: ids repeat, which the format does not mind
        ids = rng.integers(0, vocab, size=(positions, k))
    ids[0, 0], ids[-1, -1] = 0, vocab - 1
    lp = -np.sort(rng.exponential(rng.uniform(0.5, 3.0, size=(positions, 1)), (positions, k)))
    lp = np.cumsum(lp, axis=1) / k - rng.uniform(0, 2, size=(positions, 1))
    return TopKRows(ids.astype(np.int32), lp.astype(np.float32), np.zeros(positions, np.float32))


@pytest.mark.parametrize("k", KS)
def test_ids_round_trip_and_size(k: int) -> None:
    rng = np.random.default_rng(k)
    for vocab in VOCABS:
        codec = DistillKitStyleCodec(vocab_size=vocab, k=k)
        bits = k * math.ceil(math.log2(vocab)) + 16 * 16 + 6 * 32
        assert codec.bytes_per_position == math.ceil(bits / 8)
        rows = make_rows(rng, 12, vocab, k)
        buf = codec.encode(rows)
        assert buf.dtype == np.uint8 and buf.shape == (12, codec.bytes_per_position)
        out = codec.decode(buf)
        np.testing.assert_array_equal(out.token_ids, rows.token_ids)
        assert out.token_ids.dtype == np.int32 and out.logprobs.dtype == np.float32
        assert out.logprobs.shape == (12, k) and out.tail_logprobs is None
        assert np.isnan(out.target_logprobs).all() and (out.logprobs <= 0).all()


def test_bit_layout_starts_with_the_first_id_msb_first() -> None:
    codec = DistillKitStyleCodec(vocab_size=2001, k=17)  # 11 bits per id
    rows = make_rows(np.random.default_rng(0), 1, 2001, 17)
    ids = rows.token_ids.copy()
    ids[0, :3] = [2000, 1, 0]  # 11111010000 00000000001 00000000000
    buf = codec.encode(TopKRows(ids, rows.logprobs, rows.target_logprobs))
    np.testing.assert_array_equal(buf[0, :4], [0b11111010, 0b00000000, 0b00000100, 0])


def test_first_values_within_bf16_precision() -> None:
    rng = np.random.default_rng(3)
    codec = DistillKitStyleCodec(vocab_size=151936, k=64)
    rows = make_rows(rng, 50, 151936, 64)
    head = codec.decode(codec.encode(rows)).logprobs[:, :16]
    exact = rows.logprobs[:, :16]
    # bf16 keeps 8 significant bits: half an ulp is at most 2^-8 of the value.
    assert (np.abs(head - exact) <= np.abs(exact) * 2.0**-8).all()


def test_bfloat16_rounding_is_nearest_even() -> None:
    # Ties go to the even pattern (both signs); off-tie values to the nearest.
    bits = np.array([0x3F808000, 0x3F818000, 0x3F808001, 0x3F807FFF, 0xBF818000], np.uint32)
    out = to_bfloat16_bits(bits.view(np.float32))
    np.testing.assert_array_equal(out, [0x3F80, 0x3F82, 0x3F81, 0x3F80, 0xBF82])
    special = np.array([-np.inf, 0.0, -0.0, np.nan], np.float32)
    back = from_bfloat16_bits(to_bfloat16_bits(special))
    assert back[0] == -np.inf and back[1] == 0 and np.signbit(back[2]) and np.isnan(back[3])
    torch = pytest.importorskip("torch")
    x = -np.random.default_rng(4).exponential(5.0, 10_000).astype(np.float32)
    ref = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(to_bfloat16_bits(x), ref)


@pytest.mark.parametrize("k", KS)
def test_polynomial_tail_decodes_nearly_exactly(k: int) -> None:
    # Coefficients that are exact in float32; the values are <= 0 on ranks 17..128.
    base = np.array([-3.0, -0.125, 2.0**-12, -(2.0**-20), 2.0**-28, -0.5])
    coefs = base * np.array([[1.0], [0.5], [2.0]])
    r = np.arange(17, k + 1, dtype=np.float64)
    terms = np.stack([r**0, r, r**2, r**3, r**4, np.sqrt(r)], axis=1)
    rest = coefs @ terms.T
    head = np.linspace(-0.1, -2.0, 16)[None, :].repeat(3, axis=0)
    lp = np.concatenate([head, rest], axis=1).astype(np.float32)
    ids = np.arange(k, dtype=np.int32)[None, :].repeat(3, axis=0)
    codec = DistillKitStyleCodec(vocab_size=32000, k=k)
    out = codec.decode(codec.encode(TopKRows(ids, lp, np.zeros(3, np.float32))))
    np.testing.assert_allclose(out.logprobs[:, 16:], rest, rtol=0, atol=1e-4)
    if k >= 22:  # 6 or more fitted ranks: from float64 values the fit recovers the coefficients
        exact64 = np.concatenate([head, rest], axis=1)
        np.testing.assert_allclose(codec.fit(exact64), coefs, rtol=1e-6, atol=1e-12)


def test_fidelity_of_a_realistic_round_trip() -> None:
    rng = np.random.default_rng(5)
    vocab, k = 5000, 64
    logits = rng.normal(0.0, 3.0, size=(20, vocab))
    full = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    ids = np.argsort(-full, axis=1)[:, :k]
    lp = np.take_along_axis(full, ids, axis=1).astype(np.float32)
    rows = TopKRows(ids.astype(np.int32), lp, np.zeros(20, np.float32))
    codec = DistillKitStyleCodec(vocab_size=vocab, k=k)
    f = fidelity(rows, codec.decode(codec.encode(rows)), vocab)
    assert np.isfinite(f.kl).all() and f.summary()["kl_mean"] < 0.05
    assert f.max_err_p_ge() < 0.5


def test_invalid_inputs() -> None:
    with pytest.raises(ValueError, match="exact_k"):
        DistillKitStyleCodec(vocab_size=100, k=16)
    codec = DistillKitStyleCodec(vocab_size=100, k=20)
    rows = make_rows(np.random.default_rng(6), 2, 100, 20)
    with pytest.raises(ValueError, match="must be"):
        codec.encode(make_rows(np.random.default_rng(6), 2, 100, 21))
    bad = rows.logprobs.copy()
    bad[0, -1] = -np.inf
    with pytest.raises(ValueError, match="finite"):
        codec.encode(TopKRows(rows.token_ids, bad, rows.target_logprobs))
    with pytest.raises(ValueError, match="vocabulary"):
        codec.encode(TopKRows(rows.token_ids + 100, rows.logprobs, rows.target_logprobs))
    with pytest.raises(ValueError, match="expected"):
        codec.decode(np.zeros((2, codec.bytes_per_position + 1), np.uint8))
