"""Full-distribution work on the engine's device: from a chunk of logits [n, V] to a few columns.

Every capture mode needs the whole distribution of a position once (its exponentials), and then
only a handful of numbers: the top-k, U draws at T = 1, log-normalisers at other temperatures,
the log-prob of the actual next token. :func:`capture_columns` computes them where the logits are
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
from dataclasses import dataclass

import numpy as np
import torch

from logitcache.client.codecs import TopKRows
from logitcache.server.engine.columns import CaptureRequest, seed_of_key
from logitcache.server.engine.sampling import group_draws

_MASK32 = 0xFFFFFFFF
_MIN_GROUPS_PER_K = 4  # top_k works in groups only where there are this many groups per k
_CONTIGUOUS_WIDTH = 16  # top_k's groups are runs of ids from this width on (see top_k)
# Entries of logits a CPU works on at once (float32: 2 MiB, the L2 caches of a few cores).
_BLOCK_ELEMENTS = 1 << 19
_MAX_POWER = 16  # see _stages
_LOG2_E = 1.0 / math.log(2.0)


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
    """The group size b of :func:`top_k` that about minimises what its two stages select from
    (vocab / b group maxima, then k * b candidates): sqrt(vocab / k), rounded up to a power of
    two where groups are contiguous ids; 1 where groups would not pay."""
    width = int(math.sqrt(vocab / max(k, 1)))
    if width >= _CONTIGUOUS_WIDTH:
        width = 1 << (width - 1).bit_length()
    return width if width >= 2 and vocab // width >= _MIN_GROUPS_PER_K * k else 1


def top_k(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest values per row of ``x`` [n, V] and their int64 ids, descending: equal to
    ``torch.topk`` up to the order of ties, at a fraction of its cost on a CPU.

    The ids split into G groups of b (the V - G * b last ids are always candidates). The k
    largest lie in the k groups with the largest maxima, since an entry of any other group is
    below k group maxima; so one top-k over the G group maxima and one over the k * b entries of
    those groups replace one over V entries. Groups of at least ``_CONTIGUOUS_WIDTH`` are runs of
    b ids (their maxima a vectorised reduction over b contiguous entries); narrower ones are
    strided (group g: ids g, g + G, g + 2G, ..., the maxima a reduction across rows of G).
    """
    n, vocab = x.shape
    width = _block_width(vocab, k)
    if width == 1:
        return torch.topk(x, k, dim=1)
    groups = vocab // width
    grouped = x[:, : groups * width]
    if width >= _CONTIGUOUS_WIDTH:
        maxima = grouped.unflatten(1, (groups, width)).amax(2)
        first, step = width, 1  # group g holds ids g * width + j
    else:
        maxima = grouped.unflatten(1, (width, groups)).amax(1)
        first, step = 1, groups  # group g holds ids g + j * groups
    chosen = torch.topk(maxima, k, dim=1, sorted=False).indices
    members = torch.arange(0, width * step, step, device=x.device)
    ids = (chosen[:, :, None] * first + members).flatten(1)
    if vocab > groups * width:
        rest = torch.arange(groups * width, vocab, device=x.device)
        ids = torch.cat([ids, rest.expand(n, -1)], dim=1)
    top = torch.topk(x.gather(1, ids), k, dim=1)
    return top.values, ids.gather(1, top.indices)


