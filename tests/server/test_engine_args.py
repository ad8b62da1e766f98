"""Engine options: any vLLM AsyncEngineArgs field reaches vLLM, from the CLI and the config file;
options that would corrupt captured distributions are refused with the reason."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from logitcache.cli import build_parser, main
from logitcache.cli.options import engine_options
from logitcache.client.errors import InvalidArgument
from logitcache.server.config import load_config, teachers_from_flags
from logitcache.server.engine.protocol import (
    GIB,
    EngineOptions,
    check_options,
    parse_engine_args,
)
from logitcache.server.engine.vllm_engine import engine_dtype


def test_engine_arg_values_are_read_as_json_then_words_then_strings():
    parsed = parse_engine_args(
        [
            "tensor-parallel-size=2",
            "enforce_eager=true",
            "trust_remote_code=True",
            "quantization=fp8",
            "kv_cache_dtype=fp8_e4m3",
            "cpu_offload_gb=0.5",
            'compilation_config={"mode": 0}',
            "seed=None",
        ]
    )
    assert parsed == {
        "tensor_parallel_size": 2,
        "enforce_eager": True,
        "trust_remote_code": True,
        "quantization": "fp8",
        "kv_cache_dtype": "fp8_e4m3",
        "cpu_offload_gb": 0.5,
        "compilation_config": {"mode": 0},
        "seed": None,
    }
    with pytest.raises(InvalidArgument, match="KEY=VALUE"):
        parse_engine_args(["enforce_eager"])
    with pytest.raises(InvalidArgument, match="given twice"):
        parse_engine_args(["seed=1", "seed=2"])


def test_dedicated_settings_are_sugar_over_the_same_engine_args():
    options = EngineOptions(engine_args={"dtype": "float32", "max_model_len": 128, "seed": 3})
    assert (options.dtype, options.max_model_len) == ("float32", 128)
    assert options.engine_args == {"seed": 3}
    # The same value both ways is fine; two different values are refused, naming both.
    assert EngineOptions(dtype="float32", engine_args={"dtype": "float32"}).dtype == "float32"
    with pytest.raises(InvalidArgument, match="dtype is given twice.*float32.*bfloat16"):
        EngineOptions(dtype="float32", engine_args={"dtype": "bfloat16"})
    with pytest.raises(InvalidArgument, match="KV cache size is given twice"):
        EngineOptions(kv_cache_gib=1, engine_args={"kv_cache_memory_bytes": 1 << 30})


def test_kv_cache_size_takes_fractions_of_a_gib():
    assert EngineOptions(kv_cache_gib=0.5).kv_cache_bytes() == GIB // 2
    assert EngineOptions(engine_args={"kv_cache_memory_bytes": 12345}).kv_cache_bytes() == 12345
    assert EngineOptions().kv_cache_bytes() is None
    with pytest.raises(InvalidArgument, match="positive"):
        check_options(EngineOptions(kv_cache_gib=0))


@pytest.mark.parametrize(
    ("engine_args", "reason"),
    [
        ({"speculative_config": {"method": "ngram"}}, "speculative decoding .* corrupt"),
        ({"spec_method": "ngram"}, "speculative decoding"),
        ({"logprobs_mode": "processed_logprobs"}, "raw_logprobs"),
        ({"logprobs_mode": "raw_logits"}, "not normalised"),
        ({"max_logprobs": 5}, "widest capture"),
        ({"model": "other"}, "--teacher"),
        ({"tokenizer": "other"}, "fingerprints"),
        ({"skip_tokenizer_init": False}, "token ids"),
        ({"hf_token": "hf_x"}, "HF_TOKEN"),
        ({"scheduling_policy": "fcfs"}, "priority"),
        ({"load_format": "dummy"}, "random weights"),
    ],
)
def test_options_that_would_corrupt_captures_are_refused_with_the_reason(engine_args, reason):
    with pytest.raises(InvalidArgument, match=reason):
        check_options(EngineOptions(engine_args=engine_args))


def test_harmless_options_pass():
    # Requests with prompt logprobs never read vLLM's prefix cache, so it cannot change a row.
    check_options(
        EngineOptions(
            engine_args={
                "enable_prefix_caching": True,
                "logprobs_mode": "raw_logprobs",
                "tensor_parallel_size": 2,
                "quantization": "fp8",
            }
        )
    )


def _precompute_args(*extra: str) -> argparse.Namespace:
    return build_parser().parse_args(
        [
            "precompute",
            "--teacher",
            "t",
            "--data",
            "d.jsonl",
            "--out",
            "o",
            "--dataset",
            "ds",
            *extra,
        ]
    )


def test_cli_engine_args_and_flags_reach_the_engine_options():
    args = _precompute_args(
        "--engine-arg",
        "tensor_parallel_size=2",
        "--engine-arg",
        "enforce_eager=true",
        "--engine-arg",
        "kv_cache_dtype=fp8",
        "--revision",
        "0123abc",
        "--kv-cache-gib",
        "0.5",
        "--dtype",
        "float32",
    )
    options = engine_options(args, 8)
    assert options.engine_args == {
        "tensor_parallel_size": 2,
        "enforce_eager": True,
        "kv_cache_dtype": "fp8",
        "revision": "0123abc",
    }
    assert options.revision == "0123abc"
    assert (options.dtype, options.kv_cache_bytes(), options.max_top_k) == ("float32", GIB // 2, 8)
    # Defaults are vLLM's: no KV cache size and no engine option unless given.
    plain = engine_options(_precompute_args(), 8)
    assert plain.kv_cache_gib is None and plain.engine_args == {}


def test_cli_refuses_a_corrupting_option_in_one_line(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"input_ids": [1, 2, 3]}) + "\n")
    argv = ["precompute", "--teacher", str(tmp_path), "--data", str(data)]
    argv += [
        "--out",
        str(tmp_path / "store"),
        "--dataset",
        "ds",
        "--engine-arg",
        "spec_method=ngram",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "speculative decoding" in err
    assert not (tmp_path / "store").exists()


def test_config_file_teacher_table_carries_engine_args(tmp_path: Path):
    config = tmp_path / "server.toml"
    config.write_text(
        'store = "s"\n'
        "[[teachers]]\n"
        'name = "big"\n'
        'source = "org/model"\n'
        "kv_cache_gib = 0.5\n"
        "[teachers.engine_args]\n"
        "tensor_parallel_size = 2\n"
        'revision = "v1.0"\n'
        'quantization = "fp8"\n'
    )
    options = load_config(str(config), {}).teachers[0].engine_options()
    assert options.engine_args == {
        "tensor_parallel_size": 2,
        "revision": "v1.0",
        "quantization": "fp8",
    }
    assert options.kv_cache_bytes() == GIB // 2 and options.scheduling_priority

    config.write_text(
        'store = "s"\n[[teachers]]\nname = "big"\nsource = "org/model"\n'
        '[teachers.engine_args]\nlogprobs_mode = "processed_logprobs"\n'
    )
    with pytest.raises(InvalidArgument, match="teacher 'big': engine option logprobs_mode"):
        load_config(str(config), {})


def test_serve_teacher_flags_set_engine_args():
    flags = {"teacher_engine_arg": ["tensor_parallel_size=2"], "teacher_revision": "v2"}
    (teacher,) = teachers_from_flags(["big=org/model"], flags)
    assert teacher.engine_args == {"tensor_parallel_size": 2, "revision": "v2"}
    (single,) = teachers_from_flags(["org/model"], {"teacher_engine_arg": "enforce_eager=true"})
    assert single.engine_args == {"enforce_eager": True}


def test_quantised_and_kv_cache_dtypes_are_part_of_the_engine_dtype():
    assert engine_dtype("torch.bfloat16", None, "auto") == "bfloat16"
    assert engine_dtype("torch.float16", None, "float16") == "float16"
    assert engine_dtype("torch.bfloat16", "fp8", "fp8_e4m3") == "bfloat16+fp8+kv-fp8_e4m3"
    rope = {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}
    labelled = engine_dtype("torch.bfloat16", None, "auto", rope)
    assert labelled.startswith("bfloat16+hf-") and labelled != engine_dtype(
        "torch.bfloat16", None, "auto", {"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}
    )
    # A recorded engine dtype asks the engine for its compute dtype.
    assert EngineOptions(dtype="bfloat16+fp8").dtype_for(None) == "bfloat16"  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def demo_info(demo_teacher):
    from logitcache.server.teachers.identity import resolve_teacher

    return resolve_teacher(str(demo_teacher))


@pytest.mark.slow  # imports vLLM
def test_engine_args_pass_through_to_vllm(demo_info):
    from logitcache.server.engine.vllm_engine import vllm_engine_args

    given = {
        "tensor_parallel_size": 2,
        "pipeline_parallel_size": 1,
        "quantization": "fp8",
        "kv_cache_dtype": "fp8",
        "enforce_eager": True,
        "trust_remote_code": True,
        "enable_prefix_caching": True,
        "seed": 7,
        "revision": "v1",  # resolved before the engine starts: the path is that revision
        "download_dir": "/elsewhere",
    }
    options = EngineOptions(max_top_k=16, max_model_len=256, engine_args=given)
    args = vllm_engine_args(demo_info, options, GIB // 2)
    for key, value in given.items():
        if key not in ("revision", "download_dir"):
            assert getattr(args, key) == value, key
    assert args.revision is None and args.download_dir is None
    assert args.model == str(demo_info.path) and args.skip_tokenizer_init
    assert (args.max_logprobs, args.max_model_len) == (16, 256)
    assert args.kv_cache_memory_bytes == GIB // 2
    assert args.dtype == demo_info.native_dtype and args.scheduling_policy == "fcfs"


@pytest.mark.slow  # imports vLLM
def test_unknown_and_invalid_engine_args_fail_with_vllms_message(demo_info):
    from logitcache.server.engine.vllm_engine import VLLMEngine

    with pytest.raises(InvalidArgument) as e:
        VLLMEngine(demo_info, EngineOptions(engine_args={"tensor_paralel_size": 2}))
    assert "unexpected keyword argument 'tensor_paralel_size'" in str(e.value)
    assert "nearest: tensor_parallel_size" in str(e.value)
    # A known name with a value vLLM refuses fails at vLLM's config step, before anything loads.
    with pytest.raises(InvalidArgument, match="vLLM refused the engine options"):
        VLLMEngine(demo_info, EngineOptions(engine_args={"kv_cache_dtype": "int3"}))


@pytest.mark.slow  # imports vLLM
def test_cpu_ranks_without_a_numa_node_each_are_refused_with_the_binding(demo_info, monkeypatch):
    from vllm.utils.cpu_resource_utils import get_visible_memory_node

    from logitcache.server.engine.vllm_engine import VLLMEngine

    if len(get_visible_memory_node()) >= 2:
        pytest.skip("vLLM binds two ranks itself on a machine with two NUMA nodes")
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    with pytest.raises(InvalidArgument, match=r"VLLM_CPU_OMP_THREADS_BIND='[0-9,]+\|[0-9,]+'"):
        VLLMEngine(demo_info, EngineOptions(engine_args={"tensor_parallel_size": 2}))


@pytest.mark.slow  # imports vLLM
def test_fractional_kv_cache_env_is_refused_clearly(demo_info, monkeypatch):
    from logitcache.server.engine.vllm_engine import VLLMEngine

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "0.5")
    with pytest.raises(InvalidArgument, match="whole number of GiB.*--kv-cache-gib 0.5"):
        VLLMEngine(demo_info, EngineOptions(kv_cache_gib=0.5))


TP_TOL = 2e-3  # the same fp32 model split over two ranks sums in another order


@pytest.mark.slow  # starts a second vLLM engine (two ranks)
def test_tensor_parallel_engine_gives_the_rows_of_one_rank(
    engine, loop_thread, demo_info, demo_sequences, monkeypatch
):
    """TP=2 on the CPU build, with a fractional KV cache and a pass-through option, against the
    session's TP=1 engine. vLLM binds each rank's threads to a NUMA node of its own; a one-node
    machine names a CPU list per rank instead (VLLM_CPU_OMP_THREADS_BIND, read at spawn)."""
    from logitcache.server.engine.vllm_engine import VLLMEngine

    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")  # an explicit size wins over it
    options = EngineOptions(
        max_top_k=8,
        kv_cache_gib=0.5,
        engine_args={"tensor_parallel_size": 2, "enforce_eager": True},
    )

    async def start() -> VLLMEngine:
        return VLLMEngine(demo_info, options)

    tp2 = loop_thread.run(start())
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND")
    try:
        assert tp2.dtype == engine.dtype
        # Each rank holds half the KV heads, so half a GiB holds as many blocks as the single
        # rank's 1 GiB: the fraction reached vLLM, and VLLM_CPU_KVCACHE_SPACE did not win.
        assert tp2.kv_cache_blocks == engine.kv_cache_blocks > 0
        for ids in demo_sequences:
            one = loop_thread.run(engine.capture(ids, 9))  # the 9th shows ties at the 8th
            two = loop_thread.run(tp2.capture(ids, 8))
            np.testing.assert_allclose(two.logprobs, one.logprobs[:, :8], atol=TP_TOL)
            np.testing.assert_allclose(
                two.target_logprobs[:-1], one.target_logprobs[:-1], atol=TP_TOL
            )
            # Ids agree except where a value ties with a neighbour's within the tolerance.
            tie_next = np.abs(np.diff(one.logprobs, axis=1)) < TP_TOL  # [T, 8]
            near_tie = tie_next.copy()
            near_tie[:, 1:] |= tie_next[:, :-1]
            swapped = two.token_ids != one.token_ids[:, :8]
            assert not np.any(swapped & ~near_tie), "ids differ away from ties"
    finally:
        tp2.shutdown()
