"""The licence policy over gRPC, on one reference-engine server process: the declared use, the
teacher's licence in ListTeachers, SetTeacherLicence, refusals as status codes that cite the
clause, and the provenance that DescribeDataset returns and `logitcache provenance` prints.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import grpc
import pytest
from declared_use import USE
from reference_server import ReferenceServer

from logitcache.cli import main
from logitcache.client import Client, Use

RPC_S = 120.0
COMMERCIAL_QWEN = Use("commercial", "tiny-distilled", "qwen2", "lab")


def refusal(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as refused:
        call()
    return refused.value


def test_the_policy_over_grpc(demo_teacher: Path, tmp_path: Path, capsys) -> None:
    bare = tmp_path / "bare-teacher"  # the demo teacher without a model card: no licence
    shutil.copytree(demo_teacher, bare, ignore=shutil.ignore_patterns("README.md"))
    with (
        ReferenceServer(demo_teacher, tmp_path / "store", "--teacher", f"bare={bare}") as server,
        Client(server.target, timeout=RPC_S) as client,
    ):
        teachers = {t.name: t for t in client.list_teachers().teachers}
        assert teachers["demo"].license == "apache-2.0"
        assert json.loads(teachers["demo"].license_json)["name"] == "Apache License 2.0"
        assert teachers["bare"].license == "" and teachers["bare"].license_json == ""

        undeclared = refusal(lambda: client.get_distributions([[5, 6, 7]]))
        assert undeclared.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "declare the use" in undeclared.details()
        unlicensed = refusal(lambda: client.get_distributions([[5, 6]], teacher="bare", use=USE))
        assert unlicensed.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "SetTeacherLicence" in unlicensed.details()

        declared = client.set_teacher_licence("bare", "llama2")
        assert declared.license == "llama2"
        assert json.loads(declared.license_json)["outputs"]["clause"]["section"] == "§1.b.v"
        refused = refusal(
            lambda: client.get_distributions([[5, 6]], teacher="bare", use=COMMERCIAL_QWEN)
        )
        assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "§1.b.v" in refused.details()
        job = refusal(lambda: client.precompute("llama", texts=["a"], teacher="bare",
                                                use=COMMERCIAL_QWEN))  # fmt: skip
        assert job.code() == grpc.StatusCode.FAILED_PRECONDITION

        client.wait(client.precompute("built", texts=["the cat sees a dog ."], use=USE))
        provenance = json.loads(client.describe_dataset("built").provenance_json)
        assert provenance["policy_decision"]["verdict"] == "allow"
        assert provenance["user"] == "anonymous" and provenance["requester"] == "tests"
        card = tmp_path / "card.md"
        capsys.readouterr()
        assert main(["provenance", "built", "--server", server.target, "--model-card",
                     str(card)]) == 0  # fmt: skip
        printed = capsys.readouterr().out
        assert printed.strip() == card.read_text().strip()
        assert "## Distillation provenance" in printed and "**allow**" in printed
        assert teachers["demo"].teacher_fingerprint in printed
