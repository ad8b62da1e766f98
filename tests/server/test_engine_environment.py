"""The environment vLLM's engine processes start with on a CPU: glibc's malloc keeps large buffers
for reuse (CPU_ENGINE_ENVIRONMENT) and tcmalloc is preloaded where installed, a value the user set
wins, and nothing outlives the start."""

from __future__ import annotations

import os

import pytest

from logitcache.server.engine.vllm_engine import (
    CPU_ENGINE_ENVIRONMENT,
    engine_process_environment,
    installed_tcmalloc,
)


def test_engine_processes_start_with_malloc_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [*CPU_ENGINE_ENVIRONMENT, "LD_PRELOAD"]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "12345")
    with engine_process_environment(on_cpu=True):
        assert (
            os.environ["MALLOC_MMAP_THRESHOLD_"] == CPU_ENGINE_ENVIRONMENT["MALLOC_MMAP_THRESHOLD_"]
        )
        assert os.environ["MALLOC_TRIM_THRESHOLD_"] == "12345"
        assert os.environ.get("LD_PRELOAD") == installed_tcmalloc()
    with engine_process_environment(on_cpu=False):  # a GPU's engine: its own allocator
        assert "MALLOC_MMAP_THRESHOLD_" not in os.environ
    assert "MALLOC_MMAP_THRESHOLD_" not in os.environ and "LD_PRELOAD" not in os.environ
    assert os.environ["MALLOC_TRIM_THRESHOLD_"] == "12345"
