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

import math

import numpy as np
import torch

from logitcache.client.codecs import TopKRows
from logitcache.server.engine.columns import CaptureRequest, seed_of_key
from logitcache.server.engine.sampling import group_draws

_MASK32 = 0xFFFFFFFF
_MIN_GROUPS_PER_K = 4  # top_k works in groups only where there are this many groups per k


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


def _block_width(vocab: int, k: int) -> int:
    """The group size b of :func:`top_k` that minimises what its two stages select from
    (vocab / b group maxima, then k * b candidates): about sqrt(vocab / k); 1 where groups
    would not pay."""
    width = int(math.sqrt(vocab / max(k, 1)))
    return width if width >= 2 and vocab // width >= _MIN_GROUPS_PER_K * k else 1


def top_k(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest values per row of ``x`` [n, V] and their int64 ids, descending: equal to
    ``torch.topk`` up to the order of ties, at a fraction of its cost on a CPU.

    The ids split into G groups of b (group g: ids g, g + G, g + 2G, ...; the V - G * b last ids
    are always candidates). The k largest lie in the k groups with the largest maxima, since an
    entry of any other group is below k group maxima; so one top-k over the G group maxima and
    one over the k * b entries of those groups replace one over V entries.
    """
    n, vocab = x.shape
    width = _block_width(vocab, k)
    if width == 1:
        return torch.topk(x, k, dim=1)
    groups = vocab // width
    maxima = x[:, : groups * width].unflatten(1, (width, groups)).amax(1)
    chosen = torch.topk(maxima, k, dim=1, sorted=False).indices
    ids = (chosen[:, :, None] + torch.arange(0, groups * width, groups, device=x.device)).flatten(1)
    if vocab > groups * width:
        rest = torch.arange(groups * width, vocab, device=x.device)
        ids = torch.cat([ids, rest.expand(n, -1)], dim=1)
    top = torch.topk(x.gather(1, ids), k, dim=1)
    return top.values, ids.gather(1, top.indices)


def draw(logprobs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """int64 [n, U]: the inverse CDF of each row's distribution at the uniforms ``u`` (float64,
    in id order: draw j is the first id whose cumulative probability exceeds u_j).

    Two levels, so that no cumulative sum runs over the whole vocabulary: the masses of blocks
    of about sqrt(V) ids (their CDF in float64) find each draw's block and its fraction of the
    block's mass, then a cumulative sum over that block alone finds its id. A draw moves only
    where u falls within float rounding of a boundary.
    """
    n, vocab = logprobs.shape
    width = max(1, math.isqrt(vocab))
    blocks = -(-vocab // width)
    p = torch.empty(n, blocks * width, dtype=torch.float32, device=logprobs.device)
    torch.exp(logprobs, out=p[:, :vocab])
    p[:, vocab:] = 0.0
    by_block = p.view(n, blocks, width)
    mass = by_block.sum(2).double()
    cdf = mass.cumsum(1)
    points = u * cdf[:, -1:]
    block = torch.searchsorted(cdf, points, right=True).clamp_(max=blocks - 1)
    before = cdf.gather(1, (block - 1).clamp(min=0)).masked_fill_(block == 0, 0.0)
    # The fraction of its block's mass below the draw, < 1 so that it falls on a nonzero entry.
    fraction = ((points - before) / mass.gather(1, block)).clamp_(0.0, 1.0 - 2.0**-40)
    inner = by_block.gather(1, block[:, :, None].expand(-1, -1, width)).double().cumsum_(2)
    at = torch.searchsorted(inner, fraction[:, :, None] * inner[:, :, -1:], right=True)[:, :, 0]
    return (block * width + at.clamp_(max=width - 1)).clamp_(max=vocab - 1)


def log_normalisers(logprobs: torch.Tensor, temperatures: tuple[float, ...]) -> torch.Tensor:
    """float32 [n, len(temperatures)]: log sum_i p_i^(1/T) per row.

    The terms are (p_i / p_max)^(1/T), which neither under- nor overflow at any T. They take an
    exp pass over the row, except at half of the previous (larger) temperature, where they are
    the previous terms squared: 1, 2, 4 cost one exp and two multiplications per entry. One
    buffer of the logits' size serves every T.
    """
    peak = logprobs.amax(dim=1, keepdim=True)
    terms = torch.empty_like(logprobs)
    sums: dict[float, torch.Tensor] = {}
    previous = None
    for t in sorted(set(temperatures), reverse=True):
        if previous == 2 * t:
            terms.square_()
        else:
            torch.add(peak * (-1.0 / t), logprobs, alpha=1.0 / t, out=terms).exp_()
        sums[t] = terms.sum(1)
        previous = t
    logs = torch.stack([sums[t] for t in temperatures], dim=1).log_()
    return logs + peak / torch.tensor(temperatures, device=peak.device)


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
        values, ids = top_k(logprobs, request.top_k)
        parts += [ids.to(torch.int32).view(torch.float32), values]
    if request.samples:
        ids = draw(logprobs, uniforms(seeds, rows, request.samples))
        parts += [ids.to(torch.int32).view(torch.float32), logprobs.gather(1, ids)]
    if request.temperatures:
        parts.append(log_normalisers(logprobs, request.temperatures))
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
