"""Fixtures of the in-process core tests: the demo teacher on the counting reference engine."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from counting_engine import REFERENCE_K, CountingEngine

from logitcache.server.config import TeacherConfig
from logitcache.server.teachers.registry import TeacherRegistry


@pytest.fixture(scope="session")
def reference_teachers(demo_teacher: Path) -> Iterator[TeacherRegistry]:
    """One registry, on the counting reference engine, shared by every core test."""
    config = TeacherConfig(
        "demo", str(demo_teacher), max_top_k=REFERENCE_K, default_top_k=REFERENCE_K
    )
    registry = asyncio.run(TeacherRegistry.start([config], CountingEngine))
    yield registry
    registry.shutdown()