def draw(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """int64 [n, U]: the inverse CDF of each row's distribution at the uniforms ``u`` (float64,
    in id order: draw j is the first id whose cumulative probability exceeds u_j); ``weights``
    [n, V] are the probabilities, or any positive multiple of them per row.

    Two levels, so that no cumulative sum runs over the whole vocabulary: the masses of blocks
    of about sqrt(V) ids (their CDF in float64) find each draw's block and its fraction of the
    block's mass, then a cumulative sum over that block alone finds its id. A draw moves only
    where u falls within float rounding of a boundary.
    """
    n, vocab = weights.shape
    width = max(1, math.isqrt(vocab))
    full = vocab // width
    mass = weights[:, : full * width].unflatten(1, (full, width)).sum(2)
    if vocab > full * width:  # the last, shorter block
        mass = torch.cat([mass, weights[:, full * width :].sum(1, keepdim=True)], dim=1)
    cdf = mass.double().cumsum(1)
    points = u * cdf[:, -1:]
    blocks = cdf.shape[1]
    block = torch.searchsorted(cdf, points, right=True).clamp_(max=blocks - 1)
    before = cdf.gather(1, (block - 1).clamp(min=0)).masked_fill_(block == 0, 0.0)
    # The fraction of its block's mass below the draw, < 1 so that it falls on a nonzero entry.
    fraction = ((points - before) / (cdf.gather(1, block) - before)).clamp_(0.0, 1.0 - 2.0**-40)
    ids = block[:, :, None] * width + torch.arange(width, device=weights.device)
    inside = ids < vocab
    inner = weights.gather(1, ids.clamp_(max=vocab - 1).flatten(1)).view(ids.shape)
    inner = inner.masked_fill_(~inside, 0.0).double().cumsum_(2)
    at = torch.searchsorted(inner, fraction[:, :, None] * inner[:, :, -1:], right=True)[:, :, 0]
    return (ids[:, :, 0] + at.clamp_(max=width - 1)).clamp_(max=vocab - 1)


@dataclass(frozen=True)
class _Stage:
    """One temperature of a capture's pass over a row: its terms exp((x_i - max) / T), computed
    afresh (``power`` 1) or as the previous stage's terms squared (T is half the previous T;
    ``power``, the hottest T of the chain over this T, doubles)."""

    temperature: float
    power: int


def _stages(temperatures: tuple[float, ...]) -> tuple[_Stage, ...]:
    """T = 1 and ``temperatures``, hottest first, squaring wherever T halves, in chains of up to
    ``_MAX_POWER``. The terms' largest is exp(0) = 1, so no sum underflows however long the
    chain; a squaring doubles each term's relative error from the exponential (one float32
    rounding), which the limit keeps near 1e-6."""
    stages: list[_Stage] = []
    for t in sorted(set(temperatures) | {1.0}, reverse=True):
        doubled = 2 * stages[-1].power if stages else 0
        if stages and stages[-1].temperature == 2 * t and doubled <= _MAX_POWER:
            stages.append(_Stage(t, doubled))
        else:
            stages.append(_Stage(t, 1))
    return tuple(stages)


def _block_rows(logits: torch.Tensor) -> int:
    """Rows worked on at once: on a CPU, a block of logits of about ``_BLOCK_ELEMENTS`` (and a
    row per thread at least), whose terms stay in cache while every stage passes over them;
    elsewhere, all rows."""
    n, vocab = logits.shape
    if logits.device.type != "cpu":
        return max(n, 1)
    return max(1, torch.get_num_threads(), _BLOCK_ELEMENTS // vocab)


def _row_pass(logits: torch.Tensor, peaks: torch.Tensor, peak_ids: torch.Tensor | None,
              stages: tuple[_Stage, ...], u: torch.Tensor | None,
              ) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """float64 [len(stages), n]: log sum_i exp((x_i - max) / T) per stage and row (``peaks``
    [n, 1] float32, each row's max; ``peak_ids`` [n, 1], where it is, if known); and, when
    ``u`` is given, the draws at T = 1 (int64 [n, U]).

    One pass over the logits in blocks of rows: per block, each stage's terms are computed in
    one buffer and summed, and the draws are made from the terms at T = 1, so every row of
    logits is read from memory once.

    T = 1 alone is a softmax, the kernel of vLLM's own log-probs: its sum, 1 / its peak term,
    is then vLLM's to float rounding, which the start-up check holds the capture to. That sum
    is a float32 accumulation that at V = 131,072 is off by up to 1.4e-4 (relative) on rows
    with one large term, beyond the check's 1e-4. With other temperatures, a fresh stage's
    terms are 2 ** ((x - max) * log2(e) / T), the shift first so that the exponent's rounding
    is relative to x - max, summed by ``torch.sum`` (within 3e-7 of float64 there); eager
    ``exp2`` takes a third of ``exp``'s time on a CPU and less than a softmax, which would also
    take a max and normalise. A chain of squares then serves every halved T with one pass
    each.
    """
    n, vocab = logits.shape
    rows = min(_block_rows(logits), n)
    device = logits.device
    softmax = stages == (_Stage(1.0, 1),)
    sums = torch.empty(len(stages), n, dtype=torch.float32, device=device)
    ids = None if u is None else torch.empty(u.shape, dtype=torch.int64, device=device)
    terms = torch.empty(rows, vocab, dtype=torch.float32, device=device)
    for a in range(0, n, rows):
        b = min(a + rows, n)
        block = terms[: b - a]
        for s, stage in enumerate(stages):
            if softmax:
                torch.softmax(logits[a:b].float(), dim=1, out=block)
                at = (
                    block.amax(1, keepdim=True)
                    if peak_ids is None
                    else block.gather(1, peak_ids[a:b])
                )
                torch.reciprocal(at[:, 0], out=sums[s, a:b])
            else:
                if stage.power == 1:
                    torch.sub(logits[a:b], peaks[a:b], out=block)  # float32, any logits
                    block.mul_(_LOG2_E / stage.temperature).exp2_()
                else:
                    block.square_()
                torch.sum(block, 1, out=sums[s, a:b])
            if ids is not None and u is not None and stage.temperature == 1.0:
                ids[a:b] = draw(block, u[a:b])
    return sums.double().log_(), ids


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

    The log-softmax is never materialised: the top-k is taken on the logits, and every log-prob
    stored is a logit minus the row's log-normaliser at T = 1, which the row pass computes with
    those at the other temperatures (log Z(T) = log s_T - log s_1 / T, s_T the sum of the
    stage's terms).
    """
    n, vocab = logits.shape
    if request.score_width and (scored_ids is None or scored_ids.shape != (n, request.score_width)):
        raise ValueError(f"expected [{n}, {request.score_width}] ids to score")
    top = top_k(logits, request.top_k) if request.top_k else None
    peak = (logits.amax(1, keepdim=True) if top is None else top[0][:, :1]).float()
    peak_ids = None if top is None else top[1][:, :1]
    stages = _stages(request.temperatures)
    u = uniforms(seeds, rows, request.samples) if request.samples else None
    log_sums, draws = _row_pass(logits, peak, peak_ids, stages, u)
    at = {stage.temperature: log_sums[s] for s, stage in enumerate(stages)}
    log_z = peak.double() + at[1.0][:, None]  # [n, 1]: logsumexp of each row's logits

    def logprobs_of(ids: torch.Tensor) -> torch.Tensor:
        return (logits.gather(1, ids).double() - log_z).float()

    parts = [
        logprobs_of(targets.clamp(min=0)[:, None]).masked_fill_(targets[:, None] < 0, float("nan"))
    ]
    if top is not None:
        parts += [top[1].to(torch.int32).view(torch.float32), logprobs_of(top[1])]
    if draws is not None:
        parts += [draws.to(torch.int32).view(torch.float32), logprobs_of(draws)]
    if request.temperatures:
        parts.append(
            torch.stack([at[t] - at[1.0] / t for t in request.temperatures], dim=1).float()
        )
    if request.score_width and scored_ids is not None:
        ids = scored_ids.to(torch.int64)
        outside = (ids < 0) | (ids >= vocab)
        parts.append(logprobs_of(ids.clamp(0, vocab - 1)).masked_fill_(outside, float("-inf")))
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
    ids = draw(by_id.exp(), u)
    return group_draws(ids.numpy(), by_id.gather(1, ids).numpy(), full.target_logprobs)
