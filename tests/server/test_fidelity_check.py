"""inspect --fidelity reruns the teacher as the space was captured: the recorded engine dtype
(``bfloat16+fp8+kv-fp8_e4m3``) becomes the compute dtype, quantisation and KV-cache dtype again,
and a rerun on the reference engine reproduces a stored dataset."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from counting_engine import CountingEngine

import logitcache
from logitcache.client.errors import FailedPrecondition
from logitcache.client.space import CaptureMode
from logitcache.server.engine.capture import CaptureConfig
from logitcache.server.engine.vllm_engine import engine_dtype
from logitcache.server.fidelity_check import check_fidelity, rerun_options
from logitcache.server.precompute import PrecomputeRequest, precompute


@pytest.mark.parametrize(
    "label",
    [
        engine_dtype("torch.float32", None, "auto"),
        engine_dtype("torch.bfloat16", "fp8", "auto"),
        engine_dtype("torch.float16", "awq", "fp8_e4m3"),
    ],
)
def test_the_recorded_engine_dtype_gives_back_the_options_that_made_it(label: str) -> None:
    options = rerun_options(label, CaptureConfig(CaptureMode.TOPK, 8))
    args = options.engine_args
    relabelled = engine_dtype(
        options.dtype, args.get("quantization"), args.get("kv_cache_dtype", "auto")
    )
    assert relabelled == label
    assert "+" not in options.dtype and options.max_top_k == 8


def test_config_overrides_cannot_be_rebuilt_and_say_so() -> None:
    label = engine_dtype("torch.bfloat16", None, "auto", {"rope_scaling": {"factor": 2.0}})
    with pytest.raises(FailedPrecondition, match="overrides of the teacher's config"):
        rerun_options(label, CaptureConfig(CaptureMode.TOPK, 8))


def test_a_rerun_on_the_engine_of_the_space_reproduces_the_store(
    demo_teacher: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["the cat sat", "a dog ran"]))
    store_url = str(tmp_path / "store")
    request = PrecomputeRequest(
        teacher=str(demo_teacher), data=data, out=store_url, dataset="d", top_k=8, progress=False
    )
    asyncio.run(precompute(request, engine_factory=CountingEngine))
    figures = check_fidelity(
        logitcache.open_store(store_url), "d", None, 2, engine_factory=CountingEngine
    )
    assert figures["sequences"] == 2
    assert figures["max_err_p_ge_0.001"] <= 0.01  # the storage contract, on the same engine
