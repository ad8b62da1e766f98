"""The committed gRPC stubs are exactly what `make proto` generates from proto/."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

PROTO = Path(__file__).resolve().parents[2] / "proto"
COMMITTED = PROTO / "logitcache" / "v1"
_spec = importlib.util.spec_from_file_location("generate", PROTO / "generate.py")
assert _spec is not None and _spec.loader is not None
proto_stubs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(proto_stubs)


def test_committed_stubs_match_the_proto(tmp_path):
    pytest.importorskip("grpc_tools")
    proto_stubs.generate(tmp_path)
    generated = sorted(p.name for p in (tmp_path / "logitcache" / "v1").glob("*_pb2*"))
    assert generated == ["logitcache_pb2.py", "logitcache_pb2.pyi", "logitcache_pb2_grpc.py"]
    for name in generated:
        fresh = (tmp_path / "logitcache" / "v1" / name).read_text()
        assert fresh == (COMMITTED / name).read_text(), f"{name} is stale: run `make proto`"


def test_every_service_rpc_message_and_field_is_documented():
    """The proto is the documentation: a comment sits right above each declaration."""
    declaration = re.compile(r"^(service|rpc|message) |^(repeated |optional )?[\w.]+ \w+ = \d+")
    lines = (proto_stubs.PROTO_ROOT / "logitcache/v1/logitcache.proto").read_text().splitlines()
    undocumented = [
        f"line {i + 1}: {line.strip()}"
        for i, line in enumerate(lines)
        if declaration.match(line.strip()) and not lines[i - 1].strip().startswith("//")
    ]
    assert not undocumented, undocumented
