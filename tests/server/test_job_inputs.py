"""A job's server_path takes the inputs precompute's --data does (a save_to_disk directory, local
files through hf://json), confined to the admin's roots, and never a hub dataset; the client
sends a chat job's messages_field; a redacting filter redacts chat messages before rendering.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from counting_engine import REFERENCE_K, CountingEngine
from job_managers import JOB_S, USE, last_update, manager
from test_chat_dataset import CONVERSATIONS, _expected
from test_hf_inputs import ROWS, saved

import logitcache
from logitcache.client.client import AsyncClient
from logitcache.client.errors import FailedPrecondition, PermissionDenied
from logitcache.client.use import Use
from logitcache.server.app import serve
from logitcache.server.chat import TEMPLATES_DIR, chat_renderer
from logitcache.server.config import ServerConfig, TeacherConfig
from logitcache.server.jobs import JobSpec, JobState
from logitcache.server.policy.admission import Admission
from logitcache.server.precompute import PrecomputeRequest, admitted_inputs
from logitcache.server.teachers.registry import Teacher, TeacherRegistry

datasets = pytest.importorskip("datasets")


def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Nothing may reach the hub, and the datasets cache is the test's own."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def run_job(url: str, teachers: TeacherRegistry, server_path: str, admission: Admission):
    async def scenario():
        jobs = manager(url, teachers, admission=admission)
        try:
            spec = JobSpec(dataset="d", use=USE, server_path=server_path)
            job = await jobs.submit(spec, [], [], user="alice")
            return await last_update(jobs, job.id)
        finally:
            await jobs.close()

    return asyncio.run(scenario())


def refusal(url: str, teachers: TeacherRegistry, server_path: str, admission: Admission) -> str:
    with pytest.raises(PermissionDenied) as refused:
        run_job(url, teachers, server_path, admission)
    return str(refused.value)


def test_a_job_reads_a_saved_dataset_inside_the_roots_and_nothing_outside(
    reference_teachers: TeacherRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    offline(monkeypatch, tmp_path)
    url = str(tmp_path / "store")
    inputs, outside = tmp_path / "inputs", tmp_path / "outside"
    outside.mkdir()
    confined = Admission(input_roots=(inputs,))
    done = run_job(url, reference_teachers, str(saved(inputs / "saved", ROWS)), confined)
    assert done.state is JobState.COMPLETED, done.error
    assert len(logitcache.open_store(url).dataset("d")) == len(ROWS)
    (inputs / "part.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    done = run_job(str(tmp_path / "json-store"), reference_teachers,
                   f"hf://json?data_files={inputs}/*.jsonl", confined)  # fmt: skip
    assert done.state is JobState.COMPLETED, done.error
    assert len(logitcache.open_store(str(tmp_path / "json-store")).dataset("d")) == len(ROWS)

    (outside / "plain.jsonl").write_text(json.dumps({"input_ids": [7, 8]}) + "\n")
    plain = refusal(url, reference_teachers, str(outside / "plain.jsonl"), confined)
    assert "outside the directories" in plain
    saved_outside = str(saved(outside / "saved", ROWS))
    for path in (saved_outside, str(outside / "missing"), f"hf://json?data_files={outside}/*"):
        assert refusal(url, reference_teachers, path, confined) == plain  # existence not told
    linked = inputs / "linked.jsonl"
    linked.symlink_to(outside / "plain.jsonl")  # a local file a glob in the roots leads out to
    assert refusal(url, reference_teachers, f"hf://json?data_files={inputs}/*.jsonl",
                   confined) == plain  # fmt: skip


def test_a_job_refuses_a_hub_dataset(reference_teachers: TeacherRegistry, tmp_path: Path) -> None:
    confined = Admission(input_roots=(tmp_path,))
    for url in ("hf://allenai/c4/en?split=train", "hf://json?data_files=https://x.org/a.json"):
        with pytest.raises(FailedPrecondition, match="server's credentials"):
            run_job(str(tmp_path / "store"), reference_teachers, url, confined)


def chat_teacher(demo_teacher: Path, folder: Path) -> Path:
    """The demo teacher with ChatML as its own chat template (a job uses the teacher's)."""
    teacher = folder / "chat-teacher"
    shutil.copytree(demo_teacher, teacher)
    config = json.loads((teacher / "tokenizer_config.json").read_text())
    config["chat_template"] = (TEMPLATES_DIR / "chatml.jinja").read_text()
    (teacher / "tokenizer_config.json").write_text(json.dumps(config))
    return teacher


def test_the_client_submits_a_chat_job_whose_dataset_keeps_its_masks(
    demo_teacher: Path, tmp_path: Path
) -> None:
    """In process: serve() on the reference engine, the AsyncClient over gRPC."""
    teacher = chat_teacher(demo_teacher, tmp_path)
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"turns": c}) + "\n" for c in CONVERSATIONS))
    url = str(tmp_path / "store")
    config = ServerConfig(
        store=url, port=0, http_port=0, allow_anonymous=True, input_roots=[str(tmp_path)],
        teachers=[TeacherConfig("chat", str(teacher), max_top_k=REFERENCE_K,
                                default_top_k=REFERENCE_K)],
    )  # fmt: skip
    use = Use("research", "test-student", "test")

    async def scenario() -> None:
        stop, ready, ports = asyncio.Event(), asyncio.Event(), []

        def on_ready(grpc_port: int, _: int) -> None:
            ports.append(grpc_port)
            ready.set()

        server = asyncio.create_task(
            serve(config, engine_factory=CountingEngine, stop=stop, on_ready=on_ready)
        )
        try:
            async with asyncio.timeout(JOB_S):
                await ready.wait()
                async with AsyncClient(f"127.0.0.1:{ports[0]}", use=use) as client:
                    job_id = await client.precompute(
                        "chat", server_path=str(data), messages_field="turns"
                    )
                    done = await client.wait(job_id, progress=False)
            assert done.spec.messages_field == "turns"
        finally:
            stop.set()
            await server

    asyncio.run(scenario())
    ds = logitcache.open_store(url).dataset("chat")
    assert ds.provenance["chat"]["messages_field"] == "turns"
    for i, (ids, mask) in enumerate(_expected(demo_teacher)):
        np.testing.assert_array_equal(ds[i].input_ids, ids)
        np.testing.assert_array_equal(ds[i].loss_mask, mask)


