"""``logitcache inspect --fidelity``: re-run the teacher on stored sequences and compare.

A sample of a dataset's sequences is captured again by the engine (in the space's engine dtype:
its compute dtype, quantisation and KV-cache dtype; at the space's width: k for top-k and top-p,
the full vocabulary for sampled), and the stored records are compared with those exact values
position by position:

- top-k and top-p spaces: :func:`logitcache.client.fidelity.fidelity` (absolute log-prob errors
  over stored entries, tail-mass error, KL(exact top-k with tail || stored top-k with tail));
- sampled spaces: the stored log-probs of the drawn ids against the exact ones, that every row
  holds exactly U draws, and whether drawing again from the exact distribution with the
  record's seed reproduces the stored draws.

The teacher must be the one the space was captured with (same fingerprint), so the comparison
is against the same numbers the store was built from, up to the engine's run-to-run noise.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import numpy as np

from logitcache.client.codecs import TopKRows, concat_rows
from logitcache.client.errors import FailedPrecondition, InvalidArgument
from logitcache.client.fidelity import fidelity
from logitcache.client.space import CaptureMode
from logitcache.server.engine.capture import MAX_TOP_K, CaptureConfig
from logitcache.server.engine.device_capture import draw_rows_for_key
from logitcache.server.engine.protocol import EngineFactory, EngineOptions
from logitcache.server.engine.vllm_engine import VLLMEngine
from logitcache.server.store.store import Store
from logitcache.server.teachers.identity import TeacherInfo, resolve_teacher


def check_fidelity(
    store: Store,
    dataset: str,
    teacher: str | None,
    sample: int,
    seed: int = 0,
    *,
    engine_factory: EngineFactory = VLLMEngine,
) -> dict[str, Any]:
    """Fidelity figures of ``sample`` sequences of ``dataset`` (JSON-able), re-run on an engine
    from ``engine_factory``."""
    if sample < 1:
        raise InvalidArgument("--sample must be at least 1")
    ds = store.dataset(dataset)
    space = ds.space
    teacher = teacher or ds.provenance.get("teacher")
    if not teacher:
        raise InvalidArgument(f"dataset {dataset!r} names no teacher; pass --teacher")
    info = resolve_teacher(teacher, ds.provenance.get("revision"))
    if info.teacher_fingerprint != space.teacher_fingerprint:
        raise FailedPrecondition(
            f"teacher {teacher!r} is not the one dataset {dataset!r} was captured with "
            f"(fingerprint {info.teacher_fingerprint[:16]} != {space.teacher_fingerprint[:16]})"
        )
    rng = np.random.default_rng(seed)
    picks = np.sort(rng.choice(len(ds), size=min(sample, len(ds)), replace=False))
    keys = [ds.raw_key(int(i)) for i in picks]
    records = [store.get(k) for k in keys]
    config = CaptureConfig.of_space(space)
    sequences = [r.input_ids for r in records]
    options = rerun_options(space.engine_dtype, config)
    exact = asyncio.run(
        _capture(engine_factory, info, options, space.engine_dtype, config.engine_width, sequences)
    )
    stored = concat_rows(
        [TopKRows(r.token_ids, r.logprobs, r.target_logprobs, r.tail_logprobs, r.counts)
         for r in records]
    )  # fmt: skip
    positions = len(stored)
    out = {"dataset": dataset, "space": space.to_json(), "sequences": len(records),
           "positions": positions, "teacher": teacher}  # fmt: skip
    if config.mode is CaptureMode.SAMPLED:
        out.update(_sampled_figures(config, keys, exact, stored))
    else:
        out.update(fidelity(concat_rows(exact), stored, space.vocab_size).summary())
        out["entries_per_position"] = float((stored.logprobs > -np.inf).sum(axis=1).mean())
    target = np.abs(concat_rows(exact).target_logprobs - stored.target_logprobs)
    out["target_err_max"] = float(np.nanmax(target)) if np.isfinite(target).any() else 0.0
    return out


def rerun_options(engine_dtype: str, config: CaptureConfig) -> EngineOptions:
    """Engine options that reproduce a space's recorded engine dtype (see
    ``vllm_engine.engine_dtype``): its compute dtype, quantisation and KV-cache dtype, at the
    space's width. The label is not itself a dtype vLLM accepts (``bfloat16+fp8``), and a rerun
    without the quantisation would compare the store with other numbers than it was built from.
    """
    dtype, *rest = engine_dtype.split("+")
    engine_args: dict[str, str] = {}
    for part in rest:
        if part.startswith("kv-"):
            engine_args["kv_cache_dtype"] = part.removeprefix("kv-")
        elif part.startswith("hf-"):
            raise FailedPrecondition(
                f"the space was captured with overrides of the teacher's config (engine dtype "
                f"{engine_dtype!r}), which the fidelity check cannot rebuild from the store"
            )
        else:
            engine_args["quantization"] = part
    sampled = config.mode is CaptureMode.SAMPLED
    return EngineOptions(
        max_top_k=1 if sampled else max(1, min(config.k, MAX_TOP_K)),
        dtype=dtype,
        full_vocab=sampled,
        engine_args=engine_args,
    )


async def _capture(engine_factory: EngineFactory, info: TeacherInfo, options: EngineOptions,
                   engine_dtype: str, width: int, sequences: Sequence[np.ndarray],
                   ) -> list[TopKRows]:  # fmt: skip
    loop = asyncio.get_running_loop()
    engine = await loop.run_in_executor(None, engine_factory, info, options)
    try:
        if engine.dtype != engine_dtype:
            raise FailedPrecondition(
                f"the engine runs as {engine.dtype!r}, not as the space's {engine_dtype!r}: its "
                "rows would not be the numbers the store was built from"
            )
        return list(await asyncio.gather(*(engine.capture(s, width) for s in sequences)))
    finally:
        engine.shutdown()


def _sampled_figures(config: CaptureConfig, keys: list[bytes], exact: list[TopKRows],
                     stored: TopKRows) -> dict[str, Any]:  # fmt: skip
    if stored.counts is None:
        raise FailedPrecondition("stored sampled rows carry no draw counts")
    counts = stored.counts
    # Exact log-probs of the stored ids: look each id up in its position's full row.
    full_ids = np.concatenate([e.token_ids for e in exact])
    full_lp = np.concatenate([e.logprobs for e in exact]).astype(np.float64)
    by_id = np.empty_like(full_lp)
    np.put_along_axis(by_id, full_ids, full_lp, axis=1)
    present: np.ndarray = counts > 0
    ref = np.take_along_axis(by_id, np.where(present, stored.token_ids, 0), axis=1)
    err = np.abs(np.where(present, stored.logprobs - ref, 0.0))
    # The engine's own draws, repeated on the host (stores sampled before the engine-side path
    # drew with another generator: their draws are not reproduced, their values still checked).
    again = concat_rows(
        [draw_rows_for_key(e, config.k, k) for e, k in zip(exact, keys, strict=True)]
    )
    width = max(again.token_ids.shape[1], stored.token_ids.shape[1])

    def wide(a: np.ndarray) -> np.ndarray:
        return np.pad(a, ((0, 0), (0, width - a.shape[1])))

    assert again.counts is not None  # sampled rows always count their draws
    same = (wide(again.token_ids) == wide(stored.token_ids)) & (wide(again.counts) == wide(counts))
    return {
        "abs_err_mean": float(err[present].mean()) if present.any() else 0.0,
        "abs_err_max": float(err.max(initial=0.0)),
        "draws_per_position_ok": bool((counts.sum(axis=1) == config.k).all()),
        "distinct_ids_per_position": float(present.sum(axis=1).mean()),
        "draws_reproduced": float(same.all(axis=1).mean()),
    }


def format_fidelity(f: dict[str, Any]) -> str:
    space = f["space"]
    lines = [
        f"fidelity of dataset {f['dataset']} (mode {space['mode']}, k={space['k']}, codec "
        f"{space['codec']}): {f['sequences']} sequences, {int(f['positions']):,} positions re-run "
        f"on {f['teacher']}",
    ]
    if "kl_mean" in f:
        lines += [
            f"  KL(exact top-k with tail || stored)  mean {f['kl_mean']:.3e}  max {f['kl_max']:.3e}",
            f"  |log-prob error| over stored entries  mean {f['abs_err_mean']:.4f}  "
            f"max {f['abs_err_max']:.4f}",
            f"  entries with p >= 1e-3: max error {f['max_err_p_ge_0.001']:.4f} nats; "
            f"p < 1e-3: max probability error {f['max_prob_err_p_lt_0.001']:.1e}",
            f"  tail-mass error  mean {f['tail_err_mean']:.2e}  max {f['tail_err_max']:.2e}",
            f"  stored entries per position: {f['entries_per_position']:.1f}",
        ]
    else:
        lines += [
            f"  |log-prob error| of the drawn ids  mean {f['abs_err_mean']:.4f}  "
            f"max {f['abs_err_max']:.4f}",
            f"  every row holds {space['k']} draws: {'yes' if f['draws_per_position_ok'] else 'NO'}; "
            f"{f['distinct_ids_per_position']:.1f} distinct ids per position",
            f"  draws reproduced from the exact distribution with the record's seed: "
            f"{f['draws_reproduced']:.1%} of positions",
        ]
    lines.append(f"  target log-prob error max {f['target_err_max']:.4f}")
    return "\n".join(lines)
