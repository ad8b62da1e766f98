"""Full-distribution work on the engine's device: from a chunk of logits [n, V] to a few columns.

Every capture mode needs the whole distribution of a position once (its softmax), and then only
a handful of numbers: the top-k, U draws at T = 1, log-normalisers at other temperatures, the
log-prob of the actual next token. :func:`capture_columns` computes them where the logits are
(the GPU, or vLLM's CPU worker), so nothing of size V ever leaves the device, and no Python object
is made per position. The vLLM engine runs it inside vLLM's worker (``vllm_worker``); the
transformers reference engine runs the same function on its own logits, which is what tests hold
the two engines' draws and normalisers against.

Draws are reproducible by key: draw j of row t of a record is the inverse CDF at a uniform that is
a hash of (record seed, t, j), a counter-based generator, so it does not depend on the batch,
the chunking of the prefill, the device or the run.

The request and the column layout are in ``columns`` (free of torch).
"""

from __future__ import annotations

import numpy as np
import torch

from logitcache.client.codecs import TopKRows
from logitcache.server.engine.columns import CaptureRequest, seed_of_key
from logitcache.server.engine.sampling import group_draws

# Rows of float64 CDF work per step: bounds the device memory of sampling to 8 * this bytes.
_CDF_ELEMENTS = 1 << 24
_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x * c mod 2**32`` for x in [0, 2**32) held in int64, without int64 overflow."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + ((x * hi) & 0xFFFF) * 65536) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash with full avalanche (xor-shift-multiply), on int64 tensors."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def seed_tensor(seed: int, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """int64 [n] holding a 64-bit seed (two's complement), as :func:`uniforms` takes it."""
    signed = seed - (1 << 64) if seed >= 1 << 63 else seed
    return torch.full((n,), signed, dtype=torch.int64, device=device)


def uniforms(seeds: torch.Tensor, rows: torch.Tensor, samples: int) -> torch.Tensor:
    """float64 [n, samples] in (0, 1): the uniforms of draws 0..samples-1 of rows ``rows`` of
    the records seeded ``seeds`` (int64 [n] each)."""
    lo, hi = seeds & _MASK32, (seeds >> 32) & _MASK32
    base = _mix32(hi) ^ lo
    h = _mix32(_mix32(base) ^ rows.to(torch.int64))[:, None]
    j = torch.arange(samples, dtype=torch.int64, device=rows.device)
    h = _mix32(h ^ _mix32(j + 0x9E3779B9 & _MASK32)[None, :])
    # A second, independent word gives 53-bit uniforms (tokens below 2**-32 stay reachable).
    h2 = _mix32(h ^ 0x5BD1E995)
    return ((h >> 11).double() * 2.0**21 + (h2 >> 11).double() + 0.5) / 2.0**42


def draw(logprobs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """int64 [n, U]: the inverse CDF of each row's distribution at the uniforms ``u``."""
    n, vocab = logprobs.shape
    out = torch.empty(u.shape, dtype=torch.int64, device=logprobs.device)
    step = max(1, _CDF_ELEMENTS // vocab)
    for a in range(0, n, step):
        cdf = torch.cumsum(logprobs[a : a + step].double().exp(), dim=1)
        points = (u[a : a + step] * cdf[:, -1:]).contiguous()
        idx = torch.searchsorted(cdf, points, right=True)
        out[a : a + step] = idx.clamp_(max=vocab - 1)
    return out


def capture_columns(
    logits: torch.Tensor,
    targets: torch.Tensor,
    rows: torch.Tensor,
    seeds: torch.Tensor,
    request: CaptureRequest,
    scored_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """float32 [n, request.columns] for ``n`` positions, on ``logits``' device; positions of
    several records may share a call (their seeds differ; ``request.seed`` is not read).

    ``logits`` [n, V] are the engine's final logits; ``targets`` [n] the actual next tokens
    (-1 where there is none, the last row); ``rows`` [n] each position's index in its record
    and ``seeds`` [n] its record's seed (:func:`seed_tensor`), which fix its draws;
    ``scored_ids`` [n, request.score_width] the ids to score (< 0: none, -inf).
    """
    logprobs = logits.log_softmax(dim=-1, dtype=torch.float32)
    parts = [
        logprobs.gather(1, targets.clamp(min=0)[:, None]).masked_fill_(
            targets[:, None] < 0, float("nan")
        )
    ]
    if request.top_k:
        top = torch.topk(logprobs, request.top_k, dim=-1)
        parts += [top.indices.to(torch.int32).view(torch.float32), top.values]
    if request.samples:
        ids = draw(logprobs, uniforms(seeds, rows, request.samples))
        parts += [ids.to(torch.int32).view(torch.float32), logprobs.gather(1, ids)]
    if request.temperatures:
        # log sum exp(lp / T), shifted by the row's largest lp: one exp pass per temperature.
        peak = logprobs.amax(dim=1, keepdim=True)
        shifted = logprobs - peak
        parts.append(torch.cat([(shifted / t).exp_().sum(1, keepdim=True).log_() + peak / t
                                for t in request.temperatures], dim=1))  # fmt: skip
    if request.score_width:
        if scored_ids is None or scored_ids.shape != (logits.shape[0], request.score_width):
            raise ValueError(f"expected [{logits.shape[0]}, {request.score_width}] ids to score")
        ids = scored_ids.to(torch.int64)
        outside = (ids < 0) | (ids >= logprobs.shape[1])
        at = logprobs.gather(1, ids.clamp(0, logprobs.shape[1] - 1))
        parts.append(at.masked_fill_(outside, float("-inf")))
    return torch.cat(parts, dim=1)


def draw_rows_for_key(full: TopKRows, samples: int, key: bytes) -> TopKRows:
    """The engine's draws for the record ``key`` (``device_capture``), repeated on the host from
    its full rows (every token with its log-prob, any order): equal to what the engine stored
    when ``full`` holds the engine's own values."""
    lp = torch.from_numpy(np.asarray(full.logprobs, dtype=np.float32))
    order = torch.from_numpy(np.asarray(full.token_ids).astype(np.int64)).argsort(dim=1)
    by_id = lp.gather(1, order)  # [P, V] in id order, as the engine's softmax is
    n = by_id.shape[0]
    u = uniforms(seed_tensor(seed_of_key(key), n), torch.arange(n), samples)
    ids = draw(by_id, u)
    return group_draws(ids.numpy(), by_id.gather(1, ids).numpy(), full.target_logprobs)