def test_submit_takes_messages_field() -> None:
    from logitcache.cli import build_parser

    common = ["submit", "--dataset", "n", "--server-path", "chats.jsonl"]
    args = build_parser().parse_args([*common, "--messages-field", "turns"])
    assert args.messages_field == "turns"
    assert build_parser().parse_args(common).messages_field is None


def test_a_redacting_filter_redacts_chat_messages_before_rendering(
    reference_teachers: TeacherRegistry, demo_teacher: Path, tmp_path: Path
) -> None:
    conversation = [
        {"role": "user", "content": "mail me at alice@example.com please"},
        {"role": "assistant", "content": "sure, I will write soon"},
    ]
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": conversation}) + "\n")
    demo: Teacher = reference_teachers.get("demo")
    req = PrecomputeRequest(
        teacher=str(demo_teacher), data=data, out=str(tmp_path / "store"), dataset="d",
        top_k=REFERENCE_K, progress=False, messages_field="messages", chat_template="chatml",
        sensitive_data="redact",
    )  # fmt: skip
    checked, report = admitted_inputs(req, demo.info, Admission())
    redacted = [{**conversation[0], "content": "mail me at [REDACTED:email] please"},
                conversation[1]]  # fmt: skip
    ids, mask = chat_renderer(demo_teacher, "messages", "chatml").render(redacted)
    np.testing.assert_array_equal(report.sequences[0].input_ids, ids)
    assert report.loss_masks is not None
    np.testing.assert_array_equal(report.loss_masks[0], mask)
    filters = checked.provenance["filters"]
    assert filters["action"] == "redact" and filters["counts"] == {"email": 1}
    assert filters["texts_with_findings"] == 1 and filters["texts_rejected"] == 0
